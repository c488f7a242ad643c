"""Tests of BitflipConfig: validation, per-module resolution, serialisation, original loaders."""

import json
import math
import re

import pytest

from peft_bitflip.config import BitflipConfig, read_original_toml
from peft_bitflip.spec import FlipSpec

P16 = 2.0**-16

ORIGINAL_YAML = """\
use_regex: true
transform_flavor: fc
layer_name_to_config:
  default:
    w_p_exp: 1.52587890625e-05
    w_p_frac: 1.52587890625e-05
    w_zero_out_t: 1.25
    x_p_exp: 1.52587890625e-05
    x_p_frac: 1.52587890625e-05
    x_zero_out_t: 30.0
    w_seed_exp: 0
    w_seed_frac: 0
    x_seed_exp: 0
    x_seed_frac: 0
"""

# experiments/llm-bitflip/lora_finetune/transform_cfg.toml, as in the seed doc
ORIGINAL_TOML = """\
use_lora = true
[fc]
w_p_exp = 1.52587890625e-05
w_p_frac = 1.52587890625e-05
w_zero_out_t = 1.25
x_p_exp = 1.52587890625e-05
x_p_frac = 1.52587890625e-05
x_zero_out_t = 30.0
[lora]
r = 32
lora_alpha = 32
"""

LLAMA_NAMES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.k_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.0.self_attn.o_proj",
    "model.layers.0.mlp.gate_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.down_proj",
    "lm_head",
]


def rich_config():
    return BitflipConfig(
        x_p_exp=1e-9,
        x_p_frac=0.25,
        x_zero_out_t=30.0,
        w_p_exp=1e-12,
        w_p_frac=0.5,
        w_zero_out_t=math.inf,
        seed=2**63 - 1,
        compat_snap=True,
        layer_name_to_config={
            r"model\.layers\.1\..*": {"w_p_frac": 0.125},
            r".*q_proj": None,
            "default": {"x_zero_out_t": None},
        },
        skip_modules=["lm_head", "embed_.*"],
    )


# ---------------------------------------------------------------------- defaults


def test_defaults():
    c = BitflipConfig()
    assert (c.x_p_exp, c.x_p_frac, c.x_zero_out_t) == (0.0, 0.0, None)
    assert (c.w_p_exp, c.w_p_frac, c.w_zero_out_t) == (0.0, 0.0, None)
    assert c.seed == 0 and c.compat_snap is False
    assert c.layer_name_to_config is None
    assert c.skip_modules == ["lm_head"]
    assert c.quant_method == "bitflip" and BitflipConfig.quant_method == "bitflip"
    # the default list is not shared between instances
    a, b = BitflipConfig(), BitflipConfig()
    a.skip_modules.append("x")
    assert b.skip_modules == ["lm_head"]


def test_ints_are_normalised_to_float():
    c = BitflipConfig(x_p_exp=1, w_zero_out_t=2)
    assert c.x_p_exp == 1.0 and isinstance(c.x_p_exp, float)
    assert c.w_zero_out_t == 2.0 and isinstance(c.w_zero_out_t, float)


def test_original_default():
    c = BitflipConfig.original_default()
    assert c.x_p_exp == c.x_p_frac == c.w_p_exp == c.w_p_frac == 1.52587890625e-05 == P16
    assert c.w_zero_out_t == 1.25 and c.x_zero_out_t == 30.0
    assert c.skip_modules == ["lm_head"] and c.layer_name_to_config is None
    assert BitflipConfig.original_default(seed=7).seed == 7


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize("key", ["x_p_exp", "x_p_frac", "w_p_exp", "w_p_frac"])
@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_probability_out_of_range(key, bad):
    with pytest.raises(ValueError, match=rf"{key} must be a probability in \[0, 1\], got {bad}"):
        BitflipConfig(**{key: bad})


def test_probability_nan():
    with pytest.raises(ValueError, match=r"w_p_frac must be a probability in \[0, 1\], got nan"):
        BitflipConfig(w_p_frac=float("nan"))


@pytest.mark.parametrize("key", ["x_zero_out_t", "w_zero_out_t"])
def test_negative_threshold(key):
    with pytest.raises(ValueError, match=rf"{key} must be None or a float >= 0, got -1.0"):
        BitflipConfig(**{key: -1.0})


