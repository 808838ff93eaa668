"""``svdq export``: write a quantized model as ONNX (for ONNX Runtime / trtexec) or a TensorRT engine.

    svdq export --format onnx --model demo -o digits.onnx              # the demo, quantized on the spot
    svdq export --format onnx --artifact my_q/ -o digits.onnx          # the demo from svdq_compile.save(model, 'my_q')
    svdq export --format onnx --model mypkg.models:build -o model.onnx   # your own model
    svdq export --format onnx --flavor deploy --model demo -o digits.onnx   # ONNX Runtime integer GEMMs
    svdq export --format tensorrt --model demo -o digits.ep            # needs [tensorrt] + CUDA

``--model`` is ``demo`` (the bundled digits model) or ``module:function``; the function
returns ``(model, example_inputs)`` or ``(model, example_inputs, dynamic_shapes)``, where
``example_inputs`` is a tuple of positional inputs or a dict of keyword inputs.
Without ``--artifact`` the model must already contain SVDQLinear layers, except for the
demo, which is then quantized on the spot from random calibration inputs.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEMO = "demo"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="export a quantized model to ONNX or TensorRT",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx", help="output format (default onnx)")
    p.add_argument("--model", default=DEMO, help="'demo' or 'module:function' (see above)")
    p.add_argument("--artifact", default=None, help="quantized artifact directory written by svdq_compile.save")
    p.add_argument("-o", "--output", default=None, help="output file (default: <model>.onnx / <model>.ep)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the demo's example inputs (default 2)")
    p.add_argument("--static", action="store_true", help="export static shapes (demo: no dynamic batch axis)")
    p.add_argument("--opset", type=int, default=21, help="ONNX opset, >= 21 (default 21)")
    p.add_argument("--no-check", action="store_true", help="skip onnx.checker on the written file")
    p.add_argument("--flavor", choices=("exact", "deploy"), default="exact",
                   help="exact: float ops reproducing our numerics (TensorRT, verification; default); "
                        "deploy: ONNX Runtime integer GEMMs, faster than the float model (docs/export.md)")
    p.add_argument("--int8-kernel", choices=("u8u8", "u8s8", "dynamic"), default="u8u8",
                   help="deploy form of w4a8-int8 layers (default u8u8: exact)")
    p.set_defaults(command="export")
    return p


def _demo(batch: int, static: bool, artifact: Any) -> tuple:
    import torch

    import svdq_compile
    from svdq_compile.demo import model as demo_model

    if demo_model.CHECKPOINT_PATH.is_file():
        model = demo_model.load_pretrained()
    else:
        log.warning("demo checkpoint %s not found; exporting a randomly initialised demo model",
                    demo_model.CHECKPOINT_PATH)
        model = demo_model.build_model().eval().requires_grad_(False)
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)

    def sample(b: int) -> tuple:
        return (torch.randn(b, cfg.image_channels, cfg.image_size, cfg.image_size, generator=g),
                torch.rand(b, generator=g), torch.randint(0, cfg.num_classes + 1, (b,), generator=g))

    example = sample(batch)
    if artifact is not None:
        _load_artifact(model, artifact)
    else:
        log.warning("no --artifact: quantizing the demo model from random calibration inputs "
                    "(run `svdq quantize` and pass --artifact for calibrated quality)")
        svdq_compile.quantize(model, example, [sample(16) for _ in range(2)], progress=False)
    dynamic = None
    if not static:
        b = torch.export.Dim("batch")
        dynamic = ({0: b}, {0: b}, {0: b})
    return model, example, dynamic


def _load_artifact(model: Any, artifact: str) -> None:
    """Load an artifact saved from the model itself or from its ``transformer`` submodule."""
    import svdq_compile

    try:
        svdq_compile.load(model, artifact)
    except svdq_compile.ArtifactError:
        inner = getattr(model, "transformer", None)
        if inner is None:
            raise
        svdq_compile.load(inner, artifact)


def _user_model(spec: str, artifact: Any) -> tuple:
    module_name, _, fn_name = spec.partition(":")
    if not module_name or not fn_name:
        raise ValueError(f"--model must be 'demo' or 'module:function', got {spec!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the working directory import
    fn = getattr(importlib.import_module(module_name), fn_name)
    out = fn()
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise ValueError(f"{spec}() must return (model, example_inputs) or (model, example_inputs, dynamic_shapes)")
    model, example, dynamic = (*out, None) if len(out) == 2 else out
    if artifact is not None:
        _load_artifact(model, artifact)
    return model, example, dynamic


def _trtexec_command(path: Any, sizes: dict) -> str:
    """A trtexec line for the file: a dynamic axis gets 1 (min), its size in the example
    inputs (opt, from ``sizes``) and 4x that (max)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name for t in graph.initializer}
    flags = {"min": [], "opt": [], "max": []}
    dynamic = False
    for inp in graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        for kind, f in (("min", lambda d: 1), ("opt", lambda d: d), ("max", lambda d: 4 * d)):
            shape = [str(d.dim_value) if not d.dim_param else str(f(sizes.get(d.dim_param, 1))) for d in dims]
            flags[kind].append(f"{inp.name}:{'x'.join(shape) or '1'}")
        dynamic = dynamic or any(d.dim_param for d in dims)
    cmd = f"trtexec --onnx={path} --fp16"
    if dynamic:
        cmd += "".join(f" --{k}Shapes={','.join(v)}" for k, v in flags.items())
    return cmd + f" --saveEngine={Path(path).with_suffix('.plan')}"


