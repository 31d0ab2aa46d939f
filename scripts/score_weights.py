"""Dev BLEU of decoder weights files saved during a build, with an installed pack's tokenizer and settings.

For what each epoch of a build bought: copy `best.weights.h5` out of the
build's checkpoint folder (PACKS/.work/LANG-KEY/) after every epoch, then,
once the pack is installed, score each copy the way the build scored its
final weights (the default search, the dev split's photos and references):

    python scripts/score_weights.py --packs-dir runs/build --lang en --images ../shared/data/flickr8k/Images224 \
        --split ../shared/data/flickr8k/Flickr_8k.devImages.txt runs/snap/epoch*.weights.h5

Prints one JSON line per file, in the order given.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs-dir", type=Path, required=True)
    ap.add_argument("--lang", required=True)
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("weights", type=Path, nargs="+")
    args = ap.parse_args()

    from toolkit.config import SEARCH
    from toolkit.data import group_by_image, read_captions, read_split
    from toolkit.decoder import load_decoder
    from toolkit.encoder import Encoder
    from toolkit.evaluate import corpus_bleu_scores, repetition_rate
    from toolkit.generate import KerasStepModel, beam_search_batched
    from toolkit.pack import REFERENCES_FILE, load_pack
    from toolkit.tokenizer import BOS_ID, EOS_ID

    pack = load_pack(args.packs_dir, args.lang)
    refs = group_by_image(read_captions(args.packs_dir / args.lang / REFERENCES_FILE).captions)
    names = [n for n in read_split(args.split) if n in refs and (args.images / n).is_file()]
    enc = Encoder.load(args.packs_dir, pack.manifest["encoder"]["id"])
    ex = enc.extract([args.images / n for n in names])
    feats = enc.features([ex.keys[str(args.images / n)] for n in names])
    cfg = pack.step.decoder.config
    for path in args.weights:
        t0 = time.perf_counter()
        model = load_decoder(cfg, path)
        ids = beam_search_batched(KerasStepModel(model), feats, BOS_ID, EOS_ID, SEARCH.beam, cfg.max_length,
                                  SEARCH.length_penalty, SEARCH.no_repeat_ngram)
        hyps = dict(zip(names, pack.tokenizer.decode(ids)))
        b = corpus_bleu_scores(hyps, {n: refs[n] for n in names}, args.lang, bootstrap=200)
        print(json.dumps({"weights": path.name, "bleu1": round(b.bleu1, 2), "bleu4": round(b.bleu4, 2),
                          "bleu4_ci": [round(x, 2) for x in b.ci["bleu4"]],
                          "repeats": round(repetition_rate(list(hyps.values()), args.lang), 4),
                          "images": len(names), "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
