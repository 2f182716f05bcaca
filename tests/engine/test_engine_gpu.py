"""The engine on CUDA: the compiled, CUDA-graph decode step gives the tokens of the eager one, batched
decode with sequences joining and leaving matches one-at-a-time decoding, and prefills replayed from
CUDA graphs (float, int4 and NF4 weights, an int8 KV cache) give what the eager prefill gives."""

from __future__ import annotations

import pytest
import torch

from quantdeploy.engine.engine import Engine
from quantdeploy.engine.sampling import SamplingParams
from quantdeploy.models.bundle import ModelBundle, SourceInfo

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _bundle(dtype, **shape):
    """A random 2-layer Llama (vocabulary 512, grouped heads); ``shape`` overrides its config fields."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256), **shape})
    model = LlamaForCausalLM(config).to(dtype).eval()
    return ModelBundle(model=model, tokenizer=None, source=SourceInfo(path="memory", kind="memory"))


PROMPTS = [[5, 17, 99, 3, 250, 7], [1, 2, 3], list(range(40, 80)), [300]]


def _run(engine: Engine, params: SamplingParams, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    seqs = []
    for prompt in prompts:  # join one by one, a step apart: rows at different positions
        seqs.append(engine.add(prompt, params))
        engine.step()
    while engine.running:
        engine.step()
    return [s.output_ids for s in seqs]


def test_compiled_decode_matches_eager_tokens_in_fp32():
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eager = Engine.from_bundle(_bundle(torch.float32), "cuda", max_batch=4, max_seq_len=128, compile=False,
                               decode_attention="sdpa")
    compiled = Engine.from_bundle(_bundle(torch.float32), "cuda", max_batch=4, max_seq_len=128, compile=True)
    assert compiled.compiled and not eager.compiled
    assert _run(eager, params) == _run(compiled, params)


def test_own_decode_graphs_give_the_eager_tokens_and_replay_one_per_bucket():
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eager = Engine.from_bundle(_bundle(torch.float32), "cuda", max_batch=4, max_seq_len=128, compile=False)
    ours = Engine.from_bundle(_bundle(torch.float32), "cuda", max_batch=4, max_seq_len=128)
    assert ours.decode_graphs is not None
    assert _run(eager, params) == _run(ours, params)
    assert set(ours.decode_graphs.graphs) == {1, 2, 4}  # the buckets the joining rows passed through
    ours.warm_up()  # after a run: the captured graphs are kept
    assert ours.generate(PROMPTS, params)[2].token_ids == eager.generate(PROMPTS, params)[2].token_ids


def test_torch_compiles_own_cuda_graphs_are_refused_before_anything_compiles():
    # an engine on cudagraph trees beside one on the engine's own graphs faulted on replay (decode_graphs.py)
    from quantdeploy.errors import ConfigError

    with pytest.raises(ConfigError, match="triton.cudagraphs"):
        Engine.from_bundle(_bundle(torch.float32), "cuda", max_batch=4, max_seq_len=128,
                           compile_options={"triton.cudagraphs": True})


def test_compiled_decode_matches_eager_logits_in_bf16():
    # bf16 greedy paths may part at a near-tie (fused kernels round differently): compare the logits of one
    # decode step from the same prefilled cache instead
    logits = []
    for compiled in (False, True):
        engine = Engine.from_bundle(_bundle(torch.bfloat16), "cuda", max_batch=4, max_seq_len=128, compile=compiled)
        for prompt in PROMPTS:
            engine.add(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
        engine._prefill_added()  # the cache rows and first tokens the decode step starts from
        logits.append(engine._run_decode(4, engine.max_seq_len).float().clone())
    assert (logits[1] - logits[0]).norm() / logits[0].norm() < 2e-2


def test_batched_equals_alone_and_sampling_is_seeded_on_gpu():
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    engine = Engine.from_bundle(_bundle(torch.float32), "cuda", max_batch=4, max_seq_len=128)
    together = _run(engine, params)
    alone = [engine.generate(p, params).token_ids for p in PROMPTS]
    assert together == alone


def test_prefill_graphs_give_the_tokens_and_logits_of_the_eager_prefill():
    from quantdeploy.engine.prefill_graphs import pack_rows, run_packed

    params = SamplingParams(max_tokens=24, ignore_eos=True)
    eager = Engine.from_bundle(_bundle(torch.float32), "cuda", max_batch=4, max_seq_len=128, prefill_graph_tokens=0)
    graphed = Engine.from_bundle(_bundle(torch.float32), "cuda", max_batch=4, max_seq_len=128)
    assert eager.prefill_graphs is None and graphed.prefill_graphs is not None
    assert _run(graphed, params) == _run(eager, params)  # one prompt per prefill, 1 to 40 tokens
    assert [c.token_ids for c in graphed.generate(PROMPTS, params)] == [c.token_ids for c in eager.generate(PROMPTS, params)]
    assert {(1, 16), (1, 48), (4, 48)} <= set(graphed.prefill_graphs.graphs)  # those ran from graphs

    graphs = graphed.prefill_graphs
    graphed.warm_up()
    assert set(graphs.graphs) == set(graphs.shapes)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for n, longest in [(1, 5), (3, 17), (4, 64), (2, 100)]:
            prompts = [torch.randint(0, 512, (int(torch.randint(1, longest + 1, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(n - 1)] + [list(range(longest))]
            b, t = graphs.shape(n, longest)
            for row in range(n):  # what Engine.add does: the rows own blocks for their prompts
                assert graphed.table.grow(row, t)
            graphed.table.sync()
            host = pack_rows(prompts, list(range(n)), b, t, graphed.scratch_row)
            _, replayed = graphs.run((b, t), host.pin_memory())
            direct = run_packed(graphed.model, host.cuda())
            assert torch.allclose(replayed[:n], direct[:n], atol=1e-5)
            for row in range(n):
                graphed.table.release(row)
    assert graphs.shape(4, 129) is None and graphs.shape(5, 1) is None  # past the graphs: eager


@pytest.mark.parametrize("method", ["int4", "nf4"])
def test_prefill_graphs_with_a_quantized_model_and_kv_cache(tiny_bundle, tmp_path, train_text, method):
    import quantdeploy as qd

    calib = tmp_path / "calib.txt"
    calib.write_text(train_text[:50_000])
    kv_cache = qd.KVCacheConfig(dtype="int8", calibration=qd.CalibrationConfig(str(calib), 4, 64))
    config = qd.RTNConfig(bits=4, group_size=32) if method == "int4" else qd.NF4Config(group_size=32)
    qd.save(qd.quantize(tiny_bundle, config, kv_cache=kv_cache), tmp_path / "ckpt")
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = ["The history of", "In 1850 the city", "A", "Mathematics is the study of numbers and"]
    runs = []
    for graph_tokens in (0, None):
        engine = Engine.load(tmp_path / "ckpt", "cuda", max_batch=4, max_seq_len=64, prefill_graph_tokens=graph_tokens)
        assert engine.model.layers[0].attention.kv_cache.k_cache.dtype == torch.int8
        runs.append([c.token_ids for c in engine.generate(prompts, params)])
        runs.append([engine.generate(p, params).token_ids for p in prompts])
    assert engine.prefill_graphs.graphs  # the second engine replayed graphs
    assert runs[2:] == runs[:2]  # the same kernels, replayed: the same tokens, batched and alone


def test_a_long_prompt_in_chunks_gives_the_tokens_of_a_whole_prefill_on_gpu():
    """Compiled decode, CUDA-graph prefills and chunked prefill of 300- and 500-token prompts among decoding
    rows (chunks of 96 at offsets into the paged cache, eager and replayed from the chunk graphs; the
    500-token prompt's last chunk, at 480..575, reaches past the block table's 512 positions, so it runs
    eagerly) give the tokens of whole prefills."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    long_prompts = [[5 + (7 * i) % 500 for i in range(300)], [9 + (11 * i) % 500 for i in range(500)]]
    runs = []
    for chunk, graph_tokens in ((None, None), (96, 0), (96, None)):
        engine = Engine.from_bundle(_bundle(torch.float32, max_position_embeddings=512), "cuda", max_batch=4,
                                    max_seq_len=512, prefill_chunk_tokens=chunk, prefill_graph_tokens=graph_tokens)
        runs.append(_run(engine, params, PROMPTS[:1] + long_prompts + PROMPTS[2:3]))
        if graph_tokens is None and chunk:
            chunk_graphs = sorted(key[1] for key in engine.prefill_graphs.graphs if key[0] == 0)
            assert chunk_graphs == [96, 192, 288, 384, 480]  # captured when first used (no warm_up here)
    assert runs[1] == runs[0] and runs[2] == runs[0]
