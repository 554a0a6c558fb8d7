"""Local residual statistics: the most significant absorption and emission feature a reconstruction
misses.

A global reduced chi2 dilutes a localised feature (a BAL trough, a damped Lyman-alpha system, a
spike) over thousands of pixels. The scan statistic here is the matched filter for a box-shaped
feature: for every window of ``w`` consecutive pixels the summed normalised residual
``sum((flux - model) sqrt(ivar)) / sqrt(n_good)`` (standard normal for a correct model and noise),
maximised over positions and widths.

- ``RESID_DIP``: the most negative window sum (sign flipped: absorption) redward of Lyman-alpha.
- ``FOREST_DIP``: the same in the damped Lyman-alpha search window of the forest
  (``dla_search_pixels``): from Lyman-beta to 3,000 km/s blueward of Lyman-alpha, as in DLA
  surveys. The forest's own fluctuations make its null distribution differ from the red side's,
  so the two are scored separately. Left out: the quasar's proximity zone and the Lyman-alpha
  line's blue wing (where the line's strength, not the forest, sets the misfit), and the Lyman-beta
  forest and Lyman limit below, where two forests overlap and the quasar's own Lyman break lies.
- ``RESID_PEAK``: the most positive window sum anywhere (emission, spikes, flux steps).

Absorption windows span ``TROUGH_WINDOW_KMS`` (about 2,000, 3,000 and 10,000 km/s): a BAL trough
is at least 2,000 km/s wide (the balnicity criterion) and a damped system's core at
N_HI >= 2e20 cm^-2 about as wide, while single-pixel dips are mostly misfits of narrow line cores.
Emission windows add single pixels (``PEAK_WINDOW_KMS``), where spikes and cosmic rays live.
"""

from __future__ import annotations

import numpy as np

RESIDUAL_COLUMNS = ("RECON_RCHI2", "RESID_DIP", "RESID_PEAK", "FOREST_DIP")
TROUGH_WINDOW_KMS = (2_000.0, 3_000.0, 10_000.0)
PEAK_WINDOW_KMS = (0.0, 1_000.0, 3_000.0, 10_000.0)
LYA, LYB = 1215.67, 1025.72  # rest wavelengths, Angstrom
PROXIMITY_KMS = 3_000.0  # velocity blueward of Lyman-alpha where the DLA search window ends
C_KMS = 299_792.458


def window_widths(velocity_per_pixel: float, velocities: tuple[float, ...]) -> tuple[int, ...]:
    """Window widths in pixels for ``velocities`` (km/s) on a grid of ``velocity_per_pixel``."""
    return tuple(sorted({max(1, round(v / velocity_per_pixel)) for v in velocities}))


def dla_search_pixels(wave: np.ndarray) -> np.ndarray:
    """(npix,) bool: rest-frame pixel centres ``wave`` (A) in the damped Lyman-alpha search
    window, from Lyman-beta to ``PROXIMITY_KMS`` blueward of Lyman-alpha."""
    wave = np.asarray(wave)
    return (wave > LYB) & (wave < LYA * (1.0 - PROXIMITY_KMS / C_KMS))


def _strongest(signal: np.ndarray, good: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """(n,) largest normalised window sum of ``signal`` (n, npix) over its ``good`` pixels: the
    window sum divided by the square root of its good pixels, counting windows with at least half
    their pixels good (0 where there is none)."""
    signal = np.where(good, signal, 0.0).astype(np.float64)
    n, npix = signal.shape
    csum = np.zeros((n, npix + 1))
    np.cumsum(signal, axis=1, out=csum[:, 1:])
    cgood = np.zeros((n, npix + 1))
    np.cumsum(good, axis=1, out=cgood[:, 1:])
    best = np.zeros(n)
    for w in widths:
        if w > npix:
            continue
        total = csum[:, w:] - csum[:, :-w]
        count = cgood[:, w:] - cgood[:, :-w]
        z = np.where(count >= max(1, w / 2), total / np.sqrt(np.maximum(count, 1)), 0.0)
        np.maximum(best, z.max(axis=1), out=best)
    return best


def strongest_dip(pull: np.ndarray, good: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """(n,) strongest absorption: the largest window deficit of the normalised residuals ``pull``
    (n, npix) over the ``good`` pixels, for window ``widths`` in pixels."""
    return _strongest(-pull, good, widths)


def strongest_peak(pull: np.ndarray, good: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """(n,) strongest emission: the largest window excess, as ``strongest_dip``."""
    return _strongest(pull, good, widths)
