"""Runs a real Milvus 2.3.5 standalone server from the ``milvus`` PyPI wheel.

Kubernetes deployments use a Milvus server; the embedded default is Milvus Lite. To test
against a real server without Docker, this starts the standalone binary that the
``milvus==2.3.5`` wheel bundles (C++ engine, embedded etcd, rocksmq, local storage) from a
virtual environment of its own (``requirements/milvus.txt``).

The wheel's own ``default_server.start()`` wraps the binary in a Python process whose stop
waits only 1 s and can leave the server orphaned. Here the wheel's code only writes the
config and unpacks the binaries (about 250 MB, once per base directory); the binary then
runs as our direct child in its own session, so stopping it never depends on a wrapper.

Every port is free and chosen here, including the embedded etcd's client and peer ports
(through an etcd config file), so several servers can share a machine. Milvus 2.3.5 has no
listen-address option: etcd binds 127.0.0.1, the other ports bind all interfaces, and the
components register 127.0.0.1 so their internal traffic stays on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from facegrid_harness.processes import ManagedProcess, free_ports

log = logging.getLogger(__name__)

# The component ports of the wheel's config template (keys ending in ``_port``).
COMPONENT_PORT_KEYS = (
    "root_coord_port",
    "proxy_internal_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
)
# Components that register an address in etcd; unset, they pick the first non-loopback IP.
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
# The binary writes these machine-wide files whatever its config says.
PID_FILE = Path("/run/milvus/standalone.pid")
SERVER_ID_DIR = Path("/tmp/milvus")

# Runs with the server venv's interpreter: the wheel's template engine writes
# configs/milvus.yaml and unpacks bin/ into the base directory. Prints the binary path.
# Not config.resolve(): it test-binds every port without SO_REUSEADDR, which fails on a
# restart while the old server's connections sit in TIME_WAIT (the server itself can bind).
_PREPARE = """
import json, os, sys
import milvus
args = json.loads(sys.argv[1])
config = milvus.MilvusServerConfig(data_dir=args["base_dir"])
for key, value in {**args["ports"], **args["settings"]}.items():
    config.set(key, value)
config.resolve_storage()
unset = [k for k, (_, v) in config.configurable_items.items() if v is None or k.endswith("_port")
         and k not in args["ports"]]
if unset:
    sys.exit(f"unhandled settings in the milvus {milvus.__version__} config template: {unset}")
config.write_config()
milvus._initialize_data_files(config.base_data_dir)
print(json.dumps({"binary": os.path.join(config.base_data_dir, "bin", "milvus"),
                  "version": milvus.__version__}))
