"""What each epoch buys: dev loss and dev BLEU after every epoch of one training run on the full split.

Trains a decoder epoch by epoch through `train_decoder`'s own resume (one
checkpoint folder, `epochs` raised by one each call, so the optimizer state,
learning-rate schedule and early-stopping counters carry over), and after each
epoch scores the weights early stopping would keep at that point (the best dev
loss so far) on the 1,000 dev photos with the default search. This is how
`TrainConfig.min_delta` was chosen: the dev-loss gain below which further
epochs stopped buying BLEU.

    python scripts/epoch_bleu.py --packs-dir runs/full --lang en [--epochs 30] [--decoder lstm]

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
    ap.add_argument("--patience", type=int, default=3)
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
    for epochs in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        tr = TrainConfig(epochs=epochs, patience=args.patience)
        model, state = train_decoder(train_f, train_s, dev_f, dev_s, replace(cfg), tr, work)
        train_s_ = time.perf_counter() - t0
        t0 = time.perf_counter()
        ids = beam_search_batched(KerasStepModel(model), dev_f, BOS_ID, EOS_ID, SEARCH.beam, cfg.max_length,
                                  SEARCH.length_penalty, SEARCH.no_repeat_ngram)
        hyps = dict(zip(dev_names, tok.decode(ids)))
        b = corpus_bleu_scores(hyps, dev_texts, args.lang)
        h = state["history"][-1]
        rows.append({"epoch": epochs, "loss": h["loss"], "val_loss": h["val_loss"], "best_epoch": state["best_epoch"],
                     "best_val_loss": state["best_val_loss"], "lr": h["lr"], "bleu1": b.bleu1, "bleu4": b.bleu4,
                     "repeats": repetition_rate(list(hyps.values()), args.lang),
                     "train_seconds": train_s_, "score_seconds": time.perf_counter() - t0})
        out.write_text(json.dumps(rows, indent=1))
        print(json.dumps(rows[-1]), flush=True)
        if state["wait"] >= args.patience:
            break


if __name__ == "__main__":
    main()
