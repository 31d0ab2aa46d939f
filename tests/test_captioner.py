"""The Captioner: one encoder and the loaded packs, images (paths or bytes) to captions per language."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.config import SearchConfig
from toolkit.errors import CapkitError
from toolkit.images import ImageBytes
from toolkit.pack import load_manifest


@pytest.fixture(scope="module")
def captioner(tiny_packs):
    from toolkit.captioner import Captioner

    return Captioner(tiny_packs, ["all"])


@pytest.fixture(scope="module")
def images(tiny_dataset):
    return sorted(tiny_dataset["images"].iterdir())[:4]


def test_bytes_caption_as_their_file_does_and_keep_their_names(captioner, images):
    paths = captioner.caption(images, search=SearchConfig(beam=2))
    uploads = captioner.caption([ImageBytes(f"upload {i}", p.read_bytes()) for i, p in enumerate(images)],
                                search=SearchConfig(beam=2))
    assert [im.image for im in paths.images] == [str(p) for p in images]
    assert [im.image for im in uploads.images] == [f"upload {i}" for i in range(4)]
    for a, b in zip(paths.images, uploads.images):
        assert a.error is None and b.error is None and a.key == b.key
        assert list(a.captions) == ["en", "zh"] == list(b.captions)
        assert {k: (c.text, c.ids) for k, c in a.captions.items()} == {k: (c.text, c.ids) for k, c in b.captions.items()}


def test_each_caption_names_its_language_and_pack_version(captioner, images, tiny_packs):
    batch = captioner.caption(images[:2], ["zh"], SearchConfig(beam=1))
    version = load_manifest(tiny_packs / "zh")["pack_version"]
    for im in batch.images:
        (c,) = im.captions.values()
        assert c.lang == "zh" and c.pack_version == version and isinstance(c.text, str)
    assert set(batch.seconds) == {"encode", "decode"}


def test_a_bad_image_is_reported_and_the_others_captioned(captioner, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    batch = captioner.caption([images[0], ImageBytes("empty.png", b""), broken, ImageBytes("junk.gif", b"GIF89a??")],
                              ["en"], SearchConfig(beam=1))
    good, empty, bad_file, junk = batch.images
    assert good.error is None and good.captions["en"].text == captioner.caption([images[0]], ["en"], SearchConfig(beam=1)).images[0].captions["en"].text
    assert empty.error == "empty.png: empty file" and empty.captions == {} and empty.key is None
    assert bad_file.error.startswith(f"{broken}: ") and bad_file.captions == {}
    assert junk.error.startswith("junk.gif: ")
    assert batch.failures == {"empty.png": empty.error, str(broken): bad_file.error, "junk.gif": junk.error}
    assert [r["image"] for r in batch.rows()] == [str(images[0])]


def test_two_uploads_of_one_name_are_two_images(captioner, images):
    batch = captioner.caption([ImageBytes("image.jpg", images[0].read_bytes()), ImageBytes("image.jpg", images[1].read_bytes())],
                              ["en"], SearchConfig(beam=1))
    a, b = batch.images
    assert a.key != b.key and a.error is None and b.error is None
    one = captioner.caption([images[1]], ["en"], SearchConfig(beam=1)).images[0]
    assert b.captions["en"].ids == one.captions["en"].ids


def test_the_search_setting_is_the_one_given(captioner, images):
    """Captions are what generate's numpy search finds on the encoder's features with the same setting."""
    from toolkit.generate import beam_search
    from toolkit.tokenizer import BOS_ID, EOS_ID

    search = SearchConfig(beam=3, length_penalty=1.0, no_repeat_ngram=2)
    batch = captioner.caption(images, ["en"], search)
    pack, encoder = captioner.pack("en"), captioner.encoder("en")
    feats = encoder.features([im.key for im in batch.images])
    want = beam_search(pack.step, feats, BOS_ID, EOS_ID, beam=3, max_length=pack.manifest["decoder"]["max_length"],
                       length_penalty=1.0, no_repeat_ngram=2)
    assert [im.captions["en"].ids for im in batch.images] == want
    with pytest.raises(CapkitError, match="beam must be at least 1"):
        captioner.caption(images, ["en"], SearchConfig(beam=0))


def test_encoder_and_packs_are_built_once(tiny_packs, images, monkeypatch):
    import toolkit.captioner
    import toolkit.encoder
    from toolkit.captioner import Captioner

    built = []
    real_load, real_pack = toolkit.encoder.Encoder.load, toolkit.captioner.load_pack
    monkeypatch.setattr(toolkit.encoder.Encoder, "load", classmethod(lambda cls, *a: built.append("encoder") or real_load(*a)))
    monkeypatch.setattr(toolkit.captioner, "load_pack", lambda *a: built.append(a[1]) or real_pack(*a))
    cap = Captioner(tiny_packs, ["en", "zh"])
    assert built == []  # nothing heavy until a caption needs it
    cap.caption(images[:2], ["en"], SearchConfig(beam=1))
    cap.caption(images[2:], search=SearchConfig(beam=1))
    cap.load()
    assert built == ["encoder", "en", "zh"]
    assert cap.encoder("en") is cap.encoder("zh")


def test_languages_outside_the_captioner_are_refused(tiny_packs, captioner, images):
    from toolkit.captioner import Captioner

    with pytest.raises(CapkitError, match="no 'tr' pack"):
        Captioner(tiny_packs, ["tr"])
    with pytest.raises(CapkitError, match="no 'fr' pack in this captioner"):
        captioner.caption(images, ["fr"])
    assert captioner.caption([], ["en"]).images == []


def test_caption_images_is_the_captioner_on_a_folder(tiny_packs, tiny_dataset, captioner):
    from toolkit.captioner import caption_images

    out = caption_images([tiny_dataset["images"]], ["en", "zh"], tiny_packs, beam=2, captioner=captioner)
    batch = captioner.caption(sorted(tiny_dataset["images"].iterdir()), ["en", "zh"], SearchConfig(beam=2))
    assert out.rows == batch.rows() and out.failures == {}


def test_threads_sharing_a_captioner_get_what_one_thread_gets(captioner, images):
    from concurrent.futures import ThreadPoolExecutor

    jobs = [images[i:] for i in range(4)]
    alone = [captioner.caption(j, search=SearchConfig(beam=1)).rows() for j in jobs]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda j: captioner.caption(j, search=SearchConfig(beam=1)).rows(), jobs))
    assert together == alone


def test_without_a_feature_cache_captions_are_the_same_and_nothing_is_written(tiny_packs, images, tmp_path):
    import shutil

    from toolkit.captioner import Captioner
    from toolkit.encoder import ENCODERS_DIR

    packs = tmp_path / "packs"
    shutil.copytree(tiny_packs, packs)
    for cache in packs.glob(f"{ENCODERS_DIR}/*/features"):
        shutil.rmtree(cache)  # the disk path must extract too, not read what other tests cached
    search = SearchConfig(beam=2)
    on_disk = Captioner(packs, ["all"]).caption(images, search=search)
    eid = Captioner(packs, ["en"]).encoder_id("en")
    features = packs / ENCODERS_DIR / eid / "features"
    size = sum(f.stat().st_size for f in features.rglob("*") if f.is_file())
    uploads = [ImageBytes(p.name, p.read_bytes()) for p in images]
    memory = Captioner(packs, ["all"], feature_cache=False)
    in_memory = memory.caption(uploads, search=search)
    for a, b in zip(on_disk.images, in_memory.images):
        assert {k: (c.text, c.ids) for k, c in a.captions.items()} == {k: (c.text, c.ids) for k, c in b.captions.items()}
    enc = memory.encoder("en")
    assert enc.cache is None and len(enc._memory) == len(images)
    np.testing.assert_array_equal(enc.features([im.key for im in in_memory.images]),
                                  Captioner(packs, ["en"]).encoder("en").features([im.key for im in on_disk.images]))
    memory.forget_features()
    assert enc._memory == {}
    assert sum(f.stat().st_size for f in features.rglob("*") if f.is_file()) == size  # the uploads wrote nothing
