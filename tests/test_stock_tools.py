"""Stock tools load bit-flip checkpoints with no import (issue 31), in fresh processes of this
environment (CI builds it as the README says: ``pip install -e .``, whose wheel carries
``peft_bitflip-autoload.pth``): ``from_pretrained``, ``pipeline``, the ``lm_eval`` CLI; the
switch ``PEFT_BITFLIP_AUTOLOAD=0``; the ``trust_remote_code`` stub; the regular wheel."""

from __future__ import annotations

import glob
import json
import os
import site
import subprocess
import sys
import zipfile

import pytest
from tiny_models import save_trained_tiny_lm

import peft_bitflip as pb
from peft_bitflip.lm_eval_tasks import TASK_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
FLIPS = pb.BitflipConfig(
    x_p_exp=0.01, x_p_frac=0.05, w_p_exp=0.01, w_p_frac=0.05, x_zero_out_t=8.0, w_zero_out_t=1.0
)
LOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], **json.loads(sys.argv[2]))
layers = [n for n, x in m.named_modules() if hasattr(x, "bitflip_calls")]
with torch.no_grad():
    logits = m(input_ids=torch.arange(12).view(1, 12)).logits
print(json.dumps({"imported": "peft_bitflip" in sys.modules, "layers": len(layers),
                  "sum": float(logits.double().sum()), "type": type(m).__name__}))
"""


def run(args, env=None, check=True):
    env = {**os.environ, "PEFT_BITFLIP_CPU_BACKEND": "reference", **(env or {})}
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd="/")
    if check and proc.returncode:
        raise AssertionError(f"{args[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


def load(path, env=None, **kwargs) -> dict:
    out = run([sys.executable, "-c", LOAD, str(path), json.dumps(kwargs)], env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    save_trained_tiny_lm(root / "clean", steps=60)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "clean", quantization_config=FLIPS)
    model.save_pretrained(root / "flipped")
    AutoTokenizer.from_pretrained(root / "clean").save_pretrained(root / "flipped")
    return root


def test_the_environment_has_the_autoload_hook():
    pth = [p for d in site.getsitepackages() for p in glob.glob(f"{d}/peft_bitflip-autoload.pth")]
    assert pth, "peft_bitflip-autoload.pth is not installed: reinstall with pip install -e ."


def test_from_pretrained_without_import_builds_the_bit_flip_layers(ckpts):
    plain = load(ckpts / "flipped")
    assert plain["imported"] and plain["layers"] == 14
    code = LOAD.replace("import json, sys, torch", "import json, sys, torch, peft_bitflip")
    out = run([sys.executable, "-c", code, str(ckpts / "flipped"), "{}"])
    imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert plain["sum"] == imported["sum"]  # the same flips as with the import
    assert plain["sum"] != load(ckpts / "clean")["sum"]


def test_transformers_alone_never_imports_peft_bitflip(ckpts):
    clean = load(ckpts / "clean")
    assert not clean["imported"] and clean["layers"] == 0


def test_autoload_off_gives_the_clean_model_as_before(ckpts):
    off = load(ckpts / "flipped", env={"PEFT_BITFLIP_AUTOLOAD": "0"})
    assert not off["imported"] and off["layers"] == 0
    assert off["sum"] == load(ckpts / "clean")["sum"]


def test_pipeline_generates_under_flips(ckpts):
    code = (
        "import json, sys, torch\nfrom transformers import pipeline, set_seed\n"
        "p = pipeline('text-generation', model=sys.argv[1], device='cpu')\n"
        "n = sum(hasattr(x, 'bitflip_calls') for x in p.model.modules())\n"
        "out = p('The for statement', max_new_tokens=8, do_sample=False)[0]['generated_text']\n"
        "print(json.dumps({'layers': n, 'text': out}))\n"
    )
    flipped, clean = (
        json.loads(run([sys.executable, "-c", code, str(ckpts / n)]).stdout.splitlines()[-1])
        for n in ("flipped", "clean")
    )
    assert flipped["layers"] == 14 and clean["layers"] == 0
    assert flipped["text"].startswith("The for statement") and flipped["text"] != clean["text"]


def _lm_eval(program, path, out_dir, text) -> float:
    metadata = {"data_files": [str(text)], "sample_by": "paragraph", "max_documents": 4}
    args = [
        os.path.join(BIN, program), "--model", "hf", "--model_args", f"pretrained={path}",
        "--tasks", "bitflip_text_ppl", "--metadata", json.dumps(metadata),
        "--batch_size", "2", "--output_path", str(out_dir),
    ]  # fmt: skip
    if program == "lm_eval":
        args += ["--include_path", TASK_DIR]
    run(args)
    (result,) = glob.glob(f"{out_dir}/**/results_*.json", recursive=True)
    with open(result) as f:
        return json.load(f)["results"]["bitflip_text_ppl"]["word_perplexity,none"]


def test_stock_lm_eval_cli_evaluates_with_flips(ckpts, tmp_path):
    from peft_bitflip import data

    text = tmp_path / "text.txt"  # four short paragraphs of the embedded corpus
    docs = data.local_corpus()["validation"]["text"]
    text.write_text("\n\n".join(d[:800] for d in docs[:4]))
    flipped = _lm_eval("lm_eval", ckpts / "flipped", tmp_path / "stock", text)
    clean = _lm_eval("lm_eval", ckpts / "clean", tmp_path / "clean", text)
    explicit = _lm_eval("peft-bitflip-lm-eval", ckpts / "flipped", tmp_path / "explicit", text)
    assert flipped > clean
    assert flipped == explicit


def test_remote_code_stub_loads_where_the_hook_is_off(ckpts, tmp_path):
    import shutil

    from peft_bitflip.remote_code import add_remote_code

    path = tmp_path / "stub"
    shutil.copytree(ckpts / "flipped", path)
    add_remote_code(path)
    assert json.loads((path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    off = {"PEFT_BITFLIP_AUTOLOAD": "0", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = load(path, env=off, trust_remote_code=True)
    assert out["layers"] == 14 and out["sum"] == load(ckpts / "flipped")["sum"]
    assert out["type"] == "LlamaForCausalLM"
    missing = LOAD.replace(
        "import json, sys, torch", "import json, sys, torch\nsys.modules['peft_bitflip'] = None"
    )
    args = [sys.executable, "-c", missing, str(path), '{"trust_remote_code": true}']
    proc = run(args, off, check=False)
    assert proc.returncode != 0 and "pip install peft-bitflip" in proc.stderr
    with pytest.raises(ValueError, match="no bit-flip"):
        add_remote_code(ckpts / "clean")


def test_the_regular_wheel_carries_the_hook(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), ROOT])  # fmt: skip
    (wheel,) = glob.glob(f"{tmp_path}/peft_bitflip-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "peft_bitflip-autoload.pth" in names and "_peft_bitflip_autoload.py" in names
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), wheel])
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); "
        "import _peft_bitflip_autoload as a; print(a.__file__, a.Finder in sys.meta_path)"
    )
    out = run([sys.executable, "-S", "-c", code, str(target)]).stdout
    assert str(target) in out and out.strip().endswith("True")
