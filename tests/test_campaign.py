"""Fault campaigns (``peft_bitflip.campaign``, ``peft-bitflip campaign``) on tiny models (CPU)."""

from __future__ import annotations

import csv
import json
import math
import random
import statistics

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, token_ids

import peft_bitflip.campaign as cp
from peft_bitflip.calibration import calibrate_zero_out
from peft_bitflip.config import BitflipConfig
from peft_bitflip.evaluation import reset_streams
from peft_bitflip.layers import bitflip_layers
from peft_bitflip.transform import apply_bitflip, remove_bitflip


@pytest.fixture(autouse=True)
def _fast_cpu_backend(reference_backend):
    pass


def _setup(seed=0, n_blocks=6, length=24):
    model = tiny_llama(seed)
    ids = token_ids(n_blocks, length, seed=seed + 1)
    return model, ids


def _calibrated(model, ids):
    return calibrate_zero_out(model, ids, margin=2.0, base=BitflipConfig(), batch_size=2)


def test_p_zero_gives_exactly_no_change():
    model, ids = _setup()
    groups = cp.module_groups(model, "blocks")
    sites = cp.sites_for(groups)
    for zero_out in (None, _calibrated(model, ids)):
        r = cp.campaign(
            model, ids, sites, p=0.0, seeds=[0, 1], zero_out=zero_out, batch_size=2,
            progress=False,
        )  # fmt: skip
        assert r.complete and len(r.rows) == len(sites) == 8
        for row in r.rows:
            assert row["delta_loss"] == 0.0 and row["sdc_rate"] == 0.0, row
            assert row["delta_loss_low"] == row["delta_loss_high"] == 0.0
            assert row["due_rate"] == 0.0 and row["flips"] == 0 and row["zeroed"] == 0
            assert row["trials"] > 0
    assert not bitflip_layers(model)  # unwrapped at the end


def test_forced_exponent_flips_in_one_layer_give_sdc():
    """p = 1 on the sign+exponent bits of one layer's input: every eligible bit flips (the
    counters say so), the output changes, the calibrated zero-out keeps it finite."""
    model, ids = _setup()
    name = "model.layers.0.mlp.gate_proj"
    groups = cp.module_groups(model, "regex", {"q1": name.replace(".", r"\.")})
    assert groups == {"q1": [name]}
    sites = cp.sites_for(groups, tensors=["x"], bits=["exp"])
    r = cp.campaign(
        model, ids, sites, p=1.0, seeds=[0], zero_out=_calibrated(model, ids), batch_size=3,
        progress=False,
    )  # fmt: skip
    (row,) = r.rows
    assert row["due_rate"] == 0.0
    assert row["sdc_rate"] > 0.0 and row["delta_loss"] != 0.0
    # x of gate_proj: 6 blocks x 24 tokens x 32 features, 9 sign+exponent bits each (float32)
    assert row["trials"] == 6 * 24 * 32 * 9
    assert row["flips"] == row["trials"] and row["realised_rate"] == 1.0


def test_a_site_replays_as_its_bitflip_config():
    """The campaign switches specs in place; the same cell through apply_bitflip(site_config)
    gives the same losses and top-1 mismatches."""
    model, ids = _setup()
    zero_out = _calibrated(model, ids)
    site = cp.sites_for(cp.module_groups(model, "attn_mlp"), ["w"], ["frac"])[1]  # mlp, w frac
    assert site.group == "mlp" and len(site.modules) == 6
    r = cp.campaign(
        model, ids, [site], p=0.05, seeds=[3], zero_out=zero_out, batch_size=4, progress=False
    )
    batches = [ids[:4], ids[4:]]
    golden = cp.golden_run(model, batches)
    apply_bitflip(model, cp.site_config(site, 0.05, seed=3, zero_out=zero_out))
    assert {n for n, _ in bitflip_layers(model)} == set(site.modules)
    reset_streams(model)
    with torch.no_grad():
        for u, batch, (_, g_top1) in zip(r.units, batches, golden):
            loss, top1, finite = cp._token_results(model, batch)
            assert finite and u.finite
            assert float(loss.sum(dtype=torch.float64)) == u.loss_sum
            assert int((top1 != g_top1).sum()) == u.mismatches
    remove_bitflip(model)
    assert r.rows[0]["delta_loss"] != 0.0 and r.rows[0]["flips"] > 0


