"""Run the real ``rlhfkit serve`` in a subprocess on 127.0.0.1 for browser and load tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from postgres_server import free_port


class FeedbackServer:
    """``python -m rlhfkit serve --db DB --port PORT`` until :meth:`stop` (a context manager)."""

    def __init__(self, db: Path | str, *, log: Path, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, secret_key: str | None = "test secret") -> None:
        self.db = str(db)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.extra_args = extra_args
        self.env = env or {}  # more environment variables (the app's RLHFKIT_* settings)
        self.secret_key = secret_key  # None: the server's own (its session key file)
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60.0) -> FeedbackServer:
        env = {key: value for key, value in os.environ.items() if not key.startswith("RLHFKIT_SECRET_KEY")}
        if self.secret_key is not None:
            env["RLHFKIT_SECRET_KEY"] = self.secret_key
        env.update(self.env)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "rlhfkit", "serve", "--db", self.db, "--port", str(self.port), *self.extra_args],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rlhfkit serve exited with {self.process.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/login", timeout=5) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.HTTPError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"rlhfkit serve did not answer within {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL); returns its exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> FeedbackServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
