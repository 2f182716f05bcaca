"""Side-by-side comparison of model bundles with their original: fidelity numbers plus what each
model costs to store (bits per weight over the quantized layers, size on disk)."""

from __future__ import annotations

from typing import Any, Callable

from quantdeploy.eval.buckets import document_ids, kld_buckets
from quantdeploy.eval.fidelity import EvalProtocol, evaluate, use_bos
from quantdeploy.eval.text import load_text, tokenize_prefix
from quantdeploy.formats.checkpoint import folder_size
from quantdeploy.models.bundle import ModelBundle
from quantdeploy.pipeline import describe


def model_row(name: str, bundle: ModelBundle) -> dict[str, Any]:
    """Name, spec, bits per weight and (when loaded from a folder) size on disk of one bundle."""
    row: dict[str, Any] = {"name": name}
    if bundle.quant_config is not None:
        info = describe(bundle)
        row.update(spec=", ".join(sorted({m["spec"] for m in info["modules"]})), bits_per_weight=info["bits_per_weight"])
    else:
        dtype = next(bundle.model.parameters()).dtype
        row.update(spec=str(dtype).replace("torch.", ""), bits_per_weight=float(dtype.itemsize * 8))
    if bundle.folder is not None:
        row["size_mb"] = folder_size(bundle.folder) / 1e6
    return row


def compare(
    bundles: dict[str, ModelBundle],
    baseline: ModelBundle | None,
    text: str,
    protocol: EvalProtocol,
    progress: Callable[[int, int], None] | None = None,
    keep_tokens: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate named bundles against ``baseline`` on ``text``; report rows, the original first. With
    ``keep_tokens`` each compared row also holds ``per_token`` (see ``evaluate``) and ``kld_buckets``
    (``eval/buckets.py``)."""
    reference = baseline if baseline is not None else next(iter(bundles.values()))
    tokens = tokenize_prefix(reference.tokenizer, load_text(text), protocol.max_tokens)
    bos = use_bos(reference.tokenizer, protocol)
    results = evaluate({k: b.model for k, b in bundles.items()}, baseline.model if baseline is not None else None,
                       tokens, protocol, bos, progress=progress, keep_tokens=keep_tokens)
    if keep_tokens and baseline is not None:
        documents = document_ids(reference.tokenizer, load_text(text), tokens[:protocol.max_tokens or None])
        for name in bundles:
            t = results[name]["per_token"]
            results[name]["kld_buckets"] = kld_buckets(t["kld"], t["index"], t["position"], tokens, documents)
    rows = []
    if baseline is not None:
        rows.append({**model_row("original", baseline), **results["original"]})
    rows += [{**model_row(name, b), **results[name]} for name, b in bundles.items()]
    return rows