def test_nan_threshold():
    with pytest.raises(ValueError, match=r"x_zero_out_t must be None or a float >= 0, got nan"):
        BitflipConfig(x_zero_out_t=float("nan"))


@pytest.mark.parametrize(
    "key, value, pattern",
    [
        ("x_p_exp", True, r"x_p_exp must be a float in \[0, 1\], got True \(bool\)"),
        ("w_p_frac", "0.1", r"w_p_frac must be a float in \[0, 1\], got '0.1' \(str\)"),
        ("x_p_frac", None, r"x_p_frac must be a float in \[0, 1\], got None"),
        ("w_zero_out_t", False, r"w_zero_out_t must be None or a float >= 0, got False"),
        ("x_zero_out_t", "30", r"x_zero_out_t must be None or a float >= 0, got '30' \(str\)"),
    ],
)
def test_wrong_types(key, value, pattern):
    with pytest.raises(TypeError, match=pattern):
        BitflipConfig(**{key: value})


@pytest.mark.parametrize(
    "seed, exc",
    [(-1, ValueError), (2**63, ValueError), (True, TypeError), (1.0, TypeError), ("0", TypeError)],
)
def test_bad_seed(seed, exc):
    with pytest.raises(
        exc, match=rf"seed must be an int in \[0, 2\*\*63\), got {re.escape(repr(seed))}"
    ):
        BitflipConfig(seed=seed)


def test_seed_bounds_accepted():
    assert BitflipConfig(seed=2**63 - 1).seed == 2**63 - 1


def test_bad_compat_snap():
    with pytest.raises(TypeError, match="compat_snap must be a bool, got 1"):
        BitflipConfig(compat_snap=1)


def test_unknown_rule_key_names_key_and_pattern():
    with pytest.raises(ValueError, match=r"layer_name_to_config\['.\*proj'\].*'x_p_exponent'"):
        BitflipConfig(layer_name_to_config={".*proj": {"x_p_exponent": 0.1}})


def test_original_seed_key_rejected_in_our_rules():
    # the original's per-layer seeds belong only in the original files (loaders drop them)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['w_seed_exp'\]"):
        BitflipConfig(layer_name_to_config={"default": {"w_seed_exp": 0}})


def test_rule_value_validated_with_pattern_in_name():
    with pytest.raises(
        ValueError,
        match=r"layer_name_to_config\['default'\]\.w_p_exp must be a probability .* got 2.0",
    ):
        BitflipConfig(layer_name_to_config={"default": {"w_p_exp": 2.0}})
    with pytest.raises(
        ValueError, match=r"layer_name_to_config\['q'\]\.x_zero_out_t must be None .* got -3.0"
    ):
        BitflipConfig(layer_name_to_config={"q": {"x_zero_out_t": -3}})


def test_rule_value_of_wrong_type():
    with pytest.raises(TypeError, match=r"layer_name_to_config\['q'\] must be None or a dict"):
        BitflipConfig(layer_name_to_config={"q": 0.1})


def test_bad_regex_in_rules():
    with pytest.raises(ValueError, match=r"layer_name_to_config key 'layers\.\(' is not a valid"):
        BitflipConfig(layer_name_to_config={"layers.(": None})


def test_bad_regex_in_skip_modules():
    with pytest.raises(ValueError, match=r"skip_modules entry '\[lm' is not a valid regular"):
        BitflipConfig(skip_modules=["[lm"])


def test_skip_modules_must_be_a_list():
    with pytest.raises(
        TypeError, match="skip_modules must be a list of regex strings, got 'lm_head'"
    ):
        BitflipConfig(skip_modules="lm_head")


def test_empty_rules_rejected():
    with pytest.raises(ValueError, match="layer_name_to_config is empty"):
        BitflipConfig(layer_name_to_config={})


def test_duplicate_pattern_in_pair_list():
    with pytest.raises(ValueError, match=r"pattern 'a' twice"):
        BitflipConfig(layer_name_to_config=[["a", None], ["a", {}]])


