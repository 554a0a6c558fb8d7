"""Why a spectrum is anomalous: normalised residuals and the wavelength regions that drive its chi2.

Residual ``r = (flux - model) * sqrt(ivar)`` on the rest-frame grid, 0 where there is no data; the
same values sit at observed wavelengths ``rest * (1 + z)``. Driving regions: pixels where the
boxcar-smoothed residual significance ``sum(r) / sqrt(n_good)`` over ``window`` pixels exceeds
``threshold``, or a single pixel exceeds ``pixel_threshold``, grouped by sign into contiguous runs
(gaps of up to ``max_gap`` pixels closed) and trimmed to their outermost pixels with
``|r| > EDGE_THRESHOLD`` of the run's sign, ranked by summed chi2 ``sum(r^2)``. Each region is named
after an instrumental feature when it touches one and is narrow (arm seam, sky line), else the
nearest broad/narrow QSO line within ``MAX_LINE_KMS`` (core, blue or red side), an iron complex, or
``continuum``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from desi_anomaly.preprocess.grid import C_KMS
from desi_anomaly.preprocess.skylines import SKY_LINES_VACUUM

from .build import FEATURE_COLUMNS

#: QSO emission lines (vacuum rest wavelengths, Angstrom).
REST_LINES: tuple[tuple[str, float], ...] = (
    ("Lyb 1026", 1025.72),
    ("Lya 1216", 1215.67),
    ("NV 1240", 1240.14),
    ("SiIV 1397", 1396.76),
    ("CIV 1549", 1549.06),
    ("HeII 1640", 1640.42),
    ("CIII] 1909", 1908.73),
    ("MgII 2799", 2798.75),
    ("[NeV] 3426", 3426.84),
    ("[OII] 3728", 3728.48),
    ("Hdelta 4103", 4102.89),
    ("Hgamma 4342", 4341.68),
    ("Hbeta 4863", 4862.68),
    ("[OIII] 5008", 5008.24),
    ("HeI 5877", 5877.25),
    ("Halpha 6565", 6564.61),
)
#: Iron emission complexes (rest Angstrom).
REST_BANDS: tuple[tuple[str, float, float], ...] = (
    ("FeII UV 2250-2650", 2250.0, 2650.0),
    ("FeII opt 4435-4685", 4435.0, 4685.0),
)
#: DESI arm overlaps (observed Angstrom), where flux calibration jumps show up.
ARM_SEAMS: tuple[tuple[float, float], ...] = ((5760.0, 5800.0), (7520.0, 7620.0))
#: A region ends at its outermost pixels whose residual has its sign and exceeds this.
EDGE_THRESHOLD = 2.0
#: A region touching an arm seam is named after it when it ends within this margin (Angstrom).
SEAM_MARGIN = 100.0
#: A region farther than this from every line is ``continuum``.
MAX_LINE_KMS = 10_000.0
#: Regions narrower than this (observed Angstrom) within SKY_TOLERANCE of a sky line are sky.
SKY_MAX_WIDTH = 20.0
SKY_TOLERANCE = 3.0


@dataclass(frozen=True)
class DrivingRegion:
    """A contiguous wavelength window of large residuals of one sign."""

    rest_lo: float
    rest_hi: float
    obs_lo: float
    obs_hi: float
    sign: str  # "absorption" (flux below the model) or "excess"
    chi2: float
    chi2_fraction: float  # of the spectrum's total chi2
    n_pix: int
    feature: str


@dataclass
class Explanation:
    """Residuals, driving regions and line features of one spectrum (arrays on the rest grid)."""

    targetid: int
    z: float
    rest_wave: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    model: np.ndarray
    residual: np.ndarray
    regions: list[DrivingRegion]
    features: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # catalog row: PARTITION, Q_VALUE, TYPE...

    @property
    def obs_wave(self) -> np.ndarray:
        return self.rest_wave * (1.0 + self.z)

    @property
    def good(self) -> np.ndarray:
        return self.ivar > 0

    @property
    def chi2(self) -> float:
        return float(np.sum(self.residual**2))

    @property
    def rchi2(self) -> float:
        n = int(np.count_nonzero(self.good))
        return self.chi2 / n if n else float("nan")

    def regions_frame(self) -> pd.DataFrame:
        """One row per driving region, with TARGETID and REGION_RANK (1 = largest chi2)."""
        df = pd.DataFrame([asdict(r) for r in self.regions], columns=_REGION_FIELDS)
        df.insert(0, "REGION_RANK", np.arange(1, len(df) + 1))
        df.insert(0, "TARGETID", self.targetid)
        return df.rename(columns=str.upper)


_REGION_FIELDS = list(DrivingRegion.__dataclass_fields__)


def boxcar(values: np.ndarray, good: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Sums of ``values`` and counts of good pixels in a centred window of ``width`` pixels."""
    kernel = np.ones(width)
    total = np.convolve(np.where(good, values, 0.0), kernel, mode="same")
    return total, np.convolve(good.astype(np.float64), kernel, mode="same")


