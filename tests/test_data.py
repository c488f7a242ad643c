"""Offline data utilities: corpus split, tokenizer, block grouping, token budget."""

from __future__ import annotations

import json
import math

import pytest

datasets = pytest.importorskip("datasets")

from peft_bitflip import data  # noqa: E402


def col(ds, name: str) -> list:
    """A column as a plain list (datasets >= 4 returns a lazy Column object)."""
    return list(ds[name])


@pytest.fixture(scope="module")
def corpus():
    return data.local_corpus()


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return data.train_tokenizer(corpus["train"]["text"], vocab_size=512)


# ---------------------------------------------------------------------- corpus split


def test_local_corpus_split_is_deterministic_and_disjoint(corpus):
    from pydoc_data.topics import topics

    again = data.local_corpus()
    assert col(corpus["train"], "topic") == col(again["train"], "topic")
    assert col(corpus["validation"], "text") == col(again["validation"], "text")
    train, val = set(col(corpus["train"], "topic")), set(col(corpus["validation"], "topic"))
    assert train and val and not train & val
    assert train | val == {k for k, v in topics.items() if v.strip()}
    assert corpus["train"].column_names == ["text", "topic"]
    # a larger fraction only moves topics into validation (hash threshold)
    bigger = data.local_corpus(0.5)
    assert val <= set(col(bigger["validation"], "topic"))
    assert len(bigger["validation"]) > len(corpus["validation"])


def test_local_corpus_bad_fraction():
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="validation_fraction"):
            data.local_corpus(bad)
    with pytest.raises(TypeError):
        data.local_corpus("0.1")


def test_instruction_corpus_matches_split():
    ins = data.instruction_corpus()
    docs = data.local_corpus_documents()
    assert ins["train"].column_names == ["prompt", "completion"]
    assert len(ins["validation"]) == len(docs["validation"])
    name = docs["validation"][0][0]
    assert ins["validation"][0]["prompt"] == f"Explain the Python topic '{name}'.\n"
    assert all(0 < len(c) <= 404 for c in ins["train"]["completion"])


# ---------------------------------------------------------------------- loading files


def test_load_txt_json_jsonl_csv(tmp_path):
    txt = tmp_path / "train.txt"
    txt.write_text("first paragraph\nstill first\n\nsecond one\n\n\nthird\n")
    d = data.load_text_datasets(train_file=str(txt), validation_split_percentage=34)
    assert set(d) == {"train", "validation"}
    allt = col(d["validation"], "text") + col(d["train"], "text")
    assert [t.strip() for t in allt] == ["first paragraph\nstill first", "second one", "third"]
    assert len(d["validation"]) == 1  # round(3 * 0.34) = 1, taken from the head

    doc = data.load_text_datasets(
        train_file=str(txt), validation_file=str(txt), txt_sample_by="document"
    )
    assert len(doc["train"]) == 1 and len(doc["validation"]) == 1

    rows = [{"body": f"doc {i}", "id": i} for i in range(10)]
    jl = tmp_path / "a.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    js = tmp_path / "b.json"
    js.write_text(json.dumps(rows[:3]))
    d = data.load_text_datasets(train_file=str(jl), validation_file=str(js), text_column="body")
    assert d["train"].column_names == ["text"]
    assert col(d["train"], "text") == [f"doc {i}" for i in range(10)]
    assert len(d["validation"]) == 3
    raw = data.load_raw_datasets(train_file=str(jl), validation_split_percentage=20)
    assert col(raw["validation"], "id") == [0, 1] and col(raw["train"], "id") == list(range(2, 10))

    csv = tmp_path / "c.csv"
    csv.write_text("text,label\nhello,1\n  ,0\nworld,2\n")
    d = data.load_text_datasets(train_file=str(csv), validation_file=str(csv))
    assert col(d["train"], "text") == ["hello", "world"]  # empty documents are dropped


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.load_raw_datasets(train_file=str(tmp_path / "missing.txt"))
    bad = tmp_path / "x.parquetx"
    bad.write_text("")
    with pytest.raises(ValueError, match="unsupported"):
        data.load_raw_datasets(train_file=str(bad))
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\ntwo\n")
    js = tmp_path / "a.jsonl"
    js.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="same kind"):
        data.load_raw_datasets(train_file=str(txt), validation_file=str(js))
    with pytest.raises(ValueError, match="needs a train_file"):
        data.load_raw_datasets(validation_file=str(txt))
    with pytest.raises(ValueError, match="not both"):
        data.load_raw_datasets("some/dataset", train_file=str(txt))
    with pytest.raises(ValueError, match="validation_split_percentage"):
        data.load_raw_datasets(train_file=str(txt), validation_split_percentage=0)
    with pytest.raises(ValueError, match="cannot split"):
        data.load_raw_datasets(train_file=str(js))  # one example
    with pytest.raises(ValueError, match="text column 'nope'"):
        data.load_text_datasets(train_file=str(txt), text_column="nope")
    with pytest.raises(ValueError, match="txt_sample_by"):
        data.load_raw_datasets(train_file=str(txt), txt_sample_by="sentence")


