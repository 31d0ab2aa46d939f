"""The caption job: a `Captioner` holds the shared encoder and the loaded packs, built once, and turns
images (files or bytes) into captions in every language asked, under one search setting. Captions
come out as the language is written (`toolkit.written`), whatever the pack's age.

`capkit caption`, `capkit evaluate`, `capkit report` (and a server) all caption
through it; none of them builds an encoder or loads a pack itself.

    captioner = Captioner(packs_dir, ["en", "zh"])
    batch = captioner.caption(["a.jpg", ImageBytes("upload.png", data)], search=SearchConfig(beam=3))
    batch.images[0].captions["zh"].text   # "一只狗在草地上奔跑。"
    batch.images[1].error                 # None, or "upload.png: not an image Pillow can read"
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from toolkit.config import SEARCH, SearchConfig
from toolkit.errors import CapkitError
from toolkit.images import DEFAULT_MAX_PIXELS, ImageBytes
from toolkit.pack import LoadedPack, architecture, find_pack, load_manifest, load_pack, resolve_langs
from toolkit.progress import Report


@dataclass
class PackCaption:
    """One pack's caption of one image."""

    lang: str
    text: str             # the caption as the language is written (`written.written_form` of the decoded tokens)
    ids: list[int]        # its tokens, without BOS and EOS (what the report draws attention maps for)
    pack_version: str     # the manifest's `pack_version`: which build of the pack wrote it


@dataclass
class ImageCaptions:
    """What became of one input image."""

    image: str                                   # the path as given, or the `ImageBytes` name
    captions: dict[str, PackCaption] = field(default_factory=dict)  # lang -> caption, in the order asked; {} on error
    error: str | None = None                     # why the image was skipped (one line, its hint included), else None
    key: str | None = None                       # the feature-cache key of its bytes (`encoder.image_key`); None on error


@dataclass
class CaptionBatch:
    """`Captioner.caption`'s answer: one entry per input image, in input order."""

    images: list[ImageCaptions]
    seconds: dict[str, float]   # "encode" (encoder loading and extraction), "decode" (pack loading and search)

    @property
    def failures(self) -> dict[str, str]:
        """image -> why it was skipped, for the images that were."""
        return {im.image: im.error for im in self.images if im.error is not None}

    def rows(self) -> list[dict]:
        """{"image", "lang", "caption", "ids"} per captioned image and language, image-major."""
        return [{"image": im.image, "lang": c.lang, "caption": c.text, "ids": c.ids}
                for im in self.images for c in im.captions.values()]