def test_module_groups_and_bad_input():
    model = tiny_llama()
    assert list(cp.module_groups(model, "blocks")) == ["block 0", "block 1"]
    proj = cp.module_groups(model, "proj")
    assert list(proj) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"]  # fmt: skip
    assert all(len(v) == 2 for v in proj.values())
    gpt2 = cp.module_groups(tiny_gpt2(), "attn_mlp")
    assert gpt2["attention"][0] == "transformer.h.0.attn.c_attn"
    assert gpt2["mlp"][0] == "transformer.h.0.mlp.c_fc"
    with pytest.raises(ValueError, match="nothing_here"):
        cp.module_groups(model, "regex", {"a": "nothing_here"})
    with pytest.raises(ValueError, match="grouping"):
        cp.module_groups(model, "layers")
    with pytest.raises(ValueError, match="'mantissa'"):  # sign / bit:N: tests/test_p_bits.py
        cp.Site("g", ("model.layers.0.mlp.up_proj",), "x", "mantissa")
    site = cp.Site("g", ("lm_head",), "x", "exp")
    with pytest.raises(ValueError, match="lm_head"):
        cp.campaign(model, token_ids(2, 8), [site], p=0.1, progress=False)


def test_t_quantile_matches_the_table():
    # two-sided 95 % critical values of Student's t (any statistics table)
    for df, t in [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423)]:
        assert cp.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert cp.t_quantile(0.975, math.inf) == pytest.approx(1.95996, abs=1e-5)


REPS = 2000
SD_COVERAGE = math.sqrt(0.95 * 0.05 / REPS)  # binomial sd of the coverage estimate


def _coverage(seeds_per_batch: int, rng: random.Random) -> float:
    """Share of REPS simulated campaigns whose interval covers the true mean: 8 batches with
    different true Δ (between-batch spread) and different flip noise, token weights unequal."""
    means = [0.02 * b for b in range(8)]
    sds = [0.01 + 0.01 * b for b in range(8)]
    weights = [512] * 7 + [256]
    truth = sum(w * m for w, m in zip(weights, means)) / sum(weights)
    hits = 0
    for _ in range(REPS):
        strata = [[rng.gauss(m, s) for _ in range(seeds_per_batch)] for m, s in zip(means, sds)]
        ci = cp.stratified_t_interval(strata, weights)
        hits += ci["low"] <= truth <= ci["high"]
    return hits / REPS


def test_interval_covers_the_true_mean_in_a_seeded_simulation():
    """Three seeds per batch: the stratified t interval covers the true mean in 95 % of the
    simulations within 4 binomial standard deviations; one seed per batch: the t interval over
    units (it counts the between-batch spread too) covers at least that often."""
    rng = random.Random(0)
    cov = _coverage(3, rng)
    assert abs(cov - 0.95) <= 4 * SD_COVERAGE, cov
    ci = cp.stratified_t_interval([[1.0, 2.0]] * 3)
    assert ci["method"] == "stratified t"
    cov1 = _coverage(1, rng)
    assert cov1 >= 0.95 - 4 * SD_COVERAGE, cov1
    assert cp.stratified_t_interval([[1.0]] * 3)["method"] == "t over units"


def _units_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))[1:]


def test_resume_after_a_kill_loses_and_doubles_no_row(tmp_path, monkeypatch):
    model, ids = _setup()
    sites = cp.sites_for(cp.module_groups(model, "blocks"), ["x", "w"], ["frac"])
    kwargs = dict(p=0.002, seeds=[0, 1], batch_size=3, progress=False)
    full = cp.campaign(model, ids, sites, **kwargs)
    csv_path = tmp_path / "units.csv"
    real = cp._token_results
    calls = {"n": 0}

    def dies_after_5_runs(model, batch):
        calls["n"] += 1
        if calls["n"] > 2 + 5 * 2:  # golden (2 batches) + 5 (site, seed) runs of 2 batches
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(cp, "_token_results", dies_after_5_runs)
    with pytest.raises(KeyboardInterrupt):
        cp.campaign(model, ids, sites, csv_path=str(csv_path), **kwargs)
    assert not bitflip_layers(model)
    assert len(_units_csv(csv_path)) == 5 * 2
    monkeypatch.setattr(cp, "_token_results", real)
    with open(csv_path, "a") as f:  # a torn row (a kill inside a write of another writer)
        f.write("block 1|w|frac,1,0,48,1.0")
    with pytest.warns(UserWarning, match="incomplete row"):
        resumed = cp.campaign(model, ids, sites, csv_path=str(csv_path), **kwargs)
    rows = _units_csv(csv_path)
    keys = [(r[0], r[1], r[2]) for r in rows]
    assert len(keys) == len(set(keys)) == len(sites) * 2 * 2
    assert resumed.units == full.units  # bit-identical to the uninterrupted campaign
    assert resumed.rows == full.rows
    with pytest.raises(ValueError, match="other settings"):
        cp.campaign(model, ids, sites, csv_path=str(csv_path), **{**kwargs, "p": 0.03})
    # the same site names over other modules are other settings too (no silent reuse)
    moved = [cp.Site(s.group, s.modules[:1], s.tensor, s.bits) for s in sites]
    with pytest.raises(ValueError, match="other settings"):
        cp.campaign(model, ids, moved, csv_path=str(csv_path), **kwargs)


