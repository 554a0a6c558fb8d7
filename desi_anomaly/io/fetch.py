"""Download DESI DR1 healpix coadd + redrock files and the DR1 QSO catalogue into a local data root.

Remote layout (``BASE`` defaults to :data:`DR1_BASE_URL`, overridable by ``--base-url`` or the
``DESI_ANOMALY_BASE_URL`` environment variable)::

    BASE/spectro/redux/iron/healpix/{survey}/{program}/{hp//100}/{hp}/coadd-{survey}-{program}-{hp}.fits
    BASE/spectro/redux/iron/healpix/{survey}/{program}/{hp//100}/{hp}/redrock-{survey}-{program}-{hp}.fits
    BASE/spectro/redux/iron/healpix/.../{hp}/redux_iron_healpix_{survey}_{program}_{hp//100}_{hp}.sha256sum
    BASE/survey/catalogs/dr1/QSO/iron/QSO_cat_iron_cumulative_v0.fits
    BASE/survey/catalogs/dr1/QSO/iron/dr1_survey_catalogs_dr1_QSO_iron.sha256sum

Local layout (``ROOT`` = ``--root``): ``ROOT/healpix/{survey}/{program}/{hp//100}/{hp}/`` holds the
coadd, the redrock file and the directory's ``.sha256sum`` file (what
:func:`desi_anomaly.io.partitions.discover` reads); the QSO catalogue and its checksum file go to
``ROOT/catalogs/`` (:func:`qso_catalog_path`).

What was verified (public sources found with the search tool; the DESI server was not reachable):

- ``https://data.desi.lbl.gov/public/dr1`` is the DR1 root and
  ``spectro/redux/iron/healpix/SURVEY/PROGRAM/PIXGROUP/PIXNUM`` the healpix layout (desidatamodel
  ``DESI_SPECTRO_REDUX/SPECPROD`` pages; data.desi.lbl.gov/doc/access/globus-symlinks names
  ``spectro/redux/iron/healpix/``). Iron coadd and redrock files are uncompressed ``.fits`` (a
  public dataset manifest cites ``.../healpix/main/dark/100/10000/coadd-main-dark-10000.fits``).
- Per-directory checksum files: DESI's release tooling (desihub/desida
  ``bin/desi_checksum_specprod.sh``) writes ``redux_{SPECPROD}_{dir with '/' -> '_'}.sha256sum`` in
  every healpix directory, as ``sha256sum`` output (``<hex>  <name>``); the same manifest cites
  ``.../100/10000/redux_iron_healpix_main_dark_100_10000.sha256sum``.
- The DR1 QSO catalogue is ``survey/catalogs/dr1/QSO/iron/QSO_cat_iron_cumulative_v0.fits``
  (desidatamodel ``survey/catalogs/RELEASE/QSO/SPECPROD``; desihub LSS publishing script), with
  ``dr1_survey_catalogs_dr1_QSO_iron.sha256sum`` beside it (a public download script). It is
  published under ``survey/catalogs`` (the LSS team's catalogue), not under ``vac/``.

Assumed: the server honours HTTP ``Range`` (handled if it does not), and the checksum file names
above hold for every healpix directory (if one is missing, files are still downloaded, see below).

Behaviour: each file is streamed to ``NAME.part`` beside the target; a rerun resumes it with a
``Range`` request (a server answering 200 restarts from byte 0; 416 means the part is already
complete, or it is discarded). Transient failures (connection errors, timeouts, truncated bodies,
HTTP 408/429/5xx) are retried with exponential backoff; 404 fails at once, naming the URL and the
partition key. A finished ``.part`` is checked against the published SHA-256 and only then renamed
onto the target; a mismatch deletes it and raises :class:`ChecksumMismatchError` (after one fresh
download if the part had been resumed, since a stale prefix may be the culprit). A target that
already matches its checksum is skipped, one that does not is downloaded again. When no checksum is
published for a file, it is downloaded (or an existing copy kept) unverified, an
:class:`UnverifiedDownloadWarning` is issued and the file is listed in ``FetchReport.unverified``;
``require_checksum=True`` (``--require-checksum``) makes that a failure instead. Two processes
fetching the same file into the same root at once are not supported.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import logging
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, TypeVar

from desi_anomaly import __version__
from desi_anomaly.atomic import atomic_path
from desi_anomaly.errors import DesiAnomalyError, PartitionKeyError
from desi_anomaly.io.partitions import PartitionKey, parse_key

log = logging.getLogger(__name__)

DR1_BASE_URL = "https://data.desi.lbl.gov/public/dr1"
BASE_URL_ENV = "DESI_ANOMALY_BASE_URL"
SPECPROD = "iron"
QSO_CATALOG_NAME = "QSO_cat_iron_cumulative_v0.fits"
QSO_CATALOG_REMOTE_DIR = "survey/catalogs/dr1/QSO/iron"
QSO_CATALOG_CHECKSUMS = "dr1_survey_catalogs_dr1_QSO_iron.sha256sum"
QSO_CATALOG_LOCAL_DIR = Path("catalogs")
QSO_CATALOG_LABEL = "qso-catalog"  # key of the catalogue in FetchReport.failed
PART_SUFFIX = ".part"

DEFAULT_RETRIES = 5
DEFAULT_BACKOFF = 1.0  # seconds before the first retry; doubles each time
DEFAULT_TIMEOUT = 60.0  # seconds per socket operation
_MAX_DELAY = 60.0
_CHUNK = 1 << 20
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_USER_AGENT = f"desi-anomaly/{__version__} (+urllib)"
_SHA256_LINE = re.compile(r"^(?P<digest>[0-9a-fA-F]{64}) [ *](?P<name>.+)$")
_CONTENT_RANGE = re.compile(r"^bytes (?:(?P<start>\d+)-(?P<end>\d+)|\*)/(?P<total>\d+|\*)$")

ProgressCallback = Callable[[Path, int, "int | None"], None]
T = TypeVar("T")


class FetchError(DesiAnomalyError):
    """A download that failed: the message names the partition (or catalogue), URL and reason."""


class RemoteNotFoundError(FetchError):
    """The server answered 404 for a file."""


class ChecksumMismatchError(FetchError):
    """A downloaded file whose SHA-256 differs from the published one (the file was deleted)."""

    def __init__(self, path: Path, url: str, expected: str, actual: str):
        self.path, self.url, self.expected, self.actual = path, url, expected, actual
        super().__init__(
            f"{path.name}: SHA-256 mismatch, published {expected}, downloaded {actual} "
            f"(from {url}); the partial file was deleted"
        )


class UnverifiedDownloadWarning(UserWarning):
    """A file was downloaded or kept without a published checksum to verify it against."""


class _Transient(Exception):
    """A failure worth retrying that urllib does not raise itself (e.g. a truncated body)."""


@dataclass
class FetchReport:
    """What :func:`fetch_partitions` did: files downloaded or skipped, and failures by key."""

    downloaded: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # already there (checksum matched/absent)
    unverified: list[Path] = field(default_factory=list)  # no checksum published (also above)
    failed: dict[str, str] = field(default_factory=dict)  # partition key or 'qso-catalog' -> error

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass(frozen=True)
class _RemoteDir:
    """One remote directory to mirror: its URL, local folder, checksum file and wanted files."""

    label: str  # how errors name it, e.g. 'partition main-dark-9557'
    report_key: str
    url: str
    local: Path
    checksum_name: str
    names: tuple[str, ...]


def default_base_url() -> str:
    """``$DESI_ANOMALY_BASE_URL`` if set, else the public DR1 root."""
    return os.environ.get(BASE_URL_ENV) or DR1_BASE_URL


def healpix_url(base_url: str, key: PartitionKey) -> str:
    """URL of a partition's healpix directory under a release root."""
    return f"{base_url.rstrip('/')}/spectro/redux/{SPECPROD}/{key.directory.as_posix()}"