def _runs(mask: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """[start, stop) of the True runs of ``mask``, merging runs separated by <= max_gap pixels."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    runs: list[tuple[int, int]] = []
    for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        if runs and start - runs[-1][1] <= max_gap:
            runs[-1] = (runs[-1][0], int(stop))
        else:
            runs.append((int(start), int(stop)))
    return runs


def _velocity_gap(lo: float, hi: float, wave_lo: float, wave_hi: float) -> float:
    """Velocity separation (km/s) of [lo, hi] from [wave_lo, wave_hi]; 0 when they overlap."""
    if hi < wave_lo:
        return C_KMS * np.log(wave_lo / hi)
    if lo > wave_hi:
        return C_KMS * np.log(lo / wave_hi)
    return 0.0


def name_region(rest_lo: float, rest_hi: float, z: float) -> str:
    """Name of the feature a region touches: arm seam, sky line, QSO line (side) or continuum."""
    obs_lo, obs_hi = rest_lo * (1.0 + z), rest_hi * (1.0 + z)
    for lo, hi in ARM_SEAMS:
        if (
            obs_lo <= hi
            and obs_hi >= lo
            and obs_lo >= lo - SEAM_MARGIN
            and obs_hi <= hi + SEAM_MARGIN
        ):
            return f"arm seam {lo:.0f}-{hi:.0f} A obs"
    if obs_hi - obs_lo <= SKY_MAX_WIDTH:
        near = SKY_LINES_VACUUM[
            (SKY_LINES_VACUUM >= obs_lo - SKY_TOLERANCE)
            & (SKY_LINES_VACUUM <= obs_hi + SKY_TOLERANCE)
        ]
        if len(near):
            return f"sky line {near[0]:.0f} A obs"
    gaps = [_velocity_gap(rest_lo, rest_hi, w, w) for _, w in REST_LINES]
    best = int(np.argmin(gaps))
    if gaps[best] <= MAX_LINE_KMS:
        name, wave = REST_LINES[best]
        side = (
            "core" if rest_lo <= wave <= rest_hi else "blue side" if rest_hi < wave else "red side"
        )
        return f"{name} ({side})"
    for name, lo, hi in REST_BANDS:
        if rest_lo <= hi and rest_hi >= lo:
            return name
    return "continuum"


def driving_regions(
    rest_wave: np.ndarray,
    residual: np.ndarray,
    good: np.ndarray,
    z: float,
    *,
    window: int = 9,
    threshold: float = 4.0,
    pixel_threshold: float = 6.0,
    max_gap: int = 3,
    max_regions: int = 5,
) -> list[DrivingRegion]:
    """The ``max_regions`` regions of largest summed chi2 (rule in the module docstring)."""
    total, count = boxcar(residual, good, window)
    with np.errstate(invalid="ignore", divide="ignore"):
        sig = np.where(count > 0, total / np.sqrt(count), 0.0)
    chi2_total = float(np.sum(residual[good] ** 2)) or 1.0
    edges = np.concatenate([rest_wave[:1], np.sqrt(rest_wave[1:] * rest_wave[:-1]), rest_wave[-1:]])
    regions = []
    for sign, s in (("excess", 1.0), ("absorption", -1.0)):
        mark = good & ((s * sig > threshold) | (s * residual > pixel_threshold))
        for run_start, run_stop in _runs(mark, max_gap):
            # trim the spread of the smoothing: the region ends at its outermost strong pixels
            strong = run_start + np.flatnonzero(s * residual[run_start:run_stop] > EDGE_THRESHOLD)
            start, stop = (strong[0], strong[-1] + 1) if len(strong) else (run_start, run_stop)
            sl = slice(start, stop)
            rest_lo, rest_hi = float(edges[start]), float(edges[stop])
            chi2 = float(np.sum(residual[sl][good[sl]] ** 2))
            regions.append(
                DrivingRegion(
                    rest_lo=rest_lo,
                    rest_hi=rest_hi,
                    obs_lo=rest_lo * (1.0 + z),
                    obs_hi=rest_hi * (1.0 + z),
                    sign=sign,
                    chi2=chi2,
                    chi2_fraction=chi2 / chi2_total,
                    n_pix=int(np.count_nonzero(good[sl])),
                    feature=name_region(rest_lo, rest_hi, z),
                )
            )
    return sorted(regions, key=lambda r: -r.chi2)[:max_regions]


def explain(
    row: Mapping[str, Any],
    rest_wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    model: np.ndarray,
    *,
    coverage: np.ndarray | None = None,
    **region_options: Any,
) -> Explanation:
    """Explain one spectrum; ``row`` is its catalog row (TARGETID, Z, features, type, q...).

    ``flux``, ``ivar``, ``model`` (and the optional bool ``coverage``) are (npix,) on ``rest_wave``.
    Pixels with ivar <= 0, non-finite values or outside the coverage count as no data.
    ``region_options`` go to ``driving_regions``.
    """
    flux, ivar, model = (np.asarray(a, dtype=np.float64) for a in (flux, ivar, model))
    good = (ivar > 0) & np.isfinite(flux) & np.isfinite(ivar) & np.isfinite(model)
    if coverage is not None:
        good &= np.asarray(coverage, dtype=bool)
    ivar = np.where(good, ivar, 0.0)
    residual = np.where(good, (np.where(good, flux, 0.0) - model) * np.sqrt(ivar), 0.0)
    z = float(row["Z"])
    rest_wave = np.asarray(rest_wave, dtype=np.float64)
    info = dict(row)
    return Explanation(
        targetid=int(row["TARGETID"]),
        z=z,
        rest_wave=rest_wave,
        flux=np.where(good, flux, np.nan),
        ivar=ivar,
        model=model,
        residual=residual,
        regions=driving_regions(rest_wave, residual, good, z, **region_options),
        features={c: info.pop(c) for c in FEATURE_COLUMNS if c in info},
        info=info,
    )


def explain_catalog(
    catalog: pd.DataFrame,
    targetid: np.ndarray,
    rest_wave: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    model: np.ndarray,
    **options: Any,
) -> list[Explanation]:
    """Explanations, in catalog order, of the catalogued spectra among the (n, npix) arrays."""
    index = {int(t): i for i, t in enumerate(targetid)}
    return [
        explain(row, rest_wave, flux[i], ivar[i], model[i], **options)
        for row in catalog.to_dict("records")
        if (i := index.get(int(row["TARGETID"]))) is not None
    ]


def regions_table(explanations: list[Explanation]) -> pd.DataFrame:
    """Driving regions of several spectra in one table (see ``Explanation.regions_frame``)."""
    frames = [e.regions_frame() for e in explanations if e.regions]
    if not frames:
        return pd.DataFrame(columns=["TARGETID", "REGION_RANK", *map(str.upper, _REGION_FIELDS)])
    return pd.concat(frames, ignore_index=True)
