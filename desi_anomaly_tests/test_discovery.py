"""The discovery stages end to end on a small mock drop: clean -> train -> encode -> fit -> score
-> types -> catalog, in process (the Ray path is covered by ``test_ray_dispatch``)."""

from __future__ import annotations

import duckdb
import fitsio
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from desi_anomaly.catalog import ANOMALY_TYPES
from desi_anomaly.discovery import (
    Layout,
    cluster_anomalies,
    encode_partitions,
    fit_detector,
    score_partition,
    scored_spectra,
    stratum_size,
    train_checkpoint,
    write_catalog,
)
from desi_anomaly.ingest import clean_partition
from desi_anomaly.io.partitions import discover
from desi_anomaly.ml import VAEConfig
from desi_anomaly.ml.training import sample_spectra
from desi_anomaly.mock import generate_drop
from desi_anomaly.splits import SPLITS, assign_split

TINY = VAEConfig(epochs=3, channels=(4, 8, 8, 16, 16, 16, 16), latent_dim=16, batch_size=32)
#: Far above a science alpha, so that the undertrained test VAE still yields a catalog of many
#: entries to carry through typing, evidence and outputs (detection power is measured by the
#: injection-recovery benchmark, not here).
ALPHA = 0.99


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """All stages on 6 healpix files of 130 QSOs, 30% of them with injected anomalies."""
    root = tmp_path_factory.mktemp("discovery")
    generate_drop(root / "data", 6, 130, seed=5, others_per_tile=40, anomaly_fraction=0.3)
    layout = Layout(root / "out")
    keys = []
    for files in discover(root / "data").complete:
        clean_partition(files, layout.root)
        keys.append(str(files.key))
    checkpoint = train_checkpoint(layout, keys, TINY)
    encoded = encode_partitions(layout, keys, checkpoint)
    ensemble, calibrator = fit_detector(layout, keys, alpha=ALPHA)
    for key in keys:
        score_partition(layout, key, ensemble, calibrator)
    types = cluster_anomalies(layout, keys, alpha=ALPHA, min_cluster_size=5)
    result = write_catalog(layout, keys, alpha=ALPHA, n_plots=3)
    return layout, keys, encoded, types, result


def test_training_uses_only_the_train_split(run):
    layout, keys, *_ = run
    shards = [layout.cleaned(k) for k in keys]
    targetid = np.concatenate([pq.read_table(s, columns=["TARGETID"])["TARGETID"] for s in shards])
    for split in SPLITS:
        flux, *_ = sample_spectra(shards, None, np.random.default_rng(0), split)
        assert len(flux) == np.count_nonzero(assign_split(targetid) == split) > 0


def test_every_cleaned_spectrum_is_encoded_and_scored(run):
    layout, keys, encoded, *_ = run
    assert all(r.ok for r in encoded)
    n_cleaned = sum(pq.read_metadata(layout.cleaned(k)).num_rows for k in keys)
    scores = scored_spectra(layout, keys)
    assert len(scores) == n_cleaned == scores["TARGETID"].nunique()
    assert scores["P_VALUE"].between(0, 1).all() and (scores["Q_VALUE"] >= scores["P_VALUE"]).all()
    again = encode_partitions(layout, keys)
    assert all(r.skipped for r in again)


def test_catalog_is_the_significant_spectra_ranked(run):
    layout, keys, _, _, result = run
    scores = scored_spectra(layout, keys)
    catalog = result.catalog
    assert set(catalog["TARGETID"]) == set(scores.loc[scores["Q_VALUE"] < ALPHA, "TARGETID"])
    assert len(catalog) > 0
    assert catalog["RANK"].tolist() == list(range(1, len(catalog) + 1))
    assert catalog["Q_VALUE"].is_monotonic_increasing
    assert set(catalog["TYPE"]) <= set(ANOMALY_TYPES)


def test_outputs_and_evidence_for_every_entry(run):
    layout, _, _, types, result = run
    catalog, paths = result.catalog, result.paths
    assert pd.read_parquet(layout.clusters)["TARGETID"].nunique() == len(types.assignments)
    fits_rows = fitsio.read(paths["catalog_fits"], ext="CATALOG")
    assert np.array_equal(fits_rows["TARGETID"], catalog["TARGETID"].to_numpy())
    with duckdb.connect(str(paths["duckdb"]), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM catalog").fetchone()[0] == len(catalog)
    evidence = pq.read_table(paths["reconstructions"])
    assert sorted(evidence["TARGETID"].to_pylist()) == sorted(catalog["TARGETID"])
    residual = np.stack(evidence["RESIDUAL"].to_numpy(zero_copy_only=False))
    assert np.isfinite(residual).all() and (np.abs(residual).max(axis=1) > 0).all()
    regions = pd.read_parquet(paths["regions"])
    assert set(regions["TARGETID"]) <= set(catalog["TARGETID"]) and len(regions) > 0
    assert len(result.plots) == min(3, len(catalog)) + 1 and all(
        p.stat().st_size for p in result.plots
    )


def test_stratum_size_gives_bh_resolution():
    n = stratum_size(0.01, 0.01)
    assert n == 10_000
    # the smallest conformal p-value of such a stratum passes BH when 1% of spectra are anomalies
    m = 1_000_000
    assert 1 / (n + 1) <= 0.01 * (0.01 * m) / m
