"""The AOT report's rows without compiling: launches recorded from the launchers, their Triton
signatures, and the configs each launch may pick (the families' prune) per architecture."""

import pytest

from gradkernels.aot import check, signature
from gradkernels.kernels import attention_configs as AC
from gradkernels.kernels import linear as linear_kernels
from gradkernels.kernels import linear_configs as LC


def _linear_rows(case, dtype, archs=(80, 90), config_filter=None, kernels=None, include_pruned=False):
    rows = check.build_rows(archs, kernels=kernels, dtypes=[dtype], cases=[case], include_pruned=include_pruned,
                            config_filter=config_filter)
    return [r for r in rows if r.case == case]  # the CLI's --case matches substrings: keep the exact one


# ---------------------------------------------------------------------------------------------------
# Signatures derived from the recorded launches (no compiling)
# ---------------------------------------------------------------------------------------------------


def test_signature_follows_kernel_parameters_and_launch():
    rows = _linear_rows("fwd-gelu", "fp16", archs=(90,))
    assert {r.kernel for r in rows} == {"linear_kernel"}
    params = [p.name for p in signature.kernel_params(linear_kernels.linear_kernel)]
    configs = LC.get_linear_configs()
    assert len(rows) == len(configs), "one row per config of the factory"
    job = next(r.job for r in rows if r.job is not None)
    sig = dict(job.signature)
    consts = dict(job.constexprs)
    assert [n for n, _ in job.signature] == params, "signature in the kernel's parameter order"
    # fwd with bias + gelu + stored pre-activation: pointers typed, unused ones constexpr None.
    for name in ("A", "B", "C", "BIAS", "PRE_OUT"):
        assert sig[name] == "*fp16", name
    for name in ("PRE_IN", "WS", "ROWSUM"):
        assert sig[name] == "constexpr" and consts[name] is None, name
    # Unit strides are specialised to the constant 1, like a real launch; others are aligned i32.
    assert consts["stride_ak"] == 1 and consts["stride_cn"] == 1
    assert sig["stride_am"] == "i32" and "stride_am" in job.aligned
    assert consts["EPILOGUE_ACT"] == "gelu" and consts["HAS_BIAS"] is True and consts["STORE_PRE"] is True
    assert consts["SPLIT_K"] == 1 and consts["INPUT_PRECISION"] == "ieee"
    opts = dict(job.options)
    cfg = next(c for c in configs if check.config_label(c) == next(r.config for r in rows if r.job == job))
    assert opts["num_warps"] == cfg.num_warps and opts["num_stages"] == cfg.num_stages
    assert all(consts[k] == v for k, v in cfg.kwargs.items())


def test_dtype_variants_set_input_precision_and_pointer_types():
    tf32 = next(r.job for r in _linear_rows("dx-gelu", "fp32-tf32", archs=(80,)) if r.job is not None)
    ieee = next(r.job for r in _linear_rows("dx-gelu", "fp32-ieee", archs=(80,)) if r.job is not None)
    bf16 = next(r.job for r in _linear_rows("dx-gelu", "bf16", archs=(80,)) if r.job is not None)
    assert dict(tf32.constexprs)["INPUT_PRECISION"] == "tf32"
    assert dict(ieee.constexprs)["INPUT_PRECISION"] == "ieee"
    assert dict(bf16.signature)["A"] == "*bf16"
    # dX launch: the prologue reads the pre-activation, no epilogue activation, no row sums.
    c = dict(bf16.constexprs)
    assert c["PROLOGUE_ACT"] == "gelu" and c["EPILOGUE_ACT"] is None and c["ROW_SUM"] is False
    assert dict(bf16.signature)["PRE_IN"] == "*bf16"


def test_split_cases_cover_the_reduce_kernel():
    rows = _linear_rows("dw-gelu-split", "fp16", archs=(90,))
    reduce_rows = [r for r in rows if r.kernel == "linear_split_reduce_kernel"]
    # dW partials and the bias-gradient (row sum) partials: two reduce launches.
    assert len(reduce_rows) == 2
    for r in reduce_rows:
        c = dict(r.job.constexprs)
        assert c["SPLIT_K"] == 4 and dict(r.job.options)["num_warps"] == LC.REDUCE_WARPS
        assert dict(r.job.signature)["WS"] == "*fp32", "partials are in the accumulator dtype"
    main = [r for r in rows if r.kernel == "linear_kernel" and r.job is not None]
    assert main and all(dict(r.job.constexprs)["ROW_SUM"] is True for r in main)


@pytest.mark.parametrize("dtype,nbytes", [("fp64", 8), ("fp32-tf32", 4), ("bf16", 2)])
def test_pruned_configs_are_the_launchers_prune_for_each_arch(dtype, nbytes):
    """The report checks what the autotuner may pick: keep() for that arch, with or without the launch's
    flags (whichever the launcher passes), falling back to the last config when keep() rejects all."""
    configs = LC.get_linear_configs()
    picked = {}
    for arch in (80, 90):
        rows = [r for r in _linear_rows("dw-gelu", dtype, archs=(arch,)) if r.kernel == "linear_kernel"]
        assert len(rows) == len(configs)
        flags = next(dict(r.job.constexprs) for r in rows if r.job is not None)
        candidates = []
        for f in (None, flags):
            kept = [check.config_label(c) for c in configs if LC.keep(c, nbytes, arch, flags=f)]
            candidates.append(set(kept or [check.config_label(configs[-1])]))
        got = {r.config for r in rows if not r.pruned}
        # prune() may narrow keep()'s list further to the tiles the output fills (test_configs checks how).
        assert got and any(got <= c for c in candidates), (arch, got, candidates)
        assert all((r.job is None) == r.pruned for r in rows)
        picked[arch] = got
    assert all(len(k) < len(configs) for k in picked.values())
    if nbytes == 4:
        assert picked[80] != picked[90], "shared memory and register rules differ between sm_80 and sm_90"



