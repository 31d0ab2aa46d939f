"""Caption files and split files: read them whatever their layout, write one.

Three caption layouts are read, detected from the first non-blank lines:

- ``flickr8k``: Flickr8k.token.txt, ``IMG.jpg#N<TAB>caption`` (a space
  instead of the tab is accepted: the id never contains one).
- ``flickr8k-cn``: Flickr8k-CN, ``IMG.jpg#zhg#N<SPACE>caption``, any tag
  between the image and N.
- ``csv``: Kaggle captions.txt, header ``image,caption``; N counts each
  image's captions from 0 in file order.

A bad line never stops a read: it is skipped and reported in
``CaptionFile.problems`` as ``PATH:LINE: what is wrong``. Lines that are not
valid UTF-8 are skipped too, not decoded with replacement characters, so that
no U+FFFD reaches a vocabulary or a translation. Only a file that cannot be
read or holds no usable caption raises `CapkitError`.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from toolkit.errors import CapkitError

EXPECTED = (
    "IMG.jpg#N<TAB>caption (Flickr8k), IMG.jpg#zhg#N<SPACE>caption (Flickr8k-CN) "
    "or a CSV file with header image,caption (Kaggle captions.txt)"
)
MAX_PROBLEMS = 1000  # messages kept; a corrupt file must not fill memory, the count stays exact
_SNIFF_LINES = 20  # enough to outvote a few bad lines at the top of a file
_EXAMPLES = 3  # image names quoted in a split warning

# IMG#N or IMG#TAG#N. Digits are ASCII so that the id written back is the id read.
_ID = re.compile(r"(?P<image>[^#\t]+)#(?:(?P<tag>[^#\s]+)#)?(?P<n>[0-9]+)")
# An id glued to its caption by something other than whitespace: "IMG.jpg#0,caption".
_GLUED_ID = re.compile(r"(?P<id>[^#\s]+#(?:[^#\s]+#)?[0-9]+)(?P<sep>[^\s0-9])")
# Flickr8k's token file spells one id 2258277193_586949ec62.jpg.1#0 (caption 0
# of 2258277193_586949ec62.jpg, whose #1-#4 follow) and Flickr8k-CN copies it
# onto all five; no image file has such a name, so the suffix is dropped.
_COPY_SUFFIX = re.compile(r"(\.(?:jpe?g|png|gif|bmp|webp))\.[0-9]+$", re.IGNORECASE)
_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


@dataclass(frozen=True)
class Caption:
    """One caption of one image.

    >>> Caption("1000268201_693b08cb0e.jpg", 0, "A child climbing stairs .").id
    '1000268201_693b08cb0e.jpg#0'
    """

    image: str  # image file name, e.g. "1000268201_693b08cb0e.jpg"
    index: int  # caption number within the image (the N of IMG.jpg#N)
    text: str  # the caption, stripped
    line: int = 0  # 1-based line in the source file (0 when made in code)

    @property
    def id(self) -> str:
        """``IMG.jpg#N``: the key that aligns a caption with its translations."""
        return f"{self.image}#{self.index}"


@dataclass
class CaptionFile:
    """What `read_captions` found in one file."""

    path: Path  # the file read, as given
    format: str  # "flickr8k" | "flickr8k-cn" | "csv"
    captions: list[Caption]  # usable captions, in file order
    problems: list[str]  # "PATH:LINE: what is wrong", one per skipped line (see MAX_PROBLEMS)


class _Skip(Exception):
    """A line that cannot be used; the message says why."""


