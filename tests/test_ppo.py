"""PPO trainer: rollout bookkeeping, every advantage/value option on a tiny model, resume, and the
end-to-end result on the built-in task."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.config import PPOConfig, load_config
from rlhfkit.data.readers import write_jsonl
from rlhfkit.engine.checkpoint import checkpoints
from rlhfkit.engine.errors import TrainingError
from rlhfkit.engine.guard import NONFINITE_FILE
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.rollout.experience import response_masks, truncate_at_stop
from rlhfkit.trainers.ppo import PPOTrainer


def test_response_masks_stop_after_first_eos_or_last_real_token():
    eos, pad = 1, 0
    responses = torch.tensor([[5, 6, 1, 0, 0], [5, 6, 7, 8, 9], [5, 1, 7, 1, 0], [5, 6, 0, 0, 0]])
    mask, finished = response_masks(responses, eos, pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert finished.tolist() == [True, False, True, False]


def test_truncate_at_stop_cuts_after_the_earliest_stop_string():
    assert truncate_at_stop("One. The end. More text", ["The end.", "More"]) == "One. The end."
    assert truncate_at_stop("no stop here", ["The end."]) == "no stop here"


def ppo_config(setup, name, *overrides):
    return load_config(PPOConfig, None, [
        f"train.output_dir={setup / name}", "train.max_steps=2", "train.progress=false", "train.lr=1e-3",
        "train.scheduler=constant", "train.log_every=1", f"model.name_or_path={setup / 'policy'}",
        f"data.train={setup / 'prompts.jsonl'}",
        "data.max_length=64", f"ppo.reward_model={setup / 'rm'}", "ppo.rollout_batch_size=4", "ppo.minibatch_size=4",
        "ppo.ppo_epochs=2", "ppo.max_new_tokens=12", *overrides])


OPTIONS = {
    "gae-reward-value": [],
    "gae-value-head-ema": ["ppo.value_model=head", "ppo.ema_decay=0.9", "ppo.missing_eos_penalty=1.0",
                           "ppo.whiten_rewards=true"],
    "rloo": ["ppo.advantage=rloo", "ppo.samples_per_prompt=2", "ppo.kl_estimator=k3", "ppo.adaptive_kl=true"],
    "grpo-lora-ptx": ["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "model.lora.r=4", "ppo.ptx_coef=0.5",
                      "train.grad_accum=2"],
    "reinforce++": ["ppo.advantage=reinforce++"],
    "dr-grpo-clip-higher": ["ppo.advantage=dr_grpo", "ppo.samples_per_prompt=2", "ppo.clip_range_high=0.28",
                            "ppo.loss_aggregation=constant_length"],
    "gspo": ["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.importance_ratio=sequence",
             "ppo.loss_aggregation=sequence_mean"],
}


def test_torch_compile_is_refused_with_a_message(ppo_setup):
    with pytest.raises(TrainingError, match="ppo: train.torch_compile is not supported yet"):
        PPOTrainer(ppo_config(ppo_setup, "compile", "train.torch_compile=true"))


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_trains_and_logs(ppo_setup, name):
    options = OPTIONS[name]
    ptx = [f"ppo.ptx_data={ppo_setup / 'corpus.jsonl'}"] if "ppo.ptx_coef=0.5" in options else []
    config = ppo_config(ppo_setup, name, *options, *ptx)
    trainer = PPOTrainer(config)
    before = {n: p.detach().clone() for n, p in trainer._unwrapped_policy().named_parameters() if p.requires_grad}
    metrics = trainer.train()
    for metric in ("objective/scores", "objective/kl", "objective/rlhf_reward", "objective/entropy",
                 "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "val/ratio",
                 "time/rollout_s", "time/train_s", "tokens_per_s", "grad_norm"):
        assert metric in metrics and metrics[metric] == metrics[metric], metric  # present and not NaN
    if not any(option.startswith("ppo.advantage=") for option in options):
        assert "loss/value_avg" in metrics and "val/clipfrac_avg" in metrics
    after = trainer._unwrapped_policy().named_parameters()
    changed = any(not torch.equal(before[k], p) for k, p in after if k in before)
    assert changed
    run = ppo_setup / name
    assert (run / "final" / "config.json").exists()
    assert "library_name: rlhfkit" in (run / "final" / "README.md").read_text()  # its model card
    AutoModelForCausalLM.from_pretrained(run / "final")  # plain transformers loads the policy
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "completion", "score"} <= set(samples[0])
    if "ppo.ema_decay=0.9" in options:
        assert (run / "final-ema" / "config.json").exists()


def test_first_update_ratio_is_one_and_kl_zero_at_start(ppo_setup):
    trainer = PPOTrainer(ppo_config(ppo_setup, "ratio"))
    rollout = trainer.rollout(trainer._prompt_batch(0))
    # log-probs taken from generate's logits match a fresh forward; the policy is its own reference
    torch.testing.assert_close(rollout.logprobs, rollout.ref_logprobs, atol=1e-4, rtol=0)
    assert rollout.responses.size(0) == 4 and rollout.advantages.shape == rollout.responses.shape


def test_resume_equals_uninterrupted_run(ppo_setup):
    options = ("train.max_steps=4", "train.save_every=2", "ppo.adaptive_kl=true", "ppo.ema_decay=0.5")
    straight = ppo_config(ppo_setup, "straight", *options)
    PPOTrainer(straight).train()
    resumed = ppo_config(ppo_setup, "resumed", *options)
    trainer = PPOTrainer(resumed)
    real_update = trainer.update

    def dies_in_iteration_three(rollout):
        if trainer.step == 2:
            raise KeyboardInterrupt
        return real_update(rollout)

    trainer.update = dies_in_iteration_three
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    PPOTrainer(resumed).train()
    for weights in ("final", "final-ema"):  # the EMA is resumed from the checkpoint too
        a = AutoModelForCausalLM.from_pretrained(ppo_setup / "straight" / weights).state_dict()
        b = AutoModelForCausalLM.from_pretrained(ppo_setup / "resumed" / weights).state_dict()
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    policy = AutoModelForCausalLM.from_pretrained(ppo_setup / "straight" / "final").state_dict()
    assert any(not torch.equal(policy[name], tensor) for name, tensor in a.items())  # the EMA is no copy
    straight_log, resumed_log = read_metrics(ppo_setup / "straight"), read_metrics(ppo_setup / "resumed")
    assert [r["step"] for r in resumed_log] == [1, 2, 3, 4]
    for x, y in zip(straight_log, resumed_log, strict=True):
        assert x["objective/scores"] == pytest.approx(y["objective/scores"], abs=1e-5)
        assert x["kl_coef"] == pytest.approx(y["kl_coef"])



def test_non_finite_loss_stops_with_the_step_and_the_prompts_of_the_minibatch(ppo_setup):
    trainer = PPOTrainer(ppo_config(ppo_setup, "nan", "train.max_steps=3", "train.save_every=1"))
    real_loss = trainer._micro_loss

    def nan_in_iteration_two(batch, ptx_batch):
        loss, value, stats = real_loss(batch, ptx_batch)
        return (loss * float("nan"), float("nan"), stats) if trainer.step == 1 else (loss, value, stats)

    trainer._micro_loss = nan_in_iteration_two
    with pytest.raises(TrainingError, match=r"\[ppo\] non-finite loss \(nan\) at step 2; the last good checkpoint "
                                            r"is .*checkpoint-1; the step's examples are listed in .*nonfinite_batch"):
        trainer.train()
    run = ppo_setup / "nan"
    assert [p.name for p in checkpoints(run)] == ["checkpoint-1"]
    record = json.loads((run / NONFINITE_FILE).read_text())
    # one minibatch holds the whole rollout of 4 prompts: their positions in the prompt data
    assert record == {"stage": "ppo", "step": 2, "what": "loss (nan)",
                      "example_positions": sorted(trainer._prompt_batch(1))}
    logged = read_metrics(run)
    assert [r["step"] for r in logged] == [1] and logged[0]["grad_norm"] > 0
    assert all(torch.isfinite(p).all() for p in trainer._unwrapped_policy().parameters())  # no update ran


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state whose precision cannot change once set: reset it around
    tests that build trainers of different precisions (and leave it clean for the next test)."""
    from accelerate.state import AcceleratorState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=True)

    reset()
    yield reset
    reset()


