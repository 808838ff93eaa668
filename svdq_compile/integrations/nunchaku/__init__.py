"""Nunchaku checkpoints (svdq-int4 / svdq-fp4) loaded into diffusers models (issue #28).

    import svdq_compile
    model = svdq_compile.load_nunchaku(None, "svdq-int4_r32-flux.1-dev.safetensors")
    model = torch.compile(model, backend="svdquant")

See :mod:`.loader` for what is installed, :mod:`.layout` for the tensor layouts,
:mod:`.names` for the per-architecture name map and docs/nunchaku.md for measurements.
"""
from svdq_compile.runtime import nunchaku_scheme as _nunchaku_scheme  # registers w4a4-nunchaku / w4a4-nvfp4
from svdq_compile.integrations.nunchaku.checkpoint import Checkpoint, NunchakuFormatError, read_checkpoint
from svdq_compile.integrations.nunchaku.loader import RETARGET_MODES, build_model, load_nunchaku, plan_nunchaku
from svdq_compile.integrations.nunchaku.names import ARCHS

__all__ = ["load_nunchaku", "build_model", "plan_nunchaku", "read_checkpoint", "Checkpoint", "NunchakuFormatError",
           "RETARGET_MODES", "ARCHS"]
