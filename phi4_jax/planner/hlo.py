"""What a compiled XLA program does, read from its scheduled HLO: loops, FLOPs, memory traffic, collectives.

Every count is per call of the program. XLA's `cost_analysis()` counts each loop body once (a
prompt's pieces, the ring's steps) and, on TPU, counts every staging copy into VMEM (memory space
S(1)) on top of the reads it serves; so the planner reads the program itself. Main memory (HBM; a
CPU's RAM) is memory space 0, written as no `S(n)` or `S(0)` in a layout.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
         "f64": 8, "s64": 8, "u64": 8}
# An instruction: its name, result type, opcode and the rest (operands, then attributes).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?(%[\w.-]+) = (.*?) ([a-z][\w-]*)\((.*)$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](\{[^}]*\})?")
_COMPUTATION = re.compile(r"^(ENTRY )?(%[\w.-]+) ")
# Instructions that move no data of their own (their operands' and results' bytes are others').
_NO_TRAFFIC = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
               "after-all", "opt-barrier", "partition-id", "replica-id", "iota"}
# Reads of part of an operand: a fusion whose parameter only these use reads their results' bytes.
_SLICES = {"dynamic-slice", "slice", "gather"}


@dataclasses.dataclass
class Array:
    dtype: str
    dims: tuple[int, ...]
    layout: str

    @property
    def bytes(self) -> int:
        return math.prod(self.dims) * BYTES.get(self.dtype, 4)

    @property
    def in_main_memory(self) -> bool:
        space = re.search(r"S\((\d+)\)", self.layout)
        return space is None or space.group(1) == "0"


@dataclasses.dataclass
class Instruction:
    """One instruction; `arrays` are the values it produces (an asynchronous start: only what it
    will write, not the aliases of its operands or its context)."""

    name: str
    arrays: list[Array]
    op: str
    operands: list[str]
    line: str

    @property
    def dims(self) -> tuple[int, ...]:
        return self.arrays[0].dims if self.arrays else ()

    @property
    def bytes(self) -> int:
        return sum(a.bytes for a in self.arrays)

    @property
    def main_memory_bytes(self) -> int:
        return sum(a.bytes for a in self.arrays if a.in_main_memory)

    @property
    def in_main_memory(self) -> bool:
        return all(a.in_main_memory for a in self.arrays)


def _elements(text: str) -> list:
    """A result type as a nested list of `Array`s (a tuple is a list)."""
    out, stack = [], []
    position = 0
    while position < len(text):
        char = text[position]
        if char == "(":
            stack.append(out)
            out = []
        elif char == ")":
            inner, out = out, stack.pop()
            out.append(inner)
        else:
            match = _ARRAY.match(text, position)
            if match:
                dtype, dims, layout = match.groups()
                out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), layout or ""))
                position = match.end()
                continue
        position += 1
    return out


def _produced(op: str, result: list) -> list[Array]:
    """The arrays an instruction writes: of an asynchronous start's tuple, the destination
    (`copy-start`: (destination, source, context); others: (operands, destination, context))."""
    if len(result) == 1 and isinstance(result[0], list):  # a tuple result
        result = result[0]
        if op == "copy-start":
            result = result[:1]
        elif op.endswith("-start") and len(result) >= 2:
            result = result[1:2]
    flat = []
    for r in result:
        flat.extend(r if isinstance(r, list) else [r])
    return [a for a in flat if isinstance(a, Array)]


@dataclasses.dataclass
class Program:
    """A scheduled HLO module: its computations' instructions, which computations fusions and
    reductions call (their insides run in registers and VMEM: `fused`), how many times each
    computation runs per call of the program, and which run inside a loop (`looped`)."""

    computations: dict[str, list[Instruction]]
    fused: set[str]
    runs: dict[str, int]
    by_name: dict[str, Instruction]
    looped: set[str] = dataclasses.field(default_factory=set)

    def instructions(self, fused: bool | None = None, looped: bool | None = None):
        """(instruction, times it runs) over the computations: fused ones only or none of them,
        those inside loops only or those outside them (None: all)."""
        for name, body in self.computations.items():
            if (fused is None or (name in self.fused) == fused) and (looped is None or (name in self.looped) == looped):
                for instruction in body:
                    yield instruction, self.runs.get(name, 1)


def parse(text: str) -> Program:
    computations, current, entry, last = {}, None, None, None
    for line in text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current, last = head.group(2), None
            computations[current] = []
            entry = current if head.group(1) else entry
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, result, op, rest = match.groups()
            operands = rest.split(")", 1)[0]
            last = Instruction(name, _produced(op, _elements(result)), op, re.findall(r"%[\w.-]+", operands), line)
            computations[current].append(last)
        elif last is not None:  # an instruction's attributes go on over several lines (a kernel's metadata)
            last.line += "\n" + line
    by_name = {i.name: i for body in computations.values() for i in body}
    fused = {called for body in computations.values() for i in body if i.op == "fusion"
             for called in re.findall(r"calls=(%[\w.-]+)", i.line)}
    fused |= {called for body in computations.values() for i in body if i.op != "call"
              for called in re.findall(r"to_apply=(%[\w.-]+)", i.line)}
    runs: dict[str, int] = {}
    looped: set[str] = set()

    def visit(name: str, times: int, inside: bool = False) -> None:
        runs[name] = runs.get(name, 0) + times
        if inside:
            looped.add(name)
        for i in computations.get(name, []):
            if i.op == "while":
                condition = re.search(r"condition=(%[\w.-]+)", i.line).group(1)
                known = re.search(r'"known_trip_count":\{"n":"(\d+)"', i.line)
                trips = int(known.group(1)) if known else _trip_count(computations, condition)
                visit(re.search(r"body=(%[\w.-]+)", i.line).group(1), times * trips, True)
                visit(condition, times * (trips + 1), True)
            else:
                for called in re.findall(r"(?:calls|branch_computations|to_apply)=\{?(%[\w.-]+(?:, %[\w.-]+)*)",
                                         i.line):
                    for c in called.split(", "):
                        visit(c, times, inside)

    if entry:
        visit(entry, 1)
    return Program(computations, fused, runs, by_name, looped)


def _trip_count(computations: dict[str, list[Instruction]], condition: str) -> int:
    """A counted loop's trips, where XLA did not note them: its condition compares the counter
    (from 0, as JAX's `fori_loop` and `scan` count) with a constant, perhaps inside a fusion. A
    bound that is not a constant (decode's steps) counts 1: a step."""
    body = list(computations.get(condition, []))
    for i in computations.get(condition, []):
        if i.op == "fusion":
            body += computations.get(re.search(r"calls=(%[\w.-]+)", i.line).group(1), [])
    constants = {i.name: int(m.group(1)) for i in body
                 if i.op == "constant" and (m := re.search(r"constant\((\d+)\)", i.line))}
    for i in body:
        if i.op == "compare" and "direction=LT" in i.line:
            bound = [constants[o] for o in i.operands if o in constants]
            if bound:
                return bound[0]
    return 1


def matmul_flops(program: Program) -> int:
    """2 x multiply-adds of every dot, convolution (TPU writes matmuls as convolutions), cuBLAS
    matmul (GPU) and flash attention kernel (splash on TPU, cuDNN on GPU: its scores and weighted
    values, every key counted), each times its computation runs."""
    total = 0
    for i, times in program.instructions():
        if i.op == "dot":
            lhs = program.by_name[i.operands[0]]
            contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.line).group(1)
            total += times * 2 * math.prod(i.dims) * math.prod(lhs.dims[int(d)] for d in contracted.split(",") if d)
        elif i.op == "convolution":
            total += times * 2 * _convolution_macs(i, program.by_name[i.operands[0]], program.by_name[i.operands[1]])
        elif i.op == "custom-call" and ("$gemm" in i.line or "$matmul" in i.line):  # cuBLAS on GPU
            lhs = program.by_name[i.operands[0]]
            contracted = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', i.line).group(1)
            total += times * 2 * math.prod(i.arrays[0].dims) * math.prod(
                lhs.dims[int(d.strip('"'))] for d in contracted.split(",") if d)
        elif i.op == "custom-call" and '"tpu_custom_call"' in i.line and "splash_mha_fwd" in i.line:
            total += times * _splash_flops(program, i)
        elif i.op == "custom-call" and '"__cudnn$fmha' in i.line:  # cuDNN's flash attention (GPU)
            q, k = (program.by_name[name].arrays[0] for name in i.operands[:2])  # [B, T, heads | kv_heads, D]
            total += times * 4 * math.prod(q.dims) * k.dims[1]
    return total


def _splash_flops(program: Program, call: Instruction) -> int:
    """The scores and the weighted values of one splash attention call (a Mosaic custom call whose
    first float operands are q `[rows..., heads, queries, head_dim]` and k `[rows..., kv_heads, keys,
    head_dim]`): 4 x rows x heads x queries x keys x head_dim, every key block counted as XLA's
    products count them (the kernel skips the blocks its mask hides; the engine gives it only the
    keys a piece reaches)."""
    q, k = [a for name in call.operands for a in program.by_name[name].arrays
            if len(a.dims) >= 3 and a.dtype in ("bf16", "f16", "f32")][:2]
    return 4 * math.prod(q.dims) * k.dims[-2]


def _convolution_macs(out: Instruction, lhs: Instruction, kernel: Instruction) -> int:
    """Multiply-adds of a convolution: per output batch and feature, the kernel's input features
    times the (output, window tap) pairs that land on an input element in each spatial dimension.
    TPU writes a batched matmul's extra axes (KV heads, query groups) as windows over padded or
    dilated spatial dimensions, where most taps land on padding."""
    in_labels, kernel_labels, out_labels = re.match(r"(\w+)_(\w+)->(\w+)", re.search(
        r"dim_labels=(\S+)", out.line).group(1)).groups()
    size = lambda dims, labels, label: dims[labels.index(label)]  # noqa: E731
    macs = size(out.dims, out_labels, "b") * size(out.dims, out_labels, "f") * size(kernel.dims, kernel_labels, "i")
    window = re.search(r"window=\{([^}]*)\}", out.line)
    attributes = dict(field.split("=") for field in window.group(1).split()) if window else {}
    spatial = sorted(filter(str.isdigit, out_labels))
    per_dim = lambda key, default: ([int(v) for v in attributes[key].split("x")] if key in attributes  # noqa: E731
                                    else [default] * len(spatial))
    strides, lhs_dilations, rhs_dilations = per_dim("stride", 1), per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    pads = [int(p.split("_")[0]) for p in attributes["pad"].split("x")] if "pad" in attributes else [0] * len(spatial)
    for d, label in enumerate(spatial):
        o, n, w = (size(out.dims, out_labels, label), size(lhs.dims, in_labels, label),
                   size(kernel.dims, kernel_labels, label))
        macs *= _pairs(o, n, w, strides[d], pads[d], lhs_dilations[d], rhs_dilations[d])
    return macs


def _pairs(outputs: int, inputs: int, taps: int, stride: int, pad: int, lhs_dilation: int, rhs_dilation: int) -> int:
    """(output, tap) pairs of one spatial dimension whose tap lands on an input element, not on
    padding or a dilation's hole."""
    if outputs * taps > 1 << 20:  # a real image-sized convolution: every tap counted
        return outputs * taps
    count = 0
    for o in range(outputs):
        for k in range(taps):
            at = o * stride + k * rhs_dilation - pad
            count += at >= 0 and at % lhs_dilation == 0 and at // lhs_dilation < inputs
    return count


_IN_PLACE = {"dynamic-update-slice": 1, "scatter": 2}  # ops that update their operand 0: their update's operand


def main_memory_bytes(program: Program, looped: bool | None = None) -> int:
    """Bytes the program reads from and writes to main memory per call: each operand and result in
    memory space 0 of the instructions outside fusions, times they run; an asynchronous copy or
    slice at its main-memory end. A slice of an operand (a row of the embedding, a block of a
    weight staged into VMEM) counts the slice, and an update in place (a cache slot; each row's
    slot, by a scatter) the update. A kernel's call (splash, cuDNN) counts its operands whole, where
    the kernel may fetch blocks of them only (splash's mask blocks): an upper bound there.
    `looped`: only what runs inside loops (True; a decode call's steps) or outside them (False)."""
    total = 0
    for i, times in program.instructions(fused=False, looped=looped):
        if i.op in _NO_TRAFFIC or i.op.endswith("-done"):
            continue
        inside = _fused_body(program, i)
        in_place = 0 if i.op in _IN_PLACE else _updated_in_place(inside)
        reads = 0
        for index, name in enumerate(i.operands):
            operand = program.by_name.get(name)
            if operand is None or operand.op == "constant" or index == in_place:
                continue
            part = operand.main_memory_bytes
            if index == 0 and (i.op in _SLICES or i.op == "slice-start"):
                part = min(part, i.bytes)
            elif (sliced := _slice_bytes(inside, index)) is not None:
                part = min(part, sliced)
            reads += part
        if in_place is None:
            writes = i.main_memory_bytes
        else:
            updating = i if i.op in _IN_PLACE else _root(inside)
            update = updating.operands[_IN_PLACE[updating.op]]
            writes = program.by_name[update].bytes if i.in_main_memory else 0
        total += times * (reads + writes)
    return total


def _fused_body(program: Program, i: Instruction) -> list[Instruction]:
    if i.op != "fusion":
        return []
    return program.computations.get(re.search(r"calls=(%[\w.-]+)", i.line).group(1), [])


def _root(body: list[Instruction]) -> Instruction | None:
    return next((i for i in body if i.line.lstrip().startswith("ROOT ")), None)


def _parameter(body: list[Instruction], index: int) -> Instruction | None:
    return next((i for i in body if i.op == "parameter" and f"parameter({index})" in i.line), None)


def _updated_in_place(body: list[Instruction]) -> int | None:
    """The fusion's operand that its root updates in place (a dynamic-update-slice or a scatter of a
    parameter: XLA writes those into the operand's buffer, copying it first where it cannot, a copy
    `memory_copy_bytes` counts)."""
    root = _root(body)
    if root is None or root.op not in _IN_PLACE:
        return None
    target = next((i for i in body if i.name == root.operands[0]), None)
    if target is None or target.op != "parameter":
        return None
    return int(re.search(r"parameter\((\d+)\)", target.line).group(1))


def _slice_bytes(body: list[Instruction], index: int) -> int | None:
    """The bytes a fusion reads of operand `index` when only slices use it, else None."""
    parameter = _parameter(body, index)
    if parameter is None:
        return None
    users = [i for i in body if parameter.name in i.operands]
    if users and all(u.op in _SLICES and u.operands[0] == parameter.name for u in users):
        return sum(u.bytes for u in users)
    return None


def memory_copy_bytes(program: Program) -> int:
    """Bytes copied from main memory to main memory per call: XLA's `copy` and `copy-start` whose
    operand and result both lie there. (TPU moves what a fusion reads into VMEM and what it wrote
    back out by asynchronous copies: that is how it reads and writes, not a duplicate. A weight
    or a cache layer copied within HBM would be one.)"""
    return sum(times * i.main_memory_bytes for i, times in program.instructions(fused=False)
               if i.op in ("copy", "copy-start") and program.by_name.get(i.operands[0], i).in_main_memory)


def collective_counts(program: Program) -> dict[str, int]:
    """How many of each collective the program holds (each once, wherever it runs)."""
    counts = collections.Counter(i.op.removesuffix("-start") for i, _ in program.instructions()
                                 if i.op.removesuffix("-start") in COLLECTIVES)
    return dict(counts)


def collective_result_bytes(program: Program) -> dict[str, list[int]]:
    """Per collective kind, the bytes of each one's result, largest first: which ones move
    activations and which a few scalars."""
    sizes = collections.defaultdict(list)
    for i, _ in program.instructions():
        if i.op.removesuffix("-start") in COLLECTIVES:
            sizes[i.op.removesuffix("-start")].append(i.bytes)
    return {k: sorted(v, reverse=True) for k, v in sizes.items()}


def permutes_under_compute(program: Program) -> int:
    """How many asynchronous collective-permutes have compute (a fusion, a dot or a convolution)
    scheduled between their start and their done: transfers that run under it (the ring's next
    block while this one is computed)."""
    under = 0
    for body in program.computations.values():
        starts = {}
        for position, i in enumerate(body):
            if i.op == "collective-permute-start":
                starts[i.name] = position
            elif i.op == "collective-permute-done" and i.operands and i.operands[0] in starts:
                between = body[starts.pop(i.operands[0]) + 1:position]
                under += any(b.op in ("fusion", "dot", "convolution") for b in between)
    return under