def test_validate_after_mutation():
    c = BitflipConfig()
    c.w_p_exp = 3.0
    with pytest.raises(ValueError, match=r"w_p_exp must be a probability in \[0, 1\], got 3.0"):
        c.validate()


def test_update_validates_and_returns_unused():
    c = BitflipConfig()
    unused = c.update(w_p_frac=0.5, not_a_field=1)
    assert c.w_p_frac == 0.5 and unused == {"not_a_field": 1}
    with pytest.raises(ValueError, match="x_p_exp must be a probability"):
        c.update(x_p_exp=-1.0)


# ---------------------------------------------------------------------- resolve


def test_resolve_without_rules_uses_top_level_values():
    c = BitflipConfig(x_p_exp=0.1, x_p_frac=0.2, x_zero_out_t=3.0, w_p_exp=0.3, w_p_frac=0.4)
    x, w = c.resolve("model.layers.3.mlp.up_proj")
    assert x == FlipSpec(0.1, 0.2, 3.0, False)
    assert w == FlipSpec(0.3, 0.4, None, False)


@pytest.mark.parametrize("name", ["lm_head", "model.lm_head", "base_model.model.lm_head"])
def test_lm_head_skipped_by_default(name):
    assert BitflipConfig(w_p_frac=0.5).resolve(name) is None


def test_skip_modules_full_match_only():
    c = BitflipConfig(w_p_frac=0.5)
    assert c.resolve("lm_head_extra") is not None
    assert c.resolve("model.my_lm_head") is not None
    assert c.resolve("lm_head.sub") is not None  # last component is "sub"
    c_full = BitflipConfig(w_p_frac=0.5, skip_modules=[r"model\.layers\.0\..*"])
    assert c_full.resolve("model.layers.0.mlp.up_proj") is None
    assert c_full.resolve("model.layers.10.mlp.up_proj") is not None
    assert c_full.resolve("lm_head") is not None  # an explicit list replaces the default


def test_skip_modules_checked_before_rules():
    c = BitflipConfig(layer_name_to_config={"lm_head": {"w_p_exp": 0.5}, "default": {}})
    assert c.resolve("lm_head") is None
    c2 = BitflipConfig(layer_name_to_config={"lm_head": {"w_p_exp": 0.5}}, skip_modules=[])
    assert c2.resolve("lm_head")[1].p_exp == 0.5


def test_resolve_rules_first_match_wins_in_dict_order():
    rules = {
        r"model\.layers\.0\.mlp\..*": {"w_p_exp": 0.1},
        r".*\.mlp\..*": {"w_p_exp": 0.2},
        r".*proj": {"w_p_exp": 0.3},
    }
    c = BitflipConfig(layer_name_to_config=rules)
    assert c.resolve("model.layers.0.mlp.up_proj")[1].p_exp == 0.1
    assert c.resolve("model.layers.1.mlp.up_proj")[1].p_exp == 0.2
    assert c.resolve("model.layers.1.self_attn.q_proj")[1].p_exp == 0.3
    assert c.match_rule("model.layers.0.mlp.up_proj") == r"model\.layers\.0\.mlp\..*"
    reordered = BitflipConfig(layer_name_to_config=dict(reversed(list(rules.items()))))
    assert reordered.resolve("model.layers.0.mlp.up_proj")[1].p_exp == 0.3
    assert reordered != c  # order matters, so it takes part in equality


def test_resolve_uses_full_match_not_search():
    c = BitflipConfig(layer_name_to_config={"q_proj": {"w_p_exp": 0.5}})
    assert c.resolve("model.layers.0.self_attn.q_proj") is None
    assert c.resolve("q_proj")[1].p_exp == 0.5


def test_default_fallback_and_none_skip():
    c = BitflipConfig(
        layer_name_to_config={
            r".*\.k_proj": None,
            "default": {"x_p_frac": 0.5, "w_zero_out_t": 2.0},
        }
    )
    assert c.resolve("model.layers.0.self_attn.k_proj") is None
    x, w = c.resolve("model.layers.0.self_attn.q_proj")
    assert x.p_frac == 0.5 and w.zero_out_threshold == 2.0
    assert c.match_rule("model.layers.0.self_attn.q_proj") == "default"


