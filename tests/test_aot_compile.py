"""The AOT report's compiles: cuobjdump parsing, judging, real compiles of a fast subset for sm_80 and
sm_90 (a few seconds each), the command line, autotuner picks; the full report is ``slow``."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton

from gradkernels.aot import cases, check, cli, compiler, real, recorder, report, signature, targets, tiles
from gradkernels.kernels import linear_configs as LC

ROOT = Path(__file__).resolve().parents[1]


def _linear_rows(case, dtype):
    rows = check.build_rows((80, 90), dtypes=[dtype], cases=[case])
    return [r for r in rows if r.case == case]


# ---------------------------------------------------------------------------------------------------
# Parsing cuobjdump output
# ---------------------------------------------------------------------------------------------------

RES_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _linear_kernel:
  REG:206 STACK:16 SHARED:1024 LOCAL:0 CONSTANT[0]:616 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
        /*0190*/                   HGMMA.64x256x16.F32 R24, gdesc[UR4], RZ, !UPT ;
        /*01a0*/                   HGMMA.64x256x16.F32 R24, gdesc[UR8], R24 ;
        /*01b0*/              @!P0 STL.64 [R1+0x8], R2 ;
        /*01c0*/                   LDL R5, [R1+0x4] ;
        /*01d0*/                   FFMA R6, R7, R8, R6 ;
        /*01e0*/                   MOV R9, c[0x0][0x210] ;
"""


def test_parse_res_usage_and_count_sass():
    assert compiler.parse_res_usage(RES_USAGE) == {"regs": 206, "stack": 16, "static_shared": 1024, "local": 0}
    counts = compiler.count_sass(SASS)
    assert counts["HGMMA"] == 2 and counts["STL"] == 1 and counts["LDL"] == 1 and counts["FFMA"] == 1
    assert counts["HMMA"] == 0
    with pytest.raises(ValueError, match="REG"):
        compiler.parse_res_usage("no resource lines here")


def _fake_row(arch, result, needs_tc=True):
    job = signature.Job("m", "k", arch, (), (), (), (("num_warps", result.get("num_warps", 4)),))
    return check.Row(arch, "linear", "fwd", "fp16", "k", "cfg", False, job, needs_tc, result=result)


def test_judge_names_each_failure():
    base = {"regs": 128, "stack": 0, "local": 0, "static_shared": 0, "shared": 64 * 1024, "num_warps": 4,
            "error": None, "has_dot": True, "sass": dict.fromkeys(compiler.SASS_OPS, 0) | {"HGMMA": 4, "HMMA": 4}}
    assert check.judge(_fake_row(90, base)) == []
    spill = base | {"stack": 64, "sass": base["sass"] | {"STL": 3}}
    assert "spills" in check.judge(_fake_row(90, spill))[0]
    at_limit = base | {"shared": 226 * 1024, "static_shared": 1024}  # 227 KiB: the most one block may use
    assert check.judge(_fake_row(90, at_limit)) == []
    over = base | {"shared": 226 * 1024, "static_shared": 2048}
    assert "smem 228.0 KiB > 227 KiB" in check.judge(_fake_row(90, over))[0]
    assert "smem" in check.judge(_fake_row(80, base | {"shared": 164 * 1024}))[0], "A100: 163 KiB per block"
    no_tc = base | {"sass": base["sass"] | {"HGMMA": 0}}
    assert "no HGMMA" in check.judge(_fake_row(90, no_tc))[0]
    assert check.judge(_fake_row(90, no_tc, needs_tc=False)) == [], "fp32-ieee / fp64 may use FMA"
    assert check.judge(_fake_row(90, no_tc | {"has_dot": False})) == [], "no matmul, no tensor cores needed"
    assert check.judge(_fake_row(80, no_tc)) == [], "sm_80 wants HMMA, which is there"
    regs = base | {"regs": 255, "num_warps": 16}
    assert "regs 255" in check.judge(_fake_row(90, regs))[0]
    err = {"error": "CompilationError: boom", "seconds": 0.1}
    assert check.judge(_fake_row(90, err))[0].startswith("compile:")
    serial = base | {"wgmma_serialized": "ptxas info    : (C7515) Potential Performance Loss: ..."}
    assert check.judge(_fake_row(90, serial)) == ["wgmma serialised (ptxas C7515)"]
    assert check.judge(_fake_row(90, base | {"wgmma_serialized": None})) == []


