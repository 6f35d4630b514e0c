"""The catalogue of the AOT report: representative launcher calls per kernel family.

A :class:`Case` calls one or more launchers of ``gradkernels.ops`` (recorded on meta tensors, see
:mod:`.recorder`); sizes only decide the specialisation (multiples of 16, i32), so typical aligned
sizes stand for all. A kernel launched through an autotuner is :class:`Tuned`: its config factory and
its family's public ``prune()`` (``kernels/*_configs.py``), called with the recorded launch's
arguments: the report checks exactly the set a GPU launch chooses from.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch

from .signature import Launch
from .targets import DTYPES


@dataclasses.dataclass(frozen=True)
class Tuned:
    """A kernel launched through an autotuner.

    ``configs()`` is its config factory; ``prune(configs, launch, arch)`` the configs the autotuner may
    pick for ``launch`` on ``arch``; ``hopeless(config, launch)`` names configs certain to spill, which
    ``--include-pruned`` leaves out unless ``--all-pruned`` (they take minutes each to compile).
    """

    configs: Callable[[], list]
    prune: Callable[[list, Launch, int], list]
    hopeless: Callable[[Any, Launch], bool] | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """One representative use of an op: ``launch(dtype, device)`` calls its launcher(s)."""

    family: str
    name: str
    launch: Callable[[torch.dtype, str], None]
    ops_modules: tuple  # launcher modules whose kernel references are swapped for the recorder
    tuned: Mapping[str, Tuned]  # kernel name -> how its tiles are chosen; other kernels keep the launch's
    # Kernels with fixed tiles whose pinned-mode launch (the one recorded) uses other tiles than a GPU
    # launch does: kernel name -> a function of the launch's recorded arguments (parameter name ->
    # value, tensors as TensorArg) giving the triton.Config a GPU launch uses.
    fixed: Mapping[str, Callable[[dict], Any]] = dataclasses.field(default_factory=dict)
    dtypes: tuple = tuple(DTYPES)


def autotuner_args(launch: Launch, configs) -> dict:
    """The launch's arguments as an autotuner's prune sees them: everything but the tile parameters,
    which come from the configs."""
    tiles = {k for c in configs for k in c.kwargs}
    return {k: v for k, v in launch.args.items() if k not in tiles}


def _linear_tuned() -> dict[str, Tuned]:
    from ..kernels import linear_configs as configs

    def prune(tiles, launch, arch):
        return configs.prune(tiles, autotuner_args(launch, tiles), dtype_bytes=launch.args["A"].itemsize, arch=arch)

    return {"linear_kernel": Tuned(configs.get_linear_configs, prune)}


def linear_cases() -> list[Case]:
    from ..ops import linear as ops

    tuned = _linear_tuned()
    m, k, n = 2048, 1024, 4096

    def tensors(dtype, device):
        def mk(*shape):
            return torch.empty(shape, dtype=dtype, device=device)

        return mk(m, k), mk(n, k), mk(n), mk(m, n), mk(m, n)  # x, w, b, pre, dy

    def fwd(act, split):
        def run(dtype, device):
            x, w, b, _, _ = tensors(dtype, device)
            ops.linear_forward(x, w, b, act, store_pre=act is not None, split=split)

        return run

    def bwd(act, dx, dw, split, db=True):
        def run(dtype, device):
            x, w, _, pre, dy = tensors(dtype, device)
            ops.linear_backward(dy, x, w, pre if act else None, act, need_dx=dx, need_dw=dw,
                                need_db=dw and db, split=split)

        return run

    def decode(m, act=None, role="fwd", k=k):
        # Few tokens against a 4096 x k layer: the forward and dX run swapped (linear_configs.swap_operands)
        # and split-K where the launcher splits; 64 tokens run as they are, on 64-row tiles.
        def run(dtype, device):
            def mk(*shape):
                return torch.empty(shape, dtype=dtype, device=device)

            x, w, b = mk(m, k), mk(n, k), mk(n)
            if role == "fwd":
                ops.linear_forward(x, w, b, act, store_pre=act is not None)
            else:
                ops.linear_backward(mk(m, n), x, w, None, None, need_dx=True, need_dw=False, need_db=False)

        return run

    # Activations: none (a plain matmul in every role) and gelu, whose erf-based value and derivative
    # are the costliest of the supported ones to fuse; split-K (partials + the reduce kernel) in
    # forward and in dW. Bias everywhere (db is the row sum fused into dW).
    mods = (ops,)
    return [
        Case("linear", "fwd", fwd(None, 1), mods, tuned),
        Case("linear", "fwd-gelu", fwd("gelu", 1), mods, tuned),
        Case("linear", "fwd-gelu-split", fwd("gelu", 4), mods, tuned),
        Case("linear", "dx", bwd(None, True, False, 1), mods, tuned),
        Case("linear", "dx-gelu", bwd("gelu", True, False, 1), mods, tuned),
        Case("linear", "dw", bwd(None, False, True, 1), mods, tuned),
        Case("linear", "dw-gelu", bwd("gelu", False, True, 1), mods, tuned),
        Case("linear", "dw-gelu-split", bwd("gelu", False, True, 4), mods, tuned),
        # Without a bias, dW has no fused row sums (a different specialisation).
        Case("linear", "dw-nobias", bwd(None, False, True, 1, db=False), mods, tuned),
        Case("linear", "dw-gelu-nobias", bwd("gelu", False, True, 1, db=False), mods, tuned),
        # Decoding-sized M (the prune keeps the tiles those fill) and a K that is not a whole number of
        # steps (the K mask in the loop: every other case has EVEN_K).
        Case("linear", "fwd-decode16", decode(16), mods, tuned),
        Case("linear", "fwd-gelu-decode16", decode(16, "gelu"), mods, tuned),
        Case("linear", "dx-decode16", decode(16, role="dx"), mods, tuned),
        Case("linear", "fwd-decode64", decode(64), mods, tuned),
        Case("linear", "fwd-gelu-ragged-k", decode(2048, "gelu", k=1000), mods, tuned),
    ]


def _attention_tuning() -> tuple[dict[str, Tuned], dict]:
    """The attention kernels' autotuned tiles (``Case.tuned``) and the fixed-tile ones (``Case.fixed``)."""
    import triton

    from ..kernels import attention_configs as configs

    def tuned(kernel, factory):
        def prune(tiles, launch, arch):
            return configs.prune(tiles, autotuner_args(launch, tiles), kernel=kernel,
                                 dtype_bytes=launch.args["Q"].itemsize, arch=arch)

        def hopeless(config, launch):
            a = launch.args
            return configs.hopeless(config, kernel, a["HEAD_D"], a["HEAD_DV"], a["Q"].itemsize,
                                    a.get("INPUT_PRECISION"), a.get("COMPUTE_DK", True), a.get("COMPUTE_DV", True))

        return Tuned(factory, prune, hopeless)

    tuned_kernels = {"attn_fwd_kernel": tuned("fwd", configs.get_attn_fwd_configs),
                     "attn_bwd_dkdv_kernel": tuned("dkdv", lambda: configs.get_attn_bwd_configs()["dkdv"]),
                     "attn_bwd_dq_kernel": tuned("dq", lambda: configs.get_attn_bwd_configs()["dq"])}

    # Launched with preprocess_config() on a GPU (the recorded, pinned-mode launch uses the interpreter's).
    def preprocess(args):
        return triton.Config(configs.preprocess_config(args["HEAD_DV"], args["O"].itemsize),
                             num_warps=configs.PREPROCESS_WARPS)

    fixed = {"attn_bwd_preprocess_kernel": preprocess}
    return tuned_kernels, fixed


