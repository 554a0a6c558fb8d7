"""Measure how realistic mock quasars are against real DESI EDR and SDSS DR16 quasar spectra.

Fits of the redrock real-quasar eigenspectra (plus a low-order polynomial) give reduced chi2 and the
fraction of flux variance explained; simple continuum-slope and CIV/MgII EW measurements compare
the spectral shapes. Each real spectrum gets mock twins at the same redshift and median S/N.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import fitsio
import numpy as np
import pandas as pd

from desi_anomaly.io.instrument import ARMS

from .igm import forest_transmission
from .observe import add_noise, masked_median_rows, merge_arms, split_arms
from .quasar import draw_qso_params, qso_components
from .sky import merged_wavelength

#: Line-free continuum windows (rest A) and EW windows: (line window, blue cont, red cont).
SLOPE_WINDOWS = ((1440, 1480), (1690, 1710), (2160, 2230), (3020, 3100), (4200, 4230), (5080, 5120))
EW_WINDOWS = {"CIV": ((1500, 1600), (1440, 1480), (1690, 1710)),
              "MgII": ((2700, 2900), (2650, 2680), (2950, 3000))}  # fmt: skip


@dataclass
class Spectrum:
    """One quasar spectrum on its observed grid."""

    source: str
    wave: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray  # 0 where unusable
    z: float

    @property
    def snr(self) -> float:
        good = self.ivar > 0
        return float(np.median(self.flux[good] * np.sqrt(self.ivar[good]))) if good.any() else 0.0


def load_template(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Rest wavelengths and basis vectors (nbasis, npix) of a redrock template file."""
    with fitsio.FITS(str(path)) as fits:
        hdr = fits[0].read_header()
        basis = fits[0].read().astype(np.float64)
    wave = 10 ** (hdr["CRVAL1"] + hdr["CDELT1"] * np.arange(basis.shape[1]))
    return wave, basis


def fit_template(
    spec: Spectrum, templates: dict[str, tuple[np.ndarray, np.ndarray]], npoly: int = 3
) -> tuple[float, float]:
    """Reduced chi2 and fraction of flux variance explained of an ivar-weighted linear fit of
    the HIZ (z > 1.3) or LOZ eigenspectra plus a Legendre polynomial of order ``npoly``."""
    twave, basis = templates["HIZ" if spec.z > 1.3 else "LOZ"]
    rest = spec.wave / (1 + spec.z)
    use = (spec.ivar > 0) & (rest > twave[0]) & (rest < twave[-1]) & np.isfinite(spec.flux)
    if use.sum() < 100:
        return np.nan, np.nan
    design = [np.interp(rest[use], twave, b) for b in basis]
    x = np.linspace(-1, 1, use.sum())
    design += [np.polynomial.legendre.Legendre.basis(k)(x) for k in range(npoly + 1)]
    a = np.asarray(design).T
    sw = np.sqrt(spec.ivar[use])
    coef, *_ = np.linalg.lstsq(a * sw[:, None], spec.flux[use] * sw, rcond=None)
    resid = spec.flux[use] - a @ coef
    chi2 = float(np.sum(resid**2 * spec.ivar[use]))
    dof = use.sum() - a.shape[1]
    mean = np.average(spec.flux[use], weights=spec.ivar[use])
    total = float(np.sum((spec.flux[use] - mean) ** 2 * spec.ivar[use]))
    return chi2 / dof, 1.0 - chi2 / total if total > 0 else np.nan


def continuum_slope(spec: Spectrum) -> float:
    """alpha_nu of a power law through the medians of the covered line-free windows."""
    rest = spec.wave / (1 + spec.z)
    xs, ys = [], []
    for lo, hi in SLOPE_WINDOWS:
        sel = (rest >= lo) & (rest <= hi) & (spec.ivar > 0)
        if sel.sum() >= 10:
            med = np.median(spec.flux[sel])
            if med > 0:
                xs.append(np.log((lo + hi) / 2))
                ys.append(np.log(med))
    if len(xs) < 2 or xs[-1] - xs[0] < 0.3:
        return np.nan
    alpha_lambda = np.polyfit(xs, ys, 1)[0]
    return float(-alpha_lambda - 2.0)


