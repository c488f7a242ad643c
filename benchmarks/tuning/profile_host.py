"""Host (Python) overhead of the bit-flip layers on CUDA: per-call launch costs and a cProfile
of flipped forwards at batch 1 (where the host, not the GPU, sets the pace).

``--python-only`` runs on the CPU instead: the kernel launchers are replaced by functions that
only allocate their outputs, so the rows are the Python cost of a layer around its launches
(forward under ``no_grad``; forward + backward), next to ``nn.Linear`` on the same tiny input.

``--layer-only`` (CUDA) prints just a BitflipLinear's host cost next to nn.Linear's, measured in
interleaved rounds: run it alternately from two checkouts (``PYTHONPATH=<copy>``) to compare
commits on a noisy host.
"""

import argparse
import cProfile
import inspect
import pstats
import sys
import time
import types

import torch
import triton
import triton.language as tl
from peft import LoraConfig, get_peft_model

import peft_bitflip as pb
from peft_bitflip.bursts import Bursts, BurstSpec
from peft_bitflip.functional import apply_flip_spec
from peft_bitflip.kernels import (
    burst_op,
    launcher,
    lora,
    op,
    triton_bitflip,
    triton_burst,
    triton_lora,
)
from peft_bitflip.kernels.sampling import ceil_div, flip_table, zero_mask_size
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


def stub_kernels():
    """Replace the Triton launchers by allocations of their outputs (Python cost only)."""

    def mask_of(t):
        return torch.empty(zero_mask_size(t.numel(), t.dtype), dtype=torch.uint8)

    op.backend_for = lambda device: "triton"
    triton_bitflip.launch = lambda x, *a, **k: torch.empty_like(x)
    triton_bitflip.launch_with_mask = lambda x, *a: (torch.empty_like(x), mask_of(x))
    # (x, w, x_table, w_table, call, x_key, w_key, x_t, w_t, x_flips, w_flips, want_x_mask, next)
    triton_bitflip.launch_pair = lambda x, w, *a: (
        torch.empty_like(x),
        torch.empty_like(w),
        mask_of(x) if a[9] and a[5] is not None else None,
    )
    # (x, grad, table, call, k0, k1, threshold, has_flips, want_y, lanes)
    triton_bitflip.launch_zero_grad_ = lambda x, grad, *a: torch.empty_like(x) if a[6] else None
    triton_bitflip.zero_by_masks_ = lambda *a: None
    lora.backend_for = op.backend_for

    merge_params = inspect.signature(triton_lora.merge_flip_with_x).parameters
    merge_defaults = {n: p.default for n, p in merge_params.items()}

    def merge_flip_with_x(*args, **kwargs):  # cheap: no Signature.bind per call
        a = dict(merge_defaults, **dict(zip(merge_params, args)), **kwargs)
        w, x = a["w"], a["x"]
        w_mask = None
        if a["want_mask"] and a["threshold"] is not None:
            w_mask = torch.empty(w.shape, dtype=torch.uint8)
        x_out = None if x is None else torch.empty_like(x)
        x_mask = None
        if x is not None and a["want_x_mask"] and a["x_threshold"] is not None:
            x_mask = mask_of(x)
        return torch.empty(w.shape, dtype=a["out_dtype"]), w_mask, x_out, x_mask

    triton_lora.merge_flip_with_x = merge_flip_with_x
    triton_lora.subtract_zeroed_correction_ = lambda *a: None
    burst_op.backend_for = op.backend_for
    triton_burst.launch_burst = lambda x, *a, **k: torch.empty_like(x)


BITFLIP = pb.BitflipConfig.original_default()
LORA = dict(r=8, lora_alpha=16, target_modules=["0"], lora_dropout=0.0)


class _StubJit:
    """A ``@triton.jit`` function's parameters with a JIT call that returns a compiled kernel
    whose launch does nothing: :class:`KernelLauncher`'s own cost on the CPU."""

    def __init__(self, fn):
        self.__name__ = fn.__name__
        self.params = getattr(fn, "params", None) or self._params(fn)

    @staticmethod
    def _params(fn):
        """The parameters as a JITFunction lists them (under TRITON_INTERPRET=1 there is none)."""
        plain = fn.kwargs.get("do_not_specialize") or ()
        return [
            types.SimpleNamespace(
                name=p.name,
                is_constexpr="constexpr" in str(p.annotation),
                do_not_specialize=p.name in plain,
                default=None if p.default is inspect.Parameter.empty else p.default,
            )
            for p in inspect.signature(fn.fn).parameters.values()
        ]

    def __getitem__(self, grid):
        kernel = types.SimpleNamespace(function=None, packed_metadata=None, run=lambda *a: None)
        return lambda *args, **config: kernel


def launcher_us(timed) -> float:
    """Host us per launch spent in ``KernelLauncher`` (cache key, lookup, argument tuple) for
    the LoRA forward's merge + flip + x launch (30 arguments), the compiled kernel stubbed."""
    captured = []
    real = triton_lora._launch_merge_flip
    triton_lora._launch_merge_flip = lambda grid, args, config: captured.append(
        (grid, args, config)
    )
    try:
        w, x = torch.randn(64, 64, dtype=torch.bfloat16), torch.randn(4, 64, dtype=torch.bfloat16)
        a, b = torch.randn(8, 64), torch.randn(64, 8)
        spec = FlipSpec(2**-16, 2**-16, 1.25)
        table = flip_table(spec.effective_p_exp, spec.effective_p_frac, w.dtype, w.device)
        call = torch.zeros((), dtype=torch.int64)
        triton_lora.merge_flip_with_x(
            w, b, a, 2.0, w.dtype, table, call, 1, 2, 1.25, True, False, call.clone(), x=x,
            x_table=table, x_key=(3, 4), x_threshold=30.0, x_flips=True, want_x_mask=True,
        )  # fmt: skip
    finally:
        triton_lora._launch_merge_flip = real
    grid, args, config = captured[0]
    stub = launcher.KernelLauncher(_StubJit(triton_lora._merge_flip_kernel))
    saved = launcher._ENABLED, launcher._RUNTIME
    knobs = types.SimpleNamespace(launch_enter_hook=None, launch_exit_hook=None)
    launcher._ENABLED, launcher._RUNTIME = True, (knobs, lambda: 0, lambda device: 0)
    try:
        return timed(lambda: stub(grid, args, config))
    finally:
        launcher._ENABLED, launcher._RUNTIME = saved


