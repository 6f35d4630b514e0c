"""The benchmark harness and CLI.

The CLI runs for real once (``all --quick`` on the CPU, as ``make bench`` does on a machine
without a GPU); the other tests drive the harness with small stand-in providers. Nothing here asserts
a speed: timings are shown by the benchmark, never tested.
"""

import os
import subprocess
import sys

import pytest
import torch

from gradkernels.bench import harness, main, memory, report
from gradkernels.bench import attention as attn_suite
from gradkernels.bench import linear as linear_suite
from gradkernels.bench.flops import attention_flops, linear_flops

from utils import ON_GPU

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------------
# The CLI, end to end, on the CPU
# ----------------------------------------------------------------------------------------------------


def test_cli_quick_on_cpu(tmp_path):
    """``python -m gradkernels.bench all --quick`` in a fresh process with no GPU visible and no
    TRITON_INTERPRET (the CLI must switch the interpreter on by itself, as under ``make bench``).

    One run, several properties (running the CLI once per property would cost the suite its time).
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-m", "gradkernels.bench", "all", "--quick", "--no-progress", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = report.read_csv(tmp_path / "results.csv")
    _outputs_are_complete(proc, tmp_path, rows)
    _a_row_for_every_provider(rows)
    _kernels_pass_their_checks(rows)
    _saved_bytes_equal_the_model(rows)
    _naive_over_gradkernels_grows_with_length(rows)
    _features_suite_checks_and_packed_memory(rows)


def _outputs_are_complete(proc, out, rows):
    for name in ("results.csv", "table.txt", "meta.json"):
        assert (out / name).is_file(), name
    assert "timings need a GPU" in proc.stdout
    assert rows, "empty CSV"
    # No interpreter timing is ever presented as performance.
    assert all(r["ms_p50"] == "" and r["tflops"] == "" for r in rows)
    for r in rows:
        for key in ("gpu", "torch", "triton", "date", "device", "status"):
            assert r[key], (key, r)
        assert r["torch"] == torch.__version__


def _a_row_for_every_provider(rows):
    for suite, registry in (("linear", linear_suite.REGISTRY), ("attention", attn_suite.REGISTRY)):
        seen = {r["provider"] for r in rows if r["suite"] == suite and r["mode"] == "check"}
        assert seen == {p.name for p in registry.providers}, suite
    saved = {(r["case"], r["provider"]) for r in rows if r["mode"] == "saved"}
    assert {p for c, p in saved if c == "saved-attention"} == set(memory.SAVED_ATTENTION_PROVIDERS)
    assert {p for c, p in saved if c.startswith("saved-linear")} == set(memory.SAVED_LINEAR_PROVIDERS)


def _kernels_pass_their_checks(rows):
    kernels = [r for r in rows if r["mode"] == "check" and r["provider"] == "gradkernels"]
    assert {r["suite"] for r in kernels} == {"linear", "attention"}
    for r in kernels:
        assert r["status"] == "ok", r
        assert float(r["max_err"]) <= float(r["err_bound"])
        assert float(r["grad_err"]) <= float(r["grad_err_bound"])


def _saved_bytes_equal_the_model(rows):
    saved = [r for r in rows if r["mode"] == "saved" and r["suite"] == "memory"]
    assert len(saved) >= 2 * 3 + 3 * 3 * 2
    for r in saved:
        assert r["status"] == "ok", r
        assert int(r["saved_bytes"]) == int(r["model_saved_bytes"]), r
        assert int(r["saved_param_bytes"]) == int(r["model_param_bytes"]), r


def _features_suite_checks_and_packed_memory(rows):
    """The features suite: gradkernels' varlen and window calls pass the rule; the packed path saves
    exactly its model and less than the padded one."""
    kernels = {(r["suite"], r["causal"]): r for r in rows if r["mode"] == "check" and r["provider"].startswith(
        "gradkernels-")}
    assert {s for s, _ in kernels} == {"varlen", "window"}
    for r in kernels.values():
        assert r["status"] == "ok", r
    saved = [r for r in rows if r["suite"] == "varlen" and r["mode"] == "saved"]
    by_case = {}
    for r in saved:
        by_case.setdefault(r["tokens"], {})[r["provider"]] = r
    assert len(by_case) >= 2
    for providers in by_case.values():
        packed, padded = providers["gradkernels-varlen"], providers["sdpa-padded"]
        assert packed["status"] == "ok" and int(packed["saved_bytes"]) == int(packed["model_saved_bytes"])
        assert int(padded["saved_bytes"]) > int(packed["saved_bytes"])


def _naive_over_gradkernels_grows_with_length(rows):
    by = {}
    for r in rows:
        if r["case"] == "saved-attention":
            by.setdefault(int(r["Lq"]), {})[r["provider"]] = int(r["saved_bytes"])
    lens = sorted(by)
    assert len(lens) >= 3
    ratios = [by[n]["naive"] / by[n]["gradkernels"] for n in lens]
    assert all(b > a for a, b in zip(ratios, ratios[1:])), ratios
    assert ratios[-1] > 1


# ----------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------


def test_flop_formulas_follow_the_conventions():
    b, h, lq, lk, d = 2, 3, 37, 97, 40
    fwd = attention_flops(b, h, lq, lk, d)
    assert fwd == 2 * (2 * b * h * lq * lk * d)  # Q K^T and P V
    assert attention_flops(b, h, lq, lk, d, causal=True) == fwd / 2
    assert attention_flops(b, h, lq, lk, d, mode="bwd") == 2.5 * fwd
    assert attention_flops(b, h, lq, lk, d, mode="fwd+bwd") == 3.5 * fwd
    assert linear_flops(5, 7, 11) == 2 * 5 * 7 * 11
    assert linear_flops(5, 7, 11, "bwd") == 2 * linear_flops(5, 7, 11)
    with pytest.raises(ValueError, match="mode"):
        linear_flops(1, 1, 1, "backward")


def test_measure_saved_counts_each_storage_once_and_splits_params():
    x = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)

    def forward():
        y = x * x  # saves x twice: one storage
        return (y[:, :3] * w[0, :3]).sum() + (x[:5] @ w).sum()  # a view of w, a view of x

    saved = memory.measure_saved(forward, params=[w])
    # y (created), x (input, views count at their storage's full size), w (param).
    assert saved.activation_bytes == (37 * 8 + 37 * 8) * 8
    assert saved.param_bytes == 8 * 8 * 8


@pytest.mark.parametrize("frozen_w", [False, True])
def test_linear_saved_model_matches_torch(frozen_w):
    """The model of torch's own saves (F.linear + F.gelu), on torch itself (no kernel involved)."""
    case = linear_suite.LinearCase("t", 37, 13, 21, True, "gelu", torch.float32)
    inputs = case.make_inputs("cpu")
    if frozen_w:
        inputs["weight"].requires_grad_(False)
    provider = next(p for p in linear_suite.REGISTRY.providers if p.name == "torch")
    saved = memory.measure_saved(lambda: provider.fn(case, inputs), [inputs["weight"], inputs["bias"]])
    model = memory.linear_saved_model("torch", case, w_grad=not frozen_w)
    assert (saved.activation_bytes, saved.param_bytes) == model


