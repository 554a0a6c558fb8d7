"""desi_anomaly.io.fetch against a local HTTP server serving a release tree, with Range support."""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from desi_anomaly.errors import PartitionKeyError
from desi_anomaly.io import fetch
from desi_anomaly.io.fetch import (
    ChecksumMismatchError,
    UnverifiedDownloadWarning,
    add_fetch_arguments,
    download_file,
    fetch_partitions,
    qso_catalog_path,
    run_fetch,
)
from desi_anomaly.io.partitions import discover, parse_key

KEYS = ("main-dark-9557", "sv3-dark-9144")
FAST = {"retries": 3, "backoff": 0.01, "timeout": 5.0}


class _ReleaseServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, directory: Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.directory = directory
        self.ignore_range = False
        self.faults: dict[
            str, list
        ] = {}  # URL path -> faults for its next requests: 503 or ("drop", n)
        self.requests: list[tuple[str, str | None]] = []  # (URL path, Range header)
        self.bytes_sent: Counter[str] = Counter()
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _ReleaseServer

    def do_GET(self) -> None:
        srv = self.server
        path = self.path.split("?")[0]
        rng = self.headers.get("Range")
        with srv.lock:
            srv.requests.append((path, rng))
            pending = srv.faults.get(path)
            fault = pending.pop(0) if pending else None
        if fault == 503:
            self.send_error(503)
            return
        file = srv.directory / path.lstrip("/")
        if ".." in path or not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not srv.ignore_range:
            start = int(m[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if isinstance(fault, tuple) and fault[0] == "drop":
            body = body[: fault[1]]
            self.close_connection = True
        self.wfile.write(body)
        with srv.lock:
            srv.bytes_sent[path] += len(body)

    def log_message(self, *args) -> None:
        pass


@dataclass
class Release:
    server: _ReleaseServer
    tree: Path
    files: dict[str, bytes] = field(default_factory=dict)  # URL path -> content

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/public/dr1"

    def gets(self, path: str) -> list[str | None]:
        """Range headers of the requests made for one URL path."""
        return [rng for p, rng in self.server.requests if p == path]


def _url_path(key: str, kind: str) -> str:
    pk = parse_key(key)
    name = pk.coadd_name() if kind == "coadd" else pk.redrock_name()
    return f"/public/dr1/spectro/redux/iron/{pk.directory.as_posix()}/{name}"


CATALOG_PATH = f"/public/dr1/survey/catalogs/dr1/QSO/iron/{fetch.QSO_CATALOG_NAME}"


def _write_dir(tree: Path, url_dir: str, files: dict[str, bytes], checksum_name: str) -> None:
    folder = tree / url_dir.lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}\n")
    (folder / checksum_name).write_text("".join(lines))


@pytest.fixture
def release(tmp_path):
    tree = tmp_path / "server"
    rng = random.Random(9557)
    files = {}
    for key in KEYS:
        pk = parse_key(key)
        content = {
            pk.coadd_name(): rng.randbytes(300_000),
            pk.redrock_name(): rng.randbytes(40_000),
            f"spectra-{key}.fits": rng.randbytes(100),  # listed in the checksum file, never fetched
        }
        url_dir = f"/public/dr1/spectro/redux/iron/{pk.directory.as_posix()}"
        _write_dir(tree, url_dir, content, fetch.healpix_checksum_name(pk))
        files.update(
            {f"{url_dir}/{n}": d for n, d in content.items() if not n.startswith("spectra")}
        )
    catalog = {fetch.QSO_CATALOG_NAME: rng.randbytes(120_000)}
    _write_dir(
        tree, "/public/dr1/survey/catalogs/dr1/QSO/iron", catalog, fetch.QSO_CATALOG_CHECKSUMS
    )
    files[CATALOG_PATH] = catalog[fetch.QSO_CATALOG_NAME]
    server = _ReleaseServer(tree)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield Release(server, tree, files)
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _local(root: Path, key: str, kind: str) -> Path:
    pk = parse_key(key)
    return root / pk.directory / (pk.coadd_name() if kind == "coadd" else pk.redrock_name())


def _no_part_files(root: Path) -> bool:
    return not list(root.rglob("*.part"))


def test_full_download_in_release_layout(release, tmp_path):
    root = tmp_path / "data"
    seen = []
    report = fetch_partitions(
        KEYS, root, base_url=release.base_url, progress=lambda *a: seen.append(a), **FAST
    )
    assert report.ok and not report.skipped and not report.unverified
    assert len(report.downloaded) == 5
    for key in KEYS:
        for kind in ("coadd", "redrock"):
            assert _local(root, key, kind).read_bytes() == release.files[_url_path(key, kind)]
        checksum = root / parse_key(key).directory / fetch.healpix_checksum_name(parse_key(key))
        assert checksum.is_file()  # kept beside the data for later `sha256sum -c --ignore-missing`
    assert qso_catalog_path(root).read_bytes() == release.files[CATALOG_PATH]
    assert [str(p.key) for p in discover(root).complete] == sorted(KEYS)
    assert _no_part_files(root)
    coadd = _local(root, KEYS[0], "coadd")
    assert (coadd, 300_000, 300_000) in seen
    assert all(done <= total for path, done, total in seen)


def test_resume_from_existing_part_requests_only_the_remainder(release, tmp_path):
    root = tmp_path / "data"
    target = _local(root, KEYS[0], "coadd")
    target.parent.mkdir(parents=True)
    data = release.files[_url_path(KEYS[0], "coadd")]
    target.with_name(target.name + ".part").write_bytes(data[:123_456])
    report = fetch_partitions(KEYS[:1], root, base_url=release.base_url, qso_catalog=False, **FAST)
    assert report.ok
    assert target.read_bytes() == data
    path = _url_path(KEYS[0], "coadd")
    assert release.gets(path) == ["bytes=123456-"]
    assert release.server.bytes_sent[path] == len(data) - 123_456


def test_resume_after_dropped_connection(release, tmp_path):
    root = tmp_path / "data"
    path = _url_path(KEYS[0], "coadd")
    release.server.faults[path] = [("drop", 70_000)]
    report = fetch_partitions(KEYS[:1], root, base_url=release.base_url, qso_catalog=False, **FAST)
    assert report.ok, report.failed
    assert _local(root, KEYS[0], "coadd").read_bytes() == release.files[path]
    assert release.gets(path) == [None, "bytes=70000-"]
    assert release.server.bytes_sent[path] == len(release.files[path])


def test_server_ignoring_range_restarts_from_zero(release, tmp_path):
    root = tmp_path / "data"
    release.server.ignore_range = True
    target = _local(root, KEYS[0], "coadd")
    target.parent.mkdir(parents=True)
    # Garbage prefix: appending the 200 body to it would fail the checksum.
    target.with_name(target.name + ".part").write_bytes(b"\0" * 5000)
    report = fetch_partitions(KEYS[:1], root, base_url=release.base_url, qso_catalog=False, **FAST)
    assert report.ok, report.failed
    path = _url_path(KEYS[0], "coadd")
    assert target.read_bytes() == release.files[path]
    assert release.gets(path) == ["bytes=5000-"]  # one request: the 200 body was used from byte 0


def test_complete_part_answered_416_is_finalised(release, tmp_path):
    root = tmp_path / "data"
    path = _url_path(KEYS[0], "redrock")
    target = _local(root, KEYS[0], "redrock")
    target.parent.mkdir(parents=True)
    target.with_name(target.name + ".part").write_bytes(release.files[path])
    report = fetch_partitions(KEYS[:1], root, base_url=release.base_url, qso_catalog=False, **FAST)
    assert report.ok and target in report.downloaded
    assert target.read_bytes() == release.files[path]
    assert release.gets(path) == [f"bytes={len(release.files[path])}-"]
    assert release.server.bytes_sent[path] == 0


def test_checksum_mismatch_is_a_clear_error_and_leaves_no_file(release, tmp_path):
    root = tmp_path / "data"
    pk = parse_key(KEYS[0])
    sums = (
        release.tree
        / "public/dr1/spectro/redux/iron"
        / pk.directory
        / fetch.healpix_checksum_name(pk)
    )
    wrong = "ab" * 32
    good = hashlib.sha256(release.files[_url_path(KEYS[0], "coadd")]).hexdigest()
    sums.write_text(sums.read_text().replace(good, wrong))
    report = fetch_partitions(KEYS, root, base_url=release.base_url, qso_catalog=False, **FAST)
    message = report.failed[KEYS[0]]
    assert pk.coadd_name() in message and wrong in message and good in message
    assert not _local(root, KEYS[0], "coadd").exists()
    assert _no_part_files(root)
    assert _local(root, KEYS[0], "redrock").is_file()  # the other file of the key still arrives
    assert KEYS[1] not in report.failed

    with pytest.raises(ChecksumMismatchError, match=wrong) as info:
        download_file(
            f"{release.base_url}/spectro/redux/iron/{pk.directory.as_posix()}/{pk.coadd_name()}",
            tmp_path / "direct.fits",
            sha256=wrong,
            **FAST,
        )
    assert info.value.actual == good
    assert not (tmp_path / "direct.fits").exists() and not (tmp_path / "direct.fits.part").exists()


def test_rerun_skips_verified_files_and_redownloads_corrupt_ones(release, tmp_path):
    root = tmp_path / "data"
    first = fetch_partitions(KEYS, root, base_url=release.base_url, **FAST)
    assert first.ok
    release.server.requests.clear()
    corrupt = _local(root, KEYS[1], "redrock")
    corrupt.write_bytes(b"not the file")
    second = fetch_partitions(KEYS, root, base_url=release.base_url, **FAST)
    assert second.ok
    assert second.downloaded == [corrupt] and len(second.skipped) == 4
    fetched = {p for p, _ in release.server.requests if not p.endswith(".sha256sum")}
    assert fetched == {_url_path(KEYS[1], "redrock")}
    assert corrupt.read_bytes() == release.files[_url_path(KEYS[1], "redrock")]


def test_missing_key_fails_alone_with_url_and_key(release, tmp_path):
    root = tmp_path / "data"
    report = fetch_partitions(
        [KEYS[0], "main-dark-9558", KEYS[1]], root, base_url=release.base_url, **FAST
    )
    assert set(report.failed) == {"main-dark-9558"}
    message = report.failed["main-dark-9558"]
    assert "404" in message and "main-dark-9558" in message
    assert (
        f"{release.base_url}/spectro/redux/iron/healpix/main/dark/95/9558/coadd-main-dark-9558.fits"
        in message
    )
    assert len(report.downloaded) == 5
    # 404 is not retried: one request per file.
    assert len(release.gets(_url_path("main-dark-9558", "coadd"))) == 1


def test_transient_503_is_retried(release, tmp_path):
    root = tmp_path / "data"
    path = _url_path(KEYS[0], "coadd")
    release.server.faults[path] = [503, 503]
    report = fetch_partitions(KEYS[:1], root, base_url=release.base_url, qso_catalog=False, **FAST)
    assert report.ok, report.failed
    assert len(release.gets(path)) == 3
    assert _local(root, KEYS[0], "coadd").read_bytes() == release.files[path]


def test_persistent_503_gives_up_with_a_clear_error(release, tmp_path):
    root = tmp_path / "data"
    path = _url_path(KEYS[0], "coadd")
    release.server.faults[path] = [503] * 10
    report = fetch_partitions(KEYS[:1], root, base_url=release.base_url, qso_catalog=False, **FAST)
    assert "after 4 attempts" in report.failed[KEYS[0]] and "503" in report.failed[KEYS[0]]
    assert len(release.gets(path)) == 4
    assert not _local(root, KEYS[0], "coadd").exists()


def test_missing_checksum_file_warns_or_fails_when_required(release, tmp_path):
    pk = parse_key(KEYS[0])
    sums = (
        release.tree
        / "public/dr1/spectro/redux/iron"
        / pk.directory
        / fetch.healpix_checksum_name(pk)
    )
    sums.unlink()
    root = tmp_path / "data"
    with pytest.warns(UnverifiedDownloadWarning, match="no SHA-256 published"):
        report = fetch_partitions(
            KEYS[:1], root, base_url=release.base_url, qso_catalog=False, **FAST
        )
    assert report.ok
    assert set(report.unverified) == {_local(root, KEYS[0], k) for k in ("coadd", "redrock")}

    strict_root = tmp_path / "strict"
    strict = fetch_partitions(
        KEYS[:1],
        strict_root,
        base_url=release.base_url,
        qso_catalog=False,
        require_checksum=True,
        **FAST,
    )
    assert "checksum required" in strict.failed[KEYS[0]]
    assert not _local(strict_root, KEYS[0], "coadd").exists()


def test_invalid_key_rejected_before_any_request(release, tmp_path):
    with pytest.raises(PartitionKeyError, match="Main-Dark-1"):
        fetch_partitions(
            [KEYS[0], "Main-Dark-1"], tmp_path / "data", base_url=release.base_url, **FAST
        )
    assert release.server.requests == []


def _cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="desi-anomaly fetch")
    add_fetch_arguments(parser)
    return parser.parse_args(argv)


def test_cli_uses_env_base_url_and_reports(release, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(fetch.BASE_URL_ENV, release.base_url)
    root = tmp_path / "data"
    assert (
        run_fetch(_cli([KEYS[0], "--root", str(root), "--no-qso-catalog", "--retries", "1"])) == 0
    )
    out = capsys.readouterr()
    assert "2 downloaded" in out.out and "coadd-main-dark-9557.fits" in out.err  # progress lines
    assert not qso_catalog_path(root).exists()

    argv = ["main-dark-9558", "--root", str(root), "--base-url", release.base_url, "--retries", "0"]
    assert run_fetch(_cli(argv)) == 1
    assert "FAILED main-dark-9558" in capsys.readouterr().err
    assert run_fetch(_cli(["main-dark-x", "--root", str(root)])) == 2
