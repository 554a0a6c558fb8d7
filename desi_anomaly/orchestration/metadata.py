"""Small helpers turning library results into Dagster metadata: Markdown tables, embedded PNGs,
file fingerprints."""

from __future__ import annotations

import base64
import hashlib
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import dagster as dg

from desi_anomaly.ml.training import file_sha256


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table (cells formatted, pipes escaped)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            v = "nan" if math.isnan(v) else f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def drop_table(n_read: int, drop_counts: Mapping[str, int]) -> str:
    """Markdown table of dropped spectra per reason, with the fraction of those read."""
    rows = [
        (reason, count, count / n_read if n_read else 0.0)
        for reason, count in sorted(drop_counts.items(), key=lambda kv: -kv[1])
    ]
    return markdown_table(("reason", "dropped", "fraction of read"), rows)


def png_markdown(path: str | Path, alt: str = "plot", max_bytes: int = 400_000) -> str:
    """Markdown embedding a PNG as base64 (the path alone when the file is large)."""
    path = Path(path)
    data = path.read_bytes()
    if len(data) > max_bytes:
        return f"`{path}` ({len(data) / 1e6:.1f} MB)"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})"


def loss_curve_markdown(history: Sequence[Mapping[str, float]]) -> str:
    """The training and validation loss per epoch, as an embedded PNG plot."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig = Figure(figsize=(5, 3), dpi=90)
    ax = fig.add_subplot()
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        values = [h.get(key, float("nan")) for h in history]
        ax.plot(epochs, values, marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (chi2/pixel + beta KL)")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return f"![loss curve](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


def file_record(path: str | Path) -> dict[str, object]:
    """Path, size, modification time and SHA-256 of a file."""
    st = Path(path).stat()
    return {
        "path": str(path),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "sha256": file_sha256(path),
    }


def path_value(path: str | Path) -> dg.MetadataValue:
    return dg.MetadataValue.path(str(path))


def combined_version(parts: Iterable[str]) -> str:
    """One short version string for several inputs (order-independent)."""
    digest = hashlib.sha256()
    for part in sorted(parts):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:24]