def test_report_prunes_each_launch_with_its_familys_prune(monkeypatch):
    """The report asks the config module's public prune, as the launcher's autotuner does: the launch's
    arguments (constexpr flags included, tile parameters not), the operand size and the arch."""
    seen = []

    def spy(configs, args, *, dtype_bytes, arch):
        seen.append((arch, dtype_bytes, dict(args)))
        return configs[:1]

    monkeypatch.setattr(LC, "prune", spy)
    rows = [r for r in _linear_rows("dx-gelu", "bf16") if r.kernel == "linear_kernel"]
    assert [a for a, _, _ in seen] == [80, 90] and all(b == 2 for _, b, _ in seen)
    for _, _, args in seen:
        assert args["PROLOGUE_ACT"] == "gelu" and args["ROW_SUM"] is False and args["INPUT_PRECISION"] == "ieee"
        assert not any(k.startswith("BLOCK") or k == "GROUP_M" for k in args)
    first = check.config_label(LC.get_linear_configs()[0])
    assert {r.config for r in rows if not r.pruned} == {first}


def test_attention_launches_follow_the_launcher():
    """Forward and backward attention launches: types from the tensors and the kernels' annotations,
    lengths not specialised (do_not_specialize), head dims and flags from the launcher, the preprocess
    kernel with the tiles a GPU launch uses, and the launcher's own prune per architecture."""
    rows = check.build_rows([80, 90], kernels=["attn"], dtypes=["bf16"], cases=["attn-bwd-d80-full"])
    kernels = {r.kernel for r in rows}
    assert kernels == {"attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"}
    dq = next(r.job for r in rows if r.kernel == "attn_bwd_dq_kernel" and r.job is not None)
    sig, consts = dict(dq.signature), dict(dq.constexprs)
    assert sig["Q"] == "*bf16" and sig["LSE"] == "*fp32" and sig["SM_SCALE"] == "fp64"
    assert sig["LQ"] == "i32" and "LQ" not in dq.aligned, "do_not_specialize: no divisibility on lengths"
    assert consts["HEAD_D"] == 80 and consts["BLOCK_D"] == 128 and consts["IS_CAUSAL"] is False
    pre = next(r for r in rows if r.kernel == "attn_bwd_preprocess_kernel")
    assert dict(pre.job.constexprs)["BLOCK_M"] == AC.preprocess_config(80, 2)["BLOCK_M"] == 64
    assert dict(pre.job.options)["num_warps"] == AC.PREPROCESS_WARPS
    for arch in (80, 90):
        fwd = [r for r in check.build_rows([arch], kernels=["attn"], dtypes=["fp16"], cases=["attn-fwd-d128-causal"])]
        kept = {r.config for r in fwd if not r.pruned}
        expect = {check.config_label(c) for c in AC.get_attn_fwd_configs()
                  if AC.keep(c, 128, 2, arch, kernel="fwd") and c.num_stages > 1}
        assert kept and kept <= expect, (arch, kept, expect)


def test_fp32_launches_run_in_full_precision_are_not_held_to_tensor_cores():
    """Above D = 128 the attention backward runs fp32 with INPUT_PRECISION="ieee" even where tf32 is
    allowed (kernels/attention_configs.py::backward_precision): the report judges those launches as FMA code,
    the forward (still tf32) and the D = 128 backward by the tensor-core rule."""
    rows = check.build_rows([90], kernels=["attn"], dtypes=["fp32-tf32"],
                            cases=["attn-bwd-d256", "attn-fwd-d256", "attn-bwd-d128"])
    for r in rows:
        if r.job is None or "preprocess" in r.kernel:
            continue
        precision = dict(r.job.constexprs)["INPUT_PRECISION"]
        expect = "ieee" if r.case == "attn-bwd-d256-causal" else "tf32"
        assert precision == expect, (r.case, r.kernel, precision)
        assert r.needs_tensor_cores == (expect == "tf32"), (r.case, r.kernel)


def test_include_pruned_leaves_out_tiles_certain_to_spill_unless_all_pruned():
    """Calibration runs (--include-pruned) skip the attention tiles whose accumulators and scores alone
    exceed a thread's registers; --all-pruned compiles them too. Pickable configs are never skipped."""
    kw = dict(kernels=["attn"], dtypes=["fp32-ieee"], cases=["attn-fwd-d256"], include_pruned=True)
    rows = check.build_rows([90], **kw)
    skipped = [r for r in rows if r.job is None]
    assert skipped and all(r.pruned for r in skipped)
    assert all(r.job is not None for r in check.build_rows([90], all_pruned=True, **kw))
    big = next(c for c in AC.get_attn_fwd_configs()
               if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (128, 128, 8) and not c.kwargs.get("TMA"))
    assert check.config_label(big) in {r.config for r in skipped}
    assert AC.hopeless(big, "fwd", 256, 256, 4, "ieee") and not AC.hopeless(big, "fwd", 64, 64, 2, None)


def test_build_rows_rejects_unknown_arch_and_dtype():
    with pytest.raises(ValueError, match="arch must be one of"):
        check.build_rows([75])
    with pytest.raises(ValueError, match="dtype must be one of"):
        check.build_rows([90], dtypes=["fp8"])

