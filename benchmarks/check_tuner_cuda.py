"""On a CUDA GPU: bit-flip LoRA in bf16 — merged == adapter, AC gradients == plain gradients.

The gradient comparison runs with deterministic algorithms (the zeroed-weight correction of the
LoRA gradients then takes its dense, atomics-free form); without them the two runs agree to
float32 rounding of atomic sums, which is printed too."""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import peft_bitflip as pb  # noqa: E402
from peft_bitflip.layers import bitflip_layers  # noqa: E402

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


def lora_grads(ac: bool, deterministic: bool):
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    m = build()
    m.train()
    if ac:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m(ids, labels=ids).loss.backward()
    torch.use_deterministic_algorithms(False)
    return {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None}


grads = [lora_grads(ac, True) for ac in (False, True)]
same = all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
print("AC gradients identical (deterministic algorithms):", same, len(grads[0]), "lora tensors")
fast = [lora_grads(ac, False) for ac in (False, True)]
rel = max(((fast[0][n] - fast[1][n]).norm() / fast[1][n].norm()).item() for n in fast[0])
print(f"AC gradients, atomics allowed: largest relative difference {rel:.2e}")
same &= rel < 1e-3
m = build().eval()
reset(m)
with torch.no_grad():
    a = m(ids).logits
    reset(m)
    merged = m.merge_and_unload()
    b = merged(ids).logits
print("merged == adapter (bf16, CUDA):", torch.equal(a, b))
assert same and torch.equal(a, b)
