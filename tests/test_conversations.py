"""Conversational data, TRL's dataset formats and the separator rule: the loss lands on the assistant's (the
response's) tokens and nowhere else, checked by decoding the tokens that train, through ``tokenize_records``,
``build_datasets`` from a .jsonl file, the Trainer integration's row tokenizer, and the command line."""

import json
import logging

import pytest
from datasets import Dataset

from aletheia_lora.data import (
    FALLBACK_CHAT_TEMPLATE,
    IGNORE_INDEX,
    DataConfig,
    DataFormat,
    build_datasets,
    conversation_tokens,
    detect_format,
    load_records,
    prompt_separator,
    tokenize_records,
)
from aletheia_lora.data.chat import has_generation_tags, normalize_messages
from aletheia_lora.integrations import _TokenizedView, prepare_aletheia_model
from conftest import EOS
from tiny_models import tiny_model

# A ChatML-like template that marks the assistant's text with {% generation %}: masks come from transformers.
GENERATION_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Puts the system message last (as some Mistral templates do): a turn's prefix is not a prefix of the whole.
OUT_OF_ORDER_TEMPLATE = (
    "{% for m in messages if m['role'] != 'system' %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% for m in messages if m['role'] == 'system' %}<|system|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The conftest tokenizer's template ends an assistant turn with EOS and has no generation tags.
TEMPLATES = {"own-prefixes": None, "own-generation-tags": GENERATION_TEMPLATE, "none-fallback": ""}
END = {"own-prefixes": EOS, "own-generation-tags": "<|im_end|>", "none-fallback": EOS}

SYSTEM = {"role": "system", "content": "Answer in one word."}
CHAT = [
    SYSTEM,
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
]


def use_template(tokenizer, name):
    if TEMPLATES[name] is not None:
        tokenizer.chat_template = TEMPLATES[name] or None
    return tokenizer


def trained_runs(tokenizer, input_ids, labels):
    """The decoded runs of consecutive tokens that train (labels equal to the ids there, -100 elsewhere)."""
    assert len(input_ids) == len(labels)
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------------------------
# The separator rule and format detection


@pytest.mark.parametrize(
    ("prompt", "response", "separator"),
    [
        ("Question: two plus two?", "Four.", "\n"),
        ("Question: two plus two? ", "Four.", ""),
        ("The sky is", " blue.", ""),  # TRL's own example: the completion carries the space
        ("def f():\n", "    return 1", ""),
        ("", "Four.", ""),
    ],
)
def test_prompt_separator(prompt, response, separator):
    assert prompt_separator(prompt, response) == separator


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"text": "a", "messages": [SYSTEM]}, DataFormat("text", text_field="text")),
        ({"messages": CHAT, "prompt": "p", "completion": "c"}, DataFormat("conversations", messages_field="messages")),
        ({"conversations": [{"from": "human", "value": "hi"}]},
         DataFormat("conversations", messages_field="conversations")),
        ({"prompt": "p", "completion": "c"}, DataFormat("pairs", prompt_field="prompt", response_field="completion")),
        ({"prompt": "p", "response": "r"}, DataFormat("pairs", prompt_field="prompt", response_field="response")),
        (
            {"prompt": CHAT[:2], "completion": CHAT[2:3]},
            DataFormat("pairs", prompt_field="prompt", response_field="completion", conversational=True),
        ),
    ],
    ids=["text-first", "messages", "sharegpt", "prompt-completion", "prompt-response", "conversational-pairs"],
)  # fmt: skip
def test_formats_are_found_by_trl_column_names(row, expected):
    assert detect_format(Dataset.from_list([row])) == expected


