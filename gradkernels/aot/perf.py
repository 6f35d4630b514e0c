"""The static performance report: what the machine code of each launch says about its speed.

``python -m gradkernels.aot perf [--arch 80,90] [--kernel ...] [--json FILE]``. For every autotuned launch of
the performance catalogue (:func:`.cases.perf_cases`: training attention at D = 64/128/256, causal and not,
GQA, decoding; linear layers at 4096^3, 8192^3, decode-sized M, a wide N; fp16, bf16 and fp32 with tf32)
and every config the family's ``prune()`` keeps, the kernel is compiled for each architecture (the same
compile pool as ``check``) and its SASS is read (:mod:`.sass`): registers, spills, shared memory, and the
main loop's instructions per thread per iteration, tensor-core instruction shapes, MUFU.EX2, loads and
barriers. bench/GPU.md ("Static performance report") explains every column and the model.

- **Elements per thread per iteration.** Attention: score elements, ``BLOCK_M * BLOCK_N / (32 *
  num_warps)``; linear: MMA FLOPs of one K-step, ``2 * BLOCK_M * BLOCK_N * BLOCK_K / (32 * num_warps)``.
  ``instructions_per_element`` is the main loop's instruction count divided by that.
- **Picked.** The config a GPU autotuner would most likely pick: the largest tile (``BLOCK_M * BLOCK_N``,
  then ``BLOCK_K``) among the kept configs that compile clean, the first in ``prune()``'s order on a tie.
  A guess (the autotuner times the kept configs), but the one the tile lists are ordered for.
- **Issue-bound estimate** (:func:`estimate`): per loop iteration of one program (CTA), the cycles the
  SM's four warp schedulers need to issue its instructions, the cycles the tensor cores (or the FMA units
  of an FMA path) need for its matmul work, and the cycles the special-function units need for its
  MUFU.EX2; the fraction of tensor-core peak the loop can reach is compute / max(compute, issue, MUFU).
  An upper bound: memory, latency, dependencies and occupancy are not modelled. Constants: :data:`MODEL`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
from typing import Any, Callable, Sequence

import torch

from ..kernels import linear_configs
from . import sass
from .cases import Case, perf_cases
from .check import Row, config_label, judge
from .compiler import compile_jobs, versions
from .recorder import record_launches
from .signature import Launch, make_job
from .targets import DEFAULT_ARCHS, DTYPES, check_targets

# ----------------------------------------------------------------------------------------------------
# The machine model
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Machine:
    """Per-SM rates of one architecture, per clock cycle."""

    name: str
    sms: int
    schedulers: int  # warp schedulers, each issuing one warp instruction per cycle
    tensor_flops: dict  # mma operand kind ("16bit", "tf32", "fp64", "fp8") -> dense FLOP/cycle
    fma_lanes: dict  # "FFMA" / "DFMA" -> FMA results per cycle
    mufu: int  # MUFU (ex2, rcp, ...) results per cycle
    regs: int  # 32-bit registers per SM
    smem: int  # shared memory per SM, bytes (the most the blocks of one SM may use together)
    max_warps: int  # resident warps per SM
    max_ctas: int  # resident blocks per SM


# Sources (bench/GPU.md lists them with the arithmetic):
# - Tensor cores: NVIDIA A100 whitepaper (2020): 1024 dense FP16 FMA/clock/SM = 2048 FLOP/cycle, TF32
#   half of that, FP64 tensor 19.5 TFLOP/s = 108 SMs x 1.41 GHz x 128; H100 whitepaper (2022): twice
#   A100 per SM and clock, 4096 dense FP16/BF16 FLOP/cycle (989.4 TFLOP/s = 132 SMs x 1.83 GHz x 4096),
#   TF32 2048, FP8 8192, FP64 tensor 256. The figures are peaks for any wgmma / mma.sync shape: small N
#   (64x16x16 wgmma) is not known to reach them, so the estimate is an upper bound there.
# - Issue: 4 SM sub-partitions, one warp scheduler each, one warp instruction per cycle (both
#   whitepapers).
# - FMA and MUFU: CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table: per SM and
#   cycle 64 (cc 8.0) / 128 (cc 9.0) fp32 FMA, 32 / 64 fp64 FMA, 16 exp2/rcp/... (both).
# - Registers, shared memory, warps, blocks per SM: the same guide, "Technical Specifications per
#   Compute Capability" (65536 registers, 164 / 228 KiB, 64 warps, 32 blocks).
MODEL = {
    80: Machine("A100", 108, 4, {"16bit": 2048, "tf32": 1024, "fp64": 128, "fp8": 2048},
                {"FFMA": 64, "DFMA": 32}, 16, 65536, 167936, 64, 32),
    90: Machine("H100 SXM", 132, 4, {"16bit": 4096, "tf32": 2048, "fp64": 256, "fp8": 8192},
                {"FFMA": 128, "DFMA": 64}, 16, 65536, 233472, 64, 32),
}


def machine(arch: int) -> Machine:
    """The model of ``arch`` (sm_86/89 use sm_80's rates: the report compiles for sm_80 and sm_90)."""
    return MODEL[90 if arch >= 90 else 80]


def estimate(loop: dict, num_warps: int, arch: int) -> dict:
    """Cycles per loop iteration of one program on one SM and the fraction of peak they allow.

    Args:
        loop: a :class:`.sass.LoopStats` as a dict (``instructions``, ``mma_flops_per_warp``,
            ``mma_kinds``, ``ops``, ``mufu_ex2``).
        num_warps: warps of the program.
        arch: compute capability.

    Returns:
        ``issue_cycles`` (instructions x warps / schedulers), ``compute_cycles`` (tensor-core FLOPs /
        the SM's rate for the loop's operand kind; on FMA paths FFMA/DFMA x 32 x warps / FMA lanes),
        ``mufu_cycles`` (MUFU.EX2 x 32 x warps / MUFU rate), ``unit`` ("tensor", "ffma" or "dfma") and
        ``bound``: compute / max(compute, issue, MUFU), the fraction of that unit's peak the loop can
        reach at best. ``bound`` is None when the loop has no matmul work.
    """
    m = machine(arch)
    issue = loop["instructions"] * num_warps / m.schedulers
    if loop["mma_flops_per_warp"]:
        kind = loop["mma_kinds"][0] if loop["mma_kinds"] else "16bit"
        compute = loop["mma_flops_per_warp"] * num_warps / m.tensor_flops[kind]
        unit = "tensor"
    else:
        op = "DFMA" if loop["ops"].get("DFMA", 0) >= loop["ops"].get("FFMA", 0) else "FFMA"
        compute = loop["ops"].get(op, 0) * 32 * num_warps / m.fma_lanes[op]
        unit = op.lower()
    mufu = loop["mufu_ex2"] * 32 * num_warps / m.mufu
    bound = compute / max(compute, issue, mufu) if compute else None
    return {"issue_cycles": round(issue, 1), "compute_cycles": round(compute, 1), "mufu_cycles": round(mufu, 1),
            "unit": unit, "bound": None if bound is None else round(bound, 3)}


def ctas_per_sm(regs: int, smem: int, num_warps: int, arch: int) -> int:
    """Programs one SM can hold at once, by registers, shared memory, warps and blocks."""
    m = machine(arch)
    limits = [m.max_ctas, m.max_warps // num_warps]
    if regs:
        # Registers are allocated per warp in units of 256 (8 per thread).
        per_warp = math.ceil(regs * 32 / 256) * 256
        limits.append(m.regs // (per_warp * num_warps))
    if smem:
        limits.append(m.smem // smem)
    return max(0, min(limits))


# ----------------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------------

_ATTENTION_NAMES = {"attn_fwd_kernel": "attn_fwd", "attn_bwd_dkdv_kernel": "attn_dkdv",
                    "attn_bwd_dq_kernel": "attn_dq", "attn_decode_kernel": "attn_decode"}


def kernel_name(case: Case, kernel: str) -> str:
    """The report's name of a launch: ``attn_fwd``, ``attn_dkdv``, ``attn_dq``, ``linear_fwd``,
    ``linear_dx``, ``linear_dw``; other kernels by their function name without ``_`` and ``_kernel``."""
    if kernel == "linear_kernel":
        return "linear_" + case.name.rsplit("-", 1)[-1]
    if kernel in _ATTENTION_NAMES:
        return _ATTENTION_NAMES[kernel]
    name = kernel.strip("_")
    return name[: -len("_kernel")] if name.endswith("_kernel") else name


@dataclasses.dataclass
class PerfRow:
    """One report row before and after compiling: a launch with one kept config on one architecture."""

    arch: int
    case: Case
    dtype: str
    launch: Launch
    config: Any  # triton.Config
    rank: int  # position in prune()'s order
    check_row: Row  # the same compile as the check report sees it (judge() reads it)
    picked: bool = False

    @property
    def kernel(self) -> str:
        return kernel_name(self.case, self.launch.kernel)

    @property
    def label(self) -> str:
        return config_label(self.config)


def _area(config) -> tuple:
    kw = config.kwargs
    return kw.get("BLOCK_M", 1) * kw.get("BLOCK_N", 1), kw.get("BLOCK_K", 0)


def build_perf_rows(archs: Sequence[int] = DEFAULT_ARCHS, kernels: Sequence[str] | None = None,
                    dtypes: Sequence[str] | None = None, cases: Sequence[str] | None = None,
                    catalogue: Callable[[], list[Case]] = perf_cases,
                    configs: Sequence[str] | None = None) -> list[PerfRow]:
    """Every (arch, case, dtype, tuned launch, kept config) of the catalogue, not compiled yet.

    Args:
        archs: compute capabilities.
        kernels: keep launches whose report name (``attn_fwd``, ``linear_dw``, ...), kernel function or
            family contains one of these.
        dtypes: keys of :data:`.targets.DTYPES` (default :data:`.cases.PERF_DTYPES`).
        cases: keep cases whose name contains one of these.
        catalogue: the cases (default :func:`.cases.perf_cases`).
        configs: keep configs whose label (``"128x64 w8 s3"``) contains one of these; ``picked`` is then
            chosen among those.

    Raises:
        ValueError: an unknown architecture or dtype name.
    """
    check_targets(archs, dtypes)

    def wanted(names, filters):
        return not filters or any(f in n for f in filters for n in names)

    rows = []
    for case in catalogue():
        if not wanted([case.name], cases):
            continue
        for dname in dtypes or case.dtypes:
            dt = DTYPES[dname]
            for launch in record_launches(case, dt):
                tuned = case.tuned.get(launch.kernel)
                if tuned is None and launch.kernel not in FIXED_TILE_KERNELS:
                    continue  # fixed tiles of a helper kernel (preprocess, combine): no main loop to read
                if not wanted([kernel_name(case, launch.kernel), launch.kernel, case.family], kernels):
                    continue
                needs_tc = dt.needs_tensor_cores and not (dt.torch_dtype == torch.float32
                                                          and launch.args.get("INPUT_PRECISION") == "ieee")
                for arch in archs:
                    kept = tuned.prune(tuned.configs(), launch, arch) if tuned else [launch_config(launch)]
                    for rank, c in enumerate(kept):
                        if not wanted([config_label(c)], configs):
                            continue
                        job = make_job(launch, arch, c)
                        check_row = Row(arch, case.family, case.name, dname, launch.kernel, config_label(c),
                                        False, job, needs_tc)
                        rows.append(PerfRow(arch, case, dname, launch, c, rank, check_row))
    return rows


# Kernels launched with a tile the launcher fixes (no autotuner) that the report reads all the same: the
# decoding kernel, whose tile follows the packed rows (attention_configs.decode_config).
FIXED_TILE_KERNELS = ("attn_decode_kernel",)


def launch_config(launch: Launch):
    """The ``triton.Config`` a fixed-tile launch carries in its own arguments and options."""
    import triton

    tiles = {k: launch.args[k] for k in ("BLOCK_M", "BLOCK_N") if k in launch.args}
    return triton.Config(tiles, num_warps=launch.options.get("num_warps", 4),
                         num_stages=launch.options.get("num_stages", 3))


_CACHE_CHUNK = 24


def _save_cache(path: str, results: dict) -> None:
    old = {}
    if os.path.exists(path):
        with open(path, "rb") as f:
            saved = pickle.load(f)
        if saved.get("versions") == versions():
            old = saved.get("results", {})
    with open(path + ".tmp", "wb") as f:
        pickle.dump({"versions": versions(), "results": {**old, **results}}, f)
    os.replace(path + ".tmp", path)


def compile_perf_rows(rows: Sequence[PerfRow], workers: int | None = None,
                      progress: Callable[[int, int], None] | None = None, cache: str | None = None) -> list[PerfRow]:
    """Compile every row (identical jobs once), analyse its SASS in the worker, judge it as ``check``
    does, and mark the picked config of each (arch, case, dtype, launch).

    Args:
        cache: a file of earlier compile results of the same Triton (written here, read when it exists):
            jobs found there are not compiled again. A development aid for changing the report's fields;
            the committed reports are made without one.
    """
    jobs = list(dict.fromkeys(r.check_row.job for r in rows))
    results: dict = {}
    if cache and os.path.exists(cache):
        with open(cache, "rb") as f:
            saved = pickle.load(f)
        if saved.get("versions") == versions():
            results = {j: res for j, res in saved["results"].items() if j in set(jobs)}
    todo = [j for j in jobs if j not in results]
    # With a cache, compile in chunks and save after each: an interrupted run keeps what it compiled.
    step = _CACHE_CHUNK if cache else max(1, len(todo))
    for start in range(0, len(todo), step):
        def chunk_progress(done, total, start=start):
            if progress is not None:
                progress(start + done, len(todo))

        results.update(compile_jobs(todo[start:start + step], workers, chunk_progress, analyse=sass.analyse))
        if cache:
            _save_cache(cache, results)
    for r in rows:
        r.check_row.result = results[r.check_row.job]
        r.check_row.failures = judge(r.check_row)
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.arch, r.case.name, r.dtype, id(r.launch)), []).append(r)
    for group in groups.values():
        clean = [r for r in group if r.check_row.ok]
        if clean:
            best = min(clean, key=lambda r: (tuple(-x for x in _area(r.config)), r.rank))
            best.picked = True
    return list(rows)


def _programs(launch: Launch, config) -> int | None:
    grid = launch.grid
    if grid is None:
        return None
    if callable(grid):
        grid = grid(dict(config.kwargs))
    return math.prod(int(g) for g in grid)


def _rows_of_launch(r: PerfRow) -> tuple[int | None, int]:
    """The rows a program covers and the launch's length in that dimension (linear: M; attention: LQ
    rows per query block, keys per key block for dK/dV)."""
    a, kw = r.launch.args, r.config.kwargs
    if r.launch.kernel == "linear_kernel":
        return a.get("M"), kw["BLOCK_M"]
    if r.launch.kernel == "attn_bwd_dkdv_kernel":
        return a.get("LK"), kw["BLOCK_N"]
    if r.launch.kernel == "attn_decode_kernel":
        return a.get("ROWS"), kw["BLOCK_M"]  # the packed rows (query heads x positions) of a kv head
    return a.get("LQ"), kw.get("BLOCK_M", 0)


def kv_bytes(r: PerfRow, programs: int | None) -> int | None:
    """K and V bytes a forward launch reads (every program its visible key blocks; the L2 may serve some):
    the forward kernel reads each key block once per (batch, query head, query block), the decoding
    kernel once per (batch, kv head, packed row block), its splits dividing the keys between programs."""
    a, kw = r.launch.args, r.config.kwargs
    if programs is None or r.launch.kernel not in ("attn_fwd_kernel", "attn_decode_kernel"):
        return None
    lq, lk, bm, bn = a["LQ"], a["LK"], kw["BLOCK_M"], kw["BLOCK_N"]
    offset = a["CAUSAL_OFFSET"] if a.get("IS_CAUSAL") else None
    row_bytes = (a["HEAD_D"] + a["HEAD_DV"]) * a["Q"].itemsize

    def keys_seen(last_row):  # keys visible to rows up to last_row, in whole blocks
        hi = lk if offset is None else max(0, min(lk, last_row + 1 + offset))
        return math.ceil(hi / bn) * bn

    if r.launch.kernel == "attn_decode_kernel":
        blocks = programs // a["NUM_SPLITS"]  # (batch, kv head, row block)s
        return blocks * min(lk, keys_seen(lq - 1)) * row_bytes
    per_head = math.ceil(lq / bm)
    heads = programs // per_head
    return heads * sum(keys_seen(min(lq, (m + 1) * bm) - 1) for m in range(per_head)) * row_bytes


def row_record(r: PerfRow, triton_version: str) -> dict:
    """One row of the report as a JSON-able dict (the fields bench/GPU.md explains)."""
    a, kw = r.launch.args, r.config.kwargs
    res = r.check_row.result or {}
    warps = r.config.num_warps
    rec = {
        "kernel": r.kernel, "arch": r.arch, "triton": triton_version, "case": r.case.name, "dtype": r.dtype,
        "config": r.label, "rank": r.rank, "picked": r.picked,
        "block_m": kw.get("BLOCK_M"), "block_n": kw.get("BLOCK_N"), "block_k": kw.get("BLOCK_K"),
        "num_warps": warps, "num_stages": r.config.num_stages,
        "failures": list(r.check_row.failures),
    }
    if r.launch.kernel == "linear_kernel":
        rec.update(m=a.get("M"), n=a.get("N"), k=a.get("K"), split_k=a.get("SPLIT_K"))
    else:
        rec.update(head_dim=a.get("HEAD_D"), causal=bool(a.get("IS_CAUSAL")), lq=a.get("LQ"), lk=a.get("LK"),
                   group=a.get("GROUP"))
        if "COMPUTE_DK" in a:
            rec["computes"] = "+".join(g for g, f in (("dk", a["COMPUTE_DK"]), ("dv", a["COMPUTE_DV"])) if f)
    if r.launch.kernel == "linear_kernel" and a.get("M") and a.get("N"):
        # Rows and columns: a swapped launch (few tokens) has its skinny side in the columns.
        rec["useful_rows"] = round(linear_configs.fill(r.config, a["M"], a["N"]), 3)
    else:
        rows, block = _rows_of_launch(r)
        rec["useful_rows"] = round(min(rows, block) / block, 3) if rows and block else None
    programs = _programs(r.launch, r.config)
    rec["programs"] = programs
    rec["sms"] = machine(r.arch).sms
    if r.launch.kernel == "attn_decode_kernel":
        rec["splits"] = a.get("NUM_SPLITS")
    rec["kv_bytes"] = kv_bytes(r, programs)
    if res.get("error"):
        rec["error"] = res["error"]
        return rec
    smem = res["shared"] + res["static_shared"]
    rec.update(regs=res["regs"], spill_bytes=res["stack"] + res["local"], smem_bytes=smem,
               ctas_per_sm=ctas_per_sm(res["regs"], smem, warps, r.arch),
               warp_specialized=bool(res.get("warp_specialized")) or bool(res["analysis"]["setmaxnreg"]),
               tma=res["analysis"]["tma"], cp_async=res["analysis"]["cp_async"],
               mbarrier=res["analysis"]["mbarrier"], wgmma_serialized=res.get("wgmma_serialized") is not None)
    an = res["analysis"]
    loop = an["main"]
    if r.launch.kernel == "linear_kernel":
        elements = 2 * kw["BLOCK_M"] * kw["BLOCK_N"] * kw["BLOCK_K"] / (32 * warps)
        rec["element"] = "mma_flop"
    else:
        elements = kw["BLOCK_M"] * kw["BLOCK_N"] / (32 * warps)
        rec["element"] = "score"
    rec["elements_per_thread"] = elements
    if loop is None:
        rec.update(loop_instructions=None, instructions_per_element=None, mma_shapes=[])
        return rec
    rec.update(
        loop_instructions=loop["instructions"],
        instructions_per_element=round(loop["instructions"] / elements, 4 if rec["element"] == "mma_flop" else 2),
        mma_shapes=loop["mma_shapes"], mma_counts=loop["mma_counts"], mma_kinds=loop["mma_kinds"],
        mma_flops_per_warp=loop["mma_flops_per_warp"], mufu_ex2=loop["mufu_ex2"], fma=loop["fma"],
        loop_tma=loop["tma"], loop_cp_async=loop["cp_async"], loop_global_loads=loop["global_loads"],
        loop_shared_loads=loop["shared_loads"], loop_barriers=loop["barriers"],
        loop_candidates=an["candidates"], other_loop_instructions=an["other_instructions"],
        kernel_instructions=an["instructions"], loop_ops=loop["ops"],
    )
    rec["model"] = estimate(loop, warps, r.arch)
    return rec


def report(rows: Sequence[PerfRow], archs: Sequence[int]) -> dict:
    """The whole report: versions, the model's constants and the rows."""
    import triton

    return {"versions": versions(), "triton": triton.__version__, "archs": list(archs),
            "model": {str(a): dataclasses.asdict(m) for a, m in MODEL.items()},
            "rows": [row_record(r, triton.__version__) for r in rows]}


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def format_perf_table(records: Sequence[dict], picked_only: bool = False) -> str:
    """A fixed-width table of report rows (JSON records); ``*`` marks the picked config."""
    head = ("arch", "kernel", "case", "dtype", "config", "regs", "spill", "smem KiB", "mma in loop", "instr",
            "elem", "instr/elem", "ex2", "loads", "bars", "bound", "status")
    lines = []
    for rec in records:
        if picked_only and not rec.get("picked"):
            continue
        cfg = ("*" if rec.get("picked") else " ") + rec["config"]
        if rec.get("error"):
            lines.append((f"sm_{rec['arch']}", rec["kernel"], rec["case"], rec["dtype"], cfg) + ("-",) * 11
                         + ("FAIL " + "; ".join(rec["failures"]),))
            continue
        mma = " ".join(f"{n}x{s}" for s, n in (rec.get("mma_counts") or {}).items()) or "-"
        loads = "-"
        if rec.get("loop_instructions") is not None:
            parts = [f"tma{rec['loop_tma']}" if rec["loop_tma"] else "",
                     f"cp{rec['loop_cp_async']}" if rec["loop_cp_async"] else "",
                     f"ldg{rec['loop_global_loads']}" if rec["loop_global_loads"] else ""]
            loads = " ".join(p for p in parts if p) or "-"
        model = rec.get("model") or {}
        status = "ok" if not rec["failures"] else "FAIL " + "; ".join(rec["failures"])

        def num(key, fmt="{}"):
            v = rec.get(key)
            return "-" if v is None else fmt.format(v)

        lines.append((f"sm_{rec['arch']}", rec["kernel"], rec["case"], rec["dtype"], cfg, num("regs"),
                      num("spill_bytes"), f"{rec['smem_bytes'] / 1024:.0f}", mma, num("loop_instructions"),
                      num("elements_per_thread", "{:g}"), num("instructions_per_element", "{:g}"),
                      num("mufu_ex2"), loads, num("loop_barriers"),
                      "-" if model.get("bound") is None else f"{model['bound']:.2f}", status))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*ln) for ln in lines]
    return "\n".join(out)


