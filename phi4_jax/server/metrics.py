"""The server's Prometheus metrics (`prometheus_client`): requests, tokens, the engine's load, latencies.

One registry per app, so each server (or test) counts on its own. Latencies are in seconds:
time to first token from the request's arrival, inter-token latency per generated token (a
delivery of k tokens after a gap of t counts k latencies of t/k), and end-to-end latency.
Each metric vLLM also has is scraped a second time under vLLM's name (`VLLM_NAMES`, with its
`model_name` label), which existing dashboards and routers read.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

from phi4_jax.engine import stats
from phi4_jax.engine.scheduler import Load

CONTENT_TYPE = CONTENT_TYPE_LATEST  # the scrape's media type
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Ours -> vLLM's (its V1 engine's names). A running request holds a whole row of the cache, so the share of
# the cache in use is the share of rows running (`slot_occupancy`). vLLM's `finished_reason` is our `reason`.
VLLM_NAMES = {
    "phi4_jax_rows_running": "vllm:num_requests_running",
    "phi4_jax_rows_waiting": "vllm:num_requests_waiting",
    "phi4_jax_slot_occupancy": "vllm:kv_cache_usage_perc",
    "phi4_jax_prompt_tokens": "vllm:prompt_tokens",
    "phi4_jax_generation_tokens": "vllm:generation_tokens",
    "phi4_jax_time_to_first_token_seconds": "vllm:time_to_first_token_seconds",
    "phi4_jax_inter_token_latency_seconds": "vllm:inter_token_latency_seconds",
    "phi4_jax_e2e_request_latency_seconds": "vllm:e2e_request_latency_seconds",
    "phi4_jax_rows_finished": "vllm:request_success",
    "phi4_jax_prefix_cache_queries": "vllm:prefix_cache_queries",
    "phi4_jax_prefix_cache_hits": "vllm:prefix_cache_hits",
    "phi4_jax_spec_decode_drafts": "vllm:spec_decode_num_drafts",
    "phi4_jax_spec_decode_draft_tokens": "vllm:spec_decode_num_draft_tokens",
    "phi4_jax_spec_decode_accepted_tokens": "vllm:spec_decode_num_accepted_tokens",
}
_VLLM_LABELS = {"reason": "finished_reason"}


class Metrics:
    """The counters, gauges and histograms of one server; `load` reads the engine at each scrape."""

    def __init__(self, load: Callable[[], Load], model_name: str = ""):
        self.registry = registry = CollectorRegistry()
        self.vllm = CollectorRegistry()
        self.vllm.register(_VllmNames(registry, model_name))
        self.requests = Counter("phi4_jax_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=registry)
        self.prompt_tokens = Counter("phi4_jax_prompt_tokens", "prompt tokens of accepted requests (n rows each)",
                                     registry=registry)
        self.generation_tokens = Counter("phi4_jax_generation_tokens", "tokens generated", registry=registry)
        gauges = {
            "phi4_jax_rows_running": ("rows (one per choice of a request) decoding", lambda s: s.running),
            "phi4_jax_rows_waiting": ("rows waiting for a decode slot", lambda s: s.waiting),
            "phi4_jax_slots_allocated": ("decode slots allocated now (grown in powers of two)", lambda s: s.slots),
            "phi4_jax_slots_max": ("decode slots at most (--max-batch)", lambda s: s.max_batch),
            "phi4_jax_slot_occupancy": ("running rows / --max-batch", lambda s: s.running / s.max_batch),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=registry).set_function(lambda read=read: read(load()))
        registry.register(_EngineCounts(load))
        self.time_to_first_token = Histogram(
            "phi4_jax_time_to_first_token_seconds", "from a request's arrival to its first token",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            "phi4_jax_inter_token_latency_seconds", "between consecutive tokens of a row",
            buckets=_LATENCY_BUCKETS, registry=registry)
        self.e2e_latency = Histogram(
            "phi4_jax_e2e_request_latency_seconds", "from a request's arrival to its last token",
            buckets=_LATENCY_BUCKETS, registry=registry)

    def scrape(self) -> bytes:
        return generate_latest(self.registry) + generate_latest(self.vllm)


class _VllmNames:
    """The metrics of `registry` that vLLM has too, under vLLM's names and with its `model_name` label."""

    def __init__(self, registry: CollectorRegistry, model_name: str):
        self.registry, self.model_name = registry, model_name

    def collect(self):
        for family in self.registry.collect():
            name = VLLM_NAMES.get(family.name)
            if name is None:
                continue
            renamed = Metric(name, family.documentation, family.type, family.unit)
            for s in family.samples:
                labels = {_VLLM_LABELS.get(k, k): v for k, v in s.labels.items()}
                renamed.add_sample(name + s.name[len(family.name):], {"model_name": self.model_name, **labels},
                                   s.value, s.timestamp, s.exemplar)
            yield renamed


class _EngineCounts:
    """Counters the engine keeps, read at each scrape: `phi4_jax_scheduler_seconds_total{kind}` (wall
    seconds of its prefill and decode calls), `phi4_jax_rows_finished_total{reason}` (rows ended,
    by finish reason; abort: the client went), the prefix cache's `phi4_jax_prefix_cache_queries_total`
    and `_hits_total` (prompt tokens looked up, and found), speculative decoding's
    `phi4_jax_spec_decode_drafts_total`, `_draft_tokens_total` and `_accepted_tokens_total` (acceptance
    rate: accepted / draft tokens; tokens a drafting step makes: 1 + accepted / drafts), and
    `phi4_jax_compile_seconds_total`."""

    def __init__(self, load: Callable[[], Load]):
        self.load = load

    def collect(self):
        load = self.load()
        seconds = CounterMetricFamily("phi4_jax_scheduler_seconds", "wall seconds of the engine's device calls",
                                      labels=["kind"])
        seconds.add_metric(["prefill"], load.prefill_seconds)
        seconds.add_metric(["decode"], load.decode_seconds)
        finished = CounterMetricFamily("phi4_jax_rows_finished", "rows ended, by finish reason (abort: the client "
                                       "went)", labels=["reason"])
        for reason, count in sorted(load.finished.items()):
            finished.add_metric([reason], count)
        queries = CounterMetricFamily("phi4_jax_prefix_cache_queries", "prompt tokens looked up in the prefix cache")
        queries.add_metric([], load.prefix_queried_tokens)
        hits = CounterMetricFamily("phi4_jax_prefix_cache_hits", "prompt tokens found in the prefix cache (not "
                                   "prefilled again)")
        hits.add_metric([], load.prefix_hit_tokens)
        compiled = CounterMetricFamily("phi4_jax_compile_seconds", "seconds this process spent making programs "
                                       "(tracing, lowering, compiling; a compile while serving stalls every stream)")
        compiled.add_metric([], stats.CLOCK.total)
        spec = [CounterMetricFamily("phi4_jax_spec_decode_drafts", "speculative decoding: steps of a row that "
                                    "verified drafts (--speculative)", value=load.spec_drafts),
                CounterMetricFamily("phi4_jax_spec_decode_draft_tokens", "speculative decoding: draft tokens verified",
                                    value=load.spec_draft_tokens),
                CounterMetricFamily("phi4_jax_spec_decode_accepted_tokens", "speculative decoding: draft tokens "
                                    "accepted", value=load.spec_accepted_tokens)]
        yield from (seconds, finished, queries, hits, compiled, *spec)
