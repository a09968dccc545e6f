"""Load test: Locust at a fixed arrival rate against the one-machine cluster, while every
tier is restarted one replica at a time with SIGTERM and then one replica of each tier
is killed with SIGKILL. Run by hand (`make load-cluster`); figures in README.

    .venv/bin/python loadtest/load_cluster.py --users 16 --rate 0.125 --seconds 200

1. A real Milvus 2.3 server (`.venv-milvus`) and the cluster of tests/e2e/cluster.py: two
   replicas of detection, embedding, search, gateway and ingest behind DNS names, one
   PostgreSQL audit chain.
2. The collection ``load``, seeded with the photos of ../shared/data/faces/knn/train.
3. Locust (`.venv-load`, headless) with --users users calling at --rate calls/s each
   (loadtest/locustfile.py: searches by image 40 %, reads 30 %, enrolments, comparisons
   and deletes 10 % each), for --seconds.
4. From 15 s on: every replica of every tier in turn taken out of its name, stopped with
   SIGTERM and started again (a rolling update); then one replica of each tier killed
   with SIGKILL, left dead for 5 s (as until a readiness probe fails), taken out of the
   name and started again.
5. Afterwards: Locust's counts, p50/p99 and failures by method and status; the audit
   chain verified through the gateway; every successful identification call (searches
   and comparisons, from Locust's ledger of request ids) against the audit log: exactly
   one successful record with its request_id, the one its reply named (more would be
   duplicated records, fewer lost ones); no external image id enrolled twice; each
   gateway replica's share of the calls.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from facegrid.audit_chain import verify_chain
from facegrid.v1 import face_service_pb2, face_service_pb2_grpc, resources_pb2
from facegrid_harness.milvus_server import MilvusServer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.e2e.cluster import HOSTS, KINDS, Cluster, all_audit_records, running_cluster  # noqa: E402

F = face_service_pb2
FACES = Path(os.environ.get("FACEGRID_TEST_FACES", ROOT.parent / "shared" / "data" / "faces"))
PHOTOS = FACES / "knn" / "train"
LOCUST = ROOT / ".venv-load" / "bin" / "locust"


def model_repository(work: Path) -> Path:
    repo = ROOT / "model_repository"
    if (repo / "facegrid_models.json").is_file():
        return repo
    repo = work / "model_repository"
    facegrid = Path(sys.executable).with_name("facegrid")
    subprocess.run([str(facegrid), "models", "build", "--repo", str(repo)], check=True)
    return repo


def seed(api: face_service_pb2_grpc.FaceServiceStub, md: Any) -> int:
    api.CreateCollection(
        F.CreateCollectionRequest(collection_id="load", collection=resources_pb2.Collection()),
        metadata=md,
        timeout=60,
    )
    count = 0
    for photo in sorted(PHOTOS.rglob("*")):
        if photo.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        api.IndexFaces(
            F.IndexFacesRequest(
                parent="collections/load",
                image=photo.read_bytes(),
                external_image_id=f"seed-{photo.parent.name}-{photo.stem}",
                max_faces=1,
            ),
            metadata=md,
            timeout=60,
        )
        count += 1
    return count


def gateway_calls(cluster: Cluster) -> dict[str, float]:
    shares: dict[str, float] = {}
    for host in HOSTS:
        service = cluster.service("gateway", host)
        url = f"http://{host}:{service.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        shares[host] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("facegrid_rpc_requests_total{") and "FaceService" in line
        )
    return shares


def disrupt(cluster: Cluster, log: list[str], start_after_s: float) -> None:
    """Rolling restarts of every tier, then a SIGKILL of one replica of each."""
    time.sleep(start_after_s)
    began = time.monotonic()
    for kind in KINDS:
        for host in HOSTS:
            cluster.restart(kind, host)
            log.append(f"{time.monotonic() - began:6.1f} s  rolled {kind}@{host}")
    for kind in KINDS:
        log.append(f"{time.monotonic() - began:6.1f} s  killing {kind}@{HOSTS[0]}")
        cluster.kill(kind, HOSTS[0])
        log.append(f"{time.monotonic() - began:6.1f} s  replaced {kind}@{HOSTS[0]}")


def read_stats(prefix: Path) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    with (prefix.parent / f"{prefix.name}_stats.csv").open() as handle:
        for row in csv.DictReader(handle):
            stats[row["Name"]] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "p50_ms": float(row["50%"] or 0),
                "p99_ms": float(row["99%"] or 0),
                "rps": float(row["Requests/s"] or 0),
            }
    failures: list[dict[str, Any]] = []
    path = prefix.parent / f"{prefix.name}_failures.csv"
    if path.is_file():
        with path.open() as handle:
            for row in csv.DictReader(handle):
                failures.append(
                    {"name": row["Name"], "error": row["Error"], "count": int(row["Occurrences"])}
                )
    return {"by_method": stats, "failures": failures}


def all_faces(api: face_service_pb2_grpc.FaceServiceStub, md: Any) -> list[Any]:
    faces: list[Any] = []
    token = ""
    while True:
        page = api.ListFaces(
            F.ListFacesRequest(parent="collections/load", page_size=1000, page_token=token),
            metadata=md,
            timeout=120,
        )
        faces.extend(page.faces)
        token = page.next_page_token
        if not token:
            return faces


def identification_check(ledger: Path, records: list[Any]) -> dict[str, Any]:
    """Each successful identification call of the ledger against the audit log."""
    calls = [json.loads(line) for line in ledger.read_text().splitlines()]
    methods = {c["method"] for c in calls}
    ok_records: dict[str, list[str]] = {}
    for record in records:
        if record.method.rsplit("/", 1)[-1] not in methods:
            continue  # enrolments carry request ids too
        if record.request_id and record.status_code == 0:
            ok_records.setdefault(record.request_id, []).append(record.name)
    succeeded = [c for c in calls if c["status"] == "OK"]
    exactly_one = sum(
        1 for c in succeeded if ok_records.get(c["request_id"]) == [c["audit_record"]]
    )
    return {
        "identification_calls": len(calls),
        "identification_calls_ok": len(succeeded),
        "identification_calls_ok_with_exactly_their_one_record": exactly_one,
        "identification_failures_by_status": dict(
            Counter(c["status"] for c in calls if c["status"] != "OK")
        ),
        "request_ids_with_several_ok_records": sum(1 for v in ok_records.values() if len(v) > 1),
        "ok_records_without_a_successful_call": len(
            set(ok_records) - {c["request_id"] for c in succeeded}
        ),
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from tests.conftest import inference_overrides

    repo = model_repository(work)
    with (
        MilvusServer(ROOT / ".venv-milvus", work / "milvus") as milvus,
        running_cluster(
            work / "cluster", milvus.uri, inference_overrides("local", repo, None)
        ) as cluster,
    ):
        print("cluster up", flush=True)
        channel = grpc.insecure_channel(cluster.target("gateway"))
        api = face_service_pb2_grpc.FaceServiceStub(channel)
        md = cluster.metadata()
        seeded = seed(api, md)
        prefix = work / "locust"
        # Locust's users reach the gateway replicas by a static list of their addresses:
        # grpcio's c-ares resolver under gevent crashed Locust (SIGSEGV) a minute into a
        # run with dns:/// targets. The services themselves still call through DNS names.
        static = "ipv4:" + ",".join(f"{host}:{cluster.ports['gateway']}" for host in HOSTS)
        env = {
            **os.environ,
            "FACEGRID_LOAD_TARGET": static,
            "FACEGRID_LOAD_TOKEN": cluster.token,
            "FACEGRID_LOAD_PHOTOS": str(PHOTOS),
            "FACEGRID_LOAD_RATE": str(args.rate),
            "FACEGRID_LOAD_LEDGER": str(work / "ledger.jsonl"),
        }
        calls_before = gateway_calls(cluster)
        locust = subprocess.Popen(
            [
                str(LOCUST),
                "-f",
                str(ROOT / "loadtest" / "locustfile.py"),
                "--headless",
                "--users",
                str(args.users),
                "--spawn-rate",
                str(args.users),
                "--run-time",
                f"{args.seconds}s",
                "--csv",
                str(prefix),
                "--only-summary",
                "--stop-timeout",
                "30",
            ],
            env=env,
            stdout=(work / "locust.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        events: list[str] = []
        disruption = threading.Thread(target=disrupt, args=(cluster, events, 15.0))
        disruption.start()
        code = locust.wait(args.seconds + 120)
        disruption.join()
        print("\n".join(events), flush=True)
        calls_after = gateway_calls(cluster)  # the restarted replicas count from 0
        stats = read_stats(prefix)
        records = all_audit_records(api, md)
        report = verify_chain(records)
        identification = identification_check(work / "ledger.jsonl", records)
        faces = all_faces(api, md)
        enrolled = Counter(f.external_image_id for f in faces)
        channel.close()
        return {
            "users": args.users,
            "rate_per_user": args.rate,
            "seconds": args.seconds,
            "locust_exit_code": code,
            "seeded_photos": seeded,
            "events": events,
            **stats,
            "audit_records": len(records),
            "audit_chain_intact": report.intact,
            "audit_break": str(report.first_break) if report.first_break else None,
            **identification,
            "external_ids_enrolled_twice": sum(1 for n in enrolled.values() if n > 1),
            "gateway_calls_before": calls_before,
            "gateway_calls_after_counted_since_restart": calls_after,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--rate", type=float, default=0.125, help="calls/s per user")
    parser.add_argument("--seconds", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not LOCUST.is_file():
        raise SystemExit(f"{LOCUST} is missing: run `make load-venv`")
    work = Path(tempfile.mkdtemp(prefix="facegrid-load-"))
    print(f"work folder {work}", flush=True)
    figures = run(args, work)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
