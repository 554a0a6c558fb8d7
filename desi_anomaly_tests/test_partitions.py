from pathlib import Path

import pytest

from desi_anomaly.errors import PartitionKeyError
from desi_anomaly.io.partitions import PartitionKey, discover, parse_key, partition_files


def test_parse_key_round_trip_and_layout():
    key = parse_key("main-dark-9557")
    assert key == PartitionKey("main", "dark", 9557)
    assert str(key) == "main-dark-9557"
    assert key.directory == Path("healpix/main/dark/95/9557")
    assert key.coadd_name() == "coadd-main-dark-9557.fits"
    assert key.redrock_name(".fits.gz") == "redrock-main-dark-9557.fits.gz"
    assert parse_key("sv3-bright-7").directory == Path("healpix/sv3/bright/0/7")


@pytest.mark.parametrize(
    "bad",
    [
        "../etc-dark-1",
        "main-dark-9557/../../x",
        "main/dark-1",
        "Main-dark-1",
        "main-dark-01",
        "main-dark--1",
        "main-dark-",
        "main-dark-49152",  # nside 64 has 49152 pixels: 0..49151
        "main-dark-1 ",
        "main_dark_1",
        "",
    ],
)
def test_parse_key_rejects(bad):
    with pytest.raises(PartitionKeyError, match="invalid partition key"):
        parse_key(bad)


def test_key_fields_are_validated_too():
    with pytest.raises(PartitionKeyError):
        PartitionKey("..", "dark", 1)
    with pytest.raises(PartitionKeyError):
        PartitionKey("main", "dark", 10**6)


def _touch(root: Path, key: str, *kinds: str, suffix: str = ".fits") -> None:
    k = parse_key(key)
    folder = root / k.directory
    folder.mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        (folder / f"{kind}-{k}{suffix}").write_bytes(b"")


def test_discover_pairs_and_incomplete(tmp_path):
    _touch(tmp_path, "main-dark-9557", "coadd", "redrock")
    _touch(tmp_path, "sv3-dark-9557", "coadd", "redrock", suffix=".fits.gz")
    _touch(tmp_path, "main-bright-100", "coadd")
    _touch(tmp_path, "main-dark-12", "redrock")
    # Files in the wrong folder or with foreign names are not partitions.
    stray = tmp_path / "healpix/main/dark/95/9557"
    (stray / "coadd-main-dark-1.fits").write_bytes(b"")
    (stray / "notes.txt").write_text("x")
    found = discover(tmp_path)
    assert [str(p.key) for p in found.complete] == ["main-dark-9557", "sv3-dark-9557"]
    assert found.complete[1].coadd.name == "coadd-sv3-dark-9557.fits.gz"
    assert set(found.incomplete) == {"main-bright-100", "main-dark-12"}
    assert found.misplaced == [stray / "coadd-main-dark-1.fits"]
    assert "redrock file missing" in found.incomplete["main-bright-100"]
    assert "coadd file missing" in found.incomplete["main-dark-12"]


def test_partition_files(tmp_path):
    _touch(tmp_path, "main-dark-9557", "coadd", "redrock")
    _touch(tmp_path, "main-dark-12", "coadd")
    files = partition_files(tmp_path, "main-dark-9557")
    assert files is not None and files.redrock.name == "redrock-main-dark-9557.fits"
    assert partition_files(tmp_path, "main-dark-12") is None
    with pytest.raises(PartitionKeyError):
        partition_files(tmp_path, "../../x")


def test_discover_empty_root(tmp_path):
    found = discover(tmp_path / "nothing-here")
    assert found.complete == [] and found.incomplete == {} and found.misplaced == []
