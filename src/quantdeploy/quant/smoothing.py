"""Channel scaling that leaves a float model unchanged: the mappings and the folding that AWQ and
SmoothQuant share.

A mapping is a producer (a norm, or a Linear whose output rows feed the consumers channel by channel)
and the Linear layers that read its output. Scaling the consumers' input columns by ``s`` and the
producer's output channels by ``1/s`` leaves every block output unchanged (in exact arithmetic).

The mappings are those of the Llama family (Llama, Mistral, Qwen2, SmolLM2); a mapping whose producer
width differs from its consumers' input (``v_proj`` → ``o_proj`` under grouped-query attention) is
skipped, as in AutoAWQ and llm-compressor.
"""

from __future__ import annotations

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


def block_mappings(block: nn.Module, linears: dict[str, nn.Linear]) -> list[tuple[nn.Module, list[str]]]:
    """The applicable mappings of ``block`` as (producer module, full names of the consumers), keeping
    only mappings whose consumers are all in ``linears`` (full name → module) and widths match."""
    relative = {id(m): n for n, m in block.named_modules()}
    by_relative = {relative[id(m)]: full for full, m in linears.items() if id(m) in relative}
    out = []
    for producer_name, consumer_names in LLAMA_MAPPINGS:
        fulls = [by_relative.get(c) for c in consumer_names]
        if any(f is None for f in fulls):
            continue  # not all consumers are quantized here (excluded, or another architecture)
        producer = block.get_submodule(producer_name)
        width = producer.out_features if isinstance(producer, nn.Linear) else producer.weight.numel()
        if width != linears[fulls[0]].in_features:
            log.debug("%s feeds %s through grouped heads; mapping skipped", producer_name, consumer_names)
            continue
        out.append((producer, fulls))
    return out


def fold_scales(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide the producer's output channels by ``s`` and multiply the consumers' inputs by it."""
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
        c.weight.data.mul_(s.unsqueeze(0).to(c.weight.dtype))
