"""The notebooks in notebooks/ run end to end (offline, CPU) and show what they claim.

Each notebook is executed with nbclient in a fresh kernel of this interpreter, in a temporary
working directory, with the checkout first on PYTHONPATH; its last cell asserts its own
results and prints a ``RESULT key=value ...`` line, which is checked here as well.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL_NAME = "peft-bitflip-test"
CELL_TIMEOUT_S = 600


def _notebook(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def _kernel_manager(tmp_path: Path):
    """A kernel manager for this interpreter (``sys.executable``), whatever "python3" kernel
    spec the machine has: a kernel spec written to a private directory."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import AsyncKernelManager
    from jupyter_client.kernelspec import KernelSpecManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(str(kernels / KERNEL_NAME))
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    spec = ksm.get_kernel_spec(KERNEL_NAME)
    assert spec.argv[0] == sys.executable, spec.argv
    return AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def _kernel_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment (TRITON_INTERPRET etc.) with the checkout importable, and
    IPython's state and the notebooks' temporary files (checkpoints, plots) in ``tmp_path``."""
    env = dict(os.environ)
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    (tmp_path / "tmp").mkdir()
    env["TMPDIR"] = str(tmp_path / "tmp")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    return env


def _run(name: str, tmp_path: Path, monkeypatch):
    """Execute notebook ``name`` and return it with its outputs (fails on any cell error)."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files
    nb = _notebook(name)
    workdir = tmp_path / "work"
    workdir.mkdir()
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(workdir)}},  # the kernel's working directory
    )
    start = time.perf_counter()
    # cleanup_kc: shut the kernel down afterwards (nbclient leaves a kernel manager it was
    # given running otherwise)
    client.execute(env=_kernel_env(tmp_path), cwd=str(workdir), cleanup_kc=True)
    print(f"{name}: executed in {time.perf_counter() - start:.1f} s")
    return nb


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


def _result(nb) -> dict[str, float]:
    """The ``RESULT key=value ...`` line of the last code cell, as floats."""
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    lines = [ln for ln in _stdout(last).splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, _stdout(last)
    return {k: float(v) for k, v in re.findall(r"(\S+)=(\S+)", lines[0])}


def _has_image(nb) -> bool:
    return any(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (path.name, cell.id)
    assert nb.metadata["kernelspec"]["name"] == "python3"


def test_quickstart_notebook(tmp_path, monkeypatch):
    nb = _run("01_quickstart.ipynb", tmp_path, monkeypatch)
    r = _result(nb)
    assert 1 < r["clean_ppl"] < r["flipped_ppl"] < r["sweep_ppl_1e-2"], r
    assert _has_image(nb)  # the perplexity-vs-p plot
    assert not list((tmp_path / "work").iterdir())  # nothing written to the working directory


def test_lora_recovery_notebook(tmp_path, monkeypatch):
    nb = _run("02_lora_recovery.ipynb", tmp_path, monkeypatch)
    r = _result(nb)
    assert 1 < r["clean_ppl"] < r["recovered_ppl"] < r["flipped_ppl"], r
    text = "\n".join(_stdout(c) for c in nb.cells if c.cell_type == "code")
    for row in ("| clean |", "| flipped |", "| recovered |"):
        assert row in text, row
    assert "reloaded logits == merged logits: True" in text
    assert _has_image(nb)  # the loss curve
    assert not list((tmp_path / "work").iterdir())
