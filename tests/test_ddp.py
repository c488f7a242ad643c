"""DDP (two CPU processes over gloo, buffers broadcast every forward, the default) with bit-flip
layers: each forward advances every counter by one on both ranks, and each rank's flips are
those of its own streams (rank in the key) at that call index."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("needs torch.distributed with gloo", allow_module_level=True)

STEPS = 3


def _net():
    import peft_bitflip as pb

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    cfg = pb.BitflipConfig(
        x_p_exp=0.02, x_p_frac=0.02, x_zero_out_t=3.0,
        w_p_exp=0.02, w_p_frac=0.02, w_zero_out_t=0.3, seed=4,
    )  # fmt: skip
    pb.apply_bitflip(net, cfg)
    return net


def _inputs(rank: int, step: int) -> torch.Tensor:
    return torch.randn(4, 16, generator=torch.Generator().manual_seed(100 * rank + step))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["PEFT_BITFLIP_CPU_BACKEND"] = "reference"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from peft_bitflip.layers import bitflip_layers

        net = _net()
        ddp = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=True)
        outs = []
        for step in range(STEPS):
            y = ddp(_inputs(rank, step))
            y.square().sum().backward()
            outs.append(y.detach())
        counters = {name: int(m.bitflip_calls) for name, m in bitflip_layers(net)}
        torch.save({"outs": outs, "counters": counters}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_counters_and_per_rank_flips(tmp_path, monkeypatch):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    for rank, result in enumerate(results):
        assert set(result["counters"].values()) == {STEPS}, (rank, result["counters"])
        # the same forwards in one process, as rank `rank` (the rank is part of the keys)
        monkeypatch.setenv("RANK", str(rank))
        net = _net()  # no optimizer step ran: the weights are still the initial ones
        for step in range(STEPS):
            with torch.no_grad():
                want = net(_inputs(rank, step))
            torch.testing.assert_close(result["outs"][step], want, rtol=1e-6, atol=1e-6)
    # the ranks flip differently (the same input would still give other flips)
    monkeypatch.setenv("RANK", "1")
    with torch.no_grad():
        assert not torch.equal(_net()(_inputs(0, 0)), results[0]["outs"][0])
