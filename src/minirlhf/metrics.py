"""metrics.jsonl (one JSON object per logged step) and PNG plots of it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from minirlhf.checkpoint import atomic_write_text
from minirlhf.rundir import RunDir


class MetricsWriter:
    """Appends `{"step": ..., name: value, ...}` lines to RUN_DIR/metrics.jsonl and keeps them for plots."""

    def __init__(self, run_dir: Path, keep_until: int | None = None, trackers: list | None = None,
                 keep_rows: int | None = None):
        """`keep_until=N` (a resumed run) keeps the rows of steps up to N already in the file, and of them the first
        `keep_rows` (the rows its checkpoint had seen), and drops the rest. `trackers` (tracking.py's dashboards) get
        every row logged from now on."""
        self.path = RunDir(run_dir).metrics
        self.rows: list[dict] = []
        self.trackers = trackers or []
        if keep_until is not None and self.path.is_file():
            self.rows = [r for r in map(_parse, self.path.read_text(encoding="utf-8").splitlines())
                         if r is not None and r.get("step", 0) <= keep_until][:keep_rows]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, **metrics: float) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        for tracker in self.trackers:
            tracker.log(step, row)

    def close(self) -> None:
        self._file.close()
        for tracker in self.trackers:
            tracker.close()

    def plot(self, path: Path, names: list[str], title: str, x: str = "step") -> Path:
        return plot_curves(self.rows, Path(path), names, title, x)


def _parse(line: str) -> dict | None:
    """A metrics row, or None for a blank line or one torn by a crash mid-write."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return v


def plot_curves(rows: list[dict], path: Path, names: list[str], title: str, x: str = "step") -> Path:
    """One PNG with a line per metric name (each drawn where present and finite)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name in names:
        pts = [(r[x], r[name]) for r in rows if name in r and isinstance(r[name], (int, float)) and math.isfinite(r[name])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, markersize=3, label=name)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
