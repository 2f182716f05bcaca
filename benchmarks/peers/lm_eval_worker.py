"""Runs inside lm_eval's own environment (see ``benchmarks/lm_eval_check.py``): the same local tasks
through lm_eval's ``hf`` model and through our ``quantdeploy`` model, with every request's answer.

    python lm_eval_worker.py MODEL_DIR TASKS_DIR OUT.json [--limit N]

``TASKS_DIR`` holds the task YAMLs the check wrote (over local JSON files). Writes, per model, the
task metrics and the per-request responses (log-likelihoods, rolling log-likelihoods, generations).
"""

import argparse
import json
import time

import lm_eval
from lm_eval.tasks import TaskManager

import quantdeploy.eval.lm_eval_adapter  # noqa: F401 - registers the model "quantdeploy"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("tasks_dir")
    p.add_argument("out")
    p.add_argument("--tasks", nargs="+", default=["qd_mc", "qd_rolling", "qd_gen"])
    p.add_argument("--limit", type=int, default=None)
    args = p.parse_args()
    manager = TaskManager(include_path=args.tasks_dir)
    out = {"lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None}
    for name, model_args in (("hf", f"pretrained={args.model_dir},dtype=float32"),
                             ("quantdeploy", f"checkpoint={args.model_dir}")):
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=name, model_args=model_args, tasks=args.tasks, task_manager=manager,
                                      batch_size=8, device="cpu", limit=args.limit, log_samples=True)
        out[name] = {"seconds": round(time.perf_counter() - t0, 1),
                     "results": {t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
                                 for t, r in res["results"].items()},
                     "samples": {t: [{"doc_id": s["doc_id"], "resps": s["resps"]} for s in samples]
                                 for t, samples in res["samples"].items()}}
    with open(args.out, "w") as f:
        json.dump(out, f, default=str)


if __name__ == "__main__":
    main()
