"""A tiny class-conditional rectified-flow model for 8x8 digits, built on Flux.

The network is diffusers' :class:`~diffusers.FluxTransformer2DModel` shrunk to
~2.3M parameters, so the SVDQuant backend can be exercised end to end on a real,
trained Flux-architecture model (double-stream + single-stream blocks, RoPE,
AdaLayerNorm) that trains in minutes on a CPU.

Layout of one image in the transformer:

* the image ``[1, 8, 8]`` is cut into 2x2 patches -> 16 tokens of 4 channels
  (the same packing as Flux pipelines' ``_pack_latents``);
* the "text" stream is a single learned class token ``[1, 64]``;
* the class also drives AdaLN through ``pooled_projections`` ``[64]``.

Label ``NULL_LABEL`` (10) means "no class" and is used for classifier-free
guidance.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "ASSETS_DIR",
    "CHECKPOINT_PATH",
    "MANIFEST_PATH",
    "NULL_LABEL",
    "DemoConfig",
    "DigitFlow",
    "build_model",
    "load_manifest",
    "load_pretrained",
    "patchify",
    "unpatchify",
]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CHECKPOINT_PATH = ASSETS_DIR / "digits_flow.safetensors"
MANIFEST_PATH = ASSETS_DIR / "digits_flow.json"

#: Label index meaning "unconditional" (digits use 0..9).
NULL_LABEL = 10


@dataclass(frozen=True)
class DemoConfig:
    """Hyper-parameters of :class:`DigitFlow` (all sizes are fixed by the demo)."""

    image_size: int = 8
    image_channels: int = 1
    patch: int = 2  # pixels per patch side; the transformer itself uses patch_size=1
    num_classes: int = 10  # + 1 extra "no class" label for CFG
    cond_dim: int = 64  # = joint_attention_dim = pooled_projection_dim
    num_layers: int = 2  # double-stream (MMDiT) blocks
    num_single_layers: int = 4
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # sums to attention_head_dim

    @property
    def grid(self) -> int:
        """Patches per image side (4)."""
        return self.image_size // self.patch

    @property
    def num_tokens(self) -> int:
        """Image tokens per sample (16)."""
        return self.grid * self.grid

    @property
    def token_channels(self) -> int:
        """Channels per image token (4)."""
        return self.image_channels * self.patch * self.patch

    def flux_kwargs(self) -> dict[str, object]:
        """Constructor arguments for :class:`diffusers.FluxTransformer2DModel`."""
        return dict(
            patch_size=1,
            in_channels=self.token_channels,
            out_channels=self.token_channels,
            num_layers=self.num_layers,
            num_single_layers=self.num_single_layers,
            attention_head_dim=self.attention_head_dim,
            num_attention_heads=self.num_attention_heads,
            joint_attention_dim=self.cond_dim,
            pooled_projection_dim=self.cond_dim,
            guidance_embeds=False,
            axes_dims_rope=self.axes_dims_rope,
        )

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly view (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def patchify(x: Tensor, patch: int = 2) -> Tensor:
    """Pack images into patch tokens, in Flux's ``_pack_latents`` order.

    Args:
        x: ``[B, C, H, W]`` images.
        patch: patch side in pixels.

    Returns:
        ``[B, (H/p)*(W/p), C*p*p]`` tokens, row-major over the patch grid.
    """
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)  # [B, C, gh, p, gw, p]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, gh, gw, C, p, p]
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: Tensor, height: int = 8, width: int = 8, patch: int = 2) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, N, C*p*p]`` -> ``[B, C, H, W]``."""
    b, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(b, height // patch, width // patch, c, patch, patch)  # [B, gh, gw, C, p, p]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, gh, p, gw, p]
    return x.reshape(b, c, height, width)


def _image_ids(grid: int) -> Tensor:
    """RoPE position ids ``(0, row, col)`` for a ``grid x grid`` patch grid -> ``[grid*grid, 3]``."""
    rows = torch.arange(grid).repeat_interleave(grid)  # 0,0,0,0,1,1,...
    cols = torch.arange(grid).repeat(grid)  # 0,1,2,3,0,1,...
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).float()


