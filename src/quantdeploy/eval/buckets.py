"""Where a quantized model departs from the original: mean KL divergence by bucket of scored tokens.

A mean over 8,000 tokens hides where the damage is. Three cuts, each a property of the scored token
alone, so every cell of an experiment is cut the same way:

- **token frequency**: how often the predicted token occurs in the scored text (1-4, 5-31, 32-255,
  256 or more times): quantization tends to hurt rare tokens first, which a mean dominated by frequent
  ones does not show;
- **position in the window**: the token's index in its 1,024-token window (1-63, 64-255, 256-511,
  512 on): errors that grow with the context point at attention or the KV cache rather than the MLPs;
- **document**: the text's documents (separated by a blank line), each with its mean: a model that is
  fine on average and broken on one kind of text shows up here. Needs a fast tokenizer (character
  offsets); without one the cut is absent, and says so.

Every bucket reports its token count, mean KLD and the mean's standard error.
"""

from __future__ import annotations

import bisect
import math
import re
from typing import Any

import torch

FREQUENCY_EDGES = (1, 5, 32, 256)
POSITION_EDGES = (1, 64, 256, 512)


def _labels(edges: tuple[int, ...]) -> list[str]:
    return [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]


def bucket_means(kld: torch.Tensor, keys: torch.Tensor, edges: tuple[int, ...]) -> list[dict[str, Any]]:
    """Mean KLD of the tokens whose key falls in each ``[edges[i], edges[i+1])`` (the last open)."""
    which = torch.bucketize(keys, torch.tensor(edges[1:]), right=True)
    out = []
    for i, label in enumerate(_labels(edges)):
        values = kld[which == i].double()
        n = values.numel()
        out.append({"bucket": label, "tokens": n, "kld_mean": float(values.mean()) if n else None,
                    "kld_stderr": float(values.std() / math.sqrt(n)) if n > 1 else None})
    return out


def document_ids(tokenizer: Any, text: str, tokens: torch.Tensor) -> torch.Tensor | None:
    """The document (0, 1, ...) of each of ``tokens``, the first tokens of ``text``; None when the
    tokenizer gives no character offsets or does not reproduce ``tokens``."""
    n, chars = tokens.numel(), tokens.numel() * 6
    while True:
        try:
            enc = tokenizer(text[:chars], add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):
            return None
        if len(enc.input_ids) > n or chars >= len(text):
            break
        chars *= 2
    if enc.input_ids[:n] != tokens.tolist():
        return None
    starts = [0] + [m.end() for m in re.finditer(r"\n[ \t]*\n\s*", text[:chars])]
    return torch.tensor([bisect.bisect_right(starts, a) - 1 for a, _ in enc.offset_mapping[:n]], dtype=torch.long)


def kld_buckets(kld: torch.Tensor, index: torch.Tensor, position: torch.Tensor, tokens: torch.Tensor,
                documents: torch.Tensor | None) -> dict[str, Any]:
    """The three cuts for per-token ``kld`` of the scored tokens at stream ``index`` and window
    ``position``, ``tokens`` the whole scored stream, ``documents`` its document ids (or None)."""
    counts = torch.bincount(tokens)[tokens[index]]
    out: dict[str, Any] = {"frequency": bucket_means(kld, counts, FREQUENCY_EDGES),
                           "position": bucket_means(kld, position, POSITION_EDGES)}
    if documents is None:
        out["documents"] = None
        return out
    doc = documents[index]
    rows = []
    for d in torch.unique(doc).tolist():
        values = kld[doc == d].double()
        rows.append({"document": d, "tokens": values.numel(), "kld_mean": float(values.mean())})
    out["documents"] = rows
    return out
