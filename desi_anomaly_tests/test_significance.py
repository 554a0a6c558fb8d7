"""Conformal p-values in S/N x z strata, Benjamini-Hochberg q-values, the S/N-dependence check."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import kstest

from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.ml.detectors import AnomalyInputError, ModelFileError
from desi_anomaly.ml.significance import (
    ConformalCalibrator,
    benjamini_hochberg,
    snr_dependence,
)

SNR_EDGES = np.array([0.0, 1.0, 2.0, 4.0, 8.0, 16.0, np.inf])
Z_EDGES = np.array([0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 7.0])


def normals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of normal spectra whose level and spread grow with S/N and z (like RECON_RCHI2)."""
    snr = np.clip(rng.lognormal(np.log(2.3), 1.05, n), 0.1, 200.0)
    z = np.clip(rng.normal(1.7, 0.7, n), 0.05, 6.0)
    score = 0.8 * np.log(snr) + 0.3 * z + (1 + 0.1 * snr**0.5) * rng.gumbel(size=n)
    return score, snr, z


def calibrated(seed: int, n_cal: int = 20_000, min_per_stratum: int = 300) -> ConformalCalibrator:
    cal = normals(n_cal, np.random.default_rng(seed))
    return ConformalCalibrator().fit(
        *cal, snr_edges=SNR_EDGES, z_edges=Z_EDGES, min_per_stratum=min_per_stratum
    )


def test_null_pvalues_are_uniform_with_few_discoveries():
    calibrator = calibrated(seed=1)
    score, snr, z = normals(4000, np.random.default_rng(2))
    p = calibrator.pvalues(score, snr, z)
    assert kstest(p, "uniform").pvalue > 0.01
    assert benjamini_hochberg(p, alpha=0.01).discoveries.sum() <= 3


@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_realised_fdr_stays_below_alpha(alpha):
    fdp, recall = [], []
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        # the smallest p-value is 1 / (n_stratum + 1): BH at q < alpha can only find ~1000 of 5000
        # if p-values reach alpha * 1000 / 5000, i.e. in strata of >= ~1 / (0.2 * alpha) spectra
        calibrator = calibrated(seed=200 + seed, n_cal=40_000, min_per_stratum=3000)
        score, snr, z = normals(5000, rng)
        is_anomaly = rng.random(score.size) < 0.2
        score[is_anomaly] += rng.uniform(5.0, 20.0, is_anomaly.sum())
        found = benjamini_hochberg(calibrator.pvalues(score, snr, z), alpha).discoveries
        fdp.append((found & ~is_anomaly).sum() / max(found.sum(), 1))
        recall.append((found & is_anomaly).sum() / is_anomaly.sum())
    assert np.mean(fdp) <= alpha
    assert np.mean(recall) > 0.6  # most anomalies are found: there is an FDR to control


def test_stratification_restores_uniformity_within_an_snr_bin():
    rng = np.random.default_rng(3)
    cal = normals(20_000, rng)
    pooled = ConformalCalibrator().fit(
        *cal, snr_edges=[0.0, np.inf], z_edges=[0.0, 7.0], min_per_stratum=300
    )
    stratified = ConformalCalibrator().fit(
        *cal, snr_edges=SNR_EDGES, z_edges=Z_EDGES, min_per_stratum=300
    )
    score, snr, z = normals(20_000, rng)
    bright = snr >= 8.0  # ~9% of spectra: high S/N normals have high raw scores
    assert bright.sum() > 1000
    assert snr_dependence(score, snr) > 0.3
    p_pooled = pooled.pvalues(score, snr, z)[bright]
    p_strat = stratified.pvalues(score, snr, z)[bright]
    assert kstest(p_pooled, "uniform").pvalue < 1e-6
    assert np.median(p_pooled) < 0.3
    assert kstest(p_strat, "uniform").pvalue > 0.01


