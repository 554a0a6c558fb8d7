"""Catalog building and its outputs: ranking, follow-up rule, Parquet, FITS and DuckDB."""

from __future__ import annotations

import duckdb
import fitsio
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.table import Table

from desi_anomaly import __version__
from desi_anomaly.catalog import (
    CATALOG_COLUMNS,
    FEATURE_COLUMNS,
    CatalogError,
    build_catalog,
    write_outputs,
    write_scores_parquet,
)
from desi_anomaly.catalog import writers as writers_module
from desi_anomaly.ml.anomaly_types import TYPE_ARTEFACT

SHA = "ab" * 32
KEYS = ("main-dark-9557", "main-bright-9557", "sv3-dark-27000")


def make_scores(n_per_key: int = 300, seed: int = 0) -> pd.DataFrame:
    """A scores table over three partitions, ~5% of it with tiny q-values."""
    rng = np.random.default_rng(seed)
    frames = []
    for i, key in enumerate(KEYS):
        n = n_per_key
        p = rng.uniform(size=n)
        p[rng.uniform(size=n) < 0.05] = rng.uniform(0, 1e-5, size=1)  # ties in p and q
        df = pd.DataFrame(
            {
                "TARGETID": np.arange(n, dtype=np.int64) + 10_000 * i,
                "PARTITION": key,
                "ANOMALY_SCORE": -np.log(p) + rng.normal(0, 0.1, n),
                "P_VALUE": p,
                "TARGET_RA": rng.uniform(0, 360, n),
                "TARGET_DEC": rng.uniform(-20, 80, n),
                "Z": rng.uniform(0.3, 4.0, n),
                "SNR_MEDIAN": rng.lognormal(1.0, 0.8, n),
                "TILEID": rng.integers(1000, 9000, n).astype(np.int32),
                "FIBER": rng.integers(0, 5000, n).astype(np.int32),
                "LASTNIGHT": np.full(n, 20220101 + i, np.int32),
                "RECON_RCHI2": rng.uniform(0.8, 3.0, n),
                "RESID_DIP": rng.uniform(2.0, 30.0, n),
                "RESID_PEAK": rng.uniform(2.0, 30.0, n),
                "FOREST_DIP": rng.uniform(0.0, 10.0, n),
            }
        )
        for col in FEATURE_COLUMNS[:-1]:
            df[col] = rng.normal(50, 10, n).astype(np.float32)
        df["BAL_FLAG"] = df["BI_CIV"] > 55
        frames.append(df)
    scores = pd.concat(frames, ignore_index=True)
    # BH q-values over the whole table (monotone in p)
    p = scores["P_VALUE"].to_numpy()
    order = np.argsort(p)
    q = p[order] * len(p) / np.arange(1, len(p) + 1)
    q = np.minimum.accumulate(q[::-1])[::-1]
    scores["Q_VALUE"] = np.empty_like(q)
    scores.loc[order, "Q_VALUE"] = np.minimum(q, 1.0)
    return scores


def make_clusters(scores: pd.DataFrame, alpha: float) -> pd.DataFrame:
    sig = scores.loc[scores["Q_VALUE"] < alpha, "TARGETID"].to_numpy()
    types = np.array(["BAL-like", "reddened", TYPE_ARTEFACT, "unknown"])
    clusters = pd.DataFrame(
        {
            "TARGETID": sig,
            "CLUSTER": np.arange(len(sig)) % 4 - 1,
            "TYPE": types[np.arange(len(sig)) % 4],
            "KNOWN_TYPE": np.where(np.arange(len(sig)) % 5 == 0, "BAL", None),
            "KNOWN_NAME": np.where(np.arange(len(sig)) % 5 == 0, "SDSS J1234+5678", None),
        }
    )
    return clusters.iloc[1:]  # one catalogued spectrum without a cluster row


@pytest.fixture(scope="module")
def scores() -> pd.DataFrame:
    return make_scores()


@pytest.fixture(scope="module")
def catalog(scores) -> pd.DataFrame:
    return build_catalog(scores, make_clusters(scores, 0.01), alpha=0.01, checkpoint_sha256=SHA)


