"""Ring attention (``gradkernels.distributed``) in 2 and 4 processes, gloo on CPU (NCCL on >= P GPUs).

The test launches this file P times as a script (``--worker``); the P ranks run every case of the
suite in one process group (starting processes is the expensive part: one spawn per process count),
and rank 0 saves what was measured. The parent then checks, per case:

- forward and every gradient, gathered over the ranks, against two oracles on the whole sequence:
  an fp64 reference with torch's own error in the same dtype as the scale (the two-oracle rule of
  gradkernels.testing.assert_close), and single-process ``gradkernels.attention`` (the kernels without the
  ring; where it is torch's own path, bf16 under the interpreter, only the first applies);
- communication, from a counting wrapper around ``torch.distributed.batch_isend_irecv``: the bytes each
  rank sends and receives at each exchange, and to whom, equal to the analytic model (forward: the K/V
  block, Hkv heads, at each of the first P - 1 steps; backward: the K/V block at each of the first P - 1
  steps, then the dK/dV accumulators, fp32 or fp64, at each of the P steps);
- the schedule, from wrappers around the kernel launchers: each step's transfer is posted before that
  step's kernel (overlap), blocks no query of the shard can see are not launched (causal skipping),
  the zigzag layout gives every rank the same work;
- memory: the tensors saved for backward (``saved_tensors_hooks``) are exactly this rank's q, k, v,
  out and the two LSE rows, O(L/P); the forward allocates at most two K/V receive buffers.

Plus a training step of TinyLM with sequence-sharded inputs, positions and ring attention, whose loss
and gradients match the unsharded model, and the README's recipe (a Llama-style attention layer with
RoPE at the global positions of the shard) against the same layer unsharded. TRITON_INTERPRET is
inherited from the parent (tests/conftest.py).
"""

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # a worker started by hand

import gradkernels  # noqa: E402
from gradkernels import backend_for, reference, testing  # noqa: E402
from gradkernels import distributed as gkd  # noqa: E402
from gradkernels.models import TinyLM, TinyLMConfig, make_batches  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the single-process oracle runs
FACTOR_OUT, FACTOR_GRAD = 2, 3
F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16

# name: (B, Hq, Hkv, shard length, D, Dv, causal, layout, dtype, (B, L, H, D) storage)
# Global length = P * shard length (a zigzag shard holds two chunks: even). Tiny, as the kernels run
# under the interpreter, but odd chunks and head dims, GQA / MQA, Dv != D.
CASES = {
    "fp64-causal-zigzag-gqa": (1, 4, 2, 10, 40, 24, True, "zigzag", F64, False),
    "fp64-causal-zigzag-mqa": (1, 2, 1, 6, 40, 24, True, "zigzag", F64, False),
    "fp64-causal-contiguous-mqa": (2, 2, 1, 9, 16, 16, True, "contiguous", F64, True),
    "fp64-full-zigzag": (1, 2, 2, 6, 16, 16, False, "zigzag", F64, False),
    "fp64-causal-zigzag-dv-only": (1, 2, 1, 6, 16, 24, True, "zigzag", F64, False),  # q, k frozen
    "fp32-causal-zigzag-gqa": (1, 4, 2, 6, 16, 16, True, "zigzag", F32, False),
    "fp16-causal-contiguous": (1, 2, 2, 7, 16, 16, True, "contiguous", F16, False),
    "fp16-causal-contiguous-mqa": (1, 2, 1, 5, 16, 16, True, "contiguous", F16, False),
    "bf16-causal-zigzag": (1, 2, 1, 6, 16, 16, True, "zigzag", BF16, False),
    # longer than one interpreter tile (32 rows), D = 80, more combinations: slow suite only
    "fp32-full-contiguous": (2, 2, 1, 5, 80, 80, False, "contiguous", F32, True),
    "fp16-causal-zigzag-long": (1, 2, 1, 34, 16, 40, True, "zigzag", F16, False),
    "fp32-causal-contiguous-long": (1, 2, 2, 37, 40, 40, True, "contiguous", F32, False),
    "fp64-causal-zigzag-mqa-long": (1, 3, 1, 36, 16, 16, True, "zigzag", F64, True),
}
# What runs where. The default suite must stay within ~90 s on two busy cores (P = 4 costs four times
# P = 2 per case: P ranks times P steps): every kind of case at P = 2, a few at P = 4 (both layouts,
# MQA, fp64 and fp16, the torch path, sub-rings); the slow suite runs the rest at both counts.
DEFAULT = {
    2: ["fp64-causal-zigzag-gqa", "fp64-causal-contiguous-mqa", "fp64-full-zigzag", "fp64-causal-zigzag-dv-only",
        "fp32-causal-zigzag-gqa", "fp16-causal-contiguous", "bf16-causal-zigzag"],
    4: ["fp64-causal-zigzag-mqa", "fp16-causal-contiguous-mqa", "bf16-causal-zigzag"],
}
FROZEN = {"fp64-causal-zigzag-dv-only": ("q", "k")}  # inputs without requires_grad
SLOW = {world: [n for n in CASES if n not in DEFAULT[world]] for world in (2, 4)}
TRAIN = {"default": (2,), "slow": (4,)}  # the TinyLM training step at these process counts
DETERMINISM_CASE = "fp32-causal-zigzag-gqa"
SUBGROUP_CASE = "fp64-causal-zigzag-mqa"  # also run on sub-rings (default suite): P = 1 and 2 ranks each
SUBGROUPS = {2: [[0], [1]], 4: [[0, 2], [1, 3]]}
TRAIN_B, TRAIN_L = 1, 16


