"""Run the real ``sidecar serve`` as a child process, for lifecycle tests.

``SidecarProcess`` starts ``python -m sidecar serve`` with ephemeral ports,
waits for the ``sidecar.listening`` line on stderr and parses the bound
addresses from it; it keeps reading stderr so the child never blocks on a
full pipe, and stops the child by its PID.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

_LISTENING = re.compile(r"sidecar\.listening .*data=(\S+):(\d+) admin=(\S+):(\d+)")


class SidecarProcess:
    def __init__(
        self,
        upstream: str,
        data_dir: str | os.PathLike[str],
        *,
        policy: str | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = [
            sys.executable, "-m", "sidecar", "serve",
            "--upstream", upstream,
            "--listen", "127.0.0.1:0",
            "--admin-listen", "127.0.0.1:0",
            "--data-dir", str(data_dir),
        ]
        if policy:
            self.args += ["--policy", policy]
        self.args += extra_args or []
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("SIDECAR_POLICY", str(Path(__file__).resolve().parents[2] / "policies" / "default.yaml"))
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.data_port = 0
        self.admin_port = 0
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.data_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            m = _LISTENING.search(line)
            if m:
                self.data_port = int(m.group(2))
                self.admin_port = int(m.group(4))
                self._ready.set()
        self.proc.stderr.close()
        self._ready.set()

    def start(self, timeout_s: float = 20.0) -> SidecarProcess:
        self.proc = subprocess.Popen(
            self.args, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, text=True, env=self.env,
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()
        if not self._ready.wait(timeout_s) or not self.data_port:
            self.stop()
            raise RuntimeError("sidecar did not start:\n" + "\n".join(self.lines[-30:]))
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout_s)
        self._pump_thread.join(5)
        return rc

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._pump_thread.join(5)

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        time.sleep(0)
        return "\n".join(self.lines)