def test_load_hub_dataset_offline_error(monkeypatch):
    import huggingface_hub.constants

    # offline mode is read at import time: patch the flags (no network round trips)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(RuntimeError, match="embedded offline corpus"):
        data.load_raw_datasets("peft-bitflip/no-such-dataset-xyz")


def test_pick_text_column():
    assert data.pick_text_column(["a", "text"]) == "text"
    assert data.pick_text_column(["body", "id"]) == "body"
    assert data.pick_text_column(["body", "id"], "id") == "id"
    with pytest.raises(ValueError):
        data.pick_text_column([])


# ---------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    assert len(tokenizer) <= 512
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    text = 'The "with" statement  \n\tuses ünïcode 🙂 and ctrl \x00 bytes'
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.eos_token_id not in ids  # nothing is added automatically
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.decode(ids) == text
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<s>", "</s>", "<pad>")
    # the same texts give the same tokenizer
    other = data.train_tokenizer(data.local_corpus()["train"]["text"], vocab_size=512)
    assert other.get_vocab() == tokenizer.get_vocab()


def test_tokenizer_bad_input():
    with pytest.raises(ValueError, match="vocab_size"):
        data.train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(TypeError, match="iterable of strings"):
        data.train_tokenizer("abc")
    with pytest.raises(ValueError, match="at least one"):
        data.train_tokenizer([])
    with pytest.raises(TypeError):
        data.train_tokenizer([b"bytes"])


def test_tiny_llama_config():
    from transformers import LlamaForCausalLM

    cfg = data.tiny_llama_config(300)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert (cfg.num_key_value_heads, cfg.intermediate_size) == (2, 128)
    assert cfg.max_position_embeddings == 256
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    model = LlamaForCausalLM(cfg)
    assert (
        data.count_parameters(model)
        == 2 * 300 * 64 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    )
    with pytest.raises(ValueError):
        data.tiny_llama_config(300, hidden_size=66)
    with pytest.raises(ValueError):
        data.tiny_llama_config(2)


# ---------------------------------------------------------------------- grouping


def _stream(ds, tokenizer):
    out = []
    for t in ds["text"]:
        out += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    return out


def test_tokenize_and_group_full_blocks(corpus, tokenizer):
    val = corpus["validation"]
    block = 37
    blocks = data.tokenize_and_group(val, tokenizer, block, batch_size=10_000)
    assert blocks.column_names == ["input_ids", "attention_mask", "labels"]
    assert all(len(b) == block for b in blocks["input_ids"])
    assert col(blocks, "labels") == col(blocks, "input_ids")
    assert all(set(m) == {1} for m in blocks["attention_mask"])
    stream = _stream(val, tokenizer)
    flat = [t for b in blocks["input_ids"] for t in b]
    assert len(blocks) == len(stream) // block
    assert flat == stream[: len(flat)]


