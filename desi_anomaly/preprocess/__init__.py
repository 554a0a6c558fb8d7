"""Preprocessing of observed QSO spectra: sky-line and bad-pixel masking, flux-conserving
resampling onto a common rest-frame grid, robust normalisation, quality cuts with counted drop
reasons, and spectral features (continuum slope, broad-line EW/FWHM, C IV balnicity).
Plain numpy/scipy: no Dagster, no file I/O.

    from desi_anomaly.preprocess import preprocess
    cleaned = preprocess(observed_spectra)  # -> CleanedSpectra
    cleaned.flux, cleaned.ivar, cleaned.coverage, cleaned.meta, cleaned.drop_counts()
"""

from .features import BROAD_LINES, BroadLine, feature_columns, measure_features
from .grid import RestFrameGrid
from .pipeline import DEFAULT_GRID, CleanedSpectra, PreprocessConfig, PreprocessError, preprocess
from .quality import DROP_REASONS
from .resample import RestFrameSpectra, resample_to_rest
from .skylines import SKY_LINES_VACUUM, sky_line_mask

__all__ = [
    "BROAD_LINES",
    "DEFAULT_GRID",
    "DROP_REASONS",
    "SKY_LINES_VACUUM",
    "BroadLine",
    "CleanedSpectra",
    "PreprocessConfig",
    "PreprocessError",
    "RestFrameGrid",
    "RestFrameSpectra",
    "feature_columns",
    "measure_features",
    "preprocess",
    "resample_to_rest",
    "sky_line_mask",
]