def line_ew(spec: Spectrum, line: str) -> float:
    """Rest EW (A) of a broad line over a linear continuum between two side windows."""
    (lo, hi), blue, red = EW_WINDOWS[line]
    rest = spec.wave / (1 + spec.z)
    good = spec.ivar > 0
    pts = []
    for a, b in (blue, red):
        sel = good & (rest >= a) & (rest <= b)
        if sel.sum() < 10:
            return np.nan
        pts.append(((a + b) / 2, np.median(spec.flux[sel])))
    (x0, y0), (x1, y1) = pts
    if y0 <= 0 or y1 <= 0:
        return np.nan
    sel = good & (rest >= lo) & (rest <= hi)
    if sel.sum() < 0.8 * (hi - lo) / np.median(np.diff(rest)):
        return np.nan
    cont = y0 + (y1 - y0) * (rest[sel] - x0) / (x1 - x0)
    return float(np.trapezoid(spec.flux[sel] / cont - 1.0, rest[sel]))


def read_sdss(shared: str | Path) -> list[Spectrum]:
    """SDSS DR16 QSO spectra (CLASS == 'QSO'), good pixels where AND_MASK == 0."""
    out = []
    for path in sorted(glob.glob(str(Path(shared) / "sdss-dr16" / "*" / "spec-*.fits"))):
        with fitsio.FITS(path) as fits:
            coadd = fits[1].read(columns=["FLUX", "LOGLAM", "IVAR", "AND_MASK"])
            meta = fits[2].read(columns=["CLASS", "Z"])
        if str(meta["CLASS"][0]).strip() != "QSO" or meta["Z"][0] < 0.1:
            continue
        ivar = np.where(coadd["AND_MASK"] == 0, coadd["IVAR"], 0.0).astype(np.float64)
        wave = 10 ** coadd["LOGLAM"].astype(np.float64)
        flux = coadd["FLUX"].astype(np.float64)
        out.append(Spectrum("sdss", wave, flux, ivar, float(meta["Z"][0])))
    return out


def read_desi_edr(shared: str | Path) -> list[Spectrum]:
    """DESI EDR QSO coadds (tile and healpix), redshifts from the QSO catalogues by TARGETID."""
    edr = Path(shared) / "desi-edr"
    redshift = {}
    for cat in sorted(edr.glob("QSO_cat_*.fits.gz")):
        tab = fitsio.read(str(cat), columns=["TARGETID", "Z"])
        redshift.update(zip(tab["TARGETID"].tolist(), tab["Z"].tolist(), strict=True))
    out = []
    files = sorted(edr.glob("tile/cumulative/coadd-*.fits")) + sorted(
        edr.glob("*/dark/*/*/coadd-*.fits")
    )
    for path in files:
        with fitsio.FITS(str(path)) as fits:
            tid = fits["FIBERMAP"].read(columns=["TARGETID"])["TARGETID"]
            arms = [{a: fits[f"{a}_{x}"].read() for a in ARMS} for x in ("FLUX", "IVAR", "MASK")]
            waves = {a: fits[f"{a}_WAVELENGTH"].read() for a in ARMS}
        if not all(np.allclose(waves[a], merged_wavelength()[_slice(a)]) for a in ARMS):
            continue
        flux, ivar, mask = merge_arms(*arms)
        for i, t in enumerate(tid):
            if int(t) in redshift:
                iv = np.where(mask[i] == 0, ivar[i], 0.0).astype(np.float64)
                out.append(Spectrum("desi", merged_wavelength(), flux[i].astype(np.float64), iv,
                                    float(redshift[int(t)])))  # fmt: skip
    return out


def _slice(arm: str) -> slice:
    from .sky import arm_slices

    return arm_slices()[arm]


