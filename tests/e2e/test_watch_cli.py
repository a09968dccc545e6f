"""`facegrid watch` and `facegrid processors` against real parts: a real nats-server,
detection, embedding, search, the gateway and an ingest replica as processes
(tests/e2e/ingest_helpers.py), the Hamilton clip read from file:// and a watch-list with
Lin-Manuel Miranda alone.

The clip is watched once (with --keep, so that its source stays ENDED to be seen); the
other tests read what that run stored: replayed, listed, followed and interrupted.
"""

from __future__ import annotations

import contextlib
import io
import json
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from facegrid.cli import main
from facegrid_client.watch import default_processor_id, source_url
from PIL import Image

from tests.e2e.ingest_helpers import CLIP, MIRANDA, IngestStack, enrol, ingest_stack

pytestmark = pytest.mark.skipif(not CLIP.is_file(), reason=f"test video not found ({CLIP})")

SUBJECT = "lin-manuel-miranda"
PROCESSOR = "watch-short-hamilton-clip"  # derived from the clip's file name
CONTEXT = ["--case-id", "C-1", "--justification", "watch cli test"]
LIVE_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def wide_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as wide as a pipe gets them, whatever the terminal running the tests."""
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder the ingest service may read, with a file that is not a video."""
    folder = tmp_path_factory.mktemp("videos")
    (folder / "not-a-video.mp4").write_text("not a video\n")
    return folder


