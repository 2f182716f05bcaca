"""Where the int4 one-row kernel's time goes, and a tile shape that removes most of it: a diagnostic.

    python benchmarks/gemv4_layouts.py [--shapes gate_up down o qkv] [--check]

Times, replayed from CUDA graphs on the Llama-3.1-8B shapes at M = 1 (int4 g128 symmetric), against bf16
``F.linear`` in the same run:

- ``current``: the row kernel the product dispatches to (``kernels/triton_wonly.py:_gemv4_kernel``);
- ``long_k``: a candidate. Few output rows per program (2-16) and a long stretch of K per tile (one to
  several groups, as ``[rows, groups, words of a group]``), x loaded and converted once per tile with no
  row dimension, so each thread reuses its x over the rows it holds, and one scale per row and group.
  The current kernel holds many rows and a short K stretch, so x is converted per code and passes
  through shared memory in the loop (its PTX: 128 barriers, 267 conversions per iteration);
- ``loads_only``: the candidate's loads with one conversion per word and no nibble arithmetic: the
  floor of this access pattern (not a result: its output is wrong by design).

For each kernel it sweeps rows per program, words per tile and warps, and prints the best three. With
``--check`` it runs on any device (``TRITON_INTERPRET=1`` on a CPU) and only compares outputs with the
fp32 reference. The last line is JSON (machine, card, commit, rows).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl

from quantdeploy.eval.report import machine_info
from quantdeploy.kernels.triton_wonly import _eight, _nibble, gemv4_impl
from quantdeploy.quant.primitives import dequantize_weight, quantize_weight
from quantdeploy.quant.spec import QuantSpec

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


@triton.jit
def _long_k_kernel(x_ptr, q_ptr, s_ptr, out_ptr, N, n_groups, tiles_per_split, row_words, stride_os,
                   LOADS_ONLY: tl.constexpr, BLOCK_N: tl.constexpr, WORDS: tl.constexpr, GROUP_WORDS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    GPT: tl.constexpr = WORDS // GROUP_WORDS  # groups per tile
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GPT)
    offs_w = tl.arange(0, GROUP_WORDS)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, GPT, GROUP_WORDS), dtype=tl.float32)
    for i in range(0, tiles_per_split):
        gidx = (pid_k * tiles_per_split + i) * GPT + offs_g
        word = gidx[:, None] * GROUP_WORDS + offs_w[None, :]
        words = tl.load(q_ptr + offs_n[:, None, None] * row_words + word[None, :, :], mask=mask_n[:, None, None],
                        other=0)
        s = tl.load(s_ptr + offs_n[:, None] * n_groups + gidx[None, :], mask=mask_n[:, None], other=0.0)
        if LOADS_ONLY:
            x = tl.load(x_ptr + word * 8).to(tl.float32)
            acc += words.to(tl.float32) * x[None] * s.to(tl.float32)[:, :, None]
        else:
            z = 8388608.0 + 8.0  # symmetric int4: codes around 8, under the 2^23 exponent (see _nibble)
            x = tl.load(x_ptr + word[:, :, None] * 8 + tl.arange(0, 8)[None, None, :]).to(tl.float32)
            x0, x1, x2, x3, x4, x5, x6, x7 = _eight(x)
            part = _nibble(words, 0, z) * x0[None]
            part += _nibble(words, 4, z) * x1[None]
            part += _nibble(words, 8, z) * x2[None]
            part += _nibble(words, 12, z) * x3[None]
            part += _nibble(words, 16, z) * x4[None]
            part += _nibble(words, 20, z) * x5[None]
            part += _nibble(words, 24, z) * x6[None]
            part += _nibble(words, 28, z) * x7[None]
            acc += part * s.to(tl.float32)[:, :, None]
    total = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(out_ptr + pid_k * stride_os + offs_n, total.to(out_ptr.dtype.element_ty), mask=mask_n)


def long_k(x, qweight, scales, group, block_n, words, warps, min_programs, loads_only=False):
    """``x [1, K] @ W.T`` for symmetric int4 codes in groups of ``group`` (K a multiple of ``8 * words``)."""
    n, k = qweight.shape[0], x.shape[1]
    row_words = k // 8
    tiles = row_words // words
    programs = triton.cdiv(n, block_n)
    split = 1  # split K until the grid has min_programs programs, partial sums added after
    while programs * split < min_programs and tiles % (split * 2) == 0 and split * 2 <= tiles // 2:
        split *= 2
    out = torch.empty((split, n), dtype=torch.float32, device=x.device)
    _long_k_kernel[(programs, split)](x, qweight.view(torch.int32), scales, out, n, scales.shape[1], tiles // split,
                                      row_words, n, LOADS_ONLY=loads_only, BLOCK_N=block_n, WORDS=words,
                                      GROUP_WORDS=group // 8, num_warps=warps, num_stages=2)
    return out.sum(0, keepdim=True).to(x.dtype)


def check() -> None:
    """The candidate against the fp32 reference on small shapes (any device; the interpreter on a CPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for k, n, group in ((256, 40, 32), (512, 16, 64), (1024, 24, 128)):
        torch.manual_seed(0)
        qw = quantize_weight(torch.randn(n, k, device=device) * 0.02, QuantSpec(dtype="int4", group_size=group))
        x = torch.randn(1, k, device=device)
        ref = x @ dequantize_weight(qw).T
        for block_n, words in ((4, group // 8), (16, 2 * group // 8)):
            y = long_k(x, qw.tensors["qweight"], qw.tensors["scales"], group, block_n, words, 1, 4)
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            print(f"k={k} n={n} g={group} rows/program={block_n} words/tile={words}: max rel err {err:.2e}")
            assert err < 1e-5, err


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--check", action="store_true", help="only compare the candidate with the reference")
    args = p.parse_args()
    if args.check:
        return check()
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3  # noqa: E731 - µs
    rows = []
    print(f"int4 g128 symmetric, M = 1, on {torch.cuda.get_device_name()}; µs replayed from CUDA graphs (median)")
    for shape in args.shapes:
        k, n = SHAPES[shape]
        torch.manual_seed(0)
        w = torch.randn(n, k, device=device) * 0.02
        qw = quantize_weight(w, QuantSpec(dtype="int4", group_size=128))
        q, s = qw.tensors["qweight"], qw.tensors["scales"]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        w16 = w.to(torch.bfloat16)
        base = bench(lambda: torch.nn.functional.linear(x, w16))
        current = bench(lambda: gemv4_impl(x, q, s, None, 128))
        print(f"{shape:8s} bf16 {base:6.1f} | current {current:6.1f} ({base / current:.2f}x bf16)", flush=True)
        rows.append({"shape": shape, "kernel": "current", "us": current, "bf16_us": base})
        for loads_only in (False, True):
            found = []
            for block_n, words, warps in itertools.product((2, 4, 8, 16), (16, 32, 64, 128), (1, 2, 4)):
                run = lambda: long_k(x, q, s, 128, block_n, words, warps, 4 * sms, loads_only)  # noqa: E731
                found.append((bench(run), block_n, words, warps))
            found.sort()
            name = "loads_only" if loads_only else "long_k"
            for us, block_n, words, warps in found[:3]:
                print(f"  {name:10s} {us:6.1f} us ({base / us:.2f}x bf16)  rows/program={block_n} words/tile={words} "
                      f"warps={warps}", flush=True)
            us, block_n, words, warps = found[0]
            rows.append({"shape": shape, "kernel": name, "us": us, "bf16_us": base, "rows_per_program": block_n,
                         "words_per_tile": words, "warps": warps})
    print(json.dumps({**machine_info(), "benchmark": "gemv4_layouts", "config": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
