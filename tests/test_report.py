"""The HTML report: rendering from plain data, the page built from tiny packs,
the same page in a real headless browser, and the `evaluate` command whose
numbers the report's BLEU table repeats."""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolkit.errors import CapkitError
from toolkit.evaluate import SCORING_VERSION
from toolkit.report import (
    ATTENTION_SIZE,
    ReportData,
    ReportRow,
    Thumbnail,
    attention_overlay,
    attention_strip,
    decoder_inputs,
    loss_chart_svg,
    nice_ticks,
    render_html,
    text_dir,
    thumbnail,
)

# -- helpers -------------------------------------------------------------------------


class _Tags(HTMLParser):
    """Every start tag as (tag, attrs), and the text, of a page."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def find(self, tag: str, **attrs) -> list[dict]:
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _png(size=(40, 20), mode="RGB", colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def _thumb() -> Thumbnail:
    raw = io.BytesIO()
    Image.new("RGB", (8, 6), (10, 120, 200)).save(raw, "JPEG")
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(raw.getvalue()).decode(), 8, 6)


HISTORY = [{"epoch": 1, "loss": 3.2, "val_loss": 3.0}, {"epoch": 2, "loss": 2.1, "val_loss": 2.4},
           {"epoch": 3, "loss": 1.6, "val_loss": 2.5}]


def _bleu(lang, b4, ci=False):
    d = {f"bleu{n}": b4 + 10 * (4 - n) for n in range(1, 5)}
    d.update({f"bleu{n}_nobp": b4 + 10 * (4 - n) + 1 for n in range(1, 5)})
    d.update(lang=lang, n_images=8, n_references=40, tokenization="words", signature=f"capkit-bleu:1|lang:{lang}")
    if ci:
        d["ci"] = {k: [d[k] - 2, d[k] + 2] for k in list(d) if k.startswith("bleu")}
    return d


def _sample_data(**kw) -> ReportData:
    """Arabic, Hebrew and English columns, hostile text everywhere text goes."""
    rows = [
        ReportRow('a<b>&"c.jpg', _thumb(), {"en": "a dog <script>alert(1)</script>", "ar": "كلب يجري", "he": None},
                  {"ar": ["كلب يركض في الحديقة"], "": ["a dog & a ball", "كلب"]}),
        ReportRow("b.jpg", _thumb(), {"en": "a cat", "ar": "قطة", "he": "חתול"}),
    ]
    # The pack's scores are new (CIDEr-D with its interval); the baselines' as from before capkit-bleu:2.
    pack = {**_bleu("en", 20, ci=True), "cider_d": 41.5}
    pack["ci"]["cider_d"] = [38.0, 45.0]
    scores = [{**pack, "beam": 3, "system": "pack",
               "baselines": {"constant": _bleu("en", 5, ci=True), "retrieval": _bleu("en", 25, ci=True)}}]
    base = dict(langs=["en", "ar", "he"], rows=rows, histories={"en": HISTORY, "ar": HISTORY, "he": []},
                scores=scores, best_epochs={"en": 2}, meta={"split": "<test>.txt"}, skipped={"x.jpg": "x.jpg: <broken>"})
    return ReportData(**{**base, **kw})


# -- thumbnails ----------------------------------------------------------------------


def test_thumbnail_keeps_aspect_and_puts_transparency_on_white(tmp_path):
    p = tmp_path / "wide.png"
    p.write_bytes(_png((600, 300), "RGBA", (0, 0, 0, 0)))
    t = thumbnail(p, 256)
    assert (t.width, t.height) == (256, 128)
    assert t.data_uri.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(t.data_uri.split(",", 1)[1])))
    assert img.format == "JPEG" and img.size == (256, 128) and min(img.getpixel((10, 10))) > 240
    small = tmp_path / "small.png"
    small.write_bytes(_png((40, 20)))
    assert (thumbnail(small, 256).width, thumbnail(small, 256).height) == (40, 20)  # never upscaled


def test_thumbnail_of_a_broken_file_names_it(tmp_path):
    from toolkit.images import ImageError

    p = tmp_path / "broken.jpg"
    p.write_bytes(b"\xff\xd8 not really")
    with pytest.raises(ImageError, match="broken.jpg"):
        thumbnail(p)


# -- rendering -----------------------------------------------------------------------


def test_page_escapes_text_and_fetches_nothing():
    page = render_html(_sample_data())
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a&lt;b&gt;&amp;&quot;c.jpg" in page and "&lt;broken&gt;" in page and "&lt;test&gt;.txt" in page
    assert "://" not in page  # no URL of any scheme: nothing leaves the machine
    tags = _Tags(page)
    assert all(a["src"].startswith("data:image/jpeg;base64,") for a in tags.find("img"))
    assert not [a for t, a in tags.tags if "href" in a or t in ("link", "script", "iframe", "object")]
    csp = tags.find("meta", **{"http-equiv": "Content-Security-Policy"})
    assert csp and "default-src 'none'" in csp[0]["content"]


def test_caption_cells_carry_language_and_direction():
    tags = _Tags(render_html(_sample_data()))
    cells = [a for a in tags.find("td") if "caption" in a.get("class", "")]
    assert [(a["lang"], a["dir"]) for a in cells[:3]] == [("en", "ltr"), ("ar", "rtl"), ("he", "rtl")]
    assert len(tags.find("tr", **{"class": "image-row"})) == 2
    assert "not captioned" in render_html(_sample_data())  # the he pack did not caption the first image
    empty = render_html(_sample_data(rows=[ReportRow("b\udcff.jpg", _thumb(), {"en": " "})], langs=["en"]))
    assert "(empty caption)" in empty  # an undertrained pack's empty output is shown, not hidden
    assert "b?.jpg" in empty  # a file name that is not UTF-8 does not break the page
    assert tags.find("td", **{"class": "given-refs", "dir": "auto"})  # a caption file's language is unknown
    assert [text_dir(x) for x in ("ar", "fa-IR", "ur", "he", "zh", "en")] == ["rtl"] * 4 + ["ltr"] * 2


def test_references_are_shown_in_their_language_column_and_the_given_column():
    page = render_html(_sample_data())
    ar_cell = re.search(r'<td class="caption" lang="ar" dir="rtl">(.*?)</td>', page).group(1)
    assert "كلب يجري" in ar_cell and '<ol class="refs"><li dir="auto">كلب يركض في الحديقة</li></ol>' in ar_cell
    assert "a dog &amp; a ball" in page
    no_refs = render_html(_sample_data(rows=[ReportRow("b.jpg", _thumb(), {"en": "a cat"})], langs=["en"]))
    assert "given-refs" not in no_refs and "<th>references</th>" not in no_refs


def test_scores_table_has_both_bleus_intervals_and_baselines():
    page = render_html(_sample_data())
    tags = _Tags(page)
    heads = re.findall(r"<th>([^<]*)</th>", page.split('<table class="scores">')[1].split("</thead>")[0])
    assert heads[:11] == ["lang", "system", "B1", "B2", "B3", "B4", "B1 noBP", "B2 noBP", "B3 noBP", "B4 noBP",
                          "CIDEr-D"]
    assert '<td class="num">41.5<span class="ci">38.0&#8211;45.0</span></td>' in page
    assert page.count('<td class="num">&#8211;</td>') == 2  # the baselines have no CIDEr-D: a dash, not an error
    assert len(tags.find("tr", **{"class": "pack"})) == 1 and len(tags.find("tr", **{"class": "baseline"})) == 2
    assert "baseline: constant" in page and "baseline: retrieval" in page
    assert "18.0&#8211;22.0" in page  # BLEU-4 20.0 with its interval
    assert "not above retrieval" in page  # 20 < 25: the user sees it at once
    assert "signature: capkit-bleu:1|lang:en" in page
    above = _sample_data()
    above.scores[0]["baselines"].pop("retrieval")
    assert "above all" in render_html(above)
    assert "No scores" in render_html(_sample_data(scores=None))


# -- attention heat maps ---------------------------------------------------------------


def _peaked(cell: tuple[int, int], g: int = 3) -> np.ndarray:
    """A g x g attention map (sums to 1) that looks mostly at `cell` (row, column)."""
    alpha = np.full((g, g), 0.2)
    alpha[cell] = 3.0
    return alpha / alpha.sum()


def _brightest_cell(rgb: np.ndarray, g: int = 3) -> tuple[int, int]:
    """The (row, column) of the g x g cell whose pixels are brightest on average."""
    h, w = rgb.shape[:2]
    light = rgb.astype(float).sum(-1)
    means = [[light[r * h // g:(r + 1) * h // g, c * w // g:(c + 1) * w // g].mean() for c in range(g)] for r in range(g)]
    return np.unravel_index(np.argmax(means), (g, g))


def test_attention_overlay_is_brightest_where_the_map_peaks():
    grey = np.full((60, 90, 3), 128, np.uint8)  # not square: the map is stretched over the whole picture
    for cell in ((0, 2), (2, 0), (1, 1)):
        out = attention_overlay(grey, _peaked(cell))
        assert out.shape == grey.shape and out.dtype == np.uint8
        assert _brightest_cell(out) == cell
        y, x = np.unravel_index(np.argmax(out.astype(float).sum(-1)), out.shape[:2])
        assert (y * 3 // 60, x * 3 // 90) == cell  # the single brightest pixel too
    # The photo shows through: under an even map, white stays brighter than black.
    half = np.zeros((60, 90, 3), np.uint8)
    half[:, 45:] = 255
    out = attention_overlay(half, np.full((3, 3), 1 / 9)).astype(float)
    assert out[:, 50:].mean() > out[:, :40].mean() + 100


def test_attention_strip_has_one_small_jpeg_per_token():
    photo = Image.fromarray(np.full((100, 200, 3), 128, np.uint8))
    maps = np.stack([_peaked((0, 0)), _peaked((2, 2))])
    strip = attention_strip(photo, ["a", "dog"], maps, n_tokens=7)
    assert [t.token for t in strip.tokens] == ["a", "dog"] and (strip.n_tokens, strip.grid) == (7, 3)
    for t, cell, m in zip(strip.tokens, ((0, 0), (2, 2)), maps):
        assert (t.image.width, t.image.height) == (ATTENTION_SIZE, ATTENTION_SIZE // 2)
        assert t.peak == pytest.approx(m.max())
        img = Image.open(io.BytesIO(base64.b64decode(t.image.data_uri.split(",", 1)[1])))
        assert img.format == "JPEG" and img.size == (t.image.width, t.image.height)
        assert _brightest_cell(np.asarray(img)) == cell


def test_decoder_inputs_put_each_token_after_its_predecessor():
    from toolkit.tokenizer import BOS_ID, PAD_ID

    got = decoder_inputs([[5, 9, 14], [7], [8, 6]])
    assert got.tolist() == [[BOS_ID, 5, 9], [BOS_ID, PAD_ID, PAD_ID], [BOS_ID, 8, PAD_ID]]


def test_strips_render_under_their_caption_only():
    photo = Image.fromarray(np.full((30, 40, 3), 90, np.uint8))
    maps = np.stack([_peaked((r, c)) for r, c in ((0, 0), (1, 1), (2, 2))])
    strip = attention_strip(photo, ["a", "<b>", ""], maps, n_tokens=25)
    data = _sample_data()
    data.rows[1].attention = {"en": strip}
    page = render_html(data)
    assert "<b>" not in page and "first 3 of 25 tokens" in page and "&#9251;" in page  # a lone word start shows as ␣
    assert f"{maps[0].max():.1%} of the attention on its top cell (11.1% each if even over 3x3)" in page
    tags = _Tags(page)
    assert len(tags.find("div", **{"class": "attention"})) == 1 and tags.find("p", **{"class": "attention-note"})
    cell = re.search(r'<td class="caption" lang="en" dir="ltr"><p class="hyp">a cat</p>(.*?)</td>', page).group(1)
    assert [a["alt"] for a in _Tags(cell).find("img")] == ["a", "<b>", ""]
    assert all(a["src"].startswith("data:image/jpeg;base64,") for a in tags.find("img"))
    assert 'class="attention' not in render_html(_sample_data())  # no attention pack, no strip and no note


# -- loss charts -----------------------------------------------------------------------


def test_nice_ticks():
    assert nice_ticks(0.83, 2.41) == [0.5, 1.0, 1.5, 2.0, 2.5]
    assert nice_ticks(100, 1000) == [0, 200, 400, 600, 800, 1000]
    t = nice_ticks(2.0, 2.0)  # a flat curve still gets an axis around it
    assert t[0] < 2.0 < t[-1]


def _svg(markup: str) -> ET.Element:
    return ET.fromstring(markup.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))


def test_loss_chart_draws_both_series_axes_and_legend():
    svg = loss_chart_svg(HISTORY, title="en <pack>", best_epoch=2)
    root = _svg(svg)  # well-formed XML, with the title escaped
    ns = "{http://www.w3.org/2000/svg}"
    lines = {p.get("data-series"): p.get("points").split() for p in root.iter(ns + "polyline")}
    assert set(lines) == {"loss", "val_loss"} and all(len(v) == 3 for v in lines.values())
    # SVG y grows downwards, so a falling loss has growing y.
    ys = [float(pt.split(",")[1]) for pt in lines["loss"]]
    assert ys[0] < ys[1] < ys[2]
    texts = [t.text for t in root.iter(ns + "text")]
    assert "en <pack>" in texts and "epoch" in texts and "training" in texts and "validation" in texts
    assert any(t and t.startswith("loss") for t in texts) and "kept: epoch 2" in texts
    assert len([e for e in root.iter(ns + "line") if e.get("class") == "axis"]) == 2
    assert len(list(root.iter(ns + "circle"))) == 6


def test_loss_chart_survives_one_epoch_and_bad_values():
    one = _svg(loss_chart_svg([{"epoch": 1, "loss": 2.0, "val_loss": 2.0}], title="x"))
    ns = "{http://www.w3.org/2000/svg}"
    assert len(list(one.iter(ns + "circle"))) == 2
    bad = [{"epoch": 1, "loss": float("nan"), "val_loss": 2.0}, {"epoch": 2, "loss": float("inf"), "val_loss": 1.5}]
    root = _svg(loss_chart_svg(bad, title="x"))
    pts = {p.get("data-series"): p.get("points") for p in root.iter(ns + "polyline")}
    assert set(pts) == {"val_loss"} and "nan" not in ET.tostring(root, encoding="unicode")
    assert "no finite loss values" in loss_chart_svg([{"epoch": 1, "loss": float("nan")}], title="x")


# -- the page from real tiny packs ------------------------------------------------------------


@pytest.fixture(scope="module")
def split_report(tiny_packs, tiny_dataset, tmp_path_factory):
    """The report over the test split (8 images, 5 shown), with the pack's own references."""
    from toolkit.report import build_report

    out = tmp_path_factory.mktemp("report") / "report.html"
    page = build_report([tiny_dataset["images"]], ["all"], tiny_packs, split=tiny_dataset["test"], beam=3,
                        bootstrap=20, limit=5, out=out)
    return out, page


