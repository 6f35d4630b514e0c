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


def check_attention(ours, oracles, accumulator_dtype):
    """The attention tests' one check of ``(out, lse, dq, dk, dv)`` against ``(reference, same-dtype torch,
    floors)`` tuples in that order: out and the finite LSE entries within 2x, gradients within 3x torch's
    error plus the floor; the LSE in the accumulator dtype with its -inf rows where the reference has them.
    A gradient given as None (not computed by the call under test) is not checked."""
    ref, same, floor = oracles
    out, lse, dq, dk, dv = ours
    assert_close(out, same[0], ref[0], FACTOR_OUTPUT, "out", floor=floor[0])
    assert lse.dtype == accumulator_dtype
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf rows differ from the reference"
    assert_close(lse[finite], same[1][finite].to(accumulator_dtype), ref[1][finite], FACTOR_OUTPUT, "lse",
                 floor=floor[1][finite])
    for i, name, g in zip((2, 3, 4), ("dq", "dk", "dv"), (dq, dk, dv)):
        if g is not None:
            assert_close(g, same[i], ref[i], FACTOR_GRAD, name, floor=floor[i])
