"""What the AOT report compiles for: GPU architectures and dtype cases.

The architectures and their per-block limits are the kernels' own table (``kernels/arch.py``); the report
compiles for the calibrated ones (sm_80 and sm_90) unless told otherwise.
"""

from __future__ import annotations

import dataclasses

import torch

from ..kernels.arch import ARCHS, CALIBRATED

DEFAULT_ARCHS = CALIBRATED


@dataclasses.dataclass(frozen=True)
class DtypeCase:
    torch_dtype: torch.dtype
    fp32_precision: str | None  # tl.dot input precision for fp32 operands; None for other dtypes
    needs_tensor_cores: bool

    @property
    def nbytes(self) -> int:
        return self.torch_dtype.itemsize


DTYPES = {
    "fp16": DtypeCase(torch.float16, None, True),
    "bf16": DtypeCase(torch.bfloat16, None, True),
    "fp32-tf32": DtypeCase(torch.float32, "tf32", True),
    "fp32-ieee": DtypeCase(torch.float32, "ieee", False),
    "fp64": DtypeCase(torch.float64, None, False),
}

# Triton's pointer element types of the torch dtypes a launch may pass.
TRITON_DTYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "i1",
}
TORCH_DTYPES = {v: k for k, v in TRITON_DTYPES.items()}


def check_targets(archs, dtypes=None) -> None:
    """Raise ``ValueError`` naming an architecture not in ``kernels.arch.ARCHS`` or an unknown dtype case."""
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch}")
    for d in dtypes or ():
        if d not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {d!r}")
