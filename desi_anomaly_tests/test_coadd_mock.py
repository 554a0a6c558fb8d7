"""The reader on mock DESI files: selection, provenance, compressed files, rows actually read."""

from __future__ import annotations

import gzip
import os
import shutil
import warnings
from pathlib import Path

import fitsio
import numpy as np
import pandas as pd
import pytest

from desi_anomaly.io.coadd import QSOSelection, read_qso_spectra
from desi_anomaly.io.fitsutil import read_image_rows
from desi_anomaly.io.partitions import discover
from desi_anomaly.io.redshifts import QSOCatalog


@pytest.fixture(scope="module")
def truth(small_drop) -> pd.DataFrame:
    return pd.read_parquet(small_drop / "truth.parquet")


def test_selection_matches_truth(small_drop, truth):
    for files in discover(small_drop).complete:
        spectra = read_qso_spectra(files.coadd, files.redrock)
        expected = truth[(truth["PARTITION"] == str(files.key)) & truth["IS_QSO_SELECTED"]]
        assert sorted(spectra.targetid) == sorted(expected["TARGETID"])
        assert (spectra.meta["SPECTYPE"] == "QSO").all() and (spectra.meta["ZWARN"] == 0).all()
        z_truth = expected.set_index("TARGETID").loc[spectra.targetid, "Z"].to_numpy()
        assert np.allclose(spectra.z, z_truth, atol=0.01)


def test_selection_is_configurable(small_drop, truth):
    files = discover(small_drop).complete[0]
    strict = read_qso_spectra(files.coadd, files.redrock)
    loose = read_qso_spectra(
        files.coadd, files.redrock, selection=QSOSelection(zwarn_zero=False, fiberstatus_zero=False)
    )
    in_file = truth[truth["PARTITION"] == str(files.key)]
    assert len(loose) == (in_file["SPECTYPE"] == "QSO").sum() > len(strict)
    everything = read_qso_spectra(
        files.coadd,
        files.redrock,
        selection=QSOSelection(spectype=None, zwarn_zero=False, fiberstatus_zero=False),
    )
    assert len(everything) == len(in_file)


def test_provenance_columns(small_drop):
    files = discover(small_drop).complete[0]
    spectra = read_qso_spectra(files.coadd, files.redrock)
    meta = spectra.meta
    for col in (
        "TARGET_RA",
        "TARGET_DEC",
        "Z",
        "ZERR",
        "DELTACHI2",
        "TILEID",
        "FIBER",
        "LASTNIGHT",
    ):
        assert col in meta and meta[col].notna().all(), col
    exp = fitsio.read(str(files.coadd), "EXP_FIBERMAP", columns=["TARGETID", "NIGHT", "TILEID"])
    tid = spectra.targetid[0]
    nights = exp["NIGHT"][exp["TARGETID"] == tid]
    assert meta["LASTNIGHT"].iloc[0] == nights.max()
    assert spectra.sources == {"coadd": str(files.coadd), "redrock": str(files.redrock)}


