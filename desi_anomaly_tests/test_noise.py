"""The extra-variance estimate of the reconstruction's noise model."""

from __future__ import annotations

import numpy as np
import pytest

from desi_anomaly.ml.noise import PRIOR_PIXELS, excess_variance, excess_variance_by_redshift


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


def test_forest_variance_is_measured_per_redshift_bin():
    # the forest's variance grows with redshift: 1% for z < 2.5, 6% above
    npix = 80
    forest = np.arange(npix) < 40
    lo, hi = (draw(1500, np.where(forest, v, 0.0), seed=s) for v, s in ((0.01, 4), (0.06, 5)))
    flux, ivar, model = (np.concatenate(pair) for pair in zip(lo, hi, strict=True))
    redshift = np.concatenate([np.linspace(2.0, 2.45, 1500), np.linspace(2.55, 4.0, 1500)])
    prior = np.where(forest, 0.1, 0.0)
    table, edges = excess_variance_by_redshift(
        flux, ivar, model, redshift, forest, smooth_pixels=5, prior=prior, max_bins=4
    )
    assert table.shape == (4, npix) and edges.shape == (3,)
    assert edges[1] == pytest.approx(2.5, abs=0.06)  # quantiles of the measurement redshifts
    # one value per pixel would sit in between, wrong for both
    single = excess_variance(flux, ivar, model, forest, smooth_pixels=5, prior=prior)
    assert 0.02 < np.median(single[forest]) < 0.05
    # each bin is shrunk a little towards that all-redshift value (750 spectra x 5 pixels)
    trust = 3000 / (3000 + PRIOR_PIXELS)
    for rows, v in ((table[:2], 0.01), (table[2:], 0.06)):
        shrunk = trust * v + (1 - trust) * np.median(single[forest])
        assert np.median(rows[:, forest], axis=1) == pytest.approx([shrunk, shrunk], rel=0.1)
    assert np.all(table[:, ~forest] < 0.003)


def test_few_spectra_give_one_redshift_bin():
    flux, ivar, model = draw(150, np.full(20, 0.02), seed=6)
    table, edges = excess_variance_by_redshift(
        flux, ivar, model, np.linspace(1, 3, 150), np.ones(20, bool), 3, np.full(20, 0.1),
        max_bins=16,
    )  # fmt: skip
    assert table.shape == (1, 20) and edges.size == 0
