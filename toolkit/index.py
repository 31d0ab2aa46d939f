"""Pack indexes and downloads: find a pack by name, fetch it, install it with every check.

An index is one JSON file anyone can host on a static file server beside the
`.cappack` files it lists (`capkit packs index DIR -o DIR/index.json` writes
it). Each entry says what the archive at its URL must be, so a download is
refused, before anything is unpacked, when what arrives differs:

    {"format": "capkit-index", "format_version": 1, "packs": [
      {"lang": "zh", "name": "capkit-zh", "version": "1.2.0", "size": 7340032,
       "sha256": "9f2c...", "url": "capkit-zh-1.2.0.cappack",
       "encoder": {"id": "xception-299-dd8fa9fc31ba", "name": "xception", "image_size": 299,
                   "digest": "dd8f...", "source": "file", "included": true},
       "toolkit_version": "0.1.0", "pack_format_version": 1,
       "scores": {"test": {"bleu1": 61.2, "bleu4": 21.0, "cider_d": 47.9}}}]}

`url` is absolute (http or https) or relative to the index (a URL or a
file). There is no default index: the location is an argument or
$CAPKIT_INDEX. A download resumes with an HTTP Range request after a
dropped connection, follows redirects only within one scheme, and is checked
for size and sha256; then `toolkit.share.import_pack` makes all of its
checks and installs. A pack named in an index downloads to
`PACKS_DIR/.work/downloads/`, where a download cut for good (Ctrl-C, a full
disk, or the network gone for RETRIES tries) is kept, so the same command
resumes it; whatever else ends the install (success or refusal) removes it.
A bare URL has no size and sha256 to resume against: it downloads to a
temporary file.

    build_index("shared_packs", "shared_packs/index.json")                -> the index, written
    install("zh==1.2.0", "lang_packs", index="https://example.org/packs/index.json") -> InstallResult
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin, urlsplit

from toolkit import __version__
from toolkit.config import PACKS_DIR_HINT
from toolkit.errors import CapkitError
from toolkit.pack import FORMAT_VERSION as PACK_FORMAT_VERSION
from toolkit.pack import WORK_DIR, atomic_write_text, file_sha256, installed_packs, load_manifest
from toolkit.share import ARCHIVE_SUFFIX, DEFAULT_MAX_BYTES, ImportResult, import_pack, read_archive

INDEX_ENV = "CAPKIT_INDEX"
INDEX_FILE = "index.json"            # what `capkit packs index` writes by default, beside the archives
INDEX_FORMAT = "capkit-index"
INDEX_FORMAT_VERSION = 1
MAX_INDEX_BYTES = 8 * 2**20          # an index is a few kB per pack
MAX_REDIRECTS = 5
TIMEOUT = (10, 60)                   # seconds to connect, and between two reads
RETRIES = 5                          # tries in a row without a byte of progress before a download gives up
DOWNLOADS_DIR = "downloads"          # under the packs dir's WORK_DIR: index entries' downloads, kept when cut
_CHUNK = 1 << 16

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"          # no "/", "\\" or leading ".": never path-like
_LANG = r"^[a-z]{2,3}(-[A-Za-z0-9]+)?$"            # as in the manifest
_SPEC = re.compile(r"([a-z]{2,3}(?:-[A-Za-z0-9]+)?)(?:==([A-Za-z0-9][A-Za-z0-9._+-]*))?")
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
ENTRY_SCHEMA = {
    "type": "object",
    "required": ["lang", "name", "version", "size", "sha256", "url", "encoder", "toolkit_version",
                 "pack_format_version", "scores"],
    "properties": {
        "lang": {"type": "string", "pattern": _LANG},
        "name": {"type": "string", "pattern": _NAME},
        "version": {"type": "string", "pattern": _NAME},
        "size": {"type": "integer", "minimum": 1},
        "sha256": _HEX64,
        "url": {"type": "string", "minLength": 1},
        "encoder": {
            "type": "object",
            "required": ["id", "name", "image_size", "digest", "source", "included"],
            "properties": {"id": {"type": "string", "pattern": _NAME}, "digest": _HEX64,
                           "image_size": {"type": "integer"}, "included": {"type": "boolean"}},
        },
        "toolkit_version": {"type": "string"},
        "pack_format_version": {"type": "integer"},
        "scores": {"type": "object", "additionalProperties": {"type": "object"}},
    },
}
INDEX_SCHEMA = {
    "type": "object",
    "required": ["format", "format_version", "packs"],
    "properties": {
        "format": {"const": INDEX_FORMAT},
        "format_version": {"type": "integer"},
        "packs": {"type": "array", "items": ENTRY_SCHEMA},
    },
}


@dataclass
class Index:
    """A loaded, checked index and where it came from (relative URLs resolve against `location`)."""

    data: dict
    location: str          # the URL or file path it was read from

    @property
    def packs(self) -> list[dict]:
        return self.data["packs"]


@dataclass
class InstallResult:
    imported: ImportResult     # what the import did (action, versions, warnings, encoder)
    source: str                # the file, URL or index URL the archive came from
    entry: dict | None         # the index entry, when installed by name


def index_location(override: str | None = None) -> str:
    """Where the index is: `override`, else $CAPKIT_INDEX; capkit has no default to phone home to."""
    where = override or os.environ.get(INDEX_ENV)
    if not where:
        raise CapkitError("no pack index given", hint=f"pass --index URL|FILE or set {INDEX_ENV}")
    return where


# -- writing and reading an index ---------------------------------------------------

def build_index(folder: Path, out: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Check every `.cappack` in `folder` and write the index of them to `out` (default: folder/index.json).

    URLs are written relative to `out`'s folder, so the folder can be served
    as it is from any address. Returns the index written.
    """
    folder = Path(folder)
    out = Path(out) if out else folder / INDEX_FILE
    archives = sorted(folder.glob(f"*{ARCHIVE_SUFFIX}"))
    if not archives:
        raise CapkitError(f"{folder}: no {ARCHIVE_SUFFIX} files", hint="write some with `capkit packs export LANG -o DIR`")
    packs = []
    for path in archives:
        manifest, carried = read_archive(path, max_bytes)
        packs.append(_entry(path, manifest, carried, os.path.relpath(path.resolve(), out.resolve().parent)))
    data = {"format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "packs": packs}
    validate_index(data, str(out))
    atomic_write_text(out, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return data


def _entry(path: Path, manifest: dict, carried: dict | None, url: str) -> dict:
    scores = {split: {k: systems["model"][k] for k in ("bleu1", "bleu4", "cider_d") if k in systems.get("model", {})}
              for split, systems in manifest["scores"].items()}
    return {
        "lang": manifest["lang"], "name": manifest["name"], "version": manifest["pack_version"],
        "size": path.stat().st_size, "sha256": file_sha256(path), "url": Path(url).as_posix(),
        "encoder": {**{k: manifest["encoder"][k] for k in ("id", "name", "image_size", "digest", "source")},
                    "included": carried is not None},
        "toolkit_version": manifest["toolkit_version"], "pack_format_version": manifest["format_version"],
        "scores": scores,
    }


def validate_index(data, where: str) -> dict:
    """The index `data`, or CapkitError naming what is wrong: format version, schema, duplicates, URLs."""
    import jsonschema

    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version != INDEX_FORMAT_VERSION:
        newer = version > INDEX_FORMAT_VERSION
        raise CapkitError(f"{where}: index format version {version} ({'newer' if newer else 'older'}); "
                          f"this toolkit reads version {INDEX_FORMAT_VERSION}",
                          hint="upgrade capkit" if newer else "rewrite it with `capkit packs index`")
    try:
        jsonschema.validate(data, INDEX_SCHEMA)
    except jsonschema.ValidationError as e:
        field = "/".join(map(str, e.absolute_path)) or "(top level)"
        raise CapkitError(f"{where}: invalid index at {field}: {e.message}; refused") from None
    seen = set()
    for i, entry in enumerate(data["packs"]):
        key = (entry["lang"], entry["version"])
        if key in seen:
            raise CapkitError(f"{where}: {entry['lang']} {entry['version']} is listed twice; refused")
        seen.add(key)
        _check_entry_url(entry["url"], f"{where}: packs/{i}/url")
    return data


def _check_entry_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme:
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CapkitError(f"{where}: {url!r} is not an http or https URL; refused")
    # A relative URL may point anywhere on the index's server (or disk): what it names is checked on arrival.


def load_index(location: str) -> Index:
    """The index at `location` (an http(s) URL or a file), checked."""
    if _is_url(location):
        with tempfile.TemporaryDirectory(prefix="capkit-index-") as tmp:
            dest = Path(tmp) / INDEX_FILE
            download(location, dest, max_bytes=MAX_INDEX_BYTES)
            raw = dest.read_bytes()
    else:
        try:
            if Path(location).stat().st_size > MAX_INDEX_BYTES:
                raise CapkitError(f"{location}: over {MAX_INDEX_BYTES // 2**20} MiB; not an index")
            raw = Path(location).read_bytes()
        except FileNotFoundError:
            raise CapkitError(f"{location}: no such index file", hint=f"pass --index URL|FILE or set {INDEX_ENV}") from None
        except OSError as e:
            raise CapkitError(f"{location}: cannot read the index ({e.strerror or e})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CapkitError(f"{location}: not a pack index ({e})", hint="an index is the JSON `capkit packs index` writes") from None
    return Index(validate_index(data, location), location)


def resolve(index: Index, spec: str) -> dict:
    """The entry `spec` names: "zh" is the newest zh pack, "zh==1.2.0" that version.

        resolve(index, "zh") -> {"lang": "zh", "version": "1.2.0", ...}
    """
    m = _SPEC.fullmatch(spec)
    if not m:
        raise CapkitError(f"{spec!r} is not a pack name", hint="a name is LANG or LANG==VERSION, e.g. zh or zh==1.2.0")
    lang, version = m.groups()
    offered = [e for e in index.packs if e["lang"] == lang]
    if not offered:
        langs = sorted({e["lang"] for e in index.packs})
        raise CapkitError(f"{index.location} offers no {lang} pack", hint=f"it offers: {', '.join(langs) or 'nothing'}")
    if version is None:
        return max(offered, key=lambda e: version_key(e["version"]))
    for entry in offered:
        if entry["version"] == version:
            return entry
    have = ", ".join(e["version"] for e in sorted(offered, key=lambda e: version_key(e["version"])))
    raise CapkitError(f"{index.location} offers no {lang} {version}", hint=f"{lang} versions there: {have}")


def version_key(version: str):
    """Sort key of a version: PEP 440 order (1.10 after 1.9), versions it cannot read first, by text."""
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(version), "")
    except InvalidVersion:
        return (0, Version("0"), version)


def entry_location(index: Index, entry: dict) -> str:
    """The absolute URL or file path of an entry's archive."""
    url = entry["url"]
    if urlsplit(url).scheme:
        return url
    if _is_url(index.location):
        return urljoin(index.location, url)
    return str(Path(index.location).parent / url)


def available(index: Index, packs_dir: Path) -> list[dict]:
    """What `index` offers beside what `packs_dir` holds, newest first per language.

    Each row is the entry plus "installed" (the installed version or None),
    "status" ("newer", "installed", "older" or "", relative to the installed
    one) and "needs" (a newer capkit this entry needs, or None).
    """
    have = {}
    for lang, folder in installed_packs(Path(packs_dir)).items():
        try:
            have[lang] = load_manifest(folder)["pack_version"]
        except CapkitError:
            have[lang] = None  # broken: anything offered is an improvement, shown without a comparison
    rows = []
    for entry in sorted(index.packs, key=lambda e: (e["lang"], version_key(e["version"])), reverse=True):
        installed = have.get(entry["lang"])
        status = ""
        if installed is not None:
            a, b = version_key(entry["version"]), version_key(installed)
            status = "newer" if a > b else "older" if a < b else "installed"
        rows.append({**entry, "installed": installed, "status": status, "needs": _needs(entry)})
    return sorted(rows, key=lambda r: r["lang"])


def _needs(entry: dict) -> str | None:
    """A capkit version newer than this one that the entry asks for, or None."""
    if version_key(entry["toolkit_version"]) > version_key(__version__):
        return entry["toolkit_version"]
    return None


# -- installing -----------------------------------------------------------------------

def install(
    source: str,
    packs_dir: Path,
    *,
    index: str | None = None,
    force: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    encoder_weights: str | None = None,
    report: Callable[..., None] | None = None,
) -> InstallResult:
    """Install `source`: a `.cappack` file, an http(s) URL of one, or a name (`zh`, `zh==1.2.0`) in `index`.

    A name needs an index (`index`, else $CAPKIT_INDEX). What arrives is
    checked against the entry (size, sha256, then language, version and
    encoder from its manifest) before `import_pack` checks and installs it;
    on any refusal nothing is written to `packs_dir`. Progress goes to
    `report("progress", stage="download", done=BYTES, total=BYTES, unit="B")`.
    """
    packs_dir = Path(packs_dir)
    kind = _kind(source)
    options = dict(force=force, max_bytes=max_bytes, encoder_weights=encoder_weights, report=report)
    if kind == "file":
        return InstallResult(import_pack(Path(source), packs_dir, **options), source, None)
    with tempfile.TemporaryDirectory(prefix="capkit-download-") as tmp, contextlib.ExitStack() as stack:
        if kind == "url":
            dest, where, entry = Path(tmp) / f"download{ARCHIVE_SUFFIX}", source, None
            download(source, dest, max_bytes=max_bytes, report=report)
        else:
            idx = load_index(index_location(index))
            entry = resolve(idx, source)
            _check_compatible(entry, idx.location)
            where = entry_location(idx, entry)
            if _is_url(where):
                dest = stack.enter_context(_partial_download(packs_dir, entry))
                download(where, dest, size=entry["size"], sha256=entry["sha256"], resume=True, report=report)
            else:
                dest = Path(tmp) / f"{entry['lang']}-{entry['version']}{ARCHIVE_SUFFIX}"  # schema-checked: plain names
                _copy_checked(Path(where), dest, entry["size"], entry["sha256"])
        try:
            if entry:
                manifest, carried = read_archive(dest, max_bytes)
                _check_matches(entry, manifest, carried, where)
            result = import_pack(dest, packs_dir, **options)
        except CapkitError as e:  # name what the user gave, not the temporary file
            e.message = e.message.replace(str(dest), where)
            raise
    return InstallResult(result, where, entry)


def _kind(source: str) -> str:
    if _is_url(source):
        return "url"
    if "://" in source:
        raise CapkitError(f"{source}: capkit downloads http and https URLs only")
    if _SPEC.fullmatch(source):
        return "name"  # a file named like a language is given as ./zh
    if Path(source).is_file() or source.endswith(ARCHIVE_SUFFIX):
        return "file"
    raise CapkitError(f"{source!r} is neither a {ARCHIVE_SUFFIX} file, an http(s) URL nor a pack name",
                      hint="a name is LANG or LANG==VERSION, e.g. zh or zh==1.2.0")


def _is_url(text: str) -> bool:
    return urlsplit(str(text)).scheme in ("http", "https")


def _check_compatible(entry: dict, where: str) -> None:
    what = f"{entry['lang']} {entry['version']} in {where}"
    if entry["pack_format_version"] != PACK_FORMAT_VERSION:
        newer = entry["pack_format_version"] > PACK_FORMAT_VERSION
        raise CapkitError(f"{what} is pack format {entry['pack_format_version']}; this toolkit reads {PACK_FORMAT_VERSION}",
                          hint="upgrade capkit" if newer else "ask for a rebuilt pack")
    if _needs(entry):
        raise CapkitError(f"{what} needs capkit {entry['toolkit_version']}; this is {__version__}", hint="upgrade capkit")


def _check_matches(entry: dict, manifest: dict, carried: dict | None, where: str) -> None:
    """What arrived is the pack the entry describes, not merely a file with its checksum."""
    got = {"lang": manifest["lang"], "name": manifest["name"], "version": manifest["pack_version"],
           "encoder id": manifest["encoder"]["id"], "encoder digest": manifest["encoder"]["digest"],
           "encoder included": carried is not None}
    want = {"lang": entry["lang"], "name": entry["name"], "version": entry["version"],
            "encoder id": entry["encoder"]["id"], "encoder digest": entry["encoder"]["digest"],
            "encoder included": entry["encoder"]["included"]}
    differs = [f"{k} {got[k]!r}, not {want[k]!r}" for k in want if got[k] != want[k]]
    if differs:
        raise CapkitError(f"{where} holds another pack than its index entry says ({'; '.join(differs)}); refused",
                          hint="the index is out of date or the server sends the wrong file; nothing was installed")


def _copy_checked(src: Path, dest: Path, size: int, sha256: str) -> None:
    """A local archive the index names, copied (so it cannot change under the import) and checked."""
    try:
        if src.stat().st_size != size:
            raise CapkitError(f"{src} is {src.stat().st_size} bytes, its index entry says {size}; refused")
        shutil.copyfile(src, dest)
    except FileNotFoundError:
        raise CapkitError(f"{src}: no such file, though the index lists it", hint="the index is out of date") from None
    if dest.stat().st_size != size or file_sha256(dest) != sha256:
        raise CapkitError(f"{src} does not match the sha256 its index entry gives; refused",
                          hint="the file is damaged or was altered, or the index is out of date")


# -- downloading ----------------------------------------------------------------------

class _Dropped(Exception):
    """The connection ended before the whole file came; resume it."""


class DownloadCut(CapkitError):
    """The network failed RETRIES times in a row without a byte of progress; what came is worth keeping."""


@contextlib.contextmanager
def _partial_download(packs_dir: Path, entry: dict):
    """The file `entry`'s download goes to: `PACKS_DIR/.work/downloads/LANG-VERSION-SHA.cappack.part`.

    Held under an exclusive lock (a second install of the same entry is
    refused, not interleaved). Kept when the download is cut for good
    (`DownloadCut`), the disk fills or the install is interrupted, so the
    same command resumes it; removed whatever else ends the install, with its
    folders where they are left empty (the packs dir only if this install
    made it).
    """
    name = f"{entry['lang']}-{entry['version']}-{entry['sha256'][:16]}{ARCHIVE_SUFFIX}.part"  # schema-checked
    part = packs_dir / WORK_DIR / DOWNLOADS_DIR / name
    folders = [part.parent, part.parent.parent] + ([] if packs_dir.exists() else [packs_dir])
    try:
        part.parent.mkdir(parents=True, exist_ok=True)
        held = open(part, "ab")
    except OSError as e:
        raise CapkitError(f"{packs_dir}: cannot download the pack there ({e.strerror or e})",
                          hint=PACKS_DIR_HINT) from None
    with held:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CapkitError(f"another capkit is installing {entry['lang']} {entry['version']} into {packs_dir}",
                              hint="wait for it to end, then run the same command again") from None
        keep = False
        try:
            yield part
        except (DownloadCut, KeyboardInterrupt):
            keep = True
            raise
        except OSError as e:
            keep = e.errno in (errno.ENOSPC, errno.EDQUOT)  # once there is room, the same command goes on
            raise
        finally:
            if not keep:
                part.unlink(missing_ok=True)
                for d in folders:
                    with contextlib.suppress(OSError):  # not empty
                        d.rmdir()


def download(
    url: str,
    dest: Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    resume: bool = False,
    report: Callable[..., None] | None = None,
) -> int:
    """Stream `url` to the file `dest`, resuming with Range requests; returns the bytes written.

    With `size` and `sha256` (from an index entry) anything else that arrives
    is refused; without them the file is cut off at `max_bytes`. With
    `resume` (and `size`), bytes already in `dest` from a cut download are
    kept and only the rest is asked for. Redirects are followed only within
    the URL's scheme. Gives up (`DownloadCut`) after RETRIES tries in a row
    that bring no new byte.
    """
    import requests

    if resume and size is None:
        raise ValueError("resume needs the size the file must have")
    limit = size if size is not None else max_bytes
    h, got, failures = hashlib.sha256(), 0, 0
    with open(dest, "r+b" if resume and dest.exists() else "wb") as out, requests.Session() as session:
        kept = _kept_bytes(out, h, size) if resume else 0
        got = kept
        session.headers["User-Agent"] = f"capkit/{__version__}"
        while size is None or got < size:
            before = got
            try:
                r = _get(session, url, {"Range": f"bytes={got}-", "Accept-Encoding": "identity"} if got
                         else {"Accept-Encoding": "identity"})
                with r:
                    expected = _expected_length(r, url, got, size)
                    if r.status_code == 200 and got:  # the server ignored the Range: start again
                        out.seek(0)
                        out.truncate()
                        h, got, kept = hashlib.sha256(), 0, 0
                    total = size if size is not None else (got + expected if expected is not None else None)
                    for chunk in r.iter_content(_CHUNK):
                        got += len(chunk)
                        if got > limit:
                            raise CapkitError(
                                f"{url}: more than the {limit} bytes " + ("its index entry gives" if size is not None
                                                                          else "allowed") + " arrive; refused",
                                hint="the index is out of date or the server sends the wrong file" if size is not None
                                else "raise --max-size-mb if you trust this source")
                        h.update(chunk)
                        out.write(chunk)
                        if report:
                            report("progress", stage="download", done=got, total=total, unit="B")
                    if size is not None and got < size:
                        raise _Dropped(f"the connection ended at byte {got} of {size}")
                break
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError, _Dropped) as e:
                failures = 1 if got > before else failures + 1
                if failures >= RETRIES:
                    raise DownloadCut(f"{url}: download failed after {RETRIES} tries without progress "
                                      f"({type(e).__name__}: {str(e)[:200]})",
                                      hint="check the address and the network, then run the same command again"
                                      + ("; it resumes where this one stopped" if resume else "")) from None
                time.sleep(min(0.2 * 2**failures, 5))
            except requests.RequestException as e:
                raise CapkitError(f"{url}: cannot download ({type(e).__name__}: {str(e)[:200]})") from None
        out.flush()
        os.fsync(out.fileno())
    if size is not None and got != size:
        raise CapkitError(f"{url}: {got} bytes arrived, its index entry says {size}; refused",
                          hint="the index is out of date or the server sends the wrong file; nothing was installed")
    if sha256 is not None and h.hexdigest() != sha256:
        raise CapkitError(f"{url}: the sha256 of what arrived is not the one its index entry gives; refused",
                          hint="the index is out of date or the server sends the wrong file; nothing was installed"
                          + (f" (the first {kept} bytes came in an earlier run: running the same command again "
                             "downloads it afresh)" if kept else ""))
    return got


def _kept_bytes(out, h, size: int) -> int:
    """Bytes a cut download left in `out` (hashed into `h`, the file left at its end); none where they exceed `size`."""
    got = out.seek(0, os.SEEK_END)
    if got > size:
        out.seek(0)
        out.truncate()
        return 0
    out.seek(0)
    for chunk in iter(lambda: out.read(_CHUNK), b""):
        h.update(chunk)
    return got


def _get(session, url: str, headers: dict):
    """GET `url` streamed, following redirects by hand: one to another scheme is refused."""
    import requests

    scheme = urlsplit(url).scheme
    for _ in range(MAX_REDIRECTS + 1):
        r = session.get(url, headers=headers, stream=True, allow_redirects=False, timeout=TIMEOUT)
        if not r.is_redirect:
            if r.status_code >= 500:
                r.close()
                raise requests.ConnectionError(f"HTTP {r.status_code} {r.reason}")  # worth another try
            if r.status_code not in (200, 206):
                r.close()
                raise CapkitError(f"{url}: HTTP {r.status_code} {r.reason}",
                                  hint="check the address; an index may be out of date")
            return r
        target = urljoin(url, r.headers.get("Location", ""))
        r.close()
        if urlsplit(target).scheme != scheme:
            raise CapkitError(f"{url} redirects to {target}, another scheme; refused",
                              hint=f"capkit follows redirects only within {scheme}; use the final address if you trust it")
        url = target
    raise CapkitError(f"{url}: more than {MAX_REDIRECTS} redirects; refused")


def _expected_length(r, url: str, got: int, size: int | None) -> int | None:
    """Bytes this response says it brings; refuses a resume that starts elsewhere, or a wrong total."""
    length = r.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if r.status_code == 206:
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", r.headers.get("Content-Range", "").strip())
        if not m or int(m.group(1)) != got:
            raise CapkitError(f"{url}: asked to resume at byte {got}, the server answered "
                              f"{r.headers.get('Content-Range')!r}; refused")
        if size is not None and m.group(3) != "*" and int(m.group(3)) != size:
            raise CapkitError(f"{url}: the server's file is {m.group(3)} bytes, its index entry says {size}; refused",
                              hint="the index is out of date or the server sends the wrong file")
        return length
    if size is not None and length is not None and length != size:
        raise CapkitError(f"{url}: the server sends {length} bytes, its index entry says {size}; refused",
                          hint="the index is out of date or the server sends the wrong file")
    return length
