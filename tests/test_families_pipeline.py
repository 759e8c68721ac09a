"""`safevlm run` end to end on a non-LLaVA family: the smoke config on tiny Qwen2-VL.

Every stage finishes (world, classifiers, stage 0, evaluations, stages 1-2, PPO, SFT, DPO, report,
export); every adapter, loaded onto a fresh copy of the stage-0 export, reproduces the trained
outputs; the report compares the same methods as LLaVA's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "tests" / "configs" / "pipeline_smoke.yaml"
FAMILY_SPEC = "tiny-qwen2_vl"
METHODS = ("base (stage 0)", "stage 2", "PPO", "SFT", "DPO")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("family_pipeline") / "run"
    proc = subprocess.run([sys.executable, "-m", "safevlm.cli", "run", str(SMOKE), f"run_dir={out}",
                           f"model.path={FAMILY_SPEC}"], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_every_stage_finished_on_the_family(run_dir: Path):
    from safevlm.pipeline import STAGES
    for stage in STAGES:
        assert (run_dir / stage.name / "DONE.json").is_file(), f"stage {stage.name} left no DONE.json"
    assert json.loads((run_dir / "config.json").read_text())["model"]["path"] == FAMILY_SPEC
    exported = json.loads((run_dir / "stage0" / "model" / "config.json").read_text())
    assert exported["model_type"] == "qwen2_vl"


def test_adapters_load_onto_a_fresh_stage0_export_and_reproduce_outputs(run_dir: Path):
    from pipeline_checks import assert_adapters_reproduce_outputs
    assert_adapters_reproduce_outputs(run_dir, run_dir / "stage0" / "model", run_dir / "world" / "data" / "images" / "0.png")


def test_report_compares_every_method(run_dir: Path):
    report = (run_dir / "report" / "report.md").read_text()
    for method in METHODS:
        assert f"| {method} |" in report, f"{method} missing from the report"
