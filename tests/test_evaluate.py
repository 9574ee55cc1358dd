"""Evaluation: win rates, diversity, perplexity, and comparing models on held-out prompts."""

import math

import pytest
import torch

from rlhfkit.config import ModelConfig
from rlhfkit.data.collators import encode_prompt
from rlhfkit.evaluate.compare import evaluate_models, response_logprobs, text_perplexity
from rlhfkit.evaluate.metrics import distinct_n, win_rate
from rlhfkit.models.load import load_causal_lm, save_model
from rlhfkit.models.reward import load_reward_model
from rlhfkit.rollout.generate import SamplingConfig, generate


def test_win_rate_counts_ties_as_half_and_brackets_the_rate():
    result = win_rate([1.0, 0.5, 0.2, 0.7], [0.5, 0.5, 0.9, 0.1], n_bootstrap=2000)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["win_rate"] == pytest.approx(2.5 / 4)
    assert 0.0 <= result["low"] <= result["win_rate"] <= result["high"] <= 1.0
    assert result["low"] < result["high"]
    assert win_rate([1.0] * 50, [0.0] * 50)["low"] == 1.0  # no resample can lose
    with pytest.raises(ValueError, match="3 scores for 2"):
        win_rate([1, 2, 3], [1, 2])


def test_win_rate_interval_shrinks_with_more_prompts():
    small = win_rate([1, 0] * 10, [0.5] * 20)
    large = win_rate([1, 0] * 500, [0.5] * 1000)
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 3



def test_win_rate_bootstraps_whole_prompts_when_prompts_repeat():
    """A prompt listed four times is one cluster: the interval is as wide as for the 20 distinct prompts."""
    scores, baseline = [1, 0, 1, 1, 0] * 4, [0.5] * 20
    prompts = [f"p{i}" for i in range(20)]
    distinct = win_rate(scores, baseline, groups=prompts)
    assert distinct == win_rate(scores, baseline)  # one row per prompt: the rows are the clusters
    repeated = win_rate(scores * 4, baseline * 4, groups=prompts * 4)
    naive = win_rate(scores * 4, baseline * 4)
    assert repeated["win_rate"] == naive["win_rate"] == distinct["win_rate"]
    width = distinct["high"] - distinct["low"]
    assert repeated["high"] - repeated["low"] == pytest.approx(width, abs=0.06)
    assert naive["high"] - naive["low"] < 0.7 * width  # rows taken as independent: too narrow
    with pytest.raises(ValueError, match="3 groups for 20 values"):
        win_rate(scores, baseline, groups=prompts[:3])

def test_distinct_n():
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # (a b), (b a), (a b) + (a b)
    assert distinct_n(["a"], 2) == 0.0


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, tokenizer_dir):
    directory = tmp_path_factory.mktemp("evaluate")
    paths = {}
    for name, seed in (("one", 0), ("two", 1)):
        model, tokenizer = load_causal_lm(ModelConfig(preset="tiny", tokenizer=str(tokenizer_dir)), seed=seed)
        save_model(model, tokenizer, str(directory / name))
        paths[name] = str(directory / name)
    reward, tokenizer = load_reward_model(ModelConfig(name_or_path=paths["one"]))
    save_model(reward, tokenizer, str(directory / "rm"))
    return directory, paths


def test_response_logprobs_match_the_sampling_distribution(saved_models, task):
    _, paths = saved_models
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=paths["one"]))
    prompts = task.prompts(4, seed=0)
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7, batch_size=4)
    generations = generate(model, tokenizer, prompts, sampling, seed=0)
    # each response's summed log-prob (EOS included when it ended) equals a hand computation
    logps = response_logprobs(model, tokenizer, prompts, generations, temperature=0.7)
    for prompt, generation, total in zip(prompts, generations, logps, strict=True):
        query = encode_prompt(tokenizer, prompt)
        response = generation.token_ids + ([tokenizer.eos_token_id] if generation.finished else [])
        with torch.no_grad():
            logits = model(torch.tensor([query + response])).logits[0] / 0.7
        expected = sum(torch.log_softmax(logits[len(query) - 1 + i], -1)[token].item()
                       for i, token in enumerate(response))
        assert total == pytest.approx(expected, abs=1e-4)


