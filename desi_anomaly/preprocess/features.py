"""Spectral features of rest-frame spectra on a common grid, vectorised over spectra.

All features are scale-free (EW, FWHM, power-law index, balnicity), so they can be measured on
normalised spectra. Windows are fixed rest-frame wavelength ranges, i.e. fixed pixel columns of the
common grid; a feature is NaN where its windows are not covered by good pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter1d

from .grid import C_KMS, FWHM_PER_SIGMA, RestFrameGrid

Window = tuple[float, float]
#: A selection of spectra: an index array or a slice (a view, no copy).
Rows = np.ndarray | slice
ALL_ROWS = slice(None)

#: Line-free continuum windows (rest Angstrom) for the power-law index ALPHA_CONT.
CONTINUUM_WINDOWS: tuple[Window, ...] = (
    (1340.0, 1360.0),
    (1440.0, 1460.0),
    (1690.0, 1710.0),
    (2190.0, 2210.0),
    (2990.0, 3010.0),
    (4190.0, 4230.0),
    (5080.0, 5120.0),
)
#: Minimum wavelength ratio spanned by the windows of a power-law fit.
MIN_LEVER_ARM = 1.2
#: Minimum fraction of good pixels in a continuum window / a line or trough window.
MIN_CONT_GOOD = 0.5
MIN_LINE_GOOD = 0.8
#: Gaussian smoothing (pixels) of line profiles and normalised flux before FWHM and BI.
SMOOTH_SIGMA_PIX = 1.5


@dataclass(frozen=True)
class BroadLine:
    """A broad emission line: rest wavelength, integration window and two continuum windows."""

    name: str
    wave: float
    window: Window
    continuum: tuple[Window, Window]


#: Broad lines measured (vacuum rest wavelengths). The Lya window includes N V 1240.
BROAD_LINES: tuple[BroadLine, ...] = (
    BroadLine("LYA", 1215.67, (1170.0, 1270.0), ((1285.0, 1295.0), (1340.0, 1360.0))),
    BroadLine("CIV", 1549.06, (1500.0, 1600.0), ((1440.0, 1465.0), (1690.0, 1710.0))),
    BroadLine("CIII", 1908.73, (1850.0, 1970.0), ((1790.0, 1820.0), (2000.0, 2040.0))),
    BroadLine("MGII", 2798.75, (2700.0, 2900.0), ((2640.0, 2680.0), (2920.0, 2960.0))),
    BroadLine("HBETA", 4862.68, (4760.0, 4940.0), ((4420.0, 4460.0), (5080.0, 5120.0))),
)

#: Balnicity index of C IV (Weymann et al. 1991).
CIV_WAVE = 1549.06
BI_VMIN, BI_VMAX = 3000.0, 25000.0  # outflow velocity range, km/s
BI_MIN_WIDTH = 2000.0  # a trough counts only after this contiguous width, km/s
BI_DEPTH = 0.9
#: Continuum windows of the C IV trough fit (any >= 2 covered spanning MIN_LEVER_ARM).
BI_CONTINUUM_WINDOWS: tuple[Window, ...] = ((1275.0, 1295.0), (1690.0, 1710.0), (2190.0, 2210.0))


def _covered_rows(ivar: np.ndarray, sl: slice) -> np.ndarray | slice:
    """Rows with at least MIN_LINE_GOOD good pixels in ``sl`` (a full slice when all are)."""
    covered = np.count_nonzero(ivar[:, sl] > 0, axis=1) >= MIN_LINE_GOOD * (sl.stop - sl.start)
    return slice(None) if covered.all() else np.flatnonzero(covered)


def _window_pixels(grid: RestFrameGrid, window: Window) -> slice | None:
    """Grid pixels of a window, None when the window is not entirely inside the grid."""
    if window[0] < grid.wave_min or window[1] > grid.wave_max:
        return None
    sl = grid.pixel_range(*window)
    return sl if sl.stop > sl.start else None


def _smooth(values: np.ndarray, good: np.ndarray, sigma: float = SMOOTH_SIGMA_PIX) -> np.ndarray:
    """Gaussian smoothing along rows ignoring bad pixels (NaN where too little good data nearby)."""
    g = good.astype(np.float64)
    num = gaussian_filter1d(np.where(good, values, 0.0), sigma, axis=1, mode="nearest")
    den = gaussian_filter1d(g, sigma, axis=1, mode="nearest")
    return np.divide(num, den, out=np.full_like(num, np.nan), where=den > 0.25)


def window_means(
    flux: np.ndarray,
    ivar: np.ndarray,
    grid: RestFrameGrid,
    windows: tuple[Window, ...],
    rows: Rows = ALL_ROWS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean flux of each window, its ivar and the window's log-centre.

    Returns (n, nwin) means of the spectra ``rows`` (NaN below MIN_CONT_GOOD good pixels), their
    ivar, (nwin,) ln(wave). Only the window pixels of those rows are read.
    """
    n = len(range(flux.shape[0])[rows]) if isinstance(rows, slice) else len(rows)
    means = np.full((n, len(windows)), np.nan)
    wsum = np.zeros((n, len(windows)))
    loglam = np.log([np.sqrt(lo * hi) for lo, hi in windows])
    for j, window in enumerate(windows):
        sl = _window_pixels(grid, window)
        if sl is None:
            continue
        iv = ivar[rows, sl].astype(np.float64)
        s = iv.sum(axis=1)
        frac = np.count_nonzero(iv > 0, axis=1) / iv.shape[1]
        ok = (frac >= MIN_CONT_GOOD) & (s > 0)
        m = np.divide((iv * flux[rows, sl]).sum(axis=1), s, out=np.full(n, np.nan), where=ok)
        means[:, j], wsum[:, j] = m, np.where(ok, s, 0.0)
    return means, wsum, loglam


