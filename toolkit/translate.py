"""Translation stage: captions in one language -> the same captions in another.

Back ends are deep-translator's own classes, chosen by name (`make_translator`).
`translate_captions` adds what a day-long job over a flaky free service needs:
identical captions are sent once, many captions go in one request, finished
batches land in a SQLite cache at once (a re-run or a resumed run sends only
what is missing), transient failures are retried with back-off, and the
captions that still fail are named rather than dropped.

    >>> out, report = translate_captions(captions, source="en", target="de",
    ...     translator="google", cache_path=Path("translations.sqlite"))
    >>> report.n_requests, report.failed
    (412, [])
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import random
import re
import sqlite3
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from toolkit.errors import CapkitError

if TYPE_CHECKING:
    from toolkit.data import Caption

TRANSLATORS = ("google", "mymemory", "libre", "deepl", "microsoft", "identity")
KEY_ENV = {"libre": "LIBRE_API_KEY", "deepl": "DEEPL_API_KEY", "microsoft": "MICROSOFT_API_KEY"}
REGION_ENV = "MICROSOFT_REGION"  # Azure keys bound to a region need it on every request
CACHE_VERSION = 1  # PRAGMA user_version of the cache file
REPORT_FORMAT = "capkit-translation-report"
REPORT_VERSION = 1
SEPARATOR = "\n"  # joins a batch into one request; Google, LibreTranslate, DeepL keep line breaks
GIVE_UP_AFTER = 10  # batches failing in a row before a run stops sending (the service is down)
MAX_DELAY = 60.0  # seconds; cap of one back-off sleep
LENGTH_RATIO_FACTOR = 3.0  # length ratio this far from the median (either way) is an outlier
QUALITY_EXAMPLES = 5


class Translator(Protocol):
    """One translation service for one language pair.

    `translate_batch` makes exactly one request (the caller retries, paces and
    caches) and returns one output per input; a service that merges or splits
    lines may return a list of another length, which the caller checks.
    """

    name: str  # back end name; part of the cache key
    max_chars: int  # characters per request, separators included

    def translate_batch(self, texts: list[str]) -> list[str]: ...


class IdentityTranslator:
    """Returns its input: for captions already in the target language, and tests.

    >>> IdentityTranslator().translate_batch(["a dog"])
    ['a dog']
    """

    name = "identity"
    max_chars = 1_000_000

    def translate_batch(self, texts: list[str]) -> list[str]:
        return list(texts)


# --- deep-translator back ends -------------------------------------------------

@dataclass(frozen=True)
class _Backend:
    cls: str  # class in deep_translator.<name>, imported only when chosen
    max_chars: int  # below the service's own per-request limit
    languages: str | None  # table in deep_translator.constants; None: fetched by the class itself
    aliases: dict = field(default_factory=dict)  # ISO 639-1 code -> the code this back end spells


_BACKENDS = {
    "google": _Backend("GoogleTranslator", 4500, "GOOGLE_LANGUAGES_TO_CODES",
                       {"zh": "zh-CN", "he": "iw", "jv": "jw"}),
    "mymemory": _Backend("MyMemoryTranslator", 450, "MY_MEMORY_LANGUAGES_TO_CODES",
                         {"en": "en-GB", "zh": "zh-CN", "pt": "pt-PT", "ar": "ar-SA"}),
    "libre": _Backend("LibreTranslator", 2000, "LIBRE_LANGUAGES_TO_CODES"),
    "deepl": _Backend("DeeplTranslator", 4500, "DEEPL_LANGUAGE_TO_CODE"),
    "microsoft": _Backend("MicrosoftTranslator", 4500, None),
}

# Per worker thread: the timeout for the next request and the HTTP status of the last reply.
_http = threading.local()


class _TimedRequests:
    """Stands in for `requests` inside deep-translator's modules.

    deep-translator calls `requests.get/post` without a timeout, so one hung
    server would block a worker for ever; and it hides status codes behind its
    own exceptions, while a 429 (wait, retry) and a 403 (stop) need different
    handling. Everything else is the real module.
    """

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _send(self, method, *args, **kwargs):
        kwargs.setdefault("timeout", getattr(_http, "timeout", 30.0))
        response = getattr(self._real, method)(*args, **kwargs)
        _http.status = response.status_code
        return response

    def get(self, *args, **kwargs):
        return self._send("get", *args, **kwargs)

    def post(self, *args, **kwargs):
        return self._send("post", *args, **kwargs)


class _DeepTranslator:
    """A deep-translator client behind `Translator`: a batch is joined into one request."""

    def __init__(self, name: str, client, max_chars: int, timeout: float):
        self.name, self.max_chars, self.timeout = name, max_chars, timeout
        self._prototype = client
        self._local = threading.local()

    def __repr__(self) -> str:  # never show the client: it holds the API key
        return f"<{self.name} translator {self._prototype.source}->{self._prototype.target}>"

    def translate_batch(self, texts: list[str]) -> list[str]:
        # deep-translator keeps per-request state on the instance (`_url_params`),
        # so each worker thread gets a client of its own.
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = copy.deepcopy(self._prototype)
        _http.timeout = self.timeout
        out = client.translate(SEPARATOR.join(" ".join(t.splitlines()) for t in texts))
        if out is None:  # GoogleTranslator returns None on some pages it cannot parse
            from deep_translator.exceptions import TranslationNotFound

            raise TranslationNotFound(texts[0])
        if len(texts) == 1:
            return [" ".join(out.split(SEPARATOR)).strip()]
        return [piece.strip() for piece in out.strip().split(SEPARATOR)]


def _language(name: str, code: str, table: dict | None, *, is_source: bool) -> str:
    """`code` as back end `name` spells it, or CapkitError naming what it accepts."""
    if table is None or code in table.values() or code in table or (is_source and code == "auto"):
        return code
    alias = _BACKENDS[name].aliases.get(code)
    if alias is None and name == "mymemory":  # MyMemory wants a region: "de" -> "de-DE"
        regional = sorted(v for v in table.values() if v.split("-")[0] == code)
        alias = f"{code}-{code.upper()}" if f"{code}-{code.upper()}" in regional else next(iter(regional), None)
    if alias in table.values():
        return alias
    raise CapkitError(
        f"{name} does not support language code '{code}'",
        hint=f"{name} accepts: {', '.join(sorted(set(table.values()) | set(_BACKENDS[name].aliases)))}",
    )


def make_translator(spec: str, source: str, target: str, *, url: str | None = None,
                    api_key: str | None = None, timeout: float = 30.0) -> Translator:
    """A `Translator` by name; every check that needs no translation request is done here.

    `spec` is one of TRANSLATORS. `url` is LibreTranslate's server (default
    libretranslate.com, which needs a key). `api_key` falls back to KEY_ENV's
    variable; it is kept in memory only. Unknown names, unsupported language
    codes and missing keys raise CapkitError before any request (Microsoft's
    class fetches its language list from the service when built).

    >>> make_translator("google", "en", "zh").translate_batch(["a dog", "a cat"])
    ['一只狗', '一只猫']
    """
    if spec == "identity":
        return IdentityTranslator()
    if spec not in _BACKENDS:
        hint = "file:PATH is handled by translate_captions" if spec.startswith("file:") else None
        raise CapkitError(f"unknown translator '{spec}'; choose one of {', '.join(TRANSLATORS)} or file:PATH", hint)
    if url and spec != "libre":
        raise CapkitError(f"a translator URL applies to libre only, not {spec}")
    backend = _BACKENDS[spec]
    module = importlib.import_module(f"deep_translator.{spec}")
    if not isinstance(module.requests, _TimedRequests):
        module.requests = _TimedRequests(module.requests)
    from deep_translator import constants
    from deep_translator.exceptions import BaseError

    table = getattr(constants, backend.languages) if backend.languages else None
    source = _language(spec, source, table, is_source=True)
    target = _language(spec, target, table, is_source=False)
    # deep-translator reads the key variables once, at its import; read them now.
    key = api_key or os.environ.get(KEY_ENV.get(spec, ""), "") or None
    kwargs: dict = {"source": source, "target": target}
    if spec == "libre":
        kwargs.update(api_key=key or "unused", use_free_api=False)
        if url:
            kwargs["custom_url"] = url.rstrip("/").removesuffix("/translate") + "/"
    elif spec in KEY_ENV:
        if not key:
            raise CapkitError(f"{spec} needs an API key", hint=f"pass --api-key or set {KEY_ENV[spec]}")
        kwargs["api_key"] = key
        if spec == "deepl":
            kwargs["use_free_api"] = key.endswith(":fx")  # DeepL marks free-plan keys so
        if spec == "microsoft" and os.environ.get(REGION_ENV):
            kwargs["region"] = os.environ[REGION_ENV]
    _http.timeout = timeout
    try:
        client = getattr(module, backend.cls)(**kwargs)
    except BaseError as exc:
        raise CapkitError(f"{spec} rejects {source}->{target}: {exc.val} ({exc.message.splitlines()[0]})") from exc
    except Exception as exc:  # Microsoft's list of languages comes over the network
        raise CapkitError(f"could not set up {spec}: {exc}") from exc
    if spec == "libre" and not key:
        client.api_key = None  # a self-hosted server needs none, and an empty one is not sent
    return _DeepTranslator(spec, client, backend.max_chars, timeout)


# --- cache ----------------------------------------------------------------------

class TranslationCache:
    """Finished translations in SQLite, keyed by (backend, source, target, source text).

    WAL mode lets several processes share one file; every `put` commits on its
    own, so a run killed at any point keeps all it finished before.

    >>> cache = TranslationCache(tmp / "t.sqlite")
    >>> cache.put("libre", "en", "es", {"a dog": "un perro"})
    >>> cache.get("libre", "en", "es", ["a dog", "a cat"])
    {'a dog': 'un perro'}
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Switching a new file to WAL takes an exclusive lock, and SQLite answers "database is
        # locked" at once, without waiting, when another connection is doing the same: retry.
        for attempt in range(40):
            try:
                self._open()
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 39:
                    raise CapkitError(f"{self.path}: translation cache unusable ({exc})") from exc
                time.sleep(0.05 * (1 + attempt % 5))

    def _open(self) -> None:
        self._db = sqlite3.connect(self.path, timeout=60.0)  # waits out other writers
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, CACHE_VERSION):
                raise CapkitError(f"{self.path}: translation cache version {version}, this capkit reads {CACHE_VERSION}",
                                  hint="use another --cache path or a matching capkit")
            with self._db:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS translations (backend TEXT, source TEXT, target TEXT,"
                    " text TEXT, translation TEXT NOT NULL, PRIMARY KEY (backend, source, target, text))")
                self._db.execute(f"PRAGMA user_version = {CACHE_VERSION}")
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if isinstance(exc, sqlite3.OperationalError):
                raise  # busy (the caller retries) or unusable (the caller says so)
            raise CapkitError(f"{self.path}: not a translation cache ({exc})") from exc

    def get(self, backend: str, source: str, target: str, texts) -> dict[str, str]:
        """The cached translations among `texts`."""
        wanted = set(texts)
        rows = self._db.execute("SELECT text, translation FROM translations WHERE backend=? AND source=? AND target=?",
                                (backend, source, target))
        return {text: out for text, out in rows if text in wanted}

    def put(self, backend: str, source: str, target: str, translations: dict[str, str]) -> None:
        """Store and commit `translations` (source text -> translation)."""
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?)",
                                 [(backend, source, target, s, t) for s, t in translations.items()])

    def close(self) -> None:
        self._db.close()


