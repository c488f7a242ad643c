"""lm-eval task definitions shipped with peft_bitflip (pass ``TASK_DIR`` as ``--include_path``)."""

import os

TASK_DIR = os.path.dirname(os.path.abspath(__file__))
"""Directory holding the task YAML files."""

TEXT_PPL_TASK = "bitflip_text_ppl"
"""Offline perplexity task on local text (default: Python's documentation)."""
