"""Cleaned-spectra shards: one versioned Parquet file per partition.

Schema (version 1): one row per spectrum with scalar metadata columns (TARGETID, Z, ...) and three
fixed-size-list columns on the rest-frame grid: ``FLUX`` and ``IVAR`` (float32) and ``COVERAGE``
(uint8, 1 = pixel inside the observed range). The Parquet key-value metadata records the schema
version, the code version, the rest-frame grid, the partition key, the source files and the drop
counts. Files are written atomically and read back into numpy without copying the array columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from desi_anomaly import __version__
from desi_anomaly.atomic import atomic_path
from desi_anomaly.errors import DesiAnomalyError

SCHEMA_VERSION = 1
ARRAY_COLUMNS: dict[str, pa.DataType] = {
    "FLUX": pa.float32(),
    "IVAR": pa.float32(),
    "COVERAGE": pa.uint8(),
}
_META_KEY = b"desi_anomaly"


class ShardError(DesiAnomalyError):
    """A shard that cannot be read: names the file and the problem."""


@dataclass
class Shard:
    """Arrays and metadata of one shard; array attributes are zero-copy views on Arrow buffers."""

    flux: np.ndarray  # (n, npix) float32
    ivar: np.ndarray  # (n, npix) float32
    coverage: np.ndarray  # (n, npix) bool
    meta: pd.DataFrame
    info: dict[str, Any]  # schema_version, code_version, grid, partition, sources, drop_counts

    def __len__(self) -> int:
        return len(self.meta)


def write_shard(
    path: str | Path,
    *,
    flux: np.ndarray,
    ivar: np.ndarray,
    coverage: np.ndarray,
    meta: pd.DataFrame,
    info: dict[str, Any],
) -> Path:
    """Write one shard atomically; ``info`` (grid, partition, sources...) must be JSON-able."""
    n = len(meta)
    npix = flux.shape[1]
    for name, arr in (("flux", flux), ("ivar", ivar), ("coverage", coverage)):
        if arr.shape != (n, npix):
            raise ValueError(f"{name} has shape {arr.shape}, expected {(n, npix)}")
    columns = {c: pa.array(meta[c].to_numpy()) for c in meta.columns}
    for name, arr in (("FLUX", flux), ("IVAR", ivar), ("COVERAGE", coverage)):
        values = np.ascontiguousarray(arr, dtype=ARRAY_COLUMNS[name].to_pandas_dtype()).ravel()
        columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values), npix)
    table = pa.table(columns)
    payload = {"schema_version": SCHEMA_VERSION, "code_version": __version__, **info}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(payload).encode()})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=max(n, 1), compression="zstd")
    return path


def read_shard_info(path: str | Path) -> dict[str, Any]:
    """The key-value metadata of a shard (cheap: reads only the footer)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"{path}: not a readable Parquet shard ({exc})") from exc
    return _info(schema, path)


def read_shard(path: str | Path, meta_columns: list[str] | None = None) -> Shard:
    """Read a shard; the array columns come back as numpy views without copies."""
    info = read_shard_info(path)
    try:
        table = pq.read_table(path, memory_map=True)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"{path}: cannot read shard ({exc})") from exc
    missing = [c for c in ARRAY_COLUMNS if c not in table.column_names]
    if missing:
        raise ShardError(f"{path}: shard lacks column(s) {', '.join(missing)}")
    n = table.num_rows
    npix = table.schema.field("FLUX").type.list_size
    arrays = {c: _as_numpy(table.column(c), n, npix) for c in ARRAY_COLUMNS}
    scalar = [c for c in table.column_names if c not in ARRAY_COLUMNS]
    if meta_columns is not None:
        scalar = [c for c in meta_columns if c in scalar]
    meta = table.select(scalar).to_pandas()
    return Shard(arrays["FLUX"], arrays["IVAR"], arrays["COVERAGE"].view(bool), meta, info)


def _as_numpy(column: pa.ChunkedArray, n: int, npix: int) -> np.ndarray:
    """(n, npix) numpy view of a fixed-size-list column; one copy only if it has several chunks."""
    if n == 0:
        return np.zeros((0, npix), dtype=column.type.value_type.to_pandas_dtype())
    chunk = column.chunks[0] if column.num_chunks == 1 else column.combine_chunks()
    values = chunk.flatten().to_numpy(zero_copy_only=True)
    return values.reshape(n, npix)


def _info(schema: pa.Schema, path: str | Path) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(_META_KEY)
    if raw is None:
        raise ShardError(f"{path}: not a desi-anomaly shard (no {_META_KEY.decode()} metadata)")
    info = json.loads(raw)
    if info.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{path}: shard schema version {info.get('schema_version')} is not the supported "
            f"version {SCHEMA_VERSION}; re-run preprocessing for this partition"
        )
    return info