def test_default_is_not_tried_as_a_regex_before_other_rules():
    c = BitflipConfig(layer_name_to_config={"default": {"w_p_exp": 0.1}, "a": {"w_p_exp": 0.2}})
    assert c.resolve("a")[1].p_exp == 0.2  # "a" wins although "default" comes first
    assert c.resolve("b")[1].p_exp == 0.1


def test_no_match_and_no_default_means_not_wrapped():
    c = BitflipConfig(w_p_exp=0.5, layer_name_to_config={r".*q_proj": {}})
    assert c.resolve("model.layers.0.mlp.up_proj") is None
    assert c.match_rule("model.layers.0.mlp.up_proj") is None
    assert c.resolve("model.layers.0.self_attn.q_proj")[1].p_exp == 0.5


def test_default_none_skips_everything_unmatched():
    c = BitflipConfig(layer_name_to_config={r".*q_proj": {"w_p_exp": 0.1}, "default": None})
    assert c.resolve("model.layers.0.mlp.up_proj") is None
    assert c.resolve("model.layers.0.self_attn.q_proj")[1].p_exp == 0.1


def test_partial_override_keeps_top_level_values():
    c = BitflipConfig(
        x_p_exp=0.01,
        x_p_frac=0.02,
        x_zero_out_t=30.0,
        w_p_exp=0.03,
        w_p_frac=0.04,
        w_zero_out_t=1.25,
        layer_name_to_config={r".*down_proj": {"w_p_frac": 0.5, "x_zero_out_t": None}},
    )
    x, w = c.resolve("model.layers.0.mlp.down_proj")
    assert x == FlipSpec(0.01, 0.02, None)  # threshold explicitly disabled by the rule
    assert w == FlipSpec(0.03, 0.5, 1.25)
    assert c.values_for("model.layers.0.mlp.down_proj") == {
        "x_p_exp": 0.01,
        "x_p_frac": 0.02,
        "x_zero_out_t": None,
        "w_p_exp": 0.03,
        "w_p_frac": 0.5,
        "w_zero_out_t": 1.25,
    }


def test_compat_snap_passes_through_to_flipspec():
    p = 3e-5  # between 2**-16 and 2**-15: the original rounds down to 2**-16
    x, w = BitflipConfig(x_p_exp=p, w_p_frac=p, compat_snap=True).resolve("fc")
    assert x.compat_snap and w.compat_snap
    assert x.effective_p_exp == P16 and w.effective_p_frac == P16
    assert x.p_exp == p  # the requested value is kept
    x, w = BitflipConfig(x_p_exp=p, w_p_frac=p).resolve("fc")
    assert x.effective_p_exp == p and w.effective_p_frac == p


def test_check_rules_match():
    c = BitflipConfig(
        layer_name_to_config={
            r".*\.q_proj": {"w_p_exp": 0.1},
            r".*\.query": {"w_p_exp": 0.1},
            r".*\.wq": None,
            "default": {},
        }
    )
    with pytest.raises(ValueError, match="matched no module") as info:
        c.check_rules_match(LLAMA_NAMES)
    msg = str(info.value)
    assert r"'.*\\.query'" in msg and r"'.*\\.wq'" in msg
    assert "q_proj'" not in msg.split("Patterns must")[0]  # the used pattern is not reported
    assert "model.layers.0.self_attn.q_proj" in msg  # example names help to fix the regex


def test_check_rules_match_passes():
    c = BitflipConfig(
        layer_name_to_config={r".*\.q_proj": {"w_p_exp": 0.1}, "lm_head": None, "default": {}}
    )
    c.check_rules_match(LLAMA_NAMES)  # lm_head: None matching a skipped module is fine
    BitflipConfig(w_p_exp=0.1).check_rules_match([])  # no rules: nothing to check


def test_check_rules_match_rule_shadowed_by_skip_modules():
    c = BitflipConfig(layer_name_to_config={"lm_head": {"w_p_exp": 0.1}, "default": {}})
    with pytest.raises(
        ValueError, match=r"'lm_head' matches only modules excluded by skip_modules"
    ):
        c.check_rules_match(LLAMA_NAMES)
    BitflipConfig(
        layer_name_to_config={"lm_head": {"w_p_exp": 0.1}}, skip_modules=[]
    ).check_rules_match(LLAMA_NAMES)


