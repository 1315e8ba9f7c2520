"""Prometheus metrics in the text exposition format (0.0.4), without a client library.

Counters and histograms are updated as requests run; gauges that describe state (queue depth, running
sequences, KV usage, loaded models) are sampled from the model manager when /metrics is scraped.

| metric                                   | kind      | labels           | what                                      |
|------------------------------------------|-----------|------------------|-------------------------------------------|
| ember_requests_total                     | counter   | endpoint, status | HTTP requests answered                    |
| ember_request_duration_seconds           | histogram | endpoint         | request start -> last byte sent           |
| ember_prompt_tokens_total                | counter   | model            | prompt tokens of finished generations     |
| ember_generated_tokens_total             | counter   | model            | tokens generated                          |
| ember_time_to_first_token_seconds        | histogram | model            | admission -> first token                  |
| ember_inter_token_latency_seconds        | histogram | model            | gap between consecutive tokens            |
| ember_queue_depth                        | gauge     | model            | sequences waiting in the engine scheduler |
| ember_running_sequences                  | gauge     | model            | sequences in the running batch            |
| ember_kv_cache_usage_ratio               | gauge     | model            | KV blocks in use / all KV blocks          |
| ember_in_flight_requests                 | gauge     |                  | requests admitted and not yet finished    |
| ember_loaded_models                      | gauge     |                  | models in memory                          |
"""
from __future__ import annotations

import math
import threading
from bisect import bisect_left
from typing import Callable, Iterable

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _labels(values: dict[str, str]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in values.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    items = labels + extra
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in items) + "}"


def _fmt_value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._values: dict[Labels, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = _labels(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(_labels(labels), 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self._values.items())
        for labels, v in items:
            yield f"{self.name}{_fmt_labels(labels)} {_fmt_value(v)}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, list[float]] = {}  # per-bucket counts (non-cumulative), then +Inf, sum
        self._lock = threading.Lock()

    def observe(self, value: float, **labels: str) -> None:
        key = _labels(labels)
        i = bisect_left(self.buckets, value)  # first bucket whose upper bound >= value ("le" semantics)
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            series[i] += 1
            series[-1] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(_labels(labels))
        return int(sum(series[:-1])) if series else 0

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for labels, series in items:
            running = 0.0
            for bound, n in zip(self.buckets + (math.inf,), series[:-1]):
                running += n
                yield f"{self.name}_bucket{_fmt_labels(labels, (('le', _fmt_value(bound)),))} {_fmt_value(running)}"
            yield f"{self.name}_sum{_fmt_labels(labels)} {_fmt_value(series[-1])}"
            yield f"{self.name}_count{_fmt_labels(labels)} {_fmt_value(running)}"


class Gauge:
    """Sampled at scrape time from `collect`, which returns (labels, value) pairs."""

    def __init__(self, name: str, help: str, collect: Callable[[], Iterable[tuple[dict[str, str], float]]]):
        self.name, self.help, self.collect = name, help, collect

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, v in sorted(((_labels(lb), v) for lb, v in self.collect()), key=lambda x: x[0]):
            yield f"{self.name}{_fmt_labels(labels)} {_fmt_value(v)}"


class Metrics:
    """The server's metrics. `gauges` is filled by the app once the model manager exists."""

    def __init__(self) -> None:
        self.requests = Counter("ember_requests_total", "HTTP requests by endpoint and status code.")
        self.request_seconds = Histogram("ember_request_duration_seconds",
                                         "HTTP request duration, first byte received to last byte sent.",
                                         LATENCY_BUCKETS)
        self.prompt_tokens = Counter("ember_prompt_tokens_total", "Prompt tokens of generation requests.")
        self.generated_tokens = Counter("ember_generated_tokens_total", "Tokens generated.")
        self.ttft = Histogram("ember_time_to_first_token_seconds", "Time from admission to the first token.",
                              LATENCY_BUCKETS)
        self.itl = Histogram("ember_inter_token_latency_seconds", "Time between consecutive tokens.",
                             TOKEN_GAP_BUCKETS)
        self.gauges: list[Gauge] = []

    def render(self) -> str:
        lines: list[str] = []
        for metric in (self.requests, self.request_seconds, self.prompt_tokens, self.generated_tokens,
                       self.ttft, self.itl, *self.gauges):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
