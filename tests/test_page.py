"""The web page in a real headless Chromium (Debian's chromium + chromedriver, via Selenium)
against a real server: fill the prompt, submit, images of the chosen size appear; a bad value
shows the server's message next to its field; the API key field; a phone-sized window.

Each run saves a screenshot of the page with results under the test's tmp dir; set
BATCHSERVE_UPDATE_SCREENSHOT=1 to also write docs/images/page.png (shown in the README)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, ServerProcess, require_tool, running_server
from imagedata import b64, encode, gradient

SHOT = ROOT / "docs" / "images" / "page.png"
WAIT_S = 90


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_tool("chromium", "chromium-browser")
    driver_path = require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("page")
    with running_server("--model", "tiny", "--max-wait-ms", "300", "--warmup", "128x128x1",
                        tmp_path=tmp) as server:
        yield server


def until(driver: Any, check: Any, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(check)


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    until(driver, lambda d: d.execute_script(
        "return document.getElementById('sampler').options.length > 0"))


def set_value(driver: Any, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def finished_images(driver: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = driver.execute_script("""
        return [...document.querySelectorAll('#gallery .card img:not(.preview)')]
          .filter(img => img.complete && img.naturalWidth > 0)
          .map(img => ({w: img.naturalWidth, h: img.naturalHeight,
                        caption: img.closest('figure').querySelector('figcaption').innerText,
                        href: img.closest('figure').querySelector('a[download]').href}));
    """)
    return result


def test_prompt_submit_and_images_of_the_chosen_size_appear(
    browser: Any, page_server: ServerProcess, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, page_server.url)
    until(browser, lambda d: d.find_element(By.ID, "state").text == "ready")
    assert browser.find_element(By.ID, "key-field").is_displayed() is False  # no key needed
    # tiny takes init images: the page offers them, and text-to-image stays the default
    assert browser.find_element(By.ID, "image-fields").is_displayed() is True
    set_value(browser, "prompt", "a lighthouse at dusk")
    Select(browser.find_element(By.ID, "size")).select_by_value("128x128")
    set_value(browser, "inference_steps", "1")
    set_value(browser, "seed", "5")
    set_value(browser, "count", "3")
    browser.find_element(By.ID, "submit").click()
    until(browser, lambda d: len(finished_images(d)) == 3)
    images = finished_images(browser)
    assert {(i["w"], i["h"]) for i in images} == {(128, 128)}
    captions = " ".join(i["caption"] for i in images)
    for seed in ("5", "6", "7"):
        assert f"seed {seed}" in captions
    assert "batch" in captions and "inference" in captions and "queue" in captions
    assert all(i["href"].startswith("blob:") for i in images)  # download links
    # memory-backed jobs live in one process: the page uses /t2i (see test_page_uses_shared_jobs)
    assert re.search(r'"door": ?"t2i"', page_server.logs())
    assert not re.search(r'"door": ?"jobs"', page_server.logs())
    until(browser, lambda d: re.fullmatch(r"\d+\.\d\d", d.find_element(By.ID, "rate").text))
    browser.save_screenshot(str(tmp_path / "page.png"))
    if os.environ.get("BATCHSERVE_UPDATE_SCREENSHOT"):
        SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "page.png", SHOT)


def test_a_bad_value_shows_the_servers_message_next_to_its_field(
    browser: Any, page_server: ServerProcess
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, page_server.url)
    set_value(browser, "width", "100")
    set_value(browser, "inference_steps", "1")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.send_keys("a red cube")
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)  # keyboard submit
    until(browser, lambda d: d.find_element(By.ID, "width-error").text != "")
    assert browser.find_element(By.ID, "width-error").text == "width must be a multiple of 8"
    width = browser.find_element(By.ID, "width")
    assert width.get_attribute("aria-invalid") == "true"
    assert browser.switch_to.active_element == width  # focus moves to the field to fix
    set_value(browser, "inference_steps", "999")
    set_value(browser, "width", "128")
    browser.find_element(By.ID, "submit").click()
    until(browser, lambda d: d.find_element(By.ID, "inference_steps-error").text != "")
    assert browser.find_element(By.ID, "inference_steps-error").text == (
        "inference_steps must be between 1 and 150")
    assert browser.find_element(By.ID, "width-error").text == ""  # old errors cleared


def test_every_control_has_a_label_and_a_phone_needs_no_sideways_scroll(
    browser: Any, page_server: ServerProcess
) -> None:
    open_page(browser, page_server.url)
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select, textarea')]
          .filter(el => !document.querySelector(`label[for="${el.id}"]`)).map(el => el.id);
    """)
    assert unlabelled == []
    browser.set_window_size(390, 844)
    try:
        open_page(browser, page_server.url)
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0
    finally:
        browser.set_window_size(1280, 900)


