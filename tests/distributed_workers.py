"""Programs that ``test_distributed.py`` runs under ``torchrun`` (each process runs the same command).

``python -m torch.distributed.run --standalone --nproc_per_node N tests/distributed_workers.py KIND OUT ...``:

- ``statistics OUT``: the distributed masked statistics on fixed data, each process holding a different
  (and unequal) share of its rows; process ``r`` writes ``OUT/rank<r>.pt``.
- ``update OUT SETUP ROLLOUT OVERRIDE...``: a PPO trainer of ``test_ppo.ppo_config(SETUP, ...)`` makes one
  ``update()`` on its share of the saved rollout; process 0 writes the weights and statistics to ``OUT``.
- ``rollout OUT SETUP OVERRIDE...``: such a trainer samples its share of the first rollout, process 0 with
  fewer new tokens than the others (its generation ends first); process ``r`` writes ``OUT/rank<r>.pt``: the
  rollout, and the values of the unsharded reward model the value network was initialised from.
- ``online_dpo OUT CONFIG SAMPLES``: an online DPO run of the YAML ``CONFIG`` into ``OUT``; ``SAMPLES`` is
  ``sampled`` (the policy samples) or ``fixed`` (:func:`fixed_samples` stand in for the policy's samples, so that
  runs on any number of processes judge the same samples).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

# rows of the statistics data each process holds (unequal on purpose), by number of processes
STATISTICS_ROWS = {2: [slice(0, 2), slice(2, 7)]}


def statistics_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed values ``[7, 5]`` and a mask with a different number of ones in every row."""
    values = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    lengths = torch.tensor([5, 1, 3, 4, 2, 5, 3])
    return values, (torch.arange(5) < lengths.unsqueeze(-1)).long()


def statistics(out: Path) -> None:
    from rlhfkit.algorithms.advantages import masked_mean, masked_whiten, pool_means
    from rlhfkit.engine.accelerator import sum_over_processes

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    values, mask = statistics_data()
    rows = STATISTICS_ROWS[world][rank]
    values, mask = values[rows], mask[rows]
    pooled, share = pool_means([masked_mean(values, mask), values.max()], [mask.sum(), torch.tensor(1)],
                               sum_over_processes)
    torch.save({"whiten": masked_whiten(values, mask, reduce_sum=sum_over_processes),
                "whiten_unshifted": masked_whiten(values, mask, shift_mean=False, reduce_sum=sum_over_processes),
                "mean": masked_mean(values, mask, reduce_sum=sum_over_processes),
                "pooled": pooled, "share": share}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def rollout_share(rollout, rank: int, world: int):
    """Process ``rank``'s contiguous share of the rows of every field of a ``Rollout``."""
    size = rollout.responses.size(0) // world
    rows = slice(rank * size, (rank + 1) * size)

    def share(value):  # a tensor or list, or a dict of them (each reward source's scores)
        return {name: part[rows] for name, part in value.items()} if isinstance(value, dict) else value[rows]

    return dataclasses.replace(rollout, **{field.name: share(getattr(rollout, field.name))
                                           for field in dataclasses.fields(rollout)
                                           if getattr(rollout, field.name) is not None})


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    """The policy's and the value network's weights after an update, named as in ``PolicyAndValue``
    (``policy.``, ``value.``); under FSDP gathered from the shards (on every process, complete on process 0)."""
    from rlhfkit.engine.sharding import gather_model_state

    weights = gather_model_state(trainer.accelerator, trainer.model)
    if weights is None:
        weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    return {name: tensor.detach().clone() for name, tensor in weights.items()}


def update(out: Path, setup: str, rollout_path: str, *overrides: str) -> None:
    from test_ppo import ppo_config

    from rlhfkit.trainers.ppo import PPOTrainer

    trainer = PPOTrainer(ppo_config(Path(setup), "update-2", *overrides))
    rollout = torch.load(rollout_path, weights_only=False)
    stats = trainer.update(rollout_share(rollout, trainer.rank, trainer.world))
    weights = trained_weights(trainer)  # a collective under FSDP
    if trainer.accelerator.is_main_process:
        torch.save({"weights": weights, "stats": stats}, out / "update.pt")
    trainer.accelerator.wait_for_everyone()


def rollout(out: Path, setup: str, *overrides: str) -> None:
    from test_ppo import ppo_config

    from rlhfkit.models.policy_value import value_forward
    from rlhfkit.trainers.ppo import PPOTrainer

    config = ppo_config(Path(setup), "rollout-2", *overrides)
    trainer = PPOTrainer(config)
    config.ppo.max_new_tokens = 3 if trainer.rank == 0 else 12
    rollout = trainer.rollout(trainer._prompt_share(trainer._prompt_batch(0)))
    batch = {name: getattr(rollout, name) for name in ("queries", "query_mask", "responses", "response_mask")}
    with torch.no_grad():
        values = value_forward(trainer.reward_model, batch) * rollout.response_mask
    torch.save({"rollout": rollout, "values": values}, out / f"rank{trainer.rank}.pt")
    trainer.accelerator.wait_for_everyone()


def fixed_samples(model, tokenizer, prompts, k: int, sampling, **options):
    """``k`` "samples" of each prompt that depend on the prompt alone (``generate_k``'s signature): with a number
    of words ``n``, ``n % 4 == 0``: k copies of its first word (no preference); 1: its first 1, 2, 3, ... words; 2:
    its first 1, 2, 1, 2, ... words (ties); 3: its first k, k - 1, ... 1 words."""
    from rlhfkit.rollout.generate import Generation

    groups = []
    for prompt in prompts:
        words = prompt.split()
        cut = {0: [1] * k, 1: [j + 1 for j in range(k)], 2: [j % 2 + 1 for j in range(k)],
               3: [k - j for j in range(k)]}[len(words) % 4]
        texts = [" ".join(words[:n]) for n in cut]
        groups.append([Generation(text, tokenizer(text, add_special_tokens=False).input_ids, True) for text in texts])
    return groups


def online_dpo(out: Path, config_path: str, samples: str) -> None:
    from rlhfkit.config import OnlineDPOConfig, load_config
    from rlhfkit.trainers import online_dpo as module

    if samples == "fixed":
        module.generate_k = fixed_samples
    module.OnlineDPOTrainer(load_config(OnlineDPOConfig, config_path, [f"train.output_dir={out}"])).train()


if __name__ == "__main__":
    kind, target, *rest = sys.argv[1:]
    {"statistics": statistics, "update": update, "rollout": rollout,
     "online_dpo": online_dpo}[kind](Path(target), *rest)
