"""Catalog outputs: scores and catalog as Parquet, the catalog as FITS, both as DuckDB tables.

Files written by ``write_outputs`` into ``out_dir`` (each atomically: a temporary file renamed into
place, so readers see the old or the new version, never a partial one):

- ``scores.parquet``: every scored spectrum, columns SCORES_REQUIRED plus those of SCORES_OPTIONAL
  present in the first batch; written streaming from per-partition batches in row groups of
  ``ROW_GROUP_ROWS``.
- ``catalog.parquet``: the catalog as built by ``build_catalog``.
- ``catalog.fits``: the catalog as a plain binary table (HDU ``CATALOG``) with units, fixed-width
  strings and TCOMMn column descriptions; provenance keywords (CODEVERS, CKPTSHA, ALPHA, NSCORED,
  NCATALOG, DATE) in the primary and table headers.
- ``catalog.duckdb``: tables ``scores``, ``catalog`` and ``provenance`` (KEY, VALUE). The database
  is rebuilt in a fresh temporary file, ingesting the Parquet files natively, and renamed onto the
  old one: tables are replaced atomically, as a whole database file.

Parquet files carry the provenance as JSON key-value metadata (key ``desi_anomaly``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Table

from desi_anomaly import __version__
from desi_anomaly.atomic import atomic_path

from .build import DESCRIPTIONS, SCORES_OPTIONAL, SCORES_REQUIRED, UNITS, CatalogError

ROW_GROUP_ROWS = 262_144
_META_KEY = b"desi_anomaly"

ScoresBatch = pd.DataFrame | pa.Table | pa.RecordBatch
ScoresInput = ScoresBatch | Iterable[ScoresBatch]


def _batches(scores: ScoresInput) -> Iterator[pa.Table]:
    """Arrow tables from one frame/table/batch or an iterable of them."""
    items = [scores] if isinstance(scores, (pd.DataFrame, pa.Table, pa.RecordBatch)) else scores
    for item in items:
        if isinstance(item, pd.DataFrame):
            yield pa.Table.from_pandas(item, preserve_index=False)
        elif isinstance(item, pa.RecordBatch):
            yield pa.Table.from_batches([item])
        else:
            yield item


def _scores_schema(first: pa.Table) -> pa.Schema:
    missing = [c for c in SCORES_REQUIRED if c not in first.column_names]
    if missing:
        raise CatalogError(f"scores lack required column(s) {missing}")
    types = {"TARGETID": pa.int64(), "PARTITION": pa.string()}
    names = [*SCORES_REQUIRED, *(c for c in SCORES_OPTIONAL if c in first.column_names)]
    return pa.schema([(n, types.get(n, pa.float64())) for n in names])


def write_scores_parquet(
    path: str | Path, scores: ScoresInput, *, metadata: dict[str, Any] | None = None
) -> int:
    """Stream score batches into one Parquet file; returns the number of rows written.

    Batches are buffered into row groups of ROW_GROUP_ROWS, so memory stays at about one row
    group whatever the number of spectra. Every batch needs the columns of the first one.
    """
    it = _batches(scores)
    first = next(it, None)
    if first is None:
        raise CatalogError("no scores to write")
    schema = _scores_schema(first)
    meta = {_META_KEY: json.dumps({"code_version": __version__, **(metadata or {})}).encode()}
    schema = schema.with_metadata(meta)
    n_rows, buffered = 0, []
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for table in itertools.chain([first], it):
            try:
                buffered.append(table.select(schema.names).cast(schema))
            except KeyError as exc:
                raise CatalogError(f"a scores batch lacks a column of the first: {exc}") from exc
            if sum(t.num_rows for t in buffered) >= ROW_GROUP_ROWS:
                pending = pa.concat_tables(buffered)
                full = pending.num_rows // ROW_GROUP_ROWS * ROW_GROUP_ROWS
                writer.write_table(pending.slice(0, full), row_group_size=ROW_GROUP_ROWS)
                buffered, n_rows = [pending.slice(full)], n_rows + full
        if buffered:
            pending = pa.concat_tables(buffered)
            writer.write_table(pending, row_group_size=ROW_GROUP_ROWS)
            n_rows += pending.num_rows
    return n_rows


def write_catalog_parquet(
    path: str | Path, catalog: pd.DataFrame, metadata: dict[str, Any]
) -> Path:
    """The catalog as Parquet, ``metadata`` as JSON key-value metadata."""
    table = pa.Table.from_pandas(catalog, preserve_index=False)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(metadata).encode()})
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return path


def _fixed_width(values: pd.Series) -> np.ndarray:
    """ASCII fixed-width bytes (at least 1 character wide, as FITS needs)."""
    encoded = [str(v).encode("ascii", "replace") for v in values.fillna("")]
    width = max((len(b) for b in encoded), default=1) or 1
    return np.array(encoded, dtype=f"S{width}")


def catalog_table(catalog: pd.DataFrame) -> Table:
    """The catalog as an astropy Table with units, descriptions and fixed-width strings."""
    table = Table()
    for name in catalog.columns:
        col = catalog[name]
        data = (
            _fixed_width(col) if col.dtype == object or pd.api.types.is_string_dtype(col) else col
        )
        table[name] = np.asarray(data)
        table[name].unit = UNITS.get(name)
        table[name].description = DESCRIPTIONS.get(name)
    return table


def _header_cards(header_info: dict[str, Any]) -> list[tuple[str, Any, str]]:
    return [
        ("CODEVERS", header_info["code_version"], "desi-anomaly code version"),
        ("CKPTSHA", header_info["checkpoint_sha256"], ""),  # 64 characters: no room to comment
        ("ALPHA", header_info["alpha"], "catalog threshold: Q_VALUE < ALPHA"),
        ("NSCORED", header_info["n_scored"], "number of spectra scored"),
        ("NCATALOG", header_info["n_catalog"], "number of catalogued anomalies"),
        ("DATE", header_info["created"], "UTC creation date of this file"),
    ]


def write_catalog_fits(
    path: str | Path, catalog: pd.DataFrame, header_info: dict[str, Any]
) -> Path:
    """The catalog as a FITS binary table ``CATALOG`` readable by astropy, fitsio and TOPCAT.

    ``header_info``: code_version, checkpoint_sha256, alpha, n_scored, n_catalog, created.
    """
    hdu = fits.BinTableHDU(catalog_table(catalog), name="CATALOG")
    primary = fits.PrimaryHDU()
    for card in _header_cards(header_info):
        primary.header[card[0]] = card[1:]
        hdu.header[card[0]] = card[1:]
    for i, name in enumerate(catalog.columns, start=1):
        if name in DESCRIPTIONS:
            hdu.header[f"TCOMM{i}"] = DESCRIPTIONS[name]
    path = Path(path)
    with atomic_path(path) as tmp:
        fits.HDUList([primary, hdu]).writeto(tmp, overwrite=True, checksum=True)
    return path


@contextlib.contextmanager
def atomic_duckdb(path: str | Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to a new, empty database file that replaces ``path`` if the block succeeds."""
    with atomic_path(path) as tmp:
        tmp.unlink()  # DuckDB creates its own file; it refuses an existing empty one
        try:
            with duckdb.connect(str(tmp)) as con:
                yield con
        finally:
            tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)


