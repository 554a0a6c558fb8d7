"""The preprocessing entry point: observed spectra in, cleaned rest-frame spectra out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import DesiAnomalyError
from ..spectra import ObservedSpectra
from . import quality
from .features import feature_columns
from .grid import RestFrameGrid
from .normalise import median_norm, normalise_in_place
from .resample import RestFrameSpectra, resample_to_rest
from .skylines import SKY_LINE_HALF_WIDTH, sky_line_mask

#: Design default: 4000 log-wavelength pixels covering the rest range of 0 <= z <= 7 (450-9824 A).
DEFAULT_GRID = RestFrameGrid.for_redshift_range(0.0, 7.0, npix=4000)


class PreprocessError(DesiAnomalyError, ValueError):
    """Input spectra that cannot be preprocessed at all (not a per-spectrum quality problem)."""


@dataclass(frozen=True)
class PreprocessConfig:
    """Settings of ``preprocess``; the defaults keep nearly all DR1-like QSO spectra.

    - ``max_masked_fraction``: maximum fraction of unusable observed pixels (mask bit set, ivar <= 0
      or non-finite; sky lines not counted).
    - ``min_snr``: minimum SNR_MEDIAN (DR1 quantiles: 1% 0.31, 50% 2.3; 0.2 drops < 1%).
    - ``min_coverage_pixels``: minimum number of rest pixels with data (ivar > 0); a fully good
      spectrum has ~1300 on the default grid.
    - ``min_good_fraction``: a rest bin needs good input pixels over this fraction of its width.
    - ``drop_nonzero_zwarn``: drop ZWARN != 0 when meta has a ZWARN column.
    """

    grid: RestFrameGrid = DEFAULT_GRID
    mask_sky_lines: bool = True
    sky_line_half_width: float = SKY_LINE_HALF_WIDTH
    min_snr: float = 0.2
    max_masked_fraction: float = 0.5
    min_coverage_pixels: int = 200
    min_good_fraction: float = 0.5
    drop_nonzero_zwarn: bool = True
    compute_features: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON description (for provenance metadata)."""
        d = asdict(self)
        d["grid"] = self.grid.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Inverse of ``to_dict``."""
        d = dict(d)
        if "grid" in d:
            d["grid"] = RestFrameGrid.from_dict(d["grid"])
        return cls(**d)


@dataclass
class CleanedSpectra:
    """Normalised rest-frame spectra of the kept spectra and the reasons for the dropped ones.

    - ``flux``, ``ivar``: (n, npix) float32 on ``grid``, normalised; ivar 0 = no data (flux 0).
    - ``coverage``: (n, npix) bool, rest pixel entirely inside the observed wavelength range.
    - ``meta``: the kept input rows, in input order, plus
      NORM (rest-frame flux density median, 1e-17 erg/s/cm^2/A: flux * NORM is de-redshifted flux),
      SNR_MEDIAN (median flux * sqrt(ivar) over good observed pixels), MASKED_FRAC (observed pixels
      with a mask bit), ZERO_IVAR_FRAC (observed pixels with ivar <= 0 or non-finite),
      N_GOOD_PIXELS (rest pixels with data) and the ``features.feature_columns``.
    - ``dropped``: TARGETID, REASON (one of ``DROP_REASONS``), one row per dropped spectrum.
    """

    grid: RestFrameGrid
    flux: np.ndarray
    ivar: np.ndarray
    coverage: np.ndarray
    meta: pd.DataFrame
    dropped: pd.DataFrame = field(
        default_factory=lambda: pd.DataFrame({"TARGETID": np.array([], np.int64), "REASON": []})
    )

    def __len__(self) -> int:
        return len(self.meta)

    @property
    def targetid(self) -> np.ndarray:
        return self.meta["TARGETID"].to_numpy()

    def drop_counts(self) -> dict[str, int]:
        """Number of dropped spectra per reason, every reason of ``DROP_REASONS`` listed."""
        counts = self.dropped["REASON"].value_counts()
        return {r: int(counts.get(r, 0)) for r in quality.DROP_REASONS}


def _z_inside_grid(z: np.ndarray, wave: np.ndarray, grid: RestFrameGrid) -> np.ndarray:
    """True where the spectrum's rest-frame range wave/(1+z) lies inside the grid."""
    tol = 1e-9
    with np.errstate(invalid="ignore"):
        return (wave[0] / (1 + z) >= grid.wave_min * (1 - tol)) & (
            wave[-1] / (1 + z) <= grid.wave_max * (1 + tol)
        )


