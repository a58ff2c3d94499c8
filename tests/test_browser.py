"""The chat notebook as an app, in a real browser: Voila serves notebooks/07_chat_demo.ipynb, headless
Chromium (driven by Selenium) uploads an image, sends a question and reads the streamed answer.

Installs what it lacks: voila and selenium with pip, chromium and chromium-driver with apt-get (Debian).
Skipped, with the reason, only where those cannot be installed.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from course_lib.chat import Chat
from course_lib.serving.loading import load_trained

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "07_chat_demo.ipynb"

pytestmark = pytest.mark.browser
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,1600")


def _ensure_python_packages() -> None:
    try:
        import selenium  # noqa: F401
        import voila  # noqa: F401
    except ImportError:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "voila", "selenium"],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode:
            pytest.skip(f"voila/selenium are missing and pip could not install them: {proc.stderr.strip()[-300:]}")


def _ensure_chromium() -> tuple[str, str]:
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium/chromedriver are not installed and apt-get (as root) is not available to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode:
            pytest.skip(f"could not install chromium: `{' '.join(cmd)}` failed: {proc.stderr.strip()[-300:]}")
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip("apt-get installed chromium, but chromium or chromedriver is not on PATH")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_http(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"voila exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"voila did not answer at {url} within {seconds} s")


@pytest.fixture
def voila_app(request, tmp_path):
    """The notebook (07, or the one passed as the fixture's param) served by Voila, with an empty runs folder: the
    app talks to a fresh empty LLaVA."""
    _ensure_python_packages()
    port = _free_port()
    env = {**os.environ, "COURSE_LIB_RUNS": str(tmp_path / "runs"), "HF_HUB_OFFLINE": "1"}
    notebook = getattr(request, "param", NOTEBOOK)
    cmd = [str(Path(sys.executable).parent / "voila"), str(notebook), "--no-browser", f"--port={port}",
           "--Voila.ip=127.0.0.1", "--VoilaExecutor.timeout=300"]
    log = (tmp_path / "voila.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
        _wait_for_http(f"http://127.0.0.1:{port}/", proc)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = _ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# ipywidgets' FileUpload keeps its <input type=file> out of the page and clicks it from the button's
# click handler. Redirect that click: the input joins the page instead of opening a file dialog, and
# Selenium types the path into it, which fires the same `change` event a person's choice would.
CAPTURE_FILE_INPUT = """
const click = HTMLInputElement.prototype.click;
HTMLInputElement.prototype.click = function () {
  if (this.type !== "file") return click.call(this);
  this.id = "captured-file-input";
  this.value = "";
  document.body.appendChild(this);
};
"""


def _upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver.execute_script(CAPTURE_FILE_INPUT)
    driver.find_element(By.CSS_SELECTOR, "button.llava-upload").click()
    driver.find_element(By.ID, "captured-file-input").send_keys(str(path))


def test_upload_ask_and_read_the_streamed_answer(voila_app, browser, empty_llava, tiny_world, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    image = sorted((tiny_world.data / "eval" / "images").glob("*.png"))[0]
    question = "How many circles are there?"
    # The app's model is an empty LLaVA built as the fixture's is (same backbones, same seed).
    expected = Chat(load_trained(empty_llava[0], device="cpu")).ask(question, [image], max_new_tokens=64)

    start = time.monotonic()
    browser.get(voila_app)
    wait = WebDriverWait(browser, 240)  # Voila runs the whole notebook before the app appears
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".llava-send button, button.llava-send")))
    rendered = time.monotonic() - start

    (tmp_path / "notes.png").write_text("not an image")
    _upload(browser, tmp_path / "notes.png")
    wait.until(lambda d: "notes.png: not an image" in d.find_element(By.CSS_SELECTOR, ".llava-transcript").text)
    _upload(browser, image)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".llava-thumbnails img"))

    browser.find_element(By.CSS_SELECTOR, ".llava-message textarea").send_keys(question)
    browser.find_element(By.CSS_SELECTOR, ".llava-send button, button.llava-send").click()
    transcript = browser.find_element(By.CSS_SELECTOR, ".llava-transcript")
    try:
        wait.until(lambda d: f"LLaVA: {expected}" in transcript.text and "You: " + question in transcript.text)
    except TimeoutException:
        raise AssertionError(f"expected 'You: {question}' and 'LLaVA: {expected}'; the transcript shows "
                             f"{transcript.text!r}") from None

    assert len(transcript.find_elements(By.TAG_NAME, "img")) == 1  # the uploaded image, above the question
    assert not browser.find_elements(By.CSS_SELECTOR, ".llava-thumbnails img")  # sent, so the strip is empty
    shot = tmp_path / "chat.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"app rendered in {rendered:.1f} s, answered in {time.monotonic() - start - rendered:.1f} s; "
          f"screenshot {shot}")


@pytest.mark.parametrize("voila_app", [REPO / "notebooks" / "zh" / "07_chat_demo.ipynb"], indirect=True, ids=["zh"])
def test_the_chinese_edition_serves_the_app_in_chinese(voila_app, browser):
    """The Chinese 07 runs the English code byte for byte; its kernel starts in notebooks/zh/, so the app speaks
    Chinese (`notebook_lang()`), while the library's own messages stay English."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(voila_app)
    wait = WebDriverWait(browser, 240)
    send = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".llava-send button, button.llava-send")))
    clear = browser.find_element(By.CSS_SELECTOR, ".llava-clear button, button.llava-clear")
    assert (send.text, clear.text) == ("发送", "清空")
    send.click()  # nothing written: the app's own notice, in Chinese
    wait.until(lambda d: "请先写一条消息" in d.find_element(By.CSS_SELECTOR, ".llava-transcript").text)
