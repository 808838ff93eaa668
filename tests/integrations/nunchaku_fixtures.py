"""Nunchaku checkpoints made by deepcompressor's own converter from a tiny FLUX quantized by us.

Nothing is downloaded: the tiny FLUX pipeline of ``svdq_compile.testing.tiny_pipelines``
(seeded random weights) is calibrated on one prompt, each linear decomposed by our
``decompose_layer`` (W4A4 rank 4, smoothing with alpha 0.5 shared by the linears that
read one tensor, W4A16 for the AdaLN layers), and the result handed to
``deepcompressor.backend.nunchaku.convert.convert_to_nunchaku_flux_state_dicts`` in the
form deepcompressor's own quantized model has (``model.pt`` / ``scale.pt`` /
``smooth.pt`` / ``branch.pt`` dicts, fp16): fused q/k/v branches, FLUX single blocks'
``proj_out`` split as deepcompressor's ``ConcatLinear``, fc2 inputs shifted as its
``ShiftedLinear`` (bias ``b - W shift``). The legacy folder is what the converter's
``__main__`` writes; the merged file is built as ``nunchaku.merge_safetensors`` does.

Two deviations from a real deepcompressor run, both because our smoothing is per
consumer: the out_proj layers are converted unfused (``proj.fuse_when_possible=False``;
fused smoothing would need V to absorb 1/smooth), and the double blocks'
``out_proj_context`` is re-converted with its own smoothing vector through the same
converter's ``convert_to_nunchaku_w4x4y16_linear_state_dict`` (the FLUX map reads
``attn.to_out.0``'s, which deepcompressor shares between the two attention outputs).
"""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from svdq_compile.quant.decompose import LayerTarget, decompose_layer, smoothing_factors
from svdq_compile.quant.modules import SVDQLinear
from svdq_compile.runtime.nunchaku_scheme import SHIFT_GELU
from svdq_compile.runtime.packed import LinearSpec, PackedLinear
from svdq_compile.testing import tiny_pipelines as tp

RANK = 4
ALPHA = 0.5
STEPS = 2
HW = 32
CALIB = "a photo of a dog"
PROMPT = "a red house"
SAMPLE_ROWS = 256

# Linears that read one tensor share one smoothing vector (our planner's rule).
DOUBLE_GROUPS = [["attn.to_q", "attn.to_k", "attn.to_v"], ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
                 ["attn.to_out.0"], ["attn.to_add_out"], ["ff.net.0.proj"], ["ff.net.2"], ["ff_context.net.0.proj"],
                 ["ff_context.net.2"]]
