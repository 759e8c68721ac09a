"""`safevlm guard`: a verdict per PNG as JSON from the installed command, equal to the Python API's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safety_modules import SafetyConfig, SafetyGuard, attach, load_adapter, save_adapter
from safevlm.cli import main

PROMPT = "Is this image safe to post?"


@pytest.fixture
def adapter_and_images(tiny_builder, make_image, tmp_path):
    base, processor = tiny_builder("llava")     # what `--model tiny` builds: build_tiny_llava(seed=0)
    torch.manual_seed(3)
    model = attach(base, SafetyConfig(num_safety_tokens=4, num_queries=4, projector_depth=1), processor)
    with torch.no_grad():
        for p in model.safety.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_adapter(model, tmp_path / "adapter")
    paths = []
    for i, size in enumerate([(32, 32), (40, 24)]):
        paths.append(tmp_path / f"image{i}.png")
        make_image(10 + i, size).save(paths[-1])
    return tmp_path / "adapter", paths


def safevlm_command() -> list[str]:
    script = Path(sys.executable).with_name("safevlm")
    assert script.is_file(), f"the console script is not installed beside {sys.executable} (pip install -e .)"
    return [str(script)]


@pytest.mark.slow
def test_guard_prints_json_equal_to_the_api(adapter_and_images, tiny_builder):
    adapter, paths = adapter_and_images
    result = subprocess.run(safevlm_command() + ["guard", "--model", "tiny", "--adapter", str(adapter),
                                                 *map(str, paths), "--prompt", PROMPT, "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(result.stdout)
    assert [row["image"] for row in rows] == [str(p) for p in paths]

    base, processor = tiny_builder("llava")
    model = load_adapter(base, adapter, processor)
    from safety_modules.images import load_image
    expected = SafetyGuard(model).verdict([load_image(p) for p in paths], PROMPT)
    names = model.safety_config.risk_types
    for row, verdict in zip(rows, expected):
        assert row["level"] == verdict.level and row["risk_type"] == verdict.risk_type
        assert row["level"] in range(model.safety_config.num_safety_levels) and row["risk_type"] in names
        assert sum(row["level_probs"]) == pytest.approx(1.0, abs=1e-5)
        assert sum(row["risk_probs"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["level_probs"] == pytest.approx(verdict.level_probs, abs=1e-6)
        assert row["risk_probs"] == pytest.approx(verdict.risk_probs, abs=1e-6)
        assert row["unsafe_prob"] == pytest.approx(1 - row["level_probs"][0], abs=1e-6)
        assert row["action"] in {"pass", "instruct", "refuse"}


def test_guard_bad_image_is_a_one_line_error(adapter_and_images, tmp_path, capsys):
    adapter, _ = adapter_and_images
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    assert main(["guard", "--model", "tiny", "--adapter", str(adapter), str(broken), "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.png" in err and "cannot decode" in err


def test_guard_adapter_for_another_model_is_a_one_line_error(adapter_and_images, capsys):
    adapter, paths = adapter_and_images
    assert main(["guard", "--model", "tiny-next", "--adapter", str(adapter), str(paths[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'model_type'" in err
