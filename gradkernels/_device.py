"""The one place that decides how a call runs, and every platform check.

- CUDA tensors                          -> compiled Triton kernels ("triton")
- CPU tensors with TRITON_INTERPRET=1   -> the same kernels under Triton's interpreter ("interpreter")
- CPU tensors otherwise                 -> the reference PyTorch path, same semantics ("torch")

``TRITON_INTERPRET`` is read by Triton's decorators when ``triton`` is first imported, so it must be
set before that (``tests/conftest.py`` does so when no GPU is present).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["triton", "interpreter", "torch"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the platform
        return False
    return True


def interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backend_for(tensor: torch.Tensor) -> Backend:
    """Which implementation a gradkernels call on ``tensor`` uses.

    Returns:
        ``"triton"`` (compiled kernels on a CUDA device), ``"interpreter"`` (the same kernels on the
        CPU through ``TRITON_INTERPRET=1``) or ``"torch"`` (the reference PyTorch path).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"backend_for expects a torch.Tensor, got {type(tensor).__name__}")
    if not triton_available():
        return "torch"
    if tensor.dtype == torch.bfloat16 and interpreter_enabled():
        # The interpreter stores bf16 as uint16 and does arithmetic on the bit patterns
        # (triton-lang/triton#11584): never give a silent wrong answer, use torch instead.
        return "torch"
    if tensor.device.type == "cuda":
        # torch.version.hip: Triton's AMD backend compiles the same kernels.
        return "interpreter" if interpreter_enabled() else "triton"
    if tensor.device.type == "cpu" and interpreter_enabled():
        return "interpreter"
    return "torch"


def use_autotune() -> bool:
    """Autotuning times configs on a GPU; under the interpreter one pinned config is launched."""
    return not interpreter_enabled()


def fp32_input_precision(device: torch.device) -> str:
    """The ``tl.dot`` input precision for fp32 operands that follows torch's own flags.

    tf32 only where torch itself would use it for a matmul on this device
    (``torch.backends.cuda.matmul.allow_tf32`` / ``torch.set_float32_matmul_precision``).
    """
    if device.type != "cuda":
        return "ieee"
    if torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    return fp32_input_precision(device) if dtype == torch.float32 else "ieee"


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None = None) -> int:
    """Streaming multiprocessors of a CUDA device; a nominal 132 (H100) elsewhere.

    Used only to decide how far to split a reduction; results do not depend on it.
    """
    if torch.cuda.is_available():
        idx = torch.cuda.current_device() if device_index is None else device_index
        return torch.cuda.get_device_properties(idx).multi_processor_count
    return 132


def cuda_capability() -> tuple[int, int] | None:
    if torch.cuda.is_available():
        return torch.cuda.get_device_capability()
    return None




def device_arch(device: torch.device) -> int:
    """Compute capability of a device as an int (80 for sm_80, 90 for sm_90, ...), what the tile rules of
    ``kernels/*_configs.py`` take.

    A CUDA device answers its own; any other device (a CPU tensor handed to an autotuner's prune in a
    test) is taken for ``kernels.arch.DEFAULT_ARCH`` (sm_90).
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major * 10 + minor
    from .kernels.arch import DEFAULT_ARCH

    return DEFAULT_ARCH
