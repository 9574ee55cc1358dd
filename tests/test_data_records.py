"""Record types, ranking pairs, validation errors and the JSON form of records."""

from __future__ import annotations

import json
import pickle

import pytest

from rlhfkit.data.readers import read_records
from rlhfkit.data.records import (
    RECORD_KINDS,
    DataError,
    DemonstrationRecord,
    PreferenceRecord,
    PromptRecord,
    RankingRecord,
    parse_record,
    record_to_dict,
)


def ranking(completions: int, order: list) -> RankingRecord:
    return parse_record(
        {"prompt": "p", "completions": [f"c{i}" for i in range(completions)], "ranking": order}, "ranking"
    )


# --- pairs -------------------------------------------------------------------------------------


def test_pairs_k2():
    assert ranking(2, [1, 0]).pairs() == [(1, 0)]


def test_pairs_k4_without_ties_in_exact_order():
    record = ranking(4, [2, 0, 3, 1])
    assert record.ranking == ((2,), (0,), (3,), (1,))
    assert record.pairs() == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]


def test_pairs_k4_with_ties():
    record = ranking(4, [[0, 2], [1], [3]])
    assert record.pairs() == [(0, 1), (0, 3), (2, 1), (2, 3), (1, 3)]


def test_tie_groups_are_sorted_and_bare_indices_are_groups_of_one():
    record = ranking(4, [[2, 0], 1, [3]])
    assert record.ranking == ((0, 2), (1,), (3,))
    assert record.pairs() == [(0, 1), (0, 3), (2, 1), (2, 3), (1, 3)]


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_pairs_count_without_ties_is_k_choose_2(k):
    pairs = ranking(k, list(range(k))).pairs()
    assert len(pairs) == k * (k - 1) // 2
    assert all(winner < loser for winner, loser in pairs)


def test_to_preferences_follows_pairs_and_keeps_id_labeler_meta():
    record = parse_record(
        {
            "prompt": "p",
            "completions": ["a", "b", "c"],
            "ranking": [[1], [0, 2]],
            "id": 9,
            "labeler": "L1",
            "meta": {"batch": 2},
        },
        "ranking",
    )
    assert record.to_preferences() == [
        PreferenceRecord("p", "b", "a", id="9", labeler="L1", meta={"batch": 2}),
        PreferenceRecord("p", "b", "c", id="9", labeler="L1", meta={"batch": 2}),
    ]


def test_preference_as_ranking():
    preference = PreferenceRecord("p", "good", "bad", id="x")
    as_ranking = preference.as_ranking()
    assert as_ranking == RankingRecord("p", ("good", "bad"), ((0,), (1,)), id="x")
    assert as_ranking.to_preferences() == [preference]


def test_ranking_kind_accepts_a_pairwise_object():
    record = parse_record({"prompt": "p", "chosen": "good", "rejected": "bad", "id": 3}, "ranking")
    assert record == RankingRecord("p", ("good", "bad"), ((0,), (1,)), id="3")


@pytest.mark.parametrize(
    "completions, groups",
    [(("a",), ((0,),)), (("a", "b"), ((0,), (0,))), (("a", "b"), ((0,), (2,))), (("a", "b"), ((0, 1), ()))],
)
def test_ranking_record_checks_its_ranking_when_built_directly(completions, groups):
    with pytest.raises(ValueError):
        RankingRecord("p", completions, groups)


# --- parsing -----------------------------------------------------------------------------------


def test_prompt_record_text_and_chat():
    assert parse_record({"prompt": "Hi"}, "prompt") == PromptRecord("Hi")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "u1"}]
    record = parse_record({"prompt": chat}, "prompt")
    # Message keys other than role and content are dropped.
    assert record.prompt == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def test_demonstration_from_messages():
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    record = parse_record({"messages": messages}, "demonstration")
    assert record == DemonstrationRecord(messages[:-1], "A2")


def test_demonstration_with_prompt_and_messages_but_no_completion_reads_the_messages():
    # ultrachat-style rows carry the first user turn as "prompt" next to the full "messages".
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    record = parse_record({"prompt": "Q", "messages": messages}, "demonstration")
    assert record == DemonstrationRecord([{"role": "user", "content": "Q"}], "A")


def test_demonstration_with_chat_prompt_and_completion():
    record = parse_record({"prompt": [{"role": "user", "content": "Q"}], "completion": "A"}, "demonstration")
    assert record == DemonstrationRecord([{"role": "user", "content": "Q"}], "A")


