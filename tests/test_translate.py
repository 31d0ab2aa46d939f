"""Translation stage, driven through deep-translator's real LibreTranslator against a
local LibreTranslate look-alike (tests/libre_server.py): nothing reaches the internet."""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path

import pytest
from libre_server import LibreServer, translate_line

from toolkit.data import Caption, read_captions
from toolkit.errors import CapkitError
from toolkit.translate import (
    TranslationCache,
    TranslationReport,
    make_translator,
    read_quality_report,
    translate_captions,
    write_quality_report,
)

SUBJECTS = ["a dog", "a cat", "the man", "a woman", "the child", "a black dog", "a white cat", "a red ball"]
VERBS = ["runs", "sits", "jumps"]
PLACES = ["on the grass", "on the beach", "in the street", "with a ball", "and a cat"]
TEXTS = [f"{s} {v} {p} ." for s in SUBJECTS for v in VERBS for p in PLACES]  # 120 distinct


def captions(n_images: int = 60, per_image: int = 5) -> list[Caption]:
    """Flickr-like captions: 300 by default, 120 distinct texts, many repeated."""
    return [Caption(f"{i:04d}.jpg", k, TEXTS[(i * 7 + k * 31) % len(TEXTS)], line=i * per_image + k + 1)
            for i in range(n_images) for k in range(per_image)]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    # A proxy in the environment must not swallow requests to 127.0.0.1, and no real key may leak in.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for var in ("LIBRE_API_KEY", "DEEPL_API_KEY", "MICROSOFT_API_KEY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    with LibreServer() as s:
        yield s


def run(server, tmp_path, caps=None, **kw):
    kw = {"source": "en", "target": "es", "translator": "libre", "url": server.url,
          "cache_path": tmp_path / "cache.sqlite", "timeout": 0.3, "retry_delay": 0.001,
          "concurrency": 2, **kw}
    return translate_captions(captions() if caps is None else caps, **kw)


def assert_translated(caps, out):
    """Every caption came back, in order, keyed as before, with its own translation."""
    assert [(c.image, c.index, c.line) for c in out] == [(c.image, c.index, c.line) for c in caps]
    assert [c.text for c in out] == [translate_line(c.text) for c in caps]


def sent_lines(server, start=0) -> list[str]:
    return [line for q in server.received[start:] for line in q.split("\n")]


def test_identical_captions_are_sent_once_in_few_requests(server, tmp_path):
    caps = captions()
    out, report = run(server, tmp_path, caps, max_chars=600)
    assert_translated(caps, out)
    assert (report.n_captions, report.n_unique, report.n_sent, report.n_cached) == (300, 120, 120, 0)
    assert sorted(sent_lines(server)) == sorted(set(c.text for c in caps))  # each text once
    assert report.n_requests == server.requests <= len(caps) / 20  # 300 captions, ~10 requests
    assert report.failed == [] and report.stopped == ""


def test_second_run_sends_nothing(server, tmp_path):
    first, _ = run(server, tmp_path)
    before = server.requests
    second, report = run(server, tmp_path)
    assert second == first
    assert (report.n_requests, report.n_cached, report.n_sent) == (0, 120, 0)
    assert server.requests == before


def test_cache_is_keyed_by_backend_and_languages(tmp_path):
    cache = TranslationCache(tmp_path / "c.sqlite")
    cache.put("libre", "en", "es", {"a dog": "un perro"})
    assert cache.get("libre", "en", "es", ["a dog", "a cat"]) == {"a dog": "un perro"}
    assert cache.get("libre", "en", "fr", ["a dog"]) == {} == cache.get("google", "en", "es", ["a dog"])
    cache.close()
    reopened = TranslationCache(tmp_path / "c.sqlite")  # another process would see the same
    assert reopened.get("libre", "en", "es", ["a dog"]) == {"a dog": "un perro"}
    reopened.close()


def test_cache_is_shared_by_concurrent_writers(tmp_path):
    import threading

    def write(worker):  # a connection each, as separate processes would have
        cache = TranslationCache(tmp_path / "shared.sqlite")
        for i in range(40):
            cache.put("libre", "en", "es", {f"text {worker} {i}": f"texto {worker} {i}"})
        cache.close()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cache = TranslationCache(tmp_path / "shared.sqlite")
    assert len(cache.get("libre", "en", "es", [f"text {w} {i}" for w in range(4) for i in range(40)])) == 160
    cache.close()


def test_cache_of_another_version_or_not_a_cache_is_refused(tmp_path):
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(CapkitError, match="version 99"):
        TranslationCache(newer)
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all, just some text that is long enough " * 20)
    with pytest.raises(CapkitError, match="not a translation cache"):
        TranslationCache(junk)


