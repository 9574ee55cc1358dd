"""The feedback app in a real browser: Playwright drives Debian's Chromium (never a downloaded browser)
against ``rlhfkit serve`` on 127.0.0.1. A labeler writes a demonstration, rates and ranks by drag and
drop, judges an A/B pair with the keyboard; an admin imports items and exports the answers. A screenshot
of every page is checked to be non-blank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from feedback_server import FeedbackServer

from rlhfkit.feedback.security import hash_password
from rlhfkit.feedback.store import Store

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e .[dev]")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (.ci/run installs Debian's)")

PASSWORDS = {"boss": "boss password", "ann": "ann password"}
SAMPLES = [{"prompt": "Name a colour <b>bold?</b>", "completions": ["red", "blue", "the number seven"], "id": "s1"}]
MORE_SAMPLES = [{"prompt": "Name a fruit", "completions": ["apple", "pear"]},
                {"prompt": "Name a tree", "completions": ["oak", "rose", "elm"]}]


def assert_not_blank(path: Path) -> None:
    """The screenshot shows something: several colours, and not almost all one colour."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 20, f"{path.name}: {len(colours or [])} colours"
    commonest = max(count for count, _ in colours)
    assert commonest < 0.97 * image.width * image.height, f"{path.name} is almost one colour"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    store = Store(f"sqlite:///{folder / 'feedback.db'}")
    for name, role in (("boss", "admin"), ("ann", "labeler")):
        store.create_user(name, hash_password(PASSWORDS[name]), role)
    store.import_prompts([{"prompt": "Write a haiku about <script>alert(1)</script> rain", "id": "p1"}])
    store.import_samples(SAMPLES)
    store.import_pairs([{"prompt": "Say hello", "completions": ["Hello!", "Go away."], "id": "ab1",
                         "meta": {"models": ["ppo", "sft"]}}])
    store.close()
    with FeedbackServer(folder / "feedback.db", log=folder / "server.log") as running:
        running.folder = folder
        yield running


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def logged_in(browser, server, username: str):
    context = browser.new_context(viewport={"width": 1280, "height": 1600}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(f"{server.url}/queue")
    assert page.url.startswith(f"{server.url}/login?next=")
    page.fill("#username", username)
    page.fill("#password", PASSWORDS[username])
    page.press("#password", "Enter")
    page.wait_for_url(f"{server.url}/queue")
    page.errors = errors
    return page


def shot(page, server, name: str) -> None:
    path = server.folder / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    assert_not_blank(path)


def store_of(server) -> Store:
    return Store(f"sqlite:///{server.db}", migrate=False)


def test_login_page_renders(browser, server):
    page = browser.new_page()
    page.goto(f"{server.url}/login")
    assert page.title() == "Log in · rlhfkit"
    shot(page, server, "login")
    page.fill("#username", "ann")
    page.fill("#password", "wrong password")
    page.click("button[type=submit]")
    assert page.locator(".flash-error").inner_text() == "Wrong user name or password."
    page.close()


def test_admin_imports_samples_through_the_file_input(browser, server, tmp_path):
    page = logged_in(browser, server, "boss")
    page.goto(f"{server.url}/admin")
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps(row) + "\n" for row in MORE_SAMPLES), encoding="utf-8")
    page.set_input_files("#file", samples)
    page.select_option("#kind", "samples")
    page.fill("#replicas", "2")
    page.click("form[action='/admin/import'] button[type=submit]")
    assert "Imported 2 samples from samples.jsonl, 2 labeler(s) each." in page.locator(".flash-success").inner_text()
    shot(page, server, "admin")
    assert page.errors == []
    page.context.close()