def write_duckdb(
    path: str | Path, scores_parquet: Path, catalog_parquet: Path, provenance: dict[str, Any]
) -> Path:
    """Rebuild the DuckDB file with tables scores, catalog (from the Parquet files) and provenance.

    The database is built in a fresh temporary file and renamed onto ``path``.
    """
    prov = pa.table(
        {
            "KEY": list(provenance),
            "VALUE": [v if isinstance(v, str) else json.dumps(v) for v in provenance.values()],
        }
    )
    with atomic_duckdb(path) as con:
        for name, src in (("scores", scores_parquet), ("catalog", catalog_parquet)):
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM read_parquet(?)", [str(src)])
        con.register("prov", prov)
        con.execute("CREATE TABLE provenance AS SELECT * FROM prov")
    return Path(path)


def write_outputs(
    out_dir: str | Path,
    scores: ScoresInput,
    catalog: pd.DataFrame,
    *,
    provenance: dict[str, Any],
) -> dict[str, Path]:
    """Write scores.parquet, catalog.parquet, catalog.fits and catalog.duckdb into ``out_dir``.

    ``scores``: a frame / Arrow table / record batch, or an iterable of them (e.g. one per
    partition), streamed once. ``provenance``: must hold ``alpha`` and ``checkpoint_sha256``;
    every entry (JSON-able) is recorded, plus code_version, n_scored, n_catalog, created (UTC).
    Returns {"scores", "catalog_parquet", "catalog_fits", "duckdb"} -> path.
    """
    missing = [k for k in ("alpha", "checkpoint_sha256") if k not in provenance]
    if missing:
        raise CatalogError(f"provenance lacks {missing}")
    out_dir = Path(out_dir)
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    info = {**provenance, "code_version": __version__, "created": created}
    paths = {
        "scores": out_dir / "scores.parquet",
        "catalog_parquet": out_dir / "catalog.parquet",
        "catalog_fits": out_dir / "catalog.fits",
        "duckdb": out_dir / "catalog.duckdb",
    }
    info["n_scored"] = write_scores_parquet(paths["scores"], scores, metadata=info)
    info["n_catalog"] = len(catalog)
    write_catalog_parquet(paths["catalog_parquet"], catalog, info)
    write_catalog_fits(paths["catalog_fits"], catalog, info)
    write_duckdb(paths["duckdb"], paths["scores"], paths["catalog_parquet"], info)
    return paths