# ---------------------------------------------------------------------- serialisation


def test_to_dict_is_json_safe_and_complete():
    c = rich_config()
    d = c.to_dict()
    assert d["quant_method"] == "bitflip"
    assert set(d) == {
        "quant_method",
        "x_p_exp",
        "x_p_frac",
        "x_zero_out_t",
        "w_p_exp",
        "w_p_frac",
        "w_zero_out_t",
        "seed",
        "compat_snap",
        "layer_name_to_config",
        "skip_modules",
    }
    assert d["layer_name_to_config"] == [
        [r"model\.layers\.1\..*", {"w_p_frac": 0.125}],
        [r".*q_proj", None],
        ["default", {"x_zero_out_t": None}],
    ]
    assert json.loads(json.dumps(d)) == d
    # to_dict returns copies: mutating it does not touch the config
    d["layer_name_to_config"][0][1]["w_p_frac"] = 0.9
    d["skip_modules"].append("x")
    assert c.layer_name_to_config[r"model\.layers\.1\..*"] == {"w_p_frac": 0.125}
    assert c.skip_modules == ["lm_head", "embed_.*"]


def test_dict_round_trip():
    c = rich_config()
    back = BitflipConfig.from_dict(c.to_dict())
    assert back == c
    assert list(back.layer_name_to_config) == list(c.layer_name_to_config)
    assert back.resolve("model.layers.1.mlp.up_proj") == c.resolve("model.layers.1.mlp.up_proj")
    assert BitflipConfig.from_dict(BitflipConfig().to_dict()) == BitflipConfig()


def test_rule_order_survives_sorted_json():
    # transformers writes config.json with sort_keys=True
    c = BitflipConfig(layer_name_to_config={"z.*": {"w_p_exp": 0.1}, "a.*": {"w_p_exp": 0.2}})
    s = json.dumps({"quantization_config": c.to_dict()}, sort_keys=True)
    back = BitflipConfig.from_dict(json.loads(s)["quantization_config"])
    assert list(back.layer_name_to_config) == ["z.*", "a.*"]
    assert back.resolve("za")[1].p_exp == 0.1


def test_json_file_round_trip(tmp_path):
    c = rich_config()
    path = tmp_path / "bitflip.json"
    c.to_json_file(path)
    assert json.loads(path.read_text())["quant_method"] == "bitflip"
    assert BitflipConfig.from_json_file(path) == c
    assert json.loads(c.to_json_string()) == json.loads(path.read_text())


def test_from_json_file_reads_model_config_json(tmp_path):
    c = BitflipConfig.original_default(seed=3)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "quantization_config": c.to_dict()}))
    assert BitflipConfig.from_json_file(path) == c


def test_from_dict_kwargs_override():
    c = BitflipConfig.from_dict({"w_p_exp": 0.1, "seed": 1}, seed=5, x_p_frac=0.2)
    assert (c.w_p_exp, c.seed, c.x_p_frac) == (0.1, 5, 0.2)


def test_from_dict_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown BitflipConfig key\(s\) \['bogus', 'w_p'\]"):
        BitflipConfig.from_dict({"w_p": 0.1}, bogus=1)
    c, unused = BitflipConfig.from_dict(
        {"w_p_exp": 0.1, "w_p": 0.2}, return_unused_kwargs=True, bogus=1
    )
    assert c.w_p_exp == 0.1 and unused == {"w_p": 0.2, "bogus": 1}
    c, unused = BitflipConfig.from_dict({}, return_unused_kwargs=True)
    assert c == BitflipConfig() and unused == {}


def test_from_dict_quant_method():
    assert BitflipConfig.from_dict({"quant_method": "bitflip"}) == BitflipConfig()
    with pytest.raises(ValueError, match="quant_method must be 'bitflip', got 'gptq'"):
        BitflipConfig.from_dict({"quant_method": "gptq"})


def test_from_dict_validates():
    with pytest.raises(ValueError, match=r"x_p_exp must be a probability in \[0, 1\], got 7.0"):
        BitflipConfig.from_dict({"x_p_exp": 7.0})


