"""No secret where it does not belong: after the rest of the suite has run (this module
is moved to the end), every file the suite's services wrote, under pytest's base
temporary directory, is searched for bearer tokens, JWTs, private keys, passwords in
URLs and the justifications the tests sent. Tokens and JWTs may appear nowhere (the
credential file holds only their hashes); private keys only in key files; passwords in
URLs and justifications in no log (the audit log and the stream processors' definitions
keep justifications and camera URLs on purpose, and are not logs). A token may be in a
``.token`` file (``facegrid up`` writes the operator's) readable by its owner alone."""

from __future__ import annotations

import ast
import itertools
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.last

TESTS = Path(__file__).resolve().parents[1]  # tests/, both layers
MAX_FILE_BYTES = 256 << 20

TOKEN = re.compile(rb"fgt_[A-Za-z0-9_-]{43}")
JWT = re.compile(rb"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{20,}")
PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
# user:password@ in a URL, unless the password was masked as ***.
URL_PASSWORD = re.compile(rb"[a-z][a-z0-9+.-]*://[^\s/@:'\"]+:(?!\*\*\*@)[^\s/@'\"]+@")
KEY_FILE_SUFFIXES = (".key", ".pem")


def _is_log(path: Path) -> bool:
    return path.suffix in (".log", ".out", ".err") or "logs" in path.parts


def _files(root: Path) -> Iterator[Path]:
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and path.stat().st_size <= MAX_FILE_BYTES:
                yield path
        except OSError:
            continue  # removed meanwhile (a server's temporary file)


def justifications_the_tests_send() -> set[bytes]:
    """The justifications in the test sources (6+ characters): ``justification=`` keyword
    arguments (string literals or module constants) and the value after a
    ``"--justification"`` command-line flag."""
    found: set[str] = set()
    for source in TESTS.rglob("*.py"):
        tree = ast.parse(source.read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name) and isinstance(node.value.value, str)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "justification":
                if isinstance(node.value, ast.Constant):
                    found.add(str(node.value.value))
                elif isinstance(node.value, ast.Name) and node.value.id in constants:
                    found.add(constants[node.value.id])
            elif isinstance(node, ast.List | ast.Tuple):
                values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                for flag, value in itertools.pairwise(values):
                    if flag == "--justification" and isinstance(value, str):
                        found.add(value)
    return {text.encode() for text in found if len(text) >= 6}


def leaks(root: Path, justifications: set[bytes]) -> list[str]:
    """What is where it must not be, as "path: what" lines."""
    found = []
    for path in _files(root):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        where = path.relative_to(root)
        if TOKEN.search(data):
            if path.suffix != ".token":
                found.append(f"{where}: a bearer token")
            elif path.stat().st_mode & 0o077:
                found.append(f"{where}: a token file others may read")
        if JWT.search(data):
            found.append(f"{where}: a JWT")
        if PRIVATE_KEY.search(data) and path.suffix not in KEY_FILE_SUFFIXES:
            found.append(f"{where}: a private key")
        if _is_log(path):
            match = URL_PASSWORD.search(data)
            if match:
                found.append(f"{where}: a password in a URL ({match.group()[:40]!r})")
            for text in justifications:
                if text in data:
                    found.append(f"{where}: the justification {text.decode()!r}")
    return found


def test_the_scan_finds_what_it_looks_for() -> None:
    # Outside pytest's base directory, which the next test searches.
    with tempfile.TemporaryDirectory() as scratch:
        _check_the_scan(Path(scratch))


def _check_the_scan(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "gateway.log").write_text(
        "token fgt_" + "a" * 43 + "\nrtsp://admin:hunter2@cam/1 and robbery at dawn\n"
    )
    (tmp_path / "fine.log").write_text("rtsp://admin:***@cam/1\n")
    (tmp_path / "server.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (tmp_path / "copy.txt").write_text("-----BEGIN EC PRIVATE KEY-----\n")
    found = leaks(tmp_path, {b"robbery at dawn"})
    assert sorted(found) == [
        "copy.txt: a private key",
        "logs/gateway.log: a bearer token",
        "logs/gateway.log: a password in a URL (b'rtsp://admin:hunter2@')",
        "logs/gateway.log: the justification 'robbery at dawn'",
    ]
    (tmp_path / "admin.token").write_text("fgt_" + "b" * 43)
    (tmp_path / "admin.token").chmod(0o644)
    assert leaks(tmp_path / "logs", set())[0] == "gateway.log: a bearer token"
    assert "admin.token: a token file others may read" in leaks(tmp_path, set())
    sent = justifications_the_tests_send()
    assert {b"end-to-end test", b"cli test", b"watch cli test"} <= sent


def test_nothing_the_suites_services_wrote_holds_a_secret(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.getbasetemp()
    files = sum(1 for _ in _files(root))
    found = leaks(root, justifications_the_tests_send())
    print(f"\nsearched {files} files under {root}")
    assert not found, "\n".join(found[:20])
