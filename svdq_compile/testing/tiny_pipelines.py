"""Tiny diffusers pipelines with seeded random weights, built offline.

Every builder writes a complete pipeline directory (``save_pretrained`` of each
component + ``model_index.json``) that ``DiffusionPipeline.from_pretrained(path)``
loads without network access. Tokenizers are constructed locally: CLIP's byte-level
BPE from a small vocab + merges, T5's unigram from a small piece list.

Sizes are chosen so that the transformer/UNet linears are quantizable
(``in_features`` a multiple of 64 and ``min(in, out) >= 64``, the default
``SVDQuantConfig``) while a 32x32 image with a few steps runs in well under a second.
The expected number of quantized linears of each builder is documented next to
``EXPECTED_QUANTIZED`` at the bottom of this file.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Callable

import torch

__all__ = ["BUILDERS", "EXPECTED_QUANTIZED", "EXPECTED_KEPT", "EXPECTED_T5_QUANTIZED", "PIPE_KWARGS", "build",
           "add_outlier_channels", "clip_tokenizer", "t5_tokenizer"]

_WORDS = ("a photo of the cat dog red blue green house tree sky sun moon on in with and small big "
          "painting astronaut riding horse mountain lake city night day bird flower car road").split()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2 / CLIP byte-level alphabet (printable stand-ins for all 256 bytes).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_tokenizer(max_length: int = 77):
    """CLIP BPE tokenizer: byte alphabet (+ end-of-word forms), merges for a few words."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:  # merge each word left to right: ("c", "a"), ("ca", "t</w>")
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merge = (a, b)
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(a + b, len(vocab))
            pieces = [a + b] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def t5_tokenizer(max_length: int = 512):
    """T5 unigram tokenizer over a few words and single characters (ids: pad 0, eos 1, unk 2)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -5.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    pieces += [(c, -10.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _vocab_size(tok) -> int:
    return len(tok)


@torch.no_grad()
def add_outlier_channels(model: torch.nn.Module, seed: int, channels: int = 2, gain: float = 8.0,
                         keep: tuple[str, ...] = ("proj_out", "norm_out.linear", "conv_out")) -> torch.nn.Module:
    """Give a randomly initialised network the outliers of a trained one.

    Trained diffusion transformers/UNets have a few activation channels far larger
    than the rest (and weights with a few dominant directions); Gaussian-initialised
    ones have neither, and there SVDQuant's smoothing and low-rank branch have nothing
    to remove. For each linear (except the final projections in ``keep``), ``channels``
    seeded random output channels (weight rows and bias) are multiplied by ``gain``:
    its consumers (the next linear, the residual stream read through norms, attention
    values) then see outlier input channels, and its weight gets ``channels`` dominant
    singular directions. Deterministic for a given seed.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name not in keep and m.out_features > channels:
            rows = torch.randperm(m.out_features, generator=gen)[:channels]
            m.weight[rows] *= gain
            if m.bias is not None:
                m.bias[rows] *= gain
    return model


def _vae(latent_channels: int = 4, shift_factor=None, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    # Two blocks -> vae_scale_factor 2: a 32x32 image has a 16x16 latent.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )


def _clip(tok, hidden: int = 64, projection: bool = False, projection_dim: int = 64):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # hidden 64, MLP 128, 2 layers: 6 linears per layer (q, k, v, out, fc1, fc2), all quantizable.
    cfg = CLIPTextConfig(
        vocab_size=_vocab_size(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim, hidden_act="gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _t5(tok, d_model: int = 64):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 style (gated GELU), 2 layers: q, k, v, o, wi_0, wi_1, wo per layer.
    cfg = T5Config(
        vocab_size=_vocab_size(tok), d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(cfg).eval()


def build_flux(path: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    te, te2 = _clip(tok), _t5(tok2, d_model=64)
    torch.manual_seed(1)
    # inner dim 4 heads x 32 = 128, MLP 512; latent 4 channels packed 2x2 -> in_channels 16.
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    ).eval()
    add_outlier_channels(transformer, seed=3)
    torch.manual_seed(2)
    vae = _vae(4, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te, tokenizer=tok,
                        text_encoder_2=te2, tokenizer_2=tok2, transformer=transformer)
    pipe.save_pretrained(path)
    return path


def build_sd3(path: Path):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    torch.manual_seed(0)
    te = _clip(tok, projection=True)
    te2 = _clip(tok2, projection=True)
    te3 = _t5(tok3, d_model=128)  # >= the concatenated CLIP hidden size (64 + 64)
    torch.manual_seed(1)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128, out_channels=4,
        pos_embed_max_size=32,
    ).eval()
    add_outlier_channels(transformer, seed=3)
    torch.manual_seed(2)
    vae = _vae(4, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=te,
        tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3)
    pipe.save_pretrained(path)
    return path


def build_pixart_sigma(path: Path):
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    tok = t5_tokenizer()
    torch.manual_seed(0)
    te = _t5(tok, d_model=64)
    torch.manual_seed(1)
    transformer = PixArtTransformer2DModel(
        sample_size=16, num_layers=1, patch_size=2, attention_head_dim=32, num_attention_heads=4,
        caption_channels=64, in_channels=4, cross_attention_dim=128, out_channels=8, attention_bias=True,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
    ).eval()
    add_outlier_channels(transformer, seed=3)
    torch.manual_seed(2)
    vae = _vae(4)
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler())
    pipe.save_pretrained(path)
    return path


def build_sdxl(path: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    torch.manual_seed(0)
    te = _clip(tok)
    te2 = _clip(tok2, projection=True, projection_dim=64)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 1),
        cross_attention_dim=128, addition_embed_type="text_time", addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=16 * 6 + 64, norm_num_groups=32,
    ).eval()
    add_outlier_channels(unet, seed=3)
    torch.manual_seed(2)
    vae = _vae(4)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.save_pretrained(path)
    return path


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "flux": build_flux,
    "sd3": build_sd3,
    "pixart_sigma": build_pixart_sigma,
    "sdxl": build_sdxl,
}

