"""Runs the real ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles.

Production uses NVIDIA's Triton container. On machines without Docker or a GPU (CI,
laptops) this starts the same server binary from a virtual environment of its own
(nvidia-pytriton pins numpy<2, so it cannot share the services' environment), on a
repository written with ``facegrid models build --backend python``. It binds only
127.0.0.1, waits for readiness with a timeout, fails fast if the process dies, and on
stop removes its shared-memory regions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from facegrid_harness.processes import ManagedProcess, free_port

PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
SHM_DIR = Path("/dev/shm")


class TritonStartError(RuntimeError):
    """The server exited or did not become ready in time."""


@dataclass(frozen=True)
class TritonInstall:
    """Paths inside a virtual environment that has nvidia-pytriton installed."""

    venv: Path
    package_dir: Path  # .../site-packages/pytriton/tritonserver
    libs_dir: Path  # .../site-packages/nvidia_pytriton.libs
    python_libdir: Path  # directory of libpython3.X.so
    python_version: str  # "3.11"

    @property
    def server_binary(self) -> Path:
        return self.package_dir / "bin" / "tritonserver"

    @classmethod
    def discover(cls, venv: Path) -> TritonInstall:
        python = venv / "bin" / "python"
        if not python.exists():
            raise TritonStartError(f"no python in {venv}: run `make triton-venv` first")
        probe = subprocess.run(
            [
                str(python),
                "-c",
                "import sys, sysconfig, pathlib, pytriton; "
                "print(pathlib.Path(pytriton.__file__).parent); "
                "print(sysconfig.get_config_var('LIBDIR')); "
                "print(f'{sys.version_info[0]}.{sys.version_info[1]}')",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if probe.returncode != 0:
            raise TritonStartError(f"nvidia-pytriton is not importable in {venv}: {probe.stderr}")
        package, libdir, version = probe.stdout.split()
        package_path = Path(package)
        return cls(
            venv=venv,
            package_dir=package_path / "tritonserver",
            libs_dir=package_path.parent / "nvidia_pytriton.libs",
            python_libdir=Path(libdir),
            python_version=version,
        )

    def prepare_backends(self, target: Path) -> Path:
        """A backend directory holding the python backend with the matching stub."""
        python_dir = target / "python"
        python_dir.mkdir(parents=True, exist_ok=True)
        source = self.package_dir / "backends" / "python"
        for name in PYTHON_BACKEND_FILES:
            shutil.copy2(source / name, python_dir / name)
        stub = self.package_dir / "python_backend_stubs" / self.python_version
        shutil.copy2(stub / "triton_python_backend_stub", python_dir / "triton_python_backend_stub")
        return target


@dataclass
class TritonServer(ManagedProcess):
    """A tritonserver process on 127.0.0.1 and free ports. Use as a context manager."""

    server_name: ClassVar[str] = "tritonserver"
    start_error: ClassVar[type[Exception]] = TritonStartError
    truncate_log: ClassVar[bool] = True
    poll_interval_s: ClassVar[float] = 0.1

    install: TritonInstall
    model_repository: Path
    work_dir: Path
    startup_timeout_s: float = 120.0
    stop_timeout_s: float = 10.0
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    shm_prefix: str = field(default_factory=lambda: f"facegrid_{uuid.uuid4().hex[:12]}_")
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _backend_dir: Path = field(default=Path(), init=False, repr=False)
    # OTLP/HTTP endpoint (http://host:port/v1/traces) for Triton's own OpenTelemetry
    # traces of each inference; it joins the caller's trace from the traceparent header.
    trace_url: str | None = None
    # TLS on the gRPC port: certificate and key (PEM); with ``tls_ca``, clients must
    # present a certificate it issued (mutual TLS). HTTP and metrics stay on 127.0.0.1.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tritonserver.log"

    def command(self) -> list[str]:
        return [
            str(self.install.server_binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self._backend_dir}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--log-verbose=0",
            *self._trace_arguments(),
            *self._tls_arguments(),
        ]

    def _tls_arguments(self) -> list[str]:
        if self.tls_cert is None or self.tls_key is None:
            return []
        arguments = [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={self.tls_cert}",
            f"--grpc-server-key={self.tls_key}",
        ]
        if self.tls_ca is not None:
            arguments += [f"--grpc-root-cert={self.tls_ca}", "--grpc-use-ssl-mutual=true"]
        return arguments

    def _trace_arguments(self) -> list[str]:
        if self.trace_url is None:
            return []
        return [
            "--trace-config=mode=opentelemetry",
            "--trace-config=level=TIMESTAMPS",
            "--trace-config=rate=1",
            f"--trace-config=opentelemetry,url={self.trace_url}",
            "--trace-config=opentelemetry,resource=service.name=triton",
            # Export each batch of spans within half a second (OpenTelemetry's default is 5 s).
            "--trace-config=opentelemetry,bsp_schedule_delay=500",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        library_path = [str(self.install.libs_dir), str(self.install.python_libdir)]
        if env.get("LD_LIBRARY_PATH"):
            library_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(library_path)
        # The python backend stub takes its interpreter and packages from PATH's venv.
        env["PATH"] = f"{self.install.venv / 'bin'}:{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.install.venv)
        env.pop("PYTHONPATH", None)
        env.setdefault("FACEGRID_TRITON_ORT_THREADS", "0")
        return env

    def before_start(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._backend_dir = self.install.prepare_backends(self.work_dir / "backends")

    def popen_options(self) -> dict[str, Any]:
        return {"env": self.environment()}

    def ready(self) -> bool:
        # The HTTP port (plain, on 127.0.0.1) answers whether or not gRPC has TLS.
        ready = f"http://127.0.0.1:{self.http_port}/v2/health/ready"
        try:
            with urllib.request.urlopen(ready, timeout=1.0) as reply:
                return bool(reply.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def after_stop(self, pid: int) -> None:
        self.remove_shm_regions()

    def remove_shm_regions(self) -> None:
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
