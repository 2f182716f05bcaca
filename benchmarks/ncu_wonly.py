"""One weight-only kernel launch at the 8B gate/up shape, for Nsight Compute to profile.

    ncu --clock-control none --set full -k regex:_gemm_kernel --launch-skip 2 --launch-count 1 \\
        -o tile16 python benchmarks/ncu_wonly.py w4t16
    ncu -i tile16.ncu-rep --page source --csv --print-source sass > tile16.csv

Names: ``w4`` (int4 g128) or ``w8`` (int8 per channel), then ``t`` (tile kernel) or ``r`` (row kernel), then
the rows; ``bf16`` is ``F.linear`` at 16 rows (cuBLAS, the baseline). Each runs three times (the first
compiles). Not a benchmark: it prints no timing (ncu's report is the result).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from quantdeploy.kernels.triton_wonly import TritonWeightOnly, run
from quantdeploy.quant.primitives import quantize_weight
from quantdeploy.quant.spec import QuantSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("which", nargs="+", help="w4t16, w8t16, w4r1, w4t64, bf16, ...")
    args = p.parse_args()
    k, n = 4096, 28672
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") * 0.02
    for name in args.which:
        m = 16 if name == "bf16" else int(name[3:])
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        if name == "bf16":
            w16 = w.to(torch.bfloat16)
            for _ in range(3):
                F.linear(x, w16)
        else:
            spec = QuantSpec(dtype="int8", group_size=None) if name.startswith("w8") else QuantSpec(dtype="int4",
                                                                                                  group_size=128)
            layer = TritonWeightOnly(quantize_weight(w, spec))
            for _ in range(3):
                run("row" if name[2] == "r" else "tile", x, layer.qw.tensors["qweight"], layer.scales, layer.zeros,
                    layer.bits, layer.group, layer.locks)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
