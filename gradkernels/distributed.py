"""Context parallelism: ring attention over ``torch.distributed``, for sequences longer than one GPU holds.

Each of the P ranks of a process group holds L/P positions of every sequence (its *shard*: q, k, v of
those positions). :func:`ring_attention` computes exact attention over the whole sequence:

- Forward: P steps. At step s rank r holds the K/V block of rank ``r - s`` (mod P); it posts the send
  of that block to rank ``r + 1`` and the receive of the next one from ``r - 1``
  (``torch.distributed.batch_isend_irecv``) *before* it runs the attention kernel on the current block,
  so the transfer overlaps the kernel. Each step gives a partial output and log-sum-exp per query row;
  they are merged exactly through the LSE (``out = sum_i exp(lse_i - lse) out_i``, ``lse = log sum_i
  exp(lse_i)``, the LSEs in float64) in the fixed order of the steps, so results are deterministic.
- Backward: the same ring. dQ stays on its rank; the dK/dV accumulators of a block travel with it
  (one step behind the K/V block, so their transfer overlaps the next step's kernels) and arrive back
  at the owner after P hops. Each per-block backward call gets the *merged* output and LSE of its rows,
  which makes its dQ/dK/dV the exact contribution of that block (Flash-attention's backward recomputes
  ``P = exp(S - LSE)`` with the global LSE); the contributions are summed in fp32 (fp64 for fp64).
- Memory: a rank keeps its own K/V plus at most two K/V blocks in flight (the one computed on and the
  one arriving), and saves only its shard for backward (q, k, v, out, LSE): O(L/P) per rank.
- Communication per rank: forward P - 1 K/V blocks; backward P - 1 K/V blocks and P dK/dV
  accumulators (in the accumulation dtype: fp32 for fp16/bf16/fp32, fp64 for fp64). Only the Hkv heads
  travel (grouped-query attention is never expanded).

Causal attention (bottom-right aligned as :func:`gradkernels.attention`; here Lq = Lk, so query i sees
keys j <= i). Blocks a query shard cannot see are skipped: not computed, not masked.

- ``layout="contiguous"``: rank r holds positions [r L/P, (r+1) L/P). Rank r computes r + 1 blocks
  (the last one masked), so the last rank does about P times the work of the first.
- ``layout="zigzag"`` (default): the sequence is cut into 2P chunks and rank r holds chunks r and
  2P - 1 - r. At every step every rank computes the same amount: its own block causally (2c x 2c,
  half of it visible), an earlier rank's block as all its queries against that block's first chunk,
  a later rank's block as its second chunk of queries against the whole block (c = L / 2P).

Non-causal attention does not depend on the layout (every rank computes every block in full).

This module runs each block through the attention custom ops (:mod:`gradkernels.custom_ops`), as every
other call does: the kernels (compiled Triton on CUDA, the interpreter on CPU with
``TRITON_INTERPRET=1``), or where :func:`gradkernels.backend_for` says ``"torch"`` their torch twins in
:mod:`gradkernels.reference`, with the same semantics. Any backend of ``torch.distributed`` that
has point-to-point ops works: NCCL on GPUs, gloo on CPU.

The ring follows Liu et al., "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(2023) and the zigzag balancing of the open ring-flash-attention and Megatron-LM context parallelism;
the code here is written against this library's own launchers.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from . import custom_ops
from ._device import autocast_inputs
from .ops import attention as attention_ops

__all__ = ["LAYOUTS", "ring_attention", "shard_positions", "shard_sequence", "unshard_sequence"]

LAYOUTS = ("zigzag", "contiguous")

_custom_fwd = torch.amp.custom_fwd(device_type="cuda")
_custom_bwd = torch.amp.custom_bwd(device_type="cuda")


# ----------------------------------------------------------------------------------------------------
# One block: the launchers through the custom ops (the kernels, or their torch twin on the "torch"
# backend, chosen there as for every other call)
# ----------------------------------------------------------------------------------------------------


def _block_forward(q, k, v, causal_offset, scale):
    """``(out, lse, lse_lo)`` of one block."""
    return custom_ops.attention_fwd(q, k, v, causal_offset, scale)


def _block_backward(grad_out, q, k, v, out, lse, lse_lo, causal_offset, scale, *, need_dq, need_dk, need_dv):
    """``(dq, dk, dv)`` contributions of one block, given the merged ``out`` and LSE of its rows (None for
    the gradients not asked for)."""
    grads = custom_ops.attention_bwd(grad_out, q, k, v, out, lse, lse_lo, causal_offset, scale,
                                     need_dq, need_dk, need_dv)
    return tuple(g if need else None for g, need in zip(grads, (need_dq, need_dk, need_dv)))


# ----------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------


def _check_layout(layout):
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _chunks(layout, world):
    """Chunks the sequence is cut into, and the chunks (in order) that each rank holds."""
    if layout == "zigzag":
        return 2 * world, [(r, 2 * world - 1 - r) for r in range(world)]
    return world, [(r,) for r in range(world)]


def _group_info(group):
    """``(rank in group, group size)``; a clear error when torch.distributed is not set up."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this build of torch")
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group first "
            "(group=None means the default group)"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _check_divisible(length, layout, world, what):
    n, _ = _chunks(layout, world)
    if length % n:
        need = "2 * P" if layout == "zigzag" else "P"
        raise ValueError(
            f"{what} ({length}) must be divisible by {need} = {n} for layout={layout!r} over P = {world} "
            f"ranks (pad the sequence, or use a length that is a multiple of {n})"
        )


