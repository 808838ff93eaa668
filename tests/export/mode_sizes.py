"""File size and SQNR of every mode's ONNX export of the 512-wide block (docs/export.md, "File size per mode").

    python -m tests.export.mode_sizes [MODE ...]      # from the repository root; prints a markdown table

Per mode: ``QMLPBlock`` (LayerNorm -> q + GELU MLP, 512 wide, MLP 2048) quantized by
:func:`~tests.export.export_helpers.quantized_qmlp_block`, exported with both flavours; the file
size against the bf16 parameter bytes, and the SQNR of ONNX Runtime's output against the torch
quantized model (``ort_session(exact=True)`` for the exact file, ONNX Runtime's defaults for the
deploy file) on 2 x 16 tokens.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from svdq_compile import sqnr_db
from svdq_compile.export import bf16_parameter_bytes, export_onnx, ort_session
from tests.export.export_helpers import qmlp_input, quantized_qmlp_block

# Every mode quantize() writes (w4a4-nunchaku / w4a4-nvfp4 come from the Nunchaku importer only).
MODES = ("w4a4", "w4a8", "w8a8", "w8a4", "w4a16", "w8a16", "w4a8-int8", "w4a8-fp8")
FLAVORS = ("exact", "deploy")


def measure(mode: str, tmp: Path) -> list[dict]:
    model = quantized_qmlp_block(mode)
    x = qmlp_input()
    with torch.no_grad():
        ref = model(x)
    bf16 = bf16_parameter_bytes(model)
    rows = []
    for flavor in FLAVORS:
        res = export_onnx(model, (x,), tmp / f"{mode}_{flavor}.onnx", flavor=flavor)
        sess = ort_session(res.path, exact=flavor == "exact")
        out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        rows.append({"mode": mode, "flavor": flavor, "bytes": res.file_bytes, "bf16": bf16,
                     "ratio": res.file_bytes / bf16, "sqnr_db": float(sqnr_db(ref, out))})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("modes", nargs="*", default=list(MODES))
    args = ap.parse_args(argv)
    import onnxruntime

    print(f"QMLPBlock (512 wide, MLP 2048), rank 32; ONNX Runtime {onnxruntime.__version__}, torch "
          f"{torch.__version__}, {platform.machine()}")
    print("| mode | exact: MB | x bf16 | SQNR vs torch | deploy: MB | x bf16 | SQNR vs torch |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for mode in args.modes:
            e, p = measure(mode, Path(d))
            print(f"| `{mode}` | {e['bytes'] / 1e6:.2f} | {e['ratio']:.3f}x | {e['sqnr_db']:.1f} dB "
                  f"| {p['bytes'] / 1e6:.2f} | {p['ratio']:.3f}x | {p['sqnr_db']:.1f} dB |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
