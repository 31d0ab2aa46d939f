"""Speed of every stage on this machine: extraction, training, decoding, captioning.

Each stage runs in a subprocess of its own, so its peak resident memory is its
own (`ru_maxrss`) and no stage warms another's caches:

- extract: `Encoder.extract` from the JPEG files with a fresh, empty feature
  cache, against `Encoder.encode_arrays` on the same images already decoded to
  uint8 arrays (same model, same batch size), measured in the same process;
- train: one `build-pack` of the en pack on the shared Flickr8k images, its
  features from a fresh copy of the cached encoder folder; seconds per epoch,
  training captions per second;
- decode: the decoder alone (the en pack of --packs) on real features, greedy
  and beam 3, batch 1 and 64, numpy loop over the compiled step vs the whole
  search compiled (`KerasStepModel.search`);
- caption: `caption_images` end to end with a fresh feature cache, and the
  decoder's share of its time.

    python scripts/benchmark.py --encoder-weights /tmp/xw/xception.weights.h5 [--images 256] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STAGES = ("extract", "train", "decode", "caption")


def _shared_flickr8k() -> Path:
    env = os.environ.get("CAPKIT_SHARED_DATA")
    return (Path(env) if env else ROOT.parent / "shared" / "data") / "flickr8k"


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _images(args) -> list[Path]:
    from toolkit.images import list_images

    return list_images([args.data / "Images"])[: args.images]


def _encoder_config(args, **kw):
    from toolkit.config import EncoderConfig

    return EncoderConfig(weights=args.encoder_weights, image_size=args.image_size, batch_size=args.batch_size,
                         workers=args.workers, **kw)


def _copy_encoders(args, dest: Path, features: bool) -> None:
    """The registered encoders of --packs, with or without their cached features."""
    src = args.packs / ".encoders"
    if src.is_dir():
        shutil.copytree(src, dest / ".encoders", ignore=None if features else shutil.ignore_patterns("features"))


def stage_extract(args) -> dict:
    import numpy as np

    from toolkit.encoder import FEATURE_DIM, Encoder, FeatureCache
    from toolkit.images import read_image

    paths = _images(args)
    n = len(paths)
    with tempfile.TemporaryDirectory() as tmp:
        enc = Encoder.prepare(_encoder_config(args), Path(tmp))  # a new packs dir: nothing cached
        arrays = np.stack([read_image(p, args.image_size) for p in paths])
        enc.encode_arrays(arrays[: args.batch_size])  # trace the forward pass, outside every timing
        enc.encode_arrays(arrays[: args.batch_size])
        # Alternate memory and disk over chunks of the images, so that load from
        # other jobs on a shared machine falls on both sides alike.
        chunk = args.batch_size * 2
        disk = memory = 0.0
        rounds = []
        for i in range(0, n, chunk):
            t = time.perf_counter()
            enc.encode_arrays(arrays[i : i + chunk])
            m = time.perf_counter() - t
            enc.cache = FeatureCache(Path(tmp) / f"cache-{i}", FEATURE_DIM, enc.identity["feature_scale"])  # empty
            ex = enc.extract(paths[i : i + chunk])
            assert ex.n_extracted == len(paths[i : i + chunk]) and not ex.failures, (ex.n_extracted, ex.failures)
            disk += ex.seconds
            memory += m
            rounds.append({"images": len(paths[i : i + chunk]), "memory_s": m, "disk_s": ex.seconds})
    return {"images": n, "batch_size": args.batch_size, "workers": args.workers, "image_size": args.image_size,
            "disk_images_per_s": n / disk, "memory_images_per_s": n / memory, "disk_over_memory": memory / disk,
            "rounds": rounds}


def stage_train(args) -> dict:
    from toolkit.config import TrainConfig
    from toolkit.pipeline import build_pack, find_split_files

    with tempfile.TemporaryDirectory() as tmp:
        packs = Path(tmp)
        _copy_encoders(args, packs, features=True)
        t = time.perf_counter()
        r = build_pack("en", args.data / "Flickr8k.token.txt", args.data / "Images", find_split_files(args.data), packs,
                       encoder_config=_encoder_config(args),
                       train_config=TrainConfig(epochs=args.epochs, patience=args.epochs + 1, self_critical_epochs=0),
                       beam=3)  # teacher-forced epochs only: what the tutorial trains too
        total = time.perf_counter() - t
        history = json.loads((r.pack_dir / "history.json").read_text())
    m = r.manifest
    per_epoch = sum(h["seconds"] for h in history) / len(history)
    return {"train_images": m["data"]["n_train_images"], "train_captions": m["data"]["n_train_captions"],
            "epochs": len(history), "seconds_per_epoch": per_epoch,
            "train_captions_per_s": m["data"]["n_train_captions"] / per_epoch,
            "build_seconds": total, "hardware": m["training"]["hardware"]}


def stage_decode(args) -> dict:
    import numpy as np

    from toolkit.generate import beam_search
    from toolkit.pipeline import load_pack
    from toolkit.tokenizer import BOS_ID, EOS_ID

    pack = load_pack(args.packs, "en")
    step = pack.step
    L = pack.manifest["decoder"]["max_length"]
    # Real features when the pack's cache has them; the decoder's speed does not depend on which.
    feats = np.random.default_rng(0).normal(size=(64, pack.manifest["decoder"]["feature_dim"])).astype(np.float32)
    cache = args.packs / ".encoders" / pack.manifest["encoder"]["id"] / "features"
    if cache.is_dir():
        from toolkit.encoder import ENCODER_FILE, FEATURE_DIM, FEATURES_INDEX_FILE, FeatureCache

        ident = json.loads((cache.parent / ENCODER_FILE).read_text())
        fc = FeatureCache(cache, FEATURE_DIM, ident["feature_scale"])
        keys = (cache / FEATURES_INDEX_FILE).read_text().split()[:64]
        if len(keys) == 64 and all(k in fc for k in keys):
            feats = fc.get(keys)
    out = {}
    for beam in (1, 3):
        for batch, reps in ((1, args.decode_single), (64, 2)):
            for impl in ("numpy", "compiled"):
                def run(f):
                    if impl == "numpy":
                        return beam_search(step, f, BOS_ID, EOS_ID, beam=beam, max_length=L)
                    return step.search(f, BOS_ID, EOS_ID, beam, L)
                run(feats[:batch])  # traces
                n = 0
                t = time.perf_counter()
                for r in range(reps):
                    f = feats[(r * batch) % 64 :][:batch]
                    run(f)
                    n += len(f)
                out[f"{'greedy' if beam == 1 else 'beam3'}_b{batch}_{impl}_ms_per_image"] = 1000 * (time.perf_counter() - t) / n
            # Same ids from both, on these features.
            out[f"{'greedy' if beam == 1 else 'beam3'}_b{batch}_same_ids"] = run_both_equal(step, feats[:batch], beam, L)
    return out


def run_both_equal(step, feats, beam, L) -> bool:
    from toolkit.generate import beam_search
    from toolkit.tokenizer import BOS_ID, EOS_ID

    return beam_search(step, feats, BOS_ID, EOS_ID, beam=beam, max_length=L) == step.search(feats, BOS_ID, EOS_ID, beam, L)


def stage_caption(args) -> dict:
    from toolkit.pipeline import caption_images

    paths = _images(args)
    with tempfile.TemporaryDirectory() as tmp:
        packs = Path(tmp)
        _copy_encoders(args, packs, features=False)  # fresh cache: captioning decodes and encodes every image
        shutil.copytree(args.packs / "en", packs / "en")
        t = time.perf_counter()
        res = caption_images(paths, ["en"], packs, beam=3)
        total = time.perf_counter() - t
    return {"images": len(paths), "captions_per_s": len(res.rows) / total, "seconds": total,
            "encode_seconds": res.seconds["encode"], "decode_seconds": res.seconds["decode"],
            "decoder_share": res.seconds["decode"] / total}


def _run_stage(name: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--stage", name, *argv], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(line[7:])


def _table(res: dict) -> str:
    rows = []
    e, t, d, c = (res["stages"].get(s, {}) for s in STAGES)

    def add(stage, what, value, unit, mem=None):
        rows.append((stage, what, value, unit, "" if mem is None else f"{mem:.0f}"))

    if "error" not in e and e:
        add("extract", f"from disk ({e['images']} JPEGs, batch {e['batch_size']}, {e['workers']} workers)", f"{e['disk_images_per_s']:.2f}", "images/s", e["peak_rss_mb"])
        add("extract", "from memory (uint8 arrays, same batch)", f"{e['memory_images_per_s']:.2f}", "images/s")
        add("extract", "disk / memory", f"{100 * e['disk_over_memory']:.1f}", "%")
    if "error" not in t and t:
        add("train", f"epoch ({t['train_captions']} captions, {t['train_images']} images)", f"{t['seconds_per_epoch']:.1f}", "s", t["peak_rss_mb"])
        add("train", "training throughput", f"{t['train_captions_per_s']:.0f}", "captions/s")
    if "error" not in d and d:
        first = True
        for name in ("greedy", "beam3"):
            for b in (1, 64):
                for impl in ("numpy", "compiled"):
                    add("decode", f"{name} batch {b}, {impl}" + (" (same ids)" if impl == "compiled" and d[f"{name}_b{b}_same_ids"] else ""),
                        f"{d[f'{name}_b{b}_{impl}_ms_per_image']:.2f}", "ms/image", d["peak_rss_mb"] if first else None)
                    first = False
    if "error" not in c and c:
        add("caption", f"end to end, beam 3, fresh cache ({c['images']} images)", f"{c['captions_per_s']:.2f}", "captions/s", c["peak_rss_mb"])
        add("caption", "decoder share of the time", f"{100 * c['decoder_share']:.1f}", "%")
    w = [max(len(str(r[i])) for r in rows + [("stage", "measure", "value", "unit", "peak RSS MB")]) for i in range(5)]
    fmt = lambda r: f"| {r[0]:<{w[0]}} | {r[1]:<{w[1]}} | {r[2]:>{w[2]}} | {r[3]:<{w[3]}} | {r[4]:>{w[4]}} |"
    lines = [fmt(("stage", "measure", "value", "unit", "peak RSS MB")), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    lines += [fmt(r) for r in rows]
    for s in STAGES:
        if "error" in res["stages"].get(s, {}):
            lines.append(f"{s}: FAILED\n{res['stages'][s]['error']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="images for extraction and captioning")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs (each on every train image)")
    ap.add_argument("--encoder-weights", default="imagenet", help="imagenet (download) or a .weights.h5 path")
    ap.add_argument("--image-size", type=int, default=299)
    ap.add_argument("--batch-size", type=int, default=32, help="encoder batch, from disk and from memory alike")
    ap.add_argument("--workers", type=int, default=4, help="extraction threads reading and decoding images")
    ap.add_argument("--decode-single", type=int, default=16, help="images decoded one at a time for batch 1")
    ap.add_argument("--data", type=Path, default=_shared_flickr8k(), help="Flickr8k folder (Images/, captions, splits)")
    ap.add_argument("--packs", type=Path, default=ROOT / "runs" / "packs",
                    help="packs dir with an en pack and its encoder (read only: copied before use)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "benchmark.json")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    args = ap.parse_args()
    if args.encoder_weights not in ("imagenet", "none"):
        args.encoder_weights = str(Path(args.encoder_weights).resolve())

    if args.stage:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        out = globals()[f"stage_{args.stage}"](args)
        out["peak_rss_mb"] = _peak_mb()
        print("RESULT " + json.dumps(out))
        return

    argv = [a for a in sys.argv[1:]]
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}",
           "command": "python scripts/benchmark.py " + " ".join(argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "stages": {}}
    for s in args.stages.split(","):
        t = time.perf_counter()
        res["stages"][s] = _run_stage(s, argv)
        res["stages"][s]["stage_seconds"] = time.perf_counter() - t
        print(f"{s}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
    gpu = res["stages"].get("train", {}).get("hardware")
    if gpu:
        res["machine"] += f" ({gpu})"
    print(f"machine: {res['machine']}\n")
    print(_table(res))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
