"""Cheap, plausible non-quasar targets: emission-line and red galaxies, and stars."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .profiles import add_gaussian
from .quasar import C_KMS

#: Galaxy emission lines: (rest vacuum A, EW relative to [OII] 3727+3729).
GALAXY_EMISSION = ((3727.09, 0.45), (3729.88, 0.55), (4862.68, 0.35), (4960.30, 0.15),
                   (5008.24, 0.45), (6564.61, 1.2), (6585.27, 0.35), (6718.29, 0.15),
                   (6732.67, 0.12))  # fmt: skip
#: Absorption lines (rest vacuum A, depth in units of the continuum EW, A).
GALAXY_ABSORPTION = ((3934.78, 8.0), (3969.59, 7.0), (4305.6, 4.0), (5176.7, 4.0), (5895.6, 3.0))
STAR_ABSORPTION = ((3934.78, 6.0), (3969.59, 5.0), (3971.2, 3.0), (4102.89, 4.0), (4341.68, 4.0),
                   (4862.68, 5.0), (5176.7, 3.0), (5891.6, 2.0), (5897.6, 1.5), (6564.61, 4.0),
                   (8500.4, 1.5), (8544.4, 2.5), (8664.5, 2.0))  # fmt: skip


@dataclass
class OtherTargets:
    """Unit-amplitude observed-frame models of non-quasar targets and their truth."""

    model: np.ndarray  # (n, npix) float32
    spectype: np.ndarray  # 'GALAXY' or 'STAR'
    subtype: np.ndarray  # 'ELG', 'LRG', 'BGS' or a stellar type
    z: np.ndarray


def galaxies(wave: np.ndarray, n: int, rng: np.random.Generator) -> OtherTargets:
    """Emission-line (ELG), luminous red (LRG) and low-z galaxies, z 0-1.6."""
    kind = rng.choice(np.array(["ELG", "LRG", "BGS"]), n, p=[0.55, 0.35, 0.10])
    z = np.select(
        [kind == "ELG", kind == "LRG"],
        [rng.uniform(0.6, 1.6, n), rng.uniform(0.3, 1.1, n)],
        rng.uniform(0.01, 0.4, n),
    )
    rest = (wave[None, :] / (1 + z[:, None])).astype(np.float32)
    slope = np.where(kind == "ELG", rng.normal(-1.0, 0.4, n), rng.normal(1.0, 0.4, n))
    brk = np.where(kind == "ELG", rng.uniform(0.05, 0.2, n), rng.uniform(0.3, 0.6, n))
    model = (rest / 4000.0) ** slope.astype(np.float32)[:, None]
    model *= 1.0 - brk.astype(np.float32)[:, None] / (
        1.0 + np.exp(np.minimum((rest - 4000.0) / 40.0, 50.0))
    )
    width = rng.uniform(60.0, 150.0, n) / C_KMS
    ew_oii = np.where(kind == "ELG", rng.lognormal(np.log(40.0), 0.5, n), 0.0)
    ew_oii = np.where(kind == "BGS", rng.lognormal(np.log(8.0), 0.8, n), ew_oii)
    lines = np.zeros_like(model)
    for centre, rel in GALAXY_EMISSION:
        cont = (centre / 4000.0) ** slope
        add_gaussian(lines, rest, np.full(n, centre), centre * width, ew_oii * rel * cont)
    for centre, ew in GALAXY_ABSORPTION:
        cont = (centre / 4000.0) ** slope * np.where(kind == "ELG", 0.3, 1.0)
        add_gaussian(lines, rest, np.full(n, centre), centre * 3 * width, -ew * cont)
    return OtherTargets(np.maximum(model + lines, 0.0), np.full(n, "GALAXY"), kind, z)


def stars(wave: np.ndarray, n: int, rng: np.random.Generator) -> OtherTargets:
    """Main-sequence stars: black bodies 3500-9000 K with Balmer, Ca, Mg, Na and CaT absorption."""
    temp = rng.uniform(3500.0, 9000.0, n)
    z = rng.normal(0.0, 1e-4, n)
    rest = (wave[None, :] / (1 + z[:, None])).astype(np.float64)
    x = 1.4388e8 / (rest * temp[:, None])
    planck = (rest / 5500.0) ** -5 / np.expm1(x) * np.expm1(1.4388e8 / (5500.0 * temp))[:, None]
    model = planck.astype(np.float32)
    lines = np.zeros_like(model)
    hot = (temp - 3500.0) / 5500.0
    for centre, ew in STAR_ABSORPTION:
        balmer = centre in (3971.2, 4102.89, 4341.68, 4862.68, 6564.61)
        strength = ew * (hot if balmer else 1.0 - 0.7 * hot)
        cont = model[:, np.argmin(np.abs(wave - centre))]
        add_gaussian(lines, rest.astype(np.float32), np.full(n, centre), np.full(n, 3.0),
                     -strength * cont)  # fmt: skip
    subtype = np.select(
        [temp > 7300, temp > 6000, temp > 5200, temp > 3900], ["A", "F", "G", "K"], "M"
    )
    return OtherTargets(np.maximum(model + lines, 0.0), np.full(n, "STAR"), subtype, z)