def test_api_key_field_when_the_server_requires_one(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    key = "page-test-key-1"
    with running_server("--model", "sim", "--api-key", key, "--max-wait-ms", "0",
                        tmp_path=tmp_path) as server:
        open_page(browser, server.url)
        until(browser, lambda d: d.find_element(By.ID, "key-field").is_displayed())
        set_value(browser, "prompt", "x")
        set_value(browser, "api_key", "wrong-key-123")
        set_value(browser, "width", "64")
        set_value(browser, "height", "64")
        browser.find_element(By.ID, "submit").click()
        until(browser, lambda d: d.find_element(By.ID, "api_key-error").text != "")
        assert "API key" in browser.find_element(By.ID, "api_key-error").text
        set_value(browser, "api_key", key)
        browser.find_element(By.ID, "submit").click()
        until(browser, lambda d: len(finished_images(d)) == 1)
        browser.refresh()  # the key stays for this tab (sessionStorage), not in the page
        until(browser, lambda d: d.find_element(By.ID, "api_key").get_attribute("value") == key)


def test_the_size_choices_are_the_served_familys(browser: Any, tmp_path: Path) -> None:
    """Served as SDXL, the page offers SDXL's sizes with 1024x1024 chosen, not SD 1.x's 512,
    and a request sent without touching them is drawn at 1024x1024."""
    from selenium.webdriver.common.by import By

    with running_server("--model", "sim", "--model-family", "sdxl", "--max-wait-ms", "0",
                        tmp_path=tmp_path) as server:
        open_page(browser, server.url)
        until(browser, lambda d: d.find_element(By.ID, "size").get_attribute("value")
              == "1024x1024")
        offered = browser.execute_script(
            "return [...document.getElementById('size').options].map(o => o.value)")
        assert {"1024x1024", "832x1216", "1216x832"} <= set(offered)
        assert "512x512" not in offered and "768x768" not in offered
        assert browser.find_element(By.ID, "width").get_attribute("value") == "1024"
        set_value(browser, "prompt", "a lighthouse")
        set_value(browser, "inference_steps", "1")
        browser.find_element(By.ID, "submit").click()
        until(browser, lambda d: len(finished_images(d)) == 1)
        assert (finished_images(browser)[0]["w"], finished_images(browser)[0]["h"]) == (1024, 1024)


def test_docs_page_renders_every_operation_with_exact_bounds(
    browser: Any, page_server: ServerProcess
) -> None:
    import httpx

    operations = sum(len(ops) for ops in httpx.get(page_server.url + "/openapi.json")
                     .json()["paths"].values())
    browser.get(page_server.url + "/docs")
    until(browser, lambda d: d.execute_script(
        "return document.querySelectorAll('section.op').length") == operations)
    text = browser.execute_script("return document.getElementById('t2i').innerText")
    assert "0..9223372036854775807" in text  # 2**63-1, not a rounded script number
    assert "not blank" in text and "multiple of 8" in text


def test_each_image_appears_when_its_own_batch_ends(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    # One image per batch, 1.5 s each: the second is still pending when the first shows.
    with running_server("--model", "sim", "--max-batch-size", "1", "--max-wait-ms", "0",
                        "--sim-per-image-ms", "1500", tmp_path=tmp_path) as server:
        open_page(browser, server.url)
        set_value(browser, "prompt", "x")
        set_value(browser, "width", "64")
        set_value(browser, "height", "64")
        set_value(browser, "count", "2")
        browser.find_element(By.ID, "submit").click()
        until(browser, lambda d: len(finished_images(d)) == 1)
        pending = browser.execute_script(
            "return [...document.querySelectorAll('#gallery .pending')].map(e => e.textContent)")
        assert len(pending) == 1 and pending[0] != ""  # queued or running, not yet an image
        until(browser, lambda d: len(finished_images(d)) == 2)


def test_page_submits_jobs_and_polls_when_the_jobs_are_shared(
    browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    from services import redis_server

    with redis_server(tmp_path) as redis, running_server(
        "--model", "sim", "--max-wait-ms", "0", "--sim-per-image-ms", "300",
        "--queue", redis.url, "--results", f"file://{tmp_path / 'results'}", tmp_path=tmp_path,
    ) as server:
        open_page(browser, server.url)
        set_value(browser, "prompt", "x")
        set_value(browser, "width", "64")
        set_value(browser, "height", "64")
        set_value(browser, "seed", "12")
        browser.find_element(By.ID, "submit").click()
        until(browser, lambda d: len(finished_images(d)) == 1)
        (image,) = finished_images(browser)
        assert (image["w"], image["h"]) == (64, 64) and "seed 12" in image["caption"]
        logs = server.logs()
        assert re.search(r'"door": ?"jobs"', logs) and not re.search(r'"door": ?"t2i"', logs)


def test_an_init_image_is_uploaded_a_mask_painted_and_both_sent(
    browser: Any, tmp_path: Path
) -> None:
    """Upload an image, set the strength, paint a mask with the brush: /t2i receives the image's
    own bytes as a data: URL, the strength, and the painted mask at the image's size (white
    where painted); the result (sim gives back its init image) appears at the image's size."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    picture = gradient(96, 80)
    path = tmp_path / "photo.png"
    path.write_bytes(encode(picture))
    with running_server("--model", "sim", "--max-wait-ms", "0", tmp_path=tmp_path) as server:
        open_page(browser, server.url)
        until(browser, lambda d: d.find_element(By.ID, "image-fields").is_displayed())
        browser.execute_script("""
            window.sentBodies = [];
            const fetch0 = window.fetch;
            window.fetch = (url, options) => {
              if (options && options.body) window.sentBodies.push([String(url), options.body]);
              return fetch0(url, options);
            };""")
        set_value(browser, "prompt", "a barn at noon")
        set_value(browser, "inference_steps", "4")
        browser.find_element(By.ID, "init_image").send_keys(str(path))
        until(browser, lambda d: d.find_element(By.ID, "painter").is_displayed())
        assert browser.find_element(By.ID, "size").get_attribute("value") == "image"
        set_value(browser, "strength", "0.5")
        canvas = browser.find_element(By.ID, "paint")
        shown = canvas.rect  # on screen; the canvas itself is 96x80 image pixels

        def at(x: float, y: float) -> tuple[int, int]:  # image pixel -> offset from the centre
            return (round((x / 96 - 0.5) * shown["width"]),
                    round((y / 80 - 0.5) * shown["height"]))

        start, end = at(16, 20), at(32, 20)
        ActionChains(browser).move_to_element_with_offset(canvas, *start).click_and_hold() \
            .move_by_offset(end[0] - start[0], 0).release().perform()  # a stroke, top left
        browser.find_element(By.ID, "submit").click()
        until(browser, lambda d: len(finished_images(d)) == 1)
        (image,) = finished_images(browser)
        assert (image["w"], image["h"]) == (96, 80)  # the image's own size
        ((url, text),) = browser.execute_script("return window.sentBodies")
        browser.set_window_size(390, 844)
        try:  # the image fields and the canvas fit a phone too
            overflow = browser.execute_script("return document.documentElement.scrollWidth"
                                              " - document.documentElement.clientWidth")
            assert overflow <= 0
        finally:
            browser.set_window_size(1280, 900)
    assert url == "/t2i"
    body = json.loads(text)
    assert body["init_image"] == "data:image/png;base64," + b64(path.read_bytes())
    assert body["strength"] == 0.5 and body["mask_blur"] == 4
    assert "width" not in body and "height" not in body
    assert body["mask_image"].startswith("data:image/png;base64,")
    painted = Image.open(io.BytesIO(base64.b64decode(body["mask_image"].split(",", 1)[1])))
    assert painted.size == (96, 80)
    grey = np.asarray(painted.convert("L"))
    assert grey[20, 16] == grey[20, 32] == 255  # white along the stroke...
    assert grey[40:, :].max() == 0 and grey[:, 48:].max() == 0  # ...black far from it


def test_the_tiny_engine_repaints_an_uploaded_image(browser: Any, page_server: ServerProcess,
                                                    tmp_path: Path) -> None:
    """The real engine behind the page: upload, strength, submit; the result has the image's
    size and is a repainted image, not the upload handed back."""
    from selenium.webdriver.common.by import By

    picture = gradient(96, 80)
    path = tmp_path / "photo.png"
    path.write_bytes(encode(picture))
    open_page(browser, page_server.url)
    until(browser, lambda d: d.find_element(By.ID, "image-fields").is_displayed())
    set_value(browser, "prompt", "a barn in the snow")
    set_value(browser, "inference_steps", "4")
    browser.find_element(By.ID, "init_image").send_keys(str(path))
    until(browser, lambda d: d.find_element(By.ID, "painter").is_displayed())
    set_value(browser, "strength", "0.5")
    browser.find_element(By.ID, "submit").click()
    until(browser, lambda d: len(finished_images(d)) == 1)
    (image,) = finished_images(browser)
    assert (image["w"], image["h"]) == (96, 80)
    shown = browser.execute_script("""
        const img = document.querySelector('#gallery .card img');
        const canvas = document.createElement('canvas');
        canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
        canvas.getContext('2d').drawImage(img, 0, 0);
        return canvas.toDataURL('image/png');""")
    got = Image.open(io.BytesIO(base64.b64decode(shown.split(",", 1)[1]))).convert("RGB")
    difference = np.abs(np.asarray(got, np.int16) - np.asarray(picture, np.int16))
    assert difference.max() > 10  # repainted by the model


def test_the_page_offers_the_lora_files_and_sends_the_chosen_one(browser: Any,
                                                                  tmp_path: Path) -> None:
    from loras import kohya
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from batchserve.engines import tiny

    folder = tmp_path / "loras"
    folder.mkdir()
    kohya(folder / "ink.safetensors", tiny.build_pipeline(), seed=1)
    (folder / "old.ckpt").write_bytes(b"a pickle: listed as unusable, not offered")
    with running_server("--model", "tiny", "--lora-dir", str(folder), "--max-wait-ms", "0",
                        "--warmup", "64x64x1", tmp_path=tmp_path) as server:
        open_page(browser, server.url)
        until(browser, lambda d: d.find_element(By.ID, "lora-field").is_displayed())
        offered = [o.get_attribute("value") for o in
                   Select(browser.find_element(By.ID, "lora")).options]
        assert offered == ["", "ink"]
        set_value(browser, "prompt", "a lighthouse")
        Select(browser.find_element(By.ID, "size")).select_by_value("custom")
        set_value(browser, "width", "64")
        set_value(browser, "height", "64")
        set_value(browser, "inference_steps", "1")
        Select(browser.find_element(By.ID, "lora")).select_by_value("ink")
        set_value(browser, "lora_scale", "9")  # the server's rule, shown next to the field
        browser.find_element(By.ID, "submit").click()
        until(browser, lambda d: d.find_element(By.ID, "lora-error").text != "")
        assert "loras[0].scale" in browser.find_element(By.ID, "lora-error").text
        set_value(browser, "lora_scale", "0.8")
        browser.find_element(By.ID, "submit").click()
        until(browser, lambda d: len(finished_images(d)) == 1)


def test_a_progress_bar_follows_the_running_batch(browser: Any, page_server: ServerProcess
                                                  ) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    open_page(browser, page_server.url)
    until(browser, lambda d: d.find_element(By.ID, "state").text == "ready")
    set_value(browser, "prompt", "a lighthouse at dusk")
    Select(browser.find_element(By.ID, "size")).select_by_value("custom")
    set_value(browser, "width", "256")
    set_value(browser, "height", "256")
    set_value(browser, "inference_steps", "60")  # a few seconds on this CPU
    set_value(browser, "count", "1")
    browser.find_element(By.ID, "submit").click()
    bar = "document.querySelector('#gallery .card .pending progress')"
    until(browser, lambda d: d.execute_script(
        f"const b = {bar}; return b !== null && !b.hidden && b.value > 0"))
    label = browser.execute_script(
        "return document.querySelector('#gallery .card .pending .label').textContent")
    assert label.startswith("running batch: step ")
    until(browser, lambda d: len(finished_images(d)) >= 1)
