"""Training curves from ``metrics.jsonl``: ``loss.png`` (train + validation) and one PNG per extra metric."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
from pathlib import Path

from ..io import atomic_write_bytes


@functools.cache
def pyplot():
    """``matplotlib.pyplot`` (Agg), or None after one warning (once a process) without the ``plots`` extra."""
    try:
        import matplotlib
    except ImportError:
        print("warning: matplotlib is not installed, so no plots: pip install 'pocketgpt[plots]'", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` (a line cut by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that hold a number under ``key``."""
    rows = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [x for x, _ in rows], [y for _, y in rows]


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """Render a matplotlib figure to PNG, close it, and write the file atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def draw_losses(ax, records: list[dict]) -> None:
    """Train loss (line) and every ``val*loss`` metric (dots) of ``records`` on ``ax``."""
    xs, ys = series(records, "loss")
    if xs:
        ax.plot(xs, ys, label="train loss", lw=1, alpha=0.8)
    val_keys = sorted({k for r in records for k in r if k.startswith("val") and k.endswith("loss")})
    for k in val_keys:
        ax.plot(*series(records, k), "o-", label=k.replace("_", " "), ms=3)
    ax.set_xlabel("step")
    if xs or val_keys:
        ax.legend(fontsize=8)


def plot_metrics(run_dir: str | Path, extra_keys: list[str] = ()) -> list[Path]:
    """Draw ``loss.png`` (train loss and every ``val*loss`` metric) and ``<key>.png`` for each extra key, with its
    held-out ``eval_<key>`` when logged; its file name has ``_`` for characters other than letters, digits, ``-_.``."""
    if (plt := pyplot()) is None:
        return []
    run_dir, written = Path(run_dir), []
    records = read_metrics(run_dir)

    def save(fig, ax, ylabel: str, title: str, name: str) -> None:
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        fig.tight_layout()
        written.append(save_figure(fig, run_dir / name))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    draw_losses(ax, records)
    save(fig, ax, "loss", run_dir.name, "loss.png")

    for key in extra_keys:
        kx, ky = series(records, key)
        ex, ey = series(records, f"eval_{key}")  # its held-out twin (TRL's naming), on the same axes
        if not kx and not ex:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        if kx:
            ax.plot(kx, ky, lw=1, label="train")
        if ex:
            ax.plot(ex, ey, "o-", ms=3, label="held-out")
            ax.legend(fontsize=8)
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        save(fig, ax, key, f"{run_dir.name}: {key}", f"{safe}.png")
    return written