def healpix_checksum_name(key: PartitionKey) -> str:
    """Name of the ``.sha256sum`` file DESI publishes in a healpix directory."""
    return "_".join(("redux", SPECPROD, *key.directory.parts)) + ".sha256sum"


def qso_catalog_path(root: str | Path) -> Path:
    """Where :func:`fetch_partitions` puts the DR1 QSO catalogue under a data root."""
    return Path(root) / QSO_CATALOG_LOCAL_DIR / QSO_CATALOG_NAME


def parse_sha256sum(text: str) -> dict[str, str]:
    """Parse ``sha256sum`` output into {file name: lower-case hex digest}; drops ``./``."""
    digests = {}
    for line in text.splitlines():
        m = _SHA256_LINE.match(line.strip())
        if m:
            digests[Path(m["name"].strip()).name] = m["digest"].lower()
    return digests


def fetch_partitions(
    keys: Iterable[str],
    root: str | Path,
    *,
    base_url: str | None = None,
    qso_catalog: bool = True,
    progress: ProgressCallback | None = None,
    require_checksum: bool = False,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    timeout: float = DEFAULT_TIMEOUT,
) -> FetchReport:
    """Download coadd + redrock files of ``keys`` (and the QSO catalogue) into ``root``.

    All keys are validated first (:class:`PartitionKeyError` before any request). A failing key is
    recorded in ``FetchReport.failed`` and does not stop the others. ``base_url`` defaults to
    :func:`default_base_url`.
    """
    parsed = list(dict.fromkeys(parse_key(k) for k in keys))
    base_url = base_url or default_base_url()
    if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
        raise ValueError(f"base URL must be http(s)://..., got {base_url!r}")
    root = Path(root)
    remotes = [
        _RemoteDir(
            f"partition {key}",
            str(key),
            healpix_url(base_url, key),
            root / key.directory,
            healpix_checksum_name(key),
            (key.coadd_name(), key.redrock_name()),
        )
        for key in parsed
    ]
    if qso_catalog:
        remotes.append(
            _RemoteDir(
                "QSO catalogue",
                QSO_CATALOG_LABEL,
                f"{base_url.rstrip('/')}/{QSO_CATALOG_REMOTE_DIR}",
                root / QSO_CATALOG_LOCAL_DIR,
                QSO_CATALOG_CHECKSUMS,
                (QSO_CATALOG_NAME,),
            )
        )
    report = FetchReport()
    net = {"retries": retries, "backoff": backoff, "timeout": timeout}
    for remote in remotes:
        _fetch_dir(remote, report, progress, require_checksum, net)
    return report


