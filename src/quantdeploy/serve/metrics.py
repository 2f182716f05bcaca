"""Prometheus metrics of one server, in a registry of its own (no process-global state).

Names follow vLLM's where one exists (``*_time_to_first_token_seconds``, ``*_num_requests_running``),
so existing dashboards need only the prefix changed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # status: ok, cancelled (client gone, or shutdown), error (failed in the engine), or the HTTP code of
        # an answer given before the engine saw the request (400, 401, 404, 413, 429, 503, ...).
        self.requests = Counter("quantdeploy_requests", "Answered HTTP generation requests by status", ["status"],
                                registry=r)
        self.ttft = Histogram("quantdeploy_time_to_first_token_seconds", "Arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("quantdeploy_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("quantdeploy_e2e_request_latency_seconds", "Arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("quantdeploy_request_queue_time_seconds", "Arrival to admission into the batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        # every running request waits for each engine step: a long one shows as a gap in every stream
        self.step = Histogram("quantdeploy_engine_step_seconds", "Wall time of an engine loop turn that ran a step "
                              "(admission, prefill, decode, detokenization)", buckets=TOKEN_BUCKETS, registry=r)
        self.running = Gauge("quantdeploy_num_requests_running", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("quantdeploy_num_requests_waiting", "Requests waiting for a batch row", registry=r)
        self.kv_usage = Gauge("quantdeploy_kv_cache_usage_ratio", "KV-cache blocks in use / blocks in the pool", registry=r)
        self.generated = Counter("quantdeploy_generation_tokens", "Generated tokens", registry=r)
        self.prompt = Counter("quantdeploy_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.gpu_memory = Gauge("quantdeploy_gpu_memory_allocated_bytes", "GPU memory held by tensors", registry=r)
        # The engine's own counts: decode_rows / decode_steps is the mean batch, prefill_sequences /
        # prefill_batches how many requests each prefill forward took.
        self.engine = {name: Counter(f"quantdeploy_engine_{name}", help_, registry=r) for name, help_ in (
            ("prefill_batches", "Prefill forwards run"), ("prefill_sequences", "Sequences prefilled"),
            ("decode_steps", "Decode steps run"), ("decode_rows", "Sequences advanced, summed over decode steps"),
            ("device_wait_seconds", "Time the engine loop waited for the device's tokens (device-bound)"),
            ("preemptions", "Sequences whose KV-cache blocks were taken back, to be recomputed"),
            ("idle_seconds", "Time the engine loop had nothing to run"))}

    def render(self) -> bytes:
        return generate_latest(self.registry)
