"""Readers of public human-feedback layouts, on the real files in ../shared/data and a hand-written OASST tree."""

from __future__ import annotations

import gzip
import itertools
import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from rlhfkit.data.public import (
    SkipRow,
    Where,
    hh_rlhf,
    oasst_tree,
    qa_feedback,
    read_public,
    self_instruct,
    trl_row,
)
from rlhfkit.data.readers import iter_jsonl, read_records, write_jsonl
from rlhfkit.data.records import (
    DataError,
    DemonstrationRecord,
    LabeledRecord,
    PairSetRecord,
    PreferenceRecord,
    PromptRecord,
    RankingRecord,
    parse_record,
)

SHARED = Path(__file__).parents[2] / "shared" / "data"
HH = SHARED / "hh-rlhf-harmless" / "pairs.jsonl.gz"
QA = SHARED / "qa-feedback" / "preferences.jsonl"
SEED_TASKS = SHARED / "self-instruct" / "seed_tasks.jsonl"
OASST = Path(__file__).parent / "data" / "oasst_trees.jsonl"


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is missing: the real public data live in ../shared/data beside the project")
    return path


# --- Anthropic hh-rlhf -------------------------------------------------------------------------------------


def test_hh_real_file_counts_and_a_spot_checked_pair():
    data = read_public(shared(HH), "hh")
    assert data.rows == 1800
    assert dict(data.skipped) == {"an empty final reply": 4, "the dialogues differ before the last reply": 2}
    assert len(data.records) == 1800 - 6
    assert all(isinstance(r, PreferenceRecord) for r in data.records)
    first = data.records[0]
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first.prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert first.chosen.startswith("No, sorry!  All of these involve a pen")
    assert first.rejected.startswith("There are lots of funny things you can do with pens")
    # no prompt message is empty and no prompt ends with the marker text itself
    assert all(m["content"] and "\n\nHuman:" not in m["content"] for r in data.records for m in r.prompt)


def test_hh_skips_dialogues_whose_turns_differ():
    # line 1255 of the file: a generated reply holds an unmarked "Human:" turn, so the two sides do not share
    # their turns before the last reply; such a pair is skipped, not silently misread
    row = {"chosen": "\n\nHuman: Are drag queens men?\n\nAssistant: No.  Human: Really?\n\nAssistant: Yes.",
           "rejected": "\n\nHuman: Are drag queens men?\n\nAssistant: Usually, yes."}
    with pytest.raises(SkipRow, match="differ before the last reply"):
        hh_rlhf(row)
    same = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello."}
    with pytest.raises(SkipRow, match="identical final replies"):
        hh_rlhf(same)


def test_hh_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "hh.jsonl"
    good = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"chosen": good["chosen"]}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        read_public(path, "hh")
    assert str(error.value) == f"{path}, line 2, field 'rejected': is missing"
    with pytest.raises(DataError, match="field 'chosen': is not an hh dialogue"):
        hh_rlhf({**good, "chosen": "Hello there"})
    with pytest.raises(DataError, match="field 'rejected': does not end with an assistant reply"):
        hh_rlhf({**good, "rejected": "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Why?"})


def test_hh_records_read_back_with_rlhfkit_readers(tmp_path):
    data = read_public(shared(HH), "hh", limit=50)
    assert len(data.records) == 50
    write_jsonl(tmp_path / "hh.jsonl.gz", data.records)
    assert read_records(tmp_path / "hh.jsonl.gz", "preference") == data.records


# --- qa-feedback ---------------------------------------------------------------------------------------------


def weak_order_exists(judgements, k: int) -> bool:
    """Whether some ranking with tie groups agrees with every judgement (brute force over levels)."""
    for levels in itertools.product(range(k), repeat=k):
        if all((levels[i] == levels[j]) if p == 0 else (levels[i] < levels[j]) if p == 1 else (levels[j] < levels[i])
               for i, j, p in judgements):
            return True
    return False