def test_extra_keys_are_ignored_and_int_ids_become_strings():
    record = parse_record(
        {"prompt": "p", "completion": "c", "id": 17, "source": "web", "score": 0.5, "labeler": "ann"},
        "demonstration",
    )
    assert record == DemonstrationRecord("p", "c", id="17", labeler="ann")


def test_null_optional_fields_count_as_absent():
    record = parse_record({"prompt": "p", "id": None, "labeler": None, "meta": None}, "prompt")
    assert record == PromptRecord("p")


def test_text_is_kept_verbatim():
    record = parse_record({"prompt": "  p\n", "completion": " c "}, "demonstration")
    assert (record.prompt, record.completion) == ("  p\n", " c ")


def test_unknown_kind_is_a_value_error():
    with pytest.raises(ValueError, match="unknown record kind 'sft'"):
        parse_record({"prompt": "p"}, "sft")


# --- validation errors -------------------------------------------------------------------------

GOOD = {
    "prompt": {"prompt": "ok"},
    "demonstration": {"prompt": "ok", "completion": "fine"},
    "ranking": {"prompt": "ok", "completions": ["a", "b"], "ranking": [1, 0]},
    "preference": {"prompt": "ok", "chosen": "a", "rejected": "b"},
}
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


def rank(completions, order):
    return {"prompt": "p", "completions": completions, "ranking": order}


