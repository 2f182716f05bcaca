"""The model side of task evaluation: log-likelihoods of continuations, and generation.

Log-likelihoods come from the model's own forward pass (the bundle's transformers model, quantized
layers included), one batch per query holding every choice, right-padded, in fp32 log-softmax. Text is
split into tokens as lm-evaluation-harness splits it, so that its numbers and ours can be compared:
trailing spaces of the context move to the continuation, the continuation's tokens are those of
``context + continuation`` after the context's, no special tokens are added, and an empty context is
replaced by the BOS (or EOS) token so that the first token has something to follow.

Generation goes through our engine (continuous batching over ``max_batch`` rows) when it serves the
architecture; for any other architecture, through transformers' ``generate``, one prompt at a time,
and the result says which (``generator``): never a silent switch.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.errors import CheckpointError, ModelSourceError

log = logging.getLogger(__name__)


class TaskModel:
    """A loaded model (a ``ModelBundle``) as the evaluators use it."""

    def __init__(self, bundle: Any, name: str, max_batch: int = 16, max_seq_len: int = 2048) -> None:
        self.bundle, self.name = bundle, name
        self.tokenizer = bundle.tokenizer
        self.max_batch = max_batch
        config = bundle.model.config
        self.max_len = min(max_seq_len, getattr(config, "max_position_embeddings", max_seq_len) or max_seq_len)
        self.device = next(iter(bundle.model.parameters())).device
        self._engine: Any = None
        self.generator: str | None = None  # "engine" or "transformers", once a generation ran

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    # ------------------------------------------------------------------ log-likelihoods
    @property
    def prefix_token_id(self) -> int:
        """What an empty context is replaced by: BOS, or EOS where the tokenizer has no BOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of ``context`` and of ``continuation`` after it (see the module docstring)."""
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:  # "Answer: " + "yes" is scored as "Answer:" + " yes", as the tokenizer sees whole text
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.encode(context)
        whole = self.encode(context + continuation)
        cont = whole[len(ctx):]
        return ctx, cont if cont else self.encode(continuation)

    def loglikelihoods(self, context: str, continuations: list[str]) -> list[tuple[float, int, bool]]:
        """``(sum of log p, tokens, greedy)`` of each continuation after ``context``: ``greedy`` when every
        continuation token is the model's argmax. Choices that share their context tokens (the usual case)
        run the context once and the continuations on its keys and values: a multiple-choice query costs
        its context plus its choices, not its context once per choice."""
        pairs = [self.encode_pair(context, c) for c in continuations]
        ctx = pairs[0][0]
        conts = [cont for _, cont in pairs]
        if (1 < len(pairs) <= self.max_batch and all(c == ctx for c, _ in pairs)
                and len(ctx) + max(map(len, conts)) <= self.max_len):
            return self._shared_context(ctx, conts)
        return self.token_loglikelihoods(pairs)

    @torch.inference_mode()
    def _shared_context(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, int, bool]]:
        model = self.bundle.model
        out = model(torch.tensor([ctx], device=self.device), use_cache=True)
        first = F.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()  # predicts every continuation's first token
        width = max(map(len, conts)) - 1
        logp = None
        if width:  # the rest of each continuation, right-padded, after the context's cached keys and values
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(conts))
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            inputs = torch.full((len(conts), width), pad, dtype=torch.long)
            mask = torch.ones((len(conts), len(ctx) + width), dtype=torch.long)
            for row, cont in enumerate(conts):
                inputs[row, :len(cont) - 1] = torch.tensor(cont[:-1])
                mask[row, len(ctx) + len(cont) - 1:] = 0
            positions = torch.arange(len(ctx), len(ctx) + width)[None].expand(len(conts), -1)
            logits = model(inputs.to(self.device), attention_mask=mask.to(self.device), past_key_values=cache,
                           position_ids=positions.to(self.device)).logits
            logp = F.log_softmax(logits.float(), dim=-1).cpu()
        out_rows = []
        for row, cont in enumerate(conts):
            steps = [first] + ([logp[row, j] for j in range(len(cont) - 1)] if logp is not None else [])
            total = sum(float(step[token]) for step, token in zip(steps, cont))
            greedy = all(int(step.argmax()) == token for step, token in zip(steps, cont))
            out_rows.append((total, len(cont), greedy))
        return out_rows

    @torch.inference_mode()
    def token_loglikelihoods(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, int, bool]]:
        """:meth:`loglikelihoods` on token ids, ``max_batch`` sequences per forward; a sequence longer than
        the context window keeps its last ``max_len`` inputs."""
        out = []
        for start in range(0, len(pairs), self.max_batch):
            out.extend(self._score_batch(pairs[start:start + self.max_batch]))
        return out

    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, int, bool]]:
        seqs = [((ctx + cont)[-(self.max_len + 1):], len(cont)) for ctx, cont in pairs]
        width = max(len(ids) - 1 for ids, _ in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        inputs = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (ids, _) in enumerate(seqs):
            inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
            mask[row, :len(ids) - 1] = 1
        logits = self.bundle.model(inputs.to(self.device), attention_mask=mask.to(self.device)).logits
        out = []
        for row, (ids, n) in enumerate(seqs):
            end = len(ids) - 1  # logits at input positions end-n .. end-1 predict the continuation
            logp = F.log_softmax(logits[row, end - n:end].float(), dim=-1).cpu()
            target = torch.tensor(ids[-n:])
            out.append((float(logp.gather(-1, target[:, None]).sum()), n, bool((logp.argmax(-1) == target).all())))
        return out

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: list[str], params: SamplingParams) -> list[str]:
        """The completion of each prompt (text, stop strings cut off)."""
        engine = self._get_engine()
        if engine is not None:
            ids = [self.encode(p)[-(engine.max_seq_len - params.max_tokens):] for p in prompts]
            return [c.text for c in engine.generate(ids, params)]
        return [self._hf_generate(p, params) for p in prompts]

    def _get_engine(self) -> Any:
        if self.generator is None:
            from quantdeploy.engine.engine import Engine

            try:
                self._engine = Engine.from_bundle(self.bundle, self.device, max_batch=self.max_batch,
                                                  max_seq_len=self.max_len)
                self.generator = "engine"
            except (CheckpointError, ModelSourceError) as err:  # another architecture: ModelArgs.from_hf refuses
                log.warning("%s: our engine does not serve this model (%s); generating with transformers",
                            self.name, err)
                self.generator = "transformers"
        return self._engine

    @torch.inference_mode()
    def _hf_generate(self, prompt: str, params: SamplingParams) -> str:
        ids = torch.tensor([self.encode(prompt)[-(self.max_len - params.max_tokens):]], device=self.device)
        kwargs: dict[str, Any] = {"do_sample": not params.greedy}
        if not params.greedy:
            torch.manual_seed(params.seed or 0)
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        out = self.bundle.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                                         pad_token_id=self.tokenizer.eos_token_id, **kwargs)
        text = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        cuts = [text.find(s) for s in params.stop if s in text]
        return text[:min(cuts)] if cuts else text
