"""benchmarks/bench_stuck_at.py runs end to end at toy size on the CPU (a smoke run of the
script, not a timing: the numbers are only checked to exist and be consistent)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_stuck_at
    finally:
        sys.path.pop(0)
    return bench_stuck_at


def test_bench_stuck_at_small_writes_its_tables_into_the_doc(reference_backend, tmp_path):
    bench = _bench()
    doc = tmp_path / "benchmarks.md"
    start, end = bench.DOC_MARKERS
    doc.write_text(f"# Benchmarks\n\nbefore\n{start}\nold table\n{end}\nafter\n")
    rows, ops = bench.main(["--small", "--device", "cpu", "--p", "2^-4", "--doc", str(doc)])
    assert [(r["tensors"], r["job"]) for r in rows] == [
        (t, j) for t in ("w", "x+w") for j in bench.JOBS
    ]
    for r in rows:
        assert set(r["ms"]) == set(bench.VARIANTS) and all(v > 0 for v in r["ms"].values())
        assert r["stuck_ratio"] == r["ms"]["stuck"] / r["ms"]["flip"]
    assert list(ops) == ["2^-4"] and all(v > 0 for v in ops["2^-4"].values())
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Benchmarks\n\nbefore\n")
    assert text.endswith(f"{end}\nafter\n")
    table = [line for line in text.splitlines() if line.startswith("| 2^-4 | x+w |")]
    assert [line.split("|")[3].strip() for line in table] == list(bench.JOBS)
    with pytest.raises(ValueError, match="'4096'"):
        bench.main(["--device", "cpu", "--shape", "4096"])


def test_bench_bursts_small_writes_its_table(reference_backend, tmp_path):
    """benchmarks/bench_bursts.py runs end to end at toy size (it shares bench_model's timer)
    and writes its table between its markers; the ratios are those of the times it returns."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_bursts
    finally:
        sys.path.pop(0)
    doc = tmp_path / "benchmarks.md"
    start, end = bench_bursts.DOC_MARKERS
    doc.write_text(f"before\n{start}\nold table\n{end}\nafter\n")
    rows = bench_bursts.main(
        ["--small", "--device", "cpu", "--q", "2^-10", "--k", "3", "--doc", str(doc)]
    )
    assert [(r["q"], r["k"]) for r in rows] == [("2^-10", 3)]
    assert rows[0]["p"] == 2**-10 * 3 / 16  # bf16: 16 bits per element
    text = doc.read_text()
    assert "old table" not in text and text.startswith("before\n") and text.endswith("after\n")
    (line,) = [line for line in text.splitlines() if line.startswith("| 2^-10 |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "3" and all(float(c.rstrip("x")) > 0 for c in cells[3:])
    op, fwd, queued = rows[0]["op"], rows[0]["fwd"], rows[0]["queued"]
    assert cells[5] == f"{op['burst'] / op['flip']:.2f}x"
    assert cells[9] == f"{fwd['burst'] / fwd['flip']:.2f}x"  # per synchronised call
    assert cells[13] == f"{queued['burst'] / queued['flip']:.2f}x"  # back to back
    assert len(cells) == 14


def test_back_to_back_timing_makes_every_call_and_returns_the_mean(monkeypatch):
    """bench_model.time_back_to_back: warmup + rounds x steps calls, each round's mean time."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_model
    finally:
        sys.path.pop(0)
    clock = iter(range(0, 1000, 2))  # each perf_counter call 2 s later: one round of 3 = 2 s
    monkeypatch.setattr(bench_model.time, "perf_counter", lambda: next(clock))
    calls = []
    ms = bench_model.time_back_to_back(lambda: calls.append(1), torch.device("cpu"), 2, 3, 4)
    assert len(calls) == 2 + 3 * 4
    assert ms == 2e3 / 3


def test_bench_training_faults_small_writes_its_table(reference_backend, tmp_path):
    """benchmarks/bench_training_faults.py runs end to end at toy size and writes its table;
    the site variant leaves the tensor flipped as the transient-flip op flips it."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_training_faults as bench
    finally:
        sys.path.pop(0)
    import torch

    from peft_bitflip.spec import FlipSpec

    doc = tmp_path / "benchmarks.md"
    start, end = bench.DOC_MARKERS
    doc.write_text(f"before\n{start}\nold\n{end}\nafter\n")
    rows = bench.main(["--small", "--device", "cpu", "--p", "2^-6", "--doc", str(doc)])
    assert [(r["dtype"], r["threshold"]) for r in rows] == [
        (d, t) for d in ("bf16", "fp32") for t in ("-", 1.0)
    ]
    assert all(set(r["ms"]) == set(bench.VARIANTS) for r in rows)
    text = doc.read_text()
    assert "old" not in text and text.count("| bf16 | 2^-6 |") == 2
    t = torch.randn(8, 16)
    want = bench.variant_fns(t.clone(), FlipSpec(0.1, 0.1, 1.0))["flip"]()
    for variant in ("site", "separate"):
        u = t.clone()
        bench.variant_fns(u, FlipSpec(0.1, 0.1, 1.0))[variant]()
        assert torch.equal(u, want), variant
    with pytest.raises(ValueError, match="'fp8'"):
        bench.main(["--device", "cpu", "--dtypes", "fp8"])
