"""The compile pool: a :class:`.signature.Job` compiled for its GPU target, its cubin read back.

Each job runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a worker process
and reads the cubin with the ``cuobjdump`` that ships with Triton:

- ``cuobjdump -res-usage``: registers per thread, stack (local memory: spills), static shared memory;
  the dynamic shared memory Triton requests at launch is ``metadata.shared``;
- ``cuobjdump -sass``: counts of tensor-core instructions (HGMMA = sm_90 wgmma, HMMA = mma.sync, DMMA =
  fp64 mma), FMAs and local loads/stores (LDL/STL = spill traffic); the SASS text itself on request, for
  reports that analyse the machine code further;
- for a kernel with wgmma (HGMMA), its PTX assembled again by the ptxas Triton used for the target, with
  ``-v``, for one message Triton does not keep: C7515, "wgmma.mma_async instructions are serialized"
  (ptxas then waits for each wgmma before the next: a silent loss of most of the tensor-core rate).

Runs use a fresh, private Triton cache that is deleted afterwards, so no earlier compile can hide a
failure, and workers start without ``TRITON_INTERPRET`` even when the caller (the test suite) runs
kernels under the interpreter.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import re
import shutil
import subprocess
import tempfile
import time
from typing import Callable, Sequence

import torch

from .signature import Job, load_kernel


def triton_tool(name: str) -> str:
    """Path of a CUDA tool bundled with Triton (``cuobjdump``, ``ptxas``, ...), else found on PATH."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found in Triton's package ({path}) nor on PATH")
    return found


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
SASS_OPS = ("HGMMA", "HMMA", "DMMA", "FFMA", "DFMA", "LDL", "STL")
# How warp-specialised partitions appear in the TTGIR (Triton >= 3.4: the ttg.warp_specialize op).
WARP_SPECIALIZED_IR = r"\bttg\.warp_specialize\b"
# ptxas -v's note when it serialises a kernel's wgmma (on stderr, which Triton writes to a log it deletes
# unless TRITON_DUMP_PTXAS_LOG is set).
WGMMA_SERIALIZED = re.compile(r"\(C7515\)|wgmma\.mma_async instructions are serialized")


def parse_res_usage(text: str) -> dict:
    """Registers, stack, static shared and local bytes from ``cuobjdump -res-usage`` (one kernel)."""
    m = _RES_USAGE.search(text)
    if m is None:
        raise ValueError(f"no 'REG:.. STACK:.. SHARED:.. LOCAL:..' line in cuobjdump output:\n{text}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


def ptxas_for(arch: int) -> str:
    """The ptxas Triton assembles ``arch`` with (Triton 3.9: ptxas-blackwell from sm_90 on; 3.6: from sm_100)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def wgmma_serialized(ptx: str, arch: int) -> str | None:
    """ptxas's C7515 note for this PTX (the line), or None: assembled again with ``-v`` by the ptxas Triton
    uses for ``arch`` (``sm_90a`` and up)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas_for(arch), "-v", f"--gpu-name=sm_{arch}a", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, check=True)
    for line in (proc.stdout + proc.stderr).splitlines():
        if WGMMA_SERIALIZED.search(line):
            return line.strip()
    return None


def count_sass(text: str, ops: Sequence[str] = SASS_OPS) -> dict:
    """How many instructions of each opcode (``HGMMA.64x128x16.F32`` counts as HGMMA) the SASS has."""
    counts = dict.fromkeys(ops, 0)
    for m in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text, re.MULTILINE):
        op = m.group(1)
        if op in counts:
            counts[op] += 1
    return counts