def mock_twins(real: list[Spectrum], per_real: int, rng: np.random.Generator) -> list[Spectrum]:
    """Mock DESI quasars (no anomalies) at the redshift and median S/N of each real spectrum."""
    z = np.repeat([s.z for s in real], per_real)
    snr = np.repeat([max(s.snr, 0.1) for s in real], per_real)
    wave = merged_wavelength()
    p = draw_qso_params(z, rng)
    model = qso_components(wave[None, :] / (1 + z[:, None]), p).flux
    model *= forest_transmission(wave, z, rng)[0]
    model /= np.median(model, axis=1, keepdims=True)
    n = len(z)
    masks = {
        a: np.zeros((n, m.shape[1]), np.uint32)
        for a, m in split_arms(model[:1], np.ones(1)).items()
    }
    obs = add_noise(split_arms(model, np.ones(n)), snr, np.ones(n), masks, rng)
    flux, ivar, _ = merge_arms(obs.flux, obs.ivar, obs.mask)
    return [Spectrum("mock", wave, flux[i].astype(np.float64), ivar[i].astype(np.float64), z[i])
            for i in range(n)]  # fmt: skip


def measure(spectra: list[Spectrum], templates) -> pd.DataFrame:
    """Per-spectrum z, S/N, template reduced chi2 / variance explained, slope and line EWs."""
    rows = []
    for s in spectra:
        chi2, explained = fit_template(s, templates)
        rows.append({"source": s.source, "z": s.z, "snr": s.snr, "chi2_red": chi2,
                     "var_explained": explained, "alpha_nu": continuum_slope(s),
                     "ew_civ": line_ew(s, "CIV"), "ew_mgii": line_ew(s, "MgII")})  # fmt: skip
    return pd.DataFrame(rows)


def compare(shared: str | Path, per_real: int = 3, seed: int = 0, max_sdss: int | None = None
            ) -> dict[str, pd.DataFrame]:  # fmt: skip
    """Measure real DESI EDR and SDSS quasars and their mock twins; returns per-spectrum tables."""
    shared = Path(shared)
    templates = {k: load_template(shared / "templates" / f"rrtemplate-QSO-{k}-v1.1.fits")
                 for k in ("HIZ", "LOZ")}  # fmt: skip
    rng = np.random.default_rng(seed)
    desi = read_desi_edr(shared)
    sdss = read_sdss(shared)[:max_sdss]
    return {
        "desi": measure(desi, templates),
        "mock_desi": measure(mock_twins(desi, per_real, rng), templates),
        "sdss": measure(sdss, templates),
        "mock_sdss": measure(mock_twins(sdss, per_real, rng), templates),
    }


def summary_table(tables: dict[str, pd.DataFrame], high_snr: float = 5.0) -> pd.DataFrame:
    """Medians (and 16-84 % ranges) of each measured quantity per sample."""
    rows = []
    for name, df in tables.items():
        hi = df[df["snr"] > high_snr]
        row = {
            "sample": name,
            "n": len(df),
            "median_snr": df["snr"].median(),
            "chi2_red_median": df["chi2_red"].median(),
            "chi2_red_p16": df["chi2_red"].quantile(0.16),
            "chi2_red_p84": df["chi2_red"].quantile(0.84),
            f"var_explained_median_snr>{high_snr:g}": hi["var_explained"].median(),
            f"n_snr>{high_snr:g}": len(hi),
        }
        for col in ("alpha_nu", "ew_civ", "ew_mgii"):
            vals = df[col].dropna()
            row[f"{col}_median"] = vals.median()
            row[f"{col}_p16"], row[f"{col}_p84"] = vals.quantile(0.16), vals.quantile(0.84)
            row[f"{col}_n"] = len(vals)
        rows.append(row)
    return pd.DataFrame(rows).set_index("sample")


__all__ = ["Spectrum", "compare", "fit_template", "masked_median_rows", "summary_table"]