class DigitFlow(nn.Module):
    """Class-conditional velocity model ``v(x_t, t, y)`` for rectified flow.

    Attributes:
        transformer: the (tiny) ``FluxTransformer2DModel``; this is the part the
            SVDQuant backend is meant to quantize.
        class_token: label -> the single "text" token (``encoder_hidden_states``).
        class_embed: label -> ``pooled_projections`` (drives AdaLN with the timestep).
    """

    def __init__(self, cfg: DemoConfig = DemoConfig()) -> None:
        super().__init__()
        # Imported lazily so that importing svdq_compile.demo stays cheap.
        from diffusers import FluxTransformer2DModel

        self.cfg = cfg
        self.transformer = FluxTransformer2DModel(**cfg.flux_kwargs())
        self.class_token = nn.Embedding(cfg.num_classes + 1, cfg.cond_dim)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, cfg.cond_dim)
        # Constant position ids live in non-persistent buffers: they follow
        # .to(device), Dynamo sees them as plain module attributes (no Python
        # -side tensor construction per call), and they are not saved in the
        # checkpoint because they are derived from the config.
        self.register_buffer("img_ids", _image_ids(cfg.grid), persistent=False)  # [16, 3]
        self.register_buffer("txt_ids", torch.zeros(1, 3), persistent=False)  # [1, 3]

    def forward(self, x: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        """Predict the velocity ``eps - x0`` at ``x_t``.

        Args:
            x: ``[B, 1, 8, 8]`` images or ``[B, 16, 4]`` packed tokens.
            t: ``[B]`` flow time in ``[0, 1]`` (1 = pure noise).
            labels: ``[B]`` int64 class labels, ``NULL_LABEL`` for unconditional.

        Returns:
            The velocity, same shape as ``x``.
        """
        is_image = x.dim() == 4
        tokens = patchify(x, self.cfg.patch) if is_image else x  # [B, 16, 4]
        ctx = self.class_token(labels).unsqueeze(1)  # [B, 1, 64]
        pooled = self.class_embed(labels)  # [B, 64]
        out = self.transformer(
            hidden_states=tokens.to(ctx.dtype),
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            # Flux scales the timestep by 1000 internally.
            timestep=t.to(ctx.dtype),
            img_ids=self.img_ids,
            txt_ids=self.txt_ids,
            return_dict=False,
        )[0]  # [B, 16, 4]
        if is_image:
            out = unpatchify(out, self.cfg.image_size, self.cfg.image_size, self.cfg.patch)
        return out.to(x.dtype)


def build_model(cfg: DemoConfig = DemoConfig(), seed: int = 0) -> DigitFlow:
    """Build a freshly initialised :class:`DigitFlow` with seeded weights."""
    # fork_rng so building a model does not perturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitFlow(cfg)


def load_manifest(path: str | Path = MANIFEST_PATH) -> dict[str, object]:
    """Read the JSON manifest written next to the checkpoint by ``train.py``."""
    return json.loads(Path(path).read_text())


def load_pretrained(
    path: str | Path = CHECKPOINT_PATH,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DigitFlow:
    """Load the committed, trained checkpoint (EMA weights) in eval mode.

    Args:
        path: safetensors file; defaults to the one shipped in the package.
        device: where to put the model.
        dtype: parameter dtype (the checkpoint may be stored in a smaller one).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; train it with `python -m svdq_compile.demo.train`"
        )
    cfg = DemoConfig()
    manifest_path = path.with_suffix(".json")
    if manifest_path.is_file():
        raw = load_manifest(manifest_path).get("config")
        if isinstance(raw, dict):
            raw = dict(raw)
            raw["axes_dims_rope"] = tuple(raw["axes_dims_rope"])
            cfg = DemoConfig(**raw)
    model = build_model(cfg)  # seeded + RNG-isolated; the init is overwritten below anyway
    state = load_file(str(path))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=True)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
