"""The accuracy rule itself (gradkernels.testing): its references, its bounds, and that it catches bugs.

- The fp64 references are more precise than fp64 (exact rational arithmetic agrees to one rounding), and
  the longdouble and compensated methods agree.
- The bounds hold for other summation orders: the products are re-summed here sequentially, reversed,
  blocked and pairwise in fp64 (what another BLAS or tiling does), including the shapes that failed on
  another machine under the former rule (7x600x33 and the split-K 19x700x45 in fp64), with margin.
- The rule is tight enough: small deliberate errors (one element off by 1e-10 relative in fp64, a dropped
  bias, a shifted row, fp32 accumulation, an off-by-one causal mask, a dropped softmax term, tf32-rounded
  products in fp32, P rounded to fp16) fail it.
- The activation constants and evaluation-error models the bounds use hold for the kernels' formulas and
  torch's (against mpmath).
- The margin log and its summary.
"""

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradkernels
from gradkernels import reference, testing
from gradkernels.testing import bounds, margins, oracle
from utils import DEVICE, ON_GPU, assert_close

F64 = torch.float64
HIGH = oracle.method(F64)


def _linear_inputs(m, k, n, dtype=F64, bias=True):
    x = torch.randn(m, k, dtype=dtype, device=DEVICE)
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) / k**0.5
    b = torch.randn(n, dtype=dtype, device=DEVICE) if bias else None
    return x, w, b


# ----------------------------------------------------------------------------------------------------
# The references
# ----------------------------------------------------------------------------------------------------


def test_high_precision_reference_is_one_rounding_from_exact():
    """A few dot products summed exactly in rational arithmetic: the reference is within half an fp64
    ulp (plus the 2^-64 accumulation) of them, and torch's fp64 matmul is measurably further off."""
    x, w, _ = _linear_inputs(4, 600, 3, bias=False)
    ref = oracle.matmul(x, w.t())
    exact = torch.tensor([[float(sum(Fraction(a) * Fraction(b) for a, b in zip(x[i].tolist(), w[j].tolist())))
                           for j in range(3)] for i in range(4)], dtype=F64)
    assert (ref.cpu() - exact).abs().max() <= 0.5 * torch.finfo(F64).eps * exact.abs().max()
    assert ((x @ w.t()).cpu() - exact).abs().max() > 0  # torch's fp64 path has an error of its own


def test_the_two_high_precision_methods_agree():
    if not oracle._longdouble_is_wider():
        pytest.skip("numpy.longdouble is plain double on this platform: only the compensated method exists")
    q = torch.randn(1, 4, 29, 40, dtype=F64)
    k, v = torch.randn(1, 2, 37, 40, dtype=F64), torch.randn(1, 2, 37, 24, dtype=F64)
    do = torch.randn(1, 4, 29, 24, dtype=F64)
    refs = [oracle.attention_reference(q, k, v, do, causal=True, method=m) for m in ("longdouble", "compensated")]
    bound = testing.attention_bounds(q, k, v, do, causal=True)
    for key in refs[0]:
        seen = torch.isfinite(refs[0][key])
        diff = (refs[0][key][seen] - refs[1][key][seen]).abs()
        # Both are within a few fp64 roundings of the exact value, far inside the floor.
        assert diff.max() <= 8 * torch.finfo(F64).eps * refs[0][key][seen].abs().max(), key
        assert (diff <= bound[key][seen] / 20).all(), key
    x, w, b = _linear_inputs(13, 97, 11)
    dy = torch.randn(13, 11, dtype=F64)
    lin = [oracle.linear_reference(x, w, b, "gelu", dy, method=m) for m in ("longdouble", "compensated")]
    for key in lin[0]:
        assert (lin[0][key] - lin[1][key]).abs().max() <= 4 * torch.finfo(F64).eps * lin[0][key].abs().max(), key


def test_oracle_method_can_be_forced(monkeypatch):
    assert oracle.method(torch.float32) == "fp64"
    monkeypatch.setenv("GRADKERNELS_ORACLE", "compensated")
    assert oracle.method(F64) == "compensated"
    monkeypatch.setenv("GRADKERNELS_ORACLE", "quad")
    with pytest.raises(ValueError, match="GRADKERNELS_ORACLE"):
        oracle.method(F64)


