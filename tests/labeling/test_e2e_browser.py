"""End to end in a real browser: Debian's chromium driven by Playwright against a live server.

Logs in through /login, labels a pairwise task with the keyboard, a listwise task with the
mouse, a binary task with keys (including undo and a rationale), and checks the exact rows the
store holds afterwards; a response carrying XSS payloads must render as text and run nothing.

Needs /usr/bin/chromium (`apt-get install chromium`) and the `playwright` Python package;
`playwright install` is never used.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from app.main import create_app
from app.settings import Settings
from labeling.ui import mount_labeling_ui
from store.db import Database
from store.models import AuditEvent, TaskKind
from store.values import pairwise_shown_to_canonical, ranking_to_ranks, ranks_shown_to_canonical
from tests.app.helpers import add_task, add_user, labels_of, lease, live_server
from tests.labeling.xss_payloads import PAYLOADS

CHROMIUM = os.environ.get("PREFLOOP_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 30_000

# CI must run this test: there a missing browser is a failure, not a skip.
REQUIRED = os.environ.get("CI") == "true" or os.environ.get("PREFLOOP_REQUIRE_BROWSER") == "1"
if not shutil.which(CHROMIUM):  # pragma: no cover - CI installs it (.ci/run)
    if REQUIRED:
        raise RuntimeError(f"the browser test needs chromium at {CHROMIUM}")
    pytest.skip(f"no chromium at {CHROMIUM}", allow_module_level=True)
if REQUIRED:
    import playwright.sync_api as playwright_api
else:
    playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

XSS_RESPONSE = """Here you go: <img src=x onerror="window.__xss='img'">
<script>window.__xss='script'</script>
[click me](javascript:window.__xss='link') and ${window.__xss='template'}
<a href="javascript:window.__xss='a'">raw link</a>
<svg onload="window.__xss='svg'"></svg>

```python
print("highlighted")
```

