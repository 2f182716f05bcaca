"""Engine speed: prefill throughput, time to first token, decode throughput per batch size, memory,
and achieved bandwidth against the machine's, measured in the same run.

Decode at batch ``B`` runs ``B`` sequences whose prompts have different lengths (so the rows sit at
different positions), warms up (on CUDA that compiles and records the graph of that batch bucket),
then times ``steps`` engine steps. Tokens per second count every generated token of the batch.

Achieved GB/s = bytes one decode step must read / step time: every stored weight byte except the
input-embedding table (of which only ``B`` rows are read), plus the keys and values the rows hold
(each row's own length, averaged over the timed steps), never the positions a cache merely reserves:
an engine that reads more is slower, and the figure shows it. The cache is allocated for
``max_seq_len`` positions per row (default: the server's, 2,048), as a server would. The machine's bandwidth is a large
copy, counting bytes read plus written (the workplace's standard), timed the same way in the same
process. Nothing here is a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import dataclasses
import resource
import statistics
import time
from typing import Any

import torch

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.quant_linear import QuantEmbedding, QuantLinear
from quantdeploy.engine.sampling import SamplingParams

DEFAULT_SEQ_LEN = 2048  # what ``quantdeploy serve`` allocates per row unless told


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    prompt_len: int = 128
    batches: tuple[int, ...] = (1, 4, 16, 64)
    steps: int = 32
    warmup: int = 4
    repeats: int = 3
    seed: int = 0
    max_seq_len: int | None = None  # the cache per row; None: the server's default (2,048), or what the runs need

    def seq_len(self) -> int:
        """The cache length each engine is loaded with."""
        needed = self.prompt_len + self.warmup + self.steps + 8
        if self.max_seq_len is not None and self.max_seq_len < needed:
            from quantdeploy.errors import ConfigError

            raise ConfigError(f"max_seq_len {self.max_seq_len} is shorter than the benchmark's sequences "
                              f"({needed} positions: prompt + warmup + steps + 8); raise it or shorten them")
        return self.max_seq_len or max(DEFAULT_SEQ_LEN, needed)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """GB/s of a large ``copy_`` on ``device`` (bytes read + bytes written), median of ``repeats``."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of all weights a step reads, bytes of the input-embedding table), each tensor counted once;
    a layer held dequantized (``kernels/dense.py``) counts its dense weight, not its stored codes."""
    seen, total = set(), 0
    for module in model.modules():
        tensors = list(module.parameters(recurse=False))
        if isinstance(module, QuantLinear) and hasattr(module.prepared, "read_bytes"):
            total += module.prepared.read_bytes
        elif isinstance(module, (QuantLinear, QuantEmbedding)):
            tensors += [getattr(module, n) for n in module._names]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    emb = model.tok_embeddings
    table = [getattr(emb, n) for n in emb._names] if isinstance(emb, QuantEmbedding) else [emb.weight]
    shared = any(t.data_ptr() in {p.data_ptr() for p in model.output.parameters()} for t in table)
    return total, 0 if shared else sum(t.numel() * t.element_size() for t in table)


def kv_bytes_per_position(engine: Engine) -> int:
    return sum(layer.attention.kv_cache.bytes_per_token for layer in engine.model.layers)


def _prompts(engine: Engine, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` random-token prompts whose lengths spread over ``[length/2, length]``."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model.args.vocab_size
    out = []
    for i in range(n):
        size = max(1, length // 2 + (length - length // 2) * i // max(1, n - 1)) if n > 1 else length
        out.append(torch.randint(0, vocab, (size,), generator=g).tolist())
    return out


def time_to_first_token(engine: Engine, cfg: BenchConfig) -> float:
    """Median seconds from ``add`` (prefill of ``prompt_len`` tokens) to the first token on the host."""
    times = []
    for r in range(cfg.repeats + 1):
        prompt = _prompts(engine, 1, cfg.prompt_len, cfg.seed + r)[0]
        _sync(engine.device)
        t = time.perf_counter()
        seq = engine.add(prompt, SamplingParams(max_tokens=1, ignore_eos=True))
        while not seq.finished:
            engine.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])  # the first run warms up


def decode_rate(engine: Engine, batch: int, cfg: BenchConfig) -> tuple[float, float, float, float]:
    """(tokens/s over the batch, seconds per step, cached positions the rows hold during a timed step,
    summed over rows, host seconds per step) for ``batch`` sequences at different positions. The host
    time is the loop's time less what it spent blocked on the device's tokens: near the step time, the
    host is the bound (the device waits on it), well under it, the device."""
    prompts = _prompts(engine, batch, cfg.prompt_len, cfg.seed)
    # a prompt longer than a chunk is prefilled a chunk per step, oldest first, the others whole at once: a
    # row decodes while the chunks after its own run (all of them, for a short one), so it takes that many more
    chunk = engine.prefill_chunk_tokens
    chunks = [-(-len(p) // chunk) if chunk and len(p) > chunk else 0 for p in prompts]
    extra = [sum(chunks[i + 1:]) if n else sum(chunks) for i, n in enumerate(chunks)]
    seqs = [engine.add(p, SamplingParams(max_tokens=extra[i] + cfg.warmup + cfg.steps + 2, ignore_eos=True))
            for i, p in enumerate(prompts)]
    while any(not s.output_ids for s in seqs):  # long prompts go a chunk per step: none left in the timed steps
        engine.step()
    for _ in range(cfg.warmup):
        engine.step()
    _sync(engine.device)
    # the next step feeds each row's token at position ``feed_position`` and attends over all up to it
    held = sum(s.feed_position + 1 for s in seqs) + batch * (cfg.steps - 1) / 2
    t, waited = time.perf_counter(), engine.counters.device_wait_seconds
    for _ in range(cfg.steps):
        engine.step()
    host = time.perf_counter() - t - (engine.counters.device_wait_seconds - waited)
    _sync(engine.device)
    elapsed = time.perf_counter() - t
    while engine.running:
        engine.step()
    if any(len(s.output_ids) != s.params.max_tokens for s in seqs):
        raise RuntimeError("a benchmark sequence stopped early; the decode timing would be wrong")
    return batch * cfg.steps / elapsed, elapsed / cfg.steps, held, host / cfg.steps


def bench_engine(engine: Engine, cfg: BenchConfig, bandwidth_gbs: float) -> dict[str, Any]:
    """Every number for one loaded engine (its ``max_batch`` must cover ``cfg.batches``)."""
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total, table = weight_bytes(engine.model)
    kv_pos = kv_bytes_per_position(engine)
    ttft = time_to_first_token(engine, cfg)
    result: dict[str, Any] = {"weights_gb": total / 1e9, "prefill_tok_s": cfg.prompt_len / ttft, "ttft_ms": 1e3 * ttft,
                              "decode": {}}
    for batch in cfg.batches:
        tok_s, step_s, held, host_s = decode_rate(engine, batch, cfg)
        moved = total - table + held * kv_pos
        gbs = moved / step_s / 1e9
        result["decode"][batch] = {"tok_s": tok_s, "ms_per_step": 1e3 * step_s, "gb_s": gbs,
                                   "roofline_frac": gbs / bandwidth_gbs, "host_ms_per_step": 1e3 * host_s}
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    else:
        result["peak_memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # process peak RSS
    result["kv_cache_gb"] = engine.kv_cache_bytes / 1e9  # the pool allocated, not what the rows held
    return result


def table_rows(name: str, r: dict[str, Any]) -> list[list[str]]:
    rows = []
    for batch, d in r["decode"].items():
        first = batch == next(iter(r["decode"]))
        rows.append([name if first else "", f"{r['weights_gb']:.3f}" if first else "",
                     f"{r['prefill_tok_s']:.0f}" if first else "", f"{r['ttft_ms']:.1f}" if first else "",
                     str(batch), f"{d['tok_s']:.1f}", f"{d['ms_per_step']:.2f}", f"{d['gb_s']:.1f}",
                     f"{100 * d['roofline_frac']:.0f}%", f"{r['peak_memory_gb']:.2f}" if first else ""])
    return rows


HEADERS = ["model", "weights GB", "prefill tok/s", "TTFT ms", "batch", "decode tok/s", "ms/step", "GB/s",
           "of bandwidth", "peak mem GB"]


def run(model: str, original: str | None, device: torch.device, cfg: BenchConfig, dtype: torch.dtype | None = None,
        compile: bool | None = None, on_result=None) -> dict[str, Any]:  # noqa: ANN001 - on_result(name, result)
    """Bench ``model`` and (unless None) its unquantized ``original`` one after the other, in one process,
    against one bandwidth measurement; returns the record (without machine info)."""
    import gc

    bandwidth = measure_bandwidth(device)
    record: dict[str, Any] = {"bandwidth_gbs": bandwidth, "results": {}}
    max_seq_len = cfg.seq_len()
    for name, path in (("model", model), ("original", original)):
        if path is None:
            continue
        engine = Engine.load(path, device, dtype, max_batch=max(cfg.batches), max_seq_len=max_seq_len, compile=compile)
        record["results"][name] = {"path": str(path), "compiled": engine.compiled, **bench_engine(engine, cfg, bandwidth)}
        if on_result is not None:
            on_result(name, record["results"][name])
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "original" in record["results"]:
        ours, base = record["results"]["model"]["decode"], record["results"]["original"]["decode"]
        record["speedup_vs_original"] = {b: ours[b]["tok_s"] / base[b]["tok_s"] for b in ours}
    return record