def write_json(data: dict, path: str) -> None:
    """The report as JSON, one row per line (a committed report diffs row by row)."""
    head = {k: v for k, v in data.items() if k != "rows"}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(head, indent=1)[:-2] + ',\n "rows": [\n')
        f.write(",\n".join(json.dumps(r, separators=(",", ":")) for r in data.get("rows", [])))
        f.write("\n ]\n}\n")


# ----------------------------------------------------------------------------------------------------
# Regression check against a committed report
# ----------------------------------------------------------------------------------------------------

REGRESSION_FIELDS = ("instructions_per_element", "regs", "spill_bytes", "wgmma_serialized")
MAIN_KERNELS = ("attn_fwd", "attn_dkdv", "attn_dq", "linear_fwd", "linear_dx", "linear_dw")


def row_key(rec: dict) -> tuple:
    return rec["arch"], rec["kernel"], rec["case"], rec["dtype"], rec["config"]


def regressions(fresh: Sequence[dict], recorded: Sequence[dict]) -> tuple[list[str], int]:
    """Rows of ``fresh`` that got worse than the same row (arch, kernel, case, dtype, config) of
    ``recorded``: more loop instructions per element, more registers or more spilled bytes, or a compile
    failure where the recorded one had none.

    Returns:
        ``(messages, compared)``: one message per regression and how many rows had a recorded twin.
    """
    by_key = {row_key(r): r for r in recorded}
    out, compared = [], 0
    for rec in fresh:
        old = by_key.get(row_key(rec))
        if old is None:
            continue
        compared += 1
        name = " ".join(str(x) for x in row_key(rec))
        if rec.get("error") and not old.get("error"):
            out.append(f"{name}: compile fails now: {rec['error']}")
            continue
        for field in REGRESSION_FIELDS:
            new, was = rec.get(field), old.get(field)
            if new is not None and was is not None and new > was:
                out.append(f"{name}: {field} {was} -> {new}")
    return out, compared
