"""Runs inside llama-cpp-python's own virtual environment (see benchmarks/engine_cpu.py): requantize a
GGUF with llama.cpp's own quantizer, then time greedy decoding of B parallel sequences.

Usage: python llamacpp_worker.py SRC.gguf OUT_DIR --types Q8_0 Q4_0 --batches 1 8 --threads 2
Prints one JSON line: {type: {"file": ..., "bytes": ..., "decode": {batch: tok_s}, "prefill_tok_s": ...}}.

Decoding uses the low-level API (llama_decode over a batch holding one token per sequence, each
sequence at its own position, greedy argmax of each sequence's logits), which is what llama.cpp's
own batched examples and server do; prompts are random tokens of different lengths, as in our bench.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import time

import llama_cpp as L
import numpy as np

FTYPES = {"Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_K_M": L.LLAMA_FTYPE_MOSTLY_Q4_K_M}


def quantize(src: str, out: str, kind: str, threads: int) -> None:
    params = L.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.allow_requantize = True  # the bundled source is itself a Q4_1 GGUF
    params.nthread = threads
    if L.llama_model_quantize(src.encode(), out.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed for {kind}")


def _fill(batch, tokens: list[tuple[int, int, int, bool]]) -> None:
    """``tokens``: (token, position, sequence, wants logits)."""
    batch.n_tokens = len(tokens)
    for i, (tok, pos, seq, logits) in enumerate(tokens):
        batch.token[i] = tok
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits


def bench(path: str, batches: list[int], threads: int, prompt_len: int, steps: int, warmup: int) -> dict:
    mparams = L.llama_model_default_params()
    if os.environ.get("QD_LLAMA_NO_EXTRA_BUFTS"):
        mparams.use_extra_bufts = False
    model = L.llama_model_load_from_file(path.encode(), mparams)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    result = {"decode": {}}
    rng = random.Random(0)
    for b in batches:
        cparams = L.llama_context_default_params()
        cparams.n_ctx = b * (prompt_len + warmup + steps + 8)
        cparams.n_batch = cparams.n_ubatch = max(512, prompt_len)
        cparams.n_seq_max = b
        cparams.n_threads = cparams.n_threads_batch = threads
        ctx = L.llama_init_from_model(model, cparams)
        batch = L.llama_batch_init(max(512, prompt_len, b), 0, 1)
        lengths = [prompt_len // 2 + (prompt_len - prompt_len // 2) * i // max(1, b - 1) if b > 1 else prompt_len
                   for i in range(b)]
        nxt, pos = [], []
        t = time.perf_counter()
        for s, n in enumerate(lengths):  # prefill each sequence
            prompt = [rng.randrange(n_vocab) for _ in range(n)]
            _fill(batch, [(tok, p, s, p == n - 1) for p, tok in enumerate(prompt)])
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed in prefill")
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, n - 1), shape=(n_vocab,))
            nxt.append(int(logits.argmax()))
            pos.append(n)
        if b == batches[0]:
            result["prefill_tok_s"] = sum(lengths) / (time.perf_counter() - t)
        for i in range(warmup + steps):
            if i == warmup:
                t = time.perf_counter()
            _fill(batch, [(nxt[s], pos[s], s, True) for s in range(b)])
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed in decode")
            for s in range(b):
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, s), shape=(n_vocab,))
                nxt[s] = int(logits.argmax())
                pos[s] += 1
        result["decode"][b] = b * steps / (time.perf_counter() - t)
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    L.llama_model_free(model)
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("out_dir")
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q4_0"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    args = p.parse_args()
    L.llama_backend_init()
    L.llama_log_set(ctypes.cast(None, L.llama_log_callback), ctypes.c_void_p())  # quiet
    out = {"llama_cpp_python": L.__version__ if hasattr(L, "__version__") else None}
    for kind in args.types:
        path = os.path.join(args.out_dir, f"model-{kind}.gguf")
        if not os.path.exists(path):
            quantize(args.src, path, kind, args.threads)
        out[kind] = {"file": path, "bytes": os.path.getsize(path),
                     **bench(path, args.batches, args.threads, args.prompt_len, args.steps, args.warmup)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
