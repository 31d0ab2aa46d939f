"""Packs as files people trade: export to one `.cappack` zip, import one safely.

An archive holds exactly `manifest.json` and the files its "files" map lists
(tokenizer, decoder weights, captions, references, history, model card), all
at the top level. The manifest names the shared encoder by id and digest;
exported `with_encoder`, the archive carries it too: `encoder.json` (its
identity, plus the size and sha256 of its weights) and `encoder.weights.h5`
(none for a random-init encoder, rebuilt from its seed). An import registers
a carried encoder the machine lacks once the weights, as loaded, have the
digest the manifest names; otherwise `encoder_weights` ("imagenet" or a
path) can supply it, checked the same way.

Import treats the archive as hostile until proven otherwise. It reads the zip
directory and the manifest first (names, types, declared sizes, schema), then
streams each member through a bounded reader into a staging folder, hashing as
it goes, and swaps the folder in only when every check passed; on any failure
the staging folder is removed, so the packs dir is left as it was. Header
sizes are only ever used to refuse early, never to accept: the byte counts
that matter are the ones actually read.

    export_pack("lang_packs", "tr", "tr.cappack")            -> ExportResult
    export_pack("lang_packs", "tr", "out/", with_encoder=True) -> ExportResult(path=out/capkit-tr-1.0.0.cappack, ...)
    import_pack("tr.cappack", "other_packs", force=False)   -> ImportResult(action="installed", ...)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from toolkit.config import PACKS_DIR_HINT
from toolkit.encoder import ENCODER_FILE, ENCODER_FORMAT, ENCODER_WEIGHTS_FILE, ENCODERS_DIR
from toolkit.errors import CapkitError
from toolkit.pack import (
    DECODER_WEIGHTS_FILE, MANIFEST_FILE, TOKENIZER_FILE, file_sha256, find_pack, install_dir, load_manifest,
    recover, validate_manifest, verify_files,
)

ARCHIVE_SUFFIX = ".cappack"
DEFAULT_MAX_BYTES = 512 * 2**20      # total uncompressed size an import accepts; --max-size-mb overrides
MAX_MANIFEST_BYTES = 1 * 2**20       # a manifest is a few kB; anything bigger is not one
MAX_RATIO = 100                      # uncompressed/compressed per member; weights ~1x, captions ~5x
RATIO_FLOOR_BYTES = 1 * 2**20        # below this, a high ratio is just a small repetitive file
_CHUNK = 1 << 16
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)   # fixed member times: exporting one pack twice gives identical bytes
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENCODER_MEMBERS = (ENCODER_FILE, ENCODER_WEIGHTS_FILE)  # archive-level names a manifest may not list
_IDENTITY_KEYS = ("id", "name", "image_size", "digest", "source")  # what a manifest says of its encoder
# The carried encoder's `encoder.json`: the encoder folder's own file plus what its weights must be.
ENCODER_MEMBER_SCHEMA = {
    "type": "object",
    "required": ["format", *_IDENTITY_KEYS, "feature_scale", "weights"],
    "properties": {
        "format": {"const": ENCODER_FORMAT},
        "id": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
        "image_size": {"type": "integer", "minimum": 71},
        "digest": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "feature_scale": {"type": "number", "exclusiveMinimum": 0},
        "weights": {"oneOf": [
            {"type": "null"},  # random init: rebuilt from its seed, nothing to carry
            {"type": "object", "required": ["file", "size", "sha256"], "additionalProperties": False,
             "properties": {"file": {"const": ENCODER_WEIGHTS_FILE}, "size": {"type": "integer", "minimum": 1},
                            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}},
        ]},
    },
}


@dataclass
class ExportResult:
    path: Path
    lang: str
    pack_version: str
    n_files: int       # members, the manifest included
    size: int          # bytes of the archive
    with_encoder: bool = False  # the encoder is in the archive


@dataclass
class ImportResult:
    lang: str
    pack_dir: Path
    manifest: dict
    action: str                       # "installed", "replaced" or "unchanged"
    previous_version: str | None      # pack_version replaced (or kept, when unchanged)
    warnings: list[str] = field(default_factory=list)
    encoder_registered: str | None = None  # where the encoder came from when this import registered it:
                                           # "archive", "imagenet" or a weights path; None if not


# -- export --------------------------------------------------------------------

def export_pack(packs_dir: Path, lang: str, out: Path, *, with_encoder: bool = False) -> ExportResult:
    """Write the installed pack `lang` to the zip `out` (a folder gets `capkit-LANG-VERSION.cappack`).

    Every file is checked against the manifest while it is copied, so a
    damaged pack is never shared; the archive appears whole or not at all.
    `with_encoder` adds the pack's encoder (its identity and weights).
    """
    folder = find_pack(Path(packs_dir), lang)
    manifest = load_manifest(folder)
    encoder = _encoder_to_carry(Path(packs_dir), manifest) if with_encoder else None
    folder_meant = str(out).endswith(("/", os.sep))  # "-o shelf/": a folder, made if need be
    out = Path(out)
    if folder_meant:
        out.mkdir(parents=True, exist_ok=True)
    if out.is_dir():
        out = out / f"capkit-{lang}-{manifest['pack_version']}{ARCHIVE_SUFFIX}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        with zipfile.ZipFile(tmp, "x", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(_member(MANIFEST_FILE), (folder / MANIFEST_FILE).read_bytes())
            for name, digest in sorted(manifest["files"].items()):
                _copy_checked(folder / name, zf, name, digest, lang)
            if encoder:
                identity, weights = encoder
                zf.writestr(_member(ENCODER_FILE), json.dumps(identity, indent=2, sort_keys=True).encode())
                if weights:
                    _copy_checked(weights, zf, ENCODER_WEIGHTS_FILE, identity["weights"]["sha256"], lang)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    n = 1 + len(manifest["files"]) + (0 if not encoder else 1 + bool(encoder[1]))
    return ExportResult(out, lang, manifest["pack_version"], n, out.stat().st_size, bool(encoder))


def _encoder_to_carry(packs_dir: Path, manifest: dict) -> tuple[dict, Path | None]:
    """The archive's `encoder.json` for the pack's encoder, and its weights file (None: random init)."""
    problem = encoder_problem(packs_dir, manifest)
    if problem:
        raise CapkitError(f"cannot export {manifest['lang']} with its encoder: {problem[0]}", hint=problem[1])
    home = packs_dir / ENCODERS_DIR / manifest["encoder"]["id"]
    identity = json.loads((home / ENCODER_FILE).read_text(encoding="utf-8"))
    if identity.get("source") == "none":
        return {**identity, "weights": None}, None
    weights = home / ENCODER_WEIGHTS_FILE
    if not weights.is_file():
        raise CapkitError(f"{home}: no {ENCODER_WEIGHTS_FILE}; the encoder folder is damaged", hint="rebuild it")
    spec = {"file": ENCODER_WEIGHTS_FILE, "size": weights.stat().st_size, "sha256": file_sha256(weights)}
    return {**identity, "weights": spec}, weights


def _member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    return info


def _copy_checked(src: Path, zf: zipfile.ZipFile, name: str, digest: str, lang: str) -> None:
    h = hashlib.sha256()
    try:
        with open(src, "rb") as f, zf.open(_member(name), "w") as dst:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                h.update(chunk)
                dst.write(chunk)
    except FileNotFoundError:
        raise CapkitError(f"pack {lang}: {name} is missing", hint=f"`capkit packs verify {lang}`; rebuild the pack") from None
    if h.hexdigest() != digest:
        raise CapkitError(f"pack {lang}: {name} does not match its checksum in the manifest; not exported",
                          hint=f"`capkit packs verify {lang}`; rebuild the pack")


# -- import --------------------------------------------------------------------

def import_pack(
    archive: Path,
    packs_dir: Path,
    *,
    force: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    encoder_weights: str | None = None,
    report: Callable[..., None] | None = None,
) -> ImportResult:
    """Validate the `.cappack` at `archive`, then install it as `packs_dir/<lang>/` in one swap.

    Refuses (CapkitError, packs dir untouched) any archive that is not exactly
    a manifest plus its listed files (and, optionally, its encoder), plain and
    flat, within `max_bytes` uncompressed, each matching its checksum. An
    installed pack of another version or build is replaced only with `force`;
    the identical pack is a no-op. An encoder this packs dir lacks is
    registered from the archive when it carries one, else from
    `encoder_weights` ("imagenet" or a .weights.h5 path), in both cases only
    if the weights as loaded have the manifest's digest. Still missing, it is
    a warning (through `report("warning", message=...)`) saying how to add it.
    """
    archive, packs_dir = Path(archive), Path(packs_dir)
    warnings: list[str] = []

    def warn(message: str) -> None:
        warnings.append(message)
        if report:
            report("warning", message=message)

    zf = _open(archive)
    with zf:
        manifest, manifest_bytes, carried = _check_archive(zf, archive, max_bytes)
        lang, enc = manifest["lang"], manifest["encoder"]
        if encoder_weights == "imagenet" and not carried:
            from toolkit.encoder import is_imagenet

            if not is_imagenet(enc):
                raise CapkitError(f"--encoder-weights imagenet: the {lang} pack's encoder {enc['id']} (weights: "
                                  f"{enc['source']}) is not the ImageNet Xception; nothing installed",
                                  hint="give --encoder-weights PATH to the weights the pack was built with")
        recover(packs_dir)
        final = packs_dir / lang
        previous = _installed_manifest(final)
        unchanged = previous is not None and _same_build(previous, manifest_bytes, final)
        existed = final.exists()
        if existed and not unchanged and not force:
            raise _refusal(final, previous, manifest)
        # The encoder is registered only where there is none by its id; one that differs stays a warning.
        absent = not (packs_dir / ENCODERS_DIR / enc["id"] / ENCODER_FILE).exists()
        source = ("archive" if carried else encoder_weights) if absent else None
        made = [p for p in (packs_dir, packs_dir / ENCODERS_DIR) if not p.exists()]
        staging = packs_dir / f".import-{lang}-{secrets.token_hex(4)}"
        weights_tmp = packs_dir / ENCODERS_DIR / f".import-{enc['id']}-{secrets.token_hex(4)}.weights.h5"
        try:
            if not unchanged:
                staging.mkdir(parents=True)
                _extract(zf, archive, manifest, manifest_bytes, staging, max_bytes)
            if carried and carried["weights"]:
                # Checked even when not needed here: an archive is whole or refused.
                weights_tmp.parent.mkdir(parents=True, exist_ok=True)
                _extract_weights(zf, archive, carried["weights"], weights_tmp if source == "archive" else None)
            if source:
                from toolkit.encoder import register_encoder

                if source == "archive":
                    weights = weights_tmp if carried["weights"] else "none"
                    register_encoder(packs_dir, enc, weights, move=True)
                else:
                    register_encoder(packs_dir, enc, source)
            if not unchanged:
                install_dir(staging, final)
        except BaseException as e:
            shutil.rmtree(staging, ignore_errors=True)
            weights_tmp.unlink(missing_ok=True)
            for folder in reversed(made):  # what this import created, if it is empty again
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
            if isinstance(e, OSError):
                raise CapkitError(f"{packs_dir}: cannot install the pack ({e.strerror or e})",
                                  hint=PACKS_DIR_HINT) from None
            raise
    _check_encoder(packs_dir, manifest, warn)
    action = "unchanged" if unchanged else "replaced" if existed else "installed"
    kept = manifest["pack_version"] if unchanged else (previous or {}).get("pack_version")
    return ImportResult(lang, final, manifest, action, kept, warnings, str(source) if source else None)


def read_archive(archive: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[dict, dict | None]:
    """(manifest, carried encoder.json or None) of a `.cappack`, after every check but the members' contents.

    What `capkit packs index` reads; an import reads the same, then each member.
    """
    archive = Path(archive)
    with _open(archive) as zf:
        manifest, _, carried = _check_archive(zf, archive, max_bytes)
    return manifest, carried


def _open(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except FileNotFoundError:
        raise CapkitError(f"{archive}: no such file") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise CapkitError(f"{archive}: not a capkit pack archive ({e})", hint="a .cappack is the zip `capkit packs export` writes") from None


def _check_archive(zf: zipfile.ZipFile, archive: Path, max_bytes: int) -> tuple[dict, bytes, dict | None]:
    """Everything the zip directory, the manifest and a carried encoder.json can tell, before a byte is written."""
    infos = zf.infolist()
    seen: set[str] = set()
    for info in infos:
        name = info.orig_filename
        what = f"{archive}: member {name!r}"
        if (name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or "\x00" in name
                or info.filename != name):
            raise CapkitError(f"{what} has an absolute or malformed path; refused", hint="a pack archive holds plain file names only")
        parts = re.split(r"[/\\]", name)
        if ".." in parts:
            raise CapkitError(f"{what} climbs out of its folder with '..'; refused", hint="a pack archive holds plain file names only")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise CapkitError(f"{what} is a symbolic link; refused", hint="a pack archive holds regular files only")
        if info.is_dir() or stat.S_ISDIR(mode) or info.external_attr & 0x10:
            raise CapkitError(f"{what} is a directory; refused", hint="a pack archive holds plain file names only")
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise CapkitError(f"{what} is not a regular file; refused")
        if len(parts) > 1:
            raise CapkitError(f"{what} is inside a folder; refused", hint="a pack archive holds plain file names only")
        if name in seen:
            raise CapkitError(f"{what} appears twice; refused")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise CapkitError(f"{what} is encrypted; refused")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CapkitError(f"{what} uses compression method {info.compress_type}; capkit reads stored and deflated only")
        if info.file_size > RATIO_FLOOR_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise CapkitError(f"{what} expands {info.file_size // max(info.compress_size, 1)}x (limit {MAX_RATIO}x); "
                              "refused as a zip bomb")
    declared = sum(i.file_size for i in infos)
    if declared > max_bytes:
        raise CapkitError(f"{archive}: {_mib(declared)} uncompressed, over the {_mib(max_bytes)} limit; refused",
                          hint="raise --max-size-mb if you trust this archive")
    if MANIFEST_FILE not in seen:
        raise CapkitError(f"{archive}: no {MANIFEST_FILE}; not a capkit pack archive")
    raw = _read_bounded(zf, zf.getinfo(MANIFEST_FILE), min(MAX_MANIFEST_BYTES, max_bytes), archive)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CapkitError(f"{archive}: unreadable {MANIFEST_FILE} ({e})") from None
    validate_manifest(manifest, f"{archive}:{MANIFEST_FILE}")
    files = manifest["files"]
    for name in files:
        if not _SAFE_NAME.fullmatch(name) or name in (MANIFEST_FILE, *_ENCODER_MEMBERS):
            raise CapkitError(f"{archive}: manifest lists the file {name!r}; refused", hint="pack files are plain names")
    for name in (TOKENIZER_FILE, DECODER_WEIGHTS_FILE):
        if name not in files:
            raise CapkitError(f"{archive}: manifest lists no {name}; not a usable pack")
    carried = _check_encoder_member(zf, archive, manifest) if ENCODER_FILE in seen else None
    expected = {MANIFEST_FILE, *files, *((ENCODER_FILE,) if carried else ()),
                *((ENCODER_WEIGHTS_FILE,) if carried and carried["weights"] else ())}
    unexpected, missing = sorted(seen - expected), sorted(expected - seen)
    if unexpected:
        raise CapkitError(f"{archive}: unexpected file(s) not listed in the manifest: {', '.join(unexpected)}; refused")
    if missing:
        raise CapkitError(f"{archive}: file(s) listed in the manifest are missing: {', '.join(missing)}; refused")
    if carried and carried["weights"] and zf.getinfo(ENCODER_WEIGHTS_FILE).file_size != carried["weights"]["size"]:
        raise CapkitError(f"{archive}: {ENCODER_WEIGHTS_FILE} is {zf.getinfo(ENCODER_WEIGHTS_FILE).file_size} bytes, "
                          f"its {ENCODER_FILE} says {carried['weights']['size']}; refused")
    return manifest, raw, carried


def _check_encoder_member(zf: zipfile.ZipFile, archive: Path, manifest: dict) -> dict:
    """The carried `encoder.json`, valid and naming the very encoder the manifest does."""
    import jsonschema

    where = f"{archive}:{ENCODER_FILE}"
    raw = _read_bounded(zf, zf.getinfo(ENCODER_FILE), MAX_MANIFEST_BYTES, archive)
    try:
        carried = json.loads(raw.decode("utf-8"))
        jsonschema.validate(carried, ENCODER_MEMBER_SCHEMA)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CapkitError(f"{where}: unreadable ({e}); refused") from None
    except jsonschema.ValidationError as e:
        field_ = "/".join(map(str, e.absolute_path)) or "(top level)"
        raise CapkitError(f"{where}: invalid at {field_}: {e.message}; refused") from None
    differs = [k for k in _IDENTITY_KEYS if carried[k] != manifest["encoder"][k]]
    if differs:
        raise CapkitError(f"{where}: not the encoder the manifest names ({', '.join(differs)} differ); refused")
    if (carried["weights"] is None) != (carried["source"] == "none"):
        raise CapkitError(f"{where}: weights {'missing' if carried['weights'] is None else 'given'} for an encoder "
                          f"whose source is {carried['source']!r}; refused")
    return carried


def _extract_weights(zf: zipfile.ZipFile, archive: Path, spec: dict, dest: Path | None) -> None:
    """Stream the carried weights to `dest` (or only hash them), checking their declared size and sha256."""
    h, size = hashlib.sha256(), 0
    out = open(dest, "xb") if dest else None
    try:
        def sink(chunk):
            nonlocal size
            size += len(chunk)
            h.update(chunk)
            if out:
                out.write(chunk)

        _read_bounded(zf, zf.getinfo(ENCODER_WEIGHTS_FILE), spec["size"], archive, sink)
        if out:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out:
            out.close()
    if size != spec["size"] or h.hexdigest() != spec["sha256"]:
        raise CapkitError(f"{archive}: {ENCODER_WEIGHTS_FILE} does not match the size and sha256 its {ENCODER_FILE} "
                          "declares; refused", hint="the archive is damaged or was altered; get it again from its source")


def _read_bounded(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, archive: Path, sink=None) -> bytes:
    """The member's bytes, read in chunks and cut off at `limit` or a bomb ratio, whatever its header says.

    With `sink`, chunks go there (and b"" is returned) instead of into memory.
    """
    got, parts = 0, []
    bomb_at = max(RATIO_FLOOR_BYTES, MAX_RATIO * max(info.compress_size, 1))
    try:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                got += len(chunk)
                if got > limit:
                    raise CapkitError(f"{archive}: {info.filename} is over the {_mib(limit)} limit when unpacked; refused",
                                      hint="raise --max-size-mb if you trust this archive")
                if got > bomb_at:
                    raise CapkitError(f"{archive}: {info.filename} expands over {MAX_RATIO}x; refused as a zip bomb")
                if sink:
                    sink(chunk)
                else:
                    parts.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
        raise CapkitError(f"{archive}: {info.filename} is damaged ({e}); refused") from None
    return b"".join(parts)


def _extract(zf, archive: Path, manifest: dict, manifest_bytes: bytes, staging: Path, max_bytes: int) -> None:
    budget = max_bytes - len(manifest_bytes)
    for name, digest in manifest["files"].items():
        h = hashlib.sha256()
        size = 0
        with open(staging / name, "xb") as out:
            def sink(chunk):
                nonlocal size
                size += len(chunk)
                h.update(chunk)
                out.write(chunk)

            _read_bounded(zf, zf.getinfo(name), budget, archive, sink)
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != digest:
            raise CapkitError(f"{archive}: {name} does not match its checksum in the manifest; refused",
                              hint="the archive is damaged or was altered; get it again from its source")
        budget -= size
    # The manifest last: a staging folder is a pack only once everything else is whole.
    with open(staging / MANIFEST_FILE, "xb") as out:
        out.write(manifest_bytes)
        out.flush()
        os.fsync(out.fileno())


def _installed_manifest(final: Path) -> dict | None:
    if not (final / MANIFEST_FILE).is_file():
        return None
    try:
        return load_manifest(final)
    except CapkitError:
        return {}  # a broken pack is "some other pack": replaced only with --force


def _same_build(previous: dict, manifest_bytes: bytes, final: Path) -> bool:
    """The installed pack is this very archive's, and whole."""
    return (bool(previous)
            and hashlib.sha256(manifest_bytes).hexdigest() == file_sha256(final / MANIFEST_FILE)
            and not verify_files(final, previous))


