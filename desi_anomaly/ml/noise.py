"""Noise model of the reconstruction: the extra variance per rest-frame pixel, measured.

A normal spectrum departs from its reconstruction by more than its pipeline noise where the model
cannot follow it: the Lyman-alpha forest (stochastic intergalactic absorption) and, much less,
the cores of broad lines. This variance, as a fraction ``v`` of the squared model flux, is what
makes normalised residuals standard normal. For a pixel with noise variance ``s2``, model ``m``
and residual ``r``, ``e = r^2 - s2`` has mean ``v m^2`` and variance ``2 (s2 + v m^2)^2``, so ``v``
is estimated per pixel by weighted least squares with weights ``m^2 / (s2 + v m^2)^2`` (iterated,
since the weights depend on ``v``), pooling a box of neighbouring pixels of one region (forest or
red side) and clipped at 0. The forest's variance depends on the pixel width: measuring it on the
grid in use replaces the training prior ``VAEConfig.forest_var``. Measure it on spectra the model
did not train on: a trained VAE partly fits the forest of its own training spectra, so their
residuals understate the forest variance of new spectra. Where few spectra cover a pixel (the far
blue end, reached only by the highest redshifts) the estimate is shrunk towards the prior: it
counts as ``n`` pooled spectrum-pixels against ``PRIOR_PIXELS`` for the prior, so a handful of
spectra cannot set the variance to 0 (or to 10) there.

The forest's variance grows steeply with redshift (its optical depth goes as (1+z)^3.9, and at
high z saturated absorbers and Lyman-limit breaks are common), so one value per rest pixel would
overstate it for z ~ 2 quasars, hiding their absorbers, and understate it at z > 4, where normal
forests then look like damped systems. ``excess_variance_by_redshift`` therefore measures it in
quasar-redshift bins (quantiles of the measurement spectra, at least ``min_spectra`` each), each
shrunk towards the all-redshift estimate the same way.
"""

from __future__ import annotations

import numpy as np

ITERATIONS = 8
PRIOR_PIXELS = 200  # weight of the prior, in pooled spectrum-pixels
MIN_SPECTRA_PER_BIN = 100  # measurement spectra per redshift bin


def excess_variance(
    flux: np.ndarray,
    ivar: np.ndarray,
    model: np.ndarray,
    regions: np.ndarray,
    smooth_pixels: int,
    prior: np.ndarray,
) -> np.ndarray:
    """(npix,) extra variance as a fraction of model^2 from spectra (n, npix) and their
    reconstructions; pixels pool ``smooth_pixels`` neighbours with the same ``regions`` label;
    pixels that few or no spectra cover stay near or at ``prior``."""
    good = ivar > 0
    s2 = np.where(good, 1.0 / np.where(good, ivar, 1.0), 0.0)
    m2 = np.where(good, model.astype(np.float64) ** 2, 0.0)
    e = np.where(good, (flux - model).astype(np.float64) ** 2 - s2, 0.0)
    box = np.ones(max(1, int(smooth_pixels)))
    prior = np.asarray(prior, dtype=np.float64)
    count = _pool(good.sum(axis=0).astype(np.float64), regions, box)
    trust = count / (count + PRIOR_PIXELS)
    v = prior.copy()
    for _ in range(ITERATIONS):
        w = np.where(good, m2 / np.maximum(s2 + v * m2, 1e-30) ** 2, 0.0)
        num = _pool((w * e).sum(axis=0), regions, box)
        den = _pool((w * m2).sum(axis=0), regions, box)
        covered = den > 0
        measured = np.clip(num / np.where(covered, den, 1.0), 0.0, None)
        v = np.where(covered, trust * measured + (1.0 - trust) * prior, prior)
    return v


def excess_variance_by_redshift(
    flux: np.ndarray,
    ivar: np.ndarray,
    model: np.ndarray,
    redshift: np.ndarray,
    regions: np.ndarray,
    smooth_pixels: int,
    prior: np.ndarray,
    *,
    max_bins: int,
    min_spectra: int = MIN_SPECTRA_PER_BIN,
) -> tuple[np.ndarray, np.ndarray]:
    """(k, npix) extra variance in k <= ``max_bins`` quasar-redshift bins and their k - 1 inner
    edges; arguments as for ``excess_variance``, plus the spectra's ``redshift`` (n,)."""
    overall = excess_variance(flux, ivar, model, regions, smooth_pixels, prior)
    redshift = np.asarray(redshift, dtype=np.float64)
    k = int(np.clip(len(redshift) // max(min_spectra, 1), 1, max_bins))
    # rounded: the edges are stored as float32 and must stay strictly increasing there
    edges = np.unique(np.round(np.quantile(redshift, np.linspace(0.0, 1.0, k + 1)[1:-1]), 4))
    rows = np.searchsorted(edges, redshift, side="right")
    table = np.stack(
        [
            excess_variance(flux[sel], ivar[sel], model[sel], regions, smooth_pixels, overall)
            for sel in (rows == b for b in range(len(edges) + 1))
        ]
    )
    return table, edges


def _pool(values: np.ndarray, regions: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Box sums of ``values`` within runs of equal ``regions`` labels."""
    out = np.empty_like(values)
    for label in np.unique(regions):
        sel = regions == label
        out[sel] = np.convolve(np.where(sel, values, 0.0), box, mode="same")[sel]
    return out
