"""Multi-turn SFT: the loss on every assistant turn (sft.loss_on: all_assistant_turns) or on the last one only."""

import json

import pytest

from rlhfkit.config import ConfigError, SFTConfig, load_config
from rlhfkit.data.collators import encode_conversation, encode_demonstration
from rlhfkit.data.readers import read_records
from rlhfkit.data.records import DataError, parse_record
from rlhfkit.engine.metrics import read_metrics
from rlhfkit.models.tokenizer import train_bpe_tokenizer
from rlhfkit.trainers.sft import build_sft_trainer, encode_demonstrations

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "Checking."},
    {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "It rains."},
]


@pytest.fixture(scope="module")
def small_tokenizer():
    """rlhfkit's tokenizer and template, trained on the conversation's words so each is a token or two."""
    return train_bpe_tokenizer(["Be brief.", "Weather in Oslo?", "Checking.", "rain", "It rains."] * 50,
                               vocab_size=400)


def encode(tokenizer, records, loss_on, **lengths):
    lengths = {"max_length": 200, "max_prompt_length": 100, **lengths}
    return encode_demonstrations(tokenizer, records, loss_on=loss_on, source="chat.jsonl", **lengths)


def parse(messages, **common):
    return [parse_record({"messages": messages, **common}, "demonstration")]


# Checked by hand: rlhfkit's template renders each message as <|role|>\ncontent<|end|>\n (the tool role is no
# special token of this tokenizer, so it is spelt out), and a reply's targets are its tokens and <|end|> (the EOS).
TOKENS = ["<|system|>", "\n", "Be", " brief", ".", "<|end|>", "\n",                       # 0-6
          "<|user|>", "\n", "Weather", " in", " Oslo", "?", "<|end|>", "\n",               # 7-14
          "<|assistant|>", "\n", "Checking", ".", "<|end|>", "\n",                         # 15-20: reply 1 at 17-19
          "<", "|", "t", "o", "o", "l", "|", ">", "\n", "rain", "<|end|>", "\n",           # 21-32
          "<|assistant|>", "\n", "It", " rains", ".", "<|end|>"]                           # 33-38: reply 2 at 35-38


def targets(mask):
    return [position for position, on in enumerate(mask) if on]


def spans_of(tokenizer, example):
    """The decoded runs of consecutive target tokens."""
    spans, span = [], []
    for token, on in zip(example.input_ids, example.loss_mask, strict=True):
        if on:
            span.append(token)
        elif span:
            spans.append(span)
            span = []
    return [tokenizer.decode(s) for s in spans + ([span] if span else [])]


def test_hand_checked_mask_of_both_options(small_tokenizer):
    records = parse(CONVERSATION)
    every, last = (encode(small_tokenizer, records, option)[0]
                   for option in ("all_assistant_turns", "last_assistant_turn"))
    assert [small_tokenizer.decode([t]) for t in every.input_ids] == TOKENS
    assert every.input_ids == last.input_ids  # the options differ in the mask only
    assert targets(every.loss_mask) == [17, 18, 19, 35, 36, 37, 38]
    assert targets(last.loss_mask) == [35, 36, 37, 38]
    assert not every.truncated and not last.truncated
    # the sequence is the template's own rendering (less the newline after the last EOS)
    assert small_tokenizer.decode(every.input_ids) == small_tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False).removesuffix("\n")


def test_one_turn_encodes_as_a_demonstration(small_tokenizer):
    messages = CONVERSATION[:3]
    conversation = encode_conversation(small_tokenizer, messages, max_length=12, max_prompt_length=6)
    demonstration = encode_demonstration(small_tokenizer, messages[:2], "Checking.", max_length=12, max_prompt_length=6)
    assert conversation == demonstration and conversation.truncated


def test_truncation_keeps_the_mask_on_the_replies(small_tokenizer):
    records = parse(CONVERSATION)
    full = encode(small_tokenizer, records, "all_assistant_turns")[0].input_ids
    # the 17 tokens before the first reply keep their last 5, then the sequence is cut at 20 tokens: TOKENS[12:32]
    example = encode(small_tokenizer, records, "all_assistant_turns", max_length=20, max_prompt_length=5)[0]
    assert example.truncated and example.input_ids == full[12:32]
    assert targets(example.loss_mask) == [17 - 12, 18 - 12, 19 - 12]  # the first reply; the second is cut off
    # cut inside the second reply: its first tokens stay targets
    example = encode(small_tokenizer, records, "all_assistant_turns", max_length=37)[0]
    assert example.truncated and example.input_ids == full[:37]
    assert targets(example.loss_mask) == [17, 18, 19, 35, 36]


def test_an_mt_bench_style_record(tmp_path, tokenizer):
    """Two user turns, as MT-bench's questions have (../shared/data/mt-bench: "turns" of user messages), each
    answered; written by hand in TRL's conversational language-modelling form with MT-bench's other columns."""
    path = tmp_path / "mt.jsonl"
    row = {"question_id": 1, "category": "writing", "messages": [
        {"role": "user", "content": "Write a two-line poem about otters."},
        {"role": "assistant", "content": "Otters float on their backs,\nholding paws so they never drift apart."},
        {"role": "user", "content": "Now rewrite it so every line starts with the letter A."},
        {"role": "assistant", "content": "Afloat on their backs the otters lie,\nall paws held so none drift by."}]}
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    records = read_records(path, "demonstration")
    replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
    for option, trained in (("all_assistant_turns", replies), ("last_assistant_turn", replies[1:])):
        example = encode(tokenizer, records, option, max_length=256, max_prompt_length=128)[0]
        assert spans_of(tokenizer, example) == [reply + "<|end|>" for reply in trained]


