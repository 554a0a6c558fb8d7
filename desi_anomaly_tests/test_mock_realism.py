"""Mock quasars against real DESI EDR and SDSS DR16 quasars (skipped without ../shared/data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

pytestmark = pytest.mark.skipif(
    not (SHARED / "templates").is_dir() or not (SHARED / "sdss-dr16").is_dir(),
    reason=f"real spectra not available at {SHARED} (shared test data is not part of the repo)",
)


@pytest.fixture(scope="module")
def tables():
    from desi_anomaly.mock.realism import compare

    return compare(SHARED, per_real=2, seed=1, max_sdss=40)


@pytest.mark.parametrize("real", ["desi", "sdss"])
def test_template_chi2_of_mock_within_factor_two_of_real(tables, real):
    """Real-quasar eigenspectra fit mock quasars as well as real ones at the same z and S/N."""
    real_chi2 = tables[real]["chi2_red"].median()
    mock_chi2 = tables[f"mock_{real}"]["chi2_red"].median()
    assert 0.5 < mock_chi2 / real_chi2 < 2.0, (mock_chi2, real_chi2)
    assert np.allclose(np.sort(tables[real]["z"].repeat(2)), np.sort(tables[f"mock_{real}"]["z"]))


def test_variance_explained_at_high_snr_similar(tables):
    real = tables["sdss"].query("snr > 5")["var_explained"].median()
    mock = tables["mock_sdss"].query("snr > 5")["var_explained"].median()
    assert abs(real - mock) < 0.1, (real, mock)


def test_continuum_slope_and_line_strengths_like_sdss(tables):
    real, mock = tables["sdss"], tables["mock_sdss"]
    assert abs(real["alpha_nu"].median() - mock["alpha_nu"].median()) < 0.3
    for line in ("ew_civ", "ew_mgii"):
        ratio = mock[line].median() / real[line].median()
        assert 0.6 < ratio < 1.6, (line, ratio)