def test_spills_of_a_key_with_no_clean_tile_under_this_triton_are_known_not_failing():
    """fp64 D = 256 dQ has no tile that compiles clean under Triton 3.6 (NO_CLEAN_TILE_UNDER): its spills are
    reported as known there, fail under 3.9 and under an unchecked 3.7; any other failure still fails; the
    tile table's writer counts a known spill as a spill; the summary and JSON carry them."""
    constexprs = (("HEAD_D", 256), ("HEAD_DV", 256), ("BLOCK_M", 16), ("BLOCK_N", 16), ("BLOCK_D", 256),
                  ("BLOCK_DV", 256), ("INPUT_PRECISION", "ieee"), ("IS_CAUSAL", True))
    options = (("num_warps", 8), ("num_stages", 2), ("maxnreg", 255))

    def row(arch, dtype="fp64", kernel="attn_bwd_dq_kernel", d=256):
        cx = tuple((k, d if k.startswith(("HEAD_D", "BLOCK_D")) else v) for k, v in constexprs)
        job = signature.Job("m", kernel, arch, (), cx, (), options)
        return check.Row(arch, "attention", "attn-bwd-d256-causal", dtype, kernel, "16x16 w8 s2 r255", False, job,
                         False)

    spill, smem = "spills (stack 144 B, 100 STL, 67 LDL)", "smem 240.0 KiB > 227 KiB"
    assert check.known_failures(row(90), [spill], release=(3, 6)) == ([], [spill])
    assert check.known_failures(row(86), [spill], release=(3, 6)) == ([], [spill]), "sm_86 uses the sm_80 table"
    assert check.known_failures(row(90), [spill, smem], release=(3, 6)) == ([smem], [spill])
    for release in ((3, 9), (3, 7)):
        assert check.known_failures(row(90), [spill], release=release) == ([spill], [])
    for other in (row(90, dtype="fp32-ieee"), row(90, d=128), row(90, kernel="attn_fwd_kernel")):
        assert check.known_failures(other, [spill], release=(3, 6)) == ([spill], []), other
    r = row(90)
    r.result = {"regs": 255, "stack": 144, "local": 0, "static_shared": 0, "shared": 1024, "num_warps": 8,
                "seconds": 1.0, "error": None, "has_dot": True, "sass": dict.fromkeys(compiler.SASS_OPS, 0)}
    r.failures, r.known = [], [spill]
    assert check.failing([r]) == [] and "1 more with known spills" in report.summary([r])
    data = report.rows_to_json([r])
    assert data[0]["known"] == [spill]
    assert tiles.attention_tile_table(data)[90]["dq"]["fma64"][256] == [], "a known spill is not clean"
    assert tiles.attention_tile_table([dict(data[0], known=[])])[90]["dq"]["fma64"][256] == [(16, 16, 8, 2, 255)]


C7515 = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to "
         "non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline "
         "stage in the function 'k'")


@pytest.mark.parametrize("note", [C7515, None])
def test_wgmma_serialized_reads_ptxas_note(note, tmp_path, monkeypatch):
    """The PTX goes to the ptxas Triton uses for the target, with -v and sm_90a; its C7515 line comes back
    (ptxas writes it to stderr, which Triton logs and deletes). A stand-in ptxas records its arguments."""
    log, out = tmp_path / "args", tmp_path / "stdout"
    out.write_text(f"{note}\n" if note else "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n")
    fake = tmp_path / "ptxas"
    fake.write_text(f'#!/bin/sh\necho "$@" > {log}\ncat {out} >&2\n'
                    "echo 'ptxas info    : Used 155 registers, used 1 barriers' >&2\n")
    fake.chmod(0o755)
    monkeypatch.setattr(compiler, "ptxas_for", lambda arch: str(fake))
    assert compiler.wgmma_serialized(".version 8.0", 90) == note
    args = log.read_text().split()
    assert "-v" in args and "--gpu-name=sm_90a" in args and args[-3].endswith(".ptx")