def attention_cases() -> list[Case]:
    from ..ops import attention as ops

    tuned_kernels, fixed = _attention_tuning()
    # GQA (8 query heads on 2 kv heads), 1024 positions.
    b, hq, hkv, length = 2, 8, 2, 1024

    def tensors(dtype, device, d, lq, lk):
        q = torch.empty((b, hq, lq, d), dtype=dtype, device=device)
        k = torch.empty((b, hkv, lk, d), dtype=dtype, device=device)
        v = torch.empty((b, hkv, lk, d), dtype=dtype, device=device)
        return q, k, v

    def fwd(d, causal, lq=length, lk=length):
        def run(dtype, device):
            q, k, v = tensors(dtype, device, d, lq, lk)
            ops.attention_forward(q, k, v, lk - lq if causal else None, d**-0.5)

        return run

    def bwd(d, causal, lq=length, lk=length):
        def run(dtype, device):
            q, k, v = tensors(dtype, device, d, lq, lk)
            out, grad = torch.empty_like(q), torch.empty_like(q)
            lse = torch.empty((b, hq, lq), dtype=ops.accumulator_dtype(dtype), device=device)
            ops.attention_backward(grad, q, k, v, out, lse, torch.empty_like(lse), lk - lq if causal else None,
                                   d**-0.5)

        return run

    def case(name, run):
        return Case("attention", name, run, (ops,), tuned_kernels, fixed)

    def features_tensors(dtype, device, d):
        from ..ops.attention_features import Features

        total = b * length
        q = torch.empty((total, hq, d), dtype=dtype, device=device)
        k = torch.empty((total, hkv, d), dtype=dtype, device=device)
        v = torch.empty((total, hkv, d), dtype=dtype, device=device)
        cu = torch.empty((b + 1,), dtype=torch.int32, device=device)
        slopes = torch.empty((b, hq), dtype=torch.float32, device=device)
        rng = torch.empty((2,), dtype=torch.int64, device=device)
        features = Features(window_left=256, window_right=0, softcap=30.0, alibi_slopes=slopes, dropout_p=0.1,
                            rng_state=rng)
        return q, k, v, cu, features

    def features_fwd(d):
        def run(dtype, device):
            q, k, v, cu, features = features_tensors(dtype, device, d)
            ops.attention_varlen_forward(q, k, v, cu, cu, length, length, d**-0.5, features)

        return run

    def features_bwd(d):
        def run(dtype, device):
            q, k, v, cu, features = features_tensors(dtype, device, d)
            lse = torch.empty((hq, q.shape[0]), dtype=ops.accumulator_dtype(dtype), device=device)
            ops.attention_varlen_backward(torch.empty_like(q), q, k, v, torch.empty_like(q), lse, torch.empty_like(lse),
                                          cu, cu, length, length, d**-0.5, features)

        return run

    cases = []
    # Head dims: the common 64 and 128, the largest supported (256), and 80, which is not a power of
    # two (masked head-dim loads). Causal launches contain the non-causal code (unmasked blocks) too.
    for d, causal in ((64, True), (128, True), (256, True), (80, False)):
        tag = f"d{d}-{'causal' if causal else 'full'}"
        cases += [case(f"attn-fwd-{tag}", fwd(d, causal)), case(f"attn-bwd-{tag}", bwd(d, causal))]
    # Short sequences: the prune then offers the shortest tiles (a 16-position backward), one head-dim block
    # each. Decoding (Lq <= 16) runs the split-KV kernel and its combine with tiles fixed by the packed
    # rows (GROUP x Lq = 4 x Lq here, attention_configs.decode_config): one query row (BLOCK_M = 16) at
    # every head-dim block, and 8 rows (BLOCK_M = 32 where a path allows it, 16 elsewhere) at D = 64, 128
    # and 256: every (path, head-dim block, BLOCK_M) the launcher can choose is compiled.
    for d in (64, 80, 256):
        cases += [case(f"attn-short-fwd-d{d}", fwd(d, True, 1, length)),
                  case(f"attn-short-bwd-d{d}", bwd(d, True, 16, 16))]
    for d in (64, 128, 256):
        cases.append(case(f"attn-decode8-fwd-d{d}", fwd(d, True, 8, length)))
    # Every feature at once (the costliest specialisation: varlen, causal + window, softcap, ALiBi, dropout),
    # at D = 64 and 128, in the 16-bit dtypes that training uses (the feature variants of the tile table are
    # calibrated for that path only; fp32/fp64 and D = 256 feature launches use the plain launch's tiles,
    # see attention_configs.keep). A launch with fewer features compiles to a subset of this code.
    for d in (64, 128):
        cases += [Case("attention", f"attn-feat-{p}-d{d}", run(d), (ops,), tuned_kernels, fixed, dtypes=("fp16", "bf16"))
                  for p, run in (("fwd", features_fwd), ("bwd", features_bwd))]
    return cases


