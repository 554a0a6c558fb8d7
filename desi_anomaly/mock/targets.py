"""Target bookkeeping of a healpix coadd: TARGETIDs, sky positions, FIBERMAP, EXP_FIBERMAP, SCORES
and the redrock REDSHIFTS table, with the columns, dtypes and conventions of DESI files."""

from __future__ import annotations

import healpy as hp
import numpy as np

from desi_anomaly.io.instrument import HPX_NSIDE

#: desitarget DESI_TARGET bits.
DESI_TARGET_BITS = {
    "LRG": 1 << 0,
    "ELG": 1 << 1,
    "QSO": 1 << 2,
    "BGS_ANY": 1 << 60,
    "MWS_ANY": 1 << 61,
}
#: redrock ZWARN bits used here.
ZWARN_SMALL_DELTA_CHI2 = 1 << 2
ZWARN_BAD_MINFLUX = 1 << 10
ZWARN_NODATA = 1 << 9
#: desispec fibermask bits used here.
FIBERSTATUS_BROKENFIBER = 1 << 2
FIBERSTATUS_BADPOSITION = 1 << 9
FIBERSTATUS_LOWEFFTIME = 1 << 15
DR9_RELEASE = 9010
_FINE_ORDER = 14  # sub-pixels of 4^14 per nside-64 pixel (~0.2 arcsec)


