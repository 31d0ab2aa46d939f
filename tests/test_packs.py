"""Packs as shared artifacts: export/import round trip, hostile archives, atomic installs, safe loading."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tokenize
import warnings
import zipfile
from pathlib import Path

import pytest

from conftest import build_tiny_pack
from toolkit.errors import CapkitError
from toolkit.pack import (
    DECODER_WEIGHTS_FILE, FORMAT_VERSION, HISTORY_FILE, MANIFEST_FILE, MODEL_CARD_FILE, PACK_FILES, file_sha256,
    install_dir, installed_packs, load_manifest, verify_files,
)
from toolkit.share import export_pack, import_pack

REPO = Path(__file__).resolve().parents[1]


def listing(folder: Path) -> list[str]:
    """Every path under `folder`, hidden ones included, with sizes: 'nothing written' means this is unchanged."""
    if not folder.exists():
        return []
    return sorted(f"{p.relative_to(folder)}:{p.stat().st_size if p.is_file() else 'dir'}" for p in folder.rglob("*"))


def capkit(*args: str, env_packs: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPKIT_PACKS_DIR": str(env_packs)} if env_packs else None
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=REPO, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def archive(tiny_packs, tmp_path_factory) -> Path:
    """The tiny `en` pack, exported once."""
    return export_pack(tiny_packs, "en", tmp_path_factory.mktemp("export") / "en.cappack").path


@pytest.fixture
def target(tiny_packs, tmp_path) -> Path:
    """Another user's packs dir: no packs, but the same encoder (as `capkit encode` would have made it)."""
    packs = tmp_path / "other_packs"
    shutil.copytree(tiny_packs / ".encoders", packs / ".encoders")
    return packs


def members(archive: Path) -> tuple[dict[str, bytes], dict]:
    with zipfile.ZipFile(archive) as zf:
        data = {n: zf.read(n) for n in zf.namelist()}
    return data, json.loads(data[MANIFEST_FILE])


