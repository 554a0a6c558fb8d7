"""Write healpix coadd and redrock files with the HDUs, dtypes and keywords of DESI files."""

from __future__ import annotations

from pathlib import Path

import fitsio
import numpy as np

from desi_anomaly.atomic import atomic_path
from desi_anomaly.io.instrument import (
    ARMS,
    FLUX_UNIT,
    HPX_NSIDE,
    IVAR_UNIT,
    WAVE_UNIT,
    arm_wavelength,
)
from desi_anomaly.io.partitions import PartitionKey

from .sky import NDIAG, resolution_data

RESOLUTION_CHUNK = 256  # spectra per RESOLUTION write: bounds memory for big files


def primary_header(key: PartitionKey, seed: int) -> list[dict]:
    """Keywords of a DESI healpix coadd primary header (plus the mock provenance)."""
    return [
        {"name": "SPGRP", "value": "healpix"},
        {"name": "SPGRPVAL", "value": key.healpix},
        {"name": "HPXPIXEL", "value": key.healpix},
        {"name": "HPXNSIDE", "value": HPX_NSIDE},
        {"name": "HPXNEST", "value": "True"},  # a string in DESI files
        {"name": "SURVEY", "value": key.survey},
        {"name": "PROGRAM", "value": key.program},
        {"name": "LONGSTRN", "value": "OGIP 1.0"},
        {"name": "MOCK", "value": True, "comment": "desi-anomaly mock data drop"},
        {"name": "MOCKSEED", "value": seed, "comment": "seed of desi_anomaly.mock.generate_drop"},
    ]


def write_coadd(
    path: str | Path,
    key: PartitionKey,
    seed: int,
    fibermap: np.ndarray,
    exp_fibermap: np.ndarray,
    flux: dict[str, np.ndarray],
    ivar: dict[str, np.ndarray],
    mask: dict[str, np.ndarray],
    scores: np.ndarray,
    lsf_scale: np.ndarray | None = None,
) -> None:
    """Write one coadd file atomically; RESOLUTION HDUs (from ``lsf_scale``) in row chunks."""
    with atomic_path(path) as tmp, fitsio.FITS(str(tmp), "rw", clobber=True) as fits:
        fits.write(None, header=primary_header(key, seed))
        fits.write(fibermap, extname="FIBERMAP")
        fits.write(exp_fibermap, extname="EXP_FIBERMAP")
        for arm in ARMS:
            fits.write(arm_wavelength(arm), extname=f"{arm}_WAVELENGTH",
                       header=[{"name": "BUNIT", "value": WAVE_UNIT}])  # fmt: skip
            fits.write(flux[arm].astype(np.float32), extname=f"{arm}_FLUX",
                       header=[{"name": "BUNIT", "value": FLUX_UNIT}])  # fmt: skip
            fits.write(ivar[arm].astype(np.float32), extname=f"{arm}_IVAR",
                       header=[{"name": "BUNIT", "value": IVAR_UNIT}])  # fmt: skip
            fits.write(mask[arm].astype(np.uint32), extname=f"{arm}_MASK")
            if lsf_scale is not None:
                _write_resolution(fits, arm, lsf_scale)
        fits.write(scores, extname="SCORES")


def _write_resolution(fits: fitsio.FITS, arm: str, lsf_scale: np.ndarray) -> None:
    npix = len(arm_wavelength(arm))
    n = len(lsf_scale)
    extname = f"{arm}_RESOLUTION"
    fits.create_image_hdu(dims=[n, NDIAG, npix], dtype="f4", extname=extname)
    hdu = fits[extname]
    for start in range(0, n, RESOLUTION_CHUNK):
        rows = slice(start, min(start + RESOLUTION_CHUNK, n))
        hdu.write(resolution_data(arm, lsf_scale[rows]), start=[start, 0, 0])


def write_redrock(
    path: str | Path, redshifts: np.ndarray, fibermap: np.ndarray, exp_fibermap: np.ndarray,
    scores: np.ndarray,
) -> None:  # fmt: skip
    """Write one redrock file atomically: REDSHIFTS, FIBERMAP, EXP_FIBERMAP, TSNR2."""
    with atomic_path(path) as tmp, fitsio.FITS(str(tmp), "rw", clobber=True) as fits:
        fits.write(None, header=[{"name": "SPGRP", "value": "healpix"}])
        fits.write(redshifts, extname="REDSHIFTS")
        fits.write(fibermap, extname="FIBERMAP")
        fits.write(exp_fibermap, extname="EXP_FIBERMAP")
        fits.write(scores, extname="TSNR2")
