"""Human win rates: A/B pairs from a run's samples, verdicts back into its summary."""

import json

import pytest
from typer.testing import CliRunner

from rlhfkit import cli
from rlhfkit.data.readers import write_jsonl
from rlhfkit.data.records import DataError
from rlhfkit.evaluate.compare import comparison_rows
from rlhfkit.evaluate.human import ab_pairs, human_win_rates

PROMPTS = [f"prompt {i}" for i in range(6)]


def samples_of(name):
    return [{"prompt": p, "completion": f"{name} answer {i}"} for i, p in enumerate(PROMPTS)]


def test_ab_pairs_show_each_models_output_and_the_baselines_in_a_recorded_random_order():
    samples = {name: samples_of(name) for name in ("sft", "ppo", "dpo")}
    pairs = ab_pairs(samples, ["ppo", "dpo"], "sft", seed=1)
    assert len(pairs) == 12 and len({p["id"] for p in pairs}) == 12
    for pair in pairs:
        names = pair["meta"]["models"]
        assert sorted(names) in (["ppo", "sft"], ["dpo", "sft"])
        index = int(pair["id"].rsplit("-", 1)[1]) - 1
        assert pair["prompt"] == PROMPTS[index]
        assert pair["completions"] == [f"{names[0]} answer {index}", f"{names[1]} answer {index}"]
    firsts = [p["meta"]["models"][0] for p in pairs]
    assert 0 < firsts.count("sft") < len(pairs)  # both orders occur
    assert ab_pairs(samples, ["ppo", "dpo"], "sft", seed=1) == pairs  # the seed fixes the order


def test_ab_pairs_refuse_misaligned_samples():
    samples = {"sft": samples_of("sft"), "ppo": samples_of("ppo")[::-1]}
    with pytest.raises(ValueError, match="different prompts"):
        ab_pairs(samples, ["ppo"], "sft")
    with pytest.raises(ValueError, match="no samples of 'dpo'"):
        ab_pairs(samples, ["dpo"], "sft")


def verdict(first, second, choice):
    return {"prompt": "p", "completions": ["x", "y"], "verdict": choice, "meta": {"models": [first, second]}}


def test_human_win_rates_count_each_verdict_by_which_side_the_model_was_on():
    verdicts = [verdict("ppo", "sft", "a"), verdict("sft", "ppo", "b"), verdict("sft", "ppo", "a"),
                verdict("ppo", "sft", "tie"), verdict("dpo", "sft", "b"), verdict("dpo", "ppo", "a")]
    rates = human_win_rates(verdicts, "sft")
    # ppo: win, win, loss, tie -> (1 + 1 + 0 + 0.5) / 4; dpo: one loss; dpo-vs-ppo is not against the baseline
    assert rates["ppo"]["win_rate"] == pytest.approx(0.625)
    assert (rates["ppo"]["wins"], rates["ppo"]["ties"], rates["ppo"]["losses"]) == (2, 1, 1)
    assert rates["dpo"]["win_rate"] == 0.0 and set(rates) == {"ppo", "dpo"}
    assert rates["ppo"]["low"] <= 0.625 <= rates["ppo"]["high"]


@pytest.mark.parametrize("record, field", [
    ({"verdict": "a", "meta": {}}, "meta"),
    ({"verdict": "left", "meta": {"models": ["ppo", "sft"]}}, "verdict"),
])
def test_bad_verdicts_name_their_line_and_field(record, field):
    with pytest.raises(DataError, match=f"v.jsonl, line 2, field '{field}'"):
        human_win_rates([verdict("ppo", "sft", "a"), record], "sft", source="v.jsonl")


def test_cli_writes_pairs_and_adds_human_win_rates_to_the_summary_and_report(tmp_path):
    run = tmp_path / "run"
    for name in ("sft", "ppo"):
        write_jsonl(run / "samples" / f"{name}.jsonl", samples_of(name))
    summary = {"task": None, "eval_prompts": 6, "baseline": "sft",
               "models": {n: {"eos_rate": 1.0, "length/tokens": 3.0} for n in ("sft", "ppo")}, "win_rates": {}}
    (run / "summary.json").write_text(json.dumps(summary))
    runner = CliRunner()
    result = runner.invoke(cli.app, ["human", "pairs", str(run), "--models", "ppo",
                                     "--out", str(tmp_path / "ab.jsonl")])
    assert result.exit_code == 0, result.output
    pairs = [json.loads(line) for line in (tmp_path / "ab.jsonl").read_text().splitlines()]
    # a labeler who always prefers PPO's output
    write_jsonl(tmp_path / "verdicts.jsonl", [{**p, "verdict": "ab"[p["meta"]["models"].index("ppo")],
                                               "labeler": "ann"} for p in pairs])
    result = runner.invoke(cli.app, ["human", "verdicts", str(run), "--verdicts", str(tmp_path / "verdicts.jsonl")])
    assert result.exit_code == 0, result.output
    updated = json.loads((run / "summary.json").read_text())
    human = updated["win_rates"]["ppo"]["human"]
    assert human["win_rate"] == 1.0 and human["wins"] == 6
    headers, rows = comparison_rows(updated)  # the tables of the CLI and of the report show the column
    assert "win rate vs sft (human)" in headers
    assert rows[1][headers.index("win rate vs sft (human)")].startswith("100.0%")
    result = runner.invoke(cli.app, ["human", "pairs", str(run), "--models", "dpo", "--out", str(tmp_path / "x.jsonl")])
    assert result.exit_code == 2 and "no samples of 'dpo'" in result.output


def test_pairs_judged_in_the_feedback_store_come_back_as_human_win_rates(tmp_path):
    """The whole human loop without the web layer: pairs -> store -> labelers' verdicts -> export -> win rates."""
    from rlhfkit.feedback.store import Store

    samples = {name: samples_of(name) for name in ("sft", "ppo")}
    store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    try:
        assert store.import_pairs(ab_pairs(samples, ["ppo"], "sft", seed=3), replicas=2) == 6
        labelers = [store.create_user(name, "not-a-real-hash") for name in ("ann", "bob")]
        for user in labelers:  # ann always prefers PPO's output; bob always the left one
            while (item := store.next_item(user.id)) is not None:
                choice = "ab"[item.meta["models"].index("ppo")] if user.username == "ann" else "a"
                store.submit(user.id, item.id, {"verdict": choice})
        verdicts = list(store.export("ab"))
    finally:
        store.close()
    assert len(verdicts) == 12 and {v["labeler"] for v in verdicts} == {"ann", "bob"}
    bob_ppo_wins = sum(v["meta"]["models"][0] == "ppo" for v in verdicts if v["labeler"] == "bob")
    rates = human_win_rates(verdicts, "sft")
    assert rates["ppo"]["wins"] == 6 + bob_ppo_wins and rates["ppo"]["losses"] == 6 - bob_ppo_wins
