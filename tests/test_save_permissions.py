"""Saved artifacts and pipelines get the permissions of a plain ``mkdir`` under the umask (issue 25).

The save is atomic (written beside the target, then renamed into place); the directory it
writes into used to come from ``tempfile.mkdtemp``, mode 0o700 whatever the umask, so a model
server running as another user could not read what ``svdq quantize --out DIR`` wrote. Now the
saved directory, every directory inside it and every file follow the umask like a hand-made
``mkdir`` / file: 0o777 and 0o666 less the umask.
"""
from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

import pytest
import torch

import svdq_compile
from svdq_compile.export.artifacts import staging_dir
from tests.export.export_helpers import int8_linear, packed_linear

UMASKS = [0o022, 0o027, 0o077]


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _assert_modes(root: Path, mask: int, executable: frozenset = frozenset()) -> int:
    """Every directory under ``root`` (itself included) is 0o777 & ~mask, every file 0o666 & ~mask
    (the ``executable`` ones 0o777 & ~mask); returns the number of files."""
    n = 0
    for dirpath, _, filenames in os.walk(root):
        assert stat.S_IMODE(os.stat(dirpath).st_mode) == 0o777 & ~mask, (dirpath, oct(mask))
        for f in filenames:
            p = os.path.join(dirpath, f)
            want = (0o777 if f in executable else 0o666) & ~mask
            assert stat.S_IMODE(os.stat(p).st_mode) == want, (p, oct(mask))
            n += 1
    return n


def _no_leftovers(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], list(parent.iterdir())


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_save_follows_umask(tmp_path, mask):
    model = torch.nn.Sequential(packed_linear(64, 64, seed=1), int8_linear(64, 64, seed=2)).eval()
    target = tmp_path / "new_parent" / "artifact"  # a missing parent is created like mkdir -p
    with _umask(mask):
        out = svdq_compile.save(model, target)
        assert _assert_modes(out, mask) == 2  # manifest.json + weights.safetensors
        assert stat.S_IMODE(os.stat(target.parent).st_mode) == 0o777 & ~mask
        out = svdq_compile.save(model, target)  # replacing an existing artifact: same modes
    assert _assert_modes(out, mask) == 2
    _no_leftovers(target.parent)
    svdq_compile.load(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)), out)


def test_staging_dir_is_a_plain_mkdir(tmp_path):
    with _umask(0o027):
        tmp = staging_dir(tmp_path / "x")
        ref = tmp_path / "by_hand"
        ref.mkdir()
    assert tmp.parent == tmp_path and tmp.name.startswith(".x.tmp") and not any(tmp.iterdir())
    assert stat.S_IMODE(os.stat(tmp).st_mode) == stat.S_IMODE(os.stat(ref).st_mode) == 0o750
    assert staging_dir(tmp_path / "x") != tmp  # a fresh name each time


@pytest.mark.parametrize("mask", UMASKS, ids=oct)
def test_private_files_written_inside_get_plain_modes(tmp_path, mask):
    """Writers that create files privately (transformers' save_pretrained: model.safetensors via a
    0o600 temporary file) or directories with mkdtemp: replace_dir gives them the plain modes."""
    from svdq_compile.export.artifacts import replace_dir

    with _umask(mask):
        tmp = staging_dir(tmp_path / "out")
        os.close(os.open(tmp / "private.bin", os.O_CREAT | os.O_WRONLY, 0o600))
        os.mkdir(tmp / "sub", 0o700)
        os.close(os.open(tmp / "sub" / "tool.sh", os.O_CREAT | os.O_WRONLY, 0o700))
        (tmp / "sub" / "plain.txt").write_text("x")
        replace_dir(tmp, tmp_path / "out")
    assert _assert_modes(tmp_path / "out", mask, executable={"tool.sh"}) == 3
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=oct)
def test_save_pipeline_follows_umask(tmp_path, mask):
    """save_pipeline (what `svdq quantize --out DIR` calls): the pipeline directory, each component's
    directory (written by diffusers / transformers / safetensors) and the quantized artifact."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers import DiffusionPipeline

    from svdq_compile.integrations.diffusers.pipelines import save_pipeline
    from svdq_compile.testing import tiny_pipelines as tp

    pipe = DiffusionPipeline.from_pretrained(str(tp.build("pixart_sigma", tmp_path / "fp")), local_files_only=True)
    # One linear swapped for a quantized one by hand (no calibration: the layout is under test here).
    name, lin = next((n, m) for n, m in pipe.transformer.named_modules()
                     if isinstance(m, torch.nn.Linear) and m.in_features % 64 == 0)
    pipe.transformer.set_submodule(name, packed_linear(lin.in_features, lin.out_features, bias=lin.bias is not None))
    with _umask(mask):
        out = save_pipeline(pipe, tmp_path / "q")
    assert _assert_modes(out, mask) > 5
    assert (out / "transformer").is_dir()
    _no_leftovers(tmp_path)
