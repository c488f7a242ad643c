"""One vocabulary for the ``peft-bitflip`` flags (issue 36.3) and named errors for missing
extras (36.5): ``--output_dir``, ``--seed`` / ``--seeds``, deprecated spellings, one
probability parser, defaults in ``--help``."""

from __future__ import annotations

import argparse
import sys
import warnings

import pytest
from tiny_models import save_tiny_lm

import peft_bitflip as pb
from peft_bitflip.cli import build_parser, main, parse_probability
from peft_bitflip.extras import MissingExtraError, require

SUBCOMMANDS = ["demo", "eval", "generate", "sweep", "compare", "attribute"]
pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Llama saved clean, and with a fault model of seed 3."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("flags")
    model = save_tiny_lm(root / "clean")
    pb.apply_bitflip(
        model, pb.BitflipConfig(w_p_exp=1e-3, w_zero_out_t=2.0, x_zero_out_t=5.0, seed=3)
    )
    model.save_pretrained(root / "flipped")
    AutoTokenizer.from_pretrained(root / "clean").save_pretrained(root / "flipped")
    return root


def _subparsers(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_shows_every_default(name):
    sub = _subparsers(build_parser())[name]
    text = sub.format_help()
    for action in sub._actions:
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        if isinstance(action, argparse._HelpAction):
            continue
        help_text = sub.formatter_class("x")._get_help_string(action)
        assert "default" in help_text, f"{name} {action.option_strings[0]}: {help_text!r}"
    assert "(default: " in text


@pytest.mark.parametrize(
    "argv,dest,value,new",
    [
        (["eval", "m", "--save_dir", "o"], "output_dir", "o", "--output_dir"),
        (["generate", "m", "--save_dir", "o"], "output_dir", "o", "--output_dir"),
        (["sweep", "m", "--out", "o"], "output_dir", "o", "--output_dir"),
        (["compare", "--clean_model", "m", "--out", "o"], "output_dir", "o", "--output_dir"),
        (["eval", "m", "--bitflip_seed", "4"], "seed", 4, "--seed"),
        (["generate", "m", "--bitflip_seed", "4"], "seed", 4, "--seed"),
        (["compare", "--clean_model", "m", "--bitflip_seed", "4"], "seeds", [4], "--seeds"),
        (["attribute", "m", "--bitflip_seed", "4"], "seeds", [4], "--seeds"),
    ],
)
def test_old_spellings_work_and_name_the_new_flag(argv, dest, value, new):
    with pytest.warns(FutureWarning, match=f"{argv[-2]} is deprecated.*use {new}"):
        args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    # the new spelling: same value, no warning
    new_argv = [new if a == argv[-2] else a for a in argv]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        assert getattr(build_parser().parse_args(new_argv), dest) == value


@pytest.mark.parametrize("name", ["eval", "generate", "sweep", "compare", "attribute"])
def test_output_dir_everywhere(name):
    argv = [name, "--clean_model", "m"] if name == "compare" else [name, "m"]
    assert build_parser().parse_args([*argv, "--output_dir", "o"]).output_dir == "o"


@pytest.mark.parametrize("text", ["2^-16", "2**-16", "2 ^ -16", "1.52587890625e-05"])
def test_one_probability_parser_everywhere(text):
    assert parse_probability(text) == 2**-16
    p = build_parser()
    assert p.parse_args(["demo", "--p", text]).p == [2**-16]
    assert p.parse_args(["sweep", "m", "--p", text]).p == [2**-16]
    assert p.parse_args(["eval", "m", "--x_p_exp", text]).x_p_exp == 2**-16


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "2^3", "lots", "nan"])
def test_probabilities_out_of_range_are_refused_at_parse_time(bad, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--p", bad])
    assert repr(bad) in capsys.readouterr().err


def test_demo_runs_with_a_power_of_two(capsys):
    argv = ["demo", "--n", "4096", "--device", "cpu", "--p", "2^-4", "--threshold", "none"]
    assert main(argv) == 0
    assert "0.0625" in capsys.readouterr().out


def test_seed_overrides_the_checkpoint_seed_and_alone_keeps_a_clean_run_clean(ckpt, capsys):
    """--seed is the flip seed of a single run, on top of the checkpoint's config (one rule);
    on a clean checkpoint it only seeds the sampler: it does not switch flips on."""
    gen = ["--max_new_tokens", "2", "--no-do_sample"]
    assert main(["generate", str(ckpt / "flipped"), "--seed", "8", *gen]) == 0
    out = capsys.readouterr().out
    assert "seed=8" in out and "w: p_exp=0.001, p_frac=0, zero-out 2" in out
    assert main(["generate", str(ckpt / "flipped"), *gen]) == 0
    assert "seed=3" in capsys.readouterr().out  # no flag: the checkpoint's seed
    assert main(["generate", str(ckpt / "clean"), "--seed", "8", *gen]) == 0
    assert "flips: none (clean)" in capsys.readouterr().out


def test_missing_extra_is_named(monkeypatch, ckpt):
    """36.5: a subcommand whose optional dependency is missing names the extra to install."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'peft-bitflip\[eval\]'"):
        main(["eval", str(ckpt / "clean"), "--tasks", "bitflip_text_ppl"])
    monkeypatch.setitem(sys.modules, "datasets", None)
    for argv in (["sweep", str(ckpt / "clean")], ["compare", "--clean_model", str(ckpt / "clean")]):
        with pytest.raises(MissingExtraError, match=r"needs datasets.*peft-bitflip\[eval\]"):
            main(argv)
    require("x", "json")  # present: nothing raised


class _Resolved(Exception):
    """Stops a command once its fault model is resolved."""


@pytest.mark.parametrize("command", ["eval", "generate", "compare", "attribute"])
def test_one_flag_rule_in_every_subcommand(command, ckpt, monkeypatch):
    """36.2 still holds with the new flags: a flag overrides its field on top of the
    checkpoint's config (else the original's fault model); the rest is kept."""
    import peft_bitflip.cli as cli

    real = cli.flips_from_args

    def resolved(*args, **kwargs):
        raise _Resolved(real(*args, **kwargs))

    monkeypatch.setattr(cli, "flips_from_args", resolved)

    def run(path, *flags):
        argv = [command, "--clean_model", path] if command == "compare" else [command, path]
        with pytest.raises(_Resolved) as e:
            main([*argv, *flags])
        return e.value.args[0]

    cfg = run(str(ckpt / "flipped"), "--x_p_exp", "2^-7")
    assert (cfg.x_p_exp, cfg.x_zero_out_t, cfg.w_p_exp, cfg.w_zero_out_t, cfg.seed) == (
        2**-7, 5.0, 1e-3, 2.0, 3,
    )  # fmt: skip
    original = pb.BitflipConfig.original_default()
    cfg = run(str(ckpt / "clean"), "--w_zero_out_t", "none")
    assert cfg.w_zero_out_t is None and cfg.x_p_exp == original.x_p_exp
    assert cfg.x_zero_out_t == original.x_zero_out_t


def test_commands_and_recipes_share_one_deprecation_mechanism():
    """Every hidden old spelling of the CLI and of the recipes is a cli.DeprecatedAlias (one
    class: a FutureWarning naming the new flag), and each parser has some."""
    from peft_bitflip.cli import DeprecatedAlias
    from recipes import finetune_lora, pretrain_clm

    parsers = [*_subparsers(build_parser()).values()]
    parsers += [finetune_lora.build_parser(), pretrain_clm.build_parser()]
    found = []
    for parser in parsers:
        hidden = [a for a in parser._actions if a.option_strings and a.help == argparse.SUPPRESS]
        assert all(isinstance(a, DeprecatedAlias) for a in hidden), hidden
        found.append(len(hidden))
    assert found[-2] > 0 and found[-1] > 0 and sum(found[:-2]) > 0
