"""The web page `capkit serve` shows at `/`: plain strings, no template engine, nothing fetched from outside.

The page (`PAGE_HTML`) loads its script and style from the server itself
(`/static/app.js`, `/static/app.css`); the Content-Security-Policy (`CSP`)
lets it reach nothing else: no CDN, no outside font or script. The script
asks `/v1/packs` which languages are served, sends each photo picked or
dropped to `/v1/captions` (a few at a time), and shows it beside its captions,
one column per language, right-to-left scripts right to left. Captions of
attention packs come with a heat map per token, drawn by the server as the
report draws them. Every text from a response is set with `textContent`.
"""

from __future__ import annotations

# Script and style from this server only; photos shown from the browser's own memory (blob:), heat maps as data URIs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CONCURRENT_UPLOADS = 4  # photos in flight at once from one page

PAGE_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>capkit: captions in your language</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/app.css">
<script src="/static/app.js" defer></script>
</head>
<body>
<header>
  <h1>capkit</h1>
  <p class="tagline">Captions for your photos, in the languages installed here. Nothing leaves this machine.</p>
</header>
<main>
  <section class="controls" aria-label="settings">
    <fieldset id="langs"><legend>Languages</legend><p class="note" id="langs-note">loading the packs&#8230;</p></fieldset>
    <details class="search">
      <summary>Search settings</summary>
      <label>Beam width <input id="beam" type="number" min="1" max="16" value="5"></label>
      <label>Length penalty <input id="length_penalty" type="number" min="0" max="10" step="0.1" value="0.5"></label>
      <label>No repeated n-gram of <input id="no_repeat_ngram" type="number" min="0" max="16" value="3"> tokens</label>
      <label class="check"><input id="attention" type="checkbox" checked> Heat maps for attention packs</label>
    </details>
  </section>
  <label id="drop" class="drop" for="file">
    <input id="file" type="file" accept="image/*" multiple>
    <span class="big">Choose photos</span>
    <span class="small">or drop them here</span>
  </label>
  <p id="status" class="status" role="status" aria-live="polite"></p>
  <div class="actions"><button id="again" type="button" hidden>Caption again with these settings</button>
  <button id="clear" type="button" hidden>Clear</button></div>
  <section id="results" aria-label="captions"></section>
