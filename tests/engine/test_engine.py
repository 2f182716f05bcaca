"""The engine end to end on the tiny random Llama (and one check on the bundled SmolLM2)."""

from __future__ import annotations

import pytest
import torch

import quantdeploy as qd
from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.errors import ModelSourceError, RequestError

PROMPTS = ["The history of", "In 1850 the city", "A", "Mathematics is the study of numbers and"]


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    return Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=128)


def _hf_greedy(bundle, prompt: str, n: int) -> list[int]:
    ids = bundle.tokenizer(prompt, return_tensors="pt").input_ids
    out = bundle.model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=2, eos_token_id=None)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_matches_transformers_generate(engine, tiny_bundle):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    for prompt in PROMPTS[:2]:
        assert engine.generate(prompt, params).token_ids == _hf_greedy(tiny_bundle, prompt, 24)


def test_batched_decode_at_different_positions_equals_one_at_a_time(engine, tiny_bundle):
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    alone = [engine.generate(p, params).token_ids for p in PROMPTS]
    # 4 prompts of different lengths through 2 rows: sequences join and leave between steps
    small = Engine.from_bundle(tiny_bundle, "cpu", max_batch=2, max_seq_len=128)
    together = [c.token_ids for c in small.generate(PROMPTS, params)]
    assert together == alone


@pytest.mark.parametrize("max_prefill_tokens", [8192, 6])
def test_prefill_batches_of_padded_prompts_equal_one_at_a_time(engine, tiny_bundle, max_prefill_tokens):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = [engine.generate(p, params).token_ids for p in PROMPTS]
    # four prompts of different lengths added at once: one padded prefill, or (6 tokens) one per batch
    batched = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=128, max_prefill_tokens=max_prefill_tokens)
    calls = []
    prefill = batched.model.prefill
    batched.model.prefill = lambda tokens, *a, **k: calls.append(tokens.shape) or prefill(tokens, *a, **k)
    assert [c.token_ids for c in batched.generate(PROMPTS, params)] == alone
    assert len(calls) == (1 if max_prefill_tokens == 8192 else 4)


def test_a_failing_prefill_fails_its_own_sequences_only(engine, tiny_bundle):
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    broken = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=128)
    running = broken.add(broken.encode(PROMPTS[0]), params)
    broken.step()
    prefill = broken.model.prefill

    def out_of_memory(*a, **k):
        broken.model.prefill = prefill  # fails once
        raise torch.OutOfMemoryError("simulated")

    broken.model.prefill = out_of_memory
    failed = broken.add(broken.encode(PROMPTS[1]), params)
    while broken.running:
        broken.step()
    assert failed.finish_reason == "error" and "OutOfMemoryError" in failed.error
    assert running.output_ids == engine.generate(PROMPTS[0], params).token_ids
    assert broken.generate(PROMPTS[1], params).token_ids == engine.generate(PROMPTS[1], params).token_ids


def test_sequences_join_and_leave_mid_decode(engine):
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = {p: engine.generate(p, params).token_ids for p in PROMPTS[:3]}
    first = engine.add(engine.encode(PROMPTS[0]), params)
    for _ in range(5):
        engine.step()
    second = engine.add(engine.encode(PROMPTS[1]), SamplingParams(max_tokens=3, ignore_eos=True))
    engine.step()
    third = engine.add(engine.encode(PROMPTS[2]), params)
    while engine.running:
        engine.step()
    assert first.output_ids == expected[PROMPTS[0]]
    assert second.output_ids == expected[PROMPTS[1]][:3] and second.finish_reason == "length"
    assert third.output_ids == expected[PROMPTS[2]]
    assert engine.free_rows == engine.max_batch


def test_streaming_yields_the_same_text(engine):
    for params in (SamplingParams(max_tokens=30, ignore_eos=True),
                   SamplingParams(max_tokens=30, temperature=0.9, top_p=0.9, seed=7, stop=("e t",))):
        pieces = list(engine.stream(PROMPTS[1], params))
        assert "".join(pieces) == engine.generate(PROMPTS[1], params).text
        assert len(pieces) > 1


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_k=50, seed=123, repetition_penalty=1.3, ignore_eos=True)
    alone = engine.generate(PROMPTS[0], params).token_ids
    batch = engine.generate([PROMPTS[2], PROMPTS[0], PROMPTS[3]], params)
    assert batch[1].token_ids == alone
    other = engine.generate(PROMPTS[0], SamplingParams(**{**params.__dict__, "seed": 124})).token_ids
    assert other != alone