# ----------------------------------------------------------------------------------------------------
# Other summation orders (what another BLAS, tile size or split does)
# ----------------------------------------------------------------------------------------------------


def _sum_in_order(terms: np.ndarray, order: str) -> np.ndarray:
    """Sum fp64 ``terms`` over the last axis in the named order, rounding every addition."""
    if order == "reversed":
        terms = terms[..., ::-1]
    if order in ("sequential", "reversed"):
        acc = np.zeros(terms.shape[:-1])
        for i in range(terms.shape[-1]):
            acc = acc + terms[..., i]
        return acc
    if order.startswith("blocked"):
        size = int(order[len("blocked"):])
        blocks = [_sum_in_order(terms[..., i : i + size], "sequential") for i in range(0, terms.shape[-1], size)]
        return _sum_in_order(np.stack(blocks, -1), "sequential")
    if order == "pairwise":
        while terms.shape[-1] > 1:
            if terms.shape[-1] % 2:
                terms = np.concatenate([terms, np.zeros(terms.shape[:-1] + (1,))], -1)
            terms = terms[..., 0::2] + terms[..., 1::2]
        return terms[..., 0]
    raise ValueError(order)


def _matmul_in_order(a: torch.Tensor, b: torch.Tensor, order: str) -> torch.Tensor:
    """a (..., M, K) @ b (..., K, N) in fp64 with the products summed in ``order``."""
    an, bn = a.double().cpu().numpy(), b.double().cpu().numpy()
    terms = an[..., :, None, :] * np.swapaxes(bn, -1, -2)[..., None, :, :]  # (..., M, N, K), each rounded
    return torch.from_numpy(_sum_in_order(terms, order)).to(a.device)


ORDERS = ["sequential", "reversed", "blocked16", "blocked37", "pairwise"]


@pytest.mark.parametrize("m,k,n", [(7, 600, 33), (19, 700, 45)])
def test_linear_bound_holds_in_every_summation_order(m, k, n):
    """The fp64 cases that failed elsewhere under the former rule (a floor of 8 ulps of the output):
    forward and gradients summed in other orders stay within the rule with a margin of 4 or more, the
    floor alone included (torch's own error is not needed)."""
    x, w, b = _linear_inputs(m, k, n)
    dy = torch.randn(m, n, dtype=F64, device=DEVICE)
    ref = testing.linear_reference(x, w, b, "gelu", dy)
    floor = testing.linear_bounds(x, w, b, "gelu", dy)
    pre_t = F.linear(x, w, b)
    same = {"out": F.gelu(pre_t), "pre": pre_t}
    g_t = dy * torch.func.grad(lambda p: F.gelu(p).sum())(pre_t)
    same.update(dx=g_t @ w, dw=g_t.t() @ x, db=g_t.sum(0))
    for order in ORDERS:
        pre = _matmul_in_order(torch.cat([x, torch.ones(m, 1, dtype=F64, device=DEVICE)], 1),
                               torch.cat([w, b[:, None]], 1).t(), order)
        g = dy * torch.func.grad(lambda p: F.gelu(p).sum())(pre)
        got = {"pre": pre, "out": F.gelu(pre), "dx": _matmul_in_order(g, w, order),
               "dw": _matmul_in_order(g.t(), x, order),
               "db": _matmul_in_order(g.t(), torch.ones(m, 1, dtype=F64, device=DEVICE), order)[:, 0]}
        for key, value in got.items():
            factor = 2 if key in ("out", "pre") else 3
            check = assert_close(value, same[key], ref[key], factor, f"{key} ({order})", floor=floor[key])
            assert check.ratio >= 4 and check.floor_ratio >= 4, check.message


