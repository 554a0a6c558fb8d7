"""Asset checks, evaluated by the asset that produced the data (``check_specs``) from the files it
wrote: shards non-empty and finite, drop rate per reason within bounds, latents and scores finite,
reconstruction accuracy of held-out normal spectra, uniformity of calibration p-values (KS),
unique TARGETIDs and q-values monotone in rank in the catalog. Thresholds come from the
``settings`` resource (``PipelineSettings``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from .metadata import markdown_table

ERROR = dg.AssetCheckSeverity.ERROR
WARN = dg.AssetCheckSeverity.WARN


def _spec(name: str, asset: str, description: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(name, asset=asset, description=description)


CLEANED_CHECKS = [
    _spec(
        "shard_nonempty_finite",
        "cleaned_spectra",
        "Every shard holds at least one spectrum (WARN if empty) and FLUX/IVAR are finite, with "
        "IVAR >= 0, wherever IVAR > 0 (ERROR otherwise).",
    ),
    _spec(
        "drop_rate_within_bounds",
        "cleaned_spectra",
        "The fraction of read QSO spectra dropped for each reason, and in total, is within the "
        "bounds of the settings resource.",
    ),
]
LATENTS_CHECKS = [
    _spec(
        "latents_finite",
        "latents",
        "One row per cleaned spectrum, every LATENT component finite.",
    )
]
SCORES_CHECKS = [
    _spec(
        "scores_valid",
        "anomaly_scores",
        "P_VALUE in (0, 1] for every spectrum; ANOMALY_SCORE finite wherever RECON_RCHI2 is.",
    )
]
CATALOG_CHECKS = [
    _spec("targetids_unique", "anomaly_catalog", "Each TARGETID appears once in the catalog."),
    _spec(
        "qvalues_monotone_in_rank",
        "anomaly_catalog",
        "Q_VALUE never decreases with catalog rank.",
    ),
    _spec(
        "reconstruction_accuracy",
        "anomaly_catalog",
        "Share of held-out (not train split) normal (q >= alpha) spectra whose reconstruction "
        "reduced chi2 is below recon_rchi2_max is at least recon_min_share (default 1.5, 0.95).",
    ),
    _spec(
        "pvalue_uniformity",
        "anomaly_catalog",
        "Conformal p-values of the calibration split are uniform: one-sample KS test p-value of "
        "at least min_ks_pvalue.",
    ),
]


# --------------------------------------------------------------------------------------------


def shard_problems(path: str | Path) -> tuple[int, list[str]]:
    """Rows of a cleaned shard and a list of its non-finite problems."""
    from desi_anomaly.shards import read_shard

    shard = read_shard(path)
    flux, ivar = shard.flux, shard.ivar
    problems = []
    if not np.isfinite(ivar).all() or (ivar < 0).any():
        problems.append("IVAR not finite or negative")
    with np.errstate(invalid="ignore"):
        used = ivar > 0
    if not np.isfinite(flux[used]).all():
        problems.append("FLUX not finite where IVAR > 0")
    return len(shard), problems


def cleaned_check_results(results, n_read: int, drops: dict[str, int], settings):
    rows, empty, bad = [], [], {}
    for r in results:
        n, problems = shard_problems(r.shard)
        rows.append((r.key, n, "; ".join(problems) or "ok"))
        if n == 0:
            empty.append(r.key)
        if problems:
            bad[r.key] = problems
    shard_check = dg.AssetCheckResult(
        check_name="shard_nonempty_finite",
        asset_key="cleaned_spectra",
        passed=not empty and not bad,
        severity=ERROR if bad else WARN,
        metadata={
            "shards": dg.MetadataValue.md(markdown_table(("partition", "rows", "finite"), rows)),
            "empty": dg.MetadataValue.json(empty),
        },
    )
    rates = {reason: (count / n_read if n_read else 0.0) for reason, count in drops.items()}
    total = sum(drops.values()) / n_read if n_read else 0.0
    over = {r: v for r, v in rates.items() if v > settings.max_drop_rate_per_reason}
    passed = not over and total <= settings.max_drop_rate_total
    drop_check = dg.AssetCheckResult(
        check_name="drop_rate_within_bounds",
        asset_key="cleaned_spectra",
        passed=passed,
        severity=WARN,
        metadata={
            "rates": dg.MetadataValue.md(
                markdown_table(
                    ("reason", "rate", "bound"),
                    [(r, v, settings.max_drop_rate_per_reason) for r, v in sorted(rates.items())]
                    + [("(total)", total, settings.max_drop_rate_total)],
                )
            ),
            "over_bound": dg.MetadataValue.json(over),
            "total_drop_rate": dg.MetadataValue.float(total),
        },
    )
    return [shard_check, drop_check]


def latents_check_results(layout, keys: Sequence[str]):
    problems = {}
    n_total = 0
    for key in keys:
        table = pq.read_table(layout.latents(key), columns=["LATENT"])
        n = table.num_rows
        n_total += n
        n_shard = pq.read_metadata(layout.cleaned(key)).num_rows
        flat = table.column("LATENT").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        if n != n_shard:
            problems[key] = f"{n} latents for {n_shard} cleaned spectra"
        elif not np.isfinite(flat).all():
            problems[key] = "non-finite LATENT values"
    return [
        dg.AssetCheckResult(
            check_name="latents_finite",
            asset_key="latents",
            passed=not problems,
            severity=ERROR,
            metadata={
                "rows": dg.MetadataValue.int(n_total),
                "problems": dg.MetadataValue.json(problems),
            },
        )
    ]


def scores_check_results(paths: Sequence[Path]):
    problems = {}
    for path in paths:
        df = pd.read_parquet(path, columns=["P_VALUE", "ANOMALY_SCORE", "RECON_RCHI2"])
        p = df["P_VALUE"].to_numpy(dtype=float)
        has_chi2 = np.isfinite(df["RECON_RCHI2"].to_numpy(dtype=float))
        score_ok = np.isfinite(df["ANOMALY_SCORE"].to_numpy(dtype=float))
        if not (np.isfinite(p).all() and (p > 0).all() and (p <= 1).all()):
            problems[path.stem] = "P_VALUE outside (0, 1]"
        elif not score_ok[has_chi2].all():
            problems[path.stem] = "ANOMALY_SCORE not finite where RECON_RCHI2 is"
    return [
        dg.AssetCheckResult(
            check_name="scores_valid",
            asset_key="anomaly_scores",
            passed=not problems,
            severity=ERROR,
            metadata={"problems": dg.MetadataValue.json(problems)},
        )
    ]


# --------------------------------------------------------------------------------------------


def all_scores(layout, keys: Sequence[str], paths: dict[str, Path]) -> pd.DataFrame:
    """SPLIT, RECON_RCHI2 and P_VALUE of every scored spectrum (per-partition score files), with
    Q_VALUE from the catalog stage's merged scores file when it has them."""
    wanted = ["TARGETID", "PARTITION", "SPLIT", "RECON_RCHI2", "P_VALUE"]
    frames = []
    for key in keys:
        path = layout.scores(key)
        names = pq.read_schema(path).names
        frames.append(pd.read_parquet(path, columns=[c for c in wanted if c in names]))
    scores = pd.concat(frames, ignore_index=True)
    merged = paths.get("scores")
    if merged is not None and Path(merged).is_file():
        names = pq.read_schema(merged).names
        on = [c for c in ("TARGETID", "PARTITION") if c in names and c in scores]
        if "Q_VALUE" in names and "TARGETID" in on:
            q = pd.read_parquet(merged, columns=[*on, "Q_VALUE"])
            scores = scores.merge(q, on=on, how="left", validate="one_to_one")
    return scores


