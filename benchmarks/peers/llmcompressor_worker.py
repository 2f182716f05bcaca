"""Run llm-compressor's GPTQ or AWQ on a model folder with given calibration tokens (peer side of
``benchmarks/fidelity_peers.py``; runs inside the peer's own virtual environment, never imports
quantdeploy).

Writes the effective (quantize→dequantize) weight of every quantized Linear, computed by
compressed-tensors' own fake-quantize function (the one its forward pass uses), to ``--out`` as
safetensors, and prints one JSON line: seconds spent in ``oneshot``, versions, thread count.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True, help="safetensors file with input_ids [samples, seq_len]")
    p.add_argument("--method", choices=["gptq", "awq"], required=True)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import compressed_tensors
    import llmcompressor
    import torch
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = load_file(args.tokens)["input_ids"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    weights = {"num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
               "group_size": args.group_size}
    scheme = {"group_0": {"targets": ["Linear"], "weights": weights}}
    if args.method == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        # act-order with static groups, as ours (compressed-tensors calls it "weight" ordering)
        scheme["group_0"]["weights"]["actorder"] = "weight"
        recipe = GPTQModifier(ignore=["lm_head"], config_groups=scheme, dampening_frac=0.01, block_size=128)
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(ignore=["lm_head"], config_groups=scheme)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=ids.shape[1],
            num_calibration_samples=ids.shape[0])
    seconds = time.perf_counter() - t0

    out = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            qargs = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if qargs is None or not hasattr(module, "weight_scale"):
                continue
            zero = getattr(module, "weight_zero_point", None)
            g_idx = getattr(module, "weight_g_idx", None)
            out[f"{name}.weight"] = fake_quantize(module.weight.float(), module.weight_scale.float(),
                                                  zero, qargs, g_idx).contiguous()
    save_file(out, args.out)
    print(json.dumps({"peer": "llmcompressor", "method": args.method, "seconds": round(seconds, 1),
                      "modules": len(out), "llmcompressor": llmcompressor.__version__,
                      "compressed_tensors": compressed_tensors.__version__, "torch": torch.__version__,
                      "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