def _inputs(name, world, spec):
    """Full-sequence q, k, v and the output gradient of a case (the same in every process)."""
    b, hq, hkv, shard, d, dv, _, _, dtype, _ = spec
    length = world * shard
    g = torch.Generator().manual_seed(sum(map(ord, name)) + world)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return randn(b, hq, length, d), randn(b, hkv, length, d), randn(b, hkv, length, dv), randn(b, hq, length, dv)


# ----------------------------------------------------------------------------------------------------
# Worker (runs in a subprocess)
# ----------------------------------------------------------------------------------------------------


class _Log:
    """Exchanges (from batch_isend_irecv) and kernel launches, in the order they happen."""

    def __init__(self):
        self.events = []
        self.on = False

    def install(self, dist, attention_ops):
        real_x = dist.batch_isend_irecv
        real_f, real_b = attention_ops.attention_forward, attention_ops.attention_backward

        def exchange(ops):
            if self.on:
                sends = [o for o in ops if o.op is dist.isend]
                recvs = [o for o in ops if o.op is dist.irecv]
                self.events.append((
                    "x", sum(o.tensor.numel() * o.tensor.element_size() for o in sends),
                    sum(o.tensor.numel() * o.tensor.element_size() for o in recvs),
                    sorted({o.peer for o in sends}), sorted({o.peer for o in recvs}),
                ))
            return real_x(ops)

        def forward(q, k, v, causal_offset, *args, **kwargs):
            if self.on:
                self.events.append(("f", q.shape[2], k.shape[2], causal_offset))
            return real_f(q, k, v, causal_offset, *args, **kwargs)

        def backward(*args, **kwargs):
            if self.on:  # (grad_out, q, k, v, out, lse, [lse_lo,] causal_offset, scale)
                self.events.append(("b", args[1].shape[2], args[2].shape[2], args[-2]))
            return real_b(*args, **kwargs)

        dist.batch_isend_irecv = exchange
        attention_ops.attention_forward = forward
        attention_ops.attention_backward = backward


def _new_storages(fn, inputs):
    """Run ``fn``; count the distinct new storages with the shape and dtype of one of ``inputs``."""
    shapes, dtype = {tuple(t.shape) for t in inputs}, inputs[0].dtype
    existing = {t.untyped_storage().data_ptr() for t in inputs}
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor) and tuple(t.shape) in shapes and t.dtype == dtype:
                    seen.add(t.untyped_storage().data_ptr())
            return result

    with Mode():
        out = fn()
    return out, len(seen - existing)


def _shard_input(t, layout, blhd, group):
    if blhd:  # (B, L, H, D) storage, seen as (B, H, L, D)
        return gkd.shard_sequence(t.transpose(1, 2).contiguous(), dim=1, group=group, layout=layout).transpose(1, 2)
    return gkd.shard_sequence(t, dim=2, group=group, layout=layout)


