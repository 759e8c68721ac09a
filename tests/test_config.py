"""SafetyConfig: YAML loading, validation errors that name the key, and key=value overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from safety_modules import ConfigError, SafetyConfig
from safety_modules.configio import from_dict, load_config, parse_overrides, to_dict

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_tiny_yaml_safety_section_loads_every_key():
    cfg = SafetyConfig.from_yaml(TINY_YAML, section="safety")
    raw = yaml.safe_load(TINY_YAML.read_text())["safety"]
    assert raw, "configs/tiny.yaml has no safety section"
    for key, value in raw.items():
        assert getattr(cfg, key) == value, key
    # keys the file leaves out keep their defaults
    assert cfg.head_num_heads == SafetyConfig().head_num_heads
    # the tiny default labels risks with the concept world's categories
    from concept_world.concepts import RISK_TYPES
    assert cfg.risk_types == list(RISK_TYPES)


def test_yaml_values_and_overrides(tmp_path):
    path = write(tmp_path, "num_safety_tokens: 8\nprojector: mlp\nnum_queries: 10\nloss_weight: 3\n")
    cfg = SafetyConfig.from_yaml(path)
    assert (cfg.num_safety_tokens, cfg.projector, cfg.num_queries) == (8, "mlp", 10)
    assert cfg.loss_weight == 3.0 and isinstance(cfg.loss_weight, float)  # int coerced to float

    cfg = SafetyConfig.from_yaml(path, ["num_safety_tokens=16", "risk_types=[none, gore, spam]",
                                        "projector=c-abstractor", "num_queries=9", "loss_weight=0.5"])
    assert cfg.num_safety_tokens == 16
    assert cfg.risk_types == ["none", "gore", "spam"]
    assert cfg.projector == "c-abstractor" and cfg.num_queries == 9
    assert cfg.loss_weight == 0.5


def test_nested_section_and_dotted_overrides(tmp_path):
    @dataclass
    class Outer:
        safety: SafetyConfig = field(default_factory=SafetyConfig)
        lr: float = 1e-5

    path = write(tmp_path, "lr: 1e-3\nsafety:\n  num_queries: 16\n  num_safety_tokens: 2\n")
    # `1e-3` is a number (PyYAML alone would read it as a string: YAML 1.1 floats need a dot)
    assert load_config(Outer, path).lr == 1e-3
    cfg = load_config(Outer, path, ["safety.num_safety_tokens=8", "lr=2e-4"])
    assert isinstance(cfg.safety, SafetyConfig)
    assert (cfg.safety.num_queries, cfg.safety.num_safety_tokens, cfg.lr) == (16, 8, 2e-4)

    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, ["safety.num_queries=7"])
    assert "safety.num_queries" in str(err.value) and str(path) in str(err.value)

    with pytest.raises(ConfigError) as err:
        load_config(Outer, path, ["safety.tokens=8"])
    assert "safety.tokens" in str(err.value) and "unknown key" in str(err.value)


@pytest.mark.parametrize("text, key, words", [
    ("num_safety_tokens: four\n", "num_safety_tokens", "integer"),
    ("num_safety_tokens: true\n", "num_safety_tokens", "integer"),   # a bool is not an int
    ("num_safety_tokens: 0\n", "num_safety_tokens", ">= 1"),
    ("projektor: mlp\n", "projektor", "unknown key"),
    ("projector: conv\n", "projector", "c-abstractor"),
    ("num_queries: 5\n", "num_queries", "square"),
    ("loss_weight: -1\n", "loss_weight", ">= 0"),
    ("loss_weight: ten\n", "loss_weight", "number"),
    ("risk_types: [none, hate, hate]\n", "risk_types", "distinct"),
    ("risk_types: none\n", "risk_types", "list"),
    ("num_safety_levels: 1\n", "num_safety_levels", ">= 2"),
    ("projector_mlp_depth: 0\n", "projector_mlp_depth", ">= 1"),
])
def test_errors_name_the_key_and_the_file(tmp_path, text, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        SafetyConfig.from_yaml(path)
    message = str(err.value)
    assert key in message and words in message and str(path) in message


def test_errors_inside_a_section_name_the_section(tmp_path):
    path = write(tmp_path, "safety:\n  num_queries: 6\n")
    with pytest.raises(ConfigError, match=r"safety\.num_queries"):
        SafetyConfig.from_yaml(path, section="safety")


def test_override_errors_name_the_override(tmp_path):
    path = write(tmp_path, "num_queries: 4\n")
    with pytest.raises(ConfigError, match="num_safety_tokens.*key=value"):
        SafetyConfig.from_yaml(path, ["num_safety_tokens"])
    with pytest.raises(ConfigError, match="num_safety_tokens.*integer"):
        SafetyConfig.from_yaml(path, ["num_safety_tokens=many"])
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1, 2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}


def test_file_level_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        SafetyConfig.from_yaml(missing)
    bad = write(tmp_path, "num_queries: [4\n", "bad.yaml")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        SafetyConfig.from_yaml(bad)
    listy = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        SafetyConfig.from_yaml(listy)


def test_mlp_projector_allows_any_query_count_and_dict_round_trip():
    cfg = SafetyConfig(projector="mlp", num_queries=7, risk_types=["none", "x"], num_safety_levels=3)
    again = from_dict(SafetyConfig, to_dict(cfg))
    assert again == cfg
    assert cfg.risk_index("x") == 1
    with pytest.raises(ConfigError, match="'y'"):
        cfg.risk_index("y")