def test_sparse_bins_merge_with_neighbours():
    # counts per (S/N bin, z bin); S/N bin totals 770, 570, 120 with min_per_stratum=200
    counts = np.array([[300, 50, 400, 20], [300, 50, 200, 20], [10, 0, 100, 10]])
    snr_mid, z_mid = np.array([0.5, 1.5, 3.0]), np.array([0.5, 1.5, 2.5, 3.5])
    i, j = np.nonzero(counts)
    snr = np.repeat(snr_mid[i], counts[i, j])
    z = np.repeat(z_mid[j], counts[i, j])
    score = np.random.default_rng(4).normal(size=snr.size)
    calibrator = ConformalCalibrator().fit(
        score, snr, z, snr_edges=[0, 1, 2, 4], z_edges=[0, 1, 2, 3, 4], min_per_stratum=200
    )
    # the short top S/N bin (120) joins the one below it; within each S/N group the sparse z bin 1
    # joins z bin 2 and the short top z bin joins them
    np.testing.assert_array_equal(calibrator.stratum_of, [[0, 1, 1, 1], [2, 3, 3, 3], [2, 3, 3, 3]])
    np.testing.assert_array_equal(calibrator.n_per_stratum, [300, 470, 310, 380])
    assert calibrator.n_per_stratum.min() >= 200
    # values outside the edges join the outer bins
    np.testing.assert_array_equal(calibrator.stratum([100.0, -1.0], [-1.0, 9.0]), [2, 1])


def test_the_ends_of_the_redshift_range_are_calibrated_apart():
    """A few normal z > 5 quasars and bright z < 1 spectra with extreme scores (the model fits
    them worst) stay out of the z ~ 3 stratum, where a 6-sigma anomaly then reaches the smallest
    p-value; each end is stratified on its own however few spectra it holds."""
    rng = np.random.default_rng(9)
    z = np.r_[rng.uniform(1.0, 4.5, 3000), rng.uniform(0.1, 1.0, 1500), rng.uniform(5.0, 6.0, 5)]
    snr = rng.uniform(1.0, 10.0, z.size)
    score = np.r_[rng.normal(size=3000), rng.normal(size=1500), rng.uniform(50.0, 100.0, 5)]
    score[3000:3010] = 40.0  # ten low-z misfits
    edges = {"snr_edges": [0, 5, np.inf], "z_edges": [0, 1, 3, 5, np.inf], "min_per_stratum": 1000}
    pooled = ConformalCalibrator().fit(score, snr, z, **edges)
    apart = ConformalCalibrator().fit(score, snr, z, **edges, z_isolated=(1.0, 5.0))
    np.testing.assert_array_equal(pooled.stratum_of, [[0, 0, 0, 0], [1, 1, 1, 1]])  # by S/N
    # z < 1 (1500 spectra: one stratum), 1 <= z < 5 (3000: split by S/N), z >= 5 (5: kept)
    np.testing.assert_array_equal(apart.stratum_of, [[0, 1, 1, 3], [0, 2, 2, 3]])
    assert apart.n_per_stratum[3] == 5
    anomaly = ([6.0], [7.0], [3.5])
    assert pooled.pvalues(*anomaly)[0] > 5 / (pooled.n_per_stratum[1] + 1)
    assert apart.pvalues(*anomaly)[0] == pytest.approx(1 / (apart.n_per_stratum[2] + 1))
    # a normal z > 5 quasar is compared with its peers, not ranked above every z ~ 3 spectrum
    assert apart.pvalues([75.0], [7.0], [5.5])[0] > 0.1
    # no calibration spectra there at all: p = 1, never a discovery
    empty = ConformalCalibrator().fit(
        score[:4500], snr[:4500], z[:4500], **edges, z_isolated=(1.0, 5.0)
    )
    assert empty.n_per_stratum[-1] == 0
    assert empty.pvalues([1e6], [5.0], [5.5])[0] == 1.0
    only_high = ConformalCalibrator().fit(score, snr, z, **edges, z_isolated=(None, 5.0))
    np.testing.assert_array_equal(only_high.stratum_of[:, 3], [2, 2])
    with pytest.raises(AnomalyInputError, match=r"edge 4.0 must be one of the inner"):
        ConformalCalibrator().fit(score, snr, z, **edges, z_isolated=(None, 4.0))
    with pytest.raises(AnomalyInputError, match=r"must be increasing"):
        ConformalCalibrator().fit(score, snr, z, **edges, z_isolated=(5.0, 1.0))


