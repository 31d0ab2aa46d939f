"""Every image a user may have: decoded to RGB, or refused with a message naming the file.

And around extraction: one bad file is reported and skipped while the rest are
cached; a full disk or Ctrl-C mid-write leaves a consistent cache that the
next run completes.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import encoder_with_cache
from toolkit.encoder import FEATURE_DIM, FEATURES_FILE, FEATURES_INDEX_FILE, FeatureCache
from toolkit.errors import CapkitError
from toolkit.images import ImageError, decode_image, list_images, read_image

SIZE = 71
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(w=40, h=20, left=RED, right=BLUE, mode="RGB") -> Image.Image:
    """Left half one colour, right half another: shows where a rotation put them."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2], a[:, w // 2 :] = left, right
    return Image.fromarray(a).convert(mode)


def near(pixel, colour, tol=40) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - colour) <= tol))


def gradient16() -> Image.Image:
    return Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16))


def palette_with_transparency() -> bytes:
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, *RED] + [0] * 762)
    img.paste(1, (8, 0, 16, 16))  # right half red, left half index 0: transparent black
    return encode(img, "PNG", transparency=0)


def transparent_left(mode: str) -> bytes:
    a = np.zeros((16, 16, 4), np.uint8)
    a[:, 8:] = (*RED, 255)  # left half transparent black, right half opaque red
    return encode(Image.fromarray(a, "RGBA").convert(mode), "PNG")


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: stored on its side, shown turned 90 degrees clockwise
    return encode(halves(), "JPEG", exif=exif.tobytes())


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels in a few dozen bytes: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


JPEG = encode(halves(), "JPEG")


def _left_right(a):
    return near(a[35, 5], RED) and near(a[35, 65], BLUE)


def _top_bottom(a):
    return near(a[5, 35], RED) and near(a[65, 35], BLUE)


def _white_left_red_right(a):
    return near(a[35, 5], WHITE, 2) and near(a[35, 65], RED, 2)


