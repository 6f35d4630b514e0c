"""Ahead-of-time compile report: is every kernel config the autotuner can pick fit for a real GPU?

``python -m gradkernels.aot [--arch 80,90] [--kernel NAME] [--dtype fp16,bf16] [--case fwd] [--json F]``

Triton's interpreter runs code that a real GPU build rejects or runs badly, so every kernel x every
config its factory returns x each dtype x representative launches (activations, split-K, head dims) is
compiled here for real GPU targets, on the CPU, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, and the cubin is inspected with
the ``cuobjdump`` that ships with Triton:

- ``cuobjdump -res-usage``: registers per thread, stack (local memory: spills), static shared memory;
  the dynamic shared memory Triton requests at launch is ``metadata.shared``;
- ``cuobjdump -sass``: tensor-core instructions (HGMMA = sm_90 wgmma, HMMA = mma.sync, DMMA = fp64
  mma) and local loads/stores (LDL/STL = spill traffic).

A config fails when it does not compile, spills, needs more shared memory than one block may use on the
architecture, needs more registers than a block may hold, or when a matmul kernel with 16-bit or tf32
operands has no tensor-core instruction (no HGMMA on sm_90, no HMMA on sm_80/86/89). fp32 with
``input_precision="ieee"`` and fp64 legitimately use FFMA/DFMA (or DMMA) and are not held to that.
tf32 *is*: wgmma and mma.sync both take tf32 operands, and a tf32 matmul without them is a plain
FFMA loop that gave up tf32's only advantage. The process exits non-zero when a config the autotuner
can pick fails; configs that the kernels' ``keep(...)`` rules prune are shown as pruned (and compiled
only with ``--include-pruned``, to check the rule itself).

How launches are derived (so the report follows kernel and launcher changes): each case calls the real
launcher in ``gradkernels.ops`` on ``meta`` tensors with the kernels module swapped for a recorder.
The recorded arguments are mapped to a Triton signature the way Triton specialises a real launch:
tensors -> ``*fp16`` etc. (16-byte aligned), ints -> ``i32``/``i64`` with ``tt.divisibility=16`` when a
multiple of 16, the int 1 and ``None`` -> constexpr. Constexpr flags come from the launcher, tile sizes
and warps/stages from each config of the kernel's factory. ``--compare-real`` (CUDA only) launches the
same cases for real, config by config, and checks the AOT numbers against the loaded kernel's
``n_regs``/``n_spills``; ``--autotune-log`` checks the configs an autotuner picked (lines printed with
``TRITON_PRINT_AUTOTUNING=1``) against the report.

The sm_80 "32 registers and a 6 KB stack" reading (see TRITON_NOTES.md) -- what it was and what the
report does about it -- is written up in ``bench/GPU.md`` ("AOT report: the sm_80 register reading").

Compiles run in a process pool sized to the cores, each run with a fresh, private Triton cache that is
deleted afterwards, so no earlier compile can hide a failure. Worker processes start without
``TRITON_INTERPRET`` even when the caller (e.g. the test suite) runs kernels under the interpreter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import dataclasses
import importlib
import inspect
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from . import _device

# ----------------------------------------------------------------------------------------------------
# Architectures and dtypes
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """What one thread block may use (CUDA C Programming Guide, "Technical Specifications")."""

    smem_per_block: int  # opt-in maximum of static + dynamic shared memory, bytes
    regs_per_block: int  # 32-bit registers one block may hold
    tensor_core_op: str  # SASS opcode of the tensor-core matmul Triton emits for 16-bit/tf32 dots


ARCH_LIMITS = {
    80: ArchLimits(166912, 65536, "HMMA"),  # A100: 163 KiB per block
    86: ArchLimits(101376, 65536, "HMMA"),  # GA10x: 99 KiB
    89: ArchLimits(101376, 65536, "HMMA"),  # Ada: 99 KiB
    90: ArchLimits(232448, 65536, "HGMMA"),  # H100/H200: 227 KiB; wgmma
}
DEFAULT_ARCHS = (80, 90)


@dataclasses.dataclass(frozen=True)
class DtypeCase:
    torch_dtype: torch.dtype
    fp32_precision: str | None  # tl.dot input precision for fp32 operands; None for other dtypes
    needs_tensor_cores: bool

    @property
    def nbytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()


DTYPES = {
    "fp16": DtypeCase(torch.float16, None, True),
    "bf16": DtypeCase(torch.bfloat16, None, True),
    "fp32-tf32": DtypeCase(torch.float32, "tf32", True),
    "fp32-ieee": DtypeCase(torch.float32, "ieee", False),
    "fp64": DtypeCase(torch.float64, None, False),
}

_TRITON_DTYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
    torch.bool: "i1",
}

# ----------------------------------------------------------------------------------------------------
# Cases: launcher calls whose kernel launches are recorded
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tuned:
    """A kernel launched through an autotuner: its config factory and the autotuner's prune.

    ``prune(configs, launch, arch)`` returns the configs the autotuner may pick for ``launch`` on
    ``arch``: the launcher's own ``early_config_prune`` called the way the autotuner calls it (see
    :func:`launcher_prune`), so the report checks exactly the set a GPU run chooses from.
    """

    configs: Callable[[], list]
    prune: Callable[[list, "Launch", int], list]
    # Configs certain to spill for a launch (what they keep in registers alone exceeds a thread's
    # registers): ``--include-pruned`` leaves them out unless ``--all-pruned`` (they take minutes each).
    hopeless: Callable[[Any, "Launch"], bool] | None = None


class _FakeCudaTensor:
    """What a prune function sees of a tensor argument: a CUDA tensor of the recorded dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.device = torch.device("cuda", 0)
        self.is_cuda = True

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()


_TORCH_DTYPES = {v: k for k, v in _TRITON_DTYPES.items()}


def launcher_prune(prune_fn) -> Callable[[list, "Launch", int], list]:
    """Wrap a launcher's ``early_config_prune(configs, named_args, **kwargs)`` for the report.

    The recorded launch's arguments are passed as the autotuner passes them (tensors as CUDA tensors of
    the recorded dtype, constexpr flags as keywords) while ``torch.cuda.get_device_capability``
    answers ``arch``: the prune runs its real code for an sm_80 or sm_90 device on this machine.
    """

    def prune(configs, launch, arch):
        kernel = getattr(importlib.import_module(launch.module), launch.kernel)
        constexpr = {p.name for p in kernel_params(kernel) if p.is_constexpr}
        named = {k: _FakeCudaTensor(_TORCH_DTYPES[v.dtype]) if isinstance(v, TensorArg) else v
                 for k, v in launch.args.items() if k not in constexpr}
        # Tile parameters come from the configs, never from the launch: the autotuner's kwargs have none.
        tiles = {k for c in configs for k in c.kwargs}
        flags = {k: v for k, v in launch.args.items() if k in constexpr and k not in tiles}
        saved = torch.cuda.get_device_capability
        torch.cuda.get_device_capability = lambda device=None: divmod(arch, 10)
        try:
            return list(prune_fn(configs, named, **flags))
        finally:
            torch.cuda.get_device_capability = saved

    return prune


@dataclasses.dataclass(frozen=True)
class Case:
    """One representative use of an op: ``launch(dtype, device)`` calls its launcher(s)."""

    family: str
    name: str
    launch: Callable[[torch.dtype, str], None]
    ops_modules: tuple  # modules whose kernel references are swapped for the recorder
    tuned: Mapping[str, Tuned]  # kernel name -> how its tiles are chosen; other kernels keep the launch's
    # Kernels with fixed tiles whose pinned-mode launch (the one recorded) uses other tiles than a GPU
    # launch does: kernel name -> a function of the launch's recorded arguments (parameter name ->
    # value, tensors as TensorArg) giving the triton.Config a GPU launch uses.
    fixed: Mapping[str, Callable[[dict], Any]] = dataclasses.field(default_factory=dict)
    dtypes: tuple = tuple(DTYPES)


def _linear_cases() -> list[Case]:
    from .kernels import linear as K
    from .ops import linear as ops

    tuned = {"_linear_kernel": Tuned(K.get_linear_configs, launcher_prune(ops._prune))}
    # Sizes only decide the specialisation (multiples of 16, i32): typical aligned layer sizes.
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
    ]


def _attention_cases() -> list[Case]:
    """Attention coverage; empty while ``gradkernels.ops.attention`` does not exist yet."""
    try:
        importlib.import_module("gradkernels.ops.attention")
    except ModuleNotFoundError:
        return []
    return _attention_cases_impl()


def _attention_cases_impl() -> list[Case]:
    import triton

    from .kernels import attention as K
    from .ops import attention as ops

    bwd_configs = K.get_attn_bwd_configs

    def hopeless(kernel):
        def check(config, launch):
            a = launch.args
            return K.hopeless(config, kernel, a["HEAD_D"], a["HEAD_DV"], _TORCH_DTYPES[a["Q"].dtype].itemsize,
                              a.get("INPUT_PRECISION"),
                              a.get("COMPUTE_DK", True), a.get("COMPUTE_DV", True))

        return check

    tuned = {"_attn_fwd_kernel": Tuned(K.get_attn_fwd_configs, launcher_prune(ops._pruner("fwd")), hopeless("fwd")),
             "_attn_bwd_dkdv_kernel": Tuned(lambda: bwd_configs()["dkdv"], launcher_prune(ops._pruner("dkdv")),
                                            hopeless("dkdv")),
             "_attn_bwd_dq_kernel": Tuned(lambda: bwd_configs()["dq"], launcher_prune(ops._pruner("dq")),
                                          hopeless("dq"))}

    # Launched with preprocess_config() on a GPU (the recorded, pinned-mode launch uses the interpreter's).
    def preprocess(args):
        return triton.Config(K.preprocess_config(args["HEAD_DV"], _TORCH_DTYPES[args["O"].dtype].itemsize),
                             num_warps=K.PREPROCESS_WARPS)

    fixed = {"_attn_bwd_preprocess_kernel": preprocess}
    # GQA (8 query heads on 2 kv heads), 1024 positions: sizes only decide the specialisation.
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
            lse = torch.empty((b, hq, lq), dtype=ops.lse_dtype(dtype), device=device)
            ops.attention_backward(grad, q, k, v, out, lse, torch.empty_like(lse), lk - lq if causal else None,
                                   d**-0.5)

        return run

    mods = (ops,)
    cases = []
    # Head dims: the common 64 and 128, the largest supported (256), and 80, which is not a power of
    # two (masked head-dim loads). Causal launches contain the non-causal code (unmasked blocks) too.
    for d, causal in ((64, True), (128, True), (256, True), (80, False)):
        tag = f"d{d}-{'causal' if causal else 'full'}"
        cases.append(Case("attention", f"attn-fwd-{tag}", fwd(d, causal), mods, tuned, fixed))
        cases.append(Case("attention", f"attn-bwd-{tag}", bwd(d, causal), mods, tuned, fixed))
    # Short sequences: the launchers' prune then offers the shortest tiles (decoding: one query row over
    # 1024 keys; a 16-position backward), one head-dim block each.
    for d in (64, 80, 256):
        cases.append(Case("attention", f"attn-short-fwd-d{d}", fwd(d, True, 1, length), mods, tuned, fixed))
        cases.append(Case("attention", f"attn-short-bwd-d{d}", bwd(d, True, 16, 16), mods, tuned, fixed))
    return cases