FAMILIES: dict[str, Callable[[], list[Case]]] = {"linear": linear_cases, "attention": attention_cases}


def all_cases() -> list[Case]:
    return [c for make in FAMILIES.values() for c in make()]


# ----------------------------------------------------------------------------------------------------
# The static performance report's catalogue (``python -m gradkernels.aot perf``): the shapes that
# matter for speed rather than for coverage. One launcher call per case; linear case names end in the
# product's role (fwd, dx, dw), which names the report's kernel (linear_fwd, ...).
# ----------------------------------------------------------------------------------------------------

PERF_DTYPES = ("fp16", "bf16", "fp32-tf32")


def perf_linear_cases() -> list[Case]:
    """Linear layers at 4096^3 and 8192^3 (forward, dX, dW), decode-sized M = 16/64/256 (forward, N = K =
    4096: split-K where the launcher splits) and a wide N (a 32768-wide output, e.g. an MLP or vocabulary
    projection; all three roles); bias, no activation. fp16 everywhere, fp32 with tf32 for the 4096^3
    forward. (Each kept config costs one compile per dtype and architecture, ~3-6 s on 2 cores; bf16 code
    is fp16's with another operand type: ``--dtype bf16`` compiles it.)"""
    from ..ops import linear as ops

    tuned = _linear_tuned()

    def run(role, m, n, k):
        def launch(dtype, device):
            def mk(*shape):
                return torch.empty(shape, dtype=dtype, device=device)

            x, w, b = mk(m, k), mk(n, k), mk(n)
            if role == "fwd":
                ops.linear_forward(x, w, b)
            else:
                ops.linear_backward(mk(m, n), x, w, None, None, need_dx=role == "dx", need_dw=role == "dw",
                                    need_db=role == "dw")

        return launch

    fp16, main = ("fp16",), ("fp16", "fp32-tf32")
    # (tag, m, n, k, role, dtypes): 8192^3 and the wide N compile to the 4096^3 kernels (sizes are runtime
    # values) but prune and launch differently.
    specs = [("4096", 4096, 4096, 4096, "fwd", main), ("4096", 4096, 4096, 4096, "dx", fp16),
             ("4096", 4096, 4096, 4096, "dw", fp16)]
    specs += [("8192", 8192, 8192, 8192, role, fp16) for role in ("fwd", "dx", "dw")]
    specs += [(f"m{m}", m, 4096, 4096, "fwd", fp16) for m in (16, 64, 256)]
    specs += [("wide", 4096, 32768, 4096, role, fp16) for role in ("fwd", "dx", "dw")]
    return [Case("linear", f"perf-linear-{tag}-{role}", run(role, m, n, k), (ops,), tuned, dtypes=dtypes)
            for tag, m, n, k, role, dtypes in specs]


