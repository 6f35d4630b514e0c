"""Regenerate the SASS fixtures of tests/test_aot_perf.py (needs Triton, no GPU):

    python tests/data/sass/regenerate.py

A small kernel with the shape of the library's main loops: an unmasked loop over full K blocks, then a
masked loop over the tail (the same matmul work plus masks), and an exp2 epilogue; 64x16x16 tiles. Compiled for sm_90
(wgmma) and sm_80 (mma.sync), one pipeline stage to keep the listings short; the encoding lines of
``cuobjdump -sass`` are dropped (the parser ignores them).
"""

import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HERE = os.path.dirname(os.path.abspath(__file__))


@triton.jit
def two_loops(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    full = K // BLOCK_K * BLOCK_K
    for k in range(0, full, BLOCK_K):
        a = tl.load(A + offs_m[:, None] * K + (k + offs_k[None, :]))
        b = tl.load(B + (k + offs_k[:, None]) * BLOCK_N + offs_n[None, :])
        acc = tl.dot(a, b, acc)
    for k in range(full, K, BLOCK_K):
        kk = k + offs_k
        a = tl.load(A + offs_m[:, None] * K + kk[None, :], mask=kk[None, :] < K, other=0.0)
        b = tl.load(B + kk[:, None] * BLOCK_N + offs_n[None, :], mask=kk[:, None] < K, other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(C + offs_m[:, None] * BLOCK_N + offs_n[None, :], tl.math.exp2(acc))


def main():
    from gradkernels.aot.compiler import triton_tool

    sig = {"A": "*fp16", "B": "*fp16", "C": "*fp32", "K": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr"}
    tiles = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16}
    for arch in (80, 90):
        src = ASTSource(fn=two_loops, signature=sig, constexprs=tiles)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 1})
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            text = subprocess.run([triton_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                                  check=True).stdout
        lines = [ln.rstrip() for ln in text.splitlines() if not re.match(r"^\s*/\* 0x[0-9a-f]+ \*/\s*$", ln)]
        lines = [re.sub(r"\s*/\* 0x[0-9a-f]+ \*/$", "", ln) for ln in lines]
        with open(os.path.join(HERE, f"two_loops_sm{arch}.sass"), "w") as f:
            f.write(f"// triton {triton.__version__}, two_loops 64x16x16, 4 warps, 1 stage\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