def test_tokenize_and_group_per_batch(corpus, tokenizer):
    val = corpus["validation"]
    blocks = data.tokenize_and_group(val, tokenizer, 50, batch_size=2)
    # each map batch of 2 documents drops its own remainder
    expected = []
    for i in range(0, len(val), 2):
        s = _stream(val.select(range(i, min(i + 2, len(val)))), tokenizer)
        expected += [s[j : j + 50] for j in range(0, len(s) // 50 * 50, 50)]
    assert col(blocks, "input_ids") == expected


def test_tokenize_and_group_dict_and_errors(corpus, tokenizer):
    small = datasets.DatasetDict(
        {k: v.select(range(2)).remove_columns("topic") for k, v in corpus.items()}
    )
    out = data.tokenize_and_group(small, tokenizer, 16)
    assert set(out) == {"train", "validation"} and len(out["train"]) > 0
    tiny = datasets.Dataset.from_dict({"text": ["a b"]})
    with pytest.raises(ValueError, match="no full block of 64 tokens"):
        data.tokenize_and_group(tiny, tokenizer, 64)
    with pytest.raises(ValueError, match="block_size"):
        data.tokenize_and_group(tiny, tokenizer, 0)
    with pytest.raises(TypeError, match="block_size"):
        data.tokenize_and_group(tiny, tokenizer, 8.0)
    with pytest.raises(ValueError, match="text column"):
        data.tokenize_and_group(tiny, tokenizer, 1, text_column="body")
    # without EOS the stream is just the tokens
    blocks = data.tokenize_and_group(tiny, tokenizer, 1, append_eos=False)
    assert [b[0] for b in blocks["input_ids"]] == tokenizer("a b")["input_ids"]


# ---------------------------------------------------------------------- token budget


def test_tokens_per_step():
    assert data.tokens_per_step(8, 1024) == 8192
    assert data.tokens_per_step(1, 2048, 2, 8) == 32768


def test_token_budget_original_8b_run():
    # 8e9 params, 1 % -> 8e7 tokens; 8 GPUs x batch 1 x block 2048 x grad-accum 2
    steps = data.token_budget_steps(
        num_params=8_000_000_000,
        per_device_batch_size=1,
        block_size=2048,
        gradient_accumulation_steps=2,
        world_size=8,
    )
    assert steps == math.ceil(8e7 / 32768) == 2442
    # the original forgot grad accumulation: 4883 steps = twice the budget
    assert (
        data.token_budget_steps(
            num_params=8_000_000_000, per_device_batch_size=1, block_size=2048, world_size=8
        )
        == 4883
    )


@pytest.mark.parametrize(
    "kwargs, steps",
    [
        (dict(num_params=1000, per_device_batch_size=1, block_size=10), 1),  # 10 tokens
        (dict(num_params=100_000, per_device_batch_size=2, block_size=50), 10),  # 1000/100
        (dict(num_params=100_100, per_device_batch_size=2, block_size=50), 11),  # rounds up
        (dict(num_params=100_000, per_device_batch_size=2, block_size=50, world_size=2), 5),
        (
            dict(
                num_params=100_000,
                per_device_batch_size=2,
                block_size=50,
                gradient_accumulation_steps=4,
                world_size=2,
            ),
            2,
        ),  # 1000 / 800
        (dict(num_params=10, per_device_batch_size=4, block_size=64), 1),  # >= 1 token
        (dict(num_params=100_001, per_device_batch_size=1, block_size=1), 1001),  # 1000.01 up
        (dict(num_params=1000, tokens_per_param=22, per_device_batch_size=2, block_size=100), 110),
        (dict(train_tokens=1001, per_device_batch_size=1, block_size=100), 11),
        (dict(train_tokens=1000, num_params=10**9, per_device_batch_size=1, block_size=100), 10),
        (dict(max_train_steps=7, train_tokens=10**6, per_device_batch_size=1, block_size=8), 7),
    ],
)
def test_token_budget_cases(kwargs, steps):
    assert data.token_budget_steps(**kwargs) == steps


def test_budget_tokens_exact_decimal():
    assert data.budget_tokens(205_120) == 2052  # 2051.2 rounds up
    assert data.budget_tokens(8_000_000_000) == 80_000_000
    assert data.budget_tokens(300, 0.07) == 21  # 300 * 0.07 = 21.000000000000004 in floats
    assert data.budget_tokens(1000, 22) == 22_000
    assert data.budget_tokens(1, 0.01) == 1


def test_token_budget_errors():
    base = dict(per_device_batch_size=1, block_size=8)
    with pytest.raises(ValueError, match="needs"):
        data.token_budget_steps(**base)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        data.token_budget_steps(**base, num_params=10, gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="world_size"):
        data.token_budget_steps(**base, num_params=10, world_size=0)
    with pytest.raises(TypeError, match="block_size"):
        data.token_budget_steps(per_device_batch_size=1, block_size=8.5, num_params=10)
    with pytest.raises(ValueError, match="tokens_per_param"):
        data.token_budget_steps(**base, num_params=10, tokens_per_param=0)
    with pytest.raises(ValueError, match="tokens_per_param"):
        data.token_budget_steps(**base, num_params=10, tokens_per_param=float("nan"))
    with pytest.raises(ValueError, match="max_train_steps"):
        data.token_budget_steps(**base, max_train_steps=0)
    with pytest.raises(ValueError, match="train_tokens"):
        data.token_budget_steps(**base, train_tokens=-5)
    with pytest.raises(TypeError, match="num_params"):
        data.token_budget_steps(**base, num_params=True)
