"""From a download to a build: layouts found, splits found, shipped or made, the packs dir's encoder reused."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_cli_errors import capkit, fast_build, one_error  # noqa: F401  (fast_build is a fixture)
from toolkit.data import parse_split_ratios, read_captions, read_split, split_by_photo, write_split
from toolkit.encoder import ENCODER_FILE, ENCODER_FORMAT, ENCODERS_DIR, choose_encoder, registered_encoders
from toolkit.errors import CapkitError
from toolkit.layout import OFFICIAL_SPLITS_DIR, SPLITS_DIR, find_data, official_splits, plan_data

SMALL = ["--encoder-weights", "none", "--image-size", "71", "--epochs", "1", "--units", "16", "--embed-dim", "8",
         "--vocab-size", "60", "--beam", "1", "--batch-size", "32", "--self-critical-epochs", "0"]


# -- generated downloads -----------------------------------------------------------


def _captions(tiny_dataset) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for c in read_captions(tiny_dataset["captions_en"]).captions:
        out.setdefault(c.image, []).append(c.text)
    return out


def _link_images(src: Path, dst: Path, names) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        os.symlink(src / n, dst / n)


def _write_csv(path: Path, captions: dict[str, list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for image, texts in captions.items():
            for t in texts:
                w.writerow([image, t])


def _write_tokens(path: Path, captions: dict[str, list[str]]) -> None:
    path.write_text("".join(f"{i}#{k}\t{t}\n" for i, ts in captions.items() for k, t in enumerate(ts)), encoding="utf-8")


def kaggle(root: Path, tiny_dataset) -> Path:
    """Kaggle's flickr8k: captions.txt (CSV) and Images/, no split files."""
    caps = _captions(tiny_dataset)
    _link_images(tiny_dataset["images"], root / "Images", caps)
    _write_csv(root / "captions.txt", caps)
    return root


def original(root: Path, tiny_dataset) -> Path:
    """The authors' download: Flickr8k_text/ (token file, lemma file, split files, readme) and Flicker8k_Dataset/."""
    caps = _captions(tiny_dataset)
    _link_images(tiny_dataset["images"], root / "Flicker8k_Dataset", caps)
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    _write_tokens(text / "Flickr8k.token.txt", caps)
    _write_tokens(text / "Flickr8k.lemma.token.txt", {i: [t.lower() for t in ts] for i, ts in caps.items()})
    for k in ("train", "dev", "test"):
        shutil.copy(tiny_dataset[k], text / f"Flickr_8k.{k}Images.txt")
    (text / "readme.txt").write_text("Flickr8k.token.txt - the raw captions\n")
    (text / "ExpertAnnotations.txt").write_text(f"{next(iter(caps))}\t{next(iter(caps))}#2\t1\t1\t1\n")
    return root


def flat(root: Path, tiny_dataset, splits: bool = True) -> Path:
    """One folder: a token file under a name of the user's, split files (or none) and the photos."""
    caps = _captions(tiny_dataset)
    _link_images(tiny_dataset["images"], root, caps)
    _write_tokens(root / "my_captions.txt", caps)
    if splits:
        for k in ("train", "dev", "test"):
            shutil.copy(tiny_dataset[k], root / f"{k}.txt")
    return root


# -- finding -------------------------------------------------------------------


def test_kaggle_layout_is_found(tmp_path, tiny_dataset):
    root = kaggle(tmp_path / "flickr8k", tiny_dataset)
    found = find_data(root)
    assert (found.layout, found.captions, found.image_dirs[0], found.split_files) == (
        "kaggle", root / "captions.txt", root / "Images", {})


def test_original_layout_is_found_with_its_split_files(tmp_path, tiny_dataset):
    root = original(tmp_path / "dl", tiny_dataset)
    found = find_data(root)
    text = root / "Flickr8k_text"
    assert found.layout == "original"
    assert found.captions == text / "Flickr8k.token.txt"  # not the lemma file, the annotations or the readme
    assert found.image_dirs[0] == root / "Flicker8k_Dataset"
    assert found.split_files == {k: text / f"Flickr_8k.{k}Images.txt" for k in ("train", "dev", "test")}


def test_photos_two_levels_down_are_found(tmp_path, tiny_dataset):
    root = original(tmp_path / "dl", tiny_dataset)
    (root / "Flickr8k_Dataset").mkdir()
    (root / "Flicker8k_Dataset").rename(root / "Flickr8k_Dataset" / "Flicker8k_Dataset")  # as some mirrors nest it
    assert find_data(root).image_dirs == [root / "Flickr8k_Dataset" / "Flicker8k_Dataset"]
    assert plan_data(data=root, packs_dir=tmp_path / "p").images == root / "Flickr8k_Dataset" / "Flicker8k_Dataset"


