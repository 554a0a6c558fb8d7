"""Injection of synthetic anomalies into observed spectra, before preprocessing.

Anomalies are applied to the observed-frame flux of each spectrum (real or mock) with
``desi_anomaly.mock.anomalies.inject``, on the wavelengths ``wave / (1 + Z)``, so the injected
spectra then go through the same cleaning (masking, resampling, normalisation) as every other
spectrum.

The anomaly acts on the signal, not on the noise: the class is applied to a smoothed copy ``S`` of
the spectrum (mean of the good pixels in a ``smooth_pixels`` window, far narrower than broad
lines) and the change ``inject(S) - S`` is added to the observed flux. The noise stays the
original one, consistent with the unchanged ivar (DESI QSO noise is dominated by sky and read
noise, which an absorber or a changed line does not alter): a DLA core becomes zero flux plus
noise, a reddened quasar becomes fainter at the same noise. Spectra for which a class is not
visible at their redshift (``applicable``) are not injected with it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
from scipy.ndimage import uniform_filter1d

from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.mock.anomalies import ANOMALY_KINDS, applicable, inject
from desi_anomaly.spectra import ObservedSpectra

#: Label of spectra without an injected anomaly.
NO_ANOMALY = "none"
#: Meta columns added to injected spectra (and carried through ``preprocess``).
INJECTION_COLUMNS = ("SOURCE_ROW", "ANOMALY", "ANOMALY_PARAMS")
#: Width (observed pixels, 0.8 A each in DESI) of the smoothing that estimates the signal.
SMOOTH_PIXELS = 9


class InjectionError(DesiAnomalyError, ValueError):
    """Spectra or anomaly classes that cannot be injected."""


def check_kinds(kinds: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The anomaly classes, validated against ``ANOMALY_KINDS``."""
    bad = [k for k in kinds if k not in ANOMALY_KINDS]
    if bad or not kinds:
        raise InjectionError(f"unknown anomaly class(es) {bad}; expected some of {ANOMALY_KINDS}")
    return tuple(kinds)


def with_labels(spectra: ObservedSpectra) -> ObservedSpectra:
    """A shallow copy of ``spectra`` labelled as not injected (SOURCE_ROW = row index)."""
    meta = spectra.meta.copy()
    meta["SOURCE_ROW"] = np.arange(len(meta), dtype=np.int64)
    meta["ANOMALY"] = NO_ANOMALY
    meta["ANOMALY_PARAMS"] = "{}"
    return replace(spectra, meta=meta)


def smoothed_signal(flux: np.ndarray, good: np.ndarray, width: int = SMOOTH_PIXELS) -> np.ndarray:
    """Mean of the ``good`` pixels in a ``width``-pixel window around each pixel (0 where the
    window has none): a noise-reduced estimate of the signal, rows are spectra."""
    good = good & np.isfinite(flux)
    f = np.where(good, flux, 0.0).astype(np.float64)
    num = uniform_filter1d(f, width, axis=-1, mode="nearest")
    den = uniform_filter1d(good.astype(np.float64), width, axis=-1, mode="nearest")
    return np.divide(num, den, out=np.zeros_like(num), where=den > 1e-9)


def inject_spectra(
    spectra: ObservedSpectra,
    kind: str,
    rng: np.random.Generator,
    *,
    smooth_pixels: int = SMOOTH_PIXELS,
    params: dict | None = None,
) -> ObservedSpectra:
    """Copies of the spectra for which ``kind`` is applicable, with ``kind`` injected.

    Meta gains SOURCE_ROW (row of the original in ``spectra``), ANOMALY (``kind``) and
    ANOMALY_PARAMS (JSON of the parameters drawn by ``draw_params``). Flux changes only where the
    class acts (by ``inject(S) - S``, see the module doc); wave, ivar and mask are the originals'.
    ``params`` fixes parameters of the class (the others are drawn), e.g. ``{"log_nhi": 20.3}``.
    """
    (kind,) = check_kinds([kind])
    if "Z" not in spectra.meta:
        raise InjectionError("spectra meta has no Z column: cannot place the anomaly")
    z = spectra.z
    rows = np.flatnonzero([np.isfinite(zi) and zi >= 0 and applicable(kind, zi) for zi in z])
    wave = np.asarray(spectra.wave, dtype=np.float64)
    flux = spectra.flux[rows].copy()
    good = (spectra.ivar[rows] > 0) & (spectra.mask[rows] == 0)
    signal = smoothed_signal(flux, good, smooth_pixels)
    used_params = []
    for j, i in enumerate(rows):
        changed, used = inject(
            kind, wave / (1 + z[i]), signal[j], rng, z=float(z[i]), ivar=spectra.ivar[i],
            **(params or {}),
        )  # fmt: skip
        flux[j] = (flux[j] + (changed - signal[j])).astype(flux.dtype)
        used_params.append(json.dumps(used, sort_keys=True))
    meta = spectra.meta.iloc[rows].reset_index(drop=True)
    meta["SOURCE_ROW"] = rows.astype(np.int64)
    meta["ANOMALY"] = kind
    meta["ANOMALY_PARAMS"] = used_params
    return ObservedSpectra(
        wave,
        flux,
        spectra.ivar[rows].copy(),
        spectra.mask[rows].copy(),
        meta,
        dict(spectra.sources),
    )


def take(spectra: ObservedSpectra, rows: np.ndarray) -> ObservedSpectra:
    """The spectra at ``rows`` (indices or a boolean mask), as a new ObservedSpectra."""
    rows = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, np.int64)
    return ObservedSpectra(
        spectra.wave,
        spectra.flux[rows],
        spectra.ivar[rows],
        spectra.mask[rows],
        spectra.meta.iloc[rows].reset_index(drop=True),
        dict(spectra.sources),
    )


def concat_observed(parts: list[ObservedSpectra]) -> ObservedSpectra:
    """Spectra of several files on one observed wavelength grid, stacked in order."""
    if not parts:
        raise InjectionError("no spectra to stack")
    wave = parts[0].wave
    if any(len(p.wave) != len(wave) or not np.allclose(p.wave, wave) for p in parts):
        raise InjectionError("spectra to stack are on different observed wavelength grids")
    return ObservedSpectra(
        wave,
        np.concatenate([p.flux for p in parts]),
        np.concatenate([p.ivar for p in parts]),
        np.concatenate([p.mask for p in parts]),
        pd.concat([p.meta for p in parts], ignore_index=True),
        dict(parts[0].sources),
    )
