"""One self-contained HTML page: every image with its captions in every
language side by side, the BLEU and CIDEr-D table beside its baselines, and
each pack's loss curves.

Under the caption of a pack whose decoder attends ("attention"), a strip
shows where it looked to choose each token: the attention over the encoder's
G x G grid, stretched over a small copy of the photo.

Self-contained means nothing is fetched when the page opens: thumbnails and
heat maps are base64 JPEGs, charts are inline SVG written here, there is no script, and a
Content-Security-Policy (``default-src 'none'``) makes the browser refuse any
outside resource a later edit might add. All text goes through
``html.escape``; right-to-left languages get ``dir="rtl"``.

Gathering (captioning, scoring: TensorFlow; this module) and rendering
(pure strings: `toolkit.report_page`, its names importable from here too)
are separate, so the page can be rendered and tested from plain data:

    html = render_html(ReportData(langs=["en"], rows=[...], ...))

and the heat maps from plain arrays (`attention_overlay`).
"""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from toolkit.config import SEARCH
from toolkit.errors import CapkitError
from toolkit.report_page import (  # noqa: F401  (the page's types and renderer, importable here as before)
    CSP, RTL_LANGS, SCORE_ORDERS, AttentionStrip, ReportData, ReportRow, Thumbnail, TokenAttention, loss_chart_svg,
    nice_ticks, render_html, text_dir,
)

THUMB_SIZE = 256      # longest side of the embedded thumbnails, in pixels
THUMB_QUALITY = 85    # JPEG quality of the thumbnails
ATTENTION_SIZE = 80   # longest side of each token's heat map: four fit a caption cell's width
ATTENTION_QUALITY = 80
ATTENTION_MAX_TOKENS = 20  # heat maps under one caption; a longer caption shows its first ones
ATTENTION_BATCH = 64  # images per `attention_maps` call
# How a heat map is drawn: what got no attention keeps this much of its brightness,
# and the colour scale covers this fraction of every pixel.
ATTENTION_FLOOR = 0.25
ATTENTION_TINT = 0.35
# matplotlib's "inferno" at 0, 1/4, ..., 1: brightness grows with the value, so the
# brightest spot is where the decoder looked most, in colour and in grey.
_HEAT = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)


# -- gathering -------------------------------------------------------------------


def thumbnail(path: str | Path, size: int = THUMB_SIZE, max_pixels: int | None = None) -> Thumbnail:
    """A JPEG thumbnail (longest side `size`, aspect kept, EXIF rotation
    applied, transparency on white) as a data URI. Unreadable files raise
    `ImageError`."""
    return _jpeg(_small_rgb(path, size, max_pixels), THUMB_QUALITY)


def _small_rgb(path, size: int, max_pixels: int | None = None):
    """The image at `path` (or an `ImageBytes`) as an RGB Pillow image whose longest side is at most `size`."""
    from PIL import Image, ImageOps

    from toolkit.images import DEFAULT_MAX_PIXELS, ImageBytes, ImageError, _to_rgb

    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    try:
        data = path.data if isinstance(path, ImageBytes) else Path(path).read_bytes()
        path = path.name if isinstance(path, ImageBytes) else path
        Image.MAX_IMAGE_PIXELS = None  # the limit below is ours, as in images.decode_image
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > max_pixels:
                raise ImageError(f"{path}: {img.width}x{img.height} pixels is over the limit of {max_pixels:,}")
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # decode big photos at a fraction of their size
            rgb = _to_rgb(ImageOps.exif_transpose(img))
        rgb.thumbnail((size, size), Image.LANCZOS)
        return rgb
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: unreadable image ({e})") from None


