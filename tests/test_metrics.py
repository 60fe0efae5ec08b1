"""Metrics of a real drain on the emulator, the HTTP endpoint, and what ``status`` reads back."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import httpx
import pytest

from runner.daemon import Runner, RunnerOptions
from runner.emulator import Emulator, EmulatorSettings
from runner.errors import ConfigError
from runner.metrics import (
    Metrics,
    fetch_live,
    parse_address,
    parse_exposition,
    render_live,
    serve_metrics,
)
from tests.pipeline import make_config, write_files


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


@pytest.mark.anyio
async def test_a_drain_fills_every_metric(tmp_path: Path) -> None:
    emulator = Emulator(EmulatorSettings(latency_min=0, latency_max=0))
    config = make_config(tmp_path)
    write_files(config.paths.inbox, [(f"wf/{n}.txt", b"hello") for n in range(4)])
    write_files(config.paths.inbox, [("wf/bad.txt", b"BEM-EMULATOR-FAIL")])
    metrics = Metrics()
    runner = Runner(
        config,
        RunnerOptions(drain=True, handle_signals=False, supervise_every=0.05),
        transport=httpx.ASGITransport(app=emulator.app),
        events=None,
        metrics=metrics,
    )
    outcome = await runner.serve()
    assert outcome.delivered == {"result": 4, "error": 1}

    requests = {
        (s.labels["method"], s.labels["endpoint"], s.labels["status"]): s.value
        for s in next(iter(metrics.requests.collect())).samples
        if s.name == "bem_runner_requests_total"
    }
    posts = {k: v for k, v in requests.items() if k[1] == "/v3/workflows/{workflowName}/call"}
    assert sum(v for k, v in posts.items() if k[2].startswith("2")) == 5
    assert sample(metrics, "bem_runner_rate_limited_total") == sum(
        v for k, v in requests.items() if k[2] == "429"
    )
    assert sample(metrics, "bem_runner_call_latency_seconds_count") == 5
    assert sample(metrics, "bem_runner_request_rate") > 0
    assert sample(metrics, "bem_runner_open_calls") == 0
    assert sample(metrics, "bem_runner_poll_lag_seconds") >= 0
    [files_metric] = metrics.files.collect()
    files = {s.labels["state"]: s.value for s in files_metric.samples if s.value}
    assert sum(files.values()) == 5  # every file, in the state the last supervisor turn saw


def test_429s_are_counted_apart() -> None:
    metrics = Metrics()
    metrics.observe_response("GET", "/v3/calls", 429)
    metrics.observe_response("GET", "/v3/calls", 200)
    metrics.observe_response("GET", "/v3/calls", None)
    assert sample(metrics, "bem_runner_rate_limited_total") == 1
    assert (
        sample(
            metrics, "bem_runner_requests_total", method="GET", endpoint="/v3/calls", status="error"
        )
        == 1
    )


def test_endpoint_serves_its_own_registry_and_status_reads_it() -> None:
    metrics = Metrics()
    metrics.observe_response("POST", "/v3/workflows/{workflowName}/call", 429)
    metrics.observe_limiter(rate=9.7, in_flight=2)
    metrics.observe_call_finished(4.0)
    metrics.observe_call_finished(6.0)
    with serve_metrics(metrics, "127.0.0.1:0") as (host, port):
        body = httpx.get(f"http://{host}:{port}/metrics").text
        live = fetch_live(f"{host}:{port}")
    assert "bem_runner_request_rate 9.7" in body
    assert "python_gc_objects_collected_total" not in body  # not the global registry
    assert live == parse_exposition(body)
    assert live is not None
    assert live.rate_limited == 1
    assert live.request_rate == 9.7
    assert live.calls_finished == 2
    assert live.latency_mean == 5.0
    text = render_live(live, f"{host}:{port}")
    assert "429 answers" in text
    assert "POST /v3/workflows/{workflowName}/call 429" in text


def test_nothing_listening_is_not_an_error() -> None:
    with serve_metrics(Metrics(), "127.0.0.1:0") as (host, port):
        pass
    assert fetch_live(f"{host}:{port}", timeout=1.0) is None


def test_addresses() -> None:
    assert parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_address(":9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    for refused in ("localhost", "host:65536", "host:-1", "bad host:80", "[not-v6]:80", ":"):
        with pytest.raises(ConfigError):
            parse_address(refused)


def test_the_metrics_name_their_runner_and_status_reads_it_back() -> None:
    metrics = Metrics("host-a-1234")
    assert sample(metrics, "bem_runner_info", runner_id="host-a-1234") == 1.0
    assert parse_exposition(metrics.exposition().decode()).runner_id == "host-a-1234"
    with serve_metrics(metrics, "127.0.0.1:0") as (host, port):
        live = fetch_live(f"{host}:{port}")
    assert live is not None
    assert live.as_dict()["runner_id"] == "host-a-1234"
    assert "host-a-1234" in render_live(live, f"{host}:{port}")


def test_without_a_configured_id_a_runner_is_its_host_and_pid() -> None:
    assert Metrics().runner_id == f"{socket.gethostname()}-{os.getpid()}"


def test_no_runner_answering_is_said_in_one_line() -> None:
    assert render_live(None, "127.0.0.1:9464") == "no runner answers on 127.0.0.1:9464 (metrics)"