def compile_job(job: Job, keep_sass: bool = False, analyse: Callable[[str], dict] | None = None) -> dict:
    """Compile one job for its GPU target and read the cubin. Never raises: errors are in ``error``.

    Args:
        job: what to compile.
        keep_sass: also return the whole ``cuobjdump -sass`` listing (``sass_text``).
        analyse: a function of the SASS listing run here, in the worker (a module-level function, so it
            can be sent to the worker); its result is ``analysis``. Cheaper than shipping listings back.

    Returns:
        ``regs``, ``stack``, ``static_shared``, ``local`` (from ``-res-usage``), ``shared`` (dynamic
        shared memory), ``num_warps``, ``sass`` (opcode counts, :data:`SASS_OPS`), ``has_dot`` (a
        ``tt.dot`` in the IR), ``warp_specialized`` (the TTGIR has warp-specialised partitions),
        ``wgmma_serialized`` (ptxas's C7515 line, or None; see :func:`wgmma_serialized`),
        ``error`` (None or the message) and ``seconds``; ``sass_text`` and ``analysis`` on request.
    """
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = load_kernel(job.module, job.kernel)
        if not hasattr(kernel, "params"):
            raise RuntimeError(f"{job.kernel} is an interpreter function: TRITON_INTERPRET is set in the "
                               "compile worker, which cannot build GPU code")
        index = {name: i for i, name in enumerate(kernel.arg_names)}
        attrs = {(index[name],): [["tt.divisibility", 16]] for name in job.aligned}
        src = ASTSource(fn=kernel, signature=dict(job.signature), constexprs=dict(job.constexprs), attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=dict(job.options))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{job.kernel}.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            res = subprocess.run([triton_tool("cuobjdump"), "-res-usage", path],
                                 capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([triton_tool("cuobjdump"), "-sass", path],
                                  capture_output=True, text=True, check=True).stdout
        out = parse_res_usage(res)
        out["shared"] = int(compiled.metadata.shared)
        out["num_warps"] = int(compiled.metadata.num_warps)
        out["sass"] = count_sass(sass)
        if keep_sass:
            out["sass_text"] = sass
        if analyse is not None:
            out["analysis"] = analyse(sass)
        # A matmul kernel (tensor cores expected for 16-bit/tf32), helpers it calls included.
        out["has_dot"] = bool(re.search(r"\btt\.dot\b", compiled.asm["ttir"]))
        out["warp_specialized"] = bool(re.search(WARP_SPECIALIZED_IR, compiled.asm.get("ttgir", "")))
        out["wgmma_serialized"] = (wgmma_serialized(compiled.asm["ptx"], job.arch)
                                   if job.arch >= 90 and out["sass"]["HGMMA"] else None)
        out["error"] = None
    except Exception as e:  # noqa: BLE001 - reported per job, the run goes on
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        out = {"error": f"{type(e).__name__}: {' | '.join(lines[:3])[:300]}"}
    out["seconds"] = time.perf_counter() - t0
    return out


def _worker_init():
    import warnings

    # Triton 3.9 warns once per process that its fp-fusion default will change; the default is what a
    # real launch uses, so it is what the report compiles with.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


@contextlib.contextmanager
def _worker_environment(cache_dir: str):
    """Environment the spawned workers inherit: no interpreter, a private, empty Triton cache."""
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def compile_jobs(jobs: Sequence[Job], workers: int | None = None,
                 progress: Callable[[int, int], None] | None = None, keep_sass: bool = False,
                 analyse: Callable[[str], dict] | None = None) -> dict[Job, dict]:
    """Compile each distinct job once, in a process pool.

    Args:
        jobs: the jobs (duplicates are compiled once).
        workers: pool size (default: the CPUs this process may use).
        progress: called with ``(done, total)`` after each compile.
        keep_sass: also return each cubin's SASS listing (``sass_text``).
        analyse: run on each SASS listing in the worker (see :func:`compile_job`).

    Returns:
        ``{job: result of compile_job}``.
    """
    jobs = list(dict.fromkeys(jobs))
    results: dict[Job, dict] = {}
    if not jobs:
        return results
    workers = min(workers or default_workers(), len(jobs))
    with tempfile.TemporaryDirectory(prefix="gradkernels-aot-") as cache:
        ctx = multiprocessing.get_context("spawn")
        with _worker_environment(cache), concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
            futures = {pool.submit(compile_job, j, keep_sass, analyse): j for j in jobs}
            for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                results[futures[fut]] = fut.result()
                if progress is not None:
                    progress(i, len(jobs))
    return results


def versions() -> str:
    """Triton, torch and ptxas versions, for the report's header and JSON."""
    import triton

    parts = [f"triton {triton.__version__}", f"torch {torch.__version__}"]
    for tool in ("ptxas", "ptxas-blackwell"):
        try:
            out = subprocess.run([triton_tool(tool), "--version"], capture_output=True, text=True).stdout
            m = re.search(r"release ([\d.]+)", out)
            parts.append(f"{tool} {m.group(1) if m else '?'}")
        except (FileNotFoundError, OSError):
            pass
    return ", ".join(parts)