def _run_case(name, spec, world, log, device, group=None):
    causal, layout, blhd = spec[6], spec[7], spec[9]
    q, k, v, dout = (t.to(device) for t in _inputs(name, world, spec))
    ql, kl, vl = (_shard_input(t, layout, blhd, group).detach().requires_grad_(n not in FROZEN.get(name, ()))
                  for n, t in zip("qkv", (q, k, v)))
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.numel() * t.element_size()))
        return t

    log.events.clear()
    log.on = True
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, kv_buffers = _new_storages(
            lambda: gkd.ring_attention(ql, kl, vl, causal=causal, group=group, layout=layout), (kl, vl))
    n_fwd = len(log.events)
    out.backward(gkd.shard_sequence(dout, dim=2, group=group, layout=layout))
    log.on = False
    events = list(log.events)
    results = (out, ql.grad, kl.grad, vl.grad)
    gathered = [None if t is None else gkd.unshard_sequence(t.detach(), dim=2, group=group, layout=layout).cpu()
                for t in results]
    return {
        "gathered": gathered,
        "fwd_events": events[:n_fwd], "bwd_events": events[n_fwd:], "saved": saved, "kv_buffers": kv_buffers,
        "kv_copies": (not kl.is_contiguous()) + (not vl.is_contiguous()), "kernels": backend_for(ql) != "torch",
        "bits": [None if t is None else t.detach().cpu().clone() for t in results],
    }


def _ring_self_attention(self, x):
    """TinyLM's CausalSelfAttention.forward with the SDPA call replaced by ring attention (the recipe)."""
    b, length, _ = x.shape
    cfg, hd = self.cfg, self.cfg.head_dim
    q = self.q_proj(x).view(b, length, cfg.n_heads, hd).transpose(1, 2)
    k = self.k_proj(x).view(b, length, cfg.n_kv_heads, hd).transpose(1, 2)
    v = self.v_proj(x).view(b, length, cfg.n_kv_heads, hd).transpose(1, 2)
    o = gkd.ring_attention(q, k, v, causal=True, layout=self.cp_layout)
    return self.o_proj(o.transpose(1, 2).reshape(b, length, cfg.n_heads * hd))


def rope(x, pos, base=10000.0):
    """Rotary embedding of (B, H, L, D) ``x`` at the global positions ``pos`` (L,) (the README's)."""
    half = x.shape[-1] // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float64) / half)
    angle = pos[:, None].double() * freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


ROPE = {"B": 1, "L": 16, "C": 32, "H": 2, "HKV": 1, "D": 16}


def _rope_tensors(dtype):
    g = torch.Generator().manual_seed(5)
    c, hd = ROPE["C"], ROPE["D"]
    shapes = {"x": (ROPE["B"], ROPE["L"], c), "wq": (ROPE["H"] * hd, c), "wk": (ROPE["HKV"] * hd, c),
              "wv": (ROPE["HKV"] * hd, c), "g": (ROPE["B"], ROPE["L"], ROPE["H"] * hd)}
    return {n: (torch.randn(*s, generator=g, dtype=torch.float64) / math.sqrt(s[-1])).to(dtype)
            for n, s in shapes.items()}


def _rope_layer(t, x, pos, attend):
    """Llama-style attention with RoPE: projections, rotary angles of ``pos``, causal attention."""
    b, length, _ = x.shape
    hd = ROPE["D"]
    q = (x @ t["wq"].T).view(b, length, -1, hd).transpose(1, 2)
    k = (x @ t["wk"].T).view(b, length, -1, hd).transpose(1, 2)
    v = (x @ t["wv"].T).view(b, length, -1, hd).transpose(1, 2)
    o = attend(rope(q, pos), rope(k, pos), v)
    return o.transpose(1, 2).reshape(b, length, -1)


def _rope_step(dist, device, layout):
    """The README recipe on one layer: sharded x and positions, ring attention; grads of x and weights."""
    t = {n: v.to(device) for n, v in _rope_tensors(torch.float32).items()}
    for n in ("wq", "wk", "wv"):
        t[n].requires_grad_(True)
    x = gkd.shard_sequence(t["x"], dim=1, layout=layout).requires_grad_(True)
    pos = gkd.shard_positions(ROPE["L"], layout=layout, device=device)
    y = _rope_layer(t, x, pos, lambda q, k, v: gkd.ring_attention(q, k, v, causal=True, layout=layout))
    (y * gkd.shard_sequence(t["g"], dim=1, layout=layout)).sum().backward()
    grads = {n: t[n].grad for n in ("wq", "wk", "wv")}
    for g in grads.values():
        dist.all_reduce(g)
    full = {"y": y.detach(), "dx": x.grad}
    full = {n: gkd.unshard_sequence(v, dim=1, layout=layout).cpu() for n, v in full.items()}
    return {**full, **{n: g.cpu() for n, g in grads.items()}}


