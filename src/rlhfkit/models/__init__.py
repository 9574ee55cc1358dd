"""Models and tokenizers: build from presets, load from HF directories, LoRA, saving."""
