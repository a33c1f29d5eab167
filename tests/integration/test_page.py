"""The grounding service's web page in a real browser: headless Chromium from the distribution's
packages (`apt-get install chromium chromium-driver`; .ci/run installs them), driven by Selenium
through the system's chromedriver, against the app on a local Serve with a bearer token.

The page's bands must sit where the API's answer for the same request says (the data attributes
carry the API's numbers; the pixel boxes are checked against the timeline's width), for all four
tasks; the VHD curve has one clip per saliency value; a bad upload shows the service's own error
message; clicking a band seeks the video. A screenshot goes to .cache/artifacts/page.png.
"""

from __future__ import annotations

import base64
import os
import pathlib
import shutil

import httpx
import pytest
from ray import serve
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from serve_apps.grounding import app
from serve_support import (
    build_checkpoint,
    free_port,
    make_videos,
    start_serve,
    stop_serve,
    wait_until,
)
from timeexpert.serve.settings import ServiceConfig

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".cache" / "artifacts"
TOKEN = "page-token"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,900"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The app on a local Serve (a tiny checkpoint answering as the demo's model does, from a
    folder; two rendered mp4s under the allowed root; a bearer token): yields (base_url, videos)."""
    tmp = tmp_path_factory.mktemp("page")
    # seed 1 reads windows of a few seconds off these videos' frames (not the whole video)
    ckpt = build_checkpoint(str(tmp / "ckpt"), seed=1, read_off_frames=True)
    videos = make_videos(str(tmp / "videos"))
    port = free_port()
    start_serve(port)
    try:
        config = ServiceConfig(
            model={"checkpoint": ckpt, "num_cpus": 0.1,
                   "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
            video={"allowed_roots": [str(tmp / "videos")], "max_upload_mb": 1.0},
            decoder={"num_cpus": 0.1}, ingress={"num_cpus": 0.1}, auth_token=TOKEN,
        )
        serve.run(app(config), name="grounding", route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"

        def answering():
            try:
                return httpx.get(f"{base}/healthz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(answering, timeout=180, what="the app answering")
        yield base, [os.path.realpath(v) for v in videos]
    finally:
        stop_serve()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("the page test needs Chromium and its driver from the distribution: "
                    "apt-get install -y chromium chromium-driver (.ci/run installs them)")
    options = Options()
    options.binary_location = chromium
    for arg in BROWSER_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    chrome = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def _api(base: str, path: str, body: dict) -> dict:
    r = httpx.post(base + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                   timeout=120)
    return {"status": r.status_code, **r.json()}


def _data_url(path: pathlib.Path) -> str:
    """The data URL the page makes of a file (FileReader.readAsDataURL; Chromium types .mp4)."""
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def _wait_state(browser, *states: str, timeout: float = 60) -> str:
    WebDriverWait(browser, timeout).until(
        lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-state") in states)
    return browser.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def _ask(browser, task: str, text: str = "", options: list[str] = ()) -> str:
    """Ask on the page as a user does (the fields the task shows) and wait for its answer or its
    error: the state it ends in. (Submitting sets the state to busy before the click returns.)"""
    Select(browser.find_element(By.ID, "task")).select_by_value(task)
    for field, value in (("query", text), ("options", "\n".join(options))):
        box = browser.find_element(By.ID, field)
        if box.is_displayed():
            box.clear()
            box.send_keys(value)
    browser.find_element(By.ID, "submit").click()
    return _wait_state(browser, "answered", "error")


_BANDS = """
const track = document.getElementById('track').getBoundingClientRect();
return [...document.querySelectorAll('#track .band')].map(b => {
  const r = b.getBoundingClientRect();
  return {start: +b.dataset.start, end: +b.dataset.end,
          score: b.dataset.score === undefined ? null : +b.dataset.score, text: b.textContent,
          left: (r.left - track.left) / track.width, right: (r.right - track.left) / track.width,
          width: track.width};
});"""


_CLIPS = """
const track = document.getElementById('track').getBoundingClientRect();
return [...document.querySelectorAll('#saliency rect')].map(c => ({
  saliency: +c.dataset.saliency, left: (c.getBoundingClientRect().left - track.left) / track.width,
  width: track.width}));"""


def _check_bands(browser, spans: list[dict], duration: float) -> list[dict]:
    """The page's bands are the API's spans: the same numbers in their data attributes, and boxes
    whose left and right edges sit at start / duration and end / duration of the track's width
    (to a pixel)."""
    bands = browser.execute_script(_BANDS)
    assert len(bands) == len(spans) > 0, (bands, spans)
    for band, span in zip(bands, spans):
        assert (band["start"], band["end"], band["score"]) == (span["start"], span["end"],
                                                               span["score"])
        pixel = duration / band["width"]
        assert abs(band["left"] * duration - span["start"]) <= pixel, (band, span)
        assert abs(band["right"] * duration - span["end"]) <= pixel, (band, span)
    return bands


def test_page_draws_the_api_answers_of_all_four_tasks(service, browser):
    base, videos = service
    browser.get(base + "/")
    # no token yet: the service's 401, in words, on the page
    assert _wait_state(browser, "error", "ready") == "error"
    assert "bearer token" in browser.find_element(By.ID, "error").text
    browser.find_element(By.ID, "token").send_keys(TOKEN + "\t")  # change: reloads with it
    _wait_state(browser, "ready")

    card = browser.find_element(By.ID, "model-card").text
    assert "checkpoint" in card and "dynamic" in card
    layers = browser.find_elements(By.CSS_SELECTOR, "#experts .layer")
    assert [len(layer.find_elements(By.CSS_SELECTOR, ".expert.on")) for layer in layers] == [4, 4]

    listed = [o.get_attribute("value") for o in
              Select(browser.find_element(By.ID, "video-list")).options]
    assert sorted(v for v in listed if v) == sorted(videos)
    Select(browser.find_element(By.ID, "video-list")).select_by_value(videos[0])
    video = {"uri": videos[0]}

    query = "a red circle moves left"
    assert _ask(browser, "mr", query) == "answered"
    mr = _api(base, "/v1/moments", {"video": video, "query": query})
    assert mr["status"] == 200
    timeline = browser.find_element(By.ID, "timeline")
    assert float(timeline.get_attribute("data-duration")) == mr["duration"]
    bands = _check_bands(browser, mr["windows"], mr["duration"])
    assert bands[0]["text"].startswith("#1")

    # the player plays the listed video (its bytes from /v1/videos/content); a band seeks it
    WebDriverWait(browser, 30).until(lambda b: b.execute_script(
        "return document.getElementById('player').readyState >= 1"))
    assert abs(browser.execute_script("return document.getElementById('player').duration")
               - mr["duration"]) < 0.5
    # the latest band at least 4 pixels wide (a click lands on its middle)
    index = max((i for i, b in enumerate(bands) if (b["right"] - b["left"]) * b["width"] >= 4),
                key=lambda i: bands[i]["start"])
    target = mr["windows"][index]
    assert target["start"] > 0, mr["windows"]  # else the seek would not be seen
    browser.find_elements(By.CSS_SELECTOR, "#track .band")[index].click()
    WebDriverWait(browser, 10).until(lambda b: abs(b.execute_script(
        "return document.getElementById('player').currentTime") - target["start"]) < 0.05)

    assert _ask(browser, "vhd", query) == "answered"
    vhd = _api(base, "/v1/highlights", {"video": video, "query": query})
    _check_bands(browser, vhd["windows"], vhd["duration"])
    assert browser.find_element(By.ID, "saliency").is_displayed()
    clips = browser.execute_script(_CLIPS)
    assert [c["saliency"] for c in clips] == vhd["saliency"]
    for i, clip in enumerate(clips):  # clip i starts at i * clip_len
        pixel = vhd["duration"] / clip["width"]
        assert abs(clip["left"] * vhd["duration"] - i * vhd["clip_len"]) <= pixel, (i, clip)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "page.png"))

    assert _ask(browser, "dvc") == "answered"
    dvc = _api(base, "/v1/captions", {"video": video})
    bands = _check_bands(browser, dvc["events"], dvc["duration"])
    assert [b["text"] for b in bands] == [e["caption"] for e in dvc["events"]]
    assert not browser.find_element(By.ID, "saliency").is_displayed()

    options = ["red", "green", "blue", "yellow"]
    question = "what colour is the circle that grows?"
    assert _ask(browser, "gqa", question, options) == "answered"
    gqa = _api(base, "/v1/answers", {"video": video, "question": question, "options": options})
    assert gqa["evidence"] is not None  # the test checkpoint always emits a span
    _check_bands(browser, [gqa["evidence"]], gqa["duration"])
    said = browser.find_element(By.ID, "answer").text
    assert said.startswith(f"Answer: {gqa['answer']} (option {gqa['answer_index'] + 1})"
                           if gqa["answer"] is not None else "Answer: none of the options")


def test_page_uploads_and_shows_the_error_of_a_bad_upload(service, browser, tmp_path):
    base, videos = service
    browser.get(base + "/")
    browser.execute_script("localStorage.setItem('timeexpert-token', arguments[0])", TOKEN)
    browser.refresh()  # the page takes the token from the browser's storage, as a user's reload
    _wait_state(browser, "ready")

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all " * 64)
    browser.find_element(By.ID, "upload").send_keys(str(broken))
    assert _ask(browser, "mr", "a red circle") == "error"
    shown = browser.find_element(By.ID, "error").text
    api = _api(base, "/v1/moments", {"video": {"data_url": _data_url(broken)},
                                     "query": "a red circle"})
    assert api["status"] == 422 and api["error"]["type"] == "invalid_video"
    assert api["error"]["message"] in shown and "invalid_video" in shown

    # a real upload: the page sends the file as a data URL and draws the API's answer
    browser.find_element(By.ID, "upload").send_keys(videos[1])
    assert _ask(browser, "mr", "a red circle") == "answered"
    assert not browser.find_element(By.ID, "error").is_displayed()
    mr = _api(base, "/v1/moments", {"video": {"data_url": _data_url(pathlib.Path(videos[1]))},
                                    "query": "a red circle"})
    _check_bands(browser, mr["windows"], mr["duration"])


def test_video_list_and_bytes_stay_inside_the_allowed_roots(service):
    base, videos = service
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=base, headers=auth, timeout=60) as c:
        listing = c.get("/v1/videos").json()
        assert sorted(v["uri"] for v in listing["videos"]) == sorted(videos)
        assert listing["truncated"] is False
        assert all(not v["name"].startswith("/") for v in listing["videos"])
        r = c.get("/v1/videos/content", params={"uri": videos[0]})
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
        assert r.content == pathlib.Path(videos[0]).read_bytes()
        for uri, status, kind in [
            ("/etc/passwd", 403, "forbidden_uri"),
            (os.path.join(os.path.dirname(videos[0]), "..", "..", "ckpt", "config.json"), 403,
             "forbidden_uri"),
            (videos[0] + ".nope", 404, "video_not_found"),
            ("http://127.0.0.1:1/v.mp4", 400, "unsupported_uri_scheme"),
        ]:
            r = c.get("/v1/videos/content", params={"uri": uri})
            assert (r.status_code, r.json()["error"]["type"]) == (status, kind), uri
    for path in ("/v1/videos", f"/v1/videos/content?uri={videos[0]}"):
        assert httpx.get(base + path, timeout=30).status_code == 401  # the token applies
    page = httpx.get(base + "/", timeout=30)  # the page itself is open; its calls are not
    assert page.status_code == 200 and "page/page.js" in page.text
    assert httpx.get(base + "/page/page.js", timeout=30).status_code == 200
    assert httpx.get(base + "/page/secrets.py", timeout=30).status_code == 404
