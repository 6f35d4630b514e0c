"""Test-side helpers: the device, the dtypes a run covers, and the package's accuracy rule re-exported.

The rule itself (two oracles, elementwise floors from rounding-error bounds, higher-precision fp64
references) lives in :mod:`gradkernels.testing`, shared with the benchmarks' checks.
"""

import torch

from gradkernels.testing import FACTOR_GRAD, FACTOR_OUTPUT, assert_close, max_err  # noqa: F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# bf16 arithmetic does not work under Triton's interpreter (upstream gap): tested on CUDA only.
DTYPES = [torch.float16, torch.float32, torch.float64] + ([torch.bfloat16] if ON_GPU else [])
LOW_PRECISION = (torch.float16, torch.bfloat16)
