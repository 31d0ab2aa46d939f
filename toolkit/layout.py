"""Where a dataset's captions, photos and splits are: found in one folder, or the split made.

`find_data(DIR)` recognises the layouts people download:

- Kaggle ("flickr8k"): ``captions.txt`` (CSV) and ``Images/``, no split files;
- the original distribution: ``Flickr8k_text/`` (``Flickr8k.token.txt`` and
  ``Flickr_8k.{train,dev,test}Images.txt``) and ``Flicker8k_Dataset/`` (sic);
- a flat folder: a caption file in any layout `toolkit.data` reads, split
  files, and the photos beside them or in a sub-folder.

`plan_data` puts explicit paths (which win) together with what was found and
settles the split: split files when there are some; else the official
Flickr8k lists shipped in ``toolkit/splits/`` when the photos are Flickr8k's;
else a seeded split by photo, written to ``PACKS_DIR/.splits/`` so that
`capkit evaluate --split` can score on it later. Every decision is one line
of `DataPlan.notes`, for the CLI to show.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.data import DEFAULT_SPLIT_RATIOS, SPLITS, read_captions, read_split, sniff_captions, split_by_photo, write_split
from toolkit.errors import CapkitError
from toolkit.images import IMAGE_SUFFIXES

OFFICIAL_SPLITS_DIR = Path(__file__).with_name("splits")
OFFICIAL_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "dev": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}
FLICKR8K_SHARE = 0.9   # captioned images in the official lists above which the photos are taken for Flickr8k's
SPLITS_DIR = ".splits"  # in the packs dir: splits capkit made, one folder per data set, seed and ratios
SPLIT_FILE = "{split}Images.txt"  # inside it; the names `find_split_files` looks for

# Known names first: they decide between several candidates.
CAPTION_NAMES = ("captions.txt", "Flickr8k.token.txt")
IMAGE_DIR_NAMES = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset", "photos")
TEXT_DIR_NAMES = ("Flickr8k_text",)
_SPLIT_WORDS = (("train", ("train",)), ("dev", ("dev", "val")), ("test", ("test",)))
_FORMAT_NAMES = {"csv": "Kaggle captions.txt CSV", "flickr8k": "Flickr8k token file", "flickr8k-cn": "Flickr8k-CN layout"}


@dataclass
class DataLayout:
    """What `find_data` found in a folder; None where it found nothing."""

    root: Path                   # the folder searched
    layout: str                  # "kaggle" | "original" | "flat"
    captions: Path | None        # the caption file
    image_dirs: list[Path]       # every folder holding images, known names first; `plan_data` picks one
    split_files: dict[str, Path] = field(default_factory=dict)  # "train"/"dev"/"test" -> split file


@dataclass
class DataPlan:
    """The inputs of a build, and how each was decided."""

    captions: Path               # caption file
    images: Path                 # folder of photos
    split_files: dict[str, Path]  # "train", "dev" and maybe "test" -> split file (found, shipped or made)
    split: dict                  # for the manifest: {"method": "files" | "flickr8k-official" | "by-photo", ...};
                                 # by-photo adds "seed", "ratios" and "folder" (its files, in the packs dir)
    notes: list[str]             # one line per decision, for the user


def find_data(root: str | Path, captions: Path | None = None) -> DataLayout:
    """Find the caption file and split files in `root` or one level down, and the photo folders (two levels).

    ``~/flickr8k`` holding ``captions.txt`` and ``Images/`` ->
    ``DataLayout(layout="kaggle", captions=~/flickr8k/captions.txt, image_dirs=[~/flickr8k/Images], split_files={})``

    `captions` (a file the user named) is not searched for; split files are
    then looked for in `root` and its ``Flickr8k_text/``. Raises CapkitError
    when `root` is not a folder, or `captions` is None and `root` holds no
    caption file, or several that no known name tells apart.
    """
    root = Path(root)
    if not root.is_dir():
        raise CapkitError(f"{root}: not a folder", hint="--data takes the folder of a download: captions, photos and maybe split files")
    folders = [root, *_subfolders(root)]
    searched = captions is None
    captions = _find_captions(root, folders) if searched else Path(captions)
    # Photos may be one level deeper (Flickr8k_Dataset/Flicker8k_Dataset/ in some mirrors).
    deeper = [*folders, *(d for f in folders[1:] for d in _subfolders(f))]
    image_dirs = [d for d in deeper if d.name in IMAGE_DIR_NAMES and _has_images(d)]
    image_dirs.sort(key=lambda d: IMAGE_DIR_NAMES.index(d.name))
    image_dirs += [d for d in deeper if d not in image_dirs and _has_images(d)]
    # Split files sit beside the caption file (Flickr8k_text/) or at the top.
    split_files: dict[str, Path] = {}
    near = [captions.parent, root] if searched else [root, *(f for f in folders if f.name in TEXT_DIR_NAMES)]
    for folder in dict.fromkeys(near):
        found = _split_files_in(folder, exclude=captions)
        if found:
            split_files = {k: found[k] for k in SPLITS if k in found}
            break
    names = {d.name for d in folders}
    if captions.name == "captions.txt" and "Images" in names:
        layout = "kaggle"
    elif captions.parent.name in TEXT_DIR_NAMES or names & {"Flicker8k_Dataset", "Flickr8k_Dataset"}:
        layout = "original"
    else:
        layout = "flat"
    return DataLayout(root, layout, captions, image_dirs, split_files)


def plan_data(
    *,
    data: str | Path | None = None,
    captions: str | Path | None = None,
    images: str | Path | None = None,
    split_files: dict[str, Path] | None = None,
    ratios: tuple[float, float, float] | None = None,
    seed: int = 0,
    packs_dir: str | Path = ".",
) -> DataPlan:
    """Captions, photos and splits for a build: explicit arguments win over what `data` holds.

    ``plan_data(data="~/flickr8k", packs_dir="lang_packs")`` on the Kaggle
    download -> ``DataPlan(captions=.../captions.txt, images=.../Images,
    split_files={"train": toolkit/splits/Flickr_8k.trainImages.txt, ...},
    split={"method": "flickr8k-official"}, notes=[...])``; a split by photo records
    ``{"method": "by-photo", "seed": 0, "ratios": [0.9, 0.05, 0.05], "folder": ".splits/captions-<digest>"}``

    `split_files` (explicit) and `ratios` (a split made by photo) exclude
    each other; without either, split files found in `data` are used, then
    the official Flickr8k lists when most captioned images are in them, then
    a split by photo with the default ratios (90/5/5) and `seed`.
    """
    if split_files and ratios:
        raise CapkitError("give split files or --split-ratios, not both",
                          hint="--split-ratios makes a split by photo for data without split files")
    notes: list[str] = []
    found = None
    if data is not None:
        found = find_data(data, Path(captions) if captions is not None else None)
        what = {"kaggle": "the Kaggle layout", "original": "the original Flickr8k layout", "flat": "a flat folder"}
        notes.append(f"data: {found.root}, {what[found.layout]}")
    elif captions is None or images is None:
        raise CapkitError("give --data DIR, or --captions FILE and --images DIR",
                          hint="--data takes the folder of a download (Kaggle's captions.txt and Images/, "
                          "or Flickr8k_text/ and Flicker8k_Dataset/)")

    captions = Path(captions) if captions is not None else found.captions
    source = read_captions(captions)
    captioned = list(dict.fromkeys(c.image for c in source.captions))
    notes.append(f"captions: {captions} ({_FORMAT_NAMES[source.format]}: {len(source.captions)} captions "
                 f"of {len(captioned)} images)")

    if images is not None:
        images = Path(images)
        if not images.is_dir():
            raise CapkitError(f"{images}: not a folder of images")
        notes.append(f"photos: {images} ({_count_present(images, captioned)} of the {len(captioned)} captioned images)")
    else:
        images, note = _choose_images(found, captioned)
        notes.append(note)

    if split_files:
        notes.append("split: " + ", ".join(f"{k} {Path(v).name}" for k, v in split_files.items()))
        return DataPlan(captions, images, dict(split_files), {"method": "files"}, notes)
    if found is not None and found.split_files and ratios is None:
        sf = found.split_files
        if "train" not in sf or "dev" not in sf:
            raise CapkitError(
                f"{found.root}: found split files for {', '.join(sf)} but not for both train and dev "
                f"({', '.join(p.name for p in sf.values())})",
                hint="pass --train-split and --dev-split, or --split-ratios to make a split by photo",
            )
        notes.append("split: " + ", ".join(f"{k} {p.relative_to(found.root)}" for k, p in sf.items()))
        return DataPlan(captions, images, dict(sf), {"method": "files"}, notes)

    why = "as --split-ratios says"
    if ratios is None:
        official = official_splits()
        listed = set().union(*official.values())
        share = sum(n in listed for n in captioned) / len(captioned)
        why = f"no split files, and only {100 * share:.0f}% of the captioned images are in Flickr8k's official lists"
        if share >= FLICKR8K_SHARE:
            outside = sum(n not in listed for n in captioned)
            notes.append(
                f"split: no split files; the photos are Flickr8k's ({len(captioned) - outside} of {len(captioned)} "
                f"captioned images in its official lists), so the official split shipped with capkit ({OFFICIAL_SPLITS_DIR}): "
                f"{', '.join(f'{len(v)} {k}' for k, v in official.items())}"
                + (f" ({outside} captioned images are in no list and not used)" if outside else "")
            )
            files = {k: OFFICIAL_SPLITS_DIR / OFFICIAL_SPLIT_FILES[k] for k in SPLITS}
            return DataPlan(captions, images, files, {"method": "flickr8k-official"}, notes)

    ratios = ratios or DEFAULT_SPLIT_RATIOS
    present = _present(images, captioned)
    if len(present) < 2:
        raise CapkitError(f"{len(present)} of the {len(captioned)} captioned images are in {images}: too few to split",
                          hint="check that --images (or --data) holds the photos the captions name")
    split = split_by_photo(present, ratios, seed)
    packs_dir = Path(packs_dir)
    folder = made_split_folder(packs_dir, captions, present, ratios, seed)
    files = {}
    for k in SPLITS:
        if split[k]:
            files[k] = folder / SPLIT_FILE.format(split=k)
            write_split(files[k], split[k])
    shares = "/".join(f"{100 * r:g}" for r in ratios)
    notes.append(
        f"split: {why}: made one by photo (seed {seed}, {shares}): "
        f"{', '.join(f'{len(split[k])} {k}' for k in SPLITS)} images, written to {folder}"
    )
    info = {"method": "by-photo", "seed": seed, "ratios": [round(r, 6) for r in ratios], "folder": str(folder.relative_to(packs_dir))}
    return DataPlan(captions, images, files, info, notes)


def official_splits() -> dict[str, list[str]]:
    """The official Flickr8k split lists shipped with capkit: {"train": 6000 names, "dev": 1000, "test": 1000}."""
    return {k: read_split(OFFICIAL_SPLITS_DIR / name) for k, name in OFFICIAL_SPLIT_FILES.items()}


def made_split_folder(packs_dir: str | Path, captions: Path, images: list[str], ratios, seed: int) -> Path:
    """``PACKS_DIR/.splits/<caption file stem>-<digest>``: one folder per photo set, ratios and seed."""
    key = hashlib.sha256(repr((sorted(images), [round(r, 6) for r in ratios], seed)).encode("utf-8")).hexdigest()[:12]
    return Path(packs_dir) / SPLITS_DIR / f"{Path(captions).stem}-{key}"


# -- finding ------------------------------------------------------------------


def _subfolders(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise CapkitError(f"{root}: cannot list the folder ({e.strerror or e})") from None


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())
    except OSError:
        return []


def _has_images(folder: Path) -> bool:
    try:
        with os.scandir(folder) as it:
            return any(Path(e.name).suffix.lower() in IMAGE_SUFFIXES for e in it)
    except OSError:
        return False


def _split_like(path: Path) -> bool:
    name = path.name.lower()
    return any(w in name for _, words in _SPLIT_WORDS for w in words)


def _find_captions(root: Path, folders: list[Path]) -> Path:
    # Known names in known places, then anything that reads as captions (the lemmatised
    # Flickr8k.lemma.token.txt reads as captions too, but is not what anyone trains on).
    for folder in folders:
        for name in CAPTION_NAMES:
            if (folder / name).is_file() and sniff_captions(folder / name):
                return folder / name
    candidates = [p for folder in folders for p in _files(folder, (".txt", ".csv", ".tsv"))
                  if not _split_like(p) and "lemma" not in p.name.lower() and sniff_captions(p)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise CapkitError(f"{root}: no caption file found (looked in it and its sub-folders)",
                          hint="pass --captions FILE: a Flickr8k token file, Flickr8k-CN file or Kaggle captions.txt")
    raise CapkitError(f"{root}: several caption files ({', '.join(str(p.relative_to(root)) for p in candidates[:5])})",
                      hint="pass --captions FILE to say which")


def _split_files_in(folder: Path, exclude: Path) -> dict[str, Path]:
    """train/dev/test split files by name (*train*, *dev* or *val*, *test*); what is there, maybe none."""
    found: dict[str, Path] = {}
    for p in _files(folder, (".txt",)):
        if p == exclude or sniff_captions(p):
            continue
        name = p.name.lower()
        for split, words in _SPLIT_WORDS:
            if any(w in name for w in words) and split not in found:
                found[split] = p
    return found


def _present(images: Path, names: list[str]) -> list[str]:
    try:
        have = set(os.listdir(images))
    except OSError as e:
        raise CapkitError(f"{images}: cannot list the folder ({e.strerror or e})") from None
    return [n for n in names if n in have]


def _count_present(images: Path, names: list[str]) -> int:
    return len(_present(images, names))


def _choose_images(found: DataLayout, captioned: list[str]) -> tuple[Path, str]:
    """The folder holding the captioned photos: a known name if it holds any, else the one holding most."""
    counts = {d: _count_present(d, captioned) for d in found.image_dirs}
    holding = [d for d in found.image_dirs if counts[d]]
    if not holding:
        raise CapkitError(f"{found.root}: no folder holds the photos {found.captions.name} names "
                          f"(e.g. {', '.join(captioned[:2])})",
                          hint="pass --images DIR, the folder of the photos")
    named = [d for d in holding if d.name in IMAGE_DIR_NAMES]
    best = named[0] if named else max(holding, key=lambda d: counts[d])
    note = f"photos: {best} ({counts[best]} of the {len(captioned)} captioned images)"
    more = [d for d in holding if counts[d] > counts[best]]
    if more:
        other = max(more, key=lambda d: counts[d])
        note += f"; {other.name}/ holds {counts[other]}, pass --images {other} to use it"
    return best, note