class _Problems:
    """Collects per-line messages, keeping at most MAX_PROBLEMS but counting all."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.messages: list[str] = []
        self.count = 0

    def add(self, line: int, what: str) -> None:
        self.count += 1
        if len(self.messages) < MAX_PROBLEMS:
            self.messages.append(f"{self.path}:{line}: {what}")

    def listed(self) -> list[str]:
        hidden = self.count - len(self.messages)
        if hidden:
            return [*self.messages, f"{self.path}: {hidden} more problems not listed ({self.count} in all)"]
        return list(self.messages)


def read_captions(path: str | Path) -> CaptionFile:
    """Read a caption file in any supported layout, skipping and reporting bad lines.

    ``Flickr8k.token.txt`` holding ``1000268201_693b08cb0e.jpg#0<TAB>A child ...``
    -> ``CaptionFile(format="flickr8k", captions=[Caption("1000268201_693b08cb0e.jpg",
    0, "A child ...", line=1), ...], problems=[])``

    Raises CapkitError, naming the file, when it is missing, a directory,
    empty, UTF-16, or holds no usable caption.
    """
    path = Path(path)
    data = _read_bytes(path)
    problems = _Problems(path)
    lines = _text_lines(data, path, problems)
    if not lines and not problems.count:
        raise CapkitError(f"{path}: file is empty", hint=f"expected {EXPECTED}")

    fmt = _detect(lines) if lines else "flickr8k"
    if fmt == "csv":
        captions = _parse_csv(lines, problems)
    else:
        captions = _parse_token(lines, problems, fmt)

    if not captions:
        shown = "\n    ".join(problems.messages[:3])
        raise CapkitError(
            f"{path}: no usable captions ({problems.count} lines skipped)",
            hint=f"expected {EXPECTED}; first problems:\n    {shown}",
        )
    return CaptionFile(path=path, format=fmt, captions=captions, problems=problems.listed())


def read_split(path: str | Path) -> list[str]:
    """Read a split file, one image name per line, in file order without repeats.

    ``Flickr_8k.devImages.txt`` holding ``a.jpg / b.jpg / a.jpg`` -> ``["a.jpg", "b.jpg"]``

    A split decides what a model is scored on, so unlike caption files any bad
    line is an error rather than a skipped line.
    """
    path = Path(path)
    problems = _Problems(path)
    lines = _text_lines(_read_bytes(path), path, problems)
    if problems.count:
        raise CapkitError(problems.messages[0], hint="save split files as UTF-8")
    if not lines:
        raise CapkitError(f"{path}: file is empty", hint="expected one image name per line")
    names: dict[str, None] = {}
    for n, line in lines:
        if "#" in line or "\t" in line:
            raise CapkitError(
                f"{path}:{n}: expected one image name per line, found {line[:60]!r}",
                hint="is this a caption file rather than a split file?",
            )
        names[_image_name(line)] = None
    return list(names)


def write_captions(path: str | Path, captions: Iterable[Caption]) -> None:
    """Write captions in the Flickr8k token layout, UTF-8: ``IMG.jpg#N<TAB>text``.

    ``[Caption("a.jpg", 0, "A dog .")]`` -> a file holding ``a.jpg#0\\tA dog .\\n``

    The file is written beside its target and renamed over it, so a crash or a
    bad caption never leaves a half-written file. Line breaks inside a text
    become spaces (the layout has one caption per line); a caption that could
    not be read back (blank text, '#' in the image name, repeated id) raises
    CapkitError and leaves the target untouched.
    """
    path = Path(path)
    seen: set[tuple[str, int]] = set()
    _write_atomically(path, (_token_line(caption, seen, path) for caption in captions))


def _write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` beside `path`, then rename over it: any failure, Ctrl-C included, leaves `path` as it was."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": never clobber someone else's temp file
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise CapkitError(f"{path}: cannot write ({e.strerror or e})") from e
        raise


def group_by_image(captions: Iterable[Caption]) -> dict[str, list[str]]:
    """Map each image to its caption texts ordered by index; images in first-seen order.

    >>> group_by_image([Caption("a.jpg", 1, "two"), Caption("b.jpg", 0, "x"), Caption("a.jpg", 0, "one")])
    {'a.jpg': ['one', 'two'], 'b.jpg': ['x']}
    """
    groups: dict[str, list[Caption]] = {}
    for caption in captions:
        groups.setdefault(caption.image, []).append(caption)
    return {image: [c.text for c in sorted(cs, key=lambda c: c.index)] for image, cs in groups.items()}


def check_splits(splits: dict[str, list[str]], captions: CaptionFile) -> list[str]:
    """Warnings about splits that do not fit their caption file; [] when all is well.

    ``splits`` maps each split's file (or name, shown in the warnings) to its
    image names, e.g. ``{"Flickr_8k.trainImages.txt": [...], ...}``. Two
    checks: split images with no caption (the split and caption file do not
    belong together, or the caption file is partial), and images in more than
    one split (a model scored on images it was trained or tuned on gets an
    inflated BLEU).
    """
    known = {c.image for c in captions.captions}
    warnings = []
    for name, images in splits.items():
        unique = list(dict.fromkeys(images))
        missing = [image for image in unique if image not in known]
        if missing:
            warnings.append(
                f"{name}: {len(missing)} of {len(unique)} images have no caption in "
                f"{captions.path} (e.g. {', '.join(missing[:_EXAMPLES])})"
            )
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            in_b = set(splits[b])
            both = [image for image in dict.fromkeys(splits[a]) if image in in_b]
            if both:
                warnings.append(
                    f"{len(both)} images are in both {a} and {b} (e.g. {', '.join(both[:_EXAMPLES])}); "
                    "scoring on images seen in training or tuning inflates BLEU"
                )
    return warnings



SPLITS = ("train", "dev", "test")
DEFAULT_SPLIT_RATIOS = (0.9, 0.05, 0.05)  # train, dev, test shares of the photos in a split capkit makes


def parse_split_ratios(text: str) -> tuple[float, float, float]:
    """``"90/5/5"`` -> ``(0.9, 0.05, 0.05)``: train/dev/test shares, normalised to sum to 1.

    Separators ``/``, ``,`` or ``:``; a missing test share is 0 (no test
    split). Train and dev must be positive: training stops early on dev loss.
    """
    parts = [p for p in re.split(r"[/,:]", text.strip())]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 2:
        values.append(0.0)
    if len(values) != 3 or not all(v >= 0 for v in values) or not (values[0] > 0 and values[1] > 0):
        raise CapkitError(f"--split-ratios {text!r}: expected train/dev/test shares such as 90/5/5",
                          hint="three numbers >= 0 separated by '/', train and dev above 0; 90/10 means no test split")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def split_by_photo(images: Iterable[str], ratios: tuple[float, float, float] = DEFAULT_SPLIT_RATIOS,
                   seed: int = 0) -> dict[str, list[str]]:
    """Cut distinct image names into train/dev/test, so one photo's captions are all on one side.

    ``split_by_photo(["a.jpg", "b.jpg", ..., "t.jpg"], (0.9, 0.05, 0.05), seed=0)``
    -> ``{"train": [18 names], "dev": [1 name], "test": [1 name]}``, each list sorted.

    The order is sha256 of the seed and the name, so a seed gives the same
    split on every machine and Python version. Dev gets at least one photo;
    test gets none when its share is 0. Fewer than 2 photos raise CapkitError.
    """
    names = sorted(set(images))
    if len(names) < 2:
        raise CapkitError(f"{len(names)} captioned photo(s): too few to split into train and dev")
    order = sorted(names, key=lambda n: hashlib.sha256(f"{seed}\0{n}".encode("utf-8")).hexdigest())
    n = len(names)
    n_dev = min(max(1, round(n * ratios[1])), n - 1)  # train keeps at least one photo
    n_test = max(1, round(n * ratios[2])) if ratios[2] > 0 and n - n_dev >= 2 else 0
    n_test = min(n_test, n - n_dev - 1)
    return {
        "train": sorted(order[n_dev + n_test :]),
        "dev": sorted(order[:n_dev]),
        "test": sorted(order[n_dev : n_dev + n_test]),
    }


def write_split(path: str | Path, images: Iterable[str]) -> None:
    """Write a split file, one image name per line (the inverse of `read_split`), atomically.

    ``["a.jpg", "b.jpg"]`` -> a file holding ``a.jpg\nb.jpg\n``
    """
    path = Path(path)
    names = list(dict.fromkeys(images))
    for name in names:
        if not name or name != name.strip() or any(c in name for c in "#\t\r\n"):
            raise CapkitError(f"{path}: cannot write image name {name!r} into a split file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CapkitError(f"{path}: cannot write ({e.strerror or e})") from None
    _write_atomically(path, ["".join(n + "\n" for n in names).encode("utf-8")])


def sniff_captions(path: str | Path) -> str | None:
    """The caption layout of `path` ("flickr8k", "flickr8k-cn", "csv") judged by its first lines, or None.

    Reads at most 64 KB: for telling caption files from split files,
    annotations and readmes in a dataset folder, not for validating one.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    if head.startswith(codecs.BOM_UTF8):
        head = head[len(codecs.BOM_UTF8) :]
    text = head.decode("utf-8", "ignore").splitlines()
    if len(head) == 1 << 16:
        text = text[:-1]  # cut off by the read
    lines = [(n, t.strip()) for n, t in enumerate(text, 1) if t.strip()][:_SNIFF_LINES]
    if not lines:
        return None
    if {"image", "caption"} <= set(_csv_header(lines[0][1])):
        return "csv"
    good = 0
    for _, line in lines:
        try:
            _split_token_line(line, "flickr8k")
            good += 1
        except _Skip:
            pass
    return _detect(lines) if good * 2 > len(lines) else None