def test_format_errors_name_the_columns():
    with pytest.raises(ValueError, match=r"field 'text' not found in the dataset; fields: body \(nor 'messages'"):
        detect_format(Dataset.from_list([{"body": "a"}]))
    mixed = Dataset.from_list([{"prompt": CHAT[:2], "completion": "Four."}])
    with pytest.raises(ValueError, match="'prompt' and 'completion' in the dataset must both hold text or both"):
        detect_format(mixed)
    with pytest.raises(ValueError, match="field 'chat' not found in the dataset; fields: messages"):
        detect_format(Dataset.from_list([{"messages": CHAT}]), messages_field="chat")
    with pytest.raises(ValueError, match="field 'text' in the dataset must hold conversations"):
        detect_format(Dataset.from_list([{"text": "a"}]), messages_field="text")
    with pytest.raises(ValueError, match="two formats"):
        detect_format(Dataset.from_list([{"messages": CHAT}]), messages_field="messages", prompt_field="p",
                      response_field="r")  # fmt: skip


def test_messages_are_checked_and_sharegpt_rows_converted():
    converted = normalize_messages(
        [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "row 0"
    )
    assert converted == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert normalize_messages([{"role": "user", "content": "q", "tool_calls": None}], "row 0") == [
        {"role": "user", "content": "q"}
    ]
    with pytest.raises(ValueError, match=r"row 3 of 'messages' must be a non-empty list .* got an empty list"):
        normalize_messages([], "row 3 of 'messages'")
    with pytest.raises(ValueError, match="must be a non-empty list .* got str"):
        normalize_messages("hello", "row 0")
    with pytest.raises(ValueError, match=r"row 0: message 1 has no 'role' \(it has \['content'\]\)"):
        normalize_messages([{"role": "user", "content": "q"}, {"content": "a"}], "row 0")


# ---------------------------------------------------------------------------------------------------------------
# conversation_tokens: the three ways a template is used


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_multi_turn_trains_on_the_assistant_turns_only(tiny_tokenizer, name):
    tokenizer = use_template(tiny_tokenizer, name)
    input_ids, labels = conversation_tokens(tokenizer, CHAT)
    assert trained_runs(tokenizer, input_ids, labels) == ["Four." + END[name], "Six." + END[name]]
    template = tokenizer.chat_template or FALLBACK_CHAT_TEMPLATE
    assert input_ids == list(tokenizer.apply_chat_template(CHAT, chat_template=template, return_dict=False))


def test_the_fallback_template_is_plain_text_with_generation_tags(tiny_tokenizer):
    assert has_generation_tags(FALLBACK_CHAT_TEMPLATE)
    tiny_tokenizer.chat_template = None
    input_ids, _ = conversation_tokens(tiny_tokenizer, CHAT[:3])
    assert tiny_tokenizer.decode(input_ids) == (
        "<s>System:\nAnswer in one word.\n\nUser:\nWhat is two plus two?\n\nAssistant:\nFour." + EOS + "\n\n"
    )


class _SlowTokenizer:
    """The tokenizer without character offsets (as a Python tokenizer): spans are tokenized one by one."""

    is_fast = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        assert "return_offsets_mapping" not in kwargs
        return self._tokenizer(*args, **kwargs)


def test_a_tokenizer_without_offsets_gets_the_same_rows(tiny_tokenizer):
    assert conversation_tokens(_SlowTokenizer(tiny_tokenizer), CHAT) == conversation_tokens(tiny_tokenizer, CHAT)
    # transformers needs offsets for {% generation %} masks: without them the turns are found by their prefixes,
    # which take in what the template writes after the tags (here the newline that ends each turn)
    tokenizer = use_template(tiny_tokenizer, "own-generation-tags")
    input_ids, labels = conversation_tokens(_SlowTokenizer(tokenizer), CHAT)
    assert trained_runs(tokenizer, input_ids, labels) == ["Four.<|im_end|>\n", "Six.<|im_end|>\n"]


# After the prompt everything trains (TRL's completion_only_loss), also what a template writes after the tags.
AFTER = {"own-prefixes": EOS, "own-generation-tags": "<|im_end|>\n", "none-fallback": EOS + "\n\n"}


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_completion_trains_and_the_prompts_assistant_turns_are_context(tiny_tokenizer, name):
    tokenizer = use_template(tiny_tokenizer, name)
    input_ids, labels = conversation_tokens(tokenizer, CHAT, train_from=4)
    assert trained_runs(tokenizer, input_ids, labels) == ["Six." + AFTER[name]]


def test_a_prompt_rendered_differently_alone_is_cut_where_it_differs(tiny_tokenizer, caplog):
    from aletheia_lora.data import chat

    tiny_tokenizer.chat_template = OUT_OF_ORDER_TEMPLATE  # the system message moves behind the completion
    chat._warned.clear()
    with caplog.at_level(logging.WARNING, logger="aletheia_lora.data"):
        input_ids, labels = conversation_tokens(tiny_tokenizer, CHAT, train_from=4)
    assert "renders a prompt differently alone than followed by its completion" in caplog.text
    # the rendered prompt ends "...three?<|system|>...", the whole "...three?<|assistant|>Six.<|system|>..."
    assert trained_runs(tiny_tokenizer, input_ids, labels) == ["assistant|>Six.<|system|>Answer in one word."]


def test_a_template_that_renders_turns_out_of_order_is_refused(tiny_tokenizer):
    tiny_tokenizer.chat_template = OUT_OF_ORDER_TEMPLATE
    with pytest.raises(ValueError, match=r"row 7: the chat template does not render .* assistant message 2 .*"
                       r"\{% generation %\} tags"):  # fmt: skip
        conversation_tokens(tiny_tokenizer, CHAT, where="row 7")
    # without a system message the same template is in order
    input_ids, labels = conversation_tokens(tiny_tokenizer, CHAT[1:])
    assert trained_runs(tiny_tokenizer, input_ids, labels) == ["Four.", "Six."]


# ---------------------------------------------------------------------------------------------------------------
# tokenize_records


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_messages_rows_with_a_system_prompt(tiny_tokenizer, name):
    tokenizer = use_template(tiny_tokenizer, name)
    rows = Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[1:3]}])
    out = tokenize_records(rows, tokenizer, max_length=256, system_prompt="Be kind.")
    assert out.column_names == ["input_ids", "attention_mask", "labels"]
    for row in out:
        assert trained_runs(tokenizer, row["input_ids"], row["labels"])[0] == "Four." + END[name]
    own, added = (tokenizer.decode(row["input_ids"]) for row in out)
    assert "Answer in one word." in own and "Be kind." not in own  # a row's own system message wins
    assert "Be kind." in added and added.index("Be kind.") < added.index("What is two plus two?")


