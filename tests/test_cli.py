"""The CLI in real subprocesses: end to end on a tiny model, and one-line errors with no output left."""

import json
import os
import subprocess
import sys

import pytest

import quantdeploy as qd


def run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "quantdeploy", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def error_line(proc):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_quantize_inspect_eval_generate(tiny_llama_dir, tmp_path, data):
    out = tmp_path / "q4"
    proc = run("quantize", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "--asym", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "bits per weight" in proc.stdout
    proc = run("inspect", out, "--verify")
    assert proc.returncode == 0, proc.stderr
    assert "int4-asym-g32" in proc.stdout and "hashes verified" in proc.stdout
    assert "not a mixed-precision checkpoint" in error_line(run("inspect", out, "--plots", tmp_path / "plots"))
    assert not (tmp_path / "plots").exists()
    proc = run("eval", out, "--baseline", tiny_llama_dir, "--text", data / "text" / "wiki_en.test.txt",
               "--tokens", "512", "--window", "128", "--json", tmp_path / "r.json")
    assert proc.returncode == 0, proc.stderr
    assert "{" not in proc.stdout and "…" not in proc.stdout  # the table, whole though piped; no JSON dump
    assert "kld" in proc.stdout.lower() or "KLD" in proc.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    proc = run("eval", out, "--baseline", tiny_llama_dir, "--text", data / "text" / "wiki_en.test.txt",
               "--tokens", "512", "--window", "128", "--json", "-")
    assert json.loads(proc.stdout) == result
    names = [r["name"] for r in result["results"]]
    assert names == ["original", "q4"]
    q = result["results"][1]
    assert q["kld_mean"] > 0 and 0 < q["top1_agreement"] <= 1 and q["tokens_scored"] == 512 - 4


def test_halfquad_from_the_cli_stores_real_zero_points(tiny_llama_dir, tmp_path):
    out = tmp_path / "hq"
    proc = run("quantize", tiny_llama_dir, "--method", "halfquad", "--bits", "4", "--group-size", "32", "-o", out)
    assert proc.returncode == 0, proc.stderr
    proc = run("inspect", out)
    assert proc.returncode == 0 and "int4-asym-fz-g32" in proc.stdout, proc.stdout
    line = error_line(run("quantize", tiny_llama_dir, "--method", "halfquad", "--sym", "-o", tmp_path / "s"))
    assert "--sym/--asym does not apply to method 'halfquad'" in line


def test_saved_checkpoint_generates_the_same_greedy_tokens_in_a_new_process(tiny_bundle, tmp_path):
    q = qd.quantize(tiny_bundle, qd.NF4Config(group_size=32))
    _, in_memory = qd.generate(q, "The history of the city", max_new_tokens=12)
    qd.save(q, tmp_path / "nf4")
    proc = run("generate", tmp_path / "nf4", "The history of the city", "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ids"] == in_memory


def test_dtype_sets_the_engines_compute_dtype(tiny_llama_dir):
    """generate --dtype bfloat16: the engine's tokens in bf16 (the tiny model is stored in fp32)."""
    import torch

    from quantdeploy.engine import Engine, SamplingParams

    params = SamplingParams(max_tokens=12)
    for dtype in ("bfloat16", "float32"):
        engine = Engine.load(str(tiny_llama_dir), "cpu", getattr(torch, dtype), max_batch=1)
        assert engine.model.norm.weight.dtype == getattr(torch, dtype)
        expected = engine.generate("The history of the city", params).token_ids
        proc = run("generate", tiny_llama_dir, "The history of the city", "--max-new-tokens", "12", "--json",
                   "--device", "cpu", "--dtype", dtype)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["ids"] == expected
    assert "--transformers runs the model as loaded" in error_line(
        run("generate", tiny_llama_dir, "hi", "--transformers", "--dtype", "bfloat16"))


def test_recipe_file_and_flag_override(tiny_llama_dir, tmp_path):
    (tmp_path / "r.yaml").write_text("method: rtn\nbits: 8\ngroup_size: null\ntargets:\n  exclude: [down_proj]\n")
    proc = run("quantize", tiny_llama_dir, "--recipe", tmp_path / "r.yaml", "--bits", "4", "-o", tmp_path / "q")
    assert proc.returncode == 0, proc.stderr
    qc = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert qc["method"]["bits"] == 4 and "model.layers.0.mlp.down_proj" in qc["ignore"]


@pytest.mark.parametrize("case", ["missing", "not-a-model", "truncated", "unknown-method", "group-size",
                                  "bad-recipe-key", "flag-not-for-method"])
def test_user_errors_give_one_line_and_no_output(case, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    model = tiny_llama_dir
    extra = ["--method", "rtn"]
    if case == "missing":
        model = tmp_path / "does-not-exist"
    elif case == "not-a-model":
        model = tmp_path / "folder"
        model.mkdir()
        (model / "notes.txt").write_text("hello")
    elif case == "truncated":
        ckpt = tmp_path / "ckpt"
        qd.save(qd.quantize(qd.load_model(tiny_llama_dir), qd.RTNConfig(bits=8, group_size=None)), ckpt)
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
        (tmp_path / "x.txt").write_text("some text to score " * 50)
        proc = run("eval", ckpt, "--text", tmp_path / "x.txt")
        assert "truncated" in error_line(proc)
        return
    elif case == "unknown-method":
        extra = ["--method", "magic"]
    elif case == "group-size":
        extra += ["--group-size", "48"]  # the tiny model's inputs are 64 and 128 wide
    elif case == "bad-recipe-key":
        (tmp_path / "r.yaml").write_text("method: rtn\nbitz: 4\n")
        extra = ["--recipe", tmp_path / "r.yaml"]
    elif case == "flag-not-for-method":
        extra = ["--method", "nf4", "--bits", "4"]
    proc = run("quantize", model, *extra, "-o", out)
    line = error_line(proc)
    expected = {"missing": "no such file or folder", "not-a-model": "not a model folder",
                "unknown-method": "unknown method 'magic'", "group-size": "group size 48 does not divide",
                "bad-recipe-key": "unknown key 'bitz'", "flag-not-for-method": "--bits does not apply"}[case]
    assert expected in line and line.startswith("error:")
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_calibrated_methods_from_the_cli(tiny_llama_dir, tmp_path, data):
    calib = data / "text" / "wiki_en.train.txt"
    proc = run("quantize", tiny_llama_dir, "--method", "awq+gptq", "--bits", "3", "--group-size", "32",
               "--calib", calib, "--calib-samples", "4", "--calib-seq-len", "64", "-o", tmp_path / "ag")
    assert proc.returncode == 0, proc.stderr
    qc = json.loads((tmp_path / "ag" / "quant_config.json").read_text())
    assert qc["method"]["type"] == "awq" and qc["method"]["quantizer"]["bits"] == 3
    assert qc["calibration"]["num_samples"] == 4 and qc["calibration"]["seq_len"] == 64
    manifest = json.loads((tmp_path / "ag" / "manifest.json").read_text())
    assert manifest["calibration_sha256"] == qc["calibration"]["sha256"]

    proc = run("quantize", tiny_llama_dir, "--method", "gptq", "-o", tmp_path / "g")
    assert "needs calibration data" in error_line(proc) and not (tmp_path / "g").exists()
    proc = run("quantize", tiny_llama_dir, "--method", "rtn", "--calib", calib, "-o", tmp_path / "r")
    assert "uses no calibration data" in error_line(proc)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run("quantize", tiny_llama_dir, "--method", "gptq", "--calib", empty, "-o", tmp_path / "e")
    assert "holds no text" in error_line(proc) and not (tmp_path / "e").exists()


def test_kv_cache_flag(tiny_llama_dir, tmp_path, data):
    calib = data / "text" / "wiki_en.train.txt"
    proc = run("quantize", tiny_llama_dir, "--method", "rtn", "--bits", "8", "--kv-cache", "fp8_e4m3", "--calib", calib,
               "--calib-samples", "2", "--calib-seq-len", "32", "-o", tmp_path / "kv")
    assert proc.returncode == 0, proc.stderr
    qc = json.loads((tmp_path / "kv" / "quant_config.json").read_text())
    assert qc["method"]["type"] == "rtn" and qc["kv_cache"]["dtype"] == "fp8_e4m3"
    assert qc["kv_cache"]["calibration_data"]["num_samples"] == 2
    proc = run("generate", tmp_path / "kv", "the", "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    proc = run("quantize", tiny_llama_dir, "--method", "rtn", "--kv-cache", "int8", "-o", tmp_path / "nokv")
    line = error_line(proc)  # issue 12, item 11: it blamed "this method", which was rtn
    assert "--kv-cache" in line and "needs calibration data" in line and "this method" not in line
    assert not (tmp_path / "nokv").exists()


def test_method_flags_build_the_same_configs_as_python():
    from quantdeploy.cli import build_method_config, build_parser

    def config(*argv):
        return build_method_config(build_parser().parse_args(["quantize", "m", "-o", "o", *argv]))

    assert config("--method", "smoothquant", "--alpha", "0.6", "--calib", "c.txt") == qd.SmoothQuantConfig(
        alpha=0.6, calibration=qd.CalibrationConfig(source="c.txt"))
    assert config("--method", "fp8", "--w8a8") == qd.FP8Config(activations=True)
    assert config("--method", "awq", "--bits", "3", "--group-size", "64") == qd.AWQConfig(
        quantizer=qd.RTNConfig(bits=3, group_size=64, pin_group_size=True))
    with pytest.raises(qd.ConfigError, match="--alpha does not apply to method 'rtn'"):
        config("--method", "rtn", "--alpha", "0.5")
    assert config("--method", "smoothquant+gptq", "--alpha", "0.5") == qd.SmoothQuantConfig(
        alpha=0.5, quantizer=qd.GPTQConfig(bits=8, group_size=None))
    with pytest.raises(qd.ConfigError, match="smoothquant's quantizer must be rtn or gptq with bits 8"):
        config("--method", "smoothquant", "--bits", "4")
    with pytest.raises(qd.ConfigError, match="only awq and smoothquant compose"):
        config("--method", "gptq+rtn")


def test_per_channel_group_size_flag_is_kept(tiny_llama_dir, tmp_path):
    proc = run("quantize", tiny_llama_dir, "--method", "rtn", "--bits", "8", "--group-size", "0", "-o", tmp_path / "q")
    assert proc.returncode == 0, proc.stderr
    qc = json.loads((tmp_path / "q" / "quant_config.json").read_text())
    assert qc["method"]["group_size"] is None
    assert all(spec["group_size"] is None for spec in qc["modules"].values())


def test_generate_streams_with_sampling_flags_and_bench_prints_a_record(tiny_llama_dir, tmp_path):
    proc = run("quantize", tiny_llama_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "-o", tmp_path / "q")
    assert proc.returncode == 0, proc.stderr
    args = ("generate", tmp_path / "q", "The history of", "--max-new-tokens", "8", "--temperature", "0.7",
            "--top-p", "0.9", "--seed", "3", "--device", "cpu")
    streamed = run(*args)
    as_json = run(*args, "--json")
    assert streamed.returncode == 0 and as_json.returncode == 0, streamed.stderr + as_json.stderr
    assert streamed.stdout.rstrip("\n") == json.loads(as_json.stdout)["text"]
    proc = run("bench", tmp_path / "q", "--original", tiny_llama_dir, "--device", "cpu", "--batches", "1", "2",
               "--prompt-len", "16", "--steps", "4")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(record["results"]) == {"model", "original"} and record["bandwidth_gbs"] > 0
    for result in record["results"].values():
        assert set(result["decode"]) == {"1", "2"} and result["decode"]["2"]["tok_s"] > 0 and result["ttft_ms"] > 0
    assert set(record["speedup_vs_original"]) == {"1", "2"}


def test_engine_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    line = error_line(run("generate", tmp_path / "gpt2", "hi", "--device", "cpu"))
    assert "architecture 'gpt2' is not supported by the engine" in line and "--transformers" in line


def test_progress_is_logged_when_stderr_is_not_a_terminal_and_requantizing_is_refused(tiny_llama_dir, tmp_path):
    """Issue 12: quantize said nothing until the end when piped (item 11); re-quantizing one of our
    checkpoints gave random weights and exit 0 (item 1); --bits 8 alone meant groups (item 9)."""
    proc = run("quantize", tiny_llama_dir, "--method", "rtn", "--bits", "8", "-o", tmp_path / "q8")
    assert proc.returncode == 0, proc.stderr
    assert "quantizing: " in proc.stderr and "(100%)" in proc.stderr
    qc = json.loads((tmp_path / "q8" / "quant_config.json").read_text())
    assert qc["method"]["group_size"] is None and qc["method"]["clip_search"] is False  # "auto": off at 8 bits
    assert all(spec["group_size"] is None for spec in qc["modules"].values())
    proc = run("quantize", tmp_path / "q8", "--method", "rtn", "--bits", "4", "-o", tmp_path / "requant")
    assert "is a quantdeploy checkpoint" in error_line(proc) and not (tmp_path / "requant").exists()


def test_bad_calibration_data_fails_before_the_model_loads(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Issue 12, item 11: calibration errors came only after the model had loaded (minutes, on a big one)."""
    from quantdeploy import cli

    def must_not_load(*_, **__):
        raise AssertionError("the model was loaded before the calibration data was checked")

    monkeypatch.setattr(qd, "load_model", must_not_load)
    (tmp_path / "nul.txt").write_bytes(b"\x00" * 3000)
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\nnot json\n')
    for calib, expected in (("nul.txt", "is binary, not text"), ("bad.jsonl", "bad.jsonl:2 is not a JSON object"),
                            ("missing.txt", "no such text file")):
        code = cli.main(["quantize", str(tiny_llama_dir), "--method", "gptq", "--calib", str(tmp_path / calib),
                         "-o", str(tmp_path / "out")])
        assert code == 2 and expected in capsys.readouterr().err
    code = cli.main(["quantize", str(tiny_llama_dir), "--method", "rtn", "--kv-cache", "int8", "--calib",
                     str(tmp_path / "nul.txt"), "-o", str(tmp_path / "out")])
    assert code == 2 and "is binary, not text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_no_clip_search_flag_reaches_the_grid_and_is_refused_where_it_does_not_apply(tiny_llama_dir, tmp_path):
    proc = run("quantize", tiny_llama_dir, "--method", "rtn", "--no-clip-search", "-o", tmp_path / "q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "q" / "quant_config.json").read_text())["method"]["clip_search"] is False
    proc = run("quantize", tiny_llama_dir, "--method", "nf4", "--no-clip-search", "-o", tmp_path / "n")
    assert "--no-clip-search does not apply to method 'nf4'" in error_line(proc)


def test_eval_tasks_against_a_baseline(tiny_llama_dir, tmp_path):
    examples = [{"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}}
                for i in range(6)]
    task = tmp_path / "even" / "task.json"
    task.parent.mkdir()
    task.write_text(json.dumps({"name": "even", "examples": examples}))
    q8 = tmp_path / "q8"
    assert run("quantize", tiny_llama_dir, "--method", "rtn", "--bits", "8", "-o", q8).returncode == 0
    proc = run("eval", q8, "--task", task.parent, "--baseline", tiny_llama_dir, "--json", tmp_path / "t.json")
    assert proc.returncode == 0, proc.stderr
    assert "even" in proc.stdout and "McNemar" in proc.stdout
    result = json.loads((tmp_path / "t.json").read_text())
    assert [r["metric"] for r in result["rows"]] == ["acc", "acc_norm"]
    assert all(r["n"] == 6 and "flips" in r for r in result["rows"])
    assert len(result["results"][0]["model"]["outcomes"]["acc"]) == 6


def test_eval_task_errors_are_one_line(tiny_llama_dir, tmp_path, data):
    assert "neither a built-in task" in error_line(run("eval", tiny_llama_dir, "--task", tmp_path / "nope.json"))
    both = run("eval", tiny_llama_dir, "--task", "humaneval", "--text", data / "text" / "wiki_en.test.txt")
    assert "not both" in error_line(both)
    assert "needs --text" in error_line(run("eval", tiny_llama_dir))


def test_serve_chunks_long_prompts_as_the_engine_does_by_default():
    from quantdeploy.cli import build_parser
    from quantdeploy.engine.engine import PREFILL_CHUNK_TOKENS

    assert build_parser().parse_args(["serve", "model"]).prefill_chunk_tokens == PREFILL_CHUNK_TOKENS
