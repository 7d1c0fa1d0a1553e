"""Start real ``llama-server`` processes on a tiny model, as pytest fixtures.

Owns: locating (and on a fresh machine building) the binary through
``scripts/llama-server``, starting servers on a model written at test time
(``tests/helpers/tinymodel.py``), waiting until they answer ``/health``, and
stopping them by PID. Fixtures: ``llama_binary``, ``llama_model``,
``llama_server`` (one server for the session) and ``llama_replicas`` (a
factory for N more, for the multi-upstream tests).
Not here: the sidecar process (``tests/helpers/process.py``).

Invariants: every server listens on 127.0.0.1 only, on a port it picked itself
(``--port 0``, read back from its log), so parallel sessions never race for a
port. Every process started here is stopped here, by its own PID, and dies
with the test process if that is killed (``PR_SET_PDEATHSIG``). Every wait is
bounded in time and ends with the server's log tail in the failure message.

Use: register the module as a plugin (``pytest_plugins`` in the top conftest)
or import the fixtures into a test module; mark tests ``@pytest.mark.llama``
and add ``llama_timeout()`` so the one-time build fits in the item timeout.
``SIDECAR_SKIP_LLAMA=1`` skips every test that needs a server (quick local
runs only; CI does not set it).

Known limitations: Linux only (``prctl``). The first session on a fresh
machine builds llama.cpp (about 20 minutes on two cores) inside the first
test's setup; run ``scripts/llama-server ensure`` beforehand to keep that out
of the test run.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from tests.helpers.tinymodel import write_tiny_llama

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
SCRIPT: Final = REPO_ROOT / "scripts" / "llama-server"
MODEL_ALIAS: Final = "tiny-llama"
SKIP_ENV: Final = "SIDECAR_SKIP_LLAMA"

BUILD_TIMEOUT_S: Final = 3600.0
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 10.0
# Item timeouts for tests using a server: generous only while a build is due.
TEST_TIMEOUT_S: Final = 120.0
_POLL_INTERVAL_S: Final = 0.05
_LOG_TAIL_LINES: Final = 40
_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
_PR_SET_PDEATHSIG: Final = 1
# Loopback only: never route a health check through an HTTP(S)_PROXY.
_LOOPBACK: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class LlamaStartError(RuntimeError):
    """A llama-server could not be built, found or brought to health."""


@dataclass(frozen=True)
class LlamaServer:
    """One running llama-server; ``url`` has no trailing slash."""

    url: str
    port: int
    model_path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    model: str = MODEL_ALIAS

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last lines of the server's combined stdout and stderr."""
        return _tail(self.log_path, lines)


def skip_requested() -> bool:
    """Whether ``SIDECAR_SKIP_LLAMA=1`` asks to skip real-server tests."""
    return os.environ.get(SKIP_ENV) == "1"


def installed_binary() -> Path | None:
    """The installed binary's path, or None if the wheel is not installed."""
    done = subprocess.run(
        [str(SCRIPT), "path"], capture_output=True, timeout=60, check=False
    )
    path = done.stdout.decode().strip()
    return Path(path) if done.returncode == 0 and path else None


def llama_timeout() -> pytest.MarkDecorator:
    """A timeout mark that leaves room for the one-time build when it is due."""
    if skip_requested() or installed_binary() is not None:
        return pytest.mark.timeout(TEST_TIMEOUT_S)
    return pytest.mark.timeout(BUILD_TIMEOUT_S + TEST_TIMEOUT_S)


def ensure_binary() -> Path:
    """Build (if needed) and install llama-server; return the binary's path."""
    found = installed_binary()
    if found is not None:
        return found
    # stderr is left to the terminal: the build prints its progress there.
    done = subprocess.run(
        [str(SCRIPT), "ensure"],
        stdout=subprocess.PIPE,
        timeout=BUILD_TIMEOUT_S,
        check=False,
    )
    path = done.stdout.decode().strip()
    if done.returncode != 0 or not path:
        raise LlamaStartError(f"scripts/llama-server ensure failed ({done.returncode})")
    return Path(path)


def server_args(
    binary: Path, model_path: Path, *, ctx: int, parallel: int, threads: int
) -> list[str]:
    """The command line for one test server."""
    # --port 0: the server binds a free port and logs it, so no port race.
    # --no-warmup: a warm-up decode only costs time on a model this small.
    return [
        str(binary),
        *("-m", str(model_path), "--alias", MODEL_ALIAS),
        *("--host", "127.0.0.1", "--port", "0"),
        *("-c", str(ctx), "-np", str(parallel), "-t", str(threads)),
        *("--metrics", "--slots", "--no-warmup", "--no-webui"),
    ]


