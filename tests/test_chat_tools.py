"""Tool use in chat records: ``tool_calls``, ``tool`` messages and a record's ``tools``, read, rendered and masked.

The records follow the weather example of transformers' chat-templating guide ("Tool use") and TRL's
conversational format: a system prompt, a user question, an assistant turn that calls
``get_current_temperature``, the tool's result, and the assistant's answer.
"""

import json

import pytest
from test_models_gguf import GGUF, needs_gguf

from rlhfkit.config import SFTConfig, load_config
from rlhfkit.data.collators import ChatTemplateError, encode_conversation, encode_prompt, render_chat, render_prompt
from rlhfkit.data.readers import read_records
from rlhfkit.data.records import Chat, DataError, parse_record, record_to_dict, tools_of
from rlhfkit.models.load import load_tokenizer
from rlhfkit.models.tokenizer import CHAT_TEMPLATE, train_bpe_tokenizer
from rlhfkit.trainers.sft import build_sft_trainer, encode_demonstrations

TOOLS = [{"type": "function", "function": {
    "name": "get_current_temperature",
    "description": "Get the current temperature at a location.",
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "description": "The location, as \"City, Country\""},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["location", "unit"]}}}]
CALL = {"type": "function", "function": {"name": "get_current_temperature",
                                         "arguments": {"location": "Paris, France", "unit": "celsius"}}}