def test_repr_is_readable_and_evaluable():
    c = BitflipConfig(w_p_frac=0.5, layer_name_to_config={"default": {"x_p_exp": 0.25}})
    r = repr(c)
    assert r.startswith("BitflipConfig(x_p_exp=0.0, ")
    assert "w_p_frac=0.5" in r and "'default': {'x_p_exp': 0.25}" in r
    assert "quant_method" not in r
    assert eval(r, {"BitflipConfig": BitflipConfig}) == c


def test_equality():
    assert BitflipConfig(w_p_exp=0.1) == BitflipConfig(w_p_exp=0.1)
    assert BitflipConfig(w_p_exp=0.1) != BitflipConfig(w_p_exp=0.2)
    assert BitflipConfig(seed=1) != BitflipConfig(seed=2)
    assert BitflipConfig() != BitflipConfig(skip_modules=[])


# ---------------------------------------------------------------------- original YAML


def test_original_yaml(tmp_path):
    path = tmp_path / "fc-only-w-a-exp-frac.yaml"
    path.write_text(ORIGINAL_YAML)
    with pytest.warns(UserWarning, match=r"x_seed_exp.*derive.*per module"):
        c = BitflipConfig.from_original_yaml(path)
    assert c == BitflipConfig.original_default()
    x, w = c.resolve("model.layers.0.self_attn.q_proj")
    assert x == FlipSpec(P16, P16, 30.0) and w == FlipSpec(P16, P16, 1.25)
    assert c.resolve("lm_head") is None


def test_original_yaml_skip_modules_empty_flips_output_head(tmp_path):
    path = tmp_path / "meta.yaml"
    path.write_text(ORIGINAL_YAML)
    with pytest.warns(UserWarning):
        c = BitflipConfig.from_original_yaml(path, skip_modules=[], seed=4, compat_snap=True)
    assert c.resolve("lm_head")[1] == FlipSpec(P16, P16, 1.25, compat_snap=True)
    assert c.resolve("output")[0].zero_out_threshold == 30.0  # torchtitan's head name
    assert c.seed == 4


def test_original_yaml_rules_at_top_level_and_nulls():
    # fc-only-w-only-frac-only.yaml: only w_p_frac set, everything else null
    data = {
        "default": {
            "w_p_exp": None,
            "w_p_frac": 0.000244140625,
            "w_zero_out_t": None,
            "x_p_exp": None,
            "x_p_frac": None,
            "x_zero_out_t": None,
        },
        "lm_head": None,
    }
    c = BitflipConfig.from_original_yaml(data)  # no seed keys: no warning
    assert list(c.layer_name_to_config) == ["default", "lm_head"]
    x, w = c.resolve("layers.0.attention.wq")
    assert x == FlipSpec(0.0, 0.0, None)
    assert w == FlipSpec(0.0, 2.0**-12, None)
    assert BitflipConfig.from_original_yaml(data, skip_modules=[]).resolve("lm_head") is None


def test_original_yaml_missing_keys_mean_disabled_not_inherited():
    data = {"layer_name_to_config": {r".*wq": {"w_p_exp": 0.5}, "default": {"x_p_frac": 0.25}}}
    c = BitflipConfig.from_original_yaml(data)
    x, w = c.resolve("layers.0.attention.wq")
    assert x == FlipSpec(0.0, 0.0, None) and w == FlipSpec(0.5, 0.0, None)
    assert c.resolve("layers.0.attention.wk")[0].p_frac == 0.25


def test_original_yaml_use_regex_false():
    data = {
        "use_regex": False,
        "layer_name_to_config": {
            "layers.0.attention.wq": {"w_p_exp": 0.5},
            "default": {"w_p_exp": 0.25},
        },
    }
    c = BitflipConfig.from_original_yaml(data)
    assert c.resolve("layers.0.attention.wq")[1].p_exp == 0.5
    # "." is literal: an exact name, not a regex
    assert c.resolve("layersX0.attention.wq")[1].p_exp == 0.25
    assert next(iter(c.layer_name_to_config)) == r"layers\.0\.attention\.wq"
    regex = BitflipConfig.from_original_yaml({**data, "use_regex": True})
    assert regex.resolve("layersX0.attention.wq")[1].p_exp == 0.5


