"""The feedback app in a real browser: Playwright drives Debian's Chromium (never a downloaded browser)
against ``rlhfkit serve`` on 127.0.0.1. A labeler writes a demonstration, rates and ranks by drag and
drop, judges an A/B pair with the keyboard; an admin imports items and exports the answers. A screenshot
of every page is checked to be non-blank."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from feedback_server import FeedbackServer

from rlhfkit.feedback.security import hash_password
from rlhfkit.feedback.store import Store, shown_order

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
    assert "Imported 2 samples from samples.jsonl into project “default”, 2 labeler(s) each." in page.locator(
        ".flash-success").inner_text()
    shot(page, server, "admin")
    assert page.errors == []
    page.context.close()


def test_labeler_writes_a_demonstration_with_ctrl_enter(browser, server):
    page = logged_in(browser, server, "ann")
    shot(page, server, "queue")
    page.click("a[href^='/next?kind=demonstration']")
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


def card_of(page, text: str):
    """The ranking card that shows this completion (the cards are shuffled per labeler and item)."""
    return page.locator(".rank-card").filter(has=page.locator(".completion", has_text=text))


def places(page) -> list[str]:
    """The place numbers, card by card from the top."""
    return page.locator(".rank-card [data-rank-input]").evaluate_all("inputs => inputs.map(input => input.value)")


def shown_texts(page) -> list[str]:
    return page.locator(".rank-card .completion").all_inner_texts()


def test_labeler_rates_flags_and_ranks_by_drag_and_drop(browser, server):
    page = logged_in(browser, server, "ann")
    page.goto(f"{server.url}/next?kind=ranking")  # the oldest ranking item: SAMPLES[0]
    item_url = page.url
    item_id = int(item_url.rsplit("/", 1)[1])
    cards = page.locator(".rank-card")
    assert cards.count() == 3
    shown = shown_texts(page)
    assert sorted(shown) == sorted(SAMPLES[0]["completions"]) and places(page) == ["", "", ""]  # starts empty
    shot(page, server, "ranking")
    # the viewport shows every card: a drag that scrolled the page could start or end elsewhere
    last = cards.nth(2).bounding_box()
    assert last["y"] + last["height"] <= page.viewport_size["height"]
    page.drag_and_drop(".rank-card:has-text('the number seven')", ".rank-card >> nth=0")  # "seven" to the top
    assert shown_texts(page)[0] == "the number seven" and places(page) == ["1", "2", "3"]
    if shown_texts(page)[1] == "blue":  # red above blue, with the keyboard
        card_of(page, "red").focus()
        page.keyboard.press("Alt+ArrowUp")
    assert shown_texts(page) == ["the number seven", "red", "blue"]
    card_of(page, "blue").locator("[data-tie]").check()  # blue ties with red, the card above it
    assert places(page) == ["1", "2", "2"]
    card_of(page, "red").focus()
    page.keyboard.press("Alt+ArrowUp")  # red above seven: red, seven, blue; blue still ties with the card above
    assert shown_texts(page) == ["red", "the number seven", "blue"] and places(page) == ["1", "2", "2"]
    page.keyboard.press("Alt+ArrowDown")  # back: seven, red, blue with blue tied to red
    assert shown_texts(page) == ["the number seven", "red", "blue"] and places(page) == ["1", "2", "2"]
    for text, rating in (("red", "5"), ("blue", "5"), ("the number seven", "7")):
        card_of(page, text).locator(f".rating input[value='{rating}']").check()
    card_of(page, "the number seven").locator("input[value=made_up_facts]").check()
    assert page.locator("[data-contradiction-warning]").is_hidden()
    page.click("#answer-form button[type=submit]")
    page.wait_for_url(lambda url: url != item_url)
    assert page.locator(".flash").first.inner_text() == "Saved."
    store = store_of(server)
    [answer] = store.answers("ranking")
    # in the item's own indices, whatever the order shown; the order shown is stored with the answer
    assert answer.payload == {"ratings": [5, 5, 7], "flags": [[], [], ["made_up_facts"]], "ranking": [[2], [0, 1]]}
    assert [SAMPLES[0]["completions"][index] for index in answer.shown_order] == shown
    assert answer.shown_order == shown_order(store.user_by_name("ann").id, item_id, 3)
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


# ------------------------------------------------------------------- data quality flows (issue 25)

FOUR = ["alpha answer", "bravo answer", "charlie answer", "delta answer"]


@pytest.fixture(scope="module")
def ranking_server(tmp_path_factory):
    """A server of its own: one labeler, cy, and three ranking items of four outputs, one per test below."""
    folder = tmp_path_factory.mktemp("ranking")
    store = Store(f"sqlite:///{folder / 'feedback.db'}")
    store.create_user("cy", hash_password(PASSWORDS["ann"]))
    store.create_user("dee", hash_password(PASSWORDS["ann"]))
    store.create_user("boss", hash_password(PASSWORDS["boss"]), "admin")
    store.import_samples([{"prompt": f"Question {number}", "completions": FOUR} for number in range(3)])
    store.close()
    with FeedbackServer(folder / "feedback.db", log=folder / "server.log") as running:
        running.folder = folder
        yield running


def log_in_as(browser, server, username: str, password: str):
    context = browser.new_context(viewport={"width": 1280, "height": 2000})
    page = context.new_page()
    page.errors = []
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(f"{server.url}/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.press("#password", "Enter")
    page.wait_for_url(lambda url: "/login" not in url)
    return page


def on_next_ranking(browser, server, username: str = "cy"):
    page = log_in_as(browser, server, username, PASSWORDS["ann"])
    page.goto(f"{server.url}/next?kind=ranking")
    return page, int(page.url.rsplit("/", 1)[1])


def rate_by_position(page, ratings: list[int]) -> None:
    for position, rating in enumerate(ratings):
        page.check(f"input[name=rating_{position}][value='{rating}']")


def test_an_empty_ranking_is_refused_and_the_page_says_why(browser, ranking_server):
    page, item_id = on_next_ranking(browser, ranking_server)
    assert places(page) == ["", "", "", ""]
    rate_by_position(page, [7, 5, 3, 1])
    page.click("#answer-form button[type=submit]")
    assert page.locator(".flash-error").inner_text() == (
        "Not saved: output A place: choose a place: rank every output (drag the cards, or “Rank as shown”)")
    assert page.is_checked("input[name=rating_3][value='1']")  # what was entered is kept
    store = store_of(ranking_server)
    assert store.answers() == []
    page.click("[data-rank-as-shown]")
    assert places(page) == ["1", "2", "3", "4"]
    page.click("#answer-form button[type=submit]")
    page.wait_for_selector(".flash-success")
    [answer] = store.answers()
    assert answer.item_id == item_id and answer.payload["ranking"] == [[index] for index in answer.shown_order]
    store.close()
    assert page.errors == []
    page.context.close()


def test_a_ranking_that_contradicts_the_ratings_is_warned_of_and_saved_once_confirmed(browser, ranking_server):
    page, item_id = on_next_ranking(browser, ranking_server)
    rate_by_position(page, [1, 2, 3, 7])  # the example: rated up, ranked down
    page.click("[data-rank-as-shown]")
    live = page.locator("[data-contradiction-warning]")
    assert live.is_visible() and "output D is rated 7 but ranked below output A, rated 1" in live.inner_text()
    page.click("#answer-form button[type=submit]")
    assert "Not saved yet: your ranking contradicts your ratings." in page.locator("#contradiction").inner_text()
    shot(page, ranking_server, "contradiction")
    store = store_of(ranking_server)
    assert item_id not in [answer.item_id for answer in store.answers()]
    assert places(page) == ["1", "2", "3", "4"]  # nothing entered is lost
    page.click("#submit-anyway")
    page.wait_for_selector(".flash-success")
    answer = store.answer_of(store.user_by_name("cy").id, item_id)
    assert answer.payload["ratings"] == [[1, 2, 3, 7][answer.shown_order.index(index)] for index in range(4)]
    store.close()
    assert page.errors == []
    page.context.close()


def test_a_labeler_changes_an_answer_and_sees_every_version(browser, ranking_server):
    page, item_id = on_next_ranking(browser, ranking_server)
    rate_by_position(page, [7, 5, 3, 1])
    page.click("[data-rank-as-shown]")
    page.click("#answer-form button[type=submit]")
    page.wait_for_selector(".flash-success")
    page.goto(f"{ranking_server.url}/items/{item_id}")
    assert "Not reviewed yet: you can still change it." in page.locator("#answer-status").inner_text()
    page.click("#edit-answer")
    assert places(page) == ["1", "2", "3", "4"] and page.is_checked("input[name=rating_0][value='7']")  # prefilled
    page.check("input[name=flags_0][value=harmful]")
    page.click("#answer-form button[type=submit]")
    page.wait_for_url(f"{ranking_server.url}/items/{item_id}")
    assert page.locator(".flash-success").inner_text() == "Changed."
    versions = page.locator("#history li")
    assert versions.count() == 2
    assert "no flags" in versions.nth(0).inner_text() and "Harmful or offensive" in versions.nth(1).inner_text()
    shot(page, ranking_server, "history")
    store = store_of(ranking_server)
    answer = store.answer_of(store.user_by_name("cy").id, item_id)
    assert answer.version == 2 and [version.version for version in store.history(answer.id)] == [1, 2]
    [record] = [row for row in store.export("rankings") if row["meta"]["flags"][answer.shown_order[0]]]
    assert record["meta"]["flags"][answer.shown_order[0]] == ["harmful"]  # exports use the latest version
    store.close()
    assert page.errors == []
    page.context.close()


def test_an_admin_accepts_and_rejects_and_the_rejected_item_goes_to_another_labeler(browser, ranking_server):
    store = store_of(ranking_server)
    first, second, _ = store.answers()  # cy's answers from the tests above
    page = log_in_as(browser, ranking_server, "boss", PASSWORDS["boss"])
    page.goto(f"{ranking_server.url}/admin/review")
    assert page.locator(".card.review").count() == 3
    shot(page, ranking_server, "review")
    page.locator(f"#answer-{first.id} button[value=accepted]").click()
    assert page.locator(".flash-success").inner_text() == f"Answer {first.id} accepted."
    page.locator(f"#answer-{second.id} button[value=rejected]").click()
    assert "goes back to the queue" in page.locator(".flash-success").inner_text()
    assert page.locator(".card.review").count() == 1  # only the one still to review
    assert [store.answer_of(first.user_id, answer.item_id).status for answer in (first, second)] == [
        "accepted", "rejected"]
    labeler, item_id = on_next_ranking(browser, ranking_server, "dee")
    assert item_id == second.item_id
    cy = log_in_as(browser, ranking_server, "cy", PASSWORDS["ann"])
    cy.goto(f"{ranking_server.url}/items/{second.item_id}")
    assert "An admin has rejected this answer." in cy.locator("#answer-status").inner_text()
    assert cy.locator("#edit-answer").count() == 0
    store.close()
    assert page.errors == [] and labeler.errors == []
    for open_page in (page, labeler, cy):
        open_page.context.close()


def test_an_item_left_open_goes_to_another_labeler_once_its_assignment_expires(browser, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    for name in ("cy", "dee"):
        store.create_user(name, hash_password(PASSWORDS["ann"]))
    store.import_prompts([{"prompt": "Write one line"}])
    store.close()
    with FeedbackServer(tmp_path / "feedback.db", log=tmp_path / "server.log",
                        env={"RLHFKIT_ASSIGNMENT_TTL_MINUTES": "0.05"}) as server:  # 3 seconds
        cy = log_in_as(browser, server, "cy", PASSWORDS["ann"])
        cy.goto(f"{server.url}/next?kind=demonstration")
        opened = cy.url
        dee = log_in_as(browser, server, "dee", PASSWORDS["ann"])
        dee.goto(f"{server.url}/next?kind=demonstration")
        assert dee.url == f"{server.url}/queue"  # cy has it
        time.sleep(3.5)
        dee.goto(f"{server.url}/next?kind=demonstration")
        assert dee.url == opened
        dee.fill("#completion", "A line, written by dee.")
        dee.click("#answer-form button[type=submit]")
        dee.wait_for_url(f"{server.url}/queue")
        cy.fill("#completion", "Too late.")
        cy.click("#answer-form button[type=submit]")
        assert "no such item in your queue" in cy.content()
        check = Store(f"sqlite:///{tmp_path / 'feedback.db'}", migrate=False)
        assert [record["labeler"] for record in check.export("demonstrations")] == ["dee"]
        check.close()
        for page in (cy, dee):
            page.context.close()


def stored_draft(page, item_id: int):
    """The draft the page's browser keeps for its labeler and this item (None when there is none)."""
    return page.evaluate("key => JSON.parse(window.localStorage.getItem(key))",
                         f"rlhfkit-draft:{page.user_id}:{item_id}")


