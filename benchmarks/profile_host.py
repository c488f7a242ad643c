"""Host (Python) overhead of the bit-flip layers on CUDA: per-call launch costs and a cProfile
of flipped forwards at batch 1 (where the host, not the GPU, sets the pace)."""

import cProfile
import pstats
import sys
import time

import torch
import triton
import triton.language as tl

import peft_bitflip as pb
from peft_bitflip.functional import apply_flip_spec
from peft_bitflip.kernels import op, triton_bitflip
from peft_bitflip.kernels.sampling import flip_table
from peft_bitflip.spec import FlipSpec


@triton.jit
def _copy(x_ptr, y_ptr, n, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(y_ptr + o, tl.load(x_ptr + o, mask=o < n), mask=o < n)


def per_call_us(fn, n=300):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    total = (time.perf_counter() - t0) / n * 1e6
    return host, total


def main():
    x = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    spec = FlipSpec(2**-16, 2**-16, 30.0)
    key = (12345, 678)
    call = torch.tensor(3, device="cuda")
    table = flip_table(spec.effective_p_exp, spec.effective_p_frac, x.dtype, x.device)
    grid = (x.numel() // 1024,)
    layer = pb.BitflipLinear(2048, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
    layer.init_bitflip("layer", spec, spec)
    plain = torch.nn.Linear(2048, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
    flip_args = (30.0, True)  # threshold, has_flips

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn(x)

        return run

    rows = [
        ("empty triton copy kernel", lambda: _copy[grid](x, y, x.numel(), B=1024)),
        ("triton_bitflip.launch", lambda: triton_bitflip.launch(x, table, call, *key, *flip_args)),
        ("apply_flip_spec (eager)", lambda: apply_flip_spec(x, spec, key, call)),
        ("the custom op", lambda: op.bitflip_op(x, table, call, *key, *flip_args)),
        ("layer.next_call (clone + add_)", layer.next_call),
        ("BitflipLinear 2048x2048, no_grad", no_grad(layer)),
        ("nn.Linear 2048x2048, no_grad", no_grad(plain)),
        ("torch clone", lambda: x.clone()),
    ]
    for name, fn in rows:
        h, t = per_call_us(fn)
        print(f"{name:34s} host {h:8.1f} us/call   host+device {t:8.1f} us/call")
    sys.stdout.flush()

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    pb.apply_bitflip(m, pb.BitflipConfig.original_default())
    ids = torch.randint(0, 32000, (1, 1024), device="cuda")
    m.eval()
    with torch.no_grad():
        for _ in range(3):
            m(ids)
        torch.cuda.synchronize()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(5):
            m(ids)
        torch.cuda.synchronize()
        pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
