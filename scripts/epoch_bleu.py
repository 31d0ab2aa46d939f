"""What each epoch buys: dev loss and dev BLEU after every epoch of one training run on the full split.

One `train_decoder` run (one `fit`, as a build trains); after each epoch its
progress callback loads the weights early stopping would keep at that point
(the best dev loss so far, `best.weights.h5`) into a separate inference model
and scores them on the 1,000 dev photos with the default search. This is how
`TrainConfig.min_delta` was chosen: the dev-loss gain below which further
epochs stopped buying BLEU. (A first version resumed training one epoch at a
time; every resume replayed epoch 1's batches and dropout masks, and dev loss
climbed from the third epoch: `train_decoder` now seeds both by epoch.)

    python scripts/epoch_bleu.py --packs-dir runs/full --lang en [--epochs 30] [--decoder lstm] [--patience 6]

Writes runs/epoch_bleu-LANG-DECODER.json after every epoch (a stopped run loses nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _fullsplit import full_split  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs-dir", type=Path, default=ROOT / "runs" / "full")
    ap.add_argument("--lang", default="en")
    ap.add_argument("--decoder", default="lstm")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=6, help="longer than a build's, to see what later epochs buy")
    ap.add_argument("--work", type=Path, default=None, help="checkpoint folder (default runs/epoch_bleu-LANG-DECODER)")
    args = ap.parse_args()

    from toolkit.config import SEARCH, DecoderConfig, TrainConfig
    from toolkit.evaluate import corpus_bleu_scores, repetition_rate
    from toolkit.decoder import train_decoder
    from toolkit.generate import KerasStepModel
    from toolkit.generate import beam_search_batched
    from toolkit.tokenizer import BOS_ID, EOS_ID

    grid = args.decoder == "attention"
    train_f, train_s, dev_f, dev_s, tok, _, dev_names, dev_texts = full_split(args.packs_dir, args.lang, grid)
    cfg = DecoderConfig(architecture=args.decoder, vocab_size=tok.vocab_size)
    tag = f"{args.lang}-{args.decoder}"
    work = args.work or ROOT / "runs" / f"epoch_bleu-{tag}"
    out = ROOT / "runs" / f"epoch_bleu-{tag}.json"
    rows = []
    from toolkit.decoder import CHECKPOINT_BEST_FILE, load_decoder

    def after_epoch(h: dict) -> None:
        t0 = time.perf_counter()
        model = load_decoder(replace(cfg), work / CHECKPOINT_BEST_FILE)
        ids = beam_search_batched(KerasStepModel(model), dev_f, BOS_ID, EOS_ID, SEARCH.beam, cfg.max_length,
                                  SEARCH.length_penalty, SEARCH.no_repeat_ngram)
        hyps = dict(zip(dev_names, tok.decode(ids)))
        b = corpus_bleu_scores(hyps, dev_texts, args.lang)
        rows.append({**h, "bleu1": b.bleu1, "bleu4": b.bleu4, "repeats": repetition_rate(list(hyps.values()), args.lang),
                     "score_seconds": time.perf_counter() - t0})
        out.write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows[-1]), flush=True)

    train_decoder(train_f, train_s, dev_f, dev_s, replace(cfg), TrainConfig(epochs=args.epochs, patience=args.patience),
                  work, progress=after_epoch)


if __name__ == "__main__":
    main()
