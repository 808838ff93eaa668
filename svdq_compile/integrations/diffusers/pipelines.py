"""diffusers pipelines: quantize, save and load a whole pipeline (FLUX, SD3, PixArt, SDXL...).

    pipe = DiffusionPipeline.from_pretrained("/models/FLUX.1-dev", torch_dtype=torch.bfloat16)
    pipe = svdq_compile.quantize_pipeline(pipe, prompts, num_inference_steps=20)
    svdq_compile.save_pipeline(pipe, "flux-svdq")
    pipe = svdq_compile.load_pipeline("flux-svdq")        # later: no calibration

:func:`quantize_pipeline` calibrates by running the pipeline's own denoising loop on
the prompts (every timestep and both guidance branches reach the eager denoiser's
linears), quantizes ``pipe.transformer`` / ``pipe.unet`` in place (float weights of
quantized layers are released) and, optionally, the text encoders, then wraps the
denoiser in ``torch.compile(..., backend="svdquant")``.

Saved layout (see :func:`save_pipeline`)::

    DIR/model_index.json      diffusers' own pipeline index (unchanged class names)
    DIR/svdq_pipeline.json    format, version, quantized components, SVDQuantConfig
    DIR/<component>/          every other component: its own save_pretrained
    DIR/<quantized>/config.json          the model's config (architecture)
    DIR/<quantized>/svdq/                svdq_compile.save artifact (quantized layers)
    DIR/<quantized>/float.safetensors    all remaining parameters and buffers

The directory is self-contained (it does not point back to the original pipeline), and
only :func:`load_pipeline` reads it: ``DiffusionPipeline.from_pretrained`` alone cannot
build the quantized component.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from svdq_compile.export.artifacts import ArtifactError, read_artifact, replace_dir, staging_dir
from svdq_compile.export.artifacts import save as save_artifact
from svdq_compile.capture.calibration import _NAME_ATTR, calibrating, clear_calibration
from svdq_compile.quant.config import SVDQuantConfig
from svdq_compile.integrations.diffusers.lora import enable_peft_lora
from svdq_compile.quant.modules import SVDQLinear
from svdq_compile.capture.quantize_module import quantize

__all__ = [
    "quantize_pipeline",
    "save_pipeline",
    "load_pipeline",
    "pipeline_config",
    "denoiser_name",
    "PIPELINE_SKIP",
    "PIPELINE_FORMAT_VERSION",
]

log = logging.getLogger(__name__)

PIPELINE_FORMAT_VERSION = 1
PIPELINE_MANIFEST = "svdq_pipeline.json"
_FLOAT_FILE = "float.safetensors"
_ARTIFACT_DIR = "svdq"
_DENOISERS = ("transformer", "unet")
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

# Kept in 16-bit by default (docs/design.md section 1 step 6, as Nunchaku does): embedders
# (patch/context/time/pooled-text/added-condition embeddings), PixArt's AdaLN-single and
# caption projection, the final norm-modulation and output projection, and the text
# encoders' final projection. fnmatch patterns on the full layer name, so a block's own
# "...attentions.0.proj_out" is not matched by "proj_out".
PIPELINE_SKIP: tuple[str, ...] = (
    "*embed*",
    "adaln_single.*",
    "caption_projection.*",
    "norm_out.*",
    "proj_out",
    "text_projection",
)


def pipeline_config(**overrides: Any) -> SVDQuantConfig:
    """The default configuration of :func:`quantize_pipeline`: ``SVDQuantConfig`` + PIPELINE_SKIP."""
    overrides.setdefault("skip", PIPELINE_SKIP)
    return SVDQuantConfig.from_options(overrides)


def _unwrap(m: Any) -> Any:
    return getattr(m, "_orig_mod", m)


def denoiser_name(pipe: Any) -> str:
    """``"transformer"`` or ``"unet"``: the pipeline's denoising network."""
    for name in _DENOISERS:
        if isinstance(_unwrap(getattr(pipe, name, None)), nn.Module):
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet to quantize")


def _compile(pipe: Any, name: str, config: SVDQuantConfig, dynamic: Optional[bool],
             options: Optional[dict] = None) -> None:
    if options:
        config = SVDQuantConfig.from_options({"config": config, **options})
    model = _unwrap(getattr(pipe, name))
    # Name the linears kept in float so the backend matches them against config.skip
    # by their module path (as calibrating() does), not by Dynamo's graph naming.
    for lname, m in model.named_modules():
        if isinstance(m, nn.Linear):
            setattr(m.weight, _NAME_ATTR, lname)
    # In place (nn.Module.compile): pipe.<name> stays the diffusers model, so diffusers'
    # own APIs that check its class (load_lora_weights, set_adapters, ...) still see it.
    model.compile(backend="svdquant", options=config.to_dict(), dynamic=dynamic)
    setattr(pipe, name, model)


