"""Encoding on a real multi-node Ray cluster on this machine, surviving the loss of a worker node.

The cluster (``ray.cluster_utils.Cluster``) has a head node and two worker nodes with one CPU each,
every node its own raylet process, all bound to 127.0.0.1. While ``encode_shards_on_ray`` runs,
the worker node hosting one of its encoder actors is killed (SIGKILL of its raylet and workers).
The run must still give every partition, identical to in-process encoding, with each latents file
written exactly once (counted with inotify) and no temporary file left behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from desi_anomaly.ingest import clean_partitions
from desi_anomaly.io.partitions import discover
from desi_anomaly.ml import VAEConfig, encode_partition, load_checkpoint, train_vae
from desi_anomaly.ml.raydispatch import encode_shards_on_ray
from desi_anomaly.mock import generate_drop

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux inotify"),
]

TINY = VAEConfig(latent_dim=4, channels=(4, 8, 8, 8, 8, 8), epochs=1, batch_size=32)
N_TILES = 6
LOOPBACK = "127.0.0.1"


# --- inotify: count every file created in / renamed into a folder -------------------------------

IN_CREATE, IN_MOVED_TO = 0x100, 0x80
_EVENT = struct.Struct("iIII")


class FolderEvents:
    """Counts IN_CREATE and IN_MOVED_TO events per file name in one folder (a background thread)."""

    def __init__(self, folder: Path):
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = self._libc.inotify_init()
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init failed")
        wd = self._libc.inotify_add_watch(self._fd, str(folder).encode(), IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder} failed")
        self.created: Counter[str] = Counter()
        self.moved_in: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                return
            if not data:
                return
            pos = 0
            while pos < len(data):
                _, mask, _, length = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size : pos + _EVENT.size + length].rstrip(b"\0").decode()
                pos += _EVENT.size + length
                if mask & IN_CREATE:
                    self.created[name] += 1
                if mask & IN_MOVED_TO:
                    self.moved_in[name] += 1

    def close(self) -> None:
        time.sleep(0.2)  # let the reader drain the last events
        os.close(self._fd)


# --- the cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU) + 2 worker nodes (1 CPU each) on 127.0.0.1, with the driver connected."""
    if ray.is_initialized():
        ray.shutdown()
    # Ray maps 127.0.0.1 in an address to the machine's routable IP while cluster mode is on;
    # the GCS listens on 127.0.0.1 only, so the driver must keep the loopback address.
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    temp_dir = tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")
    node = {
        "node_ip_address": LOOPBACK,
        "num_cpus": 1,
        "object_store_memory": 80 * 1024**2,
        "temp_dir": temp_dir,
    }
    cl = Cluster(shutdown_at_exit=True)
    try:
        cl.add_node(**node, include_dashboard=False)
        workers = [cl.add_node(**node) for _ in range(2)]
        ray.init(address=cl.address, log_to_driver=False, logging_level="WARNING")
        yield cl, workers
    finally:
        ray.shutdown()
        cl.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved
        shutil.rmtree(temp_dir, ignore_errors=True)


def _node_pids(cl: Cluster) -> set[int]:
    nodes = [cl.head_node, *cl.worker_nodes] if cl.head_node else list(cl.worker_nodes)
    return {info.process.pid for n in nodes for procs in n.all_processes.values() for info in procs}


def _with_descendants(pids: set[int]) -> set[int]:
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, grew = set(pids), True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def _listening_addresses(pids: set[int]) -> list[str]:
    """Local IPv4/IPv6 addresses of the listening TCP sockets owned by ``pids`` (from /proc)."""
    listen = {}
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            assert len(raw) * 2 == width
            # /proc prints the address as host-order 32-bit words
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            family = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
            ip = ipaddress.ip_address(socket.inet_ntop(family, words))
            listen[fields[9]] = str(getattr(ip, "ipv4_mapped", None) or ip)
    found = []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        found += [listen[x[8:-1]] for x in links if x.startswith("socket:[") and x[8:-1] in listen]
    return found