@pytest.fixture(scope="module")
def stack(
    model_repo: Path, videos: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[IngestStack]:
    work = tmp_path_factory.mktemp("watch-cli")
    with ingest_stack(model_repo, work, [CLIP.parent, videos]) as s:
        enrol(s, "watchlist", {SUBJECT: MIRANDA})
        yield s


def connection(s: IngestStack) -> list[str]:
    return ["--ingest", s.ingest_address, "--token", s.stack.token]


def cli(s: IngestStack | None, *args: str) -> tuple[int, str, str]:
    """``facegrid ...`` in-process (connected to the stack when given): code, out, err."""
    out, err = io.StringIO(), io.StringIO()
    argv = [*args, *(connection(s) if s is not None else [])]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    return code, out.getvalue(), err.getvalue()


def records(out: str) -> list[dict[str, Any]]:
    """The JSON objects of ``--json`` output, one per line."""
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def events(out: str) -> list[dict[str, Any]]:
    return [r["match_event"] for r in records(out) if r["kind"] == "event"]


def rows(out: str) -> list[list[str]]:
    """The body rows of the rich tables in ``out``, as lists of cell texts."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in out.splitlines()
        if line.startswith("│")
    ]


@pytest.fixture(scope="module")
def watched(stack: IngestStack) -> tuple[int, str, str]:
    """The clip watched to its end, the processor left running (--keep)."""
    return cli(
        stack,
        "watch",
        str(CLIP),
        "--collection",
        "watchlist",
        *CONTEXT,
        "--keep",
        "--json",
        "--timeout",
        "30",
    )


# -- without a server ----------------------------------------------------------------


def test_sources_become_urls_and_processor_ids(tmp_path: Path) -> None:
    video = tmp_path / "Lobby Camera_2.mp4"
    video.write_bytes(b"")
    url = source_url(str(video))
    assert url == video.resolve().as_uri()
    assert default_processor_id(url) == "watch-lobby-camera-2"
    rtsp = "rtsp://admin:secret@10.0.0.5:554/Streaming/101"
    assert source_url(rtsp) == rtsp
    assert default_processor_id(rtsp) == "watch-10-0-0-5-554-streaming-101"  # no password
    assert len(default_processor_id("file:///" + "x" * 100 + ".mp4")) == 63


def test_bad_watch_arguments_are_refused_before_any_call(tmp_path: Path) -> None:
    offline = ["--ingest", "127.0.0.1:1", "--token", "t"]
    for args in (
        ["watch", str(CLIP), "--collection", "Bad!", *CONTEXT],
        ["watch", str(CLIP), "--collection", "w", *CONTEXT, "--fps", "50"],
        ["watch", str(CLIP), "--collection", "w", *CONTEXT, "--purpose", "spying"],
        ["watch", "--replay-since", "yesterday", "--processor", "p"],
        ["watch", "--replay-since", "10m", "--after-cursor", "c", "--processor", "p"],
        ["processors", "get", "Not_An_Id"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli(None, *args, *offline)
        assert exited.value.code == 2, args
    for args, message in (
        (["watch", str(CLIP), "--collection", "w"], "--case-id is required"),
        (["watch", str(CLIP), *CONTEXT], "--collection is required"),
        (["watch", str(tmp_path / "none.mp4"), "--collection", "w", *CONTEXT], "no such file"),
        (["watch", "ftp://host/x.mp4", "--collection", "w", *CONTEXT], "unsupported URL"),
        (["watch", "--replay-since", "10m"], "need --processor"),
        (["watch", "--collection", "w", *CONTEXT], "give SOURCE"),
    ):
        code, _, err = cli(None, *args, *offline)
        assert code == 1, args
        assert err.startswith("error: "), err
        assert message in err, err


def test_an_unreachable_ingest_service_is_one_clear_error() -> None:
    code, _, err = cli(None, "processors", "list", "--ingest", "127.0.0.1:1", "--token", "t")
    assert code == 1
    assert err.startswith("error: UNAVAILABLE")
    assert "is the ingest service running at 127.0.0.1:1?" in err


# -- against the stack -------------------------------------------------------------------


def test_watch_prints_the_candidate_event_and_exits_after_the_clip(
    watched: tuple[int, str, str],
) -> None:
    code, out, err = watched
    assert code == 0, out + err
    kinds = [r["kind"] for r in records(out)]
    assert kinds[:2] == ["processor", "processor"], kinds  # created, then started
    found = events(out)
    assert len(found) == 1, found
    event = found[0]
    top = event["matches"][0]
    assert top["face"]["subject_id"] == SUBJECT
    assert top["similarity"] >= 90
    assert top["similarity"] >= event["threshold"]["applied"] >= 90
    assert event["audit_record"].startswith("auditRecords/")
    assert event["name"].startswith(f"streamProcessors/{PROCESSOR}/matchEvents/")
    assert event["source_id"] == "cam-1"
    assert event["context"]["case_id"] == "C-1"
    states = [r["state"] for r in records(out) if r["kind"] == "source_state"]
    assert states[-1] == "STATE_ENDED", states
    assert "STATE_STREAMING" in states, states
    summary = records(out)[-1]
    assert summary["kind"] == "summary"
    assert summary["candidate_events"] == 1
    assert summary["frames_received"] > 200  # the 10 s clip has 275 frames
    assert 14 <= summary["frames_sampled"] <= 24  # 2 per second
    assert summary["tracks"] >= 1
    assert summary["processor"] == "left running"


def test_processors_get_and_list_show_the_state(
    stack: IngestStack, watched: tuple[int, str, str]
) -> None:
    code, out, err = cli(stack, "processors", "get", PROCESSOR)
    assert code == 0, out + err
    details = rows(out)
    assert ["state", "running"] in details, out
    assert ["collection", "collections/watchlist"] in details, out
    assert ["case", "C-1"] in details, out
    source = next(row for row in details if row[0] == "cam-1")
    assert source[2] == "ended", out
    assert source[1].startswith("file://"), source
    code, out, err = cli(stack, "processors", "list")
    assert code == 0, err
    assert any(row[0] == PROCESSOR and row[2] == "running" for row in rows(out)), out


def test_replay_since_prints_the_stored_event(
    stack: IngestStack, watched: tuple[int, str, str], tmp_path: Path
) -> None:
    live = events(watched[1])
    assert live
    code, out, err = cli(
        stack, "watch", "--replay-since", "10m", "--processor", PROCESSOR, "--no-follow", "--json"
    )
    assert code == 0, out + err
    assert [e["event_id"] for e in events(out)] == [e["event_id"] for e in live]
    assert records(out)[-1] == {
        "kind": "summary",
        "stream_processor": f"streamProcessors/{PROCESSOR}",
        "candidate_events": 1,
    }
    # As text, with the best-shot chip saved for review.
    chips = tmp_path / "chips"
    code, out, err = cli(
        stack,
        "watch",
        "--replay-since",
        "10m",
        "--processor",
        PROCESSOR,
        "--no-follow",
        "--chips",
        str(chips),
    )
    assert code == 0, out + err
    assert out.startswith("Candidate matches for review by a trained examiner")
    row = next(line for line in out.splitlines() if SUBJECT in line)
    assert live[0]["audit_record"] in row
    assert float(row.split()[4]) >= 90, row  # date, time, camera, candidate, similarity
    assert "1 candidate event of" in out
    (chip,) = chips.glob("*.png")
    assert chip.stem == live[0]["event_id"]
    with Image.open(chip) as image:
        assert image.size == (150, 150)
    # Nothing stored after the last event's cursor.
    code, out, err = cli(
        stack,
        "watch",
        "--after-cursor",
        live[-1]["cursor"],
        "--processor",
        PROCESSOR,
        "--no-follow",
        "--json",
    )
    assert code == 0, out + err
    assert events(out) == []


def test_replay_follows_until_interrupted(
    stack: IngestStack, watched: tuple[int, str, str]
) -> None:
    """As a process: the stored event, then following; Ctrl-C exits 0 with a summary."""
    live = events(watched[1])
    command = [sys.executable, "-m", "facegrid.cli", "watch", "--replay-since", "10m"]
    command += ["--processor", PROCESSOR, "--json", *connection(stack)]
    process, lines = _spawn(command)
    try:
        first = _next(lines)
        assert first["kind"] == "event"
        assert first["match_event"]["event_id"] == live[0]["event_id"]
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        _reap(process)
    rest = _drain(lines)
    assert process.stderr is not None
    err = process.stderr.read()
    assert code == 0, err
    assert "interrupted" in err
    assert rest[-1]["kind"] == "summary", rest
    assert rest[-1]["candidate_events"] == 1


def _spawn(command: list[str]) -> tuple[subprocess.Popen[str], queue.Queue[str | None]]:
    """A process whose stdout lines arrive in a queue, then None at its end."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return process, lines


def _next(lines: queue.Queue[str | None], timeout_s: float = 60) -> dict[str, Any]:
    line = lines.get(timeout=timeout_s)
    assert line is not None, "the process ended"
    record: dict[str, Any] = json.loads(line)
    return record


def _reap(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


def _drain(lines: queue.Queue[str | None]) -> list[dict[str, Any]]:
    """The rest of a finished process's JSON lines."""
    out: list[dict[str, Any]] = []
    while (line := lines.get(timeout=10)) is not None:
        out.append(json.loads(line))
    return out


def test_watching_a_running_processor_attaches_and_leaves_it_running(
    stack: IngestStack, watched: tuple[int, str, str]
) -> None:
    """The processor left running by --keep: reused (same collection, source and case),
    followed until its ended source's last events could have come, not stopped."""
    code, out, err = cli(stack, "watch", str(CLIP), "--collection", "watchlist", *CONTEXT, "--json")
    assert code == 0, out + err
    actions = [r["action"] for r in records(out) if r["kind"] == "processor"]
    assert actions == ["reused", "attached"], actions
    assert events(out) == []  # the clip is not played again
    assert records(out)[-1]["processor"] == "left running"
    code, out, _ = cli(stack, "processors", "get", PROCESSOR)
    assert ["state", "running"] in rows(out), out


def test_ctrl_c_stops_the_processor_and_exits_0(
    stack: IngestStack, watched: tuple[int, str, str]
) -> None:
    """As a process: Ctrl-C while the clip plays stops the processor (never deletes it)."""
    command = [sys.executable, "-m", "facegrid.cli", "watch", str(CLIP), "--collection"]
    command += ["watchlist", *CONTEXT, "--processor", "watch-interrupted", "--json"]
    process, lines = _spawn([*command, *connection(stack)])
    try:
        while True:
            record = _next(lines)
            if record["kind"] == "source_state" and record["state"] == "STATE_STREAMING":
                break
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    finally:
        _reap(process)
    rest = _drain(lines)
    assert code == 0, rest
    stopped = [r for r in rest if r["kind"] == "processor" and r["action"] == "stopped"]
    assert len(stopped) == 1, rest
    assert rest[-1]["kind"] == "summary"
    assert rest[-1]["processor"] == "stopped"
    code, out, _ = cli(stack, "processors", "get", "watch-interrupted")
    assert code == 0
    assert ["state", "stopped"] in rows(out), out


def test_a_source_that_is_not_a_video_fails(stack: IngestStack, videos: Path) -> None:
    code, out, err = cli(
        stack,
        "watch",
        str(videos / "not-a-video.mp4"),
        "--collection",
        "watchlist",
        *CONTEXT,
        "--timeout",
        "30",
    )
    assert code == 1, out + err
    assert "source cam-1 failed" in out, out
    assert "error: streamProcessors/watch-not-a-video failed: cam-1: " in err, err
    assert "the processor was stopped" in out


def test_processors_stop_and_start(stack: IngestStack, watched: tuple[int, str, str]) -> None:
    code, out, err = cli(stack, "processors", "stop", f"streamProcessors/{PROCESSOR}")
    assert code == 0, err
    assert f"stopped streamProcessors/{PROCESSOR}" in out
    code, out, _ = cli(stack, "processors", "get", PROCESSOR)
    assert ["state", "stopped"] in rows(out), out
    code, _, err = cli(stack, "processors", "get", "no-such-processor")
    assert code == 1
    assert err.startswith("error: NOT_FOUND")


def test_a_bad_collection_is_not_found(stack: IngestStack) -> None:
    code, out, err = cli(
        stack,
        "watch",
        str(CLIP),
        "--collection",
        "no-such-list",
        *CONTEXT,
        "--processor",
        "watch-bad",
    )
    assert code == 1, out + err
    assert err.startswith("error: NOT_FOUND"), err
    assert "collections/no-such-list" in err, err


def test_an_existing_processor_of_another_collection_is_refused(
    stack: IngestStack, watched: tuple[int, str, str]
) -> None:
    enrol(stack, "other-list", {})
    code, _, err = cli(stack, "watch", str(CLIP), "--collection", "other-list", *CONTEXT)
    assert code == 1
    assert f"streamProcessors/{PROCESSOR} exists and watches collections/watchlist" in err
