"""The visual pieces of `clipline report` (and the notebooks): matplotlib figures as PNG data URIs, thumbnails read
straight from WebDataset tars (streamed, never extracted to disk), and small HTML building blocks."""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def fig_uri(fig: Any) -> str:
    """A matplotlib figure as a PNG data URI (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plot_reasons(reasons: Mapping[str, Mapping[str, int]]) -> str | None:
    """Horizontal bars of failures by reason, one colour per stage; None when nothing failed."""
    rows = [(f"{stage}: {r}", n) for stage, by in reasons.items() for r, n in sorted(by.items(), key=lambda x: -x[1])]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1))
    colours = {s: f"C{i}" for i, s in enumerate(reasons)}
    ax.barh(
        [r for r, _ in rows][::-1], [n for _, n in rows][::-1], color=[colours[r.split(":")[0]] for r, _ in rows][::-1]
    )
    for i, (_, n) in enumerate(rows[::-1]):
        ax.text(n, i, f" {n}", va="center")
    ax.set_xlabel("samples")
    ax.set_title("Failures by reason")
    return fig_uri(fig)


def plot_throughput(series: Mapping[str, Sequence[tuple[float, float, int]]]) -> str | None:
    """Cumulative items done over wall-clock time per stage, from per-shard (started, finished, count)."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    plt = _plt()
    t0 = min(s for v in series.values() for s, _, _ in v)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for stage, shards in series.items():
        done = sorted((f, n) for _, f, n in shards)
        first = min(s for s, _, _ in shards)
        x = np.array([first] + [f for f, _ in done]) - t0
        y = np.concatenate([[0], np.cumsum([n for _, n in done])])
        ax.step(x / 60, y, where="post", label=stage, marker=".")
    ax.set_xlabel("minutes since the first shard started")
    ax.set_ylabel("samples done (cumulative)")
    ax.set_title("Throughput over time (one step per finished shard)")
    ax.legend()
    ax.grid(alpha=0.3)
    return fig_uri(fig)


def plot_time_split(seconds: Mapping[str, float]) -> str | None:
    """Where embed time went, summed over shards."""
    items = [(k, v) for k, v in seconds.items() if v > 0]
    if not items:
        return None
    plt = _plt()
    total = sum(v for _, v in items)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(items) + 1))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="C2")
    for i, (_, v) in enumerate(items[::-1]):
        ax.text(v, i, f" {v:.1f}s ({100 * v / total:.0f}%)", va="center")
    ax.set_xlabel("seconds, summed over shards (decode runs in threads beside the model)")
    ax.set_title("Embed time split")
    ax.margins(x=0.25)
    return fig_uri(fig)


def plot_hist(
    values: np.ndarray, xlabel: str, title: str, threshold: float | None = None, log_y: bool = False, bins: int = 60
) -> str | None:
    """A histogram of finite values, with an optional threshold line and the share at or above it."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.hist(v, bins=bins, color="C0", alpha=0.8)
    if threshold is not None:
        share = float((v >= threshold).mean())
        ax.axvline(
            threshold, color="red", linestyle="--", label=f"threshold {threshold:g}: {100 * share:.1f}% at or above"
        )
        ax.legend()
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(f"{title} (n={len(v)})")
    ax.grid(alpha=0.3)
    return fig_uri(fig)


# ---- thumbnails ----------------------------------------------------------------------------------------------


# ---- sections made of figures ---------------------------------------------------------------------------


# ---- HTML blocks ---------------------------------------------------------------------------------------------


def missing(what: str) -> str:
    """A section's note that its stage's output is not there."""
    return f'<p class="missing">{esc(what)}</p>'


def esc(value: Any) -> str:
    return html.escape(str(value))


def fmt(value: Any) -> str:
    """Numbers for people: thousands separators, 3 significant decimals for floats."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:,.0f}"
    return str(value)


def table(rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def figure(uri: str | None, alt: str) -> str:
    return f'<img class="plot" src="{uri}" alt="{esc(alt)}">' if uri else f'<p class="missing">{esc(alt)}: no data</p>'


def tile(uri: str | None, lines: Sequence[str], mark: str = "") -> str:
    """One thumbnail with caption lines; `mark` adds a CSS class (kept, hit)."""
    img = f'<img src="{uri}" alt="">' if uri else '<div class="noimg">no image</div>'
    text = "".join(f"<div>{esc(line)}</div>" for line in lines)
    return f'<figure class="tile {mark}">{img}<figcaption>{text}</figcaption></figure>'


def grid(title: str, tiles: Sequence[str]) -> str:
    return f'<div class="group"><h3>{esc(title)}</h3><div class="grid">{"".join(tiles)}</div></div>'


CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{margin-bottom:0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
nav a{margin-right:12px}.ok{color:#1a7f37}.missing{color:#9a6700;font-style:italic}.error{color:#cf222e}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;font-size:14px}
th{background:#f6f8fa}img.plot{max-width:100%;display:block;margin:8px 0}
.grid{display:flex;flex-wrap:wrap;gap:8px}.tile{margin:0;width:170px;font-size:12px;border:2px solid #eee;padding:4px}
.tile img{max-width:160px;max-height:160px;display:block;margin:auto}.tile.kept,.tile.hit{border-color:#1a7f37}
.noimg{width:160px;height:100px;background:#eee;display:flex;align-items:center;justify-content:center}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;font-size:12px}details{margin:8px 0}
"""