""" + "\n\n".join(PAYLOADS)


@pytest.fixture
def browser_page() -> Iterator[Any]:
    # Playwright gives each launch a fresh temporary profile (it refuses --user-data-dir).
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        dialogs: list[str] = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.dialogs = dialogs  # type: ignore[attr-defined]
        yield page
        browser.close()


def _status(page: Any) -> Any:
    return page.locator("#status")


def test_label_three_kinds_in_browser_and_no_xss(sqlite_db: Database, tmp_path: Path,
                                                 browser_page: Any) -> None:
    db = sqlite_db
    bob_id, bob_token = add_user(db, "bob")
    _, admin_token = add_user(db, "root", "admin")
    pair = add_task(db, TaskKind.pairwise,
                    prompt=[{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Say hi **politely**."},
                            {"role": "assistant", "content": "Hi."},
                            {"role": "user", "content": "Now show code."}],
                    completions=["A plain, safe answer.", XSS_RESPONSE])
    listwise = add_task(db, TaskKind.listwise, prompt="Rank these.",
                        completions=["first text", "second text", "third text"])
    binary = add_task(db, TaskKind.binary, prompt="Is 17 prime?",
                      completions=["Yes, 17 is prime."])
    settings = Settings(data_dir=tmp_path, undo_grace_s=600)
    page = browser_page

    with live_server(create_app(settings, db=db, ui=mount_labeling_ui)) as base:
        # Not logged in: the UI sends the browser to the login page; a wrong token fails.
        page.goto(f"{base}/label/")
        expect(page).to_have_url(f"{base}/login?next=/label/")
        page.fill("#name", "bob")
        page.fill("#token", "not-the-token")
        page.click("#login")
        expect(page.locator(".error")).to_have_text("Unknown account or token.")
        page.fill("#name", "bob")
        page.fill("#token", bob_token)
        page.click("#login")
        expect(page).to_have_url(f"{base}/label/")

        # Pairwise, with the keyboard. The XSS response is visible as text, nothing ran.
        expect(page.locator("#resp-a")).to_contain_text("Response A")
        page_text = page.locator("#resp-a").inner_text() + page.locator("#resp-b").inner_text()
        assert "<img src=x onerror=" in page_text
        assert "<script>window.__xss='script'</script>" in page_text
        expect(page.locator("#prompt")).to_contain_text("Now show code.")
        expect(page.locator("#prompt strong")).to_have_text("politely")
        for tag in ("img", "script", "svg", "iframe", "object", "embed", "input", "form",
                    "style", "video", "audio", "details", "base", "meta", "link", "math"):
            expect(page.locator(f"#resp-a {tag}, #resp-b {tag}")).to_have_count(0)
        hrefs = page.locator("#resp-a a, #resp-b a").evaluate_all(
            "links => links.map(a => a.getAttribute('href'))")
        assert hrefs and all(h.startswith("https://") for h in hrefs), hrefs
        code = page.locator("#resp-a code.language-python, #resp-b code.language-python")
        expect(code.locator("span.nb")).to_have_text("print")  # highlighted by Pygments
        page.mouse.move(400, 400)
        page.locator("#resp-b").hover()
        assert page.evaluate("window.__xss") is None

        shown = lease(db, pair, bob_id).shown_order
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("2")
        expect(page.locator("#selection")).to_contain_text("B is better")
        page.keyboard.press("Enter")
        expect(_status(page)).to_contain_text("Saved label")
        expect(_status(page)).to_contain_text("Your pairwise queue is empty")
        [label] = labels_of(db, pair)
        assert (label.annotator_id, label.choice, label.shown_order, label.ranks) == (
            bob_id, pairwise_shown_to_canonical("b", shown), shown, None)
        assert page.evaluate("window.__xss") is None

        # Listwise, with the mouse: response 2 best, responses 1 and 3 tied second.
        page.locator("#queue-kind").get_by_label("listwise").check()
        expect(page.locator("#list-resp-2")).to_contain_text("Response 3")
        shown = lease(db, listwise, bob_id).shown_order
        page.locator("#submit").click()
        expect(_status(page)).to_contain_text("Give every response a rank")
        for slot, rank in ((0, "2"), (1, "1"), (2, "2")):
            page.locator(f"#rank-{slot}").get_by_label(rank, exact=True).check()
        page.locator("#submit").click()
        expect(_status(page)).to_contain_text("Saved label")
        [label] = labels_of(db, listwise)
        expected = ranks_shown_to_canonical(ranking_to_ranks([1, [0, 2]], 3), shown)
        assert (label.annotator_id, label.ranks, label.choice, label.shown_order) == (
            bob_id, expected, None, shown)

        # Binary, with keys: thumbs up, undo (U), then thumbs down with a rationale.
        page.locator("#queue-kind").get_by_label("binary").check()
        expect(page.locator("#resp-single")).to_contain_text("Yes, 17 is prime.")
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("1")
        expect(page.locator("#selection")).to_contain_text("Thumbs up")
        page.keyboard.press("Enter")
        expect(_status(page)).to_contain_text("Your binary queue is empty")
        assert [lab.choice for lab in labels_of(db, binary)] == ["up"]
        page.keyboard.press("u")
        expect(_status(page)).to_contain_text("the task is back")
        expect(page.locator("#resp-single")).to_contain_text("Yes, 17 is prime.")
        assert labels_of(db, binary) == []
        page.keyboard.press("2")
        expect(page.locator("#selection")).to_contain_text("Thumbs down")
        page.locator("#rationale textarea").fill("17 is prime, but the answer is too terse")
        page.locator("#rationale textarea").press("Control+Enter")
        expect(_status(page)).to_contain_text("Saved label")
        [label] = labels_of(db, binary)
        assert (label.choice, label.rationale) == ("down", "17 is prime, but the answer is "
                                                           "too terse")
        expect(page.locator("#header")).to_contain_text("3 labelled")

        # bob logs out; the admin view is for admins and shows his work.
        page.locator("#logout").click()
        expect(page).to_have_url(f"{base}/login")
        page.goto(f"{base}/admin/")
        expect(page).to_have_url(f"{base}/login?next=/admin/")
        page.fill("#name", "root")
        page.fill("#token", admin_token)
        page.click("#login")
        expect(page).to_have_url(f"{base}/admin/")
        people = page.locator("#admin-annotators")
        expect(people).to_contain_text("bob")
        expect(page.locator("#admin-sources")).to_contain_text("human")
        expect(page.locator("#admin-agreement")).to_contain_text("krippendorff_alpha_nominal")
        expect(page.locator("#admin-plot")).to_be_visible()

    with db.read() as session:
        actions = [e.action for e in session.exec(
            select(AuditEvent).where(AuditEvent.entity == "label").order_by(AuditEvent.id))]
    assert actions == ["create", "create", "create", "delete", "create"]
    assert page.dialogs == []  # type: ignore[attr-defined]


INJECT = """() => {
  window.__csp = [];
  document.addEventListener("securitypolicyviolation",
                            (e) => window.__csp.push(e.violatedDirective));
  const inline = document.createElement("script");
  inline.textContent = "window.__inline = 'ran'";
  document.body.appendChild(inline);
  const img = document.createElement("div");
  img.innerHTML = '<img src="data:," onload="window.__handler = 1">';
  document.body.appendChild(img);
}"""


def _inject_and_report(page: Any) -> list[str]:
    """Inject an inline script and an inline handler; the CSP violations they caused (the
    reports arrive asynchronously, so wait for both)."""
    page.evaluate(INJECT)
    page.wait_for_function("window.__csp.length >= 2")
    return sorted(set(page.evaluate("window.__csp")))


def test_pages_run_under_a_csp_that_blocks_inline_scripts(sqlite_db: Database, tmp_path: Path,
                                                          browser_page: Any) -> None:
    """The labeling page loads and labels under its Content-Security-Policy, with Gradio's
    own scripts causing no violation; an injected inline script and handler do not run."""
    db = sqlite_db
    ann_id, ann_token = add_user(db, "ann")
    pair = add_task(db, TaskKind.pairwise, prompt="Pick one.", completions=["left", "right"])
    page = browser_page
    # Every violation of each document from its start (init scripts are not subject to CSP).
    page.add_init_script("""window.__page_csp = [];