def test_attention_saved_model_of_naive_is_quadratic():
    case = attn_suite.AttentionCase("t", 2, 3, 37, 16, False, torch.float32)
    provider = next(p for p in attn_suite.REGISTRY.providers if p.name == "naive")
    saved = memory.measure_saved(lambda: provider.fn(case, case.make_inputs("cpu")))
    assert (saved.activation_bytes, saved.param_bytes) == memory.attention_saved_model("naive", case)
    assert saved.activation_bytes == (3 * 2 * 3 * 37 * 16 + 2 * 3 * 37 * 37) * 4


def _toy_registry(calls):
    reg = harness.Registry("toy")

    @reg.register("base", baseline=True)
    def _base(case, inputs):
        calls.append("base")
        return inputs["x"] * 2

    @reg.register("fast")
    def _fast(case, inputs):
        calls.append("fast")
        return inputs["x"] * 2

    @reg.register("missing")
    def _missing(case, inputs):
        raise harness.Unavailable("not built here")

    @reg.register("broken")
    def _broken(case, inputs):
        raise RuntimeError("boom\nsecond line")

    @reg.register("hungry")
    def _hungry(case, inputs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    return reg


def test_run_timing_reports_every_outcome_and_the_speedup(monkeypatch):
    calls = []
    reg = _toy_registry(calls)
    times = {"base": 2.0, "fast": 0.5}

    def stand_in(fn, grad_to_none, opts):  # runs the work, reports a fixed time per provider
        fn()
        name = calls[-1]
        return times[name], times[name] * 0.9, times[name] * 1.1

    monkeypatch.setattr(harness, "time_ms", stand_in)
    case = linear_suite.LinearCase("toy", 4, 4, 4, False, None, torch.float32)
    case_inputs = {"x": torch.randn(5, 3, requires_grad=True)}
    monkeypatch.setattr(linear_suite.LinearCase, "make_inputs", lambda self, device: case_inputs)
    rows = harness.run_timing("toy", [case], reg.providers, ("fwd", "bwd", "fwd+bwd"), "cpu",
                              harness.TimingOptions())
    assert len(rows) == 5 * 3
    status = {(r.provider, r.mode): r.status for r in rows}
    assert status[("missing", "bwd")] == "unavailable: not built here"
    assert status[("broken", "fwd")] == "failed: RuntimeError: boom"
    assert status[("hungry", "fwd+bwd")] == "oom"
    fast = {r.mode: r for r in rows if r.provider == "fast"}
    for mode, r in fast.items():
        assert r.status == "ok"
        assert r.speedup_vs_baseline == pytest.approx(4.0)
        assert r.tflops == pytest.approx(linear_flops(4, 4, 4, mode) / 0.5e-3 / 1e12)
    assert [r.baseline for r in rows if r.provider == "base"] == [True] * 3
    assert case_inputs["x"].grad is None  # gradients cleared between providers


def test_run_check_fails_a_wrong_kernel_and_passes_a_right_one():
    reg = harness.Registry("toy")
    case = linear_suite.LinearCase("check", 37, 29, 45, True, "gelu", torch.float32)
    torch_fn = next(p for p in linear_suite.REGISTRY.providers if p.name == "torch").fn
    reg.register("torch", baseline=True)(torch_fn)
    reg.register("upcast", kernel=True)(lambda c, i: c.reference({k: (v.double() if v is not None else v)
                                                                  for k, v in i.items()}).float())
    reg.register("off", kernel=True)(lambda c, i: torch_fn(c, i) * (1 + 1e-4))
    rows = {r.provider: r for r in harness.run_check("toy", [case], reg.providers, "cpu")}
    assert rows["torch"].status == "ok (oracle)"
    assert rows["upcast"].status == "ok", rows["upcast"]
    assert rows["off"].status.startswith("failed: output: error"), rows["off"]
    assert rows["off"].max_err > rows["off"].err_bound


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "int8"], "--dtype"),
    (["linear", "--shapes", "4x4"], "MxNxK"),
    (["attention", "--seqlens", "0"], "positive"),
    (["--modes", "forward"], "--modes"),
    (["--providers", "cublas9"], "unknown"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_plots_are_optional(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    paths, message = report.write_plots([], harness.Env.detect(), "/nonexistent")
    assert paths == [] and "matplotlib" in message


def test_table_columns_are_aligned():
    text = report.format_table(("a", "bb"), [("1", "2.5"), ("333", "4")], [False, True])
    lines = text.splitlines()
    assert lines[0] == "a     bb"
    assert lines[2] == "1    2.5"
    assert lines[3] == "333    4"


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="timings and peak memory need a CUDA GPU")
def test_cli_times_on_gpu(tmp_path):
    argv = ["all", "--shapes", "256x256x256", "--seqlens", "512", "--head-dims", "64", "--causal", "no",
            "--modes", "fwd,bwd", "--max-len", "1024", "--warmup", "2", "--rep", "5", "--no-plots",
            "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = report.read_csv(tmp_path / "results.csv")
    timed = {(r["suite"], r["provider"]) for r in rows if r["ms_p50"]}
    assert {("linear", "gradkernels"), ("linear", "torch"), ("attention", "gradkernels")} <= timed
    peaks = [r for r in rows if r["case"] == "peak" and r["provider"] == "gradkernels"]
    assert peaks and all(int(r["peak_bytes"]) > 0 for r in peaks)


def test_peak_sweep_records_oom_and_goes_on_for_the_others(monkeypatch):
    """The control flow of the peak sweep, with torch.cuda's memory counters stood in for on the CPU."""
    calls = []
    reg = harness.Registry("toy")
    held = {"bytes": 0, "peak": 0}

    def allocate(n):
        held["peak"] = max(held["peak"], held["bytes"] + n)

    @reg.register("tiled", baseline=True)
    def _tiled(case, inputs):
        allocate(case.L * 10)
        return inputs["q"] * 2

    @reg.register("quadratic")
    def _quadratic(case, inputs):
        calls.append(case.L)
        if case.L >= 1024:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        allocate(case.L * case.L)
        return inputs["q"] * 2

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: held.update(peak=0))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: held["bytes"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: held["peak"])
    monkeypatch.setattr(attn_suite.AttentionCase, "make_inputs",
                        lambda self, device: {"q": torch.randn(2, 3, requires_grad=True)})
    monkeypatch.setattr(attn_suite.AttentionCase, "make_grad_output", lambda self, device: torch.randn(2, 3))
    rows = memory.run_peak("cpu", torch.float32, (512, 1024, 2048), bhd=(1, 1, 16), providers=reg.providers)
    got = {(r.shape["Lq"], r.provider): (r.peak_bytes, r.status) for r in rows}
    assert got[(512, "tiled")] == (5120, "ok") and got[(2048, "tiled")] == (20480, "ok")
    assert got[(512, "quadratic")] == (512 * 512, "ok")
    assert got[(1024, "quadratic")] == (None, "oom")
    assert got[(2048, "quadratic")] == (None, "skipped: oom at L=1024")
    assert calls == [512, 512, 1024]  # warm-up + measured run at 512, the failed one at 1024, none after


def test_window_and_varlen_flops_count_the_visible_pairs():
    from gradkernels.bench import flops

    for length, window in ((97, 16), (16, 97), (1, 1), (64, 64)):
        i = torch.arange(length)[:, None]
        j = torch.arange(length)[None, :]
        pairs = int(((j <= i) & (j > i - window)).sum())
        assert flops.window_pairs(length, window) == pairs
        assert flops.window_attention_flops(2, 3, length, 8, window, "fwd") == 4.0 * 2 * 3 * pairs * 8
    assert flops.varlen_attention_flops((5, 7), 2, 8, False, "fwd+bwd") == (
        flops.attention_flops(1, 2, 5, 5, 8, False, "fwd+bwd") + flops.attention_flops(1, 2, 7, 7, 8, False, "fwd+bwd"))