def test_a_draft_survives_a_reload_a_server_restart_and_a_new_login(browser, tmp_path):
    """Issue 25: the server restarts (with the session key it keeps) and the session ends while a labeler
    types; nothing typed is lost, and the draft goes once the answer is saved."""
    import sqlite3

    db = tmp_path / "feedback.db"
    store = Store(f"sqlite:///{db}")
    cy = store.create_user("cy", hash_password(PASSWORDS["ann"]))
    store.import_prompts([{"prompt": "Write two lines about rain"}])
    store.import_samples([{"prompt": "Rank these", "completions": FOUR}])
    store.close()
    server = FeedbackServer(db, log=tmp_path / "server.log", secret_key=None).start()  # the key file's key
    try:
        page = log_in_as(browser, server, "cy", PASSWORDS["ann"])
        page.user_id = cy.id
        page.goto(f"{server.url}/next?kind=demonstration")
        item_url, item_id = page.url, int(page.url.rsplit("/", 1)[1])
        assert stored_draft(page, item_id) is None  # opening a page writes nothing
        page.fill("#completion", "Rain on the window,")
        page.wait_for_function("() => document.querySelector('[data-draft-status]').textContent !== ''")
        assert stored_draft(page, item_id)["state"]["values"] == {"completion": "Rain on the window,"}
        page.reload()
        assert page.input_value("#completion") == "Rain on the window,"
        assert "is back" in page.locator("[data-draft-status]").inner_text()

        server.stop()  # a restart on the same port (the same origin, so the same localStorage)
        server.start()
        page.reload()
        assert page.url == item_url  # still logged in: the session key was kept
        assert page.input_value("#completion") == "Rain on the window,"

        with sqlite3.connect(db) as connection:  # the session ends (expired, or ended elsewhere)
            connection.execute("DELETE FROM sessions")
        page.fill("#completion", "Rain on the window,\nand none of it lost.")
        page.click("#answer-form button[type=submit]")
        page.wait_for_url(lambda url: "/login" in url)  # not saved: log in first
        page.fill("#username", "cy")
        page.fill("#password", PASSWORDS["ann"])
        page.press("#password", "Enter")
        page.wait_for_url(item_url)
        assert page.input_value("#completion") == "Rain on the window,\nand none of it lost."
        page.click("#answer-form button[type=submit]")
        page.wait_for_url(f"{server.url}/queue")
        assert page.locator(".flash-success").inner_text() == "Saved."
        assert stored_draft(page, item_id) is None  # saved: the draft is gone
        check = Store(f"sqlite:///{db}", migrate=False)
        [answer] = check.answers("demonstration")
        assert answer.payload["completion"] == "Rain on the window,\nand none of it lost."

        page.goto(f"{server.url}/next?kind=ranking")  # ratings, flags and places too
        ranking_id = int(page.url.rsplit("/", 1)[1])
        rate_by_position(page, [7, 5, 3, 1])
        page.check("input[name=flags_3][value=harmful]")
        page.click("[data-rank-as-shown]")
        page.wait_for_function(f"() => window.localStorage.getItem('rlhfkit-draft:{cy.id}:{ranking_id}') !== null")
        page.reload()
        assert places(page) == ["1", "2", "3", "4"] and page.is_checked("input[name=rating_0][value='7']")
        assert page.is_checked("input[name=flags_3][value=harmful]")
        assert page.is_checked("input[name=rating_3][value='1']")
        page.click("#answer-form button[type=submit]")
        page.wait_for_selector(".flash-success")
        assert stored_draft(page, ranking_id) is None
        answer = check.answer_of(cy.id, ranking_id)
        assert sorted(answer.payload["ratings"]) == [1, 3, 5, 7]
        check.close()
        assert page.errors == []
        page.context.close()
    finally:
        server.stop()


