"""Sweep a plain Triton GEMV (bf16, few rows of x) over block shapes on the decode matmul shapes of the
Llama-3.1-8B layer, against cuBLAS: is a hand-written kernel worth it for the decode step?

    python benchmarks/gemv_sweep.py [--m 1]

A diagnostic: prints, per shape, cuBLAS and the best kernel config, in µs and GB/s of the weight read.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton
import triton.language as tl


@triton.jit
def gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        rk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=rn[:, None] < N, other=0.0)  # [BN, BK]
        x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=rm[:, None] < M, other=0.0)  # [BM, BK]
        acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.bfloat16), mask=(rm[:, None] < M) & (rn[None, :] < N))


def gemv(x, w, block_n, block_k, warps, stages):
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    gemv_kernel[(triton.cdiv(n, block_n),)](x, w, y, m, n, k, BLOCK_M=max(1, triton.next_power_of_2(m)),
                                            BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, num_warps=warps)
    return y


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=1)
    args = p.parse_args()
    shapes = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336)}
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    bw = 2 * src.numel() * 4 / copy_ms / 1e6
    print(f"copy bandwidth {bw:.0f} GB/s; m={args.m}")
    del src, dst
    for name, (n, k) in shapes.items():
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
        x = torch.randn(args.m, k, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x, ws[0])
        state = {"i": 0}

        def rotate(fn):
            def run():
                state["i"] = (state["i"] + 1) % len(ws)
                return fn(ws[state["i"]])
            return run

        t_cublas = triton.testing.do_bench(rotate(lambda w: torch.nn.functional.linear(x, w)), return_mode="median")
        best = None
        for bn, bk, warps, stages in itertools.product((2, 4, 8, 16), (256, 512, 1024), (2, 4, 8), (2, 3, 4)):
            try:
                out = gemv(x, ws[0], bn, bk, warps, stages)
                if (out.float() - ref.float()).norm() / ref.float().norm() > 1e-2:
                    continue
                t = triton.testing.do_bench(rotate(lambda w: gemv(x, w, bn, bk, warps, stages)), return_mode="median")
            except Exception:  # a config that does not compile or fit
                continue
            if best is None or t < best[0]:
                best = (t, bn, bk, warps, stages)
        gb = n * k * 2 / 1e6
        print(f"{name:5s} {n}x{k}: cuBLAS {1e3 * t_cublas:6.1f} us {gb / t_cublas:6.0f} GB/s | triton {1e3 * best[0]:6.1f} us "
              f"{gb / best[0]:6.0f} GB/s ({100 * gb / best[0] / bw:.0f}%) BN={best[1]} BK={best[2]} warps={best[3]} stages={best[4]}")
        del ws


if __name__ == "__main__":
    main()