def _attention_in_order(q, k, v, do, scale, order, block=16):
    """Flash-style fp64 attention: scores and products summed in ``order``, online softmax over key
    blocks (running max, rescaled sums), then the backward from the recomputed P."""
    s = _matmul_in_order(q, k.transpose(-2, -1), order) * scale
    lk = k.shape[-2]
    m = torch.full(s.shape[:-1] + (1,), -math.inf, dtype=F64)
    ell = torch.zeros_like(m)
    acc = torch.zeros(*s.shape[:-1], v.shape[-1], dtype=F64)
    for j in range(0, lk, block):
        sj = s[..., j : j + block]
        m_new = torch.maximum(m, sj.amax(-1, keepdim=True))
        p = torch.exp(sj - m_new)
        alpha = torch.exp(m - m_new)
        ell = ell * alpha + _matmul_in_order(p, torch.ones(p.shape[-1], 1, dtype=F64), order)
        acc = acc * alpha + _matmul_in_order(p, v[..., j : j + block, :], order)
        m = m_new
    out = acc / ell
    lse = (m + torch.log(ell))[..., 0]
    p = torch.exp(s - lse[..., None])
    dv = _matmul_in_order(p.transpose(-2, -1), do, order)
    dp = _matmul_in_order(do, v.transpose(-2, -1), order)
    delta = (do * out).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = _matmul_in_order(ds, k, order) * scale
    dk = _matmul_in_order(ds.transpose(-2, -1), q, order) * scale
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def test_attention_bound_holds_in_every_summation_order():
    q = torch.randn(1, 2, 23, 80, dtype=F64)
    k, v = torch.randn(1, 2, 41, 80, dtype=F64), torch.randn(1, 2, 41, 40, dtype=F64)
    do = torch.randn(1, 2, 23, 40, dtype=F64)
    scale = 1 / math.sqrt(80)
    ref = testing.attention_reference(q, k, v, do)
    floor = testing.attention_bounds(q, k, v, do)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out_t, lse_t = reference.standard_attention(qq, kk, vv, return_lse=True)
    same = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out_t, (qq, kk, vv), do)), out=out_t, lse=lse_t)
    for order in ORDERS:
        got = _attention_in_order(q, k, v, do, scale, order)
        for key, value in got.items():
            factor = 2 if key in ("out", "lse") else 3
            check = assert_close(value, same[key].detach(), ref[key], factor, f"{key} ({order})", floor=floor[key])
            assert check.ratio >= 4 and check.floor_ratio >= 4, check.message


@pytest.mark.parametrize("scale", [-0.3, 0.0, 1 / 3])
def test_attention_reference_and_bound_for_any_scale(scale):
    """Negative and zero scales too: torch's fp64 composition (a correct computation in another order)
    passes against the reference with the floor, and the floor is non-negative."""
    q, k = torch.randn(1, 2, 19, 24, dtype=F64), torch.randn(1, 1, 23, 24, dtype=F64)
    v = torch.randn(1, 1, 23, 8, dtype=F64)
    do = torch.randn(1, 2, 19, 8, dtype=F64)
    ref = testing.attention_reference(q, k, v, do, causal=True, scale=scale)
    floor = testing.attention_bounds(q, k, v, do, causal=True, scale=scale)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.standard_attention(qq, kk, vv, True, scale, return_lse=True)
    got = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (qq, kk, vv), do)), out=out.detach(), lse=lse)
    for key, value in got.items():
        assert (floor[key] >= 0).all(), key
        assert_close(value, value, ref[key], 0, key, floor=floor[key])  # factor 0: the floor alone


# ----------------------------------------------------------------------------------------------------
# Small deliberate errors fail the rule
# ----------------------------------------------------------------------------------------------------


def _linear_case(dtype=F64, m=37, k=97, n=53, act="gelu"):
    x, w, b = _linear_inputs(m, k, n, dtype)
    dy = torch.randn(m, n, dtype=dtype, device=DEVICE)
    ref = testing.linear_reference(x, w, b, act, dy)
    floor = testing.linear_bounds(x, w, b, act, dy)
    same = reference.activation_fn(F.linear(x, w, b), act)
    return x, w, b, dy, ref, floor, same


