"""Memory suite: bytes saved for backward (anywhere) and peak memory of forward+backward (GPU).

Saved for backward
    The forward of each implementation runs for real, inside
    ``torch.autograd.graph.saved_tensors_hooks``; the pack hook sees every tensor autograd keeps for the
    backward, custom Functions' ``save_for_backward`` included. Each *storage* is counted once, at its
    full size: two saved views of one tensor cost its memory once, and a saved view keeps its whole
    storage alive. Storages of parameters (weight, bias) are reported apart from activations (inputs
    and tensors the op created), because a training step holds the parameters anyway.

    Next to the measurement stands an analytic model: per implementation, the list of tensors its
    backward needs, with their sizes (``linear_saved_model``, ``attention_saved_model``). A row's status
    is ``ok`` only when measurement and model agree to the byte.

Peak memory (CUDA only)
    ``torch.cuda.max_memory_allocated`` over one forward+backward, reset before it and taken relative
    to what was allocated before it (the inputs and the output gradient, the same for every provider).
    Each provider runs once before the measurement so that autotuning and lazy initialisation are not
    counted. L doubles from 512; a provider that runs out of memory is recorded as ``oom`` and skipped
    at larger L while the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .attention import REGISTRY as ATTENTION
from .attention import AttentionCase
from .harness import DTYPE_NAMES, Progress, Row, clear_grads, describe_error, release_memory
from .linear import REGISTRY as LINEAR
from .linear import LinearCase

SAVED_ATTENTION_PROVIDERS = ("gradkernels", "naive")
SAVED_LINEAR_PROVIDERS = ("gradkernels", "torch", "naive")


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Saved:
    """Bytes autograd keeps for backward, split into activations and parameters."""

    activation_bytes: int
    param_bytes: int
    tensors: tuple  # (shape, dtype, storage bytes, is_param) per storage, for diagnostics


def _storage_key(t: torch.Tensor):
    return (str(t.device), t.untyped_storage().data_ptr())


def measure_saved(forward: Callable[[], torch.Tensor], params: Sequence[torch.Tensor | None] = ()) -> Saved:
    """Run ``forward`` under ``saved_tensors_hooks`` and count the storages it saves for backward.

    Args:
        forward: runs the forward pass (with autograd recording) and returns its output.
        params: tensors whose storages count as parameters rather than activations.

    Returns:
        A :class:`Saved` with each storage counted once at ``untyped_storage().nbytes()``.
    """
    seen: dict = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in seen:
            seen[key] = t  # holding it keeps the address from being reused while we count
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    param_keys = {_storage_key(p) for p in params if p is not None}
    act = par = 0
    tensors = []
    for key, t in seen.items():
        nbytes = t.untyped_storage().nbytes()
        is_param = key in param_keys
        if is_param:
            par += nbytes
        else:
            act += nbytes
        tensors.append((tuple(t.shape), t.dtype, nbytes, is_param))
    del out, seen
    return Saved(act, par, tuple(tensors))


# ----------------------------------------------------------------------------------------------------
# Analytic models: what each implementation must save, tensor by tensor
# ----------------------------------------------------------------------------------------------------


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def linear_saved_model(provider: str, case: LinearCase, x_grad: bool = True, w_grad: bool = True,
                       b_grad: bool = True) -> tuple[int, int]:
    """``(activation_bytes, param_bytes)`` that ``provider`` saves for ``act(x @ W^T + b)``.

    - ``gradkernels``: x only if dW is needed, W only if dX is needed, the pre-activation (M, N) only when
      there is an activation (its derivative is applied in the backward prologue).
    - ``torch`` (``F.linear`` then the activation): ``addmm``/``mm`` keeps x for dW and W for dX, each only
      when that gradient is needed; GELU/SiLU keep their input (M, N), ReLU its output (M, N).
    - ``naive`` (``reference.LinearFunction``): x, W and b unconditionally, then the activation as torch.
    """
    es = _size(case.dtype)
    x, w, b, pre = case.M * case.K * es, case.N * case.K * es, case.N * es, case.M * case.N * es
    has_b = case.bias
    any_grad = x_grad or w_grad or (b_grad and has_b)
    tensors: list[tuple[int, bool]] = []  # (bytes, is_param)
    if provider == "gradkernels":
        if w_grad:
            tensors.append((x, False))
        if x_grad:
            tensors.append((w, True))
        if case.activation is not None and any_grad:
            tensors.append((pre, False))
    elif provider == "torch":
        if w_grad:
            tensors.append((x, False))
        if x_grad:
            tensors.append((w, True))
        if case.activation is not None and any_grad:
            tensors.append((pre, False))  # the activation's input (or, for ReLU, its output)
    elif provider == "naive":
        if any_grad:
            tensors += [(x, False), (w, True)] + ([(b, True)] if has_b else [])
            if case.activation is not None:
                tensors.append((pre, False))
    else:
        raise ValueError(f"no saved-memory model for linear provider {provider!r}")
    return sum(n for n, p in tensors if not p), sum(n for n, p in tensors if p)


def attention_saved_model(provider: str, case: AttentionCase) -> tuple[int, int]:
    """``(activation_bytes, param_bytes)`` that ``provider`` saves for attention (no parameters).

    - ``gradkernels``: q, k, v, the output (B, H, L, D), the log-sum-exp and its rounding residual
      (two (B, H, L) rows in fp32, fp64 for fp64): the backward recomputes P block by block from them.
    - ``naive`` (``reference.AttentionFunction``): q, k, v and the softmax P (B, H, L, L) in the input dtype.
    """
    es = _size(case.dtype)
    qkv = 3 * case.B * case.H * case.L * case.D * es
    if provider == "gradkernels":
        lse_es = 8 if case.dtype == torch.float64 else 4
        out = case.B * case.H * case.L * case.D * es
        lse = 2 * case.B * case.H * case.L * lse_es  # the LSE and its residual lse_lo
        return qkv + out + lse, 0
    if provider == "naive":
        return qkv + case.B * case.H * case.L * case.L * es, 0
    raise ValueError(f"no saved-memory model for attention provider {provider!r}")


# ----------------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedSweep:
    attention_lens: tuple
    attention_bhd: tuple  # (B, H, D)
    linear_ms: tuple
    linear_nk: tuple  # (N, K)


def saved_sweep(on_gpu: bool, quick: bool) -> SavedSweep:
    """Sizes of the saved-bytes sweep: tiny under the interpreter, realistic on a GPU."""
    if on_gpu:
        lens = (512, 1024, 2048) if quick else (512, 1024, 2048, 4096, 8192)
        return SavedSweep(lens, (1, 16, 128), (512, 2048) if quick else (512, 2048, 8192), (4096, 4096))
    # Interpreter: each forward really runs, so keep B * H * D small; L still grows far enough to show
    # the quadratic term.
    lens = (64, 128, 256) if quick else (128, 256, 512, 1024)
    return SavedSweep(lens, (1, 1, 16), (64, 256) if quick else (64, 256, 1024), (32, 32))


def _saved_row(case, provider: str, measured: Saved | None, model: tuple[int, int], status: str | None,
               name: str) -> Row:
    row = Row(suite="memory", case=name, provider=provider, baseline=False, mode="saved",
              dtype=DTYPE_NAMES[case.dtype], shape=case.fields())
    row.model_saved_bytes, row.model_param_bytes = model
    if measured is not None:
        row.saved_bytes, row.saved_param_bytes = measured.activation_bytes, measured.param_bytes
        if (row.saved_bytes, row.saved_param_bytes) == model:
            row.status = "ok"
        else:
            row.status = (f"failed: measured {row.saved_bytes} + {row.saved_param_bytes} param bytes, "
                          f"model {model[0]} + {model[1]}")
    else:
        row.status = status
    return row


def run_saved(device: str, dtype: torch.dtype, sweep: SavedSweep, progress: Progress | None = None) -> list[Row]:
    """Saved-for-backward bytes of naive vs gradkernels attention and of the linear providers."""
    rows: list[Row] = []
    b, h, d = sweep.attention_bhd
    attn = {p.name: p for p in ATTENTION.providers}
    for causal in (False,):
        for seqlen in sweep.attention_lens:
            case = AttentionCase("saved-attention", b, h, seqlen, d, causal, dtype)
            for name in SAVED_ATTENTION_PROVIDERS:
                rows.append(_measure_one(case, attn[name], device, attention_saved_model(name, case),
                                         "saved-attention", progress))
    lin = {p.name: p for p in LINEAR.providers}
    n, k = sweep.linear_nk
    variants = (
        ("saved-linear", False, None, True),
        ("saved-linear-gelu", True, "gelu", True),
        ("saved-linear-gelu-frozen-w", True, "gelu", False),
    )
    for name, bias, act, w_grad in variants:
        for m in sweep.linear_ms:
            case = LinearCase(name, m, n, k, bias, act, dtype)
            for pname in SAVED_LINEAR_PROVIDERS:
                model = linear_saved_model(pname, case, x_grad=True, w_grad=w_grad, b_grad=True)
                rows.append(_measure_one(case, lin[pname], device, model, name, progress,
                                         frozen=() if w_grad else ("weight",)))
    return rows


def _measure_one(case, provider, device, model, name, progress, frozen=()) -> Row:
    measured, status = None, None
    try:
        inputs = case.make_inputs(device)
        for key in frozen:
            inputs[key].requires_grad_(False)
        params = [inputs.get("weight"), inputs.get("bias")]
        measured = measure_saved(lambda: provider.fn(case, inputs), params)
    except Exception as exc:
        status = describe_error(exc)
    finally:
        inputs = None
        release_memory()
    row = _saved_row(case, provider.name, measured, model, status, name)
    if progress:
        progress.step(f"memory saved {case.label()} {provider.name}: {row.status}")
    return row


def peak_lens(quick: bool, max_len: int | None) -> tuple:
    top = max_len or (4096 if quick else 32768)
    lens, seqlen = [], 512
    while seqlen <= top:
        lens.append(seqlen)
        seqlen *= 2
    return tuple(lens)


# D = 128 as in the quick timings: the same compiled kernel variant, no extra autotuning.
PEAK_BHD = (1, 16, 128)


def run_peak(device: str, dtype: torch.dtype, lens: Sequence[int], bhd=PEAK_BHD,
             providers: Sequence | None = None, progress: Progress | None = None) -> list[Row]:
    """Peak bytes of one forward+backward per provider and L (CUDA only)."""
    providers = list(providers) if providers is not None else list(ATTENTION.providers)
    b, h, d = bhd
    rows: list[Row] = []
    oom_at: dict[str, int] = {}
    for seqlen in lens:
        case = AttentionCase("peak", b, h, seqlen, d, False, dtype)
        for p in providers:
            row = Row(suite="memory", case="peak", provider=p.name, baseline=p.baseline, mode="fwd+bwd",
                      dtype=DTYPE_NAMES[dtype], shape=case.fields())
            if p.name in oom_at:
                row.status = f"skipped: oom at L={oom_at[p.name]}"
            else:
                try:
                    row.peak_bytes = _peak_once(case, p, device)
                except Exception as exc:
                    row.status = describe_error(exc)
                    if row.status == "oom":
                        oom_at[p.name] = seqlen
                release_memory()
            rows.append(row)
            if progress:
                progress.step(f"memory peak {case.label()} {p.name}: {row.status}")
    return rows


def _peak_once(case: AttentionCase, provider, device) -> int:
    inputs = case.make_inputs(device)
    dout = case.make_grad_output(device)
    try:
        provider.fn(case, inputs).backward(dout)  # warm-up: compilation and autotuning not counted
        clear_grads(inputs)
        release_memory()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        provider.fn(case, inputs).backward(dout)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    finally:
        clear_grads(inputs)
        del inputs, dout
