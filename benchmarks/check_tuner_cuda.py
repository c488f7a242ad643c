"""On a CUDA GPU: bit-flip LoRA in bf16 — merged == adapter, AC gradients == plain gradients."""

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_bitflip as pb
from peft_bitflip.layers import bitflip_layers

cfg = LlamaConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
)
ids = torch.randint(0, 512, (4, 128), device="cuda")
flips = dict(
    x_p_exp=2**-10,
    x_p_frac=2**-10,
    w_p_exp=2**-10,
    w_p_frac=2**-10,
    x_zero_out_t=30.0,
    w_zero_out_t=1.25,
)


def build():
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16)
    lc = pb.BitflipLoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        **flips,
    )
    return get_peft_model(m, lc)


def reset(m):
    for _, layer in bitflip_layers(m):
        layer.bitflip_calls.zero_()


grads = []
for ac in (False, True):
    m = build()
    m.train()
    if ac:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m(ids, labels=ids).loss.backward()
    grads.append({n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
same = all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
print("AC gradients identical:", same, len(grads[0]), "lora tensors")
m = build().eval()
reset(m)
with torch.no_grad():
    a = m(ids).logits
    reset(m)
    merged = m.merge_and_unload()
    b = merged(ids).logits
print("merged == adapter (bf16, CUDA):", torch.equal(a, b))
assert same and torch.equal(a, b)