def python_only(n=40000):
    """Per-call Python cost (us) of a bit-flip layer's forward and forward + backward, and of
    a bit-flip LoRA layer next to PEFT's LoRA layer (r=8; the input needs a gradient, as in
    every layer of a model but the first)."""
    spec_x, spec_w = FlipSpec(2**-16, 2**-16, 30.0), FlipSpec(2**-16, 2**-16, 1.25)
    layer = pb.BitflipLinear(64, 64)
    layer.init_bitflip("layer", spec_x, spec_w)
    # bursts on W with only a zero-out (no flips): one burst pass zeroes W (spec_x on x)
    bursts = pb.BitflipLinear(64, 64)
    bursts.init_bitflip("bursts", spec_x, FlipSpec(zero_out_threshold=1.25))
    bursts.bitflip_bursts = Bursts("bursts", 0, BurstSpec(0.0), BurstSpec(2**-16, 2))
    plain = torch.nn.Linear(64, 64)
    x = torch.randn(1, 64, requires_grad=True)
    dy = torch.ones(1, 64)

    def timed(fn, rounds=10):  # the best of a few rounds: the least disturbed by other work
        for _ in range(n // 20):
            fn()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n // rounds):
                fn()
            best = min(best, (time.perf_counter() - t0) / (n // rounds) * 1e6)
        return best

    # before stub_kernels replaces merge_flip_with_x: its arguments for the launcher row
    print(f"{'KernelLauncher':14s} one merge + flip + x launch (kernel stubbed) "
          f"{launcher_us(timed):7.2f} us")  # fmt: skip
    stub_kernels()
    lora_models = {}
    for name, config in (
        ("bitflip-LoRA", pb.BitflipLoraConfig.from_bitflip_config(BITFLIP, **LORA)),
        ("PEFT-LoRA", LoraConfig(**LORA)),
    ):
        torch.manual_seed(0)
        lora_models[name] = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), config)
    rows = [
        ("BitflipLinear", layer), ("+W-bursts", bursts), ("nn.Linear", plain),
        *lora_models.items(),
    ]  # fmt: skip
    for name, module in rows:
        with torch.no_grad():
            fwd = timed(lambda: module(x))
        # a contiguous output gradient, as in a model (sum()'s is an expanded view)
        train = timed(lambda: module(x).backward(dy))
        print(f"{name:14s} forward (no_grad) {fwd:7.1f} us   forward + backward {train:7.1f} us")
    # grid sizes: Triton's cdiv (a constexpr function in recent releases) against ours
    for name, fn in (("triton.cdiv", triton.cdiv), ("ceil_div", ceil_div)):
        print(f"{name:14s} one call {timed(lambda: fn(1 << 20, 512)):7.3f} us")


def layer_rows(rounds=7, calls=200):
    """Host us per call of a 2048x2048 bf16 BitflipLinear and nn.Linear on 1024 tokens (no_grad
    forward; forward + backward), the rows interleaved round by round so that both see the
    same host load; the lowest round of each, and the layer's extra cost over nn.Linear."""
    spec_x, spec_w = FlipSpec(2**-16, 2**-16, 30.0), FlipSpec(2**-16, 2**-16, 1.25)
    layer = pb.BitflipLinear(2048, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
    layer.init_bitflip("layer", spec_x, spec_w)
    plain = torch.nn.Linear(2048, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
    xg = x.clone().requires_grad_()

    def forward(m):
        def run():
            with torch.no_grad():
                m(x)

        return run

    def train(m):
        return lambda: m(xg).sum().backward()

    rows = {
        ("forward", "BitflipLinear"): forward(layer),
        ("forward", "nn.Linear"): forward(plain),
        ("forward+backward", "BitflipLinear"): train(layer),
        ("forward+backward", "nn.Linear"): train(plain),
    }
    best = dict.fromkeys(rows, float("inf"))
    for fn in rows.values():  # warm-up (Triton compiles here)
        for _ in range(20):
            fn()
    for _ in range(rounds):
        for key, fn in rows.items():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best[key] = min(best[key], (time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    for job in ("forward", "forward+backward"):
        ours, clean = best[(job, "BitflipLinear")], best[(job, "nn.Linear")]
        print(
            f"{job:17s} BitflipLinear {ours:7.1f} us   nn.Linear {clean:7.1f} us   "
            f"extra {ours - clean:7.1f} us"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--python-only", action="store_true", help="CPU, kernels stubbed out")
    ap.add_argument("--calls", type=int, default=40000, help="calls per --python-only row")
    ap.add_argument(
        "--layer-only",
        action="store_true",
        help="only the interleaved BitflipLinear / nn.Linear rows (CUDA; for A/B runs of two "
        "checkouts, alternating processes)",
    )
    args = ap.parse_args()
    if args.python_only:
        python_only(args.calls)
        return
    if args.layer_only:
        layer_rows()
        return
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
        ("layer.next_call (claim + torch.add)", layer.next_call),
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
