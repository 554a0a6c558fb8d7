"""Anomaly types: UMAP + HDBSCAN on the latents of significant anomalies, clusters named by rules.

UMAP is fitted on the anomalies together with a reference sample of normal spectra (so the
embedding places anomalies relative to the normal population): ``n_components`` dimensions for
clustering and 2 for plots, sharing one nearest-neighbour graph. HDBSCAN clusters the
anomalies' embedding (label -1: noise). Each cluster is described by its coverage-aware mean
rest-frame residual (mean over the members covering each pixel, with the counts) and feature
statistics.

Naming rules (thresholds are the module constants). Residual signatures are amplitudes in residual
units with a significance (amplitude / its noise, the noise estimated from pixel-to-pixel scatter):

- TROUGH: absorption blueward of Si IV, C IV, Al III or Mg II (outflow 3000-20000 km/s) relative to
  the line centre and red side, the deepest covered ion;
- WEAK: deficit at the broad-line centres (+-1500 km/s) relative to a baseline interpolated between
  the line's continuum windows, averaged over covered lines;
- FEII: excess in 2250-2650 A and/or 4450-4700 A over a baseline between windows outside the Fe II
  blends;
- SLOPE: red-minus-blue change of a power law (in ln wavelength) through the line-free continuum
  windows, across the covered windows (red excess / blue deficit is positive);
- artefact (observed frame, per spectrum): a step across an arm seam (5760-5800, 7520-7620 A),
  excess residual power at the night-sky lines, or single-pixel spikes (narrower than any spectral
  feature).

A cluster (or a noise point, as a cluster of one) is named, first rule that applies:

1. 'artefact/systematic' when at least ARTEFACT_FRACTION of its members carry an observed-frame
   artefact signature (a feature at a fixed observed wavelength across members of different
   redshifts, i.e. independent of z);
2. 'BAL-like' when at least BAL_FRACTION of its members have BAL_FLAG;
3. among the residual signatures with significance >= MIN_SIGNIFICANCE and a positive amplitude,
   the largest amplitude (SLOPE weighted by SLOPE_WEIGHT, being an end-to-end change) names it:
   TROUGH 'BAL-like', WEAK 'weak-line', FEII 'FeII-rich', SLOPE 'reddened';
4. features alone: median ALPHA_CONT redder than the population median by >= ALPHA_RED_OFFSET,
   'reddened'; median broad-line EW <= WEAK_EW_RATIO x the population median, 'weak-line';
5. otherwise 'unknown'.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.ndimage import median_filter

from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.io.instrument import ARM_GRIDS
from desi_anomaly.preprocess.features import BROAD_LINES, CONTINUUM_WINDOWS
from desi_anomaly.preprocess.grid import C_KMS
from desi_anomaly.preprocess.skylines import SKY_LINES_VACUUM

TYPE_BAL = "BAL-like"
TYPE_REDDENED = "reddened"
TYPE_WEAK_LINE = "weak-line"
TYPE_FEII = "FeII-rich"
TYPE_ARTEFACT = "artefact/systematic"
TYPE_UNKNOWN = "unknown"
TYPE_NAMES: tuple[str, ...] = (
    TYPE_BAL, TYPE_REDDENED, TYPE_WEAK_LINE, TYPE_FEII, TYPE_ARTEFACT, TYPE_UNKNOWN,
)  # fmt: skip

MIN_SIGNIFICANCE = 5.0
SLOPE_WEIGHT = 0.5
WEAK_CONTRAST = 5.0
ARTEFACT_FRACTION = 0.5
BAL_FRACTION = 0.5
ALPHA_RED_OFFSET = 1.0
WEAK_EW_RATIO = 0.5
#: Observed-frame artefact thresholds: seam step and spike significance, sky-line power ratio.
SEAM_SIGNIFICANCE = 5.0
SPIKE_SIGMA = 10.0
SKY_POWER_RATIO = 4.0
MIN_SKY_PIXELS = 5

#: Residual signature -> (type, weight of its amplitude in the comparison).
_SIGNATURE_TYPES: dict[str, tuple[str, float]] = {
    "TROUGH": (TYPE_BAL, 1.0),
    "WEAK": (TYPE_WEAK_LINE, 1.0),
    "FEII": (TYPE_FEII, 1.0),
    "SLOPE": (TYPE_REDDENED, SLOPE_WEIGHT),
}
#: BAL ions (rest Angstrom) and the outflow velocities (km/s) of their troughs.
BAL_IONS: dict[str, float] = {"SIIV": 1397.6, "CIV": 1549.06, "ALIII": 1857.4, "MGII": 2798.75}
TROUGH_VELOCITY = (3000.0, 20000.0)
LINE_CORE_KMS = 1500.0
#: Fe II bands and the windows either side of each that set its baseline (rest Angstrom).
FEII_BANDS: tuple[tuple[tuple[float, float], tuple[float, float], tuple[float, float]], ...] = (
    ((2250.0, 2650.0), (2050.0, 2130.0), (3180.0, 3260.0)),
    ((4450.0, 4700.0), (4000.0, 4060.0), (5700.0, 5800.0)),
)
#: Arm seams (observed Angstrom) and the width of the bands either side measuring the step.
SEAMS: tuple[tuple[float, float], ...] = (
    (ARM_GRIDS["R"][0], ARM_GRIDS["B"][1]),
    (ARM_GRIDS["Z"][0], ARM_GRIDS["R"][1]),
)
SEAM_BAND = 150.0
#: Control steps (observed Angstrom) away from the seams: a rest-frame feature hits them as often.
CONTROL_STEPS: tuple[tuple[float, float], ...] = (
    (4900.0, 4940.0),
    (6650.0, 6750.0),
    (8600.0, 8700.0),
)
SEAM_GAP = 5.0
SKY_HALF_WIDTH = 3.0
HIGH_PASS_PIXELS = 9
_CHUNK = 1024


class AnomalyTypesError(DesiAnomalyError, ValueError):
    """Inputs to ``find_anomaly_types`` that do not fit together."""


@dataclass
class AnomalyTypes:
    """Clusters and types of the anomalies.

    ``assignments``: one row per anomaly (input order): CLUSTER (-1 noise), TYPE, UMAP_X, UMAP_Y.
    ``clusters``: one row per cluster (CLUSTER >= 0): TYPE, N, feature medians, BAL_FRACTION,
    Z/SNR ranges, ARTEFACT_FRACTION and the residual signatures (``*_AMP``, ``*_SIG``).
    ``mean_residual`` (n_clusters, npix): coverage-aware mean residual (NaN where no member covers
    the pixel), ``residual_count`` the members covering each pixel; rows follow ``clusters``.
    ``embedding`` (n_anomalies, n_components) and ``reference_2d`` (n_reference, 2): UMAP
    coordinates (NaN when there were too few anomalies to embed).
    """

    assignments: pd.DataFrame
    clusters: pd.DataFrame
    mean_residual: np.ndarray
    residual_count: np.ndarray
    wave: np.ndarray
    embedding: np.ndarray
    reference_2d: np.ndarray


# ------------------------------------------------------------------------------ residual signatures
class _Bands:
    """Coverage-aware band means of rows of (mean residual, count) on one wavelength grid."""

    def __init__(self, mean: np.ndarray, count: np.ndarray, wave: np.ndarray):
        cov = count > 0
        self.wave = wave
        m = np.where(cov, mean, 0.0)
        zero = np.zeros((len(m), 1))
        self.csum = np.hstack([zero, np.cumsum(m, axis=1)])
        self.ccov = np.hstack([zero, np.cumsum(cov, axis=1)])
        self.cinv = np.hstack([zero, np.cumsum(np.where(cov, 1.0 / np.maximum(count, 1), 0.0), 1)])
        self.sigma = _pixel_sigma(m, count)

    def band(self, lo: np.ndarray | float, hi: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Mean and its error over wavelengths [lo, hi) per row (NaN below half coverage)."""
        rows = np.arange(len(self.csum))
        i0 = np.broadcast_to(np.searchsorted(self.wave, lo), rows.shape)
        i1 = np.broadcast_to(np.searchsorted(self.wave, hi), rows.shape)
        ncov = self.ccov[rows, i1] - self.ccov[rows, i0]
        ok = (i1 > i0) & (ncov >= 0.5 * (i1 - i0)) & (ncov > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(ok, (self.csum[rows, i1] - self.csum[rows, i0]) / ncov, np.nan)
            err = self.sigma * np.sqrt(self.cinv[rows, i1] - self.cinv[rows, i0]) / ncov
        return mean, np.where(ok, err, np.nan)

    def baseline(
        self, left: tuple[float, float], right: tuple[float, float], at: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Linear (in ln wavelength) interpolation between two window means, evaluated at ``at``."""
        (ml, el), (mr, er) = self.band(*left), self.band(*right)
        xl, xr = np.log(np.sqrt(left[0] * left[1])), np.log(np.sqrt(right[0] * right[1]))
        t = (np.log(at) - xl) / (xr - xl)
        return (1 - t) * ml + t * mr, np.hypot((1 - t) * el, t * er)


def _pixel_sigma(mean: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per-row noise of one member: MAD of adjacent-pixel differences of mean * sqrt(count)."""
    x = mean * np.sqrt(count)
    pair = (count[:, 1:] > 0) & (count[:, :-1] > 0)
    d = np.where(pair, np.abs(np.diff(x, axis=1)), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        sigma = 1.4826 * np.nanmedian(d, axis=1) / np.sqrt(2.0)
    return np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.inf)


def _combine(amps, errs, how: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the largest covered amplitude (``max``) with its error, or the median of the
    covered ones (``median``) with the error of their mean."""
    a, e = np.array(amps), np.array(errs)
    ok = np.isfinite(a) & np.isfinite(e)
    has = ok.any(axis=0)
    if how == "max":
        k = np.argmax(np.where(ok, a, -np.inf), axis=0)
        rows = np.arange(a.shape[1])
        return np.where(has, a[k, rows], np.nan), np.where(has, e[k, rows], np.nan)
    n = np.maximum(ok.sum(axis=0), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # rows without a covered line
        amp = np.nanmedian(np.where(ok, a, np.nan), axis=0)
    err = np.sqrt(np.where(ok, e**2, 0.0).sum(axis=0)) / n
    return np.where(has, amp, np.nan), np.where(has, err, np.nan)


def _slope(bands: _Bands) -> tuple[np.ndarray, np.ndarray]:
    """End-to-end change of a weighted ln-wavelength line through the continuum windows."""
    stats = [bands.band(lo, hi) for lo, hi in CONTINUUM_WINDOWS]
    y = np.array([s[0] for s in stats])
    e = np.array([s[1] for s in stats])
    x = np.log([np.sqrt(lo * hi) for lo, hi in CONTINUUM_WINDOWS])[:, None]
    ok = np.isfinite(y) & np.isfinite(e) & (e > 0)
    w = np.where(ok, 1.0 / np.where(ok, e, 1.0) ** 2, 0.0)
    y = np.where(ok, y, 0.0)
    xs = np.where(ok, x, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        span = np.nanmax(xs, axis=0, initial=-np.inf) - np.nanmin(xs, axis=0, initial=np.inf)
        sw, sx, sy = w.sum(0), (w * x).sum(0), (w * y).sum(0)
        sxx, sxy = (w * x * x).sum(0), (w * x * y).sum(0)
        det = sw * sxx - sx * sx
        good = (span >= np.log(1.2)) & (det > 0)
        slope = (sw * sxy - sx * sy) / det
        err = np.sqrt(sw / det)
    return np.where(good, slope * span, np.nan), np.where(good, err * span, np.nan)


def residual_signatures(mean: np.ndarray, count: np.ndarray, wave: np.ndarray) -> pd.DataFrame:
    """TROUGH, WEAK, FEII and SLOPE amplitudes (``*_AMP``) and significances (``*_SIG``) per row.

    ``mean`` (n, npix): rest-frame residuals or coverage-aware mean residuals, ``count`` (n, npix)
    the spectra covering each pixel (0: not covered), ``wave`` (npix,) rest wavelengths.
    """
    out = []
    for start in range(0, len(mean), _CHUNK):
        sl = slice(start, start + _CHUNK)
        out.append(_signatures(_Bands(mean[sl], count[sl], wave)))
    columns = [f"{k}_{s}" for k in _SIGNATURE_TYPES for s in ("AMP", "SIG")] + ["WEAK_BASE"]
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=columns, dtype=float)


def _signatures(b: _Bands) -> pd.DataFrame:
    amps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    trough, core = TROUGH_VELOCITY, LINE_CORE_KMS / C_KMS
    t = []
    for rest in BAL_IONS.values():
        m_t, e_t = b.band(rest * (1 - trough[1] / C_KMS), rest * (1 - trough[0] / C_KMS))
        m_r, e_r = b.band(rest * (1 - core), rest * (1 + 4 * core))
        t.append((m_r - m_t, np.hypot(e_t, e_r)))
    amps["TROUGH"] = _combine(*zip(*t, strict=True), how="max")
    w = []
    for line in BROAD_LINES:
        m_c, e_c = b.band(line.wave * (1 - core), line.wave * (1 + core))
        base, e_b = b.baseline(*line.continuum, line.wave)
        w.append((base - m_c, np.hypot(e_c, e_b), np.abs(base)))
    deficit, err, level = zip(*w, strict=True)
    amps["WEAK"] = _combine(deficit, err, how="median")
    weak_base = _combine(level, err, how="median")[0]
    f = []
    for band, left, right in FEII_BANDS:
        m_f, e_f = b.band(*band)
        base, e_b = b.baseline(left, right, np.sqrt(band[0] * band[1]))
        f.append((m_f - base, np.hypot(e_f, e_b)))
    amps["FEII"] = _combine(*zip(*f, strict=True), how="max")
    amps["SLOPE"] = _slope(b)
    cols = {}
    for name, (amp, err) in amps.items():
        cols[f"{name}_AMP"] = amp
        with np.errstate(invalid="ignore", divide="ignore"):
            cols[f"{name}_SIG"] = amp / err
    cols["WEAK_BASE"] = weak_base
    return pd.DataFrame(cols)


def artefact_flags(
    residuals: np.ndarray, coverage: np.ndarray, wave: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Observed-frame artefact flags of each spectrum: (seam step, sky lines or spikes; control).

    The control flag is the step test at CONTROL_STEPS: features fixed in the rest frame fall on
    the seams and on the control wavelengths alike, instrumental ones only on the seams.
    """
    flags = np.zeros((2, len(residuals)), dtype=bool)
    for start in range(0, len(residuals), _CHUNK):
        sl = slice(start, start + _CHUNK)
        flags[:, sl] = _artefacts(residuals[sl], coverage[sl], wave, np.asarray(z[sl], float))
    return flags[0], flags[1]


def _step(b: _Bands, left: float, right: float, one_plus_z: np.ndarray) -> tuple[np.ndarray, ...]:
    """Difference (and its error) of SEAM_BAND-wide bands ending at observed ``left`` and starting
    at observed ``right``."""
    m_l, e_l = b.band((left - SEAM_BAND) / one_plus_z, left / one_plus_z)
    m_r, e_r = b.band(right / one_plus_z, (right + SEAM_BAND) / one_plus_z)
    return m_r - m_l, np.hypot(e_l, e_r)


def _sharp_step(b: _Bands, lo: float, hi: float, one_plus_z: np.ndarray) -> np.ndarray:
    """Whether the residual steps across observed [lo, hi]: significant, and at least twice the
    difference of adjacent bands on either side (a gradient or a broad feature is not a step)."""
    left, right = lo - SEAM_GAP, hi + SEAM_GAP
    step, err = _step(b, left, right, one_plus_z)
    side = np.fmax(
        np.abs(_step(b, left - SEAM_BAND, left - SEAM_BAND, one_plus_z)[0]),
        np.abs(_step(b, right + SEAM_BAND, right + SEAM_BAND, one_plus_z)[0]),
    )
    with np.errstate(invalid="ignore"):
        return (np.abs(step) >= SEAM_SIGNIFICANCE * err) & (np.abs(step) >= 2.0 * side)


def _artefacts(r: np.ndarray, cov: np.ndarray, wave: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(2, n) flags: observed-frame artefact, control step (see ``artefact_flags``)."""
    count = cov.astype(np.int64)
    b = _Bands(r, count, wave)
    one_plus_z = 1.0 + z
    flag, control = np.zeros(len(r), dtype=bool), np.zeros(len(r), dtype=bool)
    for lo, hi in SEAMS:
        flag |= _sharp_step(b, lo, hi, one_plus_z)
    for lo, hi in CONTROL_STEPS:
        control |= _sharp_step(b, lo, hi, one_plus_z)

    # narrow features only: residual minus its running median
    x = np.where(cov, r, 0.0)
    x = np.where(cov, x - median_filter(x, size=(1, HIGH_PASS_PIXELS), mode="nearest"), 0.0)
    pad = np.pad(x, ((0, 0), (2, 2)))
    neighbours = np.maximum(np.abs(pad[:, 1:-3]), np.abs(pad[:, 3:-1]))
    spike = cov & (np.abs(x) >= SPIKE_SIGMA * b.sigma[:, None]) & (neighbours <= 0.1 * np.abs(x))
    flag |= spike.any(axis=1)

    sky = np.searchsorted(wave, SKY_LINES_VACUUM[None, :] / one_plus_z[:, None])
    dloglam = float(np.median(np.diff(np.log(wave))))
    half = int(np.ceil(SKY_HALF_WIDTH / SKY_LINES_VACUUM[0] / dloglam))
    near = np.zeros_like(cov)
    for k in range(-half, half + 1):
        np.put_along_axis(near, np.clip(sky + k, 0, len(wave) - 1), True, axis=1)
    near &= cov
    n_sky, n_rest = near.sum(1), (cov & ~near).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p_sky = np.where(near, x**2, 0.0).sum(1) / n_sky
        p_rest = np.where(cov & ~near, x**2, 0.0).sum(1) / n_rest
        flag |= (n_sky >= MIN_SKY_PIXELS) & (p_sky >= SKY_POWER_RATIO * p_rest)
    return np.array([flag, control])


# ------------------------------------------------------------------------------------------ naming
def _feature_summary(features: pd.DataFrame) -> dict[str, float]:
    """Medians of the feature columns present; BAL fraction; Z and SNR_MEDIAN ranges; size."""
    out: dict[str, float] = {"N": float(len(features))}
    for col in features.columns:
        if col.startswith(("EW_", "FWHM_")) or col in ("ALPHA_CONT", "BI_CIV"):
            vals = features[col].to_numpy(np.float64)
            out[f"MEDIAN_{col}"] = float(np.nanmedian(vals)) if np.isfinite(vals).any() else np.nan
    if "BAL_FLAG" in features:
        out["BAL_FRACTION"] = float(features["BAL_FLAG"].fillna(False).astype(bool).mean())
    for col in ("Z", "SNR_MEDIAN"):
        if col in features and len(features):
            out[f"{col}_MIN"] = float(features[col].min())
            out[f"{col}_MAX"] = float(features[col].max())
    return out


def name_type(
    signatures: pd.Series,
    summary: dict[str, float],
    population: dict[str, float],
    *,
    single: bool = False,
) -> str:
    """The type of a cluster (or, ``single``, one spectrum) by the rules of the module docstring.

    ``signatures``: a row of ``residual_signatures``; ``summary`` and ``population``: feature
    summaries (``MEDIAN_*``, BAL_FRACTION) of the cluster and the population, with the cluster's
    ARTEFACT_FRACTION.
    """
    artefact = summary.get("ARTEFACT_FRACTION", 0.0) >= ARTEFACT_FRACTION
    if artefact and not single:
        return TYPE_ARTEFACT
    best, best_amp = None, 0.0
    for key, (name, weight) in _SIGNATURE_TYPES.items():
        amp, sig = signatures.get(f"{key}_AMP", np.nan), signatures.get(f"{key}_SIG", np.nan)
        if key == "WEAK" and not amp >= WEAK_CONTRAST * signatures.get("WEAK_BASE", np.nan):
            continue
        if sig >= MIN_SIGNIFICANCE and amp * weight > best_amp:
            best, best_amp = name, amp * weight
    if best is not None:
        return best
    if artefact:
        return TYPE_ARTEFACT
    if summary.get("BAL_FRACTION", 0.0) >= BAL_FRACTION:
        return TYPE_BAL
    alpha = summary.get("MEDIAN_ALPHA_CONT", np.nan)
    if alpha - population.get("MEDIAN_ALPHA_CONT", np.nan) >= ALPHA_RED_OFFSET:
        return TYPE_REDDENED
    ratios = [
        value / population[key]
        for key, value in summary.items()
        if key.startswith("MEDIAN_EW_") and np.isfinite(value) and population.get(key, 0.0) > 0
    ]
    if ratios and np.median(ratios) <= WEAK_EW_RATIO:
        return TYPE_WEAK_LINE
    return TYPE_UNKNOWN


# ---------------------------------------------------------------------------------- embed, cluster
def _embed(
    latents: np.ndarray, n_components: int, n_neighbors: int, seed: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """UMAP to ``n_components`` (clustering, min_dist 0) and to 2 dims, one shared kNN graph."""
    import umap
    from umap.umap_ import nearest_neighbors

    n_neighbors = min(n_neighbors, len(latents) - 1)
    rng = np.random.RandomState(seed) if seed is not None else None
    knn = nearest_neighbors(latents, n_neighbors, "euclidean", {}, False, rng)
    common = {"n_neighbors": n_neighbors, "random_state": seed, "precomputed_knn": knn}
    cluster = umap.UMAP(n_components=n_components, min_dist=0.0, **common).fit_transform(latents)
    plot = umap.UMAP(n_components=2, min_dist=0.1, **common).fit_transform(latents)
    return cluster.astype(np.float32), plot.astype(np.float32)


def _check_inputs(latents_anom, latents_ref, residuals, coverage, features, wave) -> None:
    n = len(latents_anom)
    if latents_anom.ndim != 2 or latents_ref.ndim != 2:
        raise AnomalyTypesError("latents must be 2-D (n, dim)")
    if len(latents_ref) and latents_ref.shape[1] != latents_anom.shape[1]:
        raise AnomalyTypesError(
            f"anomaly latents have {latents_anom.shape[1]} dims, reference {latents_ref.shape[1]}"
        )
    if residuals.shape != (n, len(wave)) or coverage.shape != residuals.shape:
        raise AnomalyTypesError(
            f"residuals/coverage must be ({n}, {len(wave)}), got {residuals.shape}, "
            f"{coverage.shape}"
        )
    if len(features) != n:
        raise AnomalyTypesError(f"features have {len(features)} rows for {n} anomalies")
    if "Z" not in features:
        raise AnomalyTypesError("features need a Z column (observed-frame artefact test)")


def find_anomaly_types(
    latents_anom: np.ndarray,
    latents_ref: np.ndarray,
    residuals_anom: np.ndarray,
    features_anom: pd.DataFrame,
    grid_wave: np.ndarray,
    *,
    coverage: np.ndarray | None = None,
    features_ref: pd.DataFrame | None = None,
    n_components: int = 10,
    n_neighbors: int = 15,
    min_cluster_size: int = 20,
    min_samples: int | None = None,
    seed: int | None = 0,
) -> AnomalyTypes:
    """Cluster the significant anomalies in a UMAP embedding and name the clusters.

    ``latents_*`` (n, dim): latents of the anomalies and of a reference sample of normal spectra;
    ``residuals_anom`` (n, npix): rest-frame residuals on ``grid_wave`` (e.g. (flux - model) *
    sqrt(ivar)); ``coverage`` (n, npix) bool, default: finite and non-zero residuals;
    ``features_anom``: one row per anomaly with Z and the feature columns (EW_*, FWHM_*,
    ALPHA_CONT, BI_CIV, BAL_FLAG, SNR_MEDIAN; those present are used); ``features_ref``: the
    population the feature rules compare with (default: the anomalies). With fewer anomalies than
    ``min_cluster_size`` nothing is embedded: all are noise (-1), typed one by one. ``seed`` makes
    UMAP reproducible (and single-threaded); None lets it run in parallel.
    """
    latents_anom = np.asarray(latents_anom, dtype=np.float32)
    latents_ref = np.asarray(latents_ref, dtype=np.float32).reshape(-1, latents_anom.shape[-1])
    wave = np.asarray(grid_wave, dtype=np.float64)
    residuals = np.asarray(residuals_anom, dtype=np.float32).reshape(-1, len(wave))
    if coverage is None:
        coverage = np.isfinite(residuals) & (residuals != 0)
    coverage = np.asarray(coverage, dtype=bool)
    _check_inputs(latents_anom, latents_ref, residuals, coverage, features_anom, wave)
    residuals = np.where(coverage, residuals, 0.0).astype(np.float32)
    features = features_anom.reset_index(drop=True)
    n = len(latents_anom)

    embedding = np.full((n, n_components), np.nan, dtype=np.float32)
    plot = np.full((n + len(latents_ref), 2), np.nan, dtype=np.float32)
    labels = np.full(n, -1, dtype=np.int64)
    if n >= max(min_cluster_size, 2):
        import hdbscan

        both = np.vstack([latents_anom, latents_ref])
        emb, plot = _embed(both, n_components, n_neighbors, seed)
        embedding = emb[:n]
        labels = hdbscan.HDBSCAN(
            min_cluster_size=min_cluster_size, min_samples=min_samples
        ).fit_predict(embedding)

    population = _feature_summary(features if features_ref is None else features_ref)
    artefact, control = artefact_flags(residuals, coverage, wave, features["Z"].to_numpy(float))
    excess = artefact.astype(float) - control
    types = np.full(n, TYPE_UNKNOWN, dtype=object)

    ids = np.unique(labels[labels >= 0])
    means = np.full((len(ids), len(wave)), np.nan, dtype=np.float32)
    counts = np.zeros((len(ids), len(wave)), dtype=np.int64)
    rows = []
    for j, cid in enumerate(ids):
        members = labels == cid
        counts[j] = coverage[members].sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[j] = residuals[members].sum(axis=0, dtype=np.float64) / counts[j]
        rows.append({"CLUSTER": int(cid), **_feature_summary(features[members])})
        rows[-1]["ARTEFACT_FRACTION"] = float(excess[members].mean())
    clusters = _empty_clusters()
    if rows:
        sig = residual_signatures(np.nan_to_num(means), counts, wave)
        clusters = pd.concat([pd.DataFrame(rows), sig], axis=1)
        clusters.insert(
            1, "TYPE", [name_type(sig.iloc[j], r, population) for j, r in enumerate(rows)]
        )
        types[labels >= 0] = clusters.set_index("CLUSTER").loc[labels[labels >= 0], "TYPE"]

    noise = np.flatnonzero(labels < 0)
    single = residual_signatures(residuals[noise], coverage[noise].astype(np.int64), wave)
    for k, summary in enumerate(_single_summaries(features.iloc[noise], excess[noise])):
        types[noise[k]] = name_type(single.iloc[k], summary, population, single=True)

    assignments = pd.DataFrame(
        {"CLUSTER": labels, "TYPE": types.astype(str), "UMAP_X": plot[:n, 0], "UMAP_Y": plot[:n, 1]}
    )
    return AnomalyTypes(assignments, clusters, means, counts, wave, embedding, plot[n:])


def _single_summaries(features: pd.DataFrame, artefact: np.ndarray) -> list[dict[str, float]]:
    """``_feature_summary`` of each spectrum on its own (medians are its values), vectorised."""
    cols = {}
    for col in features.columns:
        if col.startswith(("EW_", "FWHM_")) or col in ("ALPHA_CONT", "BI_CIV"):
            cols[f"MEDIAN_{col}"] = features[col].to_numpy(np.float64)
    if "BAL_FLAG" in features:
        cols["BAL_FRACTION"] = features["BAL_FLAG"].fillna(False).to_numpy(bool).astype(float)
    cols["ARTEFACT_FRACTION"] = artefact
    return pd.DataFrame(cols).to_dict("records")


def _empty_clusters() -> pd.DataFrame:
    return pd.DataFrame({"CLUSTER": pd.Series(dtype=np.int64), "TYPE": pd.Series(dtype=str)})
