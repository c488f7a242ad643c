"""Tiny models built from configs (no downloads) for the tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 128


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(cfg).eval()


def token_ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def save_trained_tiny_lm(path, steps: int = 60, block: int = 64) -> None:
    """A tiny Llama + tokenizer trained for ``steps`` steps on the embedded corpus, saved to
    ``path`` (clean): good enough that flips measurably raise its perplexity."""
    from peft_bitflip.data import local_corpus, tiny_llama_config, train_tokenizer

    corpus = local_corpus()
    tokenizer = train_tokenizer(corpus["train"]["text"], vocab_size=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    ids = tokenizer("\n\n".join(corpus["train"]["text"]))["input_ids"]
    blocks = torch.tensor(ids[: block * (len(ids) // block)]).view(-1, block)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = blocks[torch.randint(0, len(blocks), (16,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def save_tiny_lm(path):
    """A random tiny Llama and a small tokenizer trained on the embedded corpus, saved to
    ``path`` (clean; fast: for tests of the command line, not of perplexities).  Returns the
    model."""
    from peft_bitflip.data import local_corpus, train_tokenizer

    tokenizer = train_tokenizer(local_corpus()["train"]["text"][:40], vocab_size=300)
    model = tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model
