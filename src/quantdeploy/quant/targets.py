"""Which modules of a model get quantized.

A :class:`TargetConfig` selects ``nn.Linear`` (and, on request, ``nn.Embedding``) modules by name.
Patterns are either plain names, which match a module whose dotted name equals the pattern or ends
with ``"." + pattern`` (``q_proj`` matches every ``...self_attn.q_proj``), or regular expressions
prefixed with ``re:`` that are searched in the dotted name. Precedence: ``exclude`` beats ``include``;
an empty ``include`` means every Linear layer. The output head (``lm_head``) and the input embeddings
are left out unless ``lm_head`` / ``embeddings`` is set, since they cost the most accuracy per byte.
"""

from __future__ import annotations

import dataclasses
import re

from torch import nn

from quantdeploy.config import Config
from quantdeploy.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TargetConfig(Config):
    TYPE = "targets"
    VERSION = 1

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    lm_head: bool = False
    embeddings: bool = False

    def validate(self) -> None:
        for pattern in (*self.include, *self.exclude):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ConfigError(f"bad regular expression {pattern!r}: {err}") from None


def name_matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def select_targets(model: nn.Module, targets: TargetConfig) -> dict[str, nn.Module]:
    """Modules to quantize, by dotted name, in model order: ``nn.Linear`` and requested embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module is head and not targets.lm_head:
                continue
        elif isinstance(module, nn.Embedding):
            if module is not embed or not targets.embeddings:
                continue
        else:
            continue
        if targets.include and not any(name_matches(name, p) for p in targets.include):
            if not (module is head and targets.lm_head) and not (module is embed and targets.embeddings):
                continue
        if any(name_matches(name, p) for p in targets.exclude):
            continue
        chosen[name] = module
    for pattern in targets.include:
        if not any(name_matches(n, pattern) for n, _ in model.named_modules()):
            raise ConfigError(f"include pattern {pattern!r} matches no module; check the names with 'quantdeploy inspect'")
    return chosen