def _component_config(model: nn.Module, config: SVDQuantConfig) -> SVDQuantConfig:
    """``config`` plus the modules the model keeps in fp32 (``_keep_in_fp32_modules`` of
    transformers and diffusers models; T5's ``wo``: fp16 overflows there, and T5 reads
    ``wo.weight.dtype`` in its forward)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    if not keep:
        return config
    extra = tuple(f"*{k}*" for k in keep)  # transformers matches these as substrings of names
    return SVDQuantConfig.from_options({"config": config, "skip": tuple(config.skip) + extra})


class _FirstCall:
    """Forward pre-hook (with kwargs) keeping a detached copy of the module's first call."""

    def __init__(self, module: nn.Module) -> None:
        self.args: Optional[tuple] = None
        self.kwargs: Optional[dict] = None
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.args is None:
            detach = lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t  # noqa: E731
            self.args = torch.utils._pytree.tree_map(detach, args)
            self.kwargs = torch.utils._pytree.tree_map(detach, dict(kwargs))


def quantize_pipeline(
    pipe: Any,
    calibration_prompts: Union[str, Sequence[str]],
    config: Optional[SVDQuantConfig] = None,
    num_inference_steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    quantize_text_encoders: bool = False,
    compile: bool = True,
    dynamic: Optional[bool] = None,
    compile_options: Optional[dict] = None,
    seed: int = 0,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> Any:
    """Calibrate on ``calibration_prompts``, quantize in place, compile; returns ``pipe``.

    Each prompt is one call of the pipeline (``output_type="latent"``, seeded
    ``seed + i``) with ``num_inference_steps``, ``guidance_scale`` and ``pipe_kwargs``
    (e.g. ``height``, ``width``, ``max_sequence_length``): statistics cover every
    timestep and both guidance branches with bounded memory. ``config`` defaults to
    :func:`pipeline_config` (embedders and the output projection stay 16-bit); a config
    you pass is used as is. With ``compile`` the denoiser becomes
    ``torch.compile(denoiser, backend="svdquant", options=config, dynamic=dynamic)``
    (``compile_options`` override run-time fields there, e.g. ``{"use_inductor": False}``).
    The per-component reports are in ``pipe.svdq_reports``.
    """
    enable_peft_lora()  # pipe.load_lora_weights then reaches the quantized layers
    prompts = [calibration_prompts] if isinstance(calibration_prompts, str) else list(calibration_prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("quantize_pipeline: calibration_prompts must be a non-empty list of strings")
    cfg = config if config is not None else pipeline_config()
    if not isinstance(cfg, SVDQuantConfig):
        raise TypeError(f"config must be an SVDQuantConfig, got {type(cfg).__name__}")
    names = [denoiser_name(pipe)]
    if quantize_text_encoders:
        names += [n for n in _TEXT_ENCODERS if isinstance(getattr(pipe, n, None), nn.Module)]
    modules: dict[str, nn.Module] = {}
    for n in names:
        m = _unwrap(getattr(pipe, n))
        if any(isinstance(x, SVDQLinear) for x in m.modules()):
            raise ValueError(f"quantize_pipeline: pipe.{n} is already quantized")
        if m is not getattr(pipe, n):
            setattr(pipe, n, m)  # calibrate the eager module, not a compiled wrapper
        modules[n] = m

    call = dict(pipe_kwargs)
    if num_inference_steps is not None:
        call["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        call["guidance_scale"] = guidance_scale
    call.setdefault("output_type", "latent")  # calibration needs no VAE decode
    device = getattr(pipe, "_execution_device", None) or torch.device("cpu")
    captures: dict[str, _FirstCall] = {}
    try:
        with contextlib.ExitStack() as stack, torch.no_grad():
            for n, m in modules.items():
                stack.enter_context(calibrating(m, cfg))
                captures[n] = _FirstCall(m)
                stack.callback(captures[n].handle.remove)
            for i, prompt in enumerate(prompts):
                log.info("quantize_pipeline: calibration prompt %d/%d", i + 1, len(prompts))
                pipe(prompt=prompt, generator=torch.Generator(device).manual_seed(seed + i), **call)
    except BaseException:
        for m in modules.values():
            clear_calibration(m)  # leave the pipeline as it was
        raise
    reports = {}
    for n, m in modules.items():
        cap = captures[n]
        if cap.args is None:
            raise ValueError(f"quantize_pipeline: pipe.{n} was never called during calibration")
        reports[n] = quantize(m, cap.args, config=_component_config(m, cfg), example_kwargs=cap.kwargs,
                              progress=progress)
        # Statistics of the linears kept in float are not needed any more (the backend
        # records what it needs itself if it ever quantizes one of them).
        clear_calibration(m)
        log.info("quantize_pipeline: %s: %s", n, reports[n].summary())
    pipe.svdq_config = cfg
    pipe.svdq_reports = reports
    if compile:
        _compile(pipe, names[0], cfg, dynamic, compile_options)
    return pipe


# ---------------------------------------------------------------------------- save / load
def _quantized_components(pipe: Any) -> list[str]:
    out = []
    for name in pipe.components:
        m = _unwrap(getattr(pipe, name, None))
        if isinstance(m, nn.Module) and any(isinstance(x, SVDQLinear) for x in m.modules()):
            out.append(name)
    return out


def _float_tensors(model: nn.Module, packed_prefixes: Iterable[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer (persistent or not) outside the quantized layers.

    Returns (tensors, aliases): tied tensors are stored once; ``aliases`` maps each
    other name to the stored one.
    """
    prefixes = tuple(p + "." for p in packed_prefixes)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    items = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in items:
        if t is None or name.startswith(prefixes):
            continue
        if id(t) in first:
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, aliases


def _save_model_config(model: nn.Module, path: Path) -> None:
    if hasattr(model, "save_config"):  # diffusers ModelMixin
        model.save_config(path)
    elif hasattr(getattr(model, "config", None), "save_pretrained"):  # transformers PreTrainedModel
        model.config.save_pretrained(path)
    else:
        raise TypeError(f"cannot save the configuration of a {type(model).__name__}")


def save_pipeline(pipe: Any, path: Union[str, os.PathLike]) -> Path:
    """Write a quantized pipeline to the directory ``path`` (atomically; see the module doc)."""
    quantized = _quantized_components(pipe)
    if not quantized:
        raise ValueError("save_pipeline: no component of the pipeline is quantized; run quantize_pipeline first")
    path = Path(path)
    tmp = staging_dir(path)  # a plain mkdir's permissions under the umask, not mkdtemp's 0o700
    try:
        pipe.save_config(tmp)  # model_index.json, component classes as diffusers wrote them
        for name in pipe.components:
            comp = _unwrap(getattr(pipe, name, None))
            if comp is None:
                continue
            if name in quantized:
                _save_quantized_component(comp, tmp / name, getattr(pipe, "svdq_config", None))
            elif hasattr(comp, "save_pretrained"):
                kwargs = {"safe_serialization": True} if isinstance(comp, nn.Module) else {}
                comp.save_pretrained(tmp / name, **kwargs)
            else:
                raise TypeError(f"save_pipeline: component {name} ({type(comp).__name__}) cannot be saved")
        config = getattr(pipe, "svdq_config", None)
        manifest = {
            "format": "svdq_compile_pipeline",
            "format_version": PIPELINE_FORMAT_VERSION,
            "pipeline_class": type(pipe).__name__,
            "quantized": quantized,
            "denoiser": denoiser_name(pipe),
            "config": config.to_dict() if config is not None else None,
        }
        (tmp / PIPELINE_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved pipeline with quantized %s to %s", ", ".join(quantized), path)
    return path


def _save_quantized_component(model: nn.Module, path: Path, config: Optional[SVDQuantConfig]) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    _save_model_config(model, path)
    packed = [n for n, m in model.named_modules() if isinstance(m, SVDQLinear)]
    save_artifact(model, path / _ARTIFACT_DIR, config=config)
    tensors, aliases = _float_tensors(model, packed)
    save_file(tensors, str(path / _FLOAT_FILE),
              metadata={"format": "svdq_compile_float", "aliases": json.dumps(aliases)})


def _component_class(path: Path, name: str) -> tuple[str, type]:
    index = json.loads((path / "model_index.json").read_text())
    entry = index.get(name)
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] and entry[1]):
        raise ArtifactError(f"{path}: model_index.json has no class for component {name!r}")
    library, cls_name = entry
    if library not in ("diffusers", "transformers"):
        raise ArtifactError(f"{path}: component {name} comes from {library!r}; only diffusers and "
                            "transformers models can be quantized components")
    return library, getattr(importlib.import_module(library), cls_name)


def _load_quantized_component(root: Path, name: str) -> nn.Module:
    from safetensors import safe_open
    from safetensors.torch import load_file

    library, cls = _component_class(root, name)
    path = root / name
    for f in ("config.json", _FLOAT_FILE, _ARTIFACT_DIR):
        if not (path / f).exists():
            raise ArtifactError(f"{path} is not a quantized component (missing {f})")
    # Build the architecture on the meta device: no float weights are ever allocated.
    with torch.device("meta"):
        if library == "diffusers":
            model = cls.from_config(cls.load_config(str(path)))
        else:
            model = cls._from_config(cls.config_class.from_pretrained(str(path)))
    _, packed = read_artifact(path / _ARTIFACT_DIR)
    modules = dict(model.named_modules())
    for lname, p in packed.items():
        m = modules.get(lname)
        if not isinstance(m, nn.Linear) or (m.out_features, m.in_features) != (p.spec.out_features, p.spec.in_features):
            raise ArtifactError(f"{path}: quantized layer {lname} does not match a linear of {cls.__name__}")
        model.set_submodule(lname, SVDQLinear(p, lname))
    tensors = load_file(str(path / _FLOAT_FILE))
    with safe_open(str(path / _FLOAT_FILE), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    params: dict[str, nn.Parameter] = {}
    for tname in list(tensors) + list(aliases):
        src = aliases.get(tname, tname)
        t = tensors.get(src)
        if t is None:
            raise ArtifactError(f"{path}: {_FLOAT_FILE} lacks {src}")
        mod_name, _, attr = tname.rpartition(".")
        try:
            mod = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise ArtifactError(f"{path}: {tname} is not a tensor of {cls.__name__}") from None
        if attr in mod._parameters:
            if src not in params:
                params[src] = nn.Parameter(t, requires_grad=False)
            mod._parameters[attr] = params[src]
        elif attr in mod._buffers:
            mod._buffers[attr] = t
        else:
            raise ArtifactError(f"{path}: {tname} is not a tensor of {cls.__name__}")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ArtifactError(f"{path}: no saved value for {len(left)} tensors of {cls.__name__} (e.g. {left[0]})")
    return model.eval()


def load_pipeline(
    path: Union[str, os.PathLike],
    compile: bool = True,
    dynamic: Optional[bool] = None,
    device: Optional[Union[str, torch.device]] = None,
    compile_options: Optional[dict] = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Rebuild a pipeline written by :func:`save_pipeline` (no calibration, no download).

    ``from_pretrained_kwargs`` go to ``DiffusionPipeline.from_pretrained`` for the
    unquantized components (e.g. ``torch_dtype``); quantized components keep the
    dtypes they were saved with. With ``compile`` the denoiser is wrapped in
    ``torch.compile(..., backend="svdquant")`` with the saved configuration
    (``compile_options`` override run-time fields, e.g. ``{"use_inductor": False}``).
    """
    from diffusers import DiffusionPipeline

    enable_peft_lora()
    root = Path(path)
    mpath = root / PIPELINE_MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root} is not a quantized pipeline (no {PIPELINE_MANIFEST}); "
                            "use DiffusionPipeline.from_pretrained for an ordinary pipeline")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e})") from None
    if manifest.get("format") != "svdq_compile_pipeline" or manifest.get("format_version") != PIPELINE_FORMAT_VERSION:
        raise ArtifactError(f"{root}: unknown pipeline format {manifest.get('format')!r} version "
                            f"{manifest.get('format_version')!r}; this svdq_compile reads version {PIPELINE_FORMAT_VERSION}")
    components = {n: _load_quantized_component(root, n) for n in manifest["quantized"]}
    pipe = DiffusionPipeline.from_pretrained(str(root), **components, **from_pretrained_kwargs)
    if device is not None:
        pipe.to(device)
    cfg = SVDQuantConfig.from_options(manifest["config"]) if manifest.get("config") else pipeline_config()
    pipe.svdq_config = cfg
    if compile:
        _compile(pipe, manifest.get("denoiser") or denoiser_name(pipe), cfg, dynamic, compile_options)
    return pipe
