"""Load and crash tests of the running feedback app (``rlhfkit serve`` on 127.0.0.1), with the load driver
of ``benchmarks/bench_feedback.py``: concurrent labelers, no lost, duplicated or corrupted rows, no 5xx."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from feedback_server import FeedbackServer
from postgres_server import PostgresServer, why_unavailable

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_feedback.py"
_spec = importlib.util.spec_from_file_location("bench_feedback", BENCH)
bench = sys.modules["bench_feedback"] = importlib.util.module_from_spec(_spec)  # dataclasses need it registered
_spec.loader.exec_module(bench)


@pytest.mark.slow
def test_20_labelers_x_100_submissions_against_the_running_server(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    bench.seed_database(url, 20, 100)
    with FeedbackServer(url, log=tmp_path / "server.log") as server:
        result = bench.run_load(server.url, 20, 100)
    figures = result.summary()
    print(json.dumps(figures))  # the throughput and p95 latency, shown with pytest -s
    assert bench.integrity_problems(url, result) == []
    assert figures["answers"] == 2000 and set(figures["statuses"]) == {"200"}


def test_load_on_postgresql(tmp_path):
    if (reason := why_unavailable()) is not None:
        pytest.skip(reason)
    with PostgresServer() as postgres:
        url = postgres.create_database()
        bench.seed_database(url, 6, 20)
        with FeedbackServer(url, log=tmp_path / "server.log") as server:
            result = bench.run_load(server.url, 6, 20)
        assert bench.integrity_problems(url, result) == []


def test_integrity_check_catches_lost_duplicated_and_corrupted_answers(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    bench.seed_database(url, 2, 3)
    with FeedbackServer(url, log=tmp_path / "server.log") as server:
        result = bench.run_load(server.url, 2, 3)
    assert bench.integrity_problems(url, result) == []
    key, payload = next(iter(result.sent.items()))
    corrupted = bench.LoadResult(2, 3, sent={**result.sent, key: {**payload, "extra": 1}}, statuses={200: 1})
    assert any("differs from what was sent" in problem for problem in bench.integrity_problems(url, corrupted))
    lost = bench.LoadResult(2, 3, sent={**result.sent, ("labeler00", 10_000): payload}, statuses={503: 1})
    problems = bench.integrity_problems(url, lost)
    assert "HTTP 503 x 1" in problems and any("is missing" in problem for problem in problems)
    unacknowledged = bench.LoadResult(2, 3, sent=dict(list(result.sent.items())[1:]))
    assert any("never acknowledged" in problem for problem in bench.integrity_problems(url, unacknowledged))


def test_a_killed_server_loses_no_acknowledged_answer_and_labelers_resume(tmp_path):
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    bench.seed_database(url, 6, 50)
    server = FeedbackServer(url, log=tmp_path / "server.log").start()
    results = []
    load = threading.Thread(target=lambda: results.append(bench.run_load(server.url, 6, 50, timeout_s=120)))
    load.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (results or _answers(url) >= 30):
        time.sleep(0.05)
    os.kill(server.process.pid, signal.SIGKILL)  # mid-load: no shutdown, no flush
    load.join(timeout=180)
    [result] = results
    assert result.errors and len(result.sent) < 300, "the server was killed before the load finished"
    assert bench.integrity_problems(url, result, crashed=True) == []
    assert server.stop() == -signal.SIGKILL

    with FeedbackServer(url, log=tmp_path / "server.log") as restarted, httpx.Client(base_url=restarted.url) as client:
        login = client.post("/api/login", json={"username": "labeler00", "password": bench.PASSWORD})
        headers = {"X-CSRF-Token": login.json()["csrf_token"]}
        item = client.get("/api/next").json()["item"]
        answer = client.post(f"/api/items/{item['id']}/answer", json=bench.answer_for(item, "labeler00"),
                             headers=headers)
        assert answer.status_code == 200


def _answers(url: str) -> int:
    from rlhfkit.feedback.store import Store

    store = Store(url, migrate=False)
    try:
        return sum(row["answers"] for row in store.progress())
    finally:
        store.close()