# Call arguments every test passes (keep the text sequences short; no resolution bins
# for the tiny PixArt whose sample_size is not one of the real checkpoints').
PIPE_KWARGS: dict[str, dict] = {
    "flux": {"max_sequence_length": 16},
    "sd3": {"max_sequence_length": 16},
    "pixart_sigma": {"max_sequence_length": 16, "use_resolution_binning": False},
    "sdxl": {},
}

# Linears of the denoiser that svdq_compile.pipeline_config() quantizes. Eligible: K a
# multiple of 64, min(N, K) >= 64 and not matching PIPELINE_SKIP (embedders, AdaLN-single,
# caption projection, norm_out, the top-level proj_out). Every block linear of these
# configs is eligible (widths 128/256/512, time embedding 256), so the counts are the
# block linears:
#
# flux (1 double + 1 single block, inner 128, MLP 512):
#   double: norm1.linear, norm1_context.linear, to_q/k/v, add_q/k/v_proj, to_out.0,
#           to_add_out, ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2 = 14
#   single: norm.linear, proj_mlp, to_q/k/v, proj_out (K = 128 + 512)                  =  6
#   -> 20; kept in float (10): x_embedder (K=16), context_embedder, time_text_embed's
#   timestep/guidance/text embedders (2 each), norm_out.linear, proj_out.
# sd3 (2 blocks; the last one is context_pre_only):
#   block 0: as a FLUX double block                                                      = 14
#   block 1: no to_add_out, no ff_context (its norm1_context is AdaLayerNormContinuous)  = 11
#   -> 25; kept (7): time_text_embed (4), context_embedder, norm_out.linear, proj_out.
# pixart_sigma (1 block): attn1 q/k/v/out + attn2 q/k/v/out + ff.net.0.proj + ff.net.2 = 10;
#   kept (6): adaln_single (timestep_embedder x2, linear), caption_projection x2, proj_out.
# sdxl UNet (blocks (64, 128), 1 layer per block, time embedding 256): a resnet has one
#   time_emb_proj; a transformer has proj_in, proj_out, attn1 x4, attn2 x4, GEGLU proj,
#   ff.net.2 = 12 linears.
#   down 0 (1 resnet) 1 + down 1 (1 resnet + 1 transformer) 13 + mid (2 resnets + 1
#   transformer) 14 + up 0 (2 resnets + 2 transformers) 26 + up 1 (2 resnets) 2 = 56;
#   kept (4): time_embedding.linear_1/2, add_embedding.linear_1/2.
EXPECTED_QUANTIZED: dict[str, int] = {"flux": 20, "sd3": 25, "pixart_sigma": 10, "sdxl": 56}
EXPECTED_KEPT: dict[str, int] = {"flux": 10, "sd3": 7, "pixart_sigma": 6, "sdxl": 4}
# T5 text encoder of the tiny pipelines (2 layers): q, k, v, o, wi_0, wi_1 per layer; wo
# stays in float (T5's _keep_in_fp32_modules).
EXPECTED_T5_QUANTIZED = 12


def build(name: str, path: Path) -> Path:
    return BUILDERS[name](Path(path))
