"""Training-step benchmark: the small transformer LM of the end-to-end test, plain PyTorch vs patched.

    python bench/train_step.py                       # CUDA GPU: the sweep below
    python bench/train_step.py --seq-lens 1024,4096 --tokens 32768 --dtype bf16
    python bench/train_step.py --smoke               # CPU: one tiny step per provider, no timings

Model: ``gradkernels.models.TinyLM`` with the end-to-end test's sizes (2 layers, d_model 64, 4 query
heads on 2 KV heads, causal), ``max_seq_len`` raised to the longest length; AdamW; mixed precision as
it is trained in practice (fp32 parameters, ``torch.autocast`` in ``--dtype``; ``fp32`` means no
autocast).

Providers (every one the same model, weights and batches):

- ``torch-naive``: attention as composed matmul + softmax (``attn_impl="naive"``), which keeps the
  B x H x L x L probabilities for backward: the one that runs out of memory first.
- ``torch-sdpa`` (baseline): ``F.scaled_dot_product_attention``, PyTorch eager, its own fused kernels.
- ``gradkernels``: the torch-sdpa model after ``gradkernels.patching.patch`` (Linear layers and SDPA on
  the Triton kernels).

Sweep: for each L in ``--seq-lens`` (default 512 .. 65536, doubling), batch ``B = max(1, tokens // L)``
so every step sees about ``--tokens`` tokens (default 65536). Each (provider, L): ``--warmup`` untimed
steps (autotuning, allocator warm-up), then ``--steps`` steps timed with CUDA events around the whole
loop (forward, backward, optimizer step, zero_grad). Reported: tokens/s = B * L * steps / seconds, and
peak memory = ``torch.cuda.max_memory_allocated`` over the timed steps (reset before them; it includes
parameters, optimizer state and the batch). A provider that runs out of memory is ``oom`` at that L and
``skipped`` beyond it.

Output (``--out``, default ``bench/results/latest/train_step``): ``train_step.txt`` (the table),
``train_step.json`` (rows plus the environment: GPU, versions, date).

``--smoke`` (no GPU needed; what ``tests/test_e2e.py`` runs): each provider trains two tiny steps under
Triton's interpreter and the second losses are compared (they must agree to fp32 rounding); no time or
memory is measured or written, since interpreter times measure numpy, not a kernel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

PROVIDERS = ("torch-naive", "torch-sdpa", "gradkernels")
BASELINE = "torch-sdpa"
DEFAULT_SEQ_LENS = tuple(512 * 2**i for i in range(8))  # 512 .. 65536
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclasses.dataclass
class Result:
    provider: str
    seq_len: int
    batch: int
    status: str  # ok | oom | skipped | failed: ...
    tokens_per_s: float | None = None
    peak_bytes: int | None = None
    loss: float | None = None
    speedup_vs_baseline: float | None = None


def _parse_ints(text):
    try:
        values = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seq-lens", type=_parse_ints, default=DEFAULT_SEQ_LENS, help="comma-separated L values")
    p.add_argument("--tokens", type=int, default=65536, help="tokens per step (B = max(1, tokens // L))")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype (fp32: none)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--out", default="bench/results/latest/train_step", help="output directory")
    p.add_argument("--smoke", action="store_true", help="CPU check: one tiny step per provider, no timings")
    return p


def _model(provider, seq_len, device, seed=0):
    import torch

    from gradkernels import patching
    from gradkernels.models import TinyLM, TinyLMConfig

    cfg = TinyLMConfig(max_seq_len=seq_len, attn_impl="naive" if provider == "torch-naive" else "sdpa")
    torch.manual_seed(seed)
    model = TinyLM(cfg).to(device)
    if provider == "gradkernels":
        patching.patch(model)
    return model, cfg


def _step_fn(model, autocast_dtype, device_type):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(inputs, targets):
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(inputs, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _measure(provider, seq_len, batch, args, autocast_dtype):
    """One (provider, L) measurement on the GPU."""
    import torch

    from gradkernels.models import make_batches

    model, cfg = _model(provider, seq_len, "cuda")
    step = _step_fn(model, autocast_dtype, "cuda")
    (inputs, targets), = make_batches(cfg, 1, batch, seq_len, device="cuda")
    for _ in range(args.warmup):
        step(inputs, targets)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        loss = step(inputs, targets)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return Result(provider, seq_len, batch, "ok", tokens_per_s=batch * seq_len * args.steps / seconds,
                  peak_bytes=torch.cuda.max_memory_allocated(), loss=float(loss))


def run_gpu(args, providers):
    import torch

    from gradkernels.bench.harness import describe_error, release_memory

    autocast_dtype = None if args.dtype == "fp32" else getattr(torch, DTYPES[args.dtype])
    results, dead = [], set()
    for seq_len in args.seq_lens:
        batch = max(1, args.tokens // seq_len)
        for provider in providers:
            if provider in dead:
                results.append(Result(provider, seq_len, batch, "skipped"))
                continue
            try:
                r = _measure(provider, seq_len, batch, args, autocast_dtype)
            except Exception as exc:  # an OOM or a failure is a row, never the end of the run
                status = describe_error(exc)
                if status == "oom":
                    dead.add(provider)
                r = Result(provider, seq_len, batch, status)
            release_memory()
            results.append(r)
            print(_format_row(r), file=sys.stderr, flush=True)
    for r in results:
        base = next((b for b in results if b.provider == BASELINE and b.seq_len == r.seq_len), None)
        if r.tokens_per_s and base is not None and base.tokens_per_s:
            r.speedup_vs_baseline = r.tokens_per_s / base.tokens_per_s
    return results


def run_smoke(providers):
    """Each provider trains two tiny steps on the CPU (kernels under the interpreter); the second loss
    (after one AdamW update, so forward, backward and the update all count) is compared."""
    import torch

    from gradkernels.models import make_batches

    seq_len, batch = 16, 2
    results = []
    for provider in providers:
        model, cfg = _model(provider, seq_len, "cpu")
        step = _step_fn(model, None, "cpu")
        for inputs, targets in make_batches(cfg, 2, batch, seq_len):
            loss = step(inputs, targets)
        results.append(Result(provider, seq_len, batch, "ok", loss=float(loss)))
    losses = [r.loss for r in results]
    # Same weights, same batch, fp32: the providers differ by rounding only (a few ulps of the loss).
    tol = 16 * torch.finfo(torch.float32).eps * max(abs(x) for x in losses)
    for r in results:
        if not math.isfinite(r.loss) or abs(r.loss - losses[0]) > tol:
            r.status = (f"failed: loss {r.loss!r} differs from {results[0].provider}'s {losses[0]!r} "
                        f"by more than {tol:.1e}")
    return results


def _format_row(r):
    tps = f"{r.tokens_per_s:,.0f}" if r.tokens_per_s else "-"
    mem = f"{r.peak_bytes / 2**30:.2f}" if r.peak_bytes else "-"
    sp = f"{r.speedup_vs_baseline:.2f}x" if r.speedup_vs_baseline else "-"
    loss = f"{r.loss:.4f}" if r.loss is not None else "-"
    return f"{r.seq_len:>7} {r.batch:>5}  {r.provider:<12} {tps:>14} {mem:>10} {sp:>8} {loss:>8}  {r.status}"


def format_table(results, env, args):
    head = [
        f"train step: TinyLM (2 layers, d_model 64, 4 q heads / 2 kv heads, causal), AdamW, "
        f"{'smoke (CPU, interpreter, no timings)' if args.smoke else args.dtype + ' autocast'}",
        f"{env.gpu} | torch {env.torch} | triton {env.triton} | {env.date}",
        f"{'L':>7} {'B':>5}  {'provider':<12} {'tokens/s':>14} {'peak GiB':>10} {'vs sdpa':>8} {'loss':>8}  status",
    ]
    return "\n".join(head + [_format_row(r) for r in results])


def main(argv=None):
    args = build_parser().parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        print(f"error: unknown providers {sorted(unknown)}; choose from {PROVIDERS}", file=sys.stderr)
        return 2
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("train_step: timings need a CUDA GPU (interpreter times measure numpy, not a kernel); "
              "use --smoke for the CPU check", file=sys.stderr)
        return 2
    if args.smoke and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            print("error: --smoke without a GPU needs TRITON_INTERPRET=1 set before triton is imported",
                  file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before gradkernels (and triton) are first imported

    from gradkernels.bench.harness import Env

    env = Env.detect()
    results = run_smoke(providers) if args.smoke else run_gpu(args, providers)
    table = format_table(results, env, args)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.txt").write_text(table + "\n")
    meta = {"env": dataclasses.asdict(env), "args": {k: v for k, v in vars(args).items()},
            "results": [dataclasses.asdict(r) for r in results]}
    (out / "train_step.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return 1 if any(r.status.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without install
    sys.exit(main())
