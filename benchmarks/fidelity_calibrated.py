"""Fidelity of calibrated methods against round-to-nearest at the same spec, on the bundled model.

    HF_HUB_OFFLINE=1 python benchmarks/fidelity_calibrated.py --calib ../shared/data/text/wiki_en.train.txt \
        --text ../shared/data/text/wiki_en.test.txt --samples 16 --seq-len 512 --tokens 32768

For each bit width (default 4 and 3, group 64, symmetric) it quantizes with RTN, GPTQ and AWQ(+RTN),
scores all of them against the original in one pass over the text, prints the table with the KLD cut
relative to RTN, and a last JSON line with machine, commit, config and every number.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    import quantdeploy as qd
    from quantdeploy.eval.fidelity import EvalProtocol, evaluate
    from quantdeploy.eval.report import machine_info
    from quantdeploy.eval.text import load_text, tokenize_prefix

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--calib", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--group-size", type=int, default=64)
    args = p.parse_args()

    base = qd.load_model(args.model)
    calib = qd.CalibrationConfig(source=args.calib, num_samples=args.samples, seq_len=args.seq_len)
    models, seconds = {}, {}
    for bits in args.bits:
        rtn = qd.RTNConfig(bits=bits, group_size=args.group_size)
        for name, config in ((f"rtn-w{bits}", rtn),
                             (f"gptq-w{bits}", qd.GPTQConfig(bits=bits, group_size=args.group_size, calibration=calib)),
                             (f"awq-w{bits}", qd.AWQConfig(quantizer=rtn, calibration=calib))):
            t0 = time.perf_counter()
            models[name] = qd.quantize(base, config).model
            seconds[name] = round(time.perf_counter() - t0, 1)
    tokens = tokenize_prefix(base.tokenizer, load_text(args.text), args.tokens)
    res = evaluate(models, base.model, tokens, EvalProtocol(max_tokens=args.tokens, window=1024))
    print(f"{'model':<10} {'quantize s':>10} {'PPL':>9} {'mean KLD':>9} {'vs RTN':>8} {'top-1':>7}")
    print(f"{'original':<10} {'-':>10} {res['original']['ppl']:>9.3f}")
    for name in models:
        r = res[name]
        rtn_kld = res[f"rtn-w{name.split('-w')[1]}"]["kld_mean"]
        cut = f"{1 - r['kld_mean'] / rtn_kld:+.0%}" if not name.startswith("rtn") else "-"
        print(f"{name:<10} {seconds[name]:>10} {r['ppl']:>9.3f} {r['kld_mean']:>9.4f} {cut:>8} {r['top1_agreement']:>7.2%}")
    print(json.dumps({"benchmark": "fidelity_calibrated", **machine_info(), "config": vars(args),
                      "quantize_seconds": seconds, "results": res}))


if __name__ == "__main__":
    main()
