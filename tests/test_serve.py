"""`capkit serve`: the API's answers against `capkit caption`, bad input and abuse, batching, a clean stop,
and the page in a real browser. Every server here listens on 127.0.0.1, on a free port."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from toolkit.config import SearchConfig  # noqa: E402
from toolkit.images import ImageBytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_PIXELS = 200_000       # small, so a "decompression bomb" is cheap to make here
MAX_UPLOAD_MB = 0.5


class Running:
    """A uvicorn server in a thread of this process, on its own bound socket."""

    def __init__(self, captioner, config):
        from toolkit.serve import address, bind, create_app, server

        self.sock = bind("127.0.0.1", 0)
        self.url = address(self.sock)
        self.app = create_app(captioner, config)
        self.server = server(self.app, self.sock, config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the test server did not come up")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def captioner(tiny_packs):
    from toolkit.captioner import Captioner

    return Captioner(tiny_packs, ["all"], feature_cache=False).load()


@pytest.fixture(scope="module")
def served(captioner):
    from toolkit.serve import ServeConfig

    run = Running(captioner, ServeConfig(max_upload_mb=MAX_UPLOAD_MB, max_images=4, max_pixels=MAX_PIXELS,
                                         batch_wait_ms=20, body_timeout_s=1.5))
    yield run
    run.stop()


@pytest.fixture(scope="module")
def photos(tiny_dataset) -> list[Path]:
    return sorted(tiny_dataset["images"].iterdir())[:5]


def _files(paths) -> list:
    return [("image", (p.name, p.read_bytes(), "image/png")) for p in paths]


def _post(url, files, data=None, **kw):
    """POST to /v1/captions; `data` a dict, or (field, value) pairs for repeated fields."""
    if isinstance(data, list):
        grouped: dict[str, list] = {}
        for k, v in data:
            grouped.setdefault(k, []).append(v)
        data = grouped
    return httpx.post(url + "v1/captions", files=files, data=data or {}, timeout=60, **kw)


def _png(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# -- the contract ------------------------------------------------------------------------------


def test_captions_are_what_capkit_caption_prints_in_upload_order(served, photos, tiny_packs):
    from toolkit.captioner import caption_images

    order = [photos[2], photos[0], photos[1]]
    r = _post(served.url, _files(order), [("lang", "zh"), ("lang", "en"), ("beam", "2"), ("length_penalty", "0.7"),
                                          ("no_repeat_ngram", "2")])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["image"] for x in results] == [p.name for p in order]
    # The CLI's own function, its on-disk feature cache and all: the server's in-memory features give the same text.
    cli = caption_images(order, ["zh", "en"], tiny_packs, beam=2, length_penalty=0.7, no_repeat_ngram=2)
    expected = {(Path(row["image"]).name, row["lang"]): row["caption"] for row in cli.rows}
    versions = {lang: json.loads((tiny_packs / lang / "manifest.json").read_text())["pack_version"] for lang in ("en", "zh")}
    for x in results:
        assert list(x["captions"]) == ["zh", "en"]
        for lang, c in x["captions"].items():
            assert c["text"] == expected[x["image"], lang] and c["pack_version"] == versions[lang]
        assert x["seconds"] > 0


def test_all_or_no_lang_is_every_served_pack(served, photos):
    for data in ({}, {"lang": "all"}, {"lang": "en,zh"}):
        r = _post(served.url, _files(photos[:1]), data)
        assert r.status_code == 200, r.text
        assert list(r.json()["results"][0]["captions"]) == ["en", "zh"]


def test_packs_healthz_openapi_and_the_page(served, tiny_packs):
    from toolkit.serve_page import CSP

    packs = httpx.get(served.url + "v1/packs").json()["packs"]
    assert [p["lang"] for p in packs] == ["en", "zh"]
    manifest = json.loads((tiny_packs / "zh" / "manifest.json").read_text())
    zh = packs[1]
    assert zh["version"] == manifest["pack_version"] and zh["decoder"] == "lstm"
    assert zh["scores"]["test"]["bleu4"] == manifest["scores"]["test"]["model"]["bleu4"]
    assert zh["scores"]["test"]["cider_d"] == manifest["scores"]["test"]["model"]["cider_d"]
    health = httpx.get(served.url + "healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    doc = httpx.get(served.url + "openapi.json").json()
    body = doc["paths"]["/v1/captions"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"image", "lang", "beam", "length_penalty", "no_repeat_ngram"} <= set(body["properties"])
    assert "/v1/packs" in doc["paths"] and "/healthz" in doc["paths"]
    page = httpx.get(served.url)
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert "default-src 'none'" in CSP and "http" not in CSP
    for asset in ("static/app.js", "static/app.css"):
        text = httpx.get(served.url + asset).text
        assert "http://" not in text and "https://" not in text and "@import" not in text  # nothing from outside


# -- bad input and abuse -----------------------------------------------------------------------


def _bad_requests(photos):
    good = photos[0].read_bytes()
    one = [("image", ("a.png", good, "image/png"))]
    return {
        "not an image": (dict(files=[("image", ("notes.txt", b"hello, I am text", "text/plain"))]), 422, "not an image"),
        "empty file": (dict(files=[("image", ("e.png", b"", "image/png"))]), 422, "empty file"),
        "truncated": (dict(files=[("image", ("cut.png", good[: len(good) // 2], "image/png"))]), 422, "cut.png"),
        "damaged": (dict(files=[("image", ("bad.png", good[:40] + b"\0" * 200 + good[240:], "image/png"))]), 422, "bad.png"),
        "too many pixels": (dict(files=[("image", ("bomb.png", _png((600, 600)), "image/png"))]), 422, "over the limit"),
        "unknown lang": (dict(files=one, data={"lang": "fr"}), 400, "served: en, zh"),
        "too many images": (dict(files=one * 5), 400, "too many images"),
        "no image": (dict(files=[("lang", (None, "en"))]), 400, "no image"),
        "text as image": (dict(files=[("image", (None, "hello"))]), 400, "not a file"),
        "unknown field": (dict(files=one + [("images", ("b.png", good, "image/png"))]), 400, "unknown field"),
        "bad beam": (dict(files=one, data={"beam": "lots"}), 400, "beam must be"),
        "huge beam": (dict(files=one, data={"beam": "500"}), 400, "beam must be"),
        "nan penalty": (dict(files=one, data={"length_penalty": "nan"}), 400, "length_penalty"),
        "malformed multipart": (dict(content=b"garbage, not parts", headers={"content-type": "multipart/form-data; boundary=zz"}),
                                400, "malformed multipart"),
        "no boundary": (dict(content=b"x", headers={"content-type": "multipart/form-data"}), 400, "multipart"),
        "not multipart": (dict(content=b'{"image": "/etc/passwd"}', headers={"content-type": "application/json"}), 415,
                          "multipart/form-data"),
        "over the upload limit": (dict(files=[("image", ("big.png", os.urandom(int(0.6 * 2**20)), "image/png"))]), 413,
                                  "over the limit"),
    }


def test_bad_requests_get_one_json_line_and_the_server_goes_on(served, photos):
    for name, (kw, status, words) in _bad_requests(photos).items():
        r = httpx.post(served.url + "v1/captions", timeout=30, **kw)
        assert r.status_code == status, (name, r.status_code, r.text)
        err = r.json()["error"]
        assert words in err and "\n" not in err and "Traceback" not in r.text, (name, err)
    for path, status in (("nowhere", 404), ("v1/captions", 405)):
        r = httpx.get(served.url + path)
        assert r.status_code == status and "error" in r.json()
    assert httpx.get(served.url + "healthz").status_code == 200
    assert _post(served.url, _files(photos[:1])).status_code == 200


def test_one_bad_image_names_itself_and_the_others_stay_unharmed(served, photos):
    files = _files(photos[:1]) + [("image", ("junk.gif", b"GIF89a??", "image/gif"))]
    r = _post(served.url, files)
    assert r.status_code == 422 and r.json()["failed"] == [{"image": "junk.gif", "error": r.json()["error"]}]
    assert r.json()["error"].startswith("junk.gif: ")


def _raw(url: str, head: bytes, body: bytes = b"", wait: float = 10) -> bytes:
    """Send `head` and `body` on a raw socket, then read until the server closes or `wait` passes."""
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head)
        try:
            s.sendall(body)
        except OSError:  # the server refused the rest of it and closed
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def test_an_upload_over_the_limit_is_refused_with_or_without_its_length(served):
    big = b"x" * int(0.8 * 2**20)
    declared = _raw(served.url, b"POST /v1/captions HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b"Content-Length: %d\r\n\r\n" % len(big))  # nothing sent: refused from the header alone
    assert declared.startswith(b"HTTP/1.1 413") and b'"error"' in declared
    part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
            + big + b"\r\n--b--\r\n")
    chunk = b"%x\r\n%s\r\n" % (len(part), part)
    chunked = _raw(served.url, b"POST /v1/captions HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n", chunk + b"0\r\n\r\n")
    assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]
    assert httpx.get(served.url + "healthz").status_code == 200


def test_a_client_that_stops_sending_times_out_and_others_are_served_meanwhile(served, photos):
    head = (b"POST /v1/captions HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n")
    with ThreadPoolExecutor(1) as pool:
        t0 = time.time()
        stalled = pool.submit(_raw, served.url, head, b"\x89PNG", 20)
        time.sleep(0.3)
        assert _post(served.url, _files(photos[:1])).status_code == 200  # while the other one hangs
        answer = stalled.result()
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive" in answer and time.time() - t0 < 10
    assert httpx.get(served.url + "healthz").json()["status"] == "ok"


def test_no_request_makes_the_server_open_a_path(served, photos):
    # A file name is a label, never a path: the answer is about the bytes sent, not about /etc/passwd.
    r = _post(served.url, [("image", ("/etc/passwd", photos[0].read_bytes(), "image/png"))])
    assert r.status_code == 200 and r.json()["results"][0]["image"] == "/etc/passwd"
    r = _post(served.url, [("image", ("/etc/passwd", b"", "image/png"))])
    assert r.status_code == 422 and "root:" not in r.text


# -- batching ----------------------------------------------------------------------------------


def test_requests_that_arrive_together_are_captioned_in_one_call(captioner, photos):
    from toolkit.serve import BatchWorker, Job

    worker = BatchWorker(captioner, wait_s=0.5, max_images=64).start()
    try:
        search = SearchConfig(beam=2)
        jobs = [Job([ImageBytes(p.name, p.read_bytes())], ("en", "zh"), search) for p in photos]
        jobs.append(Job([ImageBytes("x", photos[0].read_bytes())], ("en",), search))  # other languages: its own call
        for job in jobs:
            worker.submit(job)
        results = [job.future.result(60) for job in jobs]
    finally:
        worker.stop(30)
    assert worker.batches == 2
    alone = captioner.caption(photos, ["en", "zh"], search)
    for res, want in zip(results, alone.images):
        (got,) = res.images
        assert {k: c.text for k, c in got.captions.items()} == {k: c.text for k, c in want.captions.items()}
        assert res.batch_images == len(photos)
    assert list(results[-1].images[0].captions) == ["en"]


def test_a_request_given_up_on_is_dropped_and_its_batch_still_answered(captioner, photos):
    from toolkit.serve import BatchWorker, Job

    worker = BatchWorker(captioner, wait_s=0.5).start()
    try:
        jobs = [Job([ImageBytes(p.name, p.read_bytes())], ("en",), SearchConfig(beam=1)) for p in photos[:3]]
        for job in jobs:
            worker.submit(job)
        assert jobs[1].future.cancel()  # its client disconnected while the worker waited for company
        done = [jobs[0].future.result(60), jobs[2].future.result(60)]
    finally:
        worker.stop(30)
    assert [r.images[0].image for r in done] == [photos[0].name, photos[2].name] and done[0].batch_images == 2
    assert worker._queued_images == 0


def test_concurrent_clients_each_get_their_own_captions(served, photos, captioner):
    expected = {im.image: im.captions["en"].text for im in
                captioner.caption([ImageBytes(p.name, p.read_bytes()) for p in photos], ["en"], SearchConfig()).images}
    before = httpx.get(served.url + "healthz").json()["batches"]

    def one(i):
        p = photos[i % len(photos)]
        return p.name, _post(served.url, _files([p]), {"lang": "en"})

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(24)))
    for name, r in answers:
        assert r.status_code == 200 and r.json()["results"][0]["captions"]["en"]["text"] == expected[name]
    assert httpx.get(served.url + "healthz").json()["batches"] - before < 24  # some were captioned together


# -- attention packs ------------------------------------------------------------------------


def test_attention_packs_answer_a_heat_map_per_token(tiny_dataset, tmp_path_factory, photos):
    from conftest import build_tiny_pack

    from toolkit.captioner import Captioner
    from toolkit.serve import ServeConfig

    packs = tmp_path_factory.mktemp("attention_packs")
    build_tiny_pack("en", tiny_dataset, packs, decoder={"architecture": "attention"}, train={"epochs": 1})
    run = Running(Captioner(packs, ["en"], feature_cache=False).load(), ServeConfig())
    try:
        assert httpx.get(run.url + "v1/packs").json()["packs"][0]["decoder"] == "attention"
        plain = _post(run.url, _files(photos[:2]))
        heat = _post(run.url, _files(photos[:2]), {"attention": "true"})
    finally:
        run.stop()
    assert plain.status_code == heat.status_code == 200
    for a, b in zip(plain.json()["results"], heat.json()["results"]):
        assert "attention" not in a["captions"]["en"] and a["captions"]["en"]["text"] == b["captions"]["en"]["text"]
        strip = b["captions"]["en"]["attention"]
        assert strip["grid"] == 3 and 1 <= len(strip["tokens"]) <= strip["n_tokens"]
        assert all(t["image"].startswith("data:image/jpeg;base64,") and 0 < t["peak"] <= 1 for t in strip["tokens"])


# -- the command ---------------------------------------------------------------------------


def test_help_imports_neither_tensorflow_nor_the_web_stack():
    code = ("import sys, runpy; sys.argv = ['capkit', 'serve', '--help']\n"
            "try: runpy.run_module('toolkit', run_name='__main__')\n"
            "except SystemExit: pass\n"
            "print('LOADED', [m for m in ('tensorflow', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "--max-upload-mb" in out.stdout and "LOADED []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]


def test_serve_command_answers_the_request_in_flight_when_stopped(tiny_packs, photos, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "serve", "--packs-dir", str(tiny_packs), "--port", "0",
                             "--lang", "zh", "--batch-wait-ms", "1500"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # printed once the packs are loaded
        m = re.search(r"serving zh at (http://127\.0\.0\.1:\d+/)", line)
        assert m, line + proc.stderr.read()[-2000:] if proc.poll() is not None else line
        url = m.group(1)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_post, url, _files(photos[:1]))
            time.sleep(0.6)  # the request now waits in the worker's 1.5 s batch window
            proc.send_signal(signal.SIGTERM)
            r = pending.result(60)
        assert r.status_code == 200 and list(r.json()["results"][0]["captions"]) == ["zh"]
        assert proc.wait(60) == 0
        err = proc.stderr.read()
        assert "stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_command_refuses_a_port_in_use_in_one_line(tiny_packs):
    from typer.testing import CliRunner

    from toolkit.cli import app
    from toolkit.errors import CapkitError

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = CliRunner().invoke(app, ["serve", "--packs-dir", str(tiny_packs), "--port", str(port)])
    assert isinstance(res.exception, CapkitError) and f"127.0.0.1:{port}" in res.exception.message
    assert "--port" in res.exception.hint


# -- the page in a real browser --------------------------------------------------------------


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium here (Debian: apt-get install -y chromium)")


def test_page_in_chromium_captions_an_uploaded_photo_in_two_languages(served, photos, tmp_path):
    browser_path = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    expected = {lang: _post(served.url, _files(photos[3:4]), {"lang": lang}).json()["results"][0]["captions"][lang]["text"]
                for lang in ("en", "zh")}
    flags = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone's screen
            problems = []
            page.on("console", lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            outside = []
            page.on("request", lambda req: outside.append(req.url) if not req.url.startswith((served.url, "blob:", "data:")) else None)
            page.goto(served.url)
            page.wait_for_selector("#langs input[value=zh]")
            assert page.locator("#langs input:checked").count() == 2
            page.set_input_files("#file", str(photos[3]))
            page.wait_for_selector("article.card[data-state=done]", timeout=60_000)
            texts = {lang: page.locator(f".caption[data-lang={lang}] .text").text_content() for lang in ("en", "zh")}
            shown = page.locator("article.card img.photo").evaluate("img => img.naturalWidth")
            wide = page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    for lang, text in texts.items():
        assert text.strip() == (expected[lang].strip() or "(empty caption)")
    assert shown > 0 and wide, "the photo shows and nothing overflows a phone's width"
    assert problems == [] and outside == []
