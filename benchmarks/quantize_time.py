"""Quantization time and peak memory of a method, on a real model or a Llama-shaped random one.

With ``--shape`` (default: the Llama-3.1-8B shape) the model is built with random bf16 weights, kept on
the host; the layer-sequential runner moves one block at a time to the GPU. Calibration text is
tokenized with the tokenizer folder given (any; token ids only need to be below the vocab size).
With ``--model`` (e.g. ``bundled``) a real model is loaded instead, with its own tokenizer.

    python benchmarks/quantize_time.py --tokenizer TOKDIR --calib wiki_en.train.txt \
        --method gptq --bits 4 --group-size 128 --samples 128 --seq-len 2048
    python benchmarks/quantize_time.py --model bundled --calib wiki_en.train.txt --method awq \
        --bits 4 --group-size 64 --samples 16 --seq-len 512

Peak host memory is the process's resident set size, sampled every 5 ms while ``quantize`` runs
(baseline: just before it, with the model loaded); peak GPU memory is torch's allocator high-water
mark. Run one method per process, so that one method's freed memory does not hide another's peak.
Prints a table, then one JSON line with machine, card, commit and config.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

import torch


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRSS:
    """Samples the resident set size in a thread while the context is open."""

    def __enter__(self) -> "PeakRSS":
        self.baseline = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


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


METHODS = {  # name → config from (quantdeploy, args, calibration)
    "rtn": lambda qd, a, c: qd.RTNConfig(bits=a.bits, group_size=a.group_size),
    "nf4": lambda qd, a, c: qd.NF4Config(group_size=a.group_size),
    "fp8": lambda qd, a, c: qd.FP8Config(),
    "gptq": lambda qd, a, c: qd.GPTQConfig(bits=a.bits, group_size=a.group_size, calibration=c),
    "awq": lambda qd, a, c: qd.AWQConfig(quantizer=qd.RTNConfig(bits=a.bits, group_size=a.group_size), calibration=c),
    "smoothquant": lambda qd, a, c: qd.SmoothQuantConfig(calibration=c),
    "smoothquant+gptq": lambda qd, a, c: qd.SmoothQuantConfig(quantizer=qd.GPTQConfig(bits=8, group_size=None),
                                                              calibration=c),
}


def main() -> None:
    import quantdeploy as qd
    from quantdeploy.eval.report import machine_info
    from quantdeploy.models.bundle import ModelBundle, SourceInfo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model", help="a real model (any load_model source) instead of a random --shape")
    p.add_argument("--tokenizer", help="tokenizer folder for a random --shape model")
    p.add_argument("--calib", required=True)
    p.add_argument("--method", default="gptq", choices=tuple(METHODS))
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
    if args.model:
        bundle = qd.load_model(args.model)
        model, name = bundle.model, args.model
    else:
        if not args.tokenizer:
            raise SystemExit("a random --shape model needs --tokenizer")
        model, name = build_random_model(args.shape, device, args.layers), args.shape
        bundle = ModelBundle(model=model, tokenizer=AutoTokenizer.from_pretrained(args.tokenizer),
                             source=SourceInfo(path=f"random:{args.shape}", kind="random"))
    build_s = time.perf_counter() - t0
    calib = qd.CalibrationConfig(source=args.calib, num_samples=args.samples, seq_len=args.seq_len)
    config = METHODS[args.method](qd, args, calib)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as host:
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

    kind = "random bf16" if not args.model else str(next(model.parameters()).dtype).replace("torch.", "")
    rows = [("model", f"{name} ({n_params / 1e9:.3f} B params, {kind})"),
            ("method", f"{args.method} {info['modules'][0]['spec']}"),
            ("calibration", f"{quantized.quant_config.get('calibration', {}).get('num_samples', '-')} x {args.seq_len} tokens"),
            ("quantize time", f"{seconds:.1f} s"),
            ("peak GPU memory", f"{peak_gb:.2f} GiB" if peak_gb is not None else "-"),
            ("peak host RSS", f"{host.peak / 2**30:.2f} GiB (model loaded before: {host.baseline / 2**30:.2f} GiB)"),
            ("bits per weight", f"{info['bits_per_weight']:.3f}"),
            ("model build (not timed)", f"{build_s:.1f} s")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(json.dumps({"benchmark": "quantize_time", **machine_info(), "config": vars(args),
                      "seconds": round(seconds, 2), "peak_gpu_gib": round(peak_gb, 3) if peak_gb else None,
                      "peak_rss_gib": round(host.peak / 2**30, 3), "baseline_rss_gib": round(host.baseline / 2**30, 3),
                      "params": n_params}))


if __name__ == "__main__":
    main()
