"""The report page from plain data: `render_html(ReportData(...))` -> one self-contained HTML string.

Nothing here captions or reads a pack (that is `toolkit.report`, which
gathers `ReportData`), so the page is rendered and tested from plain values.
Self-contained: images are data URIs, charts inline SVG, no script, and the
Content-Security-Policy refuses anything from outside. All text goes through
``html.escape``; right-to-left languages get ``dir="rtl"``.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from toolkit.evaluate import base_lang

# Written right to left; their caption cells get dir="rtl".
RTL_LANGS = frozenset({"ar", "he", "iw", "fa", "ur", "yi", "ps", "sd", "ug", "dv", "ckb"})
# The browser refuses everything but the embedded images and the inline style.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
SCORE_ORDERS = (1, 2, 3, 4)


def text_dir(lang: str) -> str:
    """'rtl' for right-to-left languages ('ar', 'he-IL', 'fa'), else 'ltr'."""
    return "rtl" if base_lang(lang) in RTL_LANGS else "ltr"


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
        '<section id="scores"><h2>BLEU and CIDEr-D</h2>',
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
    if r.get(name) is None:  # CIDEr-D of scores from before capkit-bleu:2
        return '<td class="num">&#8211;</td>'
    ci = (r.get("ci") or {}).get(name)
    extra = f'<span class="ci">{ci[0]:.1f}&#8211;{ci[1]:.1f}</span>' if ci else ""
    return f'<td class="num">{r[name]:.1f}{extra}</td>'


def _scores_html(scores: Sequence[Mapping]) -> str:
    """One row per pack and, under it, one per baseline; B1-4 with and without brevity penalty, CIDEr-D."""
    names = [f"bleu{n}" for n in SCORE_ORDERS] + [f"bleu{n}_nobp" for n in SCORE_ORDERS] + ["cider_d"]
    head = ("<tr><th>lang</th><th>system</th>" + "".join(f"<th>B{n}</th>" for n in SCORE_ORDERS)
            + "".join(f"<th>B{n} noBP</th>" for n in SCORE_ORDERS) + "<th>CIDEr-D</th>"
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
    note = ("Corpus BLEU, 0-100; noBP: without the brevity penalty. CIDEr-D: coco-caption's, x100 (coco's 0.53 is "
            "53.0 here), on the same tokens. Small print under a score: its 95% bootstrap "
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