def preprocess(
    spectra: ObservedSpectra, config: PreprocessConfig = PreprocessConfig()
) -> CleanedSpectra:
    """Mask, de-redshift, resample, normalise, quality-cut and measure features of ``spectra``.

    Every input spectrum is either kept (a row of ``meta``) or dropped with the first reason it
    fails, in the order of ``quality.DROP_REASONS``.
    """
    meta = spectra.meta
    for col in ("TARGETID", "Z"):
        if col not in meta.columns:
            raise PreprocessError(f"spectra meta has no {col} column")
    wave = np.asarray(spectra.wave, dtype=np.float64)
    n = len(spectra)
    z = pd.to_numeric(meta["Z"], errors="coerce").to_numpy(dtype=np.float64)

    pixels = quality.PixelQuality.of(spectra.flux, spectra.ivar, spectra.mask)
    good = pixels.good
    stats = {"MASKED_FRAC": pixels.masked_frac, "ZERO_IVAR_FRAC": pixels.zero_ivar_frac}
    if config.mask_sky_lines:
        good &= ~sky_line_mask(wave, config.sky_line_half_width)[None, :]
    stats["SNR_MEDIAN"] = quality.median_snr(spectra.flux, spectra.ivar, good)

    with np.errstate(invalid="ignore"):
        no_z = ~(np.isfinite(z) & (z >= 0))
    zwarn = np.zeros(n, dtype=bool)
    if config.drop_nonzero_zwarn and "ZWARN" in meta.columns:
        zwarn = meta["ZWARN"].fillna(0).to_numpy() != 0
    reason = quality.first_failure(
        [
            (quality.NO_REDSHIFT, no_z),
            (quality.Z_OUT_OF_GRID, ~_z_inside_grid(z, wave, config.grid)),
            (quality.BAD_ZWARN, zwarn),
            (quality.HIGH_MASKED_FRACTION, pixels.bad_frac > config.max_masked_fraction),
            (quality.LOW_SNR, ~(stats["SNR_MEDIAN"] >= config.min_snr)),
        ],
        n,
    )

    # Resample only the survivors of the observed-frame checks.
    sel = np.flatnonzero(reason == "")
    rest = resample_to_rest(
        wave,
        spectra.flux,
        spectra.ivar,
        good,
        z,
        config.grid,
        min_good_fraction=config.min_good_fraction,
        rows=sel,
    )
    n_good = np.count_nonzero(rest.ivar > 0, axis=1)
    norm = median_norm(rest.flux, rest.ivar)
    reason[sel] = quality.first_failure(
        [
            (quality.TOO_FEW_GOOD_PIXELS, n_good < config.min_coverage_pixels),
            (quality.BAD_NORM, ~(np.isfinite(norm) & (norm > 0))),
        ],
        len(sel),
    )
    keep_in_sel = reason[sel] == ""
    kept = sel[keep_in_sel]
    if not keep_in_sel.all():
        rest = RestFrameSpectra(*(a[keep_in_sel] for a in (rest.flux, rest.ivar, rest.coverage)))
    flux, ivar = normalise_in_place(rest.flux, rest.ivar, norm[keep_in_sel])

    added = {
        "NORM": norm[keep_in_sel],
        **{name: values[kept] for name, values in stats.items()},
        "N_GOOD_PIXELS": n_good[keep_in_sel],
    }
    if config.compute_features:
        added.update(feature_columns(flux, ivar, config.grid))
    kept_meta = meta.iloc[kept].reset_index(drop=True).drop(columns=list(added), errors="ignore")
    out_meta = pd.concat([kept_meta, pd.DataFrame(added)], axis=1)

    dropped_rows = np.flatnonzero(reason != "")
    dropped = pd.DataFrame(
        {
            "TARGETID": meta["TARGETID"].to_numpy()[dropped_rows],
            "REASON": reason[dropped_rows].astype(str),
        }
    )
    return CleanedSpectra(config.grid, flux, ivar, rest.coverage, out_meta, dropped)