def test_wgmma_serialized_on_real_ptx():
    """A real case, with the real ptxas: the linear kernel's PTX from before its K loop was guarded against
    zero trips (main at 755332e; 128x256x64, 8 warps, 3 stages, TMA; fp16 4096^3; Triton 3.6 for sm_90a).
    ptxas 12.8 and ptxas-blackwell 13.4 both serialise its wgmma (C7515)."""
    import gzip

    ptx = gzip.decompress((ROOT / "tests" / "data" / "ptx" / "linear_kloop_serialized_sm90a.ptx.gz").read_bytes())
    note = compiler.wgmma_serialized(ptx.decode(), 90)
    assert note is not None and "C7515" in note, note


def test_ptxas_for_is_the_one_triton_assembles_with():
    from triton.backends.nvidia.compiler import get_ptxas

    for arch in (80, 90):
        assert compiler.ptxas_for(arch) == get_ptxas(arch).path
        assert os.path.exists(compiler.ptxas_for(arch))


# ---------------------------------------------------------------------------------------------------
# Real compiles (the fast subset of the report)
# ---------------------------------------------------------------------------------------------------


def test_fast_subset_compiles_clean_for_sm80_and_sm90():
    """Every config the autotuner may pick for a few representative launches, both architectures.

    The gelu epilogue in fp16 (register pressure), a tf32 dX with the gelu derivative (tf32 must use
    tensor cores), a bf16 split-K dW with the gelu derivative, row sums and the reduce kernel.
    """
    rows = (_linear_rows("fwd-gelu", "fp16") + _linear_rows("dx-gelu", "fp32-tf32")
            + _linear_rows("dw-gelu-split", "bf16"))
    # The biggest and the smallest pickable tile of each launch and arch: bounded time however many
    # configs the prune keeps.
    groups = {}
    for r in rows:
        if not r.pruned:
            groups.setdefault((r.case, r.dtype, r.arch, r.kernel), []).append(r)
    rows = [r for g in groups.values() for r in {id(x): x for x in (g[0], g[-1])}.values()]
    assert len(rows) >= 10, report.format_table(rows)
    check.compile_rows(rows, workers=2)
    table = report.format_table(rows)
    assert not check.failing(rows), table
    for r in rows:
        assert r.result["error"] is None and r.result["regs"] > 0, table
        if r.kernel == "linear_kernel":
            op = "HGMMA" if r.arch == 90 else "HMMA"
            assert r.result["sass"][op] > 0, f"{r.arch} {r.dtype}: no {op}\n{table}"


def test_keep_with_launch_flags_keeps_the_big_tiles_of_plain_matmuls():
    """keep(..., flags=...) (what the launcher can pass) keeps 128x256 tiles for a plain fp16 forward on
    sm_90 and sm_80 and drops them for the gelu epilogue; the tile it keeps compiles clean."""
    big = next(c for c in LC.get_linear_configs() if c.kwargs["BLOCK_N"] == 256 and not c.kwargs.get("TMA"))
    launch = _launch("fwd", "fp16")
    gelu = _launch("fwd-gelu", "fp16")
    flags = {k: v for k, v in launch.args.items() if k.isupper() and not k.startswith("BLOCK")}
    gelu_flags = {k: v for k, v in gelu.args.items() if k.isupper() and not k.startswith("BLOCK")}
    rows = []
    for arch in (80, 90):
        assert LC.keep(big, 2, arch, flags=flags)
        assert not LC.keep(big, 2, arch, flags=gelu_flags), "seen to spill with the gelu epilogue"
        assert not LC.keep(big, 2, arch), "unknown flags: must suit a gelu epilogue too"
        rows.append(check.Row(arch, "linear", "fwd", "fp16", "linear_kernel", check.config_label(big), False,
                            signature.make_job(launch, arch, big), True))
    check.compile_rows(rows, workers=2)
    assert not check.failing(rows), report.format_table(rows)


def _launch(case, dtype):
    c = next(c for c in cases.all_cases() if c.name == case)
    return next(ln for ln in recorder.record_launches(c, targets.DTYPES[dtype]) if ln.kernel == "linear_kernel")


