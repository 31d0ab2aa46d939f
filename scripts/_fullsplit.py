"""The full Flickr8k train and dev splits as a build trains on them, from a packs dir's feature cache (for scripts)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shared_data() -> Path:
    env = os.environ.get("CAPKIT_SHARED_DATA")
    return Path(env) if env else ROOT.parent / "shared" / "data"


def caption_file(lang: str) -> Path:
    """English: the Flickr8k token file; zh: the Flickr8k-CN Google translations."""
    d = shared_data()
    return d / "flickr8k" / "Flickr8k.token.txt" if lang == "en" else d / "flickr8k-cn" / "flickr8kzhg.caption.txt"


def full_split(packs_dir: Path, lang: str = "en", grid: bool = False, vocab_size: int | None = None,
               tokenizer: str = "auto"):
    """(train features, train Sequences, dev features, dev Sequences, tokenizer, grid cells, dev names, dev texts).

    The packs dir must hold one encoder whose cache has every photo of
    Images224 (`capkit encode [--grid] --images .../Images224`).
    """
    import numpy as np

    from toolkit.config import DecoderConfig, resolve_tokenizer
    from toolkit.data import group_by_image, read_captions, read_split
    from toolkit.decoder import Sequences
    from toolkit.encoder import ENCODERS_DIR, Encoder
    from toolkit.build import IN_MEMORY_FEATURES_BYTES, training_texts
    from toolkit.tokenizer import train_tokenizer

    flickr = shared_data() / "flickr8k"
    images = flickr / "Images224"
    ids = [p.name for p in (Path(packs_dir) / ENCODERS_DIR).iterdir() if p.is_dir()]
    if len(ids) != 1:
        sys.exit(f"{Path(packs_dir) / ENCODERS_DIR}: expected one encoder, found {ids}")
    enc = Encoder.load(packs_dir, ids[0])
    texts = group_by_image(read_captions(caption_file(lang)).captions)
    splits = {split: [n for n in read_split(flickr / f"Flickr_8k.{split}Images.txt") if n in texts and (images / n).is_file()]
              for split in ("train", "dev")}
    learned = training_texts(texts, splits["train"], lang)  # the written form the build's decoder learns
    out, tok = [], None
    for split, names in splits.items():
        ex = enc.extract([images / n for n in names], grid=grid)
        if ex.n_extracted:
            print(f"warning: {ex.n_extracted} {split} images were not cached and were extracted now", file=sys.stderr)
        keys = [ex.keys[str(images / n)] for n in names]
        if tok is None:
            tok = train_tokenizer([t for n in names for t in learned[n]], lang, vocab_size or DecoderConfig().vocab_size,
                                  resolve_tokenizer(tokenizer, lang))
        idx, toks = [], []
        for i, n in enumerate(names):
            ids_ = tok.encode(learned[n])
            idx += [i] * len(ids_)
            toks += ids_
        view = enc.features_view(keys, grid=grid)
        feats = view if view.nbytes > IN_MEMORY_FEATURES_BYTES else view[np.arange(len(view))]
        out += [feats, Sequences(np.array(idx, np.int32), toks)]
    dev_texts = {n: texts[n] for n in names}
    return (*out, tok, enc.grid_size**2, names, dev_texts)
