"""Drop gradkernels into an existing model: :func:`patch`, :func:`unpatch` and :func:`use_kernels`.

``patch(model)`` does two independent things:

- ``linear=True``: every submodule whose type is exactly ``torch.nn.Linear`` is replaced by
  :meth:`gradkernels.nn.Linear.from_linear`, which shares the same ``Parameter`` objects (no copies:
  optimizers, weight tying and ``state_dict`` keys and values are unchanged). Subclasses of
  ``nn.Linear`` are left alone, since they may override ``forward`` or carry state the replacement
  would drop (``NonDynamicallyQuantizableLinear``, LoRA layers, ``LazyLinear``); so are modules with
  parametrizations (the weight is computed on the fly), weights that are tensor subclasses (quantized
  or sharded parameters), modules with their own hooks, buffers or children, and modules whose
  ``forward`` was replaced on the instance. Each skip is listed, with its reason, in the summary.
- ``attention=True``: calls to ``torch.nn.functional.scaled_dot_product_attention`` made while any
  module of the model runs go to :func:`gradkernels.scaled_dot_product_attention` (same signature and
  semantics; dropout and boolean key-padding masks, alone or with a causal mask, run on the kernels,
  other masks are handed back to torch; :func:`attention_paths` counts which path calls took). This
  uses forward pre/post hooks on every
  module of the model, not only the root, so that the recomputation of
  ``torch.utils.checkpoint`` (which re-calls a submodule during backward, outside the root's forward)
  routes the same way as the original forward did.

``use_kernels()`` routes SDPA calls of any code, in any thread, while the context is active.

How the routing works, and its limits:

- While at least one model is patched with ``attention=True`` or a ``use_kernels()`` block is active,
  ``torch.nn.functional.scaled_dot_product_attention`` is a small router function. It calls gradkernels
  when routing is on for the calling thread (inside a patched model's module, or inside any
  ``use_kernels()`` block) and the original torch function otherwise. The original is put back when
  the last patched model is unpatched and the last ``use_kernels()`` block has exited (also when
  the block exits with an exception).
- Code that bound the function before patching, ``from torch.nn.functional import
  scaled_dot_product_attention`` at import time, keeps calling torch's function: only attribute
  look-ups at call time (``F.scaled_dot_product_attention(...)``) are routed. Calls of
  ``torch._C._nn.scaled_dot_product_attention`` or ``torch.ops.aten`` ops are never routed.
- Thread safety: installing and removing the router is guarded by a lock. Routing decided by a
  patched model is per thread; ``use_kernels()`` routes every thread while it is active (the swap is
  process-wide). Do not enter ``use_kernels()`` in one thread and expect other threads to be unaffected.
- ``torch.compile``: Dynamo inlines the hooks and the router; the routing state is read as plain
  module globals under compilation (Dynamo guards on them), so a compiled patched model calls the
  gradkernels attention op with no graph break.
- Patch a model before wrapping it in ``DistributedDataParallel`` or ``fully_shard`` (FSDP2 swaps the
  parameters of the modules it was given; replacing those modules afterwards would detach them).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import threading
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F

from .nn import Linear as GKLinear

__all__ = ["PatchSummary", "patch", "unpatch", "use_kernels", "is_patched", "attention_paths"]

# Patch state per model, outside the model: invisible to state_dict, pickling and deepcopy.
_STATE: "weakref.WeakKeyDictionary[torch.nn.Module, _PatchState]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class PatchSummary:
    """What :func:`patch` replaced (or :func:`unpatch` restored).

    Attributes:
        linear_replaced: qualified names of the ``nn.Linear`` modules replaced (restored).
        linear_skipped: ``(qualified name, reason)`` for each ``nn.Linear`` (or subclass) left alone.
        attention_routed: whether SDPA calls of the model are routed to gradkernels (or were, for unpatch).
        hooked_modules: how many modules carry the routing hooks.
    """

    linear_replaced: tuple[str, ...] = ()
    linear_skipped: tuple[tuple[str, str], ...] = ()
    attention_routed: bool = False
    hooked_modules: int = 0
    undone: bool = False  # True for the summary unpatch returns

    def __str__(self) -> str:
        if self.undone:
            head = (f"gradkernels unpatch: {len(self.linear_replaced)} Linear restored, "
                    f"attention routing {'removed' if self.attention_routed else 'was off'}")
            return "\n".join([head] + [f"  restored {name or '<root>'}" for name in self.linear_replaced])
        lines = [f"gradkernels: {len(self.linear_replaced)} Linear replaced, {len(self.linear_skipped)} skipped, "
                 f"attention {'routed' if self.attention_routed else 'not routed'}"
                 + (" (paths taken: gradkernels.patching.attention_paths())" if self.attention_routed else "")]
        lines += [f"  replaced {name or '<root>'}" for name in self.linear_replaced]
        lines += [f"  skipped  {name or '<root>'}: {why}" for name, why in self.linear_skipped]
        return "\n".join(lines)


@dataclasses.dataclass
class _PatchState:
    # (weakref to the parent module, attribute name, original nn.Linear, replacement) for each location
    # replaced; a module reachable from two places is replaced by one shared replacement. Parents are
    # weak references so that this state (held in a WeakKeyDictionary) never keeps the model alive.
    swaps: list
    hooks: list
    summary: PatchSummary
    finalizer: object = None


# ----------------------------------------------------------------------------------------------------
# SDPA routing
# ----------------------------------------------------------------------------------------------------

_lock = threading.Lock()
_torch_sdpa = None  # the function the router replaced, while installed
_installs = 0  # patched models (attention=True) + active use_kernels() blocks
_global_depth = 0  # active use_kernels() blocks: route every thread
_tls = threading.local()  # .depth: patched-model modules running in this thread; .inside: in gradkernels
# Under torch.compile, Dynamo cannot trace thread-locals or locks: the hooks and the router use these
# plain globals instead, which Dynamo tracks as side effects and guards on.
_compile_depth = 0
_compile_inside = 0


def _sdpa_router(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
    """Stands in for ``torch.nn.functional.scaled_dot_product_attention`` while routing is installed."""
    global _compile_inside
    if torch.compiler.is_compiling():
        if (_global_depth > 0 or _compile_depth > 0) and _compile_inside == 0:
            _compile_inside += 1
            try:
                return _gk_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            finally:
                _compile_inside -= 1
        return _call_torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    inside = getattr(_tls, "inside", 0)
    if (_global_depth > 0 or getattr(_tls, "depth", 0) > 0) and inside == 0:
        # gradkernels hands masks and dropout back to torch through this same attribute: the `inside`
        # flag sends that nested call to torch's function instead of back here.
        _tls.inside = 1
        try:
            return _gk_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        finally:
            _tls.inside = 0
    return _call_torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _gk_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    from . import functional

    return functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa,
    )


def _call_torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    fn = _torch_sdpa if _torch_sdpa is not None else torch._C._nn.scaled_dot_product_attention
    if enable_gqa:
        return fn(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=True)
    # Older torch (< 2.5) has no enable_gqa argument: pass it only when set.
    return fn(query, key, value, attn_mask, dropout_p, is_causal, scale=scale)


def _install_router():
    global _torch_sdpa, _installs
    with _lock:
        if _installs == 0:
            _torch_sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _sdpa_router
        _installs += 1


def _uninstall_router():
    global _torch_sdpa, _installs
    with _lock:
        _installs -= 1
        if _installs == 0:
            if F.scaled_dot_product_attention is _sdpa_router:
                F.scaled_dot_product_attention = _torch_sdpa
            # else: someone replaced it after us; theirs stays (and may still call the router, which
            # then passes everything to torch).
            _torch_sdpa = None


def attention_paths() -> "collections.Counter[str]":
    """How the SDPA drop-in ran its calls since the process started (eager mode): counts per path,
    ``"kernels"`` (the dense kernels), ``"key padding -> varlen"`` (a boolean key-padding mask, alone or
    with a causal mask, run as a packed batch over the real keys) and ``"torch: <reason>"`` (handed to
    torch's SDPA, with the reason). Each call is also logged at debug level on the ``gradkernels``
    logger. Calls compiled by ``torch.compile`` are not counted (the decision is made while tracing)."""
    from . import functional

    return collections.Counter(functional.sdpa_paths)


def routing_active() -> bool:
    """Whether an SDPA call made now, from this thread, would go to gradkernels."""
    return F.scaled_dot_product_attention is _sdpa_router and (
        _global_depth > 0 or getattr(_tls, "depth", 0) > 0
    )


@contextlib.contextmanager
def use_kernels() -> Iterator[None]:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to gradkernels while active.

    Affects every caller in every thread while the block is active (see the module docstring for what
    is and is not routed). Nesting is safe; the original function is restored when the outermost
    block exits, also on an exception.

    Example::

        with gradkernels.use_kernels():
            loss = model(batch).loss   # model calls F.scaled_dot_product_attention
        loss.backward()                # backward needs no routing (autograd recorded the kernels)
    """
    global _global_depth
    _install_router()
    with _lock:
        _global_depth += 1
    try:
        yield
    finally:
        with _lock:
            _global_depth -= 1
        _uninstall_router()


def _enter_hook(module, args):
    global _compile_depth
    if torch.compiler.is_compiling():
        _compile_depth += 1
    else:
        _tls.depth = getattr(_tls, "depth", 0) + 1


def _exit_hook(module, args, output):
    global _compile_depth
    if torch.compiler.is_compiling():
        _compile_depth -= 1
    else:
        # getattr: when Dynamo gives up on a frame mid-trace, the enter hook may have run only traced.
        _tls.depth = max(getattr(_tls, "depth", 0) - 1, 0)


# ----------------------------------------------------------------------------------------------------
# Linear replacement
# ----------------------------------------------------------------------------------------------------

_PLAIN_PARAM_TYPES = (torch.nn.Parameter, torch.Tensor)


def _skip_reason(m: torch.nn.Module) -> str | None:
    """Why ``m`` (an ``nn.Linear``) is not replaced, or None when it can be."""
    if isinstance(m, GKLinear):
        return "already a gradkernels Linear"
    if torch.nn.utils.parametrize.is_parametrized(m):  # before the type test: it changes the class
        return "has parametrizations (its weight is computed on the fly)"
    if type(m) is not torch.nn.Linear:
        return f"{type(m).__module__}.{type(m).__qualname__} is a subclass of nn.Linear (its forward may differ)"
    for name in ("weight", "bias"):
        t = getattr(m, name)
        if t is not None and type(t) not in _PLAIN_PARAM_TYPES:
            return f"{name} is a {type(t).__name__} (tensor subclass: quantized or sharded parameters)"
        if t is not None and not t.is_floating_point():
            return f"{name} has dtype {t.dtype} (quantized weights are not supported)"
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return "has its own hooks (the replacement would drop them)"
    if m._buffers or m._modules:
        return "has buffers or child modules"
    if "forward" in m.__dict__:
        return "forward was replaced on the instance (e.g. by accelerate)"
    return None


def _replacement(m: torch.nn.Linear) -> GKLinear:
    new = GKLinear.from_linear(m)
    # Keep plain attributes other code may have set on the instance (e.g. transformers' markers).
    for k, v in m.__dict__.items():
        if k not in new.__dict__:
            new.__dict__[k] = v
    return new


def _replace_linears(model: torch.nn.Module):
    swaps, replaced, skipped = [], [], []
    new_for: dict[int, GKLinear] = {}
    seen_skip: set[int] = set()
    if isinstance(model, torch.nn.Linear):
        skipped.append(("", "the model itself is a Linear (patch its parent module instead)"))
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for name, child in list(parent._modules.items()):
            if child is None or not isinstance(child, torch.nn.Linear):
                continue
            qual = f"{parent_name}.{name}" if parent_name else name
            if id(child) not in new_for:
                reason = _skip_reason(child)
                if reason is not None:
                    if id(child) not in seen_skip:
                        seen_skip.add(id(child))
                        skipped.append((qual, reason))
                    continue
                new_for[id(child)] = _replacement(child)
            swaps.append((weakref.ref(parent), name, child, new_for[id(child)]))
            replaced.append(qual)
    for parent, name, _, new in swaps:
        setattr(parent(), name, new)
    return swaps, tuple(replaced), tuple(skipped)


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def _wrapped_chain(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` and the modules it wraps: ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``) and
    ``DistributedDataParallel`` / ``DataParallel`` / FSDP1 (``module``). FSDP2's ``fully_shard`` keeps
    the module object itself, so it needs no unwrapping."""
    seen = set()
    while isinstance(model, torch.nn.Module) and id(model) not in seen:
        seen.add(id(model))
        yield model
        if isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's wrapper
            model = model._orig_mod
        elif isinstance(model, _data_parallel_wrappers()):
            model = model.module
        else:
            return


@functools.lru_cache(maxsize=None)
def _data_parallel_wrappers() -> tuple[type, ...]:
    # Looked up on first use: importing torch.distributed.fsdp is not free.
    wrappers = [torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrappers.append(FullyShardedDataParallel)
    except Exception:  # pragma: no cover - builds without distributed support
        pass
    return tuple(wrappers)


def _patched_key(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module :func:`patch` was applied to, found through wrappers added since; None if not patched."""
    return next((m for m in _wrapped_chain(model) if m in _STATE), None)


def is_patched(model: torch.nn.Module) -> bool:
    """Whether :func:`patch` was applied to ``model`` or to a module it wraps (``torch.compile``, DDP,
    FSDP), and not undone."""
    return _patched_key(model) is not None


def patch(model: torch.nn.Module, *, linear: bool = True, attention: bool = True) -> PatchSummary:
    """Make ``model`` run its linear layers and attention on gradkernels' kernels, in place.

    Args:
        model: any ``torch.nn.Module``. Patch before wrapping it in DDP / FSDP2 / ``torch.compile``.
        linear: replace each ``torch.nn.Linear`` (exact type) by a gradkernels Linear sharing its
            parameters. ``state_dict`` keys and values stay the same.
        attention: route the model's calls to ``torch.nn.functional.scaled_dot_product_attention`` to
            gradkernels while any of its modules runs (forward hooks; see the module docstring).

    Returns:
        A :class:`PatchSummary` listing the modules replaced and the ones skipped with the reason.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``linear``/``attention`` are not bools.
        RuntimeError: ``model`` is already patched (call :func:`unpatch` first).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, flag in (("linear", linear), ("attention", attention)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if is_patched(model):
        raise RuntimeError("model is already patched by gradkernels: call gradkernels.unpatch(model) first")
    swaps, replaced, skipped = _replace_linears(model) if linear else ([], (), ())
    hooks = []
    if attention:
        _install_router()
        for m in model.modules():
            hooks.append(m.register_forward_pre_hook(_enter_hook))
            # always_call: the exit runs even when forward raises, so routing never leaks out.
            hooks.append(m.register_forward_hook(_exit_hook, always_call=True))
    summary = PatchSummary(replaced, skipped, attention, len(hooks) // 2)
    # A patched model that is garbage-collected without unpatch still releases the router.
    finalizer = weakref.finalize(model, _uninstall_router) if attention else None
    _STATE[model] = _PatchState(swaps, hooks, summary, finalizer)
    return summary


def unpatch(model: torch.nn.Module) -> PatchSummary:
    """Undo :func:`patch`: put the original ``nn.Linear`` modules back and remove the routing hooks.

    ``model`` is the module given to :func:`patch` or a wrapper added since: ``torch.compile(model)``,
    ``DistributedDataParallel`` / ``DataParallel`` / FSDP1 (FSDP2 keeps the module itself). A
    replacement that was itself replaced since patching is left as it is. If a parameter of a
    replacement was reassigned (``module.weight = nn.Parameter(...)``), the original gets the new one.
    A compiled wrapper recompiles on its next call (Dynamo guards on the modules it traced).

    Returns:
        A :class:`PatchSummary` of what was restored.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        RuntimeError: ``model`` is not patched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    key = _patched_key(model)
    state = None if key is None else _STATE.pop(key)
    if state is None:
        raise RuntimeError("model is not patched by gradkernels (nothing to unpatch)")
    restored = []
    names = iter(state.summary.linear_replaced)
    for (parent_ref, name, original, new), qual in zip(state.swaps, names):
        parent = parent_ref()
        if parent is None or parent._modules.get(name) is not new:
            continue
        if original.weight is not new.weight:
            original.weight = new.weight
        if original.bias is not new.bias:
            original.bias = new.bias
        original.train(new.training)
        setattr(parent, name, original)
        restored.append(qual)
    for h in state.hooks:
        h.remove()
    if state.finalizer is not None:
        state.finalizer()  # runs _uninstall_router once, and never again at collection
    return PatchSummary(tuple(restored), (), state.summary.attention_routed, len(state.hooks) // 2, undone=True)
