"""Prometheus metrics of one runner process, on its own registry, and their HTTP endpoint.

The supervisor refreshes the gauges from the store and the rate limiter; the API client reports
every exchange; the poller reports how long each call took from submit to its end.
``bem-runner status`` reads the same endpoint back (:func:`fetch_live`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from runner.config_checks import host_port_problem
from runner.errors import ConfigError
from runner.store import this_runner_id
from runner.store.base import Counts
from runner.tables import table

LOOPBACK = "127.0.0.1"
"""Where metrics are served when an address names only a port."""
LATENCY_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
"""Seconds from submit to the call's end: bem calls take seconds to hours."""


class Metrics:
    """The collectors; ``registry`` is private to this object, never the global one.

    ``bem_runner_info{runner_id}`` names the runner (``store.runner_id``, else hostname-pid),
    so the series of several runners sharing a store can be told apart and joined on it.
    """

    def __init__(self, runner_id: str | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.runner_id = runner_id or this_runner_id()
        Info("bem_runner", "Which runner this is", registry=r).info({"runner_id": self.runner_id})
        self.files = Gauge("bem_runner_files", "Files in the store by state", ["state"], registry=r)
        self.calls = Gauge("bem_runner_calls", "Calls in the store by state", ["state"], registry=r)
        self.open_calls = Gauge(
            "bem_runner_open_calls",
            "Calls sent and not finished (sending, unknown, polling)",
            registry=r,
        )
        self.requests = Counter(
            "bem_runner_requests",
            "Requests to bem by endpoint and HTTP status ('error': no answer)",
            ["method", "endpoint", "status"],
            registry=r,
        )
        self.rate_limited = Counter(
            "bem_runner_rate_limited", "Answers with HTTP 429 from bem", registry=r
        )
        self.request_rate = Gauge(
            "bem_runner_request_rate",
            "Requests per second the rate limiter allows now (lower after a 429)",
            registry=r,
        )
        self.in_flight = Gauge("bem_runner_requests_in_flight", "Requests in flight", registry=r)
        self.poll_lag = Gauge(
            "bem_runner_poll_lag_seconds",
            "How far behind its schedule the most overdue poll is",
            registry=r,
        )
        self.call_latency = Histogram(
            "bem_runner_call_latency_seconds",
            "Seconds from a call's submit to its end",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._file_states: set[str] = set()
        self._call_states: set[str] = set()

    def observe_counts(self, counts: Counts) -> None:
        self._file_states = _set_all(self.files, counts.files, self._file_states)
        self._call_states = _set_all(self.calls, counts.calls, self._call_states)
        self.open_calls.set(counts.open_calls)

    def observe_limiter(self, *, rate: float, in_flight: int) -> None:
        self.request_rate.set(rate)
        self.in_flight.set(in_flight)

    def observe_poll_lag(self, seconds: float) -> None:
        self.poll_lag.set(max(0.0, seconds))

    def observe_response(self, method: str, route: str, status: int | None) -> None:
        """The API client's ``on_response`` hook."""
        self.requests.labels(method, route, "error" if status is None else str(status)).inc()
        if status == 429:
            self.rate_limited.inc()

    def observe_call_finished(self, seconds: float) -> None:
        """The poller's ``on_call_finished`` hook."""
        self.call_latency.observe(max(0.0, seconds))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _set_all(gauge: Gauge, values: Mapping[str, int], seen: set[str]) -> set[str]:
    """A state that emptied reads 0 rather than keeping its last value."""
    for state in seen - set(values):
        gauge.labels(state).set(0)
    for state, value in values.items():
        gauge.labels(state).set(value)
    return seen | set(values)


def parse_address(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (loopback) → (host, port).

    The same rules as ``service.metrics_addr`` in the configuration.
    """
    problem = host_port_problem(text)
    if problem is not None:
        raise ConfigError(f"metrics address {text!r}: {problem}; expected host:port")
    host, _, port = text.rpartition(":")
    return host.removeprefix("[").removesuffix("]") or LOOPBACK, int(port)


@contextmanager
def serve_metrics(metrics: Metrics, address: str) -> Iterator[tuple[str, int]]:
    """Serve ``/metrics`` on ``address`` (port 0: a free one) and yield the bound address."""
    host, port = parse_address(address)
    try:
        server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {address}: {exc.strerror}") from exc
    try:
        bound = server.server_address
        yield str(bound[0]), int(bound[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class Live(msgspec.Struct, frozen=True):
    """What the running daemon's metrics endpoint says, reduced to one screen."""

    requests: dict[str, float]
    """``METHOD endpoint status`` → count."""
    rate_limited: float
    request_rate: float
    in_flight: float
    poll_lag: float
    open_calls: float
    calls_finished: float
    latency_mean: float | None
    runner_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "runner_id": self.runner_id,
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "request_rate": self.request_rate,
            "in_flight": self.in_flight,
            "poll_lag_seconds": self.poll_lag,
            "open_calls": self.open_calls,
            "calls_finished": self.calls_finished,
            "call_latency_mean_seconds": self.latency_mean,
        }


def parse_exposition(text: str) -> Live:
    samples: dict[str, float] = {}
    requests: dict[str, float] = {}
    runner_id: str | None = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "bem_runner_info":
                runner_id = sample.labels.get("runner_id")
            elif sample.name == "bem_runner_requests_total":
                labels = sample.labels
                key = f"{labels['method']} {labels['endpoint']} {labels['status']}"
                requests[key] = sample.value
            elif not sample.labels:
                samples[sample.name] = sample.value
    finished = samples.get("bem_runner_call_latency_seconds_count", 0.0)
    total = samples.get("bem_runner_call_latency_seconds_sum", 0.0)
    return Live(
        requests=requests,
        rate_limited=samples.get("bem_runner_rate_limited_total", 0.0),
        request_rate=samples.get("bem_runner_request_rate", 0.0),
        in_flight=samples.get("bem_runner_requests_in_flight", 0.0),
        poll_lag=samples.get("bem_runner_poll_lag_seconds", 0.0),
        open_calls=samples.get("bem_runner_open_calls", 0.0),
        calls_finished=finished,
        latency_mean=total / finished if finished else None,
        runner_id=runner_id,
    )


def fetch_live(address: str, *, timeout: float = 2.0) -> Live | None:
    """Read a running daemon's metrics; None when nothing answers there."""
    host, port = parse_address(address)
    url_host = f"[{host}]" if ":" in host else host
    try:
        response = httpx.get(f"http://{url_host}:{port}/metrics", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    return parse_exposition(response.text)


def render_live(live: Live | None, address: str) -> str:
    if live is None:
        return f"no runner answers on {address} (metrics)"
    mean = "-" if live.latency_mean is None else f"{live.latency_mean:.1f}"
    rows = [
        ("runner", live.runner_id or "-"),
        ("request rate allowed now (/s)", f"{live.request_rate:.2f}"),
        ("requests in flight", f"{live.in_flight:.0f}"),
        ("429 answers", f"{live.rate_limited:.0f}"),
        ("calls open", f"{live.open_calls:.0f}"),
        ("poll lag (s)", f"{live.poll_lag:.1f}"),
        ("calls finished", f"{live.calls_finished:.0f}"),
        ("mean submit-to-result (s)", mean),
        *((f"requests {key}", f"{count:.0f}") for key, count in sorted(live.requests.items())),
    ]
    return table(f"live (metrics on {address})", ("what", "value"), rows, right={"value"})
