"""The recipe registry is the one place a training method is registered: the CLI, the pipeline,
the selection, the report, the export and a run YAML's sections all follow from it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from runtime.layout import ADAPTER_DIR, RunLayout
from safety_modules.configio import ConfigError, to_dict
from safevlm.cli import build_parser
from safevlm.pipeline import STAGES, PipelineConfig, _recipe_config, load_pipeline_config
from safevlm.selection import EQUAL_BUDGET, SelectionSection, Trials
from safevlm.summary import VARIANTS
from training.recipes.registry import RECIPES, exporting_adapters, recipe

REPO = Path(__file__).resolve().parents[1]


def test_every_recipe_resolves_to_its_section_config_and_run_function():
    for method in RECIPES.values():
        section, config = method.section_class, method.config_class
        assert issubclass(config, section), method.name
        assert {"run_dir", "seed", "model"} <= {f.name for f in dataclasses.fields(config)}, method.name
        assert callable(method.run_function), method.name
        assert hasattr(config(), "pinned_inputs"), method.name


def test_the_run_yaml_has_one_section_per_recipe_and_the_pipeline_one_stage_each():
    fields = {f.name: f.type for f in dataclasses.fields(PipelineConfig)}
    stage_names = [s.name for s in STAGES]
    for method in RECIPES.values():
        assert fields[method.name] is method.section_class
        assert method.name in stage_names
        evaluation = RunLayout.eval_stage(method.name)
        assert (evaluation in stage_names) == bool(method.report_name)
        if method.report_name:                 # evaluated right after it trains
            assert stage_names.index(evaluation) == stage_names.index(method.name) + 1
    assert [name for name, _ in VARIANTS[1:]] == [m.name for m in RECIPES.values() if m.report_name]


def test_the_cli_has_one_command_per_recipe_and_sweeps_where_the_recipe_ranks():
    parser = build_parser()
    for method in RECIPES.values():
        argv = ([method.name] if method.subcommand else ["train", method.name]) + ["--config", "x.yaml"]
        args = parser.parse_args(argv)
        assert args.method == method.name
        assert hasattr(args, "sweep") == bool(method.sweep_metrics)


def test_selection_grids_and_export_follow_the_registry():
    assert {f.name for f in dataclasses.fields(SelectionSection)} >= {m.name for m in RECIPES.values()
                                                                      if m.selectable}
    assert EQUAL_BUDGET == tuple(m.name for m in RECIPES.values() if m.on_top)
    assert set(exporting_adapters()) == {m.name for m in RECIPES.values() if m.exports == ADAPTER_DIR}
    with pytest.raises(ConfigError, match="same number of trials"):
        SelectionSection(ppo=Trials(key="train.lr", values=[1]))


def test_an_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'rlhf'"):
        recipe("rlhf")


def test_the_tiny_default_states_its_own_settings():
    """Every value the tiny run trains with, as the pipeline builds each recipe's config from
    configs/tiny.yaml: a change of a library default cannot change the tiny run."""
    cfg = load_pipeline_config(REPO / "configs" / "tiny.yaml")
    effective = {name: to_dict(_recipe_config(cfg, name)) for name in RECIPES}
    effective["run"] = to_dict(cfg)
    expected = json.loads((REPO / "tests" / "configs" / "tiny_effective.json").read_text())
    assert json.loads(json.dumps(effective)) == expected


def test_a_recipe_config_loads_from_a_run_yaml_or_a_flat_one(tmp_path):
    sft = recipe("sft").load_config(REPO / "configs" / "tiny.yaml", ["train.lr=0.5"])
    assert sft.run_dir == str(Path("checkpoints/tiny/sft")) and sft.train.lr == 0.5
    assert sft.train.micro_batch_size == 16                     # the rest of the run YAML's `sft.train` kept
    assert sft.data.train == str(RunLayout("checkpoints/tiny").world_data.records("sft"))
    flat = tmp_path / "flat.yaml"
    flat.write_text("run_dir: runs/one\ntrain: {lr: 0.25}\n")
    one = recipe("stage1").load_config(flat)
    assert one.run_dir == "runs/one" and one.train.lr == 0.25
    with pytest.raises(ConfigError, match=r"sft\.beta: unknown key"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("run_dir: r\nsft: {beta: 0.1}\n")
        recipe("sft").load_config(bad)
