"""A job summary (a flat-ish dict) as the text the CLI prints on stdout."""

from __future__ import annotations

from typing import Any


def format_summary(title: str, summary: dict[str, Any]) -> str:
    lines = [f"== {title} =="]
    for k, v in summary.items():
        if isinstance(v, dict):
            inner = ", ".join(f"{a}={b}" for a, b in v.items()) or "-"
            lines.append(f"  {k}: {inner}")
        elif isinstance(v, list):
            lines.append(f"  {k}: {', '.join(map(str, v)) if v else '-'}")
        else:
            lines.append(f"  {k}: {v}")
    return "\n".join(lines)
