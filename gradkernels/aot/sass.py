"""Reading SASS listings: instructions, loops, and the main loop of a kernel.

The input is the text ``cuobjdump -sass`` prints (``/*0190*/  @!P0 HGMMA.64x128x16.F32 R24, ... ;``,
branch targets as addresses) or ``nvdisasm`` output (branch targets as ``.L_x_12`` labels defined on their
own lines); both are handled. Nothing here compiles or needs Triton: the static performance report
(:mod:`.perf`) runs :func:`analyse` on the listing of each compiled kernel, and the tests run it on small
captured snippets.

- An instruction is one line with an address; SASS is per warp, so one instruction is what each thread of
  the warp executes once (per-thread counts are instruction counts).
- A loop is a backward branch (``BRA`` to an address at or before it, not to itself: the ``BRA`` to itself
  after ``EXIT`` is the trap that ends every kernel). Branches to the same head form one loop, from the
  head to the last of them. A loop is innermost when no other loop lies inside it.
- The main loop is an innermost loop holding the tensor-core instructions (HGMMA, HMMA, DMMA) or, for the
  FMA paths (fp32 "ieee", fp64), the most FFMA/DFMA. Kernels whose key loop is written twice (a masked
  half for the diagonal or tail blocks and an unmasked one for the rest) have several candidates with the
  same matmul work; the unmasked steady state is reported: the candidate with the fewest mask operations
  (:data:`MASK_OPS`: selects and compares, and global loads under a predicate), then the fewest
  instructions. Fewest instructions alone is not enough: a masked loop with predicated loads can take
  fewer instructions than its unmasked twin that computes full addresses (see the test fixtures). The
  report says how many candidates there were and their instruction counts.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Iterable, Sequence

# The opcode (with its modifiers) after the address and an optional predicate; operands follow.
_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_[A-Za-z0-9_]+):")
_TARGET = re.compile(r"(0x[0-9a-fA-F]+|\.L_[A-Za-z0-9_]+)")

TENSOR_OPS = ("HGMMA", "HMMA", "DMMA")
FMA_OPS = ("FFMA", "DFMA")
# Where data comes from: TMA (tensor-memory accelerator, sm_90: UTMALDG tiles, UBLKCP bulk copies),
# cp.async (LDGSTS), plain global loads (LDG) and shared-memory reads (LDS, LDSM = ldmatrix).
TMA_OPS = ("UTMALDG", "UBLKCP", "UTMASTG", "UTMAPF")
BARRIER_OPS = ("BAR", "SYNCS", "DEPBAR", "WARPSYNC", "MEMBAR")
# What masking costs: selects and compares, plus global loads and stores under a guard predicate.
MASK_OPS = ("FSEL", "SEL", "ISETP", "FSETP")
_GUARDED_MEMORY = ("LDG", "LDGSTS", "STG")


@dataclasses.dataclass(frozen=True)
class Instr:
    """One SASS instruction: its address, predicate (``@!P0``) if any, opcode with modifiers
    (``HGMMA.64x128x16.F32``) and operand text."""

    addr: int
    opcode: str
    operands: str = ""
    pred: str | None = None

    @property
    def base(self) -> str:
        """The opcode without modifiers (``HGMMA``), except ``MUFU.<function>`` which keeps its function."""
        head, _, rest = self.opcode.partition(".")
        if head == "MUFU" and rest:
            return f"MUFU.{rest.split('.')[0]}"
        return head


@dataclasses.dataclass(frozen=True)
class Loop:
    """Instructions ``[head, tail]`` (addresses) closed by the backward branch at ``tail``."""

    head: int
    tail: int

    def contains(self, other: "Loop") -> bool:
        return self.head <= other.head and other.tail <= self.tail and self != other


def parse(text: str) -> list[Instr]:
    """The instructions of a SASS listing in address order (every kernel of the listing, concatenated;
    :func:`analyse` expects one kernel). Branch targets given as labels are rewritten to addresses."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        addr = int(m.group(1), 16)
        for name in pending:
            labels[name] = addr
        pending = []
        pred = m.group(2).strip() if m.group(2) else None
        instrs.append(Instr(addr, m.group(3), m.group(4).strip(), pred))
    if labels:
        def resolve(ins):
            if ins.base not in ("BRA", "BRX", "JMP"):
                return ins
            t = _TARGET.search(ins.operands)
            if t and t.group(1) in labels:
                return dataclasses.replace(ins, operands=ins.operands.replace(t.group(1), hex(labels[t.group(1)])))
            return ins

        instrs = [resolve(i) for i in instrs]
    return instrs