def _train_batch():
    return make_batches(TinyLMConfig(), 1, TRAIN_B, TRAIN_L, seed=1)[0]


def _base_model():
    torch.manual_seed(0)
    return TinyLM(TinyLMConfig())


def _train_step(dist, device, dtype, layout):
    """One step of sequence-sharded TinyLM: local loss over this rank's tokens / all tokens, all-reduced."""
    model = _base_model().to(device=device, dtype=dtype)
    for block in model.blocks:
        block.attn.cp_layout = layout
        block.attn.forward = types.MethodType(_ring_self_attention, block.attn)
    inputs, targets = (t.to(device) for t in _train_batch())
    local_in, local_tgt = (gkd.shard_sequence(t, dim=1, layout=layout) for t in (inputs, targets))
    logits = model(local_in, position_ids=gkd.shard_positions(TRAIN_L, layout=layout, device=device))
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), local_tgt.reshape(-1), reduction="sum")
    loss = loss / targets.numel()
    loss.backward()
    for p in model.parameters():  # what DDP over the context-parallel group does
        dist.all_reduce(p.grad)
    total = loss.detach().clone()
    dist.all_reduce(total)
    return {"loss": total.item(), "grads": {n: p.grad.cpu() for n, p in model.named_parameters()}}


def _errors(world):
    """The messages of the divisibility errors (need a process group of ``world`` ranks)."""
    found = {}
    attempts = {
        "shard-zigzag": lambda: gkd.shard_sequence(torch.randn(1, 2 * world + 1, 3), layout="zigzag"),
        "shard-contiguous": lambda: gkd.shard_sequence(torch.randn(1, world + 1, 3), layout="contiguous"),
        "ring-odd-zigzag": lambda: gkd.ring_attention(*(torch.randn(1, 1, 3, 16) for _ in range(3))),
        "unshard-odd-zigzag": lambda: gkd.unshard_sequence(torch.randn(1, 3), layout="zigzag"),
    }
    for key, fn in attempts.items():
        try:
            fn()
            found[key] = None
        except Exception as e:
            found[key] = (type(e).__name__, str(e))
    return found


def _unshard_roundtrip(world):
    """unshard(shard(w)) == w, and its backward: every rank's loss sum(unshard(x) * w) gives x the
    gradient P * shard(w) (summed over the ranks). Small integers in fp64: exact."""
    ok = {}
    for layout in gkd.LAYOUTS:
        w = torch.arange(4 * world * 3, dtype=torch.float64).view(1, 4 * world, 3) + 1
        x = gkd.shard_sequence(w, dim=1, layout=layout).clone().requires_grad_(True)
        z = gkd.unshard_sequence(x, dim=1, layout=layout)
        (z * w).sum().backward()
        expected_grad = world * gkd.shard_sequence(w, dim=1, layout=layout)
        ok[layout] = torch.equal(z.detach(), w) and torch.equal(x.grad, expected_grad)
    return ok


