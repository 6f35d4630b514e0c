"""Recording the kernel launches a launcher makes, without running anything.

A case calls the real launcher in ``gradkernels.ops`` on ``meta`` tensors with the launcher module's
kernel references (and the ``gradkernels.kernels`` modules it holds) swapped for stand-ins that hand each
launch to a handler. So the report follows kernel and launcher changes: nothing is listed by hand.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterable

import torch

from .. import _device
from .signature import Launch, TensorArg, base_kernel, is_kernel, kernel_params
from .targets import TRITON_DTYPES


class _KernelStandIn:
    """Takes the place of a kernel in a launcher: ``[grid](*args, **kw)`` goes to ``handler``."""

    def __init__(self, kernel, handler):
        self._kernel = base_kernel(kernel)
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
        return _KernelStandIn(obj, self._handler) if is_kernel(obj) else obj


@contextlib.contextmanager
def intercepted(modules: Iterable, handler, fp32_precision: str | None):
    """Route the kernel launches of the ``modules`` (launchers) to ``handler(kernel, grid, args, kwargs)``.

    Launchers are made to take their pinned-config path (no autotuner: the handler supplies each
    config), and fp32 matmuls follow ``fp32_precision``. Only the launchers' references are swapped,
    never the kernels' own module, so jit code that calls helpers keeps seeing the real ones.
    """
    saved = []
    try:
        for mod in modules:
            for name, obj in list(vars(mod).items()):
                if is_kernel(obj):
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


def record_value(v):
    """A launch argument as recorded: tensors as :class:`TensorArg`, everything else as it is."""
    if isinstance(v, torch.Tensor):
        if v.dtype not in TRITON_DTYPES:
            raise TypeError(f"tensor argument of dtype {v.dtype} has no Triton pointer type here")
        # Meta tensors have no address; real allocations are 16-byte aligned (torch's caching allocator).
        aligned = v.device.type == "meta" or v.data_ptr() % 16 == 0
        return TensorArg(TRITON_DTYPES[v.dtype], aligned)
    return v


def bind(kernel, args, kwargs):
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


def record_launches(case, dtype) -> list[Launch]:
    """The kernel launches ``case`` (a :class:`.cases.Case`) makes for ``dtype`` (a
    :class:`.targets.DtypeCase`), recorded on meta tensors."""
    launches = []

    def handler(kernel, grid, args, kwargs):
        bound, options = bind(kernel, args, kwargs)
        launches.append(Launch(kernel.fn.__module__, kernel.fn.__name__,
                               {k: record_value(v) for k, v in bound.items()}, options, grid))

    with intercepted(case.ops_modules, handler, dtype.fp32_precision):
        case.launch(dtype.torch_dtype, "meta")
    return launches
