"""Printing results for people (aligned tables) and for scripts (JSON, YAML). Shared by both CLIs."""

from __future__ import annotations

import json
import sys

import yaml

FORMATS = ("table", "json", "yaml")


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):  # people read yes/no, not Python's True/False
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    return str(value)


def table(rows: list[dict], columns: list[str], out=None) -> None:
    out = out or sys.stdout
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    header = [c.upper() for c in columns]
    for row in [header, *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), file=out)


def emit(data, fmt: str, columns: list[str] | None = None, out=None) -> None:
    """Print ``data`` (a list of rows or one dict) in ``fmt``."""
    out = out or sys.stdout
    if fmt == "json":
        print(json.dumps(data, indent=2, sort_keys=False, default=str), file=out)
    elif fmt == "yaml":
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), end="", file=out)
    elif isinstance(data, list):
        table(data, columns or (list(data[0]) if data else []), out)
    else:
        width = max((len(k) for k in data), default=0)
        for k, v in data.items():
            print(f"{k.ljust(width)}  {_cell(v)}", file=out)
