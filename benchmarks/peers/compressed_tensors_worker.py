"""Load an exported compressed-tensors folder with transformers + compressed-tensors and write its logits
(consumer side of ``benchmarks/export_check.py``; runs inside the consumer's own virtual environment,
never imports quantdeploy).

Reads token ids ``[rows, seq_len]`` from a safetensors file, runs the model in ``--dtype``, writes the
logits (fp32) to ``--out`` and prints one JSON line: versions, the quantization format transformers
reports, load and forward seconds.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import compressed_tensors
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    ids = load_file(args.tokens)["input_ids"]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = torch.cat([model(ids[i:i + 1]).logits.float() for i in range(ids.shape[0])])
    save_file({"logits": logits.contiguous()}, args.out)
    qc = getattr(model.config, "quantization_config", None)
    qc = qc.to_dict() if hasattr(qc, "to_dict") else (qc or {})
    print(json.dumps({"compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__,
                      "torch": torch.__version__, "format": qc.get("format"), "load_s": load_s,
                      "forward_s": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