def test_gzipped_files_read_the_same(small_drop, tmp_path):
    files = discover(small_drop).complete[0]
    plain = read_qso_spectra(files.coadd, files.redrock)
    gz = []
    for src in (files.coadd, files.redrock):
        dst = tmp_path / (src.name + ".gz")
        with open(src, "rb") as fin, gzip.open(dst, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        gz.append(dst)
    packed = read_qso_spectra(*gz)
    assert np.array_equal(plain.flux, packed.flux) and np.array_equal(plain.ivar, packed.ivar)
    pd.testing.assert_frame_equal(plain.meta, packed.meta)


def test_qso_catalogue_is_the_redshift_source(small_drop, tmp_path):
    files = discover(small_drop).complete[0]
    base = read_qso_spectra(files.coadd, files.redrock)
    tids = base.targetid[:5]
    cat_path = tmp_path / "qso_cat.fits"
    fitsio.write(
        str(cat_path),
        np.rec.fromarrays([tids, np.full(5, 2.5)], names=["TARGETID", "Z"]),
        extname="QSO_CAT",
    )
    catalog = QSOCatalog.read(cat_path)
    spectra = read_qso_spectra(files.coadd, files.redrock, catalog=catalog)
    assert sorted(spectra.targetid) == sorted(tids)
    assert np.allclose(spectra.z, 2.5)
    assert spectra.sources["catalog"] == str(cat_path)
    # The catalogue alone is enough.
    alone = read_qso_spectra(files.coadd, catalog=catalog)
    assert np.array_equal(np.sort(alone.targetid), np.sort(tids))


def test_reads_only_selected_rows_and_needed_hdus(small_drop, tmp_path):
    """Poison every byte the reader must not touch: non-QSO rows and the SCORES data."""
    files = discover(small_drop).complete[0]
    clean = read_qso_spectra(files.coadd, files.redrock)
    coadd = Path(shutil.copy(files.coadd, tmp_path / files.coadd.name))
    fibermap_tid = fitsio.read(str(coadd), "FIBERMAP", columns=["TARGETID"])["TARGETID"]
    unselected = np.flatnonzero(~np.isin(fibermap_tid, clean.targetid))
    with fitsio.FITS(str(coadd)) as fits:
        spans = []
        for hdu in fits[1:]:
            name = hdu.get_extname()
            offsets = hdu.get_offsets()
            start, end = offsets["data_start"], offsets["data_end"]
            if name == "SCORES":
                spans.append((start, end - start))
            elif name.endswith(("_FLUX", "_IVAR")):
                row = hdu.get_dims()[1] * abs(hdu.read_header()["BITPIX"]) // 8
                spans += [(start + int(r) * row, row) for r in unselected]
    fd = os.open(coadd, os.O_WRONLY)
    try:
        for offset, length in spans:
            os.pwrite(fd, b"\xff" * length, offset)  # 0xffffffff is a NaN in float32
    finally:
        os.close(fd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        poisoned = read_qso_spectra(coadd, files.redrock)
    assert np.array_equal(poisoned.flux, clean.flux)
    assert np.array_equal(poisoned.ivar, clean.ivar)


@pytest.mark.parametrize("gzipped", [False, True])
def test_image_rows_match_fitsio(tmp_path, gzipped):
    """Direct row reads agree with fitsio for every BITPIX, unsigned (BZERO) and scaled images."""
    rng = np.random.default_rng(0)
    path = tmp_path / "images.fits"
    images = {
        "F32": rng.normal(size=(20, 7)).astype(np.float32),
        "F64": rng.normal(size=(20, 7)),
        "I16": rng.integers(-5, 5, (20, 7)).astype(np.int16),
        "U16": rng.integers(0, 2**16, (20, 7)).astype(np.uint16),
        "I32": rng.integers(-(2**31), 2**31, (20, 7)).astype(np.int32),
        "U32": rng.integers(0, 2**32, (20, 7)).astype(np.uint32),
        "U8": rng.integers(0, 256, (20, 7)).astype(np.uint8),
        "CUBE": rng.normal(size=(20, 3, 7)).astype(np.float32),
    }
    with fitsio.FITS(str(path), "rw", clobber=True) as fits:
        for name, data in images.items():
            fits.write(data, extname=name)
        fits.write(
            rng.integers(0, 100, (20, 7)).astype(np.int16),
            extname="SCALED",
            header=[{"name": "BSCALE", "value": 0.5}, {"name": "BZERO", "value": 3.0}],
        )
    if gzipped:
        with open(path, "rb") as fin, gzip.open(tmp_path / "images.fits.gz", "wb") as fout:
            shutil.copyfileobj(fin, fout)
        path = tmp_path / "images.fits.gz"
    rows = np.array([0, 1, 2, 5, 9, 10, 19])
    with fitsio.FITS(str(path)) as fits:
        for name in [*images, "SCALED"]:
            got = read_image_rows(fits, path, name, rows)
            want = fits[name].read()[rows]
            assert got.dtype == want.dtype.newbyteorder("="), name
            assert np.array_equal(got, want), name
        assert read_image_rows(fits, path, "F32", rows[:0]).shape == (0, 7)


def test_repeated_catalogue_rows_keep_the_latest(tmp_path):
    path = tmp_path / "cat.fits"
    rows = np.rec.fromarrays(
        [np.array([5, 3, 5, 9]), np.array([1.0, 2.0, 1.5, 3.0]), np.array([1, 1, 2, 1])],
        names=["TARGETID", "Z", "LASTNIGHT"],
    )
    fitsio.write(str(path), rows)
    with pytest.warns(UserWarning, match="1 repeated TARGETID"):
        catalog = QSOCatalog.read(path)
    assert catalog.targetid.tolist() == [3, 5, 9]
    assert catalog.z.tolist() == [2.0, 1.5, 3.0]
    assert catalog.locate(np.array([9, 4, 3])).tolist() == [2, -1, 0]
