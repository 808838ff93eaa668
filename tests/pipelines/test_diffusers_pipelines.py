"""Real diffusers pipelines (FLUX, SD3, PixArt-Sigma, SDXL), tiny and offline.

Per pipeline (module-scoped, so the work is done once): build a tiny pipeline with
seeded random weights (outlier channels injected, see tiny_pipelines.add_outlier_channels),
`svdq quantize` it through the CLI (SVDQuant, rank 4), and quantize a fresh copy with
the API as naive W4A4 (no smoothing, no low-rank branch) on the same layers. The tests
then check counts, quality against the 16-bit pipeline, released float weights,
save/load, and that generation compiles once.
"""
from __future__ import annotations

import gc
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tiny_pipelines as tp  # noqa: E402

from svdq_compile import SVDQLinear  # noqa: E402
from svdq_compile.artifacts import ArtifactError  # noqa: E402
from svdq_compile.cli import main as cli  # noqa: E402
from svdq_compile.diffusers_pipelines import (  # noqa: E402
    denoiser_name,
    load_pipeline,
    pipeline_config,
    quantize_pipeline,
    save_pipeline,
)

NAMES = ["flux", "sd3", "pixart_sigma", "sdxl"]
HW = 32  # image side; the VAE halves it, the patch size (FLUX packing, SD3/PixArt) again
STEPS = 3
CALIB_PROMPTS = ["a photo of a dog", "a green tree in the city", "a small bird on a flower"]
# Evaluated with seeds 0..3, one image each (one batched call): distinct from calibration.
EVAL_PROMPTS = ["a photo of a cat", "a red house", "an astronaut riding a horse", "a blue car on the road"]
# Rank 4 is ~3% of the 128-wide tiny layers (FLUX.1's rank 32 is 1% of 3072): a rank-32
# branch would be a quarter of these layers and flatter the method. A short smoothing
# search (3 candidates) keeps the 2-core test machine busy for seconds, not minutes.
RANK = 4
FAST = {"search_grid": 2, "search_tokens": 256, "calib_tokens": 512, "refine_iters": 1}
RUNTIME = {"use_inductor": False}  # Inductor's CPU codegen would dominate the runtime
NAIVE = pipeline_config(smooth=False, rank=0, mode="w4a4")  # same layers as SVDQuant (CLI --mode w4a4), plain W4A4


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def _psnr(ref: np.ndarray, x: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((ref.astype(np.float64) - x.astype(np.float64)) ** 2)))


def _state_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def _load_fp(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, name: str) -> np.ndarray:
    out = pipe(EVAL_PROMPTS, num_inference_steps=STEPS, height=HW, width=HW, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in range(len(EVAL_PROMPTS))],
               **tp.PIPE_KWARGS[name])
    return np.asarray(out.images)


def _set_args(name: str) -> list[str]:
    args = []
    for k, v in tp.PIPE_KWARGS[name].items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    return args


@dataclass
class Case:
    name: str
    fp_dir: Path
    q_dir: Path
    ref: np.ndarray  # 16-bit images, [4, H, W, 3] in [0, 1]
    fp_bytes: int  # parameter + buffer bytes of the 16-bit denoiser
    fp_linear_bytes: dict = field(default_factory=dict)  # linear name -> weight + bias bytes


@pytest.fixture(scope="module", params=NAMES)
def case(request, tmp_path_factory) -> Case:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    fp_dir = tp.build(name, root / "fp")
    pipe = _load_fp(fp_dir)
    ref = _images(pipe, name)
    den = getattr(pipe, denoiser_name(pipe))
    linear_bytes = {n: _state_bytes(m) for n, m in den.named_modules() if isinstance(m, torch.nn.Linear)}
    prompts = root / "prompts.txt"
    prompts.write_text("# calibration prompts\n" + "\n".join(CALIB_PROMPTS) + "\n")
    q_dir = root / "q"
    options = [a for k, v in FAST.items() for a in ("--option", f"{k}={v}")]
    rc = cli(["quantize", str(fp_dir), "--prompts", str(prompts), "--out", str(q_dir), "--steps", str(STEPS),
              "--rank", str(RANK), "--mode", "w4a4", "--height", str(HW), "--width", str(HW)] + options + _set_args(name))
    assert rc == 0
    return Case(name, fp_dir, q_dir, ref, _state_bytes(den), linear_bytes)


@dataclass
class Naive:
    pipe: object
    report: object
    images: np.ndarray
    dead: list  # weakrefs to float weights of layers that were quantized