def _jpeg(img, quality: int) -> Thumbnail:
    """A Pillow RGB image as a JPEG data URI."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=True)
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.width, img.height)


def decoder_inputs(captions: Sequence[Sequence[int]]) -> np.ndarray:
    """The decoder inputs whose attention rows belong to the captions' tokens:
    BOS, then every token but the last, 0-padded to the longest caption.
    Row t of `attention_maps` then chose token t.

    >>> decoder_inputs([[5, 9, 14], [7]])  # BOS_ID is 2
    array([[2, 5, 9],
           [2, 0, 0]], dtype=int32)
    """
    from toolkit.tokenizer import BOS_ID, PAD_ID

    out = np.full((len(captions), max([1, *map(len, captions)])), PAD_ID, np.int32)
    out[:, 0] = BOS_ID
    for row, ids in zip(out, captions):
        row[1 : len(ids)] = ids[:-1]
    return out


def attention_overlay(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The image `rgb` (h, w, 3) uint8 under one attention map `alpha` (G, G),
    grid rows top to bottom, as a new (h, w, 3) uint8 image.

    The map, scaled to its own peak, is stretched over the whole image (the
    encoder saw the photo squashed to a square): what got little attention
    is darkened, and the "inferno" colour scale is blended over everything,
    so the brightest region is where the decoder looked most.

        attention_overlay(np.full((60, 90, 3), 128, np.uint8), np.eye(3))  # bright along the diagonal
    """
    from PIL import Image

    h, w = rgb.shape[:2]
    alpha = np.asarray(alpha, np.float32)
    scaled = alpha / max(float(alpha.max()), 1e-12)
    a = np.clip(np.asarray(Image.fromarray(scaled, "F").resize((w, h), Image.BILINEAR)), 0.0, 1.0)
    lit = rgb.astype(np.float32) * (ATTENTION_FLOOR + (1 - ATTENTION_FLOOR) * a)[..., None]
    x = a * (len(_HEAT) - 1)  # position on the colour scale, interpolated between its stops
    i = np.minimum(x.astype(np.int32), len(_HEAT) - 2)
    f = (x - i)[..., None]
    heat = _HEAT[i] * (1 - f) + _HEAT[i + 1] * f
    return np.clip(np.rint((1 - ATTENTION_TINT) * lit + ATTENTION_TINT * heat), 0, 255).astype(np.uint8)


def attention_strip(image, tokens: Sequence[str], maps: np.ndarray, n_tokens: int,
                    size: int = ATTENTION_SIZE) -> AttentionStrip:
    """The heat maps of one caption: `maps` (m, G, G), one per token of
    `tokens`, each over `image` (an RGB Pillow image) downscaled to `size`.
    `n_tokens` is the whole caption's length (m or more)."""
    from PIL import Image

    small = image.copy()
    small.thumbnail((size, size), Image.LANCZOS)
    rgb = np.asarray(small.convert("RGB"))
    return AttentionStrip(
        [TokenAttention(token, _jpeg(Image.fromarray(attention_overlay(rgb, m)), ATTENTION_QUALITY), float(m.max()))
         for token, m in zip(tokens, maps)],
        n_tokens,
        int(maps.shape[-1]),
    )


def _attention_maps(shown, langs, captioner, report) -> dict[tuple[str, str], tuple[list[str], np.ndarray, int]]:
    """(image path, lang) -> (tokens, maps (m, G, G), n_tokens) for every
    caption in `shown` of a pack whose decoder attends: where it looked for
    its first m <= ATTENTION_MAX_TOKENS tokens. One `attention_maps` call per
    pack per ATTENTION_BATCH images; the grids come from the encoder's cache,
    which captioning filled; encoders and packs are the `captioner`'s."""
    from toolkit.pack import architecture

    out = {}
    attending = [lang for lang in langs if architecture(captioner.manifests[lang]) == "attention"]
    if attending:
        report("stage", name="attention")
    for lang in attending:
        todo = [(path, ids[lang]) for path, _, _, ids in shown if ids.get(lang)]  # an empty caption has no tokens
        if not todo:
            continue
        encoder = captioner.encoder(lang)
        keys = encoder.extract([path for path, _ in todo], grid=True).keys
        todo = [(path, ids) for path, ids in todo if path in keys]
        pack = captioner.pack(lang)
        G = encoder.grid_size
        for start in range(0, len(todo), ATTENTION_BATCH):
            chunk = todo[start : start + ATTENTION_BATCH]
            shown_ids = [ids[:ATTENTION_MAX_TOKENS] for _, ids in chunk]
            grids = encoder.grid_features([keys[path] for path, _ in chunk])
            maps = pack.step.decoder.attention_maps(grids, decoder_inputs(shown_ids))
            for (path, ids), cut, m in zip(chunk, shown_ids, maps):
                out[path, lang] = (pack.tokenizer.pieces(cut), m[: len(cut)].reshape(len(cut), G, G), len(ids))
            report("progress", stage=f"attention {lang}", done=start + len(chunk), total=len(todo))
    return out


