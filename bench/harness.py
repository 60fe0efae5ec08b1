"""What every benchmark needs: the emulator as a subprocess, input files, measured child runs.

Each client runs as its own process so its CPU time and peak RSS can be read exactly from
``os.wait4`` and the emulator's work is never counted as the client's.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
API_KEY = "bench-key"


@dataclass(frozen=True)
class Measured:
    """One child process: how long it ran, what it cost, how it ended."""

    exit_code: int
    wall_seconds: float
    cpu_seconds: float
    user_seconds: float
    system_seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str


SLOW_FILE_CREATION_US = 50.0
"""Creating a file costs about 20 µs of CPU on an ordinary file system; above this, the kernel
is working around something (see :func:`file_creation_us`)."""


def file_creation_us(folder: Path, count: int = 200) -> float:
    """CPU time (user + system, µs) this process spends creating one empty file in ``folder``.

    Each result document is a new file. On ext4 without a journal the kernel does not reuse an
    inode freed in the last minutes (``find_inode_bit`` skips ``recently_deleted`` ones), so
    right after many deletions nearby (a previous run's folder removed, a test suite's temporary
    files) each new file costs it a search: 20 µs becomes 100–500 µs, all of it charged to the
    process creating the file. Measured just before a run, this says how much of a drain's
    system time that was. The files are kept (removing them would free more inodes).
    """
    folder.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_SELF)
    for index in range(count):
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
        os.close(os.open(folder / f"probe-{index:04d}", flags, 0o600))
    after = resource.getrusage(resource.RUSAGE_SELF)
    spent = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return spent * 1e6 / count


def slow_file_creation_note(cost_us: float, where: str) -> str | None:
    """A line for the report when creating a file cost far more than it ordinarily does."""
    if cost_us <= SLOW_FILE_CREATION_US:
        return None
    return (
        f"note: creating a file in {where} cost {cost_us:.0f} µs of CPU just before the run "
        f"(about 20 µs ordinarily): the kernel is skipping recently freed inodes (ext4 without a "
        f"journal, after many deletions in the last minutes); each result document pays it"
    )


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
    logs: Path,
) -> Measured:
    """Run ``argv`` to its end; wall time, user+system CPU and peak RSS of that process."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdout=out, stderr=err, env=dict(env or os.environ), cwd=REPO
        )
        status, usage = _wait(proc, started + timeout)
        wall = time.perf_counter() - started
    return Measured(
        exit_code=os.waitstatus_to_exitcode(status),
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        user_seconds=usage.ru_utime,
        system_seconds=usage.ru_stime,
        peak_rss_mb=usage.ru_maxrss / 1024,  # kilobytes on Linux
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )


def run_measured_together(
    argvs: Sequence[Sequence[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 3600.0,
    logs: Path,
) -> list[Measured]:
    """Start every ``argv`` at once and run them all to their ends (``logs/<index>/``): each
    one's wall time from the common start, its CPU and peak RSS."""
    outputs, procs = [], []
    started = time.perf_counter()
    for index, argv in enumerate(argvs):
        folder = logs / str(index)
        folder.mkdir(parents=True, exist_ok=True)
        out, err = (folder / "stdout.txt").open("wb"), (folder / "stderr.txt").open("wb")
        outputs.append((folder, out, err))
        procs.append(
            subprocess.Popen(list(argv), stdout=out, stderr=err, env=dict(env or os.environ),
                             cwd=REPO)
        )  # fmt: skip
    ended: dict[int, tuple[int, Any, float]] = {}
    while len(ended) < len(procs):
        for index, proc in enumerate(procs):
            if index in ended:
                continue
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                ended[index] = (status, usage, time.perf_counter() - started)
            elif time.perf_counter() > started + timeout:
                proc.kill()
        time.sleep(0.02)
    measured = []
    for index, (folder, out, err) in enumerate(outputs):
        out.close()
        err.close()
        status, usage, wall = ended[index]
        measured.append(
            Measured(
                exit_code=os.waitstatus_to_exitcode(status),
                wall_seconds=wall,
                cpu_seconds=usage.ru_utime + usage.ru_stime,
                user_seconds=usage.ru_utime,
                system_seconds=usage.ru_stime,
                peak_rss_mb=usage.ru_maxrss / 1024,
                stdout=(folder / "stdout.txt").read_text(errors="replace"),
                stderr=(folder / "stderr.txt").read_text(errors="replace"),
            )
        )
    return measured


def combined(measured: Sequence[Measured]) -> Measured:
    """Several processes as one client: the last one's wall time, CPU summed, the largest RSS,
    the first failure's exit code."""
    return Measured(
        exit_code=next((m.exit_code for m in measured if m.exit_code != 0), 0),
        wall_seconds=max(m.wall_seconds for m in measured),
        cpu_seconds=sum(m.cpu_seconds for m in measured),
        user_seconds=sum(m.user_seconds for m in measured),
        system_seconds=sum(m.system_seconds for m in measured),
        peak_rss_mb=max(m.peak_rss_mb for m in measured),
        stdout="".join(m.stdout for m in measured),
        stderr="".join(m.stderr for m in measured),
    )


def _wait(proc: subprocess.Popen[bytes], deadline: float) -> tuple[int, Any]:
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, usage
        if time.perf_counter() > deadline:
            proc.kill()
        time.sleep(0.02)


# -- the emulator ------------------------------------------------------------------------------


@dataclass
class Emulator:
    """A running ``python -m runner emulator`` and its control endpoints."""

    base_url: str
    proc: subprocess.Popen[bytes]
    http: httpx.Client = field(repr=False)

    def stats(self) -> dict[str, Any]:
        response = self.http.get(f"{self.base_url}/_emulator/stats")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def reset_stats(self) -> None:
        self.http.post(f"{self.base_url}/_emulator/reset-stats").raise_for_status()


@contextmanager
def emulator(
    *, rate: float | None, burst: int, latency: str, extra: Sequence[str] = ()
) -> Iterator[Emulator]:
    argv = [PYTHON, "-m", "runner", "emulator", "--port", "0", "--api-key", API_KEY]
    argv += ["--latency", latency, "--rate-limit-burst", str(burst), *extra]
    if rate is not None:
        argv += ["--rate-limit", str(rate)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().decode().strip()
        if not base_url.startswith("http"):
            raise RuntimeError(f"the emulator did not start: {base_url!r}")
        with httpx.Client(timeout=30.0) as http:
            yield Emulator(base_url, proc, http)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class StatsSampler:
    """Reads the emulator's request counters once a second while a client runs."""

    def __init__(self, emu: Emulator, every: float = 1.0) -> None:
        self._emu = emu
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.samples: list[tuple[float, int, int]] = []  # (t, accepted API requests, 429s)

    def __enter__(self) -> StatsSampler:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self._sample()

    def _sample(self) -> None:
        with httpx.Client(timeout=30.0) as http:
            stats = http.get(f"{self._emu.base_url}/_emulator/stats").json()
        total = sum(sum(by_status.values()) for by_status in stats["requests"].values())
        t = time.perf_counter() - self._started
        rate_limited = int(stats["rate_limited"])
        self.samples.append((t, total - rate_limited, rate_limited))

    def best_window_rate(self, seconds: float = 10.0) -> float:
        """Highest rate of accepted requests over any ``seconds``-long stretch between samples."""
        best = 0.0
        for i, (t0, n0, _) in enumerate(self.samples):
            for t1, n1, _ in self.samples[i + 1 :]:
                if t1 - t0 >= seconds:
                    best = max(best, (n1 - n0) / (t1 - t0))
                    break
        return best

    def rate_limited_after(self, seconds: float) -> int:
        """429s received after the first ``seconds`` of the run."""
        before = [r for t, _, r in self.samples if t <= seconds]
        last = self.samples[-1][2] if self.samples else 0
        return last - (before[-1] if before else 0)


# -- inputs and outputs ------------------------------------------------------------------------


def make_inputs(folder: Path, count: int, *, size: int = 200, suffix: str = ".txt") -> list[str]:
    """``count`` small text files with unique content; returns their sha256 digests."""
    folder.mkdir(parents=True, exist_ok=True)
    digests = []
    filler = b"x" * max(0, size - 40)
    for index in range(count):
        content = f"invoice {index:08d} total {index * 7 % 1000}\n".encode() + filler
        (folder / f"doc-{index:07d}{suffix}").write_bytes(content)
        digests.append(hashlib.sha256(content).hexdigest())
    return digests


def copy_inputs(source: Path, destination: Path) -> None:
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(source, destination)


def count_outputs(outbox: Path) -> tuple[int, int]:
    """(result documents, error documents) anywhere below ``outbox``."""
    results = errors = 0
    for path in outbox.rglob("*.json"):
        if path.name.endswith(".error.json"):
            errors += 1
        else:
            results += 1
    return results, errors


def api_requests(stats: Mapping[str, Any]) -> dict[str, int]:
    """Requests by kind: "submit" (POST creating calls), "poll" (GET) and "total"."""
    submit = poll = 0
    for route, by_status in stats["requests"].items():
        n = sum(by_status.values())
        if route.startswith("POST"):
            submit += n
        else:
            poll += n
    return {"submit": submit, "poll": poll, "total": submit + poll}


def duplicate_calls(stats: Mapping[str, Any], digests: Sequence[str]) -> tuple[int, int]:
    """(calls beyond the first per input content, inputs never sent)."""
    sent: Mapping[str, int] = stats["files_by_content_sha256"]
    extra = sum(max(0, sent.get(d, 0) - 1) for d in digests)
    missing = sum(1 for d in digests if sent.get(d, 0) == 0)
    return extra, missing


def bench_env(base_url: str) -> dict[str, str]:
    env = dict(os.environ)
    # Run as an installed program does, from cached bytecode, not compiling every module anew.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update({"BEM_API_KEY": API_KEY, "BEM_BASE_URL": base_url, "PYTHONPATH": str(REPO)})
    return env


def runner_config(
    path: Path,
    *,
    rate: float,
    burst: int,
    routes: Sequence[Mapping[str, object]] = (),
    **sections: Mapping[str, object],
) -> Path:
    """A TOML config for ``bem-runner drain`` with the given limits (and any other settings)."""
    tables: dict[str, dict[str, object]] = {
        "limits": {"requests_per_second": rate, "burst": burst},
        "inbox": {"on_done": "archive"},
    }
    for name, values in sections.items():
        tables.setdefault(name, {}).update(values)
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
    for route in routes:
        lines.append("[[route]]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in route.items())
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def drain_argv(config: Path, root: Path, *, store: str | None = None) -> list[str]:
    """``bem-runner drain`` on ``root``'s folders; with ``store``, on that PostgreSQL store."""
    argv = [PYTHON, "-m", "runner", "--config", str(config), "drain"]
    for name in ("inbox", "outbox", "archive"):
        argv += [f"--{name}", str(root / name)]
    if store is not None:
        argv += ["--store", store]
    return [*argv, "--state", str(root / "state.db"), "--settle-seconds", "0", "--no-progress"]