def test_flat_folder_is_found(tmp_path, tiny_dataset):
    root = flat(tmp_path / "mine", tiny_dataset)
    found = find_data(root)
    assert (found.layout, found.captions, found.image_dirs) == ("flat", root / "my_captions.txt", [root])
    assert found.split_files == {k: root / f"{k}.txt" for k in ("train", "dev", "test")}


def test_plan_uses_found_split_files_and_says_what_it_found(tmp_path, tiny_dataset):
    root = original(tmp_path / "dl", tiny_dataset)
    plan = plan_data(data=root, packs_dir=tmp_path / "packs")
    assert plan.split == {"method": "files"}
    assert plan.images == root / "Flicker8k_Dataset"
    assert [line.split(":")[0] for line in plan.notes] == ["data", "captions", "photos", "split"]
    assert "the original Flickr8k layout" in plan.notes[0]
    assert "240 captions of 48 images" in plan.notes[1]
    assert "48 of the 48 captioned images" in plan.notes[2]


@pytest.mark.parametrize("make", [kaggle, lambda root, d: flat(root, d, splits=False)], ids=["kaggle", "flat"])
def test_no_split_files_and_not_flickr8k_makes_a_split_by_photo(tmp_path, tiny_dataset, make):
    root = make(tmp_path / "dl", tiny_dataset)
    packs = tmp_path / "packs"
    plan = plan_data(data=root, packs_dir=packs, seed=3)
    assert plan.split["method"] == "by-photo" and plan.split["seed"] == 3 and plan.split["ratios"] == [0.9, 0.05, 0.05]
    assert (packs / plan.split["folder"]).parent == packs / SPLITS_DIR
    splits = {k: read_split(p) for k, p in plan.split_files.items()}
    assert {k: len(v) for k, v in splits.items()} == {"train": 44, "dev": 2, "test": 2}
    everything = [n for names in splits.values() for n in names]
    assert sorted(everything) == sorted(_captions(tiny_dataset))  # each photo once, on one side
    assert "made one by photo (seed 3, 90/5/5): 44 train, 2 dev, 2 test images" in plan.notes[-1]
    assert "0% of the captioned images are in Flickr8k's official lists" in plan.notes[-1]
    again = plan_data(data=root, packs_dir=packs, seed=3)
    assert {k: read_split(p) for k, p in again.split_files.items()} == splits  # seeded: the same split


