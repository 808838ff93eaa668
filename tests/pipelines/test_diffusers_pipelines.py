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
import math
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from svdq_compile.testing import tiny_pipelines as tp  # noqa: E402

from svdq_compile import SVDQLinear, sqnr_db  # noqa: E402
from svdq_compile.export.artifacts import ArtifactError  # noqa: E402
from svdq_compile.cli import main as cli  # noqa: E402
from svdq_compile.integrations.diffusers.pipelines import (  # noqa: E402
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
    quant_seconds: float = 0.0  # `svdq quantize` (calibration + quantization + save)


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
    t0 = time.perf_counter()
    rc = cli(["quantize", str(fp_dir), "--prompts", str(prompts), "--out", str(q_dir), "--steps", str(STEPS),
              "--rank", str(RANK), "--mode", "w4a4", "--height", str(HW), "--width", str(HW)] + options + _set_args(name))
    assert rc == 0
    return Case(name, fp_dir, q_dir, ref, _state_bytes(den), linear_bytes, time.perf_counter() - t0)


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


# ------------------------------------------------------------------------------- LoRA
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"]  # attention q/k/v/out + an MLP linear
LORA_PROMPTS = EVAL_PROMPTS[:2]
# Loss with a LoRA (latent SQNR vs fp + the same LoRA, minus that without one). This
# test's fixed LoRAs: FLUX 0.7 dB, SD3 0.4 dB, PixArt and SDXL none (they gain). It is
# systematic, not noise (benchmarks/results/lora_margin.md, 8 random LoRAs of this
# strength, 4 prompts): FLUX -0.54 +- 0.30 dB (worst -0.96), SD3 -0.71 +- 0.23 (worst
# -1.09); a 3x weaker LoRA (B std 0.05): -0.15 +- 0.12 and -0.17 +- 0.11. It is not the
# LoRA path: per layer, on the same inputs, the quantized error is the same with and
# without the LoRA (to 2.5e-6 relative; SQNR +0.2..+0.6 dB per layer), so what moves is
# the 4-bit error of the other layers through a different function (re-quantizing with
# the LoRA fused, which the issue forbids, loses more: -1.8 and -0.9 dB).
# 1.0 dB: the test's own LoRAs (deterministic seeds) lose at most 0.7 dB; 0.3 dB is left
# for machine-dependent rounding of the quantized activations.
MARGIN_DB = 1.0


def _lora_images(pipe, name: str) -> np.ndarray:
    """Final latents (the tiny VAE would flatten the differences), 2 prompts x 2 steps."""
    out = pipe(LORA_PROMPTS, num_inference_steps=2, height=HW, width=HW, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in range(len(LORA_PROMPTS))], **tp.PIPE_KWARGS[name])
    return out.images.float().numpy()


_LORA_FILES: dict = {}  # (pipeline dir, targets) -> files: seeded, read-only, so the tests share them


def _make_lora_files(case, targets=LORA_TARGETS) -> dict:
    """Two LoRAs (rank 4) built with PEFT on the 16-bit denoiser, saved the diffusers way
    (once per pipeline and target list; the tests only read them).

    B is random (PEFT initialises it to zero): the adapters change the images clearly
    more than quantization does, so the comparisons below are not vacuous.
    """
    key = (str(case.q_dir), tuple(targets))
    if key in _LORA_FILES and all(p.exists() for p in _LORA_FILES[key].values()):
        return _LORA_FILES[key]
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = Path(f"{case.q_dir}_lora_{len(_LORA_FILES)}")
    pipe = _load_fp(case.fp_dir)
    dname = denoiser_name(pipe)
    den = getattr(pipe, dname)
    files = {}
    for i, adapter in enumerate(("a", "b")):
        config = LoraConfig(r=4, lora_alpha=4, target_modules=targets)
        if hasattr(den, "add_adapter"):
            den.add_adapter(config, adapter_name=adapter)
        else:  # PixArt's transformer has no PeftAdapterMixin: PEFT directly
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, den, adapter_name=adapter)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in den.named_parameters():
                if f"lora_B.{adapter}." in n or f"lora_A.{adapter}." in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * (0.15 if "lora_B" in n else 1.0 / p.shape[1] ** 0.5))
        sd = get_peft_model_state_dict(den, adapter_name=adapter)
        path = root / f"lora_{adapter}"
        if hasattr(type(pipe), "save_lora_weights"):
            type(pipe).save_lora_weights(path, **{f"{dname}_lora_layers": sd}, safe_serialization=True)
        else:  # PixArt: no LoRA loader mixin in diffusers; PEFT's own state dict file
            from safetensors.torch import save_file

            path.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "adapter.safetensors"))
        files[adapter] = path
    _LORA_FILES[key] = files
    return files


