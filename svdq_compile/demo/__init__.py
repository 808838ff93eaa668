"""Demo: a tiny trained Flux-architecture rectified-flow model on sklearn's 8x8 digits.

Modules (import them directly; this package imports nothing eagerly so that
``import svdq_compile.demo`` stays cheap):

* :mod:`.model` - ``DigitFlow`` (FluxTransformer2DModel + class embeddings), ``load_pretrained``
* :mod:`.data` - seeded train/test split of the digits, scaled to [-1, 1]
* :mod:`.sampler` - Euler sampler with batched classifier-free guidance
* :mod:`.classifier` - SVC judge of generated digits
* :mod:`.train` - ``python -m svdq_compile.demo.train`` rebuilds ``assets/digits_flow.safetensors``
"""