def test_ratings_and_flags_by_shortcut_keys_shown_on_the_page(browser, tmp_path):
    db = tmp_path / "feedback.db"
    store = Store(f"sqlite:///{db}")
    cy = store.create_user("cy", hash_password(PASSWORDS["ann"]))
    store.import_samples([{"prompt": "Rank these", "completions": FOUR}])
    store.close()
    with FeedbackServer(db, log=tmp_path / "server.log") as server:
        page = log_in_as(browser, server, "cy", PASSWORDS["ann"])
        page.goto(f"{server.url}/next?kind=ranking")
        item_id = int(page.url.rsplit("/", 1)[1])
        keys = page.locator("#shortcut-keys").inner_text()
        assert "1–7 rate it" in keys and "h harmful or offensive" in keys and "j / k" in keys
        cards = page.locator(".rank-card")
        assert "active-card" in cards.nth(0).get_attribute("class")  # the first output, to begin with
        checked = "inputs => inputs.filter(input => input.checked).map(input => input.name + '=' + input.value)"

        def chosen():
            return page.locator("#answer-form input[type=radio], #answer-form input[type=checkbox][name]") \
                .evaluate_all(checked)

        page.keyboard.press("7")
        page.keyboard.press("h")
        page.keyboard.press("m")
        page.keyboard.press("h")  # again: unflagged
        assert chosen() == ["rating_0=7", "flags_0=made_up_facts"]
        for rating in ("5", "3", "1"):
            page.keyboard.press("j")
            page.keyboard.press(rating)
        page.keyboard.press("j")  # past the last output: it stays highlighted
        page.keyboard.press("f")
        page.keyboard.press("k")
        page.keyboard.press("2")  # C: 3 -> 2
        assert "active-card" in cards.nth(2).get_attribute("class")
        assert chosen() == ["rating_0=7", "flags_0=made_up_facts", "rating_1=5", "rating_2=2", "rating_3=1",
                            "flags_3=fails_instruction"]
        page.locator("[data-rank-input]").nth(0).fill("4")  # typing a place rates nothing
        assert page.locator("[data-rank-input]").nth(0).input_value() == "4"
        assert chosen()[0] == "rating_0=7"
        page.locator("[data-rank-input]").nth(0).fill("")
        page.click("[data-rank-as-shown]")
        page.keyboard.press("Escape")
        assert page.locator("[data-contradiction-warning]").is_hidden()
        page.click("#answer-form button[type=submit]")
        page.wait_for_selector(".flash-success")
        check = Store(f"sqlite:///{db}", migrate=False)
        answer = check.answer_of(cy.id, item_id)
        by_shown = {position: index for position, index in enumerate(answer.shown_order)}
        assert [answer.payload["ratings"][by_shown[position]] for position in range(4)] == [7, 5, 2, 1]
        assert answer.payload["flags"][by_shown[0]] == ["made_up_facts"]
        assert answer.payload["flags"][by_shown[3]] == ["fails_instruction"]
        check.close()
        assert page.errors == []
        page.context.close()


