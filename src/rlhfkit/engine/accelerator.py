"""The accelerate ``Accelerator`` of a run (DDP, or FSDP2 also on CPU) and the process group.

Engines (chosen by ``accelerate launch --config_file configs/accelerate/...``, see :func:`make_accelerator`):
DDP, and FSDP2 (torch ``fully_shard``, each process holding a shard of the weights, gradients and
optimizer state). LoRA and ``train.torch_compile`` under FSDP, FSDP version 1, DeepSpeed and Megatron-LM are
refused: untested.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, parse_flag_from_env

from rlhfkit.engine.errors import TrainingError

# engines ``accelerate launch`` can ask for (through these environment flags) that rlhfkit refuses: untested
UNTESTED_ENGINES = {"ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def make_accelerator(mixed_precision: str, **options: Any) -> Accelerator:
    """The accelerate ``Accelerator`` of a run, with the engine ``accelerate launch`` asked for.

    On a machine without a GPU it is told so (``cpu=True``), which is what makes ``torchrun`` processes
    there join one gloo process group (data parallel on CPU). ``train.batch_size`` is the global batch, so
    the learning-rate schedule takes one step per optimizer step whatever the number of processes
    (accelerate's default would step it once per process).

    The engine comes from the environment ``accelerate launch --config_file`` sets (the files in
    ``configs/accelerate/``): DDP, or FSDP version 2 (``ACCELERATE_USE_FSDP``, ``FSDP_VERSION=2``), also on
    CPU (:func:`_fsdp_on_cpu`). FSDP version 1, DeepSpeed and Megatron-LM stop the run here, untested.
    ``options`` go to the ``Accelerator`` as they are (the trackers' ``log_with``, :mod:`rlhfkit.engine.trackers`).
    """
    for flag, engine in UNTESTED_ENGINES.items():
        if parse_flag_from_env(flag):
            raise TrainingError(f"{engine} is not supported: rlhfkit has not been tested with it (its configs in "
                                "configs/accelerate/ are untested). Use DDP or FSDP (fsdp_version: 2).")
    fsdp = FullyShardedDataParallelPlugin() if parse_flag_from_env("ACCELERATE_USE_FSDP") else None
    if fsdp is not None and fsdp.fsdp_version != 2:
        raise TrainingError(f"FSDP version {fsdp.fsdp_version} is not supported (untested); set fsdp_version: 2 "
                            "in the accelerate config (configs/accelerate/fsdp-*.yaml)")
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = Accelerator(cpu=not has_gpu, mixed_precision=resolve_mixed_precision(mixed_precision),
                              fsdp_plugin=fsdp, step_scheduler_with_optimizer=False, **options)
    if fsdp is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
        _fsdp_on_cpu(accelerator, fsdp)
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Switch a CPU run that asked for FSDP from DDP to accelerate's own FSDP2 code path.

    accelerate (1.15) takes the FSDP plugin only for GPU-type devices (the ``MULTI_GPU, MULTI_XPU, ...``
    branch of ``AcceleratorState.__init__``); with ``cpu=True`` it keeps ``MULTI_CPU`` and wraps the model
    in DDP without a word. torch's ``fully_shard`` itself works on CPU with gloo, so this does what that
    branch does on a GPU (the engine, the plugin, its mixed precision), and ``prepare``, ``no_sync``,
    ``clip_grad_norm_`` and ``get_state_dict`` then run accelerate's FSDP2 code unchanged.
    """
    state = accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def resolve_mixed_precision(choice: str) -> str:
    """``auto``: bf16 on a GPU that supports it, else full precision.

    On CPU ``auto`` stays fp32 although fp32 is not always fastest there: on a CPU with native bf16
    (``avx512_bf16`` or AMX) bf16 autocast speeds the matrix products up (PPO on the small preset: 1.33x
    less CPU time per iteration than fp32 on an AMD EPYC with ``avx512_bf16``), but it changes results at
    bf16 rounding, and whether the demo's results hold with it has not been checked, so it is asked for:
    ``mixed_precision: bf16``.
    """
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the run's engine shards the weights over the processes (FSDP2)."""
    return accelerator.distributed_type == DistributedType.FSDP


def refuse_lora_under_fsdp(stage: str, model: torch.nn.Module, sharded: bool) -> None:
    """Stop a run of ``stage`` that would train a LoRA ``model`` under FSDP (untested)."""
    if sharded and hasattr(model, "merge_and_unload"):
        raise TrainingError(f"{stage}: LoRA under FSDP is not supported yet (untested: the adapters' checkpoints "
                            "and the merged final/ model are not gathered from the shards). Use DDP with LoRA.")


def _process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``tensor`` over the processes of the default process group, as a new tensor
    (``tensor`` itself without a process group): the ``reduce_sum`` of :mod:`rlhfkit.algorithms.advantages`."""
    if not _process_group():
        return tensor
    total = tensor.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every process, in process order (on every process; a collective when several)."""
    if not _process_group():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered
