"""Quantized artifacts: safetensors + JSON manifest, so nobody calibrates twice.

Layout of an artifact directory::

    manifest.json       format version, config, per-layer spec/alpha/beta/rank/shapes,
                        sha256 of every tensor
    weights.safetensors "<layer>.qweight", ".wscales", ".smooth", ".lora_down",
                        ".lora_up", ".bias" (Nunchaku's key names)

Loading never executes code from the files (safetensors + JSON, no pickle). Saving
writes a temporary directory and renames it into place, so an interrupted save never
leaves a half-written artifact where a good one was; the directory and its files get the
permissions of a plain ``mkdir`` / file under the umask (:func:`staging_dir`, :func:`plain_modes`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from svdq_compile.quant.modules import SVDQLinear
from svdq_compile.runtime.packed import LinearSpec, PackedLinear

__all__ = ["save", "load", "ArtifactError", "FORMAT_VERSION", "collect_packed", "staging_dir", "plain_modes",
           "replace_dir"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class ArtifactError(ValueError):
    """A quantized artifact is corrupted, of an unknown version, or does not fit the model."""


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()).hexdigest()


def collect_packed(model: nn.Module) -> dict[str, PackedLinear]:
    """Quantized layers of a model: SVDQLinear modules, or linears the backend quantized."""
    out: dict[str, PackedLinear] = {}
    for name, m in model.named_modules():
        if isinstance(m, SVDQLinear):
            out[name] = m.packed
        elif isinstance(m, nn.Linear) and getattr(m.weight, "_svdq_packed", None) is not None:
            out[name] = m.weight._svdq_packed
    return out


_ST_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a standard safetensors file with a sorted header and data in name order.

    The safetensors library's writer orders its JSON header through a hash map, so the same
    tensors can give different bytes; sorting makes artifacts byte-for-byte reproducible.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        data = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for data in blobs:
            f.write(data)


def staging_dir(path: Path) -> Path:
    """A new empty directory beside ``path`` to write a save into before :func:`replace_dir`.

    Created with ``os.mkdir(name, 0o777)``, so it gets what a plain ``mkdir`` gives under the
    caller's umask (and the parent's default ACLs), not ``tempfile.mkdtemp``'s 0o700: the
    directory renamed into place is readable by whoever could read one made by hand (e.g. a
    model server running as another user). The umask is never read or changed (changing it
    is process-wide and races with other threads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.parent / f".{path.name}.tmp{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")  # pragma: no cover


def plain_modes(tmp: Path) -> None:
    """Give every directory and file under ``tmp`` (a :func:`staging_dir`) the mode of a plain
    ``mkdir`` / new file under the umask.

    Writers we call may create files privately: transformers' ``save_pretrained`` writes
    ``model.safetensors`` through a 0o600 temporary file. The plain modes are taken by example,
    ``tmp`` itself for directories and a probe file created with 0o666 for files, so the
    umask is never read or changed. Files with an execute bit get the directory mode."""
    dir_mode = stat.S_IMODE(os.stat(tmp).st_mode)
    probe = tmp / ".svdq_mode_probe"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        file_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.unlink(probe)
    for root, dirs, files in os.walk(tmp):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            want = dir_mode if stat.S_ISDIR(st.st_mode) or st.st_mode & 0o111 else file_mode
            if stat.S_IMODE(st.st_mode) != want:
                os.chmod(p, want)


