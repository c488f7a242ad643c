"""On a CUDA GPU: the fast bit-flip LoRA path (one-pass merge + flip kernel, rank-r gradients
with the zeroed-weight correction kernel) against the unfused form, bf16, 1024 x 2048 -> 5632.
Prints the output and gradient differences; exits non-zero on a failure."""

import sys

import torch

import peft_bitflip as pb
from peft_bitflip import flipped_linear
from peft_bitflip.spec import FlipSpec

torch.manual_seed(0)
dev, dt = "cuda", torch.bfloat16
x0 = torch.randn(2, 512, 2048, device=dev, dtype=dt)
w = (torch.randn(5632, 2048, device=dev) * 0.02).to(dt)
a0 = torch.randn(32, 2048, device=dev) * 0.02
b0 = torch.randn(5632, 32, device=dev) * 0.02
keys = (pb.stream_key(0, "c", "x"), pb.stream_key(0, "c", "w"))
ok = True
for name, ws in [("original 2^-16, t=1.25", FlipSpec(2**-16, 2**-16, 1.25)),
                 ("many zeroed: 2^-8, t=0.03", FlipSpec(2**-8, 2**-8, 0.03))]:  # fmt: skip
    outs = []
    for fn in (flipped_linear.flipped_lora_linear, flipped_linear.flipped_lora_linear_unfused):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        y = fn(
            x,
            w,
            a,
            b,
            1.0,
            None,
            FlipSpec(2**-16, 2**-16, 30.0),
            ws,
            *keys,
            torch.tensor(5, device=dev),
        )
        y.float().square().mean().backward()
        outs.append((y.detach(), x.grad, a.grad, b.grad))
    (yf, *gf), (yu, *gu) = outs
    ydiff = (yf.float() - yu.float()).abs().max().item()
    rels = [((p.float() - q.float()).norm() / q.float().norm()).item() for p, q in zip(gf, gu)]
    print(
        f"{name}: max |y_fast - y_unfused| = {ydiff:.3g}; rel. grad diff x/A/B = "
        + ", ".join(f"{r:.2e}" for r in rels)
    )
    ok &= ydiff <= 0.05 * yu.float().abs().max().item() and all(r < 2e-2 for r in rels)
print("fast LoRA path == unfused (within bf16 rounding):", ok)
sys.exit(0 if ok else 1)
