"""The offline demo: no dataset, weights or network needed.

Generates coloured-shape photos with English and Chinese captions (written by
the generator, so no translation service), builds an `en` and a `zh` pack
over one random-init encoder with the real `capkit` commands, captions a few
held-out images in both languages and scores both packs on the test split.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def capkit(*args: str) -> None:
    cmd = [sys.executable, "-m", "toolkit", *args]
    print(f"\n$ capkit {shlex.join(args)}", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"  ({time.perf_counter() - t:.0f}s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo", help="where data and packs go")
    ap.add_argument("--images", type=int, default=240, help="generated images")
    args = ap.parse_args()
    from toolkit.synthetic import make_dataset

    start = time.perf_counter()
    data = make_dataset(args.out / "data", n_images=args.images, image_size=96)
    packs = str(args.out / "packs")
    small = ["--encoder-weights", "none", "--image-size", "96", "--packs-dir", packs,
             "--units", "128", "--embed-dim", "64", "--vocab-size", "200", "--epochs", "25", "--patience", "4"]
    splits = ["--train-split", str(data["train"]), "--dev-split", str(data["dev"]), "--test-split", str(data["test"])]
    for lang in ("en", "zh"):
        capkit("build-pack", lang, "--captions", str(data[f"captions_{lang}"]), "--source-lang", lang,
               "--images", str(data["images"]), *splits, *small)
    test_images = [str(data["images"] / n) for n in data["test"].read_text().split()[:4]]
    capkit("caption", *test_images, "--lang", "en", "--lang", "zh", "--packs-dir", packs)
    capkit("evaluate", "--lang", "all", "--images", str(data["images"]), "--split", str(data["test"]), "--packs-dir", packs)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s; packs in {packs}")


if __name__ == "__main__":
    main()
