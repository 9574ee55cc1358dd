"""Load on the feedback app: N concurrent labelers x M submissions each against ``rlhfkit serve`` on 127.0.0.1.

Each labeler logs in through the JSON API and loops: ask for the next item (``GET /api/next``), answer it
(``POST /api/items/{id}/answer``: a demonstration, a rating + flags + ranking of 4 outputs, or an A/B
verdict), and every tenth answer is sent twice, as a double-clicking labeler would. Items are imported
with 2 replicas, so two labelers race for every item. Afterwards the database is checked: exactly N x M
answers, none duplicated, none beyond an item's replicas, each one byte-for-byte the payload its labeler
sent, and no 5xx response. Prints throughput and latency percentiles (JSON with ``--json``).

    python benchmarks/bench_feedback.py                       # 20 labelers x 100 submissions, SQLite
    python benchmarks/bench_feedback.py --labelers 5 --submissions 20 --db postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPLICAS = 2
PASSWORD = "load test password"
KINDS = ("ranking", "ab", "demonstration")


@dataclass
class LoadResult:
    labelers: int
    submissions: int  # per labeler
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # every answer POST (double submits included)
    statuses: dict[int, int] = field(default_factory=dict)
    sent: dict[tuple[str, int], dict] = field(default_factory=dict)  # (labeler, item id) -> payload
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        latencies = sorted(self.latencies_s)

        def percentile(q: float) -> float:
            return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")

        return {"labelers": self.labelers, "submissions_per_labeler": self.submissions,
                "answers": len(self.sent), "seconds": round(self.seconds, 2),
                "answers_per_s": round(len(self.sent) / self.seconds, 1) if self.seconds else None,
                "answer_latency_ms": {"p50": round(1000 * percentile(0.5), 1), "p95": round(1000 * percentile(0.95), 1),
                                      "max": round(1000 * latencies[-1], 1) if latencies else None,
                                      "mean": round(1000 * statistics.fmean(latencies), 1) if latencies else None},
                "statuses": {str(code): count for code, count in sorted(self.statuses.items())},
                "errors": self.errors[:10]}


def labeler_names(labelers: int) -> list[str]:
    return [f"labeler{number:02d}" for number in range(labelers)]


def seed_database(url: str, labelers: int, submissions: int) -> None:
    """Accounts, and items (2 replicas each) for a quarter more than ``labelers x submissions`` answers.

    The spare items keep every labeler's queue from running dry near the end, when the items still open
    would otherwise be ones that labeler has already answered.
    """
    from rlhfkit.feedback.security import hash_password
    from rlhfkit.feedback.store import Store

    store = Store(url)
    try:
        password_hash = hash_password(PASSWORD)
        for name in labeler_names(labelers):
            store.create_user(name, password_hash)
        items = (labelers * submissions * 5 // 4) // REPLICAS + labelers
        per_kind = [items // 3, items // 3, items - 2 * (items // 3)]
        store.import_samples([{"prompt": f"Question {n}?", "completions": [f"answer {n}.{k}" for k in range(4)]}
                              for n in range(per_kind[0])], replicas=REPLICAS)
        store.import_pairs([{"prompt": f"Pair {n}", "completions": [f"left {n}", f"right {n}"]}
                            for n in range(per_kind[1])], replicas=REPLICAS)
        store.import_prompts([{"prompt": f"Write about {n}"} for n in range(per_kind[2])], replicas=REPLICAS)
    finally:
        store.close()


def answer_for(item: dict, labeler: str) -> dict:
    """A valid answer that differs per labeler and item, so a corrupted or swapped row is caught."""
    seed = sum(map(ord, labeler)) + item["id"]
    if item["kind"] == "demonstration":
        return {"completion": f"{labeler} on item {item['id']}: ünïcode ✓ \"quotes\" <tags>"}
    if item["kind"] == "ab":
        return {"verdict": ("a", "b", "tie")[seed % 3]}
    k = len(item["completions"])
    order = sorted(range(k), key=lambda index: (index * 7 + seed) % k)
    return {"ratings": [1 + (seed + index) % 7 for index in range(k)],
            "flags": [["harmful"] if (seed + index) % 5 == 0 else [] for index in range(k)],
            "ranking": [[order[0], order[1]], *[[index] for index in order[2:]]]}


def _labeler(base_url: str, name: str, submissions: int, result: LoadResult, lock: threading.Lock,
             start: threading.Barrier, deadline: float) -> None:
    with httpx.Client(base_url=base_url, timeout=120.0) as client:

        def call(method: str, path: str, **kwargs) -> httpx.Response:
            response = client.request(method, path, **kwargs)
            with lock:
                result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1
            return response

        login = call("POST", "/api/login", json={"username": name, "password": PASSWORD})
        login.raise_for_status()
        headers = {"X-CSRF-Token": login.json()["csrf_token"]}
        start.wait()
        done = 0
        while done < submissions and time.monotonic() < deadline:
            response = call("GET", "/api/next")
            if response.status_code != 200:
                raise RuntimeError(f"{name}: GET /api/next answered {response.status_code}: {response.text[:200]}")
            item = response.json()["item"]
            if item is None:
                raise RuntimeError(f"{name}: the queue ran dry after {done} answers")
            payload = answer_for(item, name)
            for _ in range(2 if done % 10 == 9 else 1):  # every tenth answer is double-submitted
                began = time.perf_counter()
                response = call("POST", f"/api/items/{item['id']}/answer", json=payload, headers=headers)
                elapsed = time.perf_counter() - began
                if response.status_code != 200:
                    raise RuntimeError(f"{name}: answer answered {response.status_code}: {response.text[:200]}")
                with lock:
                    result.latencies_s.append(elapsed)
            with lock:
                result.sent[(name, item["id"])] = payload
            done += 1


def run_load(base_url: str, labelers: int, submissions: int, *, timeout_s: float = 600.0) -> LoadResult:
    """Run the labelers in threads (bounded by ``timeout_s``) and collect what they sent and saw."""
    result = LoadResult(labelers, submissions)
    lock = threading.Lock()
    start = threading.Barrier(labelers + 1)
    deadline = time.monotonic() + timeout_s

    def worker(name: str) -> None:
        try:
            _labeler(base_url, name, submissions, result, lock, start, deadline)
        except Exception as error:  # reported, never silent
            with lock:
                result.errors.append(f"{type(error).__name__}: {error}")
            start.abort()

    threads = [threading.Thread(target=worker, args=(name,)) for name in labeler_names(labelers)]
    for thread in threads:
        thread.start()
    try:
        start.wait()  # every labeler has logged in: time the labeling only
    except threading.BrokenBarrierError:
        pass
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    result.seconds = time.perf_counter() - began
    return result


def integrity_problems(url: str, result: LoadResult, *, crashed: bool = False) -> list[str]:
    """What is wrong in the database after the load: lost, duplicated, over-assigned or corrupted answers.

    ``crashed``: the server was killed during the load, so labelers stopped early and an answer may be
    committed without its response having reached the labeler; errors and missing totals are expected then.
    """
    from rlhfkit.feedback.store import Store

    problems = [f"HTTP {code} x {count}" for code, count in result.statuses.items() if code >= 500]
    if not crashed:
        problems += result.errors
    store = Store(url, migrate=False)
    try:
        names = {user.id: user.username for user in store.users()}
        answers = store.answers()
        per_item: dict[int, int] = {}
        seen: set[tuple[str, int]] = set()
        for answer in answers:
            key = (names[answer.user_id], answer.item_id)
            if key in seen:
                problems.append(f"duplicated answer {key}")
            seen.add(key)
            per_item[answer.item_id] = per_item.get(answer.item_id, 0) + 1
            sent = result.sent.get(key)
            if sent is None and not crashed:
                problems.append(f"answer {key} in the database was never acknowledged")
            elif sent is not None and _normalised(store.item(answer.item_id).kind, sent) != answer.payload:
                problems.append(f"answer {key} differs from what was sent: {answer.payload} != {sent}")
        lost = set(result.sent) - seen
        problems += [f"acknowledged answer {key} is missing" for key in sorted(lost)[:10]]
        problems += [f"item {item} has {count} answers for {REPLICAS} replicas"
                     for item, count in per_item.items() if count > REPLICAS]
        expected = result.labelers * result.submissions
        if len(answers) != expected and not crashed:
            problems.append(f"{len(answers)} answers in the database, expected {expected}")
    finally:
        store.close()
    return problems


def _normalised(kind: str, payload: dict) -> dict:
    """The payload as the store keeps it (rankings as sorted tie groups)."""
    if kind != "ranking":
        return payload
    return {**payload, "ranking": [sorted(group) for group in payload["ranking"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labelers", type=int, default=20)
    parser.add_argument("--submissions", type=int, default=100, help="answers per labeler")
    parser.add_argument("--db", help="a database URL to use (emptied by nobody: give a fresh one); "
                                     "default: a new SQLite file in a temporary directory")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from feedback_server import FeedbackServer

    with tempfile.TemporaryDirectory(prefix="rlhfkit-load-") as folder:
        url = args.db or f"sqlite:///{Path(folder) / 'feedback.db'}"
        seed_database(url, args.labelers, args.submissions)
        with FeedbackServer(url, log=Path(folder) / "server.log") as server:
            result = run_load(server.url, args.labelers, args.submissions)
        figures = result.summary()
        figures["database"] = url.split("://")[0]
        figures["integrity_problems"] = integrity_problems(url, result)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if figures["integrity_problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
