"""benchmarks/bench_model.py runs end to end at toy size on the CPU (a smoke run of the script,
not a timing: the numbers are only checked to exist and be consistent)."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_model_runs_every_job_at_toy_size(reference_backend, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_model
    finally:
        sys.path.pop(0)
    out = tmp_path / "cells.json"
    argv = ["--tiny", "--device", "cpu", "--batches", "2", "--seq", "16"]
    cells = bench_model.main(argv + ["--steps", "2", "--warmup", "1", "--out", str(out)])
    assert out.exists()
    got = {(c["job"], c["variant"]) for c in cells}
    assert got == {(j, v) for j in ("forward", "train", "lora") for v in ("clean", "ours")}
    for c in cells:
        assert c["error"] is None and c["ms"] > 0
        assert c["time_ratio"] == 1.0 if c["variant"] == "clean" else c["time_ratio"] > 0


def test_bench_model_writes_the_per_p_table_into_the_doc(reference_backend, tmp_path):
    """--p runs ours once per p (clean once) and --doc writes one row per job and p between
    the markers, replacing the previous table (the text around it stays)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_model
    finally:
        sys.path.pop(0)
    doc = tmp_path / "benchmarks.md"
    start, end = bench_model.DOC_MARKERS
    doc.write_text(f"# Benchmarks\n\nbefore\n{start}\nold table\n{end}\nafter\n")
    argv = ["--tiny", "--device", "cpu", "--batches", "2", "--seq", "16", "--jobs", "forward"]
    argv += ["--steps", "1", "--warmup", "1", "--p", "2^-16,0.3", "--doc", str(doc)]
    cells = bench_model.main(argv)
    assert [(c["variant"], c["p"]) for c in cells] == [
        ("clean", None),
        ("ours", "2^-16"),
        ("ours", "0.3"),
    ]
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Benchmarks\n\nbefore\n")
    assert text.endswith(f"{end}\nafter\n")
    rows = [line for line in text.splitlines() if line.startswith("| 2 | forward |")]
    assert [r.split("|")[3].strip() for r in rows] == ["2^-16", "0.3"]
    assert all(r.split("|")[7].strip() == "n/a" for r in rows)  # no mase on the CPU
    with pytest.raises(ValueError, match="'2'"):
        bench_model.parse_p("2")


