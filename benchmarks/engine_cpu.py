"""CPU decode speed on the bundled SmolLM2-135M: our engine (fp32, INT8, INT4) beside llama.cpp (Q8_0,
Q4_0) on the same model, the same threads and the same kind of batch, in one run.

    python benchmarks/engine_cpu.py [--batches 1 8] [--threads 2] [--no-compile] [--rounds 3]

- ours: the bundled model unquantized (fp32), RTN int8 per-channel (weight-only), SmoothQuant W8A8
  (int8 per-channel weights and int8 per-token activations multiplied in integers, as llama.cpp's Q8_0
  dot products quantize the activations to 8 bits; calibrated on the packaged demo text, which
  changes the values, not the speed) and RTN int4 symmetric g32 (the grid of llama.cpp's Q4_0), output
  head included, each through ``Engine`` with the CPU kernels; the decode step is torch.compiled
  (inductor C++) unless --no-compile.
- llama.cpp: llama-cpp-python 0.3.36, installed by this script into its own virtual environment
  (``~/.cache/quantdeploy/peers/``) and built for the features this CPU has (``cmake_args``; AMX
  always off); the bundled GGUF is requantized to Q8_0 and Q4_0 by llama.cpp's own quantizer;
  ``benchmarks/peers/llamacpp_worker.py``
  decodes B sequences at different positions, greedy, like our bench.

The two take turns (``--rounds``, each round llama.cpp's models then ours, every engine loaded once), and
each ratio is the median of the rounds' own ratios: a shared box drifts by tens of percent over minutes.
Prints a table with ours/llama.cpp ratios, then one JSON line (machine, commit, config).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

LLAMA_CPP = "llama-cpp-python==0.3.36"
#: llama.cpp's CPU feature switches and the /proc/cpuinfo flag each needs; AMX stays off (this sandbox
#: does not grant AMX tiles, and a build that uses them dies with SIGILL), and so does any feature the
#: CPU lacks (an AMD EPYC here has AVX-512 VNNI but not the VEX-encoded AVX-VNNI: SIGILL in decode)
CPU_FEATURES = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "AVX_VNNI": "avx_vnni",
                "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
                "AVX512_BF16": "avx512_bf16"}


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def cmake_args() -> str:
    flags = cpu_flags()
    on = [name for name, flag in CPU_FEATURES.items() if flag in flags]
    return " ".join(["-DGGML_NATIVE=OFF", *(f"-DGGML_{n}={'ON' if n in on else 'OFF'}" for n in CPU_FEATURES),
                     "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"])


#: one build per feature set: a build for another CPU is not reused
PEER = (Path.home() / ".cache" / "quantdeploy" / "peers" /
        f"llamacpp-0.3.36-{'-'.join(sorted(n.lower() for n, f in CPU_FEATURES.items() if f in cpu_flags())) or 'generic'}")


def ensure_llama_cpp() -> Path:
    python = PEER / "bin" / "python"
    if python.exists() and subprocess.run([python, "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return python
    print(f"installing {LLAMA_CPP} into {PEER} (compiles llama.cpp: ~15 min on 2 cores)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-cache-dir", LLAMA_CPP], check=True,
                   env={**os.environ, "CMAKE_ARGS": cmake_args()})
    return python


def quantize_ours(work: Path) -> dict[str, str]:
    import quantdeploy as qd

    base = qd.load_model("bundled")
    paths = {"fp32": "bundled"}
    from quantdeploy.demo import default_text_path

    head = qd.TargetConfig(lm_head=True)
    calib = qd.CalibrationConfig(source=str(default_text_path()), num_samples=8, seq_len=256)  # speed only
    for name, config in (("int8", qd.RTNConfig(bits=8, group_size=None, targets=head)),
                         ("w8a8", qd.SmoothQuantConfig(quantizer=qd.RTNConfig(bits=8, group_size=None, targets=head),
                                                       calibration=calib)),
                         ("int4", qd.RTNConfig(bits=4, group_size=32, pin_group_size=True, targets=head))):
        path = work / name
        qd.save(qd.quantize(base, config), path)
        paths[name] = str(path)
    return paths


def load_ours(path: str, batches: list[int], compile: bool, prompt_len: int, steps: int):  # noqa: ANN201
    from quantdeploy.bench.decode import BenchConfig, time_to_first_token
    from quantdeploy.engine.engine import Engine

    cfg = BenchConfig(prompt_len=prompt_len, batches=tuple(batches), steps=steps, warmup=4)
    engine = Engine.load(path, "cpu", max_batch=max(batches), max_seq_len=prompt_len + steps + 16,
                         compile=compile)
    return engine, cfg, 1e3 * time_to_first_token(engine, cfg)


def decode_ours(engine, cfg, batches: list[int]) -> dict:  # noqa: ANN001
    from quantdeploy.bench.decode import decode_rate

    return {b: decode_rate(engine, b, cfg)[0] for b in batches}


def run_peer(python: Path, work: Path, args: argparse.Namespace) -> dict:
    from quantdeploy.models.bundled import bundled_gguf_path

    worker = Path(__file__).parent / "peers" / "llamacpp_worker.py"
    run = subprocess.run([python, worker, str(bundled_gguf_path()), str(work), "--types", "Q8_0", "Q4_0",
                          "--batches", *map(str, args.batches), "--threads", str(args.threads),
                          "--prompt-len", str(args.prompt_len), "--steps", str(args.steps)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"llama.cpp worker failed ({run.returncode}): {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    from quantdeploy.eval.report import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of llama.cpp and ours; medians reported")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    python = ensure_llama_cpp()
    work = Path(tempfile.mkdtemp(prefix="qd-engine-cpu-"))
    loaded = {name: load_ours(path, args.batches, not args.no_compile, args.prompt_len, args.steps)
              for name, path in quantize_ours(work).items()}
    # A shared box's speed drifts by tens of percent over minutes: llama.cpp and ours take turns, each
    # round's ratio is taken within the round, and the medians over rounds are reported.
    peers, rounds = [], {name: [] for name in loaded}
    for _ in range(args.rounds):
        peers.append(run_peer(python, work, args))
        for name, (engine, cfg, _) in loaded.items():
            rounds[name].append(decode_ours(engine, cfg, args.batches))
    median = statistics.median
    ours = {name: {"ttft_ms": ttft, "decode": {b: median(r[b] for r in rounds[name]) for b in args.batches},
                   "rounds": rounds[name]} for name, (_, _, ttft) in loaded.items()}
    peer = {kind: {**peers[-1][kind], "decode": {str(b): median(p[kind]["decode"][str(b)] for p in peers)
                                                 for b in args.batches}, "rounds": [p[kind]["decode"] for p in peers]}
            for kind in ("Q8_0", "Q4_0")}
    peer["llama_cpp_python"] = peers[-1]["llama_cpp_python"]
    pairs = {"int8": "Q8_0", "w8a8": "Q8_0", "int4": "Q4_0"}
    header = f"{'model':8s} {'TTFT ms':>8s} " + " ".join(f"{'b' + str(b) + ' tok/s':>11s}" for b in args.batches)
    print(f"\nbundled SmolLM2-135M, CPU, {args.threads} threads, greedy decode, prompts ~{args.prompt_len} tokens, "
          f"median of {args.rounds} alternating rounds")
    print(header)
    for name, r in ours.items():
        print(f"{name:8s} {r['ttft_ms']:8.1f} " + " ".join(f"{r['decode'][b]:11.1f}" for b in args.batches))
    for kind in ("Q8_0", "Q4_0"):
        print(f"{kind:8s} {'':>8s} " + " ".join(f"{peer[kind]['decode'][str(b)]:11.1f}" for b in args.batches))
    ratios = {}
    for ours_name, kind in pairs.items():
        ratios[f"{ours_name}/{kind}"] = {b: median(rounds[ours_name][i][b] / peers[i][kind]["decode"][str(b)]
                                                   for i in range(args.rounds)) for b in args.batches}
        print(f"{ours_name}/{kind} (median of the rounds' ratios): "
              + ", ".join(f"batch {b} {r:.2f}x" for b, r in ratios[f'{ours_name}/{kind}'].items()))
    print(json.dumps({**machine_info(), "config": vars(args), "ours": ours, "llama_cpp": peer, "ratios": ratios}))


if __name__ == "__main__":
    main()
