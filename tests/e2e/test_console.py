"""The examiner console in a real browser: Debian's headless Chromium driven by
Playwright, against the whole system as processes (a real nats-server, detection,
embedding, search, the gateway, an ingest replica and the console: `ingest_stack` plus
`facegrid serve console`).

A person signs in with a token, searches the watch-list with a probe photo, records a
decision on a candidate and finds it in the audit log; an alert arrives live while the
alerts page is open, is still there after a reload (the stream resuming after its
cursor, without repeating it) and is reviewed like a search; a person without the
search scope is refused; faces are enrolled (with the quality report) and deleted after
a confirmation; the audit chain is verified. Each page's screenshot is written to
var/console-screenshots/ (kept for the issue's closing note, not asserted on).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from facegrid.v1 import face_service_pb2 as F  # noqa: N812
from facegrid.v1 import ingest_pb2 as I  # noqa: N812
from oidc_provider import OidcProvider
from playwright.sync_api import Browser, Page, sync_playwright

from tests.e2e.ingest_helpers import (
    CALL_TIMEOUT_S,
    CLIP,
    MIRANDA,
    IngestStack,
    clip_jpegs,
    enrol,
    identification_context,
    ingest_stack,
    push_visit,
)

CHROMIUM = Path(os.environ.get("FACEGRID_CHROMIUM", "/usr/bin/chromium"))
# The flags this machine needs (no sandbox as root, and no background calls to the
# internet, which is closed here).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path("var/console-screenshots")
SUBJECT = "lin-manuel-miranda"
PROCESSOR = "console-gate"
CASE = "CASE-CONSOLE-1"
WAIT_MS = 60_000
ISSUER = "https://idp.agency.test/realms/police"
CLIENT_ID = "facegrid-console"

pytestmark = [
    pytest.mark.skipif(not CLIP.is_file(), reason=f"test video not found ({CLIP})"),
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found (apt-get install chromium)"
    ),
]


class Console:
    def __init__(self, stack: IngestStack, url: str) -> None:
        self.stack = stack
        self.url = url

    @property
    def token(self) -> str:
        return self.stack.stack.token


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    """The agency's identity provider (a stand-in: no real one runs here)."""
    running = OidcProvider(
        ISSUER, CLIENT_ID, "officer-4711", ["facegrid.search", "facegrid.read", "facegrid.review"]
    )
    yield running
    running.close()


