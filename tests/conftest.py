import os

import pytest

from peft_bitflip.kernels.op import interpreter_enabled


@pytest.fixture
def needs_interpreter():
    if not interpreter_enabled():
        pytest.skip("set TRITON_INTERPRET=1 to run the Triton kernel on the CPU (.ci/run does)")


@pytest.fixture
def reference_backend(monkeypatch):
    """Run the CPU ops through the fast PyTorch reference (bit-identical to the kernel)."""
    monkeypatch.setenv("PEFT_BITFLIP_CPU_BACKEND", "reference")


def pytest_report_header(config):
    return f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"