def test_labeler_writes_a_demonstration_with_ctrl_enter(browser, server):
    page = logged_in(browser, server, "ann")
    shot(page, server, "queue")
    page.click("a[href='/next?kind=demonstration']")
    assert page.locator(".prompt .text").inner_text() == "Write a haiku about <script>alert(1)</script> rain"
    shot(page, server, "demonstration")
    page.fill("#completion", "Soft rain on the roof\nscripts sleep in their quiet tags\nnothing runs tonight")
    page.press("#completion", "Control+Enter")
    page.wait_for_url(f"{server.url}/queue")
    assert page.locator(".flash").all_inner_texts() == [
        "Saved.", "Nothing left to do in “Write demonstrations”. Thank you!"]
    store = store_of(server)
    [answer] = store.answers("demonstration")
    assert answer.payload["completion"].splitlines()[1] == "scripts sleep in their quiet tags"
    store.close()
    assert page.errors == []
    page.context.close()


def test_labeler_rates_flags_and_ranks_by_drag_and_drop(browser, server):
    page = logged_in(browser, server, "ann")
    page.goto(f"{server.url}/next?kind=ranking")  # the oldest ranking item: SAMPLES[0]
    item_url = page.url
    cards = page.locator(".rank-card")
    assert cards.count() == 3
    shot(page, server, "ranking")
    # the viewport shows every card: a drag that scrolled the page could start or end elsewhere
    last = cards.nth(2).bounding_box()
    assert last["y"] + last["height"] <= page.viewport_size["height"]
    page.drag_and_drop(".rank-card[data-index='2']", ".rank-card[data-index='0']")  # C to the top
    order = [cards.nth(position).get_attribute("data-index") for position in range(3)]
    assert order == ["2", "0", "1"]
    assert [page.input_value(f"input[name=rank_{index}]") for index in range(3)] == ["2", "3", "1"]
    page.check(".rank-card[data-index='1'] [data-tie]")  # B ties with A, the card above it
    assert page.input_value("input[name=rank_1]") == "2"
    page.focus(".rank-card[data-index='0']")
    page.keyboard.press("Alt+ArrowUp")  # A above C: A, C, B; B still ties with the card above it, now C
    assert [page.input_value(f"input[name=rank_{index}]") for index in range(3)] == ["1", "2", "2"]
    page.keyboard.press("Alt+ArrowDown")  # back: C, A, B with B tied to A
    assert [page.input_value(f"input[name=rank_{index}]") for index in range(3)] == ["2", "2", "1"]
    for index, rating in enumerate(("5", "5", "7")):
        page.check(f"input[name=rating_{index}][value='{rating}']")
    page.check("input[name=flags_2][value=made_up_facts]")
    page.click("#answer-form button[type=submit]")
    page.wait_for_url(lambda url: url != item_url)
    assert page.locator(".flash").first.inner_text() == "Saved."
    store = store_of(server)
    [answer] = store.answers("ranking")
    assert answer.payload == {"ratings": [5, 5, 7], "flags": [[], [], ["made_up_facts"]], "ranking": [[2], [0, 1]]}
    store.close()
    assert page.errors == []
    page.context.close()


def test_labeler_judges_an_ab_pair_with_the_keyboard(browser, server):
    page = logged_in(browser, server, "ann")
    page.goto(f"{server.url}/next?kind=ab")
    assert page.locator(".ab .completion").all_inner_texts() == ["Hello!", "Go away."]
    assert "ppo" not in page.content()
    shot(page, server, "ab")
    page.keyboard.press("a")
    page.wait_for_url(f"{server.url}/queue")
    store = store_of(server)
    [answer] = store.answers("ab")
    assert answer.payload == {"verdict": "a"}
    store.close()
    page.context.close()


def test_admin_exports_what_labelers_answered(browser, server):
    page = logged_in(browser, server, "boss")
    page.goto(f"{server.url}/admin")
    with page.expect_download() as download_info:
        page.click("a[href='/admin/export/ab']")
    download = download_info.value
    assert download.suggested_filename == "ab.jsonl"
    [record] = [json.loads(line) for line in Path(download.path()).read_text(encoding="utf-8").splitlines()]
    assert (record["verdict"], record["labeler"], record["meta"]["models"]) == ("a", "ann", ["ppo", "sft"])
    page.context.close()