def test_every_node_is_a_separate_raylet_bound_to_loopback(cluster):
    cl, workers = cluster
    alive = [n for n in ray.nodes() if n["Alive"]]
    assert len(alive) == 3
    assert {n["NodeManagerAddress"] for n in alive} == {LOOPBACK}
    assert ray.cluster_resources()["CPU"] == 3
    raylets = {n.all_processes["raylet"][0].process.pid for n in [cl.head_node, *workers]}
    assert len(raylets) == 3
    # Every TCP socket the driver, the nodes and their children listen on is on 127.0.0.1.
    listening = _listening_addresses(_with_descendants(_node_pids(cl) | {os.getpid()}))
    assert listening and set(listening) == {LOOPBACK}


# --- data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("drop6")
    generate_drop(root, N_TILES, 30, seed=5, others_per_tile=20, anomaly_fraction=0.1)
    results = clean_partitions(discover(root).complete, tmp_path_factory.mktemp("cleaned6"))
    assert all(r.ok for r in results)
    return sorted(r.shard for r in results)


@pytest.fixture(scope="module")
def checkpoint(shards, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield train_vae(shards, tmp_path_factory.mktemp("vae6"), TINY)
    torch.set_num_threads(threads)


def _kill_a_node_hosting_an_encoder(cl: Cluster, workers, done: threading.Event, report: dict):
    """Wait for an encoder actor placed on a worker node, then kill that node outright."""
    by_id = {w.node_id: w for w in workers}
    while not done.is_set():
        for actor in ray._private.state.actors().values():
            node_id = actor["Address"]["NodeID"]
            if actor["ActorClassName"] == "ShardEncoder" and node_id in by_id:
                if actor["State"] in ("PENDING_CREATION", "ALIVE"):
                    report.update(actor=actor["ActorID"], state=actor["State"], node=node_id)
                    cl.remove_node(by_id[node_id], allow_graceful=False)
                    return
        time.sleep(0.02)


def test_encoding_survives_losing_a_worker_node(cluster, shards, checkpoint, tmp_path):
    cl, workers = cluster
    out = tmp_path / "encoded"
    (out / "latents").mkdir(parents=True)
    events = FolderEvents(out / "latents")
    done, report = threading.Event(), {}
    killer = threading.Thread(
        target=_kill_a_node_hosting_an_encoder, args=(cl, workers, done, report), daemon=True
    )
    killer.start()
    try:
        results = encode_shards_on_ray(checkpoint, shards, out, batch_size=8, num_actors=2)
    finally:
        done.set()
        killer.join(timeout=30)
        events.close()

    # The node really died during the run, and its encoder was restarted elsewhere.
    assert report, "no encoder actor was ever placed on a worker node"
    dead = {n["NodeID"] for n in ray.nodes() if not n["Alive"]}
    assert report["node"] in dead

    # Complete results, identical to in-process encoding of each shard.
    assert [r.error for r in results] == [None] * len(shards)
    assert ray._private.state.actors(report["actor"])["NumRestarts"] >= 1
    print(f"\n[ray multinode] killed node {report['node'][:8]} with its encoder {report['state']}")
    vae = load_checkpoint(checkpoint)
    reference = tmp_path / "reference"
    for shard, result in zip(shards, results, strict=True):
        expected = encode_partition(vae, shard, reference, batch_size=8)
        assert expected.ok and result.key == expected.key
        got, want = pq.read_table(result.latents), pq.read_table(expected.latents)
        assert got.num_rows == want.num_rows == result.n_spectra > 0
        for column in ("TARGETID", "PARTITION", "N_GOOD"):
            assert got[column].to_pylist() == want[column].to_pylist(), column
        np.testing.assert_allclose(
            np.stack(got["LATENT"].to_numpy(zero_copy_only=False)),
            np.stack(want["LATENT"].to_numpy(zero_copy_only=False)),
            rtol=1e-5,
            atol=1e-6,
        )
        np.testing.assert_allclose(got["RECON_CHI2"], want["RECON_CHI2"], rtol=1e-5)

    # Each partition's file was renamed into place exactly once; no temporary file is left.
    names = sorted(f"{r.key}.parquet" for r in results)
    assert sorted(p.name for p in (out / "latents").iterdir()) == names
    assert {name: events.moved_in[name] for name in names} == dict.fromkeys(names, 1)
    assert sum(events.moved_in.values()) == len(names)
    temps = [name for name in events.created if name.endswith(".tmp")]
    assert len(temps) == len(names), temps
