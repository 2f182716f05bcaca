"""Task accuracy of the bundled model and four quantized versions of it, item by item against the original.

    python benchmarks/tasks_bundled.py --tasks-dir ../shared/data/tasks --calib ../shared/data/text/wiki_en.train.txt

Quantizes the bundled SmolLM2-135M-Instruct with RTN INT8 per channel, NF4 g64, GPTQ W4 sym g64 and AWQ
W4 sym g64 (calibration: ``--samples`` windows of ``--seq-len`` tokens from ``--calib``), then runs every
model on the same items: three multiple-choice BIG-bench tasks (``--mc``), one arithmetic exact-match task
(``--arith``, 3 shots) and HumanEval (greedy pass@1, all problems unless ``--humaneval-limit``), through
``quantdeploy.eval.tasks`` exactly as ``quantdeploy eval --task`` does. Prints one table (score ± standard
error, paired difference to the original ± its standard error, flips, McNemar p) and a last JSON line
(machine, commit, config, every row).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    import quantdeploy as qd
    from quantdeploy.eval.report import machine_info
    from quantdeploy.eval.tasks import TaskOptions, run_task, summarize
    from quantdeploy.eval.tasks.lm import TaskModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks-dir", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--mc", nargs="+", default=["general_knowledge", "code_line_description", "misconceptions"])
    p.add_argument("--arith", default="arithmetic/2_digit_addition")
    p.add_argument("--limit", type=int, default=None, help="first N items of each BIG-bench task")
    p.add_argument("--arith-limit", type=int, default=None, help="first N items of the arithmetic task")
    p.add_argument("--humaneval-limit", type=int, default=None)
    p.add_argument("--code-max-tokens", type=int, default=384, help="HumanEval: tokens per completion")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--models", nargs="+", default=["original", "rtn-int8", "nf4-g64", "gptq-w4g64", "awq-w4g64"])
    args = p.parse_args()

    base = qd.load_model("bundled")
    calib = qd.CalibrationConfig(source=args.calib, num_samples=args.samples, seq_len=args.seq_len)
    rtn4 = qd.RTNConfig(bits=4, group_size=64)
    configs = {"rtn-int8": qd.RTNConfig(bits=8, group_size=None), "nf4-g64": qd.NF4Config(group_size=64),
               "gptq-w4g64": qd.GPTQConfig(bits=4, group_size=64, calibration=calib),
               "awq-w4g64": qd.AWQConfig(quantizer=rtn4, calibration=calib)}
    arith = str(Path(args.tasks_dir) / args.arith)
    specs = [str(Path(args.tasks_dir) / t) for t in args.mc] + [arith, "humaneval"]
    results: dict[str, dict[str, dict]] = {}
    seconds: dict[str, float] = {}
    for name in args.models:
        t0 = time.perf_counter()
        bundle = base if name == "original" else qd.quantize(base, configs[name])
        model = TaskModel(bundle, name)
        results[name] = {}
        for spec in specs:
            limit = {"humaneval": args.humaneval_limit, arith: args.arith_limit}.get(spec, args.limit)
            results[name][spec] = run_task(spec, model, TaskOptions(limit=limit, code_max_tokens=args.code_max_tokens))
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {seconds[name]} s (generation: {model.generator})", flush=True)
        for spec in specs:  # as each model finishes, so a cut run keeps what it measured
            base_result = results["original"][spec] if name != "original" and "original" in results else None
            for row in summarize(results[name][spec], base_result):
                print(json.dumps({"model": name, **row}), flush=True)
    rows = []
    for name in args.models:
        for spec in specs:
            base_result = results["original"][spec] if name != "original" and "original" in results else None
            for row in summarize(results[name][spec], base_result):
                rows.append({"model": name, **{k: v for k, v in row.items() if k not in ("gained", "lost")}})
    print(f"{'model':11s} {'task':22s} {'metric':9s} {'n':>5s} {'score':>15s} {'vs original':>17s} {'flips':>6s} {'p':>6s}")
    for r in rows:
        vs = f"{r['diff']:+.3f} ± {r['diff_stderr']:.3f}" if "diff" in r else "-"
        flips = f"{r['flips']}" if "flips" in r else "-"
        pval = f"{r['mcnemar_p']:.2f}" if "mcnemar_p" in r else "-"
        print(f"{r['model']:11s} {r['task'][:22]:22s} {r['metric'][:9]:9s} {r['n']:5d} "
              f"{r['score']:.3f} ± {r['stderr']:.3f} {vs:>17s} {flips:>6s} {pval:>6s}")
    print(json.dumps({"benchmark": "tasks_bundled", **machine_info(), "config": vars(args), "seconds": seconds,
                      "rows": rows}))


if __name__ == "__main__":
    main()
