"""Host cost of one launch of the paired flip kernel: through Triton's JIT (what the layers do)
against a direct call of its compiled kernel (``CompiledKernel.run``, Triton 3.6's internal
launcher signature, the specialisation check skipped), next to an empty kernel, the layer and
nn.Linear.  A lead for trimming the layers' host cost at small batches, not used by them.

    python benchmarks/launch_paths.py      # CUDA; two rounds, lowest of 5 x 400 calls each
"""

import time

import torch
import triton
from triton import knobs
from triton.runtime import driver

import peft_bitflip as pb
from peft_bitflip.kernels import triton_bitflip as tb
from peft_bitflip.kernels.sampling import ceil_div, flip_table
from peft_bitflip.spec import FlipSpec


@triton.jit
def empty(x_ptr):
    pass


def per_call(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n // 5):
            fn()
        best = min(best, (time.perf_counter() - t0) / (n // 5) * 1e6)
        torch.cuda.synchronize()
    return best


x = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16)
w = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16) * 0.02
sx, sw = FlipSpec(2**-16, 2**-16, 30.0), FlipSpec(2**-16, 2**-16, 1.25)
tx = flip_table(sx.effective_p_exp, sx.effective_p_frac, x.dtype, x.device)
tw = flip_table(sw.effective_p_exp, sw.effective_p_frac, w.dtype, w.device)
call = torch.tensor(3, device="cuda")
nxt = torch.empty_like(call)
kx, kw = pb.stream_key(0, "a", "x"), pb.stream_key(0, "a", "w")
xo, wo = torch.empty_like(x), torch.empty_like(w)
per_program, cx = tb._pair_config(x.dtype, False, True, True, True, True, True)
px = ceil_div(x.numel(), per_program)
progs = px + ceil_div(w.numel(), per_program)
args = (x, xo, x, x.numel(), tx, *kx, 30.0, w, wo, w.numel(), tw, *kw, 1.25, call, nxt, px)


def jit():
    return tb._bitflip_pair_kernel[(progs,)](*args, **cx)


k = jit()
dev = driver.active.get_current_device()
stream = driver.active.get_current_stream(dev)
# bound values in signature order, constexprs included
names = tb._bitflip_pair_kernel.arg_names
allargs = dict(zip(names, args))
allargs.update({a: b for a, b in cx.items() if a in names})
vals = [allargs[n] for n in names]


def direct():
    k.run(
        progs,
        1,
        1,
        driver.active.get_current_stream(dev),
        k.function,
        k.packed_metadata,
        None,
        knobs.runtime.launch_enter_hook,
        knobs.runtime.launch_exit_hook,
        *vals,
    )


def empty_jit():
    empty[(1,)](x)


def launch_pair():
    tb.launch_pair(x, w, tx, tw, call, kx, kw, 30.0, 1.25, True, True, False, nxt)


layer = pb.BitflipLinear(2048, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
layer.init_bitflip("l", sx, sw)
lin = torch.nn.Linear(2048, 2048, bias=False, device="cuda", dtype=torch.bfloat16)
direct()
torch.cuda.synchronize()
xo2 = xo.clone()
jit()
torch.cuda.synchronize()
assert torch.equal(xo, xo2)


def lf():
    with torch.no_grad():
        layer(x)


def nf():
    with torch.no_grad():
        lin(x)


for r in range(2):
    for name, fn in [
        ("empty kernel (JIT)", empty_jit),
        ("pair kernel (JIT)", jit),
        ("pair kernel (direct run)", direct),
        ("launch_pair", launch_pair),
        ("BitflipLinear fwd", lf),
        ("nn.Linear fwd", nf),
        ("torch.empty_like", lambda: torch.empty_like(x)),
    ]:
        print(f"round {r} {name:28s} {per_call(fn):7.1f} us")