def test_pvalue_formula_on_a_small_example():
    calibrator = ConformalCalibrator().fit(
        [1.0, 2.0, 3.0, 4.0],
        [1.0] * 4,
        [1.0] * 4,
        snr_edges=[0, 2],
        z_edges=[0, 2],
        min_per_stratum=1,
    )
    p = calibrator.pvalues([0.0, 2.0, 2.5, 4.0, 10.0], [1.0] * 5, [1.0] * 5)
    np.testing.assert_allclose(p, [1.0, 0.8, 0.6, 0.4, 0.2])


def test_calibrator_save_load_round_trip(tmp_path):
    calibrator = calibrated(seed=5)
    path = tmp_path / "calibrator.npz"
    calibrator.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["calibrator.npz"]
    loaded = ConformalCalibrator.load(path)
    score, snr, z = normals(2000, np.random.default_rng(6))
    np.testing.assert_array_equal(loaded.pvalues(score, snr, z), calibrator.pvalues(score, snr, z))
    assert loaded.min_per_stratum == 300 and loaded.z_isolated == (None, None)
    np.savez(tmp_path / "other.npz", x=np.arange(3))
    with pytest.raises(ModelFileError, match=r"other\.npz: cannot be read"):
        ConformalCalibrator.load(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"garbage")
    with pytest.raises(ModelFileError, match=r"broken\.npz: cannot be read"):
        ConformalCalibrator.load(tmp_path / "broken.npz")


def test_bad_calibration_input_is_an_error():
    score, snr, z = normals(1000, np.random.default_rng(7))
    score[[5, 9]] = np.nan
    with pytest.raises(AnomalyInputError, match="2 of 1000 rows have non-finite"):
        ConformalCalibrator().fit(score, snr, z, snr_edges=SNR_EDGES, z_edges=Z_EDGES)
    with pytest.raises(AnomalyInputError, match="min_per_stratum=2000"):
        ConformalCalibrator().fit(
            snr, snr, z, snr_edges=SNR_EDGES, z_edges=Z_EDGES, min_per_stratum=2000
        )
    with pytest.raises(AnomalyInputError, match="strictly increasing"):
        ConformalCalibrator().fit(snr, snr, z, snr_edges=[1.0, 1.0], z_edges=Z_EDGES)
    with pytest.raises(DesiAnomalyError, match="before fit"):
        ConformalCalibrator().pvalues(snr, snr, z)


def test_benjamini_hochberg_q_values():
    result = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.2]), alpha=0.05)
    np.testing.assert_allclose(result.qvalues, [0.04, 0.16 / 3, 0.16 / 3, 0.2])
    np.testing.assert_array_equal(result.discoveries, [True, False, False, False])
    with pytest.raises(AnomalyInputError, match=r"\[0, 1\]"):
        benjamini_hochberg(np.array([0.5, 1.5]))
    with pytest.raises(AnomalyInputError, match="1 of 2 rows"):
        benjamini_hochberg(np.array([0.5, np.nan]))


def test_snr_dependence():
    rng = np.random.default_rng(8)
    snr = rng.lognormal(0.8, 1.0, 5000)
    assert snr_dependence(np.log(snr) + rng.normal(0, 0.3, snr.size), snr) > 0.9
    assert abs(snr_dependence(rng.normal(size=snr.size), snr)) < 0.05


def test_a_small_calibration_set_is_split_by_snr_before_redshift():
    """Too few calibration spectra to split both ways: the strata separate faint from bright, so a
    bright spectrum is not ranked against the faint spectra's heavy-tailed outliers."""
    rng = np.random.default_rng(8)
    n = 2000
    snr = rng.choice([1.5, 10.0], n)
    z = rng.uniform(0.5, 3.5, n)
    score = np.where(snr < 2, rng.standard_cauchy(n), rng.normal(size=n))  # faint: heavy tail
    calibrator = ConformalCalibrator().fit(
        score, snr, z, snr_edges=[0, 2, np.inf], z_edges=[0, 2, np.inf], min_per_stratum=800
    )
    assert len(calibrator.n_per_stratum) == 2
    np.testing.assert_array_equal(calibrator.stratum([1.5, 10.0], [1.0, 1.0]), [0, 1])
    # a bright spectrum 6 sigma out outscores every bright calibration spectrum
    p = calibrator.pvalues(np.array([6.0]), np.array([10.0]), np.array([3.0]))
    assert p[0] == pytest.approx(1 / (calibrator.n_per_stratum[1] + 1))