def test_a_draft_of_a_changed_answer_is_restored_and_dropped_when_the_answer_is_kept(browser, tmp_path):
    db = tmp_path / "feedback.db"
    store = Store(f"sqlite:///{db}")
    cy = store.create_user("cy", hash_password(PASSWORDS["ann"]))
    store.import_prompts([{"prompt": "Write one line"}])
    store.close()
    with FeedbackServer(db, log=tmp_path / "server.log") as server:
        page = log_in_as(browser, server, "cy", PASSWORDS["ann"])
        page.user_id = cy.id
        page.goto(f"{server.url}/next?kind=demonstration")
        item_url, item_id = page.url, int(page.url.rsplit("/", 1)[1])
        page.fill("#completion", "The first line.")
        page.click("#answer-form button[type=submit]")
        page.wait_for_url(f"{server.url}/queue")
        assert stored_draft(page, item_id) is None
        page.goto(item_url)
        page.click("#edit-answer")
        assert page.input_value("#completion") == "The first line."  # the answer, no draft yet
        page.fill("#completion", "A better line, not saved yet.")
        page.wait_for_function("() => document.querySelector('[data-draft-status]').textContent !== ''")
        page.reload()
        assert page.input_value("#completion") == "A better line, not saved yet."  # the edit's draft is back
        page.click("[data-discard-draft]")  # "Keep my answer as it is"
        page.wait_for_url(item_url)
        assert stored_draft(page, item_id) is None
        page.click("#edit-answer")
        assert page.input_value("#completion") == "The first line."
        assert page.errors == []
        page.context.close()


