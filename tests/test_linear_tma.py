"""The linear kernel's TMA tiles (A and B through tensor descriptors; sm_90+, fp16/bf16, operands with a
contiguous dimension and 16-byte aligned strides): forward, dX and dW, with fused bias, activation, its
derivative, the bias gradient and split-K.

Under the interpreter the descriptor path is run by pinning a TMA tile (the launcher passes ``TMA`` with
the operands' orientation where they allow it and drops it where they do not); on a GPU the autotuner
picks among the TMA tiles and the others. Results are checked against the fp64 reference and torch's
same-dtype path (``check_linear``); the rule that decides where TMA tiles may run is checked directly.
"""

import pytest
import torch
import torch.nn.functional as F

import gradkernels
from gradkernels.aot import cases
from gradkernels.aot.recorder import record_launches
from gradkernels.aot.targets import DTYPES
from gradkernels.kernels import linear_configs as configs
from gradkernels.ops import linear as linear_ops
from test_linear import _inputs, check_backward_parts, check_forward_parts, check_linear
from utils import DEVICE, ON_GPU

DTYPES16 = [torch.float16] + ([torch.bfloat16] if ON_GPU else [])


class _Recorder:
    """Stands in for ``linear_kernel`` in the launcher: records each launch's ``(TMA_OK, TMA, A_T, B_T)`` and
    runs it."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []
        self.grids = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append(grid(kwargs) if callable(grid) else grid)
            tma_ok = args[self.kernel.arg_names.index("TMA_OK")]
            self.launches.append((tma_ok, kwargs.get("TMA", False), kwargs.get("A_T", False), kwargs.get("B_T", False)))
            return self.kernel[grid](*args, **kwargs)

        return launch


def _pin_tma(monkeypatch, persistent=False):
    """Pin a TMA tile (``persistent``: a persistent one) for the interpreter's launches and record what the
    kernel is handed."""
    tile = {**configs.INTERPRETER_CONFIG, "TMA": True, **({"PERSISTENT": True} if persistent else {})}
    monkeypatch.setattr(configs, "INTERPRETER_CONFIG", tile)
    recorder = _Recorder(linear_ops.kernels.linear_kernel)
    monkeypatch.setattr(linear_ops.kernels, "linear_kernel", recorder)
    return recorder


def _ran_kernels(x):
    return gradkernels.backend_for(x) != "torch" and not ON_GPU


# (tokens, in features, out features, activation, bias): odd token counts and out features (boxes past the
# end of M and N read zeros), K not a multiple of the 32-wide step (the tail box reads zeros past K), a
# decoding-sized batch (the forward and dX run swapped: the descriptors then read W as A and X^T as B).
CASES = [
    (37, 72, 40, "gelu", True),
    (97, 136, 24, None, True),
    (113, 40, 56, "silu", False),
    (5, 64, 200, "gelu", True),
]


@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("m,k,n,act,bias", CASES)
def test_tma_tiles_match_the_reference(m, k, n, act, bias, dtype, monkeypatch):
    recorder = _pin_tma(monkeypatch)
    x, w, b = _inputs((m, k), n, dtype, bias=bias)
    check_linear(x, w, b, act)
    if _ran_kernels(x):
        assert recorder.launches and all(tma for _, tma, _, _ in recorder.launches), recorder.launches
        # Forward (and the gradient check's reruns): X (K contiguous) and W^T (K contiguous, B_T), or swapped
        # W and X^T; dX: dY and W (N contiguous); dW: dY^T (A_T) and X.
        orientations = {(a_t, b_t) for _, _, a_t, b_t in recorder.launches}
        assert (True, False) in orientations and (False, False) in orientations
        assert (False, True) in orientations


@pytest.mark.parametrize("split", [2, 5])
def test_tma_split_k(split, monkeypatch):
    """Split-K through the descriptors: each split's boxes start at its first step; the last split's tail
    box reads zeros past K, and splits left empty add zeros. dW with the bias gradient split as well."""
    recorder = _pin_tma(monkeypatch)
    x, w, b = _inputs((19, 200), 48, torch.float16, requires_grad=False)
    out, pre = linear_ops.linear_forward(x, w, b, "gelu", True, split=split)
    check_forward_parts(x, w, b, "gelu", out, pre)
    grad = torch.randn(19, 48, device=DEVICE, dtype=torch.float16)
    dx, dw, db = linear_ops.linear_backward(grad, x, w, pre, "gelu", True, True, True, split=split)
    check_backward_parts(x, w, b, "gelu", grad, pre, dx, dw, db)
    if _ran_kernels(x):
        assert all(tma for _, tma, _, _ in recorder.launches[:3]) and len(recorder.launches) == 3


def test_tma_deterministic(monkeypatch):
    _pin_tma(monkeypatch)
    x, w, b = _inputs((45, 96), 40, torch.float16)
    runs = []
    for _ in range(2):
        y = gradkernels.linear(x, w, b, "gelu")
        runs.append((y, *torch.autograd.grad(y, (x, w, b), torch.ones_like(y))))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


@pytest.mark.parametrize("layout", ["strided-k", "odd-row-stride", "misaligned-base"])
def test_operands_tma_cannot_read_run_the_pointer_path(layout, monkeypatch):
    """A pinned TMA tile is dropped where the descriptors' rules fail: same results, no TMA."""
    recorder = _pin_tma(monkeypatch)
    m, k, n = 37, 48, 40
    if layout == "strided-k":  # no stride 1 in X
        x = torch.randn(m, 2 * k, device=DEVICE, dtype=torch.float16)[:, ::2]
    elif layout == "odd-row-stride":  # rows of 49 x 2 bytes
        x = torch.randn(m, k + 1, device=DEVICE, dtype=torch.float16)[:, :k]
    else:  # base address 2 bytes into the allocation
        x = torch.randn(m * k + 1, device=DEVICE, dtype=torch.float16)[1:].view(m, k)
    x.requires_grad_(True)
    _, w, b = _inputs((m, k), n, torch.float16)
    assert not configs.tma_layout(x, w.t())[0]
    check_linear(x, w, b, "gelu")
    if _ran_kernels(x):
        forward = recorder.launches[0]
        assert forward == (0, False, False, False)