def fit_power_law(
    flux: np.ndarray,
    ivar: np.ndarray,
    grid: RestFrameGrid,
    windows: tuple[Window, ...],
    *,
    require_all: bool = False,
    min_lever_arm: float = MIN_LEVER_ARM,
    rows: Rows = ALL_ROWS,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Weighted least-squares power law ``f = A (lambda / lambda_ref)^alpha`` through window means.

    Windows with a positive mean are used (all of them with ``require_all``), at least two spanning
    a wavelength ratio >= ``min_lever_arm``. Returns (ln A, alpha, ln lambda_ref) of the spectra
    ``rows``, NaN if unfitted.
    """
    means, wsum, loglam = window_means(flux, ivar, grid, windows, rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = np.log(means)
    use = np.isfinite(y)
    w = np.where(use, wsum * np.where(use, means, 0.0) ** 2, 0.0)  # 1 / var(ln mean)
    x = loglam - loglam.mean()
    x_used = np.where(use, x, np.nan)
    with np.errstate(invalid="ignore"):
        span = np.nanmax(x_used, axis=1, initial=-np.inf) - np.nanmin(
            x_used, axis=1, initial=np.inf
        )
    ok = span >= np.log(min_lever_arm) - 1e-12
    if require_all:
        ok &= use.all(axis=1)
    y0 = np.where(use, y, 0.0)
    sw, sx, sy = w.sum(1), (w * x).sum(1), (w * y0).sum(1)
    sxx, sxy = (w * x * x).sum(1), (w * x * y0).sum(1)
    det = sw * sxx - sx * sx
    ok &= det > 0
    safe = np.where(ok, det, 1.0)
    alpha = np.where(ok, (sw * sxy - sx * sy) / safe, np.nan)
    ln_a = np.where(ok, (sxx * sy - sx * sxy) / safe, np.nan)
    return ln_a, alpha, float(loglam.mean())


def continuum_slope(flux: np.ndarray, ivar: np.ndarray, grid: RestFrameGrid) -> np.ndarray:
    """Power-law index alpha (f_lambda ~ lambda^alpha) fitted to the line-free windows."""
    return fit_power_law(flux, ivar, grid, CONTINUUM_WINDOWS)[1]


def _continuum(
    flux: np.ndarray,
    ivar: np.ndarray,
    grid: RestFrameGrid,
    windows: tuple[Window, ...],
    sl: slice,
    require_all: bool,
    rows: Rows,
) -> np.ndarray:
    """Power-law continuum of spectra ``rows`` through ``windows``, on the pixels ``sl``."""
    ln_a, alpha, ln_ref = fit_power_law(
        flux,
        ivar,
        grid,
        windows,
        require_all=require_all,
        min_lever_arm=1.0 if require_all else MIN_LEVER_ARM,
        rows=rows,
    )
    x = np.log(grid.centres[sl]) - ln_ref
    return np.exp(ln_a[:, None] + alpha[:, None] * x[None, :])


def _half_max_width(profile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Half-maximum crossings (fractional pixel positions) around the maximum of each row."""
    n, length = profile.shape
    rows = np.arange(n)
    filled = np.where(np.isfinite(profile), profile, -np.inf)
    kpk = filled.argmax(axis=1)
    peak = filled[rows, kpk]
    half = (0.5 * peak)[:, None]
    with np.errstate(invalid="ignore"):
        below = profile < half
    idx = np.arange(length)
    left = np.where(below & (idx < kpk[:, None]), idx, -1).max(axis=1)
    right = np.where(below & (idx > kpk[:, None]), idx, length).min(axis=1)
    ok = (peak > 0) & (left >= 0) & (right < length)
    lc, rc = np.clip(left, 0, length - 2), np.clip(right, 1, length - 1)
    h = half[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        x_left = lc + (h - profile[rows, lc]) / (profile[rows, lc + 1] - profile[rows, lc])
        x_right = rc - 1 + (profile[rows, rc - 1] - h) / (profile[rows, rc - 1] - profile[rows, rc])
    return np.where(ok, x_left, np.nan), np.where(ok, x_right, np.nan)


def _deconvolved_fwhm_kms(width_pix: np.ndarray, grid: RestFrameGrid) -> np.ndarray:
    """Pixel FWHM to km/s, removing the smoothing kernel in quadrature."""
    kernel = FWHM_PER_SIGMA * SMOOTH_SIGMA_PIX
    with np.errstate(invalid="ignore"):
        return np.sqrt(width_pix**2 - kernel**2) * grid.velocity_per_pixel


def line_measurements(
    flux: np.ndarray, ivar: np.ndarray, grid: RestFrameGrid, line: BroadLine
) -> tuple[np.ndarray, np.ndarray]:
    """Rest-frame EW (Angstrom) and FWHM (km/s) of one broad line; NaN where not covered.

    Continuum: power law through the two continuum windows. EW: integral of (f/c - 1) over the line
    window (good pixels, scaled to the full window). FWHM: half-maximum crossings of the lightly
    smoothed continuum-subtracted profile, smoothing removed in quadrature.
    """
    ew, fwhm = np.full(flux.shape[0], np.nan), np.full(flux.shape[0], np.nan)
    sl = _window_pixels(grid, line.window)
    if sl is None or any(_window_pixels(grid, w) is None for w in line.continuum):
        return ew, fwhm
    rows = _covered_rows(ivar, sl)
    ew[rows], fwhm[rows] = _line_measurements(flux, ivar, grid, line, sl, rows)
    return ew, fwhm


def _line_measurements(
    flux: np.ndarray, ivar: np.ndarray, grid: RestFrameGrid, line: BroadLine, sl: slice, rows: Rows
) -> tuple[np.ndarray, np.ndarray]:
    """``line_measurements`` of the spectra ``rows``, which cover the line window ``sl``."""
    pad = int(np.ceil(4 * SMOOTH_SIGMA_PIX))
    seg = slice(max(sl.start - pad, 0), min(sl.stop + pad, grid.npix))
    cont = _continuum(flux, ivar, grid, line.continuum, seg, require_all=True, rows=rows)
    f, good = flux[rows, seg], ivar[rows, seg] > 0
    core = slice(sl.start - seg.start, sl.stop - seg.start)

    width = grid.widths[sl]
    g_core = good[:, core]
    good_width = (g_core * width).sum(axis=1)
    ok = (good_width >= MIN_LINE_GOOD * width.sum()) & np.isfinite(cont[:, 0]) & (cont[:, 0] > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        excess = np.where(g_core, f[:, core] / cont[:, core] - 1.0, 0.0)
        ew = np.where(ok, (excess * width).sum(axis=1) * width.sum() / good_width, np.nan)
        profile = _smooth(f - cont, good & np.isfinite(cont))[:, core]
    x_left, x_right = _half_max_width(profile)
    fwhm = np.where(ok & (ew > 0), _deconvolved_fwhm_kms(x_right - x_left, grid), np.nan)
    return ew, fwhm


def balnicity_civ(flux: np.ndarray, ivar: np.ndarray, grid: RestFrameGrid) -> np.ndarray:
    """C IV balnicity index BI (km/s, Weymann et al. 1991); NaN where the trough region is missing.

    ``BI = int_{3000}^{25000} (1 - f(v)/0.9) C dv`` over outflow velocity v blueward of C IV, with f
    the lightly smoothed flux over a continuum (power law) + C IV emission (Gaussian at the systemic
    wavelength, matched to the line core and its red half) model, and C = 1 only once a trough
    (f < 0.9) has been contiguous for more than 2000 km/s, counting from low to high velocity.
    """
    bi = np.full(flux.shape[0], np.nan)
    lo, hi = CIV_WAVE * np.exp(-BI_VMAX / C_KMS), CIV_WAVE * np.exp(-BI_VMIN / C_KMS)
    trough = _window_pixels(grid, (lo, hi))
    red_end = CIV_WAVE * np.exp(15000.0 / C_KMS)
    emis = _window_pixels(grid, (CIV_WAVE * np.exp(-2000.0 / C_KMS), red_end))
    if trough is None or emis is None:
        return bi
    rows = _covered_rows(ivar, trough)
    bi[rows] = _balnicity(flux, ivar, grid, trough, emis, rows)
    return bi


def _balnicity(
    flux: np.ndarray,
    ivar: np.ndarray,
    grid: RestFrameGrid,
    trough: slice,
    emis: slice,
    rows: Rows,
) -> np.ndarray:
    """``balnicity_civ`` of the spectra ``rows``, which cover the trough pixels; C IV emission
    pixels ``emis``."""
    pad = int(np.ceil(4 * SMOOTH_SIGMA_PIX))
    seg = slice(max(trough.start - pad, 0), emis.stop)
    cont = _continuum(flux, ivar, grid, BI_CONTINUUM_WINDOWS, seg, require_all=False, rows=rows)
    good = (ivar[rows, seg] > 0) & np.isfinite(cont)
    f = flux[rows, seg]
    v = C_KMS * np.log(grid.centres[seg] / CIV_WAVE)

    # C IV emission: Gaussian at the systemic wavelength, amplitude = mean excess within 1000 km/s,
    # width from the half-maximum crossing of the (smoothed) red half of the line.
    excess = f - cont
    core = good & (np.abs(v) < 1000.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        amp = np.where(core, excess, 0.0).sum(axis=1) / np.count_nonzero(core, axis=1)
        red = np.where(v > 0, _smooth(excess, good), np.inf)
        below = red < 0.5 * amp[:, None]
    k_half = np.where(below, np.arange(len(v)), len(v)).min(axis=1)
    has_line = (amp > 0) & (k_half < len(v))
    sigma = v[np.minimum(k_half, len(v) - 1)] / np.sqrt(2 * np.log(2))
    sigma = np.where(has_line & (sigma > 0), sigma, 1.0)
    amp = np.where(has_line, amp, 0.0)
    model = cont + amp[:, None] * np.exp(-0.5 * (v[None, :] / sigma[:, None]) ** 2)

    with np.errstate(invalid="ignore", divide="ignore"):
        fnorm = _smooth(f / model, good & (model > 0))
    t = slice(trough.start - seg.start, trough.stop - seg.start)
    depth = (1.0 - fnorm[:, t] / BI_DEPTH)[:, ::-1]  # ordered by increasing outflow velocity
    in_trough = np.isfinite(depth) & (depth > 0)
    idx = np.arange(depth.shape[1])
    last_out = np.maximum.accumulate(np.where(in_trough, -1, idx), axis=1)
    dv = grid.velocity_per_pixel
    run_kms = (idx - last_out) * dv  # contiguous trough width up to the far edge of each pixel
    counted = np.clip(run_kms - BI_MIN_WIDTH, 0.0, dv)
    bi = np.where(in_trough, depth * counted, 0.0).sum(axis=1)
    covered = np.count_nonzero(good[:, t], axis=1) >= MIN_LINE_GOOD * depth.shape[1]
    return np.where(covered & np.isfinite(cont[:, 0]), bi, np.nan)


def feature_columns(
    flux: np.ndarray, ivar: np.ndarray, grid: RestFrameGrid
) -> dict[str, np.ndarray]:
    """All features of (n, npix) rest-frame spectra on ``grid``, as named (n,) columns.

    ALPHA_CONT, EW_{line} (A), FWHM_{line} (km/s) for each of BROAD_LINES, BI_CIV (km/s) as float32,
    and BAL_FLAG (BI_CIV > 0; False when BI_CIV is NaN, i.e. not measured).
    """
    cols = {"ALPHA_CONT": continuum_slope(flux, ivar, grid)}
    for line in BROAD_LINES:
        cols[f"EW_{line.name}"], cols[f"FWHM_{line.name}"] = line_measurements(
            flux, ivar, grid, line
        )
    cols["BI_CIV"] = balnicity_civ(flux, ivar, grid)
    out: dict[str, np.ndarray] = {k: v.astype(np.float32) for k, v in cols.items()}
    with np.errstate(invalid="ignore"):
        out["BAL_FLAG"] = cols["BI_CIV"] > 0
    return out


def measure_features(flux: np.ndarray, ivar: np.ndarray, grid: RestFrameGrid) -> pd.DataFrame:
    """``feature_columns`` as a DataFrame, one row per spectrum."""
    return pd.DataFrame(feature_columns(flux, ivar, grid))
