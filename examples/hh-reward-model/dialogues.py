"""Write the training pairs' dialogues as text records ({"text"}), for the tiny model's tokenizer and pretraining.

    python examples/hh-reward-model/dialogues.py TRAIN.jsonl OUT.jsonl

Each pair gives two texts, its prompt turns followed by one reply and by the other, in the plain form
rlhfkit renders a chat prompt in for a tokenizer without a chat template (``user: ...\n\nassistant: ...``).
Only the training pairs are written: the tiny model's tokenizer and LM never see a held-out pair.
"""

import sys

from rlhfkit.data.readers import read_records, write_jsonl

source, out = sys.argv[1:]
records = read_records(source, "preference")
texts = ({"text": "\n\n".join(f"{m['role']}: {m['content']}" for m in r.prompt) + f"\n\nassistant: {reply}"}
         for r in records for reply in (r.chosen, r.rejected))
print(f"{write_jsonl(out, texts)} dialogues written to {out}")
