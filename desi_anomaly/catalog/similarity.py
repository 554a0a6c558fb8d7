"""Similarity search over VAE latents: a DuckDB table ``latents`` and exact cosine neighbours.

The table (TARGETID BIGINT, PARTITION VARCHAR, LATENT FLOAT[dim]) is built from the per-partition
latents files ``{latents_dir}/{key}.parquet`` (fixed-size-list float32 LATENT column) in a fresh
database file renamed onto the target, so a rebuild replaces the whole file atomically; all-zero
or non-finite latents are refused (their cosine is undefined). ``similar`` scans every row with
DuckDB's ``array_cosine_similarity`` and keeps the top k: exact, no index.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq

from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.io.partitions import parse_key

from .writers import atomic_duckdb

TABLE = "latents"


class SimilarityError(DesiAnomalyError, ValueError):
    """A latents table that cannot be built or a query that cannot be answered."""


def _latent_files(latents_dir: Path) -> list[Path]:
    files = sorted(latents_dir.glob("*.parquet"))
    if not files:
        raise SimilarityError(f"no latents files {latents_dir}/*.parquet")
    for f in files:
        parse_key(f.stem)  # names must be partition keys
    return files


def _latent_dim(path: Path) -> int:
    field = pq.read_schema(path).field("LATENT")
    dim = getattr(field.type, "list_size", None)
    if dim is None:
        raise SimilarityError(f"{path}: LATENT is {field.type}, expected a fixed-size list")
    return dim


def build_latents_db(db_path: str | Path, latents_dir: str | Path) -> int:
    """Build (or atomically replace) the DuckDB file holding table ``latents``; returns its rows."""
    files = _latent_files(Path(latents_dir))
    dim = _latent_dim(files[0])
    with atomic_duckdb(db_path) as con:
        try:
            con.execute(
                f"CREATE TABLE {TABLE} AS SELECT TARGETID::BIGINT AS TARGETID, "
                f"PARTITION::VARCHAR AS PARTITION, LATENT::FLOAT[{dim}] AS LATENT "
                "FROM read_parquet(?)",
                [[str(f) for f in files]],
            )
        except duckdb.Error as exc:
            raise SimilarityError(
                f"cannot build {TABLE} from {latents_dir} (latent dim {dim}): {exc}"
            ) from exc
        _check_latents(con)
        n = con.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
    return int(n)


def _check_latents(con: duckdb.DuckDBPyConnection) -> None:
    """Raise if a latent has zero norm or non-finite values (its cosine would be NaN)."""
    bad = con.execute(
        f"SELECT TARGETID, PARTITION FROM {TABLE} "
        "WHERE NOT isfinite(array_inner_product(LATENT, LATENT)) "
        "OR array_inner_product(LATENT, LATENT) = 0"
    ).fetchall()
    if bad:
        raise SimilarityError(
            f"{len(bad)} latent(s) are all-zero or not finite, e.g. {bad[:5]}: "
            "cosine similarity is undefined for them"
        )


def _query_row(
    con: duckdb.DuckDBPyConnection, targetid: int, partition: str | None
) -> tuple[int, list[float]]:
    """rowid and latent of the query spectrum."""
    rows = con.execute(
        f"SELECT rowid, PARTITION, LATENT FROM {TABLE} WHERE TARGETID = ? "
        "AND (?::VARCHAR IS NULL OR PARTITION = ?)",
        [targetid, partition, partition],
    ).fetchall()
    if not rows:
        where = f" in partition {partition!r}" if partition else ""
        raise SimilarityError(f"TARGETID {targetid}{where} is not in the {TABLE} table")
    if len(rows) > 1:
        raise SimilarityError(
            f"TARGETID {targetid} is in several partitions {sorted(r[1] for r in rows)}: "
            "pass partition= to choose one"
        )
    return rows[0][0], rows[0][2]


def similar(
    db_path: str | Path, targetid: int, k: int = 10, *, partition: str | None = None
) -> pd.DataFrame:
    """The ``k`` spectra whose latents are most cosine-similar to that of ``targetid``.

    Returns TARGETID, PARTITION, COSINE_SIMILARITY sorted by decreasing similarity (ties by
    TARGETID), excluding the query itself. ``partition`` picks the spectrum when a TARGETID occurs
    in several partitions. Raises SimilarityError for an unknown TARGETID.
    """
    if k < 1:
        raise SimilarityError(f"k must be >= 1, got {k}")
    with duckdb.connect(str(db_path), read_only=True) as con:
        rowid, latent = _query_row(con, int(targetid), partition)
        return con.execute(
            "SELECT TARGETID, PARTITION, "
            f"array_cosine_similarity(LATENT, $q::FLOAT[{len(latent)}]) AS COSINE_SIMILARITY "
            f"FROM {TABLE} WHERE rowid != $r "
            "ORDER BY COSINE_SIMILARITY DESC, TARGETID LIMIT $k",
            {"q": latent, "r": rowid, "k": k},
        ).df()
