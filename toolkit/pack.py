"""Language packs on disk: layout, manifest, atomic writes.

A pack is the folder `<packs dir>/<lang>/`:

    manifest.json        what the pack is and how it was made (schema below)
    tokenizer.model      SentencePiece model
    decoder.weights.h5   decoder weights only; the architecture is rebuilt from the manifest
    captions.txt         the training captions in the pack's language (Flickr8k token layout)
    references.txt       the dev and test captions in the pack's language, for `evaluate`
    history.json         loss per epoch
    README.md            the model card

The encoder is not in the pack: the manifest names it by identity and the
packs dir holds it once for all packs (`.encoders/<id>/`). Sharing a pack
as one `.cappack` file (export, and an import that trusts nothing) is
`toolkit.share`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from toolkit.config import DecoderConfig, from_dict
from toolkit.errors import CapkitError

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
DECODER_WEIGHTS_FILE = "decoder.weights.h5"
CAPTIONS_FILE = "captions.txt"
REFERENCES_FILE = "references.txt"
HISTORY_FILE = "history.json"
MODEL_CARD_FILE = "README.md"
WORK_DIR = ".work"  # in a packs dir: builds' checkpoints and installs' cut downloads, kept so a rerun resumes
PACK_FILES = (TOKENIZER_FILE, DECODER_WEIGHTS_FILE, CAPTIONS_FILE, REFERENCES_FILE, HISTORY_FILE, MODEL_CARD_FILE)

PACK_FORMAT = "capkit-pack"
FORMAT_VERSION = 1

_SECTION = {"type": "object"}
MANIFEST_SCHEMA = {
    "type": "object",
    "required": [
        "format", "format_version", "lang", "name", "pack_version", "toolkit_version", "created",
        "encoder", "tokenizer", "decoder", "train", "data", "training", "scores", "files",
    ],
    "properties": {
        "format": {"const": PACK_FORMAT},
        "format_version": {"type": "integer"},
        "lang": {"type": "string", "pattern": "^[a-z]{2,3}(-[A-Za-z0-9]+)?$"},
        "name": {"type": "string"},
        "pack_version": {"type": "string"},
        "toolkit_version": {"type": "string"},
        "created": {"type": "string"},
        "encoder": {"type": "object", "required": ["id", "name", "image_size", "digest", "source"]},
        "tokenizer": {"type": "object", "required": ["file", "vocab_size"]},
        "decoder": _SECTION,
        "train": _SECTION,
        "data": {"type": "object", "required": ["captions", "source_lang", "translator", "n_train_images", "n_train_captions"]},
        "training": _SECTION,
        "scores": _SECTION,
        "files": {"type": "object", "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
    },
}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide shared packs from other users
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def install_dir(staged: Path, final: Path) -> None:
    """Swap a fully written folder into place: the old pack stays until the new one is whole.

    A kill between the two renames leaves `final` absent and `<final>.old`
    present; `recover` (called by every reader) puts the old pack back.
    """
    old = final.with_name(final.name + ".old")
    if old.exists():
        if final.exists():  # an earlier swap finished but not its clean-up
            shutil.rmtree(old)
        else:  # an earlier swap was cut between its renames: `old` is the only pack, keep it until `staged` is in
            os.rename(old, final)
    if final.exists():
        os.rename(final, old)
    os.rename(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def recover(packs_dir: Path) -> None:
    """Finish or undo an install that was interrupted between its renames."""
    if not packs_dir.is_dir():
        return
    for old in packs_dir.glob("*.old"):
        final = old.with_name(old.name[: -len(".old")])
        if not final.exists():
            os.rename(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)


def validate_manifest(manifest: dict, where: str) -> dict:
    import jsonschema

    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if isinstance(version, int) and version != FORMAT_VERSION:
        newer = "newer" if version > FORMAT_VERSION else "older"
        raise CapkitError(
            f"{where}: pack format version {version} ({newer}); this toolkit reads version {FORMAT_VERSION}",
            hint="upgrade capkit" if version > FORMAT_VERSION else "rebuild the pack with this capkit",
        )
    try:
        jsonschema.validate(manifest, MANIFEST_SCHEMA)
    except jsonschema.ValidationError as e:
        field = "/".join(map(str, e.absolute_path)) or "(top level)"
        raise CapkitError(f"{where}: invalid manifest at {field}: {e.message}") from None
    return manifest


def load_manifest(pack_dir: Path) -> dict:
    path = Path(pack_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CapkitError(f"{pack_dir}: not a pack (no {MANIFEST_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CapkitError(f"{path}: unreadable manifest ({e})") from None
    return validate_manifest(manifest, str(path))


def installed_packs(packs_dir: Path) -> dict[str, Path]:
    """lang -> pack folder, for every folder of `packs_dir` that holds a manifest."""
    packs_dir = Path(packs_dir)
    recover(packs_dir)
    if not packs_dir.is_dir():
        return {}
    return {p.name: p for p in sorted(packs_dir.iterdir()) if (p / MANIFEST_FILE).is_file() and not p.name.startswith(".")}


def find_pack(packs_dir: Path, lang: str) -> Path:
    packs = installed_packs(packs_dir)
    if lang not in packs:
        raise CapkitError(
            f"no {lang!r} pack in {packs_dir}",
            hint=f"installed: {', '.join(packs) or 'none'}; build one with `capkit build-pack {lang} ...`",
        )
    return packs[lang]


def verify_files(pack_dir: Path, manifest: dict) -> list[str]:
    """Files whose checksum differs from the manifest's (or are missing)."""
    bad = []
    for name, digest in manifest["files"].items():
        p = Path(pack_dir) / name
        if not p.is_file() or file_sha256(p) != digest:
            bad.append(name)
    return bad


