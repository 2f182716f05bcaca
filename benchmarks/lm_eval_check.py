"""lm-evaluation-harness with our adapter against lm_eval's own ``hf`` model, on the same local tasks.

    python benchmarks/lm_eval_check.py --tasks-dir ../shared/data/tasks [--limit N]

Builds lm_eval 0.4.13 with its ``hf`` extra in an environment of its own (once, under
``~/.cache/quantdeploy/peers``, torch first, our package installed there too), writes the bundled model
as a plain transformers folder and three lm_eval task YAMLs over local JSON files made from BIG-bench
task files (multiple choice from ``--mc``, rolling log-likelihood over its inputs, greedy generation
from ``--gen``), runs ``benchmarks/peers/lm_eval_worker.py`` there, and compares request by request:
the largest absolute difference of log-likelihoods (multiple choice and rolling) and how many
generations are identical. Tolerance: 1e-3 nats per request (both fp32 on CPU; the rest is the order of
float operations in batched forwards). Prints a table, then a JSON line (machine, commit, config).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from _common import ensure_peer_venv  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3

MC_YAML = """task: qd_mc
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""
ROLLING_YAML = """task: qd_rolling
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""
GEN_YAML = """task: qd_gen
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""


def write_tasks(folder: Path, tasks_dir: Path, mc: str, gen: str) -> None:
    mc_task = json.loads((tasks_dir / mc / "task.json").read_text())["examples"]
    gen_task = json.loads((tasks_dir / gen / "task.json").read_text())["examples"]
    rows = []
    for ex in mc_task:
        choices = list(ex["target_scores"])
        rows.append({"question": ex["input"], "choices": choices,
                     "label": max(range(len(choices)), key=lambda i: ex["target_scores"][choices[i]])})
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "rolling.jsonl").write_text("".join(json.dumps({"text": ex["input"]}) + "\n" for ex in mc_task))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"question": ex["input"], "answer": str(ex["target"])}) + "\n"
                                              for ex in gen_task))
    for name, template in (("mc", MC_YAML), ("rolling", ROLLING_YAML), ("gen", GEN_YAML)):
        (folder / f"qd_{name}.yaml").write_text(template.format(data=folder / f"{name}.jsonl"))


def main() -> None:
    import quantdeploy as qd
    from quantdeploy.eval.report import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks-dir", type=Path, required=True)
    p.add_argument("--mc", default="general_knowledge")
    p.add_argument("--gen", default="arithmetic/2_digit_addition")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--version", default="0.4.13")
    p.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "quantdeploy" / "peers")
    args = p.parse_args()
    python = ensure_peer_venv(args.venv / f"lm-eval-{args.version}", "lm_eval",
                              [f"lm_eval[hf]=={args.version}", "-e", f"{REPO}[gguf]"])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = qd.load_model("bundled")
        base.model.save_pretrained(tmp / "model")
        base.tokenizer.save_pretrained(tmp / "model")
        (tmp / "tasks").mkdir()
        write_tasks(tmp / "tasks", args.tasks_dir, args.mc, args.gen)
        cmd = [str(python), str(REPO / "benchmarks" / "peers" / "lm_eval_worker.py"), str(tmp / "model"),
               str(tmp / "tasks"), str(tmp / "out.json")] + (["--limit", str(args.limit)] if args.limit else [])
        subprocess.run(cmd, check=True, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                             "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
        out = json.loads((tmp / "out.json").read_text())
    rows = []
    print(f"{'task':12s} {'requests':>8s} {'max |dlogp|':>12s} {'identical':>10s}  metrics hf | quantdeploy")
    for task in out["hf"]["samples"]:
        ours = {s["doc_id"]: s["resps"] for s in out["quantdeploy"]["samples"][task]}
        diffs, same, n = [], 0, 0
        for s in out["hf"]["samples"][task]:
            for theirs, mine in zip(s["resps"], ours[s["doc_id"]]):
                n += 1
                a, b = theirs[0], mine[0]
                if isinstance(a, list):  # loglikelihood: [logp, greedy]
                    a, b = a[0], b[0]
                if isinstance(a, str):
                    same += a == b
                else:
                    diffs.append(abs(float(a) - float(b)))
        metrics = {k: (round(out["hf"]["results"][task].get(k, float("nan")), 4),
                       round(out["quantdeploy"]["results"][task].get(k, float("nan")), 4))
                   for k in out["hf"]["results"][task] if "stderr" not in k}
        row = {"task": task, "requests": n, "max_abs_diff": max(diffs) if diffs else None,
               "identical_generations": same if not diffs else None, "metrics": metrics}
        rows.append(row)
        print(f"{task:12s} {n:8d} {max(diffs) if diffs else float('nan'):12.2e} "
              f"{same if not diffs else '-':>10}  {metrics}")
    ok = all(r["max_abs_diff"] is None or r["max_abs_diff"] <= TOLERANCE for r in rows)
    print(f"log-likelihoods within {TOLERANCE} nats: {ok}; seconds hf {out['hf']['seconds']}, "
          f"quantdeploy {out['quantdeploy']['seconds']}")
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(json.dumps({"benchmark": "lm_eval_check", **machine_info(), "config": config,
                      "lm_eval": args.version, "tolerance": TOLERANCE, "within_tolerance": ok, "rows": rows}))


if __name__ == "__main__":
    main()
