"""Start-up cost of the autoload hook (``peft_bitflip-autoload.pth``): ``python -c pass`` and
``python -c "import transformers"`` with the hook on (default) and off
(``PEFT_BITFLIP_AUTOLOAD=0``), in fresh processes, alternating, median of ``--repeats``.

    python benchmarks/startup_cost.py --repeats 20

Prints a markdown table (the one in docs/benchmarks.md) and checks that neither command imports
peft_bitflip.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": "pass",
    'python -c "import transformers"': "import transformers",
    "... + AutoModelForCausalLM, AutoQuantizationConfig": (
        "import transformers; from transformers import AutoModelForCausalLM; "
        "from transformers.quantizers import auto"
    ),
}
CHECK = "import sys; assert 'peft_bitflip' not in sys.modules, 'peft_bitflip was imported'"


def once(code: str, autoload: bool) -> float:
    env = {**os.environ, "PEFT_BITFLIP_AUTOLOAD": "1" if autoload else "0"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"{code}; {CHECK}"], env=env, check=True)
    return time.perf_counter() - start


def hook_import_us() -> float:
    """Microseconds ``-X importtime`` books for importing the hook module at start-up."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True
    ).stderr
    for line in out.splitlines():
        if line.rstrip().endswith("_peft_bitflip_autoload"):
            return float(line.split("|")[1])
    raise SystemExit("the hook module was not imported at start-up: is the package installed?")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    rows = [
        "| command | hook off (ms) | hook on (ms) | difference (ms) |",
        "|---|---:|---:|---:|",
    ]
    for label, code in COMMANDS.items():
        once(code, True), once(code, False)  # warm the file-system caches
        on, off = [], []
        for _ in range(args.repeats):
            off.append(once(code, False))
            on.append(once(code, True))
        m_on, m_off = statistics.median(on) * 1e3, statistics.median(off) * 1e3
        rows.append(f"| `{label}` | {m_off:.1f} | {m_on:.1f} | {m_on - m_off:+.1f} |")
    hook = statistics.median(hook_import_us() for _ in range(args.repeats))
    label = "import of the hook module at start-up (`-X importtime`)"
    rows.append(f"| {label} | | {hook / 1e3:.2f} | |")
    table = "\n".join(rows)
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
          f"median of {args.repeats} fresh processes each\n\n{table}")  # fmt: skip
    return table


if __name__ == "__main__":
    main()