def test_qa_feedback_real_file_keeps_ties_as_pairs():
    data = read_public(shared(QA), "qa-feedback")
    raw = [row for _, row in iter_jsonl(QA)]
    assert data.rows == len(raw) == 400
    assert dict(data.skipped) == {"every pair tied": 10}
    assert len(data.records) == 390
    assert all(isinstance(r, PairSetRecord) and len(r.completions) == 4 and len(r.judgements) == 6
               for r in data.records)
    ties_in_file = sum(p == 0 for row in raw for p in row["preference"])
    ties_kept = sum(len(r.ties()) for r in data.records)
    assert ties_in_file == 296 and ties_kept == 296 - 10 * 6 == 236
    assert sum(len(r.pairs()) for r in data.records) == 390 * 6 - 236 == 2104
    first = data.records[0]
    assert first.prompt.endswith("\n\nQuestion: When does bloom by troye sivan come out?")
    assert first.prompt.startswith("Bloom (Troye Sivan album): Bloom (Troye Sivan album) Bloom is the second")
    assert first.completions[1].startswith("Bloom, the second studio album by Australian singer-songwriter")
    # preference [0, 1, 2, 1, 0, 2] over the pairs 1v2, 1v3, 1v4, 2v3, 2v4, 3v4
    assert first.judgements == ((0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 2, 1), (1, 3, 0), (2, 3, 2))
    assert first.pairs() == [(0, 2), (3, 0), (1, 2), (3, 2)] and first.ties() == [(0, 1), (1, 3)]
    # answers 1 = 2 and 2 = 4 tie, yet 4 beats 1: no ranking with ties says this, the pair set does
    assert not weak_order_exists(first.judgements, 4)
    assert sum(not weak_order_exists(r.judgements, 4) for r in data.records) == 18