def _fetch_dir(
    remote: _RemoteDir,
    report: FetchReport,
    progress: ProgressCallback | None,
    require_checksum: bool,
    net: dict,
) -> None:
    """Mirror the wanted files of one remote directory; record the outcome in ``report``."""
    errors = []
    try:
        digests = _fetch_checksums(remote, **net)
    except FetchError as err:
        report.failed[remote.report_key] = str(err)
        return
    for name in remote.names:
        url = f"{remote.url}/{name}"
        target = remote.local / name
        expected = digests.get(name)
        if expected is None:
            sums_url = f"{remote.url}/{remote.checksum_name}"
            msg = f"{remote.label}: no SHA-256 published for {name} in {sums_url}"
            if require_checksum:
                errors.append(f"{msg}; not downloaded (checksum required)")
                continue
        try:
            downloaded = download_file(
                url, target, sha256=expected, label=remote.label, progress=progress, **net
            )
        except FetchError as err:
            errors.append(str(err))
            continue
        (report.downloaded if downloaded else report.skipped).append(target)
        if expected is None:
            report.unverified.append(target)
            warnings.warn(f"{msg}; {target} is unverified", UnverifiedDownloadWarning, stacklevel=2)
    if errors:
        report.failed[remote.report_key] = "; ".join(errors)


