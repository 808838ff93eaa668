"""save/load artifacts: bit-identical round trip in a fresh process, and clear errors."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import svdq_compile as sq
from svdq_compile.export import artifacts
from svdq_compile.testing.models import AttnMLPBlock

CFG = sq.SVDQuantConfig(search_grid=4)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    m = AttnMLPBlock()
    x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(5))
    sq.quantize(m, [x], [torch.randn(3, 16, 256, generator=torch.Generator().manual_seed(6))], CFG, progress=False)
    path = tmp_path_factory.mktemp("art") / "block"
    sq.save(m, path, config=CFG)
    return path, x, m(x)


def test_fresh_process_bit_identical(artifact, tmp_path):
    path, x, y = artifact
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    code = textwrap.dedent(f"""
        import sys, torch
        import svdq_compile as sq
        from svdq_compile.testing.models import AttnMLPBlock
        io = torch.load({str(tmp_path / 'io.pt')!r})
        m = AttnMLPBlock()  # the user's original model: float layers (norms, head) come from it
        for name in ("q", "k", "v", "out", "fc1", "fc2"):  # quantized layers must come from the file
            getattr(m, name).weight.data.zero_()
        sq.load(m, {str(path)!r})
        assert sq.stats_of is not None and not any(hasattr(p, "_svdq_stats") for p in m.parameters())
        y = m(io["x"])
        print("EQUAL" if torch.equal(y, io["y"]) else "DIFF")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("EQUAL")


def test_manifest_contents(artifact):
    path, _, _ = artifact
    man = json.loads((path / "manifest.json").read_text())
    assert man["format_version"] == artifacts.FORMAT_VERSION
    assert man["config"]["rank"] == 32
    layer = man["layers"]["q"]
    assert set(layer["keys"]) >= {"qweight", "wscales", "smooth", "lora_down", "lora_up", "bias"}
    assert layer["spec"]["in_features"] == 256 and layer["alpha"] is not None


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_truncated_file(artifact, tmp_path):
    p = _copy(artifact[0], tmp_path / "a")
    w = p / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(sq.ArtifactError, match="truncated|cannot be read"):
        sq.load(AttnMLPBlock(), p)


def test_unknown_version(artifact, tmp_path):
    p = _copy(artifact[0], tmp_path / "a")
    man = json.loads((p / "manifest.json").read_text())
    man["format_version"] = 99
    (p / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(sq.ArtifactError, match="unknown artifact format version 99"):
        sq.load(AttnMLPBlock(), p)


def test_tampered_tensor(artifact, tmp_path):
    from safetensors.torch import load_file, save_file
    p = _copy(artifact[0], tmp_path / "a")
    t = load_file(str(p / "weights.safetensors"))
    t["q.qweight"][0, 0] ^= 1
    save_file(t, str(p / "weights.safetensors"), metadata={"format": "svdq_compile"})
    with pytest.raises(sq.ArtifactError, match="checksum mismatch for q.qweight"):
        sq.load(AttnMLPBlock(), p)


def test_mismatched_model(artifact):
    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(128, 256)

    with pytest.raises(sq.ArtifactError, match="layer q is \\[256, 128\\] in the model"):
        sq.load(Other(), artifact[0], strict=False)
    with pytest.raises(sq.ArtifactError, match="no module named"):
        sq.load(Other(), artifact[0])


def test_not_an_artifact(tmp_path):
    with pytest.raises(sq.ArtifactError, match="not an svdq_compile artifact"):
        sq.load(AttnMLPBlock(), tmp_path)


def test_interrupted_save_keeps_old_artifact(artifact, tmp_path, monkeypatch):
    p = _copy(artifact[0], tmp_path / "a")
    before = (p / "weights.safetensors").read_bytes()
    m = AttnMLPBlock()
    sq.load(m, p)
    def boom(tensors, path, metadata):
        path.write_bytes(b"half a file")  # a crash after writing part of the new artifact
        raise KeyboardInterrupt("simulated crash mid-save")

    monkeypatch.setattr(artifacts, "write_safetensors", boom)
    with pytest.raises(KeyboardInterrupt):
        sq.save(m, p)
    assert (p / "weights.safetensors").read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".a.tmp")]


def test_deterministic_artifacts(tmp_path):
    outs = []
    for i in range(2):
        m = AttnMLPBlock()
        x = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(5))
        sq.quantize(m, [x], [x], CFG, progress=False)
        outs.append(sq.save(m, tmp_path / f"r{i}") / "weights.safetensors")
    assert outs[0].read_bytes() == outs[1].read_bytes()
