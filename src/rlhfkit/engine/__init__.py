"""The one training loop every trainer runs on; nothing here knows an algorithm.

- :mod:`~rlhfkit.engine.loop`: :class:`~rlhfkit.engine.loop.Engine`, the loop (step, log, evaluate,
  checkpoint, resume, ``final/``) with the hooks a trainer fills in (one step, its log record,
  evaluation, the model files and extra state of a checkpoint, ``final/``);
- :mod:`~rlhfkit.engine.accelerator`: the accelerate ``Accelerator`` (DDP, FSDP2, also on CPU) and the
  process group (sums and gathers over processes);
- :mod:`~rlhfkit.engine.sharding`: full weights and optimizer state gathered from FSDP shards, and
  sharded again on resume;
- :mod:`~rlhfkit.engine.checkpoint`: atomic checkpoint directories and loading weights back;
- :mod:`~rlhfkit.engine.rng`: the RNG state of every process;
- :mod:`~rlhfkit.engine.optim`: AdamW and the learning-rate schedules;
- :mod:`~rlhfkit.engine.metrics`: ``metrics.jsonl`` (writing, reading, truncating on resume) and the means
  of a logging window;
- :mod:`~rlhfkit.engine.guard`: the stop on a non-finite loss or gradient;
- :mod:`~rlhfkit.engine.compile`: regional ``torch.compile``;
- :mod:`~rlhfkit.engine.errors`: :class:`~rlhfkit.engine.errors.TrainingError`.
"""
