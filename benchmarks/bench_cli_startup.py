"""Start-up time of the feedback app's commands: ``rlhfkit feedback --help``, ``rlhfkit serve --help``,
``rlhfkit export --help``, and ``rlhfkit serve`` until its login page answers.

Each is run ``--runs`` times in a fresh process (the median and the range printed); the target is 1.5 s
for each (issue 25: they took about 9 s while the command line imported torch and transformers). ``serve``
is timed on a database created beforehand (the first start also runs the migrations), from the process's
launch to the first ``200`` of ``GET /login`` on 127.0.0.1.

    python benchmarks/bench_cli_startup.py                  # 5 runs of each
    python benchmarks/bench_cli_startup.py --runs 9 --json startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

TARGET_S = 1.5
HELP_COMMANDS = (("feedback", "--help"), ("serve", "--help"), ("export", "--help"))


def rlhfkit_command() -> list[str]:
    """The ``rlhfkit`` script beside this Python (as a user runs it), else ``python -m rlhfkit``."""
    script = Path(sys.executable).parent / "rlhfkit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rlhfkit"]


def time_command(args: list[str]) -> float:
    """Seconds from launch to exit of ``args`` (which must succeed)."""
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def time_serve(db: Path, *, timeout_s: float = 60.0) -> float:
    """Seconds from launching ``rlhfkit serve`` to the first 200 of its login page; the server is then stopped."""
    port = _free_port()
    env = {**os.environ, "RLHFKIT_SECRET_KEY": "benchmark key"}
    start = time.perf_counter()
    server = subprocess.Popen([*rlhfkit_command(), "serve", "--db", f"sqlite:///{db}", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while time.perf_counter() - start < timeout_s:
            if server.poll() is not None:
                raise RuntimeError(f"rlhfkit serve exited with {server.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5) as response:
                    if response.status == 200:
                        return time.perf_counter() - start
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.01)
        raise TimeoutError(f"rlhfkit serve did not answer within {timeout_s} s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure(runs: int) -> dict[str, list[float]]:
    """Every command's times, ``runs`` of each, interleaved (so that a busy moment does not hit one only)."""
    times: dict[str, list[float]] = {" ".join(("rlhfkit", *args)): [] for args in HELP_COMMANDS}
    times["rlhfkit serve (until /login answers)"] = []
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "feedback.db"
        time_serve(db)  # creates the database (migrations) and warms the file cache: not counted
        for _ in range(runs):
            for args in HELP_COMMANDS:
                times[" ".join(("rlhfkit", *args))].append(time_command([*rlhfkit_command(), *args]))
            times["rlhfkit serve (until /login answers)"].append(time_serve(db))
    return times


def summary(times: dict[str, list[float]]) -> list[dict]:
    return [{"command": command, "median_s": round(statistics.median(values), 3), "min_s": round(min(values), 3),
             "max_s": round(max(values), 3), "runs": len(values), "target_s": TARGET_S,
             "met": statistics.median(values) < TARGET_S} for command, values in times.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="Fresh processes per command (the median is shown).")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args(argv)
    rows = summary(measure(args.runs))
    width = max(len(row["command"]) for row in rows)
    print(f"{'command':<{width}}  median s  min-max s    target {TARGET_S} s   ({args.runs} runs, {os.cpu_count()} "
          f"CPUs, load {os.getloadavg()[0]:.2f})")
    for row in rows:
        print(f"{row['command']:<{width}}  {row['median_s']:8.2f}  {row['min_s']:.2f}-{row['max_s']:.2f}"
              f"    {'met' if row['met'] else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if all(row["met"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
