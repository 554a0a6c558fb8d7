"""Observe noiseless model spectra with the DESI arms: resolution, sky noise, bad pixels, and a flux
scale chosen per spectrum so that the *realised* median per-pixel S/N of the merged spectrum equals
a drawn target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from desi_anomaly.io.instrument import ARMS

from .sky import apply_resolution, arm_noise, arm_slices, merged_wavelength, resolution_data


@dataclass
class ArmSpectra:
    """Observed spectra of ``n`` targets, per arm: flux, ivar (float32), mask (uint32)."""

    flux: dict[str, np.ndarray]
    ivar: dict[str, np.ndarray]
    mask: dict[str, np.ndarray]
    amplitude: np.ndarray  # flux scale applied to the unit model of each spectrum


def split_arms(model: np.ndarray, lsf_scale: np.ndarray) -> dict[str, np.ndarray]:
    """Cut merged-grid models (n, npix) into the arms, convolved with each fibre's resolution."""
    return {
        arm: apply_resolution(resolution_data(arm, lsf_scale), model[:, sl])
        for arm, sl in arm_slices().items()
    }


def merge_arms(
    flux: dict[str, np.ndarray], ivar: dict[str, np.ndarray], mask: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse-variance merge of the arms onto the merged grid; masks OR-ed (as coadd_cameras)."""
    n = next(iter(flux.values())).shape[0]
    npix = len(merged_wavelength())
    sum_iv = np.zeros((n, npix), dtype=np.float64)
    sum_ivf = np.zeros((n, npix), dtype=np.float64)
    out_mask = np.zeros((n, npix), dtype=np.uint32)
    for arm, sl in arm_slices().items():
        sum_iv[:, sl] += ivar[arm]
        sum_ivf[:, sl] += ivar[arm] * flux[arm]
        out_mask[:, sl] |= mask[arm]
    with np.errstate(invalid="ignore", divide="ignore"):
        merged = np.where(sum_iv > 0, sum_ivf / sum_iv, 0.0)
    return merged.astype(np.float32), sum_iv.astype(np.float32), out_mask


def median_snr(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Median of flux*sqrt(ivar) over good pixels (ivar > 0, mask clear) of each merged spectrum."""
    good = (ivar > 0) & (mask == 0) & np.isfinite(flux)
    with np.errstate(invalid="ignore"):
        snr = np.where(good, flux * np.sqrt(np.where(good, ivar, 0.0)), np.nan)
        return np.nanmedian(snr, axis=1)


def masked_median_rows(
    values: np.ndarray, good: np.ndarray, filler: np.ndarray | None = None
) -> np.ndarray:
    """Row medians over ``good`` pixels: bad pixels become +/-inf in equal numbers (fast partition).

    ``filler`` (from ``median_filler(good)``) may be passed when called repeatedly.
    """
    if filler is None:
        filler = median_filler(good)
    return np.median(np.where(good, values, filler), axis=1)


def median_filler(good: np.ndarray) -> np.ndarray:
    """Alternating +inf/-inf for the bad pixels of each row (so they do not move the median)."""
    bad_rank = np.cumsum(~good, axis=1)
    return np.where(bad_rank % 2 == 0, np.inf, -np.inf).astype(np.float32)


def add_noise(
    arm_models: dict[str, np.ndarray],
    snr: np.ndarray,
    noise_scale: np.ndarray,
    masks: dict[str, np.ndarray],
    rng: np.random.Generator,
    exact_snr: np.ndarray | bool = True,
) -> ArmSpectra:
    """Scale unit models and add Gaussian sky noise so the merged median S/N equals ``snr``.

    ``noise_scale`` (n,) multiplies the per-arm noise curves (exposure time, conditions). For rows
    with ``exact_snr`` (bool or (n,) bool) the scale is found by bisection on the realised median
    of flux*sqrt(ivar) over good merged pixels (noise included); otherwise from the noiseless
    model only (cheaper).
    """
    n = len(snr)
    sl = arm_slices()
    npix = len(merged_wavelength())
    sigma, eps = {}, {}
    sum_iv = np.zeros((n, npix), dtype=np.float64)
    sum_ivm = np.zeros((n, npix), dtype=np.float64)
    sum_noise = np.zeros((n, npix), dtype=np.float64)
    good = np.ones((n, npix), dtype=bool)
    for arm in ARMS:
        sigma[arm] = (arm_noise(arm)[None, :] * noise_scale[:, None]).astype(np.float32)
        eps[arm] = rng.standard_normal(sigma[arm].shape, dtype=np.float32)
        iv = np.where(masks[arm] == 0, 1.0 / sigma[arm].astype(np.float64) ** 2, 0.0)
        sum_iv[:, sl[arm]] += iv
        sum_ivm[:, sl[arm]] += iv * arm_models[arm]
        sum_noise[:, sl[arm]] += iv * sigma[arm] * eps[arm]
        good[:, sl[arm]] &= masks[arm] == 0
    good &= sum_iv > 0
    root = np.sqrt(np.where(good, sum_iv, 1.0))
    signal = sum_ivm / root  # merged S/N per unit amplitude
    noise = np.where(good, sum_noise / root, 0.0)  # merged noise in S/N units

    amplitude = snr / np.maximum(masked_median_rows(signal, good), 1e-30)
    exact = np.flatnonzero(np.broadcast_to(exact_snr, (n,)))
    if exact.size:
        amplitude[exact] = _bisect_amplitude(
            signal[exact], noise[exact], good[exact], snr[exact], amplitude[exact]
        )
    flux, ivar = {}, {}
    for arm in ARMS:
        bad = masks[arm] != 0
        f = amplitude[:, None].astype(np.float32) * arm_models[arm] + sigma[arm] * eps[arm]
        flux[arm] = np.where(bad, 0.0, f).astype(np.float32)
        ivar[arm] = np.where(bad, 0.0, 1.0 / sigma[arm] ** 2).astype(np.float32)
    return ArmSpectra(flux, ivar, masks, amplitude)


def _bisect_amplitude(signal, noise, good, target, guess, iterations: int = 18) -> np.ndarray:
    """Per-row amplitude k with median(k*signal + noise) == target (monotone in k)."""
    filler = median_filler(good)
    signal, noise = signal.astype(np.float32), noise.astype(np.float32)
    lo = 0.5 * guess
    hi = np.maximum(2.0 * guess, 1e-30)
    for _ in range(60):  # widen the bracket where needed
        short = masked_median_rows(hi[:, None] * signal + noise, good, filler) < target
        over = masked_median_rows(lo[:, None] * signal + noise, good, filler) > target
        if not (short.any() or over.any()):
            break
        hi[short] *= 2.0
        lo[over] *= 0.25
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = masked_median_rows(mid[:, None] * signal + noise, good, filler) >= target
        hi = np.where(above, mid, hi)
        lo = np.where(above, lo, mid)
    return 0.5 * (lo + hi)
