"""docs/benchmarks.md and docs/gold-frontier.md are written by `python -m benchmarks.render` from the saved results
alone."""

import json
import shutil
import subprocess
import sys

import pytest

from benchmarks import render


TEMPLATE = render.TEMPLATES / "benchmarks.md"
PAGE = render.PAGES[TEMPLATE]


@pytest.mark.parametrize("template", list(render.PAGES), ids=lambda t: t.name)
def test_each_page_is_the_render_of_the_saved_results_byte_for_byte(template):
    assert render.PAGES[template].read_text() == render.render(template.read_text()), \
        f"docs/{template.name} differs from its render: run .venv/bin/python -m benchmarks.render (edit the template)"
    assert len(render.PAGES) >= 2


def test_a_changed_result_changes_the_page_and_a_missing_one_stops_the_render(tmp_path):
    folder = tmp_path / "results"
    shutil.copytree(render.RESULTS, folder)
    data = json.loads((folder / "faults.json").read_text())
    data["kills"] = 12345
    (folder / "faults.json").write_text(json.dumps(data))
    page = render.render(TEMPLATE.read_text(), folder)
    assert "killed with SIGKILL **12345 times**" in page and page != PAGE.read_text()
    (folder / "multiturn.json").unlink()
    with pytest.raises(render.Missing, match="multiturn.json is missing"):
        render.render(TEMPLATE.read_text(), folder)
    with pytest.raises(render.Missing, match="faults.json: no judgements.nowhere"):
        render.render("{{faults:judgements.nowhere}}", folder)


def test_values_take_paths_lists_and_formats():
    data = {"a": {"b": [{"x": 1.234}, {"x": 5.0}]}, "n": None}
    assert render.fmt(render.lookup(data, ["a", "b", "*", "x"], "t"), ".1f") == "1.2, 5.0"
    assert render.fmt(render.lookup(data, ["a", "b", "-1", "x"], "t"), None) == "5.0"
    assert render.fmt(render.lookup(data, ["n"], "t"), ".2f") == "n/a"


def test_check_mode_says_whether_the_page_is_current():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.render", "--check"], cwd=render.ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.count("up to date") == len(render.PAGES), proc.stdout + proc.stderr


def test_the_page_does_not_depend_on_where_the_repository_was():
    """A result records its command with the absolute paths of the machine that ran it; the page shows them from
    the repository root, so a clone anywhere renders the same page."""
    recorded = "minirlhf grpo --config /work/main/configs/a.yaml --out /tmp/x/runs/bench-1/grpo --kl_coef=0.1"
    assert render.clean_command(recorded) == "minirlhf grpo --config configs/a.yaml --out runs/bench-1/grpo --kl_coef=0.1"
    assert render.clean_command("a | b") == "a \\| b"
