"""lm-evaluation-harness's model ``quantdeploy``: any quantdeploy checkpoint or model source under lm_eval.

    quantdeploy-lm-eval --model quantdeploy --model_args checkpoint=DIR --tasks TASKS [any lm_eval flag]

lm_eval 0.4.13 (the newest on the package index) finds models only in its own registry and has no
plugin mechanism for a package outside it, so a plain ``lm_eval --model quantdeploy`` cannot see this
class; ``quantdeploy-lm-eval`` is lm_eval's own command line with this module imported first (which
registers the name), taking exactly lm_eval's arguments. Programs that call ``lm_eval.simple_evaluate``
import this module and pass ``model="quantdeploy"``.

The three request types map onto ``eval/tasks/lm.py``'s ``TaskModel``, which tokenizes as lm_eval's
``hf`` model does (trailing context spaces move to the continuation; BOS, else EOS, before an empty
context; no special tokens otherwise), so the two give the same log-likelihoods up to the float
arithmetic of batching (``benchmarks/lm_eval_check.py`` measures it):

- ``loglikelihood``: requests with the same context are scored in one batch;
- ``loglikelihood_rolling``: lm_eval's own disjoint rolling windows of ``max_length`` tokens, BOS/EOS
  first, summed;
- ``generate_until``: greedy, or sampled when ``do_sample`` with a temperature, through our engine
  where it serves the architecture; ``until`` strings stop it, ``max_gen_toks`` bounds it.

Model arguments: ``checkpoint`` (required), ``device`` (cpu or cuda), ``batch_size`` (sequences per
forward and engine rows, default 16), ``max_length`` (default 2048, capped by the model).
"""

from __future__ import annotations

import itertools

import lm_eval.models  # noqa: F401 - lm_eval fills its registry on first use only while it is empty:
from lm_eval import utils as lm_utils  # its own models first, or registering ours would hide them
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.eval.tasks.lm import TaskModel


@register_model("quantdeploy")
class QuantdeployLM(LM):
    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int | str = 16, max_length: int = 2048,
                 max_batch_size: int | None = None, **_: object) -> None:
        import quantdeploy as qd

        super().__init__()
        rows = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" is lm_eval's; we pick 16
        self.model = TaskModel(qd.load(checkpoint, device=device), str(checkpoint), max_batch=rows,
                               max_seq_len=int(max_length))

    def loglikelihood(self, requests, disable_tqdm: bool = False):  # noqa: ANN001, ANN201 - lm_eval's types
        out = []
        keyed = [(req.args[0], req.args[1]) for req in requests]
        for context, group in itertools.groupby(keyed, key=lambda pair: pair[0]):
            scores = self.model.loglikelihoods(context, [cont for _, cont in group])
            out.extend((logp, greedy) for logp, _, greedy in scores)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # noqa: ANN001, ANN201
        out = []
        for (text,) in (req.args[:1] for req in requests):
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.model.encode(text), prefix_token=self.model.prefix_token_id,
                max_seq_len=self.model.max_len, context_len=1)]
            out.append(sum(logp for logp, _, _ in self.model.token_loglikelihoods(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):  # noqa: ANN001, ANN201
        out: list[str | None] = [None] * len(requests)
        keyed = sorted(range(len(requests)), key=lambda i: repr(sorted(requests[i].args[1].items())))
        for _, group in itertools.groupby(keyed, key=lambda i: repr(sorted(requests[i].args[1].items()))):
            index = list(group)
            kwargs = dict(requests[index[0]].args[1])
            until = kwargs.get("until") or []
            sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature") or 0) > 0
            params = SamplingParams(max_tokens=int(kwargs.get("max_gen_toks", 256)),
                                    stop=tuple([until] if isinstance(until, str) else until),
                                    temperature=float(kwargs.get("temperature", 0)) if sample else 0.0,
                                    seed=int(kwargs.get("seed", 0)) if sample else None)
            for i, text in zip(index, self.model.generate([requests[i].args[0] for i in index], params)):
                out[i] = text
        return out

