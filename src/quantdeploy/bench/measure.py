"""What one experiment cell measures, the same way for every cell (``bench/experiment.py`` runs them).

- **size**: bytes of every stored weight and bits per quantized weight (scales and zeros counted);
- **fidelity**: perplexity, mean KL divergence and top-1 agreement against the original on the grid's
  text (``eval/fidelity.py``, windows of 1,024 tokens), and the KLD cut by token frequency, position in
  the window and document (``eval/buckets.py``);
- **tasks**: per-item outcomes (``eval/tasks``), summarized against the original cell's outcomes on
  the same items, with the flipped items' prompts kept for the error analysis;
- **speed**: engine prefill and decode tok/s at the grid's batch sizes (``bench/decode.py``) on the grid's
  device, against one bandwidth measurement per process;
- **per-layer error**: relative squared error of each decoder layer's output hidden state against the
  original's on the first 256 text tokens (the whole network up to that layer, quantized; invariant to
  AWQ/SmoothQuant's rescaling, which changes single Linears' outputs but not a block's);
- **attention similarity**: per layer and head, 1 − total variation between the original's and the
  cell's attention rows (1: the same distribution), averaged over query positions, on 128 tokens.
"""

from __future__ import annotations

import gc
import platform
from typing import Any

import torch

from quantdeploy.errors import ConfigError

ANALYSIS_TOKENS = 256
ATTENTION_TOKENS = 128


def measure_cell(context: Any, cell: Any, bundle: Any, seconds: float,
                 fidelity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything above for one cell. ``fidelity``: its ``fidelity`` (and ``kld_buckets``) already
    measured elsewhere (the demo's comparison), used instead of scoring the text again."""
    import dataclasses

    import quantdeploy as qd
    from quantdeploy.eval.buckets import document_ids, kld_buckets
    from quantdeploy.eval.fidelity import EvalProtocol, evaluate
    from quantdeploy.eval.text import load_text, tokenize_prefix

    spec = context.spec
    result: dict[str, Any] = {"cell": dataclasses.asdict(cell), "quantize_seconds": round(seconds, 2),
                              "machine": {"processor": platform.machine(), "python": platform.python_version()}}
    original = cell.method is None
    info = qd.describe(bundle) if not original else None
    result["size"] = {"weight_bytes": _weight_bytes(bundle.model),
                      "bits_per_weight": info["bits_per_weight"] if info else _dense_bits(bundle.model)}
    text = load_text(spec["text"])
    tokens = tokenize_prefix(bundle.tokenizer, text, int(spec.get("tokens", 8192)))
    protocol = EvalProtocol(max_tokens=int(spec.get("tokens", 8192)), window=1024)
    models = {"model": bundle.model}
    if fidelity is not None:
        result.update(fidelity)
    else:
        fid = evaluate(models, None if original else context.base.model, tokens, protocol, keep_tokens=True)
        result["fidelity"] = {k: v for k, v in fid["model"].items() if isinstance(v, (int, float))}
        if not original:
            t = fid["model"]["per_token"]
            result["kld_buckets"] = kld_buckets(t["kld"], t["index"], t["position"], tokens,
                                                document_ids(bundle.tokenizer, text, tokens))
    if spec.get("tasks"):
        result["tasks"] = _tasks(spec, bundle, cell.label, None if original else context.original)
    if spec.get("bench"):
        result["speed"] = _speed(spec, bundle)
    if not original:
        sample = tokens[:ANALYSIS_TOKENS][None]
        result["layer_error"] = layer_errors(context.base.model, bundle.model, sample)
        result["attention_similarity"] = attention_similarity(context.base.model, bundle.model,
                                                              tokens[:ATTENTION_TOKENS][None])
    return result


def _tasks(spec: dict[str, Any], bundle: Any, name: str, original: dict[str, Any] | None) -> dict[str, Any]:
    from quantdeploy.eval.tasks import TaskOptions, run_task, summarize
    from quantdeploy.eval.tasks.lm import TaskModel

    model = TaskModel(bundle, name)
    out = {}
    for task in spec["tasks"]:
        raw = run_task(str(task), model, TaskOptions(limit=spec.get("task_limit")))
        base = original["tasks"][str(task)]["raw"] if original else None
        rows = summarize(raw, base)
        prompts = _prompts(str(task), spec.get("task_limit")) if base is not None else []
        for row in rows:
            row["lost_prompts"] = [prompts[i][-300:] for i in row.get("lost", [])[:10]] if prompts else []
        out[str(task)] = {"raw": {k: raw[k] for k in ("task", "kind", "n", "outcomes")}, "rows": rows}
    return out


def _prompts(task: str, limit: int | None) -> list[str]:
    if task == "humaneval":
        from quantdeploy.eval.tasks.humaneval import read_problems

        return [p.prompt for p in read_problems(limit)]
    from quantdeploy.eval.tasks.bigbench import read_task

    return [item.prompt for item in read_task(task, limit=limit).items]


def _speed(spec: dict[str, Any], bundle: Any) -> dict[str, Any]:
    from quantdeploy.bench.decode import BenchConfig, bench_engine, measure_bandwidth
    from quantdeploy.engine.engine import Engine

    settings = dict(spec["bench"])
    unknown = set(settings) - {"batches", "steps", "prompt_len", "max_seq_len"}
    if unknown:
        raise ConfigError(f"grid 'bench': unknown key '{sorted(unknown)[0]}' (batches, steps, prompt_len, max_seq_len)")
    cfg = BenchConfig(batches=tuple(settings.get("batches", (1,))), steps=int(settings.get("steps", 16)),
                      prompt_len=int(settings.get("prompt_len", 64)), warmup=2, repeats=1,
                      max_seq_len=settings.get("max_seq_len"))
    device = torch.device(spec.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    engine = Engine.from_bundle(bundle, device, max_batch=max(cfg.batches), max_seq_len=cfg.seq_len())
    result = bench_engine(engine, cfg, measure_bandwidth(device, nbytes=1 << 28, repeats=3))
    del engine
    gc.collect()
    return result


@torch.inference_mode()
def layer_errors(original: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> list[float]:
    """``||h_q - h||² / ||h||²`` of each decoder layer's output on ``ids [1, T]`` (see the module docstring)."""
    a = original(ids, output_hidden_states=True).hidden_states[1:]
    b = model(ids, output_hidden_states=True).hidden_states[1:]
    return [float(((y.float() - x.float()) ** 2).sum() / (x.float() ** 2).sum().clamp(min=1e-30)) for x, y in zip(a, b)]


@torch.inference_mode()
def attention_similarity(original: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> list[list[float]]:
    """``[layer][head]``: mean over query positions of ``1 - 0.5 * ||a_q - a||_1`` (eager attention)."""
    maps = []
    for m in (original, model):
        before = m.config._attn_implementation
        m.set_attn_implementation("eager")
        try:
            maps.append(m(ids, output_attentions=True).attentions)
        finally:
            m.set_attn_implementation(before)
    return [(1 - 0.5 * (b.float() - a.float()).abs().sum(-1)).mean(-1)[0].tolist() for a, b in zip(*maps)]


def _weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _dense_bits(model: torch.nn.Module) -> float:
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return 8.0 * linear[0].element_size() if linear else float("nan")