def _t(*shape, dtype=torch.float16):
    return torch.empty(shape, dtype=dtype, device="meta")


def test_tma_layout_follows_the_descriptor_rules():
    assert configs.tma_layout(_t(100, 64), _t(40, 64).t()) == (True, False, True)  # forward: X, W^T
    assert configs.tma_layout(_t(100, 40), _t(40, 64)) == (True, False, False)  # dX: dY, W
    assert configs.tma_layout(_t(100, 40).t(), _t(100, 64)) == (True, True, False)  # dW: dY^T, X
    assert not configs.tma_layout(_t(100, 64, dtype=torch.float32), _t(64, 40, dtype=torch.float32))[0]
    assert not configs.tma_layout(_t(100, 36), _t(36, 40))[0]  # 72-byte rows
    assert not configs.tma_layout(_t(100, 64), _t(64, 80)[:, ::2])[0]  # no stride 1
    assert not configs.tma_layout(_t(100, 1), _t(1, 40))[0]  # K = 1: 2-byte rows
    base = torch.empty(100 * 64 + 1, dtype=torch.float16, device="meta")
    assert not configs.tma_layout(base[1:].view(100, 64), _t(64, 40))[0]  # base 2 bytes off


def _launch_args(**kw):
    args = {"M_KEY": 4096, "N_KEY": 4096, "K_KEY": 4096, "TMA_OK": 1, "INPUT_PRECISION": "ieee"}
    return {**args, **kw}


