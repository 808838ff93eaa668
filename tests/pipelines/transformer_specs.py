"""Tiny configurations and inputs of every transformer class diffusers exports.

One entry per class: the constructor arguments (one or two blocks, widths of 16-64) and a
function building the forward's keyword arguments from a seeded ``randn``. Shapes follow
each model's own conventions (video models take [B, C, F, H, W], packed-token models take
[B, tokens, channels] plus their id/position tensors); token counts are a few dozen, so a
forward is milliseconds and the cost of a case is Dynamo's trace.

Classes whose fp32 forward cannot run on a CPU, or that need inputs no test can build
without their pipeline, are in ``NOT_RUN`` with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Spec", "SPECS", "NOT_RUN", "build"]


@dataclass(frozen=True)
class Spec:
    init: dict  # constructor arguments
    inputs: Callable[["_Rand"], dict]  # forward keyword arguments from a seeded factory


class _Rand:
    """Seeded input factory: ``r(2, 3)`` normal, ``r.t(b)`` integer timesteps."""

    def __init__(self, seed: int = 0) -> None:
        self.g = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)

    def t(self, b: int = 1) -> torch.Tensor:
        return torch.randint(100, 900, (b,), generator=self.g)


def _flux_ids(n_img: int, n_txt: int, axes: int = 3) -> dict:
    return {"img_ids": torch.zeros(n_img, axes), "txt_ids": torch.zeros(n_txt, axes)}


def _flux2_ids(h: int, w: int, n_txt: int) -> dict:
    img = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))[None]
    txt = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(n_txt))[None]
    return {"img_ids": img, "txt_ids": txt}


def _wan(**extra) -> dict:
    """Wan-family constructor arguments; ``name=None`` drops an argument the variant lacks."""
    d = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4,
         "out_channels": 4, "text_dim": 32, "freq_dim": 32, "ffn_dim": 64, "num_layers": 1,
         "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32, **extra}
    return {k: v for k, v in d.items() if v is not None}


def _ideogram4_inputs(r: _Rand, text: int = 4, img: int = 4) -> dict:
    from diffusers.models.transformers.transformer_ideogram4 import (IMAGE_POSITION_OFFSET, LLM_TOKEN_INDICATOR,
                                                                     OUTPUT_IMAGE_INDICATOR)

    n = text + img
    hidden = torch.zeros(1, n, 16)
    hidden[:, text:] = r(1, img, 16)
    enc = torch.zeros(1, n, 32)
    enc[:, :text] = r(1, text, 32)
    pos = torch.zeros(1, n, 3, dtype=torch.long)
    pos[:, :text] = torch.arange(text)[:, None]
    pos[:, text:, 0] = IMAGE_POSITION_OFFSET
    pos[:, text:, 1] = torch.tensor([0, 0, 1, 1]) + IMAGE_POSITION_OFFSET
    pos[:, text:, 2] = torch.tensor([0, 1, 0, 1]) + IMAGE_POSITION_OFFSET
    indicator = torch.full((1, n), OUTPUT_IMAGE_INDICATOR)
    indicator[:, :text] = LLM_TOKEN_INDICATOR
    return {"hidden_states": hidden, "encoder_hidden_states": enc, "timestep": torch.tensor([0.5]),
            "position_ids": pos, "segment_ids": torch.ones(1, n, dtype=torch.long), "indicator": indicator}


def _minimax_h3_inputs(r: _Rand, text: int = 4, audio: int = 6, video: int = 8) -> dict:
    n = text + audio + video
    ti, ai, vi = torch.arange(text), torch.arange(text, text + audio), torch.arange(text + audio, n)
    tags = torch.zeros(n, dtype=torch.long)  # 0 video, 1 text, 2 audio
    tags[ti], tags[ai] = 1, 2
    t_idx = torch.zeros(n, dtype=torch.long)
    t_idx[ai] = 1  # audio rows read their own timestep
    pos = torch.zeros(n, 3)
    pos[:, 0] = torch.arange(n, dtype=torch.float32)
    pos[vi, 1] = torch.arange(video, dtype=torch.float32) % 4
    pos[vi, 2] = torch.arange(video, dtype=torch.float32) % 2
    return {"hidden_states": r(1, video, 16), "audio_hidden_states": r(1, audio, 8),
            "encoder_hidden_states": r(1, text, 16), "timestep": torch.tensor([0.7, 0.3]), "timestep_indices": t_idx,
            "token_tags": tags, "position_ids": pos, "video_indices": vi, "audio_indices": ai, "text_indices": ti}


def _sana_wm_inputs(r: _Rand, frames: int = 2, hw: int = 4) -> dict:
    c2w = torch.eye(4).repeat(1, frames, 1, 1)
    c2w[..., 2, 3] = torch.arange(frames, dtype=torch.float32) * 0.1  # camera moving forward
    intr = torch.tensor([float(hw), float(hw), hw / 2, hw / 2]).expand(1, frames, 4)
    return {"hidden_states": r(1, 4, frames, hw, hw), "timestep": torch.full((1, 1, frames), 500.0),
            "encoder_hidden_states": r(1, 1, 8, 16), "encoder_attention_mask": torch.ones(1, 8, dtype=torch.long),
            "camera_conditions": torch.cat([c2w.flatten(-2), intr], -1), "chunk_plucker": r(1, 8, frames, hw, hw)}


def _sana_wm_refiner_inputs(r: _Rand) -> dict:
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMLTX2AudioVideoRotaryPosEmbed

    rope = SanaWMLTX2AudioVideoRotaryPosEmbed(dim=32, patch_size=1, patch_size_t=1, base_num_frames=20,
                                              base_height=2048, base_width=2048, scale_factors=(8, 32, 32),
                                              modality="video", double_precision=False, num_attention_heads=2)
    coords = rope.prepare_video_coords(1, 2, 4, 4, device=torch.device("cpu"), fps=24.0)
    return {"hidden_states": r(1, 32, 4), "encoder_hidden_states": r(1, 8, 16),
            "timestep": torch.full((1, 32), 500.0), "video_rotary_emb": rope(coords, device=torch.device("cpu")),
            "encoder_attention_mask": torch.ones(1, 8)}


def _wan_animate2_inputs(r: _Rand) -> dict:
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    return {"hidden_states": [r(16, 2, 4, 4)], "timestep": torch.tensor([1.0]), "encoder_hidden_states": [r(8, 32)],
            "condition_latents": [r(20, 2, 4, 4)], "encoder_hidden_states_image": r(1, 4, 1280),
            "kv_cache": WanAnimate2KVCache(1), "kv_cache_mode": "extract", "seq_len": 2 * 4,
            "offset_grid_sizes": torch.tensor([[2, 2, 2]])}


def _wan_inputs(r: _Rand, c: int = 4, text: int = 32) -> dict:
    return {"hidden_states": r(1, c, 2, 8, 8), "encoder_hidden_states": r(1, 8, text), "timestep": r.t()}


SPECS: dict[str, Spec] = {
    "AceStepTransformer1DModel": Spec(
        {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "in_channels": 24, "audio_acoustic_hidden_dim": 8,
         "patch_size": 2, "rope_theta": 10000.0, "sliding_window": 16},
        lambda r: {"hidden_states": r(1, 8, 8), "timestep": r(1).abs(), "timestep_r": r(1).abs(),
                   "encoder_hidden_states": r(1, 10, 32), "context_latents": r(1, 8, 16)}),
    "AllegroTransformer3DModel": Spec(
        {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4, "num_layers": 1,
         "cross_attention_dim": 32, "sample_width": 8, "sample_height": 8, "sample_frames": 8,
         "caption_channels": 16},
        lambda r: {"hidden_states": r(1, 4, 2, 8, 8), "encoder_hidden_states": r(1, 8, 16), "timestep": r.t()}),
    "AnyFlowTransformer3DModel": Spec(
        {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
         "out_channels": 4, "text_dim": 16, "freq_dim": 32, "ffn_dim": 48, "num_layers": 1, "rope_max_seq_len": 32},
        lambda r: {"hidden_states": r(1, 2, 4, 8, 8), "timestep": torch.full((1, 2), 500.0),
                   "r_timestep": torch.full((1, 2), 250.0), "encoder_hidden_states": r(1, 8, 16)}),
    "AnyFlowFARTransformer3DModel": Spec(
        {"patch_size": (1, 2, 2), "compressed_patch_size": (1, 4, 4), "full_chunk_limit": 3,
         "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4, "out_channels": 4, "text_dim": 16,
         "freq_dim": 32, "ffn_dim": 48, "num_layers": 1, "rope_max_seq_len": 32},
        lambda r: {"hidden_states": r(1, 4, 4, 8, 8), "timestep": torch.full((1, 4), 500.0),
                   "r_timestep": torch.full((1, 4), 250.0), "encoder_hidden_states": r(1, 8, 16),
                   "chunk_partition": [2, 2]}),
    "AuraFlowTransformer2DModel": Spec(
        {"sample_size": 16, "patch_size": 2, "in_channels": 4, "num_mmdit_layers": 1, "num_single_dit_layers": 1,
         "attention_head_dim": 16, "num_attention_heads": 2, "caption_projection_dim": 32,
         "joint_attention_dim": 32, "out_channels": 4, "pos_embed_max_size": 64},
        lambda r: {"hidden_states": r(1, 4, 16, 16), "encoder_hidden_states": r(1, 8, 32), "timestep": r.t()}),
    "BriaTransformer2DModel": Spec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": None,
         "axes_dims_rope": [0, 8, 8]},
        lambda r: {"hidden_states": r(1, 16, 4), "encoder_hidden_states": r(1, 8, 32), **_flux_ids(16, 8),
                   "timestep": torch.tensor([1.0])}),
    "BriaFiboTransformer2DModel": Spec(
        {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 64, "text_encoder_dim": 32,
         "pooled_projection_dim": None, "axes_dims_rope": [0, 8, 8]},
        lambda r: (lambda e: {"hidden_states": r(1, 16, 16), "encoder_hidden_states": e, **_flux_ids(16, 8),
                              "timestep": torch.tensor([1.0]), "text_encoder_layers": [e[..., :32], e[..., 32:]]}
                   )(r(1, 8, 64))),
    "BriaFibo2Transformer2DModel": Spec(
        {"in_channels": 4, "patch_size": 2, "dim": 32, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2,
         "cap_feat_dim": 32, "injection_layer_ids": (0,), "perceiver_num_layers": 1, "min_num_gist_tokens": 4,
         "max_num_gist_tokens": 8, "gist_step": 4, "gist_min_text_len": 4, "gist_max_text_len": 16,
         "axes_dims": (4, 6, 6), "axes_lens": (64, 32, 32)},
        lambda r: {"hidden_states": r(1, 4, 8, 8), "timestep": torch.tensor([0.5]),
                   "encoder_hidden_states": r(1, 2, 8, 32)}),
    "ChromaTransformer2DModel": Spec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": [4, 4, 8],
         "approximator_num_channels": 8, "approximator_hidden_dim": 32, "approximator_layers": 1},
        lambda r: {"hidden_states": r(1, 16, 4), "encoder_hidden_states": r(1, 8, 32), **_flux_ids(16, 8),
                   "timestep": torch.tensor([1.0])}),
    "ChronoEditTransformer3DModel": Spec(
        _wan(in_channels=16, out_channels=16, rope_temporal_skip_len=8),
        lambda r: {**_wan_inputs(r, 16), "encoder_hidden_states_image": None}),
    "CogVideoXTransformer3DModel": Spec(
        {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 4, "out_channels": 4,
         "time_embed_dim": 8, "text_embed_dim": 16, "num_layers": 1, "sample_width": 8, "sample_height": 8,
         "sample_frames": 8, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 8},
        lambda r: {"hidden_states": r(1, 1, 4, 8, 8), "encoder_hidden_states": r(1, 8, 16), "timestep": r.t()}),
    "CogView3PlusTransformer2DModel": Spec(
        {"patch_size": 2, "in_channels": 4, "num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
         "out_channels": 4, "text_embed_dim": 16, "time_embed_dim": 16, "condition_dim": 4,
         "pos_embed_max_size": 8, "sample_size": 8},
        lambda r: {"hidden_states": r(1, 4, 8, 8), "encoder_hidden_states": r(1, 8, 16),
                   "original_size": torch.tensor([[64, 64]]), "target_size": torch.tensor([[64, 64]]),
                   "crop_coords": torch.tensor([[0, 0]]), "timestep": r.t()}),
    "CogView4Transformer2DModel": Spec(
        {"patch_size": 2, "in_channels": 4, "num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
         "out_channels": 4, "text_embed_dim": 16, "time_embed_dim": 16, "condition_dim": 4},
        lambda r: {"hidden_states": r(1, 4, 8, 8), "encoder_hidden_states": r(1, 8, 16), "timestep": r.t(),
                   "original_size": torch.tensor([[64, 64]]), "target_size": torch.tensor([[64, 64]]),
                   "crop_coords": torch.tensor([[0, 0]])}),
    "ConsisIDTransformer3DModel": Spec(
        {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 4,
         "time_embed_dim": 8, "text_embed_dim": 16, "num_layers": 1, "sample_width": 8, "sample_height": 8,
         "sample_frames": 8, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 8,
         "cross_attn_interval": 1, "is_kps": False, "is_train_face": True, "cross_attn_dim_head": 1,
         "cross_attn_num_heads": 1, "LFE_id_dim": 2, "LFE_vit_dim": 2, "LFE_depth": 5, "LFE_dim_head": 8,
         "LFE_num_heads": 2, "LFE_num_id_token": 1, "LFE_num_querie": 1, "LFE_output_dim": 10, "LFE_ff_mult": 1,
         "LFE_num_scale": 1},
        lambda r: {"hidden_states": r(1, 1, 4, 8, 8), "encoder_hidden_states": r(1, 8, 16), "timestep": r.t(),
                   "id_vit_hidden": [torch.ones(1, 2, 2)], "id_cond": torch.ones(1, 2)}),
    "CosmosTransformer3DModel": Spec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "mlp_ratio": 2, "text_embed_dim": 16, "adaln_lora_dim": 4, "max_size": (4, 16, 16),
         "patch_size": (1, 2, 2), "rope_scale": (2.0, 1.0, 1.0),
         # The padding-mask branch resizes with torchvision, not a dependency here.
         "concat_padding_mask": False, "extra_pos_embed_type": "learnable"},
        lambda r: {"hidden_states": r(1, 4, 1, 8, 8), "timestep": r.t(), "encoder_hidden_states": r(1, 8, 16),
                   "attention_mask": torch.ones(1, 8), "fps": 30}),
    "DiTTransformer2DModel": Spec(
        {"in_channels": 4, "out_channels": 8, "activation_fn": "gelu-approximate", "num_attention_heads": 2,
         "attention_head_dim": 16, "attention_bias": True, "num_layers": 1, "norm_type": "ada_norm_zero",
         "num_embeds_ada_norm": 8, "patch_size": 2, "sample_size": 8},
        lambda r: {"hidden_states": r(1, 4, 8, 8), "timestep": r.t(), "class_labels": torch.tensor([1])}),
    "DreamLiteTransformer2DModel": Spec(
        {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 32, "num_layers": 1,
         "norm_num_groups": 8, "cross_attention_dim": 32},
        lambda r: {"hidden_states": r(1, 32, 8, 8), "encoder_hidden_states": r(1, 8, 32)}),
    "EasyAnimateTransformer3DModel": Spec(
        {"attention_head_dim": 16, "num_attention_heads": 2, "in_channels": 4, "mmdit_layers": 1, "num_layers": 1,
         "out_channels": 4, "patch_size": 2, "sample_height": 60, "sample_width": 90, "text_embed_dim": 16,
         "time_embed_dim": 16, "time_position_encoding_type": "3d_rope", "timestep_activation_fn": "silu"},
        lambda r: {"hidden_states": r(1, 4, 2, 8, 8), "timestep": r.t(), "timestep_cond": None,
                   "encoder_hidden_states": r(1, 8, 16), "encoder_hidden_states_t5": None, "inpaint_latents": None,
                   "control_latents": None}),
    "ErnieImageTransformer2DModel": Spec(
        {"hidden_size": 32, "num_attention_heads": 2, "num_layers": 1, "ffn_hidden_size": 64, "in_channels": 16,
         "out_channels": 16, "patch_size": 1, "text_in_dim": 16, "rope_theta": 256, "rope_axes_dim": (8, 4, 4),
         "qk_layernorm": True},
        lambda r: {"hidden_states": r(1, 16, 4, 4), "timestep": torch.tensor([1.0]), "text_bth": r(1, 8, 16),
                   "text_lens": torch.tensor([8])}),
    "FluxTransformer2DModel": Spec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
         "axes_dims_rope": [4, 4, 8]},
        lambda r: {"hidden_states": r(1, 16, 4), "encoder_hidden_states": r(1, 8, 32), "pooled_projections": r(1, 32),
                   **_flux_ids(16, 8), "timestep": torch.tensor([1.0])}),
    "Flux2Transformer2DModel": Spec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_guidance_channels": 256,
         "axes_dims_rope": [4, 4, 4, 4]},
        lambda r: {"hidden_states": r(1, 16, 4), "encoder_hidden_states": r(1, 8, 32), **_flux2_ids(4, 4, 8),
                   "timestep": torch.tensor([1.0]), "guidance": torch.tensor([1.0])}),
    "Flux3Transformer2DModel": Spec(
        {"in_channels": 4, "cond_in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "timestep_channels": 32,
         "axes_dims_rope": (4, 4, 4, 4)},
        lambda r: {"hidden_states": r(1, 16, 4), "encoder_hidden_states": r(1, 8, 32), "timestep": torch.tensor([0.5]),
                   **{k: v[0] for k, v in _flux2_ids(4, 4, 8).items()}}),
    "GlmImageTransformer2DModel": Spec(
        {"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "text_embed_dim": 32, "time_embed_dim": 16, "condition_dim": 8,
         "prior_vq_quantizer_codebook_size": 64},
        lambda r: {"hidden_states": r(1, 4, 8, 8), "encoder_hidden_states": r(1, 8, 32),
                   "prior_token_id": torch.tensor([3]), "prior_token_drop": torch.zeros(1, dtype=torch.bool),
                   "timestep": r.t(), "target_size": torch.tensor([[8.0, 8.0]]),
                   "crop_coords": torch.tensor([[0.0, 0.0]])}),
    "HeliosTransformer3DModel": Spec(
        _wan(rope_max_seq_len=None, rope_dim=(4, 6, 6), has_multi_term_memory_patch=True, guidance_cross_attn=True,
             zero_history_timestep=True, is_amplify_history=False),
        lambda r: {"hidden_states": r(1, 4, 2, 8, 8), "timestep": r.t(), "encoder_hidden_states": r(1, 8, 32),
                   "indices_hidden_states": torch.ones(1, 2), "indices_latents_history_short": torch.ones(1, 1),
                   "indices_latents_history_mid": torch.ones(1, 1), "indices_latents_history_long": torch.ones(1, 4),
                   "latents_history_short": r(1, 4, 1, 8, 8), "latents_history_mid": r(1, 4, 1, 8, 8),
                   "latents_history_long": r(1, 4, 4, 8, 8)}),
    "HiDreamImageTransformer2DModel": Spec(
        {"patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
         "attention_head_dim": 16, "num_attention_heads": 2, "caption_channels": [32, 32], "text_emb_dim": 32,
         "num_routed_experts": 2, "num_activated_experts": 1, "axes_dims_rope": (4, 6, 6),
         "max_resolution": (16, 16), "llama_layers": (0, 1)},
        # encoder_hidden_states_llama3 is one stacked tensor [layers, B, T, C]: one caption
        # projection per slice, one Dynamo graph for all of them (issue #25).
        lambda r: {"hidden_states": r(1, 4, 8, 8), "encoder_hidden_states_t5": r(1, 8, 32),
                   "encoder_hidden_states_llama3": r(2, 1, 8, 32), "pooled_embeds": r(1, 32), "timesteps": r.t()}),
    "HunyuanImageTransformer2DModel": Spec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": (1, 1), "text_embed_dim": 32,
         "rope_axes_dim": (8, 8)},
        lambda r: {"hidden_states": r(1, 4, 4, 4), "timestep": r.t().float(), "encoder_hidden_states": r(1, 8, 32),
                   "encoder_attention_mask": torch.ones(1, 8)}),
    "HunyuanVideoTransformer3DModel": Spec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 1, "patch_size_t": 1,
         "guidance_embeds": True, "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (4, 6, 6),
         "image_condition_type": None},
        lambda r: {"hidden_states": r(1, 4, 1, 4, 4), "timestep": r.t(), "encoder_hidden_states": r(1, 8, 16),
                   "pooled_projections": r(1, 8), "encoder_attention_mask": torch.ones(1, 8),
                   "guidance": torch.tensor([500.0])}),
    "HunyuanVideo15Transformer3DModel": Spec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "num_refiner_layers": 1, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1, "text_embed_dim": 16,
         "text_embed_2_dim": 8, "image_embed_dim": 16, "rope_axes_dim": (4, 6, 6), "target_size": 16,
         "task_type": "t2v"},
        lambda r: {"hidden_states": r(1, 4, 1, 4, 4), "timestep": torch.tensor([1.0]),
                   "encoder_hidden_states": r(1, 6, 16), "encoder_hidden_states_2": r(1, 4, 8),
                   "encoder_attention_mask": torch.ones(1, 6), "encoder_attention_mask_2": torch.ones(1, 4),
                   "image_embeds": torch.zeros(1, 3, 16)}),
    "HunyuanVideoFramepackTransformer3DModel": Spec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "num_single_layers": 1, "num_refiner_layers": 1, "patch_size": 2, "patch_size_t": 1,
         "guidance_embeds": True, "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (4, 6, 6),
         "image_condition_type": None, "has_image_proj": True, "image_proj_dim": 16, "has_clean_x_embedder": True},
        lambda r: {"hidden_states": r(1, 4, 3, 4, 4), "timestep": r.t(), "encoder_hidden_states": r(1, 8, 16),
                   "pooled_projections": r(1, 8), "encoder_attention_mask": torch.ones(1, 8),
                   "guidance": torch.tensor([500.0]), "image_embeds": r(1, 8, 16), "indices_latents": torch.ones(3),
                   "latents_clean": r(1, 4, 2, 4, 4), "indices_latents_clean": torch.ones(2),
                   "latents_history_2x": r(1, 4, 2, 4, 4), "indices_latents_history_2x": torch.ones(2),
                   "latents_history_4x": r(1, 4, 8, 4, 4), "indices_latents_history_4x": torch.ones(8)}),
    "Ideogram4Transformer2DModel": Spec(
        {"in_channels": 16, "num_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
         "intermediate_size": 64, "adaln_dim": 16, "llm_features_dim": 32, "rope_theta": 10_000,
         "mrope_section": (4, 2, 2)},
        _ideogram4_inputs),
    "JoyImageEditTransformer3DModel": Spec(
        {"patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 32, "num_attention_heads": 2, "text_dim": 16,
         "num_layers": 1, "rope_dim_list": [4, 6, 6], "theta": 256},
        lambda r: {"hidden_states": r(1, 16, 1, 4, 4), "encoder_hidden_states": r(1, 8, 16),
                   "timestep": torch.tensor([1.0])}),
    "JoyImageEditPlusTransformer3DModel": Spec(
        {"patch_size": [1, 2, 2], "in_channels": 16, "hidden_size": 32, "num_attention_heads": 2, "text_dim": 16,
         "num_layers": 1, "rope_dim_list": [4, 6, 6], "theta": 256},
        lambda r: {"hidden_states": r(1, 2, 16, 1, 2, 2), "encoder_hidden_states": r(1, 8, 16),
                   "timestep": torch.tensor([1.0]), "shape_list": [[(1, 1, 1), (1, 1, 1)]]}),
    "Kandinsky5Transformer3DModel": Spec(
        {"in_visual_dim": 4, "in_text_dim": 16, "in_text_dim2": 16, "time_dim": 16, "out_visual_dim": 4,
         "patch_size": (1, 2, 2), "model_dim": 32, "ff_dim": 64, "num_text_blocks": 1, "num_visual_blocks": 1,
         "axes_dims": (4, 6, 6)},
        lambda r: {"hidden_states": r(1, 2, 8, 8, 4), "encoder_hidden_states": r(1, 6, 16), "timestep": r.t().float(),
                   "pooled_projections": r(1, 16),
                   "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)],
                   "text_rope_pos": torch.arange(6)}),
    "Kandinsky6Transformer3DModel": Spec(
        {"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 16, "in_text_dim2": 16, "time_dim": 16,
         "patch_size": (1, 2, 2), "model_dim": 32, "ff_dim": 64, "num_text_blocks": 1, "num_visual_blocks": 1,
         "axes_dims": (4, 6, 6), "visual_cond": True, "in_audio_dim": 4, "out_audio_dim": 4},
        # visual_cond: the input carries the noisy latent, the condition and its mask (2 * 4 + 1).
        lambda r: {"hidden_states": r(1, 2, 8, 8, 9), "encoder_hidden_states": r(1, 6, 16),
                   "pooled_projections": r(1, 16), "timestep": r.t().float()}),
    "Kandinsky6SRTransformer3DModel": Spec(
        {"in_visual_dim": 4, "out_visual_dim": 8, "time_dim": 16, "patch_size": (1, 2, 2), "model_dim": 32,
         "ff_dim": 64, "num_visual_blocks": 1, "axes_dims": (4, 6, 6)},
        lambda r: {"hidden_states": r(1, 2, 16, 16, 9), "timestep": r.t().float()}),
    "Krea2Transformer2DModel": Spec(
        {"in_channels": 16, "num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 64, "timestep_embed_dim": 16, "text_hidden_dim": 16,
         "num_text_layers": 3, "text_num_attention_heads": 2, "text_num_key_value_heads": 1,
         "text_intermediate_size": 32, "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1,
         "axes_dims_rope": (4, 2, 2), "rope_theta": 1000.0},
        lambda r: {"hidden_states": r(1, 16, 16), "encoder_hidden_states": r(1, 4, 3, 16),
                   "timestep": torch.tensor([0.5]),
                   "position_ids": torch.cat([torch.zeros(4, 3), torch.stack(
                       [torch.zeros(16), torch.arange(4.0).repeat_interleave(4), torch.arange(4.0).repeat(4)], 1)]),
                   "encoder_attention_mask": torch.ones(1, 4, dtype=torch.bool)}),
    "LatteTransformer3DModel": Spec(
        {"sample_size": 8, "num_layers": 1, "patch_size": 2, "attention_head_dim": 16, "num_attention_heads": 2,
         "caption_channels": 16, "in_channels": 4, "cross_attention_dim": 32, "out_channels": 8,
         "attention_bias": True, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
         "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6, "video_length": 2},
        lambda r: {"hidden_states": r(1, 4, 2, 8, 8), "encoder_hidden_states": r(1, 8, 16), "timestep": r.t(),
                   "enable_temporal_attentions": True}),
    "LongCatImageTransformer2DModel": Spec(
        {"patch_size": 1, "in_channels": 4, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
         "axes_dims_rope": [4, 4, 8]},
        lambda r: {"hidden_states": r(1, 16, 4), "encoder_hidden_states": r(1, 8, 32), **_flux_ids(16, 8),
                   "timestep": torch.tensor([1.0]), "guidance": torch.tensor([3.5])}),
    "LTXVideoTransformer3DModel": Spec(
        {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 16,
         "cross_attention_dim": 32, "num_layers": 1, "qk_norm": "rms_norm_across_heads", "caption_channels": 16},
        lambda r: {"hidden_states": r(1, 2 * 4 * 4, 4), "encoder_hidden_states": r(1, 8, 16), "timestep": r.t(),
                   "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool), "num_frames": 2, "height": 4,
                   "width": 4}),
    "LTX2VideoTransformer3DModel": Spec(
        {"in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
         "attention_head_dim": 16, "cross_attention_dim": 32, "audio_in_channels": 4, "audio_out_channels": 4,
         "audio_num_attention_heads": 2, "audio_attention_head_dim": 8, "audio_cross_attention_dim": 16,
         "num_layers": 1, "qk_norm": "rms_norm_across_heads", "caption_channels": 16, "rope_double_precision": False},
        lambda r: {"hidden_states": r(1, 2 * 4 * 4, 4), "audio_hidden_states": r(1, 9, 4),
                   "encoder_hidden_states": r(1, 8, 16), "audio_encoder_hidden_states": r(1, 8, 16),
                   "timestep": r(1).abs() * 1000, "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool),
                   "num_frames": 2, "height": 4, "width": 4, "audio_num_frames": 9, "fps": 25.0}),
    "Lumina2Transformer2DModel": Spec(
        {"sample_size": 16, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "num_layers": 1,
         "num_refiner_layers": 1, "num_attention_heads": 2, "num_kv_heads": 1, "multiple_of": 16,
         "scaling_factor": 1.0, "axes_dim_rope": (8, 4, 4), "axes_lens": (128, 128, 128), "cap_feat_dim": 32},
        lambda r: {"hidden_states": r(1, 4, 8, 8), "encoder_hidden_states": r(1, 8, 32),
                   "timestep": torch.tensor([0.5]),
                   "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool)}),
    "MiniMaxH3Transformer3DModel": Spec(
        {"num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32, "num_layers": 1,
         "num_refiner_layers": 1, "ffn_dim": 64, "in_channels": 4, "audio_in_channels": 8, "patch_size": (1, 2, 2),
         "text_dim": 16, "freq_dim": 16, "time_embed_hidden_dim": 32, "time_embed_dim": 16, "rope_freq_dim": 2},
        _minimax_h3_inputs),
    "MiniMaxMusic3Transformer1DModel": Spec(
        {"in_channels": 8, "condition_dim": 16, "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
         "ff_inner_dim": 64, "rotary_dim": 4, "fourier_embedding_dim": 8},
        lambda r: {"hidden_states": r(1, 8, 24), "encoder_hidden_states": r(1, 24, 16),
                   "timestep": torch.tensor([0.5])}),
    "MochiTransformer3DModel": Spec(
        {"patch_size": 2, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "pooled_projection_dim": 16, "in_channels": 4, "out_channels": None, "qk_norm": "rms_norm",
         "text_embed_dim": 16, "time_embed_dim": 4, "activation_fn": "swiglu", "max_sequence_length": 16},
        lambda r: {"hidden_states": r(1, 4, 2, 8, 8), "encoder_hidden_states": r(1, 8, 16), "timestep": r.t(),
                   "encoder_attention_mask": torch.ones(1, 8, dtype=torch.bool)}),
    "MotifVideoTransformer3DModel": Spec(
        {"in_channels": 33, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "num_single_layers": 1, "num_decoder_layers": 0, "mlp_ratio": 2.0, "patch_size": 1, "patch_size_t": 1,
         "qk_norm": "rms_norm", "norm_type": "layer_norm", "text_embed_dim": 32, "image_embed_dim": 4,
         "rope_theta": 256.0, "rope_axes_dim": (4, 6, 6), "enable_text_cross_attention_dual": False,
         "enable_text_cross_attention_single": False},
        lambda r: {"hidden_states": r(1, 33, 1, 4, 4), "encoder_hidden_states": r(1, 8, 32), "timestep": r.t()}),
    "NucleusMoEImageTransformer2DModel": Spec(
        {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 16, "axes_dims_rope": (8, 4, 4), "moe_enabled": False,
         "capacity_factors": [8.0]},
        lambda r: {"hidden_states": r(1, 16, 16), "encoder_hidden_states": r(1, 8, 16),
                   "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long), "timestep": torch.tensor([1.0]),
                   "img_shapes": [(1, 4, 4)]}),
    "OmniGenTransformer2DModel": Spec(
        {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64,
         "num_layers": 1, "pad_token_id": 0, "vocab_size": 100, "in_channels": 4, "time_step_dim": 16,
         "rope_scaling": {"long_factor": list(range(1, 9)), "short_factor": list(range(1, 9))}},
        lambda r: {"hidden_states": r(1, 4, 8, 8), "timestep": torch.tensor([0.5]),
                   "input_ids": torch.randint(0, 10, (1, 8), generator=r.g), "input_img_latents": [],
                   "input_image_sizes": {}, "attention_mask": torch.ones(1, 8 + 1 + 16, 8 + 1 + 16),
                   "position_ids": torch.arange(8 + 1 + 16)[None]}),
    "OvisImageTransformer2DModel": Spec(
        {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 1,
         "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32, "axes_dims_rope": (4, 4, 8)},
        lambda r: {"hidden_states": r(1, 16, 4), "encoder_hidden_states": r(1, 8, 32), **_flux_ids(16, 8),
                   "timestep": torch.tensor([1.0])}),
    "PixArtTransformer2DModel": Spec(
        {"sample_size": 8, "num_layers": 1, "patch_size": 2, "attention_head_dim": 16, "num_attention_heads": 2,
         "in_channels": 4, "cross_attention_dim": 32, "out_channels": 8, "attention_bias": True,
         "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 8, "norm_type": "ada_norm_single",
         "norm_elementwise_affine": False, "norm_eps": 1e-6, "use_additional_conditions": False,
         "caption_channels": None},
        lambda r: {"hidden_states": r(1, 4, 8, 8), "timestep": r.t(), "encoder_hidden_states": r(1, 8, 32),
                   "added_cond_kwargs": {"aspect_ratio": None, "resolution": None}}),
    "PRXTransformer2DModel": Spec(
        {"in_channels": 16, "patch_size": 2, "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 2.0,
         "num_heads": 2, "depth": 1, "axes_dim": [8, 8], "theta": 10_000},
        lambda r: {"hidden_states": r(1, 16, 8, 8), "encoder_hidden_states": r(1, 8, 32),
                   "timestep": torch.tensor([1.0])}),
    "QwenImageTransformer2DModel": Spec(
        {"patch_size": 2, "in_channels": 16, "out_channels": 4, "num_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "joint_attention_dim": 16, "guidance_embeds": False, "axes_dims_rope": (8, 4, 4)},
        lambda r: {"hidden_states": r(1, 16, 16), "encoder_hidden_states": r(1, 8, 16),
                   "encoder_hidden_states_mask": torch.ones(1, 8, dtype=torch.long), "timestep": torch.tensor([1.0]),
                   "img_shapes": [(1, 4, 4)]}),
    "QwenImage21Transformer2DModel": Spec(
        {"patch_size": 1, "in_channels": 16, "out_channels": 16, "num_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "context_in_dim": 32, "mlp_ratio": 2, "axes_dims_rope": (8, 4, 4)},
        # 8 text tokens then 4 image slots of 2x2 latent tokens each.
        lambda r: {"hidden_states": r(1, 16, 16), "encoder_hidden_states": r(1, 8, 32), "timestep": torch.tensor([0.5]),
                   "img_shapes": [[(1, 4, 4)]], "img_mask": torch.arange(12)[None] >= 8}),
    "SanaTransformer2DModel": Spec(
        {"patch_size": 1, "in_channels": 4, "out_channels": 4, "num_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 16,
         "cross_attention_dim": 32, "caption_channels": 16, "sample_size": 8},
        lambda r: {"hidden_states": r(1, 4, 8, 8), "encoder_hidden_states": r(1, 8, 16), "timestep": r.t()}),
    "SanaVideoTransformer3DModel": Spec(
        {"in_channels": 16, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 1,
         "num_cross_attention_heads": 2, "cross_attention_head_dim": 16, "cross_attention_dim": 32,
         "caption_channels": 16, "mlp_ratio": 2.0, "attention_bias": False, "sample_size": 8,
         "patch_size": (1, 2, 2), "norm_elementwise_affine": False, "norm_eps": 1e-6,
         "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32},
        lambda r: {"hidden_states": r(1, 16, 2, 8, 8), "encoder_hidden_states": r(1, 8, 16), "timestep": r.t()}),
    "SanaWMTransformer3DModel": Spec(
        {"in_channels": 4, "num_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "patch_size": (1, 1, 1),
         "softmax_every_n": 2, "linear_head_dim": 16, "t_kernel_size": 3, "conv_kernel_size": 4,
         "caption_channels": 16, "mlp_ratio": 2.0, "chunk_plucker_channels": 8, "chunk_plucker_post_attn_blocks": 2},
        _sana_wm_inputs),
    "SanaWMLTX2RefinerTransformer3DModel": Spec(
        {"in_channels": 4, "out_channels": 4, "patch_size": 1, "patch_size_t": 1, "num_attention_heads": 2,
         "attention_head_dim": 16, "cross_attention_dim": 32, "audio_in_channels": 4, "audio_out_channels": 4,
         "audio_num_attention_heads": 2, "audio_attention_head_dim": 8, "audio_cross_attention_dim": 16,
         "num_layers": 1, "caption_channels": 16, "rope_double_precision": False},
        _sana_wm_refiner_inputs),
    "SD3Transformer2DModel": Spec(
        {"sample_size": 16, "patch_size": 2, "in_channels": 4, "num_layers": 1, "attention_head_dim": 16,
         "num_attention_heads": 2, "caption_projection_dim": 32, "joint_attention_dim": 32,
         "pooled_projection_dim": 64, "out_channels": 4, "pos_embed_max_size": 16, "dual_attention_layers": (),
         "qk_norm": None},
        lambda r: {"hidden_states": r(1, 4, 16, 16), "encoder_hidden_states": r(1, 8, 32),
                   "pooled_projections": r(1, 64), "timestep": r.t()}),
    "SkyReelsV2Transformer3DModel": Spec(_wan(), lambda r: _wan_inputs(r)),
    "Transformer2DModel": Spec(
        {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 32, "num_layers": 1,
         "norm_num_groups": 8, "cross_attention_dim": 32},
        lambda r: {"hidden_states": r(1, 32, 8, 8), "encoder_hidden_states": r(1, 8, 32)}),
    "TransformerTemporalModel": Spec(
        {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 32, "num_layers": 1,
         "norm_num_groups": 8},
        lambda r: {"hidden_states": r(2, 32, 4, 4), "num_frames": 2}),
    "WanTransformer3DModel": Spec(_wan(), lambda r: _wan_inputs(r)),
    "WanAnimateTransformer3DModel": Spec(
        _wan(in_channels=12, latent_channels=4, image_dim=16, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
             motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=16,
             face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=1),
        # The first latent frame is the reference; the face frames (strided by 4 in the face
        # encoder) cover the other one.
        lambda r: {"hidden_states": r(1, 12, 2, 8, 8), "timestep": r.t(), "encoder_hidden_states": r(1, 8, 32),
                   "encoder_hidden_states_image": r(1, 8, 16), "pose_hidden_states": r(1, 4, 1, 8, 8),
                   "face_pixel_values": r(1, 3, 1, 16, 16)}),
    "WanAnimate2Transformer3DModel": Spec(
        {"patch_size": (1, 2, 2), "text_len": 8, "in_dim": 36, "dim": 32, "ffn_dim": 64, "freq_dim": 32,
         "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 1, "cross_attn_norm": True,
         "use_img_emb": True},
        _wan_animate2_inputs),
    "WanVACETransformer3DModel": Spec(
        _wan(in_channels=16, out_channels=16, num_layers=2, vace_layers=[0], vace_in_channels=48),
        lambda r: {**_wan_inputs(r, 16), "control_hidden_states": r(1, 48, 2, 8, 8)}),
    "ZImageTransformer2DModel": Spec(
        {"all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 32, "n_layers": 1,
         "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True, "cap_feat_dim": 16,
         "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [8, 4, 4], "axes_lens": [256, 32, 32]},
        lambda r: {"x": [r(16, 1, 8, 8)], "cap_feats": [r(8, 16)], "t": torch.tensor([0.5])}),
}

# Classes not run, with the reason (keep this list as short as the installed diffusers allows).
NOT_RUN: dict[str, str] = {}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """(fp32 model in eval mode with seeded weights, its forward's keyword arguments)."""
    import diffusers

    spec = SPECS[name]
    torch.manual_seed(seed)
    model = getattr(diffusers, name)(**spec.init).eval()
    with torch.no_grad():
        # Zero-initialised output projections and AdaLN gates (a fresh model, not a trained
        # one) would cut the blocks out of the output: give them small random weights.
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model, spec.inputs(_Rand(seed))
