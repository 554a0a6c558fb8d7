"""Rest-frame quasar model: broken power-law continuum, Balmer continuum, Fe II pseudo-continuum,
broad and narrow emission lines with log-normal scatter around the Vanden Berk et al. (2001)
composite.

Every function is vectorised over spectra: ``wave_rest`` is ``(n, npix)`` (one rest-frame grid per
spectrum, as an observed grid divided by ``1 + z``) and the parameters are length-``n`` arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np

from .profiles import add_gaussian

C_KMS = 299_792.458
FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


@dataclass(frozen=True)
class EmissionLine:
    """One emission line: vacuum rest wavelength (A), rest EW (A), FWHM (km/s), Baldwin slope."""

    name: str
    wave: float
    ew: float
    fwhm: float
    narrow: bool = False
    baldwin: float = 0.1  # EW ~ L^-baldwin


#: Composite-quasar emission lines (EWs and widths after Vanden Berk et al. 2001, rounded; the
#: CIV, SiIV, CIII], MgII and Hbeta EWs raised to the per-object medians of SDSS quasars measured
#: against a local continuum, e.g. Shen et al. 2011 -- see docs/mock_realism.md).
EMISSION_LINES: tuple[EmissionLine, ...] = (
    EmissionLine("LyB_OVI", 1031.0, 12.0, 5500.0),
    EmissionLine("LyA", 1215.67, 75.0, 4000.0, baldwin=0.12),
    EmissionLine("NV", 1240.14, 18.0, 3800.0, baldwin=0.05),
    EmissionLine("OI", 1304.35, 2.0, 2800.0),
    EmissionLine("CII", 1335.30, 0.9, 2800.0),
    EmissionLine("SiIV_OIV", 1399.8, 11.0, 5200.0, baldwin=0.12),
    EmissionLine("CIV", 1549.06, 42.0, 5000.0, baldwin=0.2),
    EmissionLine("HeII", 1640.42, 1.5, 4000.0, baldwin=0.15),
    EmissionLine("AlIII", 1857.40, 0.6, 4000.0),
    EmissionLine("CIII", 1908.73, 25.0, 5500.0, baldwin=0.1),
    EmissionLine("CII]", 2326.0, 1.9, 4500.0),
    EmissionLine("MgII", 2798.75, 45.0, 4500.0, baldwin=0.1),
    EmissionLine("[NeV]", 3426.84, 1.0, 600.0, narrow=True, baldwin=0.2),
    EmissionLine("[OII]", 3728.48, 1.6, 500.0, narrow=True, baldwin=0.2),
    EmissionLine("[NeIII]", 3869.85, 1.4, 700.0, narrow=True, baldwin=0.2),
    EmissionLine("Hdelta", 4102.89, 5.0, 3800.0),
    EmissionLine("Hgamma", 4341.68, 20.0, 3800.0),
    EmissionLine("HeII4687", 4687.02, 1.0, 3000.0),
    EmissionLine("Hbeta", 4862.68, 60.0, 4500.0, baldwin=0.05),
    EmissionLine("[OIII]4959", 4960.30, 3.6, 500.0, narrow=True, baldwin=0.2),
    EmissionLine("[OIII]5007", 5008.24, 13.0, 500.0, narrow=True, baldwin=0.2),
    EmissionLine("HeI", 5877.29, 6.0, 3500.0),
    EmissionLine("Halpha", 6564.61, 195.0, 3500.0, baldwin=0.05),
    EmissionLine("[NII]", 6585.27, 5.0, 500.0, narrow=True),
    EmissionLine("[SII]", 6725.0, 2.0, 500.0, narrow=True),
)
LINE_INDEX = {line.name: i for i, line in enumerate(EMISSION_LINES)}

#: Continuum break (A, rest) between the blue power law and the redder, host-dominated one.
CONTINUUM_BREAK = 5000.0
LOG_L_PIVOT = 45.5  # log10 L1350 (erg/s) at which the EWs above hold
FEII_UV_WINDOW = (2200.0, 3090.0)
FEII_OPTICAL_WINDOW = (4434.0, 4684.0)
FEII_UV_EW = 60.0  # rest EW (A) of the UV Fe II pseudo-continuum at unit amplitude
FEII_OPTICAL_EW = 40.0  # rest EW of the Fe II 4570 blend at unit amplitude


@dataclass
class QsoParams:
    """Per-spectrum parameters of the quasar model (all arrays of length n)."""

    z: np.ndarray
    alpha_nu: np.ndarray  # f_nu ~ nu^alpha_nu blueward of CONTINUUM_BREAK
    alpha_nu_red: np.ndarray  # redward of CONTINUUM_BREAK (host-galaxy light)
    log_l: np.ndarray  # log10 L1350, drives the Baldwin effect
    ew: np.ndarray  # (n, nlines) rest EWs (A)
    fwhm: np.ndarray  # (n, nlines) FWHM (km/s)
    shift: np.ndarray  # (n, nlines) velocity shift (km/s), negative = blueshift
    feii: np.ndarray  # Fe II amplitude (1 = FEII_UV_EW / FEII_OPTICAL_EW)
    balmer: np.ndarray  # Balmer-continuum flux at 3646 A relative to the power law

    def __len__(self) -> int:
        return len(self.z)

    def take(self, rows: np.ndarray) -> QsoParams:
        """The parameters of a subset of spectra."""
        return QsoParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


@dataclass
class QsoComponents:
    """Rest-frame model components, each (n, npix); the intrinsic flux is their sum."""

    continuum: np.ndarray
    lines: np.ndarray
    feii: np.ndarray

    @property
    def flux(self) -> np.ndarray:
        return self.continuum + self.lines + self.feii


def draw_qso_params(z: np.ndarray, rng: np.random.Generator) -> QsoParams:
    """Draw quasar parameters: slope, luminosity, line EWs/widths with log-normal scatter."""
    z = np.asarray(z, dtype=np.float64)
    n, nl = len(z), len(EMISSION_LINES)
    alpha = rng.normal(-0.5, 0.4, n)
    alpha_red = rng.normal(-2.0, 0.4, n)
    # brighter quasars at higher z in a flux-limited sample
    log_l = LOG_L_PIVOT + 0.9 * np.log10((1 + z) / 2.7) + rng.normal(0.0, 0.35, n)
    base_ew = np.array([line.ew for line in EMISSION_LINES])
    baldwin = np.array([line.baldwin for line in EMISSION_LINES])
    narrow = np.array([line.narrow for line in EMISSION_LINES])
    common = rng.normal(0.0, 0.3, (n, 1))  # quasars with strong lines have all lines strong
    own = rng.normal(0.0, 0.4, (n, nl))
    own[:, narrow] *= 2.0  # narrow lines scatter much more (0.1-10x)
    ew = base_ew * np.exp(common + own) * 10 ** (-baldwin * (log_l[:, None] - LOG_L_PIVOT))
    fwhm = np.array([line.fwhm for line in EMISSION_LINES]) * np.exp(
        rng.normal(0.0, 0.15, (n, 1)) + rng.normal(0.0, 0.15, (n, nl))
    )
    shift = rng.normal(0.0, 150.0, (n, nl))
    # high-ionisation broad lines are blueshifted, more so in luminous quasars
    for name in ("CIV", "SiIV_OIV", "HeII", "NV"):
        j = LINE_INDEX[name]
        shift[:, j] -= np.abs(rng.normal(600.0 + 400.0 * (log_l - LOG_L_PIVOT), 500.0))
    feii = np.exp(rng.normal(0.0, 0.35, n))
    balmer = np.exp(rng.normal(np.log(0.25), 0.3, n))
    return QsoParams(z, alpha, alpha_red, log_l, ew, fwhm, shift, feii, balmer)


def power_law(wave_rest: np.ndarray, alpha_nu: np.ndarray, alpha_nu_red: np.ndarray) -> np.ndarray:
    """Broken power law f_lambda, 1 at CONTINUUM_BREAK; wave (n, npix) or (n,), slopes (n,)."""
    expand = (slice(None),) + (None,) * (np.ndim(wave_rest) - 1)
    x = np.log(np.asarray(wave_rest, dtype=np.float32) / CONTINUUM_BREAK)
    slope_blue = (-(alpha_nu + 2.0)).astype(np.float32)[expand]
    slope_red = (-(alpha_nu_red + 2.0)).astype(np.float32)[expand]
    return np.exp(np.where(x < 0, slope_blue * x, slope_red * x))


def balmer_continuum(wave_rest: np.ndarray) -> np.ndarray:
    """Grandi (1982) Balmer continuum, optically thick at the edge, 1 at 3646 A, smoothed edge."""
    w = np.asarray(wave_rest, dtype=np.float32)
    edge, temp = 3646.0, 15000.0
    planck = (edge / w) ** 5 * np.expm1(1.4388e8 / (edge * temp)) / np.expm1(1.4388e8 / (w * temp))
    thick = 1.0 - np.exp(-((w / edge) ** 3))
    thick_edge = 1.0 - np.exp(-1.0)
    cut = 1.0 / (1.0 + np.exp(np.minimum((w - edge) / 25.0, 50.0)))
    return (planck * thick / thick_edge * cut).astype(np.float32)


@lru_cache(maxsize=1)
def feii_template() -> tuple[np.ndarray, np.ndarray]:
    """Fe II pseudo-continuum relative to the continuum on a fixed rest grid (wave, template).

    Blends of many broadened multiplet lines (fixed pseudo-random fine structure) shaped into the
    UV bumps near 2400, 2600 and 2950 A and the optical 4570 and 5250 A blends. At unit amplitude
    its EW is FEII_UV_EW over FEII_UV_WINDOW and FEII_OPTICAL_EW over FEII_OPTICAL_WINDOW.
    """
    wave = np.arange(1000.0, 7500.0, 0.5)
    fixed = np.random.default_rng(20010101)
    uv_bumps = (
        (2280, 40, 0.3),
        (2390, 60, 1.0),
        (2610, 55, 0.9),
        (2740, 45, 0.45),
        (2950, 70, 0.6),
    )
    opt_bumps = ((4300, 60, 0.3), (4560, 90, 1.0), (4930, 30, 0.35), (5020, 30, 0.4),
                 (5260, 110, 0.8), (5530, 40, 0.2))  # fmt: skip
    template = np.zeros_like(wave)
    for bumps, lo, hi, norm_window, ew in (
        (uv_bumps, 2150, 3150, FEII_UV_WINDOW, FEII_UV_EW),
        (opt_bumps, 4150, 5650, FEII_OPTICAL_WINDOW, FEII_OPTICAL_EW),
    ):
        centres = np.arange(lo, hi, 6.0) + fixed.uniform(-3, 3, len(np.arange(lo, hi, 6.0)))
        envelope = sum(a * np.exp(-0.5 * ((centres - c) / s) ** 2) for c, s, a in bumps)
        strength = envelope * fixed.uniform(0.2, 1.8, len(centres))
        sigma = centres * 2200.0 * FWHM_TO_SIGMA / C_KMS
        part = np.zeros_like(wave)
        for c, s, a in zip(centres, sigma, strength, strict=True):
            part += a * np.exp(-0.5 * ((wave - c) / s) ** 2)
        inside = (wave >= norm_window[0]) & (wave <= norm_window[1])
        template += part * ew / (part[inside].sum() * 0.5)
    return wave, template


def feii_pseudo_continuum(wave_rest: np.ndarray) -> np.ndarray:
    """The Fe II template interpolated onto ``wave_rest`` (any shape), relative to the continuum."""
    grid, template = feii_template()
    w = np.asarray(wave_rest)
    return (
        np.interp(w.ravel(), grid, template, left=0.0, right=0.0)
        .reshape(w.shape)
        .astype(np.float32)
    )


def emission_lines(wave_rest: np.ndarray, p: QsoParams) -> np.ndarray:
    """Sum of emission lines (n, npix): Gaussian narrow lines, core+wing broad-line profiles.

    Each line's flux is its EW times the power-law continuum at the line centre; broad lines put
    half of it in a core 0.6x and half in wings 1.6x the nominal width (closer to real broad-line
    shapes than one Gaussian).
    """
    w = np.asarray(wave_rest, dtype=np.float32)
    out = np.zeros(w.shape, dtype=np.float32)
    for j, line in enumerate(EMISSION_LINES):
        centre = line.wave * (1.0 + p.shift[:, j] / C_KMS)
        sigma = centre * p.fwhm[:, j] * FWHM_TO_SIGMA / C_KMS
        flux = p.ew[:, j] * power_law(centre, p.alpha_nu, p.alpha_nu_red)
        if line.narrow:
            add_gaussian(out, w, centre, sigma, flux)
        else:
            add_gaussian(out, w, centre, 0.6 * sigma, 0.5 * flux)
            add_gaussian(out, w, centre, 1.6 * sigma, 0.5 * flux)
    return out


def qso_components(wave_rest: np.ndarray, p: QsoParams) -> QsoComponents:
    """Continuum (power law + Balmer continuum), emission lines and Fe II of each spectrum."""
    w = np.asarray(wave_rest, dtype=np.float32)
    pl = power_law(w, p.alpha_nu, p.alpha_nu_red)
    edge = power_law(np.full(len(p), 3646.0), p.alpha_nu, p.alpha_nu_red)
    continuum = pl + (p.balmer * edge).astype(np.float32)[:, None] * balmer_continuum(w)
    feii = pl * feii_pseudo_continuum(w) * p.feii.astype(np.float32)[:, None]
    return QsoComponents(continuum, emission_lines(w, p), feii)
