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
from desi_anomaly.io.fitsutil import hdu_names, open_fits, read_table, require_hdus
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
        fibermap = read_table(fits, coadd, "FIBERMAP", ("TARGETID",), FIBERMAP_OPTIONAL)
        tid = fibermap["TARGETID"].to_numpy(np.int64)
        _check_unique(tid, coadd, "FIBERMAP")
        meta = _attach_redshifts(fibermap, zinfo, catalog, selection, coadd, redrock)
        rows = np.flatnonzero(meta.pop("_SELECTED").to_numpy())
        meta = meta.iloc[rows].reset_index(drop=True)
        meta = _attach_exposures(fits, coadd, meta)
        wave, flux, ivar, mask, n_invalid = _read_merged_arms(fits, coadd, rows, strict)
        resolution = (
            {arm: _read_rows(fits, coadd, f"{arm}_RESOLUTION", rows, len(tid)) for arm in ARMS}
            if with_resolution and all(f"{a}_RESOLUTION" in hdu_names(fits) for a in ARMS)
            else None
        )
    meta["N_INVALID_PIX"] = n_invalid
    sources = {"coadd": str(coadd)}
    if redrock is not None:
        sources["redrock"] = str(redrock)
    if catalog is not None:
        sources["catalog"] = catalog.path
    return ObservedSpectra(wave, flux, ivar, mask, meta, sources, resolution)


def _attach_redshifts(
    fibermap: pd.DataFrame,
    zinfo: pd.DataFrame | None,
    catalog: QSOCatalog | None,
    selection: QSOSelection,
    coadd: Path,
    redrock: str | Path | None,
) -> pd.DataFrame:
    """Join redshift information on TARGETID and mark the selected rows in ``_SELECTED``."""
    meta = fibermap.copy()
    tid = meta["TARGETID"].to_numpy(np.int64)
    selected = np.ones(len(meta), dtype=bool)
    if zinfo is not None:
        ztid = zinfo["TARGETID"].to_numpy(np.int64)
        if len(ztid) != len(tid) or not np.array_equal(np.sort(ztid), np.sort(tid)):
            only_coadd = np.setdiff1d(tid, ztid)
            only_rr = np.setdiff1d(ztid, tid)
            raise DesiFormatError(
                coadd,
                f"TARGETID mismatch with redrock file {redrock}: {len(only_coadd)} only in the "
                f"coadd (e.g. {only_coadd[:3].tolist()}), {len(only_rr)} only in redrock "
                f"(e.g. {only_rr[:3].tolist()})",
            )
        meta = meta.merge(zinfo, on="TARGETID", how="left", validate="one_to_one")
        use_cuts = catalog is None or selection.redrock_cuts_with_catalog
        if use_cuts and selection.spectype is not None:
            selected &= meta["SPECTYPE"].to_numpy() == selection.spectype
        if use_cuts and selection.zwarn_zero:
            selected &= meta["ZWARN"].to_numpy() == 0
    if selection.fiberstatus_zero and "COADD_FIBERSTATUS" in meta:
        selected &= meta["COADD_FIBERSTATUS"].to_numpy() == 0
    if catalog is not None:
        pos = catalog.locate(tid)
        listed = pos >= 0
        selected &= listed
        meta["Z"] = np.where(listed, catalog.z[np.maximum(pos, 0)], np.nan)
        for col, values in (("TARGET_RA", catalog.ra), ("TARGET_DEC", catalog.dec)):
            if values is not None and col not in fibermap:
                meta[col] = np.where(listed, values[np.maximum(pos, 0)], np.nan)
    for col in ("TARGET_RA", "TARGET_DEC", "ZERR", "DELTACHI2"):
        if col not in meta:
            meta[col] = np.nan
    meta["_SELECTED"] = selected
    return meta


def _attach_exposures(fits: fitsio.FITS, path: Path, meta: pd.DataFrame) -> pd.DataFrame:
    """TILEID, FIBER and LASTNIGHT of each target's latest exposure (EXP_FIBERMAP, if present)."""
    if "EXP_FIBERMAP" not in hdu_names(fits):
        return meta
    cols = {c.upper() for c in fits["EXP_FIBERMAP"].get_colnames()}
    wanted = [c for c in ("TILEID", "FIBER", "NIGHT") if c in cols]
    if "TARGETID" not in cols or not wanted:
        return meta
    exp = read_table(fits, path, "EXP_FIBERMAP", ("TARGETID",), wanted)
    exp = exp[exp["TARGETID"].isin(meta["TARGETID"])]
    if "NIGHT" in exp:
        exp = exp.sort_values(["TARGETID", "NIGHT"], kind="stable")
    last = exp.groupby("TARGETID", sort=False).tail(1).rename(columns={"NIGHT": "LASTNIGHT"})
    meta = meta.drop(columns=[c for c in last.columns if c != "TARGETID" and c in meta])
    return meta.merge(last, on="TARGETID", how="left", validate="one_to_one")


def _read_merged_arms(
    fits: fitsio.FITS, path: Path, rows: np.ndarray, strict: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read the selected rows of each arm and merge them onto one grid by ivar weighting."""
    waves = {arm: _read_wavelength(fits, path, arm) for arm in ARMS}
    wave, offsets = merged_grid(waves, path)
    n = len(rows)
    nfib = fits["FIBERMAP"].get_nrows()
    weighted = np.zeros((n, len(wave)), dtype=np.float64)
    ivar_sum = np.zeros((n, len(wave)), dtype=np.float64)
    merged_mask = np.zeros((n, len(wave)), dtype=np.uint32)
    any_good = np.zeros((n, len(wave)), dtype=bool)
    n_invalid = np.zeros(n, dtype=np.int64)
    for arm in ARMS:
        npix = len(waves[arm])
        flux, ivar, mask = (
            _read_rows(fits, path, f"{arm}_{part}", rows, nfib, npix)
            for part in ("FLUX", "IVAR", "MASK")
        )
        flux, ivar, mask = flux.astype(np.float64), ivar.astype(np.float64), mask.astype(np.uint32)
        invalid = ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar < 0)
        if invalid.any():
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
        good_ivar = np.where(mask == 0, ivar, 0.0)
        sl = slice(offsets[arm], offsets[arm] + npix)
        weighted[:, sl] += good_ivar * flux
        ivar_sum[:, sl] += good_ivar
        merged_mask[:, sl] |= mask
        any_good[:, sl] |= mask == 0
    # A merged pixel is bad only if every arm covering it is bad.
    merged_mask[any_good] = 0
    flux = np.divide(weighted, ivar_sum, out=np.zeros_like(weighted), where=ivar_sum > 0)
    return wave, flux.astype(np.float32), ivar_sum.astype(np.float32), merged_mask, n_invalid


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
    """Read only ``rows`` (sorted) of an image HDU whose first axis is the spectrum index.

    Contiguous runs of rows are read with one call each, so a sparse selection costs a few
    small reads instead of the whole image.
    """
    hdu = fits[ext]
    dims = tuple(hdu.get_dims())
    if dims[0] != nfib:
        raise DesiFormatError(path, f"{ext} has {dims[0]} rows but FIBERMAP has {nfib}")
    if npix is not None and dims != (nfib, npix):
        raise DesiFormatError(path, f"{ext} has shape {dims}, expected ({nfib}, {npix})")
    rest = (slice(None),) * (len(dims) - 1)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    runs = zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True) if len(rows) else []
    chunks = [hdu[(slice(int(rows[s]), int(rows[e - 1]) + 1), *rest)] for s, e in runs]
    if not chunks:
        return np.zeros((0, *dims[1:]), dtype=np.float32)
    return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
