"""GPU decode speed on the Llama-3.1-8B shape with random bf16 weights: our engine (torch.compile +
CUDA graphs), transformers with a static cache and torch.compile, and the bandwidth roofline, all in
one process on one card.

    python benchmarks/engine_gpu.py --batches 1 --hf          # batch 1: ours vs transformers vs roofline
    python benchmarks/engine_gpu.py --quant bf16 w4g128 w4g128-head w8 --peers torchao-int4 torchao-int4-head torchao-int8
                                                               # quantized, against torchao 0.17 in the same run
    python benchmarks/engine_gpu.py --batches 4 16 64         # batch scaling (rows at different positions)
    python benchmarks/engine_gpu.py --layers 8 --batches 64 --prompt-len 192 --max-seq-len 256 8192 32768
                                                               # decode cost against the cache reserved per row
    python benchmarks/engine_gpu.py --layers 8 --batches 1 16 --prompt-len 8192 --steps 32 --max-seq-len 8300
                                                               # long context

The cache holds ``--max-seq-len`` positions per row (default 2,048, what ``serve`` allocates); several
values run one after the other on the same weights, ratios to the first in the JSON line.

Roofline: decode at batch B must read every weight once (the input-embedding table excepted: B rows)
plus the KV cache it attends over; ``bytes / measured copy bandwidth`` is the fastest a step can be.
Random weights: speed does not depend on the values (attention over random keys costs the same).
Prints a table, then one JSON line (machine, card, commit, config).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from quantdeploy.bench.decode import BenchConfig, bench_engine, measure_bandwidth, weight_bytes
from quantdeploy.engine.engine import Engine
from quantdeploy.eval.report import machine_info
from quantdeploy.models.bundle import ModelBundle, SourceInfo


VARIANTS = {  # name: Engine keyword arguments
    "default": {},
    "cd": {"compile_options": {"coordinate_descent_tuning": True}},  # the default before 71a5691
    "sdpa": {"decode_attention": "sdpa"},
    "cd-sdpa": {"compile_options": {"coordinate_descent_tuning": True}, "decode_attention": "sdpa"},
    "autotune": {"compile_options": {"coordinate_descent_tuning": True, "max_autotune_gemm": True}},
    "reduce": {"decode_attention": "reduce"},
    "pdl": {"compile_options": {"triton.enable_pdl": True}},  # Inductor's kernels with PDL (results/pdl-decode-h200.txt)  # attention over the whole static cache under a mask (before split-KV)
}


def quant_configs() -> dict:
    """Weight formats to compare with bf16 in one run (``--quant``): name -> quantize config (None: bf16)."""
    import quantdeploy as qd

    return {"bf16": None, "w4g128": qd.RTNConfig(bits=4, group_size=128),
            "w4g128-head": qd.RTNConfig(bits=4, group_size=128, targets=qd.TargetConfig(lm_head=True)),
            "w8": qd.RTNConfig(bits=8),
            "nf4": qd.NF4Config(group_size=64), "fp8": qd.FP8Config(), "fp8-w8a8": qd.FP8Config(activations=True),
            "w4g64-asym": qd.RTNConfig(bits=4, group_size=64, symmetric=False),
            "halfquad": qd.HalfQuadConfig(bits=4, group_size=64)}


def llama31_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       bos_token_id=128000, eos_token_id=128001, dtype="bfloat16")


def random_hf_model(config, device: str):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16).eval()
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)  # to_empty emptied its buffers
    return model


def hf_static_compile_decode(model, prompt_len: int, new_tokens: int, device: str) -> dict:
    """transformers' recipe for fast decoding: a static cache, generate compiling the forward with
    mode="reduce-overhead" (CUDA graphs). Decode tok/s from two lengths, so prefill cancels out."""
    from transformers import CompileConfig

    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    kwargs = dict(do_sample=False, cache_implementation="static", pad_token_id=0,
                  compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead"))

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(n: int) -> float:
        sync()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync()
        assert out.shape[1] == prompt_len + n
        return time.perf_counter() - t

    for _ in range(3):  # compile, record the graphs, settle
        timed(new_tokens + 8)
    short = sorted(timed(8) for _ in range(3))[1]
    long = sorted(timed(new_tokens + 8) for _ in range(3))[1]
    return {"tok_s": new_tokens / (long - short), "ms_per_token": 1e3 * (long - short) / new_tokens}


def static_cache_decode(model, prompt_len: int, steps: int, device: str, warmup: int = 4) -> dict:
    """gpt-fast's loop on a transformers model: a static cache, the forward compiled with
    mode="reduce-overhead" (CUDA graphs), greedy tokens and positions kept on the device (no sync
    until the end). Batch 1; decode tok/s over ``steps`` steps after ``warmup``."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt_len + warmup + steps + 8)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        out = model(ids, past_key_values=cache, cache_position=torch.arange(prompt_len, device=device), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        position = torch.full((1,), prompt_len, device=device, dtype=torch.long)

        def step(token: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            logits = forward(token, past_key_values=cache, cache_position=position, use_cache=True).logits
            position.add_(1)
            return logits[:, -1:].argmax(-1)

        for _ in range(warmup):
            token = step(token)
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            token = step(token)
        sync()
        elapsed = time.perf_counter() - t
    return {"tok_s": steps / elapsed, "ms_per_token": 1e3 * elapsed / steps}


PEERS = ("torchao-int4", "torchao-int4-head", "torchao-int8")  # torchao 0.17's weight-only configs


def torchao_model(model, peer: str):
    """A copy of ``model`` quantized by torchao as ``peer`` names: int4 g128 (``tile_packed_to_4d``, the
    tinygemm kernel; its default packing needs a package the device lacks) or int8 per channel; every
    Linear but the output head, or (``-head``) every Linear. Sets torchao's recommended inductor options
    (global: run after our engines)."""
    import copy

    from torch import nn
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = (Int8WeightOnlyConfig() if peer == "torchao-int8"
              else Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    quantized = copy.deepcopy(model)
    head = peer.endswith("-head")
    quantize_(quantized, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and (head or fqn != "lm_head"))
    return quantized


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--hf", action="store_true", help="also time transformers (static cache + torch.compile)")
    p.add_argument("--hf-tokens", type=int, default=128)
    p.add_argument("--peers", nargs="+", default=[], choices=PEERS,
                   help="torchao-quantized copies decoded by a compiled static-cache loop, batch 1, after our engines")
    p.add_argument("--variants", nargs="+", default=["default"], choices=sorted(VARIANTS),
                   help="engine compile settings to compare in this run (fresh engine each)")
    p.add_argument("--quant", nargs="+", default=["bf16"],
                   choices=["bf16", "w4g128", "w4g128-head", "w8", "nf4", "fp8", "fp8-w8a8", "w4g64-asym", "halfquad"],
                   help="weight formats, each a fresh engine on the same random weights (RTN; bf16 first for the ratios)")
    p.add_argument("--max-seq-len", type=int, nargs="+", default=[2048],
                   help="cache positions per row, one engine each (default: serve's 2048)")
    p.add_argument("--layers", type=int, default=32, help="decoder layers (fewer: room for long caches)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family on the CPU: a smoke test")
    args = p.parse_args()
    device = "cpu" if args.tiny else "cuda"
    bandwidth = measure_bandwidth(torch.device(device))
    config = llama31_8b_config()
    config.num_hidden_layers = args.layers
    if args.tiny:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.vocab_size = 2, 256, 512, 1024
    t = time.perf_counter()
    hf = random_hf_model(config, device)
    print(f"random 8B-shape model built in {time.perf_counter() - t:.1f} s", flush=True)
    bundle = ModelBundle(model=hf, tokenizer=None, source=SourceInfo(path="random-llama-3.1-8b-shape", kind="memory"))
    cfg = BenchConfig(prompt_len=args.prompt_len, batches=tuple(args.batches), steps=args.steps, warmup=4, repeats=3)
    record, rows = {"bandwidth_gbs": bandwidth}, []
    import quantdeploy as qd

    for fmt in args.quant:
        config = quant_configs()[fmt]
        source = bundle if config is None else qd.quantize(bundle, config, device=device)
        for variant, seq_len in [(v, n) for v in args.variants for n in args.max_seq_len]:
            engine = Engine.from_bundle(source, device, max_batch=max(args.batches),
                                        max_seq_len=dataclasses.replace(cfg, max_seq_len=seq_len).seq_len(),
                                        **VARIANTS[variant])
            name = variant if fmt == "bf16" else f"{variant},{fmt}"
            if len(args.max_seq_len) > 1:
                name += f",S={seq_len}"
            t = time.perf_counter()
            record[f"ours[{name}]"] = ours = bench_engine(engine, cfg, bandwidth)
            print(f"engine bench {name} (compiles included) {time.perf_counter() - t:.1f} s", flush=True)
            total, table = weight_bytes(engine.model)
            record.setdefault("weights_gb", {})[fmt] = total / 1e9
            for b, d in ours["decode"].items():
                rows.append((f"ours[{name}] batch {b}", d["tok_s"], d["ms_per_step"], d["gb_s"], d["roofline_frac"],
                             d["host_ms_per_step"]))
                print(f"  {name} batch {b}: {d['tok_s']:.1f} tok/s, {d['ms_per_step']:.2f} ms/step", flush=True)
            if fmt != "bf16" and f"ours[{variant}]" in record:
                base = record[f"ours[{variant}]"]["decode"]
                record.setdefault("vs_bf16", {})[fmt] = {b: d["tok_s"] / base[b]["tok_s"] for b, d in ours["decode"].items()}
            if seq_len != args.max_seq_len[0]:  # decode against the first cache length, same format and variant
                first = record[f"ours[{name.rsplit(',S=', 1)[0]},S={args.max_seq_len[0]}]"]["decode"]
                record.setdefault("vs_first_seq_len", {})[name] = {
                    b: d["tok_s"] / first[b]["tok_s"] for b, d in ours["decode"].items()}
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
        if config is not None:
            del source
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.hf:
        t = time.perf_counter()
        record["transformers_static_compile"] = hf_res = hf_static_compile_decode(hf, args.prompt_len, args.hf_tokens, device)
        print(f"transformers bench {time.perf_counter() - t:.1f} s", flush=True)
        roof1 = bandwidth * 1e9 / (total - table)
        rows.append(("transformers static+compile b1", hf_res["tok_s"], hf_res["ms_per_token"],
                     hf_res["tok_s"] * (total - table) / 1e9, hf_res["tok_s"] / roof1, float("nan")))
        if 1 in ours["decode"]:
            record["ours_vs_transformers_b1"] = ours["decode"][1]["tok_s"] / hf_res["tok_s"]  # the last variant
    if args.peers:
        base = static_cache_decode(hf, args.prompt_len, args.steps, device)
        record["peers"] = {"bf16-static-compile": base}
        rows.append(("bf16 static-cache loop b1", base["tok_s"], base["ms_per_token"], float("nan"), float("nan"), float("nan")))
    for peer in args.peers:
        t = time.perf_counter()
        model = torchao_model(hf, peer)
        record["peers"][peer] = res = static_cache_decode(model, args.prompt_len, args.steps, device)
        print(f"{peer} bench (quantize + compiles included) {time.perf_counter() - t:.1f} s", flush=True)
        rows.append((f"{peer} static-cache loop b1", res["tok_s"], res["ms_per_token"], float("nan"), float("nan"), float("nan")))
        fmt = {"torchao-int4": "w4g128", "torchao-int4-head": "w4g128-head", "torchao-int8": "w8"}[peer]
        name = f"ours[{args.variants[0]},{fmt}]"
        if name in record and 1 in record[name]["decode"]:
            record.setdefault("vs_peer", {})[fmt] = record[name]["decode"][1]["tok_s"] / res["tok_s"]
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\nLlama-3.1-8B shape, random weights ({', '.join(args.quant)}); copy bandwidth {bandwidth:.0f} GB/s; "
          f"weights {total / 1e9:.2f} GB (the last format); prefill {ours['prefill_tok_s']:.0f} tok/s, TTFT {ours['ttft_ms']:.1f} ms "
          f"({args.prompt_len} tokens); peak memory {ours['peak_memory_gb']:.1f} GB")
    print(f"{'run':40s} {'tok/s':>9s} {'ms/step':>9s} {'host ms':>8s} {'GB/s':>8s} {'of roofline':>12s}")
    for name, tok_s, ms, gbs, frac, host in rows:
        print(f"{name:40s} {tok_s:9.1f} {ms:9.2f} {host:8.2f} {gbs:8.0f} {100 * frac:11.1f}%")
    print(json.dumps({**machine_info(), "config": {**vars(args), "shape": f"llama-3.1-8b ({args.layers} layers)", "dtype": "bfloat16"},
                      **record}))


if __name__ == "__main__":
    main()
