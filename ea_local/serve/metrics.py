"""Prometheus metrics: counters updated per request, slot and queue gauges read at scrape time."""
from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .slots import GenResult, SlotPool


prometheus_client.disable_created_metrics()  # the *_created series only double the output


class _PoolCollector:
    def __init__(self, pool: SlotPool):
        self.pool = pool

    def collect(self):
        cells = GaugeMetricFamily("ea_local_slot_cells", "KV cells (global cache) the slot's conversation holds",
                                  labels=["slot"])
        budget = GaugeMetricFamily("ea_local_slot_budget", "KV cell budget of the slot", labels=["slot"])
        busy = GaugeMetricFamily("ea_local_slot_busy", "1 while the slot runs a request", labels=["slot"])
        arch_t = GaugeMetricFamily("ea_local_slot_archive_tokens", "evicted cells kept in the slot's archive",
                                   labels=["slot"])
        arch_b = GaugeMetricFamily("ea_local_slot_archive_bytes", "host bytes of the slot's archive", labels=["slot"])
        for s in self.pool.slots:
            cells.add_metric([str(s.id)], s.session.n_cells)
            budget.add_metric([str(s.id)], s.session.cfg.budget)
            busy.add_metric([str(s.id)], int(s.busy))
            a = s.session.archive
            arch_t.add_metric([str(s.id)], len(a) if a is not None else 0)
            arch_b.add_metric([str(s.id)], a.nbytes if a is not None else 0)
        yield cells
        yield budget
        yield busy
        yield arch_t
        yield arch_b
        yield GaugeMetricFamily("ea_local_queue_length", "requests waiting for a slot", value=self.pool.queue_length)


class Metrics:
    def __init__(self, pool: SlotPool):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ea_local_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("ea_local_prompt_tokens", "prompt tokens of completed requests", registry=r)
        self.prefilled = Counter("ea_local_prompt_tokens_prefilled",
                                 "prompt tokens decoded (not found in a slot's cache)", registry=r)
        self.reused = Counter("ea_local_prompt_tokens_reused",
                              "prompt tokens taken from a slot's cache (conversation reuse)", registry=r)
        self.completion_tokens = Counter("ea_local_completion_tokens", "generated tokens", registry=r)
        self.evictions = Counter("ea_local_evictions", "compressions (eviction events)", registry=r)
        self.evicted_cells = Counter("ea_local_evicted_cells", "KV cells evicted", registry=r)
        self.compression = Counter("ea_local_compression_seconds", "time spent scoring and evicting", registry=r)
        self.recalls = Counter("ea_local_recalls", "requests whose message brought cells back from the archive",
                               registry=r)
        self.recalled_cells = Counter("ea_local_recalled_cells", "KV cells brought back from the archive", registry=r)
        self.recall = Counter("ea_local_recall_seconds", "time spent scoring the archive and restoring cells",
                              registry=r)
        self.cancelled = Counter("ea_local_cancelled", "generations stopped by a disconnect or shutdown",
                                 registry=r)
        self.ttft = Histogram("ea_local_time_to_first_token_seconds", "from slot start to the first text",
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        r.register(_PoolCollector(pool))

    def record(self, res: GenResult) -> None:
        self.prompt_tokens.inc(res.prompt_tokens)
        self.prefilled.inc(res.prompt_tokens - res.cached_tokens)
        self.reused.inc(res.cached_tokens)
        self.completion_tokens.inc(res.completion_tokens)
        self.evictions.inc(res.evictions)
        self.evicted_cells.inc(res.evicted_cells)
        self.compression.inc(res.compression_s)
        self.recalls.inc(int(res.recalled_cells > 0))
        self.recalled_cells.inc(res.recalled_cells)
        self.recall.inc(res.recall_s)
        if res.finish_reason == "cancelled":
            self.cancelled.inc()
        elif res.completion_tokens:
            self.ttft.observe(res.ttft_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
