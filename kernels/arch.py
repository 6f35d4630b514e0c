"""The GPU architectures the tile policy knows: what one thread block may use on each, and how a
kernel's matmuls run for a dtype (:func:`matmul_path`).

One table for the config modules (``linear_configs``, ``attention_configs``: shared memory a tile may
take) and the AOT report (``gradkernels.aot``: the limits a compiled kernel is judged by). Values from the
CUDA C Programming Guide, "Technical Specifications per Compute Capability".

Architectures are compute capabilities as ints: 80 (A100), 86 (GA10x), 89 (Ada), 90 (H100/H200). The
tile rules are calibrated on sm_80 and sm_90 (:data:`CALIBRATED`); sm_86/sm_89 use sm_80's rules with
their own, smaller shared memory.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-block limits of one architecture and the tensor-core instruction Triton emits there."""

    smem_per_block: int  # opt-in maximum of static + dynamic shared memory, bytes
    regs_per_block: int  # 32-bit registers one block may hold
    tensor_core_op: str  # SASS opcode of the tensor-core matmul for 16-bit and tf32 dots


ARCHS = {
    80: Arch(166912, 65536, "HMMA"),  # A100: 163 KiB per block (164 KiB per SM - 1 KiB reserved)
    86: Arch(101376, 65536, "HMMA"),  # GA10x: 99 KiB
    89: Arch(101376, 65536, "HMMA"),  # Ada: 99 KiB
    90: Arch(232448, 65536, "HGMMA"),  # H100/H200: 227 KiB; wgmma
}

# The architectures the tile rules and the generated attention table were calibrated on.
CALIBRATED = (80, 90)

# What the prunes assume when a launch's device has no compute capability (a CPU tensor in a test).
DEFAULT_ARCH = 90


def limits(arch: int) -> Arch:
    """The limits of ``arch``; sm_80's for an architecture not in :data:`ARCHS`."""
    return ARCHS.get(arch, ARCHS[80])


def calibrated(arch: int) -> int:
    """The calibrated architecture whose tile rules apply to ``arch``: 90 from sm_90 on, else 80."""
    return 90 if arch >= 90 else 80


def matmul_path(dtype_bytes: int, input_precision: str | None) -> str:
    """How a kernel's ``tl.dot`` s run for operands of ``dtype_bytes`` bytes and an ``INPUT_PRECISION``:
    on tensor cores ("tc16": fp16/bf16, "tc32": tf32) or as FMAs ("fma32": fp32 "ieee", "fma64")."""
    if dtype_bytes == 8:
        return "fma64"
    if dtype_bytes == 4:
        return "tc32" if input_precision == "tf32" else "fma32"
    return "tc16"


# Hopper's TMA unit, through Triton's device-side tensor descriptors (``tl.make_tensor_descriptor``).
TMA_MIN_ARCH = 90


def tma_supported(arch) -> bool:
    """Whether TMA tiles may run on ``arch`` (an int): sm_90 and later, with a Triton that has device-side
    tensor descriptors (3.6 and 3.9 do). Whether a launch's tensors allow them is each config module's
    rule (``attention_configs.tma_compatible``, ``linear_configs.tma_layout``)."""
    import triton.language as tl

    return arch is not None and int(arch) >= TMA_MIN_ARCH and hasattr(tl, "make_tensor_descriptor")