def branch_target(ins: Instr) -> int | None:
    """The address a direct branch (``BRA``) goes to, else None."""
    if ins.base != "BRA":
        return None
    t = _TARGET.search(ins.operands)
    if t is None or not t.group(1).startswith("0x"):
        return None
    return int(t.group(1), 16)


def find_loops(instrs: Sequence[Instr]) -> list[Loop]:
    """Every loop (backward branches grouped by their head), in address order of the head."""
    tails: dict[int, int] = {}
    for ins in instrs:
        target = branch_target(ins)
        if target is not None and target < ins.addr:  # == ins.addr: the trap loop after EXIT
            tails[target] = max(tails.get(target, target), ins.addr)
    return [Loop(h, t) for h, t in sorted(tails.items())]


def innermost(loops: Sequence[Loop]) -> list[Loop]:
    """The loops with no other loop inside."""
    return [lp for lp in loops if not any(lp.contains(o) for o in loops)]


def body(instrs: Sequence[Instr], loop: Loop) -> list[Instr]:
    """The instructions of one iteration as laid out (both sides of any branch inside are counted)."""
    return [i for i in instrs if loop.head <= i.addr <= loop.tail]


def mma_shape(opcode: str) -> tuple[int, int, int] | None:
    """``(m, n, k)`` of a tensor-core opcode: ``HGMMA.64x128x16.F32`` -> (64, 128, 16) (one warpgroup's
    wgmma); ``HMMA.16816.F32.BF16`` -> (16, 8, 16), ``HMMA.1688.F32.TF32`` -> (16, 8, 8) (one warp's
    mma.sync); ``DMMA.884`` -> (8, 8, 4). None for anything else."""
    head, _, rest = opcode.partition(".")
    if head not in TENSOR_OPS or not rest:
        return None
    shape = rest.split(".")[0]
    if "x" in shape:
        parts = shape.split("x")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
        return None
    if not shape.isdigit():
        return None
    if shape.startswith("16"):
        m, tail = 16, shape[2:]
    elif shape.startswith("8"):
        m, tail = 8, shape[1:]
    else:
        return None
    if len(tail) < 2:
        return None
    return m, int(tail[0]), int(tail[1:])


def mma_flops_per_warp_instr(opcode: str) -> int:
    """FLOPs one warp's instance of a tensor-core instruction contributes (2*m*n*k for a warp-wide
    mma.sync; a quarter of 2*m*n*k for wgmma, which the four warps of a warpgroup issue together)."""
    shape = mma_shape(opcode)
    if shape is None:
        return 0
    m, n, k = shape
    flops = 2 * m * n * k
    return flops // 4 if opcode.startswith("HGMMA") else flops


def mma_kind(opcode: str) -> str | None:
    """The operand type class of a tensor-core opcode: "tf32", "fp8", "fp64" or "16bit" (fp16/bf16)."""
    head = opcode.split(".")[0]
    if head not in TENSOR_OPS:
        return None
    if head == "DMMA":
        return "fp64"
    mods = opcode.upper().split(".")[1:]
    if "TF32" in mods:
        return "tf32"
    if any(m in ("E4M3", "E5M2") for m in mods):
        return "fp8"
    return "16bit"


def shape_label(opcode: str) -> str | None:
    """``m64n128k16`` for ``HGMMA.64x128x16.F32``."""
    s = mma_shape(opcode)
    return None if s is None else f"m{s[0]}n{s[1]}k{s[2]}"


