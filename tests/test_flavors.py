"""aixsim flavors as LlamaConfigs, parameter counts and the pretraining token budget."""

from __future__ import annotations

import pytest
from transformers import LlamaForCausalLM

from peft_bitflip.flavors import FLAVORS, PretrainPlan, aixsim_config, count_params, ffn_hidden_size

# non-embedding parameters (output head included) with the original's 49152-token vocabulary,
# and the shipped configs' steps / warm-up (seed digest §1.5-1.6)
ORIGINAL = {"60M": 63_226_752, "200M": 224_170_752, "400M": 408_511_680, "1.1B": 1_069_647_360}


@pytest.mark.parametrize("flavor", list(ORIGINAL))
def test_parameter_counts_match_the_original(flavor):
    assert count_params(aixsim_config(flavor)) == ORIGINAL[flavor]


@pytest.mark.parametrize("flavor", ["tiny", "debug"])
def test_count_params_equals_the_built_model(flavor):
    config = aixsim_config(flavor, vocab_size=300, max_seq_len=64)
    model = LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    assert count_params(config, exclude_embedding=False) == total
    assert count_params(config) == total - model.model.embed_tokens.weight.numel()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_architecture_fields():
    c = aixsim_config("400M")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (960, 30, 15)
    assert c.num_key_value_heads == 5 and c.head_dim == 64 and c.intermediate_size == 3328
    assert c.rope_parameters["rope_theta"] == 10000.0 and not c.tie_word_embeddings
    assert ffn_hidden_size(384) == 1408 and ffn_hidden_size(1536) == 5376


@pytest.mark.parametrize(
    "flavor,batch,gpus,steps,warmup",
    [("60M", 48, 2, 7075, 1415), ("400M", 12, 8, 45712, 9142), ("1.1B", 24, 8, 59846, 11969)],
)
def test_plan_reproduces_the_original_step_counts(flavor, batch, gpus, steps, warmup):
    plan = PretrainPlan(count_params(aixsim_config(flavor)), 22.0, batch, 1, gpus, 2048)
    assert (plan.steps, plan.warmup_steps) == (steps, warmup)


def test_plan_counts_grad_accumulation_and_world_size():
    one = PretrainPlan(10_000_000, 22.0, 8, 1, 1, 1024)
    assert one.tokens == 220_000_000 and one.tokens_per_step == 8 * 1024
    assert one.steps == -(-220_000_000 // 8192)
    # the same tokens per step, however it is split: same number of steps
    split = PretrainPlan(10_000_000, 22.0, 2, 2, 2, 1024)
    assert split.tokens_per_step == one.tokens_per_step and split.steps == one.steps
    assert PretrainPlan(10_000_000, 22.0, 8, 4, 1, 1024).steps == -(-one.steps // 4)
    d = one.to_dict()
    assert d["steps"] == one.steps and d["tokens"] == one.tokens


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(per_device_batch=0), "per_device_batch"),
        (dict(world_size=-1), "world_size"),
        (dict(token_num_scale=float("nan")), "token_num_scale"),
        (dict(warmup_fraction=1.0), "warmup_fraction"),
    ],
)
def test_plan_rejects_bad_values(kwargs, match):
    base = dict(
        params=1000,
        token_num_scale=22.0,
        per_device_batch=1,
        grad_accum=1,
        world_size=1,
        seq_len=16,
    )
    with pytest.raises(ValueError, match=match):
        PretrainPlan(**{**base, **kwargs})


def test_unknown_flavor_is_an_error():
    with pytest.raises(ValueError, match="'7B'"):
        aixsim_config("7B")
    assert "tiny" in FLAVORS
