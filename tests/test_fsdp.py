"""FSDP2 (``fully_shard``) with bit-flip layers, two CPU processes over gloo: a training step
runs, and the gathered full state dict saves as a checkpoint that reloads with its flips."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard") or not dist.is_gloo_available():
    pytest.skip("needs FSDP2 (torch >= 2.6) and gloo", allow_module_level=True)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from tiny_models import tiny_llama
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import peft_bitflip as pb
    from peft_bitflip.hf_quantizer import quantizer_detached

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = tiny_llama()
        pb.apply_bitflip(model, pb.BitflipConfig.original_default(seed=3))
        for layer in model.model.layers:
            fsdp.fully_shard(layer)
        fsdp.fully_shard(model)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(rank))
        model(input_ids=ids, labels=ids).loss.backward()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
        if rank == 0:
            with quantizer_detached(model):
                model.save_pretrained(out_dir, state_dict=state)
            torch.save(state, os.path.join(out_dir, "expected.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_full_state_dict_saves_and_reloads_with_flips(tmp_path):
    from transformers import AutoModelForCausalLM

    from peft_bitflip.layers import bitflip_layers

    out = tmp_path / "ckpt"
    out.mkdir()
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)

    expected = torch.load(out / "expected.pt")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.quantization_config.seed == 3
    layers = dict(bitflip_layers(model))
    assert len(layers) == 14  # 7 linear layers x 2 blocks; lm_head stays clean
    # one forward per rank: counters gathered from rank 0 say 1 call
    assert all(int(layer.bitflip_calls) == 1 for layer in layers.values())
    state = model.state_dict()
    for name, value in expected.items():
        assert torch.equal(state[name], value), name