@pytest.mark.parametrize("fault", ["429", "500", "hang", "drop"])
def test_transient_faults_are_retried_and_nothing_is_lost(server, tmp_path, fault):
    server.fail(fault, times=3)
    caps = captions()
    out, report = run(server, tmp_path, caps, max_chars=600)
    assert_translated(caps, out)
    assert report.failed == []
    assert report.n_requests == server.requests == len(set(server.received)) + 3  # each fault cost one retry


def test_reply_with_wrong_number_of_lines_is_retried_one_by_one(server, tmp_path):
    server.fail("lines", times=None)  # every multi-line reply merges two lines
    caps = captions(n_images=12)
    out, report = run(server, tmp_path, caps, max_chars=300)
    assert_translated(caps, out)  # nothing mis-assigned
    n_batches = sum("\n" in q for q in server.received)
    assert report.n_requests == server.requests == n_batches + report.n_unique


def test_persistent_failure_is_reported_and_successes_are_kept(server, tmp_path):
    # First batch fails twice (no retries left), the others succeed.
    server.fail("500", times=2)
    caps = captions()
    with pytest.raises(CapkitError, match=r"captions have no translation \(e\.g\. 0000\.jpg#0") as err:
        run(server, tmp_path, caps, concurrency=1, max_retries=1, max_chars=600)
    report: TranslationReport = err.value.report
    lost = {c.text for c in caps if c.id in set(report.failed)}
    assert lost and len(lost) < report.n_unique and report.n_sent == report.n_unique - len(lost)

    # Allowed partial: the failed captions are left out, never passed through untranslated.
    server.fail("500", times=None)
    out, partial = run(server, tmp_path, caps, allow_partial=True, max_retries=0, max_chars=600)
    assert partial.failed == report.failed and partial.n_cached == report.n_unique - len(lost)
    assert [c.id for c in out] == [c.id for c in caps if c.text not in lost]

    server.heal()  # the service is back: only the lost texts are sent
    start = server.requests
    out, final = run(server, tmp_path, caps, max_chars=600)
    assert_translated(caps, out)
    assert sorted(sent_lines(server, start)) == sorted(lost) and final.n_sent == len(lost)


def test_service_down_stops_the_run_early(server, tmp_path):
    server.fail("500", times=None)
    caps = captions(n_images=200)
    with pytest.raises(CapkitError, match="stopped after 10 batches failed in a row") as err:
        run(server, tmp_path, caps, concurrency=1, max_retries=0, max_chars=100)
    report = err.value.report
    assert server.requests < report.n_unique / 2  # most batches were never sent
    assert len(report.failed) == len(caps)


def test_interrupted_run_resumes_with_only_the_missing_captions(server, tmp_path):
    server.delay = 0.03  # slow enough that the workers cannot finish everything first
    caps = captions()
    calls = []

    def interrupt_after_two_batches(p):
        calls.append(p)
        if len(calls) == 3:  # the first call reports the cache lookup
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(server, tmp_path, caps, max_chars=100, progress=interrupt_after_two_batches)
    first_run = server.requests
    with sqlite3.connect(tmp_path / "cache.sqlite") as db:
        cached = {text for (text,) in db.execute("SELECT text FROM translations")}
    assert 0 < len(cached) < 120

    out, report = run(server, tmp_path, caps, max_chars=100)
    assert_translated(caps, out)
    resent = sent_lines(server, first_run)
    assert sorted(resent) == sorted({c.text for c in caps} - cached)  # only the missing, each once
    assert report.n_cached == len(cached)


def test_progress_counts(server, tmp_path):
    seen = []
    run(server, tmp_path, max_chars=600, progress=seen.append)
    assert seen[0] == dict(done=0, total=120, cached=0, sent=0, failed=0, requests=0)
    assert seen[-1]["done"] == seen[-1]["sent"] == 120 and seen[-1]["requests"] == server.requests
    assert [p["done"] for p in seen] == sorted(p["done"] for p in seen)


def test_wrong_language_code_fails_before_any_request(server, tmp_path):
    with pytest.raises(CapkitError, match="libre does not support language code 'xx'"):
        run(server, tmp_path, target="xx")
    with pytest.raises(CapkitError, match="unknown translator 'babelfish'"):
        run(server, tmp_path, translator="babelfish")
    assert server.requests == 0
    assert not (tmp_path / "cache.sqlite").exists()


def test_back_ends_are_checked_without_the_network(monkeypatch):
    assert make_translator("google", "en", "zh").name == "google"  # ISO "zh" is Google's "zh-CN"
    with pytest.raises(CapkitError, match="DEEPL_API_KEY"):
        make_translator("deepl", "en", "de")
    with pytest.raises(CapkitError, match="google does not support language code 'qq'"):
        make_translator("google", "en", "qq")
    assert make_translator("identity", "en", "xx").translate_batch(["a dog"]) == ["a dog"]


