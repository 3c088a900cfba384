"""What every benchmark shares: a description of the machine and writing its own section of bench/RESULTS.md.

Standard library only: benchmark workers may run in another virtual environment (``.venv-bench``)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> dict[str, str]:
    """CPU model, core count, Python version and the time of the run (UTC)."""
    cpu = platform.processor() or "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def write_results(section: str, text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section headed ``section`` with ``text``; keep every other section of the file."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1).rstrip("\n") + "\n"
    else:
        new = old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def publish(section: str, text: str, write: bool = True) -> None:
    """Print a benchmark's section and, unless told not to, put it into bench/RESULTS.md."""
    print("\n" + text)
    if write:
        write_results(section, text)
        print(f"wrote {RESULTS}", file=sys.stderr)