def test_report_catches_spills_smem_overflow_missing_tensor_cores_and_compile_errors():
    """Configs built to break each rule: the report must flag every one (and not raise)."""
    launch = _launch("fwd-gelu", "fp16")

    def row(arch, cfg, needs_tc=True):
        return check.Row(arch, "linear", "fwd-gelu", "fp16", "linear_kernel", check.config_label(cfg), False,
                       signature.make_job(launch, arch, cfg), needs_tc)

    tile = {"GROUP_M": 8}
    rows = [
        # 128x256 fp32 accumulator over 256 threads is 128 registers alone: a 64-register cap must spill
        # (on sm_80: mma.sync takes small fragments; sm_90's wgmma would need all 128 in one instruction
        # and ptxas refuses to compile instead of spilling).
        row(80, triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, **tile}, num_warps=8, num_stages=3,
                              maxnreg=64)),
        # 6 stages of 256x64 + 64x128 fp16 tiles: ~240 KiB of pipeline buffers, over the A100's 163 KiB.
        row(80, triton.Config({"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, **tile}, num_warps=8, num_stages=6)),
        # 32-row tiles cannot use wgmma (64 rows per warpgroup): mma.sync on sm_90.
        row(90, triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, **tile}, num_warps=4, num_stages=3)),
        # BLOCK_K < 16 trips the kernel's static_assert.
        row(90, triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 8, **tile}, num_warps=4, num_stages=3)),
    ]
    check.compile_rows(rows, workers=2)
    table = report.format_table(rows)
    spill, smem, no_tc, bad = (r.failures for r in rows)
    assert any(f.startswith("spills") for f in spill), table
    assert any(f.startswith("smem") for f in smem), table
    assert any(f.startswith("no HGMMA") for f in no_tc), table
    assert rows[2].result["sass"]["HMMA"] > 0, "the fallback is mma.sync"
    assert bad and bad[0].startswith("compile:") and "CompileTimeAssertionFailure" in bad[0], table
    assert len(check.failing(rows)) == 4


def test_cli_runs_in_a_fresh_process_with_the_interpreter_set(tmp_path):
    """The workers must not inherit TRITON_INTERPRET (the test suite sets it); output and JSON agree."""
    out = tmp_path / "aot.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "gradkernels.aot", "--arch", "80", "--kernel", "split_reduce", "--dtype", "fp16",
         "--case", "fwd-gelu-split", "--json", str(out), "--jobs", "1"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "linear_split_reduce_kernel" in proc.stdout and "0 failing" in proc.stdout
    data = json.loads(out.read_text())
    assert data["archs"] == [80] and len(data["rows"]) == 1
    assert data["rows"][0]["result"]["error"] is None and data["rows"][0]["failures"] == []