def test_api_key_comes_from_the_environment_and_is_never_written(tmp_path, monkeypatch):
    with LibreServer(api_key="s3cret-key") as server:
        with pytest.raises(CapkitError, match="refused the request: HTTP 403") as err:
            run(server, tmp_path, api_key="wrong-key")
        assert "wrong-key" not in str(err.value)
        assert server.requests <= 2  # a bad key stops the run at once: no retries, one request per worker at most

        monkeypatch.setenv("LIBRE_API_KEY", "s3cret-key")
        out, report = run(server, tmp_path)
        assert report.failed == []
        write_quality_report(tmp_path / "report.json", report)

    with socket.socket() as sock:  # a port nobody listens on: the error quotes the URL, query and all
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    with pytest.raises(CapkitError, match="stopped after") as err:
        run(server, tmp_path, url=closed, cache_path=tmp_path / "c2", concurrency=1, max_retries=0, max_chars=100)
    assert "s3cret" not in str(err.value)
    write_quality_report(tmp_path / "failed.json", err.value.report)
    for path in tmp_path.iterdir():
        assert b"s3cret" not in path.read_bytes(), path


def test_concurrency_is_bounded_and_rate_is_capped(tmp_path):
    import time

    with LibreServer(delay=0.05) as server:
        # a time-out long enough that no request is retried while its first try is still being served
        run(server, tmp_path, captions(n_images=6), concurrency=2, max_chars=60, timeout=10)
        assert server.max_inflight == 2
    with LibreServer() as server:
        start = time.monotonic()
        _, report = run(server, tmp_path, captions(n_images=2), rate_limit=50, max_chars=30, cache_path=tmp_path / "r")
        assert report.n_requests >= 8 and time.monotonic() - start >= (report.n_requests - 1) / 50


def test_quality_report_flags_empty_identical_and_odd_lengths(server, tmp_path):
    texts = ["a dog runs .", "um", "ok", "hippopotamuses hippopotamuses hippopotamuses", "a cat sits ."]
    caps = [Caption("q.jpg", i, t) for i, t in enumerate(texts)]
    out, report = run(server, tmp_path, caps)
    q = report.quality
    assert (q["checked"], q["empty"], q["identical"]) == (5, 1, 1) and q["ratio_outliers"] >= 1
    assert [e["id"] for e in q["examples"]["empty"]] == ["q.jpg#1"]
    assert [e["id"] for e in q["examples"]["identical"]] == ["q.jpg#2"]
    assert q["examples"]["ratio_outliers"][0] == dict(id="q.jpg#3", source=texts[3], translation="h h h")

    path = tmp_path / "quality.json"
    write_quality_report(path, report)
    assert read_quality_report(path) == report
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    path.write_text('{"format": "something else"}')
    with pytest.raises(CapkitError):
        read_quality_report(path)


def test_identity_and_same_language_send_nothing(server, tmp_path):
    caps = captions(n_images=3)
    out, report = run(server, tmp_path, caps, translator="identity")
    assert out == caps and report.n_requests == 0 and report.quality == {}
    out, report = run(server, tmp_path, caps, target="en")
    assert out == caps and server.requests == 0


def test_file_translations_align_by_caption_id(tmp_path):
    caps = captions(n_images=3)  # 15 captions
    lines = [f"{c.image}#zhg#{c.index} 译文{c.image}{c.index}" for c in reversed(caps) if c.id != "0001.jpg#2"]
    lines.append("9999.jpg#zhg#0 一个额外的")  # ids the source lacks are ignored
    path = tmp_path / "zh.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(CapkitError, match="1 of 15 captions have no translation .e.g. 0001.jpg#2"):
        translate_captions(caps, source="en", target="zh", translator=f"file:{path}", cache_path=tmp_path / "c")
    out, report = translate_captions(caps, source="en", target="zh", translator=f"file:{path}",
                                     cache_path=tmp_path / "c", allow_partial=True)
    assert report.failed == ["0001.jpg#2"] and report.n_requests == 0
    assert [(c.id, c.line, c.text) for c in out] == [
        (c.id, c.line, f"译文{c.image}{c.index}") for c in caps if c.id != "0001.jpg#2"]


@pytest.mark.realdata
def test_file_translations_of_flickr8k_cn(shared_data, tmp_path):
    english, chinese = shared_data / "flickr8k/Flickr8k.token.txt", shared_data / "flickr8k-cn/flickr8kzhg.caption.txt"
    if not (english.exists() and chinese.exists()):
        pytest.skip("Flickr8k or Flickr8k-CN captions absent")
    caps = read_captions(english).captions
    out, report = translate_captions(caps, source="en", target="zh", translator=f"file:{chinese}",
                                     cache_path=tmp_path / "c")
    assert report.failed == [] and len(out) == len(caps) == 40460
    first = chinese.read_text(encoding="utf-8").splitlines()[0]
    assert out[0].id == "1000268201_693b08cb0e.jpg#0" and out[0].text == first.split(" ", 1)[1].strip()
    assert report.quality["empty"] == 0
    assert report.quality["ratio_outliers"] < len(caps) / 100  # rare in real output
