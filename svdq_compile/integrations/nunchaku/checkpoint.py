"""Reading Nunchaku checkpoints: the legacy folder and the merged single file.

- Legacy folder (what deepcompressor's converter writes, Nunchaku's first releases):
  ``transformer_blocks.safetensors`` (quantized blocks, Nunchaku's fused names) +
  ``unquantized_layers.safetensors`` (embedders, final layers; diffusers names), and
  usually ``config.json`` (the diffusers config).
- Merged file (``nunchaku.merge_safetensors``, the current releases): one safetensors file
  with both state dicts and metadata ``config`` (diffusers config JSON), ``model_class``
  and ``quantization_config`` (``{"method": "svdquant", "weight": {"dtype": "int4" |
  "fp4_e2m1_all", "group_size": 64 | 16}, "rank": r}``).

Both give a :class:`Checkpoint`: every tensor under the legacy names (the renames of
``transformer_flux_v2.convert_flux_state_dict`` are undone), the parsed metadata and the
precision. Safetensors headers are read and checked here first, so a truncated file
names the first tensor whose bytes are missing instead of failing inside the reader.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from svdq_compile.integrations.nunchaku.names import TENSOR_RENAMES, V2_RENAMES

__all__ = ["Checkpoint", "NunchakuFormatError", "read_checkpoint", "BLOCKS_FILE", "UNQUANTIZED_FILE"]

BLOCKS_FILE = "transformer_blocks.safetensors"
UNQUANTIZED_FILE = "unquantized_layers.safetensors"
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
           "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class NunchakuFormatError(ValueError):
    """The file is not a (loadable) Nunchaku checkpoint; the message names the key or field."""


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, torch.Tensor]
    config: Optional[dict] = None
    model_class: Optional[str] = None
    quantization: dict = field(default_factory=dict)
    precision: str = "int4"  # "int4" | "nvfp4"
    merged: bool = False

    @property
    def group_size(self) -> int:
        return 16 if self.precision == "nvfp4" else 64

    @property
    def declared_rank(self) -> Optional[int]:
        r = self.quantization.get("rank")
        return int(r) if isinstance(r, (int, float)) else None


def _header(path: Path) -> tuple[dict, dict]:
    """(tensor entries, metadata) of a safetensors file, with every byte range checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise NunchakuFormatError(f"{path}: not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2 ** 20:
                raise NunchakuFormatError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise NunchakuFormatError(f"{path}: cannot read ({e})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NunchakuFormatError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise NunchakuFormatError(f"{path}: not a safetensors file (header is not an object)")
    meta = header.pop("__metadata__", None) or {}
    data = size - 8 - n
    for key, e in header.items():
        try:
            begin, end = (int(v) for v in e["data_offsets"])
            count = 1
            for d in e["shape"]:
                count *= int(d)
            width = _DTYPES.get(e["dtype"])
        except (KeyError, TypeError, ValueError):
            raise NunchakuFormatError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if end > data:
            raise NunchakuFormatError(f"{path}: tensor {key!r} is truncated (its bytes end at {end}, the file holds "
                                      f"{data}); the file was cut short")
        if width is not None and end - begin != count * width:
            raise NunchakuFormatError(f"{path}: tensor {key!r} has {end - begin} bytes for shape {e['shape']} "
                                      f"{e['dtype']}")
    return header, meta


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, meta = _header(path)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, RuntimeError) as e:
        raise NunchakuFormatError(f"{path}: cannot be read as safetensors ({e})") from None


def _legacy_name(key: str) -> str:
    for prefix, renames in V2_RENAMES.items():
        if key.startswith(prefix + "."):
            for old, new in renames:
                if old in key:
                    key = key.replace(old, new, 1)
                    break
            for old, new in TENSOR_RENAMES:
                if key.endswith(old):
                    key = key[: -len(old)] + new
                    break
            return key
    return key


def _looks_quantized(tensors: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(".qweight") for k in tensors) and any(k.endswith(".wscales") for k in tensors)


def _json_field(meta: dict, name: str, path: Path) -> Any:
    raw = meta.get(name)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise NunchakuFormatError(f"{path}: metadata field {name!r} is not valid JSON ({e})") from None


def _precision(tensors: dict[str, torch.Tensor], quant: dict, path: Path) -> str:
    has_fp8 = any(t.dtype in _FP8 for t in tensors.values())
    found = "nvfp4" if has_fp8 else "int4"
    w = quant.get("weight") if isinstance(quant.get("weight"), dict) else None
    if quant and quant.get("method", "svdquant") != "svdquant":
        raise NunchakuFormatError(f"{path}: quantization_config.method is {quant.get('method')!r}, not 'svdquant'")
    if w is not None:
        dtype = w.get("dtype")
        declared = {"int4": "int4", "fp4_e2m1_all": "nvfp4"}.get(dtype)
        if declared is None:
            raise NunchakuFormatError(f"{path}: quantization_config.weight.dtype {dtype!r} is not supported "
                                      "(expected 'int4' or 'fp4_e2m1_all')")
        if declared != found:
            raise NunchakuFormatError(f"{path}: quantization_config.weight.dtype is {dtype!r} but the tensors are "
                                      f"{'NVFP4 (fp8 scales)' if has_fp8 else 'INT4 (16-bit scales)'}")
        gs = w.get("group_size")
        want = 16 if found == "nvfp4" else 64
        if gs is not None and gs != want:
            raise NunchakuFormatError(f"{path}: quantization_config.weight.group_size is {gs}; {dtype} checkpoints "
                                      f"use groups of {want}")
    return found


def read_checkpoint(path: Union[str, os.PathLike]) -> Checkpoint:
    """Read a Nunchaku checkpoint (folder or merged file) into a :class:`Checkpoint`."""
    path = Path(path)
    if not path.exists():
        raise NunchakuFormatError(f"{path}: no such file or directory")
    config = model_class = None
    quant: dict = {}
    if path.is_dir():
        blocks, unq = path / BLOCKS_FILE, path / UNQUANTIZED_FILE
        missing = [p.name for p in (blocks, unq) if not p.is_file()]
        if missing:
            raise NunchakuFormatError(f"{path}: not a Nunchaku checkpoint folder (missing {', '.join(missing)})")
        tensors, _ = _load(unq)
        qt, _ = _load(blocks)
        overlap = sorted(set(tensors) & set(qt))
        if overlap:
            raise NunchakuFormatError(f"{path}: tensor {overlap[0]!r} is in both {BLOCKS_FILE} and {UNQUANTIZED_FILE}")
        tensors.update(qt)
        if not _looks_quantized(qt):
            raise NunchakuFormatError(f"{blocks}: not a Nunchaku checkpoint (no qweight / wscales tensors)")
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise NunchakuFormatError(f"{cfg}: not valid JSON ({e})") from None
        merged = False
    else:
        tensors, meta = _load(path)
        quant = _json_field(meta, "quantization_config", path) or {}
        if not isinstance(quant, dict):
            raise NunchakuFormatError(f"{path}: metadata field 'quantization_config' is not an object")
        config = _json_field(meta, "config", path)
        model_class = meta.get("model_class")
        if not quant and not _looks_quantized(tensors):
            raise NunchakuFormatError(f"{path}: not a Nunchaku checkpoint (no 'quantization_config' metadata and no "
                                      "qweight / wscales tensors)")
        if quant and not _looks_quantized(tensors):
            raise NunchakuFormatError(f"{path}: metadata says SVDQuant but the file has no qweight / wscales tensors")
        merged = True
    tensors = {_legacy_name(k): v for k, v in tensors.items()}
    precision = _precision(tensors, quant, path)
    if config is not None and not isinstance(config, dict):
        raise NunchakuFormatError(f"{path}: metadata field 'config' is not an object")
    return Checkpoint(path, tensors, config, model_class, quant, precision, merged)
