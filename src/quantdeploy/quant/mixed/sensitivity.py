"""Per-layer sensitivity: what quantizing one Linear layer alone, to one candidate spec, costs.

The cost is measured, not guessed: the layer's weight is replaced by its quantization (round to nearest
with the method's clip search by default, the grid a calibrated method starts from; GPTQ's own weights
for a GPTQ plan: ``layers.py``), the whole model runs on
calibration windows, and the mean KL divergence of its next-token distributions to the unquantized
model's is the layer's cost at that spec. Every other layer stays as it was, so the costs of different
layers are independent measurements, and their sum is the allocation's prediction of the model's KLD
when several are quantized together (``allocate.py`` reports that sum next to the measured KLD).

The cost of a layer kept in the original dtype is zero. The bits of a candidate are what the checkpoint
stores per weight: codes plus scales and zero points (``QuantizedWeight.tensors``), so a group of 32
costs more than a group of 128 at the same width.

Work is ``layers x candidates`` forward passes over the windows: on the bundled SmolLM2-135M (210
Linears, 4 candidates) 840 passes; one pass over 4 windows of 128 tokens takes about 1.2 s on 2 CPU
cores, so about 17 minutes there (the default windows; fewer or shorter ones trade accuracy for time).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantdeploy.quant.spec import QuantSpec

#: The original weight, kept: zero cost, at the original dtype's bits.
KEEP = "original"

#: Candidates tried by default (integer grids RTN and GPTQ write; NF4 where asked), best first.
DEFAULT_CANDIDATES = (QuantSpec(dtype="int8", group_size=None), QuantSpec(dtype="int4", group_size=32),
                      QuantSpec(dtype="int4", group_size=128), QuantSpec(dtype="int3", group_size=64))


@dataclasses.dataclass
class Sensitivity:
    """``cost[name][option]`` (mean KLD with only that layer at that option), ``bits[name][option]`` (stored
    bits per weight) and ``numel[name]``; options are spec descriptions, plus ``KEEP``."""

    cost: dict[str, dict[str, float]]
    bits: dict[str, dict[str, float]]
    numel: dict[str, int]
    specs: dict[str, dict[str, QuantSpec]]

    def to_dict(self) -> dict:
        return {"cost": self.cost, "bits": self.bits, "numel": self.numel,
                "specs": {n: {o: s.to_dict() for o, s in opts.items()} for n, opts in self.specs.items()}}


def stored_bits(qw) -> float:  # noqa: ANN001 - a QuantizedWeight
    """Bits per weight the checkpoint stores for ``qw``: codes, scales and zero points."""
    total = sum(t.numel() * t.element_size() for t in qw.tensors.values())
    return 8 * total / (qw.shape[0] * qw.shape[1])


@torch.no_grad()
def _log_probs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(input_ids=tokens).logits.float(), dim=-1)


class _Reference:
    """The unquantized model's next-token distributions, with ``sum p log p`` per position kept in fp64:
    each measurement then costs one forward pass and one product with ``p`` (the costs of an int8 layer
    are ~1e-4 nats, so the sums are taken in fp64)."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor) -> None:
        logp = _log_probs(model, tokens)
        self.p = logp.exp()
        self.neg_entropy = (self.p * logp).sum(-1, dtype=torch.float64)

    def kld(self, model: nn.Module, tokens: torch.Tensor) -> float:
        return self.kld_of(_log_probs(model, tokens))

    def kld_of(self, logp: torch.Tensor) -> float:
        """Mean KLD to the reference of a model's log-probabilities on the same tokens."""
        return float(self.window_kld(logp).mean())

    def window_kld(self, logp: torch.Tensor) -> torch.Tensor:
        """Each window's mean KLD to the reference ``[windows]`` (fp64)."""
        return (self.neg_entropy - (self.p * logp).sum(-1, dtype=torch.float64)).mean(-1)


@torch.no_grad()
def measure(model: nn.Module, tokens: torch.Tensor, specs: dict[str, dict[str, QuantSpec]],
            clip_search: bool = True, progress: Callable[[int, int, str], None] | None = None,
            quantize: Callable | None = None) -> Sensitivity:
    """The cost of each ``specs[name][option]`` for each target Linear ``name`` of ``model`` (weights put
    back as they were after each measurement), on ``tokens [windows, seq_len]``; ``quantize``: a
    ``layers.LayerQuantizer`` (default: round to nearest, with the clip search if ``clip_search``)."""
    from quantdeploy.quant.mixed.layers import round_to_nearest

    quantize = quantize or round_to_nearest(clip_search)
    reference = _Reference(model, tokens)
    cost: dict[str, dict[str, float]] = {}
    bits: dict[str, dict[str, float]] = {}
    numel: dict[str, int] = {}
    for i, (name, options) in enumerate(specs.items()):
        module = model.get_submodule(name)
        original = module.weight.data
        numel[name] = original.numel()
        cost[name], bits[name] = {KEEP: 0.0}, {KEEP: 8.0 * original.element_size()}
        for option, spec in options.items():
            qw, module.weight.data = quantize(name, original, spec)
            try:
                cost[name][option] = max(reference.kld(model, tokens), 0.0)
            finally:
                module.weight.data = original
            bits[name][option] = stored_bits(qw)
        if progress:
            progress(i + 1, len(specs), name)
    return Sensitivity(cost=cost, bits=bits, numel=numel, specs=specs)


@torch.no_grad()
def end_to_end_kld(original: nn.Module, quantized: nn.Module, tokens: torch.Tensor) -> float:
    """Mean KLD of ``quantized``'s next-token distributions to ``original``'s on ``tokens``."""
    return _Reference(original, tokens).kld(quantized, tokens)


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation of two equally long lists (ties by average rank)."""
    def ranks(values: list[float]) -> torch.Tensor:
        t = torch.tensor(values, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(values), dtype=torch.float64)
        for v in t.unique():  # average the ranks of ties
            tied = t == v
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))
