"""Per-architecture name map: Nunchaku's fused layer names -> the diffusers modules.

One :class:`Arch` per supported model class; adding an architecture is one more entry in
:data:`ARCHS` (block prefixes, each block's layers, the tensors copied as they are).

A :class:`Layer` reads one or more Nunchaku layers (``sources``, concatenated along K:
FLUX single blocks' ``proj_out`` is Nunchaku's ``out_proj`` + ``mlp_fc2``) and writes one
or more diffusers linears (``targets``, a split along N: ``qkv_proj`` -> ``to_q``,
``to_k``, ``to_v``; our sibling fusion concatenates them again at compile time).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["Source", "Layer", "Arch", "ARCHS", "arch_for_model", "arch_for_class_name", "V2_RENAMES"]


@dataclass(frozen=True)
class Source:
    """One Nunchaku layer: its local name in a block and its activation grid."""

    name: str
    unsigned: bool = False  # INT4 input quantized unsigned after GELU + 0.171875 (FLUX's mlp_fc2)


@dataclass(frozen=True)
class Layer:
    """Nunchaku layer(s) -> diffusers linear(s) of one block.

    kind: ``"w4a4"`` (SVDQuant W4A4 / NVFP4 linear) or ``"awq"`` (AWQ W4A16, AdaLN).
    adanorm_splits: AWQ AdaLN layers' modulation chunks (their output channels are
    interleaved across them and the scale chunks' bias carries +1).
    """

    sources: tuple[Source, ...]
    targets: tuple[str, ...]
    kind: str = "w4a4"
    adanorm_splits: int = 1


@dataclass(frozen=True)
class Arch:
    """One architecture: which model class, its block lists and each block's map."""

    name: str
    model_classes: tuple[str, ...]  # diffusers class names
    nunchaku_classes: tuple[str, ...]  # ``model_class`` values of merged files
    blocks: dict[str, tuple[Layer, ...]]  # block list prefix -> layers of each block
    copies: dict[str, dict[str, str]] = field(default_factory=dict)  # block prefix -> {nunchaku: diffusers}


def _w4a4(src: str, *targets: str, unsigned: bool = False) -> Layer:
    return Layer((Source(src, unsigned),), tuple(targets) or (src,))


FLUX = Arch(
    name="flux",
    model_classes=("FluxTransformer2DModel",),
    nunchaku_classes=("NunchakuFluxTransformer2dModel", "NunchakuFluxTransformer2DModel",
                      "NunchakuFluxTransformer2DModelV2"),
    blocks={
        "transformer_blocks": (
            Layer((Source("norm1.linear"),), ("norm1.linear",), "awq", 6),
            Layer((Source("norm1_context.linear"),), ("norm1_context.linear",), "awq", 6),
            _w4a4("qkv_proj", "attn.to_q", "attn.to_k", "attn.to_v"),
            _w4a4("qkv_proj_context", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            _w4a4("out_proj", "attn.to_out.0"),
            _w4a4("out_proj_context", "attn.to_add_out"),
            _w4a4("mlp_fc1", "ff.net.0.proj"),
            _w4a4("mlp_fc2", "ff.net.2", unsigned=True),
            _w4a4("mlp_context_fc1", "ff_context.net.0.proj"),
            _w4a4("mlp_context_fc2", "ff_context.net.2", unsigned=True),
        ),
        "single_transformer_blocks": (
            Layer((Source("norm.linear"),), ("norm.linear",), "awq", 3),
            _w4a4("qkv_proj", "attn.to_q", "attn.to_k", "attn.to_v"),
            _w4a4("mlp_fc1", "proj_mlp"),
            # diffusers' proj_out reads cat([attention, GELU(mlp)]): Nunchaku splits it along K.
            Layer((Source("out_proj"), Source("mlp_fc2", unsigned=True)), ("proj_out",)),
        ),
    },
    copies={
        "transformer_blocks": {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k",
                               "norm_added_q": "attn.norm_added_q", "norm_added_k": "attn.norm_added_k"},
        "single_transformer_blocks": {"norm_q": "attn.norm_q", "norm_k": "attn.norm_k"},
    },
)

ARCHS: tuple[Arch, ...] = (FLUX,)

# nunchaku's transformer_flux_v2 renames (convert_flux_state_dict), inverted: a v2 state
# dict is read back into the legacy names above. Order matters (longest first).
V2_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "transformer_blocks": (
        (".ff_context.net.0.proj.", ".mlp_context_fc1."), (".ff_context.net.2.", ".mlp_context_fc2."),
        (".ff.net.0.proj.", ".mlp_fc1."), (".ff.net.2.", ".mlp_fc2."),
        (".attn.add_qkv_proj.", ".qkv_proj_context."), (".attn.to_qkv.", ".qkv_proj."),
        (".attn.to_out.0.", ".out_proj."), (".attn.to_add_out.", ".out_proj_context."),
        (".attn.norm_added_q.", ".norm_added_q."), (".attn.norm_added_k.", ".norm_added_k."),
        (".attn.norm_q.", ".norm_q."), (".attn.norm_k.", ".norm_k."),
    ),
    "single_transformer_blocks": (
        (".attn.to_qkv.", ".qkv_proj."), (".attn.to_out.", ".out_proj."),
        (".attn.norm_q.", ".norm_q."), (".attn.norm_k.", ".norm_k."),
    ),
}
TENSOR_RENAMES = ((".proj_down", ".lora_down"), (".proj_up", ".lora_up"),
                  (".smooth_factor_orig", ".smooth_orig"), (".smooth_factor", ".smooth"))


def arch_for_model(model) -> Optional[Arch]:
    name = type(model).__name__
    return next((a for a in ARCHS if name in a.model_classes), None)


def arch_for_class_name(name: str) -> Optional[Arch]:
    return next((a for a in ARCHS if name in a.model_classes or name in a.nunchaku_classes), None)


def supported() -> list[str]:
    return [c for a in ARCHS for c in a.model_classes]