def _check_dim(x, dim, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < max(x.dim(), 1):
        raise ValueError(f"dim must be an int in [-{x.dim()}, {x.dim()}) for a {x.dim()}-D {name}, got {dim!r}")
    return dim % x.dim()


def shard_sequence(x, dim=1, group=None, layout="zigzag"):
    """This rank's shard of a full sequence: the positions :func:`ring_attention` expects it to hold.

    Differentiable (slices and a concatenation). Every rank calls it on the same full tensor.

    Args:
        x: a tensor with the whole sequence along ``dim`` (e.g. token ids (B, L), hidden states
            (B, L, C), position ids (L,)).
        dim: the sequence dim (default 1).
        group: the context-parallel process group (default: the default group).
        layout: ``"zigzag"`` (chunks r and 2P - 1 - r of 2P) or ``"contiguous"`` (chunk r of P).

    Returns:
        ``x`` restricted to this rank's positions, L / P of them, in increasing order.

    Raises:
        ValueError: a bad layout or dim, or a length not divisible by 2P (zigzag) / P (contiguous).
        RuntimeError: torch.distributed is not initialized.
    """
    _check_layout(layout)
    dim = _check_dim(x, dim)
    rank, world = _group_info(group)
    _check_divisible(x.shape[dim], layout, world, f"the sequence length of x along dim {dim}")
    n, held = _chunks(layout, world)
    pieces = x.chunk(n, dim=dim)
    return torch.cat([pieces[c] for c in held[rank]], dim=dim)


def shard_positions(seq_len, group=None, layout="zigzag", device=None):
    """The global positions (int64) of this rank's shard of a ``seq_len`` sequence.

    What a model needs for its position embeddings or rotary angles (RoPE) when its input is sharded:
    ``shard_positions(L)`` equals ``shard_sequence(torch.arange(L), dim=0)``.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    return shard_sequence(torch.arange(seq_len, device=device), dim=0, group=group, layout=layout)


class _Unshard(torch.autograd.Function):
    """All-gather of the shards in sequence order; backward: sum over ranks, then this rank's shard."""

    @staticmethod
    def forward(ctx, x, dim, group, layout):
        _, world = _group_info(group)
        ctx.dim, ctx.group, ctx.layout = dim, group, layout
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        n, held = _chunks(layout, world)
        pieces = [None] * n
        for r, part in enumerate(parts):
            for c, piece in zip(held[r], part.chunk(len(held[r]), dim=dim)):
                pieces[c] = piece
        return torch.cat(pieces, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # each rank's loss may depend on the whole gathered tensor
        return shard_sequence(grad, ctx.dim, ctx.group, ctx.layout), None, None, None


def unshard_sequence(x_local, dim=1, group=None, layout="zigzag"):
    """The whole sequence from every rank's shard (an all-gather, then the chunks put back in order).

    The inverse of :func:`shard_sequence`; differentiable (its backward sums the gradient over the
    ranks and keeps this rank's shard). Every rank of ``group`` must call it with the same shape.

    Raises:
        ValueError: a bad layout or dim, or a zigzag shard of odd length.
        RuntimeError: torch.distributed is not initialized.
    """
    _check_layout(layout)
    dim = _check_dim(x_local, dim, "x_local")
    _group_info(group)
    n_held = 2 if layout == "zigzag" else 1
    if x_local.shape[dim] % n_held:
        raise ValueError(f"a zigzag shard holds two equal chunks: its length along dim {dim} must be even, "
                         f"got {x_local.shape[dim]}")
    return _Unshard.apply(x_local, dim, group, layout)


# ----------------------------------------------------------------------------------------------------
# The ring
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Ring:
    group: object
    rank: int  # in the group
    size: int
    next: int  # global ranks of the neighbours
    prev: int
    layout: str

    @staticmethod
    def of(group, layout):
        rank, size = _group_info(group)
        if group is None:
            nxt, prv = (rank + 1) % size, (rank - 1) % size
        else:
            nxt = dist.get_global_rank(group, (rank + 1) % size)
            prv = dist.get_global_rank(group, (rank - 1) % size)
        return _Ring(group, rank, size, nxt, prv, layout)

    def exchange(self, send, recv):
        """Post the sends of ``send`` to the next rank and the receives of ``recv`` from the previous one.

        Returns the requests (wait on them before touching either list again). One
        ``batch_isend_irecv`` call per step: the unit the communication model counts.
        """
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in recv]
        return dist.batch_isend_irecv(ops)

    def block(self, step, causal, length):
        """What this rank computes at ``step`` on the block of rank ``rank - step``.

        Returns None (skipped: no query of this shard sees a key of that block) or ``(rows, cols,
        causal_offset)``: the slice of this shard's queries, the slice of the block's keys, and the mask.
        """
        owner = (self.rank - step) % self.size
        every = slice(0, length)
        if not causal:
            return every, every, None
        if owner == self.rank:
            return every, every, 0  # own block: local causal mask (zigzag: chunk r < chunk 2P-1-r)
        if self.layout == "contiguous":
            return (every, every, None) if owner < self.rank else None
        half = length // 2
        if owner < self.rank:  # its chunks o < r and 2P-1-o > 2P-1-r: only the first is visible
            return every, slice(0, half), None
        # its chunks o > r and 2P-1-o < 2P-1-r: both visible to our second chunk only
        return slice(half, length), every, None


def _wait(reqs):
    for req in reqs or ():
        req.wait()


def _merge(acc_out, acc_lse, rows, out, lse64):
    """Fold a partial (out, lse) of ``rows`` into the running (acc_out, acc_lse), exactly in the LSE."""
    old = acc_lse[..., rows]
    new = torch.logaddexp(old, lse64)
    seen = torch.isfinite(new)
    w_old = torch.where(seen, torch.exp(old - torch.where(seen, new, 0)), 0).to(acc_out.dtype)[..., None]
    w_new = torch.where(seen, torch.exp(lse64 - torch.where(seen, new, 0)), 0).to(acc_out.dtype)[..., None]
    acc_out[..., rows, :] = acc_out[..., rows, :] * w_old + out.to(acc_out.dtype) * w_new
    acc_lse[..., rows] = new


def _ring_forward(q, k, v, causal, scale, ring):
    """``(out, lse, lse_lo)`` of this rank's queries against the whole sequence."""
    b, hq, length, _ = q.shape
    acc_out = torch.zeros((b, hq, length, v.shape[3]), dtype=attention_ops.accumulator_dtype(q.dtype), device=q.device)
    acc_lse = torch.full((b, hq, length), float("-inf"), dtype=torch.float64, device=q.device)
    cur = (k.contiguous(), v.contiguous())
    spare = None
    for step in range(ring.size):
        pending, nxt = None, None
        if step < ring.size - 1:  # post the next block's transfer before computing on this one
            nxt = spare or tuple(torch.empty_like(t) for t in cur)
            pending = ring.exchange(cur, nxt)
        work = ring.block(step, causal, length)
        if work is not None:
            rows, cols, offset = work
            out, lse, lse_lo = _block_forward(q[:, :, rows], cur[0][:, :, cols], cur[1][:, :, cols], offset, scale)
            _merge(acc_out, acc_lse, rows, out, attention_ops.exact_lse(lse, lse_lo))
        if pending is not None:
            _wait(pending)
            spare = cur if step > 0 else None  # never overwrite the rank's own K/V
            cur = nxt
    return (acc_out.to(q.dtype), *attention_ops.split_lse(acc_lse, attention_ops.accumulator_dtype(q.dtype)))


def _ring_backward(grad_out, q, k, v, out, lse, lse_lo, causal, scale, ring, need_dq, need_dk, need_dv):
    length = q.shape[2]
    acc = attention_ops.accumulator_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device) if need_dq else None
    need_kv = [need_dk, need_dv]
    cur = (k.contiguous(), v.contiguous())
    spare = None
    kv_grads, kv_pending, kv_spare = None, None, None  # the travelling dK/dV accumulators
    for step in range(ring.size):
        pending, nxt = None, None
        if step < ring.size - 1:
            nxt = spare or tuple(torch.empty_like(t) for t in cur)
            pending = ring.exchange(cur, nxt)
        work = ring.block(step, causal, length)
        parts = (None, None, None)
        if work is not None:
            rows, cols, offset = work
            parts = _block_backward(
                grad_out[:, :, rows], q[:, :, rows], cur[0][:, :, cols], cur[1][:, :, cols], out[:, :, rows],
                lse[..., rows], lse_lo[..., rows], offset, scale,
                need_dq=need_dq, need_dk=need_dk, need_dv=need_dv,
            )
            if need_dq:
                dq[:, :, rows] += parts[0]
        if any(need_kv):
            # The accumulators of this block arrive from the previous rank (posted there one step ago,
            # overlapping this step's kernels); the owner starts them at step 0.
            if step == 0:
                kv_grads = [torch.zeros(t.shape, dtype=acc, device=t.device) if n else None
                            for t, n in zip(cur, need_kv)]
            else:
                _wait(kv_pending)
                kv_grads, kv_spare = kv_spare, kv_grads
            if work is not None:
                for g, part in zip(kv_grads, parts[1:]):
                    if g is not None:
                        g[:, :, cols] += part
            if ring.size > 1:
                live = [g for g in kv_grads if g is not None]
                if kv_spare is None:
                    kv_spare = [None if g is None else torch.empty_like(g) for g in kv_grads]
                kv_pending = ring.exchange(live, [g for g in kv_spare if g is not None])
        if pending is not None:
            _wait(pending)
            spare = cur if step > 0 else None
            cur = nxt
    dk = dv = None
    if any(need_kv):
        if ring.size > 1:  # the last hop brings this rank's own accumulators home
            _wait(kv_pending)
            kv_grads = kv_spare
        dk = kv_grads[0].to(k.dtype) if need_dk else None
        dv = kv_grads[1].to(v.dtype) if need_dv else None
    return (dq.to(q.dtype) if need_dq else None), dk, dv