def _load_lora(pipe, path: Path, adapter: str, targets=LORA_TARGETS) -> None:
    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(path, adapter_name=adapter)
        return
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    den = getattr(pipe, denoiser_name(pipe))
    sd = load_file(str(path / "adapter.safetensors"))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets), den, adapter_name=adapter)
    res = set_peft_model_state_dict(den, sd, adapter_name=adapter)
    assert not res.unexpected_keys


def _int4_state(den) -> dict:
    return {n.removesuffix(".base_layer"): (m.qweight, m.qweight.data_ptr(), m.qweight._version, m.wscales.clone(),
                                            m.qweight.clone())
            for n, m in den.named_modules() if isinstance(m, SVDQLinear)}


def _assert_int4_untouched(den, before: dict) -> None:
    after = {n.removesuffix(".base_layer"): m for n, m in den.named_modules() if isinstance(m, SVDQLinear)}
    assert after.keys() == before.keys()
    for n, (t, ptr, ver, wscales, q) in before.items():
        m = after[n]
        assert m.qweight is t and m.qweight.data_ptr() == ptr and m.qweight._version == ver, n
        assert torch.equal(m.qweight, q) and torch.equal(m.wscales, wscales), n


def test_lora(case, tmp_path, record_property):
    """A PEFT LoRA through diffusers' API on the quantized pipeline: the adapters become
    extra rank of the 16-bit branch; quality vs the 16-bit pipeline with the same
    LoRA, two weighted adapters, disable/enable, fuse/unfuse, delete, unload."""
    files = _make_lora_files(case)
    fp = _load_fp(case.fp_dir)
    q = load_pipeline(case.q_dir, compile=False, local_files_only=True)
    q.set_progress_bar_config(disable=True)
    den = getattr(q, denoiser_name(q))
    base_fp, base_q = _lora_images(fp, case.name), _lora_images(q, case.name)
    int4 = _int4_state(den)

    t0 = time.perf_counter()
    _load_lora(q, files["a"], "a")
    load_s = time.perf_counter() - t0
    _load_lora(fp, files["a"], "a")
    lora_layers = [m for m in den.modules() if type(m).__name__ == "SVDQLoraLinear"]
    assert lora_layers and all(m.svdq_down.shape[0] == m.get_base_layer().base_rank + 4 for m in lora_layers)
    _assert_int4_untouched(den, int4)
    # No re-quantization: loading is a state-dict copy plus a concatenation per layer.
    assert load_s < 0.05 * case.quant_seconds, (load_s, case.quant_seconds)

    a_fp, a_q = _lora_images(fp, case.name), _lora_images(q, case.name)
    # Reference: the same adapter run by PEFT's own forward (separate 16-bit matmuls on
    # the layer input, outside the quantized op); ours folds it into the low-rank branch.
    from peft.tuners.lora.layer import Linear as PeftLinear
    from svdq_compile.integrations.diffusers.lora import SVDQLoraLinear

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SVDQLoraLinear, "forward", PeftLinear.forward)
        a_ref = _lora_images(q, case.name)
    p_exact = sqnr_db(a_ref, a_q)
    p_base, p_a = sqnr_db(base_fp, base_q), sqnr_db(a_fp, a_q)
    p_effect = sqnr_db(base_fp, a_fp)  # how much the LoRA changes the 16-bit images

    for pipe in (fp, q):
        _load_lora(pipe, files["b"], "b")
        if hasattr(pipe, "set_adapters"):
            pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
        else:
            d = getattr(pipe, denoiser_name(pipe))
            from peft.tuners.tuners_utils import BaseTunerLayer

            for m in d.modules():
                if isinstance(m, BaseTunerLayer):
                    m.set_adapter(["a", "b"])
                    m.set_scale("a", 0.7)
                    m.set_scale("b", 0.3)
    ab_fp, ab_q = _lora_images(fp, case.name), _lora_images(q, case.name)
    p_ab = sqnr_db(ab_fp, ab_q)
    _assert_int4_untouched(den, int4)
    record_property("lora_sqnr", {"base": p_base, "a": p_a, "a+b": p_ab, "lora_effect": p_effect, "vs_peft": p_exact,
                                  "load_s": load_s, "quant_s": case.quant_seconds})
    print(f"\n{case.name}: latent SQNR fp vs quantized: no LoRA {p_base:.2f} dB, LoRA a {p_a:.2f} dB, "
          f"a*0.7+b*0.3 {p_ab:.2f} dB (LoRA vs no LoRA on fp: {p_effect:.2f} dB; branch vs PEFT's separate "
          f"matmuls on the quantized pipeline: {p_exact:.1f} dB); "
          f"load {load_s * 1e3:.0f} ms vs quantize {case.quant_seconds:.1f} s")
    # The LoRA visibly changes the latents (13-29 dB measured); the folded branch is PEFT's
    # own computation up to fp32 rounding (per layer 1e-7 relative; through the whole
    # pipeline 97-144 dB, SDXL's random UNet amplifies rounding to 26 dB, still far above
    # its quantization error); quantized + LoRA stays as close to fp + LoRA as quantized
    # is to fp, within MARGIN_DB.
    assert p_effect < 30
    assert p_exact > p_base + 10
    assert p_a > p_base - MARGIN_DB and p_ab > p_base - MARGIN_DB

    if hasattr(q, "disable_lora"):
        q.disable_lora()
        np.testing.assert_array_equal(_lora_images(q, case.name), base_q)
        q.enable_lora()
        np.testing.assert_array_equal(_lora_images(q, case.name), ab_q)
        q.fuse_lora()  # folded into the SVDQLinear branch, still no re-quantization
        assert all(m.get_base_layer().loras for m in lora_layers)
        np.testing.assert_allclose(_lora_images(q, case.name), ab_q, atol=2e-3)
        q.unfuse_lora()
        assert not any(m.get_base_layer().loras for m in lora_layers)
        np.testing.assert_array_equal(_lora_images(q, case.name), ab_q)
        q.delete_adapters("b")
        q.set_adapters(["a"])
        np.testing.assert_array_equal(_lora_images(q, case.name), a_q)
        q.unload_lora_weights()
    else:
        from diffusers.utils.peft_utils import recurse_remove_peft_layers

        recurse_remove_peft_layers(den)
    assert not any(type(m).__name__ == "SVDQLoraLinear" for m in den.modules())
    np.testing.assert_array_equal(_lora_images(q, case.name), base_q)  # bit for bit
    _assert_int4_untouched(den, int4)


