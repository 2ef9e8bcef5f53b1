"""Shared bits of the benchmark scripts: argument defaults, tables, JSON with machine info."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print rows as a fixed-width table; columns are (key, header, format spec)."""
    widths = [max(len(header), 10) for _, header, _ in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for row in rows:
        cells = []
        for (key, _, fmt), w in zip(columns, widths):
            value = row.get(key)
            cells.append(("-" if value is None else format(value, fmt)).rjust(w))
        print("  ".join(cells))


def write_json(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps({"machine": machine(), **payload}, indent=2) + "\n")
    partial.replace(path)                      # atomic: a kill never leaves half a file
    print(f"wrote {path}")


def prunekit(*args: str) -> dict:
    """Run one `prunekit ... --json` command in its own process (its seconds and peak RSS are its own)."""
    done = subprocess.run([sys.executable, "-m", "prunekit.cli", *args, "--json"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"prunekit {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)
