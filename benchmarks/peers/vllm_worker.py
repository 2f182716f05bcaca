"""Load an exported folder in vLLM (the CPU build) and write greedy tokens for given prompts (consumer side
of ``benchmarks/export_check.py --vllm``; runs inside vLLM's own virtual environment, never imports
quantdeploy).

Reads a JSON list of prompts, generates ``--max-tokens`` greedy tokens for each with ``ignore_eos``,
prints one JSON line: versions, the quantization and KV-cache dtype vLLM reports, seconds, and the token ids per prompt;
or, when vLLM refuses the folder, ``{"error": last line of the exception}``.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-dtype", default="auto", help="fp8: use the folder's KV-cache scales (kv_cache_scheme)")
    args = p.parse_args()
    prompts = json.loads(open(args.prompts).read())
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    try:
        # on CPU the 'gpu' memory fraction is the share of RAM reserved for the KV cache: a small model needs little
        llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512, enforce_eager=True, seed=0,
                  gpu_memory_utilization=0.25, kv_cache_dtype=args.kv_cache_dtype)
    except Exception as err:  # noqa: BLE001 - a refusal is the result to record
        print(json.dumps({"error": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"}))
        return
    load_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    quant = getattr(llm.llm_engine.model_config, "quantization", None)
    cache = getattr(llm.llm_engine.vllm_config.cache_config, "cache_dtype", None)
    print(json.dumps({"vllm": vllm.__version__, "torch": torch.__version__, "quantization": quant, "kv_cache": cache,
                      "load_s": load_s,
                      "generate_s": time.perf_counter() - t0,
                      "tokens": [list(o.outputs[0].token_ids) for o in outs]}))


if __name__ == "__main__":
    main()