def test_fullgraph_dynamic(case):
    """fullgraph=True (raises on any graph break) with dynamic=True on each quantized denoiser;
    the outputs are the eager quantized pipeline's. (A second resolution is covered by
    test_second_resolution_compiles_at_most_once and, with Inductor, test_dynamic_inductor_flux.)"""
    q = load_pipeline(case.q_dir, compile=False, local_files_only=True)
    q.set_progress_bar_config(disable=True)
    name = denoiser_name(q)
    eager = _lora_images(q, case.name)
    setattr(q, name, torch.compile(getattr(q, name), backend="svdquant", fullgraph=True, dynamic=True,
                                   options={**q.svdq_config.to_dict(), **RUNTIME}))
    # The graph passes (smoothing folded into norms, fused siblings and epilogues) change fp32
    # rounding only: 4.7e-4 on latents of magnitude 750 after 2 steps (pixart), 6e-7 of the scale.
    np.testing.assert_allclose(_lora_images(q, case.name), eager, rtol=1e-4, atol=2e-6 * np.abs(eager).max())


def test_lora_compiled(case):
    """Adapters on a compiled pipeline: one Dynamo graph per change of the total rank or
    of the module structure, none per step; unload gives the base outputs bit for bit."""
    if case.name != "flux":
        pytest.skip("one pipeline is enough for the recompilation counts")
    files = _make_lora_files(case)
    q = load_pipeline(case.q_dir, compile_options=RUNTIME, local_files_only=True)
    q.set_progress_bar_config(disable=True)
    counts = {}

    def run(tag):
        g0 = _unique_graphs()
        out = _lora_images(q, case.name)
        counts[tag] = _unique_graphs() - g0
        return out

    base = run("base")
    np.testing.assert_array_equal(run("base again"), base)  # the first generation is every generation's
    q.load_lora_weights(files["a"], adapter_name="a")
    a = run("load a")
    q.load_lora_weights(files["b"], adapter_name="b")
    q.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    run("load b + set_adapters")
    q.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
    run("new weights")  # same total rank: Dynamo's graph is reused, the backend compiles again
    q.disable_lora()
    np.testing.assert_array_equal(run("disable"), base)
    q.enable_lora()
    q.set_adapters(["a"])
    np.testing.assert_allclose(run("only a"), a, rtol=1e-5, atol=1e-6)
    q.unload_lora_weights()
    np.testing.assert_array_equal(run("unload"), base)
    print(f"\nflux compiled, new Dynamo graphs per change: {counts}")
    assert all(c <= 1 for c in counts.values()), counts
    assert counts["new weights"] == 0 and counts["base again"] == 0


