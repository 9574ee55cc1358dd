"""The feedback commands (export, feedback add-user/import/progress/release/agreement) on a temporary SQLite DB."""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import timedelta

import pytest
import typer
from typer.testing import CliRunner

from rlhfkit.data.readers import read_records
from rlhfkit.data.records import RankingRecord
from rlhfkit.feedback.cli import database_url, register
from rlhfkit.feedback.security import verify_password
from rlhfkit.feedback.store import Store, shown_order

SAMPLES = [
    {"prompt": "Name a colour", "completions": ["red", "blue", "seven"], "id": "s1"},
    {"prompt": "Name a fruit", "completions": ["apple", "pear"], "gold": [[0], [1]]},
]


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def run(app, monkeypatch):
    from rlhfkit.cli_common import console

    # one message on one line: rich folds a word longer than the terminal (a deep temporary path) mid-word
    monkeypatch.setattr(console, "width", 1000)

    def invoke(*args: str, input: str | None = None):
        return CliRunner().invoke(app, [str(arg) for arg in args], input=input)

    return invoke


@pytest.fixture
def db(tmp_path):
    return tmp_path / "feedback.db"


def _message(result) -> str:
    """The error output as one line (messages of several lines joined)."""
    return " ".join(result.stderr.split())


def _usage_error(result) -> str:
    """A usage error's text as one line, without the box drawn around it."""
    return " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_database_url_accepts_urls_and_paths(tmp_path):
    assert database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert database_url(str(tmp_path / "x.db")) == f"sqlite:///{tmp_path / 'x.db'}"
    assert database_url("x.db") == "sqlite:///x.db"
    assert database_url("postgresql://u@h:5432/db") == database_url("postgres://u@h:5432/db") == \
        "postgresql+psycopg://u@h:5432/db"
    assert database_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"


def test_add_user_hashes_the_given_or_prompted_password(run, db):
    result = run("feedback", "add-user", "boss", "--role", "admin", "--password", "correct horse", "--db", db)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"id": 1, "username": "boss", "role": "admin"}
    result = run("feedback", "add-user", "ann", "--db", db, input="battery staple\nbattery staple\n")
    assert result.exit_code == 0, result.output
    assert "battery staple" not in result.stdout
    store = Store(f"sqlite:///{db}")
    boss, ann = store.users()
    assert (boss.role, ann.role) == ("admin", "labeler")
    assert verify_password(boss.password_hash, "correct horse") and boss.password_hash != "correct horse"
    assert verify_password(ann.password_hash, "battery staple")
    store.close()


@pytest.mark.parametrize(("args", "message"), [
    (["--role", "root", "--password", "long enough"], "--role"),
    (["--password", "short"], "at least 8 characters"),
])
def test_add_user_refuses_bad_input(run, db, args, message):
    result = run("feedback", "add-user", "ann", *args, "--db", db)
    assert result.exit_code == 2 and message in result.output


def test_add_user_refuses_a_taken_name_with_one_line(run, db):
    assert run("feedback", "add-user", "ann", "--password", "long enough", "--db", db).exit_code == 0
    result = run("feedback", "add-user", "ann", "--password", "long enough", "--db", db)
    assert result.exit_code == 2
    assert _message(result) == "error: field 'username': 'ann' is taken"


def test_import_every_kind_with_replicas(run, db, tmp_path):
    prompts_csv = tmp_path / "prompts.csv"
    prompts_csv.write_text('prompt,id\n"Write a haiku, please",h1\nSay hello,\n', encoding="utf-8")
    prompts_jsonl = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": "Hi"}]}])
    samples = _jsonl(tmp_path / "samples.jsonl", SAMPLES)
    pair = {"prompt": "p", "completions": ["a", "b"], "meta": {"models": ["x", "y"]}}
    pairs = _jsonl(tmp_path / "pairs.jsonl", [pair])
    for path, kind, replicas, count in ((prompts_csv, "prompts", 2, 2), (prompts_jsonl, "prompts", 1, 1),
                                        (samples, "samples", 3, 2), (pairs, "ab", 1, 1)):
        result = run("feedback", "import", path, "--kind", kind, "--replicas", replicas, "--db", db)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["items"] == count
    store = Store(f"sqlite:///{db}")
    items = [store.item(n) for n in range(1, 7)]
    assert [(i.kind, i.prompt, i.replicas) for i in items[:3]] == [
        ("demonstration", "Write a haiku, please", 2), ("demonstration", "Say hello", 2),
        ("demonstration", [{"role": "user", "content": "Hi"}], 1)]
    assert (items[3].kind, items[3].completions, items[3].replicas) == ("ranking", ["red", "blue", "seven"], 3)
    assert items[4].gold == [[0], [1]]
    assert (items[5].kind, items[5].meta) == ("ab", {"models": ["x", "y"]})
    store.close()


