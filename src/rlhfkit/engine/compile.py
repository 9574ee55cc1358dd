"""Regional ``torch.compile`` (``train.torch_compile``)."""

from __future__ import annotations

import torch


def compile_repeated_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` (inductor, dynamic shapes), in place, each block ``model`` repeats: the modules of the
    classes its ``_no_split_modules`` name (a decoder layer). Regional compilation: the layers share one compiled
    graph, so the compile costs one layer, and varying batch shapes do not recompile. ``nn.Module.compile``
    leaves the weights and state-dict keys as they are. A model that names no block is compiled whole.
    Returns the number of modules compiled.
    """
    names = {name for module in model.modules() for name in getattr(module, "_no_split_modules", None) or ()}
    blocks = [module for module in model.modules() if type(module).__name__ in names] or [model]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
