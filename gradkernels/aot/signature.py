"""From a recorded launch to a compile job, the way Triton specialises a real launch.

Tensors become ``*fp16`` etc. (16-byte aligned: ``tt.divisibility=16``); ints become ``i32``/``i64``,
marked divisible by 16 when they are multiples of 16; the int 1 and ``None`` become constants (unless the
parameter is in ``do_not_specialize``); a type annotation on the parameter (``SM_SCALE: "fp64"``) fixes
the type. Constexpr flags come from the launch, tile sizes and warps/stages from a config.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from .targets import TORCH_DTYPES

# triton.Config attributes that are compile options.
OPTION_ATTRS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclasses.dataclass(frozen=True)
class TensorArg:
    """A tensor argument as Triton's launcher sees it: element type and 16-byte alignment."""

    dtype: str  # Triton's name: "fp16", "bf16", "fp32", ...
    aligned: bool

    @property
    def itemsize(self) -> int:
        return TORCH_DTYPES[self.dtype].itemsize


@dataclasses.dataclass
class Launch:
    """One kernel launch a launcher made, as recorded (nothing ran)."""

    module: str  # where the @triton.jit function is defined
    kernel: str
    args: dict  # parameter name -> recorded value (TensorArg, int, float, str, None, ...)
    options: dict  # num_warps, num_stages, ... given at the launch
    # The launch's grid: a tuple, or a function of the config's tile values (what launchers pass).
    grid: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: a kernel specialisation for one architecture."""

    module: str
    kernel: str
    arch: int
    signature: tuple  # ((name, type), ...) in parameter order
    constexprs: tuple  # ((name, value), ...)
    aligned: tuple  # names specialised with tt.divisibility=16
    options: tuple  # ((name, value), ...): num_warps, num_stages, ...


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    is_constexpr: bool
    default: Any
    annotation: str | None  # a Triton type written on the parameter ("fp64", "i32", "*fp16"), if any
    specialize: bool  # Triton may turn the value 1 into a constant and mark multiples of 16
    align: bool  # Triton may mark 16-byte aligned pointers / multiples of 16


def is_kernel(obj) -> bool:
    """A @triton.jit function (compiled or interpreted) or an autotuner/heuristics wrapper of one."""
    return hasattr(obj, "arg_names") and hasattr(obj, "fn") and hasattr(type(obj), "__getitem__")


def base_kernel(obj):
    """Unwrap autotuner/heuristics layers down to the @triton.jit function itself."""
    while not inspect.isfunction(obj.fn):
        obj = obj.fn
    return obj


def load_kernel(module: str, name: str):
    """The @triton.jit function ``name`` of ``module``, unwrapped."""
    return base_kernel(getattr(importlib.import_module(module), name))


def _decorator_list(kernel, name):
    value = getattr(kernel, name, None)
    if value is None:  # an interpreter function keeps the decorator's arguments in .kwargs
        value = (getattr(kernel, "kwargs", None) or {}).get(name)
    return set(value or ())


def kernel_params(kernel) -> list[Param]:
    """The parameters of a jit kernel as Triton specialises them, read from its Python signature."""
    kernel = base_kernel(kernel)
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


def arg_type(value, param: Param):
    """Triton's specialisation of one non-constexpr argument: ``(type, aligned)``; type may be constexpr."""
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
    kernel = load_kernel(launch.module, launch.kernel)
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
        kind, is_aligned = arg_type(value, param)
        signature.append((name, kind))
        if kind == "constexpr":
            constexprs.append((name, value))
        elif is_aligned:
            aligned.append(name)
    options = dict(launch.options)
    if config is not None:
        for attr in OPTION_ATTRS:
            value = getattr(config, attr, None)
            if value is not None:
                options[attr] = value
    return Job(launch.module, launch.kernel, arch, tuple(signature), tuple(constexprs), tuple(aligned),
               tuple(sorted(options.items())))