def reconstruction_accuracy(scores: pd.DataFrame, alpha: float, rchi2_max: float):
    """Share of held-out normal spectra with RECON_RCHI2 < rchi2_max, and how many were used."""
    held_out = scores["SPLIT"] != "train" if "SPLIT" in scores else np.ones(len(scores), bool)
    sig = scores["Q_VALUE"] if "Q_VALUE" in scores else scores["P_VALUE"]
    normal = held_out & (sig >= alpha) & np.isfinite(scores["RECON_RCHI2"])
    r = scores.loc[normal, "RECON_RCHI2"].to_numpy(dtype=float)
    return (float((r < rchi2_max).mean()) if len(r) else float("nan")), len(r)


def pvalue_uniformity(scores: pd.DataFrame) -> dict[str, tuple[float, float, int]]:
    """KS statistic, KS p-value and count of P_VALUE against U(0, 1) per split."""
    from scipy.stats import kstest

    out = {}
    splits = scores["SPLIT"] if "SPLIT" in scores else pd.Series("all", index=scores.index)
    for split in sorted(splits.unique()):
        p = scores.loc[splits == split, "P_VALUE"].to_numpy(dtype=float)
        p = p[np.isfinite(p)]
        if len(p):
            res = kstest(p, "uniform")
            out[str(split)] = (float(res.statistic), float(res.pvalue), len(p))
    return out