def test_qa_feedback_records_read_back_with_rlhfkit_readers(tmp_path):
    data = read_public(shared(QA), "qa-feedback")
    write_jsonl(tmp_path / "qa.jsonl", data.records)
    assert read_records(tmp_path / "qa.jsonl", "ranking") == data.records
    line = json.loads((tmp_path / "qa.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert line["pairs"] == [[0, 1, 0], [0, 2, 1], [0, 3, 2], [1, 2, 1], [1, 3, 0], [2, 3, 2]]


def test_qa_feedback_bad_row():
    row = {"question": "Q?", "passages": [], "preference": [1, 0, 0, 0, 0, 3],
           **{f"prediction {n}": f"answer {n}" for n in range(1, 5)}}
    with pytest.raises(DataError, match="line 7, field 'preference': expected 6 values"):
        qa_feedback(row, Where("qa.jsonl", 7))
    row["preference"] = [1, 0, 0, 0, 0, 2]
    (record,) = qa_feedback(row)
    assert record.prompt == "Q?"  # no passages: the question alone
    with pytest.raises(DataError, match="field 'prediction 3': is missing"):
        qa_feedback({k: v for k, v in row.items() if k != "prediction 3"})


# --- the pair-set record form ---------------------------------------------------------------------------------


PAIR_SET = {"prompt": "p", "completions": ["a", "b", "c"], "pairs": [[0, 1, 1], [1, 2, 1], [0, 2, 2]]}


def test_pair_set_keeps_a_cycle():
    record = parse_record(PAIR_SET, "ranking")
    assert isinstance(record, PairSetRecord)
    assert record.pairs() == [(0, 1), (1, 2), (2, 0)] and record.ties() == []
    assert parse_record(PAIR_SET, "labeled") == record  # KTO reads it as the ranking kind does


@pytest.mark.parametrize(("pairs", "field", "message"), [
    ([], "pairs", "has no judgement"),
    ([[0, 1]], "pairs[0]", r"expected three integers \(i, j, preference\), got \[0, 1\]"),
    ([[0, 1, 1], [0, 3, 1]], "pairs[1]", "index 3 is out of range for 3 completions"),
    ([[1, 1, 1]], "pairs[0]", "judges completion 1 against itself"),
    ([[0, 1, 3]], "pairs[0]", "preference 3 is not 0"),
    ([[0, 1, 1], [1, 0, 2]], "pairs[1]", r"judges completions 1 and 0 again \(pairs\[0\] did\)"),
    ([[0, 1, 0], [1, 2, 0]], "pairs", "ties every pair"),
    ([[0, True, 1]], "pairs[0]", "expected three integers"),
])
def test_pair_set_errors_name_the_field(pairs, field, message):
    with pytest.raises(DataError, match=rf"data.jsonl, line 3, field '{re.escape(field)}': {message}"):
        parse_record({**PAIR_SET, "pairs": pairs}, "ranking", source="data.jsonl", line=3)


def test_pair_set_rejects_a_preference_between_identical_texts_and_a_second_form():
    with pytest.raises(DataError, match=r"field 'pairs\[0\]': completions 0 and 2 are identical"):
        parse_record({**PAIR_SET, "completions": ["a", "b", "a"], "pairs": [[0, 2, 1]]}, "ranking")
    with pytest.raises(DataError, match="field 'pairs': give either 'ranking' or 'pairs'"):
        parse_record({**PAIR_SET, "ranking": [0, 1, 2]}, "ranking")
    with pytest.raises(ValueError, match="every judgement is a tie"):
        PairSetRecord("p", ("a", "b"), ((0, 1, 0),))


def test_reward_encoding_trains_on_a_pair_set_without_its_ties(tokenizer):
    from rlhfkit.trainers.reward import RankingCollator, encode_rankings

    record = parse_record({**PAIR_SET, "completions": ["a b", "b c", "c d", "d e"],
                           "pairs": [[0, 1, 1], [1, 2, 1], [0, 2, 2], [0, 3, 0]]}, "ranking")
    (example,) = encode_rankings(tokenizer, [record], decoder=True, max_length=32, max_prompt_length=16)
    assert example.k == 4 and example.pairs == ((0, 1), (1, 2), (2, 0))  # the tie (0, 3) makes no pair
    batch = RankingCollator(tokenizer.pad_token_id, "left")([example])
    assert batch["winner"].tolist() == [0, 1, 2] and batch["loser"].tolist() == [1, 2, 0]


# --- Open-Assistant message trees -----------------------------------------------------------------------------


def test_oasst_trees_give_rankings_of_sibling_replies():
    data = read_public(OASST, "oasst")
    assert data.rows == 3 and dict(data.skipped) == {"no ranked assistant replies": 1}
    first, deeper, tied = data.records
    assert all(isinstance(r, RankingRecord) for r in data.records)
    assert first.prompt == [{"role": "user", "content": "What is the boiling point of water at sea level?"}]
    # ranks 0, 2, 1 -> best first; the unranked reply m9 is left out
    assert first.completions == ("100 degrees Celsius (212 degrees Fahrenheit).",
                                 "Water boils at 100 degrees Celsius at sea level.", "It boils at 90 degrees.")
    assert first.ranking == ((0,), (1,), (2,)) and first.id == "m1"
    assert first.meta == {"message_tree_id": "t1", "lang": "en"}
    # a ranking deeper in the tree: the conversation down to the prompter's follow-up; the deleted reply is out
    assert [m["role"] for m in deeper.prompt] == ["user", "assistant", "user"]
    assert deeper.prompt[-1]["content"] == "And on the summit of Mount Everest?"
    assert deeper.completions[0].startswith("Roughly 71 degrees") and len(deeper.completions) == 2
    # equal ranks are ties; "Rot." repeated at a worse rank is dropped
    assert tied.completions == ("Rot.", "Blau.", "Grün ist keine Primärfarbe der Malerei.")
    assert tied.ranking == ((0, 1), (2,)) and tied.meta["lang"] == "de"


def test_oasst_bad_messages_name_their_path():
    tree = json.loads(OASST.read_text(encoding="utf-8").splitlines()[0])
    del tree["prompt"]["replies"][1]["text"]
    with pytest.raises(DataError, match=r"line 4, field 'prompt\.replies\[1\]\.text': is missing"):
        oasst_tree(tree, Where("trees.jsonl", 4))
    tree = json.loads(OASST.read_text(encoding="utf-8").splitlines()[0])
    tree["prompt"]["replies"][0]["replies"][0]["role"] = "system"
    with pytest.raises(DataError, match=r"field 'prompt\.replies\[0\]\.replies\[0\]\.role': expected 'prompter'"):
        oasst_tree(tree)
    tree["prompt"]["replies"][0]["rank"] = "first"
    with pytest.raises(DataError, match=r"field 'prompt\.replies\[0\]\.rank': expected an integer or null"):
        oasst_tree(tree)


# --- self-instruct seed tasks ---------------------------------------------------------------------------------


def test_self_instruct_real_file(tmp_path):
    data = read_public(shared(SEED_TASKS), "self-instruct")
    assert data.rows == 175 and len(data.records) == 175 and not data.skipped
    assert all(isinstance(r, DemonstrationRecord) for r in data.records)
    assert len({r.id for r in data.records}) == 175
    first = data.records[0]
    assert first.id == "seed_task_0" and first.meta == {"name": "breakfast_suggestion", "is_classification": False}
    assert first.prompt.startswith("Is there anything I can eat for a breakfast that doesn't include eggs")
    assert first.completion.startswith("Yes, you can have 1 oatmeal banana protein shake")
    second = data.records[1]  # an instance with an input: the instruction, a blank line, the input
    assert second.prompt == "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"
    assert sum("\n\n" in r.prompt for r in data.records) >= 125  # 125 tasks have an input
    write_jsonl(tmp_path / "sft.jsonl", data.records)
    assert read_records(tmp_path / "sft.jsonl", "demonstration") == data.records


def test_self_instruct_several_instances_and_a_bad_one():
    row = {"id": "t", "name": "n", "instruction": "Add.", "is_classification": False,
           "instances": [{"input": "1 + 1", "output": "2"}, {"input": "", "output": "nothing to add"}]}
    one, two = self_instruct(row)
    assert (one.id, one.prompt, one.completion) == ("t-0", "Add.\n\n1 + 1", "2")
    assert (two.id, two.prompt) == ("t-1", "Add.")
    row["instances"][1]["output"] = " "
    with pytest.raises(DataError, match=r"field 'instances\[1\]\.output': is empty"):
        self_instruct(row)


# --- TRL dataset formats --------------------------------------------------------------------------------------

USER = [{"role": "user", "content": "What color is the sky?"}]


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
     PreferenceRecord("The sky is", " blue.", " green.")),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": "It is blue."}],
      "rejected": [{"role": "assistant", "content": "It is green."}]},
     PreferenceRecord(USER, "It is blue.", "It is green.")),
    ({"chosen": [*USER, {"role": "assistant", "content": "It is blue."}],
      "rejected": [*USER, {"role": "assistant", "content": "It is green."}]},
     PreferenceRecord(USER, "It is blue.", "It is green.")),
    ({"chosen": "The sky is blue.", "rejected": "The sky is green."},
     PreferenceRecord("The sky is ", "blue.", "green.")),
    ({"prompt": USER, "completion": [{"role": "assistant", "content": "It is green."}], "label": False},
     LabeledRecord(USER, "It is green.", False)),
    ({"prompt": "The sky is", "completion": " blue.", "id": 7}, DemonstrationRecord("The sky is", " blue.", id="7")),
    ({"messages": [*USER, {"role": "assistant", "content": "It is blue."}]},
     DemonstrationRecord(USER, "It is blue.")),
    ({"prompt": USER}, PromptRecord(USER)),
    ({"prompt": USER, "answer": "4", "id": 2}, PromptRecord(USER, id="2", fields={"answer": "4"})),
])
def test_trl_formats(row, expected):
    assert trl_row(row) == [expected]


