"""Attention suite: gradkernels' Flash-style attention against every SDPA backend and the naive paths.

Providers (``sdpa-flash`` is the baseline):

- ``gradkernels``: :func:`gradkernels.attention`.
- ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``:
  ``F.scaled_dot_product_attention`` pinned to one backend with ``torch.nn.attention.sdpa_kernel``. A
  backend that cannot run a case (not built, wrong dtype or head dim, not on this GPU) is reported as
  unavailable with torch's own reason.
- ``naive``: :func:`gradkernels.reference.naive_attention`, an autograd Function that saves the
  B x H x Lq x Lk softmax matrix.
- ``naive-autograd``: :func:`gradkernels.reference.standard_attention`, composed torch ops.

Every case has ``Lq == Lk``, where torch's top-left causal mask and this library's bottom-right one are
the same mask. Default sizes follow FlashAttention's benchmark: ``B * L = 16k`` tokens and
``H * D = 2048``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import reference, testing
from .._device import backend_for
from .flops import attention_flops
from .harness import Registry, Unavailable

REGISTRY = Registry("attention")

TOKENS = 16384  # B * L of the default sweep
HIDDEN = 2048  # H * D of the default sweep


@dataclass(frozen=True)
class AttentionCase:
    """q, k, v of shape (B, H, L, D), every one requiring grad."""

    group: str
    B: int
    H: int
    L: int
    D: int
    causal: bool
    dtype: torch.dtype

    def fields(self) -> dict:
        return {"B": self.B, "H": self.H, "Lq": self.L, "Lk": self.L, "D": self.D, "causal": self.causal}

    def label(self) -> str:
        return f"B={self.B} H={self.H} L={self.L} D={self.D}" + (" causal" if self.causal else "")

    def flops(self, mode: str) -> float:
        return attention_flops(self.B, self.H, self.L, self.L, self.D, self.causal, mode)

    def make_inputs(self, device, requires_grad: bool = True) -> dict:
        shape = (self.B, self.H, self.L, self.D)
        return {name: torch.randn(shape, device=device, dtype=self.dtype).requires_grad_(requires_grad)
                for name in ("q", "k", "v")}

    def make_grad_output(self, device) -> torch.Tensor:
        return torch.randn(self.B, self.H, self.L, self.D, device=device, dtype=self.dtype)

    def reference(self, inputs: dict) -> torch.Tensor:
        """Composed torch ops on the (fp64) inputs: the textbook computation."""
        return reference.standard_attention(inputs["q"], inputs["k"], inputs["v"], causal=self.causal)

    def oracle(self, inputs: dict, dout: torch.Tensor):
        """(output, {input name: gradient}, floors) for the correctness check: ``gradkernels.testing``'s
        high-precision reference and rounding-error bounds (floors keyed like the gradients, "out")."""
        args = (inputs["q"], inputs["k"], inputs["v"], dout)
        ref = testing.attention_reference(*args, causal=self.causal)
        bound = testing.attention_bounds(*args, causal=self.causal)
        keys = {"q": "dq", "k": "dk", "v": "dv"}
        return (ref["out"], {k: ref[v] for k, v in keys.items()},
                {"out": bound["out"], **{k: bound[v] for k, v in keys.items()}})


def gradkernels_attention():
    """:func:`gradkernels.attention`, or None while this build does not have it."""
    import gradkernels

    return getattr(gradkernels, "attention", None)


@REGISTRY.register("gradkernels", kernel=True, description="gradkernels.attention (Flash-style Triton kernels)")
def _gradkernels(case: AttentionCase, inputs: dict) -> torch.Tensor:
    attention = gradkernels_attention()
    if attention is None:
        raise Unavailable("gradkernels.attention is not in this build")
    q = inputs["q"]
    if backend_for(q) == "torch":
        if q.dtype == torch.bfloat16 and q.device.type != "cuda":
            raise Unavailable("bf16 kernels need a GPU (Triton's interpreter cannot do bf16 arithmetic)")
        raise Unavailable(f"no Triton backend for {q.device.type} tensors here")
    return attention(q, inputs["k"], inputs["v"], causal=case.causal)


def _sdpa(backend_name: str):
    def run(case: AttentionCase, inputs: dict) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            raise Unavailable(f"this torch has no SDPBackend.{backend_name}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"],
                                                          is_causal=case.causal)
            except RuntimeError as exc:
                msg = str(exc)
                if "No available kernel" in msg or "No viable backend" in msg:
                    # torch says why in its warnings ("... not used because ..."): keep the first reason.
                    why = next((str(w.message).splitlines()[0] for w in caught), None)
                    if why is None and q_device(inputs) != "cuda":
                        why = f"not available for {q_device(inputs)} tensors"
                    raise Unavailable(f"SDPBackend.{backend_name} refused this case: {why or msg.splitlines()[0]}") from None
                raise

    run.__doc__ = f"F.scaled_dot_product_attention with SDPBackend.{backend_name} only"
    return run


def q_device(inputs: dict) -> str:
    return inputs["q"].device.type


REGISTRY.register("sdpa-flash", baseline=True)(_sdpa("FLASH_ATTENTION"))
REGISTRY.register("sdpa-efficient")(_sdpa("EFFICIENT_ATTENTION"))
REGISTRY.register("sdpa-cudnn")(_sdpa("CUDNN_ATTENTION"))
REGISTRY.register("sdpa-math")(_sdpa("MATH"))


@REGISTRY.register("naive", description="reference.naive_attention (saves the Lq x Lk softmax)")
def _naive(case: AttentionCase, inputs: dict) -> torch.Tensor:
    return reference.naive_attention(inputs["q"], inputs["k"], inputs["v"], causal=case.causal)


@REGISTRY.register("naive-autograd", description="reference.standard_attention (composed torch ops)")
def _naive_autograd(case: AttentionCase, inputs: dict) -> torch.Tensor:
    return reference.standard_attention(inputs["q"], inputs["k"], inputs["v"], causal=case.causal)


def timing_cases(dtype: torch.dtype, quick: bool = False, seqlens=None, head_dims=None, causal=(False, True),
                 batch: int | None = None, heads: int | None = None) -> list[AttentionCase]:
    """D x L x causal sweep; B and H default to ``16k / L`` and ``2048 / D``.

    ``quick`` keeps one head dim (128): every (D, causal) pair is a kernel variant that the autotuner
    compiles and times config by config, which dominates a short run.
    """
    seqlens = seqlens or ((1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384))
    head_dims = head_dims or ((128,) if quick else (64, 128))
    cases = []
    for d in head_dims:
        for c in causal:
            for seqlen in seqlens:
                b = batch or max(1, TOKENS // seqlen)
                h = heads or max(1, HIDDEN // d)
                cases.append(AttentionCase("attention", b, h, seqlen, d, c, dtype))
    return cases


def check_cases(dtype: torch.dtype, on_gpu: bool = False, head_dims=None, causal=(False, True)) -> list[AttentionCase]:
    """Small cases for the correctness check.

    CPU: tiny odd shapes (a length no tile divides, a head dim that is no power of two), cheap under the
    interpreter. GPU: the (D, causal) variants the timings use, at an odd length, so the check covers
    exactly the kernels that are timed without compiling others (the test suite covers odd head dims).
    """
    if on_gpu:
        return [AttentionCase("check", 2, 3, 257, d, c, dtype) for d in (head_dims or (128,)) for c in causal]
    return [
        AttentionCase("check", 1, 2, 37, 16, False, dtype),
        AttentionCase("check", 2, 1, 37, 40, True, dtype),
    ]