def test_text_perplexity_is_exp_of_the_mean_token_nll(saved_models):
    _, paths = saved_models
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path=paths["one"]))
    texts = ["The fox lives in a den.", "A whale is a mammal. It lives in the sea."]
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
        nll -= logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum().item()
        count += len(ids) - 1
    expected = math.exp(nll / count)
    assert text_perplexity(model, tokenizer, texts, batch_size=2) == pytest.approx(expected, rel=1e-4)
    assert text_perplexity(model, tokenizer, texts, batch_size=1) == pytest.approx(expected, rel=1e-4)  # padding-free
    assert 1.0 < expected < 2 * tokenizer.vocab_size  # a random model: about the vocabulary size


def test_evaluate_models_judges_compares_and_measures_kl(saved_models, task):
    directory, paths = saved_models
    prompts = task.prompts(12, split="test", seed=0)
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, batch_size=12)
    report, samples = evaluate_models(paths, prompts, sampling, task=task, reward_model=str(directory / "rm"),
                                      reference=paths["one"], heldout_texts=task.pretraining_corpus(4, seed=9), seed=0)
    assert report["baseline"] == "one" and report["prompts"] == 12
    one, two = report["models"]["one"], report["models"]["two"]
    assert one["kl"] == pytest.approx(0.0, abs=1e-4)  # a model is its own reference
    assert two["kl"] > 0.0  # another model's samples are likelier under itself than under "one"
    expected = {"gold/score", "gold/stderr", "rm/score", "eos_rate", "length/tokens", "distinct/1", "distinct/2",
                "heldout/ppl"}
    assert expected <= set(one) and expected <= set(two)
    assert set(report["win_rates"]) == {"two"} and set(report["win_rates"]["two"]) == {"gold", "rm"}
    assert len(samples["two"]) == 12 and {"prompt", "completion", "gold", "rm"} <= set(samples["two"][0])
    assert one["gold/score"] == pytest.approx(sum(r["gold"] for r in samples["one"]) / 12)
    topics = [task.gold_details(r["prompt"], r["completion"])["topic"] for r in samples["one"]]
    assert one["gold/criteria"]["topic"] == pytest.approx(sum(topics) / 12)  # every type has a topic criterion
    questions = [r for r in samples["one"] if task.spec(r["prompt"]).kind == "question"]
    answers = [task.gold_details(r["prompt"], r["completion"])["answer"] for r in questions]
    assert one["gold/criteria"].get("answer") == (pytest.approx(sum(answers) / len(answers)) if answers else None)
    with pytest.raises(ValueError, match="baseline 'three'"):
        evaluate_models(paths, prompts, sampling, baseline="three")


