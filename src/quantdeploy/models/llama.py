"""A compact Llama-family transformer (Llama 1-3, Mistral, Qwen2, SmolLM2) for the engine.

One readable model in the spirit of gpt-fast: RMSNorm, rotary position embeddings (every scaling
variant transformers implements, computed by transformers' own RoPE init functions so the
frequencies are identical), grouped-query attention, a SwiGLU MLP, optional q/k/v biases (Qwen2) and
tied embeddings. Linear layers are plain ``nn.Linear`` or the engine's ``QuantLinear``; the model does
not care which. Tensor names and checkpoint conversion live in ``models/hf_names.py``.

Three ways to run it:

- ``forward(tokens)``: the whole sequence, causal attention, no cache (checks against transformers);
- ``prefill(tokens, rows, start, lengths)``: a chunk of one or several (right-padded) sequences, written
  into their cache rows at positions ``start..``, each attending to everything its row cached before
  (``prefill_chunk``: the same with the offset a device tensor and static shapes, for a CUDA graph);
- ``decode(tokens, positions, kv_len)``: one new token for each of the cache rows ``0..n-1``, each at
  its own position; attention reads the first ``kv_len`` cached positions under a per-row mask, or
  (``decode_attention = "split_kv"``, the engine's choice on CUDA) each row exactly its own positions
  through the cache's ``attend`` kernel, whatever ``kv_len``.

The KV cache is owned by the engine: it attaches one cache module per layer (``attach_cache``) with
``write(rows, positions, k, v)`` and ``read(row_slice, length, dtype)``; the model only calls those.
Grouped-query attention never copies K/V. Causal attention (``forward`` and ``prefill``: every row's
queries at ``start..start+T-1`` over positions ``0..start+T-1``) is SDPA with ``is_causal`` or, for a
chunk after a cached prefix, its bottom-right-aligned variant (``causal_lower_right``), and
``enable_gqa``: no ``T x S`` mask is built or read, so flash attention applies (on an 8k prompt the
boolean mask of one layer was 268 MB, read back as a bias by every layer of every chunk). A decode step
with a mask folds the ``H/Hkv`` query heads that share a KV head into the query-length axis, so one SDPA
call over ``[B, Hkv, rep*T, D]`` does the whole group.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from quantdeploy.errors import ModelSourceError

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    """The shape of a Llama-family model, read from a transformers config."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_seq_len: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False

    @classmethod
    def from_hf(cls, config: Any) -> "ModelArgs":
        kind = getattr(config, "model_type", None)
        if kind not in SUPPORTED:
            raise ModelSourceError(f"architecture '{kind}' is not supported by the engine (supported: "
                                   f"{', '.join(SUPPORTED)}; SmolLM2 is llama); "
                                   "'quantdeploy generate --transformers' runs it through transformers")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ModelSourceError(f"activation '{config.hidden_act}' is not supported by the engine (SwiGLU/silu only)")
        if kind == "qwen2" and getattr(config, "use_sliding_window", False):
            raise ModelSourceError("Qwen2 with use_sliding_window is not supported by the engine")
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        max_seq = config.max_position_embeddings
        window = getattr(config, "sliding_window", None) if kind == "mistral" else None
        if window:  # within the window, sliding-window attention is full attention: cap the context there
            max_seq = min(max_seq, window)
        attn_bias = bool(getattr(config, "attention_bias", False))
        return cls(vocab_size=config.vocab_size, dim=config.hidden_size, n_layers=config.num_hidden_layers,
                   n_heads=n_heads, n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
                   head_dim=head_dim, intermediate_size=config.intermediate_size, norm_eps=config.rms_norm_eps,
                   max_seq_len=max_seq, qkv_bias=attn_bias or kind == "qwen2", o_bias=attn_bias,
                   mlp_bias=bool(getattr(config, "mlp_bias", False)),
                   tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)))