class RingAttentionFunction(torch.autograd.Function):
    """Ring attention over a process group; saves this rank's q, k, v, out and the merged LSE."""

    @staticmethod
    @_custom_fwd
    def forward(ctx, q, k, v, causal, scale, ring):
        if q.numel() == 0 or k.numel() == 0:  # B = 0 or L = 0 on every rank: nothing to send
            out = q.new_zeros((*q.shape[:3], v.shape[3]))
            lse = lse_lo = q.new_zeros(q.shape[:3], dtype=attention_ops.accumulator_dtype(q.dtype))
        else:
            out, lse, lse_lo = _ring_forward(q, k, v, causal, scale, ring)
        ctx.save_for_backward(q, k, v, out, lse, lse_lo)
        ctx.causal, ctx.scale, ctx.ring = causal, scale, ring
        return out

    @staticmethod
    @_custom_bwd
    def backward(ctx, grad_out):
        q, k, v, out, lse, lse_lo = ctx.saved_tensors
        if q.numel() == 0 or k.numel() == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None, None, None
        dq, dk, dv = _ring_backward(grad_out, q, k, v, out, lse, lse_lo, ctx.causal, ctx.scale, ctx.ring,
                                    *ctx.needs_input_grad[:3])
        return dq, dk, dv, None, None, None