def test_profile_model_sorts_kernels_and_runs_at_toy_size(reference_backend, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import profile_model
    finally:
        sys.path.pop(0)
    assert profile_model.kind_of("_bitflip_pair_kernel") == "flip"
    assert profile_model.kind_of("_merge_flip_kernel") == "lora merge+flip"
    assert profile_model.kind_of("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert profile_model.kind_of("void at::native::vectorized_elementwise_kernel") == "other"
    out = tmp_path / "profile.json"
    argv = ["--tiny", "--device", "cpu", "--batches", "2", "--seq", "16", "--jobs", "forward"]
    argv += ["--steps", "1", "--warmup", "1", "--profile-steps", "1", "--out", str(out)]
    cells = profile_model.main(argv + ["--trace", str(tmp_path / "traces")])
    assert out.exists() and [c["variant"] for c in cells] == ["clean", "ours"]
    import gzip

    for variant in ("clean", "ours"):  # one gzipped Chrome trace per cell, with our layers
        trace = tmp_path / "traces" / f"forward_{variant}_b2.json.gz"
        events = json.load(gzip.open(trace))["traceEvents"]
        assert any(e.get("cat") == "cpu_op" and e["name"] == "aten::linear" for e in events)
    assert not list((tmp_path / "traces").glob("*.json"))  # only the gzipped copies stay
    assert all(c["wall_ms"] > 0 and c["kernels_per_step"] == 0 for c in cells)  # no CUDA here
    assert all(c["host_ms"] > 0 for c in cells)
    assert "| 2 | forward | ours |" in profile_model.markdown(cells)


def test_profile_host_python_only_runs_with_the_stubbed_launchers():
    """profile_host.py --python-only replaces the Triton launchers by stubs; if a launcher's
    arguments or results change and the stubs no longer match, the layer calls fail here.
    (A subprocess: the stubs replace module attributes for the rest of the process.)"""
    import subprocess

    script = os.path.join(ROOT, "benchmarks", "tuning", "profile_host.py")
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run(
        [sys.executable, script, "--python-only", "--calls", "200"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rows = [line.split() for line in run.stdout.splitlines()]
    names = [
        "BitflipLinear", "+W-bursts", "nn.Linear", "bitflip-LoRA", "PEFT-LoRA", "triton.cdiv",
        "ceil_div",
    ]  # fmt: skip
    assert [r[0] for r in rows] == ["KernelLauncher", *names]
    assert float(rows[0][-2]) > 0  # the launcher's own cost, its compiled kernel stubbed
    for r in rows[1:6]:
        assert float(r[3]) > 0 and float(r[8]) > 0
    assert all(float(r[3]) > 0 for r in rows[6:])


def test_kernel_resources_compiles_the_launches_for_hopper():
    """benchmarks/tuning/kernel_resources.py compiles each captured launch for sm_90 without a
    GPU and reports the cubin's registers (at most 255 per thread), stack and shared memory; the
    merge launches and the paired flip kernel store their flipped tiles 16 bytes at a time (the
    merge once stored its tile 2 bytes per instruction, half the sectors wasted on the GPU).
    (A subprocess without TRITON_INTERPRET: the kernels must be JIT functions to compile.)"""
    import subprocess

    triton = pytest.importorskip("triton")
    tools = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
    if not os.path.exists(os.path.join(tools, "cuobjdump")):
        pytest.skip("this Triton has no bundled cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    script = os.path.join(ROOT, "benchmarks", "tuning", "kernel_resources.py")
    run = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ")]
    assert rows[0][0].strip() == "launch"
    body = rows[1:]  # (the separator row does not start with "| ")
    # the flip kernel (sparse-only and dense variants), the burst kernel, four merge launches at
    # the shipped tile, the paired flip, the correction, the flip and paired flip with stuck lanes,
    # the flip and paired flip with listed stuck weight bits, the counted flip (sparse, dense,
    # without the zero-out, the zero-out alone)
    assert len(body) == 17
    for cells in body:
        warps, registers, stack, shared = (int(c) for c in cells[2:6])
        assert warps > 0 and 0 < registers <= 255 and stack >= 0 and shared >= 0
        assert int(cells[6]) > 0  # SASS instructions
        stores, wide = (int(v) for v in cells[7].replace("(", " ").replace(")", " ").split())
        assert 0 <= wide <= stores
        if "merge" in cells[0] or "paired" in cells[0] or "flip x" in cells[0]:
            assert wide >= 1, cells


def test_kernel_resources_captures_the_launches_the_layers_make():
    """kernel_resources.py compiles what the host functions pass to their launchers: the LoRA
    backward's merge launch carries the uint8 mask and the two bf16 scaled-factor buffers and
    asks for both, the forward's carries x; the argument types are Triton's (pointers by
    dtype, 32-bit ints, fp32 scalars)."""
    pytest.importorskip("triton")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tuning"))
    try:
        import kernel_resources as kr
    finally:
        sys.path.pop(0)
    rows = kr.launches()
    kernel, args, config = rows["LoRA backward: merge + flip W, mask, scaled factors"]()
    signature, constexprs, attrs = kr.specialisation(kernel, args, config)
    types = list(signature.values())
    assert config["WANT_MASK"] and config["WRITE_FACTORS"] and not config["WITH_X"]
    assert types[:7] == ["*bf16", "*fp32", "*fp32", "*bf16", "*u8", "*bf16", "*bf16"]
    assert [args[i].shape for i in (5, 6)] == [(5632, 32), (32, 2048)]
    # as Triton's JIT specialises them: aligned pointers and the 5632 x 2048 shape carry the
    # divisibility hint, a unit stride is a constant, the stream-key words are plain i32
    index = {name: (i,) for i, name in enumerate(signature)}
    assert all(index[n] in attrs for n in ("w_ptr", "out_ptr", "mask_ptr", "M", "N"))
    assert constexprs[index["l_s1"]] == 1 and signature["l_s1"] == "constexpr"
    assert signature["k0"] == "i32" and index["k0"] not in attrs
    assert constexprs[index["BM"]] == config["BM"] and signature["BM"] == "constexpr"
    _, args, config = rows["LoRA forward: merge + flip W, flip x (+ x mask)"]()
    assert config["WITH_X"] and config["X_MASK"] and not config["WANT_MASK"]
    # a table without dense fields compiles the flip kernel without the dense path, one with
    # two dense fields without the gap sampling
    from peft_bitflip.kernels.sampling import FLIPS_DENSE_ONLY, FLIPS_SPARSE_ONLY

    assert config["HAS_FLIPS"] == config["X_FLIPS"] == FLIPS_SPARSE_ONLY
    assert rows["flip x, p = 2^-16 (sparse fields only)"]()[2]["HAS_FLIPS"] == FLIPS_SPARSE_ONLY
    assert rows["flip x, p = 2^-4 (dense fields)"]()[2]["HAS_FLIPS"] == FLIPS_DENSE_ONLY
    # stuck input lanes: a constexpr, off in the launches without them
    assert rows["flip x with stuck input lanes, p = 2^-16"]()[2]["HAS_LANES"] is True
    assert rows["flip x, p = 2^-16 (sparse fields only)"]()[2]["HAS_LANES"] is False
    assert rows["paired flip of x (+ mask, stuck lanes) and W"]()[2]["X_LANES"] is True
    assert rows["paired flip of x (+ mask) and W"]()[2]["X_LANES"] is False
    assert any(isinstance(a, torch.Tensor) and a.shape == (1024, 2048) for a in args)


def test_ncu_kernels_launches_each_kernel_on_the_interpreter(needs_interpreter):
    """benchmarks/tuning/ncu_kernels.py at toy size on the CPU: every row launches (the merge in its
    forms, the flip kernels, the correction on the merge's own mask), and ``--only`` keeps the
    rows asked for, in the script's order."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tuning"))
    try:
        import ncu_kernels
    finally:
        sys.path.pop(0)
    argv = ["--device", "cpu", "--shape", "64x64", "--tokens", "16"]
    names = ncu_kernels.main(argv)
    assert len(names) == 8 and names[0] == "clone W" and names[-1] == "correction"
    assert ncu_kernels.main(argv + ["--only", "7,2"]) == [names[2], names[7]]


def test_bench_cpu_flip_runs_at_toy_size():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_cpu_flip
    finally:
        sys.path.pop(0)
    table = bench_cpu_flip.main(
        ["--shape", "64x32", "--p", "2^-16,0.5", "--repeats", "1", "--threads", "1",
         "--paths", "native"]
    )  # fmt: skip
    lines = table.splitlines()
    assert lines[0] == "| p | native ms |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| clone", "| 2^-16", "| 0.5"]
