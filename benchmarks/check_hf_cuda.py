"""On a CUDA GPU: the config.json round trip with device_map="cuda" and bf16.

A clean checkpoint loaded with ``quantization_config=`` gets its counters on the GPU, starting
at 0, and equals ``apply_bitflip`` on the same model; a merged bit-flip LoRA checkpoint reloads
onto the GPU with bit-identical logits.  Prints one line per check; exits non-zero on a failure.
"""

import sys
import tempfile

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

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
flips = pb.BitflipConfig(
    x_p_exp=2**-10,
    x_p_frac=2**-10,
    w_p_exp=2**-10,
    w_p_frac=2**-10,
    x_zero_out_t=30.0,
    w_zero_out_t=1.25,
    seed=7,
)
ids = torch.randint(0, 512, (4, 128), device="cuda")
failures = 0


def check(name, ok):
    global failures
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {name}")


def logits(m):
    with torch.no_grad():
        return m(ids).logits


with tempfile.TemporaryDirectory() as d:
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(f"{d}/clean")
    loaded = AutoModelForCausalLM.from_pretrained(
        f"{d}/clean", quantization_config=flips, device_map="cuda", dtype=torch.bfloat16
    )
    layers = [m for _, m in bitflip_layers(loaded)]
    check("layers converted", len(layers) == 4 * 7)
    check("counters on cuda", all(m.bitflip_calls.device.type == "cuda" for m in layers))
    check("counters start at 0", all(int(m.bitflip_calls) == 0 for m in layers))
    ref = AutoModelForCausalLM.from_pretrained(
        f"{d}/clean", device_map="cuda", dtype=torch.bfloat16
    )
    pb.apply_bitflip(ref, flips)
    check("from_pretrained == apply_bitflip", torch.equal(logits(loaded), logits(ref)))
    with pb.disable_bitflips(loaded):
        clean = logits(loaded)
    check("flips change the logits", not torch.equal(clean, logits(ref)))

    lora = pb.BitflipLoraConfig.from_bitflip_config(
        flips, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(loaded, lora)
    logits(peft_model)
    before = {m.bitflip_name: int(m.bitflip_calls) for _, m in bitflip_layers(peft_model)}
    adapter = logits(peft_model)
    peft_model.merge_and_unload().save_pretrained(f"{d}/merged")
    reloaded = AutoModelForCausalLM.from_pretrained(
        f"{d}/merged", device_map="cuda", dtype=torch.bfloat16
    )
    for _, m in bitflip_layers(reloaded):
        m.bitflip_calls.fill_(before[m.bitflip_name])
    check("reloaded merged == adapter (bf16, cuda)", torch.equal(logits(reloaded), adapter))

print(f"{failures} failure(s)")
sys.exit(1 if failures else 0)
