"""PNG plots of catalogued anomalies: spectrum, reconstruction and residuals with driving regions.

Figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg canvas, without pyplot,
so plotting changes no global matplotlib state and works headless.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from desi_anomaly.atomic import atomic_path

from .explain import ARM_SEAMS, REST_LINES, Explanation, boxcar

SMOOTH_PIX = 5
SIGN_COLOURS = {"absorption": "tab:red", "excess": "tab:blue"}


def smoothed(values: np.ndarray, good: np.ndarray, width: int = SMOOTH_PIX) -> np.ndarray:
    """Boxcar mean over good pixels; NaN at pixels without data."""
    total, count = boxcar(values, good, width)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(good & (count > 0), total / count, np.nan)


def title(expl: Explanation) -> str:
    """TARGETID, partition, z, q, type and rank of an explained spectrum."""
    info = expl.info
    parts = [f"TARGETID {expl.targetid}", str(info.get("PARTITION", "")), f"z={expl.z:.3f}"]
    if "Q_VALUE" in info:
        parts.append(f"q={info['Q_VALUE']:.2g}")
    if "TYPE" in info:
        parts.append(str(info["TYPE"]))
    if "RANK" in info:
        parts.append(f"rank {info['RANK']}")
    return "   ".join(p for p in parts if p)


def _flux_limits(*curves: np.ndarray) -> tuple[float, float]:
    values = np.concatenate([c[np.isfinite(c)] for c in curves])
    if not len(values):
        return -1.0, 1.0
    lo, hi = np.percentile(values, [0.5, 99.5])
    pad = 0.1 * (hi - lo or 1.0)
    return float(lo - pad), float(hi + pad)


def _draw_spectrum(ax: Axes, expl: Explanation, *, labels: bool) -> None:
    """Smoothed observed-frame flux, reconstruction, arm seams and (optionally) line labels."""
    obs, good = expl.obs_wave, expl.good
    flux = smoothed(expl.flux, good)
    ax.plot(obs, flux, color="0.15", lw=0.7, label=f"flux ({SMOOTH_PIX}-pix boxcar)")
    ax.plot(obs, np.where(good, expl.model, np.nan), color="tab:orange", lw=1.3, label="VAE model")
    lo, hi = _flux_limits(flux, np.where(good, expl.model, np.nan))
    ax.set_ylim(lo, hi + (0.2 * (hi - lo) if labels else 0.0))  # headroom for line labels
    for i, (seam_lo, seam_hi) in enumerate(ARM_SEAMS):
        ax.axvspan(seam_lo, seam_hi, color="0.85", zorder=0, label=None if i else "arm seams")
    data = obs[good]
    if not len(data):
        return
    ax.set_xlim(data.min(), data.max())
    if not labels:
        return
    for name, rest in REST_LINES:
        x = rest * (1.0 + expl.z)
        if data.min() < x < data.max():
            ax.axvline(x, color="0.5", ls=":", lw=0.8, zorder=0)
            ax.text(
                x, 0.98, name, transform=ax.get_xaxis_transform(), rotation=90,
                ha="right", va="top", fontsize=7, color="0.35",
            )  # fmt: skip


def plot_anomaly(expl: Explanation, path: str | Path, *, dpi: int = 110) -> Path:
    """PNG of one anomaly: spectrum + reconstruction, residuals with its driving regions."""
    fig = Figure(figsize=(11, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2.2, 1])
    _draw_spectrum(top, expl, labels=True)
    top.set_ylabel("normalised flux")
    top.legend(loc="upper right", fontsize=8, framealpha=0.8)
    z = expl.z
    rest_axis = top.secondary_xaxis("top", functions=(lambda x: x / (1 + z), lambda x: x * (1 + z)))
    rest_axis.set_xlabel("rest-frame wavelength [Å]")
    top.set_title(title(expl), fontsize=11)

    good = expl.good
    res = np.where(good, expl.residual, np.nan)
    bottom.plot(expl.obs_wave, res, color="0.7", lw=0.5)
    bottom.plot(expl.obs_wave, smoothed(expl.residual, good), color="0.1", lw=0.8)
    bottom.axhline(0.0, color="0.4", lw=0.6)
    lim = max(5.0, float(np.nanpercentile(np.abs(res), 99.5)) if np.any(good) else 5.0)
    bottom.set_ylim(-1.1 * lim, 1.1 * lim)
    for i, region in enumerate(expl.regions, start=1):
        for ax in (top, bottom):
            ax.axvspan(region.obs_lo, region.obs_hi, color=SIGN_COLOURS[region.sign], alpha=0.2)
        bottom.text(
            0.5 * (region.obs_lo + region.obs_hi), 1.0 - 0.09 * i, f"{i}: {region.feature}",
            transform=bottom.get_xaxis_transform(), ha="center", va="top", fontsize=7,
            color=SIGN_COLOURS[region.sign],
        )  # fmt: skip
    bottom.set_ylabel("(flux - model) √ivar")
    bottom.set_xlabel("observed wavelength [Å]")
    return _save(fig, path, dpi)


def plot_summary_grid(
    explanations: Sequence[Explanation], path: str | Path, *, ncols: int = 3, dpi: int = 90
) -> Path:
    """PNG grid of the given anomalies (spectrum and reconstruction, driving regions shaded)."""
    n = max(len(explanations), 1)
    nrows = -(-n // ncols)
    fig = Figure(figsize=(5.0 * ncols, 2.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, expl in zip(axes, explanations, strict=False):
        _draw_spectrum(ax, expl, labels=False)
        for region in expl.regions:
            ax.axvspan(region.obs_lo, region.obs_hi, color=SIGN_COLOURS[region.sign], alpha=0.2)
        info = expl.info
        head = f"#{info.get('RANK', '?')} {expl.targetid} z={expl.z:.2f} {info.get('TYPE', '')}"
        lead = expl.regions[0].feature if expl.regions else "no driving region"
        ax.set_title(f"{head}\n{lead}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(explanations) :]:
        ax.set_axis_off()
    return _save(fig, path, dpi)


def plot_top_anomalies(
    explanations: Sequence[Explanation], out_dir: str | Path, *, n_grid: int = 12
) -> list[Path]:
    """One PNG per explanation (``anomaly_{rank}_{targetid}.png``) and ``top_anomalies.png``."""
    out_dir = Path(out_dir)
    paths = [
        plot_anomaly(e, out_dir / f"anomaly_{int(e.info.get('RANK', 0)):05d}_{e.targetid}.png")
        for e in explanations
    ]
    paths.append(plot_summary_grid(explanations[:n_grid], out_dir / "top_anomalies.png"))
    return paths


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
