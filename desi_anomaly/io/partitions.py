"""Healpix partition keys, the DESI release directory layout, and discovery of coadd/redrock pairs.

A partition is one healpix coadd file, keyed ``{survey}-{program}-{healpix}`` (e.g.
``main-dark-9557``); the same healpix number exists under several survey/program pairs. Keys
are validated by a strict pattern before any path is built from them, so a key can never name a
path outside the data root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from desi_anomaly.errors import PartitionKeyError
from desi_anomaly.io.instrument import N_HEALPIX

_KEY_RE = re.compile(
    r"^(?P<survey>[a-z][a-z0-9]{0,15})-(?P<program>[a-z][a-z0-9]{0,15})-(?P<healpix>0|[1-9][0-9]{0,5})$"
)
_FILE_RE = re.compile(
    r"^(?P<kind>coadd|redrock)-(?P<survey>[a-z][a-z0-9]{0,15})-(?P<program>[a-z][a-z0-9]{0,15})"
    r"-(?P<healpix>0|[1-9][0-9]{0,5})\.fits(?P<gz>\.gz)?$"
)
_SUFFIXES = (".fits", ".fits.gz")


@dataclass(frozen=True, order=True)
class PartitionKey:
    """One healpix coadd: survey, program and nested nside-64 healpix number."""

    survey: str
    program: str
    healpix: int

    def __post_init__(self) -> None:
        key = f"{self.survey}-{self.program}-{self.healpix}"
        if not (isinstance(self.healpix, int) and _KEY_RE.match(key)):
            raise PartitionKeyError(
                f"invalid partition key {key!r}: expected '{{survey}}-{{program}}-{{healpix}}' "
                "in lower case, e.g. 'main-dark-9557'"
            )
        if self.healpix >= N_HEALPIX:
            raise PartitionKeyError(
                f"invalid partition key {key!r}: healpix {self.healpix} >= {N_HEALPIX} (nside 64)"
            )

    def __str__(self) -> str:
        return f"{self.survey}-{self.program}-{self.healpix}"

    @property
    def directory(self) -> Path:
        """Folder of this healpix relative to the release root."""
        return Path(
            "healpix", self.survey, self.program, str(self.healpix // 100), str(self.healpix)
        )

    def coadd_name(self, suffix: str = ".fits") -> str:
        return f"coadd-{self}{suffix}"

    def redrock_name(self, suffix: str = ".fits") -> str:
        return f"redrock-{self}{suffix}"


def parse_key(key: str) -> PartitionKey:
    """Parse and validate a key like ``main-dark-9557``; raise PartitionKeyError otherwise."""
    if not isinstance(key, str):
        raise PartitionKeyError(f"partition key must be a string, got {type(key).__name__}")
    m = _KEY_RE.match(key)
    if m is None:
        raise PartitionKeyError(
            f"invalid partition key {key!r}: expected '{{survey}}-{{program}}-{{healpix}}' "
            "in lower case, e.g. 'main-dark-9557'"
        )
    return PartitionKey(m["survey"], m["program"], int(m["healpix"]))


@dataclass(frozen=True)
class PartitionFiles:
    """A complete coadd + redrock pair found under a data root."""

    key: PartitionKey
    coadd: Path
    redrock: Path


@dataclass(frozen=True)
class Discovery:
    """What a scan of a data root found: complete pairs, and folders missing one of the pair."""

    complete: list[PartitionFiles]
    incomplete: dict[str, str]  # partition key -> what is missing
    misplaced: list[Path]  # release-style file names outside their own healpix folder


def partition_files(root: str | Path, key: str | PartitionKey) -> PartitionFiles | None:
    """The coadd + redrock pair of one partition under ``root``, or None if either is missing."""
    key = parse_key(key) if isinstance(key, str) else key
    folder = Path(root) / key.directory
    coadd = _first_existing(folder, key.coadd_name)
    redrock = _first_existing(folder, key.redrock_name)
    if coadd is None or redrock is None:
        return None
    return PartitionFiles(key, coadd, redrock)


def _first_existing(folder: Path, name_for) -> Path | None:
    for suffix in _SUFFIXES:
        path = folder / name_for(suffix)
        if path.is_file():
            return path
    return None


def discover(root: str | Path) -> Discovery:
    """Find every coadd + redrock pair under ``root/healpix`` in the DESI release layout.

    Files whose names do not follow the layout are ignored; a folder with only one of the two
    files is reported as incomplete rather than guessed at, and a coadd/redrock file outside its
    own healpix folder as misplaced. Uses ``os.scandir`` for speed on
    tens of thousands of folders.
    """
    base = Path(root) / "healpix"
    found: dict[PartitionKey, dict[str, Path]] = {}
    misplaced = []
    for folder in _healpix_folders(base):
        with os.scandir(folder) as entries:
            for entry in entries:
                m = _FILE_RE.match(entry.name)
                if m is None or not entry.is_file():
                    continue
                key = parse_key(f"{m['survey']}-{m['program']}-{m['healpix']}")
                if Path(folder) != Path(root) / key.directory:
                    misplaced.append(Path(entry.path))
                    continue
                found.setdefault(key, {}).setdefault(m["kind"], Path(entry.path))
    complete, incomplete = [], {}
    for key in sorted(found):
        kinds = found[key]
        if "coadd" in kinds and "redrock" in kinds:
            complete.append(PartitionFiles(key, kinds["coadd"], kinds["redrock"]))
        else:
            missing = "redrock" if "coadd" in kinds else "coadd"
            incomplete[str(key)] = f"{missing} file missing in {Path(root) / key.directory}"
    return Discovery(complete, incomplete, sorted(misplaced))


def _healpix_folders(base: Path):
    """Yield ``healpix/{survey}/{program}/{group}/{healpix}`` folders."""
    for depth_dirs in _subdirs(base):
        for program in _subdirs(depth_dirs):
            for group in _subdirs(program):
                yield from _subdirs(group)


def _subdirs(path: str | Path):
    try:
        with os.scandir(path) as entries:
            return [e.path for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
