"""Quantization time and peak memory of a method on a Llama-shaped model with random weights.

The model is built from a config (default: the Llama-3.1-8B shape) with random bf16 weights, kept on
the host; the layer-sequential runner moves one block at a time to the GPU. Calibration text is
tokenized with the tokenizer folder given (any; token ids only need to be below the vocab size).

    python benchmarks/quantize_time.py --tokenizer TOKDIR --calib wiki_en.train.txt \
        --method gptq --bits 4 --group-size 128 --samples 128 --seq-len 2048

Prints a table, then one JSON line with machine, card, commit and config.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch


def llama_config(shape: str, layers: int | None = None):
    from transformers import LlamaConfig

    shapes = {
        "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                             rope_theta=500000.0),
        "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096),
    }
    config = LlamaConfig(**shapes[shape], tie_word_embeddings=False, torch_dtype="bfloat16")
    if layers:
        config.num_hidden_layers = layers
    return config


def build_random_model(shape: str, device: torch.device, layers: int | None = None):
    """Random bf16 weights, initialised on the device (fast) and returned on the host."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(shape, layers), dtype=torch.bfloat16)
    return model.to("cpu").eval()


def main() -> None:
    import quantdeploy as qd
    from quantdeploy.eval.report import machine_info
    from quantdeploy.models.bundle import ModelBundle, SourceInfo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--method", default="gptq", choices=("gptq", "awq", "rtn"))
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--layers", type=int, help="override the number of decoder blocks (for quick profiles)")
    p.add_argument("--profile", action="store_true", help="print the top functions by cumulative time")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    model = build_random_model(args.shape, device, args.layers)
    build_s = time.perf_counter() - t0
    bundle = ModelBundle(model=model, tokenizer=AutoTokenizer.from_pretrained(args.tokenizer),
                         source=SourceInfo(path=f"random:{args.shape}", kind="random"))
    calib = qd.CalibrationConfig(source=args.calib, num_samples=args.samples, seq_len=args.seq_len)
    grid = qd.RTNConfig(bits=args.bits, group_size=args.group_size)
    config = {"rtn": grid,
              "gptq": qd.GPTQConfig(bits=args.bits, group_size=args.group_size, calibration=calib),
              "awq": qd.AWQConfig(quantizer=grid, calibration=calib)}[args.method]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        quantized = profiler.runcall(qd.quantize, bundle, config, device=device)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    else:
        quantized = qd.quantize(bundle, config, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    n_params = sum(p.numel() for p in model.parameters())
    info = qd.describe(quantized)

    rows = [("model", f"{args.shape} ({n_params / 1e9:.2f} B params, random bf16)"),
            ("method", f"{args.method} int{args.bits} g{args.group_size}"),
            ("calibration", f"{quantized.quant_config.get('calibration', {}).get('num_samples', '-')} x {args.seq_len} tokens"),
            ("quantize time", f"{seconds:.1f} s"),
            ("peak GPU memory", f"{peak_gb:.2f} GiB" if peak_gb is not None else "-"),
            ("bits per weight", f"{info['bits_per_weight']:.3f}"),
            ("model build (not timed)", f"{build_s:.1f} s")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({"benchmark": "quantize_time", **machine_info(), "config": vars(args),
                      "seconds": round(seconds, 2), "peak_gpu_gib": round(peak_gb, 3) if peak_gb else None,
                      "params": n_params}))


if __name__ == "__main__":
    main()
