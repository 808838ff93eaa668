"""LoRA adapters (PEFT / diffusers) on quantized layers: extra rank of the 16-bit branch.

diffusers loads LoRAs through PEFT (``pipe.load_lora_weights`` -> ``load_lora_adapter``
-> ``peft.inject_adapter_in_model``), and PEFT only knows ``nn.Linear`` & co. PEFT's
custom-layer API (``LoraConfig._register_custom_module``) maps a layer class to a LoRA
layer class; diffusers builds the ``LoraConfig`` itself, so :func:`enable_peft_lora`
registers ``SVDQLinear -> SVDQLoraLinear`` on every config at the moment PEFT creates
a LoRA layer for an ``SVDQLinear`` (a wrapper of ``LoraModel._create_new_module``).
Everything else is diffusers' and PEFT's own code: ``set_adapters`` (weights),
``disable_lora`` / ``enable_lora``, ``fuse_lora`` / ``unfuse_lora``,
``unload_lora_weights``, ``delete_adapters``, ``save_lora_weights``.

:class:`SVDQLoraLinear` keeps PEFT's ``lora_A`` / ``lora_B`` (state dict, training,
``get_delta_weight``) but does not run them as separate matmuls: whenever the set of
active adapters or their scales change, it concatenates ``A * lambda`` (smoothing
factor) and ``B * scale`` of every active adapter to the layer's own low-rank factors
(``SVDQLinear.lora_factors``) and its forward is the same single ``svdq::linear`` call
with a larger rank. The INT4 residual and its scales are never touched (no
re-quantization). ``fuse_lora`` folds the factors into the ``SVDQLinear`` itself
(``fold_lora``), ``unfuse_lora`` takes them out (``unfold_lora``), bit for bit.

Compiled pipelines: the effective factors are buffers of the LoRA layer, so the
compiled graph reads them as inputs. A change of adapters (load, ``set_adapters``,
weights, enable/disable, fuse, delete) creates new factor tensors: Dynamo re-traces
only if the total rank changed (its guards are on shapes); the ``svdquant`` backend
bakes layer tensors into fused kernels (QKV siblings), sees new tensors and compiles
the graph once more at the next call. So: one recompilation per change, none per
denoising step; padding the rank would save only Dynamo's re-trace, not the
backend's, so it is not done. ``unload_lora_weights`` puts the original ``SVDQLinear``
modules back (Dynamo re-traces; outputs are the quantized pipeline's, bit for bit).
Every change makes new factor tensors and frees the old ones; the backend drops the
variant compiled from them at that moment (``svdq_compile.capture.backend``: variants are held
by weak keys), so N changes leave one variant per live set of tensors, not N.
"""
from __future__ import annotations

import dataclasses

import logging
from typing import Any, Optional

import sys

import torch
import torch.nn as nn

from svdq_compile.quant.modules import SVDQLinear

__all__ = ["enable_peft_lora", "SVDQLoraLinear"]

log = logging.getLogger(__name__)

_ENABLED = False
_LAYER_CLS: Optional[type] = None


def enable_peft_lora() -> bool:
    """Make PEFT create :class:`SVDQLoraLinear` for ``SVDQLinear`` targets (idempotent).

    Called by ``quantize_pipeline`` / ``load_pipeline`` and when an ``SVDQLinear`` is
    built after PEFT was imported; call it yourself before ``add_adapter`` /
    ``inject_adapter_in_model`` on a model quantized otherwise. Returns False when PEFT
    is not installed.
    """
    global _ENABLED
    if _ENABLED:
        return True
    try:
        from peft.tuners.lora.model import LoraModel
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    cls = _layer_class()
    original = LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, SVDQLinear) and SVDQLinear not in (lora_config._custom_modules or {}):
            lora_config._register_custom_module({SVDQLinear: cls})
        return original(lora_config, adapter_name, target, **kwargs)

    _create_new_module.__wrapped__ = original  # type: ignore[attr-defined]
    LoraModel._create_new_module = staticmethod(_create_new_module)
    _patch_flux_expand()
    _ENABLED = True
    return True