def _autocast_spy(trainer) -> dict[str, list[bool]]:
    """Record, for every forward of a decoder layer of each network, whether it ran under bf16 autocast."""
    seen: dict[str, list[bool]] = {}
    networks = {"policy": trainer._unwrapped_policy(), "reference": trainer.reference,
                "value": trainer._unwrapped_value(), "reward": trainer.reward_model}
    for name, network in networks.items():
        def hook(module, args, name=name):
            seen.setdefault(name, []).append(torch.is_autocast_enabled("cpu")
                                             and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        network.model.layers[0].register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_mixed_precision_reaches_every_forward_of_rollout_and_update(ppo_setup, fresh_accelerate, precision):
    trainer = PPOTrainer(ppo_config(ppo_setup, f"autocast-{precision}", f"train.mixed_precision={precision}"))
    seen = _autocast_spy(trainer)
    rollout = trainer.rollout(trainer._prompt_batch(0))
    # generation: one policy forward per new token; the reference, value and reward networks: one each
    assert len(seen["policy"]) == rollout.responses.size(1)
    assert len(seen["reference"]) == len(seen["value"]) == len(seen["reward"]) == 1
    trainer.update(rollout)
    updates = trainer.ppo.ppo_epochs * rollout.responses.size(0) // trainer.ppo.minibatch_size
    assert len(seen["policy"]) == rollout.responses.size(1) + updates and len(seen["value"]) == 1 + updates
    expected = precision == "bf16"
    assert {name: set(flags) for name, flags in seen.items()} == {name: {expected} for name in seen}


def test_bf16_rollout_and_update_match_fp32_within_bf16_tolerance(ppo_setup, fresh_accelerate):
    from rlhfkit.models.policy_value import policy_forward, value_forward

    fp32 = PPOTrainer(ppo_config(ppo_setup, "match-fp32", "train.mixed_precision=no"))
    rollout = fp32.rollout(fp32._prompt_batch(0))
    stats32 = fp32.update(rollout)
    fresh_accelerate()
    bf16 = PPOTrainer(ppo_config(ppo_setup, "match-bf16", "train.mixed_precision=bf16"))
    batch = rollout.select(torch.arange(rollout.responses.size(0)))
    mask = rollout.response_mask.float()
    with torch.no_grad(), bf16.accelerator.autocast():  # the fp32 rollout's sequences, scored in bf16
        ref16 = policy_forward(bf16.reference, batch, 1.0)[0] * mask
        values16 = value_forward(bf16._unwrapped_value(), batch) * mask
    torch.testing.assert_close(ref16, rollout.ref_logprobs, atol=0.1, rtol=0)
    assert (ref16 - rollout.ref_logprobs).abs().sum() / mask.sum() < 0.02
    torch.testing.assert_close(values16, rollout.values, atol=0.05, rtol=0)
    # a bf16 rollout: the policy is its own reference, so the KL is zero up to bf16 rounding
    rollout16 = bf16.rollout(bf16._prompt_batch(1))
    assert rollout16.logprobs.dtype == rollout16.ref_logprobs.dtype == torch.float32
    assert (rollout16.logprobs - rollout16.ref_logprobs).abs().sum() / rollout16.response_mask.sum() < 0.02
    # one update on the same rollout from the same weights: the same statistics within bf16 tolerance
    stats16 = bf16.update(rollout)
    for name in ("loss/policy_avg", "loss/value_avg", "objective/entropy", "val/ratio", "policy/approxkl_avg"):
        assert stats16[name] == pytest.approx(stats32[name], abs=0.02), name


REWARD_FILE = '''
def words(prompts, completions, **fields):
    return [float(len(c.split())) for c in completions]


def answer_length(prompts, completions, answer, **fields):
    return [float(len(a)) for a in answer]


def tokens(prompts, completions, completion_ids, **fields):
    return [float(len(ids)) for ids in completion_ids]
'''


def test_reward_functions_alone_and_beside_the_reward_model(ppo_setup, tmp_path, task):
    from rlhfkit.data.readers import write_jsonl

    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(REWARD_FILE, encoding="utf-8")
    prompts = tmp_path / "prompts.jsonl"  # each prompt record carries a reference answer
    write_jsonl(prompts, [{"prompt": p, "answer": "#### 3"} for p in task.prompts(8, seed=0)])
    sources = (f"ppo.rewards=[{{function: '{reward_file}:words', weight: 0.5}}, "
               f"{{function: '{reward_file}:answer_length', name: ref, weight: 0.25}}, "
               f"{{function: '{reward_file}:tokens', weight: 0.0}}, "
               "{function: overlong_penalty, weight: 0.0, options: {max_tokens: 12, cache_tokens: 4}}]")
    # GRPO rewarded by functions only: no reward model anywhere
    config = ppo_config(ppo_setup, "functions", "ppo.reward_model=null", "ppo.advantage=grpo",
                        "ppo.samples_per_prompt=2", f"data.train={prompts}", sources)
    metrics = PPOTrainer(config).train()
    assert metrics["rewards/ref"] == 6.0 and metrics["rewards/words"] >= 0
    assert "rewards/reward_model" not in metrics
    samples = [json.loads(line) for line in (ppo_setup / "functions" / "samples.jsonl").read_text().splitlines()]
    for sample in samples:
        n_words = len(sample["completion"].split())
        n_tokens = sample["rewards"].pop("tokens")  # the completion's token ids reach the functions, its EOS too
        assert n_tokens == int(n_tokens) and 1 <= n_tokens <= 12  # ppo.max_new_tokens
        assert sample["rewards"].pop("overlong_penalty") == -min(max(n_tokens - 8, 0) / 4, 1.0)
        assert sample["rewards"] == {"words": n_words, "ref": 6.0}
        assert sample["score"] == pytest.approx(0.5 * n_words + 0.25 * 6.0)
    # PPO with the reward model (weight 1) and a function: the score is their weighted sum
    config = ppo_config(ppo_setup, "model-and-function", f"data.train={prompts}",
                        f"ppo.rewards=[{{function: '{reward_file}:words', weight: -0.1}}]")
    metrics = PPOTrainer(config).train()
    assert {"rewards/reward_model", "rewards/words"} <= set(metrics)
    for line in (ppo_setup / "model-and-function" / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        parts = sample["rewards"]
        assert sample["score"] == pytest.approx(parts["reward_model"] - 0.1 * parts["words"], abs=1e-5)


def test_grpo_reads_a_trl_prompt_only_parquet_file_and_its_answer_column(ppo_setup, tmp_path, task):
    """TRL's conversational prompt-only dataset with the column a reward function reads, as datasets writes it."""
    import datasets

    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(REWARD_FILE, encoding="utf-8")
    prompts = tmp_path / "prompts.parquet"
    datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p}], "answer": "#### 12"}
                                for p in task.prompts(4, seed=0)]).to_parquet(str(prompts))
    config = ppo_config(ppo_setup, "trl-prompts", "ppo.reward_model=null", "ppo.advantage=grpo",
                        "ppo.samples_per_prompt=2", f"data.train={prompts}", "train.max_steps=1",
                        f"ppo.rewards=[{{function: '{reward_file}:answer_length', name: ref}}]")
    assert PPOTrainer(config).train()["rewards/ref"] == len("#### 12")


