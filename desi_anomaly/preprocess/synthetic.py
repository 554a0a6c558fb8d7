"""Synthetic QSO-like spectra (power law x Gaussian lines, plus noise) for tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..spectra import ObservedSpectra
from .grid import C_KMS, DESI_OBS_MAX, DESI_OBS_MIN, FWHM_PER_SIGMA

#: (rest wavelength A, rest EW A, FWHM km/s) of typical QSO emission lines.
TYPICAL_LINES: tuple[tuple[float, float, float], ...] = (
    (1215.67, 60.0, 5000.0),
    (1240.14, 10.0, 5000.0),
    (1399.8, 8.0, 5000.0),
    (1549.06, 30.0, 5000.0),
    (1908.73, 20.0, 5000.0),
    (2798.75, 30.0, 4000.0),
    (4862.68, 60.0, 4000.0),
    (5008.24, 15.0, 500.0),
    (6564.61, 250.0, 3500.0),
)


def rest_model(
    wave_rest: np.ndarray,
    alpha: float = -1.5,
    lines: tuple[tuple[float, float, float], ...] = TYPICAL_LINES,
    amplitude: float = 1.0,
) -> np.ndarray:
    """``amplitude (lambda/1450)^alpha (1 + sum_lines EW gaussian(lambda))``: every line has
    exactly the given rest EW relative to the local power-law continuum."""
    wave_rest = np.asarray(wave_rest, dtype=np.float64)
    profile = np.zeros_like(wave_rest)
    for wave0, ew, fwhm in lines:
        sigma = wave0 * fwhm / C_KMS / FWHM_PER_SIGMA
        profile += (
            ew * np.exp(-0.5 * ((wave_rest - wave0) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        )
    return amplitude * (wave_rest / 1450.0) ** alpha * (1.0 + profile)


def desi_wave(step: float = 0.8) -> np.ndarray:
    """The merged DESI observed grid, 3600-9824 A (7,781 pixels at 0.8 A)."""
    return DESI_OBS_MIN + step * np.arange(round((DESI_OBS_MAX - DESI_OBS_MIN) / step) + 1)


def synthetic_spectra(
    n: int,
    rng: np.random.Generator,
    *,
    z: np.ndarray | None = None,
    snr: np.ndarray | float = 5.0,
    wave: np.ndarray | None = None,
    alpha: np.ndarray | float = -1.5,
    lines: tuple[tuple[float, float, float], ...] = TYPICAL_LINES,
    masked_fraction: float = 0.004,
) -> ObservedSpectra:
    """``n`` noisy observed-frame spectra; ``snr`` is the per-pixel S/N of the continuum at 1450 A
    rest (or the red end when 1450 A is not observed). A random ``masked_fraction`` of pixels gets
    mask bit 1 (with garbage flux), and TARGETIDs are 1000 + row."""
    wave = desi_wave() if wave is None else np.asarray(wave, dtype=np.float64)
    z = rng.uniform(0.3, 3.5, n) if z is None else np.broadcast_to(np.asarray(z, float), (n,))
    snr = np.broadcast_to(np.asarray(snr, dtype=np.float64), (n,))
    alpha = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (n,))
    flux = np.empty((n, len(wave)), dtype=np.float32)
    ivar = np.empty_like(flux)
    for i in range(n):
        rest = wave / (1 + z[i])
        true = rest_model(rest, alpha[i], lines, amplitude=10.0) / (1 + z[i])
        ref = 10.0 / (1 + z[i]) * (min(1450.0, rest[-1]) / 1450.0) ** alpha[i]
        sigma = ref / snr[i]
        flux[i] = true + rng.normal(0.0, sigma, len(wave))
        ivar[i] = 1.0 / sigma**2
    mask = (rng.random(flux.shape) < masked_fraction).astype(np.uint32)
    flux[mask > 0] = rng.normal(0.0, 1e3, np.count_nonzero(mask))
    meta = pd.DataFrame({"TARGETID": 1000 + np.arange(n, dtype=np.int64), "Z": z})
    return ObservedSpectra(wave=wave, flux=flux, ivar=ivar, mask=mask, meta=meta)
