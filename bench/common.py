"""Shared helpers for bench cases (``bench/cases/*.py``) and the runner (``bench/run``).

Public API (small on purpose; other cases import it):

``rss_kb(pid)``            resident set size of a process in KiB (``VmRSS`` from /proc).
``cpu_seconds(pid)``       user + system CPU seconds of a process, all threads (/proc/PID/stat).
``tree_pids(pid)``         ``pid`` and all its descendants (e.g. sshd and its session children).
``percentile(xs, p)``      ``p``-th percentile (0-100) of a sequence, linear interpolation.
``print_table(rows)``      the bench table: metric | fleet-tunnel | baseline | ratio | target | meets?
``machine()``              CPU model, cores, kernel, Python, aioquic version, date, load.
``write_json(name, rows)`` writes ``bench/out/NAME.json`` (``out_dir=`` overrides); returns the path.
``finish(rows)``           fills ``ratio`` / ``meets`` / ``gap`` of rows from baseline and target.
``case_main(name, run)``   the ``python bench/cases/NAME.py [--quick]`` entry point of a case.

A row is a dict: ``metric``, ``value``, ``unit`` and optionally ``baseline``, ``baseline_name``,
``ratio`` (value / baseline), ``target`` (text such as ``">= 10 MB/s"``, ``"< 1 s"``; the first
comparison and number in it are used to decide ``meets``), ``gap`` and ``note``. A ``value`` of
None means "not measured" (say why in ``note``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def paths() -> None:
    """Make ``enroll``/``tunnel`` (repo root) and ``fleet``/``lab`` (tests/) importable."""
    for p in (str(ROOT), str(ROOT / "tests")):
        if p not in sys.path:
            sys.path.insert(0, p)


# --- processes -------------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds (0.0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of stat(5)


def tree_pids(pid: int) -> list[int]:
    """``pid`` followed by all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


# --- statistics and rows ---------------------------------------------------------------------


def percentile(xs, p: float) -> float:
    """The ``p``-th percentile (0..100) of ``xs`` with linear interpolation (like numpy's default)."""
    data = sorted(xs)
    if not data:
        raise ValueError("percentile of an empty sequence")
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


_TARGET = re.compile(r"(<=|>=|≤|≥|<|>)\s*([0-9][0-9,_]*(?:\.[0-9]+)?)")


def parse_target(target) -> tuple[str, float] | None:
    """``">= 10 MB/s"`` -> ``(">=", 10.0)``; None when the text holds no comparison."""
    if not isinstance(target, str):
        return None
    m = _TARGET.search(target)
    if not m:
        return None
    op = {"≤": "<=", "≥": ">="}.get(m.group(1), m.group(1))
    return op, float(m.group(2).replace(",", "").replace("_", ""))


def meets(value, target) -> bool | None:
    parsed = parse_target(target)
    if parsed is None or not isinstance(value, int | float):
        return None
    op, t = parsed
    return {"<": value < t, "<=": value <= t, ">": value > t, ">=": value >= t}[op]


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 100:
            return f"{x:.1f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def finish(rows: list[dict]) -> list[dict]:
    """Fill in ``ratio`` (value/baseline), ``meets`` and ``gap`` where they can be computed."""
    for r in rows:
        v, b = r.get("value"), r.get("baseline")
        if r.get("ratio") is None and isinstance(v, int | float) and isinstance(b, int | float) and b:
            r["ratio"] = float(f"{v / b:.3g}")
        ok = meets(v, r.get("target"))
        if r.get("meets") is None and ok is not None:
            r["meets"] = ok
        parsed = parse_target(r.get("target"))
        if r.get("gap") is None and parsed and isinstance(v, int | float):
            op, t = parsed
            unit = r.get("unit", "")
            if op in (">", ">="):
                r["gap"] = (f"meets, {v / t:.2f}x the target" if ok else
                            f"short by {_fmt(float(t - v))} {unit} ({v / t:.0%} of target)")
            elif ok:
                r["gap"] = f"meets, {_fmt(float(t - v))} {unit} headroom"
            else:
                r["gap"] = f"over by {_fmt(float(v - t))} {unit} ({v / t:.2f}x the target)"
    return rows


def table_lines(rows: list[dict]) -> list[str]:
    """The bench table as markdown lines (also what ``print_table`` prints)."""
    head = ["metric", "fleet-tunnel", "baseline", "ratio", "target", "meets?"]
    body = []
    for r in rows:
        value = _fmt(r.get("value"))
        if r.get("value") is not None and r.get("unit"):
            value += f" {r['unit']}"
        base = _fmt(r.get("baseline"))
        if r.get("baseline") is not None and r.get("baseline_name"):
            base += f" ({r['baseline_name']})"
        ratio = f"{r['ratio']:.3g}x" if isinstance(r.get("ratio"), int | float) else "-"
        met = {True: "yes", False: "NO", None: "-"}[r.get("meets")]
        body.append([str(r.get("metric", "?")), value, base, ratio, str(r.get("target") or "-"), met])
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in body]
    return out


def print_table(rows: list[dict], file=None) -> None:
    """Print the table (ratios and meets? filled in with ``finish``) to ``file`` (stdout)."""
    finish(rows)
    print("\n".join(table_lines(rows)), file=file or sys.stdout, flush=True)


# --- machine and output ----------------------------------------------------------------------


def machine() -> dict:
    """Where the numbers came from."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import aioquic

        aioquic_version = aioquic.__version__
    except ImportError:
        aioquic_version = None
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aioquic": aioquic_version,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "hostname": platform.node(),
    }


def write_json(name: str, rows, out_dir: Path | str | None = None) -> Path:
    """Write ``rows`` (any JSON-able object) to ``OUT_DIR/NAME.json``; return the path."""
    out = Path(out_dir) if out_dir else OUT
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    return path


def case_main(name: str, run) -> None:
    """``python bench/cases/NAME.py [--quick] [--out DIR]``: run, print the table, write JSON."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"bench/cases/{name}.py")
    parser.add_argument("--quick", action="store_true", help="smaller, faster run")
    parser.add_argument("--out", default=str(OUT), help="output directory (default bench/out)")
    args = parser.parse_args()
    rows = finish(run(quick=args.quick))
    print_table(rows)
    print(f"wrote {write_json(name, rows, args.out)}")