@pytest.mark.parametrize(("row", "message"), [
    ({"text": "The sky is blue."}, "field 'text': a language-modelling row is pretraining text"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True, False]}, "field 'labels': stepwise supervision"),
    ({"prompt": USER, "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
      "rejected": "c"}, "field 'chosen': expected a string or a list of one assistant message"),
    ({"chosen": "Blue.", "rejected": "Green."}, "field 'prompt': is missing, and 'chosen' and 'rejected' share no "
                                                "leading words"),
    ({"prompt": USER, "chosen": "same", "rejected": "same"}, "field 'rejected': is identical to 'chosen'"),
    ({"answer": 42}, "matches no TRL format"),
    ({"prompt": "p", "completions": ["a", "b", "c"], "ranking": [[0], [2], [1]]},
     "field 'completions': a K-way ranking ('completions' with 'ranking' or 'pairs') is not one of TRL's formats"),
    ({"prompt": "p", "ranking": [0, 1]}, "field 'ranking': a K-way ranking"),
    ({"prompt": "p", "pairs": [[0, 1, 1]]}, "field 'pairs': a K-way ranking"),
])
def test_trl_bad_rows(row, message):
    with pytest.raises(DataError, match=re.escape(message)):
        trl_row(row)


def test_read_public_reads_gzip_and_mixed_trl_rows(tmp_path):
    path = tmp_path / "trl.jsonl.gz"
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            {"messages": [*USER, {"role": "assistant", "content": "It is blue."}]}]
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        stream.writelines(json.dumps(row) + "\n" for row in rows)
    data = read_public(path, "trl")
    assert [type(r) for r in data.records] == [PreferenceRecord, DemonstrationRecord]
    with pytest.raises(ValueError, match="unknown layout 'ultrafeedback'"):
        read_public(path, "ultrafeedback")


