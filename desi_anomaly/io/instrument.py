"""Facts about the DESI spectrographs and their file conventions."""

from __future__ import annotations

import numpy as np

ARMS: tuple[str, ...] = ("B", "R", "Z")

#: Nominal coadd wavelength grids (Angstrom, vacuum): start, stop, step. Readers take the grid
#: from the file; these serve the mock generator and documentation.
ARM_GRIDS: dict[str, tuple[float, float, float]] = {
    "B": (3600.0, 5800.0, 0.8),
    "R": (5760.0, 7620.0, 0.8),
    "Z": (7520.0, 9824.0, 0.8),
}

FLUX_UNIT = "10**-17 erg/(s cm2 Angstrom)"
IVAR_UNIT = "10**+34 (s2 cm4 Angstrom2) / erg2"
WAVE_UNIT = "Angstrom"

#: Healpix scheme of DESI healpix coadds (nested, nside 64).
HPX_NSIDE = 64
N_HEALPIX = 12 * HPX_NSIDE**2


def arm_wavelength(arm: str) -> np.ndarray:
    """The nominal coadd wavelength grid of one arm."""
    start, stop, step = ARM_GRIDS[arm]
    n = round((stop - start) / step) + 1
    return start + step * np.arange(n, dtype=np.float64)
