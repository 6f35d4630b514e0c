"""Which backend a call takes: TRITON_INTERPRET set too late, and the force_torch_backend switch.

TRITON_INTERPRET is read by Triton's ``@jit`` when gradkernels' kernels are defined (at import), so the
too-late case runs in a fresh subprocess without it.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import gradkernels
from gradkernels import _device
from gradkernels.ops import linear as linear_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _python(code):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_interpreter_requested_after_import_gives_a_clear_error():
    result = _python("""
        import os, torch
        import gradkernels
        from gradkernels import _device
        x, w = torch.randn(3, 4), torch.randn(2, 4)
        assert not _device.interpreter_enabled() and gradkernels.backend_for(x) == "torch"
        os.environ["TRITON_INTERPRET"] = "1"   # too late: the kernels are compiled-GPU functions
        for call in (lambda: gradkernels.backend_for(x), lambda: gradkernels.linear(x, w)):
            try:
                call()
            except RuntimeError as e:
                print("RuntimeError:", e)
            else:
                print("no error")
        del os.environ["TRITON_INTERPRET"]
        y = gradkernels.linear(x, w)           # the torch backend again
        assert torch.allclose(y, x @ w.t())
        print("torch backend ok")
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[2] == "torch backend ok", result.stdout
    for line in lines[:2]:
        assert line.startswith("RuntimeError: TRITON_INTERPRET=1 is set, but gradkernels' kernels were defined "
                               "before it was"), line
        assert "before importing triton or gradkernels" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is the CPU path of a machine without GPU")
def test_interpreter_set_before_import_is_used():
    assert _device.interpreter_enabled()
    assert gradkernels.backend_for(torch.empty(1)) == "interpreter"


def test_force_torch_backend_runs_the_torch_path_everywhere(monkeypatch):
    launches = []
    forward = linear_ops.linear_forward
    monkeypatch.setattr(linear_ops, "linear_forward", lambda *a, **k: launches.append(1) or forward(*a, **k))
    x = torch.randn(5, 7, device=DEVICE, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 7, device=DEVICE, dtype=torch.float64)
    default = gradkernels.backend_for(x)
    with _device.force_torch_backend():
        with _device.force_torch_backend():  # nests
            assert gradkernels.backend_for(x) == "torch"
        assert gradkernels.backend_for(x) == "torch"
        y = gradkernels.linear(x, w, None, "silu")
        y.backward(torch.ones_like(y))
    assert launches == [] and gradkernels.backend_for(x) == default
    x2 = x.detach().requires_grad_()
    F.silu(F.linear(x2, w)).backward(torch.ones_like(y))
    torch.testing.assert_close(y, F.silu(F.linear(x, w)))
    torch.testing.assert_close(x.grad, x2.grad)


def test_custom_ops_pass_opcheck_on_the_torch_backend():
    """The torch backend runs the same custom ops with torch twins of the launchers: their results must
    match the fake implementations (shapes, strides, dtypes), as the kernels' do (tests/test_compile.py)."""
    from gradkernels import custom_ops

    d64 = dict(device=DEVICE, dtype=torch.float64)
    x, w, b, g = torch.randn(9, 6, **d64), torch.randn(5, 6, **d64), torch.randn(5, **d64), torch.randn(9, 5, **d64)
    q = torch.randn(1, 7, 4, 8, **d64).transpose(1, 2)  # (B, H, L, D) read from a (B, L, H, D) tensor
    k, v = torch.randn(1, 2, 5, 8, **d64), torch.randn(1, 2, 5, 3, **d64)
    with _device.force_torch_backend():
        torch.library.opcheck(custom_ops.linear_fwd, (x, w, b, "gelu", True))
        torch.library.opcheck(custom_ops.linear_bwd, (g, x, w, torch.randn(9, 5, **d64), "silu", True, True, True))
        torch.library.opcheck(custom_ops.linear_bwd, (g, None, w, None, None, True, False, True))
        out, lse, lse_lo = custom_ops.attention_fwd(q, k, v, -2, 0.3)
        torch.library.opcheck(custom_ops.attention_fwd, (q, k, v, -2, 0.3))
        torch.library.opcheck(custom_ops.attention_bwd,
                              (torch.randn_like(out), q, k, v, out, lse, lse_lo, -2, 0.3, True, False, True))
