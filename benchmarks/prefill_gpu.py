"""What one prefill forward costs on the GPU, by batch size: the device time and the host time to launch
it, on the Llama-3.1-8B shape with random bf16 weights.

    python benchmarks/prefill_gpu.py --tokenizer TOKENIZER_DIR [--batches 1 4 16 64] [--prompt-len 32]

Why: under load a server prefills the requests that arrive between two decode steps, and every running
row waits for that forward. If its cost is the time to launch its kernels rather than the work in them,
many small prefills cost far more than one large one. The host time is measured to the return of the
call (kernels queued, not run); the device time with a synchronize around it. Each row is the median of
``--repeats`` runs after two warm-ups, the host-to-device copy of the input included. ``--modes``
compares the eager forward with its CUDA graph (``engine/prefill_graphs.py``, the shape padded to the
graph's). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.serve_gpu import save_random_model
from quantdeploy.engine.engine import Engine
from quantdeploy.engine.prefill_graphs import pack_rows, run_packed
from quantdeploy.eval.report import machine_info


def time_prefill(run, repeats: int) -> dict:
    """Median milliseconds to launch ``run()`` (host) and to finish it (total)."""
    host, device = [], []
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        launched = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        if i >= 2:
            host.append(launched - t)
            device.append(done - t)
    return {"host_ms": 1000 * statistics.median(host), "total_ms": 1000 * statistics.median(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--folder", default="/tmp/quantdeploy-llama8b-random")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--modes", nargs="+", choices=("eager", "graph"), default=["eager", "graph"])
    args = p.parse_args()
    folder = Path(args.folder)
    save_random_model(folder, args.tokenizer, "cuda", tiny=False)
    engine = Engine.load(folder, "cuda", max_batch=max(args.batches), max_seq_len=256, compile=False)
    t = time.perf_counter()
    engine.prefill_graphs.capture()
    capture_s = time.perf_counter() - t
    graphs = engine.prefill_graphs
    print(f"{len(graphs.graphs)} prefill graphs captured in {capture_s:.1f} s")
    vocab = engine.model.args.vocab_size
    results = []
    print(f"{'mode':6} {'batch':>5} {'tokens':>6} {'host ms':>8} {'total ms':>9}")
    with torch.inference_mode():
        for mode in args.modes:
            for b in args.batches:
                prompts = torch.randint(0, vocab, (b, args.prompt_len)).tolist()
                shape = graphs.shape(b, args.prompt_len) if mode == "graph" else (b, args.prompt_len)
                if shape is None:
                    print(f"{mode:6} {b:5d}: no graph holds this shape")
                    continue
                host = pack_rows(prompts, list(range(b)), *shape, engine.scratch_row).pin_memory()
                run = ((lambda: graphs.run(shape, host)) if mode == "graph"
                       else (lambda: run_packed(engine.model, host.to("cuda", non_blocking=True))))
                r = {"mode": mode, "batch": b, "prompt_len": args.prompt_len, "padded_shape": shape,
                     **time_prefill(run, args.repeats)}
                results.append(r)
                print(f"{mode:6} {b:5d} {b * args.prompt_len:6d} {r['host_ms']:8.2f} {r['total_ms']:9.2f}", flush=True)
    print(json.dumps({**machine_info(), "config": vars(args), "graphs": len(graphs.graphs), "capture_s": capture_s,
                      "results": results}))


if __name__ == "__main__":
    main()
