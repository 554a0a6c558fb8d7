"""Local residual statistics: the most significant absorption and emission feature a reconstruction
misses.

A global reduced chi2 dilutes a localised feature (a BAL trough, a damped Lyman-alpha system, a
spike) over thousands of pixels. The scan statistic here is the matched filter for a box-shaped
feature: for every window of ``w`` consecutive pixels the summed normalised residual
``sum((flux - model) sqrt(ivar)) / sqrt(n_good)`` (standard normal for a correct model and noise),
maximised over positions and over widths of about 1,000, 3,000 and 10,000 km/s plus single pixels.
``RESID_DIP`` is the most negative window sum (sign flipped: absorption) outside the
Lyman-alpha forest, ``FOREST_DIP`` the same inside it (damped Lyman-alpha and Lyman-limit systems:
the forest's own fluctuations make its null distribution different from that of the red side, so
the two are scored separately), ``RESID_PEAK`` the most positive one anywhere (emission, spikes,
flux steps).
"""

from __future__ import annotations

import numpy as np

RESIDUAL_COLUMNS = ("RECON_RCHI2", "RESID_DIP", "RESID_PEAK", "FOREST_DIP")
WINDOW_KMS = (0.0, 1_000.0, 3_000.0, 10_000.0)


def window_widths(velocity_per_pixel: float) -> tuple[int, ...]:
    """Window widths in pixels for ``WINDOW_KMS`` on a grid of ``velocity_per_pixel`` km/s."""
    return tuple(sorted({max(1, round(v / velocity_per_pixel)) for v in WINDOW_KMS}))


def local_extremes(
    pull: np.ndarray, good: np.ndarray, widths: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """(dip, peak) per row of ``pull`` (n, npix), the normalised residuals (0 where not ``good``).

    Windows need at least half their pixels good; rows without any such window get 0.
    """
    pull = np.where(good, pull, 0.0).astype(np.float64)
    n, npix = pull.shape
    csum = np.zeros((n, npix + 1))
    np.cumsum(pull, axis=1, out=csum[:, 1:])
    cgood = np.zeros((n, npix + 1))
    np.cumsum(good, axis=1, out=cgood[:, 1:])
    dip, peak = np.zeros(n), np.zeros(n)
    for w in widths:
        if w > npix:
            continue
        total = csum[:, w:] - csum[:, :-w]
        count = cgood[:, w:] - cgood[:, :-w]
        z = np.where(count >= max(1, w / 2), total / np.sqrt(np.maximum(count, 1)), 0.0)
        dip = np.maximum(dip, -z.min(axis=1))
        peak = np.maximum(peak, z.max(axis=1))
    return dip, peak
