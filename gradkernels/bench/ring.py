"""Ring attention suite: communication and memory of ``gradkernels.distributed.ring_attention``, measured
against the analytic model; on >= 2 GPUs also weak scaling and overlap.

``python -m gradkernels.bench ring [--quick] [--world 2,4] [--shard-lens 16,48] [--dtype ...]``

For each process count P the suite starts P worker processes (this module, ``--worker``) in one process
group: gloo on CPU (the kernels under Triton's interpreter), NCCL when the machine has P GPUs. Each
worker runs every case (layout zigzag / contiguous x causal yes / no; shard length L/P per rank) once
forward and backward, with

- a counting wrapper around ``torch.distributed.batch_isend_irecv``: the bytes this rank sends and
  receives at every exchange (the ring makes one exchange per step and direction of travel);
- ``torch.autograd.graph.saved_tensors_hooks``: every storage kept for backward, counted once.

The analytic model (:func:`comm_model`, :func:`saved_model`), per rank and call, with c = B * Hkv * (L/P)
and the input element size s (the accumulator's a: 4, 8 for fp64):

- forward: P - 1 exchanges of the K/V block, ``c * (D + Dv) * s`` bytes each (step P has nothing to send);
- backward: P - 1 exchanges of the K/V block as above, and P exchanges of the dK/dV accumulators,
  ``c * (D + Dv) * a`` bytes each (the last hop brings each block's accumulators home);
- saved for backward: this rank's q, k, v, out and two LSE rows (``lse`` and ``lse_lo``), all O(L/P).

A row is ``ok`` when every rank's every exchange matches the model to the byte (and the saved bytes do).

With P GPUs (NCCL), each case is also timed (CUDA events, median of ``--rep`` ms of repetitions):
case ``time`` is forward+backward of ring_attention; ``time-compute-only`` runs the same per-step
kernels on the same shapes with the exchanges replaced by local copies. Their ratio is the overlap: 1.0 means the
communication is completely hidden behind the kernels. Weak scaling: the shard length is fixed while
P grows (L = P * shard). The GPU part has not been run yet (no multi-GPU machine was available).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch

from .. import distributed as gkd
from .harness import DTYPE_NAMES, Row

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class RingCase:
    """One ring configuration: sizes per rank (``shard`` positions) and the world size P."""

    B: int
    Hq: int
    Hkv: int
    shard: int
    D: int
    Dv: int
    causal: bool
    layout: str
    dtype: torch.dtype
    P: int

    @property
    def L(self) -> int:
        return self.P * self.shard

    def fields(self) -> dict:
        return {"B": self.B, "H": self.Hq, "Lq": self.L, "Lk": self.L, "D": self.D, "causal": self.causal,
                "P": self.P}

    def label(self) -> str:
        return (f"P={self.P} L={self.L} ({self.shard}/rank) B={self.B} H={self.Hq}/{self.Hkv} D={self.D} "
                f"{self.layout}{' causal' if self.causal else ''}")


def _es(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _acc_es(dtype) -> int:
    return 8 if dtype == torch.float64 else 4


def comm_model(case: RingCase) -> dict:
    """Bytes one rank sends at each exchange of one call: ``{"fwd": [...], "bwd": [...]}`` in order."""
    block = case.B * case.Hkv * case.shard * (case.D + case.Dv)
    kv, dkv = block * _es(case.dtype), block * _acc_es(case.dtype)
    fwd, bwd = [], []
    for step in range(case.P):
        if step < case.P - 1:
            fwd.append(kv)
            bwd.append(kv)
        if case.P > 1:
            bwd.append(dkv)
    return {"fwd": fwd, "bwd": bwd}


def saved_model(case: RingCase) -> int:
    """Bytes one rank saves for backward: q, k, v, out and two LSE rows of its shard."""
    rows = case.B * case.Hq * case.shard
    es = _es(case.dtype)
    return (rows * case.D + case.B * case.Hkv * case.shard * (case.D + case.Dv) + rows * case.Dv) * es \
        + 2 * rows * _acc_es(case.dtype)


def cases(on_gpu: bool, quick: bool, dtype, worlds, shard_lens=None, causal=(False, True), heads=None,
          head_dims=None, batch=None) -> list[RingCase]:
    """The sweep: every world size x shard length x layout x causal setting."""
    if on_gpu:
        shard_lens = shard_lens or ((4096,) if quick else (4096, 16384))
        d = (head_dims or (128,))[0]
        hq = heads or 16
        b = batch or 1
    else:  # the interpreter: tiny
        shard_lens = shard_lens or ((16,) if quick else (16, 48))
        d = (head_dims or (16,))[0]
        hq = heads or 2
        b = batch or 1
    hkv = max(1, hq // 2) if hq % 2 == 0 else hq  # GQA 2:1 where the head count allows it
    out = []
    for world in worlds:
        for shard in shard_lens:
            for layout in LAYOUTS:
                for c in causal:
                    out.append(RingCase(b, hq, hkv, shard, d, d, c, layout, dtype, world))
    return out


# ----------------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------------


def _encode(case: RingCase) -> dict:
    d = dict(case.__dict__)
    d["dtype"] = DTYPE_NAMES[case.dtype]
    return d


def _decode(d: dict) -> RingCase:
    from .harness import DTYPES

    return RingCase(**{**d, "dtype": DTYPES[d["dtype"]]})


def _worker(rank: int, world: int, store: str, cases_path: str, out: str, rep_ms: int) -> None:
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    calls = []
    real = dist.batch_isend_irecv

    def counting(ops):
        sent = sum(o.tensor.numel() * o.tensor.element_size() for o in ops if o.op is dist.isend)
        received = sum(o.tensor.numel() * o.tensor.element_size() for o in ops if o.op is dist.irecv)
        calls.append((sent, received))
        return real(ops)

    dist.batch_isend_irecv = counting
    with open(cases_path) as f:
        todo = [_decode(d) for d in json.load(f)]
    results = []
    for case in todo:
        g = torch.Generator(device=device).manual_seed(1000 * rank + 7)

        def randn(*shape, case=case, g=g):
            return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(case.dtype)

        q = randn(case.B, case.Hq, case.shard, case.D).requires_grad_(True)
        k = randn(case.B, case.Hkv, case.shard, case.D).requires_grad_(True)
        v = randn(case.B, case.Hkv, case.shard, case.Dv).requires_grad_(True)
        dout = randn(case.B, case.Hq, case.shard, case.Dv)
        seen = {}

        def pack(t, seen=seen):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        def call(q=q, k=k, v=v, case=case):
            return gkd.ring_attention(q, k, v, causal=case.causal, layout=case.layout)

        result = {"case": _encode(case), "rank": rank}
        try:
            calls.clear()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                o = call()
            fwd_calls = list(calls)
            o.backward(dout)
            result.update(fwd=fwd_calls, bwd=calls[len(fwd_calls):], saved=sum(seen.values()))
            del o
            if cuda:
                result.update(_time(call, dout, q, k, v, case, rep_ms))
        except Exception as exc:  # reported as a failed row, the other cases go on
            result["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        results.append(result)
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(everyone, f)
    dist.barrier()
    dist.destroy_process_group()


def _time(call, dout, q, k, v, case, rep_ms):
    """CUDA: median ms of forward+backward with the ring, and with the exchanges replaced by copies."""
    def ring_step():
        q.grad = k.grad = v.grad = None
        call().backward(dout)

    def compute_step():
        q.grad = k.grad = v.grad = None
        ring = _LocalRing.of(None, case.layout)
        scale = 1.0 / case.D ** 0.5
        gkd.RingAttentionFunction.apply(q, k, v, case.causal, scale, ring).backward(dout)

    return {"ms_ring": _median_ms(ring_step, rep_ms), "ms_compute": _median_ms(compute_step, rep_ms)}


def _median_ms(fn, rep_ms):
    import torch.distributed as dist

    for _ in range(3):  # warm-up: autotuning, NCCL connections
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    times = []
    total = 0.0
    while total < rep_ms or len(times) < 5:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        total += times[-1]
    dist.barrier()
    times.sort()
    return times[len(times) // 2]


class _LocalRing(gkd._Ring):
    """The ring's schedule with every exchange replaced by a local copy (compute-only timing)."""

    @staticmethod
    def of(group, layout):
        r = gkd._Ring.of(group, layout)
        return _LocalRing(r.group, r.rank, r.size, r.next, r.prev, r.layout)

    def exchange(self, send, recv):
        for s, r in zip(send, recv):
            r.copy_(s)
        return []