@dataclasses.dataclass
class LoopStats:
    """What one loop iteration issues (per thread = per warp instruction)."""

    head: int
    tail: int
    instructions: int  # all but NOP (alignment padding)
    ops: dict  # base opcode -> count
    mma_shapes: list  # distinct shapes, e.g. ["m64n128k16"]
    mma_counts: dict  # shape label -> count
    mma_flops_per_warp: int  # tensor-core FLOPs one warp's instructions contribute (mma_flops_per_warp_instr)
    mma_kinds: list  # "16bit", "tf32", "fp64", ...
    fma: int  # FFMA + DFMA
    mufu_ex2: int
    tma: int
    cp_async: int  # LDGSTS
    global_loads: int  # LDG
    shared_loads: int  # LDS + LDSM
    barriers: int  # BAR.* (CTA barriers) + SYNCS.* (mbarrier) + DEPBAR + ...
    mask_ops: int  # MASK_OPS + guarded global memory instructions

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def loop_stats(instrs: Sequence[Instr], loop: Loop) -> LoopStats:
    """Counts over one iteration of ``loop``."""
    ins = [i for i in body(instrs, loop) if i.base != "NOP"]
    ops = Counter(i.base for i in ins)
    tensor = [i for i in ins if i.base in TENSOR_OPS]
    shapes = Counter(shape_label(i.opcode) for i in tensor if shape_label(i.opcode))
    kinds = sorted({mma_kind(i.opcode) for i in tensor})
    return LoopStats(
        head=loop.head, tail=loop.tail, instructions=len(ins), ops=dict(sorted(ops.items())),
        mma_shapes=sorted(shapes, key=lambda s: tuple(int(x) for x in re.findall(r"\d+", s))),
        mma_counts=dict(shapes), mma_flops_per_warp=sum(mma_flops_per_warp_instr(i.opcode) for i in tensor),
        mma_kinds=kinds, fma=ops["FFMA"] + ops["DFMA"], mufu_ex2=ops["MUFU.EX2"],
        tma=sum(ops[o] for o in TMA_OPS), cp_async=ops["LDGSTS"], global_loads=ops["LDG"],
        shared_loads=ops["LDS"] + ops["LDSM"], barriers=sum(ops[o] for o in BARRIER_OPS),
        mask_ops=sum(ops[o] for o in MASK_OPS) + sum(1 for i in ins if i.pred and i.base in _GUARDED_MEMORY))


def _work(stats: LoopStats) -> tuple:
    # Matmul work first (tensor cores, else FMAs); among loops doing the same work the unmasked one:
    # fewest mask operations, then fewest instructions.
    return (stats.mma_flops_per_warp, stats.fma if not stats.mma_flops_per_warp else 0, -stats.mask_ops,
            -stats.instructions)


def main_loop(instrs: Sequence[Instr]) -> tuple[LoopStats | None, list[LoopStats]]:
    """The main loop and every innermost loop that does matmul work (tensor-core instructions or, without
    any, FMAs), the main one included.

    The main loop is the candidate with the most tensor-core FLOPs per iteration (the most FMAs on the FMA
    paths); among candidates with that much work, the one with the fewest mask operations, then the fewest
    instructions. None when the kernel has no loop doing matmul work.
    """
    candidates = [loop_stats(instrs, lp) for lp in innermost(find_loops(instrs))]
    working = [s for s in candidates if s.mma_flops_per_warp or s.fma]
    if not working:
        return None, []
    if any(s.mma_flops_per_warp for s in working):
        working = [s for s in working if s.mma_flops_per_warp]
    best = max(working, key=_work)
    return best, working


def kernel_features(instrs: Iterable[Instr]) -> dict:
    """Whole-kernel facts: whether TMA, cp.async or mbarriers appear anywhere, and register reallocation
    between warp groups (``USETMAXREG``, what Triton's warp specialisation emits on sm_90)."""
    ops = Counter(i.base for i in instrs)
    return {"tma": any(ops[o] for o in TMA_OPS), "cp_async": bool(ops["LDGSTS"]),
            "mbarrier": bool(ops["SYNCS"]), "setmaxnreg": bool(ops["USETMAXREG"])}


def analyse(text: str) -> dict:
    """Everything the performance report reads from one kernel's SASS listing.

    Returns:
        ``main`` (:class:`LoopStats` as a dict, or None), ``candidates`` (how many innermost loops do the
        same kind of matmul work), ``other_instructions`` (instruction counts of the other candidates),
        ``loops`` (all loops), ``instructions`` (the whole kernel) and the :func:`kernel_features`.
    """
    instrs = parse(text)
    best, working = main_loop(instrs)
    out = {"main": best.as_dict() if best else None, "candidates": len(working),
           "other_instructions": [s.instructions for s in working if s is not best],
           "loops": len(find_loops(instrs)), "instructions": sum(i.base != "NOP" for i in instrs)}
    out.update(kernel_features(instrs))
    return out
