"""Checks of the report against a real GPU (a CUDA machine; ``make gpu`` runs them).

- :func:`compare_real`: launch each compiled row's case for real with that row's config and compare the
  loaded kernel's registers, local memory and shared memory with the AOT numbers. Both come from the
  same ``triton.compile`` pipeline, so they should be identical; a difference means the report's
  signature does not match what a launch specialises.
- :func:`parse_autotune_log` / :func:`check_picks`: the configs the autotuners picked
  (``TRITON_PRINT_AUTOTUNING=1`` output) against the report's rows of the same kernel and dtype.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from .. import _device
from .cases import all_cases
from .check import Row, config_label
from .recorder import bind, intercepted, record_value
from .signature import OPTION_ATTRS
from .targets import DTYPES

_PICK = re.compile(r"Triton autotuning for function (\w+),\s*with key as (.*?),\s*finished after [\d.]+s,\s*"
                   r"best config selected: (.*?);", re.DOTALL)


def parse_autotune_log(text: str) -> list[dict]:
    """The picks printed under ``TRITON_PRINT_AUTOTUNING=1``: kernel, key, dtype, config label."""
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

    Needs a CUDA device; rows of other architectures than the device's are skipped.

    Returns:
        ``(row, real, verdict)`` per row: ``real`` has ``regs``, ``local_bytes``, ``shared``; the verdict
        is "same", "DIFFERS: ..." or "FAIL: ...".
    """
    if not torch.cuda.is_available():
        raise RuntimeError("compare_real needs a CUDA device")
    arch = _device.device_arch(torch.device("cuda", torch.cuda.current_device()))
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
                bound, _ = bind(kernel, args, kwargs)
                use = case.fixed[name]({k: record_value(v) for k, v in bound.items()})
            if use is not None:
                kwargs.update(use.kwargs)
                for attr in OPTION_ATTRS:
                    if getattr(use, attr, None) is not None:
                        kwargs[attr] = getattr(use, attr)
            compiled = kernel[grid](*args, **kwargs)
            if name == r.kernel:
                seen.append(compiled)
            return compiled

        try:
            with intercepted(case.ops_modules, handler, dt.fp32_precision):
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
