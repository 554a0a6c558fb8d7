"""Mock DESI data drops: realistic QSO, galaxy and star spectra in the DESI release file layout,
with injected anomalies and a truth table (``generate_drop``)."""

from .anomalies import ANOMALY_KINDS, inject
from .drop import TRUTH_NAME, DropSummary, generate_drop

__all__ = ["ANOMALY_KINDS", "TRUTH_NAME", "DropSummary", "generate_drop", "inject"]