def test_prune_offers_tma_tiles_only_where_they_may_run():
    """sm_90, 16-bit, TMA_OK: the largest kept tile is a TMA one; without TMA_OK, on sm_80 or for fp32,
    none."""
    tiles = configs.get_linear_configs()

    def tma_tiles(args, dtype_bytes=2, arch=90):
        return [c for c in configs.prune(tiles, args, dtype_bytes=dtype_bytes, arch=arch) if c.kwargs.get("TMA")]

    kept = configs.prune(tiles, _launch_args(), dtype_bytes=2, arch=90)
    assert kept[0].kwargs.get("TMA") and (kept[0].kwargs["BLOCK_M"], kept[0].kwargs["BLOCK_N"]) == (128, 256)
    assert tma_tiles(_launch_args(EPILOGUE_ACT="gelu"))
    assert tma_tiles(_launch_args(TMA_OK=0)) == []
    assert tma_tiles(_launch_args(), arch=80) == []
    assert tma_tiles(_launch_args(), dtype_bytes=4) == []
    assert tma_tiles(_launch_args(INPUT_PRECISION="tf32"), dtype_bytes=4) == []
    # Decoding sizes: the TMA twins of the 64-row and skinny tiles, filled as the pointer tiles are.
    for m, n in ((4096, 16), (4096, 32), (64, 4096)):
        thin = tma_tiles(_launch_args(M_KEY=m, N_KEY=n))
        assert thin and all(configs.fill(c, m, n) > configs.MIN_FILL for c in thin), (m, n)
    for c in tiles:
        if c.kwargs.get("TMA"):
            assert not configs.keep(c, 2, 80), "no TMA before sm_90"


def test_tma_tiles_need_no_vector_aligned_rows():
    """Rows of 1000 fp16 elements (2000 bytes: TMA's 16-byte rule holds, but not the 16-element alignment
    Triton's vector loads need): the pointer tiles load element by element and keep() leaves only small
    ones, the TMA tiles read whole boxes and keep their size (the AOT check compiles them clean,
    the ``fwd-gelu-ragged-k`` case)."""
    case = next(c for c in cases.all_cases() if c.name == "fwd-gelu-ragged-k")
    (launch,) = [la for la in record_launches(case, DTYPES["fp16"]) if la.kernel == "linear_kernel"]
    tiles = configs.get_linear_configs()
    args = cases.autotuner_args(launch, tiles)
    assert args["TMA_OK"] == 1 and args["EVEN_K"] is False
    kept = configs.prune(tiles, args, dtype_bytes=2, arch=90)
    biggest = kept[0]
    assert biggest.kwargs.get("TMA") and biggest.kwargs["BLOCK_M"] * biggest.kwargs["BLOCK_N"] >= 128 * 128
    assert all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 for c in kept if not c.kwargs.get("TMA"))


@pytest.mark.parametrize("split", [1, 3])
def test_persistent_tiles_walk_every_tile(split, monkeypatch):
    """A persistent TMA tile on a "GPU" of 5 SMs (``num_sms`` patched): 5 programs walk the 12 output tiles
    of each split (4 x 3 tiles of 32 x 32 for 97 x 80; 36 with three splits), so each program takes
    several tiles, of several splits. Results as the references; and bitwise those of the grid with one
    program per tile (every output tile is still summed by one program in one order)."""
    x, w, b = _inputs((97, 96), 80, torch.float16, requires_grad=False)
    grad = torch.randn(97, 80, device=DEVICE, dtype=torch.float16)
    pre = F.linear(x, w, b)
    runs = {}
    for persistent in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            recorder = _pin_tma(mp, persistent)
            mp.setattr(linear_ops._device, "num_sms", lambda *args: 5)
            out = linear_ops.linear_forward(x, w, b, "gelu", True, split=split)
            grads = linear_ops.linear_backward(grad, x, w, pre, "gelu", True, True, True, split=split)
            runs[persistent] = (*out, *grads)
        if _ran_kernels(x) and persistent:
            assert all(tma for _, tma, _, _ in recorder.launches)
            assert recorder.grids[0] == (5, 1)
    out, pre_out, dx, dw, db = runs[True]
    check_forward_parts(x, w, b, "gelu", out, pre_out)
    check_backward_parts(x, w, b, "gelu", grad, pre, dx, dw, db)
    if _ran_kernels(x):
        for a, c in zip(runs[True], runs[False]):
            assert torch.equal(a, c)


def test_persistent_tiles_are_tma_tiles():
    with pytest.raises(ValueError, match="persistent tiles read through TMA"):
        configs.Tile(128, 128, 64, 8, 4, persistent=True)
    tiles = configs.get_linear_configs()
    assert any(c.kwargs.get("PERSISTENT") for c in configs.prune(tiles, _launch_args(), dtype_bytes=2, arch=90))
    # Not with the bias gradient's row sums (Triton 3.6 fails to compile that flattened loop).
    assert not any(c.kwargs.get("PERSISTENT")
                   for c in configs.prune(tiles, _launch_args(ROW_SUM=True), dtype_bytes=2, arch=90))
