"""Direct kernel launches (``kernels/launcher.py``) against Triton's JIT call, in one process.

First a check: one BitflipLinear forward + backward and one bit-flip LoRA step, each run with
both launch paths at the same call index, must give the same output bits and gradients.  Then
the ~1B Llama of ``bench_model.py`` (batch ``--batch``): forward / train / lora steps of the
flipped model, timed in interleaved rounds with the direct path on and off (median ms of
``--steps`` steps per round), with the number of cached specialisations per launcher.

    python benchmarks/launch_ab.py [--batch 1] [--rounds 2]
"""

from __future__ import annotations

import argparse

import torch
from bench_model import cleanup, make_variant, model_config, step_fn, time_steps

import peft_bitflip as pb
from peft_bitflip.kernels import launcher, triton_bitflip, triton_lora

LAUNCHERS = {
    "single": triton_bitflip._launch_single,
    "pair": triton_bitflip._launch_pair,
    "zero_by_masks": triton_bitflip._launch_zero_by_masks,
    "merge_flip": triton_lora._launch_merge_flip,
    "zeroed_correction": triton_lora._launch_zeroed_correction,
}


def set_direct(on: bool) -> None:
    launcher._ENABLED = on and launcher._direct_launch_possible()


def one_layer(direct: bool, lora: bool):
    """(output, grads) of a layer step at call index 5, warmed up first with both paths."""
    set_direct(direct)
    torch.manual_seed(0)
    layer = pb.BitflipLinear(512, 256, device="cuda", dtype=torch.bfloat16)
    layer.init_bitflip("l", pb.FlipSpec(1e-3, 1e-3, 2.0), pb.FlipSpec(1e-3, 1e-3, 0.04))
    x = (torch.randn(4, 128, 512, device="cuda", dtype=torch.bfloat16) * 2).requires_grad_()
    a = (torch.randn(8, 512, device="cuda") * 0.1).requires_grad_()
    b = (torch.randn(256, 8, device="cuda") * 0.1).requires_grad_()
    outs = []
    for _ in range(3):  # the first may compile; the later ones take the direct path if on
        layer.bitflip_calls.fill_(5)
        x.grad = a.grad = b.grad = layer.weight.grad = None
        y = layer.flipped_lora_forward(x, a, b, 2.0) if lora else layer(x)
        y.float().square().sum().backward()
        grads = [t.grad for t in ((x, a, b) if lora else (x, layer.weight))]
        outs.append((y.detach(), [g.clone() for g in grads]))
    return outs[-1]


def check() -> None:
    for lora in (False, True):
        y_j, g_j = one_layer(False, lora)
        y_d, g_d = one_layer(True, lora)
        assert torch.equal(y_j, y_d), "outputs differ"
        for gj, gd in zip(g_j, g_d):
            torch.testing.assert_close(gd, gj, rtol=0, atol=0)
        print(f"check {'lora' if lora else 'linear'}: direct == JIT (outputs and gradients)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--jobs", default="forward,train,lora")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    print("direct launches possible:", launcher._direct_launch_possible())
    check()
    cfg = model_config(False)
    print("| job | round | JIT ms | direct ms | direct / JIT |\n|---|---:|---:|---:|---:|")
    for job in args.jobs.split(","):
        model = make_variant(job, "ours", cfg, device, torch.bfloat16)
        ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
        step = step_fn(job, model, ids, False)
        for r in range(args.rounds):
            ms = {}
            for direct in (False, True):
                set_direct(direct)
                ms[direct] = time_steps(step, device, 3, args.steps)[0]
            print(
                f"| {job} | {r} | {ms[False]:.1f} | {ms[True]:.1f} | {ms[True] / ms[False]:.3f} |",
                flush=True,
            )
        del model, step
        cleanup()
    print({name: len(ln._compiled) for name, ln in LAUNCHERS.items()}, "cached specialisations")


if __name__ == "__main__":
    main()