def test_a_bad_record_names_the_file_line_and_field_and_imports_nothing(run, db, tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps(SAMPLES[0]) + "\n\n" + json.dumps({"prompt": "p", "completions": ["one"]}) + "\n",
                    encoding="utf-8")
    result = run("feedback", "import", path, "--kind", "samples", "--db", db)
    assert result.exit_code == 2
    assert _message(result) == f"error: {path}, line 3, field 'completions': needs at least 2 completions, got 1"
    store = Store(f"sqlite:///{db}")
    assert store.item(1) is None
    store.close()


@pytest.mark.parametrize(("name", "content", "kind", "message"), [
    ("missing.jsonl", None, "prompts", "no such file"),
    ("prompts[v2].jsonl", None, "prompts", "prompts[v2].jsonl: no such file"),  # not taken as rich markup
    ("prompts.csv", "text\nhello\n", "prompts", "field 'prompt': is missing"),
    ("pairs.csv", "prompt\nhello\n", "ab", "ab are read from JSON lines"),
    ("empty.jsonl", "\n", "samples", "contains no records"),
    ("bad.jsonl", "{not json\n", "samples", "line 1: invalid JSON"),
    ("blank.jsonl", '{"prompt": "p", "completions": ["a", " "]}\n', "samples", "field 'completions[1]': is empty"),
])
def test_import_errors_end_with_one_message(run, db, tmp_path, name, content, kind, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    result = run("feedback", "import", path, "--kind", kind, "--db", db)
    assert result.exit_code == 2 and message in _message(result) and "Traceback" not in result.output


def test_import_refuses_an_unknown_kind(run, db, tmp_path):
    result = run("feedback", "import", _jsonl(tmp_path / "p.jsonl", [{"prompt": "p"}]), "--kind", "essays",
                 "--db", db)
    assert result.exit_code == 2 and "--kind" in result.output


@pytest.fixture
def labeled(run, db, tmp_path):
    """Two labelers who ranked the first sample (and an A/B pair), through the store."""
    run("feedback", "import", _jsonl(tmp_path / "s.jsonl", SAMPLES), "--kind", "samples", "--replicas", 2, "--db", db)
    store = Store(f"sqlite:///{db}")
    for name, ranking in (("ann", [0, 1, 2]), ("bob", [[0], [1, 2]])):
        user = store.create_user(name, "hash")
        item = store.next_item(user.id)
        store.submit(user.id, item.id, {"ratings": [7, 4, 1], "flags": [[], [], ["made_up_facts"]],
                                        "ranking": ranking})
    yield store
    store.close()


def test_export_writes_records_the_trainers_read(run, db, labeled, tmp_path):
    out = tmp_path / "out" / "rankings.jsonl"
    result = run("export", "--db", db, "--kind", "rankings", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"kind": "rankings", "records": 2, "out": str(out)}
    records = read_records(out, "ranking")
    shown = shown_order(labeled.user_by_name("ann").id, 1, 3)  # the order ann saw the outputs in
    times = {key: records[0].meta[key] for key in ("opened_at", "answered_at", "updated_at")}
    assert records[0] == RankingRecord("Name a colour", ("red", "blue", "seven"), ((0,), (1,), (2,)), id="s1",
                                       labeler="ann", meta={"ratings": [7, 4, 1], "flags": [[], [], ["made_up_facts"]],
                                                            "project": "default", **times, "version": 1,
                                                            "review_status": "submitted", "shown_order": shown})
    assert records[1].ranking == ((0,), (1, 2)) and records[1].labeler == "bob"
    result = run("export", "--db", db, "--kind", "pairs-from-rankings", "--out", tmp_path / "pairs.jsonl")
    assert json.loads(result.stdout)["records"] == 5 and len(read_records(tmp_path / "pairs.jsonl", "preference")) == 5


def test_the_old_kind_names_still_work_with_a_deprecation_message(run, db, labeled, tmp_path):
    """`import --kind pairs` (A/B) and `export --kind pairs` (from rankings) were easily mixed up: now `ab` and
    `pairs-from-rankings`; the old names do what they did and say what to use instead."""
    pair = _jsonl(tmp_path / "ab.jsonl", [{"prompt": "p", "completions": ["a", "b"]}])
    result = run("feedback", "import", pair, "--kind", "pairs", "--db", db)
    assert result.exit_code == 0 and json.loads(result.stdout)["kind"] == "ab"
    assert "warning: import kind 'pairs' is deprecated: it is now 'ab'" in _message(result)
    assert labeled.item(3).kind == "ab"
    result = run("export", "--db", db, "--kind", "pairs", "--out", tmp_path / "old.jsonl")
    assert result.exit_code == 0 and json.loads(result.stdout)["kind"] == "pairs-from-rankings"
    assert "it is now 'pairs-from-rankings'" in _message(result)
    new = run("export", "--db", db, "--kind", "pairs-from-rankings", "--out", tmp_path / "new.jsonl")
    assert new.stderr == "" and (tmp_path / "old.jsonl").read_text() == (tmp_path / "new.jsonl").read_text()
    result = run("export", "--db", db, "--kind", "essays", "--out", tmp_path / "x.jsonl")
    assert result.exit_code == 2 and "pairs (now pairs-from-rankings)" in " ".join(result.output.split())


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "essays"], "--kind"),
    (["--kind", "ab", "--db", "nowhere.db"], "nowhere.db: no such database file"),
    (["--kind", "ab", "--db", "nosuchdialect://x"], "Can't load plugin"),
    (["--kind", "ab", "--db", "postgresql+psycopg://postgres@127.0.0.1:1/none"], "cannot use the database"),
    pytest.param(["--kind", "ab", "--db", "postgresql+psycopg2://postgres@127.0.0.1:1/none"],
                 "PostgreSQL driver is not installed (No module named 'psycopg2'): pip install 'rlhfkit[postgres]'",
                 marks=pytest.mark.skipif(
                     importlib.util.find_spec("psycopg2") is not None, reason="psycopg2 is installed")),
])
def test_export_errors_end_with_one_message(run, tmp_path, args, message):
    result = run("export", "--out", tmp_path / "x.jsonl", *args)
    assert result.exit_code == 2 and message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_progress_prints_a_table(run, db, labeled):
    result = run("feedback", "progress", "--db", db)
    assert result.exit_code == 0, result.output
    ranking_row = next(line for line in result.stdout.splitlines() if "ranking" in line)
    # items, complete items, answers, needed, skipped, done
    assert [cell.strip() for cell in ranking_row.split("│")[2:8]] == ["2", "1", "2", "4", "0", "50%"]


