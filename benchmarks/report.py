"""Write a benchmark's results into its own section of a Markdown file (other sections kept)."""

from __future__ import annotations

import platform
import re
from datetime import date
from pathlib import Path

import numpy as np


def machine() -> str:
    """One line describing where the figures were measured."""
    import os

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}, {date.today().isoformat()}"
    )


def status_mib(field: str, pid: int | str = "self") -> float:
    """A memory figure (VmRSS, VmHWM, ...) of a process from /proc/PID/status (Linux), MiB.

    VmHWM, unlike ``ru_maxrss``, is not inherited by a spawned child from its parent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS count (VmHWM) at its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def update_section(doc: Path, name: str, markdown: str) -> None:
    """Replace the ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` block, or append one."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = (
        doc.read_text()
        if doc.exists()
        else "# Benchmarks\n\nFigures written by the scripts in `benchmarks/`.\n"
    )
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{block}\n"
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