def catalog_check_results(layout, keys, catalog: pd.DataFrame, paths, settings):
    results = []
    dup = catalog["TARGETID"][catalog["TARGETID"].duplicated()].unique()
    results.append(
        dg.AssetCheckResult(
            check_name="targetids_unique",
            asset_key="anomaly_catalog",
            passed=len(dup) == 0,
            severity=ERROR,
            metadata={
                "rows": dg.MetadataValue.int(len(catalog)),
                "duplicated": dg.MetadataValue.json([int(t) for t in dup[:20]]),
            },
        )
    )
    ordered = catalog.sort_values("RANK") if "RANK" in catalog else catalog
    q = ordered["Q_VALUE"].to_numpy(dtype=float) if "Q_VALUE" in ordered else np.array([])
    breaks = int((np.diff(q) < 0).sum()) if len(q) > 1 else 0
    results.append(
        dg.AssetCheckResult(
            check_name="qvalues_monotone_in_rank",
            asset_key="anomaly_catalog",
            passed=breaks == 0 and "Q_VALUE" in ordered,
            severity=ERROR,
            metadata={"decreases": dg.MetadataValue.int(breaks)},
        )
    )
    scores = all_scores(layout, keys, paths)
    share, n = reconstruction_accuracy(scores, settings.alpha, settings.recon_rchi2_max)
    results.append(
        dg.AssetCheckResult(
            check_name="reconstruction_accuracy",
            asset_key="anomaly_catalog",
            passed=bool(n) and share >= settings.recon_min_share,
            severity=WARN,
            metadata={
                "share_below_threshold": dg.MetadataValue.float(share),
                "n_held_out_normal": dg.MetadataValue.int(n),
                "rchi2_max": dg.MetadataValue.float(settings.recon_rchi2_max),
                "min_share": dg.MetadataValue.float(settings.recon_min_share),
            },
        )
    )
    ks = pvalue_uniformity(scores)
    calib = ks.get("calibration")
    results.append(
        dg.AssetCheckResult(
            check_name="pvalue_uniformity",
            asset_key="anomaly_catalog",
            passed=calib is not None and calib[1] >= settings.min_ks_pvalue,
            severity=WARN,
            metadata={
                "ks": dg.MetadataValue.md(
                    markdown_table(
                        ("split", "KS statistic", "KS p-value", "n"),
                        [(s, *v) for s, v in ks.items()],
                    )
                ),
                "calibration_ks_pvalue": dg.MetadataValue.float(
                    calib[1] if calib else float("nan")
                ),
            },
        )
    )
    return results
