"""The attention tile table: what the AOT report's tile writer makes of report rows, and that it
reproduces the checked-in, generated kernels/attention_tiles.py from its own table."""

import re
from pathlib import Path

from gradkernels.aot import tiles
from gradkernels.kernels import attention_tiles


def test_attention_tile_table_lists_tiles_clean_in_every_launch(tmp_path):
    """The generator of kernels/attention_tiles.py: a tile is listed for (arch, variant, path, head-dim
    block) only when every row of it there passed (fp16 and bf16 share a path, D = 80 and 128 a block);
    single-accumulator dK/dV launches get their own variant; the written module reads back equal."""
    def row(arch, kernel, dtype, bd, tile, failures=(), **flags):
        bm, bn, w, s, *mx = tile
        return {"arch": arch, "kernel": kernel, "dtype": dtype, "result": {"regs": 1}, "failures": list(failures),
                "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "BLOCK_DV": bd, "HEAD_D": bd,
                               "HEAD_DV": bd, **flags},
                "options": {"num_warps": w, "num_stages": s, **({"maxnreg": mx[0]} if mx else {})}}

    fwd, dkdv = "attn_fwd_kernel", "attn_bwd_dkdv_kernel"
    rows = [row(90, fwd, "fp16", 128, (128, 64, 8, 3)), row(90, fwd, "bf16", 128, (128, 64, 8, 3)),
            row(90, fwd, "fp16", 128, (64, 64, 4, 3)), row(90, fwd, "bf16", 128, (64, 64, 4, 3), ["spills"]),
            row(86, fwd, "fp64", 32, (16, 16, 8, 1, 255)),
            row(80, dkdv, "fp32-ieee", 256, (16, 64, 8, 2), COMPUTE_DK=False, COMPUTE_DV=True, INPUT_PRECISION="ieee"),
            row(80, dkdv, "fp32-tf32", 64, (32, 64, 4, 3), COMPUTE_DK=True, COMPUTE_DV=True, INPUT_PRECISION="tf32"),
            # A fp32-tf32 launch the launcher runs in "ieee": FMA code, listed under that path.
            row(90, dkdv, "fp32-tf32", 256, (16, 32, 8, 2), COMPUTE_DK=True, COMPUTE_DV=False, INPUT_PRECISION="ieee"),
            row(90, dkdv, "fp32-tf32", 256, (16, 64, 8, 2), ["spills"], COMPUTE_DK=True, COMPUTE_DV=False,
                INPUT_PRECISION="ieee"),
            # Launches with feature flags: their own variant; their spills leave the plain list alone.
            row(90, fwd, "fp16", 128, (128, 64, 8, 3), ["spills"], HAS_DROPOUT=True, IS_VARLEN=True),
            row(90, fwd, "fp16", 128, (64, 64, 4, 3), HAS_SOFTCAP=True),
            {"arch": 90, "kernel": "attn_bwd_preprocess_kernel", "dtype": "fp16", "result": {}, "failures": [],
             "constexprs": {"BLOCK_M": 64}, "options": {"num_warps": 4}}]
    table = tiles.attention_tile_table(rows)
    assert table[90]["fwd"]["tc16"][128] == [(128, 64, 8, 3, None)]
    assert table[90]["fwd_features"]["tc16"][128] == [(64, 64, 4, 3, None)]
    assert table[80]["fwd"]["fma64"][64] == [(16, 16, 8, 1, 255)]
    assert table[80]["dkdv_dv"]["fma32"][256] == [(16, 64, 8, 2, None)]
    assert table[80]["dkdv"]["tc32"][64] == [(32, 64, 4, 3, None)]
    assert table[90]["dkdv_dk"]["fma32"][256] == [(16, 32, 8, 2, None)] and "tc32" not in table[90]["dkdv_dk"]
    path = tmp_path / "tiles.py"
    tiles.write_attention_tiles(table, str(path), "a test")
    ns = {}
    exec(path.read_text(), ns)
    assert ns["CLEAN_TILES"][90]["fwd"]["tc16"][128] == ((128, 64, 8, 3, None),)
    assert ns["CLEAN_TILES"][80]["dkdv"]["tc32"][64] == ((32, 64, 4, 3, None),)
    assert "do not edit by hand" in path.read_text()




def test_generator_reproduces_the_checked_in_table(tmp_path):
    """kernels/attention_tiles.py is what the writer makes of its own CLEAN_TILES (same source line): the
    generated format is the one keep() reads, and the file has not been edited by hand."""
    checked_in = Path(attention_tiles.__file__).read_text()
    source = re.search(r"^Source: (.*)\.$", checked_in, re.MULTILINE).group(1)
    path = tmp_path / "attention_tiles.py"
    tiles.write_attention_tiles(attention_tiles.CLEAN_TILES, str(path), source)
    assert path.read_text() == checked_in
