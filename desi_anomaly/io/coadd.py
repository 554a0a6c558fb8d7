"""Read the QSO spectra of one DESI coadd file, select them by redshift fit, merge the B/R/Z arms.

A real healpix coadd holds ~100-150 QSOs among ~1,000-3,000 other targets and is hundreds of MB,
mostly RESOLUTION HDUs. The reader therefore selects rows first from the small tables and then
reads only those rows of the FLUX/IVAR/MASK images; RESOLUTION is never read unless asked for.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import fitsio
import numpy as np
import pandas as pd

from desi_anomaly.errors import DesiFormatError
from desi_anomaly.io.fitsutil import (
    hdu_names,
    open_fits,
    read_columns,
    read_image_rows,
    require_hdus,
)
from desi_anomaly.io.instrument import ARMS
from desi_anomaly.io.redshifts import QSOCatalog, _check_unique, read_redrock
from desi_anomaly.spectra import ObservedSpectra

FIBERMAP_OPTIONAL = ("TARGET_RA", "TARGET_DEC", "COADD_FIBERSTATUS", "DESI_TARGET", "TILEID")
#: HDUs every DESI coadd file has; SCORES is not read but its absence marks a malformed file.
COADD_HDUS = (
    "FIBERMAP",
    "SCORES",
    *(f"{arm}_{part}" for arm in ARMS for part in ("WAVELENGTH", "FLUX", "IVAR", "MASK")),
)


class DesiDataWarning(UserWarning):
    """Pixels with invalid values (NaN/inf flux, negative ivar) that were masked on read."""


@dataclass(frozen=True)
class QSOSelection:
    """Which rows of a coadd are read as QSOs.

    With a redrock file: SPECTYPE == ``spectype``, ZWARN == 0 and COADD_FIBERSTATUS == 0 (each
    configurable). With a QSO catalogue, the catalogue decides: rows whose TARGETID it lists are
    read (with its redshifts) and the redrock cuts apply only if ``redrock_cuts_with_catalog``.
    """

    spectype: str | None = "QSO"
    zwarn_zero: bool = True
    fiberstatus_zero: bool = True
    redrock_cuts_with_catalog: bool = False


def read_qso_spectra(
    coadd: str | Path,
    redrock: str | Path | None = None,
    *,
    catalog: QSOCatalog | None = None,
    selection: QSOSelection = QSOSelection(),
    strict: bool = False,
    with_resolution: bool = False,
) -> ObservedSpectra:
    """Read, select and arm-merge the QSO spectra of one coadd file.

    Redshifts come from ``redrock`` or, when given, from ``catalog``; at least one is needed.
    Invalid pixel values (NaN/inf flux or ivar, negative ivar) are masked (ivar = 0, counted in
    meta column ``N_INVALID_PIX``) with a DesiDataWarning naming the file, or raise when
    ``strict``. A file with zero selected QSOs gives an empty (valid) result.
    """
    if redrock is None and catalog is None:
        raise ValueError("need a redrock file or a QSO catalogue as the redshift source")
    coadd = Path(coadd)
    zinfo = read_redrock(redrock) if redrock is not None else None
    with open_fits(coadd) as fits:
        require_hdus(fits, coadd, COADD_HDUS)
        fibermap = read_columns(fits, coadd, "FIBERMAP", ("TARGETID",), FIBERMAP_OPTIONAL)
        nfib = len(fibermap["TARGETID"])
        _check_unique(fibermap["TARGETID"], coadd, "FIBERMAP")
        columns, rows = _select_rows(fibermap, zinfo, catalog, selection, coadd, redrock)
        exposures = _latest_exposures(fits, coadd, columns["TARGETID"])
        columns = {c: v for c, v in columns.items() if c not in exposures} | exposures
        wave, flux, ivar, mask, n_invalid = _read_merged_arms(fits, coadd, rows, strict)
        resolution = (
            {arm: _read_rows(fits, coadd, f"{arm}_RESOLUTION", rows, nfib) for arm in ARMS}
            if with_resolution and all(f"{a}_RESOLUTION" in hdu_names(fits) for a in ARMS)
            else None
        )
    columns["N_INVALID_PIX"] = n_invalid
    meta = pd.DataFrame(columns)
    sources = {"coadd": str(coadd)}
    if redrock is not None:
        sources["redrock"] = str(redrock)
    if catalog is not None:
        sources["catalog"] = catalog.path
    return ObservedSpectra(wave, flux, ivar, mask, meta, sources, resolution)


def _select_rows(
    fibermap: dict[str, np.ndarray],
    zinfo: pd.DataFrame | None,
    catalog: QSOCatalog | None,
    selection: QSOSelection,
    coadd: Path,
    redrock: str | Path | None,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The selected coadd rows (sorted) and their meta columns: FIBERMAP joined with redshifts."""
    tid = fibermap["TARGETID"].astype(np.int64, copy=False)
    selected = np.ones(len(tid), dtype=bool)
    if zinfo is not None:
        zpos = _positions(zinfo["TARGETID"].to_numpy(np.int64), tid, coadd, redrock)
        use_cuts = catalog is None or selection.redrock_cuts_with_catalog
        if use_cuts and selection.spectype is not None:
            selected &= zinfo["SPECTYPE"].to_numpy()[zpos] == selection.spectype
        if use_cuts and selection.zwarn_zero:
            selected &= zinfo["ZWARN"].to_numpy()[zpos] == 0
    if selection.fiberstatus_zero and "COADD_FIBERSTATUS" in fibermap:
        selected &= fibermap["COADD_FIBERSTATUS"] == 0
    if catalog is not None:
        cpos = catalog.locate(tid)
        selected &= cpos >= 0
    rows = np.flatnonzero(selected)
    columns = {c: values[rows] for c, values in fibermap.items()}
    if zinfo is not None:
        columns |= {c: zinfo[c].array.take(zpos[rows]) for c in zinfo if c != "TARGETID"}
    if catalog is not None:
        columns["Z"] = catalog.z[cpos[rows]]
        for col, values in (("TARGET_RA", catalog.ra), ("TARGET_DEC", catalog.dec)):
            if values is not None and col not in fibermap:
                columns[col] = values[cpos[rows]]
    for col in ("TARGET_RA", "TARGET_DEC", "ZERR", "DELTACHI2"):
        columns.setdefault(col, np.full(len(rows), np.nan))
    return columns, rows