def test_flickr8k_photos_without_split_files_get_the_official_split(tmp_path, tiny_dataset):
    official = official_splits()
    assert {k: len(v) for k, v in official.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    # A Kaggle-like download of 12 Flickr8k names (tiny generated pictures under those names) and one of no list.
    names = official["train"][:8] + official["dev"][:2] + official["test"][:2]
    root = tmp_path / "flickr8k"
    (root / "Images").mkdir(parents=True)
    src = sorted(tiny_dataset["images"].iterdir())
    for n, s in zip(names + ["holiday.jpg"], src):
        shutil.copy(s, root / "Images" / n)
    _write_csv(root / "captions.txt", {n: ["a photo", "another caption"] for n in names + ["holiday.jpg"]})
    plan = plan_data(data=root, packs_dir=tmp_path / "packs")
    assert plan.split == {"method": "flickr8k-official"}
    assert plan.split_files == {k: OFFICIAL_SPLITS_DIR / f"Flickr_8k.{k}Images.txt" for k in ("train", "dev", "test")}
    assert "the photos are Flickr8k's (12 of 13 captioned images in its official lists)" in plan.notes[-1]
    assert "6000 train, 1000 dev, 1000 test" in plan.notes[-1] and "1 captioned images are in no list" in plan.notes[-1]
    # --split-ratios asks for a split by photo even so.
    made = plan_data(data=root, packs_dir=tmp_path / "packs", ratios=(0.8, 0.2, 0.0))
    assert made.split["method"] == "by-photo" and "test" not in made.split_files


def test_official_lists_are_package_data():
    import tomllib

    repo = Path(__file__).resolve().parents[1]
    globs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["toolkit"]
    shipped = {p.relative_to(repo / "toolkit").as_posix() for g in globs for p in (repo / "toolkit").glob(g)}
    assert {f"splits/Flickr_8k.{k}Images.txt" for k in ("train", "dev", "test")} <= shipped


def test_official_lists_ship_in_the_wheel(tmp_path):
    import subprocess
    import sys
    import zipfile

    # The wheel a non-editable install gets must hold them.
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(repo)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot build a wheel here: {r.stderr[-300:]}")
    wheel = next(tmp_path.glob("capkit-*.whl"))
    members = zipfile.ZipFile(wheel).namelist()
    for k in ("train", "dev", "test"):
        assert f"toolkit/splits/Flickr_8k.{k}Images.txt" in members


def test_explicit_flags_win_over_what_data_finds(tmp_path, tiny_dataset):
    root = original(tmp_path / "dl", tiny_dataset)
    other = tmp_path / "other.txt"
    _write_tokens(other, {n: ["x y z"] for n in list(_captions(tiny_dataset))[:10]})
    plan = plan_data(data=root, captions=other, images=tiny_dataset["images"],
                     split_files={"train": tiny_dataset["dev"], "dev": tiny_dataset["test"]}, packs_dir=tmp_path / "p")
    assert (plan.captions, plan.images) == (other, tiny_dataset["images"])
    assert plan.split_files == {"train": tiny_dataset["dev"], "dev": tiny_dataset["test"]}
    # A folder whose caption files no name tells apart is fine once --captions says which.
    mine = flat(tmp_path / "mine", tiny_dataset)
    shutil.copy(mine / "my_captions.txt", mine / "more_captions.txt")
    chosen = plan_data(data=mine, captions=mine / "more_captions.txt", packs_dir=tmp_path / "p")
    assert chosen.captions == mine / "more_captions.txt" and chosen.split_files["dev"] == mine / "dev.txt"
    ratios = plan_data(data=root, ratios=(0.5, 0.5, 0.0), packs_dir=tmp_path / "p")
    assert ratios.split["method"] == "by-photo"  # over the split files the folder holds


def test_without_data_the_flags_still_work_and_need_no_split(tmp_path, tiny_dataset):
    plan = plan_data(captions=tiny_dataset["captions_en"], images=tiny_dataset["images"], packs_dir=tmp_path)
    assert plan.split["method"] == "by-photo" and [n.split(":")[0] for n in plan.notes] == ["captions", "photos", "split"]


@pytest.mark.parametrize("case", ["no captions", "several captions", "train only", "no photos", "not a folder",
                                  "both splits and ratios", "captions without images"])
def test_what_cannot_be_found_is_one_error(tmp_path, tiny_dataset, case):
    root = tmp_path / "dl"
    root.mkdir()
    kwargs: dict = {"data": root}
    if case == "no captions":
        (root / "readme.txt").write_text("hello\n")
        message = "no caption file found"
    elif case == "several captions":
        flat(root, tiny_dataset, splits=False)
        shutil.copy(root / "my_captions.txt", root / "more_captions.txt")
        message = "several caption files"
    elif case == "train only":
        flat(root, tiny_dataset, splits=False)
        shutil.copy(tiny_dataset["train"], root / "train.txt")
        message = "not for both train and dev"
    elif case == "no photos":
        _write_tokens(root / "captions.tsv", {"a.jpg": ["a dog"]})
        message = "no folder holds the photos"
    elif case == "not a folder":
        kwargs = {"data": root / "missing"}
        message = "not a folder"
    elif case == "both splits and ratios":
        kwargs = {"data": root, "split_files": {"train": tiny_dataset["train"]}, "ratios": (0.9, 0.1, 0.0)}
        message = "not both"
    else:
        kwargs = {"captions": tiny_dataset["captions_en"]}
        message = "give --data DIR, or --captions FILE and --images DIR"
    with pytest.raises(CapkitError, match=message):
        plan_data(packs_dir=tmp_path / "packs", **kwargs)


# -- the split by photo ------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(names=st.lists(st.text("abcdef0123", min_size=1, max_size=6), min_size=2, max_size=300, unique=True),
       ratios=st.tuples(st.floats(0.01, 1), st.floats(0.01, 1), st.floats(0, 1)), seed=st.integers(0, 2**31))
def test_split_by_photo_never_puts_one_photo_on_two_sides(names, ratios, seed):
    total = sum(ratios)
    ratios = tuple(r / total for r in ratios)
    # Each photo has several captions: the split sees one name per caption, in any order.
    split = split_by_photo([n for n in names for _ in range(3)], ratios, seed)
    sides = [set(v) for v in split.values()]
    assert sum(len(s) for s in sides) == len(set(names)) == len(set().union(*sides))
    assert split["train"] and split["dev"]
    assert split == split_by_photo(list(reversed(names)), ratios, seed)  # the seed decides, not the order