def test_grpo_logs_its_groups_spread_and_trls_grpo_names(ppo_setup, tmp_path, task):
    """reward_std is the mean over groups of their scores' standard deviation, frac_reward_zero_std the share of
    groups that all scored alike; TRL's GRPO names repeat rlhfkit's figures."""
    from rlhfkit.trainers.ppo import TRL_GRPO_METRICS

    reward_file = tmp_path / "my_rewards.py"
    reward_file.write_text(REWARD_FILE, encoding="utf-8")
    common = ["ppo.reward_model=null", "ppo.advantage=grpo", "ppo.samples_per_prompt=4", "ppo.samples_to_log=16"]
    config = ppo_config(ppo_setup, "grpo-words", *common, f"ppo.rewards=[{{function: '{reward_file}:words'}}]")
    PPOTrainer(config).train()
    for step, record in enumerate(read_metrics(ppo_setup / "grpo-words"), start=1):
        assert record["step"] == step
        assert all(record[trl] == record[ours] for trl, ours in TRL_GRPO_METRICS.items())
        assert 0 <= record["frac_reward_zero_std"] < 1 and record["reward_std"] > 0  # sampled word counts differ
    # the samples of the last iteration: every group's spread by hand (the log holds the first samples_to_log)
    samples = [json.loads(line) for line in (ppo_setup / "grpo-words" / "samples.jsonl").read_text().splitlines()]
    groups = torch.tensor([s["score"] for s in samples if s["step"] == 2]).view(4, 4)  # 4 prompts x 4 samples
    assert record["reward_std"] == pytest.approx(groups.std(-1).mean().item(), rel=1e-5)
    assert record["frac_reward_zero_std"] == (groups.amax(-1) == groups.amin(-1)).float().mean().item()
    # a reward that every completion of a prompt shares: no group has a spread
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, ({"prompt": p, "answer": "x" * (i + 1)} for i, p in enumerate(task.prompts(8, seed=0))))
    config = ppo_config(ppo_setup, "grpo-same", *common, f"ppo.rewards=[{{function: '{reward_file}:answer_length'}}]",
                        f"data.train={prompts}")
    metrics = PPOTrainer(config).train()
    assert metrics["frac_reward_zero_std"] == 1.0 and metrics["reward_std"] == 0.0