# -- reading ----------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise CapkitError(f"{path}: is a directory, not a file")
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CapkitError(f"{path}: no such file") from None
    except OSError as e:
        raise CapkitError(f"{path}: cannot read ({e.strerror or e})") from None


def _text_lines(data: bytes, path: Path, problems: _Problems) -> list[tuple[int, str]]:
    """Non-blank lines as (1-based number, stripped text); undecodable ones reported."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise CapkitError(f"{path}: file is UTF-16", hint="save it as UTF-8")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    lines = []
    # Split the bytes, not the text: one bad byte then costs one line, and
    # \r\n, \n and a lone \r all end a line.
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            problems.add(n, f"not valid UTF-8 (byte 0x{raw[e.start]:02X} at column {e.start + 1}); line skipped")
            continue
        if text:
            lines.append((n, text))
    return lines


def _detect(lines: list[tuple[int, str]]) -> str:
    if {"image", "caption"} <= set(_csv_header(lines[0][1])):
        return "csv"
    tagged = plain = 0
    for _, line in lines[:_SNIFF_LINES]:
        try:
            *_, tag = _split_token_line(line, "flickr8k")
        except _Skip:
            continue
        tagged += tag is not None
        plain += tag is None
    return "flickr8k-cn" if tagged > plain else "flickr8k"


def _image_name(raw: str) -> str:
    return _COPY_SUFFIX.sub(r"\1", raw.strip())


def _split_token_line(line: str, fmt: str) -> tuple[str, int, str, str | None]:
    """``IMG#[TAG#]N<TAB or spaces>text`` -> (image, N, text, TAG or None)."""
    head, tab, rest = line.partition("\t")
    m = _ID.fullmatch(head.strip()) if tab else None
    if m is None:  # no tab, or the tab is inside the caption: the id ends at the first space
        parts = line.split(maxsplit=1)
        head, rest = parts[0], parts[1] if len(parts) > 1 else ""
        m = _ID.fullmatch(head)
    image = _image_name(m["image"]) if m else ""
    if not image:
        glued = _GLUED_ID.match(line)
        if glued:
            raise _Skip(f"expected a tab or space after caption id {glued['id']!r}, found {glued['sep']!r}")
        example = "IMG.jpg#zhg#N<SPACE>caption" if fmt == "flickr8k-cn" else "IMG.jpg#N<TAB>caption"
        raise _Skip(f"no caption id, expected {example}; found {line[:60]!r}")
    index = int(m["n"])
    text = rest.strip()
    if not text:
        raise _Skip(f"blank caption for {image}#{index}")
    return image, index, text, m["tag"]