FAMILIES: dict[str, Callable[[], list[Case]]] = {"linear": _linear_cases, "attention": _attention_cases}


def all_cases() -> list[Case]:
    return [c for make in FAMILIES.values() for c in make()]


# ----------------------------------------------------------------------------------------------------
# Recording launches
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """A tensor argument as Triton's launcher sees it: element type and 16-byte alignment."""

    dtype: str
    aligned: bool


@dataclasses.dataclass
class Launch:
    module: str  # where the @triton.jit function is defined
    kernel: str
    args: dict  # parameter name -> recorded value (TensorArg, int, float, str, None, ...)
    options: dict  # num_warps, num_stages, ... given at the launch


def _is_kernel(obj) -> bool:
    """A @triton.jit function (compiled or interpreted) or an autotuner/heuristics wrapper of one."""
    return hasattr(obj, "arg_names") and hasattr(obj, "fn") and hasattr(type(obj), "__getitem__")


def _base_kernel(obj):
    """Unwrap autotuner/heuristics layers down to the @triton.jit function itself."""
    while not inspect.isfunction(obj.fn):
        obj = obj.fn
    return obj


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    is_constexpr: bool
    default: Any
    annotation: str | None  # a Triton type written on the parameter ("fp64", "i32", "*fp16"), if any
    specialize: bool  # Triton may turn the value 1 into a constant and mark multiples of 16
    align: bool  # Triton may mark 16-byte aligned pointers / multiples of 16


def _decorator_list(kernel, name):
    value = getattr(kernel, name, None)
    if value is None:  # an interpreter function keeps the decorator's arguments in .kwargs
        value = (getattr(kernel, "kwargs", None) or {}).get(name)
    return set(value or ())


def kernel_params(kernel) -> list[Param]:
    """The parameters of a jit kernel as Triton specialises them, read from its Python signature."""
    kernel = _base_kernel(kernel)
    no_spec = _decorator_list(kernel, "do_not_specialize")
    no_align = _decorator_list(kernel, "do_not_specialize_on_alignment")
    out = []
    for i, p in enumerate(inspect.signature(kernel.fn).parameters.values()):
        ann = p.annotation
        text = "" if ann is inspect.Parameter.empty else ann if isinstance(ann, str) else getattr(
            ann, "__name__", repr(ann))
        is_constexpr = "constexpr" in str(text)
        annotation = str(text) if text and not is_constexpr else None
        specialize = i not in no_spec and p.name not in no_spec
        out.append(Param(p.name, is_constexpr, p.default, annotation, specialize,
                         specialize and i not in no_align and p.name not in no_align))
    return out


class _KernelStandIn:
    """Takes the place of a kernel in a launcher: ``[grid](*args, **kw)`` goes to ``handler``."""

    def __init__(self, kernel, handler):
        self._kernel = _base_kernel(kernel)
        self._handler = handler

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._handler(self._kernel, grid, args, kwargs)

    def __getattr__(self, name):
        return getattr(self._kernel, name)


class _ModuleStandIn:
    """A kernels module seen through the recorder: kernels swapped, everything else passed through."""

    def __init__(self, module, handler):
        self._module = module
        self._handler = handler

    def __getattr__(self, name):
        obj = getattr(self._module, name)
        return _KernelStandIn(obj, self._handler) if _is_kernel(obj) else obj


@contextlib.contextmanager
def _intercepted(modules: Iterable, handler, fp32_precision: str | None):
    """Route the kernel launches of the ``modules`` (launchers) to ``handler``.

    Launchers are made to take their pinned-config path (no autotuner: the handler supplies each
    config), and fp32 matmuls follow ``fp32_precision``. Only the launchers' references are swapped,
    never the kernels' own module, so jit code that calls helpers keeps seeing the real ones.
    """
    saved = []
    try:
        for mod in modules:
            for name, obj in list(vars(mod).items()):
                if _is_kernel(obj):
                    stand_in = _KernelStandIn(obj, handler)
                elif inspect.ismodule(obj) and obj.__name__.startswith("gradkernels.kernels"):
                    stand_in = _ModuleStandIn(obj, handler)
                else:
                    continue
                saved.append((mod, name, obj))
                setattr(mod, name, stand_in)
        for name, value in (("use_autotune", lambda: False),
                            ("fp32_input_precision", lambda device: fp32_precision or "ieee")):
            saved.append((_device, name, getattr(_device, name)))
            setattr(_device, name, value)
        yield
    finally:
        for mod, name, obj in reversed(saved):
            setattr(mod, name, obj)