def choose_healpix(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct nested nside-64 pixels inside a DESI-like footprint (-10 < dec < 70)."""
    npix = hp.nside2npix(HPX_NSIDE)
    theta, _ = hp.pix2ang(HPX_NSIDE, np.arange(npix), nest=True)
    dec = 90.0 - np.degrees(theta)
    candidates = np.flatnonzero((dec > -10) & (dec < 70))
    return np.sort(rng.choice(candidates, n, replace=False)).astype(np.int64)


def sky_positions(healpix: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RA, Dec (deg) of ``n`` points uniform inside one nested nside-64 pixel."""
    sub = rng.integers(0, 4**_FINE_ORDER, n, dtype=np.int64)
    fine = np.int64(healpix) * 4**_FINE_ORDER + sub
    theta, phi = hp.pix2ang(HPX_NSIDE * 2**_FINE_ORDER, fine, nest=True)
    return np.degrees(phi), 90.0 - np.degrees(theta)


def target_ids(healpix: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """DESI-style TARGETIDs (RELEASE << 42 | BRICKID << 22 | BRICK_OBJID), unique per healpix."""
    brickid = np.int64(healpix) + 100_000  # a pseudo brick per healpix keeps ids distinct
    objid = np.sort(rng.choice(2**22, n, replace=False)).astype(np.int64)
    return (np.int64(DR9_RELEASE) << 42) | (brickid << 22) | objid


def fibermap(
    targetid, ra, dec, desi_target, objtype, fiberstatus, exposures, photometry
) -> np.ndarray:
    """The coadded FIBERMAP table (one row per target)."""
    n = len(targetid)
    cols = [
        ("TARGETID", "i8"), ("COADD_FIBERSTATUS", "i4"), ("TARGET_RA", "f8"), ("TARGET_DEC", "f8"),
        ("PMRA", "f4"), ("PMDEC", "f4"), ("REF_EPOCH", "f4"), ("FA_TARGET", "i8"),
        ("FA_TYPE", "u1"),
        ("OBJTYPE", "S3"), ("SUBPRIORITY", "f8"), ("OBSCONDITIONS", "i4"), ("RELEASE", "i2"),
        ("BRICKID", "i4"), ("BRICK_OBJID", "i4"), ("MORPHTYPE", "S4"), ("EBV", "f4"),
        ("FLUX_G", "f4"), ("FLUX_R", "f4"), ("FLUX_Z", "f4"), ("PHOTSYS", "S1"),
        ("DESI_TARGET", "i8"), ("BGS_TARGET", "i8"), ("MWS_TARGET", "i8"), ("SCND_TARGET", "i8"),
        ("COADD_NUMEXP", "i2"), ("COADD_EXPTIME", "f4"), ("COADD_NUMNIGHT", "i2"),
        ("COADD_NUMTILE", "i2"), ("MEAN_FIBER_RA", "f8"), ("MEAN_FIBER_DEC", "f8"),
        ("MIN_MJD", "f8"), ("MEAN_MJD", "f8"), ("MAX_MJD", "f8"),
    ]  # fmt: skip
    out = np.zeros(n, dtype=cols)
    out["TARGETID"] = targetid
    out["COADD_FIBERSTATUS"] = fiberstatus
    out["TARGET_RA"], out["TARGET_DEC"] = ra, dec
    out["REF_EPOCH"] = 2015.5
    out["FA_TARGET"] = desi_target
    out["FA_TYPE"] = 1
    out["OBJTYPE"] = objtype
    out["SUBPRIORITY"] = np.linspace(0, 1, n, endpoint=False)
    out["OBSCONDITIONS"] = 1
    out["RELEASE"] = targetid >> 42
    out["BRICKID"] = (targetid >> 22) & (2**20 - 1)
    out["BRICK_OBJID"] = targetid & (2**22 - 1)
    out["MORPHTYPE"] = np.where((desi_target & DESI_TARGET_BITS["QSO"]) != 0, "PSF", "REX")
    out["EBV"] = 0.03
    for band in ("G", "R", "Z"):
        out[f"FLUX_{band}"] = photometry[band]
    out["PHOTSYS"] = np.where(dec > 32.375, "N", "S")
    out["DESI_TARGET"] = desi_target
    out["MWS_TARGET"] = np.where((desi_target & DESI_TARGET_BITS["MWS_ANY"]) != 0, 1, 0)
    exp = exposures
    order = np.searchsorted(targetid, exp["TARGETID"], sorter=np.argsort(targetid))
    rows = np.argsort(targetid)[order]
    out["COADD_NUMEXP"] = np.bincount(rows, minlength=n)
    out["COADD_EXPTIME"] = np.bincount(rows, weights=exp["EXPTIME"], minlength=n)
    for name, col in (("COADD_NUMNIGHT", "NIGHT"), ("COADD_NUMTILE", "TILEID")):
        pairs = np.unique(np.stack([rows, exp[col].astype(np.int64)]), axis=1)
        out[name] = np.bincount(pairs[0], minlength=n)
    out["MEAN_FIBER_RA"], out["MEAN_FIBER_DEC"] = ra, dec
    mjd = exp["MJD"]
    out["MIN_MJD"] = np.full(n, np.inf)
    np.minimum.at(out["MIN_MJD"], rows, mjd)
    out["MAX_MJD"] = np.full(n, -np.inf)
    np.maximum.at(out["MAX_MJD"], rows, mjd)
    out["MEAN_MJD"] = np.bincount(rows, weights=mjd, minlength=n) / out["COADD_NUMEXP"]
    return out


def exposures(
    targetid: np.ndarray, ra: np.ndarray, dec: np.ndarray, healpix: int, rng: np.random.Generator
) -> np.ndarray:
    """EXP_FIBERMAP: 1-4 exposures per target from a few tiles overlapping the healpix."""
    n = len(targetid)
    ntile = int(rng.integers(2, 5))
    tiles = np.sort(rng.choice(np.arange(1000, 42000), ntile, replace=False))
    # each tile observed on one night with a few exposures; MJD 59200-60400 (2021-2024)
    mjd0 = np.sort(rng.uniform(59200.0, 60400.0, ntile)).round() + 0.2
    nexp = rng.choice([1, 2, 3, 4], n, p=[0.45, 0.3, 0.15, 0.1])
    row_target = np.repeat(np.arange(n), nexp)
    tile_idx = rng.integers(0, ntile, row_target.size)
    cols = [
        ("TARGETID", "i8"), ("PRIORITY", "i4"), ("SUBPRIORITY", "f8"), ("NIGHT", "i4"),
        ("EXPID", "i4"), ("MJD", "f8"), ("TILEID", "i4"), ("EXPTIME", "f4"), ("PETAL_LOC", "i2"),
        ("DEVICE_LOC", "i4"), ("LOCATION", "i8"), ("FIBER", "i4"), ("FIBERSTATUS", "i4"),
        ("FIBERASSIGN_X", "f4"), ("FIBERASSIGN_Y", "f4"), ("LAMBDA_REF", "f4"),
        ("PLATE_RA", "f8"), ("PLATE_DEC", "f8"), ("FIBER_RA", "f8"), ("FIBER_DEC", "f8"),
        ("IN_COADD_B", "b1"), ("IN_COADD_R", "b1"), ("IN_COADD_Z", "b1"),
    ]  # fmt: skip
    out = np.zeros(row_target.size, dtype=cols)
    out["TARGETID"] = targetid[row_target]
    out["PRIORITY"] = 3400
    out["TILEID"] = tiles[tile_idx]
    exp_in_tile = rng.integers(0, 3, row_target.size)
    out["MJD"] = mjd0[tile_idx] + 0.02 * exp_in_tile
    out["NIGHT"] = _mjd_to_night(mjd0[tile_idx])
    out["EXPID"] = 70000 + 10 * tile_idx + exp_in_tile + 1000 * (healpix % 50)
    out["EXPTIME"] = rng.uniform(700.0, 1200.0, row_target.size)
    petal = rng.integers(0, 10, n)
    device = rng.integers(1, 543, n)
    out["PETAL_LOC"] = petal[row_target]
    out["DEVICE_LOC"] = device[row_target]
    out["LOCATION"] = 1000 * out["PETAL_LOC"] + out["DEVICE_LOC"]
    out["FIBER"] = 500 * out["PETAL_LOC"] + rng.integers(0, 500, n)[row_target]
    out["LAMBDA_REF"] = 5400.0
    out["PLATE_RA"] = out["FIBER_RA"] = ra[row_target]
    out["PLATE_DEC"] = out["FIBER_DEC"] = dec[row_target]
    out["IN_COADD_B"] = out["IN_COADD_R"] = out["IN_COADD_Z"] = True
    return out


def _mjd_to_night(mjd: np.ndarray) -> np.ndarray:
    """YYYYMMDD of the local (UTC-7) evening of each MJD."""
    days = np.floor(mjd - 0.5 - 7 / 24 + 0.5).astype("int64")  # MJD day of local evening
    dates = np.datetime64("1858-11-17") + days.astype("timedelta64[D]")
    text = np.datetime_as_string(dates, unit="D")
    return np.char.replace(text, "-", "").astype(np.int32)


def scores(targetid: np.ndarray, ivar: dict[str, np.ndarray]) -> np.ndarray:
    """SCORES: template S/N^2 per arm, proportional to the summed ivar (effective depth)."""
    cols = [("TARGETID", "i8")]
    for tracer in ("QSO", "LYA"):
        cols += [(f"TSNR2_{tracer}_{arm}", "f4") for arm in ("B", "R", "Z")]
    out = np.zeros(len(targetid), dtype=cols)
    out["TARGETID"] = targetid
    weight = {"QSO": {"B": 2e-3, "R": 2e-3, "Z": 1e-3}, "LYA": {"B": 0.02, "R": 1e-3, "Z": 0.0}}
    for tracer, per_arm in weight.items():
        for arm, w in per_arm.items():
            out[f"TSNR2_{tracer}_{arm}"] = w * ivar[arm].sum(axis=1, dtype=np.float64)
    return out


def redshifts(
    targetid, z, zwarn, spectype, subtype, deltachi2, npixels, rng: np.random.Generator
) -> np.ndarray:
    """The redrock REDSHIFTS table, rows in FIBERMAP order."""
    cols = [("TARGETID", "i8"), ("CHI2", "f8"), ("COEFF", "f8", (10,)), ("Z", "f8"), ("ZERR", "f8"),
            ("ZWARN", "i8"), ("NPIXELS", "i8"), ("SPECTYPE", "S6"), ("SUBTYPE", "S20"),
            ("NCOEFF", "i8"), ("DELTACHI2", "f8")]  # fmt: skip
    n = len(targetid)
    out = np.zeros(n, dtype=cols)
    out["TARGETID"] = targetid
    out["Z"] = z
    out["ZERR"] = np.abs(rng.normal(0, 1, n)) * 1e-4 * (1 + z)
    out["ZWARN"] = zwarn
    out["SPECTYPE"] = spectype
    out["SUBTYPE"] = subtype
    out["NCOEFF"] = np.where(spectype == "QSO", 4, np.where(spectype == "STAR", 5, 10))
    out["COEFF"] = rng.normal(0, 1, (n, 10)) * (np.arange(10)[None, :] < out["NCOEFF"][:, None])
    out["NPIXELS"] = npixels
    out["CHI2"] = npixels * rng.normal(1.05, 0.05, n)
    out["DELTACHI2"] = deltachi2
    return out