def test_a_failing_reward_function_stops_the_run_naming_it(ppo_setup, tmp_path):
    from rlhfkit.rewards.functions import RewardFunctionError

    reward_file = tmp_path / "bad.py"
    reward_file.write_text("def half(prompts, completions, **fields):\n    return [0.0] * (len(completions) // 2)\n",
                           encoding="utf-8")
    config = ppo_config(ppo_setup, "bad-function", "ppo.reward_model=null", "ppo.advantage=rloo",
                        "ppo.samples_per_prompt=2", f"ppo.rewards=[{{function: '{reward_file}:half'}}]")
    with pytest.raises(RewardFunctionError, match="'half' returned 4 values for 8 completions"):
        PPOTrainer(config).train()


@pytest.mark.parametrize("overrides, message", [
    (["ppo.reward_model=null"], "ppo needs a reward: ppo.reward_model"),
    (["ppo.rewards=[{function: format, model: runs/rm/final}]"], "exactly one of 'model'"),
    (["ppo.rewards=[{model: runs/rm/final, options: {x: 1}}]"], "a reward model takes none"),
    (["ppo.rewards=[{function: format}, {function: 'my.mod:format'}]"], "logged as rewards/format"),
    (["ppo.reward_model=null", "ppo.rewards=[{function: format}]"], "use ppo.value_model=head"),
])
def test_reward_config_errors(ppo_setup, overrides, message):
    from rlhfkit.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        ppo_config(ppo_setup, "never", *overrides)