def perf_attention_cases() -> list[Case]:
    """Training shapes (batch 4, 16 heads, 4096 positions): D = 128 causal, forward and backward, in fp16
    and bf16 (and the forward in fp32 with tf32); D = 128 non-causal, D = 64 causal and GQA (32 query heads
    on 8 kv heads) at D = 128 causal, forward and backward, and the D = 256 causal forward, in fp16;
    decoding (1 and 16 query rows against 4096 cached keys, GQA 32/8, bottom-right causal) at D = 128 in
    fp16. (``--dtype`` compiles any case in any dtype.)"""
    from ..ops import attention as ops

    tuned_kernels, fixed = _attention_tuning()

    def run(pass_, d, causal, b, hq, hkv, lq, lk):
        def launch(dtype, device):
            q = torch.empty((b, hq, lq, d), dtype=dtype, device=device)
            k = torch.empty((b, hkv, lk, d), dtype=dtype, device=device)
            v = torch.empty((b, hkv, lk, d), dtype=dtype, device=device)
            offset = lk - lq if causal else None
            if pass_ == "fwd":
                ops.attention_forward(q, k, v, offset, d**-0.5)
            else:
                lse = torch.empty((b, hq, lq), dtype=ops.accumulator_dtype(dtype), device=device)
                ops.attention_backward(torch.empty_like(q), q, k, v, torch.empty_like(q), lse, torch.empty_like(lse),
                                       offset, d**-0.5)

        return launch

    def case(name, dtypes, *spec):
        return Case("attention", name, run(*spec), (ops,), tuned_kernels, fixed, dtypes=dtypes)

    fp16 = ("fp16",)
    cases = [case("perf-attn-d128-causal-fwd", PERF_DTYPES, "fwd", 128, True, 4, 16, 16, 4096, 4096),
             case("perf-attn-d128-causal-bwd", ("fp16", "bf16"), "bwd", 128, True, 4, 16, 16, 4096, 4096)]
    for d, causal, passes in ((128, False, ("fwd", "bwd")), (64, True, ("fwd", "bwd")), (256, True, ("fwd",))):
        for pass_ in passes:
            cases.append(case(f"perf-attn-d{d}-{'causal' if causal else 'full'}-{pass_}", fp16, pass_, d, causal,
                              4, 16, 16, 4096, 4096))
    for pass_ in ("fwd", "bwd"):
        cases.append(case(f"perf-attn-gqa-d128-causal-{pass_}", fp16, pass_, 128, True, 4, 32, 8, 4096, 4096))
    for lq in (1, 16):
        cases.append(case(f"perf-attn-decode{lq}-d128-fwd", fp16, "fwd", 128, True, 8, 32, 8, lq, 4096))
    return cases


PERF_FAMILIES: dict[str, Callable[[], list[Case]]] = {"linear": perf_linear_cases, "attention": perf_attention_cases}


def perf_cases() -> list[Case]:
    return [c for make in PERF_FAMILIES.values() for c in make()]