# TRL's examples ("Dataset formats and types"), standard and conversational, as each stage reads them
TRL_FILES = {
    # sft: language modelling (conversational, with a tool turn) and prompt-completion
    "demonstration": [
        {"messages": [{"role": "system", "content": "You can call tools."}, *USER,
                      {"role": "assistant", "content": "Let me look."}, {"role": "tool", "content": "clear"},
                      {"role": "assistant", "content": "It is blue."}]},
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": USER, "completion": [{"role": "assistant", "content": "It is blue."}]},
    ],
    # rm and dpo: preference with an explicit or implicit prompt
    "ranking": [
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": USER, "chosen": [{"role": "assistant", "content": "It is blue."}],
         "rejected": [{"role": "assistant", "content": "It is green."}]},
        {"chosen": [*USER, {"role": "assistant", "content": "It is blue."}],
         "rejected": [*USER, {"role": "assistant", "content": "It is green."}]},
    ],
    # dpo with dpo.loss kto: unpaired preference
    "labeled": [
        {"prompt": "The sky is", "completion": " blue.", "label": True},
        {"prompt": USER, "completion": [{"role": "assistant", "content": "It is green."}], "label": False},
    ],
    # ppo and grpo: prompt-only, with a column for a reward function
    "prompt": [
        {"prompt": "The sky is", "answer": "blue"},
        {"prompt": USER, "answer": "blue"},
    ],
}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_every_stage_reads_trl_files_as_they_are(tmp_path, suffix):
    """What rlhfkit sft, rm, dpo (kto) and ppo / grpo read (``read_records`` with their kinds), without convert-data."""
    files = {}
    for kind, rows in TRL_FILES.items():
        files[kind] = tmp_path / f"{kind}{suffix}"
        if suffix == ".jsonl":
            write_jsonl(files[kind], rows)
        else:  # a Parquet file per row, as datasets writes them (one TRL format per dataset: its rows share columns)
            import datasets

            files[kind] = [tmp_path / f"{kind}-{n}{suffix}" for n in range(len(rows))]
            for path, row in zip(files[kind], rows, strict=True):
                datasets.Dataset.from_list([row]).to_parquet(str(path))
    read = {kind: [record for path in (paths if isinstance(paths, list) else [paths])
                   for record in read_records(path, kind)] for kind, paths in files.items()}
    assert sorted(read["demonstration"], key=repr) == sorted([
        DemonstrationRecord([{"role": "system", "content": "You can call tools."}, *USER,
                             {"role": "assistant", "content": "Let me look."}, {"role": "tool", "content": "clear"}],
                            "It is blue."),
        DemonstrationRecord("The sky is", " blue."),
        DemonstrationRecord(USER, "It is blue."),
    ], key=repr)
    blue_green = ((0,), (1,))
    assert sorted(read["ranking"], key=repr) == sorted([
        RankingRecord("The sky is", (" blue.", " green."), blue_green),
        RankingRecord("The sky is ", ("blue.", "green."), blue_green),
        RankingRecord(USER, ("It is blue.", "It is green."), blue_green),
        RankingRecord(USER, ("It is blue.", "It is green."), blue_green),
    ], key=repr)
    assert sorted(read["labeled"], key=repr) == sorted([
        LabeledRecord("The sky is", " blue.", True), LabeledRecord(USER, "It is green.", False)], key=repr)
    assert sorted(read["prompt"], key=repr) == sorted([
        PromptRecord("The sky is", fields={"answer": "blue"}), PromptRecord(USER, fields={"answer": "blue"})],
        key=repr)


def test_convert_data_trl_keeps_a_prompt_only_row_s_columns(tmp_path):
    """A GRPO prompt file converted with --layout trl keeps the column its reward function reads."""
    source = tmp_path / "grpo.jsonl"
    write_jsonl(source, TRL_FILES["prompt"])
    out = tmp_path / "prompts.jsonl"
    write_jsonl(out, read_public(source, "trl").records)
    assert [row for _, row in iter_jsonl(out)] == TRL_FILES["prompt"]


# --- rlhfkit convert-data -------------------------------------------------------------------------------------