def test_lora_compiled_past_recompile_limit(case):
    """Adapter changes past Dynamo's recompile limit: Dynamo stops compiling the denoiser and
    runs it eagerly; the eager modules are the quantized ones with the current adapters, so
    every state still gives the uncompiled quantized pipeline's outputs (no stale graph, no
    float fallback)."""
    if case.name != "flux":
        pytest.skip("one pipeline")
    files = _make_lora_files(case)
    eager = load_pipeline(case.q_dir, compile=False, local_files_only=True)
    torch._dynamo.reset()
    q = load_pipeline(case.q_dir, compile_options=RUNTIME, local_files_only=True)
    for pipe in (eager, q):
        pipe.set_progress_bar_config(disable=True)
    states = [
        ("base", lambda p: None),
        ("load a", lambda p: p.load_lora_weights(files["a"], adapter_name="a")),  # rank 4: the 2nd graph
        ("load b, a + b", lambda p: (p.load_lora_weights(files["b"], adapter_name="b"),
                                     p.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3]))),  # rank 8: past the limit
        ("only b", lambda p: p.set_adapters(["b"], adapter_weights=[1.0])),
        ("unload", lambda p: p.unload_lora_weights()),
    ]
    sqnrs = {}
    with torch._dynamo.config.patch(recompile_limit=2):
        _lora_images(q, case.name)  # the backend's calibration calls
        for tag, change in states:
            change(eager)
            change(q)
            ref = _lora_images(eager, case.name)
            sqnrs[tag] = sqnr_db(ref, _lora_images(q, case.name))
    print(f"\nflux compiled vs eager past the recompile limit, SQNR dB: {sqnrs}")
    assert math.isfinite(sqnrs["load a"]), "rank 4 should still run compiled (the 2nd graph), not eagerly"
    # Same quantized numerics on both sides (compiled: fused siblings, other summation order):
    # float32 rounding differences only; a stale adapter or the float model would be < 40 dB.
    assert min(sqnrs.values()) > 80.0, sqnrs