# (kind, bad object, field, exact message)
BAD_RECORDS = [
    ("prompt", ["not", "an", "object"], None, "expected a JSON object, got list"),
    ("prompt", {"id": 1}, "prompt", "is missing"),
    ("prompt", {"prompt": None}, "prompt", "is null"),
    ("prompt", {"prompt": 5}, "prompt", "expected a string or a list of messages, got int"),
    ("prompt", {"prompt": ""}, "prompt", "is empty"),
    ("prompt", {"prompt": " \n\t"}, "prompt", "is empty"),
    ("prompt", {"prompt": []}, "prompt", "has no messages"),
    ("prompt", {"prompt": ["hi"]}, "prompt[0]", "expected a message object, got str"),
    ("prompt", {"prompt": [{"content": "hi"}]}, "prompt[0].role", "is missing"),
    ("prompt", {"prompt": [{"role": "user"}]}, "prompt[0].content", "is missing"),
    (
        "prompt",
        {"prompt": [USER, {"role": "bot", "content": "x"}]},
        "prompt[1].role",
        "unknown role 'bot'; expected one of ('system', 'user', 'assistant', 'tool')",
    ),
    ("prompt", {"prompt": [{"role": "user", "content": "  "}]}, "prompt[0].content", "is empty"),
    (
        "prompt",
        {"prompt": [{"role": "user", "content": 3}]},
        "prompt[0].content",
        "expected a string, got int",
    ),
    ("prompt", {"prompt": "p", "id": 1.5}, "id", "expected a string or an integer, got float"),
    ("prompt", {"prompt": "p", "id": True}, "id", "expected a string or an integer, got bool"),
    ("prompt", {"prompt": "p", "labeler": 3}, "labeler", "expected a string, got int"),
    ("prompt", {"prompt": "p", "meta": "x"}, "meta", "expected an object, got str"),
    ("demonstration", {"prompt": "p", "completion": 3}, "completion", "expected a string, got int"),
    ("demonstration", {"prompt": "p"}, "completion", "is missing"),
    ("demonstration", {"prompt": "p", "completion": "  "}, "completion", "is empty"),
    ("demonstration", {"completion": "c"}, "prompt", "is missing"),
    ("demonstration", {"messages": "hi"}, "messages", "expected a list of messages, got str"),
    ("demonstration", {"messages": []}, "messages", "has no messages"),
    ("demonstration", {"messages": [USER]}, "messages", "the last message must be the assistant's reply"),
    (
        "demonstration",
        {"messages": [ASSISTANT]},
        "messages",
        "needs at least one message before the assistant's reply",
    ),
    (
        "demonstration",
        {"messages": [USER, {"role": "assistant", "content": ""}]},
        "messages[1].content",
        "is empty",
    ),
    (
        "demonstration",
        {"messages": [{"role": "human", "content": "q"}, ASSISTANT]},
        "messages[0].role",
        "unknown role 'human'; expected one of ('system', 'user', 'assistant', 'tool')",
    ),
    ("ranking", rank(["a"], [0]), "completions", "needs at least 2 completions, got 1"),
    ("ranking", rank("ab", [0, 1]), "completions", "expected a list of strings, got str"),
    ("ranking", rank(["a", " "], [0, 1]), "completions[1]", "is empty"),
    ("ranking", rank(["a", 2], [0, 1]), "completions[1]", "expected a string, got int"),
    ("ranking", {"prompt": "p", "completions": ["a", "b"]}, "ranking", "is missing"),
    ("ranking", rank(["a", "b"], "0,1"), "ranking", "expected a list, got str"),
    ("ranking", rank(["a", "b", "c"], [0, 1]), "ranking", "ranks 2 indices but there are 3 completions"),
    ("ranking", rank(["a", "b"], [[0, 1], [1]]), "ranking", "ranks 3 indices but there are 2 completions"),
    ("ranking", rank(["a", "b", "c"], [0, 0, 1]), "ranking", "index 0 appears more than once"),
    (
        "ranking",
        rank(["a", "b", "c", "d"], [0, 1, 2, 5]),
        "ranking",
        "index 5 is out of range for 4 completions",
    ),
    ("ranking", rank(["a", "b"], [0, -1]), "ranking", "index -1 is out of range for 2 completions"),
    ("ranking", rank(["a", "b"], [0, "1"]), "ranking", "index '1' is not an integer"),
    ("ranking", rank(["a", "b"], [True, 0]), "ranking", "index True is not an integer"),
    ("ranking", rank(["a", "b"], [0, 1.0]), "ranking", "index 1.0 is not an integer"),
    ("ranking", rank(["a", "b", "c"], [[0, 1], [], [2]]), "ranking", "has an empty tie group"),
    ("ranking", rank(["a", "b"], [[0, 1]]), "ranking", "ties every completion, so it prefers none"),
    (
        "ranking",
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        "rejected",
        "is identical to 'chosen'",
    ),
    (
        "preference",
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        "rejected",
        "is identical to 'chosen'",
    ),
    ("preference", {"prompt": "p", "chosen": "", "rejected": "b"}, "chosen", "is empty"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": " "}, "rejected", "is empty"),
    ("preference", {"prompt": "p", "chosen": "a"}, "rejected", "is missing"),
    (
        "preference",
        {"prompt": "p", "chosen": ["a"], "rejected": "b"},
        "chosen[0]",
        "expected a message object, got str",
    ),
    (
        "preference",
        {"prompt": "p", "chosen": [USER], "rejected": "b"},
        "chosen",
        "expected a string or a list of one assistant message, got messages of roles user (an rlhfkit completion "
        "is one reply)",
    ),
    (
        "demonstration",
        {"prompt": "p", "completion": [ASSISTANT, ASSISTANT]},
        "completion",
        "expected a string or a list of one assistant message, got messages of roles assistant, assistant (an "
        "rlhfkit completion is one reply)",
    ),
    (
        "preference",
        {"chosen": "a", "rejected": "b"},
        "prompt",
        "is missing, and 'chosen' and 'rejected' share no leading words (no implicit prompt)",
    ),
    (
        "preference",
        {"chosen": [USER, ASSISTANT], "rejected": [{"role": "user", "content": "bye"}, ASSISTANT]},
        "prompt",
        "is missing, and 'chosen' and 'rejected' start with different messages (no implicit prompt)",
    ),
    (
        "preference",
        {"chosen": [USER, ASSISTANT], "rejected": [USER, {"role": "assistant", "content": "hi"}, USER, ASSISTANT]},
        "rejected",
        "expected one assistant message after the implicit prompt (the leading messages both sides share: 1), got 3",
    ),
    (
        "preference",
        {"chosen": "The sky is blue.", "rejected": [USER, ASSISTANT]},
        "prompt",
        "is missing; for an implicit prompt 'chosen' and 'rejected' must be both strings or both lists of messages",
    ),
    (
        "demonstration",
        {"text": "The sky is blue."},
        "text",
        "a language-modelling row is pretraining text (rlhfkit pretrain reads it); a demonstration needs 'prompt' "
        "and 'completion', or 'messages'",
    ),
    (
        "preference",
        rank(["a", "b"], [0, 1]),
        "chosen",
        "is missing (a K-way ranking needs kind 'ranking')",
    ),
]


@pytest.mark.parametrize("kind, obj, field, message", BAD_RECORDS)
def test_bad_record_at_line_3_names_file_line_and_field(tmp_path, kind, obj, field, message):
    path = tmp_path / "data.jsonl"
    lines = [GOOD[kind], GOOD[kind], obj, GOOD[kind]]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    with pytest.raises(DataError) as caught:
        read_records(path, kind)
    error = caught.value
    assert (error.source, error.line, error.field, error.message) == (str(path), 3, field, message)
    where = f"{path}, line 3" if field is None else f"{path}, line 3, field {field!r}"
    assert str(error) == f"{where}: {message}"


@pytest.mark.parametrize("kind, obj, field, message", BAD_RECORDS)
def test_parse_record_raises_the_same_errors(kind, obj, field, message):
    with pytest.raises(DataError) as caught:
        parse_record(obj, kind, source="s.json", line=7, unit="record")
    assert (caught.value.field, caught.value.message) == (field, message)
    assert str(caught.value).startswith("s.json, record 7")


def test_the_good_objects_of_the_error_table_are_valid():
    for kind, obj in GOOD.items():
        parse_record(obj, kind)


# --- DataError ---------------------------------------------------------------------------------


def test_data_error_message_and_attributes():
    error = DataError(
        "index 5 is out of range for 4 completions", source="data/train.jsonl", line=12, field="ranking"
    )
    assert (
        str(error) == "data/train.jsonl, line 12, field 'ranking': index 5 is out of range for 4 completions"
    )
    assert (error.source, error.line, error.field) == ("data/train.jsonl", 12, "ranking")
    assert error.message == "index 5 is out of range for 4 completions"
    assert isinstance(error, ValueError)


def test_data_error_leaves_out_unknown_parts():
    assert str(DataError("bad", line=4, field="prompt")) == "line 4, field 'prompt': bad"
    assert str(DataError("bad", source="x.csv")) == "x.csv: bad"
    assert str(DataError("bad")) == "bad"
    assert str(DataError("bad", source="d", line=2, unit="row")) == "d, row 2: bad"


def test_data_error_survives_pickling():
    # DataLoader workers send exceptions back to the main process by pickling them.
    error = DataError("is empty", source="a.jsonl", line=3, field="completion")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == str(error)
    assert (copy.source, copy.line, copy.field, copy.message) == ("a.jsonl", 3, "completion", "is empty")


# --- JSON form ---------------------------------------------------------------------------------


def test_record_to_dict_writes_flat_rankings_without_ties_and_groups_with_ties():
    assert record_to_dict(ranking(3, [2, 0, 1])) == {
        "prompt": "p",
        "completions": ["c0", "c1", "c2"],
        "ranking": [2, 0, 1],
    }
    assert record_to_dict(ranking(3, [[2, 0], [1]]))["ranking"] == [[0, 2], [1]]


def test_record_to_dict_omits_none_and_keeps_set_fields():
    assert record_to_dict(PreferenceRecord("p", "a", "b")) == {"prompt": "p", "chosen": "a", "rejected": "b"}
    assert record_to_dict(PromptRecord("p", id="1", labeler="L", meta={"k": [1]})) == {
        "prompt": "p",
        "id": "1",
        "labeler": "L",
        "meta": {"k": [1]},
    }


def test_record_to_dict_rejects_other_objects():
    with pytest.raises(TypeError):
        record_to_dict({"prompt": "p"})


ROUND_TRIP = [
    ("prompt", PromptRecord("Tell me a joke.", id="a1")),
    ("prompt", PromptRecord([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}])),
    ("demonstration", DemonstrationRecord("Q", "A", labeler="L", meta={"source": "web"})),
    ("demonstration", DemonstrationRecord([{"role": "user", "content": "Q"}], "A")),
    ("ranking", RankingRecord("Q", ("a", "b", "c"), ((1,), (0,), (2,)), id="r")),
    ("ranking", RankingRecord("Q", ("a", "b", "c", "d"), ((0, 2), (1,), (3,)))),
    ("preference", PreferenceRecord("Q", "yes", "no", id="7")),
]


@pytest.mark.parametrize("kind, record", ROUND_TRIP)
def test_record_to_dict_parses_back_to_the_same_record(kind, record):
    as_json = json.loads(json.dumps(record_to_dict(record)))
    assert parse_record(as_json, kind) == record


def test_record_kinds():
    assert RECORD_KINDS == ("prompt", "demonstration", "ranking", "preference", "labeled")


def test_prompt_records_keep_their_other_keys_as_fields_and_read_gsm8k():
    record = parse_record({"prompt": "2+2?", "answer": "#### 4", "level": 1, "id": 7}, "prompt")
    assert record.prompt == "2+2?" and record.id == "7" and record.fields == {"answer": "#### 4", "level": 1}
    assert parse_record(record_to_dict(record), "prompt") == record  # written back as they were read
    assert parse_record({"prompt": "hi"}, "prompt").fields is None
    gsm8k = parse_record({"question": "How many?", "answer": "3 + 4 = 7\n#### 7"}, "prompt")
    assert gsm8k.prompt == "How many?" and gsm8k.fields == {"answer": "3 + 4 = 7\n#### 7"}
    with pytest.raises(DataError, match="line 3, field 'question'"):
        parse_record({"question": ""}, "prompt", source="q.jsonl", line=3)
