"""Shared fixtures: the real-data folder (skipped where absent) and small mock data drops."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real DESI/SDSS spectra); tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data folder {SHARED_DATA} is absent (only in the project workspace)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_drop(tmp_path_factory) -> Path:
    """A small mock data drop: 3 healpix files of 40 QSOs among 60 other targets."""
    from desi_anomaly.mock import generate_drop

    root = tmp_path_factory.mktemp("drop")
    generate_drop(root, 3, 40, seed=11, others_per_tile=60, anomaly_fraction=0.1)
    return root
