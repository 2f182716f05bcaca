"""Calibration-free integer grids on the bundled model: each range spanned whole against the clip search
(``primitives.choose_qparams``) and against grids fitted per group (``halfquad``), at the widths and
groups users pick, in one pass over the same text, with HQQ (the calibration-free peer) beside them.

    HF_HUB_OFFLINE=1 python benchmarks/fidelity_grids.py --text ../shared/data/text/wiki_en.test.txt \
        --tokens 32768 [--rows halfquad "asym g64" --hqq] [--calibrated --calib ../shared/data/text/wiki_en.train.txt]

Rows: RTN at int8 per channel, int4 g64/g128 symmetric, int4 g64 asymmetric and int3 g64, each with
``clip_search`` off and on; halfquad at int4 g64/g128 and int3 g64 (fp16 zero points); ``--rows`` keeps the
rows whose name contains any of the words given. ``--hqq`` adds HQQ 0.2.8's W4 g64 (its own environment,
``fidelity_peers.hqq_model``). ``--calibrated`` adds GPTQ and AWQ(+RTN) at int4 g64 symmetric with the
search on (16 x 512 calibration tokens unless told). All are scored against the original (mean KL
divergence per token, PPL, top-1 agreement) with 1,024-token windows. A table, then a JSON line
(machine, commit, config, every number, bits per weight as stored).
"""

from __future__ import annotations

import argparse
import json
import time

from _common import print_fidelity_table  # benchmarks/ is on sys.path when run as a script


def main() -> None:
    import quantdeploy as qd
    from quantdeploy.eval.fidelity import EvalProtocol, evaluate
    from quantdeploy.eval.report import machine_info
    from quantdeploy.eval.text import load_text, tokenize_prefix

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled")
    p.add_argument("--text", required=True)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--calibrated", action="store_true", help="also GPTQ and AWQ at int4 g64 with the search")
    p.add_argument("--calib", help="calibration text for --calibrated")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rows", nargs="+", help="only the rows whose name contains one of these")
    p.add_argument("--hqq", action="store_true", help="also HQQ W4 g64 (the calibration-free peer)")
    args = p.parse_args()
    if args.calibrated and not args.calib:
        p.error("--calibrated needs --calib")

    grids = {"w8 per-channel": dict(bits=8, group_size=None), "w4 sym g64": dict(bits=4, group_size=64),
             "w4 sym g128": dict(bits=4, group_size=128), "w4 asym g64": dict(bits=4, group_size=64, symmetric=False),
             "w3 sym g64": dict(bits=3, group_size=64)}
    configs = {f"rtn {name}{' +clip' if search else ''}": qd.RTNConfig(**grid, clip_search=search)
               for name, grid in grids.items() for search in (False, True)}
    for name, grid in {"w4 g64": dict(bits=4, group_size=64), "w4 g128": dict(bits=4, group_size=128),
                       "w3 g64": dict(bits=3, group_size=64)}.items():
        configs[f"halfquad {name}"] = qd.HalfQuadConfig(**grid)
    if args.rows:
        configs = {name: c for name, c in configs.items() if any(word in name for word in args.rows)}
    if args.calibrated:
        calib = qd.CalibrationConfig(source=args.calib, num_samples=args.samples, seq_len=args.seq_len)
        configs["gptq w4 sym g64 +clip"] = qd.GPTQConfig(bits=4, group_size=64, calibration=calib)
        configs["awq w4 sym g64 +clip"] = qd.AWQConfig(quantizer=qd.RTNConfig(bits=4, group_size=64), calibration=calib)
    base = qd.load_model(args.model)
    models, seconds, bits = {}, {}, {}
    for name, config in configs.items():
        t0 = time.perf_counter()
        quantized = qd.quantize(base, config)
        models[name] = quantized.model
        seconds[name] = round(time.perf_counter() - t0, 1)
        bits[name] = round(qd.describe(quantized)["bits_per_weight"], 3)
        print(f"quantized {name} in {seconds[name]} s", flush=True)
    peer = {}
    if args.hqq:
        import torch
        from fidelity_peers import hqq_model

        hqq, peer = hqq_model(base, 4, 64, torch.get_num_threads())
        if hqq is not None:
            models["hqq w4 g64 (peer)"], seconds["hqq w4 g64 (peer)"] = hqq, peer["seconds"]
            bits["hqq w4 g64 (peer)"] = 4.5  # 4-bit codes, an fp16 scale and an fp16 zero per 64
    tokens = tokenize_prefix(base.tokenizer, load_text(args.text), args.tokens)
    res = evaluate(models, base.model, tokens, EvalProtocol(max_tokens=args.tokens, window=1024))
    print_fidelity_table(res, seconds)
    print(json.dumps({"benchmark": "fidelity_grids", **machine_info(), "config": vars(args), "hqq": peer,
                      "quantize_seconds": seconds, "bits_per_weight": bits, "results": res}))


if __name__ == "__main__":
    main()
