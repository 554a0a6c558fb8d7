"""Jobs, sensors and the periodic backfill of missing or stale partitions.

- ``new_data_drops`` (sensor): scans the data root for complete coadd + redrock pairs
  (``desi_anomaly.io.partitions.discover``), registers new healpix partitions and requests an
  ``ingest_partitions`` run for every new or changed pair (size or mtime differ from the cursor, a
  JSON map key -> [coadd size, coadd mtime_ns, redrock size, redrock mtime_ns]). At most
  ``DESI_ANOMALY_SENSOR_MAX_RUNS`` partitions (default 500) are handled per tick; the rest wait
  for the next tick, so a tick stays short on a full release. Incomplete pairs wait.
- ``backfill_stale_partitions`` (interval sensor, every ``DESI_ANOMALY_BACKFILL_INTERVAL_S``
  seconds, default 6 h): launches one asset backfill of the partitions whose cleaned shard,
  latents or scores are missing or stale (latents from another checkpoint, scores older than the
  detector or their latents). The backfill runs under each asset's multi-run backfill policy.
  Dagster's schedule daemon cannot launch backfills (only runs), the sensor daemon can, hence an
  interval sensor rather than a cron schedule.
- ``rescore_all`` (job): re-encodes and re-scores every partition, refits the detector and
  rebuilds clusters and catalog in one run over the whole partition range;
  ``rescore_after_new_checkpoint`` (asset sensor) launches it when ``vae_checkpoint`` changes.
"""

import hashlib
import json
import os
from pathlib import Path

import dagster as dg
from dagster._core.definitions.assets.graph.asset_graph_subset import AssetGraphSubset
from dagster._core.definitions.events import AssetKeyPartitionKey
from dagster._core.execution.backfill import BulkActionsFilter, BulkActionStatus
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from .assets import (
    PARTITIONS_NAME,
    anomaly_catalog,
    anomaly_clusters,
    anomaly_detector,
    anomaly_scores,
    cleaned_spectra,
    healpix_partitions,
    latents,
    raw_spectra,
    vae_checkpoint,
)
from .resources import DataRootResource, StorageResource

CURSOR_VERSION = 1
MAX_RUNS_PER_TICK = int(os.environ.get("DESI_ANOMALY_SENSOR_MAX_RUNS", "500"))
BACKFILL_INTERVAL_S = int(os.environ.get("DESI_ANOMALY_BACKFILL_INTERVAL_S", str(6 * 3600)))
BACKFILL_TAG = "desi_anomaly/backfill"

ingest_partitions = dg.define_asset_job(
    "ingest_partitions",
    selection=[raw_spectra, cleaned_spectra],
    description="Record, validate and clean the files of healpix partitions.",
)
rescore_all = dg.define_asset_job(
    "rescore_all",
    selection=[latents, anomaly_detector, anomaly_scores, anomaly_clusters, anomaly_catalog],
    description=(
        "After a new checkpoint: re-encode and re-score every partition, refit the detector, "
        "rebuild clusters and catalog. Launch it over the whole partition range "
        "(rescore_all_request), not partition by partition."
    ),
)


# --------------------------------------------------------------------------------------------
# new_data_drops


