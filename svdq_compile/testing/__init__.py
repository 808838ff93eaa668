"""Seeded tiny models for tests and benchmarks (like ``diffusers.utils.testing_utils``).

- :mod:`.models`: small ``nn.Module`` blocks with outlier activation channels
  (``AttnMLPBlock``: the shape of a DiT block);
- :mod:`.tiny_pipelines`: tiny diffusers pipelines (FLUX, SD3, PixArt-Sigma, SDXL) with
  seeded random weights, built offline (needs the ``[diffusers]`` extra).

Nothing here is imported by ``import svdq_compile``; import the submodule you need.
"""
