"""In-memory containers for the spectra of one partition."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass
class ObservedSpectra:
    """Spectra of one partition on a single merged observed-frame wavelength grid.

    ``flux`` is in 1e-17 erg/s/cm^2/A and ``ivar`` its inverse variance; ``ivar == 0`` marks pixels
    with no usable data. ``mask`` is the OR of the DESI arm mask bits (nonzero = bad pixel).
    ``meta`` has one row per spectrum in the same order, with at least TARGETID and Z.
    """

    wave: np.ndarray  # (npix,) float64, Angstrom
    flux: np.ndarray  # (nspec, npix) float32
    ivar: np.ndarray  # (nspec, npix) float32
    mask: np.ndarray  # (nspec, npix) uint32
    meta: pd.DataFrame
    sources: dict[str, str] = field(default_factory=dict)  # role -> path of each file read
    resolution: dict[str, np.ndarray] | None = None  # arm -> (nspec, ndiag, npix_arm), if read

    def __post_init__(self) -> None:
        n, npix = len(self.meta), len(self.wave)
        for name in ("flux", "ivar", "mask"):
            arr = getattr(self, name)
            if arr.shape != (n, npix):
                raise ValueError(f"{name} has shape {arr.shape}, expected {(n, npix)}")

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def targetid(self) -> np.ndarray:
        return self.meta["TARGETID"].to_numpy()

    @property
    def z(self) -> np.ndarray:
        return self.meta["Z"].to_numpy(dtype=np.float64)