def test_conversational_prompt_completion_trains_on_the_completion(tiny_tokenizer):
    rows = Dataset.from_list([{"prompt": CHAT[:4], "completion": CHAT[4:]}])
    row = tokenize_records(rows, tiny_tokenizer, max_length=256)[0]
    assert trained_runs(tiny_tokenizer, row["input_ids"], row["labels"]) == ["Six." + EOS]
    assert tiny_tokenizer.decode(row["input_ids"]).startswith("<|system|>Answer in one word.<|user|>")


@pytest.mark.parametrize(
    ("prompt", "response", "joined"),
    [
        ("Question: two plus two?", "Four.", "Question: two plus two?\nFour."),
        ("The sky is", " blue.", "The sky is blue."),
    ],
)
@pytest.mark.parametrize("names", [("prompt", "completion"), ("prompt", "response")])
def test_string_pairs_follow_the_separator_rule(tiny_tokenizer, prompt, response, joined, names):
    rows = Dataset.from_list([{names[0]: prompt, names[1]: response}])
    row = tokenize_records(rows, tiny_tokenizer, max_length=64)[0]  # found by name, no field given
    assert tiny_tokenizer.decode(row["input_ids"]) == joined + EOS
    assert trained_runs(tiny_tokenizer, row["input_ids"], row["labels"]) == [response + EOS]


