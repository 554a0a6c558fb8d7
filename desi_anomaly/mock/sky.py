"""The observing model: sky-dominated noise per arm, line-spread (resolution) kernels, bad pixels.

The noise level of each arm is a smooth per-arm curve (throughput falling at the blue end of B and
at the dichroic edges) times the sky: the sky continuum plus unresolved airglow lines ([OI] 5577,
NaD, [OI] 6300/6364 and the OH forest above 6800 A), so ivar drops on every sky line.
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np

from desi_anomaly.io.instrument import ARM_GRIDS, ARMS, arm_wavelength
from desi_anomaly.preprocess.skylines import SKY_LINES_VACUUM

NDIAG = 11  # diagonals of the DESI resolution matrix
#: Per-arm 1-sigma continuum noise (1e-17 erg/s/cm^2/A) of a 1000 s effective exposure, relative
#: shape knots (wavelength, factor) tuned to DESI coadds: steep blue end of B, dichroic edges.
ARM_NOISE_LEVEL = {"B": 0.30, "R": 0.17, "Z": 0.13}
ARM_NOISE_SHAPE: dict[str, tuple[tuple[float, float], ...]] = {
    "B": ((3600, 6.0), (3650, 4.8), (3700, 3.8), (3800, 2.7), (3900, 2.1), (4000, 1.8),
          (4100, 1.55), (4200, 1.38), (4400, 1.22), (4500, 1.15), (4600, 1.04), (4700, 0.95),
          (4800, 0.87), (4900, 0.83), (5000, 0.8), (5200, 0.79), (5500, 0.8), (5700, 0.87),
          (5800, 0.8)),
    "R": ((5760, 6.0), (5780, 3.5), (5800, 2.2), (5860, 1.5), (5960, 1.27), (6060, 1.15),
          (6200, 1.1), (6360, 1.0), (6460, 0.95), (6560, 0.89), (6660, 0.85), (6800, 0.78),
          (7000, 0.75), (7200, 0.78), (7400, 0.85), (7500, 1.1), (7560, 2.0), (7600, 4.0),
          (7620, 6.0)),
    "Z": ((7520, 2.2), (7560, 1.5), (7620, 1.18), (7720, 1.02), (7900, 0.97), (8020, 0.86),
          (8500, 0.78), (9000, 0.82), (9150, 0.76), (9300, 1.2), (9400, 1.35), (9600, 1.3),
          (9824, 1.55)),
}  # fmt: skip

#: Line-spread Gaussian sigma (pixels) at the blue and red end of each arm.
ARM_LSF_SIGMA = {"B": (0.95, 0.80), "R": (0.90, 0.80), "Z": (0.95, 0.85)}

#: DESI coadd mask bits (desispec.maskbits.specmask).
MASK_COSMIC = 1 << 2
MASK_ALLBADPIX = 1 << 1
MASK_NODATA = 1 << 8
MASK_BADCOLUMN = 1 << 10


@lru_cache(maxsize=1)
def sky_lines() -> tuple[np.ndarray, np.ndarray]:
    """Airglow line wavelengths (vacuum A) and peak strengths relative to the sky continuum.

    The tabulated bright lines, plus a fixed pseudo-random population of fainter OH lines filling
    the Meinel bands above 6800 A.
    """
    fixed = np.random.default_rng(6300)
    waves = list(SKY_LINES_VACUUM)
    strength = [40.0 if abs(w - 5578.9) < 2 else 25.0 if abs(w - 6302) < 2 else 12.0 for w in waves]
    for lo, hi, n in ((6830, 7010, 18), (7230, 7460, 25), (7740, 8060, 30), (8270, 8560, 30),
                      (8760, 9070, 30), (9300, 9850, 45)):  # fmt: skip
        waves.extend(fixed.uniform(lo, hi, n))
        strength.extend(np.exp(fixed.uniform(np.log(2.0), np.log(30.0), n)))
    return np.asarray(waves), np.asarray(strength)


def sky_relative(wave: np.ndarray, lsf_sigma_pix: float = 0.85) -> np.ndarray:
    """Sky brightness relative to its continuum: 1 + unresolved airglow lines at the LSF width."""
    wave = np.asarray(wave, dtype=np.float64)
    step = wave[1] - wave[0]
    lines, strength = sky_lines()
    out = np.ones_like(wave)
    sigma = lsf_sigma_pix * step
    for w0, a in zip(lines, strength, strict=True):
        near = np.abs(wave - w0) < 6 * sigma
        out[near] += a * np.exp(-0.5 * ((wave[near] - w0) / sigma) ** 2)
    return out


@cache
def arm_noise(arm: str) -> np.ndarray:
    """Per-pixel 1-sigma noise of one arm for a 1000 s exposure (float64, on the nominal grid)."""
    wave = arm_wavelength(arm)
    knots = np.asarray(ARM_NOISE_SHAPE[arm])
    shape = np.interp(wave, knots[:, 0], knots[:, 1])
    return ARM_NOISE_LEVEL[arm] * shape * np.sqrt(sky_relative(wave))


def lsf_sigma(arm: str, scale: np.ndarray) -> np.ndarray:
    """(n, npix) line-spread sigma in pixels of ``n`` fibres with per-fibre ``scale`` factors."""
    lo, hi = ARM_LSF_SIGMA[arm]
    npix = len(arm_wavelength(arm))
    return np.linspace(lo, hi, npix)[None, :] * np.asarray(scale, dtype=np.float64)[:, None]


def resolution_data(arm: str, scale: np.ndarray) -> np.ndarray:
    """DESI resolution-matrix diagonals (n, 11, npix) float32: Gaussian line-spread kernels.

    Follows the scipy ``dia_matrix`` layout of ``desispec.resolution.Resolution`` (offsets
    5..-5): ``data[d, j]`` is the weight input pixel ``j`` puts on output pixel ``j - offset[d]``.
    Each column is normalised to 1.
    """
    sigma = lsf_sigma(arm, scale).astype(np.float32)
    half = NDIAG // 2
    q = np.exp(-0.5 / sigma**2)  # exp(-k^2 / 2 sigma^2) = q^(k^2): one exp per pixel
    kernel = np.empty((sigma.shape[0], NDIAG, sigma.shape[1]), dtype=np.float32)
    kernel[:, half] = 1.0
    for k in range(1, half + 1):
        kernel[:, half + k] = kernel[:, half - k] = q ** (k * k)
    kernel /= kernel.sum(axis=1, keepdims=True)
    return kernel


def apply_resolution(rdata: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Convolve (n, npix) spectra with their resolution diagonals (n, 11, npix), like R @ flux."""
    out = np.zeros_like(flux)
    npix = flux.shape[1]
    for d in range(NDIAG):
        off = NDIAG // 2 - d
        # output pixel i receives data[d, i + off] * flux[i + off]
        lo, hi = max(0, -off), min(npix, npix - off)
        out[:, lo:hi] += rdata[:, d, lo + off : hi + off] * flux[:, lo + off : hi + off]
    return out


