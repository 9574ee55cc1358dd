"""A throwaway Label Studio server for tests: its own data directory, listening on 127.0.0.1 only.

Label Studio is a server beside rlhfkit, not a library of it (its dependencies would move rlhfkit's: numpy, pyarrow),
so it lives in its own virtual environment: ``make labelstudio`` makes ``.venv-labelstudio``; ``RLHFKIT_LABEL_STUDIO``
names another ``label-studio`` executable, and one on PATH is used too. The server is started with a known admin
and API token (Label Studio's legacy token, enabled for it) and stopped, with its directory, on exit.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import httpx
from postgres_server import free_port

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300  # first start: database migrations (about a minute on 2 cores)


def find_label_studio() -> str | None:
    """The ``label-studio`` executable to run, or None."""
    for candidate in (os.environ.get("RLHFKIT_LABEL_STUDIO"), ROOT / ".venv-labelstudio" / "bin" / "label-studio",
                      shutil.which("label-studio")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def why_unavailable() -> str | None:
    if find_label_studio() is None:
        return ("no label-studio executable: `make labelstudio` installs Label Studio in .venv-labelstudio "
                "(or set RLHFKIT_LABEL_STUDIO)")
    return None


class LabelStudioServer:
    """``with LabelStudioServer() as server: server.api.post("/api/projects", json=...)``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = secrets.token_hex(20)
        self.directory = Path(tempfile.mkdtemp(prefix="rlhfkit-labelstudio-"))
        self.process: subprocess.Popen | None = None
        self.api: httpx.Client | None = None

    def __enter__(self) -> LabelStudioServer:
        env = {**os.environ, "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true", "SENTRY_DSN": "",
               "FRONTEND_SENTRY_DSN": "", "COLLECT_ANALYTICS": "false"}
        self.log = (self.directory / "server.log").open("w")
        self.process = subprocess.Popen(
            [find_label_studio(), "start", "--no-browser", "--port", str(self.port), "--host", self.url,
             "--internal-host", "127.0.0.1", "--data-dir", str(self.directory / "data"),
             "--username", "admin@example.com", "--password", secrets.token_hex(12), "--user-token", self.token,
             "--enable-legacy-api-token"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.directory,
            start_new_session=True)  # its own process group: the web server's workers stop with it
        self.api = httpx.Client(base_url=self.url, headers={"Authorization": f"Token {self.token}"}, timeout=60)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"label-studio exited with {self.process.returncode}")
            try:
                if self.api.get("/api/projects").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(2)
        self._fail(f"label-studio did not answer within {START_TIMEOUT_S} s")

    def _fail(self, what: str) -> NoReturn:
        """Stop what was started, then raise with the end of the server's log (read before its directory goes)."""
        tail = (self.directory / "server.log").read_text(errors="replace")[-3000:]
        self.__exit__(None, None, None)
        raise RuntimeError(f"{what}:\n{tail}")

    def __exit__(self, *exc) -> None:
        if self.api is not None:
            self.api.close()
        if self.process is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                    self.process.wait(timeout=20)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)