def test_eval_command_writes_the_report_and_samples(saved_models, task, tmp_path):
    import json

    from typer.testing import CliRunner

    from rlhfkit import cli
    from rlhfkit.data.readers import write_jsonl

    directory, paths = saved_models
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in task.prompts(6, split="test", seed=1)])
    write_jsonl(tmp_path / "heldout.jsonl", [{"text": t} for t in task.pretraining_corpus(3, seed=5)])
    runner = CliRunner()
    result = runner.invoke(cli.app, ["eval", "--models", f"a={paths['one']},b={paths['two']}", "--prompts",
                                     str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "eval"), "--task",
                                     "tinyworld", "--reference", paths["one"], "--baseline", "b",
                                     "--max-new-tokens", "6", "--limit", "4", "--heldout-text",
                                     str(tmp_path / "heldout.jsonl")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["prompts"] == 4 and report["baseline"] == "b" and set(report["win_rates"]) == {"a"}
    assert report["models"]["a"]["heldout/ppl"] > 1.0
    assert len((tmp_path / "eval" / "samples" / "a.jsonl").read_text().splitlines()) == 4

    for models, message in (("a", "expected NAME=PATH"), (f"a={paths['one']},a={paths['two']}", "given twice")):
        result = runner.invoke(cli.app, ["eval", "--models", models, "--prompts", str(tmp_path / "prompts.jsonl")])
        assert result.exit_code == 2 and message in result.output, result.output
    result = runner.invoke(cli.app, ["eval", "--models", f"a={paths['one']}", "--prompts",
                                     str(tmp_path / "prompts.jsonl"), "--baseline", "z"])
    assert result.exit_code == 2 and "--baseline 'z'" in result.output, result.output


def test_eval_command_exposes_the_sampling_controls_and_samples_per_prompt(saved_models, task, tmp_path):
    import json

    from typer.testing import CliRunner

    from rlhfkit import cli
    from rlhfkit.data.readers import write_jsonl

    _, paths = saved_models
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in task.prompts(4, split="test", seed=2)])

    def run(name, *options):
        result = CliRunner().invoke(cli.app, ["eval", "--models", f"a={paths['one']},b={paths['two']}", "--prompts",
                                              str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / name),
                                              "--task", "tinyworld", "--max-new-tokens", "6", "--temperature", "1.0",
                                              *options])
        assert result.exit_code == 0, result.output
        rows = {m: [json.loads(line) for line in (tmp_path / name / "samples" / f"{m}.jsonl").read_text().splitlines()]
                for m in ("a", "b")}
        return json.loads((tmp_path / name / "eval.json").read_text()), rows

    report, rows = run("sampled", "--samples-per-prompt", "3")
    assert report["prompts"] == 4 and report["samples_per_prompt"] == 3 and len(rows["a"]) == 12
    groups = [rows["a"][i:i + 3] for i in range(0, 12, 3)]
    assert all(len({r["prompt"] for r in group}) == 1 for group in groups)  # a prompt's samples together
    assert any(len({r["completion"] for r in group}) > 1 for group in groups)  # independent draws
    prompts = [r["prompt"] for r in rows["a"]]
    assert report["win_rates"]["b"]["gold"] == win_rate([r["gold"] for r in rows["b"]],  # bootstrapped by prompt
                                                        [r["gold"] for r in rows["a"]], seed=0, groups=prompts)
    assert report["models"]["a"]["length/tokens"] <= 6

    # top-k 1 and a nucleus of one token are greedy decoding: a prompt's samples are all its greedy completion
    greedy = [r["completion"] for r in run("greedy", "--greedy", "--temperature", "0")[1]["a"]]
    for name, option in (("top-k", ["--top-k", "1"]), ("top-p", ["--top-p", "0.000001"])):
        sampled = [r["completion"] for r in run(name, "--samples-per-prompt", "2", *option)[1]["a"]]
        assert sampled == [text for text in greedy for _ in range(2)], name


def test_inter_labeler_agreement_compares_two_independent_labelers():
    from rlhfkit.evaluate.gold import inter_labeler_agreement, labeler_gold_accuracy
    from rlhfkit.tasks.tinyworld import TinyWorld

    task = TinyWorld()
    prompts = task.prompts(100, seed=3)
    completions = [[d["completion"] for d in task.demonstrations([p] * 4, seed=i)] for i, p in enumerate(prompts)]
    # without noise two labelers rank alike; with pure noise they agree on half the pairs
    assert inter_labeler_agreement(TinyWorld(temperature=0.0), prompts, completions) == 1.0
    assert abs(inter_labeler_agreement(TinyWorld(temperature=1e6), prompts, completions) - 0.5) < 0.05
    # the default labeler lies between, below its agreement with gold (each labeler errs on its own),
    # and the estimate is seeded
    default = inter_labeler_agreement(task, prompts, completions, seed=1)
    assert 0.55 < default < labeler_gold_accuracy(task, prompts, completions, seed=1)
    assert default == inter_labeler_agreement(task, prompts, completions, seed=1)
    # identical texts are tied by every labeler: no pair to agree on
    prompt = prompts[0]
    assert math.isnan(inter_labeler_agreement(task, [prompt], [["Same answer.", " Same  answer."]]))
