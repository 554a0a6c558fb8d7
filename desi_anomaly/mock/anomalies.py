"""Injectable quasar anomalies, usable on mock or real spectra.

``inject(kind, wave_rest, flux, rng, z=..., **params) -> (flux, params)`` applies one anomaly to a
single spectrum given on its rest-frame grid (an observed grid divided by ``1 + z``); parameters not
given are drawn from the class's distribution, and the parameters used are returned (JSON-friendly).
Physical anomalies act in the quasar rest frame; instrumental ones (arm seam, spikes) on the
observed wavelengths ``wave_rest * (1 + z)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from desi_anomaly.io.instrument import ARM_GRIDS

from .igm import F_LYA, F_LYB, LYA, LYB, LYMAN_LIMIT, SIGMA_LL, central_tau
from .quasar import C_KMS, feii_pseudo_continuum

ANOMALY_KINDS: tuple[str, ...] = (
    "bal", "lobal", "dla", "reddened", "weak_line", "strong_feii", "arm_seam", "spikes",
)  # fmt: skip

#: Rest wavelengths (A) and relative depths of the broad absorption troughs.
HIBAL_IONS = {"CIV": (1549.06, 1.0), "SiIV": (1397.6, 0.7), "NV": (1240.14, 0.8), "LyA": (LYA, 0.5)}
LOBAL_IONS = {**HIBAL_IONS, "AlIII": (1857.4, 0.6), "MgII": (2798.75, 0.7)}
SMC_R_V = 2.93
#: Pei (1992) SMC extinction curve terms: (a, lambda [micron], b, n).
_PEI_SMC = (
    (185.0, 0.042, 90.0, 2.0), (27.0, 0.08, 5.5, 4.0), (0.005, 0.22, -1.95, 2.0),
    (0.010, 9.7, -1.95, 2.0), (0.012, 18.0, -1.8, 2.0), (0.030, 25.0, 0.0, 2.0),
)  # fmt: skip
_GAMMA_LYA = 6.265e8  # s^-1


def applicable(kind: str, z: float) -> bool:
    """Whether an anomaly is visible in the DESI range (3600-9824 A) for a quasar at ``z``."""
    if kind in ("bal", "lobal"):
        blue = 3700.0 / (1 + z)
        return blue < 1500.0 or (kind == "lobal" and 2750.0 * (1 + z) < 9700.0 and blue < 2600.0)
    if kind == "dla":
        return LYA * (1 + z) > 3800.0
    return True


# ----------------------------------------------------------------------------------------- physics
def smc_extinction(wave_rest: np.ndarray) -> np.ndarray:
    """A_lambda / E(B-V) of the SMC curve of Pei (1992)."""
    lam = np.asarray(wave_rest, dtype=np.float64) / 1e4
    xi = sum(a / ((lam / lw) ** n + (lw / lam) ** n + b) for a, lw, b, n in _PEI_SMC)
    return xi * (1.0 + SMC_R_V)


def voigt_tau(
    wave_abs: np.ndarray, log_n: float, doppler: float, rest: float, f: float
) -> np.ndarray:
    """Optical depth of a Voigt profile (Tepper-Garcia 2006 approximation), absorber rest frame."""
    dlam_d = rest * doppler / C_KMS
    x = (np.asarray(wave_abs, dtype=np.float64) - rest) / dlam_d
    a = _GAMMA_LYA * rest * 1e-8 / (4 * np.pi * doppler * 1e5)
    x2 = np.maximum(x * x, 1e-8)
    h0 = np.exp(-x2)
    h = h0 - a / np.sqrt(np.pi) / x2 * (
        h0 * h0 * (4 * x2 * x2 + 7 * x2 + 4 + 1.5 / x2) - 1.5 / x2 - 1
    )
    h = np.where(np.abs(x) < 1e-4, 1.0, h)
    return central_tau(log_n, doppler, f, rest) * np.maximum(h, 0.0)


def estimate_continuum(wave_rest: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Rough quasar continuum for real spectra: a power law through line-free windows' medians."""
    windows = ((1280, 1290), (1315, 1325), (1440, 1480), (1690, 1710), (2160, 2230), (3020, 3100),
               (3500, 3600), (4200, 4230), (5080, 5120), (5550, 5650), (6000, 6300))  # fmt: skip
    wave_rest = np.asarray(wave_rest, dtype=np.float64)
    xs, ys = [], []
    for lo, hi in windows:
        sel = (wave_rest >= lo) & (wave_rest <= hi)
        if sel.sum() >= 5 and np.median(flux[sel]) > 0:
            xs.append(np.log((lo + hi) / 2))
            ys.append(np.log(np.median(flux[sel])))
    if len(xs) < 2:
        return np.full_like(flux, max(float(np.median(flux)), 0.0))
    slope, icpt = np.polyfit(xs, ys, 1)
    return np.exp(icpt + slope * np.log(wave_rest)).astype(flux.dtype)


