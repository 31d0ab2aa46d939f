"""What a user's full-size photos get: a pack scored on the dev photos of `Images/` (originals) and of `Images224/`.

`../shared/data/flickr8k/Images/` holds 520 full-size originals, 113 of them
dev photos; `Images224/` holds the same photos squashed to 224x224, which the
packs were trained on. Both sets are captioned by the same pack with the
default search and scored against the pack's references; the difference is
a paired bootstrap over the 113 photos (`toolkit.evaluate.paired_bootstrap`).

    python scripts/fullsize.py --packs-dir lang_packs --lang en --lang zh

Prints a Markdown table; writes runs/fullsize.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _fullsplit import shared_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs-dir", type=Path, default=ROOT / "lang_packs")
    ap.add_argument("--lang", action="append", default=None)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "fullsize.json")
    args = ap.parse_args()

    from toolkit.captioner import Captioner
    from toolkit.data import group_by_image, read_captions, read_split
    from toolkit.evaluate import paired_bootstrap
    from toolkit.pack import REFERENCES_FILE, find_pack
    from toolkit.score import evaluate_packs

    flickr = shared_data() / "flickr8k"
    full, small = flickr / "Images", flickr / "Images224"
    names = [n for n in read_split(flickr / "Flickr_8k.devImages.txt") if (full / n).is_file() and (small / n).is_file()]
    langs = args.lang or ["en"]
    captioner = Captioner(args.packs_dir, langs)
    rows, out = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(tmp) / "dev_fullsize.txt"
        split.write_text("".join(n + "\n" for n in names))
        for lang in langs:
            res = {}
            for label, folder in (("full-size", full), ("224x224", small)):
                res[label] = evaluate_packs([lang], args.packs_dir, folder, split, bootstrap=args.bootstrap,
                                            baselines=False, captioner=captioner)[0]
            refs = group_by_image(read_captions(find_pack(args.packs_dir, lang) / REFERENCES_FILE).captions)
            a, b = res["full-size"]["captions"], res["224x224"]["captions"]
            paired = paired_bootstrap(a, b, {n: refs[n] for n in a}, lang, n=args.bootstrap)
            same = sum(a[n] == b[n] for n in a) / len(a)
            out[lang] = {"n_images": len(a), "identical_captions": same, "paired_bleu4": paired,
                         **{k: {s: v[s] for s in ("bleu1", "bleu4", "cider_d", "ci") if s in v} for k, v in res.items()}}
            for label in ("full-size", "224x224"):
                r = res[label]
                rows.append(f"| {lang} | {label} | {len(a)} | {r['bleu1']:.1f} | {r['bleu4']:.1f} "
                            f"({r['ci']['bleu4'][0]:.1f}-{r['ci']['bleu4'][1]:.1f}) | {r['cider_d']:.1f} |")
            lo, hi = paired["delta_ci"]
            clo, chi = paired["cider_d_delta_ci"]
            rows.append(f"| {lang} | full-size - 224x224 | | | {paired['bleu4_a'] - paired['bleu4_b']:+.1f} "
                        f"({lo:+.1f} to {hi:+.1f}) | {paired['cider_d_a'] - paired['cider_d_b']:+.1f} "
                        f"({clo:+.1f} to {chi:+.1f}); identical captions: {same:.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print("| lang | photos | n | BLEU-1 | BLEU-4 (95% CI) | CIDEr-D |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
