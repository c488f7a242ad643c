"""The original "aixsim" model family as transformers ``LlamaConfig``s, and pretraining budgets.

The original pretrained torchtitan ``llama3`` models ("aixsim" flavors): SwiGLU FFN, GQA, RMSNorm
(eps 1e-5), RoPE theta 10000, no biases, untied embeddings, FFN hidden size
``128 * ceil(int(1.3 * int(8 * dim / 3)) / 128)``.  ``aixsim_config`` builds the same
architecture as a ``LlamaConfig`` (RoPE without the llama3 scaling the original's HF export
added by mistake).  ``PretrainPlan`` turns a token budget (``token_num_scale`` x non-embedding
parameters, 22 by default as in the original) into optimizer steps for any number of GPUs and
gradient accumulation steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from transformers import LlamaConfig

__all__ = ["FLAVORS", "PretrainPlan", "aixsim_config", "ffn_hidden_size", "count_params"]

# flavor: (dim, layers, heads, kv heads)
FLAVORS: dict[str, tuple[int, int, int, int]] = {
    "tiny": (64, 2, 4, 2),
    "debug": (128, 2, 4, 2),
    "60M": (384, 22, 6, 2),
    "200M": (768, 24, 12, 4),
    "400M": (960, 30, 15, 5),
    "600M": (1152, 32, 18, 6),
    "1.1B": (1536, 32, 24, 8),
}
"""Model sizes of the original's aixsim family (``tiny`` is ours, for CPU smoke runs)."""

ORIGINAL_VOCAB = 49152  # HuggingFaceTB/cosmo2-tokenizer


def ffn_hidden_size(dim: int, multiple_of: int = 128, ffn_dim_multiplier: float = 1.3) -> int:
    """torchtitan's SwiGLU hidden size: ``128 * ceil(int(1.3 * int(8 * dim / 3)) / 128)``."""
    hidden = int(ffn_dim_multiplier * int(2 * (4 * dim) / 3))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def aixsim_config(flavor: str, vocab_size: int = ORIGINAL_VOCAB, max_seq_len: int = 2048, **kw):
    """A ``LlamaConfig`` of the aixsim ``flavor`` (see :data:`FLAVORS`); ``kw`` overrides fields."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; known flavors: {list(FLAVORS)}")
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    dim, layers, heads, kv_heads = FLAVORS[flavor]
    values = dict(
        vocab_size=vocab_size,
        hidden_size=dim,
        intermediate_size=ffn_hidden_size(dim),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=dim // heads,
        hidden_act="silu",
        max_position_embeddings=max_seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )
    values.update(kw)
    rope_theta = values.pop("rope_theta")
    config = LlamaConfig(**values)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    return config


def count_params(config: LlamaConfig, exclude_embedding: bool = True) -> int:
    """Parameters of a Llama ``config``, computed from its sizes (no model is built).

    ``exclude_embedding`` leaves out the input embedding only (the untied output head counts),
    as the original's budget did.
    """
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q = d * config.num_attention_heads * head_dim
    kv = 2 * d * config.num_key_value_heads * head_dim
    o = config.num_attention_heads * head_dim * d
    per_layer = q + kv + o + 3 * d * f + 2 * d  # attention, SwiGLU, two RMSNorm weights
    total = config.num_hidden_layers * per_layer + d  # + final norm
    total += d * v  # output head
    if not config.tie_word_embeddings and not exclude_embedding:
        total += v * d
    elif config.tie_word_embeddings and exclude_embedding:
        total -= d * v  # tied: the head is the embedding
    return total


@dataclass(frozen=True)
class PretrainPlan:
    """How many optimizer steps a token budget takes.

    ``tokens = token_num_scale * params`` (params: non-embedding, output head included);
    ``tokens_per_step = per_device_batch * grad_accum * world_size * seq_len``;
    ``steps = ceil(tokens / tokens_per_step)``; ``warmup_steps = int(warmup_fraction * steps)``.
    """

    params: int
    token_num_scale: float
    per_device_batch: int
    grad_accum: int
    world_size: int
    seq_len: int
    warmup_fraction: float = 0.2

    def __post_init__(self):
        for name in ("params", "per_device_batch", "grad_accum", "world_size", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.token_num_scale > 0 and math.isfinite(self.token_num_scale)):
            raise ValueError(f"token_num_scale must be > 0, got {self.token_num_scale!r}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction!r}")

    @property
    def tokens(self) -> int:
        return math.ceil(self.token_num_scale * self.params)

    @property
    def tokens_per_step(self) -> int:
        return self.per_device_batch * self.grad_accum * self.world_size * self.seq_len

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_fraction * self.steps)

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "tokens": self.tokens,
            "tokens_per_step": self.tokens_per_step,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
        }
