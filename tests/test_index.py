"""Pack indexes, downloads and installs, against a local server on 127.0.0.1; and packs that carry their encoder."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pack_server import PackServer
from toolkit.encoder import ENCODER_FILE, ENCODER_WEIGHTS_FILE, ENCODERS_DIR, Encoder
from toolkit.errors import CapkitError
from toolkit.index import DOWNLOADS_DIR, DownloadCut, available, build_index, install, load_index, resolve, validate_index
from toolkit.pack import MANIFEST_FILE, PACK_FILES, WORK_DIR, installed_packs
from toolkit.share import export_pack, import_pack, read_archive

REPO = Path(__file__).resolve().parents[1]


def listing(folder: Path) -> list[str]:
    if not folder.exists():
        return []
    return sorted(f"{p.relative_to(folder)}:{p.stat().st_size if p.is_file() else 'dir'}" for p in folder.rglob("*"))


def rewrite(archive: Path, out: Path, *, manifest_edit=None, encoder_edit=None, replace=None) -> Path:
    """A copy of `archive` with its manifest or carried encoder.json edited, or members replaced."""
    with zipfile.ZipFile(archive) as zf:
        data = {n: zf.read(n) for n in zf.namelist()}
    for name, edit in ((MANIFEST_FILE, manifest_edit), (ENCODER_FILE, encoder_edit)):
        if edit:
            doc = json.loads(data[name])
            edit(doc)
            data[name] = json.dumps(doc, indent=2).encode()
    data.update(replace or {})
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, blob in data.items():
            zf.writestr(name, blob)
    return out


@pytest.fixture(scope="module")
def shelf(tiny_packs, tmp_path_factory) -> Path:
    """What a group would serve: en 1.0.0, zh 1.0.0 and zh 1.1.0, encoder included, and their index."""
    folder = tmp_path_factory.mktemp("shelf")
    export_pack(tiny_packs, "en", folder, with_encoder=True)
    zh = export_pack(tiny_packs, "zh", folder, with_encoder=True).path
    rewrite(zh, folder / "capkit-zh-1.1.0.cappack", manifest_edit=lambda m: m.update(pack_version="1.1.0"))
    build_index(folder)
    return folder


@pytest.fixture
def served(shelf, tmp_path):
    """A fresh copy of the shelf, served; tests may edit the copy."""
    root = tmp_path / "www"
    shutil.copytree(shelf, root)
    with PackServer(root) as server:
        server.root = root
        yield server


def edit_index(root: Path, edit) -> None:
    path = root / "index.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def entry(data: dict, lang: str, version: str) -> dict:
    return next(e for e in data["packs"] if e["lang"] == lang and e["version"] == version)


# -- the index ----------------------------------------------------------------------

def test_index_lists_each_archive_with_what_it_must_be(shelf):
    data = load_index(str(shelf / "index.json")).data
    assert data["format"] == "capkit-index" and data["format_version"] == 1
    assert sorted((e["lang"], e["version"]) for e in data["packs"]) == [("en", "1.0.0"), ("zh", "1.0.0"), ("zh", "1.1.0")]
    for e in data["packs"]:
        archive = shelf / e["url"]
        assert e["size"] == archive.stat().st_size
        assert e["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
        manifest, carried = read_archive(archive)
        assert e["encoder"]["digest"] == manifest["encoder"]["digest"] and e["encoder"]["included"] is True
        assert e["scores"]["test"]["bleu4"] == manifest["scores"]["test"]["model"]["bleu4"]
        assert e["scores"]["test"]["cider_d"] == manifest["scores"]["test"]["model"]["cider_d"]
        assert e["toolkit_version"] == manifest["toolkit_version"]
    # written elsewhere, URLs are relative to where the index is, and nothing else changes
    again = shelf.parent / "again.json"
    build_index(shelf, again)
    assert json.loads(again.read_text())["packs"] == [{**e, "url": f"{shelf.name}/{e['url']}"} for e in data["packs"]]


def test_resolve_takes_the_newest_or_the_version_named(shelf):
    idx = load_index(str(shelf / "index.json"))
    assert resolve(idx, "zh")["version"] == "1.1.0"
    assert resolve(idx, "zh==1.0.0")["version"] == "1.0.0"
    with pytest.raises(CapkitError, match="no zh 2.0") as e:
        resolve(idx, "zh==2.0")
    assert "1.0.0, 1.1.0" in e.value.hint
    with pytest.raises(CapkitError, match="offers no tr pack"):
        resolve(idx, "tr")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format_version=2), "index format version 2 \\(newer\\)"),
    (lambda d: d["packs"][0].update(name="../../etc/capkit-zh"), "invalid index at packs/0/name"),
    (lambda d: d["packs"][0].update(lang="../zh"), "invalid index at packs/0/lang"),
    (lambda d: d["packs"][0].update(version="1.0/../../x"), "invalid index at packs/0/version"),
    (lambda d: d["packs"][0].update(url="file:///etc/passwd"), "not an http or https URL"),
    (lambda d: d["packs"][0].pop("sha256"), "'sha256' is a required property"),
    (lambda d: d["packs"].append(dict(d["packs"][0])), "listed twice"),
])
def test_a_bad_index_is_refused(shelf, edit, message):
    data = json.loads((shelf / "index.json").read_text())
    edit(data)
    with pytest.raises(CapkitError, match=message):
        validate_index(data, "index.json")


# -- installing from a server ----------------------------------------------------------

def test_install_by_name_registers_the_encoder_and_captions(served, tiny_packs, tiny_dataset, tmp_path):
    from toolkit.pipeline import caption_images

    packs = tmp_path / "fresh"
    events = []
    r = install("zh==1.0.0", packs, index=served.url("index.json"), report=lambda kind, **f: events.append((kind, f)))
    assert r.imported.action == "installed" and r.imported.encoder_registered == "archive"
    assert r.imported.warnings == [] and r.entry["version"] == "1.0.0"
    assert r.source == served.url("capkit-zh-1.0.0.cappack")
    assert set(installed_packs(packs)) == {"zh"}
    for name in (MANIFEST_FILE, *PACK_FILES):
        assert (packs / "zh" / name).read_bytes() == (tiny_packs / "zh" / name).read_bytes()
    enc_id = r.imported.manifest["encoder"]["id"]
    assert Encoder.load(packs, enc_id).identity["digest"] == r.imported.manifest["encoder"]["digest"]
    done = [f for kind, f in events if kind == "progress" and f["stage"] == "download"]
    assert done[-1]["done"] == done[-1]["total"] == r.entry["size"] and done[-1]["unit"] == "B"
    images = sorted(tiny_dataset["images"].iterdir())[:6]
    assert caption_images(images, ["zh"], packs).rows == caption_images(images, ["zh"], tiny_packs).rows
    # nothing left beside the pack and its encoder: the download and the folders made for it are gone
    assert sorted(p.name for p in packs.iterdir()) == [ENCODERS_DIR, "zh"]
    assert sorted(p.name for p in (packs / ENCODERS_DIR).iterdir()) == [enc_id]


def test_install_resumes_after_the_connection_drops_half_way(served, tmp_path):
    size = entry(json.loads((served.root / "index.json").read_text()), "zh", "1.1.0")["size"]
    served.drop("/capkit-zh-1.1.0.cappack", after=size // 2)
    r = install("zh", tmp_path / "fresh", index=served.url("index.json"))
    assert r.imported.action == "installed" and r.imported.manifest["pack_version"] == "1.1.0"
    gets = [rng for path, rng in served.requests if path == "/capkit-zh-1.1.0.cappack"]
    assert gets[0] is None and len(gets) == 2
    resumed_at = int(gets[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= size // 2  # only the rest was asked for


ZH11 = "/capkit-zh-1.1.0.cappack"


def cut_install(served, packs: Path, cut="ctrl-c") -> Path:
    """`capkit packs install zh` stopped by `cut` once the first bytes are on disk; the file they are in."""
    size = entry(json.loads((served.root / "index.json").read_text()), "zh", "1.1.0")["size"]
    served.drop(ZH11, after=size // 2)  # the first chunk is then less than the whole file

    def stop(kind, **fields):
        if kind != "progress":
            return
        if cut == "ctrl-c":
            raise KeyboardInterrupt
        if cut == "disk full":
            raise OSError(errno.ENOSPC, "No space left on device")
        served.unavailable(ZH11, times=100)  # the network goes: the resumes get 503 until the tries run out

    with pytest.raises({"ctrl-c": KeyboardInterrupt, "disk full": OSError, "network": DownloadCut}[cut]):
        install("zh", packs, index=served.url("index.json"), report=stop)
    served.unavailable(ZH11, times=0)
    parts = list((packs / WORK_DIR / DOWNLOADS_DIR).iterdir())
    assert len(parts) == 1 and not installed_packs(packs)
    assert 0 < parts[0].stat().st_size <= size // 2
    return parts[0]


@pytest.mark.parametrize("cut", ["ctrl-c", "network", "disk full"])
def test_a_cut_install_resumes_in_the_next_run(served, tmp_path, monkeypatch, cut):
    monkeypatch.setattr("toolkit.index.RETRIES", 2)  # a dropped try, then one 503: given up
    packs = tmp_path / "packs"
    kept = cut_install(served, packs, cut).stat().st_size
    served.requests.clear()
    r = install("zh", packs, index=served.url("index.json"))
    assert r.imported.action == "installed" and r.imported.manifest["pack_version"] == "1.1.0"
    assert [rng for path, rng in served.requests if path == ZH11] == [f"bytes={kept}-"]  # only the rest
    assert sorted(p.name for p in packs.iterdir()) == [ENCODERS_DIR, "zh"]  # the download and its folders are gone


def test_kept_bytes_that_went_bad_are_refused_then_downloaded_afresh(served, tmp_path):
    packs = tmp_path / "packs"
    part = cut_install(served, packs)
    part.write_bytes(b"x" * part.stat().st_size)
    with pytest.raises(CapkitError, match="sha256 of what arrived .* refused") as e:
        install("zh", packs, index=served.url("index.json"))
    assert "downloads it afresh" in e.value.hint
    assert not (packs / WORK_DIR).exists()
    served.requests.clear()
    assert install("zh", packs, index=served.url("index.json")).imported.action == "installed"
    assert [rng for path, rng in served.requests if path == ZH11] == [None]


def test_a_packs_dir_that_cannot_be_written_is_named(served, tmp_path):
    packs = tmp_path / "packs"
    packs.write_text("a file, not a folder")
    with pytest.raises(CapkitError, match="packs: cannot download the pack there"):
        install("zh", packs, index=served.url("index.json"))


def test_a_second_install_of_the_same_pack_at_once_is_refused(served, tmp_path):
    import fcntl

    packs = tmp_path / "packs"
    part = cut_install(served, packs)
    kept = part.read_bytes()
    with open(part, "ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as an install running in another process holds it
        with pytest.raises(CapkitError, match="another capkit is installing zh 1.1.0 into"):
            install("zh", packs, index=served.url("index.json"))
    assert part.read_bytes() == kept


def test_install_from_a_url_and_from_a_file(served, shelf, tmp_path):
    r = install(served.url("capkit-en-1.0.0.cappack"), tmp_path / "a")
    assert r.imported.action == "installed" and r.entry is None
    r = install(str(shelf / "capkit-en-1.0.0.cappack"), tmp_path / "b")
    assert r.imported.action == "installed" and r.imported.encoder_registered == "archive"


def _wrong_checksum(root):
    edit_index(root, lambda d: entry(d, "zh", "1.1.0").update(sha256="0" * 64))


def _wrong_size(root):
    edit_index(root, lambda d: entry(d, "zh", "1.1.0").update(size=entry(d, "zh", "1.1.0")["size"] - 1))


def _wrong_file_same_name(root):  # the server holds another archive under the entry's URL
    shutil.copyfile(root / "capkit-en-1.0.0.cappack", root / "capkit-zh-1.1.0.cappack")


def _entry_points_at_another_pack(root):  # size and sha256 match what arrives, but it is not the pack named
    def edit(d):
        en, zh = entry(d, "en", "1.0.0"), entry(d, "zh", "1.1.0")
        zh.update(url=en["url"], size=en["size"], sha256=en["sha256"])

    edit_index(root, edit)


def _redirect_to_another_scheme(server):
    server.redirect("/capkit-zh-1.1.0.cappack", f"https://127.0.0.1:{server.port}/capkit-zh-1.1.0.cappack")


def _path_like_name(root):
    edit_index(root, lambda d: entry(d, "zh", "1.1.0").update(name="../../capkit-zh"))


@pytest.mark.parametrize("case, message", [
    (_wrong_checksum, "the sha256 of what arrived is not the one its index entry gives; refused"),
    (_wrong_size, "the server sends \\d+ bytes, its index entry says \\d+; refused"),
    (_wrong_file_same_name, "(sha256|bytes).* refused"),
    (_entry_points_at_another_pack, "holds another pack than its index entry says \\(lang 'en', not 'zh'"),
    (_redirect_to_another_scheme, "redirects to https://.*another scheme; refused"),
    (_path_like_name, "invalid index at packs/\\d/name"),
])
def test_install_refusals_write_nothing(served, tmp_path, case, message):
    case(served if case is _redirect_to_another_scheme else served.root)
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "keep.txt").write_text("mine")
    before = listing(packs)
    with pytest.raises(CapkitError, match=message):
        install("zh", packs, index=served.url("index.json"))
    assert listing(packs) == before


def test_an_index_without_a_location_is_an_error(monkeypatch, tmp_path):
    monkeypatch.delenv("CAPKIT_INDEX", raising=False)
    with pytest.raises(CapkitError, match="no pack index given") as e:
        install("zh", tmp_path / "packs")
    assert "CAPKIT_INDEX" in e.value.hint
    with pytest.raises(CapkitError, match="http and https URLs only"):
        install("ftp://127.0.0.1/zh.cappack", tmp_path / "packs")
    assert not (tmp_path / "packs").exists()


def test_available_marks_newer_versions(served, tmp_path):
    packs = tmp_path / "packs"
    install("zh==1.0.0", packs, index=served.url("index.json"))
    rows = available(load_index(served.url("index.json")), packs)
    status = {(r["lang"], r["version"]): (r["installed"], r["status"]) for r in rows}
    assert status == {("en", "1.0.0"): (None, ""), ("zh", "1.1.0"): ("1.0.0", "newer"), ("zh", "1.0.0"): ("1.0.0", "installed")}


def capkit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_cli_index_install_available_caption(shelf, tmp_path, tiny_dataset):
    root = tmp_path / "www"
    shutil.copytree(shelf, root)
    (root / "index.json").unlink()
    r = capkit("packs", "index", str(root), "-o", str(root / "index.json"))
    assert r.returncode == 0, r.stderr
    assert "indexed 3 pack(s)" in r.stdout
    packs = tmp_path / "packs"
    with PackServer(root) as server:
        env = {"CAPKIT_INDEX": server.url("index.json"), "CAPKIT_PACKS_DIR": str(packs)}
        r = capkit("packs", "install", "zh", env=env)
        assert r.returncode == 0, r.stderr
        assert f"installed zh 1.1.0 in {packs / 'zh'}" in r.stdout and "registered encoder xception-71-" in r.stdout
        r = capkit("packs", "available", env=env)
        assert r.returncode == 0, r.stderr
        lines = {tuple(line.split()[:3]): line for line in r.stdout.splitlines()[1:]}
        assert lines[("zh", "capkit-zh", "1.1.0")].endswith("installed")
        assert "older than installed" in lines[("zh", "capkit-zh", "1.0.0")]
        image = sorted(tiny_dataset["images"].iterdir())[0]
        r = capkit("caption", str(image), "--lang", "zh", env=env)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"{image}\t") and len(r.stdout.split("\t")[1].strip()) > 0
        server.redirect("/capkit-en-1.0.0.cappack", "file:///etc/passwd")
        r = capkit("packs", "install", "en", env=env)
        assert r.returncode == 2 and "error:" in r.stderr and "another scheme" in r.stderr
        assert "Traceback" not in r.stderr and not (packs / "en").exists()


# -- packs that carry encoder weights ---------------------------------------------------

@pytest.fixture(scope="module")
def weights_pack(tmp_path_factory, tiny_dataset):
    """A packs dir with an `en` pack over an encoder read from a weights file (not random init), and that file."""
    import keras

    from toolkit.config import DecoderConfig, EncoderConfig, TrainConfig
    from toolkit.pipeline import build_pack
    from conftest import TINY_DECODER, TINY_ENCODER, TINY_TRAIN

    root = tmp_path_factory.mktemp("weights_pack")
    keras.utils.set_random_seed(7)
    weights = root / "mine.weights.h5"
    keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3)).save_weights(weights)
    packs = root / "packs"
    d = tiny_dataset
    build_pack("en", d["captions_en"], d["images"], {"train": d["train"], "dev": d["dev"], "test": d["test"]}, packs,
               source_lang="en", encoder_config=EncoderConfig(**{**TINY_ENCODER, "weights": str(weights)}),
               decoder_config=DecoderConfig(**TINY_DECODER), train_config=TrainConfig(**{**TINY_TRAIN, "epochs": 1}))
    archive = export_pack(packs, "en", root / "with.cappack", with_encoder=True).path
    bare = export_pack(packs, "en", root / "bare.cappack").path
    return packs, weights, archive, bare


def test_carried_weights_are_checked_and_registered(weights_pack, tmp_path):
    packs, weights, archive, _ = weights_pack
    manifest, carried = read_archive(archive)
    assert manifest["encoder"]["source"] == "file"
    home = packs / ENCODERS_DIR / manifest["encoder"]["id"]
    assert carried["weights"] == {"file": ENCODER_WEIGHTS_FILE, "size": (home / ENCODER_WEIGHTS_FILE).stat().st_size,
                                  "sha256": hashlib.sha256((home / ENCODER_WEIGHTS_FILE).read_bytes()).hexdigest()}
    fresh = tmp_path / "fresh"
    r = import_pack(archive, fresh)
    assert r.encoder_registered == "archive" and r.warnings == []
    mine = fresh / ENCODERS_DIR / manifest["encoder"]["id"]
    assert (mine / ENCODER_WEIGHTS_FILE).read_bytes() == (home / ENCODER_WEIGHTS_FILE).read_bytes()
    assert Encoder.load(fresh, manifest["encoder"]["id"]).identity["digest"] == manifest["encoder"]["digest"]
    assert json.loads((mine / ENCODER_FILE).read_text())["feature_scale"] == json.loads((home / ENCODER_FILE).read_text())["feature_scale"]
    # importing again: the pack is the same and the encoder is there; the weights are checked, not written
    before = listing(fresh)
    assert import_pack(archive, fresh).action == "unchanged" and listing(fresh) == before


def test_altered_weights_are_refused_whatever_their_declared_hash(weights_pack, tiny_encoder, tmp_path):
    packs, weights, archive, _ = weights_pack
    with zipfile.ZipFile(archive) as zf:
        blob = bytearray(zf.read(ENCODER_WEIGHTS_FILE))
    blob[len(blob) // 2] ^= 0xFF
    flipped = rewrite(archive, tmp_path / "flipped.cappack", replace={ENCODER_WEIGHTS_FILE: bytes(blob)})
    # other, valid Xception weights, declared honestly: only the digest as loaded can tell
    other = tmp_path / "other.weights.h5"
    tiny_encoder.model.save_weights(other)
    data = other.read_bytes()
    swapped = rewrite(archive, tmp_path / "swapped.cappack", replace={ENCODER_WEIGHTS_FILE: data},
                      encoder_edit=lambda e: e["weights"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    for bad, message in ((flipped, "does not match the size and sha256 its encoder.json declares"),
                         (swapped, "are not the encoder .* the pack was trained with")):
        fresh = tmp_path / "fresh"
        with pytest.raises(CapkitError, match=message):
            import_pack(bad, fresh)
        assert not fresh.exists()


def test_carried_encoder_must_be_the_one_the_manifest_names(weights_pack, tmp_path):
    _, _, archive, _ = weights_pack
    bad = rewrite(archive, tmp_path / "bad.cappack", encoder_edit=lambda e: e.update(digest="0" * 64))
    with pytest.raises(CapkitError, match="not the encoder the manifest names \\(digest differ"):
        import_pack(bad, tmp_path / "fresh")
    bad = rewrite(archive, tmp_path / "big.cappack", encoder_edit=lambda e: e["weights"].update(size=5))
    with pytest.raises(CapkitError, match="its encoder.json says 5; refused"):
        import_pack(bad, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_imagenet_pack_without_its_encoder_says_how_to_get_it(weights_pack, tmp_path, monkeypatch):
    """The ImageNet case, with this test's weights standing in for ImageNet's (no download here)."""
    import toolkit.encoder

    packs, weights, _, bare = weights_pack
    manifest, _ = read_archive(bare)
    monkeypatch.setattr(toolkit.encoder, "IMAGENET_DIGESTS", frozenset({manifest["encoder"]["digest"]}))
    r = import_pack(bare, tmp_path / "a")
    (w,) = r.warnings
    assert f"encoder {manifest['encoder']['id']}" in w and "is not in" in w
    assert "its encoder is the ImageNet Xception" in w and "--encoder-weights imagenet" in w and "--encoder-weights PATH" in w
    r = import_pack(bare, tmp_path / "b", encoder_weights=str(weights))
    assert r.encoder_registered == str(weights) and r.warnings == []
    assert Encoder.load(tmp_path / "b", manifest["encoder"]["id"]).identity["digest"] == manifest["encoder"]["digest"]
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not weights")
    with pytest.raises(CapkitError, match="not Xception"):
        import_pack(bare, tmp_path / "c", encoder_weights=str(junk))
    assert not (tmp_path / "c").exists()


def test_encoder_weights_imagenet_is_refused_for_another_encoder(weights_pack, tmp_path):
    _, _, _, bare = weights_pack
    with pytest.raises(CapkitError, match="is not the ImageNet Xception; nothing installed"):
        import_pack(bare, tmp_path / "a", encoder_weights="imagenet")
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_imagenet_digest_is_that_of_the_imagenet_weights():
    """Where $CAPKIT_IMAGENET_WEIGHTS names the ImageNet Xception weights file, its digest is the constant's."""
    path = os.environ.get("CAPKIT_IMAGENET_WEIGHTS")
    if not path or not Path(path).is_file():
        pytest.skip("set CAPKIT_IMAGENET_WEIGHTS to the ImageNet Xception (no top) .weights.h5")
    from toolkit.config import EncoderConfig
    from toolkit.encoder import IMAGENET_DIGESTS, _build, _digest

    assert _digest(_build(EncoderConfig(image_size=71, weights=path), path)) in IMAGENET_DIGESTS


def test_export_to_a_folder_not_there_yet(tiny_packs, tmp_path):
    r = export_pack(tiny_packs, "en", f"{tmp_path / 'shelf'}/")
    assert r.path == tmp_path / "shelf" / "capkit-en-1.0.0.cappack" and r.path.is_file() and not r.with_encoder
