"""examples/app.py, the Gradio chat: through gradio_client (fast) and in a real browser (Debian's chromium, driven by
Playwright), on a tiny random checkpoint."""

import importlib.util
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import gradio
import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForMultimodalLM, AutoProcessor

import transformers_anymal

from anymal_tester import TINY, tiny_model


spec = importlib.util.spec_from_file_location("anymal_app", TINY.parents[1] / "examples" / "app.py")
app_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app_module)
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("anymal-tiny-checkpoint")
    tiny_model().save_pretrained(path)
    AutoProcessor.from_pretrained(TINY).save_pretrained(path)
    return AutoModelForMultimodalLM.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)


def serve(app):
    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def url(checkpoint):
    app = app_module.build_app(*checkpoint, max_new_tokens=4)
    yield serve(app)
    app.close()


@pytest.fixture(scope="module")
def safe_url(checkpoint):
    pytest.importorskip("profanity_check", reason="needs the [safety] extra")
    app = app_module.build_app(*checkpoint, max_new_tokens=4,
                               safety_checker=transformers_anymal.AnyMALSafetyChecker.offline())
    yield serve(app)
    app.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "digit.png")
    np.save(folder / "walk.npy", rng.standard_normal((300, 6)))
    np.save(folder / "three_channels.npy", rng.standard_normal((300, 3)))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (folder / "notes.txt").write_text("hello")
    return folder


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)  # the chat's files stay in the app's cache


def ask(url, text, files, imu_sampling_rate=100):
    from gradio_client import handle_file

    chat, _ = client(url).predict(
        {"text": text, "files": [handle_file(str(path)) for path in files]}, [], imu_sampling_rate,
        api_name="/respond")
    return chat


def temporary_files() -> set[str]:
    """What the app (a plot file per IMU recording) or its client (a folder per downloaded file) could leave
    in the temporary directory."""
    return {entry.name for entry in os.scandir(tempfile.gettempdir())
            if entry.name.endswith(".png") or re.fullmatch("[0-9a-f]{40}", entry.name)}


def test_an_image_and_an_imu_recording_get_a_streamed_answer_that_names_them(url, media):
    from gradio_client import handle_file

    left_behind = temporary_files()
    job = client(url).submit(
        {"text": "What is the person doing?", "files": [handle_file(str(media / "digit.png")),
                                                       handle_file(str(media / "walk.npy"))]},
        [], 100, api_name="/respond")
    updates = [chat[-1]["content"] for chat, _ in job]  # what the page showed, update by update
    texts = [content if isinstance(content, str) else content[0]["text"] for content in updates]
    assert len(texts) >= 3 and all(later.startswith(earlier) for earlier, later in zip(texts[:-2], texts[1:-1]))
    chat = job.outputs()[-1][0]
    answer = chat[-1]
    assert answer["role"] == "assistant"
    text = answer["content"] if isinstance(answer["content"], str) else answer["content"][0]["text"]
    reply, used = text.split("\n\n*used: ")
    assert reply.strip() and used == "image digit.png, imu walk.npy*"
    shown = [message for message in chat if message["role"] == "user"]
    assert len(shown) == 3  # the image, the IMU recording's plot, the question
    [plot] = shown[1]["content"]
    assert plot["component"] == "image"
    assert Path(plot["value"]["path"]).is_relative_to(gradio.utils.get_upload_folder())  # where uploads are kept
    with Image.open(plot["value"]["path"]) as image:
        assert image.size == (360, 120) and image.format == "PNG"
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=1 << 16)}
        assert len(colours - {(255, 255, 255)}) >= 6  # the recording's six channels drawn, each in its colour
    assert not temporary_files() - left_behind  # no plot file of its own, no download folder, per question
    # the next turn gets the chat back, plot included, and shows it again
    chat, _ = client(url).predict({"text": "And now?", "files": []}, chat, 100, api_name="/respond")
    assert [message["content"][0].get("component") for message in chat[:2]] == [None, "image"]


@pytest.mark.parametrize("file, message", [
    ("broken.png", "broken.png"),
    ("notes.txt", "is not a file type this chat reads"),
    ("three_channels.npy", "channel"),
])
def test_a_file_the_processor_refuses_gets_its_message_in_the_chat(url, media, file, message):
    chat = ask(url, "What is it?", [media / file])
    answer = chat[-1]["content"]
    text = answer if isinstance(answer, str) else answer[0]["text"]
    assert text.startswith("⚠️") and message in text
    assert ask(url, "And now?", [media / "digit.png"])[-1]["role"] == "assistant"  # the app keeps working


def test_with_safety_checks_an_offensive_question_is_refused_in_the_chat_and_a_clean_one_answered(safe_url, media):
    chat = ask(safe_url, "What the fuck is this, you idiot?", [media / "digit.png"])
    answer = chat[-1]["content"]
    text = answer if isinstance(answer, str) else answer[0]["text"]
    assert text.startswith("🛑") and "input text check" in text
    answer = ask(safe_url, "Which digit is shown?", [media / "digit.png"])[-1]["content"]
    text = answer if isinstance(answer, str) else answer[0]["text"]
    assert not text.startswith("🛑") and text.endswith("*used: image digit.png*")


def test_an_answer_the_output_check_flags_is_stopped_in_the_chat_and_not_kept(checkpoint, media):
    flag_every_answer = transformers_anymal.AnyMALSafetyChecker(output_text=lambda text: float(bool(text.strip())))
    app = app_module.build_app(*checkpoint, max_new_tokens=4, safety_checker=flag_every_answer)
    url = serve(app)
    try:
        chat = ask(url, "Which digit?", [media / "digit.png"])
    finally:
        app.close()
    answer = chat[-1]["content"]
    text = answer if isinstance(answer, str) else answer[0]["text"]
    assert "🛑" in text and "output text check" in text and "*used:" not in text


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),  # .ci/run installs it, and must run this
                    reason="needs Debian's chromium: apt-get install chromium")
def test_in_a_browser_a_question_with_an_image_gets_a_streamed_answer(url, media, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1000, "height": 800})
        requested = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto(url, wait_until="domcontentloaded")
        page.locator("input[type=file]").first.set_input_files(str(media / "digit.png"))
        textbox = page.get_by_placeholder("Ask a question")
        textbox.fill("Which digit is this?")
        textbox.press("Enter")
        answer = page.locator(".message.bot, [data-testid='bot']").last
        answer.get_by_text("used: image digit.png").wait_for(timeout=60_000)
        uploaded = page.locator(".message.user img, [data-testid='user'] img")
        assert uploaded.count() == 1 and uploaded.first.get_attribute("src").startswith(url)  # the image, in the chat
        page.screenshot(path=tmp_path / "chat.png", full_page=True)
        browser.close()
    outside = [address for address in requested if not address.startswith((url, "data:", "blob:"))]
    assert not outside, outside  # offline: everything the page needs comes from the app itself
    if directory := os.environ.get("ANYMAL_SCREENSHOTS"):
        shutil.copy(tmp_path / "chat.png", directory)
