"""Perplexity and KL divergence to the original model, under one fixed protocol.

The protocol (:class:`EvalProtocol`), on a 1-D stream of ``N = min(max_tokens, len)`` text tokens:

- windows of ``window`` tokens start every ``stride`` tokens (default: ``stride = window``, no overlap);
- with BOS (``bos="auto"`` prepends it when the tokenizer adds one to plain text; "always"/"never"
  force it), each window's input is ``[BOS] + tokens``, else the tokens alone;
- a token is scored once, by the first window in which it is new and has at least one token (or BOS)
  before it in that window: without BOS the first token of the stream is never scored, and with
  ``stride = window`` the first token of every window is not scored either;
- the last window may be shorter; ``tokens_scored`` is reported with every result.

Perplexity is ``exp(mean NLL)`` over scored tokens. For each scored token the KL divergence
``KL(P_base || P_model) = Σ p_base (log p_base − log p_model)`` is taken over the full vocabulary in
fp32, as llama.cpp's ``--kl-divergence`` does; we report its mean (± standard error), median, p90, p99
and max, the top-1 agreement (same argmax) and ``ln(PPL_model / PPL_base)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError, DataError


@dataclasses.dataclass(frozen=True)
class EvalProtocol(Config):
    TYPE = "eval_protocol"
    VERSION = 1

    max_tokens: int | None = 32768
    window: int = 1024
    stride: int | None = None
    bos: str = "auto"

    def validate(self) -> None:
        if self.window < 2:
            raise ConfigError(f"window must be at least 2 tokens, got {self.window}")
        if self.stride is not None and not 1 <= self.stride <= self.window:
            raise ConfigError(f"stride must be between 1 and the window ({self.window}), got {self.stride}")
        if self.bos not in ("auto", "always", "never"):
            raise ConfigError(f"bos must be auto, always or never, got {self.bos!r}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"max_tokens must be at least 2, got {self.max_tokens}")


@dataclasses.dataclass(frozen=True)
class Window:
    start: int  # first stream token in the window
    end: int  # one past the last
    first_scored: int  # first stream token scored in this window


def make_windows(n_tokens: int, protocol: EvalProtocol, with_bos: bool) -> list[Window]:
    stride = protocol.stride or protocol.window
    windows, done = [], 0
    for start in range(0, n_tokens, stride):
        end = min(start + protocol.window, n_tokens)
        first = max(done, start + (0 if with_bos else 1))
        if first < end:
            windows.append(Window(start, end, first))
            done = end
        if end == n_tokens:
            break
    return windows


def use_bos(tokenizer, protocol: EvalProtocol) -> int | None:
    """The BOS id to prepend, or None."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if protocol.bos == "never" or bos_id is None:
        if protocol.bos == "always":
            raise ConfigError("bos='always' but the tokenizer defines no BOS token")
        return None
    if protocol.bos == "always":
        return bos_id
    ids = tokenizer("a").input_ids
    return bos_id if ids and ids[0] == bos_id else None


class _Stats:
    """Per-token values of one model, kept so that medians and percentiles are exact."""

    def __init__(self) -> None:
        self.nll: list[torch.Tensor] = []
        self.kld: list[torch.Tensor] = []
        self.top1: list[torch.Tensor] = []

    def per_token(self, index: list[torch.Tensor], position: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"kld": torch.cat(self.kld), "index": torch.cat(index), "position": torch.cat(position)}

    def summary(self, base_nll: torch.Tensor | None) -> dict[str, float]:
        nll = torch.cat(self.nll).double()
        out = {"tokens_scored": int(nll.numel()), "ppl": math.exp(float(nll.mean()))}
        if not self.kld:
            return out
        kld = torch.cat(self.kld).double()
        n = kld.numel()
        q = torch.quantile(kld.float(), torch.tensor([0.5, 0.9, 0.99])).tolist()
        out.update({
            "kld_mean": float(kld.mean()),
            "kld_stderr": float(kld.std() / math.sqrt(n)) if n > 1 else 0.0,
            "kld_median": q[0], "kld_p90": q[1], "kld_p99": q[2], "kld_max": float(kld.max()),
            "top1_agreement": float(torch.cat(self.top1).double().mean()),
            "ln_ppl_ratio": float(nll.mean() - base_nll.double().mean()) if base_nll is not None else float("nan"),
        })
        return out


@torch.inference_mode()
def evaluate(
    models: dict[str, nn.Module],
    baseline: nn.Module | None,
    tokens: torch.Tensor,
    protocol: EvalProtocol,
    bos_id: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    keep_tokens: bool = False,
) -> dict[str, dict[str, Any]]:
    """Perplexity of each model (and the baseline, as ``"original"``) and KL divergence to the baseline.

    ``tokens`` is the 1-D text stream (see :func:`~quantdeploy.eval.text.tokenize_prefix`). The
    baseline runs once per window and every model is compared with it on the same window. With
    ``keep_tokens`` (and a baseline) each model's result also holds ``per_token``: the KLD of every scored
    token, its index in the stream and its position in its window (``eval/buckets.py`` cuts them).
    """
    n = min(protocol.max_tokens or tokens.numel(), tokens.numel())
    if n < 2:
        raise DataError(f"the evaluation text has {n} token(s); it needs at least 2")
    if protocol.max_tokens and n < protocol.max_tokens:
        raise DataError(f"the evaluation text has only {n} tokens but {protocol.max_tokens} were asked for; "
                        "pass a longer text or a smaller --tokens")
    windows = make_windows(n, protocol, bos_id is not None)
    stats = {name: _Stats() for name in models}
    base_stats = _Stats()
    index: list[torch.Tensor] = []
    position: list[torch.Tensor] = []
    for i, w in enumerate(windows):
        ids = tokens[w.start:w.end]
        if bos_id is not None:
            ids = torch.cat([torch.tensor([bos_id]), ids])
        offset = 1 if bos_id is not None else 0
        # Logit at input position j predicts input j+1; stream token t sits at input t - start + offset.
        pos = torch.arange(w.first_scored, w.end) - w.start + offset
        targets = ids[pos]
        index.append(torch.arange(w.first_scored, w.end))
        position.append(pos)
        base_logp = _logprobs(baseline, ids, pos) if baseline is not None else None
        if base_logp is not None:
            base_stats.nll.append(-base_logp.gather(-1, targets[:, None]).squeeze(-1))
        for name, model in models.items():
            logq = _logprobs(model, ids, pos)
            stats[name].nll.append(-logq.gather(-1, targets[:, None]).squeeze(-1))
            if base_logp is not None:
                kl = (base_logp.exp() * (base_logp - logq)).sum(-1).clamp(min=0)
                stats[name].kld.append(kl)
                stats[name].top1.append(base_logp.argmax(-1) == logq.argmax(-1))
        if progress:
            progress(i + 1, len(windows))
    results: dict[str, dict[str, float]] = {}
    base_nll = torch.cat(base_stats.nll) if base_stats.nll else None
    if baseline is not None:
        results["original"] = base_stats.summary(None)
    for name, s in stats.items():
        results[name] = s.summary(base_nll)
        if keep_tokens and baseline is not None:
            results[name]["per_token"] = s.per_token(index, position)
    return results


def _logprobs(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """fp32 log-probabilities ``[len(pos), vocab]`` of the tokens after input positions ``pos - 1``."""
    device = _device(model)
    logits = model(ids[None].to(device)).logits[0]
    return F.log_softmax(logits[(pos - 1).to(device)].float(), dim=-1).cpu()


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
