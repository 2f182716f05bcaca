"""Fidelity of calibrated methods against round-to-nearest at the same spec, on the bundled model.

    HF_HUB_OFFLINE=1 python benchmarks/fidelity_calibrated.py --calib ../shared/data/text/wiki_en.train.txt \
        --text ../shared/data/text/wiki_en.test.txt --samples 16 --seq-len 512 --tokens 32768

``--suite weights`` (default): for each bit width (default 4 and 3, group 64, symmetric) RTN, GPTQ and
AWQ(+RTN), with the KLD cut relative to RTN at the same spec.

``--suite best``: the best of each width, AWQ scaling with GPTQ rounding (``awq+gptq``) beside RTN at the same
grid: int8 per channel (GPTQ alone: AWQ's scaling buys nothing at 8 bits), int4 asymmetric g128 (4.19 bits per
weight: fp16 scales and 8-bit zeros per 128) and symmetric g64 (4.25), int3 asymmetric and symmetric g64.
``--hqq`` adds HQQ's calibration-free W4 g64 (``hqq`` in its own environment, ``fidelity_peers.run_hqq``;
4.5 bits per weight as it stores them: fp16 scale and zero per 64), scored in the same pass.

``--suite w8a8``: weight-and-activation int8/fp8 and the KV cache: int8 weight-only RTN (the reference
row), SmoothQuant W8A8 with round-to-nearest and with GPTQ weights (alpha searched per layer), FP8 W8A8,
and SmoothQuant+GPTQ with an int8 and an fp8 KV cache (scales measured on the same calibration data).

All models are scored against the original in one pass over the text; a table, then a last JSON line
with machine, commit, config and every number.
"""

from __future__ import annotations

import json
import time

from _common import fidelity_parser, print_fidelity_table  # benchmarks/ is on sys.path when run as a script


def main() -> None:
    import quantdeploy as qd
    from quantdeploy.eval.fidelity import EvalProtocol, evaluate
    from quantdeploy.eval.report import machine_info
    from quantdeploy.eval.text import load_text, tokenize_prefix

    p = fidelity_parser(__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--suite", choices=("weights", "best", "w8a8"), default="weights")
    p.add_argument("--hqq", action="store_true", help="also HQQ W4 g64 (the calibration-free peer)")
    p.add_argument("--grids", nargs="+", choices=tuple(BEST_GRIDS), help="--suite best: these grids only (default all)")
    args = p.parse_args()

    base = qd.load_model(args.model)
    calib = qd.CalibrationConfig(source=args.calib, num_samples=args.samples, seq_len=args.seq_len)
    models, seconds = {}, {}
    if args.suite == "w8a8":
        w8a8_suite(qd, base, calib, models, seconds)
    if args.suite == "best":
        best_suite(qd, base, calib, models, seconds, args.grids or tuple(BEST_GRIDS))
    for bits in args.bits if args.suite == "weights" else ():
        rtn = qd.RTNConfig(bits=bits, group_size=args.group_size)
        for name, config in ((f"rtn-w{bits}", rtn),
                             (f"gptq-w{bits}", qd.GPTQConfig(bits=bits, group_size=args.group_size, calibration=calib)),
                             (f"awq-w{bits}", qd.AWQConfig(quantizer=rtn, calibration=calib))):
            t0 = time.perf_counter()
            models[name] = qd.quantize(base, config).model
            seconds[name] = round(time.perf_counter() - t0, 1)
    peer = {}
    if args.hqq:
        import torch
        from fidelity_peers import hqq_model

        hqq, peer = hqq_model(base, 4, 64, torch.get_num_threads())
        if hqq is not None:
            models["hqq w4 asym g64"], seconds["hqq w4 asym g64"] = hqq, peer["seconds"]
    tokens = tokenize_prefix(base.tokenizer, load_text(args.text), args.tokens)
    res = evaluate(models, base.model, tokens, EvalProtocol(max_tokens=args.tokens, window=1024))
    rtn_of = {"weights": lambda name: "rtn-w" + name.split("-w")[1], "best": lambda name: "rtn " + name.split(" ", 1)[1]}
    cuts = {name: f"{1 - res[name]['kld_mean'] / res[rtn_of[args.suite](name)]['kld_mean']:+.0%}"
            for name in models if args.suite in rtn_of and not name.startswith(("rtn", "hqq"))}
    print_fidelity_table(res, seconds, cuts, "vs RTN")
    print(json.dumps({"benchmark": "fidelity_calibrated", **machine_info(), "config": vars(args), "hqq": peer,
                      "quantize_seconds": seconds, "results": res}))


BEST_GRIDS = {"w8 per-channel": dict(bits=8, group_size=None),
              "w4 asym g128": dict(bits=4, group_size=128, symmetric=False), "w4 sym g64": dict(bits=4, group_size=64),
              "w3 asym g64": dict(bits=3, group_size=64, symmetric=False), "w3 sym g64": dict(bits=3, group_size=64)}


def best_suite(qd, base, calib, models: dict, seconds: dict, names: tuple[str, ...]) -> None:
    for name in names:
        grid = BEST_GRIDS[name]
        best = (qd.GPTQConfig(**grid, calibration=calib) if grid["bits"] == 8
                else qd.AWQConfig(quantizer=qd.GPTQConfig(**grid), calibration=calib))
        for label, config in ((f"rtn {name}", qd.RTNConfig(**grid)),
                              (f"{'gptq' if grid['bits'] == 8 else 'awq+gptq'} {name}", best)):
            t0 = time.perf_counter()
            models[label] = qd.quantize(base, config).model
            seconds[label] = round(time.perf_counter() - t0, 1)
            print(f"quantized {label} in {seconds[label]} s", flush=True)


def w8a8_suite(qd, base, calib, models: dict, seconds: dict) -> None:
    """The W8A8 and KV-cache rows (see the module docstring); KV variants reuse the quantized weights."""
    sq_gptq = qd.SmoothQuantConfig(quantizer=qd.GPTQConfig(bits=8, group_size=None), calibration=calib)
    configs = {"rtn-w8 (weights only)": qd.RTNConfig(bits=8, group_size=None),
               "smoothquant-w8a8": qd.SmoothQuantConfig(calibration=calib),
               "smoothquant+gptq-w8a8": sq_gptq,
               "fp8-w8a8": qd.FP8Config(activations=True)}
    bundles = {}
    for name, config in configs.items():
        t0 = time.perf_counter()
        bundles[name] = qd.quantize(base, config)
        models[name], seconds[name] = bundles[name].model, round(time.perf_counter() - t0, 1)
    for dtype in ("int8", "fp8_e4m3"):
        name = f"smoothquant+gptq-w8a8 + kv-{dtype}"
        t0 = time.perf_counter()
        models[name] = qd.quantize_kv_cache(bundles["smoothquant+gptq-w8a8"], qd.KVCacheConfig(dtype, calib)).model
        seconds[name] = round(seconds["smoothquant+gptq-w8a8"] + time.perf_counter() - t0, 1)


if __name__ == "__main__":
    main()
