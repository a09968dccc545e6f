"""The `facegrid` client commands, run in-process against a whole running system.

Needs the ``gateway_stack`` fixture (tests/conftest.py): detection, embedding, search
and gateway as separate processes, a store without collections, and a token with
every scope (``.address``, ``.token``, ``.tokens`` by scope). Argument checks that
need no server run without it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import Stack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from facegrid import audit_checkpoint
from facegrid.cli import main

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO = PROJECT_ROOT / "seeds" / "demo.toml"
NOTICE = "Candidates for review by a trained examiner; not an identification."
CONTEXT = ["--purpose", "testing", "--case", "CLI-0001", "--justification", "cli test"]


@pytest.fixture(autouse=True)
def wide_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as wide as a pipe gets them, whatever the terminal running the tests."""
    monkeypatch.delenv("COLUMNS", raising=False)


class Cli:
    """``facegrid ...`` in-process, connected to the stack; returns code, stdout, stderr."""

    def __init__(self, stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
        self.stack = stack
        self.capsys = capsys

    def __call__(self, *args: str, token: str | None = None) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(
            [
                *args,
                "--address",
                self.stack.address,
                "--token",
                self.stack.token if token is None else token,
            ]
        )
        out, err = self.capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    def ok(self, *args: str) -> str:
        code, out, err = self(*args)
        assert code == 0, f"facegrid {' '.join(args)} exited {code}:\n{out}\n{err}"
        return out


@pytest.fixture
def cli(gateway_stack: Stack, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(gateway_stack, capsys)


def rows(out: str) -> list[list[str]]:
    """The body rows of the rich tables in ``out``, as lists of cell texts."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in out.splitlines()
        if line.startswith("│")
    ]


def count(out: str, label: str) -> int:
    """The count of a row of the index summary table."""
    for row in rows(out):
        if row[0] == label:
            return int(row[1])
    raise AssertionError(f"no row {label!r} in\n{out}")


# -- without a server -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["search", "x.jpg", "--collection", "demo", "--case", "C-1"], "--purpose"),
        (["search", "x.jpg", "--collection", "demo", "--purpose", "testing"], "--case"),
        (["compare", "a.jpg", "b.jpg", "--purpose", "testing"], "--case"),
        (["search-face", "collections/c/faces/f", "--case", "C-1"], "--purpose"),
    ],
)
def test_identification_needs_purpose_and_case(
    args: list[str], missing: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    assert missing in capsys.readouterr().err


def test_bad_arguments_are_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (
        ["search", "x.jpg", "--collection", "demo", "--purpose", "spying", "--case", "C"],
        ["search", "x.jpg", "--collection", "Demo!", "--purpose", "testing", "--case", "C"],
        ["search", "x.jpg", "--collection", "d", *CONTEXT, "--threshold", "101"],
        ["collections", "create", "-bad"],
        ["index", "x", "--collection", "d", "--quality", "best"],
    ):
        with pytest.raises(SystemExit) as exited:
            main(args)
        assert exited.value.code == 2, args
    capsys.readouterr()


def test_unreachable_gateway_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["collections", "list", "--address", "127.0.0.1:1", "--token", "t"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: UNAVAILABLE")
    assert "is the gateway running at 127.0.0.1:1?" in err
    assert "Traceback" not in err


# -- against the stack -------------------------------------------------------------------


def test_collections_create_list_get_delete(cli: Cli) -> None:
    out = cli.ok("collections", "create", "cli-one", "--display-name", "CLI one")
    assert "collections/cli-one" in out
    listed = cli.ok("collections", "list")
    assert any(row[0] == "cli-one" and row[1] == "CLI one" for row in rows(listed)), listed
    details = cli.ok("collections", "get", "cli-one")
    assert ["faces", "0"] in rows(details)
    code, _, err = cli("collections", "create", "cli-one")
    assert code == 1
    assert err.startswith("error: ALREADY_EXISTS")
    assert "deleted collections/cli-one" in cli.ok("collections", "delete", "cli-one")
    assert not any(row[0] == "cli-one" for row in rows(cli.ok("collections", "list")))
    code, _, err = cli("collections", "get", "cli-one")
    assert code == 1
    assert err.startswith("error: NOT_FOUND")


def test_collections_minimum_threshold(cli: Cli) -> None:
    out = cli.ok("collections", "create", "cli-strict", "--min-threshold", "85")
    assert ["minimum threshold", "85"] in rows(out)
    out = cli.ok(
        "collections", "update", "cli-strict", "--min-threshold", "91", "--description", "d"
    )
    assert ["minimum threshold", "91"] in rows(out)
    assert ["description", "d"] in rows(out)
    out = cli.ok("collections", "update", "cli-strict", "--clear-min-threshold")
    assert ["minimum threshold", "the deployment's"] in rows(out)
    code, _, err = cli("collections", "update", "cli-strict", "--min-threshold", "50")
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT")
    assert "below the deployment's minimum" in err
    code, _, err = cli("collections", "update", "cli-strict")
    assert code != 0
    assert "nothing to change" in err
    cli.ok("collections", "delete", "cli-strict")


def test_errors_and_scopes(cli: Cli, gateway_stack: Stack, tmp_path: Path) -> None:
    code, _, err = cli("collections", "list", token="not-a-token")
    assert (code, err.startswith("error: UNAUTHENTICATED")) == (1, True)
    code, _, err = cli(
        "collections", "create", "cli-denied", token=gateway_stack.tokens["facegrid.read"]
    )
    assert (code, err.startswith("error: PERMISSION_DENIED")) == (1, True)
    not_an_image = tmp_path / "note.jpg"
    not_an_image.write_text("not an image")
    code, _, err = cli("detect", str(not_an_image))
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT")
    assert "  field image:" in err
    assert "  reason: " in err


def test_enrol_search_compare_delete(cli: Cli, faces: Path) -> None:
    train = faces / "knn" / "train"
    cli.ok("collections", "create", "cli-gallery")
    code, out, err = cli("index", str(train), "--collection", "cli-gallery")
    assert code == 0, out + err
    assert count(out, "photos") == 9
    assert count(out, "faces indexed") == 9
    assert count(out, "subjects created") == 5
    assert count(out, "errors") == 0

    # Indexing the same photos again stores nothing new.
    again = cli.ok("index", str(train), "--collection", "cli-gallery")
    assert count(again, "faces indexed") == 9
    listed = cli.ok("faces", "list", "--collection", "cli-gallery")
    assert "9 faces" in listed

    probe = str(faces / "knn" / "test" / "obama1.jpg")
    out = cli.ok("search", probe, "--collection", "cli-gallery", *CONTEXT)
    first = rows(out)[0]
    assert first[0] == "1"
    assert first[4] == "obama", out
    assert 0 < float(first[2]) <= 1e-4, out  # the FMR measured at the candidate's similarity
    assert re.search(r"threshold: applied [\d.]+ \(none requested, administrator's minimum", out)
    assert re.search(r"9 faces compared: expect about [\d.e-]+ false candidates", out)
    assert re.search(r"audit record: auditRecords/\S+", out)
    assert "model: " in out
    assert NOTICE in out

    out = cli.ok("search", probe, "--collection", "cli-gallery", "--subjects", *CONTEXT)
    assert rows(out)[0][3] == "obama", out
    assert NOTICE in out

    out = cli.ok(
        "compare",
        str(faces / "misc" / "obama.jpg"),
        str(faces / "knn" / "test" / "obama_and_biden.jpg"),
        *CONTEXT,
    )
    assert len(rows(out)) == 1, out
    assert NOTICE in out
    out = cli.ok(
        "compare", str(faces / "misc" / "biden.jpg"), str(faces / "misc" / "obama.jpg"), *CONTEXT
    )
    assert "no target face at or above the threshold" in out

    # Faces: delete one of Obama's, then again (missing), then with --allow-missing.
    obama = rows(cli.ok("faces", "list", "--collection", "cli-gallery", "--subject", "obama"))
    assert len(obama) == 2
    name = obama[0][0]
    assert name.startswith("collections/cli-gallery/faces/")
    assert "1 face deleted" in cli.ok("faces", "delete", name)
    code, _, err = cli("faces", "delete", name)
    assert code == 1
    assert err.startswith("error: NOT_FOUND")
    assert "0 faces deleted, 1 did not exist" in cli.ok("faces", "delete", name, "--allow-missing")
    out = cli.ok("search", probe, "--collection", "cli-gallery", "--max", "50", *CONTEXT)
    assert name not in out

    # Subjects: one with faces needs --force.
    code, _, err = cli("subjects", "delete", "biden", "--collection", "cli-gallery")
    assert code == 1
    assert err.startswith("error: FAILED_PRECONDITION")
    out = cli.ok("subjects", "delete", "biden", "--collection", "cli-gallery", "--force")
    assert "and 2 faces with it" in out
    subjects = rows(cli.ok("subjects", "list", "--collection", "cli-gallery"))
    assert sorted(row[0] for row in subjects) == [
        "alex_lacamoire",
        "kit_harington",
        "obama",
        "rose_leslie",
    ]

    audit = cli.ok("audit", "list", "--case", "CLI-0001")
    methods = {row[3] for row in rows(audit)}
    assert {"SearchFacesByImage", "SearchSubjectsByImage", "CompareFaces"} <= methods
    assert all(row[4] == "testing" for row in rows(audit))

    code, _, err = cli("collections", "delete", "cli-gallery")
    assert code == 1
    assert err.startswith("error: FAILED_PRECONDITION")
    cli.ok("collections", "delete", "cli-gallery", "--force")


def test_seed_the_demo_manifest_twice(cli: Cli) -> None:
    out = cli.ok("seed", str(DEMO))
    assert count(out, "faces indexed") == 1
    assert "created collections/demo" in out
    out = cli.ok("seed", str(DEMO))
    assert count(out, "faces indexed") == 1
    assert "created collections/demo" not in out
    assert "1 face" in cli.ok("faces", "list", "--collection", "demo").splitlines()
    out = cli.ok(
        "search",
        "package:skimage/data/astronaut.png",
        "--collection",
        "demo",
        "--subjects",
        *CONTEXT,
    )
    assert rows(out)[0][3:5] == ["eileen-collins", "Eileen Collins"]


def test_audit_verify(cli: Cli) -> None:
    cli.ok("collections", "list")
    out = cli.ok("audit", "verify")
    assert "audit log intact" in out
    head = re.search(r"newest record_hash: (\d+:[0-9a-f]{64})", out)
    assert head is not None
    out = cli.ok("audit", "verify", "--expect", head.group(1))
    assert "audit log intact" in out
    sequence = int(head.group(1).split(":")[0])
    code, _, err = cli("audit", "verify", "--expect", f"{sequence}:{'0' * 64}")
    assert code == 1
    assert "BROKEN" in err


def test_audit_checkpoint_is_signed_and_checked(cli: Cli, tmp_path: Path) -> None:
    cli.ok("audit", "list")  # the log holds at least this call's record
    note = tmp_path / "checkpoint.txt"
    out = cli.ok("audit", "checkpoint", "--out", str(note))
    assert "checkpoint of record" in out
    public_key = cli.stack.work_dir / "audit-signing.key.pub"
    assert public_key.is_file()
    key_file = cli.stack.work_dir / "audit-signing.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    text = note.read_text()
    assert text.startswith("facegrid-audit\n")
    out = cli.ok("audit", "verify", "--checkpoint", str(note), "--public-key", str(public_key))
    assert "audit log intact" in out
    # A checkpoint whose hash the log does not hold (as after a rewrite): BROKEN.
    sequence = int(text.split("\n")[1])
    assert sequence >= 1
    key = audit_checkpoint.load_or_create_key(key_file)
    bad = audit_checkpoint.sign(
        audit_checkpoint.Checkpoint(sequence, b"\x00" * 32, datetime.now(UTC)), key
    )
    note.write_text(bad)
    code, _, err = cli(
        "audit", "verify", "--checkpoint", str(note), "--public-key", str(public_key)
    )
    assert code == 1
    assert "BROKEN" in err
    # Signed by another key: refused before the chain is read.
    stranger = Ed25519PrivateKey.generate()
    note.write_text(
        audit_checkpoint.sign(
            audit_checkpoint.Checkpoint(sequence, b"\x00" * 32, datetime.now(UTC)), stranger
        )
    )
    code, _, err = cli(
        "audit", "verify", "--checkpoint", str(note), "--public-key", str(public_key)
    )
    assert code == 1
    assert "no signature by this key" in err