def _grey(a):
    return bool((a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all())


def _grey_full_range(a):
    return _grey(a) and a.min() < 30 and a.max() > 225  # scaled to 8 bits, not clipped to white


# (name on disk, bytes, check of the decoded (71, 71, 3) array)
GOOD = {
    "rgb": ("photo.jpg", JPEG, _left_right),
    "grayscale L": ("grey.png", encode(halves().convert("L"), "PNG"), _grey),
    "16-bit I;16": ("depth16.png", encode(gradient16(), "PNG"), _grey_full_range),
    "CMYK JPEG": ("print.jpg", encode(halves(mode="CMYK"), "JPEG"), _left_right),
    "palette with transparency": ("icon.png", palette_with_transparency(), _white_left_red_right),
    "RGBA": ("alpha.png", transparent_left("RGBA"), _white_left_red_right),
    "LA": ("grey-alpha.png", transparent_left("LA"),
           lambda a: _grey(a) and near(a[35, 5], WHITE, 2) and a[35, 65, 0] < 128),
    "animated GIF": ("anim.gif", animated("GIF"), lambda a: near(a[35, 35], RED, 2)),
    "animated WebP": ("anim.webp", animated("WEBP"), lambda a: near(a[35, 35], RED, 30)),
    "EXIF orientation 6": ("rotated.jpg", exif_rotated(), _top_bottom),
    "1x1": ("dot.png", encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
            lambda a: (a == (10, 200, 30)).all()),
    "non-ASCII name": ("café_猫.jpg", encode(halves(left=BLUE, right=RED), "JPEG"),
                       lambda a: near(a[35, 5], BLUE) and near(a[35, 65], RED)),
    "non-UTF-8 name": (os.fsdecode(b"caf\xe9.png"), encode(halves(left=WHITE), "PNG"),
                       lambda a: near(a[35, 5], WHITE, 2)),
}

MAX_PIXELS = 5_000  # above every GOOD image, below "over the pixel limit"

# (name on disk, bytes, what the message says)
BAD = {
    "truncated JPEG": ("cut.jpg", JPEG[: len(JPEG) // 2], "unreadable image"),
    "truncated PNG": ("cut.png", encode(halves(), "PNG")[:-30], "unreadable image"),
    "corrupt bytes": ("noise.png", np.random.default_rng(0).bytes(2000), "not an image"),
    "text named .jpg": ("notes.jpg", "a dog runs\n".encode() * 20, "not an image"),
    "zero bytes": ("empty.jpg", b"", "empty file"),
    "over the pixel limit": ("big.png", encode(Image.new("RGB", (100, 100)), "PNG"), "over the limit of 5,000"),
    "bomb header": ("bomb.png", png_header(100_000, 100_000), "over the limit"),
}


def write(folder: Path, cases: dict) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for case, (name, data, _) in cases.items():
        (folder / name).write_bytes(data)
        out[case] = folder / name
    return out


@pytest.mark.parametrize("case", GOOD)
def test_good_images_decode_to_rgb(case, tmp_path):
    path = write(tmp_path, {case: GOOD[case]})[case]
    a = read_image(path, SIZE, max_pixels=MAX_PIXELS)
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    assert GOOD[case][2](a), a[::10, ::10].tolist()


@pytest.mark.parametrize("case", BAD)
def test_bad_images_raise_image_error_naming_the_file(case, tmp_path):
    path = write(tmp_path, {case: BAD[case]})[case]
    with pytest.raises(ImageError, match=BAD[case][2]) as err:
        read_image(path, SIZE, max_pixels=MAX_PIXELS)
    assert str(path) in err.value.message


def test_pixel_limit_is_settable_and_says_how():
    big = BAD["over the pixel limit"][1]
    with pytest.raises(ImageError) as err:
        decode_image(big, SIZE, "big.png", max_pixels=MAX_PIXELS)
    assert "--max-pixels" in err.value.hint
    assert decode_image(big, SIZE, "big.png", max_pixels=10_000).shape == (SIZE, SIZE, 3)


def test_unreadable_file_by_permissions(tmp_path):
    path = write(tmp_path, {"rgb": GOOD["rgb"]})["rgb"]
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions do not stop reads (the simulated test covers it)")
        with pytest.raises(ImageError, match="cannot read .*Permission denied") as err:
            read_image(path, SIZE)
        assert str(path) in err.value.message
    finally:
        path.chmod(0o644)


def deny(monkeypatch, name: str) -> None:
    """Make reading the file `name` fail as chmod 000 does for a normal user."""
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    path = write(tmp_path, {"rgb": GOOD["rgb"]})["rgb"]
    deny(monkeypatch, path.name)
    with pytest.raises(ImageError, match="cannot read .*Permission denied") as err:
        read_image(path, SIZE)
    assert str(path) in err.value.message


def test_unlistable_folder_is_a_capkit_error(tmp_path, monkeypatch):
    def iterdir(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(CapkitError, match="cannot list the folder"):
        list_images([tmp_path])
    with pytest.raises(CapkitError, match="no such file or folder"):
        list_images([tmp_path / "missing"])


# Damaged files make Pillow raise many exception types (OverflowError from this TIFF tag,
# TypeError, struct.error, ...): every one must come out as ImageError.
_RGB = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
_EXIF = Image.Exif()
_EXIF[0x0112] = 6
SEEDS = {
    "jpeg": encode(_RGB, "JPEG", exif=_EXIF.tobytes()),
    "png": encode(_RGB, "PNG"),
    "gif": encode(_RGB.convert("P"), "GIF", save_all=True, append_images=[_RGB.convert("P")]),
    "webp": encode(_RGB, "WEBP"),
    "tiff": encode(_RGB, "TIFF", exif=_EXIF.tobytes()),
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on the damage it works around
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.none() | st.integers(1, 2**16),
)
@example(fmt="tiff", edits=[(396, 46), (72, 16)], cut=None)
def test_damaged_files_raise_only_image_error(fmt, edits, cut):
    data = bytearray(SEEDS[fmt])
    for pos, value in edits:
        data[pos % len(data)] = value
    data = bytes(data[: cut % len(data) + 1] if cut else data)
    try:
        a = decode_image(data, SIZE, f"fuzz.{fmt}")
    except ImageError as e:
        assert e.message.startswith(f"fuzz.{fmt}: ")
    else:
        assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8


# -- extraction: bad files, full disks, Ctrl-C ------------------------------------


def test_extract_skips_each_bad_file_once_and_caches_the_rest(tiny_encoder, tmp_path, monkeypatch):
    good = write(tmp_path / "imgs", GOOD)
    bad = write(tmp_path / "imgs", BAD)
    bad["unreadable"] = tmp_path / "imgs" / "locked.jpg"
    bad["unreadable"].write_bytes(JPEG)
    deny(monkeypatch, "locked.jpg")
    enc = encoder_with_cache(tiny_encoder, tmp_path / "enc")
    paths = list_images([tmp_path / "imgs"])
    assert len(paths) == len(good) + len(bad)

    ex = enc.extract(paths, max_pixels=MAX_PIXELS)
    assert set(ex.failures) == {str(p) for p in bad.values()}
    for path, message in ex.failures.items():
        assert message.startswith(f"{path}: ")
    assert ex.failures[str(bad["over the pixel limit"])].endswith("(raise it with --max-pixels if you trust this file)")
    assert set(ex.keys) == {str(p) for p in good.values()}
    assert ex.n_extracted == len(good) and len(enc.cache) == len(good)

    again = encoder_with_cache(tiny_encoder, tmp_path / "enc").extract(paths, max_pixels=MAX_PIXELS)
    assert (again.n_extracted, again.n_cached) == (0, len(good))
    assert again.failures == ex.failures


def test_read_only_cache_keeps_features_in_memory(tiny_encoder, tmp_path, monkeypatch):
    import toolkit.features

    def refuse(path, data, keep):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(toolkit.features, "_append", refuse)
    paths = photos(tmp_path, 5)
    enc = encoder_with_cache(tiny_encoder, tmp_path / "enc")
    ex = enc.extract(paths)
    assert ex.n_extracted == 5 and len(enc.cache) == 0
    assert_features_match(enc, ex, paths)


def photos(tmp_path: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(n)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return sorted(folder.iterdir())


def assert_cache_consistent(home: Path) -> int:
    """Rows and keys on disk agree (the invariant every writer keeps); returns their count."""
    root = home / "features"
    rows = (root / FEATURES_FILE).stat().st_size if (root / FEATURES_FILE).exists() else 0
    index = (root / FEATURES_INDEX_FILE).read_bytes() if (root / FEATURES_INDEX_FILE).exists() else b""
    assert index == b"" or index.endswith(b"\n")
    n = index.count(b"\n")
    assert rows == n * 2 * FEATURE_DIM
    assert len(set(index.split())) == n
    return n


def assert_features_match(enc, ex, paths) -> None:
    """Each image's cached row is its own: a shifted index would pair keys with other images' rows."""
    cached = enc.features([ex.keys[str(p)] for p in paths])
    fresh = enc.encode_arrays(np.stack([read_image(p, SIZE) for p in paths]))
    np.testing.assert_allclose(cached, fresh, rtol=5e-3, atol=5e-3 * np.abs(fresh).max())


# (file that fails, bytes written before the failure, the failure)
FAULTS = {
    "disk full mid-row": (FEATURES_FILE, 3 * FEATURE_DIM + 7, OSError(errno.ENOSPC, "No space left on device")),
    "disk full mid-key": (FEATURES_INDEX_FILE, 33 + 10, OSError(errno.ENOSPC, "No space left on device")),
    "disk full after 2 keys": (FEATURES_INDEX_FILE, 2 * 33, OSError(errno.ENOSPC, "No space left on device")),
    "Ctrl-C mid-row": (FEATURES_FILE, 5 * FEATURE_DIM, KeyboardInterrupt()),
    "Ctrl-C after 3 keys": (FEATURES_INDEX_FILE, 3 * 33, KeyboardInterrupt()),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_failed_cache_write_leaves_a_consistent_cache_the_next_run_completes(fault, tiny_encoder, tmp_path, monkeypatch):
    import toolkit.features

    target, written, exc = FAULTS[fault]
    real = toolkit.features._append
    calls = []

    def append(path, data, keep):
        calls.append(path.name)
        if path.name == target and calls.count(target) == 2:  # the second batch fails
            real(path, data[:written], keep)
            raise exc
        real(path, data, keep)

    paths = photos(tmp_path, 10)
    enc = encoder_with_cache(tiny_encoder, tmp_path / "enc")
    with monkeypatch.context() as m:
        m.setattr(toolkit.features, "_append", append)
        if isinstance(exc, OSError):
            with pytest.raises(CapkitError) as err:
                enc.extract(paths)
            assert "No space left on device" in err.value.message and "the 4 already cached are kept" in err.value.message
            assert "free some disk space" in err.value.hint
        else:
            with pytest.raises(KeyboardInterrupt):
                enc.extract(paths)
    assert assert_cache_consistent(tmp_path / "enc") == 4
    assert len(FeatureCache(tmp_path / "enc" / "features", FEATURE_DIM)) == 4

    again = encoder_with_cache(tiny_encoder, tmp_path / "enc")
    ex = again.extract(paths)
    assert (ex.n_cached, ex.n_extracted) == (4, 6)
    assert assert_cache_consistent(tmp_path / "enc") == 10
    assert_features_match(again, ex, paths)


def test_ctrl_c_during_extraction_keeps_finished_batches(tiny_encoder, tmp_path):
    paths = photos(tmp_path, 10)
    enc = encoder_with_cache(tiny_encoder, tmp_path / "enc")

    def progress(done, total):
        if done == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        enc.extract(paths, progress=progress)
    assert assert_cache_consistent(tmp_path / "enc") == 4  # the first batch of 4; the next was half full

    again = encoder_with_cache(tiny_encoder, tmp_path / "enc")
    ex = again.extract(paths)
    assert (ex.n_cached, ex.n_extracted) == (4, 6)
    assert_features_match(again, ex, paths)