def _positions(
    ztid: np.ndarray, tid: np.ndarray, coadd: Path, redrock: str | Path | None
) -> np.ndarray:
    """Row of each coadd TARGETID in the redrock table; the two must hold the same TARGETIDs."""
    order = np.argsort(ztid)
    pos = order[np.searchsorted(ztid[order], tid).clip(max=max(len(ztid) - 1, 0))]
    if len(ztid) != len(tid) or not np.array_equal(ztid[pos], tid):
        only_coadd = np.setdiff1d(tid, ztid)
        only_rr = np.setdiff1d(ztid, tid)
        raise DesiFormatError(
            coadd,
            f"TARGETID mismatch with redrock file {redrock}: {len(only_coadd)} only in the "
            f"coadd (e.g. {only_coadd[:3].tolist()}), {len(only_rr)} only in redrock "
            f"(e.g. {only_rr[:3].tolist()})",
        )
    return pos


def _latest_exposures(fits: fitsio.FITS, path: Path, tid: np.ndarray) -> dict[str, np.ndarray]:
    """TILEID, FIBER and LASTNIGHT of each target's latest exposure (EXP_FIBERMAP, if present).

    Targets without an exposure row get NaN.
    """
    if "EXP_FIBERMAP" not in hdu_names(fits):
        return {}
    cols = {c.upper() for c in fits["EXP_FIBERMAP"].get_colnames()}
    wanted = [c for c in ("TILEID", "FIBER", "NIGHT") if c in cols]
    if "TARGETID" not in cols or not wanted:
        return {}
    exp = read_columns(fits, path, "EXP_FIBERMAP", ("TARGETID",), wanted)
    etid = exp["TARGETID"].astype(np.int64, copy=False)
    # The latest exposure is the last row of each target's block once sorted by (TARGETID, NIGHT)
    # stably, so ties keep the file order.
    order = np.lexsort((exp["NIGHT"], etid)) if "NIGHT" in exp else np.argsort(etid, kind="stable")
    sorted_tid = etid[order]
    is_last = np.r_[sorted_tid[1:] != sorted_tid[:-1], True] if len(etid) else np.zeros(0, bool)
    latest, latest_tid = order[is_last], sorted_tid[is_last]
    tid = tid.astype(np.int64, copy=False)
    at = np.searchsorted(latest_tid, tid).clip(max=max(len(latest) - 1, 0))
    found = latest_tid[at] == tid if len(latest) else np.zeros(len(tid), dtype=bool)
    out = {}
    for col in wanted:
        values = exp[col][latest[at]] if len(latest) else np.zeros(len(tid), exp[col].dtype)
        out["LASTNIGHT" if col == "NIGHT" else col] = (
            values if found.all() else np.where(found, values, np.nan)
        )
    return out


