"""A Dagster instance on a real PostgreSQL server (dagster-postgres), as deployed on Kubernetes.

The server is a throwaway cluster on 127.0.0.1 (``pgserver.py``); the tests skip, with the reason,
where the PostgreSQL binaries are absent outside CI (``.ci/run`` installs them). Checked: runs and
their events, sensor ticks (a real sensor daemon iteration) and 12,000 dynamic healpix partitions
are stored in and read back from PostgreSQL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import yaml

psycopg2 = pytest.importorskip("psycopg2")
pytest.importorskip("dagster_postgres")

from dagster import (  # noqa: E402
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    Definitions,
    DynamicPartitionsDefinition,
    SensorResult,
    job,
    op,
    sensor,
)
from dagster._core.remote_origin import InProcessCodeLocationOrigin  # noqa: E402
from dagster._core.scheduler.instigation import InstigatorType, TickStatus  # noqa: E402
from dagster._core.test_utils import create_test_daemon_workspace_context  # noqa: E402
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin  # noqa: E402
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget  # noqa: E402
from dagster._daemon.sensor import execute_sensor_iteration  # noqa: E402
from dagster._utils.log import get_dagster_logger  # noqa: E402

from desi_anomaly_tests.pgserver import PostgresServer, find_bin_dir, start_postgres  # noqa: E402

N_PARTITIONS = 12_000
healpix = DynamicPartitionsDefinition(name="healpix")
NEW_DROP = ["main-dark-9557", "sv3-dark-9144"]


@op
def count_quasars() -> int:
    return 150


@job
def tiny_job():
    count_quasars()


@sensor(job=tiny_job, default_status=DefaultSensorStatus.RUNNING, minimum_interval_seconds=1)
def new_data_drop(context):
    """Registers the partitions of a 'new data drop' (no runs requested)."""
    return SensorResult(dynamic_partitions_requests=[healpix.build_add_request(NEW_DROP)])


pg_test_defs = Definitions(jobs=[tiny_job], sensors=[new_data_drop])


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    if find_bin_dir() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries are missing in CI: .ci/run should install them")
        pytest.skip("PostgreSQL server binaries (Debian package 'postgresql') are not installed")
    srv = start_postgres()
    yield srv
    srv.stop()
    assert not srv.root.exists()


@pytest.fixture(scope="module")
def instance(server, tmp_path_factory) -> Iterator[DagsterInstance]:
    home = tmp_path_factory.mktemp("dagster_home")
    (home / "dagster.yaml").write_text(yaml.safe_dump({"storage": server.dagster_storage_config()}))
    with DagsterInstance.from_config(str(home)) as inst:
        yield inst


def sql(server: PostgresServer, query: str, *args) -> list[tuple]:
    with psycopg2.connect(server.url) as conn, conn.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchall()


def test_server_listens_on_loopback_only(server):
    assert server.is_running()
    addresses = sql(server, "SHOW listen_addresses")
    assert addresses == [("127.0.0.1",)]
    assert sql(server, "SELECT inet_server_addr()::text") == [("127.0.0.1/32",)]


def test_instance_uses_postgres_for_every_storage(instance):
    names = {
        type(instance.run_storage).__name__,
        type(instance.event_log_storage).__name__,
        type(instance.schedule_storage).__name__,
    }
    assert names == {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}


def test_runs_and_their_events_are_stored_in_postgres(server, instance):
    result = tiny_job.execute_in_process(instance=instance)
    assert result.success
    run = instance.get_run_by_id(result.run_id)
    assert run is not None and run.status == DagsterRunStatus.SUCCESS
    rows = sql(server, "SELECT status FROM runs WHERE run_id = %s", result.run_id)
    assert rows == [("SUCCESS",)]
    events = sql(
        server,
        "SELECT dagster_event_type FROM event_logs WHERE run_id = %s AND step_key = %s",
        result.run_id,
        "count_quasars",
    )
    assert ("STEP_SUCCESS",) in events


def test_sensor_ticks_are_stored_in_postgres(server, instance):
    origin = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name=__name__, attribute="pg_test_defs"),
        location_name="pg-test",
    )
    target = InProcessWorkspaceLoadTarget(origin)
    with create_test_daemon_workspace_context(target, instance) as context:
        list(
            execute_sensor_iteration(
                context,
                get_dagster_logger("SensorDaemon"),
                threadpool_executor=None,
                submit_threadpool_executor=None,
            )
        )
        remote = next(
            s
            for loc in context.create_request_context().get_code_location_entries().values()
            for repo in loc.code_location.get_repositories().values()
            for s in repo.get_sensors()
        )
    ticks = instance.get_ticks(remote.get_remote_origin_id(), remote.selector_id)
    assert len(ticks) == 1
    tick = ticks[0]
    assert tick.instigator_type == InstigatorType.SENSOR
    assert tick.status in (TickStatus.SKIPPED, TickStatus.SUCCESS), tick.error
    assert set(instance.get_dynamic_partitions("healpix")) >= set(NEW_DROP)
    stored = sql(
        server, "SELECT count(*) FROM job_ticks WHERE selector_id = %s", remote.selector_id
    )
    assert stored == [(1,)]


def test_12000_dynamic_partitions_round_trip(server, instance, capsys):
    keys = [f"main-dark-{hp}" for hp in range(N_PARTITIONS)]
    before = set(instance.get_dynamic_partitions("healpix"))
    start = time.perf_counter()
    instance.add_dynamic_partitions("healpix", keys)
    added = time.perf_counter() - start
    start = time.perf_counter()
    stored = instance.get_dynamic_partitions("healpix")
    read = time.perf_counter() - start
    assert set(keys) <= set(stored)
    assert len(stored) == len(set(stored)) == len(set(keys) | before)
    assert instance.has_dynamic_partition("healpix", "main-dark-11999")
    assert not instance.has_dynamic_partition("healpix", "main-dark-12000")
    rows = sql(
        server, "SELECT count(*) FROM dynamic_partitions WHERE partitions_def_name = 'healpix'"
    )
    assert rows == [(len(stored),)]
    with capsys.disabled():
        print(
            f"\n[postgres] add_dynamic_partitions({N_PARTITIONS}): {added:.2f} s; "
            f"get_dynamic_partitions: {read:.3f} s"
        )