def rope_tables(config: Any, max_seq_len: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` ``[max_seq_len, head_dim]`` fp32, as transformers computes them for ``config``.

    The inverse frequencies come from transformers' RoPE init function for the config's scaling type
    (default, linear, llama3, yarn, longrope), so every variant matches. Dynamic NTK rescales with the
    sequence length, which a static table cannot do: it is refused.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    kind = params.get("rope_type", "default")
    if kind == "dynamic":
        raise ModelSourceError("dynamic NTK RoPE scaling is not supported by the engine (its table changes with length)")
    if kind == "default":
        n_heads = config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        inv_freq, scaling = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    elif kind in ROPE_INIT_FUNCTIONS:
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
    else:
        raise ModelSourceError(f"RoPE scaling '{kind}' is not supported by the engine")
    freqs = torch.arange(max_seq_len, dtype=torch.float)[:, None] * inv_freq.float()[None, :]  # [S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, D]
    return (emb.cos() * scaling).to(device), (emb.sin() * scaling).to(device)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalized in fp32, cast back, then scaled: transformers' order of roundings
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, H, T, D]`` by ``cos``/``sin`` ``[B, 1, T, D]`` (the half-split convention of HF weights)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def reduce_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention written as broadcast products and reductions, in fp32: ``q [B, H, R, D]`` against
    ``k``/``v`` ``[B, H, S, D]`` under ``mask [B, 1, R, S]``. For a decode step (R = the query heads of
    one KV head) torch.compile turns this into two or three fused reduction kernels, cheaper than an
    SDPA kernel launch plus the layout copies it needs; eagerly it is slower, so only compiled decode
    uses it."""
    scale = q.shape[-1] ** -0.5
    scores = (q.float()[:, :, :, None, :] * k.float()[:, :, None, :, :]).sum(-1) * scale  # [B, H, R, S]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return (probs[..., None] * v.float()[:, :, None, :, :]).sum(-2).to(q.dtype)  # [B, H, R, D]


class MultiLinear(nn.Module):
    """Several linear maps of one input. ``fuse()`` turns them into one matmul when their weights allow."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.fused: nn.Module | None = None
        self.sizes: list[int] = []

    def fuse(self, fuse_fn) -> None:  # noqa: ANN001 - see models.hf_names.fuse_linears
        fused = fuse_fn(list(self.parts))
        if fused is not None:
            self.sizes = [p.out_features for p in self.parts]
            self.fused, self.parts = fused, nn.ModuleList()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused is not None:
            return self.fused(x).split(self.sizes, dim=-1)
        return tuple(p(x) for p in self.parts)


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.wqkv = MultiLinear([_linear(a.dim, a.n_heads * a.head_dim, a.qkv_bias),
                                 _linear(a.dim, a.n_kv_heads * a.head_dim, a.qkv_bias),
                                 _linear(a.dim, a.n_kv_heads * a.head_dim, a.qkv_bias)])
        self.wo = _linear(a.n_heads * a.head_dim, a.dim, a.o_bias)
        self.kv_cache: nn.Module | None = None
        self.decode_attention = "sdpa"  # or "reduce" (see reduce_attention) or "split_kv" (the cache's own kernel)
        self.k_scale: torch.Tensor | None = None  # static KV-cache scales [n_kv_heads], when quantized
        self.v_scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                cache_at: tuple | None) -> torch.Tensor:
        """``x [B, T, dim]``; ``mask [B, 1, rep*T, S]`` bool (True = attend; rows per query group, built once in
        ``_run``), or None: causal, the ``T`` queries being the last of the ``S`` positions. ``cache_at`` = (rows [B], positions [B, T],
        kv_rows: a slice or [B] tensor, kv_len) writes K/V into the cache and attends over the cached rows' first ``kv_len``
        positions (``kv_len`` None: a decode step of rows 0..B-1 through the cache's ``attend``, each row its own
        positions); None attends over this chunk only."""
        b, t, _ = x.shape
        q, k, v = self.wqkv(x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_at is not None:
            rows, positions, kv_rows, kv_len = cache_at
            self.kv_cache.write(rows, positions, k, v)
            if kv_len is None:  # a split-KV decode step: rows 0..B-1, each reading its own length
                y = self.kv_cache.attend(q[:, :, 0], positions[:, 0] + 1)  # [B, H, D]
                return self.wo(y.reshape(b, 1, -1))
            k, v = self.kv_cache.read(kv_rows, kv_len, q.dtype)  # [B, Hkv, S, D]
        if mask is None:  # causal: a whole sequence, or a chunk after the s - t positions cached before it
            s = k.shape[2]
            bias = causal_lower_right(t, s) if s != t else None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=s == t, enable_gqa=True)
            return self.wo(y.transpose(1, 2).reshape(b, t, -1))
        rep = self.n_heads // self.n_kv_heads
        # Fold the query heads that share a KV head into the query axis: [B, Hkv, rep*T, D].
        qg = q.reshape(b, self.n_kv_heads, rep * t, self.head_dim)
        if t == 1 and self.decode_attention == "reduce":
            y = reduce_attention(qg, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)
        y = y.reshape(b, self.n_heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.w13 = MultiLinear([_linear(a.dim, a.intermediate_size, a.mlp_bias),
                                _linear(a.dim, a.intermediate_size, a.mlp_bias)])  # gate (w1), up (w3)
        self.w2 = _linear(a.intermediate_size, a.dim, a.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache_at) -> torch.Tensor:  # noqa: ANN001
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_at)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The model: ``tok_embeddings → layers → norm → output``. Build it, load weights, then ``setup``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = _linear(args.dim, args.vocab_size, False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def set_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.rope_cos, self.rope_sin = cos, sin

    def attach_cache(self, make_cache) -> None:  # noqa: ANN001 - make_cache(layer_index, attention) -> module
        for i, layer in enumerate(self.layers):
            layer.attention.kv_cache = make_cache(i, layer.attention)

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache_at,  # noqa: ANN001
             last: torch.Tensor | None) -> torch.Tensor:
        """Logits ``[B, T, vocab]``, or ``[B, 1, vocab]`` at each row's index ``last [B]`` when given."""
        x = self.tok_embeddings(tokens)  # [B, T, dim]
        cos = self.rope_cos[positions].unsqueeze(1).to(x.dtype)  # [B, 1, T, D]
        sin = self.rope_sin[positions].unsqueeze(1).to(x.dtype)
        rep = self.args.n_heads // self.args.n_kv_heads
        if mask is not None:  # None: causal (a prefill), or a split-KV decode step, whose kernel bounds each row
            mask = mask[:, None].repeat(1, 1, rep, 1)  # [B, T, S] → [B, 1, rep*T, S]: the grouped query rows
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache_at)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last][:, None]
        return self.output(self.norm(x)).float()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` of whole sequences ``tokens [B, T]`` (causal, no cache)."""
        b, t = tokens.shape
        positions = torch.arange(t, device=tokens.device).expand(b, t)
        return self._run(tokens, positions, None, None, last=None)

    def prefill(self, tokens: torch.Tensor, rows: int | torch.Tensor, start: int = 0,
                lengths: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
        """Run ``tokens [B, T]`` of the sequences in cache ``rows`` (one row as an int, or a ``[B]`` device
        tensor) at positions ``start..start+T-1``, attending to what each row has cached before them.

        Several sequences are right-padded to one length; ``lengths [B]`` gives each row's real token
        count. Padding writes past a row's end in the cache, where nothing reads it before decode writes
        over it (every read is masked to positions at or before the reader's). With ``last_only`` the
        logits are each row's at its last real token, ``[B, 1, vocab]``; otherwise ``[B, T, vocab]``."""
        b, t = tokens.shape
        device = tokens.device
        positions = torch.arange(start, start + t, device=device).expand(b, t)  # [B, T]
        kv_len = start + t  # attention is causal over the row's first kv_len positions (mask None)
        if isinstance(rows, int):
            rows, kv_rows = torch.full((1,), rows, dtype=torch.long, device=device), slice(rows, rows + 1)
        else:
            kv_rows = rows
        last = None
        if last_only:
            last = lengths - 1 if lengths is not None else torch.full((b,), t - 1, dtype=torch.long, device=device)
        return self._run(tokens, positions, None, (rows, positions, kv_rows, kv_len), last)

    def prefill_chunk(self, tokens: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, kv_len: int,
                      last: torch.Tensor) -> torch.Tensor:
        """``prefill`` of ``tokens [B, T]`` in cache ``rows [B]`` at positions ``start..start+T-1``, the offset a
        device tensor so that one CUDA graph serves every chunk whose queries end at position ``kv_len - 1``
        (``start = kv_len - T``: attention is causal over exactly those positions, with no mask). A last
        chunk right-padded to ``T`` writes its padding past the prompt's end (the caller's block table must
        reach ``kv_len``) and reads the RoPE tables at their last row there; nothing reads either before decode
        writes over them. Logits ``[B, 1, vocab]`` at each row's chunk index ``last [B]``."""
        positions = start[:, None] + torch.arange(tokens.shape[1], device=tokens.device)  # [B, T]
        rope_positions = positions.clamp(max=self.rope_cos.shape[0] - 1)
        return self._run(tokens, rope_positions, None, (rows, positions, rows, kv_len), last)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One step for cache rows ``0..n-1``: ``tokens [n]`` at ``positions [n]`` → logits ``[n, vocab]``."""
        n = tokens.shape[0]
        rows = torch.arange(n, device=tokens.device)
        mask, span = None, None  # split-KV: no mask, no span; the kernel reads each row's length
        if self.layers[0].attention.decode_attention != "split_kv":
            mask = (torch.arange(kv_len, device=tokens.device)[None, :] <= positions[:, None])[:, None]  # [n, 1, S]
            span = kv_len
        logits = self._run(tokens[:, None], positions[:, None], mask, (rows, positions[:, None], slice(0, n), span), None)
        return logits[:, 0]
