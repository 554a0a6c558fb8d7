"""The common rest-frame wavelength grid, uniform in log-wavelength."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

#: Speed of light, km/s.
C_KMS = 299_792.458

#: FWHM of a Gaussian in units of its sigma.
FWHM_PER_SIGMA = 2.0 * float(np.sqrt(2.0 * np.log(2.0)))

#: Nominal merged DESI observed range (Angstrom), B-arm start to Z-arm end.
DESI_OBS_MIN = 3600.0
DESI_OBS_MAX = 9824.0


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True)
class RestFrameGrid:
    """``npix`` rest-frame pixels uniform in ln(wavelength) between the outer edges (Angstrom).

    Equal grids compare and hash equal; ``to_dict``/``from_dict`` round-trip through JSON metadata.
    """

    wave_min: float
    wave_max: float
    npix: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "wave_min", float(self.wave_min))
        object.__setattr__(self, "wave_max", float(self.wave_max))
        if int(self.npix) != self.npix or self.npix < 2:
            raise ValueError(f"npix must be an integer >= 2, got {self.npix!r}")
        object.__setattr__(self, "npix", int(self.npix))
        if not (0.0 < self.wave_min < self.wave_max and np.isfinite(self.wave_max)):
            raise ValueError(f"need 0 < wave_min < wave_max, got {self.wave_min}, {self.wave_max}")

    @classmethod
    def for_redshift_range(
        cls,
        zmin: float,
        zmax: float,
        obs_min: float = DESI_OBS_MIN,
        obs_max: float = DESI_OBS_MAX,
        npix: int = 4000,
    ) -> RestFrameGrid:
        """The grid spanning the rest range of every spectrum with ``zmin <= z <= zmax``."""
        if not (0.0 <= zmin < zmax):
            raise ValueError(f"need 0 <= zmin < zmax, got {zmin}, {zmax}")
        return cls(obs_min / (1.0 + zmax), obs_max / (1.0 + zmin), npix)

    @property
    def dloglam(self) -> float:
        """Pixel width in ln(wavelength)."""
        return float(np.log(self.wave_max / self.wave_min) / self.npix)

    @property
    def velocity_per_pixel(self) -> float:
        """Pixel width in km/s."""
        return C_KMS * self.dloglam

    @cached_property
    def edges(self) -> np.ndarray:
        """(npix + 1,) pixel edges, Angstrom."""
        loglam = np.linspace(np.log(self.wave_min), np.log(self.wave_max), self.npix + 1)
        edges = np.exp(loglam)
        edges[0], edges[-1] = self.wave_min, self.wave_max
        return _readonly(edges)

    @cached_property
    def centres(self) -> np.ndarray:
        """(npix,) pixel centres (geometric mean of the edges), Angstrom."""
        return _readonly(np.sqrt(self.edges[:-1] * self.edges[1:]))

    @cached_property
    def widths(self) -> np.ndarray:
        """(npix,) pixel widths, Angstrom."""
        return _readonly(np.diff(self.edges))

    def pixel_range(self, lo: float, hi: float) -> slice:
        """Slice of the pixels whose centres lie in ``[lo, hi)`` Angstrom."""
        c = self.centres
        return slice(int(np.searchsorted(c, lo, "left")), int(np.searchsorted(c, hi, "left")))

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON description, e.g. for shard metadata."""
        return {
            "kind": "loglam",
            "wave_min": self.wave_min,
            "wave_max": self.wave_max,
            "npix": self.npix,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RestFrameGrid:
        """Inverse of ``to_dict``."""
        kind = d.get("kind", "loglam")
        if kind != "loglam":
            raise ValueError(f"unknown rest-frame grid kind {kind!r}")
        return cls(float(d["wave_min"]), float(d["wave_max"]), int(d["npix"]))