class Captioner:
    """The packs of `langs` (or "all") in `packs_dir`, with the encoders they were trained on.

    Manifests are read (and checked) at once; each encoder and each decoder is
    built the first time a caption needs it and kept, so a long-lived
    captioner (a server) pays for them once. `load()` builds them all now.
    Packs on different encoders may sit in one captioner: each image then
    goes through each encoder once. Threads may share one: captions are made
    one call at a time (the encoder's cache takes one writer), the others wait.

    `feature_cache=False` keeps the features of its images in memory only,
    not in the packs dir's cache: a server's uploads must not fill the disk.
    They are rounded as the cache rounds them, so the captions are the same;
    `forget_features()` drops them.
    """

    def __init__(self, packs_dir: Path, langs: Sequence[str] = ("all",), *, feature_cache: bool = True):
        self.packs_dir = Path(packs_dir)
        self.feature_cache = feature_cache
        self.langs: list[str] = resolve_langs(self.packs_dir, list(langs))
        self.manifests: dict[str, dict] = {lang: load_manifest(find_pack(self.packs_dir, lang)) for lang in self.langs}
        self._encoders: dict[str, object] = {}
        self._packs: dict[str, LoadedPack] = {}
        self._lock = threading.RLock()

    def encoder_id(self, lang: str) -> str:
        return self.manifests[lang]["encoder"]["id"]

    def encoder_ids(self, langs: Sequence[str] | None = None) -> list[str]:
        """The encoders the packs of `langs` (default: all of this captioner's) were trained on, once each."""
        return list(dict.fromkeys(self.encoder_id(lang) for lang in (self.langs if langs is None else langs)))

    def encoder(self, lang: str):
        """The `Encoder` of `lang`'s pack, shared by every pack trained on it."""
        from toolkit.encoder import Encoder

        eid = self.encoder_id(lang)
        with self._lock:
            if eid not in self._encoders:
                enc = Encoder.load(self.packs_dir, eid)
                if not self.feature_cache:  # the same model and identity, without a home to cache in
                    enc = Encoder(enc.model, enc.config, enc.identity, None)
                self._encoders[eid] = enc
            return self._encoders[eid]

    def forget_features(self) -> None:
        """Drop every feature held in memory (all of them, with `feature_cache=False`)."""
        with self._lock:
            for enc in self._encoders.values():
                enc.forget_features()

    def pack(self, lang: str) -> LoadedPack:
        """`lang`'s decoder and tokenizer, checked against its encoder."""
        if lang not in self.manifests:
            raise CapkitError(f"no {lang!r} pack in this captioner (it holds {', '.join(self.langs)})")
        with self._lock:
            if lang not in self._packs:
                self._packs[lang] = load_pack(self.packs_dir, lang, self.encoder_id(lang))
            return self._packs[lang]

    def load(self) -> "Captioner":
        """Build every encoder and decoder now rather than at the first caption."""
        for lang in self.langs:
            self.encoder(lang)
            self.pack(lang)
        return self

    def needs_grid(self, encoder_id: str) -> bool:
        """Whether any pack on `encoder_id` attends: then one extraction caches grids for all of them."""
        return any(architecture(m) == "attention" for lang, m in self.manifests.items() if self.encoder_id(lang) == encoder_id)

    def caption(
        self,
        images: Sequence[str | Path | ImageBytes],
        langs: Sequence[str] | None = None,
        search: SearchConfig = SEARCH,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        report: Report | None = None,
    ) -> CaptionBatch:
        """Caption every image of `images` in every language of `langs` (default: all of this captioner's).

        Each encoder reads the images once for all its packs, in batches, from
        its feature cache where it can; each pack then searches every image in
        chunks (`generate.beam_search_batched`), an image given twice once. An
        image that cannot be read gets its `error` and no captions; the others
        are captioned.
        """
        if search.beam < 1:
            raise CapkitError(f"beam must be at least 1, not {search.beam}")
        report = report or Report()
        langs = list(dict.fromkeys(self.langs if langs is None else langs))
        for lang in langs:
            if lang not in self.manifests:
                raise CapkitError(f"no {lang!r} pack in this captioner (it holds {', '.join(self.langs)})")
        # A path is named by its text; bytes by their object, since two uploads may share a name.
        labels = [im if isinstance(im, ImageBytes) else str(im) for im in images]
        out = [ImageCaptions(im.name if isinstance(im, ImageBytes) else label) for im, label in zip(images, labels)]
        seconds = {"encode": 0.0, "decode": 0.0}
        with self._lock:
            for eid in self.encoder_ids(langs):
                group = [lang for lang in langs if self.encoder_id(lang) == eid]
                self._caption_with(eid, group, labels, out, search, max_pixels, report, seconds)
        for im in out:
            if im.error is not None:  # unreadable for one encoder: skipped, like every unreadable image
                im.captions, im.key = {}, None
        return CaptionBatch(out, seconds)

    def _caption_with(self, eid: str, group: list[str], labels: list, out: list[ImageCaptions], search: SearchConfig,
                      max_pixels: int, report: Report, seconds: dict[str, float]) -> None:
        """`caption`'s work for the packs `group` on encoder `eid`: one extraction, then one search per pack."""
        from toolkit.generate import beam_search_batched
        from toolkit.tokenizer import BOS_ID, EOS_ID
        from toolkit.written import written_form

        t0 = time.perf_counter()
        encoder = self.encoder(group[0])
        ex = encoder.extract(labels, progress=lambda d, t: report("progress", stage="encode", done=d, total=t),
                             max_pixels=max_pixels, grid=self.needs_grid(eid))
        t1 = time.perf_counter()
        for im, label in zip(out, labels):
            if label in ex.failures and im.error is None:
                im.error = ex.failures[label]
            im.key = ex.keys.get(label)
        keys = list(dict.fromkeys(ex.keys[label] for label in labels if label in ex.keys))
        pooled = encoder.features(keys) if keys else None
        for lang in group:
            pack = self.pack(lang)
            feats = encoder.features_view(keys, grid=True) if pack.needs_grid else pooled
            ids = beam_search_batched(pack.step, feats, BOS_ID, EOS_ID, search.beam, pack.manifest["decoder"]["max_length"],
                                      search.length_penalty, search.no_repeat_ngram) if keys else []
            by_key = {k: PackCaption(lang, written_form(text, lang), c, pack.manifest["pack_version"])
                      for k, text, c in zip(keys, pack.tokenizer.decode(ids), ids)}
            for im in out:
                if im.key in by_key:
                    im.captions[lang] = by_key[im.key]
        seconds["encode"] += t1 - t0
        seconds["decode"] += time.perf_counter() - t1


@dataclass
class Captions:
    """`caption_images`' answer, in the layout `capkit caption` prints."""

    rows: list[dict]                 # {"image", "lang", "caption", "ids"}, image-major; ids: the caption's tokens
    failures: dict[str, str]         # image path -> why it was skipped
    seconds: dict[str, float]        # stage -> seconds


def caption_images(
    inputs: list[str | Path],
    langs: list[str],
    packs_dir: Path,
    *,
    beam: int = SEARCH.beam,
    length_penalty: float = SEARCH.length_penalty,
    no_repeat_ngram: int = SEARCH.no_repeat_ngram,
    max_pixels: int | None = None,
    report: Report | None = None,
    captioner: Captioner | None = None,
) -> Captions:
    """Caption every image in `inputs` (files or folders) in every language of `langs`, one encoder pass.

    `captioner` reuses packs already loaded (it must hold `langs`); without
    it one is made for `langs`. The packs must share one encoder.
    """
    from toolkit.images import list_images

    if beam < 1:
        raise CapkitError(f"--beam must be at least 1, not {beam}")
    report = report or Report()
    captioner = captioner or Captioner(packs_dir, langs)
    langs = resolve_langs(Path(packs_dir), langs)
    enc_ids = captioner.encoder_ids(langs)
    if len(enc_ids) > 1:
        raise CapkitError(f"packs {', '.join(langs)} use different encoders ({', '.join(sorted(enc_ids))})",
                          hint="caption with packs of one encoder at a time")
    paths = list_images(inputs)
    if not paths:
        raise CapkitError(f"no images found in {', '.join(map(str, inputs))}")
    batch = captioner.caption(paths, langs, SearchConfig(beam, length_penalty, no_repeat_ngram),
                              max_pixels=max_pixels or DEFAULT_MAX_PIXELS, report=report)
    return Captions(batch.rows(), batch.failures, batch.seconds)
