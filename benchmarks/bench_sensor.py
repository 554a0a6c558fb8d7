"""Time ticks of the ``new_data_drops`` sensor over a data root of 12,000 coadd + redrock pairs.

The files are tiny placeholders (discovery looks only at names, sizes and mtimes). Measured:
the scan (discovery + stat of every file), the first tick (12,000 new pairs, at most
``MAX_RUNS_PER_TICK`` run requests, registering those partitions in a SQLite instance), a tick
with nothing new (the steady state), a tick after one file changed, and the cursor size.
Prints a Markdown table and writes it into docs/operations.md between the bench_sensor markers.

    .venv/bin/python benchmarks/bench_sensor.py [--pairs 12000]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import dagster as dg

from desi_anomaly.io.partitions import PartitionKey
from desi_anomaly.orchestration import sensors
from desi_anomaly.orchestration.resources import DataRootResource

DOC = Path(__file__).resolve().parents[1] / "docs" / "operations.md"
START, END = "<!-- bench_sensor:start -->", "<!-- bench_sensor:end -->"


def make_root(root: Path, n_pairs: int) -> list[str]:
    """``n_pairs`` placeholder pairs in the release layout (main/sv3 x dark/bright)."""
    keys = []
    combos = [("main", "dark"), ("main", "bright"), ("sv3", "dark"), ("sv3", "bright")]
    for i in range(n_pairs):
        survey, program = combos[i % len(combos)]
        key = PartitionKey(survey, program, 1000 + i // len(combos) * 3)
        folder = root / key.directory
        folder.mkdir(parents=True, exist_ok=True)
        (folder / key.coadd_name()).write_bytes(b"coadd placeholder")
        (folder / key.redrock_name()).write_bytes(b"redrock placeholder")
        keys.append(str(key))
    return keys


def tick(instance, root: Path, cursor: str | None):
    """One evaluation of the sensor plus what the daemon does with its partition requests."""
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"data_root": DataRootResource(root=str(root))}
    )
    start = time.perf_counter()
    result = sensors.new_data_drops(context)
    evaluated = time.perf_counter() - start
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result, evaluated, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12_000)
    parser.add_argument("--no-doc", action="store_true", help="only print")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, dg.instance_for_test() as instance:
        root = Path(tmp) / "data"
        t0 = time.perf_counter()
        make_root(root, args.pairs)
        t_make = time.perf_counter() - t0

        t0 = time.perf_counter()
        prints, _ = sensors.scan_data_root(root)
        t_scan = time.perf_counter() - t0
        assert len(prints) == args.pairs

        first, first_eval, first_total = tick(instance, root, None)
        n_first = len(first.run_requests)
        cursor, ticks, slowest = first.cursor, 1, first_total
        while True:  # drain the backlog, MAX_RUNS_PER_TICK partitions per tick
            result, _, total = tick(instance, root, cursor)
            if not result.run_requests:
                break
            cursor, ticks, slowest = result.cursor, ticks + 1, max(slowest, total)
        idle, idle_eval, _ = tick(instance, root, cursor)
        assert not idle.run_requests
        registered = len(instance.get_dynamic_partitions("healpix"))

        changed_key = PartitionKey("main", "dark", 1000)
        redrock = root / changed_key.directory / changed_key.redrock_name()
        redrock.write_bytes(b"a new, longer redrock placeholder")
        os.utime(redrock, ns=(10**18, 10**18))
        changed, changed_eval, _ = tick(instance, root, cursor)
        assert [r.partition_key for r in changed.run_requests] == [str(changed_key)]

    rows = [
        ("pairs in the data root", f"{args.pairs:,}"),
        ("scan: discovery + stat of every file", f"{t_scan:.2f} s"),
        (
            "first tick: evaluation / with registering its partitions",
            f"{first_eval:.2f} s / {first_total:.2f} s ({n_first} run requests)",
        ),
        (
            "ticks to request every pair / slowest tick",
            f"{ticks} / {slowest:.2f} s ({registered:,} partitions registered)",
        ),
        ("tick with nothing new", f"{idle_eval:.2f} s"),
        ("tick after one redrock file changed", f"{changed_eval:.2f} s (1 run request)"),
        ("cursor size", f"{len(cursor) / 1e6:.2f} MB"),
        ("(writing the placeholder files)", f"{t_make:.1f} s"),
    ]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}"
    )
    table = "\n".join(
        ["| measurement | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)]
    )
    text = (
        f"`benchmarks/bench_sensor.py --pairs {args.pairs}` on {machine}; "
        f"MAX_RUNS_PER_TICK = {sensors.MAX_RUNS_PER_TICK}:\n\n{table}\n"
    )
    print(text)
    if not args.no_doc and DOC.exists():
        doc = DOC.read_text()
        if START in doc and END in doc:
            doc = re.sub(
                re.escape(START) + ".*?" + re.escape(END),
                lambda _: f"{START}\n{text}{END}",
                doc,
                flags=re.S,
            )
            DOC.write_text(doc)
            print(f"written to {DOC}")


if __name__ == "__main__":
    main()
