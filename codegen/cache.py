"""Specialisation cache: the tuned launch config of each (kernel spec, shape bucket, GPU).

Triton already caches compiled binaries on disk (keyed by source and constexprs), so
what is worth remembering here is the *choice* autotuning made: benchmarking every
candidate config costs seconds per new shape, and the answer does not change between
processes. Entries live in memory and in one JSON file per Triton version
(``$SVDQ_CACHE_DIR``, default ``~/.cache/svdq_compile``; ``SVDQ_CACHE_DIR=""``
keeps the cache in memory only). A corrupt or unwritable file only costs a re-tune.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

__all__ = ["TuneCache", "tune_cache", "make_key", "triton_version"]

log = logging.getLogger(__name__)


def triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except Exception:  # pragma: no cover - codegen is only used with triton present
        return "none"


def make_key(kind: str, spec_key: str, m_bucket: int, n: int, k: int, device_name: str) -> str:
    """Cache key: kernel kind, spec, M bucket, N, K and the GPU (configs are per chip)."""
    return f"{kind}|{spec_key}|m{m_bucket}|n{n}|k{k}|{device_name}"


def _default_dir() -> Optional[Path]:
    env = os.environ.get("SVDQ_CACHE_DIR")
    if env is not None:
        return Path(env) if env else None
    return Path.home() / ".cache" / "svdq_compile"


class TuneCache:
    """In-memory dict of tuned configs mirrored to a JSON file (best effort)."""

    def __init__(self, directory: Optional[Path]) -> None:
        self._lock = threading.Lock()
        self._mem: dict[str, dict[str, Any]] = {}
        self._path = None if directory is None else directory / f"autotune_triton-{triton_version()}.json"
        self._loaded = False

    @property
    def path(self) -> Optional[Path]:
        return self._path

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self._path is None or not self._path.is_file():
            return
        try:
            data = json.loads(self._path.read_text())
            if isinstance(data, dict):
                # Entries set in this process win over the file's.
                self._mem = {**{k: v for k, v in data.items() if isinstance(v, dict)}, **self._mem}
        except (OSError, ValueError) as e:
            log.debug("ignoring unreadable autotune cache %s: %s", self._path, e)

    def get(self, key: str) -> Optional[dict[str, Any]]:
        with self._lock:
            self._load()
            return self._mem.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        with self._lock:
            self._load()
            self._mem[key] = value
            if self._path is None:
                return
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                # Atomic replace so concurrent processes never read half a file.
                fd, tmp = tempfile.mkstemp(dir=self._path.parent, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(self._mem, f, indent=1, sort_keys=True)
                os.replace(tmp, self._path)
            except OSError as e:
                log.debug("could not write autotune cache %s: %s", self._path, e)

    def entries(self) -> dict[str, dict[str, Any]]:
        """A copy of every entry (for reports)."""
        with self._lock:
            self._load()
            return dict(self._mem)

    def clear(self) -> None:
        """Forget the in-memory entries (the file is left alone)."""
        with self._lock:
            self._mem.clear()
            self._loaded = True


_CACHE: Optional[TuneCache] = None
_CACHE_GUARD = threading.Lock()


def tune_cache() -> TuneCache:
    """The process-wide cache (created on first use so SVDQ_CACHE_DIR can be set late)."""
    global _CACHE
    if _CACHE is None:
        with _CACHE_GUARD:  # two first callers must share one cache, not each make one
            if _CACHE is None:
                _CACHE = TuneCache(_default_dir())
    return _CACHE
