"""The chat page in a real browser: headless Chromium (Debian's package) driven by Playwright."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import requests

from tests.harness import SMALL_WINDOW, long_question, metric, wait_for_metric

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")

# Flags for a sandboxed CI machine with no network: no background connections to Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page_server(start_server, tiny_dir):
    return start_server("--model-path", tiny_dir, "--device", "cpu", "--log-prompts")


def open_page(browser, url: str, **context_args):
    # bypass_csp lets Playwright evaluate its wait predicates; it also means the injection test
    # below proves the page's escaping on its own, without the CSP's second line of defence.
    context = browser.new_context(bypass_csp=True, **context_args)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('temperature').value !== ''")
    page.click("#settings-toggle")  # open the settings panel, as a user changing max tokens would
    return page, errors


def ask(page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")  # Enter sends
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)  # the answer finished


def test_page_is_self_contained_and_served_only_to_browsers(page_server) -> None:
    html = requests.get(page_server.url + "/", headers={"Accept": "text/html"})
    assert html.status_code == 200 and "<textarea" in html.text
    assert "script-src 'self'" in html.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"https?://", html.text)  # no CDN, nothing external
    for asset in ("/ui/chat.js", "/ui/chat.css"):
        assert requests.get(page_server.url + asset).status_code == 200
    api = requests.get(page_server.url + "/")  # curl-style GET: not the page
    assert api.status_code == 405 and "POST /" in api.json()["error"]["message"]


def test_two_turns_stream_and_keep_history(browser, page_server, tmp_path: Path) -> None:
    page, errors = open_page(browser, page_server.url)
    page.fill("#max_tokens", "40")
    ask(page, "第一个问题 first question")
    first = page.locator(".msg.assistant").nth(0)
    assert "tokens/s" in first.locator(".stats").inner_text()
    assert "first token" in first.locator(".stats").inner_text()
    ask(page, "second question")
    assert page.locator(".msg.user").count() == 2 and page.locator(".msg.assistant").count() == 2
    page.screenshot(path=str(tmp_path / "chat-desktop.png"))
    # The second request's prompt, as the server logged it (--log-prompts), carries the whole conversation.
    prompts = page_server.log_lines("<用户>second question<AI>")
    assert "first question<AI>" in prompts[-1] and "<用户>second question<AI>" in prompts[-1]
    assert not errors


def test_streamed_text_appears_before_the_answer_ends(browser, page_server) -> None:
    page, _ = open_page(browser, page_server.url)
    page.fill("#max_tokens", "600")
    page.fill("#temperature", "0")
    page.fill("#input", "stream please")
    page.click("#send")
    page.wait_for_function(
        "document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant').textContent.length > 0"
    )
    partial_while_running = page.locator("#stop").is_visible()
    page.wait_for_selector("#send:not([hidden])", timeout=60_000)
    assert partial_while_running  # text was on screen while the stop button still showed


def _seed_for_a_long_answer(url: str, prompt: str) -> int:
    """A seed whose answer runs the full 900 tokens (random weights stop at a turn marker now and then).
    The page sends the server's default sampling settings plus this seed, so it gets the same answer."""
    for seed in range(40):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 900, "seed": seed}
        if requests.post(url + "/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 900:
            return seed
    pytest.fail("no seed produced a long answer")


def test_stop_button_cancels_on_the_server(browser, page_server) -> None:
    prompt = "tell me a long story"
    seed = _seed_for_a_long_answer(page_server.url, prompt)
    page, _ = open_page(browser, page_server.url)
    page.fill("#max_tokens", "900")
    page.fill("#seed", str(seed))
    page.fill("#input", prompt)
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 5")
    assert metric(page_server.url, "minicpm_requests_running", required=True) == 1
    cancelled = ("minicpm_requests_finished_total", 'reason="cancelled"')
    before = metric(page_server.url, *cancelled, required=True)
    page.click("#stop")
    # Wait for the state, however slow the machine: the generation ended, and it ended cancelled
    # (not by running its 900 tokens to the end).
    wait_for_metric(page_server.url, "minicpm_requests_running", lambda running: running == 0)
    assert metric(page_server.url, *cancelled, required=True) == before + 1
    page.wait_for_selector("#send:not([hidden])")
    assert "stopped" in page.locator(".msg.assistant .stats").inner_text()


def test_model_output_cannot_inject_html(browser, page_server) -> None:
    """A real model will not say <script> on cue, so this one answer is served by the test itself."""
    hostile = (
        '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> **bold** and\n'
        "```python\nprint('<b>hi</b>')\n```"
    )
    chunk = {"choices": [{"index": 0, "delta": {"content": hostile}, "finish_reason": None}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}}
    body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n"
    page, _ = open_page(browser, page_server.url)
    page.route(
        "**/v1/chat/completions", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body)
    )
    ask(page, "say something dangerous")
    bubble = page.locator(".msg.assistant").nth(0)
    assert "<script>window.__xss = 1</script>" in bubble.inner_text()
    assert bubble.locator("script, img").count() == 0
    assert page.evaluate("window.__xss") is None
    assert bubble.locator("strong").inner_text() == "bold"  # Markdown still renders
    assert "print('<b>hi</b>')" in bubble.locator("pre code").inner_text()