def test_linear_rule_catches_small_errors_in_fp64():
    x, w, b, dy, ref, floor, same = _linear_case()
    ours = gradkernels.linear(x, w, b, "gelu")
    assert testing.compare(ours, same, ref["out"], 2, floor=floor["out"]).ok  # the kernel itself passes

    def fails(bad):
        return not testing.compare(bad, same, ref["out"], 2, floor=floor["out"]).ok

    one_off = ours.clone()
    one_off[5, 7] *= 1 + 1e-10
    assert fails(one_off), "one element off by 1e-10 relative"
    assert fails(gradkernels.linear(x, w, None, "gelu")), "bias dropped"
    assert fails(torch.roll(ours, 1, 0)), "rows shifted by one"
    assert fails(gradkernels.linear(x, w, b, "gelu_tanh")), "the other GELU"
    assert fails(F.gelu(F.linear(x.float(), w.float(), b.float())).double()), "fp32 accumulation"
    # Gradients: dW off by 1e-10 in one element, and dX with the activation's derivative dropped.
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    y = gradkernels.linear(xr, wr, br, "gelu")
    dx, dw, db = torch.autograd.grad(y, (xr, wr, br), dy)
    g_t = dy * torch.func.grad(lambda p: F.gelu(p).sum())(F.linear(x, w, b))
    assert testing.compare(dw, g_t.t() @ x, ref["dw"], 3, floor=floor["dw"]).ok
    dw_bad = dw.clone()
    dw_bad[3, 2] += 1e-10 * dw_bad[3, 2].abs()
    assert not testing.compare(dw_bad, g_t.t() @ x, ref["dw"], 3, floor=floor["dw"]).ok
    assert not testing.compare(dy @ w, g_t @ w, ref["dx"], 3, floor=floor["dx"]).ok
    assert testing.compare(db, g_t.sum(0), ref["db"], 3, floor=floor["db"]).ok
    assert not testing.compare(db * (1 + 1e-10), g_t.sum(0), ref["db"], 3, floor=floor["db"]).ok


def test_linear_rule_catches_tf32_products_in_fp32():
    """Below fp64 the floor is statistical: products rounded to tf32's 10-bit mantissa (a kernel that
    ignores torch's allow_tf32=False) fail it at K = 1024, where a worst-case floor would not."""
    x, w, b, dy, ref, floor, same = _linear_case(torch.float32, 33, 1024, 29, None)

    def tf32(t):  # round to nearest with a 10-bit mantissa
        bits = t.view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)

    ours = gradkernels.linear(x, w, b)
    assert testing.compare(ours, same, ref["out"], 2, floor=floor["out"]).ok
    bad = F.linear(tf32(x), tf32(w), b)
    assert not testing.compare(bad, same, ref["out"], 2, floor=floor["out"]).ok
    worst_case = dataclasses.replace(bounds.kernel_precision(torch.float32), worst_case=True)
    worst = bounds.reduction_error(worst_case, torch.cat([x, torch.ones(33, 1, device=DEVICE)], 1).double(),
                                   torch.cat([w, b[:, None]], 1).t().double())
    assert ((bad.double() - ref["out"]).abs() <= worst).all()


def _attention_case(dtype=F64, causal=True, lq=37, lk=53, d=40):
    q = torch.randn(1, 2, lq, d, dtype=dtype, device=DEVICE)
    k, v = torch.randn(1, 2, lk, d, dtype=dtype, device=DEVICE), torch.randn(1, 2, lk, d, dtype=dtype, device=DEVICE)
    do = torch.randn(1, 2, lq, d, dtype=dtype, device=DEVICE)
    ref = testing.attention_reference(q, k, v, do, causal=causal)
    floor = testing.attention_bounds(q, k, v, do, causal=causal)
    qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
    out, lse = reference.standard_attention(qq, kk, vv, causal, return_lse=True)
    same = dict(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (qq, kk, vv), do)), out=out.detach(), lse=lse)
    return q, k, v, do, ref, floor, same


