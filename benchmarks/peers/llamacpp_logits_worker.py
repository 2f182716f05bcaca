"""Runs inside llama-cpp-python's own virtual environment (see benchmarks/gguf_check.py): load one GGUF
and answer requests, one JSON line each on stdin, one JSON line each on stdout:

    {"op": "logits", "ids": [...], "out": "PATH.npy"}  -> fp32 logits [len(ids), vocab] of one sequence
                                                          written to PATH.npy; {"ok": true}
    {"op": "tokenize", "text_file": "PATH"}            -> {"ids": [...]} (no special tokens added, none parsed)
    {"op": "greedy", "prompts": [[...]], "max_tokens": N} -> {"tokens": [[...]]} greedy continuations

Usage: python llamacpp_logits_worker.py MODEL.gguf --ctx 1024 --threads 2

The logits request runs the whole sequence through ``llama_decode`` as one batch with every position's
logits requested, on a cleared cache: what llama.cpp's own perplexity/KL-divergence tool does per chunk.
The cache type is llama.cpp's default (f16).
"""

from __future__ import annotations

import argparse
import json
import sys

import llama_cpp as L
import numpy as np


class Model:
    def __init__(self, path: str, ctx: int, threads: int) -> None:
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        params = L.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = ctx
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, params)
        self.batch = L.llama_batch_init(ctx, 0, 1)

    def _decode(self, ids: list[int], start: int, all_logits: bool) -> None:
        b = self.batch
        b.n_tokens = len(ids)
        for i, tok in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, start + i, 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == len(ids) - 1
        if L.llama_decode(self.ctx, b) != 0:
            raise SystemExit("llama_decode failed")

    def logits(self, ids: list[int]) -> np.ndarray:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        self._decode(ids, 0, True)
        return np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(len(ids), self.n_vocab)).copy()

    def greedy(self, prompt: list[int], max_tokens: int) -> list[int]:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        out: list[int] = []
        self._decode(prompt, 0, False)
        pos = len(prompt)
        for _ in range(max_tokens):
            last = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            out.append(int(last.argmax()))
            self._decode([out[-1]], pos, False)
            pos += 1
        return out

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (L.llama_token * (len(data) + 8))()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, False)
        if n < 0:
            raise SystemExit("llama_tokenize: buffer too small")
        return list(buf[:n])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    model = Model(args.model, args.ctx, args.threads)
    print(json.dumps({"ready": True, "n_vocab": model.n_vocab}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "logits":
            np.save(req["out"], model.logits(req["ids"]))
            reply = {"ok": True}
        elif req["op"] == "tokenize":
            reply = {"ids": model.tokenize(open(req["text_file"], encoding="utf-8").read())}
        elif req["op"] == "greedy":
            reply = {"tokens": [model.greedy(prompt, req["max_tokens"]) for prompt in req["prompts"]]}
        else:
            reply = {"error": f"unknown op {req['op']}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