# ------------------------------------------------------------------------------------ parameters
def draw_params(kind: str, rng: np.random.Generator, z: float, wave_rest: np.ndarray) -> dict:
    """Draw the parameters of one anomaly of ``kind`` for a quasar at ``z``."""
    if kind in ("bal", "lobal"):
        v_min = rng.uniform(2000.0, 10000.0)
        return {"v_min": v_min, "v_max": min(v_min + rng.uniform(2000.0, 15000.0), 25000.0),
                "depth": rng.uniform(0.4, 0.95)}  # fmt: skip
    if kind == "dla":
        lo = max(3650.0 / LYA - 1.0, LYB * (1 + z) / LYA - 1.0 + 0.02)
        hi = z - 0.03
        return {"z_abs": rng.uniform(lo, max(lo, hi)), "log_nhi": rng.uniform(20.3, 21.5),
                "b": 30.0}  # fmt: skip
    if kind == "reddened":
        return {"ebv": rng.uniform(0.1, 0.5)}
    if kind == "weak_line":
        return {"line_scale": rng.uniform(0.1, 0.3)}
    if kind == "strong_feii":
        return {"feii_scale": rng.uniform(3.0, 5.0)}
    if kind == "arm_seam":
        scale = rng.uniform(0.1, 0.3) * rng.choice([-1.0, 1.0]) + 1.0
        return {"arm": str(rng.choice(["B", "R", "Z"], p=[0.3, 0.4, 0.3])), "scale": scale}
    if kind == "spikes":
        wave_obs = np.asarray(wave_rest) * (1 + z)
        n = int(rng.integers(1, 6))
        picks = rng.choice(wave_obs[10:-10], n, replace=False)
        return {"wave_obs": sorted(float(w) for w in picks),
                "amplitude_sigma": float(rng.uniform(10.0, 40.0))}  # fmt: skip
    raise ValueError(f"unknown anomaly kind {kind!r}; expected one of {ANOMALY_KINDS}")


# ------------------------------------------------------------------------------------- injection
def _trough(wave_rest, flux, ions, v_min, v_max, depth, **_):
    absorbed = np.zeros_like(wave_rest, dtype=np.float64)
    edge = 600.0  # km/s, smooth trough edges
    for rest, rel in ions.values():
        v = C_KMS * (1.0 - wave_rest / rest)
        shape = 0.5 * (np.tanh((v - v_min) / edge) - np.tanh((v - v_max) / edge))
        absorbed = np.maximum(absorbed, depth * rel * shape)
    return flux * (1.0 - absorbed).astype(flux.dtype)


def _bal(wave_rest, flux, z, **p):
    return _trough(wave_rest, flux, HIBAL_IONS, **p)


def _lobal(wave_rest, flux, z, **p):
    return _trough(wave_rest, flux, LOBAL_IONS, **p)


def _dla(wave_rest, flux, z, z_abs, log_nhi, b=30.0, **_):
    wave_abs = wave_rest * (1 + z) / (1 + z_abs)
    tau = voigt_tau(wave_abs, log_nhi, b, LYA, F_LYA) + voigt_tau(wave_abs, log_nhi, b, LYB, F_LYB)
    ll = wave_abs < LYMAN_LIMIT
    tau[ll] += 10**log_nhi * SIGMA_LL * (wave_abs[ll] / LYMAN_LIMIT) ** 3
    return flux * np.exp(-tau).astype(flux.dtype)


