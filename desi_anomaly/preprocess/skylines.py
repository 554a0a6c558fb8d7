"""Strong night-sky emission lines to mask in the observed frame.

Wavelengths are tabulated in air (as in the sky atlases: Osterbrock et al. 1996, 1997) and converted
to vacuum, the frame of DESI spectra.
"""

from __future__ import annotations

import numpy as np

#: Atomic airglow lines (air, Angstrom): [OI] 5577, NaD doublet, [OI] 6300/6364.
ATOMIC_SKY_LINES_AIR: tuple[float, ...] = (5577.34, 5889.95, 5895.92, 6300.30, 6363.78)

#: The strongest OH Meinel-band lines in 6500-9800 A (air, Angstrom).
OH_SKY_LINES_AIR: tuple[float, ...] = (
    6533.04, 6553.62, 6577.28, 6863.96, 6912.62, 6923.22, 6939.52, 7276.41, 7316.28, 7340.89,
    7358.68, 7369.25, 7392.21, 7401.69, 7750.64, 7794.11, 7821.50, 7913.71, 7964.65, 7993.33,
    8344.60, 8399.17, 8430.17, 8465.21, 8504.63, 8827.10, 8885.85, 8919.53, 8943.40, 8958.25,
    8988.37, 9001.12, 9375.96, 9419.73, 9439.65, 9458.53, 9476.91, 9502.82, 9519.53, 9552.53,
    9567.59, 9719.84,
)  # fmt: skip

#: Default masking half-width (Angstrom), about the DESI line-spread FWHM in the R/Z arms.
SKY_LINE_HALF_WIDTH = 2.5


def air_to_vacuum(wave_air: np.ndarray | float) -> np.ndarray:
    """Air to vacuum wavelength (Angstrom): refractive index of Ciddor (1996), as used by VALD."""
    wave_air = np.asarray(wave_air, dtype=np.float64)
    s2 = (1e4 / wave_air) ** 2
    n = 1.0 + 8.336624212083e-5 + 2.408926869968e-2 / (130.1065924522 - s2)
    n += 1.599740894897e-4 / (38.92568793293 - s2)
    return wave_air * n


#: All masked sky lines, vacuum wavelengths (Angstrom), sorted.
SKY_LINES_VACUUM: np.ndarray = np.sort(air_to_vacuum(ATOMIC_SKY_LINES_AIR + OH_SKY_LINES_AIR))


def sky_line_mask(
    wave: np.ndarray,
    half_width: float = SKY_LINE_HALF_WIDTH,
    lines: np.ndarray = SKY_LINES_VACUUM,
) -> np.ndarray:
    """(npix,) bool: pixels of an increasing ``wave`` within ``half_width`` A of a sky line."""
    wave = np.asarray(wave, dtype=np.float64)
    lo = np.searchsorted(wave, np.asarray(lines) - half_width, side="left")
    hi = np.searchsorted(wave, np.asarray(lines) + half_width, side="right")
    # +1 at each interval start, -1 after its end; a positive running sum is inside an interval.
    marks = np.zeros(len(wave) + 1, dtype=np.int64)
    np.add.at(marks, lo, 1)
    np.add.at(marks, hi, -1)
    return np.cumsum(marks[:-1]) > 0
