"""Start-up time of the feedback app's commands: ``rlhfkit feedback --help``, ``rlhfkit serve --help``,
``rlhfkit export --help``, and ``rlhfkit serve`` until its login page answers.

Each is run ``--runs`` times in a fresh process (the median and the range printed); the target is 1.5 s
for each (issue 25: they took about 9 s while the command line imported torch and transformers). ``serve``
is timed on a database created beforehand (the first start also runs the migrations), from the process's
launch to the first ``200`` of ``GET /login`` on 127.0.0.1. The CPU seconds the process used (user +
system; for ``serve``, until it answered) are printed too: on a machine busy with other work the wall time
grows, the CPU time hardly does.

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


def time_command(args: list[str]) -> tuple[float, float]:
    """Seconds from launch to exit of ``args`` (which must succeed), and the CPU seconds it used."""
    start = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, args)
    return wall, usage.ru_utime + usage.ru_stime


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux's /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def time_serve(db: Path, *, timeout_s: float = 60.0) -> tuple[float, float]:
    """Seconds from launching ``rlhfkit serve`` to the first 200 of its login page, and the CPU seconds the
    server had used by then; the server is then stopped."""
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
                        return time.perf_counter() - start, _cpu_seconds(server.pid)
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.01)
        raise TimeoutError(f"rlhfkit serve did not answer within {timeout_s} s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure(runs: int) -> dict[str, list[tuple[float, float]]]:
    """Every command's (wall, CPU) seconds, ``runs`` of each, interleaved (so that a busy moment does not hit
    one only)."""
    times: dict[str, list[tuple[float, float]]] = {" ".join(("rlhfkit", *args)): [] for args in HELP_COMMANDS}
    times["rlhfkit serve (until /login answers)"] = []
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "feedback.db"
        time_serve(db)  # creates the database (migrations) and warms the file cache: not counted
        for _ in range(runs):
            for args in HELP_COMMANDS:
                times[" ".join(("rlhfkit", *args))].append(time_command([*rlhfkit_command(), *args]))
            times["rlhfkit serve (until /login answers)"].append(time_serve(db))
    return times


def summary(times: dict[str, list[tuple[float, float]]]) -> list[dict]:
    rows = []
    for command, runs in times.items():
        wall = [seconds for seconds, _ in runs]
        rows.append({"command": command, "median_s": round(statistics.median(wall), 3), "min_s": round(min(wall), 3),
                     "max_s": round(max(wall), 3), "median_cpu_s": round(statistics.median(cpu for _, cpu in runs), 3),
                     "runs": len(runs), "target_s": TARGET_S, "met": statistics.median(wall) < TARGET_S})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="Fresh processes per command (the median is shown).")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args(argv)
    rows = summary(measure(args.runs))
    width = max(len(row["command"]) for row in rows)
    print(f"{'command':<{width}}  median s  min-max s  CPU s   target {TARGET_S} s   ({args.runs} runs, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f})")
    for row in rows:
        print(f"{row['command']:<{width}}  {row['median_s']:8.2f}  {row['min_s']:.2f}-{row['max_s']:.2f}  "
              f"{row['median_cpu_s']:5.2f}   {'met' if row['met'] else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if all(row["met"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