def _worker(rank, world, store, out, suite):
    import torch.distributed as dist

    from gradkernels.ops import attention as attention_ops

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    log = _Log()
    log.install(dist, attention_ops)
    names = (DEFAULT if suite == "default" else SLOW)[world]
    results = {"cases": {}, "ranks": {}}
    for name in names:
        r = _run_case(name, CASES[name], world, log, device)
        if name == DETERMINISM_CASE:
            again = _run_case(name, CASES[name], world, log, device)
            r["deterministic"] = all(torch.equal(a, b) for a, b in zip(r["bits"], again["bits"]))
        del r["bits"]
        results["cases"][name] = r
    if suite == "default":  # independent rings in one job: P = 4 as {0, 2} and {1, 3}, P = 2 as {0}, {1}
        groups = [dist.new_group(members) for members in SUBGROUPS[world]]
        sub_group = next(g for g, members in zip(groups, SUBGROUPS[world]) if rank in members)
        r = _run_case(SUBGROUP_CASE, CASES[SUBGROUP_CASE], world // 2, log, device, group=sub_group)
        del r["bits"]
        results["subgroup"] = r
    if world in TRAIN[suite]:
        results["train"] = _train_step(dist, device, torch.float32, "zigzag")
        results["rope"] = _rope_step(dist, device, "zigzag")
    if suite == "default":
        results["errors"] = _errors(world)
        results["unshard"] = _unshard_roundtrip(world)
    # Per-rank logs to rank 0.
    keys = ("fwd_events", "bwd_events", "saved", "kv_buffers", "kv_copies")
    mine = {name: {k: r[k] for k in keys}
            for name, r in results["cases"].items()}
    if "subgroup" in results:
        mine["subgroup"] = {k: results["subgroup"][k] for k in ("fwd_events", "bwd_events")}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        results["ranks"] = everyone
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Spawning
# ----------------------------------------------------------------------------------------------------


def _spawn(world, suite, tmp):
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs on a CUDA machine (one NCCL rank per GPU); runs on CPU with gloo")
    store, out = tmp / "store", tmp / "results.pt"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), str(store), str(out), suite],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    failed = [(r, p.returncode, logs[r]) for r, p in enumerate(procs) if p.returncode]
    assert not failed, "\n".join(f"rank {r} exited {rc}:\n{log[-4000:]}" for r, rc, log in failed)
    return torch.load(out)


# ----------------------------------------------------------------------------------------------------
# What each case must give (computed here, independently of the library)
# ----------------------------------------------------------------------------------------------------


def _oracles(q, k, v, dout, causal):
    """(ref, floors, same, single) for out, dq, dk, dv: the high-precision reference of
    :mod:`gradkernels.testing` with its rounding-error floors, torch's path in the dtype, and
    single-process gradkernels."""
    scale = 1 / math.sqrt(q.shape[-1])
    r = testing.attention_reference(q, k, v, dout, causal=causal, scale=scale)
    b = testing.attention_bounds(q, k, v, dout, causal=causal, scale=scale)
    names = ("out", "dq", "dk", "dv")
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = reference.standard_attention(qq, kk, vv, causal, scale)
    same = (out.detach(), *torch.autograd.grad(out, (qq, kk, vv), dout))
    # The kernels in one process, on the whole sequence (on the GPU where there is one).
    qq, kk, vv = (t.to(DEVICE).requires_grad_(True) for t in (q, k, v))
    out = gradkernels.attention(qq, kk, vv, causal=causal)
    single = (out.detach(), *torch.autograd.grad(out, (qq, kk, vv), dout.to(DEVICE)))
    return tuple(r[n] for n in names), tuple(b[n] for n in names), same, tuple(t.cpu() for t in single)


def _block_plan(rank, world, step, causal, layout, shard):
    """The spec: (query rows, key columns, causal offset) rank ``rank`` computes at ``step``, or None."""
    owner = (rank - step) % world
    if not causal:
        return shard, shard, None
    if owner == rank:
        return shard, shard, 0
    if layout == "contiguous":
        return (shard, shard, None) if owner < rank else None
    c = shard // 2  # zigzag: rank r holds chunks r and 2P-1-r of size c
    return (shard, c, None) if owner < rank else (c, shard, None)


def _expected_events(rank, world, spec, peers, acc_size, frozen=()):
    """The forward and backward event streams of ``rank`` (see _Log), from the spec of the algorithm:
    the dK/dV accumulators carry only the gradients that are needed (none: no exchange)."""
    b, _, hkv, shard, d, dv, causal, layout, dtype, _ = spec
    es = torch.empty((), dtype=dtype).element_size()
    kv = b * hkv * shard * (d + dv) * es
    dkv = b * hkv * shard * (d * ("k" not in frozen) + dv * ("v" not in frozen)) * acc_size
    nxt, prv = peers
    fwd, bwd = [], []
    for step in range(world):
        plan = _block_plan(rank, world, step, causal, layout, shard)
        if step < world - 1:
            fwd.append(("x", kv, kv, [nxt], [prv]))
            bwd.append(("x", kv, kv, [nxt], [prv]))
        if plan is not None:
            fwd.append(("f", *plan))
            bwd.append(("b", *plan))
        if world > 1 and dkv:
            bwd.append(("x", dkv, dkv, [nxt], [prv]))
    return fwd, bwd