def test_stop_strings_and_stop_ids(engine):
    free = engine.generate(PROMPTS[0], SamplingParams(max_tokens=40, ignore_eos=True))
    stop_id = free.token_ids[5]
    cut = engine.generate(PROMPTS[0], SamplingParams(max_tokens=40, stop_token_ids=(stop_id,), ignore_eos=True))
    assert cut.finish_reason == "stop" and cut.token_ids == free.token_ids[:free.token_ids.index(stop_id)]
    stop = free.text[10:13]
    cut = engine.generate(PROMPTS[0], SamplingParams(max_tokens=40, stop=(stop,), ignore_eos=True))
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(stop)]


def test_context_errors_are_clear(engine):
    with pytest.raises(RequestError, match="the prompt has .* tokens but the context window is 128"):
        engine.generate("word " * 200, SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="max_tokens 500 .* exceeds the context window of 128; lower max_tokens"):
        engine.generate(PROMPTS[0], SamplingParams(max_tokens=500))
    assert engine.free_rows == engine.max_batch  # nothing half-admitted


def test_decode_attention_is_checked_by_name(tiny_bundle):
    from quantdeploy.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown decode attention 'flash'; available: split_kv, reduce, sdpa"):
        Engine.from_bundle(tiny_bundle, "cpu", decode_attention="flash")
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_seq_len=64)
    native = engine.model.layers[0].attention.kv_cache.native  # our CPU kernels built here (cpu_native.attends)
    assert engine.model.layers[0].attention.decode_attention == ("split_kv" if native else "sdpa")
    from quantdeploy.engine.kv_cache import CPU_REDUCE_MAX_POSITIONS, choose_decode_attention

    cpu = torch.device("cpu")
    assert choose_decode_attention(None, cpu, False, 64) == "sdpa"  # eager, no kernel of ours: the longest row's
    assert choose_decode_attention(None, cpu, True, CPU_REDUCE_MAX_POSITIONS) == "reduce"  # few: fused in the graph
    # past the crossover, the cache's op (the rows' own blocks); the tiny model holds 512 positions at most
    assert choose_decode_attention(None, cpu, True, CPU_REDUCE_MAX_POSITIONS + 1) == "split_kv"
    assert choose_decode_attention(None, cpu, True, 64, native_cpu=True) == "split_kv"  # ours, at any length
    assert choose_decode_attention("reduce", cpu, True, 64, native_cpu=True) == "reduce"  # a named choice stays


def test_every_decode_bucket_compiles_past_dynamos_default_recompile_limit(tiny_bundle):
    # nine buckets (1..256) are nine graphs of one function; dynamo's default limit of 8 failed the ninth
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=256, max_seq_len=16, compile=False)
    assert len(engine.buckets) == 9 and not any(p.requires_grad for p in engine.model.parameters())
    engine.compiled = True  # traced by dynamo only: the kernels inductor would write are beside the point here
    engine._decode = torch.compile(engine.model.decode, fullgraph=True, dynamic=False, backend="eager")
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    for bucket in engine.buckets:
        seqs = [engine.add([5, 6, 7], params) for _ in range(bucket)]  # rows 0..bucket-1
        while engine.running:
            engine.step()
        assert all(len(s.output_ids) == 2 for s in seqs)
    assert engine._compiled_buckets == set(engine.buckets)
    assert torch._dynamo.config.recompile_limit == 8  # raised only while a bucket compiled