def _record_value(v):
    if isinstance(v, torch.Tensor):
        if v.dtype not in _TRITON_DTYPES:
            raise TypeError(f"tensor argument of dtype {v.dtype} has no Triton pointer type here")
        # Meta tensors have no address; real allocations are 16-byte aligned (torch's caching allocator).
        aligned = v.device.type == "meta" or v.data_ptr() % 16 == 0
        return TensorArg(_TRITON_DTYPES[v.dtype], aligned)
    return v


def _bind(kernel, args, kwargs):
    """Map a launch's positional and keyword arguments to parameter names; the rest are options."""
    names = list(kernel.arg_names)
    if len(args) > len(names):
        raise TypeError(f"{kernel.fn.__name__} takes {len(names)} arguments, the launch gave {len(args)}")
    bound = dict(zip(names, args))
    options = {}
    for key, value in kwargs.items():
        (bound if key in names else options)[key] = value
    for p in kernel_params(kernel):
        if p.name not in bound and p.default is not inspect.Parameter.empty:
            bound[p.name] = p.default
    return bound, options


def record_launches(case: Case, dtype: DtypeCase) -> list[Launch]:
    """The kernel launches ``case`` makes for ``dtype``, recorded on meta tensors (nothing runs)."""
    launches = []

    def handler(kernel, grid, args, kwargs):
        bound, options = _bind(kernel, args, kwargs)
        launches.append(Launch(kernel.fn.__module__, kernel.fn.__name__,
                               {k: _record_value(v) for k, v in bound.items()}, options))

    with _intercepted(case.ops_modules, handler, dtype.fp32_precision):
        case.launch(dtype.torch_dtype, "meta")
    return launches


# ----------------------------------------------------------------------------------------------------
# Jobs: one compile of one kernel specialisation for one architecture
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    module: str
    kernel: str
    arch: int
    signature: tuple  # ((name, type), ...) in parameter order
    constexprs: tuple  # ((name, value), ...)
    aligned: tuple  # names specialised with tt.divisibility=16
    options: tuple  # ((name, value), ...): num_warps, num_stages, ...


_OPTION_ATTRS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _arg_type(value, param: Param):
    """Triton's specialisation of one non-constexpr argument: ``(type, aligned)``; type may be constexpr.

    Mirrors what a launch does: None and (unless ``do_not_specialize``) the int 1 become constants,
    ints that are multiples of 16 and 16-byte aligned pointers get ``tt.divisibility=16``, floats are
    fp32 and an annotation on the parameter (``SM_SCALE: "fp64"``) fixes the type.
    """
    if value is None:
        return "constexpr", False
    if isinstance(value, TensorArg):
        return param.annotation or "*" + value.dtype, param.align and value.aligned
    if isinstance(value, bool):
        return param.annotation or "i1", False
    if isinstance(value, int):
        if value == 1 and param.specialize:
            return "constexpr", False
        kind = "i32" if -(2**31) <= value < 2**31 else "i64" if -(2**63) <= value < 2**63 else "u64"
        return param.annotation or kind, param.align and value % 16 == 0
    if isinstance(value, float):
        return param.annotation or "fp32", False
    raise TypeError(f"cannot derive a Triton type for {param.name} of type {type(value).__name__}")


def make_job(launch: Launch, arch: int, config=None) -> Job:
    """The compile job for ``launch`` with ``config`` (a ``triton.Config``) applied, for ``arch``."""
    kernel = getattr(importlib.import_module(launch.module), launch.kernel)
    tiles = dict(config.kwargs) if config is not None else {}
    params = kernel_params(kernel)
    unknown = set(tiles) - {p.name for p in params}
    if unknown:
        raise ValueError(f"config {config} sets {sorted(unknown)}, which {launch.kernel} does not take")
    signature, constexprs, aligned = [], [], []
    for param in params:
        name = param.name
        if param.is_constexpr:
            if name in tiles:
                value = tiles[name]
            elif name in launch.args:
                value = launch.args[name]
            else:
                raise ValueError(f"{launch.kernel}: constexpr {name} is set by neither the launch nor the config")
            signature.append((name, "constexpr"))
            constexprs.append((name, value))
            continue
        if name not in launch.args:
            raise ValueError(f"{launch.kernel}: argument {name} missing from the recorded launch")
        value = launch.args[name]
        kind, is_aligned = _arg_type(value, param)
        signature.append((name, kind))
        if kind == "constexpr":
            constexprs.append((name, value))
        elif is_aligned:
            aligned.append(name)
    options = {k: v for k, v in launch.options.items()}
    if config is not None:
        for attr in _OPTION_ATTRS:
            value = getattr(config, attr, None)
            if value is not None:
                options[attr] = value
    return Job(launch.module, launch.kernel, arch, tuple(signature), tuple(constexprs), tuple(aligned),
               tuple(sorted(options.items())))


@dataclasses.dataclass
class Row:
    """One line of the report: a job in context, and (after compiling) what the cubin says."""

    arch: int
    family: str
    case: str
    dtype: str
    kernel: str
    config: str  # compact: tile values in factory order, warps, stages
    pruned: bool  # keep(...) rejects it: the autotuner never picks it
    job: Job | None
    needs_tensor_cores: bool
    result: dict | None = None
    failures: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.result is not None and not self.failures


