"""The encoder in mixed bfloat16 against float32: extraction speed, and what a pack's captions lose by it.

Issue 14's largest single stage is extraction (7,000 photos through Xception,
7-14 minutes on 2 cores). On CPUs with AVX512_BF16 or AMX, Keras's
mixed_bfloat16 policy runs the convolutions in bfloat16. This script asks
whether that is worth having: the dev photos are encoded twice in the same
run by the pack's own encoder, in float32 and in bfloat16
(`EncoderConfig.precision`, which `build-pack --precision bfloat16` sets),
each from the JPEG files with no feature cache (the real extraction path,
decoding included); then the same pack captions both sets of features with
the default search, and a paired bootstrap over the photos says whether the
captions got worse.

    python scripts/encoder_precision.py --packs-dir runs/zh --lang zh [--images 1000]

Prints images per second and the scores; writes runs/encoder_precision.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _fullsplit import shared_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs-dir", type=Path, default=ROOT / "lang_packs")
    ap.add_argument("--lang", default="en")
    ap.add_argument("--images", type=int, default=1000, help="dev photos to encode (the first of the split)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "encoder_precision.json")
    args = ap.parse_args()

    import numpy as np

    from toolkit.captioner import Captioner
    from toolkit.data import group_by_image, read_captions, read_split
    from toolkit.evaluate import paired_bootstrap
    from toolkit.pack import REFERENCES_FILE, find_pack
    from toolkit.score import evaluate_packs

    flickr = shared_data() / "flickr8k"
    images = flickr / "Images224"
    names = [n for n in read_split(flickr / "Flickr_8k.devImages.txt") if (images / n).is_file()][: args.images]
    refs = group_by_image(read_captions(find_pack(args.packs_dir, args.lang) / REFERENCES_FILE).captions)
    res, feats, out = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(tmp) / "dev.txt"
        split.write_text("".join(n + "\n" for n in names))
        for precision in ("float32", "bfloat16"):
            captioner = Captioner(args.packs_dir, [args.lang], feature_cache=False).load()
            enc = captioner.encoder(args.lang)
            if precision == "bfloat16":
                enc.config = replace(enc.config, precision="bfloat16")  # EncoderConfig.precision, as --precision sets it
            paths = [str(images / n) for n in names]
            enc.extract(paths[: enc.config.batch_size])  # traced before the clock starts, both precisions alike
            enc.forget_features()
            t0 = time.perf_counter()
            ex = enc.extract(paths)
            seconds = time.perf_counter() - t0
            keys = [ex.keys[p] for p in paths]
            feats[precision] = enc.features(keys)
            r = evaluate_packs([args.lang], args.packs_dir, images, split, bootstrap=args.bootstrap, baselines=False,
                               captioner=captioner)[0]  # the features are in the encoder's memory: not encoded again
            res[precision] = r
            out[precision] = {"extract_seconds": seconds, "images_per_s": len(names) / seconds,
                              **{s: r[s] for s in ("bleu1", "bleu4", "cider_d", "ci")}}
    a, b = feats["float32"], feats["bfloat16"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    hyp_b, hyp_a = res["bfloat16"]["captions"], res["float32"]["captions"]
    paired = paired_bootstrap(hyp_b, hyp_a, {n: refs[n] for n in hyp_a}, args.lang, n=args.bootstrap)
    out["features"] = {"relative_error": float(np.linalg.norm(a - b) / np.linalg.norm(a)), "min_cosine": float(cos.min())}
    out["paired_bleu4_bfloat16_minus_float32"] = paired
    out["identical_captions"] = sum(hyp_a[n] == hyp_b[n] for n in hyp_a) / len(hyp_a)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print(f"{len(names)} dev photos, pack {args.lang} of {args.packs_dir}")
    print("| encoder | images/s | BLEU-1 | BLEU-4 (95% CI) | CIDEr-D |\n|---|---|---|---|---|")
    for p in ("float32", "bfloat16"):
        o = out[p]
        print(f"| {p} | {o['images_per_s']:.1f} | {o['bleu1']:.1f} | {o['bleu4']:.1f} "
              f"({o['ci']['bleu4'][0]:.1f}-{o['ci']['bleu4'][1]:.1f}) | {o['cider_d']:.1f} |")
    lo, hi = paired["delta_ci"]
    clo, chi = paired["cider_d_delta_ci"]
    print(f"bfloat16 - float32: BLEU-4 {paired['bleu4_a'] - paired['bleu4_b']:+.1f} ({lo:+.1f} to {hi:+.1f}), "
          f"CIDEr-D {paired['cider_d_a'] - paired['cider_d_b']:+.1f} ({clo:+.1f} to {chi:+.1f}); "
          f"identical captions {out['identical_captions']:.0%}; features: relative error "
          f"{out['features']['relative_error']:.4f}, min cosine {out['features']['min_cosine']:.5f}; "
          f"speed-up {out['bfloat16']['images_per_s'] / out['float32']['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