def _reddened(wave_rest, flux, z, ebv, **_):
    return flux * 10 ** (-0.4 * ebv * smc_extinction(wave_rest)).astype(flux.dtype)


def _weak_line(wave_rest, flux, z, line_scale, continuum=None, lines=None, **_):
    if lines is None:
        base = continuum if continuum is not None else estimate_continuum(wave_rest, flux)
        lines = flux - base
    return flux - (1.0 - line_scale) * lines


def _strong_feii(wave_rest, flux, z, feii_scale, continuum=None, feii=None, **_):
    if feii is None:
        base = continuum if continuum is not None else estimate_continuum(wave_rest, flux)
        feii = base * feii_pseudo_continuum(wave_rest)
    return flux + (feii_scale - 1.0) * feii


def _arm_seam(wave_rest, flux, z, arm, scale, **_):
    start, stop, _ = ARM_GRIDS[arm]
    wave_obs = wave_rest * (1 + z)
    inside = (wave_obs >= start - 1e-3) & (wave_obs <= stop + 1e-3)
    return np.where(inside, flux * scale, flux).astype(flux.dtype)


def _spikes(wave_rest, flux, z, wave_obs, amplitude_sigma, ivar=None, **_):
    out = flux.copy()
    obs = wave_rest * (1 + z)
    if ivar is not None and np.any(ivar > 0):
        unit = float(np.median(1.0 / np.sqrt(ivar[ivar > 0])))
    else:
        unit = float(max(np.median(np.abs(flux)), np.std(flux), 1e-3))
    step = obs[1] - obs[0]
    for w in wave_obs:
        i = int(np.rint((w - obs[0]) / step))
        if 0 <= i < len(obs) and abs(obs[i] - w) < step / 2:
            out[i] += amplitude_sigma * unit
    return out


_APPLY: dict[str, Callable[..., np.ndarray]] = {
    "bal": _bal, "lobal": _lobal, "dla": _dla, "reddened": _reddened, "weak_line": _weak_line,
    "strong_feii": _strong_feii, "arm_seam": _arm_seam, "spikes": _spikes,
}  # fmt: skip


def inject(
    kind: str,
    wave_rest: np.ndarray,
    flux: np.ndarray,
    rng: np.random.Generator,
    *,
    z: float,
    continuum: np.ndarray | None = None,
    lines: np.ndarray | None = None,
    feii: np.ndarray | None = None,
    ivar: np.ndarray | None = None,
    **params,
) -> tuple[np.ndarray, dict]:
    """Apply anomaly ``kind`` to one spectrum; returns the new flux and the parameters used.

    ``continuum``, ``lines`` and ``feii`` are the model components when known (mock spectra);
    for real spectra they are estimated. ``ivar`` sets the spike amplitude unit (noise sigma).
    """
    if kind not in _APPLY:
        raise ValueError(f"unknown anomaly kind {kind!r}; expected one of {ANOMALY_KINDS}")
    wave_rest = np.asarray(wave_rest, dtype=np.float64)
    flux = np.asarray(flux)
    full = {**draw_params(kind, rng, z, wave_rest), **params} if _missing(kind, params) else params
    context = {"continuum": continuum, "lines": lines, "feii": feii, "ivar": ivar}
    out = _APPLY[kind](wave_rest, flux, z, **full, **context)
    return out.astype(flux.dtype, copy=False), _plain(full)


_REQUIRED = {"bal": ("v_min", "v_max", "depth"), "lobal": ("v_min", "v_max", "depth"),
             "dla": ("z_abs", "log_nhi"), "reddened": ("ebv",), "weak_line": ("line_scale",),
             "strong_feii": ("feii_scale",), "arm_seam": ("arm", "scale"),
             "spikes": ("wave_obs", "amplitude_sigma")}  # fmt: skip


def _missing(kind: str, params: dict) -> bool:
    return any(k not in params for k in _REQUIRED[kind])


def _plain(params: dict) -> dict:
    """Parameters as JSON-friendly Python scalars and lists."""
    out = {}
    for k, v in params.items():
        if isinstance(v, np.ndarray | list | tuple):
            out[k] = [float(x) for x in v]
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out