document.addEventListener("securitypolicyviolation",
                          (e) => window.__page_csp.push(e.violatedDirective + " " + e.blockedURI));
""")
    with live_server(create_app(Settings(data_dir=tmp_path), db=db,
                                ui=mount_labeling_ui)) as base:
        login = page.goto(f"{base}/login")
        assert "script-src 'self' 'nonce-" in login.headers["content-security-policy"]
        assert _inject_and_report(page) == ["script-src-attr", "script-src-elem"]
        assert page.evaluate("[window.__inline, window.__handler]") == [None, None]
        page.fill("#name", "ann")
        page.fill("#token", ann_token)
        page.click("#login")
        expect(page).to_have_url(f"{base}/label/")
        expect(page.locator("#resp-a")).to_contain_text("Response A")
        shown = lease(db, pair, ann_id).shown_order
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("1")  # the keyboard script runs (allowed by its hash)
        expect(page.locator("#selection")).to_contain_text("A is better")
        page.locator("#submit").click()
        expect(_status(page)).to_contain_text("Saved label")
        [label] = labels_of(db, pair)
        assert (label.annotator_id, label.choice) == (ann_id, pairwise_shown_to_canonical(
            "a", shown))
        assert page.evaluate("window.__page_csp") == []  # Gradio itself broke no rule
        assert _inject_and_report(page) == ["script-src-attr", "script-src-elem"]
        assert page.evaluate("[window.__inline, window.__handler]") == [None, None]
