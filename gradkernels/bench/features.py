"""Features suite: packed variable-length batches and sliding windows.

Varlen (``suite="varlen"``): a batch of sequences of mixed lengths, packed back to back (total tokens T).

- ``gradkernels-varlen``: :func:`gradkernels.attention_varlen` on the packed batch (one call, no padding).
- ``sdpa-padded`` (baseline): what a padded pipeline does with the same batch: scatter into (B, H, Lmax, D)
  with zeros, ``F.scaled_dot_product_attention`` with a boolean key-padding mask (causal folded in), and
  gather the real rows back. torch picks its backend (a mask excludes the flash backend); the padding
  costs compute and memory proportional to ``B * Lmax`` instead of ``T``.
- ``naive``: :func:`gradkernels.reference.naive_attention` per sequence, a Python loop.

Sliding window (``suite="window"``): causal self-attention where each query sees itself and the ``w - 1``
keys before it (``window_size=(w - 1, 0)``), at long L.

- ``gradkernels-window``: :func:`gradkernels.attention` with the window.
- ``gradkernels-causal``: the same call without the window (full causal): what the window saves.
- ``sdpa-flash-causal`` (baseline): torch's flash backend, full causal (it has no window).
- ``sdpa-window-mask``: torch's SDPA with the window as a boolean (L, L) mask.

TFLOP/s count the pairs the computation needs (real tokens' pairs; the window's pairs) for every
provider, so a provider that computes masked-out pairs shows lower TFLOP/s for the same useful work.

Memory (``case="saved-varlen"``, any device): bytes saved for backward by the packed and the padded
paths, measured with ``saved_tensors_hooks`` (``gradkernels-varlen`` against its analytic model, to the
byte); on a GPU also the peak of forward+backward (``case="peak"``).

The gradkernels providers are timed only where the routing hook
``gradkernels.ops.attention_features.features_supported_by_kernels`` sends the call to the kernels (every
feature call today); a call it sent to the torch twin would be reported unavailable for timing (the
correctness checks and saved-bytes models still run), so no time of a fallback is shown as the kernels'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import reference, testing
from .._device import backend_for
from ..ops import attention_features
from .flops import varlen_attention_flops, window_attention_flops
from .harness import DTYPE_NAMES, Progress, Registry, Row, Unavailable, describe_error, release_memory

VARLEN = Registry("varlen")
WINDOW = Registry("window")


def _kernels_run(q: torch.Tensor, varlen: bool, **features) -> None:
    """Raise Unavailable when gradkernels would not run this call on its kernels (timing would measure
    the torch fallback or the interpreter)."""
    if backend_for(q) == "torch":
        raise Unavailable(f"no Triton backend for {q.dtype} on {q.device.type} here")
    f = attention_features.Features(**features)
    if not attention_features.features_supported_by_kernels(q, f, varlen=varlen):
        raise Unavailable("the routing hook sends this call to the torch twin, not the kernels")


# ----------------------------------------------------------------------------------------------------
# Varlen
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VarlenCase:
    """A packed batch: q, k, v (T, H, D) requiring grad and ``cu`` (int32 prefix sums of ``lengths``)."""

    group: str
    lengths: tuple
    H: int
    D: int
    causal: bool
    dtype: torch.dtype
    time_kernels_only: bool = False  # timing: gradkernels only when its kernels run the call

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def fields(self) -> dict:
        return {"B": len(self.lengths), "H": self.H, "Lq": max(self.lengths), "Lk": max(self.lengths), "D": self.D,
                "causal": self.causal, "tokens": self.tokens}

    def label(self) -> str:
        return f"B={len(self.lengths)} T={self.tokens} Lmax={max(self.lengths)} H={self.H} D={self.D}" + (
            " causal" if self.causal else "")

    def flops(self, mode: str) -> float:
        return varlen_attention_flops(self.lengths, self.H, self.D, self.causal, mode)

    def make_inputs(self, device, requires_grad: bool = True) -> dict:
        shape = (self.tokens, self.H, self.D)
        inputs = {name: torch.randn(shape, device=device, dtype=self.dtype).requires_grad_(requires_grad)
                  for name in ("q", "k", "v")}
        lengths = torch.tensor((0,) + tuple(self.lengths), device=device)
        inputs["cu"] = lengths.cumsum(0).to(torch.int32)
        return inputs

    def make_grad_output(self, device) -> torch.Tensor:
        return torch.randn(self.tokens, self.H, self.D, device=device, dtype=self.dtype)

    def oracle(self, inputs: dict, dout: torch.Tensor):
        args = (inputs["q"], inputs["k"], inputs["v"], inputs["cu"], inputs["cu"], dout)
        ref = testing.attention_reference_varlen(*args, causal=self.causal)
        bound = testing.attention_bounds_varlen(*args, causal=self.causal)
        keys = {"q": "dq", "k": "dk", "v": "dv"}
        return (ref["out"], {k: ref[v] for k, v in keys.items()},
                {"out": bound["out"], **{k: bound[v] for k, v in keys.items()}})


@VARLEN.register("gradkernels-varlen", kernel=True, description="gradkernels.attention_varlen on the packed batch")
def _gk_varlen(case: VarlenCase, inputs: dict) -> torch.Tensor:
    import gradkernels

    q = inputs["q"]
    if backend_for(q) == "torch" and q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise Unavailable("bf16 kernels need a GPU (Triton's interpreter cannot do bf16 arithmetic)")
    if case.time_kernels_only:
        _kernels_run(q, True)
    m = max(case.lengths)
    return gradkernels.attention_varlen(q, inputs["k"], inputs["v"], inputs["cu"], inputs["cu"], m, m,
                                        causal=case.causal)


def _padded(case: VarlenCase, t: torch.Tensor) -> torch.Tensor:
    """(T, H, D) -> (B, H, Lmax, D) with zeros in the padding (differentiable)."""
    b, lmax = len(case.lengths), max(case.lengths)
    idx = _token_index(case, t.device)
    out = t.new_zeros((b * lmax, *t.shape[1:])).index_put((idx,), t)
    return out.view(b, lmax, *t.shape[1:]).transpose(1, 2)


def _token_index(case: VarlenCase, device) -> torch.Tensor:
    lmax = max(case.lengths)
    return torch.cat([torch.arange(n, device=device) + i * lmax for i, n in enumerate(case.lengths)])


@VARLEN.register("sdpa-padded", baseline=True,
                 description="pad to (B, H, Lmax, D), F.scaled_dot_product_attention with a key-padding mask, unpad")
def _sdpa_padded(case: VarlenCase, inputs: dict) -> torch.Tensor:
    b, lmax = len(case.lengths), max(case.lengths)
    q, k, v = (_padded(case, inputs[n]) for n in ("q", "k", "v"))
    real = torch.arange(lmax, device=q.device)[None, :] < torch.tensor(case.lengths, device=q.device)[:, None]
    mask = real[:, None, None, :]
    if case.causal:
        mask = mask & torch.ones(lmax, lmax, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lmax, D)
    return out.transpose(1, 2).reshape(b * lmax, case.H, case.D)[_token_index(case, q.device)]


@VARLEN.register("naive", description="reference.naive_attention per sequence (a Python loop)")
def _naive_varlen(case: VarlenCase, inputs: dict) -> torch.Tensor:
    cu = inputs["cu"].tolist()
    outs = []
    for a, c in zip(cu, cu[1:]):
        q, k, v = (inputs[n][a:c].transpose(0, 1).unsqueeze(0) for n in ("q", "k", "v"))
        outs.append(reference.naive_attention(q, k, v, causal=case.causal)[0].transpose(0, 1))
    return torch.cat(outs)


def mixed_lengths(tokens: int, low: int, high: int, seed: int = 0) -> tuple:
    """Lengths drawn uniformly in [low, high] (a fixed generator) until ``tokens`` are filled (the last
    one trimmed)."""
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < tokens:
        n = min(int(torch.randint(low, high + 1, (1,), generator=gen)), tokens - total)
        lengths.append(n)
        total += n
    return tuple(lengths)


def varlen_timing_cases(dtype, quick=False, causal=(False, True), head_dims=None) -> list[VarlenCase]:
    """16k tokens in sequences of 64..4096 (and 1..1024) tokens, H = 2048 / D."""
    spreads = ((64, 4096),) if quick else ((64, 4096), (1, 1024))
    cases = []
    for d in head_dims or (128,):
        for low, high in spreads:
            for c in causal:
                cases.append(VarlenCase("varlen", mixed_lengths(16384, low, high), 2048 // d, d, c, dtype,
                                        time_kernels_only=True))
    return cases


def varlen_check_cases(dtype, on_gpu=False, causal=(False, True)) -> list[VarlenCase]:
    if on_gpu:
        return [VarlenCase("check-varlen", (257, 1, 1000, 37), 4, 128, c, dtype) for c in causal]
    return [VarlenCase("check-varlen", (37, 1, 53), 2, 16, c, dtype) for c in causal]


# ----------------------------------------------------------------------------------------------------
# Sliding window
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowCase:
    """Causal self-attention (B, H, L, D) with a window of ``window`` keys per query."""

    group: str
    B: int
    H: int
    L: int
    D: int
    window: int
    dtype: torch.dtype
    time_kernels_only: bool = False

    def fields(self) -> dict:
        return {"B": self.B, "H": self.H, "Lq": self.L, "Lk": self.L, "D": self.D, "causal": True,
                "window": self.window}

    def label(self) -> str:
        return f"B={self.B} H={self.H} L={self.L} D={self.D} window={self.window}"

    def flops(self, mode: str) -> float:
        return window_attention_flops(self.B, self.H, self.L, self.D, self.window, mode)

    def make_inputs(self, device, requires_grad: bool = True) -> dict:
        shape = (self.B, self.H, self.L, self.D)
        return {name: torch.randn(shape, device=device, dtype=self.dtype).requires_grad_(requires_grad)
                for name in ("q", "k", "v")}

    def make_grad_output(self, device) -> torch.Tensor:
        return torch.randn(self.B, self.H, self.L, self.D, device=device, dtype=self.dtype)

    def oracle(self, inputs: dict, dout: torch.Tensor):
        args = (inputs["q"], inputs["k"], inputs["v"], dout)
        kw = dict(causal=True, window_size=(self.window - 1, 0))
        ref = testing.attention_reference(*args, **kw)
        bound = testing.attention_bounds(*args, **kw)
        keys = {"q": "dq", "k": "dk", "v": "dv"}
        return (ref["out"], {k: ref[v] for k, v in keys.items()},
                {"out": bound["out"], **{k: bound[v] for k, v in keys.items()}})


@WINDOW.register("gradkernels-window", kernel=True, description="gradkernels.attention, window_size=(w - 1, 0)")
def _gk_window(case: WindowCase, inputs: dict) -> torch.Tensor:
    import gradkernels

    q = inputs["q"]
    if backend_for(q) == "torch" and q.dtype == torch.bfloat16 and q.device.type != "cuda":
        raise Unavailable("bf16 kernels need a GPU (Triton's interpreter cannot do bf16 arithmetic)")
    if case.time_kernels_only:
        _kernels_run(q, False, window_left=case.window - 1, window_right=0)
    return gradkernels.attention(q, inputs["k"], inputs["v"], causal=True, window_size=(case.window - 1, 0))


@WINDOW.register("gradkernels-causal", description="gradkernels.attention, full causal (no window)")
def _gk_causal(case: WindowCase, inputs: dict) -> torch.Tensor:
    import gradkernels

    if backend_for(inputs["q"]) == "torch":
        raise Unavailable(f"no Triton backend for {inputs['q'].device.type} tensors here")
    return gradkernels.attention(inputs["q"], inputs["k"], inputs["v"], causal=True)


@WINDOW.register("sdpa-flash-causal", baseline=True, description="torch's flash SDPA backend, full causal")
def _sdpa_flash_causal(case: WindowCase, inputs: dict) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if inputs["q"].device.type != "cuda":
        raise Unavailable("SDPBackend.FLASH_ATTENTION needs a CUDA device")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], is_causal=True)


@WINDOW.register("sdpa-window-mask", description="F.scaled_dot_product_attention with the window as a bool mask")
def _sdpa_window_mask(case: WindowCase, inputs: dict) -> torch.Tensor:
    n = case.L
    i = torch.arange(n, device=inputs["q"].device)[:, None]
    j = torch.arange(n, device=inputs["q"].device)[None, :]
    mask = (j <= i) & (j > i - case.window)
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], attn_mask=mask)


def window_timing_cases(dtype, quick=False, head_dims=None) -> list[WindowCase]:
    """L = 4k..32k at 16k * ... tokens: B = max(1, 32768 / L), H = 2048 / D, windows 1024 and 4096."""
    lens = (8192, 32768) if quick else (4096, 8192, 16384, 32768)
    windows = (1024,) if quick else (1024, 4096)
    return [WindowCase("window", max(1, 32768 // n), 2048 // d, n, d, w, dtype, time_kernels_only=True)
            for d in head_dims or (128,) for w in windows for n in lens if w < n]


def window_check_cases(dtype, on_gpu=False) -> list[WindowCase]:
    if on_gpu:
        return [WindowCase("check-window", 1, 4, 1031, 128, 256, dtype)]
    return [WindowCase("check-window", 1, 2, 97, 16, 16, dtype)]


# ----------------------------------------------------------------------------------------------------
# Memory: packed vs padded
# ----------------------------------------------------------------------------------------------------


def varlen_saved_model(case: VarlenCase) -> int:
    """Bytes ``gradkernels-varlen`` saves for backward: q, k, v and the output (T, H, D each), the LSE and
    its residual (H, T) in fp32 (fp64 for fp64 inputs), and the int32 offsets (B + 1): no padding, no
    (L x L) tensor."""
    es = torch.empty((), dtype=case.dtype).element_size()
    stat = 8 if case.dtype == torch.float64 else 4
    return 4 * case.tokens * case.H * case.D * es + 2 * case.H * case.tokens * stat + 4 * (len(case.lengths) + 1)


def saved_cases(dtype, on_gpu=False) -> list[VarlenCase]:
    if on_gpu:
        return [VarlenCase("saved-varlen", mixed_lengths(n, 64, 4096), 16, 128, True, dtype) for n in (8192, 16384)]
    return [VarlenCase("saved-varlen", lengths, 2, 16, True, dtype) for lengths in ((37, 1, 53), (97, 5, 113, 64))]


def run_saved(cases, device, progress: Progress | None = None) -> list[Row]:
    """Saved-for-backward bytes of the packed and the padded paths (measured), gradkernels' against its
    model."""
    from .memory import measure_saved

    rows = []
    for case in cases:
        for p in VARLEN.providers:
            row = Row(suite="varlen", case=case.group, provider=p.name, baseline=p.baseline, mode="saved",
                      dtype=DTYPE_NAMES[case.dtype], shape=case.fields())
            try:
                inputs = case.make_inputs(device)
                saved = measure_saved(lambda: p.fn(case, inputs))
                row.saved_bytes, row.saved_param_bytes = saved.activation_bytes, saved.param_bytes
                if p.kernel:
                    row.model_saved_bytes, row.model_param_bytes = varlen_saved_model(case), 0
                    ok = (row.saved_bytes, row.saved_param_bytes) == (row.model_saved_bytes, 0)
                    row.status = "ok" if ok else (f"failed: measured {row.saved_bytes} bytes, model "
                                                  f"{row.model_saved_bytes}")
                else:
                    row.status = "ok (measured; no model)"
            except Exception as exc:
                row.status = describe_error(exc)
            finally:
                inputs = None
                release_memory()
            rows.append(row)
            if progress:
                progress.step(f"varlen saved {case.label()} {p.name}: {row.status}")
    return rows


def run_peak(cases, device, progress: Progress | None = None) -> list[Row]:
    """Peak bytes of one forward+backward, packed against padded (CUDA only)."""
    rows = []
    for case in cases:
        for p in VARLEN.providers:
            row = Row(suite="varlen", case="peak", provider=p.name, baseline=p.baseline, mode="fwd+bwd",
                      dtype=DTYPE_NAMES[case.dtype], shape=case.fields())
            try:
                inputs = case.make_inputs(device)
                dout = case.make_grad_output(device)
                p.fn(case, inputs).backward(dout)  # warm-up: compilation and autotuning not counted
                for t in inputs.values():
                    t.grad = None
                release_memory()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                p.fn(case, inputs).backward(dout)
                torch.cuda.synchronize()
                row.peak_bytes = torch.cuda.max_memory_allocated() - before
            except Exception as exc:
                row.status = describe_error(exc)
            finally:
                inputs = dout = None
                release_memory()
            rows.append(row)
            if progress:
                progress.step(f"varlen peak {case.label()} {p.name}: {row.status}")
    return rows
