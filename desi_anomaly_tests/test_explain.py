"""Explanations of anomalies (residuals, driving regions, names) and their plots."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from desi_anomaly.catalog.explain import (
    explain,
    explain_catalog,
    name_region,
    regions_table,
)
from desi_anomaly.catalog.plots import plot_top_anomalies
from desi_anomaly.preprocess import DEFAULT_GRID
from desi_anomaly.preprocess.skylines import SKY_LINES_VACUUM

WAVE = DEFAULT_GRID.centres
Z = 2.0
SKY_5578 = float(SKY_LINES_VACUUM[np.argmin(np.abs(SKY_LINES_VACUUM - 5579.0))])


def quasar_model(z: float = Z) -> tuple[np.ndarray, np.ndarray]:
    """A smooth QSO-like model on the rest grid and the coverage of the DESI observed range."""
    obs = WAVE * (1 + z)
    coverage = (obs > 3600) & (obs < 9824)
    model = (WAVE / 2000.0) ** -1.5
    for centre, amp, sigma in ((1549.06, 1.5, 25.0), (1908.73, 0.6, 30.0), (2798.75, 0.8, 35.0)):
        model = model + amp * np.exp(-0.5 * ((WAVE - centre) / sigma) ** 2)
    return model, coverage


def spectrum(seed: int, *, trough: bool, sky_spike: bool):
    rng = np.random.default_rng(seed)
    model, coverage = quasar_model()
    ivar = np.where(coverage, 100.0, 0.0)  # S/N 10 per pixel on the continuum
    flux = model + rng.normal(size=WAVE.size) / 10.0
    if trough:  # BAL-like trough 5000-13000 km/s blueward of C IV
        sl = (WAVE > 1549.06 * np.exp(-13000 / 3e5)) & (WAVE < 1549.06 * np.exp(-5000 / 3e5))
        flux[sl] -= 0.5 * model[sl]
    if sky_spike:
        flux[np.argmin(np.abs(WAVE * (1 + Z) - SKY_5578))] += 2.0
    flux[~coverage] = np.nan
    return flux, ivar, model.astype(np.float32), coverage


def row(targetid: int = 39627, rank: int = 1) -> dict:
    return {
        "TARGETID": targetid,
        "PARTITION": "main-dark-9557",
        "Z": Z,
        "Q_VALUE": 3e-6,
        "TYPE": "BAL-like",
        "RANK": rank,
        "EW_CIV": 42.0,
        "BI_CIV": 1800.0,
    }


def test_residual_and_frames():
    flux, ivar, model, coverage = spectrum(0, trough=False, sky_spike=False)
    ivar[1200] = 0.0
    cov = coverage.copy()
    cov[1300] = False
    e = explain(row(), WAVE, flux, ivar, model, coverage=cov)
    good = coverage & (ivar > 0) & cov
    np.testing.assert_allclose(e.residual[good], ((flux - model) * np.sqrt(ivar))[good], rtol=1e-6)
    assert np.all(e.residual[~good] == 0.0) and np.all(np.isfinite(e.residual))
    np.testing.assert_allclose(e.obs_wave, WAVE * 3.0)
    assert e.features == {"EW_CIV": 42.0, "BI_CIV": 1800.0}
    assert e.info["TYPE"] == "BAL-like" and "EW_CIV" not in e.info
    assert 0.8 < e.rchi2 < 1.2
    assert e.regions == []  # pure noise drives nothing


def test_driving_regions_found_ranked_and_named():
    flux, ivar, model, coverage = spectrum(1, trough=True, sky_spike=True)
    e = explain(row(), WAVE, flux, ivar, model, coverage=coverage)
    first = e.regions[0]
    assert first.sign == "absorption" and first.feature == "CIV 1549 (blue side)"
    v_lo, v_hi = (3e5 * np.log(1549.06 / w) for w in (first.rest_hi, first.rest_lo))
    assert 4000 < v_lo < 6000 and 12000 < v_hi < 14000
    assert first.obs_lo == pytest.approx(first.rest_lo * 3.0)
    assert first.chi2_fraction > 0.3
    sky = [r for r in e.regions if r.feature.startswith("sky line")]
    assert len(sky) == 1 and sky[0].sign == "excess"
    assert sky[0].obs_lo <= SKY_5578 <= sky[0].obs_hi
    assert [r.chi2 for r in e.regions] == sorted((r.chi2 for r in e.regions), reverse=True)


@pytest.mark.parametrize(
    ("rest", "z", "expected"),
    [
        ((2790.0, 2810.0), 0.5, "MgII 2799 (core)"),
        ((1560.0, 1600.0), 2.0, "CIV 1549 (red side)"),
        ((7540.0 / 3, 7600.0 / 3), 2.0, "arm seam 7520-7620 A obs"),
        ((5000.0 / 3, 9000.0 / 3), 2.0, "CIII] 1909 (core)"),  # wide: not a seam
        ((2400.0, 2450.0), 1.0, "FeII UV 2250-2650"),
        ((3100.0, 3150.0), 1.0, "continuum"),
        ((1549.0, 1551.0), 2.6, "sky line 5579 A obs"),
    ],
)
def test_name_region(rest, z, expected):
    assert name_region(*rest, z) == expected


def test_explain_catalog_and_regions_table():
    cat = pd.DataFrame([row(1, 1), row(2, 2), row(3, 3)])
    spectra = [spectrum(s, trough=t, sky_spike=False) for s, t in ((5, True), (6, False))]
    flux, ivar, model, _ = (np.stack(a) for a in zip(*spectra, strict=True))
    expls = explain_catalog(cat, np.array([3, 1]), WAVE, flux, ivar, model)
    assert [e.targetid for e in expls] == [1, 3]  # catalog order; TARGETID 2 has no spectrum
    table = regions_table(expls)
    assert list(table.columns[:4]) == ["TARGETID", "REGION_RANK", "REST_LO", "REST_HI"]
    assert set(table["TARGETID"]) == {3}  # the noise spectrum has no region
    assert regions_table([]).empty


def test_plots_written_and_legible_size(tmp_path):
    expls = []
    for i in range(4):
        flux, ivar, model, coverage = spectrum(10 + i, trough=i % 2 == 0, sky_spike=True)
        expls.append(explain(row(100 + i, i + 1), WAVE, flux, ivar, model, coverage=coverage))
    paths = plot_top_anomalies(expls, tmp_path, n_grid=4)
    assert [p.name for p in paths[:2]] == ["anomaly_00001_100.png", "anomaly_00002_101.png"]
    assert paths[-1].name == "top_anomalies.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    image = imread(paths[0])
    assert image.shape[:2] == (715, 1210)  # 11 x 6.5 inches at 110 dpi
    assert image[..., :3].std() > 0.05  # not blank