def _fetch_checksums(
    remote: _RemoteDir, *, retries: int, backoff: float, timeout: float
) -> dict[str, str]:
    """The directory's published digests ({} without a checksum file); saved beside the data."""
    url = f"{remote.url}/{remote.checksum_name}"

    def read() -> bytes:
        with _open(url, 0, timeout) as resp:
            return resp.read()

    try:
        raw = _with_retries(read, url=url, label=remote.label, retries=retries, backoff=backoff)
    except RemoteNotFoundError:
        log.warning("%s: no checksum file at %s", remote.label, url)
        return {}
    remote.local.mkdir(parents=True, exist_ok=True)
    with atomic_path(remote.local / remote.checksum_name) as tmp:
        tmp.write_bytes(raw)
    return parse_sha256sum(raw.decode("utf-8", errors="replace"))


def download_file(
    url: str,
    target: str | Path,
    *,
    sha256: str | None = None,
    label: str = "download",
    progress: ProgressCallback | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
    timeout: float = DEFAULT_TIMEOUT,
) -> bool:
    """Resumably download ``url`` to ``target``; return False if it was already there (skipped).

    An existing target is kept if it matches ``sha256`` (or if no digest is given) and downloaded
    again otherwise. Raises :class:`RemoteNotFoundError`, :class:`ChecksumMismatchError` or
    :class:`FetchError`.
    """
    target = Path(target)
    sha256 = sha256.lower() if sha256 else None
    if target.is_file():
        if sha256 is None or _sha256_file(target) == sha256:
            return False
        log.warning("%s: %s does not match its published SHA-256; downloading again", label, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + PART_SUFFIX)
    for last_try in (False, True):
        resumed = part.is_file() and part.stat().st_size > 0
        _with_retries(
            lambda: _download_attempt(url, part, target, progress, timeout),
            url=url,
            label=label,
            retries=retries,
            backoff=backoff,
        )
        actual = _sha256_file(part) if sha256 else None
        if actual == sha256:
            break
        part.unlink(missing_ok=True)
        if last_try or not resumed:
            raise ChecksumMismatchError(target, url, sha256, actual)
        log.warning("%s: resumed %s failed its checksum; downloading it from the start", label, url)
    with open(part, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(part, target)
    return True


def _download_attempt(
    url: str, part: Path, target: Path, progress: ProgressCallback | None, timeout: float
) -> None:
    """One request: extend ``part`` from its current size (or restart it if the server says so)."""
    offset = part.stat().st_size if part.is_file() else 0
    try:
        resp = _open(url, offset, timeout)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        total = _parse_content_range(err.headers.get("Content-Range"))[1]
        err.close()
        if total == offset:
            return  # the part already holds the whole file
        part.unlink()
        raise _Transient(f"range {offset}- not satisfiable (size {total}); restarting") from None
    with resp:
        if resp.status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != offset:
                part.unlink()
                raise _Transient(f"server sent range from byte {start}, not {offset}; restarting")
        elif resp.status == 200:
            if offset:
                log.info("%s ignored the Range request; downloading from the start", url)
            offset = 0
            total = _int_header(resp, "Content-Length")
        else:
            raise FetchError(f"unexpected HTTP {resp.status} for {url}")
        expected = _int_header(resp, "Content-Length")
        received = 0
        with open(part, "ab" if offset else "wb") as fh:
            while chunk := resp.read1(_CHUNK):
                fh.write(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(target, offset + received, total)
    if expected is not None and received < expected:
        raise _Transient(f"connection closed after {received} of {expected} bytes")


def _with_retries(
    action: Callable[[], T], *, url: str, label: str, retries: int, backoff: float
) -> T:
    """Run ``action``, retrying transient network failures with exponential backoff."""
    for attempt in range(retries + 1):
        delay = min(backoff * 2**attempt, _MAX_DELAY)
        try:
            return action()
        except urllib.error.HTTPError as err:
            err.close()
            if err.code == 404:
                raise RemoteNotFoundError(f"{label}: not found (HTTP 404): {url}") from None
            if err.code not in _RETRY_STATUS:
                raise FetchError(f"{label}: HTTP {err.code} {err.reason} for {url}") from None
            reason = f"HTTP {err.code} {err.reason}"
            retry_after = err.headers.get("Retry-After", "")
            if retry_after.isdigit():
                delay = min(max(delay, float(retry_after)), _MAX_DELAY)
        except (
            _Transient,
            urllib.error.URLError,
            http.client.HTTPException,
            ConnectionError,
            TimeoutError,
            ssl.SSLError,
        ) as err:
            reason = f"{type(err).__name__}: {err}"
        if attempt == retries:
            raise FetchError(
                f"{label}: giving up on {url} after {retries + 1} attempts; last error: {reason}"
            )
        log.warning(
            "%s: %s for %s; retry %d/%d in %.1f s", label, reason, url, attempt + 1, retries, delay
        )
        time.sleep(delay)
    raise AssertionError("unreachable")


def _open(url: str, offset: int, timeout: float) -> http.client.HTTPResponse:
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) of a ``Content-Range`` header; None for what it does not say."""
    m = _CONTENT_RANGE.match((value or "").strip())
    if m is None:
        return None, None
    start = int(m["start"]) if m["start"] is not None else None
    return start, int(m["total"]) if m["total"] != "*" else None


def _int_header(resp: http.client.HTTPResponse, name: str) -> int | None:
    value = resp.headers.get(name)
    return int(value) if value and value.isdigit() else None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ConsoleProgress:
    """Progress callback: a line per file at most every ``interval`` seconds, and one at the end."""

    def __init__(self, stream: TextIO | None = None, interval: float = 2.0):
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self._last: dict[Path, float] = {}

    def __call__(self, path: Path, bytes_done: int, bytes_total: int | None) -> None:
        now = time.monotonic()
        finished = bytes_total is not None and bytes_done >= bytes_total
        if not finished and now - self._last.get(path, -self.interval) < self.interval:
            return
        self._last[path] = now
        size = "?" if bytes_total is None else f"{bytes_total / 1e6:.1f}"
        pct = f" ({100 * bytes_done / bytes_total:.0f}%)" if bytes_total else ""
        print(f"{path}: {bytes_done / 1e6:.1f} / {size} MB{pct}", file=self.stream, flush=True)


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fetch`` subcommand's arguments: KEY [KEY ...] --root DIR [--base-url URL] ..."""
    parser.add_argument(
        "keys",
        nargs="+",
        metavar="KEY",
        help="partition keys {survey}-{program}-{healpix}, e.g. main-dark-9557",
    )
    parser.add_argument("--root", type=Path, required=True, help="local data root (release layout)")
    parser.add_argument(
        "--base-url",
        default=None,
        help=f"release root URL (default: ${BASE_URL_ENV} if set, else {DR1_BASE_URL})",
    )
    parser.add_argument(
        "--no-qso-catalog",
        dest="qso_catalog",
        action="store_false",
        help=f"do not download the DR1 QSO catalogue ({QSO_CATALOG_NAME}, ~0.8 GB)",
    )
    parser.add_argument(
        "--require-checksum",
        action="store_true",
        help="fail files that have no published SHA-256 instead of downloading them unverified",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="retries per request on transient errors",
    )


def run_fetch(args: argparse.Namespace) -> int:
    """Run the ``fetch`` subcommand; 0 when everything is present, 1 on failures, 2 on bad keys."""
    try:
        report = fetch_partitions(
            args.keys,
            args.root,
            base_url=args.base_url,
            qso_catalog=args.qso_catalog,
            progress=ConsoleProgress(),
            require_checksum=args.require_checksum,
            retries=args.retries,
        )
    except (PartitionKeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"fetch: {len(report.downloaded)} downloaded, {len(report.skipped)} already present, "
        f"{len(report.unverified)} unverified, {len(report.failed)} failed"
    )
    for key, message in report.failed.items():
        print(f"FAILED {key}: {message}", file=sys.stderr)
    return 0 if report.ok else 1
