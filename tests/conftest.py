"""Shared fixtures: built models, a real Triton server, services as real processes."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from facegrid import diagnostics
from facegrid.auth import ALL_SCOPES, bearer_metadata, create_token
from facegrid.models.repository import TritonBackend
from facegrid_harness.launcher import FACE_SERVICES, ServiceGroup, serve_command, wait_healthy
from facegrid_harness.processes import free_ports, stop_process
from facegrid_harness.triton_server import TritonInstall, TritonServer
from facegrid_models.build import build_repository

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRITON_VENV = PROJECT_ROOT / ".venv-triton"
FACES_ENV = "FACEGRID_TEST_FACES"
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``last`` run after all others, in their order."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test's report carries the stacks of the services still running (those
    of module and session fixtures): where each was waiting when the test gave up."""
    report = yield
    if report.when == "call" and report.failed:
        waiting = []
        for group in ServiceGroup.live():
            for name, stacks in group.stacks().items():
                report.sections.append((f"{name}: its stacks after the failure", stacks))
                waiting += [f"{name}: {call}" for call in diagnostics.waiting_calls(stacks)]
        if waiting:  # first, before the captured output: a truncated log keeps it
            report.sections.insert(0, ("the calls the services still served", "\n".join(waiting)))
            report.user_properties += [("waiting", line) for line in waiting]
    return report


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Each failed test in a few lines, near the end of the output (a CI log shown
    truncated keeps its end): what it raised, and the calls its services still served."""
    failed: list[pytest.TestReport] = terminalreporter.stats.get("failed", [])
    if not failed:
        return
    terminalreporter.section("why the failed tests failed, in short", sep="-")
    for report in failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        terminalreporter.write_line(f"{report.nodeid}: {_first_lines(message)}")
        waiting = [value for key, value in report.user_properties if key == "waiting"]
        for line in waiting[:_MAX_WAITING]:
            terminalreporter.write_line(f"    {line[:300]}")


_MAX_WAITING = 6


def _first_lines(message: str, count: int = 4) -> str:
    """The start of a failure message on one line: its first lines, at most 600 chars."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = " | ".join(lines[:count])
    return text if len(text) <= 600 else text[:597] + "..."


def faces_dir() -> Path | None:
    """../shared/data/faces beside the project (or $FACEGRID_TEST_FACES), if present."""
    path = Path(os.environ.get(FACES_ENV, SHARED_DATA / "faces"))
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def faces() -> Path:
    path = faces_dir()
    if path is None:
        pytest.skip(f"test photographs not found (../shared/data/faces or ${FACES_ENV})")
    return path


def _shared(folder: str, what: str) -> Path:
    path = SHARED_DATA / folder
    if not path.is_dir():
        pytest.skip(f"{what} not found: ../shared/data/{folder} is absent")
    return path


@pytest.fixture(scope="session")
def lfw_dev() -> Path:
    """Half of Labeled Faces in the Wild (../shared/data/lfw-dev), if present."""
    return _shared("lfw-dev", "LFW's development half")


@pytest.fixture(scope="session")
def crowds() -> Path:
    """Annotated crowd photos (../shared/data/crowds), if present."""
    return _shared("crowds", "the annotated crowd photos")


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A python-backend Triton repository; the local backend reads the same ONNX files."""
    repo = tmp_path_factory.mktemp("model_repository")
    build_repository(repo, TritonBackend.PYTHON)
    return repo


@pytest.fixture(scope="session")
def triton(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The real tritonserver binary from nvidia-pytriton, on 127.0.0.1 and free ports."""
    if not (TRITON_VENV / "bin" / "python").exists():
        pytest.fail(f"{TRITON_VENV} is missing: run `make triton-venv` (make test does)")
    server = TritonServer(
        TritonInstall.discover(TRITON_VENV), model_repo, tmp_path_factory.mktemp("triton")
    )
    with server:
        yield server


