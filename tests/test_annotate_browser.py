"""The annotation page in a real headless Chromium (Selenium + chromedriver).

Labels pairs with clicks and keys, undoes one, kills and restarts the server, labels the rest,
then checks that the export holds every acknowledged label and nothing else. Needs the
``chromium`` and ``chromedriver`` binaries (``make browser`` installs Debian's) and the
``selenium`` package (the ``dev`` extra); without them the test fails, saying so. Set
``VIDALIGN_SCREENSHOT=docs/annotate.png`` to keep the screenshot it takes.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from test_annotate import start_server_process

from align.cli import main
from align.data.preference import load_preference_dataset
from align.demo.synthetic import all_scenes, render
from align.launch import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
FRAMES, SIZE = 16, 32


def _browser_paths() -> tuple[str, str]:
    chromium = os.environ.get("VIDALIGN_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
    )
    driver = os.environ.get("VIDALIGN_CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "the browser test needs headless Chromium and chromedriver on PATH: run `make browser` "
            "(apt-get install chromium chromium-driver) or set VIDALIGN_CHROMIUM / VIDALIGN_CHROMEDRIVER"
        )
    return chromium, driver


@pytest.fixture
def driver():
    chromium, chromedriver = _browser_paths()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser test needs selenium: pip install -e '.[dev]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-dev-shm-usage",
        "--window-size=1200,1000",
        "--autoplay-policy=no-user-gesture-required",
    ):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=Service(chromedriver))  # a given driver: nothing downloaded
    yield d
    d.quit()


def make_dataset(path: Path, n: int = 4) -> Path:
    """Synthetic-world pairs as decoded arrays: a clean clip vs a noisy one of the same prompt."""
    import datasets

    rng = np.random.default_rng(0)
    rows = {"prompt": [], "video_a": [], "video_b": [], "preference": []}
    for scene in all_scenes()[::50][:n]:
        clean = render(scene, rng, num_frames=FRAMES, size=SIZE)
        noisy = render(scene, rng, num_frames=FRAMES, size=SIZE) + rng.normal(0, 40, clean.shape)
        rows["prompt"].append(scene.prompt)
        rows["video_a"].append(clean)
        rows["video_b"].append(np.clip(noisy, 0, 255).astype(np.uint8))
        rows["preference"].append("a")
    video = datasets.Array4D((FRAMES, SIZE, SIZE, 3), "uint8")
    features = datasets.Features(
        {"prompt": datasets.Value("string"), "video_a": video, "video_b": video, "preference": datasets.Value("string")}
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
    return path


def test_label_undo_restart_export_in_a_browser(driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from align.annotate.storage import LabelStore

    pairs_dir = make_dataset(tmp_path / "prefs")
    db = tmp_path / "labels.sqlite"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    js = driver.execute_script

    def state() -> tuple[str, str]:
        return tuple(js("return [document.body.dataset.state, document.body.dataset.pairId || '']"))

    def wait_for(cond, what: str):
        try:
            return WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: cond())
        except Exception:
            raise AssertionError(f"timed out waiting for {what}; page state {state()}") from None

    def wait_ready_other_than(previous: str | None) -> str:
        wait_for(lambda: state()[0] == "ready" and state()[1] != previous, "the next pair")
        return state()[1]

    def shown() -> tuple[int, str]:
        """The displayed pair's id and the media path of the video on the left."""
        pid, src = js("return [document.body.dataset.pairId, document.getElementById('video-left').src]")
        return int(pid), src.split("/media/", 1)[1]

    def press(key: str) -> None:
        ActionChains(driver).send_keys(key).perform()

    server, _ = start_server_process(pairs_dir, db, port, startup_s=120)  # the same port: the same origin
    try:
        driver.get(url)
        wait_for(lambda: state()[0] == "login", "the login form")
        driver.find_element(By.ID, "name-input").send_keys("alice")
        driver.find_element(By.ID, "start").click()
        wait_ready_other_than(None)
        # both videos decode (served with their MIME type, seekable) and play in sync
        wait_for(
            lambda: js(
                "const l = document.getElementById('video-left'), r = document.getElementById('video-right');"
                "return l.readyState >= 2 && r.readyState >= 2 && !l.paused && !r.paused"
                " && l.duration > 0 && Math.abs(l.duration - r.duration) < 1e-3"
            ),
            "both videos to play",
        )
        assert driver.find_element(By.ID, "prompt").text in {r for r in load_preference_dataset(pairs_dir)["prompt"]}
        assert driver.find_element(By.ID, "progress").text == "0 / 4"

        # pair 1: an aspect, a comment, a click on "A is better"
        p1, left1 = shown()
        driver.find_element(By.ID, "aspect-motion-left").click()
        driver.find_element(By.ID, "comment").send_keys("one background is much noisier")
        driver.save_screenshot(str(tmp_path / "annotate.png"))
        driver.find_element(By.ID, "choose-left").click()
        wait_ready_other_than(str(p1))
        # pair 2: key B; pair 3: key arrow-down (tie), then undo it with the button
        p2, left2 = shown()
        press("b")
        wait_ready_other_than(str(p2))
        p3, left3 = shown()
        press(Keys.ARROW_DOWN)
        wait_ready_other_than(str(p3))
        driver.find_element(By.ID, "undo").click()
        wait_for(lambda: state() == ("ready", str(p3)), "the undone pair to come back")
        assert "Undone" in driver.find_element(By.ID, "status").text
        assert shown() == (p3, left3)  # the same sides as before
        press(Keys.ARROW_RIGHT)  # relabel pair 3: B is better
        wait_ready_other_than(str(p3))
        assert driver.find_element(By.ID, "progress").text == "3 / 4"
    finally:
        server.send_signal(signal.SIGKILL)  # no clean shutdown
        server.wait(60)  # generous: a loaded CI machine is slow to tear a Python process down

    server, _ = start_server_process(pairs_dir, db, port, startup_s=120)
    try:
        driver.refresh()  # same origin: the page remembers the annotator
        p4 = int(wait_ready_other_than(None))
        assert p4 not in (p1, p2, p3)
        assert driver.find_element(By.ID, "annotator-name").text == "alice"
        assert driver.find_element(By.ID, "progress").text == "3 / 4"
        _, left4 = shown()
        press("s")  # skip: nothing left, then undo the skip and call it a tie
        wait_for(lambda: state()[0] == "done", "the done page")
        driver.find_element(By.ID, "undo-done").click()
        wait_for(lambda: state() == ("ready", str(p4)), "the skipped pair to come back")
        press("t")
        wait_for(lambda: state()[0] == "done", "the done page")
        assert driver.find_element(By.ID, "progress").text == "4 / 4"
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)  # generous: a loaded CI machine is slow to tear a Python process down

    screenshot = tmp_path / "annotate.png"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("VIDALIGN_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["VIDALIGN_SCREENSHOT"])

    # the export holds exactly the acknowledged labels, mapped from screen sides to a / b
    media = {p["id"]: p for p in LabelStore(db, create=False).pairs()}

    def side(pid: int, left_media: str, choice: str) -> str:
        left = "a" if media[pid]["media_a"] == left_media else "b"
        assert media[pid][f"media_{left}"] == left_media
        return {"left": left, "right": "b" if left == "a" else "a", "tie": "tie"}[choice]

    want = {
        p1: side(p1, left1, "left"),
        p2: side(p2, left2, "right"),
        p3: side(p3, left3, "right"),
        p4: side(p4, left4, "tie"),
    }
    assert main(["annotate", "export", "--db", str(db), str(tmp_path / "out"), "--mode", "all"]) == 0
    ds = load_preference_dataset(tmp_path / "out")
    assert len(ds) == 4
    assert dict(zip(ds["pair_id"], ds["preference"])) == want
    assert set(ds["annotator"]) == {"alice"}
    row1 = ds.select([ds["pair_id"].index(p1)])[0]
    assert row1["comment"] == "one background is much noisier"
    assert row1["preference_motion"] == side(p1, left1, "left")
    assert {r["shown_left"] for r in ds} <= {"a", "b"}


def test_invite_link_in_a_browser(driver, tmp_path):
    """Access control in a real browser: the invite link opens the page without a name to type
    (the token names the annotator), the videos play with the cookie the first response set,
    the token leaves the address bar, and a label is stored under the invited name."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    from align.annotate.storage import LabelStore

    pairs_dir = make_dataset(tmp_path / "prefs", n=2)
    db = tmp_path / "labels.sqlite"
    token = LabelStore(db).add_invite("erin")
    port = free_port()
    js = driver.execute_script
    server, _ = start_server_process(pairs_dir, db, port, startup_s=120, extra_args=("--require-invite",))
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        assert "needs an invite link" in driver.page_source  # 401 without the token
        driver.get(f"http://127.0.0.1:{port}/?token={token}")

        def ready() -> bool:
            return js(
                "const l = document.getElementById('video-left'), r = document.getElementById('video-right');"
                "return document.body.dataset.state === 'ready' && l.readyState >= 2 && r.readyState >= 2"
            )

        WebDriverWait(driver, 30, poll_frequency=0.05).until(lambda d: ready())
        assert js("return document.getElementById('annotator-name').textContent") == "erin"
        assert js("return document.getElementById('switch').hidden") is True
        assert "token" not in driver.current_url
        pid = int(js("return document.body.dataset.pairId"))
        ActionChains(driver).send_keys("a").perform()
        WebDriverWait(driver, 30, poll_frequency=0.05).until(
            lambda d: js("return document.body.dataset.pairId") not in ("", str(pid))
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    assert [(r["annotator"], r["pair_id"]) for r in LabelStore(db, create=False).labels()] == [("erin", pid)]
