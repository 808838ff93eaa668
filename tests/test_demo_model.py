"""Fast tests for the demo digits flow model (svdq_compile.demo); CPU only, < 30 s."""

from __future__ import annotations

import hashlib

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from svdq_compile.demo import classifier  # noqa: E402
from svdq_compile.demo.data import load_digits_split  # noqa: E402
from svdq_compile.demo.model import (  # noqa: E402
    CHECKPOINT_PATH,
    NULL_LABEL,
    DemoConfig,
    build_model,
    load_manifest,
    load_pretrained,
    patchify,
    unpatchify,
)
from svdq_compile.demo.sampler import initial_noise, sample  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Run this module single-threaded, restoring the setting afterwards.

    These models are tiny, so a second intra-op thread buys little, but on a
    busy shared CPU two OpenMP threads made the sampling test 10-15x slower
    (measured: 1 s vs 8-16 s) as soon as other processes competed for cores.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def random_model():
    """Untrained model: enough for shape and determinism checks."""
    return build_model(DemoConfig(), seed=0).eval()


@pytest.fixture(scope="module")
def pretrained():
    return load_pretrained()


def test_config_and_param_count(random_model) -> None:
    from diffusers import FluxTransformer2DModel

    assert isinstance(random_model.transformer, FluxTransformer2DModel)
    fc = random_model.transformer.config
    assert (fc.in_channels, fc.num_layers, fc.num_single_layers) == (4, 2, 4)
    assert (fc.num_attention_heads, fc.attention_head_dim, fc.joint_attention_dim) == (4, 32, 64)
    n = sum(p.numel() for p in random_model.parameters())
    assert 2.2e6 < n < 2.4e6, n  # ~2.29M


def test_build_model_is_seeded() -> None:
    a, b = build_model(seed=1), build_model(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_patchify_layout_and_roundtrip() -> None:
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    tok = patchify(x)  # [2, 16, 4]
    assert tok.shape == (2, 16, 4)
    # token r*4 + c holds the 2x2 patch at rows 2r..2r+1, cols 2c..2c+1, row-major.
    r, c = 2, 3
    assert torch.equal(tok[1, r * 4 + c], x[1, 0, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].reshape(4))
    assert torch.equal(unpatchify(tok), x)


def test_position_ids(random_model) -> None:
    ids = random_model.img_ids  # [16, 3] = (0, row, col)
    assert ids.shape == (16, 3)
    assert ids[4 * 2 + 3].tolist() == [0.0, 2.0, 3.0]
    assert torch.equal(random_model.txt_ids, torch.zeros(1, 3))
    # Derived from the config, so not part of the checkpoint.
    assert "img_ids" not in random_model.state_dict()


@torch.no_grad()
def test_forward_shapes(random_model) -> None:
    labels = torch.tensor([0, 7, NULL_LABEL])
    t = torch.tensor([0.0, 0.5, 1.0])
    img = torch.randn(3, 1, 8, 8)
    out_img = random_model(img, t, labels)
    out_tok = random_model(patchify(img), t, labels)
    assert out_img.shape == (3, 1, 8, 8) and out_tok.shape == (3, 16, 4)
    # Image and token entry points are the same function.
    torch.testing.assert_close(patchify(out_img), out_tok)


def test_sampler_is_deterministic(random_model) -> None:
    labels = torch.tensor([1, 2, 3])
    kw = dict(steps=3, guidance=1.5, progress=False)
    a = sample(random_model, labels, seed=5, **kw)
    b = sample(random_model, labels, seed=5, **kw)
    c = sample(random_model, labels, seed=6, **kw)
    assert a.shape == (3, 1, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The initial noise does not depend on the model or global RNG state.
    torch.manual_seed(123)
    assert torch.equal(initial_noise(3, seed=5), initial_noise(3, seed=5))


def test_sampler_batches_cfg_branches() -> None:
    """Each model call sees 2B rows: B unconditional (NULL_LABEL) then B conditional."""
    seen: list[torch.Tensor] = []

    def model_fn(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        assert x.shape == (4, 16, 4) and t.shape == (4,)
        seen.append(labels.clone())
        return torch.zeros_like(x)

    out = sample(model_fn, torch.tensor([3, 4]), steps=2, progress=False, seed=0)
    assert len(seen) == 2 and seen[0].tolist() == [NULL_LABEL, NULL_LABEL, 3, 4]
    # Zero velocity leaves the initial noise untouched.
    torch.testing.assert_close(patchify(out), initial_noise(2, seed=0))


def test_classifier_on_real_digits() -> None:
    split = load_digits_split()
    assert len(split.train_labels) + len(split.test_labels) == 1797
    assert split.train_images.min() >= -1 and split.train_images.max() <= 1
    # A held-out accuracy near 99% makes it a trustworthy judge of samples.
    assert classifier.heldout_accuracy() >= 0.97


def test_checkpoint_matches_manifest() -> None:
    manifest = load_manifest()
    blob = CHECKPOINT_PATH.read_bytes()
    assert len(blob) < 10_000_000
    assert hashlib.sha256(blob).hexdigest() == manifest["checkpoint_sha256"]
    assert manifest["config"] == DemoConfig().to_dict()


def test_pretrained_samples_are_recognisable(pretrained) -> None:
    labels = torch.arange(10).repeat(2)  # [20], two of each digit
    images = sample(pretrained, labels, steps=10, guidance=1.5, seed=0, progress=False)
    acc = classifier.accuracy(images, labels)
    # Threshold: the trained model scores ~97-99% at 20 steps on 500 samples
    # (see assets/digits_flow.json). With only 20 samples and a 10-step sampler
    # one or two misses are normal, while an untrained or broken model (wrong
    # weights, patch order, timestep scaling, guidance sign) scores ~10-30%.
    # 80% (<= 4 misses) separates the two with a wide margin; the noise seed is
    # fixed, so the result is deterministic on a given torch build.
    assert acc >= 0.8, acc
