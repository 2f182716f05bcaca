"""Sampling: per-request parameters, and one batched, device-resident sampler for a decode step.

Every row of a batch carries its own temperature, top-k, top-p, repetition penalty and seed, held in
device tensors that change only when a sequence joins or leaves. One step maps logits ``[n, vocab]``
to tokens ``[n]`` with device ops only: nothing is read back to the host, so the GPU never waits on
Python between tokens.

Randomness is counter-based: the Gumbel noise for (seed, step, token id) comes from an integer hash of
those three numbers, so a seeded request draws the same tokens whatever else shares its batch and on
any device, and no generator state lives anywhere. Sampling is Gumbel-max over the temperature-scaled,
top-k/top-p-filtered logits, which draws exactly from the softmax of what is kept.
Repetition penalty follows CTRL (Keskar et al. 2019) as transformers applies it: a logit of a token
already in the prompt or output is divided by the penalty when positive, multiplied when negative.
"""

from __future__ import annotations

import dataclasses

import torch

from quantdeploy.errors import ConfigError

_M32 = 0xFFFFFFFF


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2^32."""
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x1B873593) & _M32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform (0, 1) numbers for each (row seed, row step, token id): ``seeds``/``steps`` ``[n]``,
    ``token_ids [n, m]`` → ``[n, m]`` fp32. A pure function of its inputs."""
    key = _mix32(_mix32(seeds) ^ (steps & _M32))  # [n]
    bits = _mix32(key[:, None] ^ _mix32(token_ids + 0x9E3779B9))  # [n, m]
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


class BatchSampler:
    """Per-row sampling state for up to ``rows`` sequences, on ``device``."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device | str) -> None:
        self.temperature = torch.zeros(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.ones(rows, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.seed = torch.zeros(rows, dtype=torch.long, device=device)
        self.step = torch.zeros(rows, dtype=torch.long, device=device)
        self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool, device=device)  # prompt + output tokens
        self.params: list[SamplingParams | None] = [None] * rows

    def assign(self, rows: torch.Tensor, row_ids: list[int], params: list[SamplingParams], seeds: list[int],
               prompts: torch.Tensor, lengths: list[int], steps: list[int] | None = None) -> None:
        """Set the parameters of the rows ``rows`` (device tensor; ``row_ids`` its host copy) and mark
        their prompt tokens as seen: ``prompts [n, T]`` right-padded to ``lengths``. ``steps``: tokens each
        row has sampled before (a resumed sequence: its draws go on where they stopped; default 0). A
        handful of kernels whatever ``n``: the values travel in one copy from pinned memory."""
        steps = steps or [0] * len(params)
        host = torch.tensor([[p.temperature, p.top_k, p.top_p, p.repetition_penalty, seed & _M32, step]
                             for p, seed, step in zip(params, seeds, steps)], dtype=torch.float64)
        if rows.device.type == "cuda":
            host = host.pin_memory()
        values = host.to(rows.device, non_blocking=True)
        for column, target in enumerate((self.temperature, self.top_k, self.top_p, self.penalty, self.seed, self.step)):
            target.index_copy_(0, rows, values[:, column].to(target.dtype))
        self.seen.index_fill_(0, rows, False)
        for i, (row, p) in enumerate(zip(row_ids, params)):
            self.params[row] = p
            if p.repetition_penalty != 1.0:  # index_fill_ takes its value as a kernel argument: no host copy
                self.seen[row].index_fill_(0, prompts[i, :lengths[i]], True)

    def release(self, row: int) -> None:
        self.params[row] = None

    def sample(self, logits: torch.Tensor, rows: slice | torch.Tensor, row_ids: list[int] | None = None) -> torch.Tensor:
        """Tokens for ``rows`` (a slice, or a device tensor of row indices whose host copy is ``row_ids``)
        from their ``logits [n, vocab]``; advances their step counters."""
        active = [p for p in (self.params[rows] if isinstance(rows, slice) else [self.params[r] for r in row_ids])
                  if p is not None]
        logits = logits.float()
        if any(p.repetition_penalty != 1.0 for p in active):
            pen = self.penalty[rows, None]
            penalized = torch.where(logits > 0, logits / pen, logits * pen)
            logits = torch.where(self.seen[rows], penalized, logits)
        if all(p.greedy for p in active):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._draw(logits, rows, filtered=any(p.top_k or p.top_p < 1 for p in active))
        tokens = torch.where(torch.isfinite(logits).all(dim=-1), tokens, -1)  # a NaN/inf row: -1, its request fails
        # Writes go through index kernels that take their value as an argument; ``seen[i, t] = True`` would
        # copy a host tensor to the device, and that copy waits for the whole stream: a sync per token.
        index = rows if isinstance(rows, torch.Tensor) else torch.arange(rows.start, rows.stop, device=logits.device)
        vocab = self.seen.shape[1]
        self.seen.view(-1).index_fill_(0, index * vocab + tokens.clamp(min=0), True)
        self.step.index_add_(0, index, torch.ones_like(index))
        return tokens

    def _draw(self, logits: torch.Tensor, n: slice | torch.Tensor, filtered: bool) -> torch.Tensor:
        temp = self.temperature[n, None]
        scaled = logits / temp.clamp(min=1e-5)
        if filtered:
            values, ids = scaled.sort(dim=-1, descending=True)  # [n, V]
            rank = torch.arange(values.shape[-1], device=logits.device)[None]
            k = torch.where(self.top_k[n] > 0, self.top_k[n], values.shape[-1])[:, None]
            probs = values.softmax(dim=-1)
            before = probs.cumsum(dim=-1) - probs  # mass strictly above each rank: the first is always kept
            keep = (rank < k) & (before < self.top_p[n, None])
            values = values.masked_fill(~keep, float("-inf"))
        else:
            values, ids = scaled, torch.arange(scaled.shape[-1], device=logits.device).expand(scaled.shape[0], -1)
        u = uniform_noise(self.seed[n], self.step[n], ids)
        pick = (values - torch.log(-torch.log(u))).argmax(dim=-1, keepdim=True)  # Gumbel-max
        sampled = ids.gather(-1, pick).squeeze(-1)
        return torch.where(self.temperature[n] > 0, sampled, logits.argmax(dim=-1))