def test_time_budget_stops_cleanly_and_the_rerun_completes(tmp_path):
    model, ids = _setup()
    sites = cp.sites_for(cp.module_groups(model, "blocks"), ["x"], ["frac"])
    kwargs = dict(p=0.002, seeds=[0, 1], batch_size=3, progress=False, csv_path=str(tmp_path / "u"))
    r = cp.campaign(model, ids, sites, max_minutes=1e-9, **kwargs)
    assert not r.complete and r.units == [] and r.rows == []
    r = cp.campaign(model, ids, sites, max_minutes=60, **kwargs)
    assert r.complete and len(r.units) == 2 * 2 * 2


def test_cli_writes_table_heatmap_and_resumes(tmp_path):
    from peft_bitflip import data
    from peft_bitflip.cli import main

    corpus = data.local_corpus()
    tok = data.train_tokenizer(corpus["train"]["text"][:40], vocab_size=300)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(corpus["validation"]["text"][:20]))
    out = tmp_path / "out"
    argv = ["campaign", "--model", str(tmp_path / "m"), "--text", str(text), "--sites",
            "attn_mlp", "--site_regex", r"b1=model\.layers\.1\..*", "--p", "2^-8", "--bits",
            "frac", "--seeds", "0", "1", "--block_size", "32", "--batch_size", "2", "--tokens",
            "128", "--output_dir", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "campaign.json").read_text())
    assert report["complete"] and len(report["rows"]) == 3 * 2  # attn, mlp, b1
    assert {r["group"] for r in report["rows"]} == {"attention", "mlp", "b1"}
    run = report["run"]  # the run record: what reproduces the file
    assert run["seeds"] == [0, 1] and run["batch"] == {"batch_size": 2}
    assert run["fault_model"]["p"] == 2**-8 and "b1|x|frac" in run["fault_model"]["sites"]
    assert run["data"]["tokens"] == 128 and len(run["data"]["file"]["sha256"]) == 64
    assert run["data"]["sequence_length"] == 32 and run["data"]["blocks"] == 4
    assert run["fault_model"]["zero_out"]["layer_name_to_config"]  # calibrated per layer
    assert (out / "campaign_heatmap.png").stat().st_size > 1000
    md = (out / "campaign.md").read_text()
    assert "| rank | site |" in md and "Golden run" in md
    n_units = len(_units_csv(out / "campaign_units.csv"))
    assert n_units == 6 * 2 * 2
    assert main(argv) == 0  # nothing left to do: same rows
    assert len(_units_csv(out / "campaign_units.csv")) == n_units
    with pytest.raises(ValueError, match="LABEL=REGEX"):
        main([*argv[:5], "--site_regex", "noequals", "--output_dir", str(tmp_path / "o2")])
    assert statistics.fmean(r["realised_rate"] for r in report["rows"]) == pytest.approx(
        2**-8, rel=0.2
    )


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_skipping_the_clean_blocks_before_a_site_changes_nothing(make):
    """A site in block 1 starts from the golden output of block 0 (block 0 is not computed):
    the units are bit-identical to running every block."""
    model = make()
    ids = token_ids(4, 16, seed=3)
    sites = cp.sites_for(cp.module_groups(model, "blocks"), ["x", "w"], ["exp"])
    zero_out = _calibrated(model, ids)
    kwargs = dict(p=0.01, seeds=[0, 1], zero_out=zero_out, batch_size=2, progress=False)
    first_mlp = [m for n, m in model.named_modules() if n.endswith("0.mlp")][0]
    calls = []
    handle = first_mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    fast = cp.campaign(model, ids, sites, **kwargs)
    n_fast = len(calls)
    slow = cp.campaign(model, ids, sites, reuse_prefix=False, **kwargs)
    handle.remove()
    # golden (2 batches) + block-0 sites (2 sites x 2 seeds x 2 batches); block-1 sites skip it
    assert n_fast == 2 + 8 and len(calls) - n_fast == 2 + 16
    assert fast.units == slow.units and fast.rows == slow.rows
    assert any(u.mismatches for u in fast.units if u.site.startswith("block 1"))
    assert not any(hasattr(m, "forward") and "forward" in vars(m) for m in model.modules())


