import os
from dataclasses import dataclass
from pathlib import Path

# Everything is local: never reach the Hugging Face Hub (read by huggingface_hub at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import pytest


@dataclass
class RoundTrip:
    ours: object  # nunchaku_fixtures.Ours
    legacy: Path  # deepcompressor's folder
    merged: Path  # the merged single file
    blocks: dict  # converted transformer_blocks tensors
    other: dict  # unquantized tensors
    config: dict


@pytest.fixture(scope="session")
def nunchaku_rt(tmp_path_factory) -> RoundTrip:
    """Our W4A4 tiny FLUX -> deepcompressor's converter -> legacy folder + merged file (built once)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("deepcompressor.backend.nunchaku.convert")
    import warnings

    from svdq_compile.testing import tiny_pipelines as tp
    from tests.integrations import nunchaku_fixtures as F

    root = tmp_path_factory.mktemp("nunchaku")
    fp = tp.build("flux", root / "fp")
    ours = F.quantize_ours(fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcompressor's pad() indexes with a list (torch deprecation)
        blocks, other = F.convert(ours)
    config = F.transformer_config(ours)
    legacy = F.write_legacy(root / "legacy", blocks, other, config)
    merged = F.write_merged(root / "svdq-int4_r4-tiny-flux.safetensors", blocks, other, config)
    return RoundTrip(ours, legacy, merged, blocks, other, config)