def launch(
    binary: Path,
    model_path: Path,
    log_path: Path,
    *,
    ctx: int = 2048,
    parallel: int = 2,
    threads: int = 1,
    extra_args: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """Start one server without waiting for it; its output goes to ``log_path``."""
    argv = server_args(binary, model_path, ctx=ctx, parallel=parallel, threads=threads)
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [*argv, *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


def wait_ready(
    proc: subprocess.Popen[bytes],
    model_path: Path,
    log_path: Path,
    *,
    timeout_s: float = START_TIMEOUT_S,
) -> LlamaServer:
    """Wait until the server logs its port and ``/health`` answers 200."""
    deadline = time.monotonic() + timeout_s
    port = _wait_for_port(proc, log_path, deadline)
    url = f"http://127.0.0.1:{port}"
    while not _healthy(url):
        _check_alive(proc, log_path, deadline)
        time.sleep(_POLL_INTERVAL_S)
    return LlamaServer(
        url=url, port=port, model_path=model_path, proc=proc, log_path=log_path
    )


def stop(proc: subprocess.Popen[bytes], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process by its PID, then SIGKILL it if it outlives the wait."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout_s)


@dataclass
class LlamaReplicas:
    """Starts servers on demand and stops every one of them at ``close()``."""

    binary: Path
    model_path: Path
    log_dir: Path
    started: list[LlamaServer] = field(default_factory=list)

    def __call__(
        self, n: int, *, parallel: int = 2, threads: int = 1
    ) -> list[LlamaServer]:
        """Start ``n`` servers at once and return them when all are healthy."""
        first = len(self.started)
        logs = [self.log_dir / f"llama-{first + i}.log" for i in range(n)]
        procs = [
            launch(
                self.binary, self.model_path, log, parallel=parallel, threads=threads
            )
            for log in logs
        ]
        try:
            servers = [
                wait_ready(p, self.model_path, log)
                for p, log in zip(procs, logs, strict=True)
            ]
        except BaseException:
            for proc in procs:
                stop(proc)
            raise
        self.started.extend(servers)
        return servers

    def stop(self, server: LlamaServer) -> None:
        """Stop one replica early (a test taking an upstream away)."""
        stop(server.proc)

    def close(self) -> None:
        """Stop every server this factory started."""
        for server in self.started:
            stop(server.proc)
        self.started.clear()


@pytest.fixture(scope="session")
def llama_binary() -> Path:
    """The installed llama-server, built first on a fresh machine."""
    if skip_requested():
        pytest.skip(f"{SKIP_ENV}=1: real llama-server tests skipped")
    try:
        return ensure_binary()
    except (LlamaStartError, subprocess.TimeoutExpired) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weights model, written once per session."""
    # Trained context matches the server's -c so llama.cpp warns of nothing.
    path = tmp_path_factory.mktemp("llama-model") / "tiny-llama.gguf"
    return write_tiny_llama(path, n_ctx=2048)


@pytest.fixture(scope="session")
def llama_server(
    llama_binary: Path, llama_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """One llama-server for the whole session: 2 slots, 2048 tokens, 1 thread."""
    log_path = tmp_path_factory.mktemp("llama-server") / "llama-server.log"
    proc = launch(llama_binary, llama_model, log_path)
    try:
        server = wait_ready(proc, llama_model, log_path)
    except LlamaStartError as exc:
        stop(proc)
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def llama_replicas(
    llama_binary: Path, llama_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaReplicas]:
    """A factory: ``llama_replicas(3)`` starts three more servers."""
    factory = LlamaReplicas(
        llama_binary, llama_model, tmp_path_factory.mktemp("llama-replicas")
    )
    try:
        yield factory
    finally:
        factory.close()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: an orphaned server would keep
    # a core busy on a shared machine long after the test run died.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for_port(
    proc: subprocess.Popen[bytes], log_path: Path, deadline: float
) -> int:
    # The port line is logged once the model is loaded and the socket bound.
    while True:
        match = _LISTENING.search(log_path.read_bytes())
        if match:
            return int(match.group(1))
        _check_alive(proc, log_path, deadline)
        time.sleep(_POLL_INTERVAL_S)


def _check_alive(
    proc: subprocess.Popen[bytes], log_path: Path, deadline: float
) -> None:
    code = proc.poll()
    if code is not None:
        raise LlamaStartError(
            f"llama-server exited with {code} before it was ready; log tail:\n"
            + _tail(log_path, _LOG_TAIL_LINES)
        )
    if time.monotonic() > deadline:
        stop(proc)
        raise LlamaStartError(
            "llama-server not healthy in time; log tail:\n"
            + _tail(log_path, _LOG_TAIL_LINES)
        )


def _healthy(url: str) -> bool:
    try:
        with _LOOPBACK.open(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        # 503 while the model loads; the error holds a response to close.
        exc.close()
        return False
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_bytes().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
