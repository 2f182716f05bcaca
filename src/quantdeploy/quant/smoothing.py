"""Channel scaling that leaves a float model unchanged: the mappings and the folding that AWQ and
SmoothQuant share.

A mapping is a producer (a norm, or a Linear whose output rows feed the consumers channel by channel)
and the Linear layers that read its output. Scaling the consumers' input columns by ``s`` and the
producer's output channels by ``1/s`` leaves every block output unchanged (in exact arithmetic).

The mappings are those of the Llama family (Llama, Mistral, Qwen2, SmolLM2). Under grouped-query
attention ``v_proj`` is narrower than ``o_proj``'s input: query head ``h`` reads value head
``h // n_rep``, so ``o_proj`` input channel ``(h, d)`` is value channel ``(h // n_rep, d)``. Such a
:class:`Mapping` carries ``n_rep`` and ``head_dim``: per-channel statistics of the consumers' input are
reduced to the producer's width (:meth:`Mapping.reduce`) and its scales expanded back
(:meth:`Mapping.expand`), so one scale per value channel serves every query head that reads it.
Methods that cannot tie scales this way (AWQ's search) skip grouped mappings, as AutoAWQ and
llm-compressor do.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from quantdeploy.errors import ConfigError

log = logging.getLogger(__name__)

#: (producer, consumers), names relative to a decoder block.
LLAMA_MAPPINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


@dataclasses.dataclass
class Mapping:
    """A producer and the full names of the Linear layers reading its output; ``n_rep > 1`` when each
    producer head feeds ``n_rep`` consecutive heads of ``head_dim`` channels in the consumers' input."""

    producer: nn.Module
    consumers: list[str]
    n_rep: int = 1
    head_dim: int = 0

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        """Per-input-channel maxima ``[..., in]`` of the consumers → the producer's width (max over repeats)."""
        if self.n_rep == 1:
            return v
        heads = v.shape[-1] // (self.n_rep * self.head_dim)
        return v.reshape(*v.shape[:-1], heads, self.n_rep, self.head_dim).amax(dim=-2).flatten(-2)

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """Producer-width scales → the consumers' input width."""
        if self.n_rep == 1:
            return s
        return s.reshape(-1, self.head_dim).repeat_interleave(self.n_rep, dim=0).reshape(-1)


def block_mappings(block: nn.Module, linears: dict[str, nn.Linear], grouped: bool = False) -> list[Mapping]:
    """The applicable mappings of ``block``, keeping only those whose consumers are all in ``linears``
    (full name → module) and whose widths match; with ``grouped``, also GQA mappings (``n_rep > 1``)."""
    relative = {id(m): n for n, m in block.named_modules()}
    by_relative = {relative[id(m)]: full for full, m in linears.items() if id(m) in relative}
    out = []
    for producer_name, consumer_names in LLAMA_MAPPINGS:
        fulls = [by_relative.get(c) for c in consumer_names]
        if any(f is None for f in fulls):
            continue  # not all consumers are quantized here (excluded, or another architecture)
        producer = block.get_submodule(producer_name)
        width = producer.out_features if isinstance(producer, nn.Linear) else producer.weight.numel()
        need = linears[fulls[0]].in_features
        if width == need:
            out.append(Mapping(producer, fulls))
            continue
        head_dim = getattr(getattr(block, "self_attn", None), "head_dim", 0)
        if grouped and head_dim and need % width == 0 and width % head_dim == 0:
            out.append(Mapping(producer, fulls, n_rep=need // width, head_dim=head_dim))
        else:
            log.debug("%s feeds %s through grouped heads; mapping skipped", producer_name, consumer_names)
    return out


def fold_scales(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor,
                consumer_s: torch.Tensor | None = None) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' inputs by
    ``consumer_s`` (``s`` itself unless the mapping is grouped: then ``Mapping.expand(s)``)."""
    consumer_s = s if consumer_s is None else consumer_s
    s = s.to(producer.weight.dtype)
    if isinstance(producer, nn.Linear):
        producer.weight.data.div_(s.unsqueeze(1))
    else:  # a norm: y = w * x_hat (+ b)
        if "gemma" in type(producer).__name__.lower():
            raise ConfigError("cannot fold scales into Gemma's (1 + weight) norms yet")
        producer.weight.data.div_(s)
    if getattr(producer, "bias", None) is not None:
        producer.bias.data.div_(s)
    for c in consumers:
        c.weight.data.mul_(consumer_s.unsqueeze(0).to(c.weight.dtype))