def test_an_admin_manages_accounts_and_tokens_and_searches_the_review_queue(browser, tmp_path):
    """Issue 25: deactivate / reactivate a labeler and reset her password from the accounts page (her open
    page is logged out each time); she makes an API token, shown once; the review page finds answers by text
    and labeler."""
    import urllib.request

    store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.create_user("boss", hash_password(PASSWORDS["boss"]), "admin")
    for name in ("ann", "cy"):
        store.create_user(name, hash_password(PASSWORDS["ann"]))
    store.import_prompts([{"prompt": "Describe Lisbon"}, {"prompt": "Describe Oslo"}], replicas=2)
    for name in ("ann", "cy"):
        user = store.user_by_name(name)
        for _ in range(2):
            item = store.next_item(user.id)
            store.submit(user.id, item.id, {"completion": f"{name} writes about {item.prompt.split()[-1]}"})
    ann_id = store.user_by_name("ann").id
    store.close()
    with FeedbackServer(tmp_path / "feedback.db", log=tmp_path / "server.log") as server:
        ann = log_in_as(browser, server, "ann", PASSWORDS["ann"])
        boss = log_in_as(browser, server, "boss", PASSWORDS["boss"])
        boss.goto(f"{server.url}/admin/users")
        server.folder = tmp_path
        shot(boss, server, "accounts")
        boss.locator(f"#account-{ann_id} button.deactivate").click()
        assert "Deactivated “ann”" in boss.locator(".flash-success").inner_text()
        assert boss.locator(f"#account-{ann_id} td").nth(2).inner_text() == "no"
        ann.goto(f"{server.url}/queue")
        assert "/login" in ann.url  # her session ended
        boss.locator(f"#account-{ann_id} button.reactivate").click()
        boss.fill(f"#password-{ann_id}", "a brand new password")
        boss.locator(f"#account-{ann_id} form.inline button").click()
        assert "every session of theirs ended" in boss.locator(".flash-success").inner_text()
        ann = log_in_as(browser, server, "ann", "a brand new password")
        assert ann.url.endswith("/queue")
        ann.goto(f"{server.url}/account")
        ann.fill("#token-name", "nightly export")
        ann.click("#api-tokens button[type=submit]:text('Create token')")
        secret = ann.locator("#new-token code.secret").inner_text()
        assert secret.startswith("rlhfkit_")
        request = urllib.request.Request(f"{server.url}/api/me", headers={"Authorization": f"Bearer {secret}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["username"] == "ann"
        ann.reload()
        assert ann.locator("#new-token").count() == 0 and secret not in ann.content()  # shown once
        boss.goto(f"{server.url}/admin/review")
        assert boss.locator(".card.review").count() == 4
        boss.fill("#q", "oslo")
        boss.select_option("#filter-labeler", "cy")
        boss.click("form.filters button[type=submit]")
        assert boss.locator("#found").inner_text().startswith("1 answer(s)")
        assert "cy writes about Oslo" in boss.locator(".card.review").inner_text()
        assert "cy" in boss.locator("#labelers").inner_text()
        assert ann.errors == [] and boss.errors == []
        for page in (ann, boss):
            page.context.close()


def test_a_1_to_5_projects_item_shows_its_instructions_and_5_ratings(browser, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.create_user("ann", hash_password(PASSWORDS["ann"]), "labeler")
    likert = store.create_project("likert", instructions="Rate helpfulness only.\nIgnore <b>style</b>.",
                                  rating_scale=(1, 5), flags=("off_topic",))
    store.import_samples(MORE_SAMPLES[1:], project_id=likert.id)
    store.close()
    with FeedbackServer(tmp_path / "feedback.db", log=tmp_path / "server.log") as server:
        server.folder = tmp_path
        page = logged_in(browser, server, "ann")
        assert page.locator("#project-2 h2").inner_text() == "Project likert"
        page.click(f"a[href='/next?kind=ranking&project={likert.id}']")
        assert page.locator("#instructions .markdown").inner_text() == "Rate helpfulness only.\nIgnore <b>style</b>."
        assert page.locator("#instructions b").count() == 0  # the tag is shown as text, never made bold
        assert page.locator("#project-name").inner_text() == "likert"
        first_card = page.locator(".rank-card").first
        assert first_card.locator(".rating input").count() == 5
        assert first_card.locator(".flags input").count() == 1
        shot(page, server, "likert-item")
        first_card.focus()
        page.keyboard.press("6")  # not on the scale: nothing happens
        assert first_card.locator(".rating input:checked").count() == 0
        page.keyboard.press("5")
        page.keyboard.press("o")
        assert first_card.locator(".rating input:checked").get_attribute("value") == "5"
        assert first_card.locator(".flags input:checked").get_attribute("value") == "off_topic"
        for position, rating in ((1, "3"), (2, "1")):
            page.locator(".rank-card").nth(position).locator(f".rating input[value='{rating}']").check()
        page.click("[data-rank-as-shown]")
        page.click("#answer-form button.primary[type=submit]")
        page.wait_for_url(f"{server.url}/queue")
        # a fresh browser's first page asks for /favicon.ico, which the app has not: that 404 is no script error
        assert [error for error in page.errors if not error.startswith("Failed to load resource")] == []
        check = Store(f"sqlite:///{server.db}", migrate=False)
        [answer] = check.answers("ranking")
        order = answer.shown_order
        assert [answer.payload["ratings"][index] for index in order] == [5, 3, 1]
        assert answer.payload["flags"][order[0]] == ["off_topic"]
        check.close()
        page.context.close()


def test_an_admin_reviews_one_projects_answers_and_sees_its_labelers(browser, tmp_path):
    """The review page narrowed to one project (its select): that project's answers and its labelers' work only,
    kept while answers are accepted."""
    store = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    store.create_user("boss", hash_password(PASSWORDS["boss"]), "admin")
    ann = store.create_user("ann", hash_password(PASSWORDS["ann"]))
    cy = store.create_user("cy", hash_password(PASSWORDS["ann"]))
    poems = store.create_project("poems", instructions="Write **short** poems.")
    store.import_prompts([{"prompt": "A poem about rain"}, {"prompt": "A poem about snow"}], project_id=poems.id)
    store.import_prompts([{"prompt": "Describe Lisbon"}])
    for user, project_id in ((ann, poems.id), (ann, poems.id), (cy, 1)):
        item = store.next_item(user.id, project_id=project_id)
        store.submit(user.id, item.id, {"completion": f"{user.username} on {item.prompt.split()[-1]}"})
    store.close()
    with FeedbackServer(tmp_path / "feedback.db", log=tmp_path / "server.log") as server:
        server.folder = tmp_path
        boss = log_in_as(browser, server, "boss", PASSWORDS["boss"])
        boss.goto(f"{server.url}/admin/review")
        assert boss.locator(".card.review").count() == 3
        boss.select_option("#filter-project", "poems")
        boss.click("form.filters button[type=submit]")
        assert boss.locator("#review-project").inner_text() == "poems"
        assert boss.locator("#found").inner_text().startswith("2 answer(s)")
        assert "Lisbon" not in boss.locator("main").inner_text()
        labelers = boss.locator("#labelers tbody tr")
        assert labelers.count() == 1 and labelers.first.locator("td").nth(1).inner_text() == "2"  # ann's answers
        shot(boss, server, "review-project")
        boss.locator(".card.review").first.locator("button[value=accepted]").click()
        assert "accepted" in boss.locator(".flash-success").inner_text()
        assert boss.locator("#filter-project").input_value() == "poems"  # still this project's answers
        assert boss.locator("#found").inner_text().startswith("1 answer(s)")
        boss.goto(f"{server.url}/admin?project=poems")
        assert boss.locator("#admin-project").input_value() == "poems"
        boss.locator("details.edit-project summary", has_text="poems").click()
        assert boss.locator("#instructions-preview-2 strong").inner_text() == "short"
        assert boss.errors == []
        boss.context.close()