def test_catalog_selection_and_ranking(scores, catalog):
    expected = set(scores.loc[scores["Q_VALUE"] < 0.01, "TARGETID"])
    assert len(catalog) > 10 and set(catalog["TARGETID"]) == expected
    assert list(catalog.columns) == list(CATALOG_COLUMNS)
    np.testing.assert_array_equal(catalog["RANK"], np.arange(1, len(catalog) + 1))
    assert catalog["Q_VALUE"].is_monotonic_increasing
    # within tied q-values, the higher score ranks first
    for _, grp in catalog.groupby("Q_VALUE"):
        assert grp["ANOMALY_SCORE"].is_monotonic_decreasing
    assert catalog["TARGETID"].is_unique
    assert (catalog["CHECKPOINT_SHA256"] == SHA).all()
    assert catalog["SOURCE_FILE"].iloc[0].endswith(f"coadd-{catalog['PARTITION'].iloc[0]}.fits")


def test_missing_cluster_row_is_unclustered(scores, catalog):
    first_sig = scores.loc[scores["Q_VALUE"] < 0.01, "TARGETID"].iloc[0]
    row = catalog.set_index("TARGETID").loc[first_sig]
    assert row["CLUSTER"] == -1 and row["TYPE"] == "unknown" and row["KNOWN_TYPE"] == ""


def test_followup_priority_rule(catalog):
    pri = catalog["FOLLOWUP_PRIORITY"]
    artefact = catalog["TYPE"] == TYPE_ARTEFACT
    known = catalog["KNOWN_TYPE"] != ""
    bright = catalog["SNR_MEDIAN"] >= 4.0
    assert (pri[artefact] == "low").all()
    assert (pri[~artefact & ~known & bright] == "high").all()
    assert (pri[~artefact & (known | ~bright)] == "medium").all()
    assert set(pri) == {"high", "medium", "low"}


def test_catalog_rejects_bad_inputs(scores):
    clusters = make_clusters(scores, 0.01)
    dup = pd.concat([scores, scores[scores["Q_VALUE"] < 0.01].iloc[:1]], ignore_index=True)
    with pytest.raises(CatalogError, match="duplicated TARGETID"):
        build_catalog(dup, clusters)
    with pytest.raises(CatalogError, match="duplicated TARGETID"):
        build_catalog(scores, pd.concat([clusters, clusters.iloc[:1]]))
    with pytest.raises(CatalogError, match="Q_VALUE"):
        build_catalog(scores.drop(columns="Q_VALUE"), clusters)
    # a duplicate among non-significant rows is not catalogued, hence allowed
    dup_ns = pd.concat([scores, scores[scores["Q_VALUE"] > 0.5].iloc[:1]], ignore_index=True)
    assert len(build_catalog(dup_ns, clusters)) == (scores["Q_VALUE"] < 0.01).sum()