def scan_data_root(root: str | Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Fingerprints (sizes and mtimes) of every complete pair, and the incomplete partitions."""
    from desi_anomaly.io.partitions import discover

    found = discover(root)
    prints = {}
    for files in found.complete:
        try:
            c, r = os.stat(files.coadd), os.stat(files.redrock)
        except FileNotFoundError:  # removed since the scan: it waits for the next tick
            continue
        prints[str(files.key)] = [c.st_size, c.st_mtime_ns, r.st_size, r.st_mtime_ns]
    return prints, found.incomplete


def read_cursor(cursor: str | None) -> dict[str, list[int]]:
    if not cursor:
        return {}
    data = json.loads(cursor)
    if data.get("version") != CURSOR_VERSION:
        return {}
    return {k: list(v) for k, v in data["files"].items()}


def write_cursor(files: dict[str, list[int]]) -> str:
    return json.dumps({"version": CURSOR_VERSION, "files": files}, separators=(",", ":"))


def run_key(key: str, fingerprint: list[int]) -> str:
    digest = hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:16]
    return f"{key}:{digest}"


def evaluate_new_data(
    root: str | Path, cursor: str | None, registered: set[str], max_runs: int = MAX_RUNS_PER_TICK
):
    """One tick of ``new_data_drops`` as plain data: (run requests as (key, run_key), partitions
    to register, new cursor, number left for later ticks, incomplete partitions)."""
    seen = read_cursor(cursor)
    current, incomplete = scan_data_root(root)
    changed = sorted(k for k, fp in current.items() if seen.get(k) != fp)
    todo, later = changed[:max_runs], len(changed) - min(len(changed), max_runs)
    new_cursor = {k: v for k, v in seen.items() if k in current}  # forget removed pairs
    for key in todo:
        new_cursor[key] = current[key]
    to_register = [k for k in todo if k not in registered]
    requests = [(k, run_key(k, current[k])) for k in todo]
    return requests, to_register, write_cursor(new_cursor), later, incomplete


@dg.sensor(
    job=ingest_partitions,
    minimum_interval_seconds=60,
    description=(
        "Watches the data root for complete coadd + redrock pairs; registers new healpix "
        "partitions and requests an ingest run for new or changed files (size/mtime)."
    ),
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def new_data_drops(context: dg.SensorEvaluationContext, data_root: DataRootResource):
    registered = set(context.instance.get_dynamic_partitions(PARTITIONS_NAME))
    requests, to_register, cursor, later, incomplete = evaluate_new_data(
        data_root.path, context.cursor, registered
    )
    for key, problem in sorted(incomplete.items())[:20]:
        context.log.info(f"waiting for {key}: {problem}")
    if later:
        context.log.info(f"{later} more new or changed partitions are left for the next ticks")
    if not requests:
        return dg.SensorResult(
            skip_reason=f"no new or changed pairs ({len(incomplete)} incomplete waiting)",
            cursor=cursor,
        )
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=rk, partition_key=key) for key, rk in requests],
        dynamic_partitions_requests=(
            [healpix_partitions.build_add_request(to_register)] if to_register else []
        ),
        cursor=cursor,
    )


# --------------------------------------------------------------------------------------------
# backfill_stale_partitions


def stale_partitions(keys: list[str], layout) -> dict[str, list[str]]:
    """Partitions whose products are missing or stale, per asset name, read from storage."""
    from desi_anomaly.ml.encoding import read_latents_info
    from desi_anomaly.ml.training import file_sha256

    out: dict[str, list[str]] = {"raw_spectra": [], "cleaned_spectra": [], "latents": []}
    out["anomaly_scores"] = []
    sha = file_sha256(layout.checkpoint) if layout.checkpoint.is_file() else None
    detector_mtime = (
        max(layout.detector.stat().st_mtime_ns, layout.calibrator.stat().st_mtime_ns)
        if layout.detector.is_file() and layout.calibrator.is_file()
        else None
    )
    for key in keys:
        cleaned = layout.cleaned(key)
        missing_clean = not cleaned.is_file()
        if missing_clean:
            out["raw_spectra"].append(key)
            out["cleaned_spectra"].append(key)
        if sha is None:
            continue
        info = read_latents_info(layout.latents(key))
        stale_latents = missing_clean or info is None or info.get("checkpoint_sha256") != sha
        if stale_latents:
            out["latents"].append(key)
        if detector_mtime is None:
            continue
        scores = layout.scores(key)
        if (
            stale_latents
            or not scores.is_file()
            or scores.stat().st_mtime_ns < detector_mtime
            or scores.stat().st_mtime_ns < layout.latents(key).stat().st_mtime_ns
        ):
            out["anomaly_scores"].append(key)
    return {name: keys for name, keys in out.items() if keys}


def backfill_request(plan: dict[str, list[str]], asset_graph) -> dg.RunRequest:
    """A RunRequest that makes the sensor daemon launch one asset backfill of ``plan``."""
    subset = AssetGraphSubset.from_asset_partition_set(
        {
            AssetKeyPartitionKey(dg.AssetKey(name), key)
            for name, keys in plan.items()
            for key in keys
        },
        asset_graph,
    )
    return dg.RunRequest.for_asset_graph_subset(subset, tags={BACKFILL_TAG: "stale_partitions"})


def backfill_in_progress(instance: dg.DagsterInstance) -> bool:
    active = instance.get_backfills(
        filters=BulkActionsFilter(
            statuses=[BulkActionStatus.REQUESTED], tags={BACKFILL_TAG: "stale_partitions"}
        ),
        limit=1,
    )
    return bool(active)


@dg.sensor(
    minimum_interval_seconds=BACKFILL_INTERVAL_S,
    target=[raw_spectra, cleaned_spectra, latents, anomaly_scores],
    description=(
        "Periodically launches one asset backfill of the healpix partitions whose cleaned shard, "
        "latents or scores are missing or stale (multi-run backfill policy of each asset)."
    ),
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def backfill_stale_partitions(context: dg.SensorEvaluationContext, storage: StorageResource):
    if backfill_in_progress(context.instance):
        return dg.SkipReason("a stale-partition backfill is still in progress")
    keys = sorted(context.instance.get_dynamic_partitions(PARTITIONS_NAME))
    plan = stale_partitions(keys, storage.layout)
    if not plan:
        return dg.SkipReason(f"all {len(keys)} partitions are up to date")
    summary = ", ".join(f"{name} {len(keys)}" for name, keys in plan.items())
    context.log.info(f"backfilling {summary}")
    return dg.SensorResult(
        run_requests=[backfill_request(plan, context.repository_def.asset_graph)]
    )


# --------------------------------------------------------------------------------------------
# rescore_all


def range_tags(instance: dg.DagsterInstance) -> dict[str, str]:
    """Run tags selecting every registered healpix partition as one range."""
    keys = instance.get_dynamic_partitions(PARTITIONS_NAME)  # registration order
    if not keys:
        raise dg.DagsterInvariantViolationError("no healpix partitions are registered")
    return {ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]}


@dg.asset_sensor(
    asset_key=vae_checkpoint.key,
    job=rescore_all,
    description="Launches rescore_all over every partition when vae_checkpoint is materialised.",
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def rescore_after_new_checkpoint(context: dg.SensorEvaluationContext, asset_event):
    # One rescore per checkpoint content: re-materialising an identical checkpoint adds none.
    mat = asset_event.asset_materialization
    version = (mat.tags or {}).get("dagster/data_version") if mat else None
    return dg.RunRequest(
        run_key=f"rescore:{version or asset_event.run_id}", tags=range_tags(context.instance)
    )


SENSORS = [new_data_drops, backfill_stale_partitions, rescore_after_new_checkpoint]
JOBS = [ingest_partitions, rescore_all]
