"""The layer-sequential calibration runner: one decoder block on the device at a time.

1. Capture the inputs of block 0 (hidden states and the block's keyword arguments, such as rotary
   embeddings) for all calibration samples, running only the modules before the first block.
2. For each block: move it to the device, let the method calibrate and quantize its Linear layers
   (through a :class:`BlockRunner`, which can run the block over all samples with hooks and stop early,
   just before the first layer whose input is not needed), put the fake-quantized weights in place, run
   the block to get its outputs, which become the next block's inputs (so every block is calibrated on
   the activations of the already-quantized model before it), then restore the original weights and move
   the block back.

Peak device memory is one block, its inputs and outputs, and the method's statistics; the source model
is left unchanged. The runner knows nothing of any method; methods know nothing of devices.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import nn

from quantdeploy.errors import ConfigError

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList holding the most Linear layers (float or quantized: anything
    with ``in_features``), and its dotted name."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(hasattr(m, "in_features") for m in module.modules())
            if count > best_count:
                best, best_count = (name, module), count
    if best is None:
        raise ConfigError("this model has no list of decoder blocks with Linear layers; calibrated methods need one")
    return best


class BlockRunner:
    """Runs one block over every captured batch; records and restores weights the method replaces."""

    def __init__(self, block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict]) -> None:
        self.block, self.hidden, self.kwargs = block, hidden, kwargs
        self._originals: dict[nn.Linear, torch.Tensor] = {}

    def run(self, stop_before: nn.Module | None = None, batches: int | None = None) -> list[torch.Tensor] | None:
        """Run all (or the first ``batches``) batches and return the outputs; with ``stop_before``, end
        each pass just before that module would run (its input hooks, registered earlier, still see it)."""
        handle = stop_before.register_forward_pre_hook(_raise_stop) if stop_before is not None else None
        outputs = []
        try:
            for h, kw in list(zip(self.hidden, self.kwargs))[:batches]:
                try:
                    out = self.block(h, **kw)
                except _Stop:
                    continue
                outputs.append(out[0] if isinstance(out, tuple) else out)
        finally:
            if handle is not None:
                handle.remove()
        return outputs if stop_before is None else None

    def set_weight(self, linear: nn.Linear, weight: torch.Tensor) -> None:
        """Put a (fake-quantized) weight in place for the rest of this block's calibration."""
        if linear not in self._originals:
            self._originals[linear] = linear.weight.data
        linear.weight.data = weight.to(linear.weight.dtype)

    def restore(self) -> None:
        for linear, weight in self._originals.items():
            linear.weight.data = weight
        self._originals.clear()

    def input_groups(self, linears: dict[str, nn.Linear]) -> list[list[str]]:
        """Linear layers grouped by the input they share (q/k/v; gate/up), in execution order."""
        seen: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their memory from reuse
        hooks = [m.register_forward_hook(lambda mod, args, out, n=n: seen.append((n, args[0])))
                 for n, m in linears.items()]
        try:
            self.run(batches=1)
        finally:
            for h in hooks:
                h.remove()
        groups: list[list[str]] = []
        last: torch.Tensor | None = None
        for name, x in seen:
            if any(name in g for g in groups):
                break
            if x is not last:
                groups.append([])
            groups[-1].append(name)
            last = x
        return groups


def _raise_stop(module, args):  # noqa: ANN001 - hook signature
    raise _Stop


@contextlib.contextmanager
def capture_hooks(linears: dict[str, nn.Linear], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, input)`` with each Linear's input, before it runs, while the context is open."""
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: fn(n, args[0])) for n, m in linears.items()]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class _Catcher(nn.Module):
    def __init__(self, store: list) -> None:
        super().__init__()
        self.store = store

    def forward(self, hidden, *args, **kwargs):  # noqa: ANN001
        self.store.append((hidden, kwargs))
        raise _Stop


@torch.no_grad()
def capture_block_inputs(model: nn.Module, tokens: torch.Tensor, device: torch.device,
                         batch_size: int) -> tuple[list[torch.Tensor], list[dict]]:
    """Hidden states and keyword arguments entering block 0, one entry per batch, on ``device``."""
    prefix, blocks = find_blocks(model)
    parent_name, _, attr = prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    store: list = []
    setattr(parent, attr, nn.ModuleList([_Catcher(store)]))  # only the modules before the blocks run
    original_device = next(model.parameters()).device
    try:
        model.to(device)
        for start in range(0, tokens.shape[0], batch_size):
            try:
                model(tokens[start:start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        model.to(original_device)
        setattr(parent, attr, blocks)
    hidden = [h for h, _ in store]
    kwargs = [{k: v for k, v in kw.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
              for _, kw in store]
    return hidden, kwargs


BlockFn = Callable[[int, str, nn.Module, BlockRunner], None]


@torch.no_grad()
def run_sequential(model: nn.Module, tokens: torch.Tensor, device: torch.device, batch_size: int,
                   per_block: BlockFn, progress: Callable[[int, int], None] | None = None) -> None:
    """Call ``per_block(index, block_name, block, runner)`` for each block, feeding quantized outputs on."""
    prefix, blocks = find_blocks(model)
    hidden, kwargs = capture_block_inputs(model, tokens, device, batch_size)
    for i, block in enumerate(blocks):
        home = next(block.parameters()).device
        block.to(device)
        runner = BlockRunner(block, hidden, kwargs)
        try:
            per_block(i, f"{prefix}.{i}", block, runner)
            hidden = runner.run()  # with the quantized weights in place
        finally:
            runner.restore()
            block.to(home)
        if progress:
            progress(i + 1, len(blocks))
        if device.type == "cuda":
            torch.cuda.empty_cache()