# --- the run --------------------------------------------------------------------

@dataclass
class TranslationReport:
    """What a translation run did. Counts of texts are of unique source texts."""

    n_captions: int  # captions given
    n_unique: int  # distinct source texts among them
    n_cached: int  # distinct texts found in the cache (nothing sent)
    n_sent: int  # distinct texts translated by the back end in this run
    n_requests: int  # requests made, retries included
    failed: list[str]  # ids of captions without a translation
    quality: dict  # counts "empty", "identical" (to the source), "ratio_outliers", and "examples" of each
    translator: str = ""  # back end name, or file:PATH
    source: str = ""
    target: str = ""
    stopped: str = ""  # why the run stopped sending early, if it did


class _Failure(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind  # "fatal" (stop the run), "permanent" (these texts) or "transient" (retry)


def _classify(exc: BaseException) -> str:
    from deep_translator import exceptions as dt

    status = getattr(exc, "status_code", None) or getattr(_http, "status", None)
    if isinstance(exc, (dt.ApiKeyException, dt.AuthorizationException)) or status in (401, 403):
        return "fatal"
    if isinstance(exc, dt.TooManyRequests) or status == 429 or (status or 0) >= 500:
        return "transient"
    if isinstance(exc, (dt.NotValidLength, dt.NotValidPayload, dt.TranslationNotFound)) or (
            status and 400 <= status < 500 and status != 408):
        return "permanent"
    return "transient"  # time-outs, dropped connections, garbled replies


def _describe(exc: BaseException) -> str:
    """A one-line reason for a report, without the API key (that some URLs and messages carry)."""
    if type(exc).__name__ == "AuthorizationException":  # its message quotes the key
        text = "the API key was refused"
    else:  # requests quotes the URL, whose query may hold api_key or auth_key
        text = re.sub(r"\?\S*", "?...", str(exc)) or type(exc).__name__
    status = getattr(_http, "status", None)
    return f"HTTP {status}: {text}" if status else text


class _RateLimiter:
    """At most `per_second` request starts per second, across threads."""

    def __init__(self, per_second: float | None):
        self.interval = 1.0 / per_second if per_second else 0.0
        self.next = 0.0
        self.lock = threading.Lock()

    def wait(self, stop: threading.Event) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            at = self.next = max(now, self.next)
            self.next += self.interval
        if at > now:
            stop.wait(at - now)


class _Run:
    """Worker side: sends batches with retries; called from the thread pool."""

    def __init__(self, backend: Translator, *, max_retries: int, retry_delay: float, rate_limit: float | None):
        self.backend, self.max_retries, self.retry_delay = backend, max_retries, retry_delay
        self.limiter = _RateLimiter(rate_limit)
        self.stop = threading.Event()
        self.stopped = ""
        self.requests = 0
        self.lock = threading.Lock()

    def call(self, texts: list[str]) -> list[str]:
        for attempt in range(self.max_retries + 1):
            self.limiter.wait(self.stop)
            if self.stop.is_set():
                raise _Failure("transient", f"not sent: {self.stopped or 'run interrupted'}")
            with self.lock:
                self.requests += 1
            _http.status = None
            try:
                return self.backend.translate_batch(texts)
            except Exception as exc:
                kind = _classify(exc)
                if kind == "fatal":  # every other request would be refused too
                    self.stop.set()
                if kind != "transient" or attempt == self.max_retries:
                    raise _Failure(kind, _describe(exc)) from exc
            # Exponential back-off; the jitter keeps the threads from retrying in step.
            delay = min(MAX_DELAY, self.retry_delay * 2 ** attempt)
            self.stop.wait(delay * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")

    def batch(self, texts: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """(translations, failures: text -> reason) for one batch."""
        try:
            out = self.call(texts)
            if len(out) == len(texts):
                return dict(zip(texts, out)), {}
            # The service merged or split lines: one by one rather than mis-assign.
        except _Failure as failure:
            if failure.kind == "fatal":
                raise
            # A service that is down would only get more requests from splitting;
            # a permanent refusal (too long, say) may be one caption's fault.
            if failure.kind == "transient" or len(texts) == 1:
                return {}, dict.fromkeys(texts, str(failure))
        done, failed = {}, {}
        for text in texts:
            try:
                out = self.call([text])
                if len(out) != 1:
                    raise _Failure("permanent", f"{len(out)} outputs for one text")
                done[text] = out[0]
            except _Failure as failure:
                if failure.kind == "fatal":
                    raise
                failed[text] = str(failure)
        return done, failed


def _batches(texts: list[str], max_chars: int) -> list[list[str]]:
    """Consecutive texts packed into requests of at most `max_chars` (a longer text goes alone).

    >>> _batches(["ab", "cd", "efg"], 5)
    [['ab', 'cd'], ['efg']]
    """
    out: list[list[str]] = []
    size = 0
    for text in texts:
        if out and size + len(SEPARATOR) + len(text) <= max_chars:
            out[-1].append(text)
            size += len(SEPARATOR) + len(text)
        else:
            out.append([text])
            size = len(text)
    return out


def translate_captions(
    captions: list[Caption], *, source: str, target: str, translator: str, cache_path: Path,
    url: str | None = None, api_key: str | None = None, timeout: float = 30.0,
    concurrency: int = 4, rate_limit: float | None = None, max_retries: int = 5,
    allow_partial: bool = False, progress: Callable[[dict], None] | None = None,
    retry_delay: float = 1.0, max_chars: int | None = None,
) -> tuple[list[Caption], TranslationReport]:
    """Translate captions; return them (same order, same image/index/line) and a report.

    `translator` is a name from TRANSLATORS or ``file:PATH`` (translations read
    with `read_captions` and matched by caption id). `concurrency` requests run
    at once, at most `rate_limit` start per second; transient failures are
    retried `max_retries` times after `retry_delay` * 2**attempt seconds
    (jittered). `max_chars` lowers the back end's request size. `progress`
    gets ``dict(done, total, cached, sent, failed, requests)`` counted in
    unique texts.

    Captions that fail are left out of the result and listed in
    `report.failed`; unless `allow_partial`, they raise CapkitError (carrying
    the report as `.report`) after everything finished is cached.

    >>> out, report = translate_captions([Caption("a.jpg", 0, "a dog")], source="en",
    ...     target="es", translator="libre", url="http://localhost:5000", cache_path=cache)
    >>> out[0].text, report.n_requests
    ('un perro', 1)
    """
    if concurrency < 1 or max_retries < 0 or (rate_limit is not None and rate_limit <= 0):
        raise CapkitError("concurrency must be >= 1, retries >= 0 and the rate limit > 0")
    unique = list(dict.fromkeys(c.text for c in captions))
    report = TranslationReport(len(captions), len(unique), 0, 0, 0, [], {}, translator, source, target)

    def tell(done, cached=0, sent=0, failed=0, requests=0):
        if progress:
            progress(dict(done=done, total=len(unique), cached=cached, sent=sent, failed=failed, requests=requests))

    sent = False
    if translator.startswith("file:"):
        translations = _from_file(Path(translator[len("file:"):]), captions)
    else:
        backend = make_translator(translator, source, target, url=url, api_key=api_key, timeout=timeout)
        sent = not isinstance(backend, IdentityTranslator) and source != target
        if sent:
            by_text = _send(unique, backend, report, cache_path=cache_path, source=source, target=target,
                            concurrency=concurrency, max_retries=max_retries, retry_delay=retry_delay,
                            rate_limit=rate_limit, max_chars=max_chars or backend.max_chars, tell=tell)
            translations = {c.id: by_text[c.text] for c in captions if c.text in by_text}
        else:
            translations = {c.id: c.text for c in captions}
    out = [replace(c, text=translations[c.id]) for c in captions if c.id in translations]
    report.failed = [c.id for c in captions if c.id not in translations]
    if not sent:
        tell(len(unique), failed=len({c.text for c in captions if c.id not in translations}))
    if sent or translator.startswith("file:"):
        report.quality = _quality([(c.id, c.text, translations[c.id]) for c in captions if c.id in translations])
    if report.failed and not allow_partial:
        err = CapkitError(
            f"{len(report.failed)} of {len(captions)} captions have no translation"
            f" (e.g. {', '.join(report.failed[:3])}){'; ' + report.stopped if report.stopped else ''}",
            hint="re-run to retry them (finished translations are cached), or allow a partial result")
        err.report = report
        raise err
    return out, report


def _from_file(path: Path, captions: list[Caption]) -> dict[str, str]:
    from toolkit.data import read_captions

    found: dict[str, str] = {}
    for c in read_captions(path).captions:
        found.setdefault(c.id, c.text)  # a repeated id is in the file's problems; the first one wins
    return {c.id: found[c.id] for c in captions if c.id in found}


def _send(unique, backend: Translator, report: TranslationReport, *, cache_path, source, target,
          concurrency, max_retries, retry_delay, rate_limit, max_chars, tell) -> dict[str, str]:
    """Cache lookup, then the rest through `backend`; fills the report's counts."""
    cache = TranslationCache(cache_path)
    try:
        done = cache.get(backend.name, source, target, unique)
        for text in unique:
            if not text.strip():  # nothing to ask a service about
                done.setdefault(text, text)
        report.n_cached = len(done)
        failed: dict[str, str] = {}
        tell(len(done), cached=len(done))
        run = _Run(backend, max_retries=max_retries, retry_delay=retry_delay, rate_limit=rate_limit)
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="capkit-translate")
        futures = [pool.submit(run.batch, b) for b in _batches([t for t in unique if t not in done], max_chars)]
        absorbed: set = set()
        streak = 0
        try:
            for future in as_completed(futures):
                try:
                    ok, bad = future.result()
                except _Failure as failure:  # fatal: a bad key, say; every batch would fail the same way
                    raise CapkitError(f"{backend.name} refused the request: {failure}",
                                      hint="check the API key and the translator URL") from failure
                cache.put(backend.name, source, target, ok)
                absorbed.add(future)
                done.update(ok)
                failed.update(bad)
                report.n_sent += len(ok)
                streak = 0 if ok or not bad else streak + 1
                if streak >= GIVE_UP_AFTER and not run.stop.is_set():
                    run.stopped = (f"stopped after {streak} batches failed in a row"
                                   f" (last: {next(iter(bad.values()))})")
                    run.stop.set()
                tell(len(done) + len(failed), cached=report.n_cached, sent=report.n_sent,
                     failed=len(failed), requests=run.requests)
        except BaseException:
            # Ctrl-C, a fatal error or a raising progress callback: stop the workers,
            # then keep what they finished meanwhile.
            run.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for future in futures:
                if future not in absorbed and future.done() and not future.cancelled() and not future.exception():
                    cache.put(backend.name, source, target, future.result()[0])
            raise
        finally:
            report.n_requests = run.requests
            report.stopped = run.stopped
        pool.shutdown()
        return done
    finally:
        cache.close()


# --- quality report ---------------------------------------------------------------

def _quality(rows: list[tuple[str, str, str]]) -> dict:
    """Suspect translations among (id, source, translation) rows: counts, then examples.

    Length ratios are compared on a log scale to their median, since the
    normal ratio depends on the languages (Chinese runs about a third of English).

    >>> _quality([("a.jpg#0", "a dog", ""), ("a.jpg#1", "ok", "ok")])["empty"]
    1
    """
    empty = [r for r in rows if r[1].strip() and not r[2].strip()]
    identical = [r for r in rows if r[2].strip() and r[1].strip().casefold() == r[2].strip().casefold()]
    logs = [(math.log(len(t.strip()) / len(s.strip())), (i, s, t)) for i, s, t in rows if s.strip() and t.strip()]
    median = statistics.median(lr for lr, _ in logs) if logs else 0.0
    limit = math.log(LENGTH_RATIO_FACTOR)
    outliers = [r for lr, r in sorted(logs, key=lambda x: -abs(x[0] - median)) if abs(lr - median) > limit]
    found = {"empty": empty, "identical": identical, "ratio_outliers": outliers}
    return {
        "checked": len(rows),
        **{name: len(hits) for name, hits in found.items()},
        "length_ratio": {"median": round(math.exp(median), 3),
                         "bounds": [round(math.exp(median - limit), 3), round(math.exp(median + limit), 3)]},
        "examples": {name: [dict(id=i, source=s, translation=t) for i, s, t in hits[:QUALITY_EXAMPLES]]
                     for name, hits in found.items()},
    }


def write_quality_report(path: Path, report: TranslationReport) -> None:
    """Write `report` as versioned JSON, atomically (a reader never sees half a file).

    >>> write_quality_report(Path("captions.es.quality.json"), report)
    """
    path = Path(path)
    data = {"format": REPORT_FORMAT, "version": REPORT_VERSION, **asdict(report)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_quality_report(path: Path) -> TranslationReport:
    """Inverse of `write_quality_report`; CapkitError on another format or version."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CapkitError(f"{path}: cannot read translation report ({exc})") from exc
    if not isinstance(data, dict) or data.pop("format", None) != REPORT_FORMAT or data.pop("version", None) != REPORT_VERSION:
        raise CapkitError(f"{path}: not a {REPORT_FORMAT} version {REPORT_VERSION}")
    return TranslationReport(**data)