"""


class MilvusStartError(RuntimeError):
    """The server could not be prepared, exited, or did not become ready in time."""


@dataclass
class MilvusServer(ManagedProcess):
    """A Milvus 2.3.5 standalone server on free ports. Use as a context manager.

    ``venv`` holds ``requirements/milvus.txt``; ``base_dir`` holds the unpacked binaries,
    config, logs and data, and a later server on the same ``base_dir`` keeps the data.
    """

    server_name: ClassVar[str] = "milvus"
    start_error: ClassVar[type[Exception]] = MilvusStartError
    truncate_log: ClassVar[bool] = True
    poll_interval_s: ClassVar[float] = 0.1

    venv: Path
    base_dir: Path
    port: int | None = None  # the proxy (client) port; free if None
    startup_timeout_s: float = 120.0
    stop_timeout_s: float = 5.0
    # The server's own default waits up to 30 minutes for in-flight work on SIGTERM.
    graceful_stop_timeout_s: int = 2
    # Etcd lease of each component's session. A killed server's sessions stay until it
    # runs out, and a restart waits for that (up to a minute at Milvus's default of 30).
    session_ttl_s: int = 10
    # Mutual TLS on the client port (common.security.tlsMode 2): the server's certificate
    # and key and the CA its clients' certificates must chain to; ``tls_client`` is a
    # (certificate, key) pair of that CA for the launcher's own readiness check.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_client: tuple[Path, Path] | None = None
    # Garbage collection of segment files a compaction replaced: how often, and how long
    # they are kept (Milvus's defaults: 1 h and 3 h). None: the defaults.
    gc_interval_s: int | None = None
    gc_drop_tolerance_s: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    metrics_port: int = field(default=0, init=False)
    etcd_port: int = field(default=0, init=False)
    version: str = field(default="", init=False)
    _binary: Path = field(default=Path(), init=False, repr=False)
    _env: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _sessions_clean: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.base_dir = self.base_dir.resolve()
        if self.port is None:
            self.port = free_ports(1)[0]

    @property
    def uri(self) -> str:
        scheme = "https" if self.tls_cert is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "logs" / "milvus-stdout.log"

    def _prepare(self) -> tuple[Path, dict[str, str]]:
        python = self.venv / "bin" / "python"
        if not python.exists():
            raise MilvusStartError(
                f"no python in {self.venv}: create it with `python -m venv {self.venv}` and"
                f" `{self.venv}/bin/pip install --no-deps -r requirements/milvus.txt`"
            )
        # Fresh ports on every start (also for restart): only the proxy port must stay.
        ports = free_ports(len(COMPONENT_PORT_KEYS) + 3)
        self.etcd_port, etcd_peer, self.metrics_port = ports[-3:]
        args = {
            "base_dir": str(self.base_dir),
            "ports": {
                "proxy_port": self.port,
                "etcd_port": self.etcd_port,  # etcd.endpoints: the embedded etcd itself
                **dict(zip(COMPONENT_PORT_KEYS, ports[:-3], strict=True)),
            },
            "settings": {
                "common.gracefulStopTimeout": self.graceful_stop_timeout_s,
                "common.session.ttl": self.session_ttl_s,
                # A SIGTERM that lands while the quota center syncs metrics waits up to ~5 s
                # for its retries; an idle one stops at once. Quotas then see no metrics,
                # which a test server does not miss. (Disabling quotas makes 2.3.5 hang on
                # stop: it sends to the stop channel of a loop it never started.)
                "quotaAndLimits.quotaCenterCollectInterval": 3600,
                **{f"{component}.ip": "127.0.0.1" for component in COMPONENTS},
            },
        }
        probe = subprocess.run(
            [str(python), "-c", _PREPARE, json.dumps(args)],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,  # the first run unpacks ~250 MB of lzma
        )
        if probe.returncode != 0:
            raise MilvusStartError(f"preparing {self.base_dir} failed:\n{probe.stderr[-4000:]}")
        info = json.loads(probe.stdout.strip().splitlines()[-1])
        self.version = str(info["version"])
        etcd_config = self.base_dir / "configs" / "embed_etcd.yaml"
        etcd_config.write_text(_etcd_config(self.etcd_port, etcd_peer))
        binary = Path(info["binary"])
        env = dict(os.environ)
        env.update(
            {
                **self._tls_environment(),
                **self._gc_environment(),
                "DEPLOY_MODE": "STANDALONE",
                "METRICS_PORT": str(self.metrics_port),  # also serves /healthz
                "MILVUSCONF": f"{self.base_dir / 'configs'}/",
                # Read by Milvus's env config source as etcd.config.path (not in the template).
                "ETCD_CONFIG_PATH": str(etcd_config),
                "LD_LIBRARY_PATH": ":".join(
                    p for p in (str(binary.parent), env.get("LD_LIBRARY_PATH", "")) if p
                ),
            }
        )
        return binary, env

    def _gc_environment(self) -> dict[str, str]:
        # dataCoord.gc.*; missingTolerance (files not yet in the metadata) stays at its
        # default: shortened, the server deleted files it was still writing (measured).
        env = {}
        if self.gc_interval_s is not None:
            env["DATACOORD_GC_INTERVAL"] = str(self.gc_interval_s)
        if self.gc_drop_tolerance_s is not None:
            env["DATACOORD_GC_DROPTOLERANCE"] = str(self.gc_drop_tolerance_s)
        return env

    def _tls_environment(self) -> dict[str, str]:
        # Read by Milvus's env config source as common.security.tlsMode and tls.*.
        if self.tls_cert is None or self.tls_key is None or self.tls_ca is None:
            return {}
        return {
            "COMMON_SECURITY_TLSMODE": "2",
            "TLS_SERVERPEMPATH": str(self.tls_cert),
            "TLS_SERVERKEYPATH": str(self.tls_key),
            "TLS_CAPEMPATH": str(self.tls_ca),
        }

    def _answers_over_tls(self) -> bool:
        """Whether the proxy answers a gRPC call (CheckHealth) over mutual TLS."""
        import grpc

        assert self.tls_ca is not None
        key = chain = None
        if self.tls_client is not None:
            chain, key = (path.read_bytes() for path in self.tls_client)
        credentials = grpc.ssl_channel_credentials(self.tls_ca.read_bytes(), key, chain)
        with grpc.secure_channel(f"127.0.0.1:{self.port}", credentials) as channel:
            check = channel.unary_unary(
                "/milvus.proto.milvus.MilvusService/CheckHealth",
                request_serializer=lambda _: b"",
                response_deserializer=lambda data: data,
            )
            try:
                check(None, timeout=1.0)
            except grpc.RpcError:
                return False
        return True

    def before_start(self) -> None:
        if others := _servers_in(self.base_dir):
            # Left by a test process that died without stopping it: two servers on one
            # base dir would share rocksmq and etcd data.
            raise MilvusStartError(f"milvus pid {others} already runs in {self.base_dir}")
        assert self.port is not None
        if not _port_free(self.port):
            # The server would still start (its listener takes the wildcard address) and
            # clients on 127.0.0.1 would reach the other socket: fail here instead.
            raise MilvusStartError(f"port {self.port} is in use on 127.0.0.1")
        self._binary, self._env = self._prepare()
        self._sessions_clean = False

    def command(self) -> list[str]:
        return [str(self._binary), "run", "standalone"]

    def popen_options(self) -> dict[str, Any]:
        return {"cwd": self.base_dir, "env": self._env}

    def ready(self) -> bool:
        # /healthz turns OK when every component is healthy; the REST listing proves the
        # proxy answers requests on the client port, which is what callers need.
        assert self.process is not None
        if not self._sessions_clean:
            self._sessions_clean = _revoke_stale_sessions(self.etcd_port, self.process.pid)
        if self.tls_cert is None:
            answers = '"code":200' in _get(f"http://127.0.0.1:{self.port}/v1/vector/collections")
        else:
            answers = self._answers_over_tls()  # the REST port speaks only HTTP/2 then
        return _get(f"http://127.0.0.1:{self.metrics_port}/healthz").strip() == "OK" and answers

    def log_lines(self, text: list[str]) -> list[str]:
        # A Go panic ends in thousands of goroutine lines: the cause is just before them.
        dump = next((i for i, line in enumerate(text) if line.startswith("goroutine ")), None)
        return text[:dump]

    def after_stop(self, pid: int) -> None:
        _remove_machine_files(pid)


def _port_free(port: int) -> bool:
    for host in ("127.0.0.1", "0.0.0.0"):  # the server binds the wildcard address
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # Reuse as the server does, so a restart's TIME_WAIT connections don't count.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def _etcd_config(client_port: int, peer_port: int) -> str:
    # Without this file the embedded etcd takes 2379/2380, so only one server per machine.
    # On a restart with existing data etcd ignores the initial-cluster settings.
    client = f"http://127.0.0.1:{client_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    return (
        "name: default\n"
        f"listen-client-urls: {client}\n"
        f"advertise-client-urls: {client}\n"
        f"listen-peer-urls: {peer}\n"
        f"initial-advertise-peer-urls: {peer}\n"
        f"initial-cluster: default={peer}\n"
        "initial-cluster-state: new\n"
    )


def _revoke_stale_sessions(etcd_port: int, pid: int) -> bool:
    """Revoke the etcd leases of sessions a previous server on this base dir left behind.

    Milvus 2.3.5 does not revoke most of its sessions on SIGTERM (and a SIGKILL revokes
    none); etcd restores their leases on restart with the full TTL, and the new
    coordinators wait for the old exclusive keys to expire: a restart took ~24 s instead
    of ~5 s. All components of one process share one server ID, which the process writes
    to /tmp/milvus/server_id_<pid> as each registers; sessions with a lower ID are stale
    (this etcd serves only this base dir). Returns True once nothing stale is left.
    """
    try:
        first = (SERVER_ID_DIR / f"server_id_{pid}").read_text().split()[0]  # "indexnode-7"
        own_id = int(first.rsplit("-", 1)[1])
    except (OSError, IndexError, ValueError):
        return False  # nothing registered yet
    base = f"http://127.0.0.1:{etcd_port}/v3"
    prefix = "by-dev/meta/session/"
    try:
        response = _post(
            f"{base}/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix[:-1] + "0")}
        )
    except (urllib.error.URLError, OSError, ValueError):
        return False
    stale = set()
    for kv in response.get("kvs", []):
        if kv.get("lease"):  # the ``id`` counter has none
            value = json.loads(base64.b64decode(kv.get("value", "")))
            if int(value.get("ServerID", own_id)) < own_id:
                stale.add(str(kv["lease"]))
    if stale:
        log.info("revoking %d stale milvus sessions below server id %d", len(stale), own_id)
    for lease in stale:
        with contextlib.suppress(urllib.error.URLError, OSError, ValueError):
            _post(f"{base}/lease/revoke", {"ID": lease})
    return not stale


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=1.0) as response:
        result = json.loads(response.read())
    if not isinstance(result, dict):
        raise ValueError(f"unexpected etcd answer: {result!r}")
    return result


def _get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return str(response.read().decode("utf-8", errors="replace"))
    except (urllib.error.URLError, OSError):
        return ""


def _servers_in(base_dir: Path) -> list[int]:
    """PIDs of milvus binaries whose working directory is ``base_dir``."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):  # gone, or another user's
            if (
                proc.name.isdigit()
                and os.readlink(proc / "cwd") == str(base_dir)
                and Path(os.readlink(proc / "exe")).name == "milvus"
            ):
                found.append(int(proc.name))
    return found


def _remove_machine_files(pid: int) -> None:
    # Only this server's: the pid file is shared by every standalone on the machine.
    with contextlib.suppress(OSError):
        if PID_FILE.read_text().strip() == str(pid):
            PID_FILE.unlink()
    with contextlib.suppress(OSError):
        (SERVER_ID_DIR / f"server_id_{pid}").unlink()
