"""The attention tile table ``kernels/attention_tiles.py``, written from ``--include-pruned`` reports.

``python -m gradkernels.aot tiles --from a.json,b.json --write kernels/attention_tiles.py``; the table is
what ``kernels.attention_configs.keep`` accepts (how it was built up: bench/GPU.md, "Attention").
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..kernels import attention_configs
from ..kernels.arch import calibrated, matmul_path
from .targets import DTYPES

_VARIANT = {"attn_fwd_kernel": "fwd", "attn_bwd_dkdv_kernel": "dkdv", "attn_bwd_dq_kernel": "dq"}

REGENERATE = (
    "    python -m gradkernels.aot check --kernel attention --include-pruned --json report.json  # ~1 h, 2 cores",
    "    python -m gradkernels.aot tiles --from report.json --write kernels/attention_tiles.py",
)


def attention_tile_table(rows: Sequence[dict]) -> dict:
    """``{arch: {variant: {path: {block_d: sorted tiles}}}}`` of the attention configs that compiled clean.

    ``rows`` are report rows as JSON (``check --json``; several reports may be concatenated). A tile is
    listed for (calibrated arch, kernel variant, matmul path, head-dim block) when every compiled row of
    it there passed (fp16 and bf16 share the "tc16" path; D = 80 and 128 share the 128 block) and is left
    out when any failed. Variants are ``attention_configs.tile_variant``'s (launches with feature flags
under their own "_features" variants, TMA tiles under "_tma" ones); the path is the launch's own
    (the launcher runs some fp32-tf32 launches in "ieee"). A tile is the tuple of an
    ``attention_configs.Tile``'s fields: ``(block_m, block_n, num_warps, num_stages, maxnreg)``.
    """
    verdict: dict = {}
    for r in rows:
        if r.get("result") is None:
            continue
        key = attention_key(r["arch"], r["kernel"], r["dtype"], r.get("constexprs"), r.get("options"))
        if key is None:
            continue
        # Known spills (a key with no clean tile under the report's Triton) are spills all the same.
        verdict[key] = verdict.get(key, True) and not r["failures"] and not r.get("known")
    table: dict = {}
    for (arch, variant, path, block_d, tile), clean in sorted(verdict.items(), key=lambda kv: repr(kv[0])):
        bucket = table.setdefault(arch, {}).setdefault(variant, {}).setdefault(path, {}).setdefault(block_d, [])
        if clean:
            bucket.append(tile)
    return table


def attention_key(arch: int, kernel: str, dtype: str, constexprs: dict | None, options: dict | None) -> tuple | None:
    """``(calibrated arch, variant, path, block_d, tile key)`` of an attention kernel's compile (None for other
    kernels): where ``CLEAN_TILES`` lists its tile. ``dtype`` is a key of ``targets.DTYPES``; the path is the
    launch's own (the launcher runs some fp32-tf32 launches in "ieee")."""
    variant_kernel = _VARIANT.get(kernel)
    if variant_kernel is None or constexprs is None:
        return None
    c, o = constexprs, options or {}
    variant = attention_configs.tile_variant(variant_kernel, c["HEAD_D"], c["HEAD_DV"], c.get("COMPUTE_DK", True),
                                             c.get("COMPUTE_DV", True), attention_configs.has_features(c),
                                             tma=bool(c.get("TMA")))
    path = matmul_path(DTYPES[dtype].nbytes, c.get("INPUT_PRECISION"))
    block_d = max(64, c["BLOCK_D"], c["BLOCK_DV"])
    tile = attention_configs.Tile(c["BLOCK_M"], c["BLOCK_N"], o["num_warps"], o["num_stages"],
                                  o.get("maxnreg"))
    return calibrated(arch), variant, path, block_d, tile.key()


def write_attention_tiles(table: dict, path: str, source: str) -> None:
    """Write ``table`` as the module kernels/attention_tiles.py (``CLEAN_TILES``)."""
    lines = ['"""Attention tiles that compiled clean in the AOT report: generated, do not edit by hand.',
             "",
             f"Source: {source}.",
             "Regenerate after a kernel change or a Triton upgrade (see bench/GPU.md):",
             *REGENERATE,
             "",
             "CLEAN_TILES[arch][variant][path][block_d]: (block_m, block_n, num_warps, num_stages, maxnreg) tuples",
             "(the fields of kernels.attention_configs.Tile) that compiled without spills, within shared memory",
             "and (16-bit and tf32 paths) with the architecture's tensor-core instructions for every launch of",
             "the report with that key.",
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
                    tiles = [tuple(t) for t in sorted(table[arch][variant][p][block_d], key=repr)]
                    body = ", ".join(repr(t) for t in tiles) + ("," if len(tiles) == 1 else "")
                    lines.append(f"                {block_d}: ({body}),")
                lines.append("            },")
            lines.append("        },")
        lines.append("    },")
    lines.append("}")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