def test_split_by_photo_follows_ratios_and_seed():
    names = [f"{i}.jpg" for i in range(1000)]
    split = split_by_photo(names, (0.8, 0.1, 0.1), seed=1)
    assert {k: len(v) for k, v in split.items()} == {"train": 800, "dev": 100, "test": 100}
    assert split_by_photo(names, (0.8, 0.1, 0.1), seed=2)["dev"] != split["dev"]
    assert split_by_photo(names, (0.9, 0.1, 0.0))["test"] == []
    with pytest.raises(CapkitError, match="too few"):
        split_by_photo(["a.jpg"] * 5)


@pytest.mark.parametrize("text, expected", [("90/5/5", (0.9, 0.05, 0.05)), ("8,1,1", (0.8, 0.1, 0.1)),
                                            ("90/10", (0.9, 0.1, 0.0)), ("0.7:0.2:0.1", (0.7, 0.2, 0.1))])
def test_parse_split_ratios(text, expected):
    assert parse_split_ratios(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "90", "a/b/c", "90/0/10", "0/50/50", "90/5/-5", "1/2/3/4"])
def test_parse_split_ratios_refuses(text):
    with pytest.raises(CapkitError, match="--split-ratios"):
        parse_split_ratios(text)


def test_write_split_then_read_split_is_identity(tmp_path):
    names = ["b.jpg", "a.jpg", "日本.png", "b.jpg"]
    write_split(tmp_path / "s" / "devImages.txt", names)
    assert read_split(tmp_path / "s" / "devImages.txt") == ["b.jpg", "a.jpg", "日本.png"]
    assert not [p for p in (tmp_path / "s").iterdir() if p.name.startswith(".")]
    with pytest.raises(CapkitError, match="cannot write image name"):
        write_split(tmp_path / "bad.txt", ["a.jpg#0"])


# -- which encoder -------------------------------------------------------------------


def _register(packs: Path, eid: str, source: str = "file", size: int = 299) -> None:
    home = packs / ENCODERS_DIR / eid
    home.mkdir(parents=True)
    (home / ENCODER_FILE).write_text(json.dumps({"format": ENCODER_FORMAT, "id": eid, "name": "xception",
                                                 "image_size": size, "source": source}))


def test_choose_encoder_none_one_several(tmp_path):
    packs = tmp_path / "packs"
    none = choose_encoder(packs)
    assert (none.weights, none.image_size) == ("imagenet", 299) and "a download" in none.note
    _register(packs, "xception-299-aaaaaaaaaaaa", "imagenet")
    one = choose_encoder(packs)
    assert (one.weights, one.image_size) == ("xception-299-aaaaaaaaaaaa", 299)
    assert "xception-299-aaaaaaaaaaaa (imagenet weights, 299 px), the one registered in" in one.note
    _register(packs, "xception-71-bbbbbbbbbbbb", "none", 71)
    with pytest.raises(CapkitError, match="holds 2 encoders: xception-299-aaaaaaaaaaaa .imagenet weights., "
                                          "xception-71-bbbbbbbbbbbb .none weights."):
        choose_encoder(packs)
    assert choose_encoder(packs, image_size=71).weights == "xception-71-bbbbbbbbbbbb"  # --image-size tells them apart
    assert choose_encoder(packs, "xception-71-bbbbbbbbbbbb").image_size == 71  # an id given: its own size
    given_ = choose_encoder(packs, "imagenet")
    assert (given_.weights, given_.image_size, given_.note) == ("imagenet", 299, None)
    (packs / ENCODERS_DIR / "broken").mkdir()
    (packs / ENCODERS_DIR / "broken" / ENCODER_FILE).write_text("{not json")
    assert len(registered_encoders(packs)) == 2


def test_prepare_with_a_registered_id_loads_it(tmp_path, tiny_encoder, fast_build):
    from toolkit.config import EncoderConfig
    from toolkit.encoder import Encoder

    packs = tmp_path / "packs"
    first = Encoder.prepare(EncoderConfig(weights="none", image_size=71), packs)
    again = Encoder.prepare(EncoderConfig(weights=first.id, image_size=71, batch_size=4, workers=1), packs)
    assert (again.id, again.identity, again.config.batch_size, again.config.workers) == (first.id, first.identity, 4, 1)
    with pytest.raises(CapkitError, match="takes 71 px images, not 299"):
        Encoder.prepare(EncoderConfig(weights=first.id, image_size=299), packs)
    with pytest.raises(CapkitError, match="is not in"):
        Encoder.prepare(EncoderConfig(weights="xception-71-000000000000", image_size=71), packs)