def _patch_flux_expand() -> None:
    """FLUX's loader zero-pads LoRAs of widened layers (Flux Control) and for that reads
    ``transformer.state_dict()[name + ".weight"]`` of every LoRA target; a quantized layer
    has no float weight. Quantized layers are never widened: their LoRA factors go past
    that step untouched (shapes are checked when the adapter is loaded)."""
    try:
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    except ImportError:
        return
    original = FluxLoraLoaderMixin.__dict__.get("_maybe_expand_lora_state_dict")
    if original is None or getattr(original, "_svdq", False):
        return
    fn = original.__func__

    def _maybe_expand_lora_state_dict(cls, transformer, lora_state_dict):
        model = getattr(transformer, "_orig_mod", transformer)
        quantized = {n for n, m in model.named_modules()
                     if isinstance(m, SVDQLinear) or isinstance(getattr(m, "base_layer", None), SVDQLinear)}
        if not quantized:
            return fn(cls, transformer, lora_state_dict)
        prefix = f"{cls.transformer_name}."
        held = {}
        for k in list(lora_state_dict):
            name = k[len(prefix):] if k.startswith(prefix) else k
            if name.rsplit(".lora_", 1)[0] in quantized:
                held[k] = lora_state_dict.pop(k)
        out = fn(cls, transformer, lora_state_dict)
        out.update(held)
        return out

    _maybe_expand_lora_state_dict._svdq = True  # type: ignore[attr-defined]
    FluxLoraLoaderMixin._maybe_expand_lora_state_dict = classmethod(_maybe_expand_lora_state_dict)


def _layer_class() -> type:
    global _LAYER_CLS
    if _LAYER_CLS is None:
        _LAYER_CLS = _build_layer_class()
    return _LAYER_CLS


