"""Run HQQ (half-quadratic quantization: calibration-free, zero points and scales optimized per group) on
every Linear of a model folder but the head (peer side of ``benchmarks/fidelity_peers.py``; runs inside the
peer's own virtual environment, never imports quantdeploy).

Each Linear goes through ``HQQLinear`` with ``BaseQuantizeConfig(nbits, group_size)`` (HQQ's defaults:
axis 1, optimized, integer zero points at 4 bits; scales and zeros kept in the fp16 compute dtype), as a
user quantizes with it; its own ``dequantize()`` gives the effective weight, written to ``--out`` as
safetensors. Prints one JSON line: seconds spent quantizing, versions, thread count.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import hqq
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}
    out, seconds = {}, 0.0
    with torch.no_grad():
        for name, module in linears.items():
            t0 = time.perf_counter()
            layer = HQQLinear(module, quant_config=config, compute_dtype=torch.float16, device="cpu",
                              del_orig=False)
            seconds += time.perf_counter() - t0
            out[f"{name}.weight"] = layer.dequantize().float().reshape(module.weight.shape).contiguous()
    save_file(out, args.out)
    print(json.dumps({"peer": "hqq", "method": "hqq", "seconds": round(seconds, 1), "modules": len(out),
                      "hqq": getattr(hqq, "__version__", "0.2.8"), "config": {"nbits": args.bits,
                      "group_size": args.group_size, "axis": 1, "compute_dtype": "float16"},
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