def test_convert_data_command(tmp_path):
    from rlhfkit.cli_public import register

    app = typer.Typer()
    register(app)
    out = tmp_path / "qa.jsonl"
    result = CliRunner().invoke(app, ["convert-data", "--layout", "qa-feedback", "--in", str(shared(QA)),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary == {"rows": 400, "records": 390, "skipped": {"every pair tied": 10}, "out": str(out)}
    assert len(read_records(out, "ranking")) == 390
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?"}\n', encoding="utf-8")
    result = CliRunner().invoke(app, ["convert-data", "--layout", "qa-feedback", "--in", str(bad),
                                      "--out", str(tmp_path / "x.jsonl")])
    message = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == 2 and "bad.jsonl, line 1, field 'passages': expected a list of passages" in message
    result = CliRunner().invoke(app, ["convert-data", "--layout", "nope", "--in", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and "expected one of hh, qa-feedback" in result.output


def test_convert_data_trl_stops_at_a_k_way_ranking_and_writes_nothing(tmp_path):
    """A K-way rankings file given as --layout trl once came out as prompt-only records (exit 0, the completions
    dropped); it must stop at the first ranking row, naming file, line and field, and leave no output."""
    from rlhfkit.cli_public import register

    app = typer.Typer()
    register(app)
    rankings = tmp_path / "rankings.jsonl"
    rows = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},  # a TRL row: fine
            {"prompt": "Name a colour.", "completions": ["Red.", "Blue, or red.", "A fish."], "ranking": [[0, 1], [2]]},
            {"prompt": "Count to two.", "completions": ["1 2", "2 1"], "ranking": [0, 1]}]
    rankings.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out, test_out = tmp_path / "out.jsonl", tmp_path / "test.jsonl"
    for extra in ([], ["--test-out", str(test_out), "--test-size", "1"]):
        result = CliRunner().invoke(app, ["convert-data", "--layout", "trl", "--in", str(rankings), "--out", str(out),
                                          *extra])
        message = " ".join(result.output.split())  # the console wraps long lines
        assert result.exit_code == 2, result.output
        assert "rankings.jsonl, line 2, field 'completions': a K-way ranking" in message
        assert "rlhfkit's own ranking record" in message and '"skipped"' not in message
        assert not out.exists() and not test_out.exists()
    assert [len(r.completions) for r in read_records(rankings, "ranking")] == [2, 3, 2]  # read as it is instead


def test_split_held_out_keeps_prompts_apart_and_is_seeded():
    from rlhfkit.data.public import split_held_out

    records = [PreferenceRecord(prompt=f"q{i % 7}", chosen=f"a{i}", rejected=f"b{i}") for i in range(30)]
    train, test = split_held_out(records, 0.2, seed=3)
    assert len(train) + len(test) == 30 and len(test) >= 6  # whole prompts: at least the 6 asked for
    assert not {r.prompt for r in train} & {r.prompt for r in test}
    assert train == [r for r in records if r in train] and test == [r for r in records if r in test]  # input order
    assert split_held_out(records, 0.2, seed=3) == (train, test)
    assert split_held_out(records, 0.2, seed=4) != (train, test)
    assert len(split_held_out(records, 5, seed=0)[1]) in (5, 8, 9)  # a count: groups of 4 or 5 records
    with pytest.raises(ValueError, match="leaves none for training"):
        split_held_out(records, 30)
    with pytest.raises(ValueError, match="must be positive"):
        split_held_out(records, 0)


def test_convert_data_holds_out_a_test_part_of_the_real_hh_pairs(tmp_path):
    from rlhfkit.cli_public import register

    app = typer.Typer()
    register(app)
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    args = ["convert-data", "--layout", "hh", "--in", str(shared(HH)), "--out", str(train), "--test-out", str(test),
            "--test-size", "200", "--seed", "0"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    train_records, test_records = read_records(train, "preference"), read_records(test, "preference")
    assert summary["records"] == len(train_records) and summary["test_records"] == len(test_records)
    assert 200 <= len(test_records) < 210
    assert len(train_records) + len(test_records) == len(read_public(HH, "hh").records)
    key = lambda r: json.dumps(r.prompt)  # noqa: E731
    assert not {key(r) for r in train_records} & {key(r) for r in test_records}
    again = tmp_path / "again.jsonl"
    assert CliRunner().invoke(app, [*args[:-4], "--test-out", str(again), "--test-size", "200"]).exit_code == 0
    assert again.read_bytes() == test.read_bytes()  # the default seed is 0: the same draw
    result = CliRunner().invoke(app, [*args[:-4], "--test-size", "0"])
    assert result.exit_code == 2 and "must be positive" in result.output