def test_report_over_a_split_has_scores_charts_and_captions(split_report, tiny_packs):
    from toolkit.pack import load_manifest

    out, page = split_report
    assert out.read_text(encoding="utf-8") == page
    tags = _Tags(page)
    assert len(tags.find("tr", **{"class": "image-row"})) == 5 and len(tags.find("img")) == 5
    assert len(tags.find("svg", **{"class": "loss-chart"})) == 2  # one per pack
    assert len(tags.find("td", **{"class": "caption", "lang": "zh", "dir": "ltr"})) == 5
    assert len(tags.find("ol", **{"class": "refs"})) == 10  # each pack's own references, in its column
    # The table holds the scores of the whole test split (--limit only shortens the
    # gallery): those the build wrote into each pack at the same beam.
    text = html.unescape(page)
    for lang in ("en", "zh"):
        test = load_manifest(tiny_packs / lang)["scores"]["test"]
        for system in ("model", "retrieval", "constant"):
            assert f"{test[system]['bleu4']:.1f}" in text
        assert test["model"]["signature"] in text
    # An interval under each of the 9 scores (B1-4, B1-4 noBP, CIDEr-D) of 3 systems in 2 languages.
    assert page.count("baseline: retrieval") == 2 and page.count('class="ci"') == 2 * 3 * 9