def test_lora_compiled_variants_bounded(case):
    """Switching adapters N times on a compiled pipeline: the backend compiles once per
    change, but keeps no more variants (compiled graph + the tensors it baked) than there
    are live sets of tensors: the base graph's and the current adapters'."""
    if case.name != "flux":
        pytest.skip("one pipeline")
    import gc

    from svdq_compile.capture.backend import retained_variants

    torch._dynamo.reset()  # variants of earlier tests' graphs go with them
    gc.collect()
    files = _make_lora_files(case)
    q = load_pipeline(case.q_dir, compile_options=RUNTIME, local_files_only=True)
    q.set_progress_bar_config(disable=True)
    _lora_images(q, case.name)  # calibration calls of the backend
    _lora_images(q, case.name)
    q.load_lora_weights(files["a"], adapter_name="a")
    held, outs = [], {}
    weights = [0.5, 0.7, 0.9, 0.6, 0.8, 0.5]  # same rank: Dynamo keeps its graph, the backend recompiles
    for w in weights:
        q.set_adapters(["a"], adapter_weights=[w])
        out = _lora_images(q, case.name)
        outs.setdefault(w, out)
        held.append(retained_variants())
    q.disable_lora()  # the base graph: its variant was kept (its tensors are alive)
    _lora_images(q, case.name)
    q.enable_lora()
    held.append(retained_variants())
    print(f"\nflux compiled, variants held after each adapter change: {held}")
    # Without eviction this grows by one per change (7 after the loop).
    assert max(held) <= 2, held
    # w = 0.5 again: its old variant was dropped with its factors and compiled again, same result.
    np.testing.assert_allclose(_lora_images(q, case.name), outs[0.5], rtol=1e-5, atol=1e-6)
    del q
    gc.collect()
    assert retained_variants() == 0  # the pipeline's tensors are gone: so are its variants


def test_lora_load_reports_no_missing_lora_keys(case):
    """Loading a LoRA into a quantized model reports no missing ``lora_down``/``lora_up``:
    those are the SVDQLinear's own low-rank buffers, which PEFT/diffusers (matching
    ".lora_" in key names) took for missing adapter weights and warned about."""
    if case.name != "flux":
        pytest.skip("one pipeline")
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    q = load_pipeline(case.q_dir, compile=False, local_files_only=True)
    den = q.transformer
    sd = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 128),
          "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4)}
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["transformer_blocks.0.attn.to_q"]), den,
                            adapter_name="a")
    res = set_peft_model_state_dict(den, sd, adapter_name="a")
    assert not [k for k in res.missing_keys if ".lora_" in k], res.missing_keys
    assert "transformer_blocks.0.attn.to_q.base_layer.qweight" in res.missing_keys  # the rest is still reported
    # A full state dict still loads strictly; one without the low-rank buffers still fails strictly.
    full = den.state_dict()
    den.load_state_dict(full, strict=True)
    with pytest.raises(RuntimeError, match="lora_down"):
        den.load_state_dict({k: v for k, v in full.items() if not k.endswith("to_k.lora_down")}, strict=True)