def test_string_pairs_with_the_chat_template_and_a_system_prompt(tiny_tokenizer):
    rows = Dataset.from_list([{"q": "two plus two?", "a": "Four."}])
    row = tokenize_records(
        rows, tiny_tokenizer, prompt_field="q", response_field="a", chat_template=True, system_prompt="Be brief."
    )[0]
    assert (
        tiny_tokenizer.decode(row["input_ids"]) == f"<|system|>Be brief.<|user|>two plus two?<|assistant|>Four.{EOS}"
    )
    assert trained_runs(tiny_tokenizer, row["input_ids"], row["labels"]) == ["Four." + EOS]


def test_a_system_prompt_needs_a_system_turn(tiny_tokenizer):
    with pytest.raises(ValueError, match="system_prompt applies to conversations and prompt/response pairs"):
        tokenize_records(Dataset.from_list([{"text": "a b c"}]), tiny_tokenizer, system_prompt="s")
    with pytest.raises(ValueError, match="system_prompt needs a chat template: pass chat_template=True"):
        tokenize_records(Dataset.from_list([{"prompt": "p", "completion": "c"}]), tiny_tokenizer, system_prompt="s")


def test_conversations_cut_before_an_assistant_token_are_dropped(tiny_tokenizer, caplog):
    long = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "Yes."}]
    rows = Dataset.from_list([{"messages": m} for m in (CHAT, CHAT[1:3], long, CHAT[:2])])
    with caplog.at_level(logging.WARNING, logger="aletheia_lora.data"):
        out = tokenize_records(rows, tiny_tokenizer, max_length=40)  # the first answer of CHAT starts at token 51
    assert "dropped 3 of 4 conversation rows with no assistant tokens within max_length=40" in caplog.text
    assert trained_runs(tiny_tokenizer, out[0]["input_ids"], out[0]["labels"]) == ["Four." + EOS]
    with pytest.raises(ValueError, match="no conversation row has an assistant token within max_length=4"):
        tokenize_records(rows, tiny_tokenizer, max_length=4)


def test_the_fallback_template_is_announced_once(tiny_tokenizer, caplog):
    from aletheia_lora.data import chat

    tiny_tokenizer.chat_template = None
    chat._warned.clear()
    with caplog.at_level(logging.WARNING, logger="aletheia_lora.data"):
        for _ in range(2):
            tokenize_records(Dataset.from_list([{"messages": CHAT}]), tiny_tokenizer)
    notice = "the tokenizer has no chat template: conversations are rendered with aletheia-lora's plain one"
    assert caplog.text.count(notice) == 1


# ---------------------------------------------------------------------------------------------------------------
# build_datasets from .jsonl files


def _check_every_row(tokenizer, datasets, expected_runs):
    for ds in datasets:
        assert len(ds) > 0
        for row in ds:
            assert trained_runs(tokenizer, row["input_ids"], row["labels"]) in expected_runs


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_build_datasets_messages_file(tmp_path, tiny_tokenizer, name):
    tokenizer = use_template(tiny_tokenizer, name)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}] * 5)
    cfg = DataConfig(data=str(path), general_data=None, max_length=256, system_prompt="Be kind.")
    train, evaluation, _ = build_datasets(cfg, tokenizer)
    assert len(train) + len(evaluation) == 10
    _check_every_row(
        tokenizer, [train, evaluation], [["Four." + END[name], "Six." + END[name]], ["Four." + END[name]]]
    )
    decoded = [tokenizer.decode(ids) for ids in list(train["input_ids"])]
    assert all("Be kind." in text or "Answer in one word." in text for text in decoded)


def test_build_datasets_trl_conversational_prompt_completion_file(tmp_path, tiny_tokenizer):
    rows = [{"prompt": CHAT[:2], "completion": CHAT[2:3]}, {"prompt": CHAT[:4], "completion": CHAT[4:]}] * 4
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    train, evaluation, _ = build_datasets(
        DataConfig(data=str(path), general_data=None, max_length=256), tiny_tokenizer
    )
    _check_every_row(tiny_tokenizer, [train, evaluation], [["Four." + EOS], ["Six." + EOS]])


