"""Intergalactic absorption: a stochastic Lyman-alpha/beta forest of discrete absorbers and the
Lyman-limit suppression blueward of 912 A rest.

Absorbers are Poisson-distributed in redshift with column densities dn/dlogN ~ N^-0.5
(f(N) ~ N^-1.5, 10^12.5-10^18.5 cm^-2) and Doppler parameters b ~ 28 +/- 8 km/s. Their number
density is normalised so that the mean transmission is exp(-tau_eff), with
tau_eff(z) = 0.0018 (1+z)^3.92: for Poisson absorbers the mean transmission is exactly
exp(-dn/dz (1+z) <W_r> / lambda_alpha).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .quasar import C_KMS

LYA, LYB, LYMAN_LIMIT = 1215.67, 1025.72, 911.75
F_LYA, F_LYB = 0.4164, 0.07912
SIGMA_LL = 6.30e-18  # cm^2, H I photo-ionisation cross-section at the Lyman limit
LOG_N_RANGE = (12.5, 18.5)
_OVERSAMPLE = 4
_HALF_WINDOW = 12  # sub-pixels each side of an absorber


def tau_eff(z: np.ndarray | float) -> np.ndarray:
    """Effective Lyman-alpha optical depth (Faucher-Giguere et al. 2008 style power law)."""
    return 0.0018 * (1.0 + np.asarray(z, dtype=np.float64)) ** 3.92


def draw_absorbers(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Column densities (log10 cm^-2) and Doppler parameters (km/s) of ``n`` absorbers."""
    lo, hi = LOG_N_RANGE
    # inverse CDF of dn/dlogN ~ 10^(-0.5 logN)
    u = rng.random(n)
    a, b = 10 ** (-0.5 * lo), 10 ** (-0.5 * hi)
    log_n = -2.0 * np.log10(a - u * (a - b))
    doppler = np.clip(rng.normal(28.0, 8.0, n), 12.0, 60.0)
    return log_n, doppler


def central_tau(log_n: np.ndarray, doppler: np.ndarray, f: float, wave: float) -> np.ndarray:
    """Line-centre optical depth of a Doppler profile (wavelength in A, b in km/s)."""
    return 1.497e-15 * 10**log_n * f * wave / doppler


@lru_cache(maxsize=1)
def mean_rest_equivalent_width() -> float:
    """Mean Lyman-alpha rest EW (A) of one absorber of the population (curve of growth, MC)."""
    log_n, doppler = draw_absorbers(200_000, np.random.default_rng(1))
    tau0 = central_tau(log_n, doppler, F_LYA, LYA)
    # curve of growth W / (lambda b / c) as a function of the central optical depth
    log_tau = np.linspace(np.log10(tau0.min()) - 0.1, np.log10(tau0.max()) + 0.1, 600)
    x = np.linspace(-8.0, 8.0, 1601)
    growth = np.trapezoid(-np.expm1(-(10 ** log_tau[:, None]) * np.exp(-(x**2))), x, axis=1)
    width = np.interp(np.log10(tau0), log_tau, growth)
    return float(np.mean(width * doppler / C_KMS * LYA))


def absorber_density(z: np.ndarray) -> np.ndarray:
    """Absorbers per unit redshift that realise tau_eff(z)."""
    return tau_eff(z) * LYA / ((1.0 + z) * mean_rest_equivalent_width())


def forest_transmission(
    wave: np.ndarray, z_qso: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """IGM transmission (n, npix) on an increasing, uniform observed grid ``wave``.

    Returns the transmission and the number of absorbers drawn per spectrum. Spectra whose
    Lyman-alpha line lies blueward of the grid get a transmission of 1.
    """
    wave = np.asarray(wave, dtype=np.float64)
    z_qso = np.asarray(z_qso, dtype=np.float64)
    n, npix = len(z_qso), len(wave)
    step = wave[1] - wave[0]
    trans = np.ones((n, npix), dtype=np.float32)
    z_lo = (wave[0] - 5.0) / LYA - 1.0
    rows = np.flatnonzero(z_qso > z_lo)
    counts = np.zeros(n, dtype=np.int64)
    if rows.size == 0:
        return trans, counts
    # expected absorber counts and their redshifts by inverse CDF on a fine redshift grid
    zgrid = np.linspace(z_lo, z_qso[rows].max(), 4000)
    density = absorber_density(zgrid)
    cum = np.concatenate([[0.0], np.cumsum(0.5 * np.diff(zgrid) * (density[1:] + density[:-1]))])
    expected = np.interp(z_qso[rows], zgrid, cum)
    counts[rows] = rng.poisson(expected)
    owner = np.repeat(np.arange(rows.size), counts[rows])
    z_abs = np.interp(rng.random(owner.size) * expected[owner], cum, zgrid)
    log_n, doppler = draw_absorbers(owner.size, rng)

    # sub-pixel optical depth of the Lyman-alpha and -beta lines of every absorber
    nsub = npix * _OVERSAMPLE
    sub_step = step / _OVERSAMPLE
    sub0 = wave[0] - step / 2 + sub_step / 2
    tau = np.zeros(rows.size * nsub, dtype=np.float64)
    offsets = np.arange(-_HALF_WINDOW, _HALF_WINDOW + 1)
    for rest, f in ((LYA, F_LYA), (LYB, F_LYB)):
        centre = rest * (1.0 + z_abs)
        sigma = centre * doppler / C_KMS / np.sqrt(2.0)  # tau ~ exp(-(dv/b)^2)
        idx = np.rint((centre - sub0) / sub_step).astype(np.int64)[:, None] + offsets
        ok = (idx >= 0) & (idx < nsub)
        profile = central_tau(log_n, doppler, f, rest)[:, None] * np.exp(
            -0.5 * ((sub0 + idx * sub_step - centre[:, None]) / sigma[:, None]) ** 2
        )
        flat = (owner[:, None] * nsub + idx)[ok]
        tau += np.bincount(flat, weights=profile[ok], minlength=tau.size)
    sub_trans = np.exp(-tau).reshape(rows.size, npix, _OVERSAMPLE).mean(axis=2)

    # Lyman-continuum absorption by the optically thick absorbers
    thick = np.flatnonzero(log_n > 16.0)
    for k in thick:
        edge = LYMAN_LIMIT * (1.0 + z_abs[k])
        blue = wave < edge
        if blue.any():
            tau_ll = 10 ** log_n[k] * SIGMA_LL * (wave[blue] / edge) ** 3
            sub_trans[owner[k], blue] *= np.exp(-tau_ll)
    # no flux emitted by the quasar blueward of its own Lyman limit is transmitted unabsorbed:
    # the proximate gas and unresolved absorbers add a further break
    rest = wave[None, :] / (1.0 + z_qso[rows, None])
    sub_trans *= np.where(rest < LYMAN_LIMIT, np.exp(-1.5 * (LYMAN_LIMIT / rest) ** 3), 1.0)
    trans[rows] = sub_trans.astype(np.float32)
    return trans, counts