def test_reward_sources_are_logged_under_their_names():
    from rlhfkit.config import RewardSourceConfig

    assert RewardSourceConfig(model="runs/rm/final").metric_name == "rm"
    assert RewardSourceConfig(model="runs/rm-large").metric_name == "rm-large"
    assert RewardSourceConfig(function="pkg.mod:exact").metric_name == "exact"
    assert RewardSourceConfig(function="exact_answer", name="math").metric_name == "math"



def test_value_network_is_a_head_on_the_policy_or_the_reward_model(ppo_setup, monkeypatch):
    import transformers

    from rlhfkit.config import ConfigError
    from rlhfkit.models.policy_value import ValueHead, value_network

    policy = AutoModelForCausalLM.from_pretrained(ppo_setup / "policy")
    head = value_network("head", policy, None)
    assert isinstance(head, ValueHead) and head.linear.in_features == policy.config.hidden_size
    reward = value_network("reward", policy, str(ppo_setup / "rm"))
    assert reward.score.out_features == 1
    # a reward model without a decoder's `score` head (e.g. an encoder's `classifier`) cannot give values per token
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda path: torch.nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="needs a decoder reward model with a `score` head"):
        value_network("reward", policy, str(ppo_setup / "rm"))


def test_the_grpo_command_starts_from_trls_grpo_defaults_and_takes_its_names(ppo_setup):
    import yaml
    from typer.testing import CliRunner

    from rlhfkit import cli

    common = [f"train.output_dir={ppo_setup / 'grpo-command'}", "train.max_steps=1", "train.progress=false",
              f"model.name_or_path={ppo_setup / 'policy'}", f"data.train={ppo_setup / 'prompts.jsonl'}",
              "data.max_length=64", f"ppo.reward_model={ppo_setup / 'rm'}", "ppo.rollout_batch_size=2",
              "ppo.minibatch_size=4", "ppo.max_new_tokens=8"]
    args = ["grpo", "--num-generations", "4", "--epsilon", "0.3", *(x for item in common for x in ("--set", item))]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((ppo_setup / "grpo-command" / "config.yaml").read_text())["ppo"]
    assert (saved["advantage"], saved["samples_per_prompt"], saved["clip_range"]) == ("grpo", 4, 0.3)
    assert (saved["kl_coef"], saved["ppo_epochs"]) == (0.0, 1)  # TRL's beta and num_iterations defaults
    assert read_metrics(ppo_setup / "grpo-command")[-1]["kl_coef"] == 0.0
    # `rlhfkit ppo` keeps PPO's own defaults
    assert load_config(PPOConfig, None, [*common, "ppo.minibatch_size=2"]).ppo.advantage == "gae"


