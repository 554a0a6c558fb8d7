"""``run_all``: materialise every asset of the graph on one data root through Dagster, in this
process (backs ``desi-anomaly run DATA_ROOT --out DIR`` and ``make demo``).

1. Complete coadd + redrock pairs are registered as healpix partitions.
2. Each partition is ingested (raw_spectra -> cleaned_spectra) in its own run, so a corrupt file
   fails only its partition; failed partitions are reported, unregistered and left out.
3. One run materialises the rest over the whole partition range: vae_checkpoint, latents,
   anomaly_detector, anomaly_scores, anomaly_clusters, anomaly_catalog.
4. The catalog outputs are published in ``out_dir``: scores.parquet, catalog.parquet,
   catalog.fits and catalog.duckdb (hard links to the files under ``out_dir/catalog``).

Run history goes to ``instance`` (default: the instance of ``$DAGSTER_HOME`` when set, else a
persistent one under ``out_dir/.dagster``, which ``dagster dev`` can open with
``DAGSTER_HOME=out_dir/.dagster``).
"""

import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from .assets import ASSETS, PARTITIONS_NAME, cleaned_spectra, raw_spectra
from .resources import DataRootResource, PipelineSettings, StorageResource, ray_from_env

PUBLISHED = {
    "scores": "scores.parquet",
    "catalog_parquet": "catalog.parquet",
    "catalog_fits": "catalog.fits",
    "duckdb": "catalog.duckdb",
}
DOWNSTREAM = [
    "vae_checkpoint",
    "latents",
    "anomaly_detector",
    "anomaly_scores",
    "anomaly_clusters",
    "anomaly_catalog",
    "injection_recovery",
]


@dataclass
class RunAllResult:
    """What ``run_all`` produced."""

    partitions: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    catalog: pd.DataFrame | None = None
    run_ids: list[str] = field(default_factory=list)
    success: bool = False


def default_instance(out_dir: Path) -> dg.DagsterInstance:
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    home = out_dir / ".dagster"
    home.mkdir(parents=True, exist_ok=True)
    return dg.DagsterInstance.local_temp(tempdir=str(home))


def register_partitions(instance: dg.DagsterInstance, keys: Sequence[str]) -> list[str]:
    """Register the keys not registered yet (sorted); returns the newly added ones."""
    known = set(instance.get_dynamic_partitions(PARTITIONS_NAME))
    new = sorted(k for k in keys if k not in known)
    if new:
        instance.add_dynamic_partitions(PARTITIONS_NAME, new)
    return new


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            err = event.step_failure_data.error
            user = getattr(event.step_failure_data, "user_failure_data", None)
            if user is not None and user.description:
                return user.description
            if err is not None:
                return err.message.strip()
    return "run failed"