@pytest.mark.parametrize("chat_template", [False, True])
@pytest.mark.parametrize("names", [("prompt", "completion"), ("prompt", "response")])
def test_build_datasets_string_pairs_file(tmp_path, tiny_tokenizer, chat_template, names):
    pairs = [("Question: two plus two?", "Four."), ("The sky is", " blue."), ("def f():\n", "    return 1")]
    path = write_jsonl(tmp_path / "pairs.jsonl", [{names[0]: p, names[1]: r} for p, r in pairs] * 4)
    fields = {"prompt_field": names[0], "response_field": names[1]} if chat_template else {}  # else found by name
    cfg = DataConfig(data=str(path), general_data=None, max_length=64, chat_template=chat_template, **fields)
    train, evaluation, _ = build_datasets(cfg, tiny_tokenizer)
    assert len(train) + len(evaluation) == 12
    _check_every_row(tiny_tokenizer, [train, evaluation], [[r + EOS] for _, r in pairs])
    if not chat_template:
        decoded = {tiny_tokenizer.decode(ids) for ids in list(train["input_ids"]) + list(evaluation["input_ids"])}
        assert decoded == {
            "Question: two plus two?\nFour." + EOS,
            "The sky is blue." + EOS,
            "def f():\n    return 1" + EOS,
        }


def test_build_datasets_names_the_flag_and_the_file(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(
        ValueError, match=r"--data: field 'text' not found in .*odd\.jsonl; fields: question, answer \(nor 'messages'"
    ):
        build_datasets(DataConfig(data=str(path), general_data=None), tiny_tokenizer)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "a b c d e f"}] * 4)
    with pytest.raises(ValueError, match="--system-prompt applies to conversations and prompt/response pairs"):
        build_datasets(DataConfig(data=str(text), general_data=None, system_prompt="s", max_length=4), tiny_tokenizer)


def test_load_records_checks_a_messages_field(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    assert load_records(path, messages_field="messages")["messages"][0][1]["content"] == "What is two plus two?"
    with pytest.raises(ValueError, match=r"field 'chat' not found in .*chat\.jsonl; fields: messages"):
        load_records(path, messages_field="chat")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"messages_field": "m", "prompt_field": "p", "response_field": "r"}, "--messages-field and --prompt-field"),
        ({"messages_field": "m", "chat_template": True}, "conversations .--messages-field. always use"),
        ({"messages_field": " "}, "--messages-field must be a column name"),
        ({"system_prompt": 3}, "--system-prompt must be text"),
    ],
)
def test_data_config_checks_the_new_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_the_new_settings_are_flags_with_help():
    from aletheia_lora.cli import build_parser

    _, parsers = build_parser()
    for command in ("probe", "train", "run"):
        actions = {a.dest: a for a in parsers[command]._actions}
        for name in ("messages_field", "system_prompt"):
            assert name in actions and actions[name].help, (command, name)
        args = parsers[command].parse_args(["--messages-field", "chat", "--system-prompt", "Be brief."])
        assert (args.messages_field, args.system_prompt) == ("chat", "Be brief.")


# ---------------------------------------------------------------------------------------------------------------
# The Trainer integration's row tokenizer


@pytest.mark.parametrize(
    ("row", "runs"),
    [
        ({"messages": CHAT}, ["Four." + EOS, "Six." + EOS]),
        ({"prompt": CHAT[:4], "completion": CHAT[4:]}, ["Six." + EOS]),
        ({"prompt": "Question: two plus two?", "completion": " Four."}, [" Four." + EOS]),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello."}]}, ["Hello." + EOS]),
        ({"text": None, "messages": CHAT[1:3]}, ["Four." + EOS]),  # a mixed dataset's empty column
    ],
    ids=["messages", "conversational-prompt-completion", "prompt-completion", "sharegpt", "mixed"],
)
def test_the_row_tokenizer_masks_all_but_the_assistant(tiny_tokenizer, row, runs):
    probed = _TokenizedView([row], tiny_tokenizer, max_length=256)[0]
    assert trained_runs(tiny_tokenizer, probed["input_ids"], probed["labels"]) == runs


