"""LoRA on quantized pipelines: is the end-to-end SQNR loss with a LoRA systematic or noise?

For the tiny FLUX and SD3 pipelines of ``tests/pipelines`` (quantized exactly as the
test fixture does: ``svdq quantize``, rank 4, w4a4, fast search), measures the latent
SQNR of the quantized pipeline against the 16-bit one, without a LoRA and with a LoRA
loaded through diffusers into both (same seeds), over several random LoRAs (PEFT,
rank 4, targets of ``test_lora``) at the test's strength (B ~ N(0, 0.15)) and a weaker
one, on 4 prompts x seeds 0-3 (the test uses 2). Reports the gap (SQNR with LoRA minus
without) as mean +- std over the LoRA seeds.

Two diagnostics:

* per layer: the inputs each LoRA target sees in the 16-bit pipeline + LoRA (first
  denoiser call) go through the 16-bit layer and the quantized layer, with and
  without the LoRA. If the quantized error is the same with and without the LoRA
  (the branch adds ``B A x`` exactly), the end-to-end gap is propagation through a
  different function, not the LoRA path.
* re-quantized control (``requant``): the 16-bit pipeline with the LoRA fused into
  its weights, quantized from scratch with the same settings. This is what the issue
  forbids in the product (it re-quantizes the INT4 weights); here it only says how
  much of the gap a quantizer that sees the LoRA would still have.

Usage (2-core CPU: ~10 minutes for the defaults; the pipeline tests' settings come from
``tests/pipelines/test_diffusers_pipelines.py``, so it runs from a source checkout)::

    svdq bench --suite lora_margin [--param pipelines=flux,sd3] [--param seeds=8] [--param requant=3]
        [--param "conclusion=a sentence appended to the markdown"]
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from svdq_compile.quant.decompose import sqnr_db  # noqa: E402

from svdq_compile.testing import tiny_pipelines as tp  # noqa: E402

from ..suites.harness import Context  # noqa: E402

__all__ = ["run", "to_markdown", "plot", "PARAMS", "DEVICE"]

TEST_STRENGTH = 0.15  # std of B in the test's LoRAs
DEVICE = "cpu"
PARAMS = {"pipelines": ("flux", "sd3"), "seeds": 8, "strengths": (TEST_STRENGTH, 0.05), "requant": 3,
          "conclusion": ""}
# The test module's helpers and settings (HW, STEPS, RANK, FAST, prompts, LoRA targets), imported
# when the suite runs: tests.pipelines.test_diffusers_pipelines.
T: Any = None
PROMPTS: list = []  # 4 prompts, seeds 0..3 (the test: the first 2)


def _load_test_settings() -> Any:
    global T, PROMPTS
    if T is None:
        from tests.pipelines import test_diffusers_pipelines

        T, PROMPTS = test_diffusers_pipelines, list(test_diffusers_pipelines.EVAL_PROMPTS)
    return T


def _latents(pipe, name: str, prompts) -> np.ndarray:
    out = pipe(list(prompts), num_inference_steps=2, height=T.HW, width=T.HW, output_type="latent",
               generator=[torch.Generator().manual_seed(s) for s in range(len(prompts))], **tp.PIPE_KWARGS[name])
    return out.images.float().numpy()


def _stats(xs) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(len(a))}


def _quantize_cli(name: str, fp_dir: Path, root: Path) -> tuple[Path, float]:
    from svdq_compile.cli import main as cli

    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(T.CALIB_PROMPTS) + "\n")
    q_dir = root / "q"
    options = [a for k, v in T.FAST.items() for a in ("--option", f"{k}={v}")]
    t0 = time.perf_counter()
    rc = cli(["quantize", str(fp_dir), "--prompts", str(prompts), "--out", str(q_dir), "--steps", str(T.STEPS),
              "--rank", str(T.RANK), "--mode", "w4a4", "--height", str(T.HW), "--width", str(T.HW)]
             + options + T._set_args(name))
    assert rc == 0
    return q_dir, time.perf_counter() - t0


class LoraMaker:
    """Random PEFT LoRAs (rank 4, the test's targets) on a scratch 16-bit denoiser, saved
    the diffusers way; ``seed`` and ``strength`` (std of B) vary, A ~ N(0, 1/K) as in the test."""

    def __init__(self, fp_dir: Path, root: Path) -> None:
        from peft import LoraConfig

        from svdq_compile.integrations.diffusers.pipelines import denoiser_name

        self.pipe = T._load_fp(fp_dir)
        self.dname = denoiser_name(self.pipe)
        self.den = getattr(self.pipe, self.dname)
        self.den.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=T.LORA_TARGETS), adapter_name="x")
        self.root = root

    def make(self, seed: int, strength: float) -> Path:
        from peft.utils import get_peft_model_state_dict

        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in self.den.named_parameters():
                if "lora_B.x." in n or "lora_A.x." in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * (strength if "lora_B" in n else 1.0 / p.shape[1] ** 0.5))
        path = self.root / f"lora_{seed}_{strength}"
        type(self.pipe).save_lora_weights(path, **{f"{self.dname}_lora_layers": get_peft_model_state_dict(
            self.den, adapter_name="x")}, safe_serialization=True)
        return path


@torch.no_grad()
def per_layer(fp, q, name: str) -> dict:
    """Same inputs (those of fp + LoRA, first denoiser call) through fp / quantized layers,
    each with and without the LoRA (``fp`` and ``q`` have the same adapter loaded)."""
    from peft.tuners.lora.layer import Linear as PeftLinear

    from svdq_compile.integrations.diffusers.pipelines import denoiser_name

    fden, qden = getattr(fp, denoiser_name(fp)), getattr(q, denoiser_name(q))
    inputs: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args[0].detach().clone()))
             for n, m in fden.named_modules() if isinstance(m, PeftLinear)]
    try:
        fp(PROMPTS[:1], num_inference_steps=1, height=T.HW, width=T.HW, output_type="latent",
           generator=torch.Generator().manual_seed(0), **tp.PIPE_KWARGS[name])
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for n, x in inputs.items():
        fm, qm = fden.get_submodule(n), qden.get_submodule(n)
        if type(qm).__name__ != "SVDQLoraLinear":
            continue
        fb, fl = fm.base_layer(x).double(), fm(x).double()
        qb, ql = qm.base_layer(x).double(), qm(x).double()
        eb, el = qb - fb, ql - fl
        s_b = float(20 * torch.log10(fb.norm() / eb.norm()))
        s_l = float(20 * torch.log10(fl.norm() / el.norm()))
        rows.append({"layer": n, "sqnr_base_db": s_b, "sqnr_lora_db": s_l, "delta_db": s_l - s_b,
                     # how far the quantized error moved with the LoRA (0: the branch adds B A x exactly)
                     "error_change_rel": float((el - eb).norm() / eb.norm()),
                     "signal_gain_db": float(20 * torch.log10(fl.norm() / fb.norm()))})
    deltas = [r["delta_db"] for r in rows]
    return {"layers": rows, "n": len(rows), "min_delta_db": min(deltas), "mean_delta_db": float(np.mean(deltas)),
            "n_delta_below_0": sum(d < 0 for d in deltas),
            "max_error_change_rel": max(r["error_change_rel"] for r in rows)}


def _requantized(name: str, fp_dir: Path, lora: Path | None) -> np.ndarray:
    """Latents of the fp pipeline (+ fused LoRA) quantized from scratch (test settings, API)."""
    from svdq_compile.integrations.diffusers.pipelines import pipeline_config, quantize_pipeline

    pipe = T._load_fp(fp_dir)
    if lora is not None:
        pipe.load_lora_weights(lora, adapter_name="x")
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # keeps the fused weights, plain nn.Linear again
    quantize_pipeline(pipe, T.CALIB_PROMPTS, config=pipeline_config(rank=T.RANK, mode="w4a4", **T.FAST),
                      num_inference_steps=T.STEPS, compile=False, progress=False, height=T.HW, width=T.HW,
                      **tp.PIPE_KWARGS[name])
    pipe.set_progress_bar_config(disable=True)
    return _latents(pipe, name, PROMPTS)


def run_pipeline(name: str, seeds: int, strengths, requant: int, root: Path) -> dict:
    from svdq_compile.integrations.diffusers.pipelines import load_pipeline

    t0 = time.perf_counter()
    fp_dir = tp.build(name, root / "fp")
    q_dir, quant_s = _quantize_cli(name, fp_dir, root)
    fp = T._load_fp(fp_dir)
    q = load_pipeline(q_dir, compile=False, local_files_only=True)
    q.set_progress_bar_config(disable=True)
    maker = LoraMaker(fp_dir, root)
    base_fp, base_q = _latents(fp, name, PROMPTS), _latents(q, name, PROMPTS)
    base = sqnr_db(base_fp, base_q)
    base2 = sqnr_db(base_fp[:2], base_q[:2])  # the test's 2 prompts
    base_img = [sqnr_db(r, x) for r, x in zip(base_fp, base_q)]
    res: dict = {"quantize_s": quant_s, "sqnr_base_db": base, "sqnr_base_test_prompts_db": base2,
                 "sqnr_base_per_image_db": base_img, "strengths": {}}
    layer_check = None
    for strength in strengths:
        runs = []
        for s in range(seeds):
            path = maker.make(1000 + s, strength)
            for pipe in (fp, q):
                pipe.load_lora_weights(path, adapter_name="x")
            l_fp, l_q = _latents(fp, name, PROMPTS), _latents(q, name, PROMPTS)
            p = sqnr_db(l_fp, l_q)
            p_img = [sqnr_db(r, x) for r, x in zip(l_fp, l_q)]
            runs.append({"seed": 1000 + s, "sqnr_lora_db": p, "gap_db": p - base,
                         "gap_test_prompts_db": sqnr_db(l_fp[:2], l_q[:2]) - base2,
                         "gap_per_image_db": [a - b for a, b in zip(p_img, base_img)],
                         "lora_effect_db": sqnr_db(base_fp, l_fp)})
            if layer_check is None and strength == TEST_STRENGTH:
                layer_check = per_layer(fp, q, name)
            for pipe in (fp, q):
                pipe.unload_lora_weights()
            print(f"{name} strength {strength} seed {s}: gap {p - base:+.2f} dB "
                  f"(LoRA effect {runs[-1]['lora_effect_db']:.1f} dB)", flush=True)
        res["strengths"][str(strength)] = {
            "runs": runs, "gap_db": _stats([r["gap_db"] for r in runs]),
            "gap_test_prompts_db": _stats([r["gap_test_prompts_db"] for r in runs]),
            "gap_per_image_db": _stats([g for r in runs for g in r["gap_per_image_db"]]),
            "lora_effect_db": _stats([r["lora_effect_db"] for r in runs])}
    res["per_layer"] = layer_check
    if requant:
        rq_base = sqnr_db(base_fp, _requantized(name, fp_dir, None))
        gaps = []
        for s in range(requant):
            path = maker.make(1000 + s, TEST_STRENGTH)
            fp.load_lora_weights(path, adapter_name="x")
            l_fp = _latents(fp, name, PROMPTS)
            fp.unload_lora_weights()
            gaps.append(sqnr_db(l_fp, _requantized(name, fp_dir, path)) - rq_base)
            print(f"{name} re-quantized with LoRA {s}: gap {gaps[-1]:+.2f} dB", flush=True)
        ours = [r["gap_db"] for r in res["strengths"][str(TEST_STRENGTH)]["runs"][:requant]]
        res["requantized_control"] = {"strength": TEST_STRENGTH, "sqnr_base_db": rq_base,
                                      "gap_db": _stats(gaps), "gaps_db": gaps, "ours_same_seeds_gap_db": ours}
    res["seconds"] = time.perf_counter() - t0
    return res


def run(ctx: Context, tqdm: Any) -> None:
    _load_test_settings()
    c = ctx.params
    ctx.extra.update(seeds=c["seeds"], strengths=list(c["strengths"]), test_strength=TEST_STRENGTH, rank=T.RANK,
                     lora_targets=list(T.LORA_TARGETS), prompts=list(PROMPTS), conclusion=c["conclusion"])
    bar = tqdm(total=len(c["pipelines"]), desc="lora_margin", disable=not ctx.progress)
    with tempfile.TemporaryDirectory() as tmp:
        for name in c["pipelines"]:
            res = run_pipeline(name, c["seeds"], c["strengths"], c["requant"], Path(tmp) / name)
            ctx.record({"case": name, "pipeline": name, **res})
            bar.update(1)
    bar.close()


def _pipelines(p: dict) -> dict:
    """{pipeline: result}; the file of benchmarks/bench_lora_margin.py kept them under "pipelines"."""
    return p.get("pipelines") or {r["pipeline"]: r for r in p.get("rows", [])}


def to_markdown(data: dict) -> str:
    from ..suites.report import footer, header

    if "rank" not in data:  # the file of benchmarks/bench_lora_margin.py: the settings are the test module's
        _load_test_settings()
    rank, targets = data.get("rank", T and T.RANK), data.get("lora_targets") or list(T.LORA_TARGETS)
    prompts = data.get("prompts") or PROMPTS
    pipes = _pipelines(data)
    lines = header(data, "LoRA on quantized pipelines: SQNR gap with vs without a LoRA") + [
             f"Tiny test pipelines quantized as in `tests/pipelines` "
             f"(rank {rank}, w4a4, fast search); {data['seeds']} random rank-4 LoRAs per strength on "
             f"{', '.join(targets)}; latents after 2 steps, {len(prompts)} prompts x seeds 0-{len(prompts) - 1}. "
             "Gap = SQNR(fp + LoRA, quantized + LoRA) - SQNR(fp, quantized), in dB (negative: worse with the LoRA).",
             "", "| pipeline | B std | SQNR no LoRA | gap mean +- std | gap min / max | gap, test's 2 prompts | "
             "per-image gap mean +- std | LoRA's own effect |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in pipes.items():
        for st, s in r["strengths"].items():
            g, g2, gi, e = s["gap_db"], s["gap_test_prompts_db"], s["gap_per_image_db"], s["lora_effect_db"]
            lines.append(f"| {name} | {st} | {r['sqnr_base_db']:.2f} dB | {g['mean']:+.2f} +- {g['std']:.2f} | "
                         f"{g['min']:+.2f} / {g['max']:+.2f} | {g2['mean']:+.2f} +- {g2['std']:.2f} | "
                         f"{gi['mean']:+.2f} +- {gi['std']:.2f} | {e['mean']:.1f} dB |")
    lines += ["", "Per layer (inputs of fp + LoRA, first denoiser call, strength "
              f"{data.get('test_strength', TEST_STRENGTH)}): quantized vs fp layer, with and without the LoRA.", "",
              "| pipeline | layers | SQNR delta (LoRA - none) mean | min | layers with delta < 0 | "
              "max relative change of the quantized error |", "|---|---|---|---|---|---|"]
    for name, r in pipes.items():
        p = r["per_layer"]
        if p:
            lines.append(f"| {name} | {p['n']} | {p['mean_delta_db']:+.2f} dB | {p['min_delta_db']:+.2f} dB | "
                         f"{p['n_delta_below_0']} | {p['max_error_change_rel']:.1e} |")
    if any("requantized_control" in r for r in pipes.values()):
        lines += ["", "Control: the fp pipeline with the LoRA fused, quantized from scratch (re-quantization, "
                  "not what the product does), same LoRA seeds:", "",
                  "| pipeline | re-quantized gap mean +- std | ours, same seeds |", "|---|---|---|"]
        for name, r in pipes.items():
            c = r.get("requantized_control")
            if c:
                o = _stats(c["ours_same_seeds_gap_db"])
                lines.append(f"| {name} | {c['gap_db']['mean']:+.2f} +- {c['gap_db']['std']:.2f} | "
                             f"{o['mean']:+.2f} +- {o['std']:.2f} |")
    lines += ["", data.get("conclusion", "")]
    return "\n".join(lines + footer(data)) + "\n"


def plot(p: dict, path: Path) -> bool:
    from ..suites.report import bar_chart

    pipes = _pipelines(p)
    strengths = list(dict.fromkeys(st for r in pipes.values() for st in r["strengths"]))
    return bar_chart(path, list(pipes), {f"B std {st}": [r["strengths"].get(st, {}).get("gap_db", {}).get("mean")
                                                         for r in pipes.values()] for st in strengths},
                     title="SQNR gap with a LoRA (mean over LoRA seeds)", ylabel="dB", figsize=(6, 4), rotation=0,
                     hlines=((0.0, {}),))