def write_zip(path: Path, entries: list) -> Path:
    """`entries`: (name or ZipInfo, bytes) in order, duplicates and all."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names; that is the point of one test
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


def forge(archive: Path, out: Path, *, manifest_edit=None, replace=None, extra=(), drop=(), rehash=False) -> Path:
    """A copy of `archive` with members replaced, added or dropped, and the manifest edited."""
    data, manifest = members(archive)
    for name, blob in (replace or {}).items():
        data[name] = blob
        if rehash:
            manifest["files"][name] = hashlib.sha256(blob).hexdigest()
    if manifest_edit:
        manifest_edit(manifest)
    data[MANIFEST_FILE] = json.dumps(manifest, indent=2).encode()
    entries = [(n, b) for n, b in data.items() if n not in drop]
    return write_zip(out, entries + list(extra))


# -- round trip ------------------------------------------------------------------

def test_export_holds_exactly_the_manifest_and_its_files(tiny_packs, archive):
    data, manifest = members(archive)
    assert set(data) == {MANIFEST_FILE, *manifest["files"]} == {MANIFEST_FILE, *PACK_FILES}
    assert data[MANIFEST_FILE] == (tiny_packs / "en" / MANIFEST_FILE).read_bytes()
    for name, digest in manifest["files"].items():
        assert hashlib.sha256(data[name]).hexdigest() == digest
    assert not any(n.startswith(".encoders") or "encoder.weights" in n for n in data)  # named, not copied
    assert manifest["encoder"]["digest"] and manifest["encoder"]["id"]


def test_export_is_reproducible(tiny_packs, archive, tmp_path):
    again = export_pack(tiny_packs, "en", tmp_path)  # a folder: the archive is named for the pack
    assert again.path.name == "capkit-en-1.0.0.cappack"
    assert again.path.read_bytes() == archive.read_bytes()


def test_round_trip_captions_identically(tiny_packs, tiny_dataset, archive, target):
    from toolkit.pipeline import caption_images

    before = listing(target)
    res = import_pack(archive, target)
    assert res.action == "installed" and res.warnings == []
    assert set(installed_packs(target)) == {"en"}
    for name in (MANIFEST_FILE, *PACK_FILES):
        assert (target / "en" / name).read_bytes() == (tiny_packs / "en" / name).read_bytes()
    assert not [p for p in target.iterdir() if p.name.startswith(".import")]
    assert len(listing(target)) == len(before) + 1 + len(PACK_FILES) + 1
    images = sorted(tiny_dataset["images"].iterdir())[:8]
    theirs = caption_images(images, ["en"], target, beam=2).rows
    ours = caption_images(images, ["en"], tiny_packs, beam=2).rows
    assert theirs == ours and len(theirs) == 8


def test_importing_the_same_pack_again_is_a_no_op(archive, target):
    import_pack(archive, target)
    before = listing(target)
    res = import_pack(archive, target)
    assert res.action == "unchanged" and res.previous_version == "1.0.0"
    assert listing(target) == before


def test_other_version_or_build_needs_force(archive, target, tmp_path):
    import_pack(archive, target)
    newer = forge(archive, tmp_path / "newer.cappack", manifest_edit=lambda m: m.update(pack_version="1.1.0"))
    rebuilt = forge(archive, tmp_path / "rebuilt.cappack", manifest_edit=lambda m: m.update(created="2031-01-01T00:00:00Z"))
    before = listing(target)
    with pytest.raises(CapkitError, match=r"en pack 1\.0\.0 .* is installed; this archive holds 1\.1\.0") as e:
        import_pack(newer, target)
    assert "--force" in e.value.hint
    with pytest.raises(CapkitError, match="a different build of en 1.0.0"):
        import_pack(rebuilt, target)
    assert listing(target) == before
    res = import_pack(newer, target, force=True)
    assert res.action == "replaced" and res.previous_version == "1.0.0"
    assert load_manifest(target / "en")["pack_version"] == "1.1.0"
    assert verify_files(target / "en", res.manifest) == []
    assert not (target / "en.old").exists()


def test_import_never_overwrites_a_folder_that_is_not_a_pack(archive, target):
    (target / "en").mkdir()
    (target / "en" / "notes.txt").write_text("mine")
    with pytest.raises(CapkitError, match="is not a pack"):
        import_pack(archive, target)
    assert (target / "en" / "notes.txt").read_text() == "mine"


def test_missing_encoder_is_a_warning_with_the_way_to_get_it(archive, tmp_path):
    packs = tmp_path / "bare"
    res = import_pack(archive, packs)
    assert res.action == "installed" and (packs / "en" / MANIFEST_FILE).is_file()
    (w,) = res.warnings
    enc = res.manifest["encoder"]
    assert f"encoder {enc['id']}" in w and "is not in" in w
    assert "capkit encode --encoder-weights none --image-size 71" in w


def test_export_refuses_a_damaged_pack(tiny_packs, tmp_path):
    packs = tmp_path / "packs"
    shutil.copytree(tiny_packs / "en", packs / "en")
    (packs / "en" / MODEL_CARD_FILE).write_text("edited")
    with pytest.raises(CapkitError, match="README.md does not match its checksum"):
        export_pack(packs, "en", tmp_path / "out.cappack")
    assert not list(tmp_path.glob("*.cappack")) and not list(tmp_path.glob(".*.tmp"))


# -- hostile archives ------------------------------------------------------------------

def _symlink(name: str, to: bytes):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, to


def _bomb(archive, out):
    zeros = bytes(20 * 2**20)  # 20 MiB of zeros deflate to ~20 kB
    return forge(archive, out, replace={HISTORY_FILE: zeros}, rehash=True)


def _lying_header(archive, out):
    """A bomb whose central directory claims 1 kB: the reader must stop on what it reads, not on the claim."""
    path = _bomb(archive, out)
    blob = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        pos = zf.start_dir
        for info in zf.infolist():
            n, m, k = struct.unpack("<HHH", blob[pos + 28 : pos + 34])
            if info.filename == HISTORY_FILE:
                blob[pos + 24 : pos + 28] = struct.pack("<I", 1000)
            pos += 46 + n + m + k
    path.write_bytes(bytes(blob))
    return path


def _dup(archive, out):
    data, _ = members(archive)
    return write_zip(out, list(data.items()) + [(MODEL_CARD_FILE, b"# second card")])


HOSTILE = {
    "absolute path": (lambda a, o: forge(a, o, extra=[("/tmp/capkit-evil.txt", b"x")]), "absolute"),
    "dot-dot": (lambda a, o: forge(a, o, extra=[("../evil.txt", b"x")]), r"climbs out of its folder with '\.\.'"),
    "nested dot-dot": (lambda a, o: forge(a, o, extra=[("ok/../../evil.txt", b"x")]), r"'\.\.'"),
    "symlink": (lambda a, o: forge(a, o, drop=[MODEL_CARD_FILE], extra=[_symlink(MODEL_CARD_FILE, b"/etc/passwd")]),
                "symbolic link"),
    "directory": (lambda a, o: forge(a, o, extra=[("sub/", b"")]), "is a directory"),
    "file in a folder": (lambda a, o: forge(a, o, extra=[("sub/x.txt", b"x")]), "inside a folder"),
    "unexpected file": (lambda a, o: forge(a, o, extra=[("run.py", b"import os")]), r"unexpected file.*run\.py"),
    "missing file": (lambda a, o: forge(a, o, drop=[HISTORY_FILE]), r"missing: history\.json"),
    "duplicate name": (_dup, "appears twice"),
    "checksum mismatch": (lambda a, o: forge(a, o, replace={DECODER_WEIGHTS_FILE: b"not the weights"}),
                          r"decoder\.weights\.h5 does not match its checksum"),
    "zip bomb": (_bomb, "zip bomb"),
    "lying size header": (_lying_header, "damaged"),
    "future format": (lambda a, o: forge(a, o, manifest_edit=lambda m: m.update(format_version=FORMAT_VERSION + 1)),
                      rf"format version {FORMAT_VERSION + 1} \(newer\); this toolkit reads version {FORMAT_VERSION}"),
    "missing field": (lambda a, o: forge(a, o, manifest_edit=lambda m: m.pop("pack_version")),
                      "invalid manifest .*'pack_version' is a required property"),
    "path in the manifest": (lambda a, o: forge(a, o, manifest_edit=lambda m: m["files"].update({"../x": "0" * 64})),
                             r"manifest lists the file '\.\./x'"),
    "language escaping": (lambda a, o: forge(a, o, manifest_edit=lambda m: m.update(lang="../en")), "invalid manifest at lang"),
    "no manifest": (lambda a, o: forge(a, o, drop=[MANIFEST_FILE]), "no manifest.json"),
    "not a zip": (lambda a, o: (o.write_bytes(b"#!/bin/sh\nrm -rf ~\n"), o)[1], "not a capkit pack archive"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_is_refused_and_nothing_is_written(case, archive, target, tmp_path):
    make, message = HOSTILE[case]
    bad = make(archive, tmp_path / "bad.cappack")
    before = listing(target)
    with pytest.raises(CapkitError, match=message):
        import_pack(bad, target)
    assert listing(target) == before
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/capkit-evil.txt").exists()


def test_total_size_limit_is_settable(archive, target):
    before = listing(target)
    with pytest.raises(CapkitError, match=r"uncompressed, over the .* limit") as e:
        import_pack(archive, target, max_bytes=10_000)
    assert "--max-size-mb" in e.value.hint
    assert listing(target) == before


def test_failed_import_into_a_new_folder_leaves_no_folder(archive, tmp_path):
    bad = forge(archive, tmp_path / "bad.cappack", replace={DECODER_WEIGHTS_FILE: b"x"})
    with pytest.raises(CapkitError, match="checksum"):
        import_pack(bad, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


# -- manifests and encoders at load time ----------------------------------------------

def _edit_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / MANIFEST_FILE).read_text())
    edit(m)
    (folder / MANIFEST_FILE).write_text(json.dumps(m))


@pytest.fixture
def packs_copy(tiny_packs, tmp_path) -> Path:
    packs = tmp_path / "packs"
    shutil.copytree(tiny_packs, packs)
    return packs


def test_load_pack_names_both_versions_of_a_future_format(packs_copy):
    from toolkit.pipeline import load_pack

    _edit_manifest(packs_copy / "en", lambda m: m.update(format_version=7))
    with pytest.raises(CapkitError, match=rf"format version 7 \(newer\); this toolkit reads version {FORMAT_VERSION}") as e:
        load_pack(packs_copy, "en")
    assert e.value.hint == "upgrade capkit"


def test_load_pack_refuses_a_manifest_missing_a_field(packs_copy):
    from toolkit.pipeline import load_pack

    _edit_manifest(packs_copy / "en", lambda m: m["encoder"].pop("digest"))
    with pytest.raises(CapkitError, match="invalid manifest at encoder: 'digest' is a required property"):
        load_pack(packs_copy, "en")


def test_pack_trained_on_another_encoder_is_refused(packs_copy, tiny_dataset):
    from toolkit.pipeline import caption_images, load_pack

    ours = load_manifest(packs_copy / "en")["encoder"]["id"]
    _edit_manifest(packs_copy / "zh", lambda m: m["encoder"].update(id="xception-71-0123456789ab", digest="ab" * 32))
    with pytest.raises(CapkitError, match=f"trained with encoder xception-71-0123456789ab, not {ours}"):
        load_pack(packs_copy, "zh", encoder_id=ours)
    images = sorted(tiny_dataset["images"].iterdir())[:2]
    with pytest.raises(CapkitError, match="different encoders"):
        caption_images(images, ["all"], packs_copy)
    with pytest.raises(CapkitError, match="encoder xception-71-0123456789ab is not in"):
        caption_images(images, ["zh"], packs_copy)


def test_weights_load_only_into_the_manifest_architecture(packs_copy):
    from toolkit.pipeline import load_pack

    _edit_manifest(packs_copy / "en", lambda m: m["decoder"].update(units=64))
    with pytest.raises(CapkitError, match="do not fit the manifest's architecture"):
        load_pack(packs_copy, "en")


def test_no_code_executing_loader_anywhere_in_toolkit():
    """Pack contents are data: no pickle, no pickled numpy, no Keras model (config + code) deserialisation."""
    banned_names = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "load_model", "Lambda"}
    found = []
    for path in sorted((REPO / "toolkit").rglob("*.py")):
        toks = [t for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
                if t.type in (tokenize.NAME, tokenize.OP)]  # code only: comments and docstrings may say "no pickle"
        for i, t in enumerate(toks):
            where = f"{path.relative_to(REPO)}:{t.start[0]}"
            if t.type == tokenize.NAME and t.string in banned_names:
                found.append(f"{where}: {t.string}")
            if t.string in ("allow_pickle", "safe_mode") and i + 2 < len(toks) and toks[i + 1].string == "=":
                if toks[i + 2].string == ("True" if t.string == "allow_pickle" else "False"):
                    found.append(f"{where}: {t.string}={toks[i + 2].string}")
    assert found == []


# -- atomic writes --------------------------------------------------------------

def test_build_killed_between_files_leaves_the_old_pack(packs_copy, tiny_dataset, monkeypatch):
    import toolkit.build as build
    from toolkit.pipeline import caption_images

    images = sorted(tiny_dataset["images"].iterdir())[:6]
    manifest_before = (packs_copy / "en" / MANIFEST_FILE).read_bytes()
    captions_before = caption_images(images, ["en"], packs_copy, beam=1).rows
    real_write, calls = build.write_captions, []

    def dies_on_second_file(*args, **kwargs):  # captions.txt is written; the kill comes before references.txt
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(*args, **kwargs)

    monkeypatch.setattr(build, "write_captions", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        build_tiny_pack("en", tiny_dataset, packs_copy, pack_version="2.0.0", train=dict(epochs=1))
    assert len(calls) == 2
    monkeypatch.undo()
    assert set(installed_packs(packs_copy)) == {"en", "zh"}
    assert (packs_copy / "en" / MANIFEST_FILE).read_bytes() == manifest_before
    assert verify_files(packs_copy / "en", load_manifest(packs_copy / "en")) == []
    assert caption_images(images, ["en"], packs_copy, beam=1).rows == captions_before


def _staged_copy(tiny_packs: Path, packs: Path) -> tuple[Path, Path]:
    shutil.copytree(tiny_packs / "en", packs / "en")
    staged = packs / ".staging-en"
    shutil.copytree(tiny_packs / "en", staged)
    (staged / MODEL_CARD_FILE).write_text("# new card\n")
    return packs / "en", staged


def _rename_dies_at(monkeypatch, n: int) -> None:
    real, count = os.rename, [0]

    def rename(src, dst):
        count[0] += 1
        if count[0] == n:
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def test_recover_puts_back_a_pack_cut_between_its_renames(tiny_packs, tmp_path, monkeypatch):
    final, staged = _staged_copy(tiny_packs, tmp_path / "packs")
    card = (final / MODEL_CARD_FILE).read_bytes()
    _rename_dies_at(monkeypatch, 2)  # en -> en.old done; .staging-en -> en never happens
    with pytest.raises(KeyboardInterrupt):
        install_dir(staged, final)
    monkeypatch.undo()
    assert not final.exists() and final.with_name("en.old").is_dir()
    assert set(installed_packs(tmp_path / "packs")) == {"en"}  # every reader recovers first
    assert (final / MODEL_CARD_FILE).read_bytes() == card and not final.with_name("en.old").exists()
    assert verify_files(final, load_manifest(final)) == []


def test_install_after_a_cut_install_keeps_the_old_pack_until_the_new_one_is_in(tiny_packs, tmp_path, monkeypatch):
    final, staged = _staged_copy(tiny_packs, tmp_path / "packs")
    card = (final / MODEL_CARD_FILE).read_bytes()
    os.rename(final, final.with_name("en.old"))  # as a cut install leaves it, no reader since
    _rename_dies_at(monkeypatch, 3)  # en.old -> en, en -> en.old, then dies before .staging-en -> en
    with pytest.raises(KeyboardInterrupt):
        install_dir(staged, final)
    monkeypatch.undo()
    assert set(installed_packs(tmp_path / "packs")) == {"en"}
    assert (final / MODEL_CARD_FILE).read_bytes() == card
    install_dir(staged, final)
    assert (final / MODEL_CARD_FILE).read_text() == "# new card\n"
    assert not final.with_name("en.old").exists() and not staged.exists()


def test_recover_finishes_a_swap_cut_before_its_clean_up(tiny_packs, tmp_path):
    packs = tmp_path / "packs"
    shutil.copytree(tiny_packs / "en", packs / "en")
    shutil.copytree(tiny_packs / "en", packs / "en.old")
    assert set(installed_packs(packs)) == {"en"} and not (packs / "en.old").exists()


# -- the commands -----------------------------------------------------------------

def test_cli_export_import_verify(tiny_packs, tmp_path):
    out = tmp_path / "en.cappack"
    r = capkit("packs", "export", "en", "-o", str(out), "--packs-dir", str(tiny_packs))
    assert r.returncode == 0, r.stderr
    assert f"exported en 1.0.0 ({1 + len(PACK_FILES)} files" in r.stdout and out.is_file()

    bare = tmp_path / "bare"
    r = capkit("packs", "import", str(out), env_packs=bare)
    assert r.returncode == 0, r.stderr
    assert f"installed en 1.0.0 in {bare / 'en'}" in r.stdout
    assert "warning: encoder" in r.stderr and "capkit encode --encoder-weights none" in r.stderr

    r = capkit("packs", "import", str(out), "--packs-dir", str(bare))
    assert r.returncode == 0 and "already installed, identical; nothing to do" in r.stdout

    r = capkit("packs", "verify", "en", "--packs-dir", str(bare))
    assert r.returncode == 1 and "is not in" in r.stdout and "capkit encode" in r.stdout


def test_cli_refusals_are_messages_not_tracebacks(archive, tmp_path):
    bad = forge(archive, tmp_path / "bad.cappack", extra=[("../evil.txt", b"x")])
    packs = tmp_path / "packs"
    r = capkit("packs", "import", str(bad), "--packs-dir", str(packs))
    assert r.returncode == 2 and "error:" in r.stderr and "'..'" in r.stderr
    assert "Traceback" not in r.stderr and not packs.exists()

    assert capkit("packs", "import", str(archive), "--packs-dir", str(packs)).returncode == 0
    newer = forge(archive, tmp_path / "newer.cappack", manifest_edit=lambda m: m.update(pack_version="1.1.0"))
    r = capkit("packs", "import", str(newer), "--packs-dir", str(packs))
    assert r.returncode == 2 and "hint: pass --force" in r.stderr and "Traceback" not in r.stderr
    r = capkit("packs", "import", str(newer), "--packs-dir", str(packs), "--force")
    assert r.returncode == 0 and "replaced en 1.0.0 by 1.1.0" in r.stdout

    r = capkit("packs", "import", str(archive), "--packs-dir", str(packs), "--max-size-mb", "0", "--force")
    assert r.returncode == 2 and "limit" in r.stderr and "Traceback" not in r.stderr

    r = capkit("packs", "export", "tr", "-o", str(tmp_path / "tr.cappack"), "--packs-dir", str(packs))
    assert r.returncode == 2 and "no 'tr' pack" in r.stderr and not (tmp_path / "tr.cappack").exists()
