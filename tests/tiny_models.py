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


def _tiny_moe(config_cls, model_cls, seed: int, **extra):
    """A 2-layer MoE causal LM of ``model_cls`` with 4 experts, 2 per token, eager experts."""
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        **extra,
    )
    cfg._experts_implementation = "eager"  # the stock loop: the reference of the flipped one
    model = model_cls(cfg).eval()
    for name, p in model.named_parameters():  # init leaves gpt-oss's router and biases 0
        if "experts" in name or "router" in name:
            with torch.no_grad():
                p.normal_(0.0, 0.05)
    return model


def tiny_mixtral(seed: int = 0):
    """Mixtral: fused experts ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return _tiny_moe(MixtralConfig, MixtralForCausalLM, seed, num_local_experts=4)


def tiny_gpt_oss(seed: int = 0):
    """gpt-oss: transposed experts (E, H, 2I) with biases and an interleaved gate."""
    from transformers import GptOssConfig, GptOssForCausalLM

    return _tiny_moe(
        GptOssConfig, GptOssForCausalLM, seed, num_local_experts=4, head_dim=8,
        layer_types=["full_attention", "sliding_attention"], sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip


def tiny_qwen2_moe(seed: int = 0):
    """Qwen2-MoE: Mixtral-like experts plus a shared expert (an MLP of nn.Linear)."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return _tiny_moe(
        Qwen2MoeConfig, Qwen2MoeForCausalLM, seed, num_experts=4, moe_intermediate_size=48,
        shared_expert_intermediate_size=64,
    )  # fmt: skip


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
