"""The extra-variance estimate of the reconstruction's noise model."""

from __future__ import annotations

import numpy as np
import pytest

from desi_anomaly.ml.noise import PRIOR_PIXELS, excess_variance


def draw(n: int, v_true: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spectra around a known model with pipeline noise (S/N 2-20) plus extra variance v m^2."""
    rng = np.random.default_rng(seed)
    npix = len(v_true)
    model = rng.uniform(0.5, 2.0, (n, npix))
    ivar = (rng.uniform(2.0, 20.0, (n, 1)) / model) ** 2
    sigma = np.sqrt(1.0 / ivar + v_true * model**2)
    flux = model + sigma * rng.normal(size=(n, npix))
    ivar[rng.random((n, npix)) < 0.2] = 0.0  # missing pixels
    return flux, ivar, model


def test_recovers_the_extra_variance_of_each_region():
    npix = 120
    regions = np.arange(npix) < 40  # a "forest" with 3% extra variance, none elsewhere
    v_true = np.where(regions, 0.03, 0.0)
    flux, ivar, model = draw(2000, v_true, seed=1)
    prior = np.where(regions, 0.1, 0.0)
    v = excess_variance(flux, ivar, model, regions, smooth_pixels=9, prior=prior)
    assert v[regions] == pytest.approx(0.03, rel=0.1)
    assert np.all(v[~regions] < 0.002)
    assert np.all(v >= 0)
    # pooling stays within a region: the red side next to the boundary is not raised
    assert v[40] < 0.002 and v[39] == pytest.approx(0.03, rel=0.1)


def test_uncovered_pixels_keep_the_prior():
    npix = 30
    v_true = np.full(npix, 0.02)
    flux, ivar, model = draw(3000, v_true, seed=2)
    ivar[:, :10] = 0.0
    prior = np.full(npix, 0.1)
    v = excess_variance(flux, ivar, model, np.zeros(npix, bool), smooth_pixels=3, prior=prior)
    assert np.all(v[:9] == 0.1)  # no spectrum in their box
    assert v[15:] == pytest.approx(0.02, rel=0.2)


def test_sparsely_covered_pixels_shrink_towards_the_prior():
    # the far blue end: only a few spectra reach it, too few to measure its variance
    npix = 60
    flux, ivar, model = draw(3000, np.zeros(npix), seed=3)
    ivar[5:, :20] = 0.0  # 5 spectra cover the first 20 pixels
    prior = np.full(npix, 0.1)
    v = excess_variance(flux, ivar, model, np.zeros(npix, bool), smooth_pixels=3, prior=prior)
    n_pooled = 5 * 3 * 0.8  # spectra x box x share of pixels with data
    weight = PRIOR_PIXELS / (PRIOR_PIXELS + n_pooled)
    assert np.all(v[1:19] == pytest.approx(0.1 * weight, abs=0.01))  # not the measured ~0
    assert np.all(v[25:] < 0.01)  # well measured: 0
