"""Bad Nunchaku checkpoints: each raises NunchakuFormatError naming the key or field, and a
failed load leaves the model exactly as it was (nothing half-installed)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import svdq_compile
from svdq_compile import NunchakuFormatError, SVDQLinear
from tests.integrations import nunchaku_fixtures as NF


def _merged(rt, tmp_path, name="bad.safetensors", blocks=None, other=None, **meta):
    path = tmp_path / name
    NF.write_merged(path, dict(rt.blocks if blocks is None else blocks), dict(rt.other if other is None else other),
                    rt.config)
    if meta:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            md = dict(f.metadata())
        md.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
        save_file(load_file(str(path)), str(path), metadata=md)
    return path


def _fresh_model(rt):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel.from_config({k: v for k, v in rt.config.items() if not k.startswith("_")}).eval()


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: type(m) for n, m in model.named_modules()})


def _unchanged(model, snap):
    state, types = snap
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(isinstance(m, SVDQLinear) for m in model.modules())


def test_not_a_checkpoint(nunchaku_rt, tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, str(plain))
    with pytest.raises(NunchakuFormatError, match="not a Nunchaku checkpoint"):
        svdq_compile.load_nunchaku(None, plain)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a safetensors file at all")
    with pytest.raises(NunchakuFormatError, match="not a safetensors file"):
        svdq_compile.load_nunchaku(None, text)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(nunchaku_rt.legacy / "unquantized_layers.safetensors", folder)
    with pytest.raises(NunchakuFormatError, match="missing transformer_blocks.safetensors"):
        svdq_compile.load_nunchaku(None, folder)
    bad = _merged(nunchaku_rt, tmp_path, "awq.safetensors", quantization_config={"method": "awq", "rank": 16})
    with pytest.raises(NunchakuFormatError, match="quantization_config.method"):
        svdq_compile.load_nunchaku(None, bad)


def test_truncated_tensor(nunchaku_rt, tmp_path):
    path = _merged(nunchaku_rt, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with open(path, "rb") as f:  # the last tensor in the file is the one cut short
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"][1])
    model = _fresh_model(nunchaku_rt)
    snap = _snapshot(model)
    with pytest.raises(NunchakuFormatError, match=f"tensor '{last}' is truncated"):
        svdq_compile.load_nunchaku(model, path)
    _unchanged(model, snap)


def test_rank_mismatch(nunchaku_rt, tmp_path):
    blocks = dict(nunchaku_rt.blocks)
    key = "single_transformer_blocks.0.qkv_proj.lora_up"
    blocks[key] = torch.cat([blocks[key], torch.zeros_like(blocks[key])], dim=1)  # rank 16 -> 32
    path = _merged(nunchaku_rt, tmp_path, blocks=blocks)
    model = _fresh_model(nunchaku_rt)
    snap = _snapshot(model)
    with pytest.raises(NunchakuFormatError, match="single_transformer_blocks.0.qkv_proj: rank mismatch"):
        svdq_compile.load_nunchaku(model, path)
    _unchanged(model, snap)
    declared = _merged(nunchaku_rt, tmp_path, "r32.safetensors",
                       quantization_config={"method": "svdquant", "weight": {"dtype": "int4", "group_size": 64},
                                            "rank": 32})
    with pytest.raises(NunchakuFormatError, match=r"lora_down has rank 16 but quantization_config.rank is 32"):
        svdq_compile.load_nunchaku(None, declared)


def test_group_size_mismatch(nunchaku_rt, tmp_path):
    declared = _merged(nunchaku_rt, tmp_path, "g128.safetensors",
                       quantization_config={"method": "svdquant", "weight": {"dtype": "int4", "group_size": 128},
                                            "rank": 16})
    with pytest.raises(NunchakuFormatError, match="quantization_config.weight.group_size is 128"):
        svdq_compile.load_nunchaku(None, declared)
    blocks = dict(nunchaku_rt.blocks)
    key = "transformer_blocks.0.mlp_fc1.wscales"  # group 128 scales: half the groups
    blocks[key] = blocks[key][: blocks[key].shape[0] // 2].contiguous()
    path = _merged(nunchaku_rt, tmp_path, blocks=blocks)
    with pytest.raises(NunchakuFormatError, match=f"{key}: .*elements, the layout needs"):
        svdq_compile.load_nunchaku(None, path)


def test_shape_mismatch(nunchaku_rt, tmp_path):
    from diffusers import FluxTransformer2DModel

    cfg = {k: v for k, v in nunchaku_rt.config.items() if not k.startswith("_")}
    cfg["attention_head_dim"] = 16  # 64-wide model, 128-wide checkpoint
    cfg["axes_dims_rope"] = (4, 6, 6)
    with torch.device("meta"):
        small = FluxTransformer2DModel.from_config(cfg)
    with pytest.raises(NunchakuFormatError, match=r"transformer_blocks.0.norm1.linear.qweight"):
        svdq_compile.load_nunchaku(small, nunchaku_rt.merged)
    cfg = {k: v for k, v in nunchaku_rt.config.items() if not k.startswith("_")}
    cfg["num_layers"] = 0  # fewer blocks than the checkpoint
    with torch.device("meta"):
        fewer = FluxTransformer2DModel.from_config(cfg)
    with pytest.raises(NunchakuFormatError, match=r"has transformer_blocks.0 but the model has 0"):
        svdq_compile.load_nunchaku(fewer, nunchaku_rt.merged)


def test_architecture_not_in_table(nunchaku_rt, tmp_path):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        sd3 = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=32,
                                    num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=64,
                                    pooled_projection_dim=32, out_channels=4)
    with pytest.raises(NunchakuFormatError, match="architecture SD3Transformer2DModel is not in the Nunchaku name-map"):
        svdq_compile.load_nunchaku(sd3, nunchaku_rt.merged)
    sana = _merged(nunchaku_rt, tmp_path, "sana.safetensors", model_class="NunchakuSanaTransformer2DModel")
    with pytest.raises(NunchakuFormatError, match="model_class 'NunchakuSanaTransformer2DModel' is not in the"):
        svdq_compile.load_nunchaku(_fresh_model(nunchaku_rt), sana)


def test_failure_late_in_the_plan_leaves_model_unchanged(nunchaku_rt, tmp_path):
    """The last layer the plan reaches is broken: every layer before it was built, none installed."""
    blocks = dict(nunchaku_rt.blocks)
    key = "single_transformer_blocks.0.mlp_fc2.qweight"
    blocks[key] = blocks[key][:-1].contiguous()
    path = _merged(nunchaku_rt, tmp_path, blocks=blocks)
    model = _fresh_model(nunchaku_rt)
    snap = _snapshot(model)
    with pytest.raises(NunchakuFormatError, match=key):
        svdq_compile.load_nunchaku(model, path)
    _unchanged(model, snap)
    other = dict(nunchaku_rt.other)
    other["x_embedder.weight"] = other["x_embedder.weight"][:, :-1].contiguous()
    path = _merged(nunchaku_rt, tmp_path, "embed.safetensors", other=other)
    with pytest.raises(NunchakuFormatError, match="'x_embedder.weight' is"):
        svdq_compile.load_nunchaku(model, path)
    _unchanged(model, snap)