# ----------------------------------------------------------------------------------------------------
# Parent: spawn, collect, rows
# ----------------------------------------------------------------------------------------------------


def run(case_list, device: str, rep_ms: int = 100, progress=None, timeout: float = 900) -> list[Row]:
    """Spawn one process group per world size, run its cases, and return the rows (comm, saved, time)."""
    rows: list[Row] = []
    by_world: dict[int, list[RingCase]] = {}
    for c in case_list:
        by_world.setdefault(c.P, []).append(c)
    for world, group in by_world.items():
        if device == "cuda" and torch.cuda.device_count() < world:
            for c in group:
                rows += _rows(c, None, f"skipped: needs {world} GPUs (one NCCL rank per GPU), "
                                       f"{torch.cuda.device_count()} visible", device)
            continue
        results, status = _spawn(world, group, rep_ms, timeout)
        for c in group:
            per_rank = None if results is None else [
                next(r for r in rank_results if _decode(r["case"]) == c) for rank_results in results]
            rows += _rows(c, per_rank, status, device)
            if progress:
                progress.step(f"ring {c.label()}: {rows[-1].status}")
    return rows


def _spawn(world, group, rep_ms, timeout):
    with tempfile.TemporaryDirectory() as tmp:
        store, cases_path, out = (os.path.join(tmp, n) for n in ("store", "cases.json", "out.json"))
        with open(cases_path, "w") as f:
            json.dump([_encode(c) for c in group], f)
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "gradkernels.bench.ring", "--worker"]
        procs = [subprocess.Popen(cmd + [str(r), str(world), store, cases_path, out, str(rep_ms)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(world)]
        logs = []
        for p in procs:
            try:
                logs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                for other in procs:
                    other.kill()
                return None, f"failed: the {world} workers did not finish within {timeout:.0f} s"
        bad = [(r, p.returncode, logs[r]) for r, p in enumerate(procs) if p.returncode]
        if bad:
            r, rc, log = bad[0]
            last = (log.strip().splitlines() or [""])[-1][:160]
            return None, f"failed: rank {r} exited {rc}: {last}"
        with open(out) as f:
            return json.load(f), None


def _rows(case: RingCase, per_rank, status, device) -> list[Row]:
    dtype = DTYPE_NAMES[case.dtype]
    provider = f"ring-{case.layout}"
    model = comm_model(case)

    def row(mode, **kw):
        r = Row(suite="ring", case="comm" if mode in ("fwd", "bwd") else mode, provider=provider, baseline=False,
                mode=mode, dtype=dtype, shape=case.fields())
        for k, v in kw.items():
            setattr(r, k, v)
        return r

    out = []
    if per_rank is None:
        for mode in ("fwd", "bwd"):
            out.append(row(mode, model_sent_bytes=sum(model[mode]), status=status))
        out.append(row("saved", model_saved_bytes=saved_model(case), model_param_bytes=0, status=status))
        return out
    errors = [r["error"] for r in per_rank if "error" in r]
    for mode in ("fwd", "bwd"):
        r = row(mode, model_sent_bytes=sum(model[mode]))
        if errors:
            r.status = f"failed: {errors[0]}"
        else:
            sent = [[c[0] for c in pr[mode]] for pr in per_rank]
            recv = [[c[1] for c in pr[mode]] for pr in per_rank]
            r.sent_bytes = max(sum(s) for s in sent)
            wrong = [i for i, (s, rv) in enumerate(zip(sent, recv)) if s != model[mode] or rv != model[mode]]
            r.status = "ok" if not wrong else (
                f"failed: rank {wrong[0]} sent {sent[wrong[0]]} received {recv[wrong[0]]}, model {model[mode]}")
        out.append(r)
    r = row("saved", model_saved_bytes=saved_model(case), saved_param_bytes=0, model_param_bytes=0)
    if errors:
        r.status = f"failed: {errors[0]}"
    else:
        r.saved_bytes = max(pr["saved"] for pr in per_rank)
        wrong = [pr["saved"] for pr in per_rank if pr["saved"] != r.model_saved_bytes]
        r.status = "ok" if not wrong else f"failed: saved {wrong[0]} bytes, model {r.model_saved_bytes}"
    out.append(r)
    if device == "cuda" and not errors:
        for name, key in (("time", "ms_ring"), ("time-compute-only", "ms_compute")):
            t = row("fwd+bwd", status="ok")
            t.case = name
            t.ms_p50 = max(pr[key] for pr in per_rank)  # the slowest rank sets the step time
            out.append(t)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], int(sys.argv[7]))
    else:
        sys.exit("usage: python -m gradkernels.bench.ring --worker RANK WORLD STORE CASES OUT REP_MS "
                 "(run by python -m gradkernels.bench ring)")