def _read_merged_arms(
    fits: fitsio.FITS, path: Path, rows: np.ndarray, strict: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the selected rows of each arm and merge them onto one grid by ivar weighting.

    Pixels of one arm are copied (flux 0 and ivar 0 where masked); only the arm overlaps are
    combined, in float64 (the same result as weighting every pixel).
    """
    waves = {arm: _read_wavelength(fits, path, arm) for arm in ARMS}
    wave, offsets = merged_grid(waves, path)
    n, npix = len(rows), len(wave)
    nfib = fits["FIBERMAP"].get_nrows()
    spans = {arm: slice(offsets[arm], offsets[arm] + len(w)) for arm, w in waves.items()}
    arms_per_pixel = np.zeros(npix, dtype=np.int64)
    for sl in spans.values():
        arms_per_pixel[sl] += 1
    shared = np.flatnonzero(arms_per_pixel > 1)  # merged pixels in an arm overlap
    weighted = np.zeros((n, len(shared)))
    ivar_sum = np.zeros((n, len(shared)))
    mask_or = np.zeros((n, len(shared)), dtype=np.uint32)
    any_good = np.zeros((n, len(shared)), dtype=bool)
    out_flux = np.zeros((n, npix), dtype=np.float32)
    out_ivar = np.zeros((n, npix), dtype=np.float32)
    out_mask = np.zeros((n, npix), dtype=np.uint32)
    n_invalid = np.zeros(n, dtype=np.int64)
    for arm, sl in spans.items():
        flux, ivar, mask = (
            _read_rows(fits, path, f"{arm}_{part}", rows, nfib, sl.stop - sl.start)
            for part in ("FLUX", "IVAR", "MASK")
        )
        mask = mask.astype(np.uint32, copy=False)
        if not _all_valid(flux, ivar):
            with np.errstate(invalid="ignore"):
                invalid = ~(np.isfinite(flux) & (ivar >= 0) & (ivar < np.inf))
            problem = (
                f"{arm} arm has {int(invalid.sum())} pixel(s) with NaN/inf flux or ivar or "
                f"negative ivar in {int(invalid.any(axis=1).sum())} spectrum/spectra"
            )
            if strict:
                raise DesiFormatError(path, problem)
            warnings.warn(
                f"{path}: {problem}; masked (ivar set to 0)", DesiDataWarning, stacklevel=3
            )
            n_invalid += invalid.sum(axis=1)
            flux[invalid] = 0.0
            ivar[invalid] = 0.0
        # The output starts at zero: copy the unmasked ivar, and the flux where that is > 0.
        good = mask == 0
        np.copyto(out_ivar[:, sl], ivar, where=good)
        np.copyto(out_flux[:, sl], flux, where=out_ivar[:, sl] > 0)
        out_mask[:, sl] = mask
        # Overlap pixels of this arm: ``cols`` in the arm, ``into`` in the overlap arrays.
        cols = shared[(shared >= sl.start) & (shared < sl.stop)] - sl.start
        into = np.searchsorted(shared, cols + sl.start)
        iv = np.where(good[:, cols], ivar[:, cols], 0).astype(np.float64)
        weighted[:, into] += iv * flux[:, cols]
        ivar_sum[:, into] += iv
        mask_or[:, into] |= mask[:, cols]
        any_good[:, into] |= good[:, cols]
    # A merged pixel is bad only if every arm covering it is bad.
    mask_or[any_good] = 0
    out_flux[:, shared] = np.divide(
        weighted, ivar_sum, out=np.zeros_like(weighted), where=ivar_sum > 0
    )
    out_ivar[:, shared] = ivar_sum
    out_mask[:, shared] = mask_or
    return wave, out_flux, out_ivar, out_mask, n_invalid


def _all_valid(flux: np.ndarray, ivar: np.ndarray) -> bool:
    """Whether all flux is finite and all ivar finite and >= 0, by reductions only (no
    temporaries; a NaN makes min and max NaN)."""
    if flux.size == 0:
        return True
    finite_flux = np.isfinite(flux.min()) and np.isfinite(flux.max())
    return bool(finite_flux and ivar.min() >= 0 and ivar.max() < np.inf)


def merged_grid(
    waves: dict[str, np.ndarray], path: str | Path
) -> tuple[np.ndarray, dict[str, int]]:
    """The merged observed grid of the arms and each arm's pixel offset into it.

    The arms must share one linear wavelength step and lie on a common lattice (as in DESI coadds,
    where overlaps are on identical wavelengths); anything else is refused rather than resampled.
    """
    steps = {}
    for arm, w in waves.items():
        d = np.diff(w)
        if len(w) < 2 or np.any(d <= 0) or np.ptp(d) > 1e-6 * abs(d.mean()) + 1e-9:
            raise DesiFormatError(
                path, f"{arm}_WAVELENGTH is not a strictly increasing linear grid"
            )
        steps[arm] = d.mean()
    step = np.mean(list(steps.values()))
    if any(abs(s - step) > 1e-6 * step for s in steps.values()):
        raise DesiFormatError(path, f"arms have different wavelength steps {steps}")
    start = min(w[0] for w in waves.values())
    offsets = {}
    for arm, w in waves.items():
        off = (w[0] - start) / step
        if abs(off - round(off)) > 1e-3:
            raise DesiFormatError(path, f"{arm} arm is not on the common wavelength lattice")
        offsets[arm] = round(off)
    npix = max(offsets[a] + len(w) for a, w in waves.items())
    return start + step * np.arange(npix), offsets


def _read_wavelength(fits: fitsio.FITS, path: Path, arm: str) -> np.ndarray:
    wave = np.asarray(fits[f"{arm}_WAVELENGTH"].read(), dtype=np.float64)
    if wave.ndim != 1:
        raise DesiFormatError(path, f"{arm}_WAVELENGTH has shape {wave.shape}, expected 1-D")
    return wave


def _read_rows(
    fits: fitsio.FITS, path: Path, ext: str, rows: np.ndarray, nfib: int, npix: int | None = None
) -> np.ndarray:
    """Read only ``rows`` (sorted) of an image HDU whose first axis is the spectrum index."""
    dims = tuple(fits[ext].get_dims())
    if dims[0] != nfib:
        raise DesiFormatError(path, f"{ext} has {dims[0]} rows but FIBERMAP has {nfib}")
    if npix is not None and dims != (nfib, npix):
        raise DesiFormatError(path, f"{ext} has shape {dims}, expected ({nfib}, {npix})")
    return read_image_rows(fits, path, ext, rows)