def test_lora_bad_input(case, tmp_path):
    """Wrong shapes raise; a target kept in float gets PEFT's ordinary LoRA layer."""
    if case.name != "flux":
        pytest.skip("one pipeline")
    from safetensors.torch import save_file

    from peft.tuners.lora.layer import Linear as PeftLinear

    q = load_pipeline(case.q_dir, compile=False, local_files_only=True)
    q.set_progress_bar_config(disable=True)
    base = _lora_images(q, case.name)
    # to_q is [128, 128]; a LoRA made for a 96-wide layer must not be dropped silently.
    bad = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 96),
           "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises((RuntimeError, ValueError), match="size mismatch|shape"):
        q.load_lora_weights(tmp_path / "bad.safetensors", adapter_name="bad")
    # proj_out (top level) and context_embedder stay float (PIPELINE_SKIP): plain PEFT layers.
    files = _make_lora_files(case, targets=["proj_out", "context_embedder"])
    q.load_lora_weights(files["a"], adapter_name="a")
    den = q.transformer
    assert isinstance(den.proj_out, PeftLinear) and isinstance(den.context_embedder, PeftLinear)
    assert type(den.single_transformer_blocks[0].proj_out).__name__ == "SVDQLoraLinear"  # quantized one
    assert sqnr_db(base, _lora_images(q, case.name)) < 40  # applied, not dropped


def _flux_inputs(b: int, t: int, txt: int = 8) -> dict:
    g = torch.Generator().manual_seed(b * 100 + t)
    side = int(t ** 0.5)
    img_ids = torch.zeros(t, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(t) // side, torch.arange(t) % side
    return dict(hidden_states=torch.randn(b, t, 16, generator=g), encoder_hidden_states=torch.randn(b, txt, 64, generator=g),
                pooled_projections=torch.randn(b, 64, generator=g), timestep=torch.full((b,), 0.5),
                guidance=torch.full((b,), 3.5), img_ids=img_ids, txt_ids=torch.zeros(txt, 3), return_dict=False)


def test_dynamic_inductor_flux(case):
    """backend="svdquant", dynamic=True with Inductor on the quantized FLUX transformer:
    used to crash in compile_fx (the .item() of the rotary embedding's float argument);
    over 5 (batch, tokens) shapes no more Dynamo graphs than the pass-through backend
    with dynamic=True, and the outputs of the eager quantized model."""
    if case.name != "flux":
        pytest.skip("FLUX's rotary embedding is the case of the issue")
    from diffusers import FluxTransformer2DModel

    shapes = [(2, 16), (2, 36), (3, 16), (4, 25), (3, 64)]  # batch, tokens >= 2: no 0/1 specialization
    fp = FluxTransformer2DModel.from_pretrained(case.fp_dir, subfolder="transformer").eval()
    q = load_pipeline(case.q_dir, compile=False, local_files_only=True)
    den = q.transformer

    def graphs(model, backend, **kw) -> tuple[int, list]:
        torch._dynamo.reset()
        g0 = _unique_graphs()
        c = torch.compile(model, backend=backend, dynamic=True, **kw)
        with torch.no_grad():
            outs = [c(**_flux_inputs(b, t))[0] for b, t in shapes]
        return _unique_graphs() - g0, outs

    n_eager, _ = graphs(den, "eager")
    n_ours, outs = graphs(den, "svdquant", options={**q.svdq_config.to_dict(), "use_inductor": True})
    with torch.no_grad():
        ref = [fp(**_flux_inputs(b, t))[0] for b, t in shapes]
        eager = [den(**_flux_inputs(b, t))[0] for b, t in shapes]
    from svdq_compile import sqnr_db

    s_dyn = [sqnr_db(r, o) for r, o in zip(ref, outs)]
    s_eager = [sqnr_db(r, o) for r, o in zip(ref, eager)]
    print(f"\nflux dynamic=True: graphs {n_ours} (pass-through {n_eager}); SQNR vs fp "
          f"{[round(x, 1) for x in s_dyn]} dB (eager quantized {[round(x, 1) for x in s_eager]})")
    assert n_ours <= n_eager
    # Inductor fuses the float glue differently (fp32 rounding only): within 0.5 dB.
    assert all(abs(a - b) < 0.5 for a, b in zip(s_dyn, s_eager))
