"""The recipe search's two measurements on a split (docs/experiments.md).

sweep: one pack, every combination of search settings: BLEU-1..4, the
BLEU-4 bootstrap interval, mean caption length and the repetition rate.

    python scripts/recipe.py sweep --lang zh --packs-dir runs/exp/zh_v1000 \
        --beam 3,5 --length-penalty 0,0.5,1 --no-repeat-ngram 0,2,3

compare: two packs of one language (two packs dirs) with a search setting
each, scored on the same images: BLEU-4 of each, and the paired bootstrap
interval of the difference (a - b) with the share of resamples a wins.
Either side may name several packs dirs (one recipe trained with other
seeds): it is then scored by its runs' mean BLEU-4.

    python scripts/recipe.py compare --lang en --packs-dir runs/exp/en_best --search 3,1,2 \
        --against runs/packs --against-search 5,0,0
    python scripts/recipe.py compare --lang en --packs-dir runs/exp/en_s0 runs/exp/en_s1 \
        --against runs/exp/plain_s0 runs/exp/plain_s1 --search 5,0.5,3 --against-search 5,0,0

captions: one pack's captions of the split under one search, with its
scores and what the pack was built with, written to a JSON file. `compare`
takes such a file wherever it takes a packs dir, so a pack built on one
machine (or in one session) can be paired with one built on another after
the first is gone. The self-critical stage does not repeat itself to the
digit across CPUs, so a pack's captions cannot be had again by rebuilding it.

    python scripts/recipe.py captions --lang en --packs-dir runs/sc0 --search 5,0.5,3 \
        --out docs/captions/en-defaults-seed0.json
    python scripts/recipe.py compare --lang en --packs-dir runs/merge0 --search 5,0.5,3 \
        --against docs/captions/en-defaults-seed0.json

ensemble: packs of one language with the same tokenizer (trained with other
settings or seeds), each alone and all together: one beam search over their
averaged next-token probabilities, with the paired bootstrap of the
ensemble against its members' mean BLEU-4 (`--bootstrap 0` skips it).
`--out FILE` writes the ensemble's captions as `captions` does, so that
`compare` can pair it with one member, or with any other system.

    python scripts/recipe.py ensemble --lang en --packs-dir runs/exp/en_a --with runs/exp/en_b --search 5,0.5,3

All default to the shared data's dev split and photos.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "flickr8k"


def _search(text: str) -> dict:
    beam, lp, nr = text.split(",")
    return dict(beam=int(beam), length_penalty=float(lp), no_repeat_ngram=int(nr))


def _evaluate(packs_dir: Path, lang: str, args, search: dict, bootstrap: int) -> dict:
    from toolkit.pipeline import evaluate_packs

    return evaluate_packs([lang], packs_dir, args.images, args.split, bootstrap=bootstrap, baselines=False, **search)[0]


def sweep(args) -> None:
    from toolkit.evaluate import bleu_tokenize

    grid = itertools.product(map(int, args.beam.split(",")), map(float, args.length_penalty.split(",")),
                             map(int, args.no_repeat_ngram.split(",")))
    print("beam  lp   no-rep    B1    B2    B3    B4  B4 95% CI      len  repeats")
    for beam, lp, nr in grid:
        r = _evaluate(args.packs_dir, args.lang, args, dict(beam=beam, length_penalty=lp, no_repeat_ngram=nr), args.bootstrap)
        lengths = [len(bleu_tokenize(c, args.lang)) for c in r["captions"].values()]
        ci = r.get("ci") or {}
        interval = "{:5.1f}-{:<5.1f}".format(*ci["bleu4"]) if "bleu4" in ci else f"{'-':^11}"  # -: no --bootstrap
        print(f"{beam:4d} {lp:4.1f} {nr:6d}  {r['bleu1']:5.1f} {r['bleu2']:5.1f} {r['bleu3']:5.1f} {r['bleu4']:5.1f}"
              f"  {interval}  {sum(lengths) / len(lengths):5.1f}  {100 * r['repetition']:5.1f}%")
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({k: v for k, v in r.items() if k not in ("captions", "baselines")}) + "\n")


def _saved(path: Path, lang: str) -> dict:
    """A `captions` file, read as `_evaluate`'s result for its pack; a clear error for anything else."""
    from toolkit.errors import CapkitError

    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(saved, dict) and isinstance(saved.get("captions"), dict) and isinstance(saved.get("scores"), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CapkitError(f"{path}: not a captions file written by `recipe.py captions` ({e})") from e
    if not ok:
        raise CapkitError(f"{path}: not a captions file written by `recipe.py captions` (no captions or scores)")
    if saved.get("lang") != lang:
        raise CapkitError(f"{path}: captions in {saved.get('lang')!r}, not {lang!r}")
    return {**saved["scores"], "captions": saved["captions"], "search": saved.get("search", "search not saved")}


def _side(entries: list[Path], search: str, args) -> list[dict]:
    """Each entry's captions: a packs dir is captioned under `search`, a captions file is read as it was saved."""
    return [_saved(e, args.lang) if e.is_file() else {**_evaluate(e, args.lang, args, _search(search), 0), "search": search}
            for e in entries]


def _references(args) -> dict:
    from toolkit.data import group_by_image, read_captions
    from toolkit.errors import CapkitError
    from toolkit.pack import REFERENCES_FILE, find_pack

    if args.references:
        return group_by_image(read_captions(args.references).captions)
    dirs = [d for d in [*args.packs_dir, *args.against] if not d.is_file()]
    if not dirs:
        raise CapkitError("both sides are captions files: name the references with --references "
                          "(a pack's references.txt)")
    return group_by_image(read_captions(find_pack(dirs[0], args.lang) / REFERENCES_FILE).captions)


def _built_with(manifest: dict) -> dict:
    return {k: manifest.get(k) for k in ("decoder", "tokenizer", "train", "training")}


def _write_captions(args, pack: str, built_with, scores: dict, captions: dict) -> None:
    """The file `_saved` reads back: one system's captions of the split, its scores and what it was built with."""
    saved = {"lang": args.lang, "pack": pack, "search": args.search, "split": args.split.name, "images": str(args.images),
             "built_with": built_with, "scores": scores, "captions": captions}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(saved, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{args.lang}: {len(captions)} captions of {pack} ({args.search}): BLEU-1 {scores['bleu1']:.1f} "
          f"BLEU-4 {scores['bleu4']:.1f}, CIDEr-D {scores['cider_d']:.1f} -> {args.out}")


def captions(args) -> None:
    from toolkit.pack import find_pack, load_manifest

    r = _evaluate(args.packs_dir, args.lang, args, _search(args.search), args.bootstrap)
    manifest = load_manifest(find_pack(args.packs_dir, args.lang))
    scores = {k: v for k, v in r.items() if k not in ("captions", "caption_ids", "baselines")}
    _write_captions(args, str(args.packs_dir), _built_with(manifest), scores, r["captions"])


def compare(args) -> None:
    from toolkit.errors import CapkitError
    from toolkit.evaluate import paired_bootstrap

    sides = [_side(args.packs_dir, args.search, args), _side(args.against, args.against_search, args)]
    refs_all = _references(args)
    missing = sorted(set(sides[0][0]["captions"]) - set(refs_all))
    if missing:
        raise CapkitError(f"{len(missing)} captioned images have no references ({', '.join(missing[:3])}): "
                          "name those the packs were scored against with --references")
    refs = {n: refs_all[n] for n in sides[0][0]["captions"]}
    pb = paired_bootstrap(*([r["captions"] for r in side] for side in sides), refs, args.lang, n=args.bootstrap)
    for name, dirs, side in (("a", args.packs_dir, sides[0]), ("b", args.against, sides[1])):
        search = ", ".join(dict.fromkeys(r["search"] for r in side))
        runs = ", ".join(f"{d} ({r['bleu4']:.1f})" for d, r in zip(dirs, side)) if len(side) > 1 else str(dirs[0])
        ci = pb[f"ci_{name}"]
        print(f"{args.lang}: {name} = {runs} ({search}): BLEU-1 {np.mean([r['bleu1'] for r in side]):.1f} "
              f"BLEU-4 {pb[f'bleu4_{name}']:.1f} ({ci[0]:.1f}-{ci[1]:.1f}), CIDEr-D {pb[f'cider_d_{name}']:.1f}, "
              f"repeats {100 * np.mean([r['repetition'] for r in side]):.1f}%")
    lo, hi = pb["delta_ci"]
    clo, chi = pb["cider_d_delta_ci"]
    print(f"{args.lang}: a - b BLEU-4 {pb['bleu4_a'] - pb['bleu4_b']:+.1f} (95% CI {lo:+.1f} to {hi:+.1f}); "
          f"a better in {100 * pb['p_a_better']:.1f}% of {pb['n']} paired resamples of {pb['n_images']} images; "
          f"CIDEr-D {pb['cider_d_a'] - pb['cider_d_b']:+.1f} (95% CI {clo:+.1f} to {chi:+.1f})")


class _Ensemble:
    """A `StepModel` over several: each member's state side by side, next-token probabilities averaged."""

    def __init__(self, steps):
        self.steps, self.sizes = steps, []

    def initial_state(self, features):
        states = [step.initial_state(features) for step in self.steps]
        self.sizes = [len(s) for s in states]
        return tuple(t for s in states for t in s)

    def step(self, tokens, state):
        logps, new, i = [], [], 0
        for step, k in zip(self.steps, self.sizes):
            logp, s = step.step(tokens, state[i : i + k])
            logps.append(np.asarray(logp, np.float64))
            new += s
            i += k
        return np.logaddexp.reduce(logps, axis=0) - np.log(len(logps)), tuple(new)


def ensemble(args) -> None:
    from toolkit.data import group_by_image, read_captions, read_split
    from toolkit.encoder import Encoder
    from toolkit.errors import CapkitError
    from toolkit.evaluate import corpus_bleu_scores, paired_bootstrap, repetition_rate
    from toolkit.generate import beam_search
    from toolkit.pack import REFERENCES_FILE, TOKENIZER_FILE
    from toolkit.pipeline import load_pack
    from toolkit.tokenizer import BOS_ID, EOS_ID
    from toolkit.written import written_form

    dirs = [args.packs_dir, *args.members]
    packs = [load_pack(d, args.lang) for d in dirs]
    if len({(p.dir / TOKENIZER_FILE).read_bytes() for p in packs}) > 1:
        raise CapkitError("the packs' tokenizers differ; an ensemble averages over one vocabulary")
    if len({p.manifest["encoder"]["id"] for p in packs}) > 1 or any(p.needs_grid for p in packs):
        raise CapkitError("an ensemble here takes packs on one encoder's pooled features (lstm, merge)")
    refs_all = group_by_image(read_captions(packs[0].dir / REFERENCES_FILE).captions)
    names = [n for n in read_split(args.split) if n in refs_all and (args.images / n).is_file()]
    encoder = Encoder.load(args.packs_dir, packs[0].manifest["encoder"]["id"])
    paths = [args.images / n for n in names]
    keys = encoder.extract(paths).keys
    features = encoder.features([keys[str(p)] for p in paths])
    refs = {n: refs_all[n] for n in names}
    search = _search(args.search)
    captions = []
    for members in [[i] for i in range(len(packs))] + [list(range(len(packs)))]:
        model = _Ensemble([packs[i].step for i in members])
        ids = [c for i in range(0, len(features), 64)
               for c in beam_search(model, features[i : i + 64], BOS_ID, EOS_ID, search["beam"], 40,
                                    search["length_penalty"], search["no_repeat_ngram"])]
        captions.append({n: written_form(t, args.lang) for n, t in zip(names, packs[0].tokenizer.decode(ids))})
        s = corpus_bleu_scores(captions[-1], refs, args.lang).to_dict()
        label = " + ".join(str(dirs[i]) for i in members)
        print(f"{args.lang} {label}: BLEU-1 {s['bleu1']:.1f} BLEU-4 {s['bleu4']:.1f} CIDEr-D {s['cider_d']:.1f}")
    if args.bootstrap:  # the ensemble against its members, scored by their mean BLEU-4 on the same resamples
        pb = paired_bootstrap(captions[-1], captions[:-1], refs, args.lang, n=args.bootstrap)
        lo, hi = pb["delta_ci"]
        clo, chi = pb["cider_d_delta_ci"]
        print(f"{args.lang}: ensemble - members' mean BLEU-4 {pb['bleu4_a'] - pb['bleu4_b']:+.1f} "
              f"(95% CI {lo:+.1f} to {hi:+.1f}); ensemble better in {100 * pb['p_a_better']:.1f}% of {pb['n']} resamples; "
              f"CIDEr-D {pb['cider_d_a'] - pb['cider_d_b']:+.1f} (95% CI {clo:+.1f} to {chi:+.1f})")
    if args.out:  # the ensemble's captions (`s`: the last row's scores), for `compare` against a member or another system
        scores = {**s, **search, "system": "ensemble", "repetition": repetition_rate(list(captions[-1].values()), args.lang)}
        _write_captions(args, " + ".join(map(str, dirs)), [_built_with(p.manifest) for p in packs], scores, captions[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("sweep", "compare", "ensemble", "captions"):
        p = sub.add_parser(name)
        p.add_argument("--lang", required=True)
        p.add_argument("--packs-dir", type=Path, required=True, nargs="+" if name == "compare" else None,
                       help="packs dir(s) of a, or files written by `captions`" if name == "compare" else None)
        p.add_argument("--images", type=Path, default=DATA / "Images224")  # the whole train and dev splits
        p.add_argument("--split", type=Path, default=DATA / "Flickr_8k.devImages.txt")
        p.add_argument("--bootstrap", type=int, default=0 if name == "sweep" else 1000)
    s = sub.choices["sweep"]
    s.add_argument("--beam", default="3,5")
    s.add_argument("--length-penalty", default="0,0.5,1")
    s.add_argument("--no-repeat-ngram", default="0,2,3")
    s.add_argument("--json", type=Path, help="append each row's scores here")
    c = sub.choices["compare"]
    c.add_argument("--search", default="3,0,0", help="beam,length_penalty,no_repeat_ngram of a")
    c.add_argument("--against", type=Path, required=True, nargs="+", help="packs dir(s) of b, or `captions` files")
    c.add_argument("--references", type=Path, help="captions file of the references (default: the first pack's)")
    c.add_argument("--against-search", default="3,0,0", help="beam,length_penalty,no_repeat_ngram of b")
    e = sub.choices["ensemble"]
    e.add_argument("--with", dest="members", type=Path, action="append", required=True, help="packs dir of another member")
    e.add_argument("--search", default="5,0.5,3", help="beam,length_penalty,no_repeat_ngram")
    e.add_argument("--out", type=Path, help="also write the ensemble's captions here, as `captions` does")
    o = sub.choices["captions"]
    o.add_argument("--search", default="5,0.5,3", help="beam,length_penalty,no_repeat_ngram")
    o.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = ap.parse_args()

    from toolkit.errors import CapkitError

    try:
        {"sweep": sweep, "compare": compare, "ensemble": ensemble, "captions": captions}[args.command](args)
    except CapkitError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
