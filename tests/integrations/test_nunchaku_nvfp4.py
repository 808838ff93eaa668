"""svdq-fp4 (NVFP4) checkpoints: deepcompressor's converter with ``float_point=True`` on our tiny
FLUX re-quantized to NVFP4 (e2m1 codes, e4m3 group-16 scales, fp16 channel scales), loaded and
run on the torch path (scheme ``nvfp4``; exactness of the layer itself: test_nunchaku_scheme.py)."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

import svdq_compile
from svdq_compile import NunchakuFormatError, SVDQLinear
from svdq_compile.quant.decompose import sqnr_db
from tests.integrations import nunchaku_fixtures as NF

# deepcompressor's local name of each diffusers linear (the FLUX converter's inputs)
_DC = {"ff.net.2": "ff.net.2.linear", "ff_context.net.2": "ff_context.net.2.linear"}


@pytest.fixture(scope="module")
def fp4(nunchaku_rt, tmp_path_factory):
    state: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        blocks, other = NF.convert(nunchaku_rt.ours, float_point=True, state_out=state)
    path = NF.write_merged(tmp_path_factory.mktemp("fp4") / "svdq-fp4_r4-tiny-flux.safetensors", blocks, other,
                           nunchaku_rt.config, precision="fp4")
    return path, state


def test_nvfp4_loads_exact_weights(nunchaku_rt, fp4, caplog):
    path, state = fp4
    with caplog.at_level(logging.WARNING, logger="svdq_compile.integrations.nunchaku.loader"):
        model = svdq_compile.load_nunchaku(None, path, dtype=torch.float32)
    assert "NVFP4 layers run on the torch path only" in caplog.text
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SVDQLinear)}
    n_fp4 = 0
    for name, m in layers.items():
        prefix, i, local = name.split(".", 2)
        if m.spec.act_bits == 16:
            continue
        n_fp4 += 1
        assert m.spec.mode == "w4a4-nvfp4" and m.spec.group_size == 16
        w = m.packed.dequantized_residual()
        if local == "proj_out":  # out_proj + mlp_fc2 (deepcompressor's ConcatLinear)
            want = torch.cat([state[f"{prefix}.{i}.proj_out.linears.0.weight"],
                              state[f"{prefix}.{i}.proj_out.linears.1.linear.weight"]], dim=1)
        else:
            want = state[f"{name}.weight"] if local not in _DC else state[f"{prefix}.{i}.{_DC[local]}.weight"]
        assert torch.equal(w.to(torch.float16), want), name  # e2m1 x e4m3 x channel scale, exact
    assert n_fp4 == 17


def test_nvfp4_pipeline(nunchaku_rt, fp4):
    path, _ = fp4
    rt = nunchaku_rt
    pipe, ours_t = rt.ours.pipe, rt.ours.pipe.transformer
    try:
        pipe.transformer = svdq_compile.load_nunchaku(None, path, dtype=torch.float32)
        with torch.no_grad():
            y = NF.run(pipe)
    finally:
        pipe.transformer = ours_t
    db = sqnr_db(rt.ours.ref, y)
    print(f"\nNVFP4 (our W4A4 residuals re-quantized to NVFP4) pipeline latents vs fp32: {db:.1f} dB")
    assert torch.isfinite(y).all() and db > 30
    with pytest.raises(NunchakuFormatError, match="NVFP4 checkpoints run in their own numerics only"):
        svdq_compile.load_nunchaku(None, path, mode="w4a8-fp8")