def test_after_warm_up_no_request_compiles(tiny_bundle):
    from torch._dynamo.utils import counters

    params = SamplingParams(max_tokens=5, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10], [11, 12, 13, 14], [15]]
    expected = [c.token_ids for c in Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=32).generate(prompts, params)]
    engine = Engine.from_bundle(tiny_bundle, "cpu", max_batch=4, max_seq_len=32, compile=False)
    engine.compiled = True  # traced by dynamo only, as above
    engine._decode = torch.compile(engine.model.decode, fullgraph=True, dynamic=False, backend="eager")
    engine.warm_up()
    assert engine._compiled_buckets == set(engine.buckets) == {1, 2, 4}
    graphs = counters["stats"]["unique_graphs"]
    for n in (1, 2, 4):  # every bucket, as a server meets them
        assert [c.token_ids for c in engine.generate(prompts[:n], params)] == expected[:n]
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled while serving
    engine.add([5], params)
    with pytest.raises(RuntimeError, match="before any sequence"):
        engine.warm_up()


def test_unsupported_architecture_is_refused_before_loading_weights(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path)
    with pytest.raises(ModelSourceError, match="architecture 'gpt2' is not supported by the engine"):
        Engine.load(tmp_path, "cpu")


@pytest.mark.parametrize("kv", [None, "int8"])
def test_saved_quantized_checkpoint_is_deterministic_and_matches_transformers(tiny_bundle, tmp_path, train_text, kv):
    calib = tmp_path / "calib.txt"
    calib.write_text(train_text[:50_000])
    kv_cache = qd.KVCacheConfig(dtype=kv, calibration=qd.CalibrationConfig(str(calib), 4, 64)) if kv else None
    q = qd.quantize(tiny_bundle, qd.RTNConfig(bits=4, group_size=32), kv_cache=kv_cache)
    qd.save(q, tmp_path / "ckpt")
    params = SamplingParams(max_tokens=20, ignore_eos=True)
    engines = [Engine.load(tmp_path / "ckpt", "cpu", max_batch=2, max_seq_len=64) for _ in range(2)]
    runs = [e.generate(PROMPTS[:2], params) for e in engines]
    assert [c.token_ids for c in runs[0]] == [c.token_ids for c in runs[1]]  # packed CPU kernels, bf16 inside
    exact = Engine.load(tmp_path / "ckpt", "cpu", backend="reference", max_batch=2, max_seq_len=64)
    if kv:  # the cache holds int8 codes, not floats
        assert engines[0].model.layers[0].attention.kv_cache.k_cache.dtype == torch.int8
    # transformers on the same checkpoint (fake-quantized K/V there, an int8 cache here): same logits
    reloaded = qd.load(tmp_path / "ckpt")
    ids = reloaded.tokenizer(PROMPTS[3], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = reloaded.model(ids).logits[0, -1]
        ours = exact.model.prefill(ids, rows=1)[0, -1]
        fast = engines[0].model.prefill(ids, rows=1)[0, -1]
    assert (ours - ref).abs().max() < 1e-4
    assert (fast - ref).norm() / ref.norm() < 2e-2  # the packed path: bf16 activations and scales


def test_compiled_decode_without_module_guards_keeps_each_engines_graphs_to_itself(tiny_bundle):
    """Each engine compiles a decode of its own code object with Dynamo's guards on the model's modules dropped
    (engine/decode_graphs.py: ~1 ms a step on 2 CPU cores): a second engine of another structure, here int8
    weights where the first had plain ones, must not be handed the first one's graph, and one of the same
    structure compiles its own."""
    from torch._dynamo.utils import counters

    from quantdeploy.engine.decode_graphs import compile_decode

    params = SamplingParams(max_tokens=5, ignore_eos=True)
    prompts = [[5, 6, 7], [9, 10]]
    int8 = qd.quantize(tiny_bundle, qd.RTNConfig(bits=8, group_size=None))
    for bundle in (tiny_bundle, int8, tiny_bundle):
        expected = [c.token_ids for c in Engine.from_bundle(bundle, "cpu", max_batch=2, max_seq_len=32).generate(prompts, params)]
        engine = Engine.from_bundle(bundle, "cpu", max_batch=2, max_seq_len=32, compile=False)
        engine.compiled = True  # traced by dynamo only, as above
        engine._decode = compile_decode(engine.model, {}, backend="eager")
        graphs = counters["stats"]["unique_graphs"]
        assert [c.token_ids for c in engine.generate(prompts, params)] == expected
        assert counters["stats"]["unique_graphs"] > graphs  # compiled its own, reused no other engine's