def publish(paths: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Hard-link (copy where linking fails) the catalog outputs into ``out_dir``."""
    published = {}
    for name, filename in PUBLISHED.items():
        src = paths.get(name)
        if src is None or not Path(src).is_file():
            continue
        target = out_dir / filename
        tmp = out_dir / f".{filename}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, target)
        published[name] = target
    return published


def run_all(
    data_root: str | Path,
    out_dir: str | Path,
    *,
    settings: PipelineSettings | None = None,
    ray_cluster: Any = None,
    instance: dg.DagsterInstance | None = None,
    duckdb_path: str | None = None,
    n_top: int = 10,
    echo: Callable[[str], None] | None = None,
    log_level: str = "WARNING",
) -> RunAllResult:
    """Materialise every asset on ``data_root`` with outputs under ``out_dir`` (see module doc).

    ``settings``: stage settings and check thresholds (default ``PipelineSettings()``);
    ``ray_cluster``: a dagster-ray resource (default from ``DESI_ANOMALY_RAY_ADDRESS``, else a
    local runtime on 127.0.0.1 shut down after the run). ``echo`` receives progress lines
    (default: stderr) and the top ``n_top`` anomalies; Dagster's console log shows ``log_level``
    and above (the full event log is in the instance either way).
    """
    from desi_anomaly.io.partitions import discover

    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    data_root, out_dir = Path(data_root).absolute(), Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    instance = instance or default_instance(out_dir)
    resources = {
        "data_root": DataRootResource(root=str(data_root)),
        "storage": StorageResource(root=str(out_dir), duckdb_path=duckdb_path),
        "ray_cluster": ray_cluster if ray_cluster is not None else ray_from_env(),
        "settings": settings or PipelineSettings(),
    }
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    found = discover(data_root)
    result = RunAllResult(partitions=[str(f.key) for f in found.complete], waiting=found.incomplete)
    for key, problem in found.incomplete.items():
        echo(f"waiting: {key}: {problem}")
    if not result.partitions:
        echo(f"no complete coadd + redrock pair under {data_root}")
        return result
    register_partitions(instance, result.partitions)
    echo(f"1/2 ingesting {len(result.partitions)} partitions (one run each)")
    for i, key in enumerate(result.partitions, 1):
        run = dg.materialize(
            [raw_spectra, cleaned_spectra],
            instance=instance,
            resources=resources,
            partition_key=key,
            run_config=run_config,
            raise_on_error=False,
            tags={"desi_anomaly/run_all": "ingest"},
        )
        result.run_ids.append(run.run_id)
        if run.success:
            echo(f"  [{i}/{len(result.partitions)}] {key}: ok")
        else:
            result.failed[key] = _failure_message(run)
            echo(f"  [{i}/{len(result.partitions)}] {key}: FAILED {result.failed[key]}")
    for key in result.failed:  # left out of the range run below; the sensor re-adds it later
        instance.delete_dynamic_partition(PARTITIONS_NAME, key)
    keys = [k for k in instance.get_dynamic_partitions(PARTITIONS_NAME) if k not in result.failed]
    if not keys:
        echo("no partition was ingested")
        return result
    echo(f"2/2 training, encoding, scoring and cataloguing {len(keys)} partitions")
    run = dg.materialize(
        ASSETS,
        selection=DOWNSTREAM,
        instance=instance,
        resources=resources,
        run_config=run_config,
        raise_on_error=False,
        tags={
            ASSET_PARTITION_RANGE_START_TAG: keys[0],
            ASSET_PARTITION_RANGE_END_TAG: keys[-1],
            "desi_anomaly/run_all": "discovery",
        },
    )
    result.run_ids.append(run.run_id)
    if not run.success:
        echo(f"FAILED: {_failure_message(run)}")
    event = instance.get_latest_materialization_event(dg.AssetKey("anomaly_catalog"))
    if event is None or event.run_id != run.run_id:  # no catalog from this run
        return result
    meta = event.asset_materialization.metadata if event.asset_materialization else {}
    outputs = dict(meta["outputs"].value) if "outputs" in meta else {}
    result.outputs = publish(outputs, out_dir)
    if "catalog_parquet" in result.outputs:
        result.catalog = pd.read_parquet(result.outputs["catalog_parquet"])
    result.success = run.success and not result.failed
    for name, path in result.outputs.items():
        echo(f"{name}: {path}")
    if result.catalog is not None:
        scores = result.outputs.get("scores")
        candidates = pd.read_parquet(scores) if result.catalog.empty and scores else None
        echo(top_anomalies_text(result.catalog, n_top, candidates))
    return result


def top_anomalies_text(
    catalog: pd.DataFrame, n: int = 10, scores: pd.DataFrame | None = None
) -> str:
    """The catalog's top ``n`` rows; for an empty catalog, the ``n`` highest-scoring spectra of
    ``scores`` (if given), labelled as candidates rather than discoveries."""
    shown = ("RANK", "TARGETID", "PARTITION", "Z", "ANOMALY_SCORE", "P_VALUE", "Q_VALUE", "TYPE")
    if not catalog.empty:
        head = catalog.sort_values("RANK").head(n) if "RANK" in catalog else catalog.head(n)
        cols = [c for c in shown if c in head]
        return f"{len(catalog)} anomalies; top {len(head)}:\n" + head[cols].to_string(index=False)
    text = "no significant anomalies (q < alpha)"
    if scores is None or scores.empty:
        return text
    head = scores.nlargest(n, "ANOMALY_SCORE")
    cols = [c for c in shown if c in head]
    return (
        f"{text}; the {len(head)} highest-scoring spectra (candidates for inspection, "
        f"not discoveries):\n" + head[cols].to_string(index=False)
    )