def _dim_sizes(path: Any, example: Any) -> dict:
    """Symbolic dim name -> its size in the example inputs (matched by input name or position)."""
    import onnx
    import torch

    graph = onnx.load(str(path), load_external_data=False).graph
    tensors = list(example.values()) if isinstance(example, dict) else list(example) \
        if isinstance(example, (tuple, list)) else [example]
    by_name = example if isinstance(example, dict) else {}
    sizes = {}
    for i, inp in enumerate(graph.input):
        t = by_name.get(inp.name, tensors[i] if i < len(tensors) else None)
        if not isinstance(t, torch.Tensor):
            continue
        for d, n in zip(inp.type.tensor_type.shape.dim, t.shape):
            if d.dim_param:
                sizes.setdefault(d.dim_param, int(n))
    return sizes


def run(args: argparse.Namespace) -> int:
    import torch

    from svdq_compile.export import TensorRTUnavailableError, export_onnx, export_tensorrt

    if args.model == DEMO:
        model, example, dynamic = _demo(args.batch, args.static, args.artifact)
        stem = "svdq_demo"
    else:
        model, example, dynamic = _user_model(args.model, args.artifact)
        stem = args.model.partition(":")[2]
    model.eval()
    if args.format == "tensorrt":
        out = args.output or f"{stem}.ep"
        try:
            export_tensorrt(model.cuda() if torch.cuda.is_available() else model,
                            example, out, dynamic_shapes=dynamic)
        except TensorRTUnavailableError as e:
            print(f"svdq export: {e}", file=sys.stderr)
            return 2
        print(f"wrote {out}")
        return 0

    out = args.output or f"{stem}.onnx"
    res = export_onnx(model, example, out, dynamic_shapes=dynamic, opset=args.opset, check=not args.no_check,
                      flavor=args.flavor, int8_kernel=args.int8_kernel)
    print(f"wrote {res.path} ({res.flavor}, {res.file_bytes / 1e6:.2f} MB, {res.quantized_linears} quantized linears, "
          f"opset {res.opset}, {sum(res.op_types.values())} nodes)")
    print("op types: " + ", ".join(f"{k}={v}" for k, v in sorted(res.op_types.items())))
    if args.flavor == "deploy":
        try:
            from svdq_compile.export import describe_op_types, ort_optimized_op_types

            print("ONNX Runtime (CPU EP, default options) runs these ops after its optimizations:\n"
                  + describe_op_types(ort_optimized_op_types(res.path, exact=False)))
        except ImportError:
            print("(install onnxruntime to list the ops ONNX Runtime runs)")
        print("TensorRT: use --flavor exact (the deploy file uses com.microsoft.MatMulIntegerToFloat)")
        return 0
    print("TensorRT engine (see docs/export.md):\n  " + _trtexec_command(res.path, _dim_sizes(res.path, example)))
    return 0