def ring_attention(q, k, v, *, causal=False, scale=None, group=None, layout="zigzag"):
    """Exact attention over a sequence sharded across the ranks of ``group`` (context parallelism).

    Every rank calls it with its own shard (as :func:`shard_sequence` cuts it) of the same shapes; the
    result on each rank is the output of its queries attending to the *whole* sequence, the same as
    :func:`gradkernels.attention` on the gathered sequence, then sharded. Gradients flow to this rank's
    q, k and v (the backward runs the ring again).

    Args:
        q: (B, Hq, L/P, D) this rank's queries. k: (B, Hkv, L/P, D), v: (B, Hkv, L/P, Dv) its keys and
            values (the same positions). Any strides; Hq a multiple of Hkv; D, Dv <= 256; one floating
            dtype (fp16, bf16, fp32, fp64; autocast applies as for :func:`gradkernels.attention`).
        causal: query at global position i sees keys at positions j <= i (with Lq = Lk this is both the
            library's bottom-right and torch's top-left alignment).
        scale: softmax scale; ``1 / sqrt(D)`` when None.
        group: the context-parallel process group (None: the default group). Any backend with
            point-to-point ops: NCCL on GPUs, gloo on CPU.
        layout: how the sequence is sharded: ``"zigzag"`` (balanced causal work; needs L divisible by
            2P, so an even shard) or ``"contiguous"`` (needs L divisible by P). Must match the layout the
            inputs were sharded with (:func:`shard_sequence`, :func:`shard_positions`).

    Returns:
        (B, Hq, L/P, Dv) output for this rank's queries, in the input dtype.

    Raises:
        TypeError: as :func:`gradkernels.attention` (non-tensors, integer tensors, mixed dtypes, a
            non-bool ``causal``, a non-numeric ``scale``).
        ValueError: as :func:`gradkernels.attention`, plus: q and k/v holding different numbers of
            positions, an unknown layout, an odd shard length with ``layout="zigzag"``.
        RuntimeError: torch.distributed is not initialized.
    """
    attention_ops.check_attention_args(q, k, v, scale, same_dtype=False)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_layout(layout)
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"ring attention shards one sequence: q and k/v must hold the same positions, got "
            f"{q.shape[2]} queries and {k.shape[2]} keys on this rank"
        )
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(
            f"layout='zigzag' holds two equal chunks per rank: the shard length must be even (the sequence "
            f"length divisible by 2P), got {q.shape[2]} positions on this rank"
        )
    q, k, v = autocast_inputs(q.device.type, q, k, v)
    attention_ops.check_attention_args(q, k, v, scale)
    ring = _Ring.of(group, layout)
    scale = attention_ops.default_scale(q.shape[-1]) if scale is None else float(scale)
    return RingAttentionFunction.apply(q, k, v, causal, scale, ring)