def test_release_hands_open_assignments_to_the_next_labeler(run, db, labeled):
    # ann and bob answered item 1; each now opens item 2 and leaves it
    ann, bob = labeled.user_by_name("ann"), labeled.user_by_name("bob")
    second = [labeled.next_item(user.id).id for user in (ann, bob)]
    assert len(labeled.open_assignments()) == 2
    result = run("feedback", "release", "--db", db, "--older-than-minutes", 60)  # both were opened just now
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"released": 0}
    result = run("feedback", "release", "--db", db, "--user", "ann")
    assert json.loads(result.stdout) == {"released": 1}
    assert [a["username"] for a in labeled.open_assignments()] == ["bob"]
    result = run("feedback", "release", "--db", db, "--item", second[1])
    assert json.loads(result.stdout) == {"released": 1} and labeled.open_assignments() == []
    result = run("feedback", "release", "--db", db, "--user", "nobody")
    assert result.exit_code == 2 and "no account 'nobody'" in _message(result)


def test_agreement_prints_a_table_and_writes_the_report(run, db, labeled, tmp_path):
    out = tmp_path / "agreement.json"
    result = run("feedback", "agreement", "--db", db, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report == labeled.agreement()
    assert report["per_item"][0]["pairwise_agreement"] == pytest.approx(2 / 3)
    ann_row = next(line for line in result.stdout.splitlines() if "ann" in line)
    assert "0.667" in ann_row and "0.816" in ann_row  # Kendall tau-b 2/sqrt(6)
    assert "1 items answered by two or more labelers" in result.stdout



def test_serve_creates_the_database_and_answers_on_127_0_0_1(tmp_path):
    import urllib.request

    from feedback_server import FeedbackServer

    db = tmp_path / "new.db"
    with FeedbackServer(db, log=tmp_path / "server.log") as server:
        assert server.url.startswith("http://127.0.0.1:") and db.exists()
        with urllib.request.urlopen(f"{server.url}/login", timeout=10) as response:
            assert response.status == 200 and b"Log in" in response.read()
    assert "no admin account yet" in server.output() and "rlhfkit feedback add-user" in server.output()


# What `rlhfkit feedback ...`, `rlhfkit export` and `rlhfkit serve` load, in a fresh interpreter: the
# command line as `rlhfkit` runs it, --help, a database created, filled, exported, and the web app built as
# `serve` builds it before it listens. torch and transformers take seconds to import; none of this needs them.
_IMPORT_GRAPH_SCRIPT = """
import json, sys
from pathlib import Path
from rlhfkit.cli import app

def invoke(*args):
    try:
        app([str(arg) for arg in args], prog_name="rlhfkit", standalone_mode=False)
    except SystemExit as stop:
        assert not stop.code, (args, stop.code)

folder = Path(sys.argv[1])
db = f"sqlite:///{folder / 'feedback.db'}"
invoke("--help")
invoke("feedback", "--help")
invoke("serve", "--help")
help_only = sorted(name for name in ("torch", "transformers", "sqlalchemy", "fastapi", "rlhfkit.config")
                   if name in sys.modules)
(folder / "samples.jsonl").write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\\n")
invoke("feedback", "add-user", "admin", "--password", "a long password", "--role", "admin", "--db", db)
invoke("feedback", "import", folder / "samples.jsonl", "--kind", "samples", "--db", db)
invoke("feedback", "progress", "--db", db)
invoke("export", "--kind", "rankings", "--out", folder / "out.jsonl", "--db", db)
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.store import Store
create_app(Store(db))
print(json.dumps({"help_only": help_only,
                  "heavy": sorted(name for name in ("torch", "transformers") if name in sys.modules)}))
"""


def test_the_feedback_commands_never_import_torch_or_transformers(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _IMPORT_GRAPH_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["heavy"] == []
    # --help loads neither the database layer, the web framework nor the configs: the answer comes at once
    assert loaded["help_only"] == []


def test_a_restarted_server_keeps_its_labelers_logged_in(run, tmp_path):
    """No key given: `serve` generates one into DB.session-key (0600) and a restart reads it back."""
    import stat

    import httpx
    from feedback_server import FeedbackServer

    db = tmp_path / "feedback.db"
    assert run("feedback", "add-user", "ann", "--password", "a long password", "--db", db).exit_code == 0
    key_file = tmp_path / "feedback.db.session-key"
    with FeedbackServer(db, log=tmp_path / "server.log", secret_key=None) as server:
        client = httpx.Client(base_url=server.url)
        assert client.post("/api/login", json={"username": "ann", "password": "a long password"}).status_code == 200
        assert client.get("/api/me").json()["username"] == "ann"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text()
    with FeedbackServer(db, log=tmp_path / "server.log", secret_key=None) as restarted:
        client = httpx.Client(base_url=restarted.url, cookies=client.cookies)
        assert client.get("/api/me").json()["username"] == "ann"  # the same cookie, still logged in
    assert key_file.read_text() == key
    assert f"sessionkey:{key_file}" in "".join(restarted.output().split())  # rich folds long lines


def test_an_explicit_session_key_or_key_file_is_used_instead(run, tmp_path):
    import httpx
    from feedback_server import FeedbackServer

    db = tmp_path / "feedback.db"
    assert run("feedback", "add-user", "ann", "--password", "a long password", "--db", db).exit_code == 0
    cookies = None
    for _ in range(2):  # the same key given twice: the cookie of the first server works on the second
        with FeedbackServer(db, log=tmp_path / "server.log", secret_key="an explicit key") as server:
            client = httpx.Client(base_url=server.url, cookies=cookies)
            if cookies is None:
                client.post("/api/login", json={"username": "ann", "password": "a long password"})
            assert client.get("/api/me").json()["username"] == "ann"
            cookies = client.cookies
    assert not (tmp_path / "feedback.db.session-key").exists()  # an explicit key writes no file

    own = tmp_path / "keys" / "team.key"
    with FeedbackServer(db, log=tmp_path / "server.log", secret_key=None,
                        extra_args=("--secret-key-file", str(own))):
        assert len(own.read_text().strip()) >= 43
    assert not (tmp_path / "feedback.db.session-key").exists()


def test_serve_refuses_a_key_file_others_can_read_and_a_key_with_a_file(run, tmp_path):
    from rlhfkit.feedback.cli import default_session_key_file

    key_file = tmp_path / "open.key"
    key_file.write_text("k" * 43)
    key_file.chmod(0o644)
    result = run("serve", "--db", tmp_path / "feedback.db", "--secret-key-file", key_file)
    boxed = "".join(result.stderr.replace("│", "").split())  # typer's error box folds the message
    assert result.exit_code == 2 and "chmod600" in boxed
    result = run("serve", "--db", tmp_path / "feedback.db", "--secret-key-file", key_file, "--secret-key", "x")
    assert result.exit_code == 2 and "notboth" in "".join(result.stderr.replace("│", "").split())

    assert default_session_key_file(str(tmp_path / "a.db")) == tmp_path / "a.db.session-key"
    assert default_session_key_file("sqlite://") is None
    server_db = default_session_key_file("postgresql://ann:secret@db.example/feedback")
    assert server_db.parent.name == "rlhfkit" and server_db.name.startswith("feedback-session-")
    assert server_db == default_session_key_file("postgresql+psycopg://ann:other@db.example/feedback")


def test_accounts_are_deactivated_reactivated_and_given_a_new_password(run, db):
    run("feedback", "add-user", "ann", "--password", "ann password", "--db", db)
    store = Store(f"sqlite:///{db}")
    ann = store.user_by_name("ann")
    store.import_prompts([{"prompt": "p"}])
    store.next_item(ann.id)
    session = store.create_session(ann.id, timedelta(hours=1))
    result = run("feedback", "deactivate", "ann", "--db", db)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"username": "ann", "active": False}
    assert store.session_user(session) is None and store.open_assignments() == []
    assert json.loads(run("feedback", "reactivate", "ann", "--db", db).stdout) == {"username": "ann", "active": True}
    session = store.create_session(ann.id, timedelta(hours=1))
    result = run("feedback", "reset-password", "ann", "--db", db, input="new password\nnew password\n")
    assert result.exit_code == 0, result.output
    assert verify_password(store.user(ann.id).password_hash, "new password") and store.session_user(session) is None
    result = run("feedback", "reset-password", "ann", "--password", "short", "--db", db)
    assert result.exit_code == 2 and "at least 8 characters" in _message(result)
    result = run("feedback", "deactivate", "nobody", "--db", db)
    assert result.exit_code == 2 and "no account 'nobody'" in _message(result)
    store.close()


def test_api_tokens_are_made_listed_and_revoked(run, db):
    run("feedback", "add-user", "ann", "--password", "ann password", "--db", db)
    result = run("feedback", "add-token", "ann", "--name", "nightly export", "--db", db)
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    assert made["token"].startswith("rlhfkit_") and made["name"] == "nightly export"
    store = Store(f"sqlite:///{db}")
    assert store.token_user(made["token"]).username == "ann"
    listed = run("feedback", "tokens", "--db", db, "--user", "ann")
    assert listed.exit_code == 0 and "nightly export" in listed.stdout and made["token"] not in listed.stdout
    again = run("feedback", "add-token", "ann", "--name", "nightly export", "--db", db)
    assert again.exit_code == 2 and "already has a token named 'nightly export'" in _message(again)
    revoked = run("feedback", "revoke-token", made["id"], "--db", db)
    assert revoked.exit_code == 0 and json.loads(revoked.stdout)["revoked_at"]
    assert store.token_user(made["token"]) is None
    missing = run("feedback", "revoke-token", 99, "--db", db)
    assert missing.exit_code == 2 and "no API token with id 99" in _message(missing)
    assert "no account 'bob'" in _message(run("feedback", "tokens", "--db", db, "--user", "bob"))
    store.close()


def test_projects_are_created_listed_updated_and_imported_into(run, db, tmp_path):
    guide = tmp_path / "guide.md"
    guide.write_text("# Helpfulness\nRate how **helpful** each answer is.\n", encoding="utf-8")
    created = run("feedback", "project", "create", "likert", "--instructions", guide, "--rating-scale", "1-5",
                  "--flags", "off_topic, unsafe", "--db", db)
    assert created.exit_code == 0, created.output
    assert json.loads(created.stdout) == {"id": 2, "name": "likert", "rating_scale": [1, 5],
                                          "flags": ["off_topic", "unsafe"], "instructions_chars": 51}
    samples = _jsonl(tmp_path / "samples.jsonl", SAMPLES)
    imported = run("feedback", "import", samples, "--kind", "samples", "--project", "likert", "--db", db)
    assert json.loads(imported.stdout)["project"] == "likert"
    imported = run("feedback", "import", samples, "--kind", "samples", "--db", db)
    assert json.loads(imported.stdout)["project"] == "default"
    listed = run("feedback", "project", "list", "--db", db)
    assert listed.exit_code == 0, listed.output
    likert_row = next(line for line in listed.stdout.splitlines() if "likert" in line)
    assert [cell.strip() for cell in likert_row.split("│")[1:6]] == [
        "likert", "2", "1-5", "off_topic, unsafe", "# Helpfulness"]
    updated = run("feedback", "project", "update", "likert", "--rating-scale", "0-9", "--flags", "", "--db", db)
    assert json.loads(updated.stdout)["rating_scale"] == [0, 9] and json.loads(updated.stdout)["flags"] == []
    store = Store(database_url(str(db)))
    likert = store.project_by_name("likert")
    assert likert.instructions == guide.read_text(encoding="utf-8") and likert.rating_scale == (0, 9)
    assert [store.item(n).project_id for n in (1, 2, 3, 4)] == [likert.id, likert.id, 1, 1]
    store.close()


@pytest.mark.parametrize(("args", "message"), [
    (("create", "x", "--rating-scale", "5-1"), "Invalid value for --rating-scale: 5-1 is not a scale"),
    (("create", "x", "--rating-scale", "0-0"), "Invalid value for --rating-scale: 0-0 is not a scale"),
    (("create", "x", "--rating-scale", "five"), "Invalid value for --rating-scale: expected LOWEST-HIGHEST"),
    (("create", "x", "--flags", "a,,b"), "Invalid value for --flags: flag 2 ('') must be non-empty"),
    (("create", "x", "--flags", "a,b,A"), "Invalid value for --flags: flag 'A' is given twice"),
    (("create", "default"), "Invalid value for NAME: a project named 'default' exists already"),
    (("create", "x", "--instructions", "missing.md"), "'--instructions'"),
    (("update", "nope", "--flags", "a"), "Invalid value for NAME: no project 'nope'"),
    (("update", "default"), "give what to change"),
    (("update", "default", "--name", "general"), "Invalid value for --name: the project 'default' keeps its name"),
    (("update", "default", "--name", " x"), "Invalid value for --name: must be non-empty, without leading"),
])
def test_project_commands_refuse_bad_input_naming_the_option(run, db, args, message):
    Store(database_url(str(db))).close()
    result = run("feedback", "project", *args, "--db", db)
    assert result.exit_code == 2 and message in _usage_error(result), result.output
    assert "Traceback" not in result.output


def test_import_export_and_progress_of_one_project(run, db, tmp_path):
    assert run("feedback", "project", "create", "likert", "--rating-scale", "1-5", "--db", db).exit_code == 0
    samples = _jsonl(tmp_path / "samples.jsonl", SAMPLES)
    unknown = run("feedback", "import", samples, "--kind", "samples", "--project", "nope", "--db", db)
    assert unknown.exit_code == 2 and "Invalid value for --project: no project 'nope'" in _usage_error(unknown)
    run("feedback", "import", samples, "--kind", "samples", "--project", "likert", "--db", db)
    run("feedback", "import", samples, "--kind", "samples", "--db", db)
    store = Store(database_url(str(db)))
    ann = store.create_user("ann", "h")
    likert = store.project_by_name("likert")
    for project_id, ratings in ((likert.id, [5, 4, 1]), (None, [7, 4, 1])):
        item = store.next_item(ann.id, project_id=project_id or 1)
        store.submit(ann.id, item.id, {"ratings": ratings, "flags": [[]] * 3, "ranking": [0, 1, 2]})
    store.close()
    out = tmp_path / "likert.jsonl"
    exported = run("export", "--kind", "rankings", "--out", out, "--project", "likert", "--db", db)
    assert json.loads(exported.stdout)["records"] == 1
    [record] = read_records(out, "ranking")
    assert record.meta["project"] == "likert" and record.meta["ratings"] == [5, 4, 1]
    progress = run("feedback", "progress", "--db", db)
    assert "project likert" in progress.stdout and "project default" in progress.stdout
    only = run("feedback", "progress", "--project", "likert", "--db", db)
    assert "project likert" in only.stdout and "project default" not in only.stdout
    ranking_row = next(line for line in only.stdout.splitlines() if "ranking" in line)
    assert [cell.strip() for cell in ranking_row.split("│")[2:8]] == ["2", "1", "1", "2", "0", "50%"]


def test_a_project_is_renamed_and_a_taken_name_is_refused(run, db):
    for name in ("likert", "safety"):
        assert run("feedback", "project", "create", name, "--db", db).exit_code == 0
    renamed = run("feedback", "project", "update", "likert", "--name", "five point", "--db", db)
    assert renamed.exit_code == 0, renamed.output
    assert json.loads(renamed.stdout)["name"] == "five point"
    taken = run("feedback", "project", "update", "five point", "--name", "safety", "--db", db)
    assert taken.exit_code == 2
    assert "Invalid value for --name: a project named 'safety' exists already" in _usage_error(taken)
    listed = run("feedback", "project", "list", "--db", db).stdout
    assert "five point" in listed and "likert" not in listed


def test_agreement_and_release_of_one_project(run, db, labeled, tmp_path):
    """The labeled fixture's answers are in the default project; a second project's item is left open."""
    likert = labeled.create_project("likert", rating_scale=(1, 5))
    labeled.import_samples([{"prompt": "p", "completions": ["a", "b"]}], project_id=likert.id)
    labeled.next_item(labeled.user_by_name("ann").id, project_id=likert.id)  # opened, not answered
    out = tmp_path / "likert.json"
    empty = run("feedback", "agreement", "--project", "likert", "--out", out, "--db", db)
    assert empty.exit_code == 0, empty.output
    assert "Agreement per labeler in project likert" in empty.stdout and "0 items answered" in empty.stdout
    assert json.loads(out.read_text()) == labeled.agreement(project_id=likert.id)
    default = run("feedback", "agreement", "--project", "default", "--db", db)
    assert "1 items answered by two or more labelers" in default.stdout
    assert re.search(r"ann .*0\.667", default.stdout)
    unknown = run("feedback", "agreement", "--project", "nope", "--db", db)
    assert unknown.exit_code == 2 and "Invalid value for --project: no project 'nope'" in _usage_error(unknown)
    assert json.loads(run("feedback", "release", "--project", "default", "--db", db).stdout) == {"released": 0}
    assert len(labeled.open_assignments()) == 1
    assert json.loads(run("feedback", "release", "--project", "likert", "--db", db).stdout) == {"released": 1}
    assert labeled.open_assignments() == []