def test_errors_are_readable(browser, page_server) -> None:
    page, _ = open_page(browser, page_server.url)
    page.fill("#max_tokens", "100000")
    ask(page, "too much")
    error = page.locator(".msg.error").inner_text()
    assert "400" in error and "max_tokens" in error
    page.fill("#max_tokens", "5")
    ask(page, "fine again")  # the failed turn is not sent as history
    assert page.locator(".msg.assistant:not(.error)").count() == 1


def test_new_chat_and_shift_enter(browser, page_server) -> None:
    page, _ = open_page(browser, page_server.url)
    page.fill("#max_tokens", "5")
    page.fill("#input", "line one")
    page.press("#input", "Shift+Enter")
    page.type("#input", "line two")
    assert page.input_value("#input") == "line one\nline two"  # Shift+Enter is a new line, not a send
    page.press("#input", "Enter")
    page.wait_for_selector("#send:not([hidden])")
    assert page.locator(".msg.user").inner_text() == "line one\nline two"
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0


def test_api_key_prompt_and_phone_layout(browser, start_server, tiny_dir, tmp_path: Path) -> None:
    secured = start_server("--model-path", tiny_dir, "--device", "cpu", "--api-key", "page-key")
    page, _ = open_page(browser, secured.url, viewport={"width": 390, "height": 780}, is_mobile=True, has_touch=True)
    assert page.locator("#key-panel").is_visible()
    page.fill("#api-key", "page-key")
    page.click("#key-form button")
    assert page.evaluate("localStorage.getItem('minicpm-api-key')") == "page-key"
    page.fill("#max_tokens", "8")
    ask(page, "你好")
    assert page.locator(".msg.assistant:not(.error)").count() == 1
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390  # nothing overflows a phone-sized screen
    page.screenshot(path=str(tmp_path / "chat-phone.png"))


def test_long_conversation_drops_the_oldest_turns(browser, small_server, tmp_path: Path) -> None:
    page, errors = open_page(browser, small_server.url)
    # Max tokens left at "auto": the page sends no budget and the server answers in what the window has left.
    for n in range(1, 5):
        ask(page, long_question(n))
    assert page.locator(".msg.error").count() == 0  # before: every message past the window was a red error
    assert page.locator(".msg.assistant").count() == 4
    notices = page.locator(".notice")
    assert notices.count() >= 1
    assert f"to fit the {SMALL_WINDOW}-token context window" in notices.first.inner_text()
    # The dropped turns stay on screen, dimmed; the newest question is in the context.
    assert "dropped" in page.locator(".msg.user").first.get_attribute("class")
    assert "dropped" not in page.locator(".msg.user").last.get_attribute("class")
    last = small_server.log_lines("QUESTION-4")[-1]
    assert "<用户>QUESTION-4 " in last and "QUESTION-1 " not in last
    page.screenshot(path=str(tmp_path / "chat-dropped-turns.png"), full_page=True)

    # When even the question alone cannot fit (an explicit budget too large), the server's message is
    # shown and the conversation is left as it was.
    dropped = page.locator(".msg.dropped").count()
    page.fill("#max_tokens", "100000")
    ask(page, "too much")
    error = page.locator(".msg.error").inner_text()
    assert "400" in error and "max_tokens" in error
    assert page.locator(".msg.dropped").count() == dropped
    assert not errors


def test_page_load_requests_nothing_that_404s(browser, page_server) -> None:
    # A browser of its own: Chromium asks for /favicon.ico once and remembers the answer.
    fresh = browser.browser_type.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        seen = len(page_server.log().splitlines())
        asked = "POST /v1/chat/completions status=200"
        asked_before = sum(asked in line for line in page_server.log().splitlines())
        page, errors = open_page(fresh, page_server.url)
        failed: list[str] = []
        page.on("response", lambda response: failed.append(response.url) if response.status >= 400 else None)
        page.fill("#max_tokens", "5")
        ask(page, "hello")  # a round trip after the page loaded, when Chromium fetches the icon it needs
        # the request's log line is written just after its answer is sent: wait for it
        page_server.log_lines(asked, at_least=asked_before + 1, timeout=30)
        served = page_server.log().splitlines()[seen:]
        assert not [line for line in served if "favicon" in line or "status=404" in line]  # 404s are logged at info
        assert not failed and not errors
        icon = page.evaluate("document.querySelector('link[rel=icon]')?.getAttribute('href') ?? ''")
        assert icon.startswith("data:image/svg+xml,")  # inline: no request at all
    finally:
        fresh.close()


def test_phone_shows_the_whole_placeholder(browser, page_server, tmp_path: Path) -> None:
    page, _ = open_page(
        browser, page_server.url, viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True
    )
    page.click("#settings-toggle")  # closed again, as a phone user first sees the page
    box = page.locator("#input")
    placeholder = box.get_attribute("placeholder")
    assert "Ask" in placeholder and "问题" in placeholder
    # The placeholder typed in as text, in the same font and width: it must fit without scrolling.
    box.fill(placeholder)
    scroll_height, client_height = box.evaluate("el => [el.scrollHeight, el.clientHeight]")
    assert scroll_height <= client_height, "the placeholder is cut off"
    box.fill("")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=str(tmp_path / "chat-phone-375.png"))