def _check_case(name, spec, world, got, ranks_log, failures, ranks=None):
    from utils import assert_close

    b, hq, hkv, shard, d, dv, causal, layout, dtype, _ = spec
    q, k, v, dout = _inputs(name, world, spec)
    ref, floors, same, single = _oracles(q, k, v, dout, causal)
    kernels_single = backend_for(q.to(DEVICE)) != "torch"
    for i, what in enumerate(("out", "dq", "dk", "dv")):
        factor = FACTOR_OUT if i == 0 else FACTOR_GRAD
        if i > 0 and what[1] in FROZEN.get(name, ()):
            if got["gathered"][i] is not None:
                failures.append(f"{name} P={world}: a gradient for frozen {what[1]}")
            continue
        try:
            assert_close(got["gathered"][i], same[i], ref[i], factor, f"{name} P={world} {what} vs fp64",
                         floor=floors[i])
            if kernels_single:
                # The single-process kernels have their own rounding: their distance to the ring's result
                # is bounded by both distances to the reference.
                assert_close(got["gathered"][i], same[i], single[i].double(), factor,
                             f"{name} P={world} {what} vs single-process gradkernels.attention",
                             floor=2 * floors[i] + (single[i].double() - ref[i]).abs())
        except AssertionError as e:
            failures.append(str(e))
    acc_size = 8 if dtype == torch.float64 else 4
    es = torch.empty((), dtype=dtype).element_size()
    ranks = ranks if ranks is not None else list(range(world))
    for r, log in zip(range(world), ranks_log):
        peers = (ranks[(r + 1) % world], ranks[(r - 1) % world])
        fwd, bwd = _expected_events(r, world, spec, peers, acc_size, FROZEN.get(name, ()))
        if not got["kernels"]:  # the torch path (bf16 under the interpreter): no kernel launches
            fwd, bwd = ([e for e in s if e[0] == "x"] for s in (fwd, bwd))
        if log["fwd_events"] != fwd:
            failures.append(f"{name} P={world} rank {r}: forward schedule {log['fwd_events']} != {fwd}")
        if log["bwd_events"] != bwd:
            failures.append(f"{name} P={world} rank {r}: backward schedule {log['bwd_events']} != {bwd}")
        if "saved" in log:
            model = sorted([b * hq * shard * d * es, b * hkv * shard * d * es, b * hkv * shard * dv * es,
                            b * hq * shard * dv * es, b * hq * shard * acc_size, b * hq * shard * acc_size])
            if sorted(n for _, n in log["saved"]) != model:
                failures.append(f"{name} P={world} rank {r}: saved {log['saved']} != model {model} bytes")
            if any(shard < s[2] for s, _ in log["saved"] if len(s) >= 3):
                failures.append(f"{name} P={world} rank {r}: a saved tensor spans more than the shard")
            # Receive buffers for K and V (two each at most, reused) and contiguous copies of strided
            # inputs, counted by the shapes of k and v: unambiguous when q and out have more heads (GQA).
            buffers = 2 * min(2, world - 1) + log["kv_copies"]
            if hq != hkv and log["kv_buffers"] != buffers:
                failures.append(f"{name} P={world} rank {r}: {log['kv_buffers']} K-sized buffers in the forward, "
                                f"expected {buffers}")


def _check_train(got, failures, world):
    from utils import assert_close

    inputs, targets = _train_batch()
    plain = {}
    for dtype in (torch.float32, torch.float64):
        model = _base_model().to(dtype)
        loss = model(inputs, targets)
        loss.backward()
        plain[dtype] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()})
    (loss32, g32), (loss64, g64) = plain[torch.float32], plain[torch.float64]
    try:
        assert_close(torch.tensor(got["loss"], dtype=torch.float32), loss32, loss64, FACTOR_OUT,
                      f"P={world} TinyLM loss")
        assert set(got["grads"]) == set(g64)
        for name in g64:
            assert_close(got["grads"][name], g32[name], g64[name], FACTOR_GRAD, f"P={world} TinyLM grad {name}")
    except AssertionError as e:
        failures.append(str(e))