@dataclass
class ServiceProcess:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 30.0) -> int:
        return stop_process(self.process, timeout_s)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_service(
    name: str,
    overrides: list[str],
    work_dir: Path,
    timeout_s: float = 120.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> ServiceProcess:
    """Run ``facegrid serve NAME`` as its own process and wait until it is healthy
    (asking over TLS with ``credentials`` when it serves TLS)."""
    port, metrics_port = free_ports(2)
    log_path = work_dir / f"{name}-{port}.log"
    # Its metrics on a free port too, so that several of a kind can run side by side.
    command = serve_command(name, port, [f"{name}.metrics_port={metrics_port}", *overrides])
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    service = ServiceProcess(name, f"127.0.0.1:{port}", process, log_path)
    try:
        wait_healthy(service.address, timeout_s, process, credentials)
    except BaseException:
        service.stop()
        raise RuntimeError(f"{name} did not start:\n{service.log()}") from None
    return service


BACKENDS = ["local", "triton"]


def inference_overrides(backend: str, model_repo: Path, triton: TritonServer | None) -> list[str]:
    overrides = [f"inference.model_repository={model_repo}", f"inference.backend={backend}"]
    if triton is not None:
        overrides.append(f"inference.triton_url={triton.grpc_url}")
    return overrides


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _service_fixture(
    name: str,
    backend: str,
    model_repo: Path,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    triton = request.getfixturevalue("triton") if backend == "triton" else None
    service = start_service(
        name,
        inference_overrides(backend, model_repo, triton),
        tmp_path_factory.mktemp(f"{name}-{backend}"),
    )
    yield service
    code = service.stop()
    assert code == 0, f"{name} exited with {code}:\n{service.log()}"


@pytest.fixture(scope="session")
def detection(
    backend: str,
    model_repo: Path,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    yield from _service_fixture("detection", backend, model_repo, request, tmp_path_factory)


@pytest.fixture(scope="session")
def embedding(
    backend: str,
    model_repo: Path,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    yield from _service_fixture("embedding", backend, model_repo, request, tmp_path_factory)


# ---------------------------------------------------------------- Milvus

MILVUS_VENV = PROJECT_ROOT / ".venv-milvus"
STORES = ["lite", "server"]


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Milvus 2.3 standalone server (the `milvus` PyPI package) on 127.0.0.1."""
    from facegrid_harness.milvus_server import MilvusServer

    if not (MILVUS_VENV / "bin" / "python").exists():
        pytest.fail(f"{MILVUS_VENV} is missing: run `make milvus-venv` (make test does)")
    with MilvusServer(MILVUS_VENV, tmp_path_factory.mktemp("milvus")) as server:
        yield server.uri


@pytest.fixture(scope="module", params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_uri(store_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's own search service stores: a fresh Lite file, or the server."""
    if store_kind == "server":
        return str(request.getfixturevalue("milvus_server"))
    return str(tmp_path / "facegrid.db")


@pytest.fixture(scope="module")
def search_service(
    store_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    work = tmp_path_factory.mktemp(f"search-{store_kind}")
    uri = (
        str(request.getfixturevalue("milvus_server"))
        if store_kind == "server"
        else str(work / "facegrid.db")
    )
    service = start_service("search", [f"store.uri={uri}"], work)
    yield service
    code = service.stop()
    assert code == 0, f"search exited with {code}:\n{service.log()}"


# ---------------------------------------------------------------- the whole system


@dataclass
class Stack:
    """detection, embedding, search and gateway as separate processes, like `facegrid up`."""

    group: ServiceGroup
    address: str  # the gateway's
    token: str  # every scope
    tokens: dict[str, str]  # scope -> a token with only that scope
    work_dir: Path

    def metadata(self, token: str | None = None) -> tuple[tuple[str, str]]:
        return bearer_metadata(self.token if token is None else token)


def start_stack(
    overrides: list[str], work_dir: Path, extra: dict[str, list[str]] | None = None
) -> Stack:
    """The four services with ``overrides``, and ``extra`` settings per service name."""
    credentials = work_dir / "credentials.json"
    token = create_token(credentials, "investigator-1", ALL_SCOPES)
    tokens = {scope: create_token(credentials, f"only-{scope}", [scope]) for scope in ALL_SCOPES}
    group = ServiceGroup(
        [
            *overrides,
            f"store.uri={work_dir / 'facegrid.db'}",
            f"gateway.credentials_file={credentials}",
            f"gateway.audit_path={work_dir / 'audit.db'}",
            f"gateway.audit_signing_key_file={work_dir / 'audit-signing.key'}",
        ],
        log_dir=work_dir / "logs",
    )
    try:
        for name in FACE_SERVICES:
            group.start(name, port=0, extra=(extra or {}).get(name, []))
    except BaseException:
        group.stop()
        logs = "\n".join(p.read_text(errors="replace") for p in (work_dir / "logs").glob("*"))
        raise RuntimeError(f"the stack did not start:\n{logs}") from None
    return Stack(group, group.services["gateway"].address, token, tokens, work_dir)


def stop_stack(stack: Stack) -> None:
    processes = {name: service.process for name, service in stack.group.services.items()}
    stack.group.stop()
    codes = {name: process.returncode for name, process in processes.items()}
    assert all(code == 0 for code in codes.values()), f"exit codes {codes}"


@pytest.fixture(scope="module")
def gateway_stack(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The embedded default: in-process onnxruntime, Milvus Lite."""
    stack = start_stack(
        inference_overrides("local", model_repo, None), tmp_path_factory.mktemp("stack")
    )
    yield stack
    stop_stack(stack)


@pytest.fixture(scope="module", params=BACKENDS)
def e2e_stack(
    request: pytest.FixtureRequest, model_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The whole system, with inference in-process and then through the real Triton."""
    backend = str(request.param)
    triton = request.getfixturevalue("triton") if backend == "triton" else None
    stack = start_stack(
        inference_overrides(backend, model_repo, triton),
        tmp_path_factory.mktemp(f"stack-{backend}"),
        # Retention sweeps every second (tests/e2e/test_gateway.py's retention test).
        {"gateway": ["gateway.retention_interval_s=1"]},
    )
    yield stack
    stop_stack(stack)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims a huge size: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
