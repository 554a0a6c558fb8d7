"""Similarity search: DuckDB latents table vs a brute-force numpy cosine reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from desi_anomaly.catalog import SimilarityError, build_latents_db, similar
from desi_anomaly.errors import DesiAnomalyError

DIM = 128


def write_latents(directory: Path, key: str, targetid: np.ndarray, latent: np.ndarray) -> None:
    """A per-partition latents file as written by the encoding step."""
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "TARGETID": pa.array(targetid, pa.int64()),
            "PARTITION": pa.array([key] * len(targetid)),
            "LATENT": pa.FixedSizeListArray.from_arrays(
                pa.array(latent.astype(np.float32).ravel()), latent.shape[1]
            ),
        }
    )
    pq.write_table(table, directory / f"{key}.parquet")


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """Three partitions of random latents (one TARGETID repeated across two) and the DB."""
    root = tmp_path_factory.mktemp("sim")
    rng = np.random.default_rng(3)
    keys = ["main-dark-9557", "main-bright-9557", "sv1-dark-100"]
    tids, parts, vecs = [], [], []
    for i, key in enumerate(keys):
        tid = np.arange(1000 * i, 1000 * i + 200, dtype=np.int64)
        if i == 2:
            tid[0] = 5  # also in main-dark-9557
        vec = rng.normal(size=(len(tid), DIM)).astype(np.float32)
        write_latents(root / "latents", key, tid, vec)
        tids.append(tid)
        parts += [key] * len(tid)
        vecs.append(vec)
    db = root / "latents.duckdb"
    n = build_latents_db(db, root / "latents")
    return db, n, np.concatenate(tids), np.array(parts), np.concatenate(vecs)


def brute_force(vecs: np.ndarray, q: np.ndarray) -> np.ndarray:
    v = vecs.astype(np.float64)
    return v @ q / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))


@pytest.mark.parametrize("row", [0, 17, 450])
def test_similar_matches_brute_force(latents, row):
    db, n, tids, parts, vecs = latents
    assert n == len(tids)
    got = similar(db, int(tids[row]), k=10, partition=str(parts[row]))
    cos = brute_force(vecs, vecs[row].astype(np.float64))
    cos[row] = -np.inf  # the query itself is excluded
    order = np.argsort(-cos)[:10]
    assert list(got.columns) == ["TARGETID", "PARTITION", "COSINE_SIMILARITY"]
    np.testing.assert_array_equal(got["TARGETID"], tids[order])
    np.testing.assert_array_equal(got["PARTITION"], parts[order])
    np.testing.assert_allclose(got["COSINE_SIMILARITY"], cos[order], atol=1e-5)


def test_near_duplicate_is_first_and_query_excluded(tmp_path):
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(50, DIM))
    vec[7] = 3.0 * vec[3] + 1e-3 * rng.normal(size=DIM)  # same direction, different scale
    write_latents(tmp_path / "latents", "main-dark-1", np.arange(50), vec)
    build_latents_db(tmp_path / "db.duckdb", tmp_path / "latents")
    got = similar(tmp_path / "db.duckdb", 3, k=100)
    assert got["TARGETID"].iloc[0] == 7
    assert got["COSINE_SIMILARITY"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    assert 3 not in set(got["TARGETID"]) and len(got) == 49


def test_unknown_and_ambiguous_targetid(latents):
    db = latents[0]
    with pytest.raises(SimilarityError, match="TARGETID 999999 is not in"):
        similar(db, 999999)
    with pytest.raises(DesiAnomalyError, match="several partitions"):
        similar(db, 5)
    assert len(similar(db, 5, k=3, partition="sv1-dark-100")) == 3


def test_rebuild_replaces_table(tmp_path):
    rng = np.random.default_rng(1)
    write_latents(tmp_path / "a", "main-dark-1", np.arange(10), rng.normal(size=(10, DIM)))
    write_latents(tmp_path / "b", "main-dark-2", np.arange(20, 25), rng.normal(size=(5, DIM)))
    db = tmp_path / "db.duckdb"
    assert build_latents_db(db, tmp_path / "a") == 10
    assert build_latents_db(db, tmp_path / "b") == 5
    assert set(similar(db, 20, k=10)["TARGETID"]) == {21, 22, 23, 24}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "db.duckdb"]


def test_bad_latents_inputs(tmp_path):
    with pytest.raises(SimilarityError, match="no latents files"):
        build_latents_db(tmp_path / "db.duckdb", tmp_path)
    pq.write_table(
        pa.table({"TARGETID": [1], "PARTITION": ["main-dark-1"], "LATENT": [[1.0, 2.0]]}),
        tmp_path / "main-dark-1.parquet",
    )
    with pytest.raises(SimilarityError, match="fixed-size list"):
        build_latents_db(tmp_path / "db.duckdb", tmp_path)
    assert not (tmp_path / "db.duckdb").exists()


@pytest.mark.parametrize("bad", [0.0, np.nan])
def test_zero_or_nan_latent_refused(tmp_path, bad):
    vec = np.random.default_rng(2).normal(size=(5, DIM))
    vec[3] = bad
    write_latents(tmp_path / "latents", "main-dark-1", np.arange(5), vec)
    with pytest.raises(SimilarityError, match=r"all-zero or not finite, e.g. \[\(3, "):
        build_latents_db(tmp_path / "db.duckdb", tmp_path / "latents")