def _build_layer_class() -> type:
    from peft.tuners.lora.layer import Linear as LoraLinear

    from svdq_compile.runtime.ops import linear_from_packed
    from svdq_compile.runtime.packed import PackedLinear

    class SVDQLoraLinear(LoraLinear):
        """PEFT LoRA layer around an ``SVDQLinear``: adapters as extra rank of its 16-bit branch."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any = None, **kwargs: Any) -> None:
            if not isinstance(base_layer.get_base_layer() if hasattr(base_layer, "get_base_layer") else base_layer,
                              SVDQLinear):
                raise TypeError(f"SVDQLoraLinear wraps an SVDQLinear, got {type(base_layer).__name__}")
            if getattr(config, "fan_in_fan_out", False):
                raise ValueError("fan_in_fan_out=True is for Conv1D weights; an SVDQLinear is [out, in] like nn.Linear")
            self._svdq_ready = False
            self._svdq_extra = False
            super().__init__(base_layer, adapter_name, config=config, **kwargs)
            self.register_buffer("svdq_down", None, persistent=False)
            self.register_buffer("svdq_up", None, persistent=False)
            self.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh_factors())
            self._svdq_ready = True
            self.refresh_factors()

        def _get_in_out_features(self, module: nn.Module):
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            return base.in_features, base.out_features

        def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any, **kwargs: Any) -> None:
            for variant in ("use_dora", "use_bdlora", "alora_invocation_tokens", "arrow_config"):
                if getattr(config, variant, None):
                    raise ValueError(f"LoRA variant {variant} is not supported on quantized layers "
                                     f"({self.get_base_layer().name or 'SVDQLinear'}); plain LoRA only")
            if getattr(config, "lora_bias", False):
                raise ValueError("lora_bias=True is not supported on quantized layers")
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            self.refresh_factors()

        # -- every PEFT entry point that changes what the layer computes refreshes the factors
        def set_adapter(self, adapter_names, *args: Any, **kwargs: Any) -> None:
            super().set_adapter(adapter_names, *args, **kwargs)
            self.refresh_factors()

        def set_scale(self, adapter: str, scale: float) -> None:
            super().set_scale(adapter, scale)
            self.refresh_factors()

        def scale_layer(self, scale: float) -> None:
            super().scale_layer(scale)
            self.refresh_factors()

        def unscale_layer(self, scale=None) -> None:
            super().unscale_layer(scale)
            self.refresh_factors()

        def enable_adapters(self, enabled: bool) -> None:
            super().enable_adapters(enabled)
            self.refresh_factors()

        def delete_adapter(self, adapter_name: str) -> None:
            super().delete_adapter(adapter_name)
            self.refresh_factors()

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            w = self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float()
            return w * self.scaling[adapter]

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            """``fuse_lora``: fold the adapters into the SVDQLinear's branch (still no re-quantization)."""
            from peft.tuners.tuners_utils import check_adapters_to_merge

            names = check_adapters_to_merge(self, adapter_names)
            base = self.get_base_layer()
            for name in names:
                if name not in self.lora_A.keys():
                    continue
                a, b = self.lora_A[name].weight, self.lora_B[name].weight
                if safe_merge and not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.fold_lora(a, b, self.scaling[name], name=name)
                self.merged_adapters.append(name)
            self.refresh_factors()

        def unmerge(self) -> None:
            base = self.get_base_layer()
            while self.merged_adapters:
                base.unfold_lora(self.merged_adapters.pop())
            self.refresh_factors()

        @torch.no_grad()
        def refresh_factors(self) -> None:
            """Recompute the effective low-rank factors (base + active, unmerged adapters)."""
            if not getattr(self, "_svdq_ready", False):
                return
            if any(p.is_meta for p in self.lora_A.parameters()) or any(p.is_meta for p in self.lora_B.parameters()):
                return  # low_cpu_mem_usage: weights arrive with load_state_dict (post hook refreshes)
            base = self.get_base_layer()
            downs, ups = [], []
            if not self.disable_adapters and not self.merged:
                for name in self.active_adapters:
                    if name in self.lora_A.keys():
                        d, u = base.lora_factors(self.lora_A[name].weight, self.lora_B[name].weight,
                                                 self.scaling[name])
                        downs.append(d)
                        ups.append(u)
            self._svdq_extra = bool(downs)  # a Python flag: Dynamo guards on it
            if not downs:  # forward runs the base layer: its compiled variant is reused
                self.svdq_down = self.svdq_up = None
                return
            if base.lora_down is not None:
                downs.insert(0, base.lora_down)
                ups.insert(0, base.lora_up)
            self.svdq_down = torch.cat(downs).contiguous()
            self.svdq_up = torch.cat(ups, dim=1).contiguous()

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs.get("adapter_names") is not None:  # PEFT's mixed-batch path: separate matmuls
                return super().forward(x, *args, **kwargs)
            base = self.get_base_layer()
            if not self._svdq_extra:
                return base(x)
            spec = dataclasses.replace(base.spec, rank=int(self.svdq_down.shape[0]))
            packed = PackedLinear(spec, base.qweight, base.wscales, base.smooth, self.svdq_down, self.svdq_up,
                                  base.bias, base.wzeros, base.wchannel, meta=base.meta)
            return linear_from_packed(x, packed)

        def __repr__(self) -> str:
            return "svdq_lora." + super().__repr__()

    SVDQLoraLinear.__module__ = __name__
    return SVDQLoraLinear


def __getattr__(name: str):
    if name == "SVDQLoraLinear":
        return _layer_class()
    raise AttributeError(name)


def _enable_if_peft_imported(_layer: SVDQLinear) -> None:
    """Let PEFT (diffusers' ``load_lora_weights``, ``add_adapter``) target an SVDQLinear
    once PEFT is imported; PEFT is never imported for this."""
    if "peft" in sys.modules:
        enable_peft_lora()


SVDQLinear.on_create.append(_enable_if_peft_imported)
