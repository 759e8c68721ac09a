"""The README's two commands stay true: CI runs exactly the documented test command, and the first
command runs the tiny default end to end."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bash_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)]


def test_readme_has_the_two_commands_first():
    blocks = bash_blocks()
    assert len(blocks) >= 2, "README.md should open with two ```bash blocks (run, test)"
    assert blocks[0].endswith("safevlm run configs/tiny.yaml"), blocks[0]
    assert "pytest" in blocks[1]


def test_ci_runs_exactly_the_readme_test_command():
    test_command = bash_blocks()[1]
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command in ci, f"the README's test command is not verbatim in .ci/run: {test_command!r}"
