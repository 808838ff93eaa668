"""User-facing configuration of the SVDQuant backend."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

from svdq_compile.quant.auto_mode import AUTO
from svdq_compile.runtime.modes import get_mode, has_handler, mode_names

__all__ = ["SVDQuantConfig", "DEFAULT_SKIP", "DEFAULT_MODE_OVERRIDES"]

# Kept in 16 bits by default (docs/design.md section 1 step 6): embedders and the final
# projection/modulation, where errors are not averaged over many later layers.
# Top-level "proj_out" is the last projection; FLUX single blocks' "...blocks.N.proj_out"
# do not match these patterns and are quantized.
DEFAULT_SKIP = ("*embed*", "proj_out", "*transformer.proj_out", "*norm_out*", "*conv_in*", "*conv_out*")
# AdaLN modulation linears run on one vector per sample (M = batch): weight-only 4 bit.
DEFAULT_MODE_OVERRIDES = (("*norm*.linear", "w4a16"),)


@dataclass(frozen=True)
class SVDQuantConfig:
    """How to quantize. Every field is also a ``torch.compile(..., options={...})`` key.

    Attributes:
        mode: ``auto`` (default: per device, the fastest mode whose quality is at least
            W4A4's, see :mod:`svdq_compile.quant.auto_mode`), ``w4a4`` (the paper's numerics),
            ``w4a8-int8`` / ``w4a8-fp8`` (INT4 weights, 8-bit per-token activations),
            ``w4a8``, ``w8a8`` (group-wise 8-bit activations), ``w4a16`` or ``w8a16``.
        rank: rank of the 16-bit low-rank branch (0 disables it).
        group_size: quantization group along K for weights and activations.
        smooth: apply SmoothQuant-style smoothing before quantization.
        alpha: fixed migration strength (beta = 1 - alpha); ``None`` searches (alpha, beta)
            per layer on the calibration tokens (docs/design.md section 1).
        search_grid: grid points of the alpha search (0.0 plus ``search_grid - 1`` values in (0, 1)).
        search_tokens: calibration tokens the search evaluates the quantized layer on.
        search_rows: output channels (a seeded random subset) the search evaluates on;
            the final decomposition always uses the whole layer.
        refine_iters: low-rank refinement rounds ``L = SVD_r(W' - Q(W' - L))`` (stops early
            when the error stops improving).
        unsigned_after_act: quantize inputs produced by ReLU/GELU as unsigned INT4.
        skip: fnmatch patterns of layer names kept in floating point (default
            :data:`DEFAULT_SKIP`: embedders, final projection; ``()`` quantizes everything).
        rank_overrides: ``{pattern: rank}`` per-layer rank.
        mode_overrides: ``{pattern: mode}`` per-layer mode (default
            :data:`DEFAULT_MODE_OVERRIDES`: AdaLN modulation linears as ``w4a16``).
        min_features: layers with fewer input or output features stay in floating point.
        calib_tokens: tokens kept per layer by the streaming calibration (reservoir sample).
        calib_calls: forward calls recorded by auto-calibration when no explicit
            :func:`svdq_compile.calibrate` statistics exist.
        calibration: ``"auto"`` (calibrate on the first calls) or ``"require"`` (raise if
            statistics are missing).
        fuse_siblings: fuse linears that read the same tensor into one quantized GEMM.
        fold_smoothing: fold 1/lambda into a preceding LayerNorm/RMSNorm when safe.
        fuse_epilogue: fuse GELU/SiLU/ReLU, gating and residual adds into the linear.
        use_inductor: compile the rewritten graph with Inductor (False = eager, for debugging).
        kernel: ``"auto"`` (Triton on CUDA, torch on CPU), ``"torch"`` or ``"triton"``.
        seed: seed for the calibration sampling and randomized SVD (determinism).
        dump_graphs: directory to write the graph before/after each pass (debugging).
    """

    mode: str = "auto"
    rank: int = 32
    group_size: int = 64
    smooth: bool = True
    alpha: Optional[float] = None
    search_grid: int = 20
    search_tokens: int = 1024
    search_rows: int = 1024
    refine_iters: int = 2
    unsigned_after_act: bool = True
    skip: tuple[str, ...] = DEFAULT_SKIP
    rank_overrides: tuple[tuple[str, int], ...] = ()
    mode_overrides: tuple[tuple[str, str], ...] = DEFAULT_MODE_OVERRIDES
    min_features: int = 64
    calib_tokens: int = 2048
    calib_calls: int = 1
    calibration: str = "auto"
    fuse_siblings: bool = True
    fold_smoothing: bool = True
    fuse_epilogue: bool = True
    use_inductor: bool = True
    kernel: str = "auto"
    seed: int = 0
    dump_graphs: Optional[str] = None

    def __post_init__(self) -> None:
        valid = mode_names() + [AUTO]
        if self.mode not in valid:
            raise ValueError(f"mode must be one of {valid}, got {self.mode!r}")
        for _, m in self.mode_overrides:
            if m not in valid:
                raise ValueError(f"mode_overrides: unknown mode {m!r}; expected one of {valid}")
        quantizable = [n for n in mode_names() if has_handler(get_mode(n).scheme, "quantize_weight")] + [AUTO]
        for m in [self.mode] + [m for _, m in self.mode_overrides]:
            # Load-only modes (a checkpoint's own numerics, e.g. w4a4-nunchaku) have no weight
            # quantizer: say so now rather than after calibration.
            if m != AUTO and not has_handler(get_mode(m).scheme, "quantize_weight"):
                raise ValueError(f"mode {m!r} can be loaded (svdq_compile.load_nunchaku) but not quantized "
                                 f"into; quantize with one of {quantizable} instead")
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")
        if self.group_size <= 0 or self.group_size % 2:
            raise ValueError(f"group_size must be a positive even number, got {self.group_size}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] or None (search), got {self.alpha}")
        if self.search_grid < 1:
            raise ValueError("search_grid must be >= 1")
        if self.calibration not in ("auto", "require"):
            raise ValueError(f"calibration must be 'auto' or 'require', got {self.calibration!r}")
        if self.kernel not in ("auto", "torch", "triton"):
            raise ValueError(f"kernel must be 'auto', 'torch' or 'triton', got {self.kernel!r}")
        if self.calib_tokens < 1 or self.calib_calls < 1:
            raise ValueError("calib_tokens and calib_calls must be >= 1")

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> "SVDQuantConfig":
        """Build from a ``torch.compile`` options dict; unknown keys raise ``ValueError``."""
        merged: dict[str, Any] = dict(options or {})
        merged.update(kwargs)
        if "config" in merged:
            base = merged.pop("config")
            if not isinstance(base, SVDQuantConfig):
                raise TypeError(f"options['config'] must be an SVDQuantConfig, got {type(base).__name__}")
            return dataclasses.replace(base, **cls._normalize(merged))
        return cls(**cls._normalize(merged))

    @classmethod
    def _normalize(cls, opts: dict[str, Any]) -> dict[str, Any]:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise ValueError(
                f"unknown svdquant option(s) {unknown}; valid options are: {', '.join(sorted(names))}"
            )
        out = dict(opts)
        if "skip" in out and isinstance(out["skip"], str):
            out["skip"] = (out["skip"],)
        for key in ("skip",):
            if key in out:
                out[key] = tuple(out[key])
        for key in ("rank_overrides", "mode_overrides"):
            if key in out and isinstance(out[key], Mapping):
                out[key] = tuple(out[key].items())
            elif key in out:
                out[key] = tuple(tuple(p) for p in out[key])
        return out

    def needs_activation_stats(self) -> bool:
        """Whether calibration must record activations (weight-only modes need none;
        ``auto`` never picks one; any ``mode_overrides`` keeps recording, as before)."""
        return self.mode == AUTO or not get_mode(self.mode).weight_only or bool(self.mode_overrides)

    def cache_key(self) -> tuple:
        """Fields that change the quantized numbers (not how they are run or logged)."""
        run_only = {"use_inductor", "kernel", "dump_graphs", "calibration", "calib_calls",
                    "fuse_siblings", "fold_smoothing", "fuse_epilogue"}
        return tuple((f.name, getattr(self, f.name)) for f in fields(self) if f.name not in run_only)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        d["rank_overrides"] = dict(self.rank_overrides)
        d["mode_overrides"] = dict(self.mode_overrides)
        return d
