"""The README's benchmark figures are one committed run's (benchmarks/readme.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import readme  # noqa: E402

SECTIONS = ("rows", "soak", "large", "workers", "cold_start", "compare")


def test_the_readme_block_is_what_the_committed_run_renders_to():
    done = subprocess.run([sys.executable, "-m", "benchmarks.readme", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_figure_edited_by_hand_is_found():
    run = json.loads(readme.DOCS_JSON.read_text())
    text = readme.README.read_text()
    block = readme.render(run)
    assert readme.replace_block(text, block) == text
    run["cold_start"]["lossd"]["median_s"] += 0.5
    assert readme.replace_block(text, readme.render(run)) != text


@pytest.mark.parametrize("left_out", SECTIONS)
def test_a_run_that_skipped_a_section_renders_without_it(left_out):
    run = json.loads(readme.DOCS_JSON.read_text())
    run.pop(left_out, None)
    if left_out == "rows":
        run.pop("soak", None)  # --skip-small leaves out both
    block = readme.render(run)
    assert block.startswith(readme.BEGIN) and block.endswith(readme.END)
    assert ("| (d) lossd batching on, unary |" in block) == (left_out != "rows")
    assert ("in-process lossd engine" in block) == (left_out != "large")
