"""Validation: injection-recovery of synthetic anomalies (ensemble vs a PCA baseline) and
recovery of known anomalous quasars by sky cross-match. Plain library code, no Dagster.

    from desi_anomaly.validation import (
        METHOD_COLUMNS, add_qvalues, fit_detectors, inject_and_score, recovery_table,
    )
    det = fit_detectors(vae, train_cleaned, calibration_cleaned)
    scored = inject_and_score(det, observed_test_spectra, ["bal", "dla"], rng)
    table = recovery_table(add_qvalues(scored.table), METHOD_COLUMNS)  # AUROC, recall per bin

    matches = crossmatch_known(scores, read_known_anomalies("SQuAD_I_catalog.csv"))
"""

from .baseline import PCABaseline
from .injection import (
    NO_ANOMALY,
    InjectionError,
    check_kinds,
    concat_observed,
    inject_spectra,
    take,
    with_labels,
)
from .known import (
    KnownListError,
    crossmatch_known,
    known_recovery,
    merge_known,
    read_known_anomalies,
    recovery_summary,
)
from .metrics import (
    REPORT_SNR_EDGES,
    REPORT_Z_EDGES,
    export_adbench,
    read_adbench,
    recovery_table,
    side_by_side,
)
from .recovery import (
    METHODS,
    Detectors,
    ScoredSpectra,
    add_qvalues,
    concat_cleaned,
    encode,
    fit_detectors,
    inject_and_score,
    score_cleaned,
)

#: ``recovery_table`` methods argument for the two compared methods: name -> (score, q, p column).
METHOD_COLUMNS = {name: (score, q, p) for name, (score, p, q) in METHODS.items()}

__all__ = [
    "METHODS",
    "METHOD_COLUMNS",
    "NO_ANOMALY",
    "REPORT_SNR_EDGES",
    "REPORT_Z_EDGES",
    "Detectors",
    "InjectionError",
    "KnownListError",
    "PCABaseline",
    "ScoredSpectra",
    "add_qvalues",
    "check_kinds",
    "concat_cleaned",
    "concat_observed",
    "crossmatch_known",
    "encode",
    "export_adbench",
    "fit_detectors",
    "inject_and_score",
    "inject_spectra",
    "known_recovery",
    "merge_known",
    "read_adbench",
    "read_known_anomalies",
    "recovery_summary",
    "recovery_table",
    "score_cleaned",
    "side_by_side",
    "take",
    "with_labels",
]
