"""The static performance report: the SASS parser on captured listings (no compile), the model, the
report's rows, and regressions against the committed report of the installed Triton (a few compiles in
the default suite, the whole comparison in the slow one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from gradkernels.aot import cli, perf, sass

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "sass"
COMMITTED = ROOT / "bench" / "results" / "static" / f"perf-triton-{triton.__version__}.json"


def _fixture(arch):
    return (FIXTURES / f"two_loops_sm{arch}.sass").read_text()


# ---------------------------------------------------------------------------------------------------
# The parser, on listings captured from tests/data/sass/regenerate.py's kernel
# ---------------------------------------------------------------------------------------------------


def test_parse_reads_addresses_predicates_opcodes():
    ins = sass.parse(_fixture(90))
    assert ins and all(b.addr > a.addr for a, b in zip(ins, ins[1:])), "address order"
    hgmma = [i for i in ins if i.base == "HGMMA"]
    assert hgmma and all(i.opcode.startswith("HGMMA.64x16x16.F32") for i in hgmma)
    guarded = [i for i in ins if i.pred]
    assert any(i.pred == "@!P0" and i.base == "BRA" for i in guarded)
    assert any(i.base == "MUFU.EX2" for i in ins), "MUFU keeps its function"
    assert sass.Instr(0, "LDGSTS.E.BYPASS.128").base == "LDGSTS"


@pytest.mark.parametrize("arch,op,shape,count", [(90, "HGMMA", "m64n16k16", 1), (80, "HMMA", "m16n8k16", 2)])
def test_two_loops_main_loop_is_the_unmasked_one(arch, op, shape, count):
    """The fixture kernel loops over full K blocks, then over the masked tail: two innermost loops with the
    same matmul work. The unmasked one is reported although it has more instructions (it computes full
    addresses where the masked one predicates its loads)."""
    ins = sass.parse(_fixture(arch))
    loops = sass.find_loops(ins)
    assert len(loops) == 2, "the BRA-to-itself trap after EXIT is not a loop"
    assert sass.innermost(loops) == loops
    main, candidates = sass.main_loop(ins)
    assert len(candidates) == 2
    first, second = candidates
    assert main is first, "the unmasked loop comes first in the kernel"
    assert second.mask_ops > first.mask_ops
    assert first.instructions > second.instructions, "fewest instructions alone would pick the masked loop"
    assert main.ops[op] == count and main.mma_counts == {shape: count} and main.mma_shapes == [shape]
    # 64x16x16 per iteration over 4 warps: 2*64*16*16 / 4 FLOPs per warp (HGMMA: the warpgroup's four
    # warps issue it together; HMMA: each warp its own 16x8x16).
    assert main.mma_flops_per_warp == 2 * 64 * 16 * 16 // 4
    assert main.mma_kinds == ["16bit"]
    assert main.global_loads == 10 and main.cp_async == 0 and main.tma == 0
    assert main.barriers >= 1 and main.mufu_ex2 == 0, "exp2 is in the epilogue, outside the loops"
    assert main.instructions == sum(main.ops.values())


def test_analyse_whole_kernel_facts():
    out = sass.analyse(_fixture(90))
    assert out["main"]["instructions"] > 0
    assert out["candidates"] == 2 and len(out["other_instructions"]) == 1
    assert out["loops"] == 2 and out["instructions"] > out["main"]["instructions"]
    assert out["tma"] is False and out["setmaxnreg"] is False and out["mbarrier"] is False
    assert json.loads(json.dumps(out)) == out, "JSON-able"


def test_labels_nested_loops_and_features():
    """nvdisasm-style labels, a loop nested in another (only the inner one is innermost), an FMA-only loop,
    TMA, mbarrier and setmaxnreg."""
    text = """
        /*0000*/                   USETMAXREG.DEALLOC.CTAPOOL.SYNC 0x28 ;
    .L_x_0:
        /*0010*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR4+0x8], R3 ;
        /*0020*/                   UTMALDG.2D [UR8], [UR6] ;
    .L_x_1:
        /*0030*/                   FFMA R4, R5, R6, R4 ;
        /*0040*/                   FFMA R7, R5, R6, R7 ;
        /*0050*/              @P1  BRA `(.L_x_1) ;
        /*0060*/                   NOP ;
        /*0070*/              @P2  BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
    .L_x_2:
        /*0090*/                   BRA `(.L_x_2);
    """
    ins = sass.parse(text)
    assert [i.base for i in ins][:3] == ["USETMAXREG", "SYNCS", "UTMALDG"]
    loops = sass.find_loops(ins)
    assert loops == [sass.Loop(0x10, 0x70), sass.Loop(0x30, 0x50)]
    assert sass.innermost(loops) == [sass.Loop(0x30, 0x50)]
    out = sass.analyse(text)
    assert out["main"]["fma"] == 2 and out["main"]["instructions"] == 3 and out["main"]["mma_shapes"] == []
    assert out["tma"] and out["mbarrier"] and out["setmaxnreg"]


@pytest.mark.parametrize("opcode,shape,flops,kind", [
    ("HGMMA.64x128x16.F32", (64, 128, 16), 2 * 64 * 128 * 16 // 4, "16bit"),
    ("HGMMA.64x64x8.F32.TF32", (64, 64, 8), 2 * 64 * 64 * 8 // 4, "tf32"),
    ("HGMMA.64x256x32.F32.E4M3.E4M3", (64, 256, 32), 2 * 64 * 256 * 32 // 4, "fp8"),
    ("HMMA.16816.F32.BF16", (16, 8, 16), 2 * 16 * 8 * 16, "16bit"),
    ("HMMA.1688.F32.TF32", (16, 8, 8), 2 * 16 * 8 * 8, "tf32"),
    ("DMMA.884", (8, 8, 4), 2 * 8 * 8 * 4, "fp64"),
    ("FFMA", None, 0, None),
])
def test_mma_shapes(opcode, shape, flops, kind):
    assert sass.mma_shape(opcode) == shape
    assert sass.mma_flops_per_warp_instr(opcode) == flops
    assert sass.mma_kind(opcode) == kind
    if shape:
        assert sass.shape_label(opcode) == f"m{shape[0]}n{shape[1]}k{shape[2]}"


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


def _loop(instructions, flops=0, kind="16bit", ex2=0, ops=None):
    return {"instructions": instructions, "mma_flops_per_warp": flops, "mma_kinds": [kind] if flops else [],
            "mufu_ex2": ex2, "ops": ops or {}}


def test_estimate_issue_tensor_and_mufu_bounds():
    # One wgmma 64x256x16 per warp of 4 warps (one warpgroup): 2*64*256*16 = 524288 FLOPs per iteration,
    # 128 cycles at 4096 FLOP/cycle (sm_90); 128 instructions x 4 warps / 4 schedulers = 128 cycles.
    flops = 2 * 64 * 256 * 16 // 4
    est = perf.estimate(_loop(128, flops), 4, 90)
    assert est["compute_cycles"] == 128 and est["issue_cycles"] == 128 and est["bound"] == 1.0
    assert perf.estimate(_loop(256, flops), 4, 90)["bound"] == 0.5, "issue bound: twice the instructions"
    assert perf.estimate(_loop(128, flops), 4, 80)["bound"] == 1.0, "sm_80: half the rate, twice the cycles"
    # 32 MUFU.EX2 per warp x 4 warps x 32 lanes / 16 per cycle = 256 cycles: MUFU bound at 0.5.
    assert perf.estimate(_loop(128, flops, ex2=32), 4, 90)["bound"] == 0.5
    tf32 = perf.estimate(_loop(128, flops, kind="tf32"), 4, 90)
    assert tf32["compute_cycles"] == 256 and tf32["bound"] == 1.0
    fma = perf.estimate(_loop(64, ops={"FFMA": 32}), 4, 80)
    assert fma["unit"] == "ffma" and fma["compute_cycles"] == 64 and fma["bound"] == 1.0
    assert perf.estimate(_loop(10), 4, 90)["bound"] is None


def test_ctas_per_sm():
    assert perf.ctas_per_sm(255, 64 * 1024, 8, 90) == 1, "registers: 256 x 256 threads = one block"
    assert perf.ctas_per_sm(128, 100 * 1024, 4, 90) == 2, "shared memory: 228 KiB / 100 KiB"
    assert perf.ctas_per_sm(32, 1024, 4, 80) == 16, "warps: 64 / 4"


# ---------------------------------------------------------------------------------------------------
# The report's rows (real compiles, a handful)
# ---------------------------------------------------------------------------------------------------


def _rows(kernel, case, dtype, arch, picked_only=True):
    rows = perf.build_perf_rows((arch,), kernels=[kernel], dtypes=[dtype], cases=[case])
    rows = [r for r in rows if r.kernel == kernel]
    assert rows, (kernel, case, dtype, arch)
    return rows


def _main_launch_rows():
    """The largest kept tile of each main launch at D = 128 fp16 and linear 4096^3 fp16, sm_90, and the
    attention forward on sm_80: the configs a GPU autotuner most likely picks (the picked flag needs every
    kept config compiled; rank 0 is the largest of prune()'s order)."""
    specs = [("attn_fwd", "perf-attn-d128-causal-fwd", 90), ("attn_dkdv", "perf-attn-d128-causal-bwd", 90),
             ("attn_dkdv", "perf-attn-d128-full-bwd", 90), ("attn_dq", "perf-attn-d128-causal-bwd", 90),
             ("linear_fwd", "perf-linear-4096-fwd", 90), ("attn_fwd", "perf-attn-d128-causal-fwd", 80)]
    out = []
    for kernel, case, arch in specs:
        rows = sorted(_rows(kernel, case, "fp16", arch), key=lambda r: perf._area(r.config), reverse=True)
        out.append(rows[0])
    return out


@pytest.fixture(scope="module")
def main_rows():
    rows = _main_launch_rows()
    perf.compile_perf_rows(rows, workers=2)
    return [perf.row_record(r, triton.__version__) for r in rows]


def test_rows_carry_the_named_fields(main_rows):
    for rec in main_rows:
        for field in ("kernel", "arch", "triton", "dtype", "config", "picked", "regs", "spill_bytes", "smem_bytes",
                      "mma_shapes", "loop_instructions", "elements_per_thread", "instructions_per_element", "tma",
                      "warp_specialized", "wgmma_serialized", "mufu_ex2", "loop_barriers", "model", "programs"):
            assert field in rec, (field, rec["kernel"])
        assert rec["error"] if "error" in rec else rec["regs"] > 0
        assert rec["loop_instructions"] > 0 and rec["mma_shapes"], rec
        # Recorded to 2 decimals (attention) or 4 (linear's per-FLOP figure): half a unit of the last one.
        assert rec["instructions_per_element"] == pytest.approx(
            rec["loop_instructions"] / rec["elements_per_thread"], rel=1e-3, abs=5e-5)
        bm, bn, w = rec["block_m"], rec["block_n"], rec["num_warps"]
        if rec["kernel"].startswith("attn"):
            assert rec["elements_per_thread"] == bm * bn / (32 * w) and rec["head_dim"] == 128
            assert rec["causal"] == ("causal" in rec["case"])
            # The main loop does the loop's two matmuls of a score tile (QK^T and PV, or three in dQ ...):
            # its tensor-core FLOPs per warp are a whole multiple of one score tile's 2 * D FLOPs per element.
            per_tile = 2 * bm * bn * 128 / w
            assert rec["mma_flops_per_warp"] % per_tile == 0 and rec["mma_flops_per_warp"] >= 2 * per_tile, rec
        else:
            bk = rec["block_k"]
            assert rec["elements_per_thread"] == 2 * bm * bn * bk / (32 * w)
            assert rec["m"] == rec["n"] == rec["k"] == 4096
            assert rec["mma_flops_per_warp"] == 2 * bm * bn * bk // w, "one K-step of MMA per iteration"
        op_shape = rec["mma_shapes"][0]
        assert op_shape.startswith("m64") if rec["arch"] == 90 else op_shape == "m16n8k16", rec["mma_shapes"]
        assert 0 < rec["model"]["bound"] <= 1
        # ptxas did not serialise the wgmma (the non-causal dK/dV loop was, before its zero-trip guard:
        # 40 WARPGROUP per iteration instead of 6; the linear loop under Triton 3.6 too).
        assert rec["wgmma_serialized"] is False, rec["kernel"]
        if rec["arch"] == 90:
            assert rec["loop_ops"].get("WARPGROUP", 0) < rec["loop_ops"]["HGMMA"], rec["loop_ops"]


@pytest.mark.parametrize("lq", [1, 16])
def test_decode_rows_show_programs_and_kv_bytes_against_the_forward_kernel(lq, monkeypatch):
    """The decoding launch of the perf catalogue (8 sequences, 32 query heads on 8 kv heads, 4096 keys,
    D = 128, fp16): the query heads of a kv head share its K/V reads (4x fewer bytes than the forward
    kernel, which reads them once per query head; 2x at 16 positions, whose 64 packed rows take two
    32-row blocks), and the key splits launch at least one program per SM.
    Recorded launches only (nothing compiled)."""
    from gradkernels.kernels import attention_configs

    case = f"perf-attn-decode{lq}-d128-fwd"
    (dec,) = _rows("attn_decode", case, "fp16", 90)
    programs = perf._programs(dec.launch, dec.config)
    a = dec.launch.args
    row_blocks = -(-a["ROWS"] // dec.config.kwargs["BLOCK_M"])
    assert a["ROWS"] == 4 * lq and dec.config.kwargs["BLOCK_M"] == max(16, min(32, 4 * lq))
    assert programs == 8 * 8 * row_blocks * a["NUM_SPLITS"] and programs >= perf.machine(90).sms
    assert perf.kv_bytes(dec, programs) == 8 * 8 * row_blocks * 4096 * 256 * 2
    monkeypatch.setattr(attention_configs, "DECODE_MAX_LQ", 0)  # the forward kernel instead
    fwd = _rows("attn_fwd", case, "fp16", 90, picked_only=False)
    for r in fwd:
        assert perf.kv_bytes(r, perf._programs(r.launch, r.config)) * row_blocks == 4 * perf.kv_bytes(dec, programs)


def _committed():
    if not COMMITTED.exists():
        pytest.skip(f"no committed static report for Triton {triton.__version__} ({COMMITTED.name}): "
                    "generate one with `python -m gradkernels.aot perf --json ...` (bench/GPU.md)")
    return json.loads(COMMITTED.read_text())


def test_main_launches_do_not_regress_against_the_committed_report(main_rows):
    """The largest kept config of each main launch: no more loop instructions per element, registers or
    spilled bytes than the committed report records for this Triton."""
    data = _committed()
    worse, compared = perf.regressions(main_rows, data["rows"])
    if compared == 0:
        pytest.skip(f"{COMMITTED.name} has none of these rows (tiles changed since it was written): regenerate it")
    assert not worse, "\n".join(worse)


def test_regressions_flags_each_field():
    base = {"arch": 90, "kernel": "attn_fwd", "case": "c", "dtype": "fp16", "config": "128x64 w8 s3",
            "instructions_per_element": 10.0, "regs": 200, "spill_bytes": 0, "wgmma_serialized": False}
    same = dict(base)
    assert perf.regressions([same], [base]) == ([], 1)
    assert perf.regressions([dict(base, instructions_per_element=9.5, regs=190)], [base]) == ([], 1)
    worse, _ = perf.regressions([dict(base, instructions_per_element=10.5, regs=201, spill_bytes=8,
                                      wgmma_serialized=True)], [base])
    assert len(worse) == 4 and "instructions_per_element 10.0 -> 10.5" in worse[0]
    assert "wgmma_serialized False -> True" in worse[3]
    # A report written before the field existed compares the other fields only.
    old = {k: v for k, v in base.items() if k != "wgmma_serialized"}
    assert perf.regressions([dict(base, wgmma_serialized=True)], [old]) == ([], 1)
    assert perf.regressions([dict(base, config="other")], [base]) == ([], 0)
    failed, _ = perf.regressions([dict(base, error="CompilationError")], [base])
    assert failed and "compile fails" in failed[0]


def test_perf_cli_json_and_compare(tmp_path):
    """A fresh process (the suite sets TRITON_INTERPRET): one config of a decode-sized linear forward, JSON
    out, then compared with a doctored copy of itself (fewer registers recorded: a regression, exit 1)."""
    out = tmp_path / "perf.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    args = [sys.executable, "-m", "gradkernels.aot", "perf", "--arch", "90", "--kernel", "linear_fwd", "--dtype",
            "fp16", "--case", "perf-linear-m16-fwd", "--config", "64x16x128x8 w4 s4", "--jobs", "1"]
    proc = subprocess.run(args + ["--json", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["triton"] == triton.__version__ and data["archs"] == [90] and data["model"]["90"]["sms"] == 132
    rows = data["rows"]
    # 16 tokens run swapped: the 4096 features in the kernel's rows, the tokens in its 16 columns.
    assert len(rows) == 1 and rows[0]["kernel"] == "linear_fwd" and (rows[0]["m"], rows[0]["n"]) == (4096, 16)
    assert rows[0]["config"] == "64x16x128x8 w4 s4" and rows[0]["picked"], "picked among the compiled configs"
    assert rows[0]["split_k"] > 1, "64 output tiles cannot fill the GPU: the launcher splits K"
    assert rows[0]["useful_rows"] == 1.0 and rows[0]["programs"] == 64 * rows[0]["split_k"]
    doctored = dict(data, rows=[dict(r, regs=r["regs"] - 1) for r in rows])
    worse_file = tmp_path / "recorded.json"
    worse_file.write_text(json.dumps(doctored))
    proc = subprocess.run(args + ["--compare", str(worse_file)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 1 and "REGRESSION" in proc.stdout, proc.stdout + proc.stderr


def test_perf_cli_rejects_bad_arguments(capsys):
    for argv, msg in ((["perf", "--arch", "75"], "unsupported"), (["perf", "--dtype", "fp8"], "fp8")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.slow
def test_whole_report_does_not_regress(tmp_path):
    """Every row of the committed report for this Triton, recompiled (~1 h on 2 cores)."""
    data = _committed()
    status = cli.main(["perf", "--arch", ",".join(map(str, data["archs"])), "--compare", str(COMMITTED),
                       "--json", str(tmp_path / "fresh.json")])
    assert status == 0


@pytest.mark.slow
def test_aot_check_under_the_gpu_machines_triton():
    """`make aot-check-triton36`: the clean-compile check under Triton 3.6 (the H100/H200 machines'), from
    the second environment the Makefile builds (~15-25 min on 2 cores)."""
    python = ROOT / ".venv-triton36" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-triton36: `make aot-check-triton36` builds it (bench/GPU.md)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([str(python), "-m", "gradkernels.aot", "check", "--failures-only"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=4 * 3600)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-2000:]