def _refusal(final: Path, previous: dict | None, manifest: dict) -> CapkitError:
    new = f"{manifest['pack_version']} (built {manifest['created']})"
    hint = "pass --force to replace it"
    if previous is None:
        return CapkitError(f"{final} exists and is not a pack; not overwritten", hint=f"move it away, or {hint}")
    if not previous:
        return CapkitError(f"the installed {manifest['lang']} pack is broken; not overwritten by {new}", hint=hint)
    old = f"{previous['pack_version']} (built {previous['created']})"
    if previous["pack_version"] == manifest["pack_version"]:
        what = f"a different build of {manifest['lang']} {old} is installed; this archive holds {new}"
    else:
        what = f"{manifest['lang']} pack {old} is installed; this archive holds {new}"
    return CapkitError(f"{what}; not replaced", hint=f"{hint}, or `capkit packs remove {manifest['lang']}` first")


def encoder_problem(packs_dir: Path, manifest: dict) -> tuple[str, str] | None:
    """(message, hint) when the encoder a pack was trained with is absent or different here; else None.

    The hint names the one way to get that encoder: `--encoder-weights
    imagenet|PATH` for the ImageNet Xception, `capkit encode` for a
    random-init one, else an archive exported with the encoder.
    """
    from toolkit.encoder import is_imagenet

    enc = manifest["encoder"]
    home = Path(packs_dir) / ENCODERS_DIR / enc["id"]
    if is_imagenet(enc):
        hint = ("its encoder is the ImageNet Xception: run `capkit packs import` (or `install`) again with "
                "--encoder-weights imagenet (Keras's download) or --encoder-weights PATH (a .weights.h5 of those weights)")
    elif enc["source"] == "none":
        hint = (f"`capkit encode --encoder-weights none --image-size {enc['image_size']} --images SOME_IMAGES "
                f"--packs-dir {packs_dir}` creates {home}")
    else:
        hint = ("get the pack as exported with `capkit packs export --with-encoder`, or import it again with "
                "--encoder-weights PATH to the weights it was built with")
    try:
        have = json.loads((home / ENCODER_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"encoder {enc['id']} ({enc['name']} {enc['image_size']}px, weights: {enc['source']}) is not in {home.parent}", hint
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{home / ENCODER_FILE}: unreadable ({e})", f"move {home} away, then: {hint}"
    if have.get("digest") != enc["digest"]:
        return f"encoder {enc['id']} in {home.parent} differs from the one the pack was trained with", f"move {home} away, then: {hint}"
    return None


def _check_encoder(packs_dir: Path, manifest: dict, warn) -> None:
    problem = encoder_problem(packs_dir, manifest)
    if problem:
        warn(f"{problem[0]}; the pack cannot caption until it is there. hint: {problem[1]}")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"