def _check_rope(got, failures, world):
    """The recipe's layer, sharded, against the unsharded layer: fp64 reference, fp32 torch scale."""
    from utils import assert_close

    results = {}
    for dtype in (torch.float32, torch.float64):
        t = _rope_tensors(dtype)
        for n in ("x", "wq", "wk", "wv"):
            t[n].requires_grad_(True)
        pos = torch.arange(ROPE["L"])
        y = _rope_layer(t, t["x"], pos, lambda q, k, v: reference.standard_attention(q, k, v, causal=True))
        (y * t["g"]).sum().backward()
        results[dtype] = {"y": y.detach(), "dx": t["x"].grad, **{n: t[n].grad for n in ("wq", "wk", "wv")}}
    try:
        for name, ref in results[torch.float64].items():
            assert_close(got[name], results[torch.float32][name], ref, FACTOR_OUT if name == "y" else FACTOR_GRAD,
                          f"P={world} RoPE layer {name}")
    except AssertionError as e:
        failures.append(str(e))


def _check_errors(errors, world):
    expected = {
        "shard-zigzag": ("ValueError", f"divisible by 2 * P = {2 * world}"),
        "shard-contiguous": ("ValueError", f"divisible by P = {world}"),
        "ring-odd-zigzag": ("ValueError", "must be even"),
        "unshard-odd-zigzag": ("ValueError", "must be even"),
    }
    for key, (kind, text) in expected.items():
        assert errors[key] is not None, f"{key}: no error raised"
        assert errors[key][0] == kind and text in errors[key][1], (key, errors[key])


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------


def _check_run(res, world, names, failures):
    for name in names:
        logs = [rank_logs[name] for rank_logs in res["ranks"]]
        _check_case(name, CASES[name], world, res["cases"][name], logs, failures)
    if "train" in res:
        _check_train(res["train"], failures, world)
        _check_rope(res["rope"], failures, world)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_in_processes(world, tmp_path):
    """The default cases at P ranks in one spawn; all failures are collected, then reported together."""
    res = _spawn(world, "default", tmp_path)
    failures = []
    _check_run(res, world, DEFAULT[world], failures)
    if DETERMINISM_CASE in res["cases"]:
        assert res["cases"][DETERMINISM_CASE]["deterministic"], "two runs of one case differ bitwise"
    ring0 = SUBGROUPS[world][0]  # the sub-ring of rank 0 (group ranks differ from global ones)
    logs = [res["ranks"][r]["subgroup"] for r in ring0]
    _check_case(SUBGROUP_CASE, CASES[SUBGROUP_CASE], len(ring0), res["subgroup"], logs, failures, ranks=ring0)
    _check_errors(res["errors"], world)
    assert res["unshard"] == {"zigzag": True, "contiguous": True}, res["unshard"]
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_in_processes_slow(world, tmp_path):
    """The other cases (longer shards than one interpreter tile, D = 80, more dtype/layout combinations)
    and the TinyLM step at P = 4."""
    res = _spawn(world, "slow", tmp_path)
    failures = []
    _check_run(res, world, SLOW[world], failures)
    assert not failures, "\n".join(failures)


def test_errors_before_any_communication():
    """Argument errors name the argument and come before the process group is looked up."""
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="layout must be one of"):
        gkd.ring_attention(q, q, q, layout="striped")
    with pytest.raises(ValueError, match="same positions"):
        gkd.ring_attention(q, q[:, :, :2], q[:, :, :2])
    with pytest.raises(ValueError, match="must be even"):
        gkd.ring_attention(q[:, :, :3], q[:, :, :3], q[:, :, :3])
    with pytest.raises(TypeError, match="causal must be a bool"):
        gkd.ring_attention(q, q, q, causal=1)
    with pytest.raises(ValueError, match="multiple of"):
        gkd.ring_attention(q, q[:, :1].expand(1, 3, 4, 16), q[:, :1].expand(1, 3, 4, 16))
    with pytest.raises(ValueError, match="layout must be one of"):
        gkd.shard_sequence(q, layout=None)
    with pytest.raises(ValueError, match="dim must be an int"):
        gkd.shard_sequence(q, dim=4)


def test_not_initialized_is_a_clear_error():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="init_process_group"):
        gkd.ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        gkd.shard_sequence(q, dim=2)


