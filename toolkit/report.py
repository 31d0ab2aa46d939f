"""One self-contained HTML page: every image with its captions in every
language side by side, the BLEU table beside its baselines, and each pack's
loss curves.

Under the caption of a pack whose decoder attends ("attention"), a strip
shows where it looked to choose each token: the attention over the encoder's
G x G grid, stretched over a small copy of the photo.

Self-contained means nothing is fetched when the page opens: thumbnails and
heat maps are base64 JPEGs, charts are inline SVG written here, there is no script, and a
Content-Security-Policy (``default-src 'none'``) makes the browser refuse any
outside resource a later edit might add. All text goes through
``html.escape``; right-to-left languages get ``dir="rtl"``.

Gathering (captioning, scoring: TensorFlow) and rendering (pure strings) are
separate, so the page can be rendered and tested from plain data:

    html = render_html(ReportData(langs=["en"], rows=[...], ...))

and the heat maps from plain arrays (`attention_overlay`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from toolkit.config import SEARCH
from toolkit.errors import CapkitError

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
# Written right to left; their caption cells get dir="rtl".
RTL_LANGS = frozenset({"ar", "he", "iw", "fa", "ur", "yi", "ps", "sd", "ug", "dv", "ckb"})
# The browser refuses everything but the embedded images and the inline style.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
SCORE_ORDERS = (1, 2, 3, 4)


def text_dir(lang: str) -> str:
    """'rtl' for right-to-left languages ('ar', 'he-IL', 'fa'), else 'ltr'."""
    return "rtl" if lang.strip().lower().replace("_", "-").split("-")[0] in RTL_LANGS else "ltr"


@dataclass
class Thumbnail:
    data_uri: str  # "data:image/jpeg;base64,..."
    width: int     # pixels, after downscaling
    height: int


@dataclass
class TokenAttention:
    """Where the decoder looked to choose one token of a caption."""

    token: str            # the token's text, without SentencePiece's word-start mark ("" for that mark alone)
    image: Thumbnail      # the photo with the attention drawn over it (`attention_overlay`)
    peak: float           # the map's largest weight: 1 is one cell only, 1/(G*G) everywhere alike


@dataclass
class AttentionStrip:
    """The heat maps under one caption of an attention pack."""

    tokens: list[TokenAttention]  # the caption's first tokens, at most ATTENTION_MAX_TOKENS
    n_tokens: int                 # tokens in the whole caption
    grid: int                     # G: each map is over G x G cells


@dataclass
class ReportRow:
    """One image of the gallery."""

    image: str                          # file name shown under the thumbnail
    thumbnail: Thumbnail
    captions: dict[str, str | None]     # lang -> caption; None where that pack did not caption it
    references: dict[str, list[str]] = field(default_factory=dict)  # lang -> references; "" = language not known
    attention: dict[str, AttentionStrip] = field(default_factory=dict)  # lang -> heat maps; attention packs only


@dataclass
class ReportData:
    """Everything the page shows; `render_html` turns it into HTML."""

    langs: list[str]                          # column order of the gallery
    rows: list[ReportRow]
    histories: dict[str, list[dict]]          # lang -> history.json entries ({"epoch", "loss", "val_loss"}); [] if none
    scores: list[dict] | None = None          # `score.evaluate_packs` entries; None: no BLEU table
    best_epochs: dict[str, int] = field(default_factory=dict)  # lang -> epoch whose weights the pack kept
    meta: dict[str, str] = field(default_factory=dict)         # shown at the top: packs, images, split, beam, ...
    skipped: dict[str, str] = field(default_factory=dict)      # image -> why it is not in the gallery
    title: str = "capkit report"


# -- gathering -------------------------------------------------------------------


def thumbnail(path: str | Path, size: int = THUMB_SIZE, max_pixels: int | None = None) -> Thumbnail:
    """A JPEG thumbnail (longest side `size`, aspect kept, EXIF rotation
    applied, transparency on white) as a data URI. Unreadable files raise
    `ImageError`."""
    return _jpeg(_small_rgb(path, size, max_pixels), THUMB_QUALITY)


def _small_rgb(path: str | Path, size: int, max_pixels: int | None = None):
    """The image at `path` as an RGB Pillow image whose longest side is at most `size`."""
    from PIL import Image, ImageOps

    from toolkit.images import DEFAULT_MAX_PIXELS, ImageError, _to_rgb

    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    try:
        data = Path(path).read_bytes()
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
    page gets the BLEU table with its baselines; references are `references`,
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

# -- rendering ---------------------------------------------------------------------

_e = html.escape  # quote=True: safe in text and in attribute values

_STYLE = """
body{font-family:system-ui,"Noto Sans","Noto Sans CJK SC","Noto Sans Arabic",sans-serif;margin:1.5rem;color:#1b1b1b;line-height:1.4}
h1{font-size:1.5rem;margin:0 0 .5rem}h2{font-size:1.2rem;margin:2rem 0 .5rem;border-bottom:1px solid #ddd}
dl.meta{display:grid;grid-template-columns:max-content auto;gap:.1rem 1rem;margin:0;font-size:.9rem}
dl.meta dt{color:#666}dl.meta dd{margin:0}
table{border-collapse:collapse}th,td{padding:.3rem .5rem;vertical-align:top;border-bottom:1px solid #e5e5e5}
table.scores td.num{text-align:right;font-variant-numeric:tabular-nums}
table.scores tr.baseline{color:#555}table.scores tr.pack{font-weight:600}
.ci{display:block;font-size:.75rem;font-weight:400;color:#777}
.good{color:#176317}.bad{color:#a61b1b}
.sig{font-family:ui-monospace,monospace;font-size:.8rem;color:#555}
.charts{display:flex;flex-wrap:wrap;gap:1rem}
.thumb img{display:block;border-radius:3px}.thumb figure{margin:0}.thumb figcaption{font-size:.75rem;color:#666;word-break:break-all}
td.caption{min-width:12rem;max-width:24rem}p.hyp{margin:0;font-size:1.05rem;font-weight:600}.note{color:#999;font-style:italic}
ol.refs{margin:.4rem 0 0;padding-inline-start:1.2rem;font-size:.85rem;color:#555}
.attention{display:flex;flex-wrap:wrap;gap:3px;margin:.4rem 0 0}.attention figure{margin:0;width:min-content}
.attention img{display:block;border-radius:2px}.attention figcaption{font-size:.75rem;text-align:center;overflow-wrap:anywhere}
"""


def render_html(data: ReportData) -> str:
    """The whole page for `data`: a string that starts with <!DOCTYPE html>."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(data.title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(data.title)}</h1>",
        '<dl class="meta">' + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in data.meta.items()) + "</dl>",
        '<section id="scores"><h2>BLEU</h2>',
        _scores_html(data.scores) if data.scores else
        "<p>No scores: pass <code>--split</code> (and references) to score the packs on a split.</p>",
        "</section>",
        '<section id="training"><h2>Training and validation loss</h2><div class="charts">',
    ]
    for lang in data.langs:
        history = data.histories.get(lang) or []
        parts.append(loss_chart_svg(history, title=f"{lang} pack", best_epoch=data.best_epochs.get(lang))
                     if history else f"<p>{_e(lang)}: the pack has no loss history.</p>")
    parts += ["</div></section>", _gallery_html(data)]
    if data.skipped:
        parts.append('<section id="skipped"><h2>Skipped images</h2><ul>'
                     + "".join(f"<li>{_e(msg)}</li>" for msg in data.skipped.values()) + "</ul></section>")
    parts += ["</body>", "</html>", ""]
    # A file name that is not UTF-8 arrives with lone surrogates; show "?" there rather than fail the write.
    return "\n".join(parts).encode("utf-8", "replace").decode("utf-8")


def _lang_attrs(lang: str) -> str:
    return f'lang="{_e(lang)}" dir="{text_dir(lang)}"'


def _gallery_html(data: ReportData) -> str:
    show_given = any("" in r.references for r in data.rows)
    head = "<tr><th>image</th>" + "".join(f"<th {_lang_attrs(lang)}>{_e(lang)}</th>" for lang in data.langs)
    head += "<th>references</th></tr>" if show_given else "</tr>"
    out = [f'<section id="captions"><h2>Captions ({len(data.rows)} images)</h2>']
    if any(r.attention for r in data.rows):
        out.append('<p class="attention-note">Under the captions of packs whose decoder attends: where it looked '
                   "to choose each token, brighter where it looked more. Each map is scaled to its own peak; "
                   "hover over one for the peak's weight.</p>")
    out += ['<table class="gallery">', f"<thead>{head}</thead>", "<tbody>"]
    for r in data.rows:
        t = r.thumbnail
        cells = [f'<td class="thumb"><figure><img src="{_e(t.data_uri)}" width="{t.width}" height="{t.height}" '
                 f'alt="{_e(r.image)}"><figcaption>{_e(r.image)}</figcaption></figure></td>']
        for lang in data.langs:
            cap = r.captions.get(lang)
            if cap is None:
                body = '<span class="note">not captioned</span>'
            elif not cap.strip():
                body = '<span class="note">(empty caption)</span>'  # an undertrained pack: say so, do not hide it
            else:
                body = f'<p class="hyp">{_e(cap)}</p>'
            if lang in r.attention:
                body += _attention_html(r.attention[lang])
            if r.references.get(lang):
                body += _refs_html(r.references[lang])
            cls = "caption" if cap is not None else "caption missing"
            cells.append(f'<td class="{cls}" {_lang_attrs(lang)}>{body}</td>')
        if show_given:
            # A caption file does not say its language: let the browser find each line's direction.
            cells.append(f'<td class="given-refs" dir="auto">{_refs_html(r.references.get("", []))}</td>')
        out.append('<tr class="image-row">' + "".join(cells) + "</tr>")
    out += ["</tbody>", "</table>", "</section>"]
    return "\n".join(out)


def _attention_html(strip: AttentionStrip) -> str:
    """One figure per token: the heat map, the token's text under it, the map's peak in its title."""
    figures = []
    even = f"{1 / strip.grid**2:.1%} each if even over {strip.grid}x{strip.grid}"
    for t in strip.tokens:
        i = t.image
        figures.append(f'<figure><img src="{_e(i.data_uri)}" width="{i.width}" height="{i.height}" alt="{_e(t.token)}" '
                       f'title="{_e(t.token)}: {t.peak:.1%} of the attention on its top cell ({even})">'
                       f'<figcaption>{_e(t.token) or "&#9251;"}</figcaption></figure>')  # a lone word start: "␣"
    if strip.n_tokens > len(strip.tokens):
        figures.append(f'<span class="note">first {len(strip.tokens)} of {strip.n_tokens} tokens</span>')
    return '<div class="attention">' + "".join(figures) + "</div>"


def _refs_html(refs: Sequence[str]) -> str:
    return '<ol class="refs">' + "".join(f'<li dir="auto">{_e(x)}</li>' for x in refs) + "</ol>" if refs else ""


def _score_cell(r: Mapping, name: str) -> str:
    ci = (r.get("ci") or {}).get(name)
    extra = f'<span class="ci">{ci[0]:.1f}&#8211;{ci[1]:.1f}</span>' if ci else ""
    return f'<td class="num">{r[name]:.1f}{extra}</td>'


def _scores_html(scores: Sequence[Mapping]) -> str:
    """One row per pack and, under it, one per baseline; B1-4 with and without brevity penalty."""
    names = [f"bleu{n}" for n in SCORE_ORDERS] + [f"bleu{n}_nobp" for n in SCORE_ORDERS]
    head = ("<tr><th>lang</th><th>system</th>" + "".join(f"<th>B{n}</th>" for n in SCORE_ORDERS)
            + "".join(f"<th>B{n} noBP</th>" for n in SCORE_ORDERS)
            + "<th>images</th><th>refs</th><th>tok</th><th>BLEU-4 vs baselines</th></tr>")
    rows, signatures = [], []
    for s in scores:
        systems = [("pack", s)] + [(f"baseline: {k}", b) for k, b in s.get("baselines", {}).items()]
        below = [k for k, b in s.get("baselines", {}).items() if b["bleu4"] >= s["bleu4"]]
        if not s.get("baselines"):
            verdict = ""
        elif below:
            verdict = f'<span class="bad">not above {_e(", ".join(below))}</span>'
        else:
            verdict = '<span class="good">above all</span>'
        for i, (system, r) in enumerate(systems):
            cells = [f'<td {_lang_attrs(s["lang"])}>{_e(s["lang"])}</td>' if i == 0 else "<td></td>",
                     f"<td>{_e(system)}</td>"]
            cells += [_score_cell(r, n) for n in names]
            cells += [f'<td class="num">{int(r["n_images"])}</td>', f'<td class="num">{int(r["n_references"])}</td>',
                      f"<td>{_e(r['tokenization'])}</td>", f"<td>{verdict if i == 0 else ''}</td>"]
            rows.append(f'<tr class="{"pack" if i == 0 else "baseline"}">' + "".join(cells) + "</tr>")
            if r["signature"] not in signatures:
                signatures.append(r["signature"])
    beam = scores[0].get("beam")
    note = ("Corpus BLEU, 0-100; noBP: without the brevity penalty. Small print under a score: its 95% bootstrap "
            "interval. constant: the pack's most frequent training caption for every image; retrieval: the first "
            "training caption of the most similar training image.") + (f" Beam {beam}." if beam else "")
    return "\n".join([
        '<table class="scores">', f"<thead>{head}</thead>", "<tbody>", *rows, "</tbody>", "</table>",
        f"<p>{_e(note)}</p>",
        *(f'<p class="sig">signature: {_e(sig)}</p>' for sig in signatures),
    ])


# -- loss charts -------------------------------------------------------------------


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values covering [lo, hi], about `target` of them.

    >>> nice_ticks(0.83, 2.41)
    [0.5, 1.0, 1.5, 2.0, 2.5]
    """
    if not hi > lo:
        pad = abs(lo) * 0.1 or 0.5
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    a, b = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(a, b + 1)]


def _fmt_tick(v: float, step: float) -> str:
    """As few decimals as the step needs: 0.25 -> 2, 0.5 -> 1, 5 -> 0."""
    decimals = next(d for d in range(12) if abs(round(step, d) - step) <= 1e-9 * step)
    return f"{v:.{decimals}f}"


def loss_chart_svg(
    history: Sequence[Mapping],
    *,
    title: str,
    best_epoch: int | None = None,
    width: int = 520,
    height: int = 280,
) -> str:
    """Training and validation loss per epoch as an inline <svg>: axes with
    ticks and labels, one line per series, a legend, the kept epoch marked.

    `history` is a pack's history.json: [{"epoch": 1, "loss": 2.3, "val_loss": 2.1}, ...].
    Non-finite values are left out (a diverged epoch must not blank the chart).
    """
    series = [("loss", "training", "#1f6fb4", None), ("val_loss", "validation", "#d1495b", "6 4")]
    points = {
        key: [(float(h["epoch"]), float(h[key])) for h in history
              if isinstance(h.get(key), (int, float)) and math.isfinite(h[key]) and isinstance(h.get("epoch"), (int, float))]
        for key, *_ in series
    }
    xs = [x for pts in points.values() for x, _ in pts]
    ys = [y for pts in points.values() for _, y in pts]
    left, right, top, bottom = 58, width - 16, 44, height - 44
    svg = [f'<svg class="loss-chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           f'role="img" aria-label="{_e(title)}: loss per epoch">',
           f"<title>{_e(title)}: training and validation loss per epoch</title>",
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{left}" y="18" font-size="14" font-weight="600">{_e(title)}</text>']
    if not ys:
        svg += [f'<text x="{left}" y="{(top + bottom) // 2}" font-size="12" fill="#666">no finite loss values</text>', "</svg>"]
        return "".join(svg)
    yt = nice_ticks(min(ys), max(ys))
    y0, y1 = yt[0], yt[-1]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    xstep = max(1, math.ceil((x1 - x0) / 8))
    xt = [float(x) for x in range(math.ceil(x0), math.floor(x1) + 1) if (x - math.ceil(x0)) % xstep == 0]

    def px(x: float) -> float:
        return round(left + (x - x0) / (x1 - x0) * (right - left), 2)

    def py(y: float) -> float:
        return round(bottom - (y - y0) / (y1 - y0) * (bottom - top), 2)

    g = ['<g font-size="11" fill="#444">']
    for t in yt:
        g.append(f'<line x1="{left}" x2="{right}" y1="{py(t)}" y2="{py(t)}" stroke="#eee"/>'
                 f'<text x="{left - 6}" y="{py(t) + 4}" text-anchor="end">{_fmt_tick(t, yt[1] - yt[0])}</text>')
    for t in xt:
        g.append(f'<line x1="{px(t)}" x2="{px(t)}" y1="{bottom}" y2="{bottom + 4}" stroke="#444"/>'
                 f'<text x="{px(t)}" y="{bottom + 16}" text-anchor="middle">{int(t)}</text>')
    g.append(f'<line class="axis" x1="{left}" x2="{left}" y1="{top}" y2="{bottom}" stroke="#444"/>'
             f'<line class="axis" x1="{left}" x2="{right}" y1="{bottom}" y2="{bottom}" stroke="#444"/>')
    g.append(f'<text class="axis-label" x="{(left + right) / 2}" y="{height - 8}" text-anchor="middle">epoch</text>')
    g.append(f'<text class="axis-label" x="14" y="{(top + bottom) / 2}" text-anchor="middle" '
             f'transform="rotate(-90 14 {(top + bottom) / 2})">loss (cross-entropy per token)</text>')
    g.append("</g>")
    svg += g
    if best_epoch is not None and x0 <= best_epoch <= x1:
        bx = px(best_epoch)
        # The label goes on whichever side of the line has room.
        tx, anchor = (bx + 4, "start") if bx < (left + right) / 2 else (bx - 4, "end")
        svg.append(f'<line class="best" x1="{bx}" x2="{bx}" y1="{top}" y2="{bottom}" stroke="#888" stroke-dasharray="2 3"/>'
                   f'<text x="{tx}" y="{top + 10}" font-size="10" fill="#666" text-anchor="{anchor}">kept: epoch {int(best_epoch)}</text>')
    lx = right - 190
    for i, (key, label, colour, dash) in enumerate(series):
        pts = points[key]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        if pts:
            coords = " ".join(f"{px(x)},{py(y)}" for x, y in pts)
            svg.append(f'<polyline class="series" data-series="{key}" points="{coords}" fill="none" '
                       f'stroke="{colour}" stroke-width="2"{dash_attr}/>')
            svg += [f'<circle cx="{px(x)}" cy="{py(y)}" r="3" fill="{colour}"><title>epoch {int(x)}: '
                    f"{label} loss {y:.4f}</title></circle>" for x, y in pts]
        ly = 30
        svg.append(f'<g class="legend"><line x1="{lx + i * 95}" x2="{lx + i * 95 + 22}" y1="{ly}" y2="{ly}" '
                   f'stroke="{colour}" stroke-width="2"{dash_attr}/>'
                   f'<text x="{lx + i * 95 + 27}" y="{ly + 4}" font-size="11">{label}</text></g>')
    svg.append("</svg>")
    return "".join(svg)
