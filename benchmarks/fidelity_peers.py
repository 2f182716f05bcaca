"""Our GPTQ and AWQ side by side with llm-compressor's (and HQQ's calibration-free 4-bit, ``--methods ... hqq``):
same model, spec and calibration samples, all scored by our evaluation code in one pass, with the quantization
times on the same CPU.

    HF_HUB_OFFLINE=1 python benchmarks/fidelity_peers.py --calib ../shared/data/text/wiki_en.train.txt \
        --text ../shared/data/text/wiki_en.test.txt --samples 16 --seq-len 512 --tokens 32768

The peer lives in a virtual environment of its own (``--peer-venv``; created on the first run with
the same torch version as ours, then ``llmcompressor==--peer-version`` from PyPI); it is never a
dependency of quantdeploy. The peer runs as a subprocess (``peers/llmcompressor_worker.py``) on the
model saved as a plain Hugging Face folder and on the exact calibration token windows our methods
use; it returns the effective weight of each Linear it quantized, which we load into a copy of the
original model. Times cover the quantization call only (ours: ``quantize``; the peer: ``oneshot``),
not model loading, both with the same torch thread count; with ``--repeat N`` each method runs N times,
ours and the peer alternating, and the median is reported (the first run's weights are scored). A peer method that fails is reported as
failed with its last error line, and the rest still runs.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ensure_peer_venv(venv: Path, peer_version: str) -> Path:
    """The peer venv's python, creating the venv on first use."""
    import torch

    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llmcompressor"], capture_output=True).returncode == 0:
        return python
    print(f"creating the peer environment {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)  # the CPU wheel, first
    subprocess.run(pip + [f"llmcompressor=={peer_version}"], check=True)
    return python


def run_peer(python: Path, model_dir: Path, tokens_file: Path, method: str, bits: int, group: int,
             out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(python), str(HERE / "peers" / "llmcompressor_worker.py"), "--model", str(model_dir),
           "--tokens", str(tokens_file), "--method", method, "--bits", str(bits), "--group-size", str(group),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        return {"error": tail[0][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])

from _common import fidelity_parser  # benchmarks/ is on sys.path when run as a script


HQQ_VERSION = "0.2.8"


def run_hqq(model_dir: Path, bits: int, group: int, out: Path, threads: int,
            venv_root: Path = Path.home() / ".cache" / "quantdeploy" / "peers") -> dict:
    """HQQ (calibration-free) in its own environment (``peers/hqq_worker.py``): its effective weights at
    ``out``; the worker's JSON line, or ``{"error": ...}``."""
    from _common import ensure_peer_venv

    python = ensure_peer_venv(venv_root / f"hqq-{HQQ_VERSION}", "hqq", [f"hqq=={HQQ_VERSION}"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(python), str(HERE / "peers" / "hqq_worker.py"), "--model", str(model_dir), "--bits", str(bits),
           "--group-size", str(group), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        return {"error": tail[0][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hqq_model(base, bits: int, group: int, threads: int) -> tuple[object | None, dict]:
    """``base`` (a ModelBundle) quantized by HQQ in its own environment: a copy of its model with HQQ's
    effective weights (None when the peer failed) and the worker's JSON line."""
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        base.model.save_pretrained(Path(tmp) / "model")
        info = run_hqq(Path(tmp) / "model", bits, group, Path(tmp) / "hqq.safetensors", threads)
        print(f"hqq: {info}", flush=True)
        if "error" in info:
            return None, info
        return load_peer_weights(base.model, load_file(Path(tmp) / "hqq.safetensors")), info


def load_peer_weights(model, state: dict):
    """A copy of ``model`` with the peer's effective weights in place."""
    model = copy.deepcopy(model)
    missing = [k for k in state if k not in model.state_dict()]
    if missing:
        raise SystemExit(f"peer weights do not match the model: {missing[0]}")
    model.load_state_dict(state, strict=False)
    return model.eval()


def main() -> None:
    import torch
    from safetensors.torch import load_file, save_file

    import quantdeploy as qd
    from quantdeploy.eval.fidelity import EvalProtocol, evaluate
    from quantdeploy.eval.report import machine_info
    from quantdeploy.eval.text import load_text, tokenize_prefix
    from quantdeploy.quant.calibration import load_calibration

    p = fidelity_parser(__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=["gptq", "awq"], choices=["gptq", "awq", "hqq"],
                   help="hqq: HQQ's calibration-free 4-bit (its own environment; no method of ours beside it)")
    p.add_argument("--repeat", type=int, default=1, help="time each GPTQ/AWQ run this often (median reported)")
    p.add_argument("--peer-version", default="0.14.0.1")
    p.add_argument("--peer-venv", type=Path, default=Path.home() / ".cache" / "quantdeploy" / "peers")
    args = p.parse_args()
    threads = torch.get_num_threads()

    base = qd.load_model(args.model)
    calib_config = qd.CalibrationConfig(source=args.calib, num_samples=args.samples, seq_len=args.seq_len)
    calib = load_calibration(base.tokenizer, calib_config)
    python = (ensure_peer_venv(args.peer_venv / f"llmcompressor-{args.peer_version}", args.peer_version)
              if {"gptq", "awq"} & set(args.methods) else None)

    rtn = qd.RTNConfig(bits=args.bits, group_size=args.group_size, pin_group_size=True)
    ours = {"rtn": rtn,
            "gptq": qd.GPTQConfig(bits=args.bits, group_size=args.group_size, pin_group_size=True,
                                  calibration=calib_config),
            "awq": qd.AWQConfig(quantizer=rtn, calibration=calib_config)}
    models, samples, peers = {}, {}, {}

    def timed_ours(name: str):
        t0 = time.perf_counter()
        model = qd.quantize(base, ours[name]).model
        samples.setdefault(f"ours-{name}", []).append(round(time.perf_counter() - t0, 1))
        print(f"ours-{name}: {samples[f'ours-{name}'][-1]} s", flush=True)
        return model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, tokens_file = Path(tmp) / "model", Path(tmp) / "calib.safetensors"
        base.model.save_pretrained(model_dir)
        base.tokenizer.save_pretrained(model_dir)
        save_file({"input_ids": calib.tokens.contiguous()}, tokens_file)
        models["ours-rtn"] = timed_ours("rtn")
        for name in args.methods:
            if name == "hqq":
                out = Path(tmp) / "hqq.safetensors"
                peers[name] = info = run_hqq(model_dir, args.bits, args.group_size, out, threads, args.peer_venv)
                print(f"hqq: {info}", flush=True)
                if "error" not in info:
                    samples["hqq"] = [info["seconds"]]
                    models["hqq"] = load_peer_weights(base.model, load_file(out))
                continue
            for rep in range(args.repeat):  # ours and the peer alternate: a slow spell of the machine hits both
                model = timed_ours(name)
                models.setdefault(f"ours-{name}", model)
                out = Path(tmp) / f"{name}.safetensors"
                info = run_peer(python, model_dir, tokens_file, name, args.bits, args.group_size, out, threads)
                print(f"llmcompressor-{name}: {info}", flush=True)
                if "error" in info:
                    peers[name] = info
                    break
                samples.setdefault(f"llmcompressor-{name}", []).append(info["seconds"])
                if rep == 0:
                    peers[name] = info
                    models[f"llmcompressor-{name}"] = load_peer_weights(base.model, load_file(out))
    seconds = {k: round(statistics.median(v), 1) for k, v in samples.items()}

    tokens = tokenize_prefix(base.tokenizer, load_text(args.text), args.tokens)
    res = evaluate(models, base.model, tokens, EvalProtocol(max_tokens=args.tokens, window=1024))
    spec = f"W{args.bits} sym g{args.group_size}"
    print(f"\n{spec}, {calib.num_samples}x{args.seq_len} calibration tokens, {res['original']['tokens_scored']} scored, "
          f"{threads} threads")
    print(f"{'model':<20} {'quantize s':>10} {'PPL':>9} {'mean KLD':>9} {'top-1':>7}")
    print(f"{'original':<20} {'-':>10} {res['original']['ppl']:>9.3f}")
    for name in models:
        r = res[name]
        print(f"{name:<20} {seconds[name]:>10} {r['ppl']:>9.3f} {r['kld_mean']:>9.4f} {r['top1_agreement']:>7.2%}")
    for name, info in peers.items():
        if "error" in info:
            print(f"{name if name == 'hqq' else 'llmcompressor-' + name:<20} failed: {info['error']}")
    print(f"quantize seconds of each run: {samples}")
    summary = {}
    for name in args.methods:
        if f"llmcompressor-{name}" in models:
            summary[name] = {
                "kld_ours_vs_peer": round(res[f"ours-{name}"]["kld_mean"] / res[f"llmcompressor-{name}"]["kld_mean"], 4),
                "speedup_vs_peer": round(seconds[f"llmcompressor-{name}"] / seconds[f"ours-{name}"], 2)}
            print(f"{name}: our KLD is {summary[name]['kld_ours_vs_peer']:.3f}x the peer's; "
                  f"we quantize {summary[name]['speedup_vs_peer']:.2f}x faster")
    print(json.dumps({"benchmark": "fidelity_peers", **machine_info(), "config": {**vars(args), "peer_venv": None},
                      "peers": peers, "quantize_seconds": seconds, "quantize_seconds_samples": samples, "summary": summary, "results": res}))


if __name__ == "__main__":
    main()