def test_bench_model_is_the_schedule_of_the_spec():
    """The bench's analytic model (gradkernels.bench.ring) against this file's spec of the exchanges, and
    its saved-bytes model against the tensors listed by hand, on every case at P = 1, 2, 4, 8."""
    from gradkernels.bench import ring as bench_ring

    for name, spec in CASES.items():
        b, hq, hkv, shard, d, dv, causal, layout, dtype, _ = spec
        for world in (1, 2, 4, 8):
            case = bench_ring.RingCase(b, hq, hkv, shard, d, dv, causal, layout, dtype, world)
            fwd, bwd = _expected_events(0, world, spec, (1, world - 1), 8 if dtype == F64 else 4)
            model = bench_ring.comm_model(case)
            assert model["fwd"] == [e[1] for e in fwd if e[0] == "x"], (name, world)
            assert model["bwd"] == [e[1] for e in bwd if e[0] == "x"], (name, world)
            es, acc = torch.empty((), dtype=dtype).element_size(), 8 if dtype == F64 else 4
            q, k, v, out = (torch.empty(b, h, shard, n, dtype=dtype)
                            for h, n in ((hq, d), (hkv, d), (hkv, dv), (hq, dv)))
            lse_rows = 2 * b * hq * shard * acc
            assert bench_ring.saved_model(case) == sum(t.numel() * es for t in (q, k, v, out)) + lse_rows


def test_bench_rows_fail_on_a_wrong_count():
    """A rank that sent a byte more than the model is a failed row (so the CLI exits 1), a right one is ok."""
    from gradkernels.bench import ring as bench_ring

    case = bench_ring.RingCase(1, 2, 1, 8, 16, 16, True, "zigzag", F32, 2)
    model = bench_ring.comm_model(case)
    right = {"fwd": [(n, n) for n in model["fwd"]], "bwd": [(n, n) for n in model["bwd"]],
             "saved": bench_ring.saved_model(case)}
    wrong = dict(right, bwd=[(n + 1, n) for n in model["bwd"]])
    rows = bench_ring._rows(case, [right, wrong], None, "cpu")
    status = {(r.case, r.mode): r.status for r in rows}
    assert status[("comm", "fwd")] == "ok" and status[("saved", "saved")] == "ok"
    assert status[("comm", "bwd")].startswith("failed: rank 1 sent")


def _bench_ring(tmp_path, *args, env=None):
    from gradkernels.bench import report

    proc = subprocess.run(
        [sys.executable, "-m", "gradkernels.bench", "ring", "--quick", "--no-progress", "--no-plots",
         "--out", str(tmp_path), *args],
        cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, report.read_csv(tmp_path / "results.csv")


@pytest.mark.slow
def test_bench_ring_cli_on_cpu(tmp_path):
    """``python -m gradkernels.bench ring --quick`` on a CPU: 2 gloo processes, every row measured and ok."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc, rows = _bench_ring(tmp_path, env=env)
    assert "bytes sent and saved are measured" in proc.stdout
    assert {(r["case"], r["mode"]) for r in rows} == {("comm", "fwd"), ("comm", "bwd"), ("saved", "saved")}
    assert {r["provider"] for r in rows} == {"ring-zigzag", "ring-contiguous"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms_p50"] == "", "no time is taken on a CPU"
        measured, model = ("saved_bytes", "model_saved_bytes") if r["mode"] == "saved" else (
            "sent_bytes", "model_sent_bytes")
        assert int(r[measured]) == int(r[model]) > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs >= 2 CUDA GPUs (one NCCL rank per GPU)")
def test_bench_ring_weak_scaling_and_overlap_on_gpus(tmp_path):
    """NCCL on every P = 2, 4, 8 the machine has: the shard length is fixed while P grows (weak scaling),
    and each case is timed with the ring and with the exchanges replaced by local copies (overlap).
    Asserts the measurements exist and the byte counts match; speed is reported, never asserted.
    Not yet run: no multi-GPU machine was available when this was written."""
    worlds = ",".join(str(p) for p in (2, 4, 8) if p <= torch.cuda.device_count())
    _, rows = _bench_ring(tmp_path, "--world", worlds, "--causal")
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    timed = [r for r in rows if r["case"] in ("time", "time-compute-only")]
    assert {r["P"] for r in timed} == set(worlds.split(","))
    assert {(r["case"], r["provider"]) for r in timed} == {
        (c, p) for c in ("time", "time-compute-only") for p in ("ring-zigzag", "ring-contiguous")}
    assert all(float(r["ms_p50"]) > 0 for r in timed)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
    else:
        sys.exit(f"usage: {sys.argv[0]} --worker RANK WORLD STORE OUT SUITE (the test runs this itself)")