def config_label(config=None, options: Mapping | None = None) -> str:
    if config is None:
        opts = dict(options or {})
        return f"launch w{opts.get('num_warps', 4)} s{opts.get('num_stages', 3)}"
    tiles = "x".join(str(v) for v in config.kwargs.values())
    maxnreg = f" r{config.maxnreg}" if getattr(config, "maxnreg", None) else ""
    return f"{tiles} w{config.num_warps} s{config.num_stages}{maxnreg}"


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
        dtypes: keys of :data:`DTYPES` (None: all).
        cases: keep cases whose name contains one of these (None: all).
        include_pruned: also compile configs that the kernel's ``keep`` rule prunes, except the ones its
            ``Tuned.hopeless`` says are certain to spill (unless ``all_pruned``).
        config_filter: an extra predicate on ``triton.Config`` (tests use it to compile a subset).
        maxnreg: what-if experiments: compile every tuned config with this ``maxnreg`` (PTX
            ``.maxnreg``) instead of its own.

    Returns:
        The rows; a pruned config gets ``job=None`` unless ``include_pruned``.

    Raises:
        ValueError: an unknown architecture or dtype name.
    """
    for arch in archs:
        if arch not in ARCH_LIMITS:
            raise ValueError(f"arch must be one of {sorted(ARCH_LIMITS)}, got {arch}")
    for d in dtypes or ():
        if d not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {d!r}")
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


# ----------------------------------------------------------------------------------------------------
# Compiling and reading the cubin (runs in worker processes)
# ----------------------------------------------------------------------------------------------------


def _triton_tool(name: str) -> str:
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


def parse_res_usage(text: str) -> dict:
    """Registers, stack, static shared and local bytes from ``cuobjdump -res-usage`` (one kernel)."""
    m = _RES_USAGE.search(text)
    if m is None:
        raise ValueError(f"no 'REG:.. STACK:.. SHARED:.. LOCAL:..' line in cuobjdump output:\n{text}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


def count_sass(text: str, ops: Sequence[str] = SASS_OPS) -> dict:
    """How many instructions of each opcode (``HGMMA.64x128x16.F32`` counts as HGMMA) the SASS has."""
    counts = dict.fromkeys(ops, 0)
    for m in re.finditer(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", text, re.MULTILINE):
        op = m.group(1)
        if op in counts:
            counts[op] += 1
    return counts


def compile_job(job: Job) -> dict:
    """Compile one job for its GPU target and read the cubin. Never raises: errors are in ``error``."""
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        kernel = getattr(importlib.import_module(job.module), job.kernel)
        kernel = _base_kernel(kernel)
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
            res = subprocess.run([_triton_tool("cuobjdump"), "-res-usage", path],
                                 capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([_triton_tool("cuobjdump"), "-sass", path],
                                  capture_output=True, text=True, check=True).stdout
        out = parse_res_usage(res)
        out["shared"] = int(compiled.metadata.shared)
        out["num_warps"] = int(compiled.metadata.num_warps)
        out["sass"] = count_sass(sass)
        # A matmul kernel (tensor cores expected for 16-bit/tf32), helpers it calls included.
        out["has_dot"] = bool(re.search(r"\btt\.dot\b", compiled.asm["ttir"]))
        out["error"] = None
    except Exception as e:  # noqa: BLE001 - reported per row, the run goes on
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


def compile_rows(rows: Sequence[Row], workers: int | None = None, progress: Callable[[int, int], None] | None = None
                 ) -> list[Row]:
    """Compile every row that has a job (identical jobs once), in a process pool; then judge each row.

    Args:
        rows: from :func:`build_rows`.
        workers: pool size (default: the CPUs this process may use).
        progress: called with ``(done, total)`` after each compile.

    Returns:
        The same rows, with ``result`` and ``failures`` filled in.
    """
    jobs = list(dict.fromkeys(r.job for r in rows if r.job is not None))
    results: dict[Job, dict] = {}
    if jobs:
        workers = min(workers or default_workers(), len(jobs))
        with tempfile.TemporaryDirectory(prefix="gradkernels-aot-") as cache:
            ctx = multiprocessing.get_context("spawn")
            with _worker_environment(cache), concurrent.futures.ProcessPoolExecutor(
                    max_workers=workers, mp_context=ctx, initializer=_worker_init) as pool:
                futures = {pool.submit(compile_job, j): j for j in jobs}
                for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                    results[futures[fut]] = fut.result()
                    if progress is not None:
                        progress(i, len(jobs))
    for r in rows:
        if r.job is not None:
            r.result = results[r.job]
            r.failures = judge(r)
    return rows


def judge(row: Row) -> list[str]:
    """Why a compiled row would fail on its architecture (empty list: it passes)."""
    res = row.result
    if res is None:
        return []
    if res.get("error"):
        return [f"compile: {res['error']}"]
    lim = ARCH_LIMITS[row.arch]
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
    return fails


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------


def _tc_cell(row: Row) -> str:
    s = row.result["sass"]
    parts = [f"{op}:{s[op]}" for op in ("HGMMA", "HMMA", "DMMA") if s[op]]
    return " ".join(parts) or "-"


def format_table(rows: Sequence[Row]) -> str:
    """The report as a fixed-width table, one row per compiled (or pruned) config."""
    head = ("arch", "kernel", "case", "dtype", "config", "regs", "stack", "smem KiB", "tensor ops", "s", "status")
    lines = []
    for r in rows:
        if r.result is None:
            cells = ("-", "-", "-", "-", "-", "pruned (keep)")
        elif r.result.get("error"):
            cells = ("-", "-", "-", "-", f"{r.result['seconds']:.1f}", "FAIL " + "; ".join(r.failures))
        else:
            res = r.result
            status = ("pruned, " if r.pruned else "") + ("ok" if not r.failures else
                                                         ("would fail: " if r.pruned else "FAIL ")
                                                         + "; ".join(r.failures))
            cells = (str(res["regs"]), str(res["stack"]), f"{(res['shared'] + res['static_shared']) / 1024:.1f}",
                     _tc_cell(r), f"{res['seconds']:.1f}", status)
        lines.append((f"sm_{r.arch}", r.kernel, r.case, r.dtype, r.config) + cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*ln) for ln in lines]
    return "\n".join(out)


def failing(rows: Sequence[Row]) -> list[Row]:
    """Rows the autotuner can pick (not pruned) that fail."""
    return [r for r in rows if not r.pruned and r.failures]


def summary(rows: Sequence[Row], seconds: float | None = None) -> str:
    compiled = [r for r in rows if r.result is not None]
    bad = failing(rows)
    pruned = sum(r.pruned for r in rows)
    pruned_ok = sum(r.pruned and r.result is not None and not r.failures for r in rows)
    text = (f"{len(compiled)} rows compiled ({len({r.job for r in compiled})} distinct compiles), "
            f"{pruned} pruned by keep()" + (f" ({pruned_ok} of them would pass)" if pruned_ok else "")
            + f", {len(bad)} failing")
    if seconds is not None:
        text += f", {seconds:.0f} s"
    return text


def rows_to_json(rows: Sequence[Row]) -> list[dict]:
    return [{"arch": r.arch, "family": r.family, "case": r.case, "dtype": r.dtype, "kernel": r.kernel,
             "config": r.config, "pruned": r.pruned, "result": r.result, "failures": r.failures,
             "constexprs": dict(r.job.constexprs) if r.job else None,
             "options": dict(r.job.options) if r.job else None} for r in rows]


# ----------------------------------------------------------------------------------------------------
# The attention tile table (kernels/attention_tiles.py), written from --include-pruned reports
# ----------------------------------------------------------------------------------------------------

_ATTN_VARIANT = {"_attn_fwd_kernel": "fwd", "_attn_bwd_dkdv_kernel": "dkdv", "_attn_bwd_dq_kernel": "dq"}


def attention_tile_table(rows: Sequence[dict]) -> dict:
    """``{arch: {variant: {path: {block_d: sorted tiles}}}}`` of the attention configs that compiled clean.

    ``rows`` are report rows as JSON (``--json``; several reports may be concatenated). A tile is listed
    for (arch, kernel variant, matmul path, head-dim block) when every compiled row of it there passed
    (fp16 and bf16 share the "tc16" path; D = 80 and 128 share the 128 block) and is left out when any
    failed. Variants: "fwd", "dq", "dkdv" (both accumulators), "dkdv_dk" / "dkdv_dv" (one, see
    ``kernels.attention.split_dkdv``). A tile is ``(BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg)``.
    """
    from .kernels import attention as KA

    verdict: dict = {}
    for r in rows:
        kernel = _ATTN_VARIANT.get(r["kernel"])
        if kernel is None or r.get("result") is None or r.get("constexprs") is None:
            continue
        c, o = r["constexprs"], r["options"]
        variant = KA.tile_variant(kernel, c["HEAD_D"], c["HEAD_DV"], c.get("COMPUTE_DK", True),
                                  c.get("COMPUTE_DV", True))
        arch = 90 if r["arch"] >= 90 else 80
        # The launch's own precision: the launcher runs some fp32-tf32 launches in "ieee".
        path = KA.matmul_path(DTYPES[r["dtype"]].nbytes, c.get("INPUT_PRECISION"))
        block_d = max(64, c["BLOCK_D"], c["BLOCK_DV"])
        tile = (c["BLOCK_M"], c["BLOCK_N"], o["num_warps"], o["num_stages"], o.get("maxnreg"))
        key = (arch, variant, path, block_d, tile)
        # An FMA path never needs tensor cores (reports written before the launch's precision was judged).
        failures = [f for f in r["failures"] if not (path.startswith("fma") and "tensor cores" in f)]
        verdict[key] = verdict.get(key, True) and not failures
    table: dict = {}
    for (arch, variant, path, block_d, tile), clean in sorted(verdict.items(), key=lambda kv: repr(kv[0])):
        bucket = table.setdefault(arch, {}).setdefault(variant, {}).setdefault(path, {}).setdefault(block_d, [])
        if clean:
            bucket.append(tile)
    return table


def write_attention_tiles(table: dict, path: str, source: str) -> None:
    """Write ``table`` as the module kernels/attention_tiles.py (``CLEAN_TILES``)."""
    lines = ['"""Attention tiles that compiled clean in the AOT report: generated, do not edit by hand.',
             "",
             f"Source: {source}.",
             "Regenerate after a kernel change or a Triton upgrade (see bench/GPU.md):",
             "    python -m gradkernels.aot --kernel attention --include-pruned --json report.json  # ~1 h, 2 cores",
             "    python -m gradkernels.aot --tiles-from report.json --write-tiles kernels/attention_tiles.py",
             "",
             "CLEAN_TILES[arch][variant][path][block_d]: (BLOCK_M, BLOCK_N, num_warps, num_stages, maxnreg) tuples",
             "that compiled without spills, within shared memory and (16-bit and tf32 paths) with the",
             "architecture's tensor-core instructions for every launch of the report with that key.",
             '"""',
             "",
             "CLEAN_TILES = {"]
    for arch in sorted(table):
        lines.append(f"    {arch}: {{")
        for variant in sorted(table[arch]):
            lines.append(f"        {variant!r}: {{")
            for p in sorted(table[arch][variant]):
                lines.append(f"            {p!r}: {{")
                for block_d in sorted(table[arch][variant][p]):
                    tiles = ", ".join(repr(tuple(t)) for t in sorted(table[arch][variant][p][block_d], key=repr))
                    lines.append(f"                {block_d}: ({tiles}{',' if len(tiles) and tiles.count('(') == 1 else ''}),")
                lines.append("            },")
            lines.append("        },")
        lines.append("    },")
    lines.append("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def versions() -> str:
    import triton

    parts = [f"triton {triton.__version__}", f"torch {torch.__version__}"]
    for tool in ("ptxas", "ptxas-blackwell"):
        try:
            out = subprocess.run([_triton_tool(tool), "--version"], capture_output=True, text=True).stdout
            m = re.search(r"release ([\d.]+)", out)
            parts.append(f"{tool} {m.group(1) if m else '?'}")
        except (FileNotFoundError, OSError):
            pass
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Checks against a real GPU (CUDA machine only)
# ----------------------------------------------------------------------------------------------------

_PICK = re.compile(r"Triton autotuning for function (\w+),\s*with key as (.*?),\s*finished after [\d.]+s,\s*"
                   r"best config selected: (.*?);", re.DOTALL)


def parse_autotune_log(text: str) -> list[dict]:
    """The picks printed under ``TRITON_PRINT_AUTOTUNING=1``: kernel, key, tiles, warps, stages."""
    picks = []
    for kernel, key, cfg in _PICK.findall(text):
        fields = dict(kv.split(": ", 1) for kv in cfg.split(", ") if ": " in kv)
        tiles = {k: v for k, v in fields.items() if k not in ("num_warps", "num_ctas", "num_stages", "maxnreg",
                                                               "ir_override")}
        m = re.search(r"torch\.(\w+)", key)
        maxnreg = fields.get("maxnreg", "None")
        label = f"{'x'.join(tiles.values())} w{fields.get('num_warps')} s{fields.get('num_stages')}"
        picks.append({"kernel": kernel, "key": key, "dtype": m.group(1) if m else None,
                      "config": label + (f" r{maxnreg}" if maxnreg not in ("None", "0") else "")})
    return picks


def check_picks(picks: Sequence[dict], rows: Sequence[Row]) -> list[tuple[dict, str]]:
    """For each autotuner pick: "ok" (it passed the report), "FAIL ..." or "not covered by the report"."""
    by_key: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.result is not None:
            by_key.setdefault((r.kernel, r.config), []).append(r)
    out = []
    for p in picks:
        matches = by_key.get((p["kernel"], p["config"]), [])
        torch_name = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}.get(p["dtype"] or "")
        same_dtype = [r for r in matches if torch_name and r.dtype.startswith(torch_name)] or matches
        if not same_dtype:
            out.append((p, "not covered by the report"))
        elif any(r.failures for r in same_dtype):
            out.append((p, "FAIL: " + "; ".join(f for r in same_dtype for f in r.failures)))
        else:
            out.append((p, "ok"))
    return out


