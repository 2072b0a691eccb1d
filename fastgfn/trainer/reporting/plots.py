"""The training curves of a run, read back from ``<output_dir>/metrics.jsonl`` and drawn at the
end of the run as ``<output_dir>/training_curves.png`` (beside the histogram): the loss (log
scale), the mean log-reward of the batch, log Z (the flow of the initial state s0 under
SubTB/DB when s0 cannot terminate; TB's partition function), the reward temperature and the
step time, against the step. Steps replayed from the buffer are marked on the loss and
log-reward panels. ``metrics.jsonl`` is appended to: a resumed run logs again the steps after
its checkpoint and a rerun in the same directory starts again at step 1, so an entry is
dropped when a later one has the same or an earlier step."""

from __future__ import annotations

import json
import math
from pathlib import Path

PANELS = (
    ("loss", "loss", True),
    ("log_reward", "mean log-reward", False),
    ("log_z", "log Z (flow of s0)", False),
    ("reward_temperature", "reward temperature", False),
    ("step_s", "step time (s)", False),
)


def read_step_metrics(path: str | Path) -> list[dict]:
    """The per-step lines of ``metrics.jsonl`` (those with a loss), latest run's values."""
    rows: list[dict] = []
    for line in Path(path).read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interrupted write
        if not isinstance(entry, dict) or "loss" not in entry or "step" not in entry:
            continue
        if rows and entry["step"] <= rows[-1]["step"]:
            rows = [r for r in rows if r["step"] < entry["step"]]
        rows.append(entry)
    return rows


def _finite(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
           and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(metrics_path: str | Path, png_path: str | Path, title: str = "") -> bool:
    """Draw the curves into ``png_path``; False (nothing written) when no step was logged."""
    rows = read_step_metrics(metrics_path)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 11), sharex=True)
    replayed = [r for r in rows if r.get("replayed")]
    for ax, (key, label, log_scale) in zip(axes, PANELS):
        xs, ys = _finite(rows, key)
        ax.plot(xs, ys, lw=1.0)
        if key in ("loss", "log_reward") and replayed:
            rx, ry = _finite(replayed, key)
            ax.plot(rx, ry, ".", ms=4, color="tab:orange", label="replayed")
            ax.legend(loc="best", fontsize=8)
        if log_scale and ys and min(ys) > 0:
            ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
