"""``SVDQLinear``: an nn.Module holding one packed layer (the module-swap front end).

Used by :func:`svdq_compile.quantize` (quantize in place, drop the float weights),
:func:`svdq_compile.load`, LoRA folding and ONNX export. Its forward is one
``svdq::linear`` call, so ``torch.compile(..., backend="svdquant")`` still fuses it.
"""
from __future__ import annotations

import dataclasses


import torch
import torch.nn as nn

from svdq_compile.runtime.ops import linear_from_packed
from svdq_compile.runtime.packed import PackedLinear

__all__ = ["SVDQLinear"]

_KEYS = ("qweight", "wscales", "smooth", "lora_down", "lora_up", "bias", "wzeros", "wchannel")


class SVDQLinear(nn.Module):
    """Drop-in replacement of ``nn.Linear`` running the SVDQuant quantized linear."""

    # Called with each new instance. Integrations register here (diffusers' PEFT support
    # in integrations/diffusers/lora.py) so this module imports none of them.
    on_create: list = []

    def __init__(self, packed: PackedLinear, name: str = "") -> None:
        super().__init__()
        self.spec = packed.spec
        self.name = name
        self.meta = dict(packed.meta)
        for k in _KEYS:
            self.register_buffer(k, getattr(packed, k))
        self.base_rank = packed.rank  # rank before any LoRA was folded in
        self.loras: list[str] = []
        self.lora_ranks: list[int] = []  # rank of each folded LoRA, in self.loras' order
        for hook in SVDQLinear.on_create:
            hook(self)

    @property
    def in_features(self) -> int:
        return self.spec.in_features

    @property
    def out_features(self) -> int:
        return self.spec.out_features

    @property
    def weight(self) -> torch.Tensor:
        """A stand-in for ``nn.Linear.weight``: shape [out, in], the layer's compute dtype
        and device, but one NaN of storage.

        Code that only reads ``layer.weight.dtype`` / ``.device`` / ``.shape`` keeps working
        (diffusers' attention processors cast their input to ``attn.to_q.weight.dtype``).
        Anything that computes with it gets NaN instead of silently wrong numbers; the
        actual weight is :meth:`dequantized_weight`.
        """
        ref = next((t for t in (self.lora_up, self.bias) if t is not None), None)
        dtype = ref.dtype if ref is not None else torch.float32
        return torch.full((), float("nan"), dtype=dtype, device=self.qweight.device).expand(
            self.spec.out_features, self.spec.in_features)

    def dequantized_weight(self) -> torch.Tensor:
        """[out, in] fp32: the weight this layer applies to its input (smoothing undone)."""
        return self.packed.effective_weight()

    @property
    def packed(self) -> PackedLinear:
        rank = 0 if self.lora_down is None else int(self.lora_down.shape[0])
        spec = dataclasses.replace(self.spec, rank=rank)
        return PackedLinear(spec, self.qweight, self.wscales, self.smooth, self.lora_down, self.lora_up, self.bias,
                            self.wzeros, self.wchannel, meta=self.meta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_from_packed(x, self.packed)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        n0 = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not any(prefix + k in state_dict for k in _KEYS):
            # A state dict for other modules (a PEFT/diffusers LoRA): this layer's whole state
            # is missing, as expected. PEFT and diffusers take any missing key containing
            # ".lora_" for a missing adapter weight ("missing keys ... lora_down" warning):
            # those two names are left out of the report; qweight etc. stay in it.
            missing_keys[n0:] = [k for k in missing_keys[n0:]
                                 if k not in (prefix + "lora_down", prefix + "lora_up")]

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in={s.in_features}, out={s.out_features}, mode={s.label}, "
                f"rank={self.base_rank}, group={s.group_size}, loras={len(self.loras)}")

    # LoRA -----------------------------------------------------------------------------
    @torch.no_grad()
    def lora_factors(self, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``scale * up @ down`` (down: [r, K], up: [N, r]) as extra rank of this layer's
        16-bit branch: (down * lambda, up * scale) in the branch's dtype and device.

        The branch reads ``X' = X / lambda``, so ``X dW^T = X' (dW diag(lambda))^T``:
        the LoRA's down projection is multiplied by the smoothing factor lambda.
        """
        k, n = self.spec.in_features, self.spec.out_features
        if down.dim() != 2 or up.dim() != 2 or down.shape[1] != k or up.shape[0] != n or up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA shapes of layer {self.name or '?'} must be down [r, {k}] and up [{n}, r], got "
                             f"{list(down.shape)} and {list(up.shape)}")
        dtype = self.lora_down.dtype if self.lora_down is not None else (
            self.bias.dtype if self.bias is not None else torch.float32)
        device = self.qweight.device
        d = down.detach().to(device, torch.float64)
        if self.smooth is not None:
            d = d * self.smooth.to(torch.float64)[None, :]
        u = up.detach().to(device, torch.float64) * scale
        return d.to(dtype), u.to(dtype)

    @torch.no_grad()
    def fold_lora(self, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0, name: str = "lora") -> None:
        """Add ``scale * up @ down`` (down: [r, K], up: [N, r]) to the layer, no re-quantization.

        The factors (:meth:`lora_factors`) are concatenated to the low-rank branch
        (docs/design.md section 5: LoRA without re-quantizing); :meth:`unfold_lora` takes them out.
        """
        d, u = self.lora_factors(down, up, scale)
        if self.lora_down is None:
            self.lora_down, self.lora_up = d, u
        else:
            self.lora_down = torch.cat([self.lora_down, d])
            self.lora_up = torch.cat([self.lora_up, u], dim=1)
        self.loras.append(name)
        self.lora_ranks.append(int(d.shape[0]))

    @torch.no_grad()
    def unfold_lora(self, name: str) -> None:
        """Take the last LoRA folded as ``name`` out again (the other ranks are kept bit for bit)."""
        if name not in self.loras:
            raise ValueError(f"layer {self.name or '?'} has no folded LoRA {name!r} (has {self.loras})")
        i = len(self.loras) - 1 - self.loras[::-1].index(name)
        start = self.base_rank + sum(self.lora_ranks[:i])
        stop = start + self.lora_ranks[i]
        if self.lora_down.shape[0] == stop - start:
            self.lora_down = self.lora_up = None
        else:
            self.lora_down = torch.cat([self.lora_down[:start], self.lora_down[stop:]]).contiguous()
            self.lora_up = torch.cat([self.lora_up[:, :start], self.lora_up[:, stop:]], dim=1).contiguous()
        del self.loras[i], self.lora_ranks[i]

    @torch.no_grad()
    def remove_loras(self) -> None:
        """Drop every folded LoRA (restores the quantized base layer exactly)."""
        if self.base_rank == 0:
            self.lora_down = self.lora_up = None
        elif self.lora_down is not None:
            self.lora_down = self.lora_down[: self.base_rank].contiguous()
            self.lora_up = self.lora_up[:, : self.base_rank].contiguous()
        self.loras = []
        self.lora_ranks = []
