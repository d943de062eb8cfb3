"""The web chat page in headless Chromium (Debian's ``chromium`` driven by Playwright): it loads, sends a Chinese
message, shows the streamed reply, keeps a multi-turn history, stops a reply, and shows server errors clearly.
Screenshots go to ``test-artifacts/``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from test_serve import live_server, make_checkpoint, never_stop

CHROMIUM = "/usr/bin/chromium"
CJK = re.compile(r"[\u4e00-\u9fff，。！？：]+")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"{CHROMIUM} not installed (make browser, or apt-get install chromium)")


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    from pocketgpt.serve import load_backend
    from pocketgpt.serve.app import create_app

    ckpt = make_checkpoint(tmp_path_factory.mktemp("web") / "tiny-chat", block_size=256)
    backend = load_backend(ckpt, device="cpu")
    # the random model may only write Chinese tokens, never stops early, and streams for ~1-2 s
    chinese = [i for i in range(backend.vocab_size) if CJK.fullmatch(backend.tokenizer.decode([i]))]
    never_stop(backend, delay=0.01, only=chinese)
    with live_server(create_app(backend, max_concurrency=2)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright import sync_api

    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def test_chat_page_streams_a_reply(browser, page_url):
    page = browser.new_page(viewport={"width": 900, "height": 700})
    requests = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(page_url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny-chat')")

    page.set_default_timeout(15_000)
    page.fill("#temperature", "1")  # the range input
    assert page.inner_text("#temperature-value") == "1.00"
    page.click("#settings summary")  # open "More settings"
    page.fill("#max-tokens", "60")
    page.fill("#input", "你好！今天天气怎么样？")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant.streaming")  # the reply is streaming in ...
    page.wait_for_function("document.querySelector('.msg.assistant.streaming .text').textContent.length > 0")
    page.wait_for_selector(".msg.assistant[data-done]", timeout=30_000)  # ... and finishes
    first = page.inner_text(".msg.assistant .text")
    assert CJK.fullmatch(first) and len(first) >= 20  # the streamed Chinese reply, whole characters only
    assert page.inner_text(".msg.user .text") == "你好！今天天气怎么样？"  # Chinese shown as typed
    assert requests[0]["stream"] is True and requests[0]["temperature"] == 1 and requests[0]["max_tokens"] == 60
    assert page.is_hidden("#error")

    # a second turn carries the whole conversation
    page.fill("#input", "Tell me more.")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-done]').length == 2", timeout=30_000)
    assert [m["role"] for m in requests[1]["messages"]] == ["user", "assistant", "user"]
    assert requests[1]["messages"][1]["content"] == first
    page.click("#settings summary")  # close the settings for the picture
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webpage_chat.png"), full_page=True)
    page.click("#settings summary")

    # Stop ends a long reply early and keeps what was written
    page.fill("#max-tokens", "")
    page.fill("#input", "A long answer, please.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant.streaming .text')?.textContent.length > 0")
    assert page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_selector("text=(stopped)")
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    page.close()


def test_chat_page_shows_server_errors(browser, page_url):
    page = browser.new_page()
    page.goto(page_url + "/")
    page.wait_for_function("document.getElementById('model-name').textContent.includes('tiny-chat')")
    page.set_default_timeout(15_000)
    page.click("#settings summary")
    page.fill("#max-tokens", "100000")  # beyond the context: the server answers 400
    page.fill("#input", "hello")
    page.press("#input", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    text = page.inner_text("#error")
    assert "400" in text and "beyond the context" in text
    assert page.input_value("#input") == "hello"  # the message is given back, not lost
    assert page.locator(".msg").count() == 0
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "webpage_error.png"))
    page.close()
