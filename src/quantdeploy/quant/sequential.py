"""The layer-sequential calibration runner: one decoder block on the device at a time.

1. Capture the inputs of block 0 (hidden states and the block's keyword arguments, such as rotary
   embeddings) for all calibration samples, running only the modules before the first block.
2. For each block: move it to the device, let the method calibrate and quantize its Linear layers
   (through a :class:`BlockRunner`, which can run the block over all samples with hooks and stop early,
   just before the first layer whose input is not needed), put the fake-quantized weights in place, run
   the block to get its outputs, which become the next block's inputs (so every block is calibrated on
   the activations of the already-quantized model before it), then restore the original weights and move
   the block back.

Peak device memory is one block, its inputs and outputs, the method's statistics and at most
``MEMO_BYTES`` of finished layers' outputs kept for reuse; the source model
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


MEMO_BYTES = 2 * 2**30  # outputs of finished layers kept for reuse, per block (see BlockRunner)


class BlockRunner:
    """Runs one block over every captured batch; records and restores weights the method replaces.

    A weight put in place with :meth:`set_weight` is final, and so (methods finish layers in execution
    order) is everything upstream of it. A later pass would recompute that layer's output from the
    same input and weight, so the runner keeps it per batch and returns it instead; once every layer
    inside a submodule (an attention or MLP module) is final, the submodule's whole output is kept.
    True-sequential GPTQ thus computes each layer about once per block instead of once per stage. The
    outputs are held by reference (no copies), up to ``memo_bytes``; past that, layers are recomputed.
    """

    def __init__(self, block: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict],
                 memo_bytes: int = MEMO_BYTES) -> None:
        self.block, self.hidden, self.kwargs = block, hidden, kwargs
        self._originals: dict[nn.Linear, torch.Tensor] = {}
        self._memo_bytes, self._held = memo_bytes, 0
        self._memos: dict[nn.Module, dict[int, object]] = {}
        self._own_forward: dict[nn.Module, object] = {}  # a forward set on the instance before ours (accelerate's)
        self._batch = 0
        # every submodule with weighted layers inside, and those layers (the block itself excluded)
        self._inside = {m: [x for x in m.modules() if hasattr(x, "in_features")] for m in block.modules()
                        if m is not block}
        self._inside = {m: inner for m, inner in self._inside.items() if inner}

    def run(self, stop_before: nn.Module | None = None, batches: int | None = None) -> list[torch.Tensor] | None:
        """Run all (or the first ``batches``) batches and return the outputs; with ``stop_before``, end
        each pass just before that module would run (its input hooks, registered earlier, still see it)."""
        handle = stop_before.register_forward_pre_hook(_raise_stop) if stop_before is not None else None
        outputs = []
        try:
            for i, (h, kw) in enumerate(list(zip(self.hidden, self.kwargs))[:batches]):
                self._batch = i
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
        """Put the final (fake-quantized) weight of ``linear`` in place for the rest of this block's
        calibration; later passes reuse its output."""
        if linear not in self._originals:
            self._originals[linear] = linear.weight.data
        linear.weight.data = weight.to(linear.weight.dtype)
        for module, inner in self._inside.items():  # outermost first: a finished submodule is kept whole
            if module in self._memos or not all(x in self._originals for x in inner):
                continue
            if any(module in set(m.modules()) for m in self._memos if m is not module):
                continue  # inside a submodule that is already kept whole
            self._memoize(module, parts=[m for m in self._memos if m in set(module.modules())])

    def _memoize(self, module: nn.Module, parts: list[nn.Module] = ()) -> None:
        """Wrap ``module.forward`` to keep its output per batch; once kept, ``parts`` (memoized modules
        inside it) will not run for that batch again, so their copies are dropped."""
        store: dict[int, object] = {}
        original = module.forward

        def forward(*args, **kwargs):  # noqa: ANN002, ANN003 - the wrapped module's signature
            if self._batch in store:
                return store[self._batch]
            out = original(*args, **kwargs)
            size = _nbytes(out)
            if self._held + size <= self._memo_bytes:
                store[self._batch] = out
                self._held += size
                for part in parts:
                    self._held -= _nbytes(self._memos[part].pop(self._batch, None))
            return out

        self._own_forward[module] = vars(module).get("forward")
        module.forward = forward
        self._memos[module] = store

    def _forget(self, module: nn.Module) -> None:
        self._held -= sum(_nbytes(out) for out in self._memos.pop(module).values())
        previous = self._own_forward.pop(module)
        if previous is None:
            del module.forward  # back to the class's forward
        else:
            module.forward = previous

    def restore(self) -> None:
        for module in list(self._memos):
            self._forget(module)
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


def _nbytes(out: object) -> int:
    return sum(t.nbytes for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor))


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