def build_report(
    inputs: Sequence[str | Path],
    langs: list[str],
    packs_dir: Path,
    *,
    references: Path | None = None,
    split: Path | None = None,
    beam: int = SEARCH.beam,
    length_penalty: float = SEARCH.length_penalty,
    no_repeat_ngram: int = SEARCH.no_repeat_ngram,
    bootstrap: int = 0,
    limit: int | None = None,
    thumb_size: int = THUMB_SIZE,
    out: Path | None = None,
    report=None,
) -> str:
    """Caption `inputs` (image files or folders) with every pack of `langs`
    and return the report page as an HTML string; also write it to `out`.

    With `split` (a file of image names; `inputs` is then the one folder that
    holds them) the packs are scored on the split by `evaluate_packs` and the
    page gets the BLEU and CIDEr-D table with its baselines; references are `references`,
    else each pack's own. Without `split`, `references` (any caption file)
    only shows beside the captions. `limit` caps the gallery; BLEU is always
    on the whole split. Captions of attention packs get their heat maps
    (one per token, at most ATTENTION_MAX_TOKENS).

        build_report(["Images"], ["en", "zh"], packs, split=Path("test.txt"), limit=50, out=Path("r.html"))
    """
    from toolkit.captioner import Captioner
    from toolkit.data import group_by_image, read_captions
    from toolkit.images import ImageError
    from toolkit.pack import HISTORY_FILE, REFERENCES_FILE, atomic_write_text, find_pack, resolve_langs
    from toolkit.progress import Report

    report = report or Report()
    search = dict(beam=beam, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram)
    if limit is not None and limit < 1:
        raise CapkitError(f"--limit must be at least 1, not {limit}")
    packs_dir = Path(packs_dir)
    langs = resolve_langs(packs_dir, langs)
    folders = {lang: find_pack(packs_dir, lang) for lang in langs}
    captioner = Captioner(packs_dir, langs)  # one encoder and decoder each, for the captions and the heat maps
    manifests = captioner.manifests
    given_refs = group_by_image(read_captions(references).captions) if references else None

    scores = None
    skipped: dict[str, str] = {}
    if split:
        scores, shown = _score_split(inputs, langs, captioner, split, references, bootstrap, search, limit, report)
        ref_sets = {"": given_refs} if given_refs is not None else {
            lang: group_by_image(read_captions(folders[lang] / REFERENCES_FILE).captions) for lang in langs}
    else:
        shown = _caption_files(inputs, langs, captioner, search, limit, skipped, report)
        ref_sets = {"": given_refs} if given_refs is not None else {}

    attention = _attention_maps(shown, langs, captioner, report)

    report("stage", name="thumbnails")
    rows = []
    for i, (path, name, captions, _) in enumerate(shown):
        try:
            image = _small_rgb(path, thumb_size)
        except ImageError as e:
            skipped[path] = e.message
            report("warning", message=e.message)
            continue
        refs = {k: refs_by_image[name] for k, refs_by_image in ref_sets.items() if refs_by_image.get(name)}
        strips = {lang: attention_strip(image, *attention[path, lang]) for lang in langs if (path, lang) in attention}
        rows.append(ReportRow(name, _jpeg(image, THUMB_QUALITY), captions, refs, strips))
        report("progress", stage="thumbnails", done=i + 1, total=len(shown))

    histories = {}
    for lang in langs:
        try:
            histories[lang] = json.loads((folders[lang] / HISTORY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            report("warning", message=f"pack {lang}: no loss history to chart ({e})")
            histories[lang] = []

    meta = _meta(manifests, inputs, rows, split, references, beam, length_penalty, no_repeat_ngram)
    data = ReportData(
        langs=langs, rows=rows, histories=histories, scores=scores,
        best_epochs={lang: m.get("training", {}).get("best_epoch") for lang, m in manifests.items()},
        meta=meta, skipped=skipped, title=f"capkit report: {', '.join(langs)}",
    )
    page = render_html(data)
    if out is not None:
        report("stage", name="write")
        atomic_write_text(Path(out), page)
    return page



def _score_split(inputs, langs, captioner, split, references, bootstrap, search, limit, report):
    """`evaluate_packs` on the split (inputs: its one folder) -> (scores, the gallery's first `limit` images)."""
    from toolkit.data import read_split
    from toolkit.score import evaluate_packs

    inputs = [Path(p) for p in inputs]
    if len(inputs) != 1 or not inputs[0].is_dir():
        raise CapkitError("--split needs --images to be the one folder that holds the split's images",
                          hint="drop --split to caption a list of files")
    images_dir = inputs[0]
    report("stage", name="evaluate")
    scores = evaluate_packs(langs, captioner.packs_dir, images_dir, split, references, bootstrap=bootstrap, report=report,
                            captioner=captioner, **search)
    by_lang = {e["lang"]: e["captions"] for e in scores}
    ids_by_lang = {e["lang"]: e["caption_ids"] for e in scores}
    names = [n for n in dict.fromkeys(read_split(split)) if any(n in c for c in by_lang.values())]
    shown = [(str(images_dir / n), n, {lang: by_lang[lang].get(n) for lang in langs},
              {lang: ids_by_lang[lang].get(n) for lang in langs}) for n in names[:limit]]
    return scores, shown


def _caption_files(inputs, langs, captioner, search, limit, skipped, report):
    """The first `limit` images of `inputs` captioned -> the gallery's images; the unreadable go to `skipped`."""
    from toolkit.captioner import caption_images
    from toolkit.images import list_images

    paths = list_images(inputs)
    if not paths:
        raise CapkitError(f"no images found in {', '.join(map(str, inputs))}")
    report("stage", name="caption")
    caps = caption_images(paths[:limit], langs, captioner.packs_dir, report=report, captioner=captioner, **search)
    skipped.update(caps.failures)
    per_image: dict[str, dict[str, str | None]] = {}
    ids_per_image: dict[str, dict[str, list[int]]] = {}
    for r in caps.rows:
        per_image.setdefault(r["image"], {})[r["lang"]] = r["caption"]
        ids_per_image.setdefault(r["image"], {})[r["lang"]] = r["ids"]
    return [(p, Path(p).name, c, ids_per_image[p]) for p, c in per_image.items()]


def _meta(manifests, inputs, rows, split, references, beam, length_penalty, no_repeat_ngram) -> dict[str, str]:
    """The facts at the top of the page: packs, encoder, images, split, references, search, when."""
    from toolkit import __version__

    meta = {
        "packs": ", ".join(f"{lang} {m['pack_version']}" for lang, m in manifests.items()),
        "encoder": ", ".join(sorted({m["encoder"]["id"] for m in manifests.values()})),
        "images": ", ".join(map(str, inputs)) + (f" ({len(rows)} shown)" if rows else ""),
    }
    if split:
        meta["split"] = str(split)
    meta["references"] = str(references) if references else ("each pack's references.txt" if split else "none")
    meta["search"] = f"beam {beam}, length penalty {length_penalty:g}, no repeated {no_repeat_ngram}-grams" \
        if no_repeat_ngram else f"beam {beam}, length penalty {length_penalty:g}"
    meta["made"] = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by capkit {__version__}"
    return meta
