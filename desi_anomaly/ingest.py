"""Ingest: DESI coadd + redrock pairs -> cleaned rest-frame shards, one per healpix partition.

Each partition is read, preprocessed and written on its own; a bad file fails only its partition
(the error names the file and the problem) and never touches another partition's shard.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from desi_anomaly.errors import DesiAnomalyError
from desi_anomaly.io.coadd import QSOSelection, read_qso_spectra
from desi_anomaly.io.partitions import PartitionFiles, parse_key
from desi_anomaly.io.redshifts import QSOCatalog
from desi_anomaly.preprocess import CleanedSpectra, PreprocessConfig, preprocess
from desi_anomaly.shards import write_shard


@dataclass
class PartitionResult:
    """Outcome of cleaning one partition."""

    key: str
    shard: Path | None = None
    n_read: int = 0
    n_kept: int = 0
    drop_counts: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def shard_path(out_dir: str | Path, key: str) -> Path:
    """Where the cleaned shard of partition ``key`` lives under ``out_dir`` (the key is
    validated)."""
    return Path(out_dir) / "cleaned" / f"{parse_key(key)}.parquet"


def file_provenance(path: str | Path) -> dict[str, object]:
    """Path, size and modification time of a source file, recorded in the shard."""
    st = Path(path).stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def clean_partition(
    files: PartitionFiles,
    out_dir: str | Path,
    *,
    catalog: QSOCatalog | None = None,
    selection: QSOSelection = QSOSelection(),  # noqa: B008 - frozen dataclass
    config: PreprocessConfig = PreprocessConfig(),  # noqa: B008 - frozen dataclass
) -> PartitionResult:
    """Read, select, preprocess and write the shard of one partition.

    Raises DesiAnomalyError (naming the file) on bad input; nothing is written in that case.
    """
    start = time.perf_counter()
    key = str(files.key)
    spectra = read_qso_spectra(files.coadd, files.redrock, catalog=catalog, selection=selection)
    spectra.meta.insert(1, "PARTITION", key)
    cleaned = preprocess(spectra, config)
    path = write_cleaned_shard(shard_path(out_dir, key), cleaned, key, spectra.sources)
    return PartitionResult(
        key=key,
        shard=path,
        n_read=len(spectra),
        n_kept=len(cleaned.meta),
        drop_counts=cleaned.drop_counts(),
        seconds=time.perf_counter() - start,
    )


def write_cleaned_shard(
    path: Path, cleaned: CleanedSpectra, key: str, sources: dict[str, str]
) -> Path:
    """Write a CleanedSpectra as a shard, with its grid, provenance and dropped spectra."""
    dropped = cleaned.dropped
    info = {
        "partition": key,
        "grid": cleaned.grid.to_dict(),
        "sources": {role: file_provenance(p) for role, p in sources.items()},
        "drop_counts": cleaned.drop_counts(),
        "dropped": {
            "TARGETID": dropped["TARGETID"].astype("int64").tolist(),
            "REASON": dropped["REASON"].astype(str).tolist(),
        },
    }
    return write_shard(
        path,
        flux=cleaned.flux,
        ivar=cleaned.ivar,
        coverage=cleaned.coverage,
        meta=cleaned.meta,
        info=info,
    )


def clean_partitions(
    partitions: Iterable[PartitionFiles],
    out_dir: str | Path,
    *,
    catalog: QSOCatalog | None = None,
    selection: QSOSelection = QSOSelection(),  # noqa: B008 - frozen dataclass
    config: PreprocessConfig = PreprocessConfig(),  # noqa: B008 - frozen dataclass
    progress: Callable[[PartitionResult, int, int], None] | None = None,
) -> list[PartitionResult]:
    """Clean many partitions; each failure is recorded in its result and the others go on."""
    partitions = list(partitions)
    results = []
    for i, files in enumerate(partitions, 1):
        start = time.perf_counter()
        try:
            result = clean_partition(
                files, out_dir, catalog=catalog, selection=selection, config=config
            )
        except DesiAnomalyError as exc:
            result = PartitionResult(
                key=str(files.key), error=str(exc), seconds=time.perf_counter() - start
            )
        results.append(result)
        if progress is not None:
            progress(result, i, len(partitions))
    return results
