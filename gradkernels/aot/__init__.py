"""Ahead-of-time compile report: is every kernel config the autotuner can pick fit for a real GPU?

Triton's interpreter runs code that a real GPU build rejects or runs badly, so every kernel x every
config its factory returns x each dtype x representative launches (activations, split-K, head dims) is
compiled here for real GPU targets, on the CPU, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, and the cubin is read with the
``cuobjdump`` that ships with Triton. A config fails when it does not compile, spills, needs more shared
memory or registers than one block may use on the architecture (``kernels/arch.py``), or when a matmul
kernel with 16-bit or tf32 operands has no tensor-core instruction. The configs the autotuner may pick
are those the config modules' ``prune()`` (``kernels/*_configs.py``) keeps for the launch; the others
are shown as pruned and compiled only with ``--include-pruned``, to check the rule itself.

One module per role:

- :mod:`.targets`    the dtypes compiled (and the architectures, from ``kernels/arch.py``)
- :mod:`.cases`      the catalogue: representative launcher calls per kernel family, and how each tuned
                     kernel's tiles are chosen (config factory + prune)
- :mod:`.recorder`   calls a launcher on ``meta`` tensors with its kernels swapped for a recorder
- :mod:`.signature`  turns a recorded launch into a compile job the way Triton specialises a launch
- :mod:`.compiler`   the compile pool: one job -> cubin -> resource usage and SASS (reusable by any
                     report that analyses machine code)
- :mod:`.check`      the report's rows (launch x config x arch), compiling them and judging each
- :mod:`.report`     the table, the summary and the JSON of the rows
- :mod:`.tiles`      the attention tile table (``kernels/attention_tiles.py``) written from reports
- :mod:`.real`       checks against a real GPU: real launches, the autotuner's picks
- :mod:`.sass`       reading SASS listings: loops, the main loop, tensor-core shapes (no Triton needed)
- :mod:`.perf`       the static performance report: the main loop of every kept config, an issue model
- :mod:`.cli`        ``python -m gradkernels.aot [check|compare-real|tiles|perf] ...``

Usage: ``python -m gradkernels.aot check --arch 80,90 --kernel attn --failures-only`` (``check`` is the
default subcommand), ``python -m gradkernels.aot perf --arch 90 --kernel attn_fwd --picked-only``; see
bench/GPU.md.
"""
