"""How many instructions a weight-only kernel's main loop spends per code: the row or tile kernel compiled
for a Hopper GPU (sm_90) on this machine (no GPU needed: Triton's wheel carries ptxas and nvdisasm), its
SASS disassembled, and the longest loop's instructions counted by opcode.

    python benchmarks/sass_loop.py row --rows 1 --block-n 32 --chunks 4 --warps 4 [--asym] [--fp32-decode]
    python benchmarks/sass_loop.py tile --block-m 16 --block-n 128 --block-k 64 --warps 4

At a few rows these kernels are bound by their instruction rate as much as by the weight's bytes (an H200
moves ~2 int4 codes per byte at 4 TB/s while issuing ~1e12 warp instructions a second), so this count is
the lever the row kernel's bf16 pairs pulled (``results/gemv4-bf16-pairs-h200.txt``). A diagnostic: it
says nothing of memory or latency; the timings are ``wonly_dispatch.py``'s on the device. The counts
depend on the Triton (and its ptxas) installed: the record's are Triton 3.6's, the device's version.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from quantdeploy.kernels import triton_gemm, triton_gemv

INTS = ("M", "N", "K", "n_groups", "tiles_per_split", "row_words", "stride_xm", "stride_os")


def compile_sass(fn, pointers: dict[str, str], constants: dict, warps: int, stages: int) -> str:  # noqa: ANN001
    signature = {name: pointers.get(name, "i32") for name in fn.arg_names}
    signature.update({name: "constexpr" for name in constants})
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> collections.Counter:
    """Opcodes of the longest stretch between a label and a backward branch to it."""
    labels = {m.group(1): m.start() for m in re.finditer(r"\.(L_x_\d+):", sass)}
    body = ""
    for m in re.finditer(r"BRA\s+(?:[!P\w]+\s+)?`\(\.(L_x_\d+)\)", sass):
        start = labels.get(m.group(1), m.start())
        if start < m.start() and m.start() - start > len(body):
            body = sass[start:m.start()]
    ops = collections.Counter()
    for line in body.splitlines():
        op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if op:
            ops[op.group(1).split(".")[0]] += 1
    return ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kernel", choices=["row", "tile"])
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--asym", action="store_true")
    p.add_argument("--fp32-decode", action="store_true", help="row: the fp32 decode instead of the bf16 pairs")
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--block-n", type=int, default=32)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--block-m", type=int, default=16)
    p.add_argument("--block-k", type=int, default=64)
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=3)
    args = p.parse_args()
    pointers = {"x_ptr": "*bf16", "q_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*u8", "out_ptr": "*bf16"}
    common = {"BITS": args.bits, "GROUP": args.group, "SYMMETRIC": not args.asym}
    if args.kernel == "row":
        constants = {**common, "PER_CHANNEL": False, "EVEN": True, "ROWS": args.rows, "BLOCK_N": args.block_n,
                     "CHUNK": 16, "CHUNKS": args.chunks, "PAIRS": args.bits == 4 and not args.fp32_decode,
                     "SPLIT": False, "LUT": False, "FP8": False, "ROW_SCALED": False}
        sass = compile_sass(triton_gemv._gemv_kernel, pointers, constants, args.warps, 2)
        codes = args.block_n * args.chunks * 16 * (32 // args.bits)
    else:
        constants = {**common, "IEEE": False, "EVEN": True, "FINE": False, "BLOCK_M": args.block_m,
                     "BLOCK_N": args.block_n, "BLOCK_K": args.block_k, "GROUP_M": 8}
        sass = compile_sass(triton_gemm._gemm_kernel, pointers, constants, args.warps, args.stages)
        codes = args.block_n * args.block_k
    ops = main_loop(sass)
    per_thread = codes / (32 * args.warps)
    total = sum(ops.values())
    print(f"{args.kernel} {constants}: {total} instructions per loop iteration, {per_thread:.0f} codes per thread "
          f"-> {total / per_thread:.2f} per code")
    print("  " + ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))


if __name__ == "__main__":
    main()