def test_informative_groups_are_those_whose_scores_differ():
    from rlhfkit.rollout.experience import informative_groups

    assert informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 0.5, -0.5]), 2) == [1, 3]
    assert informative_groups(torch.tensor([3.0, 3.0, 3.0]), 3) == []


def test_scored_batches_concatenate_with_prompts_left_and_responses_right_padded():
    from rlhfkit.rollout.experience import Scored

    def part(queries, responses, score):
        queries, responses = torch.tensor(queries), torch.tensor(responses)
        return Scored(queries, (queries != 0).long(), responses, (responses != 0).long(), responses.float() / 10,
                      torch.tensor([score] * len(queries)), ["p"] * len(queries), ["t"] * len(queries),
                      torch.arange(len(queries)), {"r": torch.tensor([score] * len(queries))})

    joined = Scored.concat([part([[0, 4, 5]], [[7, 8, 0]], 1.0), part([[3, 4, 5, 6]], [[9, 0]], 2.0)], pad_token_id=0)
    assert joined.queries.tolist() == [[0, 0, 4, 5], [3, 4, 5, 6]]
    assert joined.query_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert joined.responses.tolist() == [[7, 8, 0], [9, 0, 0]]
    assert joined.response_mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    assert joined.logprobs[1].tolist() == pytest.approx([0.9, 0.0, 0.0])
    assert joined.scores.tolist() == [1.0, 2.0] and joined.source_scores["r"].tolist() == [1.0, 2.0]
    assert joined.rows([1]).queries.tolist() == [[3, 4, 5, 6]]


DYNAMIC_REWARD = '''
def half_constant(prompts, completions, constant, **fields):
    return [1.0 if c else float(len(text)) for c, text in zip(constant, completions)]
'''


def test_dynamic_sampling_replaces_groups_that_scored_alike(ppo_setup, tmp_path, task):
    """DAPO's dynamic sampling: prompts whose samples all get the same reward are replaced by further prompts."""
    reward_file = tmp_path / "dynamic.py"
    reward_file.write_text(DYNAMIC_REWARD, encoding="utf-8")
    prompts = task.prompts(24, seed=3)
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "constant": i % 2 == 0} for i, p in enumerate(prompts)])
    constant = {p for i, p in enumerate(prompts) if i % 2 == 0}
    common = ["ppo.reward_model=null", "ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8",
              f"data.train={tmp_path / 'prompts.jsonl'}", f"ppo.rewards=[{{function: '{reward_file}:half_constant'}}]",
              "ppo.samples_to_log=8", "train.max_steps=3"]
    metrics = PPOTrainer(ppo_config(ppo_setup, "dynamic", *common, "ppo.dynamic_sampling=true",
                                    "ppo.dynamic_sampling_max_batches=4")).train()
    assert metrics["rollout/sequences"] == 8  # the rollout keeps its size
    assert 1 < metrics["dynamic_sampling/batches"] <= 4 and 0.2 < metrics["dynamic_sampling/informative_frac"] < 0.8
    assert metrics["frac_reward_zero_std"] <= 0.25  # half the prompts alike without it
    logged = [json.loads(line) for line in (ppo_setup / "dynamic" / "samples.jsonl").read_text().splitlines()]
    kept = [row["prompt"] in constant for row in logged]
    assert sum(kept) <= len(kept) // 4, "groups that scored alike stayed in the rollout"
    # every prompt alike: nothing to replace them with; after the last batch the rollout is filled with them
    write_jsonl(tmp_path / "alike.jsonl", [{"prompt": p, "constant": True} for p in prompts])
    metrics = PPOTrainer(ppo_config(ppo_setup, "alike", *common, f"data.train={tmp_path / 'alike.jsonl'}",
                                    "ppo.dynamic_sampling=true")).train()
    assert metrics["rollout/sequences"] == 8 and metrics["frac_reward_zero_std"] == 1.0
    assert metrics["dynamic_sampling/batches"] == 3 and metrics["dynamic_sampling/informative_frac"] == 0.0


def test_dynamic_sampling_needs_groups():
    with pytest.raises(ValueError, match="dynamic_sampling .* needs ppo.samples_per_prompt >= 2"):
        load_config(PPOConfig, None, ["train.output_dir=x", "model.name_or_path=x", "data.train=x",
                                      "ppo.reward_model=x", "ppo.dynamic_sampling=true"])
