"""Score quality of a finished run on a mock drop, against the drop's truth table.

For ``desi-anomaly run``/``demo`` outputs (``DIR/scores.parquet``) and the mock drop's
``truth.parquet``: per injected class the AUROC of ANOMALY_SCORE and of RECON_RCHI2 against the
normal spectra, the number with q < alpha, the Spearman rank correlation of the score with S/N on
normal spectra (the issue's aim: |rho| < 0.1; also for the train split, which the VAE trained on,
and the other splits apart), the share of normal spectra reconstructed with
reduced chi2 < 1.5, and the smallest p- and q-values.

    python benchmarks/truth_report.py demo-out            # truth in demo-out/data/truth.parquet
    python benchmarks/truth_report.py DIR --truth DATA/truth.parquet
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from desi_anomaly.ml.significance import snr_dependence
from desi_anomaly.splits import assign_split

RCHI2_GOOD = 1.5


def class_table(scores: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """One row per injected class: N, AUROC of the score and of RECON_RCHI2, N with q < alpha."""
    normal = scores["ANOMALY"] == "none"
    rows = []
    for kind in sorted(set(scores["ANOMALY"]) - {"none"}):
        pair = scores[normal | (scores["ANOMALY"] == kind)]
        label = pair["ANOMALY"] == kind
        rows.append(
            {
                "ANOMALY": kind,
                "N": int(label.sum()),
                "AUROC_score": roc_auc_score(label, pair["ANOMALY_SCORE"].fillna(-np.inf)),
                "AUROC_recon_rchi2": roc_auc_score(label, pair["RECON_RCHI2"].fillna(np.inf)),
                "N_q_below_alpha": int((pair.loc[label, "Q_VALUE"] < alpha).sum()),
            }
        )
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="output folder of the run (with scores.parquet)")
    ap.add_argument("--truth", type=Path, help="truth table (default OUT/data/truth.parquet)")
    ap.add_argument("--alpha", type=float, default=0.01)
    args = ap.parse_args()
    truth = pd.read_parquet(args.truth or args.out / "data" / "truth.parquet")
    scores = pd.read_parquet(args.out / "scores.parquet").merge(
        truth[["TARGETID", "ANOMALY"]], on="TARGETID", how="left", validate="one_to_one"
    )
    normal = scores[scores["ANOMALY"] == "none"]
    ok = normal["ANOMALY_SCORE"].notna()
    print(f"{len(scores)} scored spectra, {len(normal)} without injected anomalies")
    print(
        f"smallest p-value {scores['P_VALUE'].min():.2e}, smallest q-value "
        f"{scores['Q_VALUE'].min():.3f}, {int((scores['Q_VALUE'] < args.alpha).sum())} with "
        f"q < {args.alpha}"
    )
    rho = snr_dependence(normal.loc[ok, "ANOMALY_SCORE"], normal.loc[ok, "SNR_MEDIAN"])
    print(f"Spearman rho(score, S/N) on normal spectra: {rho:+.3f}")
    seen = assign_split(normal["TARGETID"].to_numpy()) == "train"
    for label, rows in (("in", ok & seen), ("not in", ok & ~seen)):
        rho = snr_dependence(normal.loc[rows, "ANOMALY_SCORE"], normal.loc[rows, "SNR_MEDIAN"])
        print(f"  {int(rows.sum())} {label} the VAE's train split: {rho:+.3f}")
    share = float((normal["RECON_RCHI2"] < RCHI2_GOOD).mean())
    print(f"normal spectra with reconstruction reduced chi2 < {RCHI2_GOOD}: {share:.1%}")
    print(class_table(scores, args.alpha).to_string(index=False, float_format="%.3f"))


if __name__ == "__main__":
    main()