def test_cli_rejects_bad_arguments(capsys):
    """Bad values exit with status 2 and name the argument, with or without the ``check`` subcommand."""
    for argv, msg in ((["--arch", "75"], "unsupported"), (["--arch", "x"], "integers"),
                      (["--dtype", "fp8"], "fp8"), (["--jobs", "0"], "--jobs"),
                      (["check", "--arch", "75"], "unsupported"), (["tiles", "--write", "x.py"], "--from"),
                      (["check", "--tiles-from", "a"], "unrecognized")):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_compare_real_needs_a_cuda_device(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: compare-real would launch (the GPU run's aot_real step)")
    with pytest.raises(SystemExit) as e:
        cli.main(["compare-real", "--kernel", "linear"])
    assert e.value.code == 2 and "--arch native needs a CUDA device" in capsys.readouterr().err


def test_tiles_subcommand_writes_the_table_from_json_reports(tmp_path, capsys):
    row = {"arch": 90, "kernel": "attn_fwd_kernel", "dtype": "bf16", "result": {"regs": 200}, "failures": [],
           "constexprs": {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 128, "BLOCK_DV": 128, "HEAD_D": 128,
                          "HEAD_DV": 128, "INPUT_PRECISION": "ieee"},
           "options": {"num_warps": 8, "num_stages": 3}}
    reports = []
    for i, failures in enumerate(([], ["spills"])):
        reports.append(tmp_path / f"r{i}.json")
        reports[-1].write_text(json.dumps({"versions": "triton x", "rows": [dict(row, failures=failures)]}))
    out = tmp_path / "tiles.py"
    assert cli.main(["tiles", "--from", str(reports[0]), "--write", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    ns = {}
    exec(out.read_text(), ns)
    assert ns["CLEAN_TILES"] == {90: {"fwd": {"tc16": {128: ((128, 64, 8, 3, None),)}}}}
    assert "Source: 1 report rows; triton x." in out.read_text()
    # A tile that failed in any of the reports is left out.
    assert cli.main(["tiles", "--from", f"{reports[0]},{reports[1]}", "--write", str(out)]) == 0
    ns = {}
    exec(out.read_text(), ns)
    assert ns["CLEAN_TILES"] == {90: {"fwd": {"tc16": {128: ()}}}}


# ---------------------------------------------------------------------------------------------------
# Autotuner picks (TRITON_PRINT_AUTOTUNING=1 output) against the report
# ---------------------------------------------------------------------------------------------------

AUTOTUNE_LOG = textwrap.dedent("""\
    some benchmark output
    Triton autotuning for function linear_kernel,
    with key as (2048, 4096, 1024, 1, 'torch.bfloat16', 'torch.bfloat16', 'torch.bfloat16'),
    finished after 2.31s,
    best config selected: BLOCK_M: 128, BLOCK_N: 256, BLOCK_K: 64, GROUP_M: 8, num_warps: 8, num_ctas: 1, num_stages: 3, maxnreg: None;
    Triton autotuning for function linear_kernel,
    with key as (64, 4096, 1024, 4, 'torch.float16', 'torch.float16'),
    finished after 1.02s,
    best config selected: BLOCK_M: 32, BLOCK_N: 64, BLOCK_K: 32, GROUP_M: 8, num_warps: 4, num_ctas: 1, num_stages: 3, maxnreg: None, ir_override: None;
    Triton autotuning for function _attn_fwd,
    with key as (128, 'torch.float16'),
    finished after 1.00s,
    best config selected: BLOCK_M: 128, BLOCK_N: 64, num_warps: 4, num_ctas: 1, num_stages: 3, maxnreg: None;
    """)


def test_autotune_log_picks_are_checked_against_the_report():
    picks = real.parse_autotune_log(AUTOTUNE_LOG)
    assert [(p["kernel"], p["dtype"], p["config"]) for p in picks] == [
        ("linear_kernel", "bfloat16", "128x256x64x8 w8 s3"),
        ("linear_kernel", "float16", "32x64x32x8 w4 s3"),
        ("_attn_fwd", "float16", "128x64 w4 s3"),
    ]
    ok = {"regs": 200, "stack": 0, "local": 0, "static_shared": 0, "shared": 1024, "num_warps": 8, "error": None,
          "has_dot": True,
          "sass": dict.fromkeys(compiler.SASS_OPS, 0) | {"HGMMA": 4}}
    no_tc = ok | {"num_warps": 4, "sass": dict.fromkeys(compiler.SASS_OPS, 0) | {"HMMA": 8}}
    rows = [
        check.Row(90, "linear", "fwd", "bf16", "linear_kernel", "128x256x64x8 w8 s3", False, None, True, ok),
        check.Row(90, "linear", "fwd", "fp16", "linear_kernel", "32x64x32x8 w4 s3", False, None, True, no_tc),
    ]
    for r in rows:
        r.job = signature.Job("m", r.kernel, 90, (), (), (), ())
        r.failures = check.judge(r)
    verdicts = [v for _, v in real.check_picks(picks, rows)]
    assert verdicts[0] == "ok"
    assert verdicts[1].startswith("FAIL") and "HGMMA" in verdicts[1]
    assert verdicts[2] == "not covered by the report"


# ---------------------------------------------------------------------------------------------------
# The full report (every kernel x config x dtype x case, sm_80 and sm_90)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["linear", "attention"])
def test_full_report_every_pickable_config_passes(family, capsys):
    """The whole report for one kernel family, sm_80 and sm_90 (linear: ~3 min on 2 cores; attention:
    ~10 min; CI runs the same as `make aot-check`). Fails, listing the rows, while a config the autotuner
    can pick spills, overflows shared memory or misses the tensor cores."""
    status = cli.main(["--arch", "80,90", "--kernel", family, "--failures-only"])
    out = capsys.readouterr().out
    assert status == 0, out[-20000:]