def test_attention_rule_catches_small_errors_in_fp64():
    q, k, v, do, ref, floor, same = _attention_case()

    def passes(key, value):
        seen = torch.isfinite(ref[key])
        factor = 2 if key in ("out", "lse") else 3
        return testing.compare(value[seen], same[key][seen].to(value.dtype), ref[key][seen], factor,
                               floor=floor[key][seen]).ok

    out, lse = gradkernels.attention(q, k, v, causal=True, return_lse=True)
    assert passes("out", out) and passes("lse", lse)
    bad = out.clone()
    bad[0, 1, 20, 3] *= 1 + 1e-10
    assert not passes("out", bad), "one element off by 1e-10 relative"
    assert not passes("lse", lse * (1 + 1e-10)), "LSE off by 1e-10 relative"
    shifted = reference.standard_attention(q, k, v, causal=True, align="top_left")  # offset 0, not Lk - Lq
    assert not passes("out", shifted), "causal mask shifted"
    assert not passes("out", reference.standard_attention(q, k, v, causal=True, scale=1.0001 / math.sqrt(40))), \
        "scale off by 1e-4"
    assert not passes("out", torch.roll(out, 1, 2)), "rows shifted by one"
    # Backward with the softmax's row term dropped (dS = P * dP): dQ and dK fail.
    qq, kk, vv = (t.clone() for t in (q, k, v))
    p = torch.softmax(torch.where(oracle.visible_keys(37, 53, 16), qq @ kk.transpose(-2, -1) / math.sqrt(40),
                                  -math.inf), -1)
    dq_bad = (p * (do @ vv.transpose(-2, -1))) @ kk / math.sqrt(40)
    assert not passes("dq", dq_bad)
    dq_good = (p * (do @ vv.transpose(-2, -1) - (do * (p @ vv)).sum(-1, keepdim=True))) @ kk / math.sqrt(40)
    assert passes("dq", dq_good)


def test_attention_rule_catches_p_rounded_to_fp16_in_fp32():
    q, k, v, do, ref, floor, same = _attention_case(torch.float32, causal=False)
    s = q @ k.transpose(-2, -1) / math.sqrt(40)
    p = torch.softmax(s, -1)
    good = p @ v
    bad = p.half().float() @ v
    assert testing.compare(good, same["out"], ref["out"], 2, floor=floor["out"]).ok
    assert not testing.compare(bad, same["out"], ref["out"], 2, floor=floor["out"]).ok


# ----------------------------------------------------------------------------------------------------
# The activation constants and evaluation-error models
# ----------------------------------------------------------------------------------------------------


def _exact_activation(x: float, act: str, mp):
    x = mp.mpf(x)
    if act == "gelu":
        cdf = (1 + mp.erf(x / mp.sqrt(2))) / 2
        return x * cdf, cdf + x * mp.exp(-x * x / 2) / mp.sqrt(2 * mp.pi)
    if act == "gelu_tanh":
        c, a = mp.sqrt(2 / mp.pi), mp.mpf("0.044715")
        t = mp.tanh(c * (x + a * x**3))
        return x * (1 + t) / 2, (1 + t) / 2 + x * (1 - t * t) * c * (1 + 3 * a * x * x) / 2
    s = 1 / (1 + mp.exp(-x))
    return x * s, s * (1 + x * (1 - s))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "silu"])
