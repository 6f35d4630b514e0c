"""bench/gpu_run.sh (`make gpu`): what can be checked without a GPU (arguments, refusals, the steps with a
stand-in GPU and Python, shellcheck)."""

import os
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_RUN = ROOT / "bench" / "gpu_run.sh"


def _script(path, body):
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _run_gpu_script(args, env_extra=None, timeout=60):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(["bash", str(GPU_RUN), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def test_gpu_run_argument_errors():
    for args, msg in (([], "OUTDIR missing"), (["a", "b"], "one OUTDIR expected"), (["--bogus", "a"], "unknown")):
        proc = _run_gpu_script(args)
        assert proc.returncode == 2, proc.stderr
        assert msg in proc.stderr and "usage:" in proc.stderr


def test_gpu_run_refuses_without_a_gpu(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    _script(bindir / "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9\n")
    out = tmp_path / "out"
    proc = _run_gpu_script([str(out)], {"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert proc.returncode == 3
    assert "no NVIDIA GPU" in proc.stderr
    assert not out.exists(), "nothing is written when the run cannot start"
    # A GPU but a Python without CUDA: refused as well, naming the interpreter.
    _script(bindir / "nvidia-smi", "echo 'GPU 0: fake'\n")
    _script(bindir / "nocuda-python", "exit 1\n")
    proc = _run_gpu_script([str(out)], {"PATH": f"{bindir}:{os.environ['PATH']}",
                                        "PYTHON": str(bindir / "nocuda-python")})
    assert proc.returncode == 3 and "nocuda-python cannot use CUDA" in proc.stderr


def test_gpu_run_steps_limits_and_summary_with_a_fake_gpu(tmp_path):
    """Every step runs with the expected command; a step past the deadline is stopped; summary last."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "calls.log"
    _script(bindir / "nvidia-smi", "echo 'GPU 0: Fake H100'\n")
    _script(bindir / "fakepy", f"""\
        echo "$*" >> {calls}
        case "$*" in
          *"-m pytest"*"not slow"*) echo "7 passed in 1.00s" ;;
          *"-m pytest"*"-m slow"*) sleep 30; echo "never printed" ;;
          *"gradkernels.bench"*) out="${{@: -1}}"; mkdir -p "$out"; echo x > "$out/linear.json";
                                 echo "Triton autotuning for function linear_kernel," ;;
          *"gradkernels.aot"*) echo "3 rows compiled (3 distinct compiles), 0 pruned by keep(), 0 failing, 1 s" ;;
        esac
        exit 0
        """)
    out = tmp_path / "out dir"  # a space in the path must not break anything
    proc = _run_gpu_script([str(out)], {"PATH": f"{bindir}:{os.environ['PATH']}", "PYTHON": str(bindir / "fakepy"),
                                        "GPU_RUN_BUDGET_S": "8"}, timeout=60)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # tests_slow timed out
    lines = proc.stdout.rstrip().splitlines()
    table = lines[-10:]
    assert table[0].startswith("gradkernels GPU run:") and "Fake H100" in table[0]
    status = {ln.split()[0]: ln.split()[1] for ln in table[3:]}
    assert status == {"env": "ok", "install": "ok", "tests": "ok", "bench": "ok", "aot": "ok", "aot_real": "ok",
                      "tests_slow": "TIMEOUT"}, "\n".join(table)
    assert "7 passed" in table[5]
    log = calls.read_text()
    assert "-m pip install --no-build-isolation --no-deps -e ." in log
    assert "-m pytest -n 4 -q -m not slow" in log
    assert f"-m gradkernels.bench all --quick --out {out}/bench" in log
    assert (f"-m gradkernels.aot check --arch native --failures-only --json {out}/aot.json "
            f"--autotune-log {out}/bench.log") in log
    assert "-m gradkernels.aot compare-real --arch native --kernel linear" in log
    for name in ("env", "install", "tests", "bench", "aot", "aot_real", "tests_slow", "summary"):
        assert (out / (name + (".txt" if name == "summary" else ".log"))).exists(), name
    assert (out / "summary.txt").read_text().strip().splitlines()[-1] == table[-1]


def test_gpu_run_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    proc = subprocess.run(["shellcheck", str(GPU_RUN)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
