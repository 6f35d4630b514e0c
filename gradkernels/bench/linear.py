"""Linear-layer suite: gradkernels' fused linear against cuBLAS (``F.linear``) and the naive reference.

Providers (``torch`` is the baseline):

- ``gradkernels``: :func:`gradkernels.linear`, bias and activation fused into the matmul epilogue and
  the activation's derivative into the backward prologue.
- ``torch``: ``F.linear`` (cuBLAS), followed by the activation as a separate op when there is one
  (``F.gelu(F.linear(x, w, b))``, the unfused path).
- ``naive``: :func:`gradkernels.reference.linear` (hand-written autograd Function over ``@``).

Case groups: ``square`` (``M = N = K``, no bias, no activation: the plain GEMM), ``gelu`` (same sizes with
bias + GELU: fused vs unfused), ``small_m`` (``M <= 256`` tokens against large weights, where cuBLAS's
small-M kernels are hard to beat), ``custom`` (``--shapes``), ``check`` (tiny odd shapes for the
correctness check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import reference, testing
from .._device import backend_for
from .flops import linear_flops
from .harness import Registry, Unavailable

REGISTRY = Registry("linear")


@dataclass(frozen=True)
class LinearCase:
    """``act(x @ W^T + b)`` with x (M, K), W (N, K); every input requires grad."""

    group: str
    M: int
    N: int
    K: int
    bias: bool
    activation: str | None
    dtype: torch.dtype

    def fields(self) -> dict:
        return {"M": self.M, "N": self.N, "K": self.K, "bias": self.bias, "activation": self.activation or ""}

    def label(self) -> str:
        extra = ("+bias" if self.bias else "") + (f"+{self.activation}" if self.activation else "")
        return f"M={self.M} N={self.N} K={self.K}" + (f" {extra}" if extra else "")

    def flops(self, mode: str) -> float:
        return linear_flops(self.M, self.N, self.K, mode)

    def make_inputs(self, device, requires_grad: bool = True) -> dict:
        # Weights at nn.Linear's scale so outputs stay O(1) at any K (no overflow in fp16).
        x = torch.randn(self.M, self.K, device=device, dtype=self.dtype)
        w = torch.randn(self.N, self.K, device=device, dtype=self.dtype) / math.sqrt(self.K)
        b = torch.randn(self.N, device=device, dtype=self.dtype) if self.bias else None
        inputs = {"x": x, "weight": w, "bias": b}
        for t in inputs.values():
            if t is not None:
                t.requires_grad_(requires_grad)
        return inputs

    def make_grad_output(self, device) -> torch.Tensor:
        return torch.randn(self.M, self.N, device=device, dtype=self.dtype)

    def reference(self, inputs: dict) -> torch.Tensor:
        """Plain torch ops on the (fp64) inputs: the textbook computation."""
        return reference.activation_fn(F.linear(inputs["x"], inputs["weight"], inputs["bias"]), self.activation)

    def oracle(self, inputs: dict, dout: torch.Tensor):
        """(output, {input name: gradient}, floors) for the correctness check: ``gradkernels.testing``'s
        high-precision reference and rounding-error bounds (floors keyed like the gradients, "out")."""
        args = (inputs["x"], inputs["weight"], inputs["bias"], self.activation, dout)
        ref, bound = testing.linear_reference(*args), testing.linear_bounds(*args)
        names = {"x": "dx", "weight": "dw", "bias": "db"}
        grads = {k: ref[v] for k, v in names.items() if inputs[k] is not None}
        floors = {"out": bound["out"], **{k: bound[v] for k, v in names.items() if inputs[k] is not None}}
        return ref["out"], grads, floors


@REGISTRY.register("gradkernels", kernel=True, description="gradkernels.linear (fused bias + activation)")
def _gradkernels(case: LinearCase, inputs: dict) -> torch.Tensor:
    import gradkernels

    backend = backend_for(inputs["x"])
    if backend == "torch":
        raise Unavailable(_no_kernel_reason(inputs["x"]))
    return gradkernels.linear(inputs["x"], inputs["weight"], inputs["bias"], case.activation)


@REGISTRY.register("torch", baseline=True, description="F.linear (cuBLAS), activation as a separate op")
def _torch(case: LinearCase, inputs: dict) -> torch.Tensor:
    return reference.activation_fn(F.linear(inputs["x"], inputs["weight"], inputs["bias"]), case.activation)


@REGISTRY.register("naive", description="gradkernels.reference.linear (hand-written autograd over @)")
def _naive(case: LinearCase, inputs: dict) -> torch.Tensor:
    return reference.linear(inputs["x"], inputs["weight"], inputs["bias"], case.activation)


def _no_kernel_reason(t: torch.Tensor) -> str:
    """Why gradkernels would fall back to its reference path for ``t`` (so it is not benchmarked)."""
    if t.dtype == torch.bfloat16 and t.device.type != "cuda":
        return "bf16 kernels need a GPU (Triton's interpreter cannot do bf16 arithmetic)"
    return f"no Triton backend for {t.device.type} tensors here (set TRITON_INTERPRET=1 before importing)"


def timing_cases(dtype: torch.dtype, quick: bool = False, shapes=None, bias: bool = False,
                 activation: str | None = None) -> list[LinearCase]:
    """The timed cases: ``shapes`` (a list of (M, N, K)) when given, else the standard groups.

    ``quick`` keeps one size per group (each new size is an autotuning run, each new activation a set
    of compilations).
    """
    if shapes:
        return [LinearCase("custom", m, n, k, bias, activation, dtype) for m, n, k in shapes]
    squares = (4096,) if quick else (4096, 8192)
    small_m = (128,) if quick else (16, 64, 128, 256)
    small_nk = (4096,) if quick else (4096, 8192)
    cases = [LinearCase("square", s, s, s, False, None, dtype) for s in squares]
    cases += [LinearCase("gelu", s, s, s, True, "gelu", dtype) for s in squares]
    cases += [LinearCase("small_m", m, nk, nk, False, None, dtype) for nk in small_nk for m in small_m]
    return cases


def check_cases(dtype: torch.dtype, on_gpu: bool = False) -> list[LinearCase]:
    """Small cases for the correctness check.

    CPU: tiny odd shapes, every tile partly masked under the interpreter's 32x32 tiles. GPU: sizes that
    reuse the timed kernels' compilations (multiples of 16), with and without bias + GELU.
    """
    if on_gpu:
        return [
            LinearCase("check", 512, 1024, 1024, True, "gelu", dtype),
            LinearCase("check", 512, 1024, 1024, False, None, dtype),
        ]
    return [
        LinearCase("check", 37, 29, 45, True, "gelu", dtype),
        LinearCase("check", 5, 33, 40, False, None, dtype),
    ]