MESSAGES = [
    {"role": "system", "content": "You are a bot that answers weather queries."},
    {"role": "user", "content": "What is the temperature in Paris now?"},
    {"role": "assistant", "tool_calls": [CALL]},
    {"role": "tool", "name": "get_current_temperature", "content": "22.0"},
    {"role": "assistant", "content": "It is 22 degrees Celsius in Paris."},
]
# The OpenAI shape of the same turns: the arguments as a JSON string, the call's id, the tool message's reference.
OPENAI_MESSAGES = [
    *MESSAGES[:2],
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_current_temperature", "arguments": "{\"location\": \"Paris, France\", \"unit\": \"celsius\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "22.0"},
    MESSAGES[4],
]
TOOL_CALL_JSON = '{"location": "Paris, France", "unit": "celsius"}'
TOOLS_JSON = json.dumps(TOOLS[0], ensure_ascii=False)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def small_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A tokenizer trained on the conversation's text, with ``chat_template`` (rlhfkit's by default)."""
    texts = [m.get("content", "") for m in MESSAGES] + [TOOLS_JSON, TOOL_CALL_JSON, "call returned tools:"]
    tokenizer = train_bpe_tokenizer(texts * 30, vocab_size=600)
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def own_tokenizer():
    return small_tokenizer()


def spans_of(tokenizer, example):
    """The decoded runs of consecutive target tokens and of consecutive context tokens."""
    runs: list[tuple[int, list[int]]] = []
    for token, on in zip(example.input_ids, example.loss_mask, strict=True):
        if runs and runs[-1][0] == on:
            runs[-1][1].append(token)
        else:
            runs.append((on, [token]))
    decoded = [(on, tokenizer.decode(ids)) for on, ids in runs]
    return [text for on, text in decoded if on], [text for on, text in decoded if not on]


def encode(tokenizer, records, loss_on):
    return encode_demonstrations(tokenizer, records, max_length=400, max_prompt_length=300, loss_on=loss_on,
                                 source="chat.jsonl")


# --- reading ---------------------------------------------------------------------------------------------------


def test_a_tool_use_file_is_read_as_it_is(tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [
        {"messages": MESSAGES, "tools": TOOLS},
        {"messages": OPENAI_MESSAGES, "tools": TOOLS, "id": "openai"},
        {"messages": MESSAGES[:3], "tools": TOOLS},  # the reply to learn is the tool call itself
    ])
    full, openai, calling = read_records(path, "demonstration")
    assert isinstance(full.prompt, Chat) and full.prompt.tools == TOOLS and tools_of(full.prompt) == TOOLS
    assert full.prompt[2] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert full.prompt[3] == {"role": "tool", "content": "22.0", "name": "get_current_temperature"}
    assert full.completion == "It is 22 degrees Celsius in Paris."
    # the JSON-string arguments are decoded; the call's id and the tool message's reference are kept
    assert openai.prompt[2]["tool_calls"] == [{**CALL, "id": "call_1"}]
    assert openai.prompt[3] == {"role": "tool", "content": "22.0", "tool_call_id": "call_1"}
    assert calling.completion == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    for record in (full, openai, calling):  # and written back as they were read
        row = record_to_dict(record)
        assert row["tools"] == TOOLS and parse_record(row, "demonstration") == record
    assert record_to_dict(calling)["completion"] == [calling.completion]


def test_prompts_and_preferences_carry_the_tools(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": MESSAGES[:4], "tools": TOOLS, "city": "Paris"}])
    prompt, = read_records(path, "prompt")
    assert tools_of(prompt.prompt) == TOOLS and prompt.fields == {"city": "Paris"}  # tools are no reward field
    pair = parse_record({"prompt": MESSAGES[:4], "tools": TOOLS, "chosen": [MESSAGES[4]],
                         "rejected": [{"role": "assistant", "content": "It is cold."}]}, "preference")
    assert tools_of(pair.prompt) == TOOLS and pair.chosen == MESSAGES[4]["content"]
    implicit = parse_record({"tools": TOOLS, "chosen": MESSAGES, "rejected": [*MESSAGES[:4], {
        "role": "assistant", "content": "It is cold."}]}, "preference")  # TRL's implicit prompt
    assert implicit.prompt == Chat(parse_record({"messages": MESSAGES}, "demonstration").prompt, TOOLS)
    assert implicit.prompt != parse_record({"messages": MESSAGES}, "demonstration").prompt  # the tools count


@pytest.mark.parametrize(("change", "field", "message"), [
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].pop("name"),
     "messages[2].tool_calls[0].function.name", "is missing"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments=["Paris"]),
     "messages[2].tool_calls[0].function.arguments", "expected an object (or a JSON string of one), got list"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="location=Paris"),
     "messages[2].tool_calls[0].function.arguments", "is a string but not JSON: Expecting value (column 1)"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
     "messages[2].tool_calls[0].function.arguments", "expected an object (or a JSON string of one), got list"),
    (lambda r: r["messages"][2]["tool_calls"][0].pop("function"), "messages[2].tool_calls[0].function", "is missing"),
    (lambda r: r["messages"][2].update(tool_calls=[]), "messages[2].tool_calls",
     "expected a non-empty list of tool calls, got []"),
    (lambda r: r["messages"][3].pop("content"), "messages[3].content", "is missing (the tool's result)"),
    (lambda r: r["messages"][1].update(tool_calls=[CALL]), "messages[1].tool_calls",
     "only an assistant message calls tools, not a user message"),
    (lambda r: r.update(tools={"get_current_temperature": TOOLS[0]}), "tools",
     "expected a list of function schemas (objects), got dict"),
    (lambda r: r.update(tools=["get_current_temperature"]), "tools[0]",
     "expected a function schema (an object), got str"),
    (lambda r: r.update(tools=[{"type": "function", "function": {"description": "no name"}}]),
     "tools[0].function.name", "is missing"),
])
def test_malformed_tool_use_names_file_line_and_field(tmp_path, change, field, message):
    bad = json.loads(json.dumps({"messages": MESSAGES, "tools": TOOLS}))
    change(bad)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"messages": MESSAGES, "tools": TOOLS}, bad])
    with pytest.raises(DataError) as caught:
        read_records(path, "demonstration")
    assert str(caught.value) == f"{path}, line 2, field {field!r}: {message}"


def test_tools_need_a_conversation_and_compared_replies_are_text():
    with pytest.raises(DataError, match=r"field 'tools': needs a conversational prompt"):
        parse_record({"prompt": "Weather in Paris?", "completion": "Sunny.", "tools": TOOLS}, "demonstration")
    with pytest.raises(DataError, match=r"field 'chosen': a reply that calls tools is read as a demonstration only"):
        parse_record({"prompt": MESSAGES[:2], "chosen": [MESSAGES[2]], "rejected": "It is sunny."}, "preference")


# --- rendering and the loss mask --------------------------------------------------------------------------------

# rlhfkit's template (the trained tokenizer's), as documented in rlhfkit.models.tokenizer, checked by hand.
OWN_RENDERING = (
    "<|system|>\nYou are a bot that answers weather queries.\ntools:\n" + TOOLS_JSON + "<|end|>\n"
    "<|user|>\nWhat is the temperature in Paris now?<|end|>\n"
    "<|assistant|>\ncall get_current_temperature " + TOOL_CALL_JSON + "<|end|>\n"
    "<|tool|>\nget_current_temperature returned 22.0<|end|>\n"
    "<|assistant|>\nIt is 22 degrees Celsius in Paris.<|end|>\n")


def test_own_template_renders_tools_calls_and_results(own_tokenizer):
    tokenizer = own_tokenizer
    record = parse_record({"messages": MESSAGES, "tools": TOOLS}, "demonstration")
    conversation = record.conversation()
    assert render_chat(tokenizer, conversation, tools=TOOLS, add_generation_prompt=False) == OWN_RENDERING
    # without a system message the tools make a system turn of their own
    assert render_prompt(tokenizer, Chat(MESSAGES[1:2], TOOLS)) == (
        "<|system|>\ntools:\n" + TOOLS_JSON + "<|end|>\n<|user|>\nWhat is the temperature in Paris now?<|end|>\n"
        "<|assistant|>\n")


def test_own_template_mask_trains_the_tool_call_and_the_answer_never_the_result(own_tokenizer):
    tokenizer = own_tokenizer
    records = [parse_record({"messages": MESSAGES, "tools": TOOLS}, "demonstration")]
    every, = encode(tokenizer, records, "all_assistant_turns")
    last, = encode(tokenizer, records, "last_assistant_turn")
    assert tokenizer.decode(every.input_ids) == OWN_RENDERING.removesuffix("\n")
    assert every.input_ids == last.input_ids
    targets, context = spans_of(tokenizer, every)
    assert targets == ["call get_current_temperature " + TOOL_CALL_JSON + "<|end|>",
                       "It is 22 degrees Celsius in Paris.<|end|>"]
    assert context == [  # the tool's result is context, with the system part and its tools
        "<|system|>\nYou are a bot that answers weather queries.\ntools:\n" + TOOLS_JSON + "<|end|>\n"
        "<|user|>\nWhat is the temperature in Paris now?<|end|>\n<|assistant|>\n",
        "\n<|tool|>\nget_current_temperature returned 22.0<|end|>\n<|assistant|>\n"]
    assert spans_of(tokenizer, last)[0] == ["It is 22 degrees Celsius in Paris.<|end|>"]
    # a record whose reply is the tool call trains it with either option
    calling = [parse_record({"messages": MESSAGES[:3], "tools": TOOLS}, "demonstration")]
    for option in ("all_assistant_turns", "last_assistant_turn"):
        assert spans_of(tokenizer, encode(tokenizer, calling, option)[0])[0] == [
            "call get_current_temperature " + TOOL_CALL_JSON + "<|end|>"]


def test_plain_form_without_a_chat_template():
    plain = small_tokenizer(None)
    conversation = parse_record({"messages": MESSAGES, "tools": TOOLS}, "demonstration").conversation()
    example = encode_conversation(plain, conversation, max_length=400, max_prompt_length=300)
    assert plain.decode(example.input_ids) == (
        "system: You are a bot that answers weather queries.\ntools:\n" + TOOLS_JSON + "\n\n"
        "user: What is the temperature in Paris now?\n\n"
        "assistant: call get_current_temperature " + TOOL_CALL_JSON + "<|end|>\n\n"
        "tool: get_current_temperature returned 22.0\n\n"
        "assistant: It is 22 degrees Celsius in Paris.<|end|>")
    assert spans_of(plain, example)[0] == ["call get_current_temperature " + TOOL_CALL_JSON + "<|end|>",
                                           "It is 22 degrees Celsius in Paris.<|end|>"]
    # content and calls together, and a tool result without a name
    both = [*MESSAGES[:2], {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL, CALL]},
            {"role": "tool", "content": "22.0"}]
    assert render_chat(plain, both, add_generation_prompt=True).endswith(
        "assistant: Let me check.\ncall get_current_temperature " + TOOL_CALL_JSON + "\ncall get_current_temperature "
        + TOOL_CALL_JSON + "\n\ntool: 22.0\n\nassistant: ")


# A template in the style of Hugging Face's tool-use templates (Hermes/Qwen): the tools as JSON in <tools> in the
# system turn, each call as a <tool_call> JSON object, and the tool's result in <tool_response> in a user turn.
TOOL_TEMPLATE = (
    "{%- if tools -%}"
    "{{ '<|system|>\n' }}{%- if messages[0].role == 'system' -%}{{ messages[0].content + '\n\n' }}{%- endif -%}"
    "{{ 'You may call these functions:\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\n' + tool | tojson }}{%- endfor -%}{{ '\n</tools><|end|>\n' }}"
    "{%- elif messages[0].role == 'system' -%}{{ '<|system|>\n' + messages[0].content + '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{ '<|assistant|>\n' + message.content }}"
    "{%- for call in message.tool_calls or [] -%}"
    "{{ '<tool_call>\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' + call.function.arguments | tojson"
    " + '}\n</tool_call>' }}"
    "{%- endfor -%}{{ '<|end|>\n' }}"
    "{%- elif message.role == 'tool' -%}"
    "{{ '<|user|>\n<tool_response>\n' + message.content + '\n</tool_response><|end|>\n' }}"
    "{%- elif message.role != 'system' -%}{{ '<|' + message.role + '|>\n' + message.content + '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)
TOOL_TEMPLATE_RENDERING = (
    "<|system|>\nYou are a bot that answers weather queries.\n\nYou may call these functions:\n<tools>\n"
    + TOOLS_JSON + "\n</tools><|end|>\n"
    "<|user|>\nWhat is the temperature in Paris now?<|end|>\n"
    "<|assistant|>\n<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": " + TOOL_CALL_JSON
    + "}\n</tool_call><|end|>\n"
    "<|user|>\n<tool_response>\n22.0\n</tool_response><|end|>\n"
    "<|assistant|>\nIt is 22 degrees Celsius in Paris.<|end|>\n")


def test_a_model_template_with_tools_renders_and_masks_them():
    tokenizer = small_tokenizer(TOOL_TEMPLATE)
    records = [parse_record({"messages": OPENAI_MESSAGES, "tools": TOOLS}, "demonstration")]
    assert render_chat(tokenizer, records[0].conversation(), tools=TOOLS,
                       add_generation_prompt=False) == TOOL_TEMPLATE_RENDERING
    every, = encode(tokenizer, records, "all_assistant_turns")
    assert tokenizer.decode(every.input_ids) == TOOL_TEMPLATE_RENDERING.removesuffix("\n")
    targets, context = spans_of(tokenizer, every)
    assert targets == ["<tool_call>\n{\"name\": \"get_current_temperature\", \"arguments\": " + TOOL_CALL_JSON
                       + "}\n</tool_call><|end|>", "It is 22 degrees Celsius in Paris.<|end|>"]
    assert "<tool_response>\n22.0\n</tool_response>" in context[1]  # the result is never a target
    # the prompt a policy continues (PPO, DPO, evaluation) holds the tools too
    prompt = parse_record({"prompt": OPENAI_MESSAGES[:4], "tools": TOOLS}, "prompt").prompt
    assert tokenizer.decode(encode_prompt(tokenizer, prompt)) == TOOL_TEMPLATE_RENDERING.split(
        "It is 22")[0]


def test_a_template_without_tool_support_is_a_clear_error(tmp_path):
    no_tools = small_tokenizer(  # SmolLM2's kind: each message's role and content, nothing else
        "{% for m in messages %}{{ '<|' + m.role + '|>\n' + m.content + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES[:2] + MESSAGES[4:]},
                                                 {"messages": MESSAGES, "tools": TOOLS, "id": "weather"}])
    records = read_records(path, "demonstration")
    assert encode(no_tools, records[:1], "all_assistant_turns")  # no tool use: fine
    with pytest.raises(DataError, match=r"^chat.jsonl, record 2: \(id weather\) the chat template drops the tools "
                                        r"offered \('get_current_temperature' is not in its rendering\)"):
        encode(no_tools, records, "last_assistant_turn")
    with pytest.raises(ChatTemplateError, match=r"drops message 2's tool call"):
        render_chat(no_tools, parse_record({"messages": MESSAGES[:3]}, "demonstration").conversation(),
                    add_generation_prompt=False)


def test_sft_trains_on_a_tool_use_file(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "tools.jsonl", [{"messages": MESSAGES, "tools": TOOLS},
                                                  {"messages": OPENAI_MESSAGES[:3], "tools": TOOLS}] * 4)
    config = load_config(SFTConfig, base={
        "model": {"preset": "tiny", "tokenizer": str(tokenizer_dir)},
        "data": {"train": str(path), "max_length": 512, "max_prompt_length": 448},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "lr": 3e-3, "max_steps": 2, "progress": False},
        "sft": {"loss_on": "all_assistant_turns"}})
    trainer = build_sft_trainer(config)
    spans = [sum(1 for a, b in zip([0, *e.loss_mask], e.loss_mask, strict=False) if b and not a)
             for e in trainer.train_examples]
    assert spans == [2, 1] * 4 and not any(e.truncated for e in trainer.train_examples)
    metrics = trainer.train()
    assert metrics["loss"] == metrics["loss"] and metrics["loss"] > 0


# --- a real template: SmolLM2-135M-Instruct's, read from its GGUF file ------------------------------------------

SMOLLM2_CHAT = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And its population?"},
    {"role": "tool", "content": "Paris: 2,102,650 inhabitants (2023)"},
    {"role": "assistant", "content": "About 2.1 million people live in Paris."},
]
# SmolLM2's template (GGUF metadata tokenizer.chat_template) is ChatML with a default system prompt when the
# conversation has none, and knows no tool use; its EOS is <|im_end|>.
SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(str(GGUF))


@needs_gguf
def test_smollm2_template_masks_every_assistant_turn(smollm2):
    assert "<|im_start|>" in smollm2.chat_template and smollm2.eos_token == "<|im_end|>"
    records = [parse_record({"messages": SMOLLM2_CHAT}, "demonstration")]
    every, = encode(smollm2, records, "all_assistant_turns")
    targets, context = spans_of(smollm2, every)
    assert targets == ["The capital of France is Paris.<|im_end|>",
                       "About 2.1 million people live in Paris.<|im_end|>"]
    assert context == [
        SMOLLM2_SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "\n<|im_start|>user\nAnd its population?<|im_end|>\n<|im_start|>tool\nParis: 2,102,650 inhabitants (2023)"
        "<|im_end|>\n<|im_start|>assistant\n"]
    rendered = smollm2.apply_chat_template(SMOLLM2_CHAT, tokenize=False)
    assert smollm2.decode(every.input_ids) == rendered.removesuffix("\n")
    last, = encode(smollm2, records, "last_assistant_turn")
    assert last.input_ids == every.input_ids
    assert spans_of(smollm2, last)[0] == ["About 2.1 million people live in Paris.<|im_end|>"]
    # SmolLM2's template renders no tool call: a record with one is refused, not trained with the call left out
    with pytest.raises(DataError, match=r"the chat template drops message 1's tool call"):
        encode(smollm2, [parse_record({"messages": MESSAGES[1:]}, "demonstration")], "all_assistant_turns")


def test_sampled_completions_keep_the_prompts_tools(tmp_path, tiny_model, tokenizer):
    """A policy samples from a prompt that offers tools; the samples file keeps them, so the stages after it (rank,
    reward model, DPO) render the same prompt."""
    from rich.console import Console

    from rlhfkit.models.load import save_model
    from rlhfkit.rollout.generate import SamplingConfig
    from rlhfkit.workflows import generate_completions

    save_model(tiny_model, tokenizer, str(tmp_path / "policy"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": MESSAGES[:4], "tools": TOOLS, "id": "paris"}])
    generate_completions(str(tmp_path / "policy"), prompts, tmp_path / "out.jsonl", SamplingConfig(max_new_tokens=3),
                         console=Console(quiet=True))
    row = json.loads((tmp_path / "out.jsonl").read_text(encoding="utf-8"))
    assert row["tools"] == TOOLS and row["id"] == "paris" and list(row)[:3] == ["prompt", "tools", "completion"]
    record, = read_records(tmp_path / "out.jsonl", "prompt")
    assert record.prompt == read_records(prompts, "prompt")[0].prompt
