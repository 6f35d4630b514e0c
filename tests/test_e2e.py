"""End-to-end: a small transformer LM trained 20 AdamW steps plain and patched, from the same seed.

The model (gradkernels.models.TinyLM: 2 layers, d_model 64, 4 query heads on 2 KV heads, causal) is
plain PyTorch; gradkernels.patch swaps its Linear layers and routes its SDPA calls to the kernels.

Tolerance, derived rather than tuned: the patched run's loss is compared with an fp64 run of the plain
model (the reference). Two correct implementations in one dtype differ from the reference by rounding
that training then carries forward, so the allowed error at step t is

    2 * max_{s <= t} |loss_torch(s) - loss_ref(s)|  +  4 * eps * |loss_ref(t)| * (t + 1)

The first term is the two-oracle rule of the kernel tests (gradkernels.testing.assert_close) applied to the
running envelope of torch's own error in the same dtype (under bf16 autocast, torch's bf16 run); the
second is a floor of a few units of rounding of the loss (eps of the dtype the loss is computed in: the
parameter dtype, fp32 under autocast), growing linearly with the steps over which differences
accumulate. The floor is what keeps the fp64 case meaningful, where torch's run is the reference itself.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from gradkernels import patching, testing
from gradkernels.ops import attention as attention_ops
from gradkernels.ops import linear as linear_ops
from gradkernels.models import TinyLM, TinyLMConfig, make_batches, train_losses

from utils import DEVICE, ON_GPU

STEPS, BATCH, SEQ = 20, 1, 23

# (name, parameter dtype, autocast dtype): on CPU the kernels run under the interpreter (fp32, fp64);
# bf16 arithmetic only on CUDA, as mixed precision (fp32 parameters, autocast).
CASES = [("fp32", torch.float32, None), ("fp64", torch.float64, None)]
if ON_GPU:
    CASES.append(("bf16-autocast", torch.float32, torch.bfloat16))


@pytest.fixture
def launches(monkeypatch):
    counts = {"linear": 0, "attention": 0}
    targets = ((linear_ops, "linear_forward", "linear"), (attention_ops, "attention_forward", "attention"))
    for module, name, key in targets:
        fn = getattr(module, name)

        def counting(*args, _fn=fn, _key=key, **kwargs):
            counts[_key] += 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return counts


def _train(dtype, autocast_dtype, batches, patched):
    torch.manual_seed(0)
    model = TinyLM(TinyLMConfig()).to(DEVICE)  # initialised in fp32, then cast: one init for all runs
    model = model.to(dtype)
    if patched:
        patching.patch(model)
    return train_losses(model, batches, autocast_dtype=autocast_dtype)


@pytest.mark.parametrize("name,dtype,autocast_dtype", CASES, ids=[c[0] for c in CASES])
def test_training_losses_match_plain_pytorch(name, dtype, autocast_dtype, launches):
    cfg = TinyLMConfig()
    batches = make_batches(cfg, STEPS, BATCH, SEQ, device=DEVICE)
    ref = _train(torch.float64, None, batches, patched=False)
    same = ref if (dtype, autocast_dtype) == (torch.float64, None) else _train(dtype, autocast_dtype, batches, False)
    ours = _train(dtype, autocast_dtype, batches, patched=True)

    # The run exercised the kernels: every step's forward launched all of them.
    assert launches == {"linear": STEPS * 13, "attention": STEPS * cfg.n_layers}, launches
    # The setup is meaningful: training lowers the loss well beyond rounding.
    assert ref[-1] < ref[0] - 1.0, ref

    # The floor is rounding of the loss itself, computed in the parameter dtype (fp32 logits under
    # autocast); the compute dtype's own rounding (bf16) is what the envelope of torch's run measures.
    eps = torch.finfo(dtype).eps
    envelope = 0.0
    closest = (math.inf, 0.0, 0.0)  # (tol / err, err, tol) of the step nearest its limit
    for t, (r, s, o) in enumerate(zip(ref, same, ours)):
        envelope = max(envelope, abs(s - r))
        tol = 2 * envelope + 4 * eps * abs(r) * (t + 1)
        assert abs(o - r) <= tol, (
            f"step {t}: |patched - fp64| = {abs(o - r):.3e} > {tol:.3e} "
            f"(torch {name} envelope {envelope:.3e}); losses patched {ours} reference {ref}"
        )
        if abs(o - r) > 0:
            closest = min(closest, (tol / abs(o - r), abs(o - r), tol))
    if closest[1]:
        testing.record_margin("training loss (step nearest its limit)", dtype, closest[1], closest[2], "magnitude")


def test_train_step_benchmark_smoke(tmp_path, monkeypatch):
    """bench/train_step.py --smoke: every provider trains on the CPU; no timing is taken or written."""
    path = Path(__file__).resolve().parent.parent / "bench" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step_bench", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "train_step.json").read_text())["results"]
    assert [r["provider"] for r in rows] == list(bench.PROVIDERS)
    assert all(r["status"] == "ok" and r["tokens_per_s"] is None and r["peak_bytes"] is None for r in rows)
    assert "gradkernels" in (tmp_path / "train_step.txt").read_text()
