"""The one place that decides how a call runs, and every platform check.

- CUDA tensors                          -> compiled Triton kernels ("triton")
- CPU tensors with TRITON_INTERPRET=1   -> the same kernels under Triton's interpreter ("interpreter")
- CPU tensors otherwise                 -> the reference PyTorch path, same semantics ("torch")

The interpreter itself is chosen when the kernels are *defined*: ``@triton.jit`` reads ``TRITON_INTERPRET``
when it decorates a function, i.e. when ``gradkernels`` (``gradkernels.kernels``) is first imported.
``TRITON_INTERPRET=1`` must therefore be in the environment before that (``tests/conftest.py`` sets it
when no GPU is present). Setting it later cannot turn compiled kernels into interpreted ones:
:func:`backend_for` then raises a ``RuntimeError`` saying so for CPU tensors, instead of launching GPU
kernels on them.

:func:`force_torch_backend` is a switch for tests and debugging: while it is active every call runs the
torch path, whatever the device (meta tensors aside, which never compute).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, Literal

import torch

Backend = Literal["triton", "interpreter", "torch"]


def _kernels_interpreted() -> bool:
    # What Triton's decorator actually produced for our kernels (at their import, once): an
    # InterpretedFunction (they run on CPU tensors through numpy) or a JITFunction (compiled for a GPU).
    # triton.runtime.interpreter.InterpretedFunction is public from triton 2.2 through 3.9.
    from triton.runtime.interpreter import InterpretedFunction

    from .kernels import _common

    return isinstance(_common.load_tile, InterpretedFunction)


try:
    import triton  # noqa: F401

    _TRITON = True
except Exception:  # pragma: no cover - depends on the platform
    _TRITON = False

_INTERPRETED = _TRITON and _kernels_interpreted()

# Process-wide, not per thread: autograd may run a backward on another thread than its forward.
_force_torch = 0


def triton_available() -> bool:
    """Whether ``triton`` imports on this machine (decided once, at import)."""
    return _TRITON


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is in the environment now."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_enabled() -> bool:
    """True when the kernels were defined under ``TRITON_INTERPRET=1`` (they run on CPU tensors)."""
    return _INTERPRETED


@contextlib.contextmanager
def force_torch_backend() -> Iterator[None]:
    """Run every gradkernels call on the ``"torch"`` backend while active (process-wide).

    The torch backend is the reference PyTorch path with the kernels' semantics (the same custom ops,
    autograd and saved tensors; only the innermost computation differs). Used by the tests to check every
    backend in one process, and handy for telling a kernel problem from an integration problem. Enter it
    around forward *and* backward. Nesting is allowed.
    """
    global _force_torch
    _force_torch += 1
    try:
        yield
    finally:
        _force_torch -= 1


def backend_for(tensor: torch.Tensor) -> Backend:
    """Which implementation a gradkernels call on ``tensor`` uses.

    Returns:
        ``"triton"`` (compiled kernels on a CUDA device), ``"interpreter"`` (the same kernels on the
        CPU through Triton's interpreter) or ``"torch"`` (the reference PyTorch path).

    Raises:
        TypeError: ``tensor`` is not a tensor.
        RuntimeError: a CPU tensor while ``TRITON_INTERPRET=1`` is set but the kernels were defined
            before it was (they are compiled for a GPU and cannot run on the CPU).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"backend_for expects a torch.Tensor, got {type(tensor).__name__}")
    if _force_torch or not _TRITON:
        return "torch"
    interpreted = _INTERPRETED
    if tensor.dtype == torch.bfloat16 and interpreted:
        # The interpreter stores bf16 as uint16 and does arithmetic on the bit patterns
        # (triton-lang/triton#11584): never give a silent wrong answer, use torch instead.
        return "torch"
    if tensor.device.type == "cuda":
        # torch.version.hip: Triton's AMD backend compiles the same kernels.
        return "interpreter" if interpreted else "triton"
    if tensor.device.type == "cpu" and interpreter_requested():
        if interpreted:
            return "interpreter"
        raise RuntimeError(
            "TRITON_INTERPRET=1 is set, but gradkernels' kernels were defined before it was (Triton's "
            "@jit reads it when gradkernels is first imported), so they are compiled for a GPU and "
            "cannot run on CPU tensors. Set TRITON_INTERPRET=1 in the environment before importing "
            "triton or gradkernels (e.g. `TRITON_INTERPRET=1 python script.py`), or unset it to run "
            "CPU tensors on the torch backend."
        )
    return "torch"


def use_autotune() -> bool:
    """Autotuning times configs on a GPU; under the interpreter one pinned config is launched."""
    return not interpreter_enabled()


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_scratch_allocator() -> None:
    """Give Triton a global-scratch allocator, unless the caller has set one.

    Kernels that build TMA tensor descriptors on the device (``tl.make_tensor_descriptor``: the attention
    kernels' TMA tiles) write them to scratch memory that Triton asks an allocator for at launch
    (``triton.set_allocator``; without one the launch raises). This one takes it from torch's caching
    allocator (128 bytes per descriptor and program). Triton keeps the allocator in a context variable,
    so it is set in the launching thread (autograd may run a backward on another); a caller's own is kept.
    """
    import triton

    try:  # Triton's context variable: not public API, consulted only where it exists
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except (ImportError, AttributeError):  # pragma: no cover - depends on the Triton version
        pass
    triton.set_allocator(_torch_scratch)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in effect for ``device_type``, or None (also for devices without autocast,
    such as ``meta``)."""
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(device_type: str, *tensors):
    """``tensors`` as torch's autocast would hand them to a matmul-like op on ``device_type``.

    Floating fp32/fp16/bf16 tensors go to the autocast dtype when autocast is on; fp64, non-floating
    tensors and None are left alone, as are all tensors on devices without autocast (``meta``).
    """
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(
        t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype) for t in tensors
    )


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

    Used only to decide how far to split a reduction (linear split-K, the decoding kernel's key splits);
    results depend on it only through the order of the sums (rounding), never beyond.
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