# -- the command, end to end ---------------------------------------------------------


def test_kaggle_download_to_two_packs_offline(tmp_path, tiny_dataset, tiny_encoder, fast_build, monkeypatch, capsys):
    """`build-pack en --data DIR --encoder-weights FILE`, then `build-pack pt` with no weights flag and no network."""
    import toolkit.encoder

    root = kaggle(tmp_path / "flickr8k", tiny_dataset)
    packs = tmp_path / "packs"
    weights = tmp_path / "xception.weights.h5"
    tiny_encoder.model.save_weights(weights)
    real = toolkit.encoder._build

    def offline(config, w):
        if w == "imagenet":
            raise AssertionError("tried to download the ImageNet weights")
        if config.image_size == 71 and Path(w) in (weights, *packs.glob(f"{ENCODERS_DIR}/*/encoder.weights.h5")):
            return tiny_encoder.model  # the same weights, without rebuilding Xception
        return real(config, w)

    monkeypatch.setattr(toolkit.encoder, "_build", offline)
    small = [a if a != "none" else str(weights) for a in SMALL]
    code, out, err = capkit(monkeypatch, capsys, "build-pack", "en", "--data", root, "--packs-dir", packs, *small)
    assert code == 0, err
    assert "data: " in err and "the Kaggle layout" in err and f"captions: {root / 'captions.txt'}" in err
    assert "made one by photo (seed 0, 90/5/5): 44 train, 2 dev, 2 test images" in err
    en = json.loads((packs / "en" / "manifest.json").read_text())
    assert en["data"]["split"]["method"] == "by-photo" and en["data"]["split"]["seed"] == 0
    assert en["encoder"]["source"] == "file" and "test" in en["scores"]

    no_weights = [a for a in small if a not in ("--encoder-weights", str(weights), "--image-size", "71")]
    code, out, err = capkit(monkeypatch, capsys, "build-pack", "pt", "--captions", root / "captions.txt",
                            "--images", root / "Images", "--source-lang", "pt", "--packs-dir", packs, *no_weights)
    assert code == 0, err
    assert f"encoder: {en['encoder']['id']} (file weights, 71 px), the one registered in" in err
    pt = json.loads((packs / "pt" / "manifest.json").read_text())
    assert pt["encoder"] == en["encoder"]
    assert pt["data"]["split"] == en["data"]["split"]  # same photos, seed and ratios: the same split
    assert "0 images encoded, 48 from cache" in err


def test_original_layout_build_uses_its_split_files_and_no_test_split_means_no_test_scores(
        tmp_path, tiny_dataset, fast_build, monkeypatch, capsys):
    root = original(tmp_path / "dl", tiny_dataset)
    (root / "Flickr8k_text" / "Flickr_8k.testImages.txt").unlink()
    code, out, err = capkit(monkeypatch, capsys, "build-pack", "en", "--data", root, "--packs-dir", tmp_path / "p", *SMALL)
    assert code == 0, err
    m = json.loads((tmp_path / "p" / "en" / "manifest.json").read_text())
    assert m["data"]["splits"] == {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt"}
    assert m["data"]["split"] == {"method": "files"} and list(m["scores"]) == ["dev"]


def test_build_pack_without_data_or_captions_is_one_error(tmp_path, monkeypatch, capsys):
    code, out, err = capkit(monkeypatch, capsys, "build-pack", "en", "--packs-dir", tmp_path, *SMALL)
    assert code == 2
    one_error(err, "give --data DIR, or --captions FILE and --images DIR", "--data takes the folder")
    code, out, err = capkit(monkeypatch, capsys, "build-pack", "en", "--data", tmp_path, "--train-split", tmp_path / "t.txt",
                            "--packs-dir", tmp_path, *SMALL)
    assert code == 2
    one_error(err, "give both --train-split and --dev-split")


@pytest.mark.realdata
def test_real_flickr8k_folder_and_the_shipped_lists(shared_data):
    root = shared_data / "flickr8k"
    found = find_data(root)
    assert found.captions == root / "Flickr8k.token.txt" and found.image_dirs[0] == root / "Images"
    assert found.split_files == {k: root / f"Flickr_8k.{k}Images.txt" for k in ("train", "dev", "test")}
    assert official_splits() == {k: read_split(p) for k, p in found.split_files.items()}  # the copy is exact