SINGLE_GROUPS = [["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], ["proj_out"]]
UNSIGNED = ("ff.net.2", "ff_context.net.2")  # read GELU outputs
ADALN = {"transformer_blocks": ["norm1.linear", "norm1_context.linear"], "single_transformer_blocks": ["norm.linear"]}


def load_pipe(path: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt: str = PROMPT, seed: int = 0, output_type: str = "latent") -> torch.Tensor:
    out = pipe(prompt, num_inference_steps=STEPS, height=HW, width=HW, output_type=output_type,
               generator=torch.Generator().manual_seed(seed), **tp.PIPE_KWARGS["flux"])
    return torch.as_tensor(out.images).float()


@dataclass
class Ours:
    """Our quantized tiny FLUX and what the round trip needs to compare against."""

    fp_dir: Path
    pipe: object  # the quantized pipeline (eager SVDQLinears)
    packed: dict  # transformer linear name -> our PackedLinear
    float_w: dict  # name -> (weight fp32, bias fp32) before quantization
    samples: dict  # name -> [T, K] calibration inputs
    ref: torch.Tensor  # fp32 pipeline latents of PROMPT (seed 0)
    shifts: dict = field(default_factory=dict)  # name -> our act_shift


def _record(pipe) -> tuple[dict, dict, dict]:
    model = pipe.transformer
    absmax, mins, samples, hooks = {}, {}, {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            def hook(mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                a, lo = x.abs().amax(0), x.amin(0)
                absmax[name] = a if name not in absmax else torch.maximum(absmax[name], a)
                mins[name] = lo if name not in mins else torch.minimum(mins[name], lo)
                prev = samples.get(name)
                samples[name] = x if prev is None else torch.cat([prev, x])
            hooks.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        run(pipe, CALIB, seed=1)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(0)
    for k, x in samples.items():
        samples[k] = x[torch.randperm(x.shape[0], generator=g)[:SAMPLE_ROWS]]
    return absmax, mins, samples


def quantize_ours(fp_dir: Path) -> Ours:
    """Our W4A4 tiny FLUX (eager SVDQLinears installed in the pipeline's transformer)."""
    pipe = load_pipe(fp_dir)
    model = pipe.transformer
    with torch.no_grad():
        ref = run(pipe)
    absmax, mins, samples = _record(pipe)
    packed, float_w, shifts = {}, {}, {}
    for prefix, groups in (("transformer_blocks", DOUBLE_GROUPS), ("single_transformer_blocks", SINGLE_GROUPS)):
        for i in range(len(model.get_submodule(prefix))):
            block = f"{prefix}.{i}"
            for group in groups:
                names = [f"{block}.{n}" for n in group]
                mods = [model.get_submodule(n) for n in names]
                w_absmax = torch.stack([m.weight.detach().abs().amax(0) for m in mods]).amax(0)
                # fp16-exact smoothing factors (as a 16-bit model's): the converter stores smooth in
                # fp16, so the round trip then measures only its other 16-bit roundings.
                lam = smoothing_factors(absmax[names[0]], w_absmax, ALPHA, 1 - ALPHA).half().float()
                unsigned = group[0] in UNSIGNED
                shift = max(0.0, -float((mins[names[0]] / lam).min())) if unsigned else 0.0
                target = LayerTarget.of("w4a4", rank=RANK, act_unsigned=unsigned, refine_iters=1)
                for n, m in zip(names, mods):
                    float_w[n] = (m.weight.detach().float().clone(), m.bias.detach().float().clone())
                    packed[n] = decompose_layer(m.weight.detach(), m.bias.detach(), lam, target, act_shift=shift)
                    shifts[n] = shift
            for n in ADALN[prefix]:
                name = f"{block}.{n}"
                m = model.get_submodule(name)
                float_w[name] = (m.weight.detach().float().clone(), m.bias.detach().float().clone())
                packed[name] = decompose_layer(m.weight.detach(), m.bias.detach(), None, LayerTarget.of("w4a16", rank=0))
    for name, p in packed.items():
        model.set_submodule(name, SVDQLinear(p, name))
    return Ours(fp_dir, pipe, packed, float_w, samples, ref, shifts)


# ----------------------------------------------------------------- deepcompressor's form
def _dq(p: PackedLinear) -> torch.Tensor:
    return p.dequantized_residual().double()


def _scale(p: PackedLinear, cols: slice = slice(None)) -> torch.Tensor:
    ws = p.wscales[:, cols]
    return ws.reshape(ws.shape[0], 1, ws.shape[1], 1).to(torch.float16)


def _lowrank(p: PackedLinear, cols: slice = slice(None)) -> torch.Tensor:
    return (p.lora_up.double() @ p.lora_down.double()[:, cols])


def shifted_bias(p: PackedLinear, our_shift: float, cols: slice = slice(None)) -> torch.Tensor:
    """fp64 bias of deepcompressor's ShiftedLinear for our layer (or its ``cols`` part):
    ``b - W' (0.171875 / smooth)`` with W' our smoothed-domain weight (residual + low rank)."""
    b = p.bias.double() + our_shift * _dq(p).sum(dim=1)  # undo our own shift correction
    w = _dq(p)[:, cols] + _lowrank(p, cols)
    return b - w @ (SHIFT_GELU / p.smooth.double()[cols])


def deepcompressor_dicts(ours: Ours, shift: bool = True) -> tuple[dict, dict, dict, dict]:
    """(state_dict, scale_dict, smooth_dict, branch_dict) as deepcompressor's quantized FLUX has them.
    ``shift``: fc2 inputs shifted (INT4); without, their bias is the plain one (NVFP4)."""
    model = ours.pipe.transformer
    f16 = torch.float16
    state, scales, smooth, branch = {}, {}, {"proj.fuse_when_possible": False}, {}
    for name, t in model.state_dict().items():
        if not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            state[name] = t  # unquantized layers, as they are
    for name, m in model.named_modules():  # RMSNorm weights of the blocks (copied by the converter)
        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and ".norm_" in name:
            state[f"{name}.weight"] = m.weight.detach().clone()

    def put(dc_name: str, p: PackedLinear, cols: slice = slice(None), bias=None, shifted: bool = False):
        state[f"{dc_name}.weight"] = _dq(p)[:, cols].to(f16)
        if bias is not None:
            state[f"{dc_name}.bias"] = bias.to(f16)
        scales[f"{dc_name}.weight.scale.0"] = _scale(p, cols)
        if shifted:
            state[f"{dc_name[:-len('.linear')]}.shift"] = torch.tensor(SHIFT_GELU, dtype=f16)

    def put_branch(key: str, ps: list, cols: slice = slice(None)):
        downs = [p.lora_down.float()[:, cols] for p in ps]
        ups = [p.lora_up.float() for p in ps]
        up = torch.block_diag(*ups)
        branch[key] = {"a.weight": torch.cat(downs), "b.weight": up.to(f16)}

    for name, p in ours.packed.items():
        prefix, i, local = name.split(".", 2)
        block = f"{prefix}.{i}"
        if p.spec.act_bits == 16:  # AdaLN W4A16
            put(name, p, bias=p.bias.double())
        elif local in UNSIGNED and not shift:
            put(f"{name}.linear", p, bias=p.bias.double() + ours.shifts[name] * _dq(p).sum(dim=1))
            smooth[f"{name}.linear"] = p.smooth
            put_branch(f"{name}.linear", [p])
        elif local in UNSIGNED:
            put(f"{name}.linear", p, bias=shifted_bias(p, ours.shifts[name]), shifted=True)
            smooth[f"{name}.linear"] = p.smooth
            put_branch(f"{name}.linear", [p])
        elif local == "proj_out":  # ConcatLinear: [attention | mlp]
            k1 = model.get_submodule(f"{block}.attn.to_q").out_features
            g1 = k1 // p.spec.group_size
            a, b = slice(0, k1), slice(k1, None)
            state[f"{block}.proj_out.linears.0.weight"] = _dq(p)[:, a].to(f16)
            scales[f"{block}.proj_out.linears.0.weight.scale.0"] = _scale(p, slice(0, g1))
            put(f"{block}.proj_out.linears.1.linear", p, b, bias=shifted_bias(p, 0.0, b) if shift else p.bias.double(),
                shifted=shift)
            scales[f"{block}.proj_out.linears.1.linear.weight.scale.0"] = _scale(p, slice(g1, None))
            smooth[f"{block}.proj_out.linears.0"] = p.smooth[a]
            smooth[f"{block}.proj_out.linears.1.linear"] = p.smooth[b]
            put_branch(f"{block}.proj_out.linears.0", [p], a)
            put_branch(f"{block}.proj_out.linears.1.linear", [p], b)
        else:
            put(name, p, bias=p.bias.double())
    for prefix, groups in (("transformer_blocks", DOUBLE_GROUPS), ("single_transformer_blocks", SINGLE_GROUPS)):
        for i in range(len(model.get_submodule(prefix))):
            block = f"{prefix}.{i}"
            for group in groups:
                first = f"{block}.{group[0]}"
                if group[0] in UNSIGNED or group[0] == "proj_out":
                    continue
                ps = [ours.packed[f"{block}.{n}"] for n in group]
                smooth[first] = ps[0].smooth
                if group[0] == "attn.to_q" and prefix == "single_transformer_blocks":
                    put_branch(first, ps[:3])  # qkv_proj
                    smooth[f"{block}.proj_mlp"] = ps[3].smooth
                    put_branch(f"{block}.proj_mlp", [ps[3]])
                else:
                    put_branch(first, ps)
            if prefix == "transformer_blocks":  # the FLUX map reads q/k/v_context's smooth/branch at add_k_proj
                for key in ("attn.add_k_proj",):
                    ps = [ours.packed[f"{block}.attn.{n}"] for n in ("add_q_proj", "add_k_proj", "add_v_proj")]
                    smooth[f"{block}.{key}"] = ps[0].smooth
                    put_branch(f"{block}.{key}", ps)
    return state, scales, smooth, branch


def to_nvfp4(state: dict, scales: dict) -> None:
    """Re-quantize every W4A4 residual of deepcompressor's dicts to NVFP4, in place: e2m1 codes,
    e4m3 group-16 scales (``scale.1``) and an fp16 per-channel scale (``scale.0``), the weight
    stored as their product in fp16 (what deepcompressor's fp4 model holds)."""
    from svdq_compile.runtime.nunchaku_scheme import e2m1_round

    for key in [k for k in scales if k.endswith(".weight.scale.0")]:
        name = key[: -len(".weight.scale.0")]
        if name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")):
            continue  # AdaLN stays AWQ W4A16
        w = state[f"{name}.weight"].double()
        n, k = w.shape
        c = (w.abs().amax(dim=1) / (6 * 448)).clamp_min(1e-6).to(torch.float16).double()  # [N]
        g = w.view(n, k // 16, 16).abs().amax(dim=-1) / 6 / c[:, None]
        sub = g.clamp(2.0 ** -6, 448).to(torch.float8_e4m3fn).double()  # [N, K/16], e4m3-exact
        codes = e2m1_round((w.view(n, k // 16, 16) / (c[:, None, None] * sub[..., None])).float()).double()
        state[f"{name}.weight"] = (codes * sub[..., None] * c[:, None, None]).view(n, k).to(torch.float16)
        scales[key] = c.view(n, 1, 1, 1).to(torch.float16)
        scales[f"{name}.weight.scale.1"] = sub.view(n, 1, k // 16, 1).to(torch.float16)


def convert(ours: Ours, float_point: bool = False, state_out: dict | None = None) -> tuple[dict, dict]:
    """deepcompressor's converter on our model -> (transformer_blocks dict, unquantized dict).
    ``float_point``: the NVFP4 form (our residuals re-quantized by :func:`to_nvfp4`).
    ``state_out`` receives the converter's input state dict (deepcompressor's names)."""
    from deepcompressor.backend.nunchaku.convert import (convert_to_nunchaku_flux_state_dicts,
                                                         convert_to_nunchaku_w4x4y16_linear_state_dict)

    state, scales, smooth, branch = deepcompressor_dicts(ours, shift=not float_point)
    if float_point:
        to_nvfp4(state, scales)
    if state_out is not None:
        state_out.update(state)
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints every layer
        blocks, other = convert_to_nunchaku_flux_state_dicts(state, scales, smooth, branch, float_point=float_point)
        model = ours.pipe.transformer
        for i in range(len(model.transformer_blocks)):  # out_proj_context with its own smoothing (module doc)
            name = f"transformer_blocks.{i}.attn.to_add_out"
            p = ours.packed[name]
            sd = convert_to_nunchaku_w4x4y16_linear_state_dict(
                weight=state[f"{name}.weight"], scale=scales[f"{name}.weight.scale.0"], bias=state[f"{name}.bias"],
                smooth=p.smooth, lora=(p.lora_down.float(), p.lora_up.to(torch.float16)), float_point=float_point,
                subscale=scales.get(f"{name}.weight.scale.1"))
            for k, v in sd.items():
                blocks[f"transformer_blocks.{i}.out_proj_context.{k}"] = v
    return blocks, other


def write_legacy(path: Path, blocks: dict, other: dict, config: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in blocks.items()}, str(path / "transformer_blocks.safetensors"))
    save_file({k: v.contiguous() for k, v in other.items()}, str(path / "unquantized_layers.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_merged(path: Path, blocks: dict, other: dict, config: dict, precision: str = "int4") -> Path:
    """One safetensors file with the metadata nunchaku.merge_safetensors writes."""
    rank = next((v.shape[1] for k, v in blocks.items() if ".lora_down" in k), 32)
    fp4 = precision == "fp4"
    quant = {"method": "svdquant",
             "weight": {"dtype": "fp4_e2m1_all" if fp4 else "int4", "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None,
                        "group_size": 16 if fp4 else 64},
             "activation": {"dtype": "fp4_e2m1_all" if fp4 else "int4", "scale_dtype": "fp8_e4m3_nan" if fp4 else None,
                            "group_size": 16 if fp4 else 64},
             "rank": rank}
    state = dict(other)
    state.update(blocks)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"config": json.dumps(config), "comfy_config": "{}",
                        "model_class": "NunchakuFluxTransformer2dModel", "quantization_config": json.dumps(quant)})
    return path


def transformer_config(ours: Ours) -> dict:
    return dict(ours.pipe.transformer.config)


# ------------------------------------------------------------------------ ideal conversion
def ideal_nunchaku(name: str, p: PackedLinear, our_shift: float, k1: int = 0) -> PackedLinear:
    """Our layer in Nunchaku's numerics with no 16-bit rounding (the converter's input, exactly):
    the reference the loaded layer is compared with. ``k1``: proj_out's attention width."""
    local = name.split(".", 2)[2]
    if p.spec.act_bits == 16:
        return p
    g = p.spec.group_size
    unsigned = local in UNSIGNED or local == "proj_out"
    bias, wz = p.bias.double(), None
    if local in UNSIGNED:
        bias = bias + our_shift * _dq(p).sum(dim=1) - _dq(p) @ (SHIFT_GELU / p.smooth.double())
    elif local == "proj_out":
        b = slice(k1, None)
        bias = bias - _dq(p)[:, b] @ (SHIFT_GELU / p.smooth.double()[b])
        groups = torch.tensor([0] * (k1 // g) + [1] * ((p.spec.in_features - k1) // g), dtype=torch.int8)
        wz = groups[None, :].expand(p.spec.out_features, -1).contiguous()
    spec = LinearSpec(p.spec.in_features, p.spec.out_features, group_size=g, act_unsigned=unsigned,
                      act_shift=SHIFT_GELU if unsigned else 0.0, rank=p.rank, scheme="nunchaku")
    return PackedLinear(spec, p.qweight, p.wscales, p.smooth, p.lora_down.float(), p.lora_up.float(), bias.float(),
                        wzeros=wz)