@pytest.fixture(scope="module")
def naive(case) -> Naive:
    pipe = _load_fp(case.fp_dir)
    den = getattr(pipe, denoiser_name(pipe))
    refs = [weakref.ref(m.weight) for m in den.modules() if isinstance(m, torch.nn.Linear)]
    quantize_pipeline(pipe, CALIB_PROMPTS, config=NAIVE, num_inference_steps=STEPS, compile=False, progress=False,
                      height=HW, width=HW, **tp.PIPE_KWARGS[case.name])
    images = _images(pipe, case.name)  # generate with it before the memory checks
    return Naive(pipe, pipe.svdq_reports[denoiser_name(pipe)], images, refs)


def test_counts(case, naive):
    """Exactly the linears derived in tiny_pipelines.EXPECTED_QUANTIZED are quantized."""
    q = load_pipeline(case.q_dir, compile=False, local_files_only=True)
    den = getattr(q, denoiser_name(q))
    svdq = [n for n, m in den.named_modules() if isinstance(m, SVDQLinear)]
    kept = [n for n, m in den.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(svdq) == tp.EXPECTED_QUANTIZED[case.name], svdq
    assert len(kept) == tp.EXPECTED_KEPT[case.name], kept
    assert naive.report.rewritten == tp.EXPECTED_QUANTIZED[case.name]
    assert sorted(layer["name"] for layer in naive.report.layers) == sorted(svdq)  # same layers: fair comparison
    assert all(den.get_submodule(n).base_rank == RANK for n in svdq)


def test_psnr_svdquant_beats_naive(case, naive, record_property):
    """Image PSNR vs the 16-bit pipeline (same seeds): SVDQuant above naive W4A4.

    Measured (4 seeds, 32x32, 4 steps; fast search, rank 4): SVDQuant leads by 3-9 dB
    and on every image. The 1 dB margin leaves room for machine-dependent rounding.
    """
    q = load_pipeline(case.q_dir, compile=False, local_files_only=True)
    q.set_progress_bar_config(disable=True)
    ours = _images(q, case.name)
    p_ours = _psnr(case.ref, ours)
    p_naive = _psnr(case.ref, naive.images)
    per_ours = [_psnr(r, x) for r, x in zip(case.ref, ours)]
    per_naive = [_psnr(r, x) for r, x in zip(case.ref, naive.images)]
    record_property("psnr", {"svdquant": p_ours, "naive": p_naive})
    print(f"\n{case.name}: PSNR svdquant {p_ours:.2f} dB, naive W4A4 {p_naive:.2f} dB; per image "
          f"{[round(x, 1) for x in per_ours]} vs {[round(x, 1) for x in per_naive]}")
    assert p_ours > p_naive + 1.0
    assert all(a > b for a, b in zip(per_ours, per_naive))


def test_float_weights_released(case, naive):
    """In-place quantization keeps no float copy of a quantized layer, even after generating."""
    den = getattr(naive.pipe, denoiser_name(naive.pipe))
    quantized = {n: m for n, m in den.named_modules() if isinstance(m, SVDQLinear)}
    assert len(quantized) == tp.EXPECTED_QUANTIZED[case.name]
    assert not any(isinstance(m, torch.nn.Linear) for n, m in den.named_modules() if n in quantized)
    # Exact accounting: the float bytes of the quantized layers are gone, the packed ones came in.
    packed = sum(_state_bytes(m) for m in quantized.values())
    fp_quantized = sum(case.fp_linear_bytes[n] for n in quantized)
    after = _state_bytes(den)
    assert after == case.fp_bytes - fp_quantized + packed
    assert packed < 0.2 * fp_quantized  # 4-bit + 16-bit group scales + fp32 bias vs fp32 weights
    gc.collect()
    alive = [r for r in naive.dead if r() is not None]
    assert len(alive) == tp.EXPECTED_KEPT[case.name]  # only the float-kept linears' weights


def test_save_load_roundtrip(case, naive, tmp_path):
    """save_pipeline + load_pipeline rebuild the quantized pipeline exactly (no calibration).

    (Generation from a loaded pipeline is covered by the PSNR test.)"""
    out = save_pipeline(naive.pipe, tmp_path / "saved")
    assert (out / "svdq_pipeline.json").is_file() and (out / "model_index.json").is_file()
    loaded = load_pipeline(out, compile=False, local_files_only=True)
    name = denoiser_name(loaded)
    assert name == denoiser_name(naive.pipe)
    for comp in loaded.components:
        a, b = getattr(naive.pipe, comp), getattr(loaded, comp)
        assert type(a) is type(b), comp
        if isinstance(a, torch.nn.Module):
            sa, sb = a.state_dict(), b.state_dict()
            assert sa.keys() == sb.keys(), comp
            for k in sa:
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{comp}.{k}"
    den = getattr(loaded, name)
    assert sum(isinstance(m, SVDQLinear) for m in den.modules()) == tp.EXPECTED_QUANTIZED[case.name]
    assert not any(t.is_meta for t in list(den.parameters()) + list(den.buffers()))


def test_cli_generate_compiles_once(case, tmp_path):
    """`svdq generate` with N steps: one Dynamo compilation for the whole denoising loop."""
    from PIL import Image

    png = tmp_path / "image.png"
    g0 = _unique_graphs()
    rc = cli(["generate", str(case.q_dir), "--prompt", EVAL_PROMPTS[0], "--seed", "0", "--steps", "3",
              "--height", str(HW), "--width", str(HW), "--out", str(png), "--option", "use_inductor=false"]
             + _set_args(case.name))
    assert rc == 0
    assert _unique_graphs() - g0 == 1
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape == (HW, HW, 3) and img.std() > 0


def test_second_resolution_compiles_at_most_once(case):
    pipe = load_pipeline(case.q_dir, compile_options=RUNTIME, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    counts = []
    for hw, steps in ((HW, 2), (48, 1)):
        g0 = _unique_graphs()
        pipe(EVAL_PROMPTS[1], num_inference_steps=steps, height=hw, width=hw, output_type="latent",
             generator=torch.Generator().manual_seed(0), **tp.PIPE_KWARGS[case.name])
        counts.append(_unique_graphs() - g0)
    assert counts[0] == 1 and counts[1] <= 1, counts


# ---------------------------------------------------------------- single-pipeline checks
@pytest.fixture(scope="module")
def pixart_dir(tmp_path_factory) -> Path:
    return tp.build("pixart_sigma", tmp_path_factory.mktemp("pixart_te") / "fp")


def test_quantize_text_encoders(pixart_dir, tmp_path):
    """Text encoders' linears quantized too (T5 with tied embeddings), saved and reloaded."""
    pipe = _load_fp(pixart_dir)
    quantize_pipeline(pipe, CALIB_PROMPTS[:2], config=pipeline_config(rank=RANK, **FAST), num_inference_steps=2,
                      quantize_text_encoders=True, compile=False, progress=False,
                      height=HW, width=HW, **tp.PIPE_KWARGS["pixart_sigma"])
    assert pipe.svdq_reports["text_encoder"].rewritten == tp.EXPECTED_T5_QUANTIZED
    assert pipe.svdq_reports["transformer"].rewritten == tp.EXPECTED_QUANTIZED["pixart_sigma"]
    before = pipe(EVAL_PROMPTS[0], num_inference_steps=2, height=HW, width=HW, output_type="np",
                  generator=torch.Generator().manual_seed(0), **tp.PIPE_KWARGS["pixart_sigma"]).images
    save_pipeline(pipe, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "svdq_pipeline.json").read_text())
    assert sorted(manifest["quantized"]) == ["text_encoder", "transformer"]
    loaded = load_pipeline(tmp_path / "q", compile=False, local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    te = loaded.text_encoder
    assert sum(isinstance(m, SVDQLinear) for m in te.modules()) == tp.EXPECTED_T5_QUANTIZED
    assert te.shared.weight is te.encoder.embed_tokens.weight  # tie preserved
    after = loaded(EVAL_PROMPTS[0], num_inference_steps=2, height=HW, width=HW, output_type="np",
                   generator=torch.Generator().manual_seed(0), **tp.PIPE_KWARGS["pixart_sigma"]).images
    np.testing.assert_array_equal(after, before)


def test_errors(pixart_dir, tmp_path):
    with pytest.raises(ArtifactError, match="not a quantized pipeline"):
        load_pipeline(pixart_dir)
    pipe = _load_fp(pixart_dir)
    with pytest.raises(ValueError, match="no component of the pipeline is quantized"):
        save_pipeline(pipe, tmp_path / "x")
    with pytest.raises(ValueError, match="calibration_prompts"):
        quantize_pipeline(pipe, [])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        cli(["quantize", str(pixart_dir), "--prompts", "p.txt", "--out", str(tmp_path / "o"), "--option", "rank"])
    assert not (tmp_path / "x").exists()
