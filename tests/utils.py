"""Shared test helpers: devices, dtypes, and the two-oracle error check (flash-attention's method)."""

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"

# bf16 arithmetic does not work under Triton's interpreter (upstream gap): tested on CUDA only.
DTYPES = [torch.float16, torch.float32, torch.float64] + ([torch.bfloat16] if ON_GPU else [])
LOW_PRECISION = (torch.float16, torch.bfloat16)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against(ours, same_dtype, ref, factor, name="output"):
    """Assert ``max|ours - ref| <= factor * max|same_dtype - ref| + floor``.

    ``ref`` is computed in fp64; ``same_dtype`` is PyTorch's own path in the dtype under test. The floor
    is a few units of rounding at the reference's magnitude, so cases where torch's path is exact (fp64,
    where it *is* the reference) do not demand bitwise equality of a different summation order: 2 ulps,
    8 for fp64 (whose only bound is the floor).
    """
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert ours.dtype == same_dtype.dtype, f"{name}: dtype {ours.dtype} != {same_dtype.dtype}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = max_err(ours, ref)
    base = max_err(same_dtype, ref)
    scale = ref.abs().max().item() if ref.numel() else 0.0
    ulps = 8 if ours.dtype == torch.float64 else 2
    floor = ulps * torch.finfo(ours.dtype).eps * max(scale, 1e-3)
    assert err <= factor * base + floor, (
        f"{name}: max error {err:.3e} > {factor} x torch's {base:.3e} + floor {floor:.1e}"
    )