def compare_real(rows: Sequence[Row]) -> list[tuple[Row, dict, str]]:
    """Launch each compiled row's case for real with that config; compare registers/spills/smem.

    Needs a CUDA device whose capability equals the rows' arch. Returns ``(row, real, verdict)``.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("compare_real needs a CUDA device")
    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    cases = {(c.family, c.name): c for c in all_cases()}
    out = []
    for r in rows:
        if r.arch != arch or r.result is None or r.result.get("error") or r.job is None:
            continue
        case = cases[(r.family, r.case)]
        dt = DTYPES[r.dtype]
        tuned = case.tuned.get(r.kernel)
        config = None
        if tuned is not None:
            config = next(c for c in tuned.configs() if config_label(c) == r.config)
        seen = []

        def handler(kernel, grid, args, kwargs, config=config, r=r, seen=seen, case=case):
            kwargs = dict(kwargs)
            name = kernel.fn.__name__
            # The row's tuned kernel gets the row's config; fixed-tile kernels the tiles a GPU launch uses.
            use = None
            if name == r.kernel and config is not None:
                use = config
            elif name in case.fixed:
                bound, _ = _bind(kernel, args, kwargs)
                use = case.fixed[name]({k: _record_value(v) for k, v in bound.items()})
            if use is not None:
                kwargs.update(use.kwargs)
                for attr in _OPTION_ATTRS:
                    if getattr(use, attr, None) is not None:
                        kwargs[attr] = getattr(use, attr)
            compiled = kernel[grid](*args, **kwargs)
            if kernel.fn.__name__ == r.kernel:
                seen.append(compiled)
            return compiled

        try:
            with _intercepted(case.ops_modules, handler, dt.fp32_precision):
                case.launch(dt.torch_dtype, "cuda")
            torch.cuda.synchronize()
            k = seen[0]
            # Triton's n_spills is the function's local memory in 4-byte words.
            real = {"regs": k.n_regs, "local_bytes": 4 * k.n_spills, "shared": k.metadata.shared}
            aot = r.result
            same = (real["regs"] == aot["regs"] and real["shared"] == aot["shared"]
                    and bool(real["local_bytes"]) == bool(aot["stack"] or aot["local"]))
            verdict = "same" if same else (f"DIFFERS: AOT regs {aot['regs']} stack {aot['stack']} smem "
                                           f"{aot['shared']}")
        except Exception as e:  # noqa: BLE001 - one row's failure is reported, the rest still run
            real, verdict = {}, f"FAIL: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        out.append((r, real, verdict))
    return out


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gradkernels.aot``: print the report; exit 1 when a config the autotuner can pick fails."""
    p = argparse.ArgumentParser(prog="python -m gradkernels.aot", description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)),
                   help="compute capabilities, comma separated (default 80,90; 'native' = this GPU)")
    p.add_argument("--kernel", default="", help="only kernels/families whose name contains one of these (comma list)")
    p.add_argument("--dtype", default="", help=f"comma list of {', '.join(DTYPES)} (default all)")
    p.add_argument("--case", default="", help="only cases whose name contains one of these (comma list)")
    p.add_argument("--include-pruned", action="store_true",
                   help="also compile configs that keep() prunes (not the ones certain to spill)")
    p.add_argument("--all-pruned", action="store_true",
                   help="with --include-pruned: the ones certain to spill too (hours for attention)")
    p.add_argument("--maxnreg", type=int, default=None,
                   help="what-if: compile every tuned config with this maxnreg (PTX .maxnreg), e.g. 255")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: all usable CPUs)")
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument("--failures-only", action="store_true", help="print only failing rows")
    p.add_argument("--compare-real", action="store_true",
                   help="CUDA only: launch each row for real and compare regs/spills/smem with the AOT numbers")
    p.add_argument("--autotune-log", default=None,
                   help="a log with TRITON_PRINT_AUTOTUNING=1 output: check the picked configs against the report")
    p.add_argument("--tiles-from", default=None,
                   help="comma list of --json reports (with --include-pruned): write the attention tile table")
    p.add_argument("--write-tiles", default=None, help="with --tiles-from: the module to write")
    args = p.parse_args(argv)

    if args.tiles_from:
        if not args.write_tiles:
            p.error("--tiles-from needs --write-tiles PATH")
        rows, sources = [], []
        for name in _csv(args.tiles_from):
            with open(name, encoding="utf-8") as f:
                report = json.load(f)
            rows += report["rows"]
            sources.append(report.get("versions", "?"))
        table = attention_tile_table(rows)
        write_attention_tiles(table, args.write_tiles, f"{len(rows)} report rows; {'; '.join(sorted(set(sources)))}")
        print(f"wrote {args.write_tiles}")
        return 0

    if args.arch == "native":
        cap = _device.cuda_capability()
        if cap is None:
            p.error("--arch native needs a CUDA device")
        archs = [cap[0] * 10 + cap[1]]
    else:
        try:
            archs = [int(a) for a in _csv(args.arch)]
        except ValueError:
            p.error(f"--arch must be comma-separated integers such as 80,90, got {args.arch!r}")
    bad = [a for a in archs if a not in ARCH_LIMITS]
    if bad:
        p.error(f"--arch: unsupported {bad}; choose from {sorted(ARCH_LIMITS)}")
    dtypes = _csv(args.dtype) or None
    for d in dtypes or ():
        if d not in DTYPES:
            p.error(f"--dtype: {d!r} is not one of {', '.join(DTYPES)}")
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be >= 1")

    t0 = time.perf_counter()
    print(f"gradkernels AOT report: sm_{', sm_'.join(map(str, archs))}; {versions()}", flush=True)
    rows = build_rows(archs, _csv(args.kernel) or None, dtypes, _csv(args.case) or None, args.include_pruned,
                      maxnreg=args.maxnreg, all_pruned=args.all_pruned)
    if not rows:
        print("no kernel launch matches the filters", file=sys.stderr)
        return 2

    def progress(done, total):
        if sys.stderr.isatty():
            print(f"\rcompiled {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or done % 50 == 0:
            print(f"compiled {done}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    compile_rows(rows, args.jobs, progress)
    elapsed = time.perf_counter() - t0
    shown = failing(rows) if args.failures_only else rows
    print(format_table(shown))
    status = 1 if failing(rows) else 0

    if args.compare_real:
        print("\nAOT vs real launch (this GPU):")
        cmp_rows = compare_real(rows)
        for r, real, verdict in cmp_rows:
            print(f"  sm_{r.arch} {r.kernel} {r.case} {r.dtype} {r.config}: real regs {real.get('regs')} "
                  f"local {real.get('local_bytes')} B smem {real.get('shared')} -> {verdict}")
        if any(not v.startswith("same") for _, _, v in cmp_rows):
            status = 1
    if args.autotune_log:
        with open(args.autotune_log, encoding="utf-8", errors="replace") as f:
            checked = check_picks(parse_autotune_log(f.read()), rows)
        print(f"\nAutotuner picks in {args.autotune_log}: {len(checked)}")
        for pick, verdict in dict(((p["kernel"], p["dtype"], p["config"]), (p, v)) for p, v in checked).values():
            print(f"  {pick['kernel']} {pick['dtype']} {pick['config']}: {verdict}")
        if any(v.startswith("FAIL") for _, v in checked):
            status = 1
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"versions": versions(), "archs": archs, "rows": rows_to_json(rows)}, f, indent=1)
    print("\n" + summary(rows, elapsed))
    for r in failing(rows):
        print(f"FAIL sm_{r.arch} {r.kernel} {r.case} {r.dtype} {r.config}: {'; '.join(r.failures)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