def test_write_outputs_round_trip(tmp_path, scores, catalog):
    batches = (g for _, g in scores.groupby("PARTITION", sort=False))
    prov = {"alpha": 0.01, "checkpoint_sha256": SHA, "release": "dr1"}
    paths = write_outputs(tmp_path, batches, catalog, provenance=prov)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())

    sc = pq.read_table(paths["scores"]).to_pandas()
    assert len(sc) == len(scores)
    assert {"TARGETID", "PARTITION", "ANOMALY_SCORE", "P_VALUE", "Q_VALUE", "Z"} <= set(sc)
    pd.testing.assert_series_equal(
        sc.set_index("TARGETID")["Q_VALUE"], scores.set_index("TARGETID")["Q_VALUE"]
    )
    cp = pq.read_table(paths["catalog_parquet"])
    pd.testing.assert_frame_equal(cp.to_pandas(), catalog)
    assert b"dr1" in cp.schema.metadata[b"desi_anomaly"]

    # FITS through astropy: units, header, values
    t = Table.read(paths["catalog_fits"], hdu="CATALOG")
    assert str(t["TARGET_RA"].unit) == "deg" and str(t["EW_CIV"].unit) == "Angstrom"
    assert t["FWHM_MGII"].unit.to("km/s") == 1.0
    np.testing.assert_array_equal(t["TARGETID"], catalog["TARGETID"])
    np.testing.assert_array_equal(t["BAL_FLAG"], catalog["BAL_FLAG"])
    hdr = fits.getheader(paths["catalog_fits"], "CATALOG")
    assert hdr["CODEVERS"] == __version__ and hdr["CKPTSHA"] == SHA
    assert hdr["ALPHA"] == 0.01 and hdr["NSCORED"] == len(scores)
    assert hdr["NCATALOG"] == len(catalog) and hdr["DATE"].startswith("20")
    assert fits.getheader(paths["catalog_fits"], 0)["NSCORED"] == len(scores)
    assert hdr["TCOMM3"] == "right ascension (ICRS)"
    # ... and through fitsio: a plain binary table with fixed-width strings
    data, fhdr = fitsio.read(paths["catalog_fits"], ext="CATALOG", header=True)
    assert fhdr["TUNIT3"].strip() == "deg" and fhdr["TTYPE3"].strip() == "TARGET_RA"
    i_type = list(catalog.columns).index("TYPE") + 1
    assert fhdr[f"TFORM{i_type}"].strip() == f"{catalog['TYPE'].str.len().max()}A"
    np.testing.assert_array_equal(np.char.strip(data["TYPE"].astype(str)), catalog["TYPE"])
    np.testing.assert_array_equal(data["KNOWN_NAME"].astype(str)[catalog["KNOWN_NAME"] == ""], "")
    np.testing.assert_allclose(data["Q_VALUE"], catalog["Q_VALUE"])

    with duckdb.connect(str(paths["duckdb"]), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == len(scores)
        top = con.execute("SELECT TARGETID FROM catalog WHERE RANK = 1").fetchone()[0]
        assert top == catalog["TARGETID"].iloc[0]
        prov_db = dict(con.execute("SELECT KEY, VALUE FROM provenance").fetchall())
    assert prov_db["checkpoint_sha256"] == SHA and prov_db["n_scored"] == str(len(scores))


def test_rewrite_replaces_tables_and_failure_keeps_old(tmp_path, scores, catalog):
    prov = {"alpha": 0.01, "checkpoint_sha256": SHA}
    write_outputs(tmp_path, scores, catalog, provenance=prov)
    write_outputs(tmp_path, scores.iloc[:100], catalog.iloc[:3], provenance=prov)
    db = tmp_path / "catalog.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == 100
        assert con.execute("SELECT count(*) FROM catalog").fetchone()[0] == 3

    def failing():
        yield scores.iloc[:10]
        raise RuntimeError("partition read failed")

    with pytest.raises(RuntimeError):
        write_outputs(tmp_path, failing(), catalog, provenance=prov)
    assert pq.read_metadata(tmp_path / "scores.parquet").num_rows == 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(CatalogError, match="checkpoint_sha256"):
        write_outputs(tmp_path, scores, catalog, provenance={"alpha": 0.01})


def test_scores_streaming_row_groups_and_batch_types(tmp_path, scores, monkeypatch):
    monkeypatch.setattr(writers_module, "ROW_GROUP_ROWS", 250)
    small = scores[["TARGETID", "PARTITION", "ANOMALY_SCORE", "P_VALUE", "Q_VALUE"]]
    parts = [g for _, g in small.groupby("PARTITION", sort=False)]
    batches = [parts[0], pa.Table.from_pandas(parts[1]), pa.RecordBatch.from_pandas(parts[2])]
    n = write_scores_parquet(tmp_path / "s.parquet", iter(batches))
    meta = pq.read_metadata(tmp_path / "s.parquet")
    assert n == meta.num_rows == len(scores)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [250, 250, 250, 150]
    assert pq.read_schema(tmp_path / "s.parquet").names == list(small.columns)
    with pytest.raises(CatalogError, match="lacks a column"):
        write_scores_parquet(tmp_path / "t.parquet", [parts[0], parts[1].drop(columns="P_VALUE")])
    with pytest.raises(CatalogError, match="no scores"):
        write_scores_parquet(tmp_path / "t.parquet", [])
