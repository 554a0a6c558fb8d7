"""Anomaly types: clustering recovers injected classes, naming rules, degenerate inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import adjusted_rand_score

from desi_anomaly.ml.anomaly_types import (
    TYPE_ARTEFACT,
    TYPE_BAL,
    TYPE_FEII,
    TYPE_REDDENED,
    TYPE_UNKNOWN,
    TYPE_WEAK_LINE,
    AnomalyTypesError,
    find_anomaly_types,
)
from desi_anomaly.mock.anomalies import inject
from desi_anomaly.mock.quasar import draw_qso_params, qso_components
from desi_anomaly.preprocess.features import measure_features
from desi_anomaly.preprocess.grid import RestFrameGrid

GRID = RestFrameGrid.for_redshift_range(1.6, 2.0, npix=2000)
EXPECTED = {
    "bal": TYPE_BAL,
    "reddened": TYPE_REDDENED,
    "weak_line": TYPE_WEAK_LINE,
    "strong_feii": TYPE_FEII,
    "arm_seam": TYPE_ARTEFACT,
}
DIM = 16


def residual_sample(kinds: list[str], rng: np.random.Generator, snr: float = 8.0):
    """Mock QSOs at z 1.6-2.0 with one injected anomaly each: rest-frame residuals in sigma units
    ((anomalous + noise - intrinsic) / sigma), coverage of the DESI range, features and Z."""
    wave = GRID.centres
    z = rng.uniform(1.6, 2.0, len(kinds))
    comp = qso_components(np.broadcast_to(wave, (len(z), len(wave))), draw_qso_params(z, rng))
    normal = comp.flux
    flux, res = np.zeros_like(normal), np.zeros_like(normal)
    cov = np.zeros(normal.shape, dtype=bool)
    for i, kind in enumerate(kinds):
        cov[i] = (wave * (1 + z[i]) >= 3600.0) & (wave * (1 + z[i]) <= 9824.0)
        parts = {"continuum": comp.continuum[i], "lines": comp.lines[i], "feii": comp.feii[i]}
        anomalous, _ = inject(kind, wave, normal[i], rng, z=z[i], **parts)
        sigma = np.median(normal[i][cov[i]]) / snr
        flux[i] = np.where(cov[i], anomalous + rng.normal(0.0, sigma, len(wave)), 0.0)
        res[i] = np.where(cov[i], (flux[i] - normal[i]) / sigma, 0.0)
    features = measure_features(flux, cov.astype(np.float32), GRID)
    features["Z"] = z
    return res, cov, features


def separated_latents(labels: np.ndarray, rng: np.random.Generator, n_ref: int):
    """Latents: one well-separated Gaussian blob per class, the reference sample around 0."""
    centres = rng.normal(0.0, 1.0, (labels.max() + 1, DIM))
    centres *= 12.0 / np.linalg.norm(centres, axis=1, keepdims=True)
    anom = centres[labels] + rng.normal(0.0, 1.0, (len(labels), DIM))
    return anom.astype(np.float32), rng.normal(0.0, 1.5, (n_ref, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def typed():
    rng = np.random.default_rng(7)
    kinds = list(np.repeat(list(EXPECTED), 40))
    res, cov, features = residual_sample(kinds, rng)
    truth = np.repeat(np.arange(len(EXPECTED)), 40)
    anom, ref = separated_latents(truth, rng, n_ref=150)
    result = find_anomaly_types(
        anom, ref, res, features, GRID.centres, coverage=cov, min_cluster_size=15, seed=0
    )
    return result, truth, np.array(kinds)


def test_clusters_recover_injected_classes(typed):
    result, truth, _ = typed
    labels = result.assignments["CLUSTER"].to_numpy()
    assert adjusted_rand_score(truth, labels) > 0.9
    assert len(result.clusters) == len(EXPECTED)
    assert result.embedding.shape == (len(truth), 10)
    assert result.reference_2d.shape == (150, 2)
    assert np.isfinite(result.assignments[["UMAP_X", "UMAP_Y"]].to_numpy()).all()


def test_clusters_named_by_rules(typed):
    result, _, kinds = typed
    for kind, name in EXPECTED.items():
        majority = result.assignments["TYPE"][kinds == kind].value_counts().idxmax()
        assert majority == name, kind
    clusters = result.clusters.set_index("TYPE")
    assert clusters.loc[TYPE_BAL, "BAL_FRACTION"] > 0.9
    assert clusters.loc[TYPE_BAL, "TROUGH_SIG"] > 10
    assert clusters.loc[TYPE_WEAK_LINE, "MEDIAN_EW_CIV"] < clusters.loc[TYPE_FEII, "MEDIAN_EW_CIV"]
    assert clusters.loc[TYPE_ARTEFACT, "ARTEFACT_FRACTION"] >= 0.5
    assert (clusters["N"] >= 15).all()
    assert (clusters["Z_MIN"] >= 1.6).all() and (clusters["Z_MAX"] <= 2.0).all()


def test_mean_residual_is_coverage_aware(typed):
    result, _, _ = typed
    row = result.clusters.index[result.clusters["TYPE"] == TYPE_BAL][0]
    count, mean = result.residual_count[row], result.mean_residual[row]
    n = result.clusters.loc[row, "N"]
    assert count.max() == n and count.min() < n  # the sample's redshifts cover different ranges
    assert np.isnan(mean[count == 0]).all() and np.isfinite(mean[count > 0]).all()
    civ_trough = (GRID.centres > 1450) & (GRID.centres < 1520)
    assert mean[civ_trough].mean() < -1.0


def test_few_anomalies_are_noise_typed_one_by_one():
    rng = np.random.default_rng(3)
    kinds = ["bal"] * 4 + ["weak_line"] * 4 + ["strong_feii"] * 4
    res, cov, features = residual_sample(kinds, rng, snr=15.0)
    anom, ref = separated_latents(np.zeros(len(kinds), dtype=int), rng, n_ref=30)
    result = find_anomaly_types(anom, ref, res, features, GRID.centres, coverage=cov)
    assert (result.assignments["CLUSTER"] == -1).all()
    assert result.clusters.empty and result.mean_residual.shape == (0, GRID.npix)
    assert np.isnan(result.embedding).all()
    expected = [EXPECTED[k] for k in kinds]
    assert np.mean(result.assignments["TYPE"].to_numpy() == np.array(expected)) >= 0.8


def test_zero_anomalies():
    wave = GRID.centres
    features = pd.DataFrame({"Z": np.zeros(0)})
    result = find_anomaly_types(
        np.zeros((0, DIM)), np.zeros((10, DIM)), np.zeros((0, len(wave))), features, wave
    )
    assert len(result.assignments) == 0 and result.clusters.empty
    assert list(result.assignments.columns) == ["CLUSTER", "TYPE", "UMAP_X", "UMAP_Y"]


def test_pure_noise_is_unknown():
    rng = np.random.default_rng(5)
    res = rng.normal(0.0, 1.0, (3, GRID.npix)).astype(np.float32)
    features = pd.DataFrame({"Z": [1.7, 1.8, 1.9]})
    result = find_anomaly_types(rng.normal(size=(3, DIM)), np.zeros((0, DIM)), res, features,
                                GRID.centres)  # fmt: skip
    assert (result.assignments["TYPE"] == TYPE_UNKNOWN).all()


def test_mismatched_inputs_raise():
    wave = GRID.centres
    with pytest.raises(AnomalyTypesError, match="features have 2 rows for 3"):
        find_anomaly_types(np.zeros((3, 4)), np.zeros((5, 4)), np.zeros((3, len(wave))),
                           pd.DataFrame({"Z": [1.0, 2.0]}), wave)  # fmt: skip
    with pytest.raises(AnomalyTypesError, match="Z column"):
        find_anomaly_types(np.zeros((1, 4)), np.zeros((5, 4)), np.zeros((1, len(wave))),
                           pd.DataFrame({"EW_CIV": [1.0]}), wave)  # fmt: skip
