"""The report's rows: every (arch, case, dtype, kernel launch, config), compiled and judged.

A row fails when its compile fails, it spills, it needs more shared memory or registers than one block
may use on its architecture (``kernels/arch.py``), or when a matmul kernel with 16-bit or tf32 operands
has no tensor-core instruction there (no HGMMA on sm_90, no HMMA on sm_80/86/89). fp32 with
``input_precision="ieee"`` and fp64 legitimately use FFMA/DFMA (or DMMA) and are not held to that; tf32
is: wgmma and mma.sync both take tf32 operands, and a tf32 matmul without them is a plain FFMA loop that
gave up tf32's only advantage. A row with wgmma also fails when ptxas serialised them (its C7515 note).
Only rows the autotuner can pick (not pruned) make the report fail. The spills of an attention row whose key
has no clean tile under the running Triton (``attention_configs.NO_CLEAN_TILE_UNDER``) are reported as
known instead (:func:`known_failures`).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping, Sequence

import torch

from ..kernels import attention_configs
from ..kernels.arch import ARCHS
from .cases import all_cases
from .compiler import compile_jobs
from .recorder import record_launches
from .signature import Job, make_job
from .targets import DEFAULT_ARCHS, DTYPES, check_targets
from .tiles import attention_key


@dataclasses.dataclass
class Row:
    """One line of the report: a job in context, and (after compiling) what the cubin says."""

    arch: int
    family: str
    case: str
    dtype: str
    kernel: str
    config: str  # compact: tile values in factory order, warps, stages
    pruned: bool  # prune() drops it: the autotuner never picks it
    job: Job | None
    needs_tensor_cores: bool
    result: dict | None = None
    failures: list = dataclasses.field(default_factory=list)
    known: list = dataclasses.field(default_factory=list)  # failures accepted for this key and Triton

    @property
    def ok(self) -> bool:
        return self.result is not None and not self.failures


def config_label(config=None, options: Mapping | None = None) -> str:
    """``"128x64x32x8 w4 s3"`` (tiles in factory order, warps, stages, ``r<maxnreg>`` if set, ``tma`` for
    TMA tiles, ``persistent`` for the linear kernel's persistent ones); a fixed-tile
    launch is labelled by its options."""
    if config is None:
        opts = dict(options or {})
        return f"launch w{opts.get('num_warps', 4)} s{opts.get('num_stages', 3)}"
    tiles = "x".join(str(v) for name, v in config.kwargs.items() if name not in ("TMA", "PERSISTENT"))
    maxnreg = f" r{config.maxnreg}" if getattr(config, "maxnreg", None) else ""
    tma = " tma" if config.kwargs.get("TMA") else ""
    persistent = " persistent" if config.kwargs.get("PERSISTENT") else ""
    return f"{tiles} w{config.num_warps} s{config.num_stages}{maxnreg}{tma}{persistent}"


def _selected(name: str, wanted: Sequence[str] | None) -> bool:
    return not wanted or any(w == name or w in name for w in wanted)


def build_rows(archs: Sequence[int] = DEFAULT_ARCHS, kernels: Sequence[str] | None = None,
               dtypes: Sequence[str] | None = None, cases: Sequence[str] | None = None,
               include_pruned: bool = False, config_filter: Callable[[Any], bool] | None = None,
               maxnreg: int | None = None, all_pruned: bool = False) -> list[Row]:
    """Every (arch, case, dtype, kernel launch, config) row of the report, not compiled yet.

    Args:
        archs: compute capabilities, e.g. ``(80, 90)``.
        kernels: keep rows whose family or kernel name contains one of these (None: all).
        dtypes: keys of :data:`.targets.DTYPES` (None: all).
        cases: keep cases whose name contains one of these (None: all).
        include_pruned: also compile configs that the family's prune drops, except the ones its
            ``Tuned.hopeless`` says are certain to spill (unless ``all_pruned``).
        config_filter: an extra predicate on ``triton.Config`` (tests use it to compile a subset).
        maxnreg: what-if experiments: compile every tuned config with this ``maxnreg`` (PTX
            ``.maxnreg``) instead of its own.

    Returns:
        The rows; a pruned config gets ``job=None`` unless ``include_pruned``.

    Raises:
        ValueError: an unknown architecture or dtype name.
    """
    check_targets(archs, dtypes)
    rows = []
    for case in all_cases():
        if cases and not _selected(case.name, cases):
            continue
        for dname in dtypes or case.dtypes:
            if dname not in case.dtypes:
                continue
            dt = DTYPES[dname]
            for launch in record_launches(case, dt):
                if kernels and not (_selected(launch.kernel, kernels) or _selected(case.family, kernels)):
                    continue
                tuned = case.tuned.get(launch.kernel)
                for arch in archs:
                    rows.extend(_rows_for_launch(case, dname, dt, launch, tuned, arch, include_pruned,
                                                 config_filter, maxnreg, all_pruned))
    return rows


def _rows_for_launch(case, dname, dt, launch, tuned, arch, include_pruned, config_filter, maxnreg=None,
                     all_pruned=False):
    # fp32 launches that a launcher runs in full precision (INPUT_PRECISION="ieee", e.g. the attention
    # backward above D = 128) use FMAs: held to the tensor-core rule only where they run tf32.
    needs_tc = dt.needs_tensor_cores and not (dt.torch_dtype == torch.float32
                                              and launch.args.get("INPUT_PRECISION") == "ieee")

    def row(config, pruned, job):
        return Row(arch, case.family, case.name, dname, launch.kernel,
                   config_label(config, launch.options), pruned, job, needs_tc)

    if tuned is None:  # launched with its own fixed tiles
        fixed = case.fixed.get(launch.kernel)
        config = fixed(launch.args) if fixed is not None else None
        return [row(config, False, make_job(launch, arch, config))]
    configs = tuned.configs()
    kept_ids = {id(c) for c in tuned.prune(configs, launch, arch)}
    out = []
    for c in configs:
        if config_filter is not None and not config_filter(c):
            continue
        pruned = id(c) not in kept_ids
        if maxnreg is not None:
            c = copy.copy(c)
            c.maxnreg = maxnreg
        compile_it = not pruned or (include_pruned and (all_pruned or tuned.hopeless is None
                                                         or not tuned.hopeless(c, launch)))
        out.append(row(c, pruned, make_job(launch, arch, c) if compile_it else None))
    return out


def compile_rows(rows: Sequence[Row], workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[Row]:
    """Compile every row that has a job (identical jobs once, :func:`.compiler.compile_jobs`); judge each.

    Returns:
        The same rows, with ``result``, ``failures`` and ``known`` filled in.
    """
    results = compile_jobs([r.job for r in rows if r.job is not None], workers, progress)
    for r in rows:
        if r.job is not None:
            r.result = results[r.job]
            r.failures, r.known = known_failures(r, judge(r))
    return rows


def known_failures(row: Row, failures: list[str], release: tuple | None = None) -> tuple[list[str], list[str]]:
    """``(failures, known)``: the spills of an attention row whose key has no tile that compiles clean under
    the Triton ``release`` (default: the installed one; ``attention_configs.NO_CLEAN_TILE_UNDER``) move to
    ``known``; everything else stays a failure."""
    if not failures or row.job is None:
        return failures, []
    key = attention_key(row.arch, row.kernel, row.dtype, dict(row.job.constexprs), dict(row.job.options))
    if key is None or not attention_configs.no_clean_tile(*key[:4], release=release):
        return failures, []
    return [f for f in failures if not f.startswith("spills")], [f for f in failures if f.startswith("spills")]


def judge(row: Row) -> list[str]:
    """Why a compiled row would fail on its architecture (empty list: it passes)."""
    res = row.result
    if res is None:
        return []
    if res.get("error"):
        return [f"compile: {res['error']}"]
    lim = ARCHS[row.arch]
    fails = []
    sass = res["sass"]
    if res["stack"] or res["local"] or sass["LDL"] or sass["STL"]:
        text = f"spills (stack {res['stack']} B, {sass['STL']} STL, {sass['LDL']} LDL)"
        if res["regs"] <= 64 and res["stack"] >= 1024:
            # ptxas sometimes settles on a full-occupancy register count (32) and spills kilobytes
            # instead of using 255: a real launch gets this cubin too. See bench/GPU.md.
            text += f" at {res['regs']} regs: ptxas occupancy target; maxnreg=255 lifts it"
        fails.append(text)
    smem = res["shared"] + res["static_shared"]
    if smem > lim.smem_per_block:
        fails.append(f"smem {smem / 1024:.1f} KiB > {lim.smem_per_block / 1024:.0f} KiB")
    threads = 32 * res["num_warps"]
    if res["regs"] * threads > lim.regs_per_block:
        fails.append(f"regs {res['regs']} x {threads} threads > {lim.regs_per_block}")
    if res.get("has_dot") and row.needs_tensor_cores and sass.get(lim.tensor_core_op, 0) == 0:
        fails.append(f"no {lim.tensor_core_op} (tensor cores unused)")
    if res.get("wgmma_serialized"):
        # Each wgmma waits for the one before: most of the tensor-core rate lost, with no other trace in the
        # cubin than extra WARPGROUP barriers (see compiler.wgmma_serialized).
        fails.append("wgmma serialised (ptxas C7515)")
    return fails


def failing(rows: Sequence[Row]) -> list[Row]:
    """Rows the autotuner can pick (not pruned) that fail."""
    return [r for r in rows if not r.pruned and r.failures]