def test_original_yaml_seed_warning_for_any_seed_key():
    with pytest.warns(UserWarning, match=r"w_seed_frac.*reused seed 0 everywhere"):
        BitflipConfig.from_original_yaml({"default": {"w_p_exp": 0.1, "w_seed_frac": 3}})


def test_original_yaml_numeric_strings_accepted():
    # PyYAML reads 1e-5 (no dot) as a string
    c = BitflipConfig.from_original_yaml({"default": {"w_p_exp": "1e-5"}})
    assert c.w_p_exp == 1e-5


def test_original_yaml_errors():
    with pytest.raises(ValueError, match="transform_flavor 'conv' is not supported"):
        BitflipConfig.from_original_yaml({"transform_flavor": "conv", "default": {}})
    with pytest.raises(ValueError, match=r"layer_name_to_config\['default'\] has unknown key.*'p'"):
        BitflipConfig.from_original_yaml({"default": {"p": 0.1}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['extra'\]"):
        BitflipConfig.from_original_yaml({"layer_name_to_config": {"default": {}}, "extra": 1})
    with pytest.raises(ValueError, match=r"\['default'\]\.x_p_exp must be a probability.*got 2.0"):
        BitflipConfig.from_original_yaml({"default": {"x_p_exp": 2.0}})
    with pytest.raises(ValueError, match="no layer_name_to_config rules"):
        BitflipConfig.from_original_yaml({"use_regex": True})
    with pytest.raises(TypeError, match="use_regex must be true or false, got 'no'"):
        BitflipConfig.from_original_yaml({"use_regex": "no", "default": {}})


# ---------------------------------------------------------------------- original TOML


def test_original_toml(tmp_path):
    path = tmp_path / "transform_cfg.toml"
    path.write_text(ORIGINAL_TOML)
    c = BitflipConfig.from_original_toml(path)
    assert c == BitflipConfig.original_default()
    assert c.resolve("lm_head") is None
    c2, lora, use_lora = read_original_toml(path)
    assert c2 == c
    assert lora == {"r": 32, "lora_alpha": 32}
    assert use_lora is True


def test_original_toml_baseline_and_overrides(tmp_path):
    # transform_cfg_baseline.toml: empty [fc] means no flips
    path = tmp_path / "transform_cfg_baseline.toml"
    path.write_text("use_lora = false\n[fc]\n[lora]\nr = 8\nlora_alpha = 16\n")
    c, lora, use_lora = read_original_toml(path, skip_modules=[], seed=9)
    assert c == BitflipConfig(skip_modules=[], seed=9)
    assert c.resolve("model.layers.0.mlp.up_proj") == (FlipSpec(), FlipSpec())
    assert lora == {"r": 8, "lora_alpha": 16} and use_lora is False


def test_original_toml_seeds_warn_and_defaults():
    with pytest.warns(UserWarning, match="x_seed_exp"):
        c, lora, use_lora = read_original_toml({"fc": {"x_p_frac": 0.5, "x_seed_exp": 0}})
    assert c.x_p_frac == 0.5 and c.w_zero_out_t is None
    assert lora == {"r": 32, "lora_alpha": 32} and use_lora is True


def test_original_toml_errors():
    with pytest.raises(ValueError, match=r"\[fc\] has unknown key\(s\) \['w_p'\]"):
        read_original_toml({"fc": {"w_p": 0.1}})
    with pytest.raises(ValueError, match=r"\[lora\] has unknown key\(s\) \['dropout'\]"):
        read_original_toml({"lora": {"dropout": 0.1}})
    with pytest.raises(ValueError, match=r"\[lora\]\.r must be a positive int, got 0"):
        read_original_toml({"lora": {"r": 0}})
    with pytest.raises(ValueError, match=r"lora_alpha must be a positive number, got -1"):
        read_original_toml({"lora": {"lora_alpha": -1}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bitflip'\]"):
        read_original_toml({"bitflip": {}})
    with pytest.raises(ValueError, match=r"\[fc\]\.w_zero_out_t must be None or a float >= 0"):
        read_original_toml({"fc": {"w_zero_out_t": -1.0}})
    with pytest.raises(TypeError, match="use_lora must be true or false, got 1"):
        read_original_toml({"use_lora": 1})