def replace_dir(tmp: Path, path: Path) -> None:
    """Move the fully written directory ``tmp`` (a :func:`staging_dir`) to ``path``, replacing
    what was there, after :func:`plain_modes`.

    Each step is a rename, so ``path`` always holds either the old or the new complete
    directory, never a half-written one.
    """
    plain_modes(tmp)
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def save(model: nn.Module, path: Union[str, os.PathLike], config: Optional[Any] = None) -> Path:
    """Write the model's quantized layers to the directory ``path`` (atomically)."""
    packed = collect_packed(model)
    if not packed:
        raise ValueError("svdq_compile.save: the model has no quantized layers; run quantize() or "
                         "torch.compile(model, backend='svdquant') and one forward call first")
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, p in sorted(packed.items()):
        entry = {"spec": dict(p.spec.__dict__), "keys": [], "sha256": {}}
        for key, t in p.tensors().items():
            full = f"{name}.{key}"
            tensors[full] = t.detach().cpu().clone()  # siblings share smooth: own copies
            entry["keys"].append(key)
            entry["sha256"][key] = _sha256(tensors[full])
        entry["alpha"] = p.meta.get("alpha")
        entry["beta"] = p.meta.get("beta")
        entry["sqnr_db"] = p.meta.get("sqnr_db")
        entry["mode_reason"] = p.meta.get("mode_reason")
        layers[name] = entry
    manifest = {
        "format": "svdq_compile",
        "format_version": FORMAT_VERSION,
        "config": config.to_dict() if hasattr(config, "to_dict") else config,
        "torch_version": torch.__version__,
        "layers": layers,
    }
    tmp = staging_dir(path)
    try:
        write_safetensors(tensors, tmp / WEIGHTS, {"format": "svdq_compile", "format_version": str(FORMAT_VERSION)})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %d quantized layers to %s", len(layers), path)
    return path


def read_artifact(path: Union[str, os.PathLike], verify: bool = True) -> tuple[dict, dict[str, PackedLinear]]:
    """(manifest, {layer name: PackedLinear}) with every check applied."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    mpath, wpath = path / MANIFEST, path / WEIGHTS
    if not mpath.is_file() or not wpath.is_file():
        raise ArtifactError(f"{path} is not an svdq_compile artifact (needs {MANIFEST} and {WEIGHTS})")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"corrupted artifact {path}: {MANIFEST} is not valid JSON ({e})") from None
    if manifest.get("format") != "svdq_compile":
        raise ArtifactError(f"{path}: not an svdq_compile artifact (format={manifest.get('format')!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: unknown artifact format version {version!r}; this svdq_compile reads version {FORMAT_VERSION}"
        )
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"corrupted artifact {path}: {WEIGHTS} cannot be read ({e}); it may be truncated") from None
    out: dict[str, PackedLinear] = {}
    for name, entry in manifest["layers"].items():
        try:
            spec = LinearSpec(**entry["spec"])
            parts = {k: tensors[f"{name}.{k}"] for k in entry["keys"]}
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"corrupted artifact {path}: layer {name} is incomplete ({e})") from None
        if verify:
            for k, t in parts.items():
                if _sha256(t) != entry["sha256"][k]:
                    raise ArtifactError(f"corrupted artifact {path}: checksum mismatch for {name}.{k} (tampered or damaged)")
        try:
            meta = {k: entry.get(k) for k in ("alpha", "beta", "sqnr_db", "mode_reason") if entry.get(k) is not None}
            out[name] = PackedLinear(spec=spec, meta=meta, **parts)
        except ValueError as e:
            raise ArtifactError(f"corrupted artifact {path}: layer {name}: {e}") from None
    return manifest, out


def load(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Swap the model's linears for the saved quantized layers (no calibration)."""
    _, packed = read_artifact(path)
    modules = dict(model.named_modules())
    missing = [n for n in packed if n not in modules]
    if missing and strict:
        raise ArtifactError(f"artifact {path} does not match the model: no module named {missing[0]!r} "
                            f"({len(missing)} layers missing)")
    for name, p in packed.items():
        m = modules.get(name)
        if m is None:
            continue
        if isinstance(m, nn.Linear):
            shape = (m.out_features, m.in_features)
            device = m.weight.device
        elif isinstance(m, SVDQLinear):
            shape = (m.out_features, m.in_features)
            device = m.qweight.device
        else:
            raise ArtifactError(f"artifact {path} does not match the model: {name} is a {type(m).__name__}, not a Linear")
        if shape != (p.spec.out_features, p.spec.in_features):
            raise ArtifactError(
                f"artifact {path} does not match the model: layer {name} is {list(shape)} in the model "
                f"but [{p.spec.out_features}, {p.spec.in_features}] in the artifact"
            )
        model.set_submodule(name, SVDQLinear(p.to(device), name))
    log.info("loaded %d quantized layers from %s", len(packed), path)
    return model