def test_the_row_tokenizer_names_what_is_wrong(tiny_tokenizer):
    def row(value):
        return _TokenizedView([value], tiny_tokenizer, max_length=64)[0]

    with pytest.raises(ValueError, match="row 0: 'prompt' and 'completion' must both be strings or both lists of "
                       "messages, got list and str"):  # fmt: skip
        row({"prompt": CHAT[:2], "completion": "Four."})
    with pytest.raises(ValueError, match=r"row 0: its 'messages' hold no assistant turn to train on"):
        row({"messages": CHAT[:2]})
    with pytest.raises(ValueError, match=r"row 0: 'text' must be a string, got int"):
        row({"text": 3})
    with pytest.raises(ValueError, match=r"has none of .* \(it has \[\]; None: \['text'\]\)"):
        row({"text": None})


@pytest.mark.parametrize(
    "rows",
    [
        [{"messages": CHAT}, {"messages": CHAT[1:3]}] * 2,
        [{"prompt": CHAT[:2], "completion": CHAT[2:3]}] * 4,
    ],
    ids=["messages", "conversational-prompt-completion"],
)
def test_prepare_aletheia_model_probes_conversations(tiny_tokenizer, rows):
    model = tiny_model("llama", 4)
    model.resize_token_embeddings(len(tiny_tokenizer))
    _, report = prepare_aletheia_model(
        model, Dataset.from_list(rows), tokenizer=tiny_tokenizer, probe_batches=2, r=4, lora_alpha=8
    )
    # the probe counts the tokens that train: the assistant's, not the prompts'
    view = _TokenizedView(rows, tiny_tokenizer, max_length=512)
    trained = [sum(label != IGNORE_INDEX for label in view[i]["labels"][1:]) for i in range(len(rows))]
    assert 0 < report.layer_scores.meta["tokens"] <= 2 * max(trained)
    assert len(report.selected_layers) == 2


# ---------------------------------------------------------------------------------------------------------------
# The command line on TRL-style conversational rows


@pytest.mark.parametrize(
    "rows",
    [
        [{"messages": CHAT}, {"messages": CHAT[1:3]}] * 6,
        [{"prompt": CHAT[:2], "completion": CHAT[2:3]}] * 12,
    ],
    ids=["messages", "conversational-prompt-completion"],
)
def test_run_on_conversational_rows(tiny_checkpoint, tmp_path, rows):
    from aletheia_lora.cli import main

    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_checkpoint), "--data", str(data), "--general-data", "none",
            "--max-length", "64", "--max-steps", "2", "--batch-size", "2", "--probe-batches", "2",
            "--system-prompt", "Be brief.", "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["eval_after"]["target"]["loss"] > 0


# ---------------------------------------------------------------------------------------------------------------
# The same tokens train as under TRL's SFTTrainer


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", ["own-generation-tags", "none-fallback"])
def test_the_probe_masks_what_trl_sft_trainer_trains_on(tmp_path, tiny_tokenizer, name):
    trl = pytest.importorskip("trl")
    tokenizer = use_template(tiny_tokenizer, name)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE  # TRL needs one set; the probe falls back to it anyway
    tokenizer.pad_token = tokenizer.eos_token
    rows = [
        {"messages": CHAT},
        {"prompt": CHAT[:4], "completion": CHAT[4:]},
        {"prompt": "Question: two plus two?", "completion": " Four."},
    ]
    model = tiny_model("llama", 2)
    model.resize_token_embeddings(len(tokenizer))
    for row in rows:
        args = trl.SFTConfig(
            output_dir=str(tmp_path),
            max_length=512,
            assistant_only_loss="messages" in row,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list([row]), processing_class=tokenizer
        )
        theirs = trainer.train_dataset[0]
        ours = _TokenizedView([row], tokenizer, max_length=512)[0]
        assert ours["input_ids"] == theirs["input_ids"], row
        assert ours["labels"] == theirs["labels"], row
