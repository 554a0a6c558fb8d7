"""Spectral features: continuum slope, broad-line EW/FWHM and the C IV balnicity index."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from desi_anomaly.preprocess import BROAD_LINES, RestFrameGrid, measure_features, preprocess
from desi_anomaly.preprocess.features import CIV_WAVE, balnicity_civ
from desi_anomaly.preprocess.grid import C_KMS
from desi_anomaly.preprocess.synthetic import rest_model, synthetic_spectra

GRID = RestFrameGrid.for_redshift_range(0.0, 7.0, npix=4000)


def rest_spectra(flux: np.ndarray, snr: float | None = None, seed: int = 0):
    """Rest-frame flux on GRID with ivar (optionally noisy at per-pixel S/N ``snr``)."""
    flux = np.atleast_2d(flux).astype(np.float64)
    if snr is None:
        return flux.astype(np.float32), np.full(flux.shape, 1e4, np.float32)
    sigma = np.median(flux, axis=1, keepdims=True) / snr
    noisy = flux + np.random.default_rng(seed).normal(size=flux.shape) * sigma
    return noisy.astype(np.float32), np.broadcast_to(1 / sigma**2, flux.shape).astype(np.float32)


@pytest.mark.parametrize("line", BROAD_LINES, ids=lambda line: line.name)
@pytest.mark.parametrize(("ew", "fwhm"), [(15.0, 2500.0), (60.0, 6000.0)])
def test_gaussian_line_on_power_law_recovers_ew_and_fwhm(line, ew, fwhm):
    flux, ivar = rest_spectra(rest_model(GRID.centres, -1.3, ((line.wave, ew, fwhm),)))
    feats = measure_features(flux, ivar, GRID)
    assert feats[f"EW_{line.name}"].iloc[0] == pytest.approx(ew, rel=0.1)
    assert feats[f"FWHM_{line.name}"].iloc[0] == pytest.approx(fwhm, rel=0.1)
    others = [c for c in feats.columns if c.startswith("EW_") and c != f"EW_{line.name}"]
    assert np.all(np.abs(feats[others].to_numpy()) < 0.5)  # no line where there is none


def test_noisy_line_after_full_preprocessing():
    # C IV at z = 2 through masking, resampling and normalisation, per-pixel S/N ~10.
    lines = ((1549.06, 40.0, 4500.0), (1908.73, 20.0, 5000.0))
    spectra = synthetic_spectra(20, np.random.default_rng(1), z=2.0, snr=10.0, lines=lines)
    feats = preprocess(spectra).meta
    assert len(feats) == 20
    assert feats["EW_CIV"].median() == pytest.approx(40.0, rel=0.1)
    assert feats["FWHM_CIV"].median() == pytest.approx(4500.0, rel=0.1)
    assert feats["EW_CIII"].median() == pytest.approx(20.0, rel=0.1)
    assert feats["ALPHA_CONT"].median() == pytest.approx(-1.5, abs=0.1)
    assert feats["EW_HBETA"].isna().all() and feats["EW_LYA"].isna().all()  # not observed


@pytest.mark.parametrize("alpha", [-2.0, -0.7, 0.8])
def test_continuum_slope_recovered(alpha):
    flux, ivar = rest_spectra(rest_model(GRID.centres, alpha, ()))
    ivar = np.repeat(ivar, 3, axis=0)
    flux = np.repeat(flux, 3, axis=0)
    ivar[1, GRID.centres > 2500] = 0  # high z: UV windows only
    ivar[2, GRID.centres < 2500] = 0  # low z: optical windows only
    got = measure_features(flux, ivar, GRID)["ALPHA_CONT"].to_numpy()
    np.testing.assert_allclose(got, alpha, atol=0.02)


def test_features_are_nan_where_not_covered():
    flux, ivar = rest_spectra(rest_model(GRID.centres, -1.5))
    ivar[:, (GRID.centres > 1400) & (GRID.centres < 1800)] = 0
    feats = measure_features(flux, ivar, GRID).iloc[0]
    assert np.isnan(feats["EW_CIV"]) and np.isnan(feats["FWHM_CIV"]) and np.isnan(feats["BI_CIV"])
    assert not feats["BAL_FLAG"]
    assert np.isfinite(feats["EW_MGII"]) and np.isfinite(feats["ALPHA_CONT"])
    ivar[:] = 0
    assert measure_features(flux, ivar, GRID).drop(columns="BAL_FLAG").isna().all().all()


def bal_spectrum(troughs: list[tuple[float, float, float]]) -> np.ndarray:
    """Power law + Lya, Si IV, C IV emission, times troughs (v_start, v_end km/s, depth)."""
    lines = ((1215.67, 60.0, 5000.0), (1399.8, 8.0, 5000.0), (1549.06, 40.0, 6000.0))
    flux = rest_model(GRID.centres, -1.5, lines)
    v = C_KMS * np.log(GRID.centres / CIV_WAVE)
    for v1, v2, depth in troughs:
        flux = np.where((v > -v2) & (v < -v1), flux * (1 - depth), flux)
    return flux


def expected_bi(troughs):
    return sum((1 - (1 - d) / 0.9) * max(v2 - v1 - 2000.0, 0.0) for v1, v2, d in troughs)


@pytest.mark.parametrize(
    "troughs",
    [
        [(6000.0, 15000.0, 0.5)],  # classic BAL
        [(4000.0, 8000.0, 0.7), (12000.0, 20000.0, 0.35)],  # two troughs
        [(5000.0, 6500.0, 0.8)],  # narrower than 2000 km/s: BI = 0
        [],
    ],
)
def test_balnicity_index_of_synthetic_troughs(troughs):
    flux, ivar = rest_spectra(bal_spectrum(troughs))
    bi = balnicity_civ(flux, ivar, GRID)[0]
    expected = expected_bi(troughs)
    if expected == 0:
        assert bi < 50.0
    else:
        assert bi == pytest.approx(expected, rel=0.1)
    flag = measure_features(flux, ivar, GRID)["BAL_FLAG"].iloc[0]
    assert flag == (bi > 0)


def test_balnicity_with_noise_separates_bal_from_non_bal():
    troughs = [(6000.0, 15000.0, 0.6)]
    flux = np.stack([bal_spectrum(troughs)] * 30 + [bal_spectrum([])] * 30)
    flux, ivar = rest_spectra(flux, snr=10.0, seed=2)
    bi = balnicity_civ(flux, ivar, GRID)
    assert np.median(bi[:30]) == pytest.approx(expected_bi(troughs), rel=0.1)
    assert (bi[:30] > 0).all()
    assert (bi[30:] == 0).mean() >= 0.9


def test_features_vectorised_equal_row_by_row():
    rng = np.random.default_rng(3)
    spectra = [bal_spectrum([(6000.0, 15000.0, 0.5)]), rest_model(GRID.centres, -0.9)]
    flux, ivar = rest_spectra(np.stack(spectra), snr=8.0, seed=4)
    ivar[1, rng.random(GRID.npix) < 0.05] = 0
    together = measure_features(flux, ivar, GRID)
    assert together.notna().sum().sum() > 15
    for i in range(2):
        alone = measure_features(flux[i : i + 1], ivar[i : i + 1], GRID)
        pd.testing.assert_frame_equal(together.iloc[[i]].reset_index(drop=True), alone)