@pytest.mark.parametrize("style", ["repeated --images", "positional, as caption takes them"])
def test_report_cli_captions_files_beside_given_references(tiny_packs, tiny_dataset, tmp_path, style):
    from typer.testing import CliRunner

    from toolkit.cli import app

    files = sorted(tiny_dataset["images"].iterdir())[:3]
    out = tmp_path / "r.html"
    args = ["report", "--lang", "en", "--lang", "zh", "--references", str(tiny_dataset["captions_en"]),
            "-o", str(out), "--packs-dir", str(tiny_packs), "--beam", "1"]
    if style.startswith("positional"):
        args[1:1] = [str(f) for f in files]
    else:
        for f in files:
            args += ["--images", str(f)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert str(out) in res.stdout
    tags = _Tags(out.read_text(encoding="utf-8"))
    assert [a["alt"] for a in tags.find("img")] == [f.name for f in files]
    assert len(tags.find("td", **{"class": "given-refs"})) == 3
    assert "No scores" in out.read_text(encoding="utf-8")


def test_report_cli_without_images_says_how_to_name_them(tiny_packs, tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app

    res = CliRunner().invoke(app, ["report", "--lang", "en", "-o", str(tmp_path / "r.html"), "--packs-dir", str(tiny_packs)])
    assert res.exit_code != 0 and isinstance(res.exception, CapkitError) and "no images" in res.exception.message
    assert not (tmp_path / "r.html").exists()


def test_report_refuses_split_with_loose_files(tiny_packs, tiny_dataset):
    from toolkit.report import build_report

    files = sorted(tiny_dataset["images"].iterdir())[:2]
    with pytest.raises(CapkitError, match="one folder"):
        build_report(files, ["en"], tiny_packs, split=tiny_dataset["test"])
    with pytest.raises(CapkitError, match="--limit"):
        build_report(files, ["en"], tiny_packs, limit=0)


# -- in a real browser ---------------------------------------------------------------------

# Injected before the page's own <head> content, so the page's CSP (which
# forbids scripts) does not apply to it. It records what went wrong and what
# the browser made of the page into an attribute that --dump-dom prints.
PROBE = """<script>
window.__errors = [];
addEventListener("error", e => __errors.push(e.message || ("failed: " + (e.target.outerHTML || "").slice(0, 120))), true);
document.addEventListener("securitypolicyviolation", e => __errors.push("CSP blocked " + e.blockedURI));
for (const level of ["error", "warn"]) {
  const f = console[level];
  console[level] = (...a) => { __errors.push(level + ": " + a.join(" ")); f.apply(console, a); };
}
addEventListener("load", () => {
  document.documentElement.setAttribute("data-probe", JSON.stringify({
    errors: __errors,
    images: [...document.images].map(i => i.complete ? i.naturalWidth : -1),
    rows: document.querySelectorAll("tr.image-row").length,
    svgs: [...document.querySelectorAll("svg.loss-chart")].map(s => s.getBBox().width),
    dirs: [...document.querySelectorAll("td.caption")].map(td => [td.lang, getComputedStyle(td).direction]),
  }));
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium here (Debian: apt-get install -y chromium)")


def _open_in_browser(page: str, tmp_path: Path) -> tuple[dict, list[str]]:
    """Load `page` from a file:// URL in headless chromium; (probe record, console lines)."""
    browser = _chromium()
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "probe.html"
    path.write_text(page.replace("<head>", "<head>" + PROBE, 1), encoding="utf-8")
    profile = tmp_path / "profile"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", path.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish loading the page in 90 s")
    m = re.search(r'<html[^>]*\sdata-probe="([^"]*)"', done.stdout)
    assert m, f"no probe record in chromium's DOM (rc {done.returncode}): {done.stderr[-2000:]}"
    # Console messages of the page (CSP refusals, failed loads, errors) are logged as CONSOLE lines.
    console = [ln for ln in done.stderr.splitlines() if ":CONSOLE" in ln]
    return json.loads(html.unescape(m.group(1))), console


def test_report_loads_in_chromium_with_every_image_shown(split_report, tmp_path):
    _, page = split_report
    probe, console = _open_in_browser(page, tmp_path)
    assert probe["errors"] == [] and console == []
    assert probe["rows"] == 5 and len(probe["images"]) == 5 and all(w > 0 for w in probe["images"])
    assert len(probe["svgs"]) == 2 and all(w > 0 for w in probe["svgs"])


def test_browser_applies_direction_and_blocks_outside_resources(tmp_path):
    probe, console = _open_in_browser(render_html(_sample_data()), tmp_path / "a")
    assert probe["errors"] == [] and console == []
    assert probe["rows"] == 2 and all(w > 0 for w in probe["images"])
    assert ["ar", "rtl"] in probe["dirs"] and ["he", "rtl"] in probe["dirs"] and ["en", "ltr"] in probe["dirs"]
    # The checks above would see a page that reached outside: the CSP refuses it and says so.
    leaky = render_html(_sample_data()).replace("</body>", '<img src="https://example.invalid/x.png"></body>')
    probe, console = _open_in_browser(leaky, tmp_path / "b")
    assert any("CSP blocked" in e for e in probe["errors"]) and console


# -- the evaluate command -----------------------------------------------------------------


def test_evaluate_cli_json_has_every_score_baseline_and_interval(tiny_packs, tiny_dataset):
    from typer.testing import CliRunner

    from toolkit.cli import app

    common = ["evaluate", "--lang", "all", "--images", str(tiny_dataset["images"]), "--split", str(tiny_dataset["test"]),
              "--packs-dir", str(tiny_packs), "--beam", "2", "--bootstrap", "20"]
    res = CliRunner().invoke(app, common + ["--format", "json"])
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)
    keys = {"lang", "n_images", "n_references", "tokenization", "signature", "baselines", "ci"}
    keys |= {f"bleu{n}{s}" for n in range(1, 5) for s in ("", "_nobp")} | {"cider_d"}
    assert [r["lang"] for r in results] == ["en", "zh"]
    for r in results:
        assert keys <= set(r) and "captions" not in r
        assert set(r["baselines"]) == {"constant", "retrieval"}
        for system in (r, *r["baselines"].values()):
            assert system["n_images"] == 8 and system["n_references"] == 40
            assert set(system["ci"]) == {k for k in keys if k.startswith("bleu")} | {"cider_d"}
            lo, hi = system["ci"]["bleu4"]
            assert lo <= hi and all(0 <= x <= 100 for x in (lo, hi))
            lo, hi = system["ci"]["cider_d"]
            assert 0 <= lo <= system["cider_d"] <= hi
            assert system["bleu4_nobp"] >= system["bleu4"] - 1e-9 and not math.isnan(system["bleu1"])
        for b in r["baselines"].values():  # the pack against each baseline, paired, in BLEU-4 and CIDEr-D
            for key in ("delta_bleu4_ci", "delta_cider_d_ci"):
                lo, hi = b["vs_pack"][key]
                assert lo <= hi
            assert 0 <= b["vs_pack"]["p_pack_better"] <= 1
        assert r["tokenization"] == ("chars" if r["lang"] == "zh" else "words")
        assert "smooth:none" in r["signature"] and "nltk:" in r["signature"] and "pack:1.0.0" in r["signature"]
        assert f"capkit-bleu:{SCORING_VERSION}" in r["signature"] and "cider-d:sigma6" in r["signature"]
    table = CliRunner().invoke(app, common)
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert "B4 noBP" in lines[0] and "B4 95% CI" in lines[0]
    assert "CIDEr-D" in lines[0] and "CIDEr-D 95% CI" in lines[0]
    assert sum("baseline: constant" in ln for ln in lines) == 2 and sum("baseline: retrieval" in ln for ln in lines) == 2
    assert sum(ln.startswith("signature: ") for ln in lines) == 2
    paired = [ln for ln in lines if ln.split(": ", 1)[-1].startswith("pack - ")]
    assert len(paired) == 4 and all("paired resamples; CIDEr-D " in ln for ln in paired)


