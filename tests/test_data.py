"""Caption and split files: every layout round-trips, no input gives a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.data import (
    MAX_PROBLEMS,
    Caption,
    CaptionFile,
    check_splits,
    group_by_image,
    read_captions,
    read_split,
    write_captions,
)
from toolkit.errors import CapkitError

A, B = "1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg"


def write(tmp_path: Path, data: bytes | str, name: str = "captions.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def triples(cf: CaptionFile) -> list[tuple[str, int, str]]:
    return [(c.image, c.index, c.text) for c in cf.captions]


# -- formats ------------------------------------------------------------------

FORMATS = [
    # (name, file text, expected format, expected (image, index, text))
    (
        "flickr8k",
        f"{A}#0\tA child in a pink dress .\n{A}#1\tA girl going into a wooden building .\n{B}#0\tTwo dogs .\n",
        "flickr8k",
        [(A, 0, "A child in a pink dress ."), (A, 1, "A girl going into a wooden building ."), (B, 0, "Two dogs .")],
    ),
    (
        "flickr8k-space",
        f"{A}#0 A child in a pink dress .\n{B}#3   Two dogs .\n",
        "flickr8k",
        [(A, 0, "A child in a pink dress ."), (B, 3, "Two dogs .")],
    ),
    (
        "flickr8k-cn",
        f"{A}#zhg#0 一个孩子在楼梯上。\n{A}#zhg#1 一个女孩走进木屋。\n{B}#zhb#0 两只狗。\n",
        "flickr8k-cn",
        [(A, 0, "一个孩子在楼梯上。"), (A, 1, "一个女孩走进木屋。"), (B, 0, "两只狗。")],
    ),
    (
        "kaggle-csv",
        f'image,caption\n{A},A child in a pink dress .\n{A},"A girl, then a ""quoted"" word ."\n{B},Two dogs .\n',
        "csv",
        [(A, 0, "A child in a pink dress ."), (A, 1, 'A girl, then a "quoted" word .'), (B, 0, "Two dogs .")],
    ),
    (
        "csv-unquoted-comma",
        f"Image,Caption\n{A},A dog, a cat and a bird .\n",
        "csv",
        [(A, 0, "A dog, a cat and a bird .")],
    ),
]


@pytest.mark.parametrize("name,text,fmt,expected", FORMATS, ids=[f[0] for f in FORMATS])
@pytest.mark.parametrize("variant", ["plain", "bom-crlf", "blank-lines"])
def test_format_reads_and_round_trips(tmp_path, name, text, fmt, expected, variant):
    if variant == "bom-crlf":
        text = "\ufeff" + text.replace("\n", "\r\n")
    elif variant == "blank-lines":
        text = "\n  \n" + text.replace("\n", "\n\n")
    cf = read_captions(write(tmp_path, text))
    assert (cf.format, triples(cf), cf.problems) == (fmt, expected, [])
    assert all(c.line > 0 for c in cf.captions)

    out = tmp_path / "out.txt"
    write_captions(out, cf.captions)
    again = read_captions(out)
    assert (again.format, triples(again), again.problems) == ("flickr8k", expected, [])


def test_caption_id_and_line_numbers(tmp_path):
    cf = read_captions(write(tmp_path, f"\n{A}#3\tA dog .\n"))
    assert cf.captions == [Caption(A, 3, "A dog .", line=2)]
    assert cf.captions[0].id == f"{A}#3"


def test_copy_suffix_is_dropped_from_image_names(tmp_path):
    # Flickr8k's one mistyped id, and Flickr8k-CN's copy of it.
    cf = read_captions(write(tmp_path, "2258277193_586949ec62.jpg.1#zhg#0 人们在等待地铁\n"))
    assert cf.captions[0].id == "2258277193_586949ec62.jpg#0"


# -- bad lines: skipped, reported with file and line ----------------------------

BAD_LINES = [
    # (family, file bytes, bad line number, words the message must hold)
    ("non-utf8", f"{A}#0\tgood\n{A}#1\tcaf".encode() + b"\xe9 au lait\n", 2, "UTF-8"),
    ("blank-caption-tab", f"{A}#0\tgood\n{A}#1\t   \n", 2, "blank caption"),
    ("blank-caption-bare-id", f"{A}#0\tgood\r\n\r\n{A}#1\r\n", 3, "blank caption"),
    ("blank-caption-cn", f"{A}#zhg#0 好\n{A}#zhg#1\n", 2, "blank caption"),
    ("no-id", f"{A}#0\tgood\nA dog runs on the beach .\n", 2, "no caption id"),
    ("no-number", f"{A}#0\tgood\n{A}#x\tbad\n", 2, "no caption id"),
    ("duplicate-id", f"{A}#0\tgood\n{A}#0\tagain\n", 2, "duplicate caption id"),
    ("wrong-delimiter", f"{A}#0\tgood\n{A}#1,comma instead of tab\n", 2, "found ','"),
    ("wrong-delimiter-cn", f"{A}#zhg#0 好\n{A}#zhg#1好\n", 2, "found '好'"),
    ("csv-wrong-delimiter", f"image,caption\n{A},good\n{A};semicolon\n", 3, "wrong delimiter"),
    ("csv-blank-caption", f"image,caption\n{A},good\n{A},  \n", 3, "blank caption"),
    ("csv-no-image", f"image,caption\n{A},good\n,orphan caption\n", 3, "no image name"),
    ("csv-bad-quote", f'image,caption\n{A},good\n{A},"unterminated\n{B},fine\n', 3, "bad CSV"),
    ("csv-repeated-header", f"image,caption\n{A},good\nimage,caption\n", 3, "header repeated"),
    ("csv-non-utf8", b"image,caption\n" + f"{A},good\n{A},".encode() + b"\xff\n", 3, "UTF-8"),
]


@pytest.mark.parametrize("family,data,line,words", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_line_is_skipped_and_reported(tmp_path, family, data, line, words):
    path = write(tmp_path, data)
    cf = read_captions(path)
    assert [c.text for c in cf.captions][:1] in (["good"], ["好"])
    assert len(cf.problems) == 1, cf.problems
    assert cf.problems[0].startswith(f"{path}:{line}: ")
    assert words in cf.problems[0]


def test_duplicate_keeps_the_first_and_names_its_line(tmp_path):
    cf = read_captions(write(tmp_path, f"{A}#0\tfirst\n{B}#0\tother\n{A}#0\tsecond\n"))
    assert [c.text for c in cf.captions] == ["first", "other"]
    assert "first on line 1" in cf.problems[0]


def test_problem_messages_are_capped_but_counted(tmp_path):
    bad = "".join(f"no id here {i}\n" for i in range(MAX_PROBLEMS + 500))
    cf = read_captions(write(tmp_path, f"{A}#0\tgood\n" + bad))
    assert len(cf.problems) == MAX_PROBLEMS + 1
    assert f"({MAX_PROBLEMS + 500} in all)" in cf.problems[-1]


# -- files that cannot be used: CapkitError naming the file ----------------------

FATAL = [
    # (case, how to make the path, words the message must hold)
    ("missing", lambda d: d / "nope.txt", "no such file"),
    ("directory", lambda d: d, "directory"),
    ("empty", lambda d: write(d, b""), "empty"),
    ("only-bom-and-blanks", lambda d: write(d, b"\xef\xbb\xbf\r\n  \n\t\n"), "empty"),
    ("utf16", lambda d: write(d, f"{A}#0\tA dog .\n".encode("utf-16")), "UTF-16"),
    ("no-usable-caption", lambda d: write(d, "just prose\nmore prose\n"), "no usable captions"),
    ("all-undecodable", lambda d: write(d, b"\xfd\xfc\n\xc3\n"), "no usable captions"),
    ("csv-header-only", lambda d: write(d, "image,caption\n"), "no usable captions"),
]


@pytest.mark.parametrize("case,make,words", FATAL, ids=[f[0] for f in FATAL])
def test_unusable_file_raises_capkit_error(tmp_path, case, make, words):
    path = make(tmp_path)
    with pytest.raises(CapkitError) as err:
        read_captions(path)
    assert str(path) in err.value.message and words in err.value.message


def test_no_usable_captions_hint_shows_problems_and_formats(tmp_path):
    path = write(tmp_path, "just prose\n")
    with pytest.raises(CapkitError) as err:
        read_captions(path)
    assert f"{path}:1: no caption id" in err.value.hint
    assert "IMG.jpg#N<TAB>caption" in err.value.hint and "image,caption" in err.value.hint


# -- never anything but a CaptionFile or a CapkitError ---------------------------

GOOD_LINES = st.sampled_from([f"{A}#0\tA dog .", f"{B}#1 Two dogs .", f"{A}#zhg#2 一只狗。", f"{B},A cat ."])
BAD_BYTES = st.sampled_from(
    [b"", b"   ", b"\xff\xfe", f"{A}#0".encode(), f"{A}#0\t".encode(), b"#0\tx", b"no id", f"{A}#1;x".encode(),
     b'"', b"image,caption", b"a,b,c", b"\x00", b"x" * 200_000, b"\xef\xbb\xbf", f"{A}#0\tdup".encode()]
)
NEWLINES = st.sampled_from([b"\n", b"\r\n", b"\r"])


def must_read_or_refuse(path: Path) -> None:
    try:
        cf = read_captions(path)
    except CapkitError as e:
        assert str(path) in e.message
        return
    assert cf.captions and all(c.text and c.text == c.text.strip() for c in cf.captions)
    assert all(p.startswith(f"{path}:") for p in cf.problems)


# Each example rewrites the whole file, so sharing tmp_path across examples is safe.
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=2000))
def test_random_bytes_never_crash(tmp_path, data):
    must_read_or_refuse(write(tmp_path, data))


@FUZZ
@given(
    lines=st.lists(st.one_of(GOOD_LINES.map(str.encode), BAD_BYTES, st.binary(max_size=40)), max_size=30),
    newline=NEWLINES,
    header=st.booleans(),
)
def test_mixed_good_and_bad_lines_never_crash(tmp_path, lines, newline, header):
    data = newline.join(([b"image,caption"] if header else []) + lines)
    must_read_or_refuse(write(tmp_path, data))


CAPTION = st.builds(
    Caption,
    image=st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,12}[A-Za-z0-9_]\.jpg", fullmatch=True),
    index=st.integers(0, 10**6),
    # Line breaks are flattened on write (tested below); everything else must survive.
    text=st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"), min_size=1)
    .map(str.strip)
    .filter(bool),
)


@FUZZ
@given(captions=st.lists(CAPTION, min_size=1, max_size=10, unique_by=lambda c: c.id))
def test_write_then_read_is_identity(tmp_path, captions):
    path = tmp_path / "out.txt"
    write_captions(path, captions)
    got = read_captions(path)
    assert [(c.image, c.index, c.text) for c in got.captions] == [(c.image, c.index, c.text) for c in captions]
    assert got.problems == []


# -- writing --------------------------------------------------------------------


def test_write_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    path = write(tmp_path, f"{A}#0\told\n")
    write_captions(path, [Caption(A, 0, "new"), Caption(A, 1, "two\r\nlines")])
    assert path.read_bytes() == f"{A}#0\tnew\n{A}#1\ttwo lines\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize(
    "bad",
    [Caption(A, 1, "  "), Caption("a#b.jpg", 0, "x"), Caption("", 0, "x"), Caption(A, -1, "x"),
     Caption(A, 0, "repeat"), Caption(A, 1, "bad \ud800 surrogate")],
    ids=["blank", "hash-in-image", "no-image", "negative-index", "repeated-id", "surrogate"],
)
def test_write_refuses_unreadable_caption_and_keeps_old_file(tmp_path, bad):
    path = write(tmp_path, f"{A}#0\told\n")
    with pytest.raises(CapkitError, match="cannot write caption"):
        write_captions(path, [Caption(A, 0, "first"), bad])
    assert path.read_text() == f"{A}#0\told\n"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_write_into_missing_folder_raises_capkit_error(tmp_path):
    with pytest.raises(CapkitError, match="cannot write"):
        write_captions(tmp_path / "no" / "such" / "dir.txt", [Caption(A, 0, "x")])


# -- grouping and splits ----------------------------------------------------------


def test_group_by_image_orders_by_index():
    caps = [Caption(A, 2, "c"), Caption(B, 0, "x"), Caption(A, 0, "a"), Caption(A, 1, "b")]
    assert group_by_image(caps) == {A: ["a", "b", "c"], B: ["x"]}


def test_read_split_dedupes_and_tolerates_bom_crlf_blanks(tmp_path):
    path = write(tmp_path, f"\ufeff{A}\r\n\r\n{B}\r\n{A}\r\n", "train.txt")
    assert read_split(path) == [A, B]


@pytest.mark.parametrize(
    "data,words",
    [(b"", "empty"), (f"{A}#0\tA dog .\n".encode(), "caption file"), (b"ok.jpg\n\xff.jpg\n", "UTF-8")],
    ids=["empty", "caption-file", "non-utf8"],
)
def test_read_split_refuses_bad_files(tmp_path, data, words):
    path = write(tmp_path, data, "split.txt")
    with pytest.raises(CapkitError) as err:
        read_split(path)
    assert str(path) in err.value.message and words in str(err.value)


def test_read_split_missing_file(tmp_path):
    with pytest.raises(CapkitError, match="no such file"):
        read_split(tmp_path / "train.txt")


def test_check_splits_reports_missing_images_and_overlap(tmp_path):
    cf = read_captions(write(tmp_path, f"{A}#0\ta\n{B}#0\tb\n"))
    warnings = check_splits({"train.txt": [A, "gone1.jpg", "gone2.jpg"], "test.txt": [A, B]}, cf)
    assert len(warnings) == 2
    assert warnings[0].startswith("train.txt: 2 of 3 images have no caption") and "gone1.jpg" in warnings[0]
    assert "1 images are in both train.txt and test.txt" in warnings[1] and "BLEU" in warnings[1]
    assert check_splits({"train.txt": [A], "test.txt": [B]}, cf) == []


# -- real data ----------------------------------------------------------------------


def need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} absent")
    return path


@pytest.fixture(scope="module")
def flickr8k(shared_data) -> CaptionFile:
    return read_captions(need(shared_data / "flickr8k" / "Flickr8k.token.txt"))


@pytest.mark.realdata
def test_real_flickr8k_tokens(flickr8k):
    assert flickr8k.format == "flickr8k" and flickr8k.problems == []
    assert len(flickr8k.captions) == 40_460
    groups = group_by_image(flickr8k.captions)
    assert len(groups) == 8_092 and {len(texts) for texts in groups.values()} == {5}


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["flickr8kzhg.caption.txt", "flickr8kzhb.caption.txt"])
def test_real_flickr8k_cn_aligns_with_english(shared_data, flickr8k, name):
    cn = read_captions(need(shared_data / "flickr8k-cn" / name))
    assert cn.format == "flickr8k-cn" and cn.problems == []
    assert [c.id for c in cn.captions] == [c.id for c in flickr8k.captions]


@pytest.mark.realdata
def test_real_splits(shared_data, flickr8k):
    names = ["Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt", "Flickr_8k.testImages.txt"]
    splits = {name: read_split(need(shared_data / "flickr8k" / name)) for name in names}
    assert [len(s) for s in splits.values()] == [6000, 1000, 1000]
    assert check_splits(splits, flickr8k) == []