def test_activation_constants_and_evaluation_errors(act):
    """sup|act'| and sup|act''| are below the bounds' constants, and the kernels' formulas (through
    gradkernels.linear with K = 1: y = act(x), dx = act'(x)) and torch's fp64 ones are within half the
    evaluation-error model: 8 u |x| for the value, 6 u (1 + x^2) for the derivative."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    spec = bounds.ACTIVATION_BOUNDS[act]
    grid = torch.linspace(-12, 12, 24001, dtype=F64, requires_grad=True)
    with torch.enable_grad():
        (d1,) = torch.autograd.grad(reference.activation_fn(grid, act).sum(), grid, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), grid)
    assert d1.abs().max() <= spec.slope and d2.abs().max() <= spec.curvature
    xs = torch.cat([torch.linspace(-30, 30, 241), torch.linspace(-8, 8, 321)]).to(F64)
    exact = torch.tensor([[float(e) for e in _exact_activation(x, act, mp)] for x in xs.tolist()], dtype=F64)
    for dtype in (torch.float32, torch.float64):
        x = xs.to(dtype)
        u = testing.unit_roundoff(dtype)
        exact_x = torch.tensor([[float(e) for e in _exact_activation(v, act, mp)] for v in x.tolist()], dtype=F64) \
            if dtype != F64 else exact
        xx = x[:, None].clone().to(DEVICE).requires_grad_(True)
        one = torch.ones(1, 1, dtype=dtype, device=DEVICE, requires_grad=True)
        y = gradkernels.linear(xx, one, None, act)
        (dx,) = torch.autograd.grad(y, xx, torch.ones_like(y))
        results = [("kernel", y[:, 0], dx[:, 0])]
        if dtype == F64:
            xt = x.clone().requires_grad_(True)
            yt = reference.activation_fn(xt, act)
            results.append(("torch", yt, torch.autograd.grad(yt.sum(), xt)[0]))
        xa = x.double().abs().cpu()
        for who, value, slope in results:
            value_err = (value.double().cpu() - exact_x[:, 0]).abs()
            slope_err = (slope.double().cpu() - exact_x[:, 1]).abs()
            # (One extra rounding of the exact value to the dtype is part of what is measured.)
            assert (value_err <= 0.5 * 8 * u * xa + u * exact_x[:, 0].abs()).all(), (who, dtype)
            assert (slope_err <= 0.5 * 6 * u * (1 + xa * xa) + u * exact_x[:, 1].abs()).all(), (who, dtype)


# ----------------------------------------------------------------------------------------------------
# The check, the margin log and its summary
# ----------------------------------------------------------------------------------------------------


def test_compare_reports_what_failed(monkeypatch):
    monkeypatch.delenv(testing.MARGIN_LOG_ENV, raising=False)  # a deliberate failure is no margin
    ref = torch.linspace(1, 2, 12, dtype=F64).reshape(3, 4)
    same = ref.float()
    assert testing.compare(ref.float(), same, ref, 2, floor=1e-7).ok
    off = ref.float().clone()
    off[1, 2] += 1e-3
    check = testing.compare(off, same, ref, 2, floor=1e-7, name="thing")
    assert not check.ok and check.worst_index == (1, 2) and "thing: error" in check.message
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close(off, same, ref, 2, floor=1e-7)
    assert "shape" in testing.compare(ref[:2].float(), same, ref, 2).message
    assert "non-finite" in testing.compare(torch.full_like(same, math.nan), same, ref, 2).message
    assert not testing.compare(ref, same, ref, 2).ok  # dtype differs from torch's
    assert testing.compare(same[:0], same[:0], ref[:0], 2).ok


def test_margin_log_and_summary(tmp_path, monkeypatch, capsys):
    path = tmp_path / "margins.jsonl"
    monkeypatch.setenv(testing.MARGIN_LOG_ENV, str(path))
    ref = torch.linspace(1, 2, 8, dtype=F64)
    assert_close(ref + 1e-15, ref + 2e-15, ref, 2, "a", floor=1e-14)
    assert_close(ref.float(), ref.float(), ref, 2, "b")
    assert_close(ref.clone(), ref.clone(), ref, 2, "exact", floor=1e-14)
    testing.record_margin("loss", F64, 1e-15, 5e-15)
    entries = margins.read(str(path))
    assert [e["name"] for e in entries] == ["a", "b", "exact", "loss"]
    assert entries[0]["test"].endswith("test_margin_log_and_summary")
    summary = margins.summarise(entries, "float64")
    assert summary["checks"] == 3 and summary["exact"] == 1 and summary["failed"] == 0
    assert summary["min_ratio"] == pytest.approx(5.0)  # the recorded loss: 5e-15 / 1e-15
    assert margins.main([str(path)]) == 0
    assert "smallest allowed/error: 5" in capsys.readouterr().out
    json.dumps(margins.summarise(entries, None)["by_file"])


@pytest.mark.skipif(not ON_GPU, reason="tf32 is a CUDA matmul mode")
def test_tf32_widens_the_fp32_bound_only_where_torch_allows_it(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert bounds.kernel_precision(torch.float32, "cuda").operand == 0
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert bounds.kernel_precision(torch.float32, "cuda").operand == 2.0**-11