# ChatML as SmolLM2's template writes it (written here from the format: a default system turn where the chat has
# none; every turn <|im_start|>role\ncontent<|im_end|>\n; <|im_end|> is the EOS)
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_chatml_template_trains_each_reply_through_im_end():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["Weather in Oslo? Checking. It rains."] * 20, trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        chat_template=CHATML)
    example = encode_conversation(tokenizer, CONVERSATION[1:], max_length=200, max_prompt_length=100)
    assert spans_of(tokenizer, example) == ["Checking.<|im_end|>", "It rains.<|im_end|>"]
    rendered = tokenizer.apply_chat_template(CONVERSATION[1:], tokenize=False)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert tokenizer.decode(example.input_ids) == rendered.removesuffix("\n")


def test_a_template_that_rewrites_earlier_turns_is_a_clear_error():
    """A template that shows only the last assistant reply in full (as templates that drop past reasoning do)."""
    tokenizer = train_bpe_tokenizer(["Checking.", "It rains."] * 20, vocab_size=300)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}{{ '<|assistant|>\n...<|end|>\n' }}"
        "{% else %}{{ '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    records = parse(CONVERSATION[:3]) + parse(CONVERSATION, id="q7")  # one reply: no earlier turn to rewrite
    assert encode(tokenizer, records, "last_assistant_turn")  # the last turn alone needs no prefix property
    with pytest.raises(DataError, match=r"^chat.jsonl, record 2: \(id q7\) the chat template breaks the prefix "
                                        r"property: messages\[:4\] with the generation prompt does not begin with "
                                        r"the turns before .*sft.loss_on: last_assistant_turn"):
        encode(tokenizer, records, "all_assistant_turns")


def test_plain_form_without_a_chat_template_ends_each_reply_with_eos():
    tokenizer = train_bpe_tokenizer(["Checking.", "It rains."] * 20, vocab_size=300)
    tokenizer.chat_template = None
    example = encode_conversation(tokenizer, CONVERSATION, max_length=200, max_prompt_length=100)
    assert tokenizer.decode(example.input_ids) == ("system: Be brief.\n\nuser: Weather in Oslo?\n\nassistant: "
                                                   "Checking.<|end|>\n\ntool: rain\n\nassistant: It rains.<|end|>")
    trained = [t for t, on in zip(example.input_ids, example.loss_mask, strict=True) if on]
    assert tokenizer.decode(trained) == "Checking.<|end|>It rains.<|end|>"


def sft_config(tmp_path, tokenizer_dir, train, **sft):
    return load_config(SFTConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)},
        "data": {"train": str(train), "max_length": 96, "max_prompt_length": 48},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "lr": 3e-3, "max_steps": 3, "log_every": 1,
                  "progress": False},
        "sft": sft})


def test_sft_trains_on_every_assistant_turn(tmp_path, tokenizer_dir, task):
    demos = task.demonstrations(task.prompts(16, seed=2), seed=2)
    rows = [{"messages": [{"role": "user", "content": a["prompt"]}, {"role": "assistant", "content": a["completion"]},
                          {"role": "user", "content": b["prompt"]}, {"role": "assistant", "content": b["completion"]}]}
            for a, b in zip(demos[::2], demos[1::2], strict=True)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    trainer = build_sft_trainer(sft_config(tmp_path, tokenizer_dir, path, loss_on="all_assistant_turns"))
    spans = [sum(1 for a, b in zip([0, *e.loss_mask], e.loss_mask, strict=False) if b and not a)
             for e in trainer.train_examples if not e.truncated]
    assert spans and set(spans) == {2}  # both replies of every untruncated chat are targets
    metrics = trainer.train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)
    assert (tmp_path / "run" / "final").is_dir() and "loss" in metrics
    assert "loss_on: all_assistant_turns" in (tmp_path / "run" / "config.yaml").read_text(encoding="utf-8")


def test_loss_on_config_errors(tmp_path):
    base = {"model": {"preset": "tiny", "tokenizer": "tok"}, "data": {"train": "t.jsonl"},
            "train": {"output_dir": str(tmp_path)}}
    assert load_config(SFTConfig, base=base).sft.loss_on == "last_assistant_turn"  # today's behaviour by default
    with pytest.raises(ConfigError, match=r"--set sft.loss_on: sft.loss_on: Input should be 'last_assistant_turn' "
                                          r"or 'all_assistant_turns' \(got 'every_turn'\)"):
        load_config(SFTConfig, base=base, overrides=["sft.loss_on=every_turn"])
    with pytest.raises(ConfigError, match=r"sft.assistant_only_loss: unknown key; did you mean sft.loss_on\?"):
        load_config(SFTConfig, base=base, overrides=["sft.assistant_only_loss=true"])