@pytest.fixture(scope="module")
def console(
    model_repo: Path, provider: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Console]:
    work = tmp_path_factory.mktemp("console")
    # The gateway accepts the provider's access tokens besides its own tokens.
    oidc = [f"oidc.issuer={ISSUER}", f"oidc.jwks_url={provider.url}/certs"]
    with ingest_stack(model_repo, work, [CLIP.parent], overrides=oidc) as s:
        enrol(s, "watchlist", {SUBJECT: MIRANDA})
        service = s.stack.group.start(
            "console",
            port=0,
            extra=[
                f"console.session_key_file={work / 'session.key'}",
                f"console.oidc_client_id={CLIENT_ID}",
                "console.oidc_scopes=openid facegrid",
                f"console.oidc_discovery_url={provider.url}/.well-known/openid-configuration",
            ],
        )
        yield Console(s, f"http://{service.address}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, console: Console) -> Iterator[Page]:
    """A fresh browser context (no cookies) on the console."""
    context = browser.new_context(base_url=console.url, viewport={"width": 1200, "height": 900})
    context.set_default_timeout(WAIT_MS)
    opened = context.new_page()
    yield opened
    context.close()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def sign_in(page: Page, token: str) -> None:
    page.goto("/search")
    page.get_by_label("Access token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def search(page: Page, photo: Path, case: str = CASE) -> None:
    page.goto("/search")
    page.get_by_label("Probe photo (JPEG or PNG)").set_input_files(str(photo))
    page.get_by_label("Collection").select_option("watchlist")
    page.get_by_label("Purpose").select_option("PURPOSE_CRIMINAL_INVESTIGATION")
    page.get_by_label("Case").fill(case)
    page.get_by_label("Justification").fill("Probe from the console test")
    page.get_by_role("button", name="Search", exact=True).click()


def decide_on_first(page: Page, outcome: str, reason: str) -> None:
    """Record a decision on candidate 1 of the page's list; wait until it is on record."""
    first = page.locator("#candidate-1")
    first.get_by_label(outcome).check()
    first.get_by_label("Reason").fill(reason)
    first.get_by_role("button", name="Record decision on candidate 1").click()
    page.get_by_text("Your decision is recorded in the audit log.").wait_for()


def test_sign_in_refuses_an_unknown_token_and_pages_need_a_sign_in(page: Page) -> None:
    page.goto("/collections")
    assert "/sign-in" in page.url
    shot(page, "01-sign-in")
    sign_in(page, "fgt_not-a-real-token")
    assert page.get_by_text("The gateway did not accept this token.").is_visible()
    cookies = page.context.cookies()
    assert not [c for c in cookies if c["name"] == "facegrid_session"]


def test_signing_in_on_the_agencys_provider(
    page: Page, console: Console, provider: OidcProvider
) -> None:
    """The authorization-code flow with PKCE: the provider's page, back with a code, the
    access token kept in the session; the gateway then knows the person by the token's
    subject and allows what its scopes allow."""
    page.goto("/sign-in?next=/collections")
    shot(page, "01b-sign-in-oidc")
    page.get_by_role("link", name="Sign in with your organisation's account").click()
    page.get_by_role("heading", name="Collections").wait_for()
    assert "officer-4711 (OIDC)" in page.inner_text("header")
    exchanged = provider.token_requests[-1]
    assert exchanged["grant_type"] == "authorization_code"
    assert len(exchanged["code_verifier"]) >= 43
    assert exchanged["redirect_uri"] == f"{console.url}/sign-in/oidc/callback"
    search(page, MIRANDA, case="CASE-CONSOLE-OIDC")
    page.get_by_role("heading", name="Search of watchlist").wait_for()
    listed = console.stack.faces.ListAuditRecords(
        F.ListAuditRecordsRequest(filter=F.AuditRecordFilter(case_id="CASE-CONSOLE-OIDC")),
        metadata=console.stack.metadata(),
        timeout=CALL_TIMEOUT_S,
    ).audit_records
    assert [r.principal for r in listed] == ["officer-4711"]
    # Without the enrol scope, the provider's token cannot enrol: the gateway says no.
    page.goto("/collections/watchlist")
    page.get_by_label("Photo (JPEG or PNG)").set_input_files(str(MIRANDA))
    page.get_by_role("button", name="Enrol").click()
    assert "PERMISSION_DENIED" in page.get_by_role("alert").inner_text()


def test_a_callback_that_does_not_belong_to_the_sign_in_is_refused(page: Page) -> None:
    page.goto("/sign-in/oidc/callback?code=stolen&state=guessed")
    assert "/sign-in" in page.url
    assert "took too long or began elsewhere" in page.inner_text("main")
    assert not [c for c in page.context.cookies() if c["name"] == "facegrid_session"]


def test_a_search_a_decision_and_its_audit_record(page: Page, console: Console) -> None:
    sign_in(page, console.token)
    session = next(c for c in page.context.cookies() if c["name"] == "facegrid_session")
    assert session["httpOnly"]
    assert session["sameSite"] == "Strict"
    assert console.token not in session["value"]  # sealed, not the token itself
    shot(page, "02-search-form")
    search(page, MIRANDA)
    page.get_by_role("heading", name="Search of watchlist").wait_for()
    body = page.inner_text("main")
    assert "Candidates, not identifications." in body
    assert "False candidates to expect" in body
    assert "Threshold applied" in body
    first = page.locator("#candidate-1")
    assert SUBJECT in first.inner_text()
    assert "Similarity" in first.inner_text()
    assert "False match rate" in first.inner_text()
    assert page.get_by_alt_text(
        "The face the gateway searched with, cropped from your photo"
    ).is_visible()
    shot(page, "03-search-result")
    record = page.get_by_role("link", name="open its review page").get_attribute("href")
    assert record
    assert record.startswith("/reviews/")
    face_name = first.locator("code").first.inner_text()
    md = console.stack.metadata()
    before = console.stack.faces.GetFace(
        F.GetFaceRequest(name=face_name), metadata=md, timeout=CALL_TIMEOUT_S
    ).face

    decide_on_first(page, "Not a match", "Different ear shape; hairline differs")
    decided = page.locator("#candidate-1")
    assert "Not a match" in decided.inner_text()
    assert "Different ear shape; hairline differs" in decided.inner_text()
    assert "(current)" in decided.inner_text()
    shot(page, "04-review-decision")

    # Opened again later: the decision is shown with the search's candidates.
    page.goto(record)
    assert "Different ear shape; hairline differs" in page.inner_text("#candidate-1")

    # Its audit record, from the link on the decision.
    page.locator("#candidate-1 .decisions a").first.click()
    page.get_by_role("heading", name="Audit record").wait_for()
    audit_text = page.inner_text("main")
    assert "/facegrid.v1.FaceService/CreateReviewDecision" in audit_text
    assert "Not a match on" in audit_text
    assert CASE in audit_text
    shot(page, "05-audit-record")
    listed = console.stack.faces.ListAuditRecords(
        F.ListAuditRecordsRequest(
            filter=F.AuditRecordFilter(
                case_id=CASE, method="/facegrid.v1.FaceService/CreateReviewDecision"
            )
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    ).audit_records
    assert [r.review_decision.candidate for r in listed] == [face_name]
    assert listed[0].target == "auditRecords/" + record.removeprefix("/reviews/")
    after = console.stack.faces.GetFace(
        F.GetFaceRequest(name=face_name), metadata=md, timeout=CALL_TIMEOUT_S
    ).face
    assert after == before  # a decision changes no stored face


def push_him(s: IngestStack, name: str) -> None:
    """His visit at the gate. (Such a push once hung in CI until its deadline: the
    stream's end lost the cancellation of its lease renewal; tests/unit/
    test_push_lease.py. A hang fails the test, with where the replica waited.)"""
    push_visit(s, name, "gate-1", clip_jpegs(5), time.time(), 1, timeout_s=60)


def test_an_alert_arrives_live_resumes_after_a_reload_and_is_reviewed(
    page: Page, console: Console
) -> None:
    s = console.stack
    md = s.metadata()
    name = s.ingest.CreateStreamProcessor(
        I.CreateStreamProcessorRequest(
            stream_processor_id=PROCESSOR,
            stream_processor=I.StreamProcessor(
                display_name="Console gate",
                sources=[I.VideoSource(source_id="gate-1", push=I.PushSource())],
                collection="collections/watchlist",
                context=identification_context("CASE-CONSOLE-WATCH"),
            ),
        ),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    ).stream_processor.name
    s.ingest.StartStreamProcessor(I.StartStreamProcessorRequest(name=name), metadata=md, timeout=30)

    sign_in(page, console.token)
    page.goto(f"/alerts?processor={PROCESSOR}")
    page.get_by_text("Live: new events appear at the top.").wait_for()
    assert page.locator("li.event").count() == 0
    push_him(s, name)
    card = page.locator("li.event").first
    card.wait_for()
    text = card.inner_text()
    assert "camera gate-1" in text
    assert SUBJECT in text
    assert "Similarity" in text
    assert (card.get_by_role("img").get_attribute("src") or "").startswith("data:image/png")
    assert "1 new event" in page.inner_text("#live-status")
    shot(page, "06-alert-live")

    page.reload()
    page.get_by_text("Live: new events appear at the top.").wait_for()
    assert page.locator("li.event").count() == 1
    stream = page.locator("#events").get_attribute("data-stream") or ""
    assert "after=" in stream  # resumes after the stored event's cursor
    # A listed event's best shot comes from the console (GetMatchEvent), not inline.
    listed_image = page.locator("li.event img").first
    assert (listed_image.get_attribute("src") or "").startswith("/alerts/chip?")
    page.wait_for_function(
        "() => { const i = document.querySelector('li.event img');"
        " return i !== null && i.complete && i.naturalWidth === 150; }"
    )
    time.sleep(2)  # a repeated event would have come by now
    assert page.locator("li.event").count() == 1

    page.get_by_role("link", name="Review this alert").click()
    page.get_by_role("heading", name="Review of a match event").wait_for()
    assert "Candidates, not identifications." in page.inner_text("main")
    assert page.get_by_alt_text("The best shot of the face the camera saw").is_visible()
    decide_on_first(
        page, "Possible match (a lead, not an identification)", "Same scar above the left eye"
    )
    assert "Possible match" in page.inner_text("#candidate-1")
    shot(page, "07-alert-review")
    events = s.ingest.ListMatchEvents(
        I.ListMatchEventsRequest(parent=name), metadata=md, timeout=CALL_TIMEOUT_S
    ).match_events
    decisions = s.faces.ListReviewDecisions(
        F.ListReviewDecisionsRequest(reviewed_record=events[0].audit_record),
        metadata=md,
        timeout=CALL_TIMEOUT_S,
    )
    assert [d.review_decision.reason for d in decisions.audit_records] == [
        "Same scar above the left eye"
    ]


def test_a_person_without_the_search_scope_is_refused(page: Page, console: Console) -> None:
    sign_in(page, console.stack.stack.tokens["facegrid.read"])
    search(page, MIRANDA, case="CASE-CONSOLE-REFUSED")
    refusal = page.get_by_role("alert")
    refusal.wait_for()
    assert "Refused: PERMISSION_DENIED" in refusal.inner_text()
    assert page.locator("#candidate-1").count() == 0
    shot(page, "08-refused")
    refused = console.stack.faces.ListAuditRecords(
        F.ListAuditRecordsRequest(filter=F.AuditRecordFilter(principal="only-facegrid.read")),
        metadata=console.stack.metadata(),
        timeout=CALL_TIMEOUT_S,
    ).audit_records
    assert any(
        r.method.endswith("/SearchFacesByImage") and r.status_code == 7 for r in refused
    )  # PERMISSION_DENIED, on record


def test_enrol_with_a_quality_report_then_delete_after_confirming(
    page: Page, console: Console
) -> None:
    sign_in(page, console.token)
    page.goto("/collections")
    page.get_by_role("link", name="watchlist").click()
    page.get_by_role("heading", name="Collection watchlist").wait_for()
    shot(page, "09-collection")
    page.get_by_label("Photo (JPEG or PNG)").set_input_files(str(MIRANDA))
    page.get_by_label("Gallery image id (optional; where the photo is in your records)").fill(
        "booking-0001"
    )
    page.get_by_role("button", name="Enrol").click()
    page.get_by_role("heading", name="Enrolment report: watchlist").wait_for()
    report = page.get_by_role("table", name="Enrolled")
    assert "Sharpness" in report.inner_text()
    assert "Confidence" in report.inner_text()
    face_name = report.locator("code").first.inner_text()
    shot(page, "10-enrolment-report")

    face_id = face_name.rsplit("/", 1)[1]
    page.goto("/collections/watchlist")
    page.get_by_role("link", name=f"Delete face {face_id[:8]}").click()
    page.get_by_text("This cannot be undone.").wait_for()
    shot(page, "11-confirm-delete")
    page.get_by_label("Type").fill("not the name")
    page.get_by_role("button", name="Delete for good").click()
    assert "to confirm the deletion" in page.inner_text("main")
    md = console.stack.metadata()
    assert (
        console.stack.faces.GetFace(
            F.GetFaceRequest(name=face_name), metadata=md, timeout=CALL_TIMEOUT_S
        ).face.name
        == face_name
    )  # still there
    page.go_back()
    page.get_by_label("Type").fill(face_name)
    page.get_by_role("button", name="Delete for good").click()
    page.get_by_text("Deleted.").wait_for()
    listed = console.stack.faces.ListFaces(
        F.ListFacesRequest(parent="collections/watchlist"), metadata=md, timeout=CALL_TIMEOUT_S
    ).faces
    assert face_name not in [f.name for f in listed]

    # A subject added here, a photo enrolled for it, then the subject and its face gone.
    page.get_by_label("New subject id").fill("visitor-7")
    page.get_by_role("button", name="Add subject").click()
    page.get_by_text("Subject added").wait_for()
    page.get_by_label("Photo (JPEG or PNG)").set_input_files(str(MIRANDA))
    page.get_by_label("Subject id (optional", exact=False).fill("visitor-7")
    page.get_by_role("button", name="Enrol").click()
    page.get_by_role("heading", name="Enrolment report: watchlist").wait_for()
    page.goto("/collections/watchlist")
    page.get_by_role("link", name="Delete subject visitor-7").click()
    page.get_by_label("Delete its faces too").check()
    page.get_by_label("Type").fill("collections/watchlist/subjects/visitor-7")
    page.get_by_role("button", name="Delete for good").click()
    page.get_by_text("Deleted.").wait_for()
    left = console.stack.faces.ListFaces(
        F.ListFacesRequest(parent="collections/watchlist"), metadata=md, timeout=CALL_TIMEOUT_S
    ).faces
    assert "visitor-7" not in [f.subject_id for f in left]
    assert SUBJECT in [f.subject_id for f in left]  # the others stay


def test_audit_log_search_and_chain_verification(page: Page, console: Console) -> None:
    sign_in(page, console.token)
    page.goto("/audit")
    page.get_by_label("Case").fill(CASE)
    page.get_by_role("button", name="Search the log").click()
    table = page.get_by_role("table", name="Records, oldest first")
    table.wait_for()
    assert "SearchFacesByImage" in table.inner_text()
    assert "CreateReviewDecision" in table.inner_text()
    shot(page, "12-audit-search")
    page.get_by_role("link", name="Verify the chain").click()
    page.get_by_role("button", name="Verify").click()
    page.get_by_role("heading", name="Audit chain: intact").wait_for()
    assert "signed checkpoint at record" in page.inner_text("main")
    shot(page, "13-audit-verified")


def test_the_pages_work_without_javascript(browser: Browser, console: Console) -> None:
    context = browser.new_context(base_url=console.url, java_script_enabled=False)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    try:
        sign_in(page, console.token)
        search(page, MIRANDA, case="CASE-CONSOLE-NOJS")
        page.get_by_role("heading", name="Search of watchlist").wait_for()
        decide_on_first(page, "Inconclusive", "Recorded without JavaScript")
        assert "Recorded without JavaScript" in page.inner_text("#candidate-1")
        page.goto(f"/alerts?processor={PROCESSOR}")
        assert page.locator("li.event").count() >= 1  # the stored events, listed
    finally:
        context.close()


def test_keyboard_and_labels(page: Page, console: Console) -> None:
    sign_in(page, console.token)
    page.goto("/search")
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.textContent")
    assert focused == "Skip to the content"
    unlabelled = page.evaluate(
        """[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
             .filter(e => !(e.labels && e.labels.length) && !e.closest('label'))
             .map(e => e.name)"""
    )
    assert unlabelled == []
    # The form can be filled and sent with the keyboard alone.
    page.get_by_label("Case").focus()
    page.keyboard.type("CASE-KEYBOARD")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "justification"
