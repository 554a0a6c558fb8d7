"""Per-spectrum quality statistics and the drop reasons of the preprocessing step."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .normalise import masked_median

#: Every drop reason, in the order they are tested: a spectrum gets the first one it fails.
NO_REDSHIFT = "no_redshift"  # Z missing, not finite or negative
Z_OUT_OF_GRID = "z_out_of_grid"  # rest-frame range of the spectrum not inside the grid
BAD_ZWARN = "bad_zwarn"  # ZWARN != 0 (only when the column is present and the check is on)
HIGH_MASKED_FRACTION = "high_masked_fraction"  # too many unusable observed pixels
LOW_SNR = "low_snr"  # median per-pixel S/N below the threshold (or undefined)
TOO_FEW_GOOD_PIXELS = "too_few_good_pixels"  # too few rest-frame pixels with data
BAD_NORM = "bad_norm"  # normalisation not positive or not finite
DROP_REASONS: tuple[str, ...] = (
    NO_REDSHIFT,
    Z_OUT_OF_GRID,
    BAD_ZWARN,
    HIGH_MASKED_FRACTION,
    LOW_SNR,
    TOO_FEW_GOOD_PIXELS,
    BAD_NORM,
)


@dataclass
class PixelQuality:
    """Per-pixel flags of observed spectra and the per-spectrum fractions derived from them."""

    good: np.ndarray  # (n, npix) bool: no mask bit, ivar > 0 and finite, flux finite
    masked_frac: np.ndarray  # (n,) fraction of pixels with a mask bit set
    zero_ivar_frac: np.ndarray  # (n,) fraction with ivar <= 0 or non-finite
    bad_frac: np.ndarray  # (n,) fraction of pixels that are not good

    @classmethod
    def of(cls, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> PixelQuality:
        npix = max(flux.shape[1], 1)
        with np.errstate(invalid="ignore"):
            good = (ivar > 0) & (ivar < np.inf)
        zero_ivar_frac = 1.0 - np.count_nonzero(good, axis=1) / npix
        unmasked = mask == 0
        masked_frac = 1.0 - np.count_nonzero(unmasked, axis=1) / npix
        good &= unmasked
        good &= np.isfinite(flux)
        bad_frac = 1.0 - np.count_nonzero(good, axis=1) / npix
        return cls(good, masked_frac, zero_ivar_frac, bad_frac)


def median_snr(flux: np.ndarray, ivar: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Median of ``flux * sqrt(ivar)`` over good pixels (NaN for a spectrum without any)."""
    with np.errstate(invalid="ignore"):
        snr = np.sqrt(ivar)
        snr *= flux
    return masked_median(snr, good)


def first_failure(checks: list[tuple[str, np.ndarray]], n: int) -> np.ndarray:
    """Object array of the first reason whose ``failed`` mask is True per spectrum ('' if none)."""
    reason = np.full(n, "", dtype=object)
    for name, failed in checks:
        reason[(reason == "") & np.asarray(failed, dtype=bool)] = name
    return reason
