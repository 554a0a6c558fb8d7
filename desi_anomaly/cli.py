"""The ``desi-anomaly`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from desi_anomaly import __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    from desi_anomaly.io.fetch import add_fetch_arguments, run_fetch

    parser = argparse.ArgumentParser(
        prog="desi-anomaly", description="Find anomalous quasar spectra in DESI data releases."
    )
    parser.add_argument("--version", action="version", version=f"desi-anomaly {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("mock", help="generate a mock DESI data drop in the release layout")
    p.add_argument("out", type=Path, help="data root to write (healpix/... and truth.parquet)")
    _add_mock_arguments(p)
    p.set_defaults(func=cmd_mock)

    p = sub.add_parser("fetch", help="download real DESI DR1 healpix files")
    add_fetch_arguments(p)
    p.set_defaults(func=run_fetch)

    p = sub.add_parser("discover", help="list the coadd + redrock pairs under a data root")
    p.add_argument("root", type=Path)
    p.set_defaults(func=cmd_discover)

    p = sub.add_parser("ingest", help="clean every partition of a data root into shards")
    p.add_argument("root", type=Path, help="data root in the DESI release layout")
    p.add_argument("--out", type=Path, required=True, help="output folder (shards in OUT/cleaned)")
    _add_ingest_arguments(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser(
        "run", help="materialise every asset through Dagster on a data root (embedded default)"
    )
    p.add_argument("root", type=Path, help="data root in the DESI release layout")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _add_run_arguments(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="generate a mock data drop and run the pipeline on it")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder")
    _add_mock_arguments(p, tiles=DEMO_TILES, per_tile=DEMO_PER_TILE, others=DEMO_OTHERS)
    _add_run_arguments(p, epochs=DEMO_EPOCHS)
    p.set_defaults(func=cmd_demo)
    return parser


#: Demo size: enough spectra for the conformal p-values to resolve q < 0.01 (see
#: ``desi_anomaly.splits``), small enough to run in minutes on two cores.
DEMO_TILES, DEMO_PER_TILE, DEMO_OTHERS, DEMO_EPOCHS = 40, 150, 100, 30


def _add_mock_arguments(
    p: argparse.ArgumentParser, tiles: int = 4, per_tile: int = 120, others: int = 300
) -> None:
    p.add_argument("--tiles", type=int, default=tiles, help="healpix files to write")
    p.add_argument("--per-tile", type=int, default=per_tile, help="QSOs per file")
    p.add_argument("--others", type=int, default=others, help="non-QSO targets per file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anomaly-fraction", type=float, default=0.05)
    p.add_argument("--resolution", action="store_true", help="include RESOLUTION HDUs")


def _add_run_arguments(p: argparse.ArgumentParser, epochs: int | None = None) -> None:
    p.add_argument("--alpha", type=float, default=0.01, help="FDR level of the catalog")
    p.add_argument("--epochs", type=int, default=epochs, help="VAE training epochs")
    p.add_argument("--max-train", type=int, default=200_000, help="cap on VAE training spectra")
    p.add_argument("--known-anomalies", type=Path, help="known unusual QSOs (CSV with RA, DEC)")


def _add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qso-catalog", type=Path, help="QSO catalogue (TARGETID, Z): the redshift source"
    )
    p.add_argument("--keys", nargs="+", help="only these partition keys")


def _generate(args: argparse.Namespace, out: Path):
    from desi_anomaly.mock import generate_drop

    def progress(done: int, total: int) -> None:
        print(f"\r  mock: {done}/{total} files", end="", file=sys.stderr, flush=True)

    summary = generate_drop(
        out,
        args.tiles,
        args.per_tile,
        args.seed,
        others_per_tile=args.others,
        anomaly_fraction=args.anomaly_fraction,
        include_resolution=args.resolution,
        progress=progress,
    )
    print(file=sys.stderr)
    return summary


def _describe_drop(summary) -> str:
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(summary.spectype_counts.items()))
    anomalies = ", ".join(f"{k} {v}" for k, v in sorted(summary.anomaly_counts.items()))
    return (
        f"{len(summary.files) // 2} healpix files in {summary.out} ({kinds}); "
        f"{summary.n_qso_selected} QSOs pass the default selection; "
        f"injected anomalies: {anomalies or 'none'}; truth table {summary.truth_path}"
    )


def cmd_mock(args: argparse.Namespace) -> int:
    print(_describe_drop(_generate(args, args.out)))
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    from desi_anomaly.io.partitions import discover

    found = discover(args.root)
    for files in found.complete:
        print(f"{files.key}\t{files.coadd}\t{files.redrock}")
    for key, problem in found.incomplete.items():
        print(f"incomplete {key}: {problem}", file=sys.stderr)
    for path in found.misplaced:
        print(f"misplaced (not in its healpix folder): {path}", file=sys.stderr)
    print(
        f"{len(found.complete)} complete, {len(found.incomplete)} incomplete, "
        f"{len(found.misplaced)} misplaced",
        file=sys.stderr,
    )
    return 0


def _ingest(root: Path, out: Path, qso_catalog: Path | None, keys: list[str] | None) -> list:
    from desi_anomaly.ingest import clean_partitions
    from desi_anomaly.io.partitions import discover, parse_key
    from desi_anomaly.io.redshifts import QSOCatalog

    found = discover(root)
    for key, problem in found.incomplete.items():
        print(f"waiting: {key}: {problem}", file=sys.stderr)
    partitions = found.complete
    if keys:
        wanted = {parse_key(k) for k in keys}
        partitions = [p for p in partitions if p.key in wanted]
        for key in wanted - {p.key for p in partitions}:
            print(f"not found: {key} (no complete coadd + redrock pair)", file=sys.stderr)
    catalog = QSOCatalog.read(qso_catalog) if qso_catalog else None

    def progress(result, i: int, n: int) -> None:
        status = f"{result.n_kept}/{result.n_read} kept" if result.ok else f"FAILED: {result.error}"
        print(f"  [{i}/{n}] {result.key}: {status} ({result.seconds:.2f} s)", file=sys.stderr)

    return clean_partitions(partitions, out, catalog=catalog, progress=progress)


def _print_ingest_summary(results: list, seconds: float) -> int:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    n_read = sum(r.n_read for r in ok)
    n_kept = sum(r.n_kept for r in ok)
    drops = Counter()
    for r in ok:
        drops.update(r.drop_counts)
    print(f"partitions: {len(ok)} cleaned, {len(failed)} failed")
    print(
        f"QSO spectra: {n_read} read, {n_kept} kept ({n_read / max(seconds, 1e-9):.0f} spectra/s)"
    )
    for reason, count in sorted(drops.items(), key=lambda kv: -kv[1]):
        if count:
            print(f"  dropped {count:6d}  {reason}")
    for r in failed:
        print(f"FAILED {r.key}: {r.error}")
    return 1 if failed else 0


def cmd_ingest(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    results = _ingest(args.root, args.out, args.qso_catalog, args.keys)
    status = _print_ingest_summary(results, time.perf_counter() - start)
    print(f"shards in {args.out / 'cleaned'}")
    return status


def _run(root: Path, out: Path, args: argparse.Namespace) -> int:
    from desi_anomaly.orchestration.resources import PipelineSettings
    from desi_anomaly.orchestration.run import run_all

    settings = PipelineSettings(
        alpha=args.alpha,
        vae_epochs=args.epochs,
        max_train_spectra=args.max_train,
        known_anomalies=str(args.known_anomalies) if args.known_anomalies else None,
    )
    return 0 if run_all(root, out, settings=settings).success else 1


def cmd_run(args: argparse.Namespace) -> int:
    return _run(args.root, args.out, args)


def cmd_demo(args: argparse.Namespace) -> int:
    data = args.out / "data"
    if (data / "truth.parquet").exists():
        print(f"reusing the mock DESI data drop in {data}", file=sys.stderr)
    else:
        print(f"generating a mock DESI data drop in {data}", file=sys.stderr)
        print(_describe_drop(_generate(args, data)), file=sys.stderr)
    status = _run(data, args.out, args)
    print(f"truth table of the injected anomalies: {data / 'truth.parquet'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
