"""The reader on real DESI EDR files (skipped where ../shared/data is absent)."""

from pathlib import Path

import fitsio
import numpy as np
import pytest

from desi_anomaly.errors import DesiFormatError
from desi_anomaly.io.coadd import read_qso_spectra
from desi_anomaly.io.redshifts import QSOCatalog


@pytest.fixture(scope="module")
def edr(shared_data) -> Path:
    return shared_data / "desi-edr"


def test_tile_coadd_with_qso_catalogue(edr):
    catalog = QSOCatalog.read(edr / "QSO_cat_fuji_dark_tile.fits.gz")
    coadd = edr / "tile/cumulative/coadd-1-80693-thru20210204.fits"
    spectra = read_qso_spectra(coadd, catalog=catalog)
    fibermap = fitsio.read(str(coadd), "FIBERMAP", columns=["TARGETID"])
    assert len(spectra) == 5
    assert np.array_equal(spectra.targetid, fibermap["TARGETID"])
    # Redshift, sky position and tile come from the catalogue / FIBERMAP, matched by TARGETID.
    pos = catalog.locate(spectra.targetid)
    assert np.allclose(spectra.z, catalog.z[pos])
    assert (spectra.meta["TILEID"] == 80693).all()
    assert spectra.meta["TARGET_RA"].between(120, 140).all()
    # Merged grid: B 3600-5800, R 5760-7620, Z 7520-9824 on 0.8 A steps -> 7781 pixels.
    assert len(spectra.wave) == 7781
    assert spectra.wave[0] == pytest.approx(3600.0) and spectra.wave[-1] == pytest.approx(9824.0)
    assert spectra.flux.dtype == np.float32 and spectra.resolution is None


def test_arm_merge_is_inverse_variance_weighted(edr):
    catalog = QSOCatalog.read(edr / "QSO_cat_fuji_dark_tile.fits.gz")
    coadd = edr / "tile/cumulative/coadd-2-80693-thru20210204.fits"
    spectra = read_qso_spectra(coadd, catalog=catalog)
    b_wave = fitsio.read(str(coadd), "B_WAVELENGTH")
    r_wave = fitsio.read(str(coadd), "R_WAVELENGTH")
    bf, bi, bm = (fitsio.read(str(coadd), f"B_{x}").astype(float) for x in ("FLUX", "IVAR", "MASK"))
    rf, ri, rm = (fitsio.read(str(coadd), f"R_{x}").astype(float) for x in ("FLUX", "IVAR", "MASK"))
    # A pixel in the B/R overlap.
    w = 5780.0
    jb = int(np.argmin(abs(b_wave - w)))
    jr = int(np.argmin(abs(r_wave - w)))
    jm = int(np.argmin(abs(spectra.wave - w)))
    wb, wr = bi[:, jb] * (bm[:, jb] == 0), ri[:, jr] * (rm[:, jr] == 0)
    expected = (wb * bf[:, jb] + wr * rf[:, jr]) / np.where(wb + wr > 0, wb + wr, 1)
    assert np.allclose(spectra.ivar[:, jm], wb + wr, rtol=1e-5)
    assert np.allclose(spectra.flux[:, jm], expected, rtol=1e-4, atol=1e-4)
    # Outside the overlaps the merged spectrum is the arm's own.
    jb = int(np.argmin(abs(b_wave - 4500.0)))
    jm = int(np.argmin(abs(spectra.wave - 4500.0)))
    good = bm[:, jb] == 0
    assert np.allclose(spectra.flux[good, jm], bf[good, jb], rtol=1e-5)


@pytest.mark.parametrize("survey", ["main", "sv3"])
def test_healpix_coadd_in_release_layout(edr, survey):
    catalog = QSOCatalog.read(edr / "QSO_cat_fuji_dark_healpix_with_main.fits.gz")
    spectra = read_qso_spectra(
        edr / f"{survey}/dark/91/9144/coadd-{survey}-dark-9144.fits", catalog=catalog
    )
    assert len(spectra) == 2
    assert sorted(np.round(spectra.z, 2)) == [1.94, 2.16]
    # This FIBERMAP has only TARGETID: the sky position comes from the catalogue.
    assert np.isfinite(spectra.meta[["TARGET_RA", "TARGET_DEC"]].to_numpy()).all()
    good = spectra.ivar > 0
    assert good.mean() > 0.9 and np.isfinite(spectra.flux).all()


def test_resolution_only_when_asked(edr):
    catalog = QSOCatalog.read(edr / "QSO_cat_fuji_dark_tile.fits.gz")
    coadd = edr / "tile/cumulative/coadd-1-80693-thru20210204.fits"
    spectra = read_qso_spectra(coadd, catalog=catalog, with_resolution=True)
    assert spectra.resolution["B"].shape == (5, 11, 2751)


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("missing_b_color.fits", "B_FLUX"),
        ("missing_z_color.fits", "Z_FLUX"),
        ("missing_scores.fits", "SCORES"),
        ("spectra-main-dark-9144.fits", "B_WAVELENGTH"),
    ],
)
def test_bad_format_files_give_clear_errors(edr, name, missing):
    catalog = QSOCatalog.read(edr / "QSO_cat_fuji_dark_healpix_with_main.fits.gz")
    path = edr / "bad_format" / name
    with pytest.raises(DesiFormatError, match="missing HDU") as info:
        read_qso_spectra(path, catalog=catalog)
    assert info.value.path == str(path)
    assert missing in info.value.problem