</main>
<footer><span id="served"></span> &middot; API: <a href="/openapi.json">/openapi.json</a></footer>
</body>
</html>
"""

APP_CSS = """
:root{--bg:#f6f5f2;--card:#fff;--ink:#1d1d1f;--muted:#6b6b70;--line:#e3e1dc;--accent:#2f6f4f;--bad:#a61b1b}
@media (prefers-color-scheme:dark){:root{--bg:#151517;--card:#222226;--ink:#ececf0;--muted:#a0a0a8;--line:#35353b;--accent:#6fc39a;--bad:#ff8080}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:16px/1.45 system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC","Noto Sans Arabic",sans-serif}
header,main,footer{max-width:1100px;margin:0 auto;padding:0 1rem}
header{padding-top:1.5rem}h1{margin:0;font-size:1.6rem;letter-spacing:-.01em}.tagline{margin:.2rem 0 1rem;color:var(--muted)}
.controls{display:flex;flex-wrap:wrap;gap:.75rem 1.5rem;align-items:flex-start;margin-bottom:1rem}
fieldset{border:0;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:.5rem;align-items:center}
legend{font-weight:600;margin-bottom:.35rem;width:100%}
.lang{display:inline-flex;align-items:center;gap:.4rem;padding:.35rem .7rem;border:1px solid var(--line);border-radius:999px;background:var(--card);cursor:pointer;user-select:none}
.lang:has(input:checked){border-color:var(--accent);box-shadow:inset 0 0 0 1px var(--accent)}
.lang small{color:var(--muted)}
details.search{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:.4rem .8rem}
details.search summary{cursor:pointer;color:var(--muted)}
details.search label{display:block;margin:.4rem 0}details.search input[type=number]{width:4.5rem;margin-left:.3rem}
.drop{display:flex;flex-direction:column;align-items:center;justify-content:center;gap:.2rem;min-height:8rem;border:2px dashed var(--line);border-radius:14px;background:var(--card);cursor:pointer;text-align:center;padding:1rem;transition:border-color .15s,background .15s}
.drop:hover,.drop.over{border-color:var(--accent)}
.drop input{position:absolute;width:1px;height:1px;opacity:0}
.drop .big{font-size:1.15rem;font-weight:600;color:var(--accent)}.drop .small{color:var(--muted)}
.status{min-height:1.4rem;color:var(--muted);margin:.6rem 0}
.actions{display:flex;gap:.5rem;margin-bottom:.6rem}
button{font:inherit;padding:.4rem .9rem;border-radius:8px;border:1px solid var(--line);background:var(--card);color:var(--ink);cursor:pointer}
#results{display:flex;flex-direction:column;gap:1rem;padding-bottom:2rem}
.card{display:grid;grid-template-columns:minmax(0,280px) 1fr;gap:1rem;background:var(--card);border:1px solid var(--line);border-radius:14px;padding:.8rem;overflow:hidden}
.card figure{margin:0}.card img.photo{width:100%;height:auto;max-height:320px;object-fit:contain;border-radius:8px;background:var(--bg)}
.card figcaption{font-size:.8rem;color:var(--muted);word-break:break-all;margin-top:.3rem}
.caps{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:.8rem;align-content:start}
.caption{border-inline-start:3px solid var(--accent);padding-inline-start:.6rem}
.caption .head{font-size:.8rem;color:var(--muted)}
.caption .text{font-size:1.15rem;font-weight:600;margin:.15rem 0 0}
.caption .empty{color:var(--muted);font-style:italic;font-weight:400}
.heat{display:flex;flex-wrap:wrap;gap:3px;margin-top:.4rem}.heat figure{width:min-content}
.heat img{display:block;width:64px;height:auto;border-radius:3px}.heat figcaption{text-align:center;font-size:.75rem;margin:0;word-break:normal}
.card .error{color:var(--bad)}.card .pending{color:var(--muted)}
.spinner{display:inline-block;width:.9em;height:.9em;border:2px solid var(--line);border-top-color:var(--accent);border-radius:50%;animation:spin .8s linear infinite;vertical-align:-.1em;margin-inline-end:.4rem}
@keyframes spin{to{transform:rotate(360deg)}}
footer{color:var(--muted);font-size:.85rem;padding-bottom:1.5rem}footer a{color:inherit}
@media (max-width:640px){.card{grid-template-columns:1fr}.card img.photo{max-height:260px}h1{font-size:1.35rem}}
"""

APP_JS = r"""
"use strict";
const LIMIT = __LIMIT__;
let packs = [];
const cards = [];
let active = 0;
const waiting = [];
const $ = (sel) => document.querySelector(sel);
const names = (() => { try { return new Intl.DisplayNames([navigator.language || "en"], {type: "language"}); } catch (e) { return null; } })();
function langName(code) { try { return (names && names.of(code)) || code; } catch (e) { return code; } }
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function status(text) { $("#status").textContent = text; }

async function loadPacks() {
  const box = $("#langs");
  try {
    const r = await fetch("/v1/packs");
    packs = (await r.json()).packs;
  } catch (e) {
    $("#langs-note").textContent = "could not ask the server which packs it serves";
    return;
  }
  $("#langs-note").remove();
  for (const p of packs) {
    const label = el("label", {class: "lang", lang: p.lang, dir: p.direction});
    const box_ = el("input", {type: "checkbox", value: p.lang, name: "lang"});
    box_.checked = true;
    label.append(box_, el("span", {}, langName(p.lang)), el("small", {dir: "ltr"}, p.lang + " " + p.version + (p.decoder === "attention" ? " \u00b7 attention" : "")));
    box.append(label);
  }
  $("#served").textContent = packs.length + " pack" + (packs.length === 1 ? "" : "s") + " served";
}

function chosenLangs() { return [...document.querySelectorAll("#langs input:checked")].map((i) => i.value); }

function addFiles(files) {
  const list = [...files].filter((f) => !f.type || f.type.startsWith("image/"));
  if (!list.length) { status("Those are not photos."); return; }
  for (const file of list) {
    const card = el("article", {class: "card", "data-state": "pending"});
    const fig = el("figure");
    const img = el("img", {class: "photo", alt: file.name});
    img.src = URL.createObjectURL(file);
    fig.append(img, el("figcaption", {}, file.name));
    const caps = el("div", {class: "caps"});
    card.append(fig, caps);
    $("#results").prepend(card);
    const entry = {file, card, caps};
    cards.push(entry);
    enqueue(entry);
  }
  $("#again").hidden = $("#clear").hidden = false;
}

function enqueue(entry) { waiting.push(entry); pump(); }
function pump() {
  while (active < LIMIT && waiting.length) {
    active++;
    captionOne(waiting.shift()).finally(() => { active--; pump(); report(); });
  }
  report();
}
function report() {
  const pending = cards.filter((c) => c.card.dataset.state === "pending").length;
  status(pending ? "Captioning " + pending + " photo" + (pending === 1 ? "" : "s") + "\u2026" : cards.length ? "Done." : "");
}

function setPending(caps) {
  caps.replaceChildren(el("p", {class: "pending"}));
  const s = el("span", {class: "spinner", "aria-hidden": "true"});
  caps.firstChild.append(s, document.createTextNode("captioning\u2026"));
}

async function captionOne({file, card, caps}) {
  const langs = chosenLangs();
  card.dataset.state = "pending";
  if (!langs.length) { card.dataset.state = "error"; caps.replaceChildren(el("p", {class: "error"}, "Tick at least one language.")); return; }
  setPending(caps);
  const form = new FormData();
  form.append("image", file, file.name);
  for (const l of langs) form.append("lang", l);
  for (const k of ["beam", "length_penalty", "no_repeat_ngram"]) form.append(k, $("#" + k).value);
  const wantHeat = $("#attention").checked && packs.some((p) => p.decoder === "attention" && langs.includes(p.lang));
  if (wantHeat) form.append("attention", "true");
  let answer, ok = false;
  try {
    const r = await fetch("/v1/captions", {method: "POST", body: form});
    ok = r.ok;
    answer = await r.json().catch(() => ({error: "the server answered " + r.status}));
  } catch (e) {
    answer = {error: "the server could not be reached"};
  }
  if (!ok) { card.dataset.state = "error"; caps.replaceChildren(el("p", {class: "error"}, answer.error || "failed")); return; }
  const result = answer.results[0];
  caps.replaceChildren();
  for (const lang of langs) {
    const c = result.captions[lang];
    if (!c) continue;
    const pack = packs.find((p) => p.lang === lang) || {direction: "ltr"};
    const box = el("div", {class: "caption", "data-lang": lang, lang: lang, dir: pack.direction});
    box.append(el("div", {class: "head"}, langName(lang) + " \u00b7 " + lang + " " + c.pack_version));
    const text = el("p", {class: "text"}, c.text);
    if (!c.text.trim()) { text.textContent = "(empty caption)"; text.classList.add("empty"); }
    box.append(text);
    if (c.attention) {
      const strip = el("div", {class: "heat", dir: "ltr"});
      for (const t of c.attention.tokens) {
        const f = el("figure");
        const i = el("img", {alt: t.token, title: t.token + ": " + (100 * t.peak).toFixed(1) + "% on its top cell"});
        i.src = t.image;
        f.append(i, el("figcaption", {lang: lang}, t.token || "\u2423"));
        strip.append(f);
      }
      box.append(strip);
    }
    caps.append(box);
  }
  card.dataset.state = "done";
}

document.addEventListener("DOMContentLoaded", () => {
  loadPacks();
  const input = $("#file"), drop = $("#drop");
  input.addEventListener("change", () => { addFiles(input.files); input.value = ""; });
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => addFiles(e.dataTransfer.files));
  $("#again").addEventListener("click", () => { for (const c of cards) enqueue(c); });
  $("#clear").addEventListener("click", () => {
    for (const c of cards) URL.revokeObjectURL(c.card.querySelector("img.photo").src);
    cards.length = 0; waiting.length = 0;
    $("#results").replaceChildren(); status("");
    $("#again").hidden = $("#clear").hidden = true;
  });
});
""".replace("__LIMIT__", str(CONCURRENT_UPLOADS))