# -- loading a pack to caption with ----------------------------------------------

@dataclass
class LoadedPack:
    """A pack ready to caption (`load_pack`): its manifest, tokenizer and decoder behind the search interface."""

    lang: str
    dir: Path
    manifest: dict
    tokenizer: object
    step: object  # a KerasStepModel; its `decoder` is the Keras model

    @property
    def needs_grid(self) -> bool:
        """Whether the decoder reads feature grids (`Encoder.grid_features`) rather than pooled features."""
        return architecture(self.manifest) == "attention"


def architecture(manifest: dict) -> str:
    """The manifest's decoder architecture; packs from before the field are "lstm" (see config.ADDED_FIELDS)."""
    return from_dict(DecoderConfig, manifest["decoder"]).architecture


def load_pack(packs_dir: Path, lang: str, encoder_id: str | None = None) -> LoadedPack:
    """A pack ready to caption; refused when `encoder_id` differs from the one it was trained with."""
    from toolkit.decoder import load_decoder
    from toolkit.generate import KerasStepModel
    from toolkit.tokenizer import Tokenizer

    folder = find_pack(packs_dir, lang)
    m = load_manifest(folder)
    if encoder_id and m["encoder"]["id"] != encoder_id:
        raise CapkitError(
            f"pack {lang} was trained with encoder {m['encoder']['id']}, not {encoder_id}",
            hint="a decoder only understands the features of its own encoder; rebuild the pack for this encoder",
        )
    cfg = from_dict(DecoderConfig, m["decoder"])
    model = load_decoder(cfg, folder / DECODER_WEIGHTS_FILE)
    return LoadedPack(lang, folder, m, Tokenizer.load(folder / TOKENIZER_FILE), KerasStepModel(model))


def resolve_langs(packs_dir: Path, langs: list[str]) -> list[str]:
    """The languages `langs` asks for, in order, once each: ["en", "en", "zh"] -> ["en", "zh"]; "all" is every installed pack."""
    if "all" in langs:
        have = list(installed_packs(packs_dir))
        if not have:
            raise CapkitError(f"no packs installed in {packs_dir}", hint="build one with `capkit build-pack`")
        return have
    return list(dict.fromkeys(langs))
