"""report.md's builder: blocks joined by one blank line, empty ones left out, cells made safe, written atomically."""

from minirlhf.report import before_after, md_cell, plot_links, section, table, write_report
from minirlhf.rundir import RunDir


def test_blocks_are_joined_by_one_blank_line_and_empty_ones_are_left_out(tmp_path):
    (tmp_path / "loss.png").write_bytes(b"\x89PNG")
    path = write_report(RunDir(tmp_path), "A run", "One paragraph.", [], "",
                        before_after([("loss", "2.0", "1.5")]), plot_links(tmp_path, ["loss", "kl"]),
                        section("Samples", table(["prompt", "reply"], [[md_cell("a | b"), md_cell("x\n  y")]])))
    assert path == tmp_path / "report.md" and sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "report.md"]
    assert path.read_text() == (
        "# A run\n\nOne paragraph.\n\n|  | before | after |\n| --- | --- | --- |\n| loss | 2.0 | 1.5 |\n\n"
        "![loss](loss.png)\n\n## Samples\n\n| prompt | reply |\n| --- | --- |\n| a \\| b | x y |\n")


def test_a_report_replaces_the_last_one_and_an_empty_cell_stays_a_cell(tmp_path):
    write_report(tmp_path, "first", "old text")
    write_report(tmp_path, "second", table(["a", "b"], [[md_cell(""), 1]]))
    assert (tmp_path / "report.md").read_text() == "# second\n\n| a | b |\n| --- | --- |\n|   | 1 |\n"
