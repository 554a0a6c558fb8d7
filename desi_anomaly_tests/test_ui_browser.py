"""The Dagster UI in a real browser: ``dagster dev`` (webserver + daemon) on 127.0.0.1 with a
temporary DAGSTER_HOME and this repository's ``workspace.yaml``/``dagster.yaml``, driven by Debian's
Chromium through Playwright: open the asset graph, launch ``raw_spectra`` for one healpix partition,
wait for the run to succeed, open the asset's lineage. Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from desi_anomaly.io.partitions import discover

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
#: Upper bounds on waiting (failure limits, not timing assertions): a loaded 2-core machine.
START_LIMIT_S = 300
RUN_LIMIT_MS = 300_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason="Debian's Chromium is not installed at /usr/bin/chromium "
        "(apt-get install -y chromium)",
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""


def _stop(proc: subprocess.Popen) -> None:
    """Stop dagster dev and everything it started (its own process group): interrupt, then
    terminate, then kill whatever is left of the group."""
    for sig, grace in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # dagster dev is gone; its children may not be
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
    os.killpg(proc.pid, signal.SIGKILL) if _group_alive(proc.pid) else None


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def dagster_dev(small_drop, tmp_path, monkeypatch):
    """``dagster dev`` on a free 127.0.0.1 port; yields (base URL, instance, partition keys)."""
    import dagster as dg

    home = tmp_path / "dagster-home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    data = tmp_path / "data"
    shutil.copytree(small_drop, data)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DESI_ANOMALY_DATA_ROOT": str(data),
        "DESI_ANOMALY_STORAGE_ROOT": str(tmp_path / "out"),
        "DESI_ANOMALY_RAY_NUM_CPUS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("DESI_ANOMALY_RAY_ADDRESS", None)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    keys = [str(f.key) for f in discover(data).complete]
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions("healpix", keys)

    port = _free_port()
    log = tmp_path / "dagster-dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster"),
                "dev",
                "-w",
                str(REPO / "workspace.yaml"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dagster dev exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(f"{url}/server_info", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dagster dev did not serve {url}:\n{_log_tail(log)}")
            time.sleep(1)
        yield url, instance, keys
    finally:
        _stop(proc)
        instance.dispose()
        shutil.copy(log, ARTIFACTS / "dagster-dev.log") if ARTIFACTS.is_dir() else None


def test_launch_a_partition_from_the_ui_and_follow_its_lineage(dagster_dev):
    import dagster as dg
    from playwright.sync_api import expect, sync_playwright

    url, instance, keys = dagster_dev
    key = keys[0]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(120_000)

            # The asset graph of the code location: every stage is there.
            page.goto(f"{url}/asset-groups", wait_until="domcontentloaded")
            page.goto(f"{url}/locations/desi-anomaly/asset-groups/ingest", wait_until="load")
            expect(page.get_by_text("raw_spectra").first).to_be_visible()
            expect(page.get_by_text("cleaned_spectra").first).to_be_visible()
            page.screenshot(path=ARTIFACTS / "ui-1-asset-graph.png")

            # Launch raw_spectra for one healpix partition.
            page.goto(f"{url}/assets/raw_spectra", wait_until="load")
            page.get_by_role("button", name="Materialize…").click()
            dialog = page.get_by_role("dialog")
            dialog.get_by_text("Select a partition or create one").click()
            page.get_by_text(key, exact=True).first.click()
            page.keyboard.press("Escape")  # close the partition list, keep the dialog
            page.screenshot(path=ARTIFACTS / "ui-2-launch-dialog.png")
            launch = page.get_by_role("button", name="Launch 1 run")
            if not launch.is_visible():  # Escape closed the dialog in some versions: reopen
                page.get_by_role("button", name="Materialize…").click()
                page.get_by_role("dialog").get_by_text(key, exact=True).first.wait_for()
            launch.click()

            # The run: queued, launched by the daemon, successful.
            run_id = None
            deadline = time.monotonic() + 120
            while run_id is None and time.monotonic() < deadline:
                runs = instance.get_runs(limit=1)
                run_id = runs[0].run_id if runs else None
                page.wait_for_timeout(1000)
            assert run_id is not None, "no run was created from the UI"
            run = instance.get_run_by_id(run_id)
            assert run.tags.get("dagster/partition") == key
            page.goto(f"{url}/runs/{run_id}", wait_until="load")
            # The run header's status tag reads "Success" once the run has finished well.
            expect(page.get_by_text("Success", exact=True).first).to_be_visible(
                timeout=RUN_LIMIT_MS
            )
            page.screenshot(path=ARTIFACTS / "ui-3-run-success.png")
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS

            # The asset's lineage, from the run page and the asset page: raw_spectra feeds
            # cleaned_spectra.
            page.get_by_text("View asset lineage").first.click()
            expect(page.get_by_text("raw_spectra").first).to_be_visible()
            page.screenshot(path=ARTIFACTS / "ui-4-run-lineage.png")
            page.goto(f"{url}/assets/raw_spectra?view=lineage", wait_until="load")
            expect(page.get_by_text("cleaned_spectra").first).to_be_visible()
            expect(page.get_by_text("Loading…")).to_have_count(0)
            page.screenshot(path=ARTIFACTS / "ui-5-asset-lineage.png")
        finally:
            browser.close()
    materialized = instance.get_materialized_partitions(dg.AssetKey("raw_spectra"))
    assert materialized == {key}
