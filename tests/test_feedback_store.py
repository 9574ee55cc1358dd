"""The feedback store on SQLite and on a real PostgreSQL server (skipped when PostgreSQL is not installed)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from postgres_server import PostgresServer, why_unavailable

from rlhfkit.data.readers import iter_jsonl, read_records, write_jsonl
from rlhfkit.data.records import DataError, DemonstrationRecord, PreferenceRecord, RankingRecord
from rlhfkit.evaluate.human import human_win_rates
from rlhfkit.feedback.store import (
    Answer,
    AnswerConflict,
    Base,
    Item,
    NotAssigned,
    Store,
    StoreError,
    User,
    contradictions,
    shown_order,
    upgrade_database,
)

RANKING = {"ratings": [6, 3, 1], "flags": [[], ["made_up_facts"], ["harmful", "fails_instruction"]],
           "ranking": [[0], [1], [2]]}


@pytest.fixture(scope="session")
def postgres():
    reason = why_unavailable()
    if reason:
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'feedback.db'}"
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def store(url):
    store = Store(url)
    yield store
    store.close()


@pytest.fixture
def users(store):
    return [store.create_user(name, f"hash-{name}") for name in ("ann", "bob", "cy")]


def _one(store: Store, user: User, kind: str | None = None) -> Item:
    item = store.next_item(user.id, kind)
    assert item is not None
    return item


# ---------------------------------------------------------------------------------------- schema


def test_migrations_build_exactly_the_models(store):
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        assert connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0004"


def test_reopening_keeps_the_data_and_migrate_false_skips_alembic(url):
    first = Store(url)
    first.create_user("ann", "h")
    first.close()
    again = Store(url)
    assert [user.username for user in again.users()] == ["ann"]
    again.close()
    unmigrated = Store(url.replace("feedback.db", "other.db"), migrate=False) if url.startswith("sqlite") else None
    if unmigrated is not None:
        with unmigrated.engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM sqlite_master").scalar() == 0
        unmigrated.close()


def test_sqlite_connections_use_wal_foreign_keys_and_a_busy_timeout(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    with store.engine.connect() as connection:
        pragma = connection.exec_driver_sql
        assert pragma("PRAGMA journal_mode").scalar() == "wal"
        assert pragma("PRAGMA foreign_keys").scalar() == 1
        assert pragma("PRAGMA busy_timeout").scalar() >= 1000
    store.close()


def test_in_memory_sqlite_works_within_one_store():
    store = Store("sqlite://")
    user = store.create_user("ann", "h")
    store.import_prompts([{"prompt": "hi"}])
    assert store.next_item(user.id).prompt == "hi"
    store.close()


# ----------------------------------------------------------------------------------------- users


def test_users_are_created_and_found(store):
    ann = store.create_user("ann", "hash-a", "admin")
    bob = store.create_user("bob", "hash-b")
    assert ann == User(ann.id, "ann", "admin", "hash-a", True)
    assert bob.role == "labeler"
    assert store.user(bob.id) == bob
    assert store.user_by_name("ann") == ann
    assert store.user(10_000) is None and store.user_by_name("nobody") is None
    assert store.users() == [ann, bob]


@pytest.mark.parametrize(("username", "role", "field"), [
    ("ann", "labeler", "username"),  # taken
    ("", "labeler", "username"),
    (" pad", "labeler", "username"),
    ("x" * 65, "labeler", "username"),
    ("new", "root", "role"),
])
def test_bad_users_are_refused_naming_the_field(store, username, role, field):
    store.create_user("ann", "h")
    with pytest.raises(StoreError) as caught:
        store.create_user(username, "h", role)
    assert caught.value.field == field and f"'{field}'" in str(caught.value)
    assert len(store.users()) == 1


# ---------------------------------------------------------------------------------------- import


def test_imports_create_items_of_each_kind(store):
    chat = [{"role": "user", "content": "Hi <b>there</b>"}]
    assert store.import_prompts([{"prompt": "Write a poem", "id": 7, "meta": {"topic": "art"}},
                                 {"prompt": chat}], replicas=2) == 2
    assert store.import_samples([{"prompt": "p", "completions": ["a", "b", "c"], "gold": [[1], [0, 2]]}]) == 1
    assert store.import_pairs([{"prompt": "q", "completions": ["x", "y"], "meta": {"models": ["m1", "m2"]}}]) == 1
    default = store.project_by_name("default").id  # items imported without a project go there
    assert store.item(1) == Item(1, "demonstration", "Write a poem", [], 2, {"topic": "art"}, None, default)
    assert store.item(2).prompt == chat
    assert store.item(3) == Item(3, "ranking", "p", ["a", "b", "c"], 1, {}, [[1], [0, 2]], default)
    assert store.item(4) == Item(4, "ab", "q", ["x", "y"], 1, {"models": ["m1", "m2"]}, None, default)
    assert store.item(5) is None


@pytest.mark.parametrize(("method", "bad", "field"), [
    ("import_prompts", {"id": 1}, "prompt"),
    ("import_prompts", {"prompt": "p", "meta": [1]}, "meta"),
    ("import_prompts", {"prompt": [{"role": "robot", "content": "x"}]}, "prompt[0].role"),
    ("import_samples", {"prompt": "p", "completions": ["only one"]}, "completions"),
    ("import_samples", {"prompt": "p", "completions": ["a", " "]}, "completions[1]"),
    ("import_samples", {"prompt": "p", "completions": ["a", "b"], "gold": [[0, 1]]}, "gold"),
    ("import_samples", {"prompt": "p", "completions": ["a", "b"], "gold": [0, 5]}, "gold"),
    ("import_pairs", {"prompt": "p", "completions": ["a", "b", "c"]}, "completions"),
    ("import_pairs", {"prompt": "p"}, "completions"),
])
def test_a_bad_record_names_source_record_and_field_and_writes_nothing(store, method, bad, field):
    good = {"prompt": "fine", "completions": ["a", "b"]}
    with pytest.raises(DataError) as caught:
        getattr(store, method)([good, bad], source="batch.jsonl")
    assert (caught.value.source, caught.value.line, caught.value.field) == ("batch.jsonl", 2, field)
    assert str(caught.value).startswith(f"batch.jsonl, record 2, field '{field}'")
    assert store.progress()[0]["items"] + store.progress()[1]["items"] + store.progress()[2]["items"] == 0


def test_a_non_object_record_and_bad_replicas_are_refused(store):
    with pytest.raises(DataError, match="record 1: expected an object"):
        store.import_prompts(["just text"])
    with pytest.raises(StoreError) as caught:
        store.import_prompts([{"prompt": "p"}], replicas=0)
    assert caught.value.field == "replicas"


# ----------------------------------------------------------------------------------------- queue


def test_next_item_keeps_the_open_assignment_and_filters_by_kind(store, users):
    store.import_prompts([{"prompt": "p1"}, {"prompt": "p2"}])
    store.import_pairs([{"prompt": "q", "completions": ["x", "y"]}])
    ann = users[0]
    first = _one(store, ann)
    assert first.prompt == "p1" and store.next_item(ann.id) == first
    assert _one(store, ann, "ab").kind == "ab"  # a kind filter can open a second assignment
    assert store.next_item(ann.id, "ranking") is None
    store.submit(ann.id, first.id, {"completion": "done"})
    assert _one(store, ann).prompt == "q"  # the open A/B assignment comes before a new item
    with pytest.raises(StoreError) as caught:
        store.next_item(ann.id, "essay")
    assert caught.value.field == "kind"
    with pytest.raises(StoreError) as caught:
        store.next_item(10_000)
    assert caught.value.field == "user_id"


def test_an_item_leaves_the_queue_when_enough_labelers_have_it(store, users):
    ann, bob, cy = users
    store.import_prompts([{"prompt": "p"}], replicas=2)
    item = _one(store, ann)
    assert _one(store, bob) == item
    assert store.next_item(cy.id) is None  # two open assignments already cover the replicas
    store.submit(ann.id, item.id, {"completion": "a"})
    store.submit(bob.id, item.id, {"completion": "b"})
    assert store.next_item(cy.id) is None
    assert store.next_item(ann.id) is None  # answered: never offered again


def test_a_skipped_item_goes_to_someone_else_and_never_back(store, users):
    ann, bob, _ = users
    store.import_prompts([{"prompt": "p"}])
    item = _one(store, ann)
    assert store.next_item(bob.id) is None
    skipped = store.skip(ann.id, item.id, "I do not know the topic")
    assert skipped.skipped and skipped.payload == {"reason": "I do not know the topic"}
    assert store.next_item(ann.id) is None
    assert _one(store, bob) == item
    store.submit(bob.id, item.id, {"completion": "done"})
    demonstration = store.progress()[0]
    assert demonstration == {"kind": "demonstration", "items": 1, "answers_needed": 1, "answers": 1,
                             "skipped": 1, "complete_items": 1}
    assert [record["labeler"] for record in store.export("demonstrations")] == ["bob"]


def test_skip_needs_a_reason_and_an_assignment(store, users):
    ann, bob, _ = users
    store.import_prompts([{"prompt": "p"}])
    item = _one(store, ann)
    for reason in ("  ", "x" * 10_001):
        with pytest.raises(StoreError) as caught:
            store.skip(ann.id, item.id, reason)
        assert caught.value.field == "reason"
    with pytest.raises(NotAssigned):
        store.skip(bob.id, item.id, "not mine")
    assert store.answers() == []


def test_assigned_item_is_only_for_the_assignee(store, users):
    ann, bob, _ = users
    store.import_prompts([{"prompt": "p"}])
    item = _one(store, ann)
    assert store.assigned_item(ann.id, item.id) == item
    with pytest.raises(NotAssigned):
        store.assigned_item(bob.id, item.id)
    with pytest.raises(NotAssigned):
        store.assigned_item(ann.id, 10_000)


# ---------------------------------------------------------------------------------------- submit


def test_submissions_of_each_kind_are_stored_normalised(store, users):
    ann = users[0]
    store.import_prompts([{"prompt": "p"}])
    store.import_samples([{"prompt": "s", "completions": ["a", "b", "c"]}])
    store.import_pairs([{"prompt": "q", "completions": ["x", "y"]}])
    answers = [
        store.submit(ann.id, _one(store, ann).id, {"completion": "written", "extra": 1}),
        store.submit(ann.id, _one(store, ann).id, {**RANKING, "ranking": [2, [1, 0]]}),
        store.submit(ann.id, _one(store, ann).id, {"verdict": "tie"}),
    ]
    assert [answer.payload for answer in answers] == [
        {"completion": "written"},
        {"ratings": [6, 3, 1], "flags": RANKING["flags"], "ranking": [[2], [0, 1]]},
        {"verdict": "tie"},
    ]
    assert all(isinstance(answer, Answer) and not answer.skipped and answer.created_at.tzinfo for answer in answers)
    assert store.answers() == answers
    assert store.answers("ab") == answers[2:]


@pytest.mark.parametrize(("kind", "payload", "field"), [
    ("demonstration", {"completion": " "}, "completion"),
    ("demonstration", {"text": "x"}, "completion"),
    ("demonstration", {"completion": "x" * 100_001}, "completion"),
    ("demonstration", ["completion"], "payload"),
    ("ab", {"verdict": "left"}, "verdict"),
    ("ranking", {**RANKING, "ratings": [6, 3]}, "ratings"),
    ("ranking", {**RANKING, "ratings": [6, 8, 1]}, "ratings[1]"),
    ("ranking", {**RANKING, "ratings": [6, True, 1]}, "ratings[1]"),
    ("ranking", {**RANKING, "ratings": list(range(10_000))}, "ratings"),
    ("ranking", {**RANKING, "flags": None}, "flags"),
    ("ranking", {**RANKING, "flags": [["rude"], [], []]}, "flags[0]"),
    ("ranking", {**RANKING, "flags": [[], ["harmful", "harmful"], []]}, "flags[1]"),
    ("ranking", {**RANKING, "ranking": [[0], [1]]}, "ranking"),
    ("ranking", {**RANKING, "ranking": [[0], [1], [1, 2]]}, "ranking"),
    ("ranking", {**RANKING, "ranking": [[0, 1, 2]]}, "ranking"),
    ("ranking", {**RANKING, "ranking": [[0], [], [1, 2]]}, "ranking"),
    ("ranking", {**RANKING, "ranking": [0, 1, 3]}, "ranking"),
    ("ranking", {**RANKING, "ranking": "0 1 2"}, "ranking"),
])
def test_bad_payloads_name_the_field_and_write_nothing(store, users, kind, payload, field):
    ann = users[0]
    {"demonstration": store.import_prompts, "ab": store.import_pairs, "ranking": store.import_samples}[kind](
        [{"prompt": "p", "completions": ["a", "b"] if kind == "ab" else ["a", "b", "c"]}])
    item = _one(store, ann)
    with pytest.raises(StoreError) as caught:
        store.submit(ann.id, item.id, payload)
    assert caught.value.field == field and len(str(caught.value)) < 200  # never echoes a huge input
    assert store.answers() == [] and store.next_item(ann.id) == item


def test_identical_completions_must_be_tied(store, users):
    ann = users[0]
    store.import_samples([{"prompt": "p", "completions": ["same", "other", "same"]}])
    item = _one(store, ann)
    with pytest.raises(StoreError, match="identical"):
        store.submit(ann.id, item.id, RANKING)
    answer = store.submit(ann.id, item.id, {**RANKING, "ranking": [[0, 2], [1]]})
    assert answer.payload["ranking"] == [[0, 2], [1]]


def test_submitting_an_item_not_assigned_is_refused(store, users):
    ann, bob, _ = users
    store.import_prompts([{"prompt": "p"}, {"prompt": "q"}])
    item = _one(store, ann)
    with pytest.raises(NotAssigned):
        store.submit(bob.id, item.id, {"completion": "stolen"})
    with pytest.raises(NotAssigned):
        store.submit(ann.id, item.id + 1, {"completion": "not given to me"})
    assert store.answers() == []


def test_a_double_submit_returns_the_first_answer_and_a_different_one_conflicts(store, users):
    ann = users[0]
    store.import_prompts([{"prompt": "p"}])
    item = _one(store, ann)
    first = store.submit(ann.id, item.id, {"completion": "first"})
    assert store.submit(ann.id, item.id, {"completion": "first"}) == first  # a double click
    for change in (lambda: store.submit(ann.id, item.id, {"completion": "second"}),
                   lambda: store.skip(ann.id, item.id, "changed my mind")):
        with pytest.raises(AnswerConflict, match="already answered this item differently") as caught:
            change()
        assert caught.value.answer == first
    assert store.answers() == [first]


def test_concurrent_submits_from_threads_make_one_answer(store, users):
    ann = users[0]
    store.import_prompts([{"prompt": "p"}])
    item = _one(store, ann)
    barrier = threading.Barrier(8)
    results: list[Answer] = []

    def submit(n: int) -> None:
        barrier.wait()
        try:
            results.append(store.submit(ann.id, item.id, {"completion": f"attempt {n % 2}"}))
        except AnswerConflict as conflict:  # the other text lost the race
            results.append(conflict.answer)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len({answer.id for answer in results}) == 1
    assert results == [results[0]] * 8 and store.answers() == [results[0]]


def test_concurrent_labelers_never_over_assign_an_item(store):
    labelers = [store.create_user(f"labeler{n}", "h") for n in range(10)]
    store.import_prompts([{"prompt": f"p{n}"} for n in range(4)], replicas=2)
    barrier = threading.Barrier(len(labelers))
    assigned: dict[str, int | None] = {}

    def work(user: User) -> None:
        barrier.wait()
        item = store.next_item(user.id)
        assigned[user.username] = item.id if item else None

    threads = [threading.Thread(target=work, args=(user,)) for user in labelers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = [list(assigned.values()).count(item_id) for item_id in range(1, 5)]
    assert counts == [2, 2, 2, 2] and list(assigned.values()).count(None) == 2


# --------------------------------------------------------------------------------------- reports


def test_progress_counts_items_answers_and_skips_per_kind(store, users):
    ann, bob, _ = users
    store.import_samples([{"prompt": "p", "completions": ["a", "b", "c"]}] * 2, replicas=2)
    store.import_pairs([{"prompt": "q", "completions": ["x", "y"]}], replicas=3)
    store.submit(ann.id, _one(store, ann, "ranking").id, RANKING)
    store.submit(bob.id, _one(store, bob, "ranking").id, RANKING)
    store.skip(ann.id, _one(store, ann, "ranking").id, "unclear")
    store.submit(ann.id, _one(store, ann, "ab").id, {"verdict": "a"})
    assert store.progress() == [
        {"kind": "demonstration", "items": 0, "answers_needed": 0, "answers": 0, "skipped": 0, "complete_items": 0},
        {"kind": "ranking", "items": 2, "answers_needed": 4, "answers": 2, "skipped": 1, "complete_items": 1},
        {"kind": "ab", "items": 1, "answers_needed": 3, "answers": 1, "skipped": 0, "complete_items": 0},
    ]


def test_agreement_per_item_per_labeler_and_with_gold(store, users):
    ann, bob, cy = users
    store.import_samples([{"prompt": "p", "completions": ["a", "b", "c"], "gold": [[0], [1], [2]]}], replicas=3)
    store.import_pairs([{"prompt": "q", "completions": ["x", "y"]}], replicas=2)
    rankings = {ann: [[0], [1], [2]], bob: [[0], [1, 2]], cy: [[2], [1], [0]]}
    for user, ranking in rankings.items():
        store.submit(user.id, _one(store, user, "ranking").id, {**RANKING, "ranking": ranking})
    store.submit(ann.id, _one(store, ann, "ab").id, {"verdict": "a"})
    store.submit(bob.id, _one(store, bob, "ab").id, {"verdict": "tie"})
    report = store.agreement()
    # pairwise: ann-bob 2/3, ann-cy 0, bob-cy 0; tau-b: ann-bob 2/sqrt(6), ann-cy -1, bob-cy -2/sqrt(6)
    ranking_item, ab_item = report["per_item"]
    assert ranking_item["item_id"] == 1 and ranking_item["labelers"] == ["ann", "bob", "cy"]
    assert ranking_item["pairwise_agreement"] == pytest.approx(2 / 9)
    assert ranking_item["kendall_tau"] == pytest.approx(-1 / 3)
    assert ab_item == {"item_id": 2, "labelers": ["ann", "bob"], "pairwise_agreement": 0.0, "kendall_tau": None}
    per_labeler = {row["username"]: row for row in report["per_labeler"]}
    # ann: ranking vs bob 2/3, vs cy 0, A/B vs bob 0; gold: 1
    assert per_labeler["ann"]["items"] == 2
    assert per_labeler["ann"]["pairwise_agreement"] == pytest.approx(2 / 9)
    assert per_labeler["ann"]["kendall_tau"] == pytest.approx((2 / 6**0.5 - 1) / 2)
    assert per_labeler["ann"]["gold_agreement"] == 1.0
    assert per_labeler["cy"]["gold_agreement"] == 0.0
    assert per_labeler["bob"]["gold_agreement"] == pytest.approx(2 / 3)
    overall = report["overall"]
    assert overall["pairwise_agreement"] == pytest.approx((2 / 3 + 0 + 0 + 0) / 4)
    assert overall["kendall_tau"] == pytest.approx(-1 / 3)
    assert overall["gold_agreement"] == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_agreement_of_an_empty_store_is_undefined(store):
    assert store.agreement() == {"per_item": [], "per_labeler": [], "overall": {
        "pairwise_agreement": None, "kendall_tau": None, "gold_agreement": None}}


# ---------------------------------------------------------------------------------------- export


@pytest.fixture
def answered(store, users):
    """Every kind answered by ann and bob, and one skip of each kind by cy."""
    ann, bob, cy = users
    store.import_prompts([{"prompt": "Say hi", "id": "d1"}], replicas=3)
    store.import_samples([{"prompt": [{"role": "user", "content": "Rank"}], "completions": ["a", "b", "c"]}],
                         replicas=3)
    store.import_pairs([{"prompt": "Judge", "id": "ab-1", "completions": ["x", "y"],
                         "meta": {"models": ["ppo", "sft"]}}], replicas=3)
    for user, text, ranking, verdict in ((ann, "hi!", [1, 0, 2], "a"), (bob, "hello", [[0, 1], [2]], "tie")):
        store.submit(user.id, _one(store, user, "demonstration").id, {"completion": text})
        store.submit(user.id, _one(store, user, "ranking").id, {**RANKING, "ranking": ranking})
        store.submit(user.id, _one(store, user, "ab").id, {"verdict": verdict})
    for kind in ("demonstration", "ranking", "ab"):
        store.skip(cy.id, _one(store, cy, kind).id, "skip")
    return store


def _round_trip(tmp_path: Path, store: Store, kind: str, record_kind: str) -> list:
    """The export read back, each record's meta without the answer's times (checked here: ISO 8601 in UTC,
    opened <= answered <= updated), its version 1, review status "submitted" and project "default"."""
    from dataclasses import replace
    from datetime import datetime

    path = tmp_path / f"{kind}.jsonl"
    write_jsonl(path, store.export(kind))
    records = []
    for record in read_records(path, record_kind):
        meta = dict(record.meta)
        opened, answered, updated = (datetime.fromisoformat(meta.pop(key))
                                     for key in ("opened_at", "answered_at", "updated_at"))
        assert opened.utcoffset().total_seconds() == 0 and opened <= answered == updated
        assert (meta.pop("version"), meta.pop("review_status"), meta.pop("project")) == (1, "submitted", "default")
        records.append(replace(record, meta=meta or None))
    return records


def test_exported_demonstrations_read_back(answered, tmp_path):
    records = _round_trip(tmp_path, answered, "demonstrations", "demonstration")
    assert records == [DemonstrationRecord("Say hi", "hi!", id="d1", labeler="ann"),
                       DemonstrationRecord("Say hi", "hello", id="d1", labeler="bob")]


def test_exported_rankings_read_back_flat_without_ties(answered, tmp_path):
    records = _round_trip(tmp_path, answered, "rankings", "ranking")
    prompt = [{"role": "user", "content": "Rank"}]
    ann, bob = (answered.user_by_name(name).id for name in ("ann", "bob"))
    meta = {"ratings": RANKING["ratings"], "flags": RANKING["flags"]}
    assert records == [
        RankingRecord(prompt, ("a", "b", "c"), ((1,), (0,), (2,)), id="2", labeler="ann",
                      meta={**meta, "shown_order": shown_order(ann, 2, 3)}),
        RankingRecord(prompt, ("a", "b", "c"), ((0, 1), (2,)), id="2", labeler="bob",
                      meta={**meta, "shown_order": shown_order(bob, 2, 3)})]
    assert [row["ranking"] for _, row in iter_jsonl(tmp_path / "rankings.jsonl")] == [[1, 0, 2], [[0, 1], [2]]]


def test_exported_pairs_are_every_untied_pair(answered, tmp_path):
    records = _round_trip(tmp_path, answered, "pairs-from-rankings", "preference")
    with pytest.warns(DeprecationWarning, match="now 'pairs-from-rankings'"):
        assert list(answered.export("pairs")) == list(answered.export("pairs-from-rankings"))
    prompt = [{"role": "user", "content": "Rank"}]
    assert [(r.chosen, r.rejected, r.labeler) for r in records] == [
        ("b", "a", "ann"), ("b", "c", "ann"), ("a", "c", "ann"), ("a", "c", "bob"), ("b", "c", "bob")]
    assert all(isinstance(r, PreferenceRecord) and r.prompt == prompt and r.id == "2" for r in records)
    assert [(r.meta["chosen_index"], r.meta["rejected_index"]) for r in records[:3]] == [(1, 0), (1, 2), (0, 2)]
    ann = answered.user_by_name("ann").id
    assert records[0].meta["shown_order"] == shown_order(ann, 2, 3)


def test_exported_ab_verdicts_feed_human_win_rates(answered, tmp_path):
    path = tmp_path / "ab.jsonl"
    assert write_jsonl(path, answered.export("ab")) == 2
    rows = [row for _, row in iter_jsonl(path)]
    times = {key: rows[0]["meta"][key] for key in ("opened_at", "answered_at", "updated_at")}
    assert rows[0] == {"prompt": "Judge", "completions": ["x", "y"], "verdict": "a", "id": "ab-1", "labeler": "ann",
                       "meta": {"models": ["ppo", "sft"], "project": "default", **times, "version": 1,
                                "review_status": "submitted", "shown_order": [0, 1]}}
    assert human_win_rates(rows, "sft")["ppo"]["win_rate"] == pytest.approx(0.75)


def test_exports_keep_the_import_meta_the_labeler_the_times_and_the_order_shown(store, users):
    """Issue 25: whatever was given at import comes back with each answer, with who answered, when (opened,
    first answered, last changed), the version, the review status and the order the labeler saw."""
    from datetime import datetime

    ann, bob, _ = users
    store.import_prompts([{"prompt": "Say hi", "meta": {"batch": 7, "source": "forum"}}], replicas=2)
    store.import_samples([{"prompt": "Rank", "completions": ["a", "b", "c"], "id": "r1",
                           "meta": {"batch": 7, "models": ["m1", "m2", "m3"], "version": "import's own"}}])
    store.submit(ann.id, _one(store, ann, "demonstration").id, {"completion": "hi"})
    bob_item = _one(store, bob, "demonstration")
    store.submit(bob.id, bob_item.id, {"completion": "hello"})
    store.edit(bob.id, bob_item.id, {"completion": "hello there"})
    ranking = _one(store, ann, "ranking")
    store.submit(ann.id, ranking.id, {**RANKING, "ranking": [1, 0, 2]})
    store.review(store.answer_of(ann.id, ranking.id).id, ann.id, "accepted")

    first, second = store.export("demonstrations")
    assert (first["labeler"], second["labeler"], second["completion"]) == ("ann", "bob", "hello there")
    assert {key: first["meta"][key] for key in ("batch", "source")} == {"batch": 7, "source": "forum"}
    assert (first["meta"]["version"], second["meta"]["version"]) == (1, 2)
    opened, answered, updated = (datetime.fromisoformat(second["meta"][key])
                                 for key in ("opened_at", "answered_at", "updated_at"))
    assert opened <= answered < updated  # bob changed his answer after giving it

    [record] = store.export("rankings")
    meta = record["meta"]
    assert record["id"] == "r1" and record["labeler"] == "ann" and meta["review_status"] == "accepted"
    assert meta["shown_order"] == shown_order(ann.id, ranking.id, 3) and meta["models"] == ["m1", "m2", "m3"]
    assert meta["version"] == 1  # the labeling's field wins its name; the import's meta is kept whole as well
    assert meta["import_meta"] == {"batch": 7, "models": ["m1", "m2", "m3"], "version": "import's own"}
    pairs = list(store.export("pairs-from-rankings"))
    assert all(pair["meta"]["batch"] == 7 and pair["labeler"] == "ann" for pair in pairs) and len(pairs) == 3


def test_export_refuses_an_unknown_kind(store):
    with pytest.raises(StoreError) as caught:
        list(store.export("essays"))
    assert caught.value.field == "kind"


# ------------------------------------------------------------------------ shown order, edits, review


def test_rankings_are_shown_in_an_order_fixed_per_labeler_and_item_and_stored_with_the_answer(store, users):
    assert shown_order(1, 7, 4) == shown_order(1, 7, 4) and sorted(shown_order(1, 7, 4)) == [0, 1, 2, 3]
    orders = {tuple(shown_order(user, item, 4)) for user in range(20) for item in range(5)}
    assert len(orders) > 10  # shuffled, not one fixed order
    ann = users[0]
    store.import_samples([{"prompt": "p", "completions": ["a", "b", "c"]}])
    store.import_prompts([{"prompt": "q"}])
    ranking = store.submit(ann.id, _one(store, ann, "ranking").id, RANKING)
    assert ranking.shown_order == shown_order(ann.id, ranking.item_id, 3) and ranking.payload == RANKING
    assert store.submit(ann.id, _one(store, ann).id, {"completion": "x"}).shown_order is None


def test_contradictions_are_higher_rated_outputs_ranked_lower():
    assert contradictions([6, 3, 1], [[0], [1], [2]]) == []
    assert contradictions([1, 2, 3, 7], [[0], [1], [2], [3]]) == [
        (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert contradictions([5, 5, 7], [[2], [0, 1]]) == []  # equal ratings and ties never contradict


def test_an_answer_is_edited_until_reviewed_and_every_version_is_kept(store, users):
    ann, boss = users[0], users[1]
    store.import_samples([{"prompt": "p", "completions": ["a", "b", "c"]}])
    item = _one(store, ann)
    with pytest.raises(StoreError, match="no answer to change"):
        store.edit(ann.id, item.id, RANKING)
    first = store.submit(ann.id, item.id, RANKING)
    edited = store.edit(ann.id, item.id, {**RANKING, "ranking": [[2], [1], [0]]})
    assert (edited.id, edited.version, edited.payload["ranking"]) == (first.id, 2, [[2], [1], [0]])
    assert store.edit(ann.id, item.id, {**RANKING, "ranking": [2, 1, 0]}) == edited  # nothing new: no version
    with pytest.raises(StoreError):
        store.edit(ann.id, item.id, {**RANKING, "ranking": [[2], [1]]})
    with pytest.raises(NotAssigned):
        store.edit(boss.id, item.id, RANKING)
    assert [(v.version, v.payload["ranking"]) for v in store.history(first.id)] == [
        (1, [[0], [1], [2]]), (2, [[2], [1], [0]])]
    [record] = store.export("rankings")
    assert record["ranking"] == [2, 1, 0]  # the latest version
    accepted = store.review(first.id, boss.id, "accepted")
    assert accepted.status == "accepted"
    with pytest.raises(AnswerConflict, match="accepted this answer"):
        store.edit(ann.id, item.id, RANKING)
    with pytest.raises(AnswerConflict, match="already accepted"):
        store.review(first.id, boss.id, "rejected")
    with pytest.raises(StoreError) as caught:
        store.review(first.id, boss.id, "maybe")
    assert caught.value.field == "status"
    assert store.answers(status="accepted") == [accepted] and store.answers(status="submitted") == []


def test_a_rejected_answer_sends_the_item_back_to_the_queue(store, users):
    ann, bob, boss = users
    store.import_prompts([{"prompt": "p"}])
    item = _one(store, ann)
    answer = store.submit(ann.id, item.id, {"completion": "lazy"})
    assert store.next_item(bob.id) is None
    store.review(answer.id, boss.id, "rejected")
    assert _one(store, bob) == item and store.next_item(ann.id) is None
    assert list(store.export("demonstrations")) == [] and store.progress()[0]["answers"] == 0
    skipped = store.skip(bob.id, item.id, "unclear")
    with pytest.raises(AnswerConflict, match="skipped"):
        store.review(skipped.id, boss.id, "accepted")
    with pytest.raises(AnswerConflict, match="skipped"):
        store.edit(bob.id, item.id, {"completion": "after all"})


def _age_assignments(store: Store, minutes: int) -> None:
    with store.engine.begin() as connection:
        for (row_id, created) in connection.exec_driver_sql("SELECT id, created_at FROM assignments").all():
            moment = created if isinstance(created, datetime) else datetime.fromisoformat(created)
            connection.exec_driver_sql("UPDATE assignments SET created_at = ? WHERE id = ?"
                                       if store.url.startswith("sqlite") else
                                       "UPDATE assignments SET created_at = %s WHERE id = %s",
                                       (moment - timedelta(minutes=minutes), row_id))


def test_an_expired_assignment_is_handed_to_another_labeler(store, users):
    ann, bob, _ = users
    store.import_prompts([{"prompt": "p"}])
    ttl = timedelta(minutes=30)
    item = _one(store, ann)
    assert store.next_item(bob.id, assignment_ttl=ttl) is None  # ann still has it
    _age_assignments(store, 31)
    assert store.next_item(bob.id, assignment_ttl=ttl) == item
    assert store.next_item(ann.id, assignment_ttl=ttl) is None  # handed over: not ann's any more
    with pytest.raises(NotAssigned):
        store.submit(ann.id, item.id, {"completion": "too late"})
    store.submit(bob.id, item.id, {"completion": "done"})
    _age_assignments(store, 60)
    assert store.next_item(ann.id, assignment_ttl=ttl) is None  # an answered assignment never expires
    assert [record["labeler"] for record in store.export("demonstrations")] == ["bob"]


def test_the_admin_releases_open_assignments(store, users):
    ann, bob, cy = users
    store.import_prompts([{"prompt": "p"}, {"prompt": "q"}])
    first, second = _one(store, ann), _one(store, bob)
    store.submit(bob.id, second.id, {"completion": "kept"})
    assert [row["username"] for row in store.open_assignments()] == ["ann"]
    assert store.release_assignments(user_id=bob.id) == 0  # answered assignments stay
    assert store.release_assignments(older_than=timedelta(hours=1)) == 0
    assert store.release_assignments(user_id=ann.id, item_id=first.id) == 1
    assert store.open_assignments() == [] and _one(store, cy) == first


def test_sessions_end_on_logout_password_change_and_expiry(store, users):
    ann, bob, _ = users
    token, other = store.create_session(ann.id, timedelta(hours=1)), store.create_session(ann.id, timedelta(hours=1))
    bobs = store.create_session(bob.id, timedelta(hours=1))
    assert store.session_user(token) == ann and store.session_user("forged") is None
    store.end_session(token)
    assert store.session_user(token) is None and store.session_user(other) == ann
    store.set_password(ann.id, "new-hash")
    assert store.session_user(other) is None and store.session_user(bobs) == bob
    assert store.user(ann.id).password_hash == "new-hash"
    expired = store.create_session(bob.id, timedelta(seconds=-1))
    assert store.session_user(expired) is None
    with store.engine.connect() as connection:  # only hashes are stored
        assert token not in str(connection.exec_driver_sql("SELECT * FROM sessions").all())


def test_upgrade_from_the_first_revision_keeps_answers_as_version_one(url):
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    from rlhfkit.feedback.store import MIGRATIONS

    def table(name: str, *columns: sa.ColumnClause) -> sa.TableClause:
        """The table as revision 0001 made it, as far as these rows need (with an id and created_at)."""
        return sa.table(name, sa.column("id"), sa.column("created_at", sa.DateTime(timezone=True)), *columns)

    then = datetime(2026, 1, 1, tzinfo=timezone.utc)
    store = Store(url, migrate=False)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:  # a database as revision 0001 left it, with an answer
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(table("users", sa.column("username"), sa.column("role"),
                                 sa.column("password_hash"), sa.column("active", sa.Boolean)).insert().values(
            id=1, username="ann", role="labeler", password_hash="h", active=True, created_at=then))
        connection.execute(table("items", sa.column("kind"), sa.column("prompt", sa.JSON),
                                 sa.column("completions", sa.JSON), sa.column("replicas"),
                                 sa.column("meta", sa.JSON)).insert().values(
            id=1, kind="demonstration", prompt="p", completions=[], replicas=1, meta={}, created_at=then))
        connection.execute(table("assignments", sa.column("user_id"), sa.column("item_id")).insert().values(
            user_id=1, item_id=1, created_at=then))
        connection.execute(table("answers", sa.column("user_id"), sa.column("item_id"),
                                 sa.column("payload", sa.JSON), sa.column("skipped", sa.Boolean)).insert().values(
            user_id=1, item_id=1, payload={"completion": "old"}, skipped=False, created_at=then))
    upgrade_database(store.engine)
    [answer] = store.answers()
    assert (answer.payload, answer.version, answer.status, answer.shown_order) == (
        {"completion": "old"}, 1, "submitted", None)
    assert [version.payload for version in store.history(answer.id)] == [{"completion": "old"}]
    assert store.edit(1, 1, {"completion": "new"}).version == 2
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    store.close()


# ----------------------------------------------------------------------------------------- crash

CRASHING_CLIENT = textwrap.dedent("""
    import os, signal, sys
    from rlhfkit.feedback.store import Store, AnswerRow
    store = Store(sys.argv[1])
    user = store.create_user("ann", "h")
    store.import_prompts([{"prompt": "p1"}, {"prompt": "p2"}])
    store.submit(user.id, store.next_item(user.id).id, {"completion": "committed"})
    item = store.next_item(user.id)
    session = store._writer()
    session.add(AnswerRow(user_id=user.id, item_id=item.id, payload={"completion": "never committed"}))
    session.flush()  # the row is written inside an open transaction, which dies with the process
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_process_loses_nothing_it_committed(url, tmp_path):
    process = subprocess.run([sys.executable, "-c", CRASHING_CLIENT, url], capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == -9 and process.stdout == "ready\n", process.stderr
    store = Store(url)
    assert [answer.payload for answer in store.answers()] == [{"completion": "committed"}]
    ann = store.user_by_name("ann")
    assert store.next_item(ann.id).prompt == "p2"  # the open assignment survived; its answer did not
    if url.startswith("sqlite"):
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    store.close()


def test_user_progress_and_answer_of(store, users):
    ann, bob, _ = users
    store.import_samples([{"prompt": "Q", "completions": ["a", "b", "c"]}, {"prompt": "R", "completions": ["x", "y"]}])
    store.import_prompts([{"prompt": "Write"}])
    first = _one(store, ann, "ranking")
    store.submit(ann.id, first.id, RANKING)
    skipped = _one(store, ann, "ranking")
    store.skip(ann.id, skipped.id, "unclear")
    assert store.user_progress(ann.id) == {"demonstration": {"answered": 0, "skipped": 0},
                                           "ranking": {"answered": 1, "skipped": 1},
                                           "ab": {"answered": 0, "skipped": 0}}
    assert store.user_progress(bob.id)["ranking"] == {"answered": 0, "skipped": 0}
    assert store.answer_of(ann.id, first.id).payload == RANKING
    assert store.answer_of(ann.id, skipped.id).skipped
    assert store.answer_of(bob.id, first.id) is None


# ------------------------------------------------------------------------------------ accounts and tokens


def test_a_deactivated_account_loses_its_sessions_and_open_assignments_until_reactivated(store, users):
    ann, bob, _ = users
    store.import_prompts([{"prompt": "p"}, {"prompt": "q"}])
    answered, left_open = _one(store, ann), None
    store.submit(ann.id, answered.id, {"completion": "kept"})
    left_open = _one(store, ann)
    session = store.create_session(ann.id, timedelta(hours=1))
    token, secret = store.create_token(ann.id, "script")
    assert store.set_active(ann.id, False).active is False
    assert store.session_user(session) is None and store.token_user(secret) is None
    assert store.open_assignments() == [] and _one(store, bob) == left_open  # released to another labeler
    assert [answer.item_id for answer in store.answers(user_id=ann.id)] == [answered.id]  # answers stay
    assert store.set_active(ann.id, True).active is True
    assert store.token_user(secret) == store.user(ann.id)  # a token outlives a deactivation, a session does not
    assert store.session_user(session) is None
    with pytest.raises(StoreError, match="no user with id 999"):
        store.set_active(999, False)


def test_api_tokens_are_stored_hashed_listed_and_revoked(store, users):
    ann, bob, _ = users
    token, secret = store.create_token(ann.id, "nightly export")
    assert secret.startswith("rlhfkit_") and len(secret) > 40
    assert (token.name, token.username, token.active) == ("nightly export", "ann", True)
    assert store.token_user(secret) == ann and store.token_user(secret + "x") is None
    with pytest.raises(StoreError, match="already has a token named 'nightly export'"):
        store.create_token(ann.id, "nightly export")
    for name in ("", " padded", "x" * 65, None):
        with pytest.raises(StoreError) as error:
            store.create_token(ann.id, name)
        assert error.value.field == "name"
    bobs, _ = store.create_token(bob.id, "bob's")
    assert [t.name for t in store.tokens()] == ["nightly export", "bob's"]
    assert [t.name for t in store.tokens(bob.id)] == ["bob's"]
    with pytest.raises(StoreError, match=f"no API token with id {bobs.id}"):
        store.revoke_token(bobs.id, user_id=ann.id)  # not ann's to revoke
    revoked = store.revoke_token(token.id, user_id=ann.id)
    assert revoked.revoked_at is not None and not revoked.active and store.token_user(secret) is None
    assert store.revoke_token(token.id).revoked_at == revoked.revoked_at  # revoking twice changes nothing
    assert store.create_token(ann.id, "nightly export")[0].active  # the name is free again
    with store.engine.connect() as connection:
        assert secret not in str(connection.exec_driver_sql("SELECT * FROM api_tokens").all())


# ----------------------------------------------------------------------------------------------- review


def test_answers_are_searched_and_filtered_by_labeler_and_counted(store, users):
    ann, bob, _ = users
    store.import_prompts([{"prompt": 'Say "100%" café'}, {"prompt": "Name_a tree"}], replicas=2)
    store.import_samples([{"prompt": "Colour?", "completions": ["Crimson red", "blue"]}])
    for user in (ann, bob):
        for _ in range(2):
            item = _one(store, user, "demonstration")
            store.submit(user.id, item.id, {"completion": f"{user.username} wrote\nline two"})
    item = _one(store, ann, "ranking")
    store.submit(ann.id, item.id, {"ratings": [5, 2], "flags": [[], []], "ranking": [[0], [1]]})
    assert store.count_answers() == 5 and store.count_answers(user_id=bob.id) == 2
    assert len(store.answers(search='"100%" CAFÉ')) == 2  # quotes, % and non-ASCII as written
    assert len(store.answers(search="100%")) == 2 and store.answers(search="10_%") == []  # LIKE's characters literal
    assert len(store.answers(search="name_a")) == 2 and store.answers(search="namexa") == []
    assert [a.user_id for a in store.answers(search="BOB WROTE\nline")] == [bob.id, bob.id]  # the answer's text
    assert [a.item_id for a in store.answers(search="crimson")] == [item.id]  # a ranking's outputs
    assert store.count_answers("demonstration", user_id=ann.id, search="two") == 2
    assert [a.id for a in store.answers(limit=2, offset=1)] == [a.id for a in store.answers()][1:3]


def test_labeler_stats_count_answers_by_review_status_and_time_per_item(store, users):
    ann, bob, cy = users
    store.import_prompts([{"prompt": "p"}, {"prompt": "q"}, {"prompt": "r"}])
    first, second = _one(store, ann), None
    store.submit(ann.id, first.id, {"completion": "a"})
    second = _one(store, ann)
    store.skip(ann.id, second.id, "cannot")
    third = _one(store, ann)
    store.submit(ann.id, third.id, {"completion": "c"})
    _one(store, bob)
    with store.engine.begin() as connection:  # ann opened her items 30 and 90 seconds before answering them
        for item_id, seconds in ((first.id, 30), (third.id, 90)):
            opened = connection.exec_driver_sql(f"SELECT created_at FROM answers WHERE item_id = {item_id}").scalar()
            moment = opened if isinstance(opened, datetime) else datetime.fromisoformat(opened)
            connection.exec_driver_sql("UPDATE assignments SET created_at = ? WHERE item_id = ?"
                                       if store.url.startswith("sqlite") else
                                       "UPDATE assignments SET created_at = %s WHERE item_id = %s",
                                       (moment - timedelta(seconds=seconds), item_id))
    store.review(store.answer_of(ann.id, first.id).id, cy.id, "accepted")
    stats = {row["username"]: row for row in store.labeler_stats()}
    assert {key: stats["ann"][key] for key in ("answers", "skipped", "submitted", "accepted", "rejected",
                                                "open_assignments")} == {
        "answers": 2, "skipped": 1, "submitted": 1, "accepted": 1, "rejected": 0, "open_assignments": 0}
    assert stats["ann"]["median_seconds"] == pytest.approx(60, abs=1)
    assert stats["bob"]["open_assignments"] == 1 and stats["bob"]["median_seconds"] is None


def test_agreement_on_rankings_only(store, users):
    ann, bob, _ = users
    store.import_samples([{"prompt": "p", "completions": ["a", "b", "c"]}], replicas=2)
    store.import_pairs([{"prompt": "q", "completions": ["x", "y"]}], replicas=2)
    for user, ranking, verdict in ((ann, [[0], [1], [2]], "a"), (bob, [[0], [2], [1]], "b")):
        item = _one(store, user, "ranking")
        store.submit(user.id, item.id, {"ratings": [4, 4, 4], "flags": [[], [], []], "ranking": ranking})
        pair = _one(store, user, "ab")
        store.submit(user.id, pair.id, {"verdict": verdict})
    assert store.agreement(("ranking",))["overall"]["pairwise_agreement"] == pytest.approx(2 / 3)
    assert store.agreement()["overall"]["pairwise_agreement"] == pytest.approx(1 / 3)
    with pytest.raises(StoreError, match="agreement is measured on ranking and ab items"):
        store.agreement(("demonstration",))


# -------------------------------------------------------------------------------------- projects

LIKERT = {"rating_scale": (1, 5), "flags": ("off_topic", "unsafe"), "instructions": "Rate **helpfulness**."}


def test_a_new_database_has_the_default_project_with_todays_settings(store):
    [default] = store.projects()
    assert (default.name, default.instructions, default.rating_scale, default.flags) == (
        "default", "", (1, 7), ("fails_instruction", "harmful", "made_up_facts"))
    assert list(default.ratings) == [1, 2, 3, 4, 5, 6, 7]


def test_projects_are_created_found_and_updated(store):
    likert = store.create_project("likert", **LIKERT)
    assert (likert.name, likert.instructions, likert.rating_scale, likert.flags) == (
        "likert", "Rate **helpfulness**.", (1, 5), ("off_topic", "unsafe"))
    assert store.project_by_name("likert") == store.project(likert.id) == likert
    assert [project.name for project in store.projects()] == ["default", "likert"]
    changed = store.update_project(likert.id, instructions="New.", rating_scale=(0, 9), flags=["unsafe"])
    assert (changed.instructions, changed.rating_scale, changed.flags) == ("New.", (0, 9), ("unsafe",))
    assert store.update_project(likert.id).flags == ("unsafe",)  # nothing given, nothing changed
    assert store.create_project("no flags", flags=()).flags == ()


@pytest.mark.parametrize(("settings", "field", "message"), [
    ({"name": " padded"}, "name", "leading or trailing spaces"),
    ({"name": "default"}, "name", "exists already"),
    ({"rating_scale": (5, 1)}, "rating_scale", "5-1 is not a scale"),
    ({"rating_scale": (0, 0)}, "rating_scale", "0-0 is not a scale"),
    ({"rating_scale": (1, 11)}, "rating_scale", "from 0 to 10"),
    ({"rating_scale": (1, "5")}, "rating_scale", "two whole numbers"),
    ({"flags": ("a", "")}, "flags", "flag 2 ('') must be non-empty"),
    ({"flags": ("unsafe", "Unsafe")}, "flags", "given twice"),
    ({"flags": "abc"}, "flags", "a list of flag names"),
])
def test_bad_project_settings_are_refused_naming_the_field(store, settings, field, message):
    with pytest.raises(StoreError) as error:
        store.create_project(**{"name": "p", **settings})
    assert error.value.field == field and message in error.value.message
    assert [project.name for project in store.projects()] == ["default"]


def test_imports_go_into_the_named_project_and_an_unknown_one_is_refused(store):
    likert = store.create_project("likert", **LIKERT)
    store.import_samples([{"prompt": "p", "completions": ["a", "b"]}], project_id=likert.id)
    store.import_prompts([{"prompt": "q"}])
    assert [store.item(1).project_id, store.item(2).project_id] == [likert.id, store.project_by_name("default").id]
    with pytest.raises(StoreError, match="no project with id 99") as error:
        store.import_pairs([{"prompt": "p", "completions": ["a", "b"]}], project_id=99)
    assert error.value.field == "project" and store.item(3) is None


def test_each_project_has_its_own_queue(store, users):
    ann, bob, _ = users
    a, b = store.create_project("a"), store.create_project("b")
    store.import_prompts([{"prompt": f"a{n}"} for n in range(3)], project_id=a.id, replicas=2)
    store.import_prompts([{"prompt": f"b{n}"} for n in range(2)], project_id=b.id, replicas=2)
    for user in (ann, bob):  # a labeler working in project A never gets B's items, and the other way round
        for project, count in ((a, 3), (b, 2)):
            for _ in range(count):
                item = store.next_item(user.id, project_id=project.id)
                assert item.project_id == project.id
                store.submit(user.id, item.id, {"completion": "x"})
            assert store.next_item(user.id, project_id=project.id) is None
    with pytest.raises(StoreError, match="no project") as error:
        store.next_item(ann.id, project_id=99)
    assert error.value.field == "project"


def test_answers_follow_their_projects_scale_and_flags(store, users):
    ann = users[0]
    likert = store.create_project("likert", **LIKERT)
    store.import_samples([{"prompt": "p", "completions": ["a", "b"]}], project_id=likert.id)
    store.import_samples([{"prompt": "q", "completions": ["a", "b"]}])
    item = store.next_item(ann.id, project_id=likert.id)
    for payload, field in (({"ratings": [6, 1]}, "ratings[0]"), ({"ratings": [0, 1]}, "ratings[0]"),
                           ({"flags": [["harmful"], []]}, "flags[0]")):
        with pytest.raises(StoreError) as error:
            store.submit(ann.id, item.id, {"ratings": [5, 1], "flags": [[], []], "ranking": [0, 1], **payload})
        assert error.value.field == field
    assert "from 1 to 5" in str(pytest.raises(StoreError, store.submit, ann.id, item.id,
                                              {"ratings": [7, 1], "flags": [[], []], "ranking": [0, 1]}).value)
    answer = store.submit(ann.id, item.id, {"ratings": [5, 1], "flags": [["unsafe"], []], "ranking": [0, 1]})
    assert answer.payload["flags"] == [["unsafe"], []]
    with pytest.raises(StoreError, match="from 1 to 5"):
        store.edit(ann.id, item.id, {"ratings": [7, 1], "flags": [[], []], "ranking": [0, 1]})
    default_item = store.next_item(ann.id)  # the default project keeps 1-7 and its flags
    store.submit(ann.id, default_item.id, {"ratings": [7, 1], "flags": [["harmful"], []], "ranking": [0, 1]})


def test_a_projects_scale_and_flags_change_only_where_its_answers_still_fit(store, users):
    ann = users[0]
    likert = store.create_project("likert", **LIKERT)
    store.import_samples([{"prompt": "p", "completions": ["a", "b"]}], project_id=likert.id)
    item = store.next_item(ann.id, project_id=likert.id)
    store.submit(ann.id, item.id, {"ratings": [5, 2], "flags": [["unsafe"], []], "ranking": [0, 1]})
    with pytest.raises(StoreError, match=r"ratings \[5\], outside 1-4") as error:
        store.update_project(likert.id, rating_scale=(1, 4))
    assert error.value.field == "rating_scale"
    with pytest.raises(StoreError, match=r"flags \['unsafe'\]") as error:
        store.update_project(likert.id, flags=["off_topic"])
    assert error.value.field == "flags" and store.project(likert.id) == likert  # nothing changed
    widened = store.update_project(likert.id, rating_scale=(1, 7), flags=["unsafe", "off_topic", "rude"])
    assert widened.rating_scale == (1, 7) and widened.flags == ("unsafe", "off_topic", "rude")
    with pytest.raises(StoreError, match="no project with id 99"):
        store.update_project(99, instructions="x")


def test_progress_and_exports_per_project(store, users):
    ann = users[0]
    likert = store.create_project("likert", **LIKERT)
    store.import_samples([{"prompt": "p", "completions": ["a", "b"], "id": "L1"}], project_id=likert.id)
    store.import_samples([{"prompt": "q", "completions": ["a", "b"], "id": "D1"}, {"prompt": "r",
                                                                                  "completions": ["c", "d"]}])
    for project_id, ratings in ((likert.id, [5, 1]), (None, [7, 1])):
        item = store.next_item(ann.id, project_id=project_id) if project_id else store.next_item(ann.id)
        store.submit(ann.id, item.id, {"ratings": ratings, "flags": [[], []], "ranking": [0, 1]})
    [likert_rankings] = [row for row in store.progress(likert.id) if row["kind"] == "ranking"]
    [all_rankings] = [row for row in store.progress() if row["kind"] == "ranking"]
    assert (likert_rankings["items"], likert_rankings["answers"], all_rankings["items"]) == (1, 1, 3)
    assert store.user_progress(ann.id, likert.id)["ranking"] == {"answered": 1, "skipped": 0}
    assert store.user_progress(ann.id)["ranking"] == {"answered": 2, "skipped": 0}
    exported = list(store.export("rankings", likert.id))
    assert [(row["id"], row["meta"]["project"], row["meta"]["ratings"]) for row in exported] == [
        ("L1", "likert", [5, 1])]
    assert [row["meta"]["project"] for row in store.export("rankings")] == ["likert", "default"]
    with pytest.raises(StoreError, match="no project"):
        list(store.export("rankings", 99))


def test_a_project_is_renamed_to_a_free_name_and_the_default_keeps_its_name(store, users):
    likert = store.create_project("likert", **LIKERT)
    store.import_samples([{"prompt": "p", "completions": ["a", "b"]}], project_id=likert.id)
    renamed = store.update_project(likert.id, name="five point", instructions="Renamed.")
    assert (renamed.name, renamed.instructions, renamed.rating_scale) == ("five point", "Renamed.", (1, 5))
    assert store.project_by_name("likert") is None and store.project_by_name("five point") == renamed
    assert store.update_project(likert.id, name="five point") == renamed  # its own name: nothing changes
    assert store.next_item(users[0].id, project_id=likert.id).project_id == likert.id  # its items stay in it
    for name, message in (("default", "a project named 'default' exists already"),
                          (" padded", "leading or trailing spaces"), ("x" * 65, "longer than 64")):
        with pytest.raises(StoreError, match=message) as error:
            store.update_project(likert.id, name=name, instructions="not saved")
        assert error.value.field == "name"
    with pytest.raises(StoreError, match="the project 'default' keeps its name") as error:
        store.update_project(store.project_by_name("default").id, name="general")
    assert error.value.field == "name"
    assert [(p.name, p.instructions) for p in store.projects()] == [("default", ""), ("five point", "Renamed.")]


def test_review_stats_agreement_and_open_assignments_per_project(store, users):
    ann, bob, _ = users
    likert = store.create_project("likert", **LIKERT)
    store.import_samples([{"prompt": "p", "completions": ["a", "b", "c"]}], project_id=likert.id, replicas=2)
    store.import_samples([{"prompt": "q", "completions": ["a", "b", "c"]}], replicas=2)
    store.import_prompts([{"prompt": "r"}])
    for user, ranking in ((ann, [[0], [1], [2]]), (bob, [[0], [2], [1]])):
        item = store.next_item(user.id, "ranking", project_id=likert.id)
        store.submit(user.id, item.id, {"ratings": [3, 3, 3], "flags": [[], [], []], "ranking": ranking})
    default_item = store.next_item(ann.id, "ranking", project_id=1)
    store.submit(ann.id, default_item.id, {"ratings": [3, 3, 3], "flags": [[], [], []], "ranking": [0, 1, 2]})
    store.next_item(bob.id, "ranking", project_id=1)  # left open
    store.next_item(ann.id, "demonstration")  # left open
    # answers to review
    assert store.count_answers(project_id=likert.id) == 2 and store.count_answers(project_id=1) == 1
    assert [a.user_id for a in store.answers(project_id=likert.id, search="p")] == [ann.id, bob.id]
    assert store.answers("demonstration", project_id=likert.id) == []
    with pytest.raises(StoreError, match="no project with id 99"):
        store.answers(project_id=99)
    # each labeler's progress
    stats = {row["username"]: row for row in store.labeler_stats(likert.id)}
    assert (stats["ann"]["answers"], stats["ann"]["open_assignments"], stats["bob"]["open_assignments"]) == (1, 0, 0)
    assert stats["cy"]["answers"] == 0 and stats["ann"]["median_seconds"] is not None
    stats = {row["username"]: row for row in store.labeler_stats(1)}
    assert (stats["ann"]["answers"], stats["ann"]["open_assignments"], stats["bob"]["open_assignments"]) == (1, 1, 1)
    assert stats["bob"]["answers"] == 0 and stats["bob"]["median_seconds"] is None
    # agreement
    assert [row["item_id"] for row in store.agreement(project_id=likert.id)["per_item"]] == [1]
    assert store.agreement(project_id=likert.id)["overall"]["pairwise_agreement"] == pytest.approx(2 / 3)
    assert store.agreement(project_id=1)["per_item"] == []
    assert [row["username"] for row in store.agreement(project_id=1)["per_labeler"]] == ["ann"]
    # open assignments and their release
    assert store.open_assignments(likert.id) == []
    assert [(row["username"], row["project"]) for row in store.open_assignments(1)] == [("bob", "default"),
                                                                                      ("ann", "default")]
    assert store.release_assignments(project_id=likert.id) == 0 and len(store.open_assignments()) == 2
    assert store.release_assignments(user_id=bob.id, project_id=1) == 1
    assert [row["username"] for row in store.open_assignments()] == ["ann"]
    for method in (store.labeler_stats, store.open_assignments, lambda project: store.agreement(project_id=project),
                   lambda project: store.release_assignments(project_id=project)):
        with pytest.raises(StoreError, match="no project with id 99"):
            method(99)


def test_upgrade_from_revision_0003_puts_every_item_in_the_default_project(url):
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    from rlhfkit.feedback.store import MIGRATIONS

    store = Store(url, migrate=False)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
    old = Store(url, migrate=False)  # rows written through revision 0003's tables
    now = datetime.now(timezone.utc)
    with old.engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO users (id, username, role, password_hash, active, created_at) "
                                   "VALUES (1, 'ann', 'labeler', 'h', :true, :now)"), {"true": True, "now": now})
        for item_id, kind, completions in ((1, "ranking", '["a", "b"]'), (2, "demonstration", "[]")):
            connection.execute(sa.text(
                "INSERT INTO items (id, kind, prompt, completions, replicas, meta, created_at) "
                "VALUES (:id, :kind, '\"p\"', :completions, 1, '{}', :now)"),
                {"id": item_id, "kind": kind, "completions": completions, "now": now})
            connection.execute(sa.text("INSERT INTO assignments (user_id, item_id, created_at) VALUES (1, :id, :now)"),
                               {"id": item_id, "now": now})
        connection.execute(sa.text(
            "INSERT INTO answers (id, user_id, item_id, payload, skipped, created_at, version, status) "
            "VALUES (1, 1, 1, :payload, :false, :now, 1, 'submitted')"),
            {"payload": json.dumps({"ratings": [7, 1], "flags": [["harmful"], []], "ranking": [[0], [1]]}),
             "false": False, "now": now})
        connection.execute(sa.text("INSERT INTO answer_versions (answer_id, version, payload, skipped, created_at) "
                                   "SELECT id, 1, payload, skipped, created_at FROM answers"))
    old.close()
    upgrade_database(store.engine)
    default = store.project_by_name("default")
    assert (default.rating_scale, default.flags) == ((1, 7), ("fails_instruction", "harmful", "made_up_facts"))
    assert [store.item(n).project_id for n in (1, 2)] == [default.id, default.id]
    [answer] = store.answers()
    assert answer.payload["ratings"] == [7, 1] and len(store.history(answer.id)) == 1  # nothing lost
    assert store.next_item(1, project_id=default.id).id == 2  # the open assignment, in its project
    assert [row["meta"]["project"] for row in store.export("rankings", default.id)] == ["default"]
    with store.engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    store.close()