def test_the_prefix_cache_keeps_only_what_later_runs_read():
    """Sites in blocks 1-3 of a 4-block model: the golden run keeps the outputs of blocks 0-2
    (not 3: no site starts after it), each dropped after the last run that starts after it;
    the units equal those of a campaign that computes every block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    ids = token_ids(4, 16, seed=3)
    groups = {k: v for k, v in cp.module_groups(model, "blocks").items() if k != "block 0"}
    sites = cp.sites_for(groups, ["x"], ["exp"])
    kwargs = dict(p=0.01, seeds=[0, 1], zero_out=_calibrated(model, ids), batch_size=2,
                  progress=False)  # fmt: skip
    kept = []
    real_init, real_finished = cp._BlockPrefix.__init__, cp._BlockPrefix.finished

    def init(self, *a):
        real_init(self, *a)
        kept.append(sorted(self.outputs))

    def finished(self, run):
        real_finished(self, run)
        kept.append(sorted(self.outputs))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cp._BlockPrefix, "__init__", init)
        mp.setattr(cp._BlockPrefix, "finished", finished)
        fast = cp.campaign(model, ids, sites, **kwargs)
    # runs: (block 1, seed 0), (block 1, seed 1), (block 2, 0), (block 2, 1), (block 3, 0), ...
    assert kept == [[0, 1, 2], [0, 1, 2], [1, 2], [1, 2], [2], [2], []]
    slow = cp.campaign(model, ids, sites, reuse_prefix=False, **kwargs)
    assert fast.units == slow.units and fast.rows == slow.rows
    assert any(u.mismatches for u in fast.units)


def test_one_seed_interval_is_token_weighted_like_the_estimate():
    """With one seed the units are one weighted sample: the interval is centred on the
    token-weighted mean (the row's Δ loss, batches of unequal size here), and with equal
    weights it is the plain t interval of the mean."""
    ci = cp.stratified_t_interval([[1.0], [3.0], [2.0]], weights=[3, 1, 2])
    assert ci["mean"] == pytest.approx((3 * 1.0 + 3.0 + 2 * 2.0) / 6)
    plain = cp.stratified_t_interval([[1.0], [3.0], [2.0], [6.0]])
    half = cp.t_quantile(0.975, 3) * statistics.stdev([1.0, 3.0, 2.0, 6.0]) / 2
    assert plain["mean"] == 3.0 and plain["high"] - 3.0 == pytest.approx(half, rel=1e-3)
    model, ids = _setup(n_blocks=5)  # batches of 2, 2 and 1 blocks
    sites = cp.sites_for(cp.module_groups(model, "blocks"), ["x"], ["exp"])
    r = cp.campaign(model, ids, sites, p=0.05, seeds=[0], zero_out=_calibrated(model, ids),
                    batch_size=2, progress=False)  # fmt: skip
    for row in r.rows:
        assert row["interval"] == "t over units"
        mid = (row["delta_loss_low"] + row["delta_loss_high"]) / 2
        assert mid == pytest.approx(row["delta_loss"], rel=1e-9, abs=1e-12), row
    for row in r.rows:  # the old unweighted centre is elsewhere: the weights matter here
        units = [u for u in r.units if u.site == row["site"]]
        unweighted = statistics.fmean((u.loss_sum - u.golden_loss_sum) / u.tokens for u in units)
        assert abs(unweighted - row["delta_loss"]) > 1e-6