def bad_pixel_mask(
    npix_per_arm: dict[str, int], fraction: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Per-arm uint32 mask arrays with about ``fraction`` of each spectrum's pixels bad.

    Bad pixels come as bad CCD columns (3-15 pixels), cosmic-ray residuals (1-3 pixels) and, for
    large fractions, one contiguous dead stretch (no data).
    """
    n = len(fraction)
    total = sum(npix_per_arm.values())
    masks = {arm: np.zeros((n, npix), dtype=np.uint32) for arm, npix in npix_per_arm.items()}
    arms = list(npix_per_arm)
    for i in range(n):
        budget = int(rng.poisson(fraction[i] * total))
        if fraction[i] > 0.03:  # a dead stretch in one arm
            arm = arms[rng.integers(len(arms))]
            length = min(budget, npix_per_arm[arm])
            start = rng.integers(0, npix_per_arm[arm] - length + 1)
            masks[arm][i, start : start + length] |= MASK_NODATA | MASK_ALLBADPIX
            budget -= length
        while budget > 0:
            arm = arms[rng.integers(len(arms))]
            if rng.random() < 0.5:
                length, bit = int(rng.integers(3, 16)), MASK_BADCOLUMN | MASK_ALLBADPIX
            else:
                length, bit = int(rng.integers(1, 4)), MASK_COSMIC
            length = min(length, budget)
            start = rng.integers(0, npix_per_arm[arm] - length + 1)
            masks[arm][i, start : start + length] |= bit
            budget -= length
    return masks


def arm_slices() -> dict[str, slice]:
    """Where each arm's nominal grid sits inside the merged observed grid."""
    start0, _, step = ARM_GRIDS[ARMS[0]]
    out = {}
    for arm in ARMS:
        first = round((ARM_GRIDS[arm][0] - start0) / step)
        out[arm] = slice(first, first + len(arm_wavelength(arm)))
    return out


def merged_wavelength() -> np.ndarray:
    """The union of the arm grids (they share one 0.8 A lattice)."""
    start0, _, step = ARM_GRIDS[ARMS[0]]
    stop = max(ARM_GRIDS[a][1] for a in ARMS)
    return start0 + step * np.arange(round((stop - start0) / step) + 1)