def test_a_pack_scored_before_cider_d_still_lists_and_evaluates(tiny_packs, tiny_dataset, tmp_path):
    from typer.testing import CliRunner

    from toolkit.cli import app
    from toolkit.pack import MANIFEST_FILE, MODEL_CARD_FILE

    assert "| BLEU-4 | CIDEr-D |" in (tiny_packs / "en" / MODEL_CARD_FILE).read_text(encoding="utf-8")
    packs = tmp_path / "packs"
    shutil.copytree(tiny_packs, packs)
    path = packs / "en" / MANIFEST_FILE
    m = json.loads(path.read_text(encoding="utf-8"))
    assert m["scores"]["test"]["model"]["cider_d"] >= 0  # what a new build writes, for every system
    for systems in m["scores"].values():
        for r in systems.values():
            r.pop("cider_d")
            r["signature"] = r["signature"].replace(f"capkit-bleu:{SCORING_VERSION}", "capkit-bleu:1")
    path.write_text(json.dumps(m, indent=2), encoding="utf-8")
    listing = CliRunner().invoke(app, ["packs", "list", "--packs-dir", str(packs)])
    assert listing.exit_code == 0, listing.output
    head, *rows = listing.stdout.splitlines()
    assert "CIDEr-D" in head
    en = next(r.split() for r in rows if r.startswith("en "))
    assert en[4:6] == [f"{m['scores']['test']['model']['bleu4']:.1f}", "-"]
    res = CliRunner().invoke(app, ["evaluate", "--lang", "en", "--images", str(tiny_dataset["images"]),
                                   "--split", str(tiny_dataset["test"]), "--packs-dir", str(packs), "--beam", "2"])
    assert res.exit_code == 0, res.output
    assert f"capkit-bleu:{SCORING_VERSION}" in res.stdout  # scored afresh, with CIDEr-D