def _parse_token(lines: list[tuple[int, str]], problems: _Problems, fmt: str) -> list[Caption]:
    captions = []
    first_seen: dict[tuple[str, int], int] = {}
    for n, line in lines:
        try:
            image, index, text, _ = _split_token_line(line, fmt)
        except _Skip as e:
            problems.add(n, str(e))
            continue
        if (image, index) in first_seen:
            problems.add(n, f"duplicate caption id {image}#{index} (first on line {first_seen[image, index]}); kept the first")
            continue
        first_seen[image, index] = n
        captions.append(Caption(image, index, text, n))
    return captions


def _csv_header(line: str) -> list[str]:
    try:
        return [c.strip().lower() for c in next(csv.reader([line]))]
    except (csv.Error, StopIteration):
        return []


def _parse_csv(lines: list[tuple[int, str]], problems: _Problems) -> list[Caption]:
    header = _csv_header(lines[0][1])
    image_col, caption_col = header.index("image"), header.index("caption")
    # In a two-column file an unquoted comma can only belong to the caption.
    caption_last = caption_col == len(header) - 1
    captions = []
    counts: dict[str, int] = {}
    # Parse line by line rather than as one stream: an unbalanced quote then
    # costs its own line instead of swallowing the rest of the file.
    for n, line in lines[1:]:
        try:
            row = next(csv.reader([line], strict=True))
        except csv.Error as e:
            problems.add(n, f"bad CSV ({e})")
            continue
        if [c.strip().lower() for c in row] == header:
            problems.add(n, "header repeated (two files joined?)")
            continue
        if len(row) <= max(image_col, caption_col):
            problems.add(n, f"expected columns {','.join(header)}, found {len(row)} field(s) (wrong delimiter?)")
            continue
        image = _image_name(row[image_col])
        text = (",".join(row[caption_col:]) if caption_last else row[caption_col]).strip()
        if not image:
            problems.add(n, "no image name")
        elif "#" in image or "\t" in image:
            problems.add(n, f"image name {image!r} contains '#' or a tab")
        elif not text:
            problems.add(n, f"blank caption for {image}")
        else:
            index = counts.get(image, 0)
            counts[image] = index + 1
            captions.append(Caption(image, index, text, n))
    return captions


# -- writing ----------------------------------------------------------------


def _token_line(caption: Caption, seen: set[tuple[str, int]], path: Path) -> bytes:
    image, index = caption.image, caption.index
    what = f"{path}: cannot write caption {image}#{index}"
    if not image or image != image.strip() or any(c in image for c in "#\t\r\n"):
        raise CapkitError(f"{what}: the image name must be non-empty, unpadded, without '#', tabs or line breaks")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise CapkitError(f"{what}: the caption number must be an integer >= 0")
    text = _LINE_BREAKS.sub(" ", caption.text).strip()
    if not text:
        raise CapkitError(f"{what}: blank caption")
    if (image, index) in seen:
        raise CapkitError(f"{what}: the id is repeated")
    seen.add((image, index))
    try:
        return f"{image}#{index}\t{text}\n".encode("utf-8")
    except UnicodeEncodeError as e:
        raise CapkitError(f"{what}: not encodable as UTF-8 ({e.reason})") from None
