"""Training throughput of every decoder on the full split's real cached features, against this CPU's sgemm rate.

Each measurement runs in a subprocess of its own, so its peak resident memory
(`ru_maxrss`) is its own:

- sgemm: numpy float32 matrix products (n x n by n x n, best of several), with
  OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from that process's
  environment only, and the BLAS kernel threadpoolctl reports;
- train DECODER: the real training path (`toolkit.decoder.training_model` and
  `training_dataset`, Keras `fit`) over the train split's cached features
  (English captions, the tokenizer a build would train), `--steps` timed
  steps after `--warmup` untimed ones (tracing, first reads). Captions per
  second, seconds per epoch (all train captions at that rate), peak memory,
  and the step's FLOPs: the matrix products of the forward pass, counted
  from the layer shapes and the batches' padded lengths, times 3 for the
  backward pass (`step_flops`), over the measured time, as a fraction of
  sgemm's rate;
- scale: the `lstm` decoder on synthetic memory-mapped features, at the full
  split's size and at COCO's (120,000 photos, 600,000 captions), the same
  number of steps: time per caption and peak memory as the data grows 20x.

    python scripts/benchmark_train.py --packs-dir runs/full [--decoders lstm,attention,merge] [--steps 100]
    python scripts/benchmark_train.py --scale [--steps 300]

The packs dir must hold one encoder whose cache has the train and dev photos
(`capkit encode --grid --images ../shared/data/flickr8k/Images224 ...`).
Writes runs/benchmark_train.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _fullsplit import full_split  # noqa: E402
DECODER_NAMES = ("lstm", "attention", "merge")
COCO_IMAGES, CAPTIONS_PER_IMAGE = 120_000, 5


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# -- sgemm --------------------------------------------------------------------------------------------------------


def measure_sgemm(n: int = 2048, repeats: int = 8) -> dict:
    import numpy as np
    from threadpoolctl import threadpool_info

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    a @ b  # warm the threads
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    # The shapes the lstm step is made of: its recurrent step (64 captions x [embedding, h] x 4 gates of 512)
    # and its head over the whole batch (64 x 15 tokens x 512 -> 2,000): what a product of that size gets.
    shapes = {}
    for m, k, n_ in ((64, 768, 2048), (64 * 15, 512, 2000)):
        x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n_), np.float32)
        reps = max(1, int(2e9 // (2 * m * k * n_)))
        t = min(_timed(lambda: [x @ w for _ in range(reps)]) for _ in range(repeats))
        shapes[f"{m}x{k}x{n_}"] = 2 * m * k * n_ * reps / t / 1e9
    return {"gflops": 2 * n**3 / best / 1e9, "n": n, "numpy": np.__version__, "shapes": shapes,
            "blas": [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")} for i in blas]}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# -- FLOPs --------------------------------------------------------------------------------------------------------


def step_flops(cfg, n_captions: int, n_images: int, padded_len: float, grid_cells: int, real_len: float | None = None) -> float:
    """Matrix-product FLOPs of one training step (forward x 3): `n_captions` captions of `padded_len` tokens.

    Per token, every decoder runs its LSTM gates ((input + U) x 4U) and the
    head (U, 2U or, with deep output, 2U x E + E, x vocab); attention adds
    the query (U x A, A the attention's width), the scores (P x A) and the
    context (P x U); dot-product scores over a batch of images run m*P x
    (A + U) against all of its m images at once. Per image (or per caption
    where an image's work is done per caption, `n_images == n_captions`):
    the pooled decoders' image layers (2048 x U, twice for lstm),
    attention's projection (P x 2048 x U), keys (P x U x A) and initial
    state (2 x U x U). The
    attention loop and every head run only over real tokens (`real_len`
    each); the attention's embedding share of the gates runs over
    `padded_len`.
    With `attention_feed="output"` there is no such loop: the LSTM, the
    query, the scores and the context (per caption) run over
    `padded_len`.
    Elementwise work (gates' sigmoids, tanh over P x A energies, softmax) is
    not counted: FLOPs here are what sgemm could do.
    """
    U, E, V, D, P = cfg.units, cfg.embed_dim, cfg.vocab_size, cfg.feature_dim, grid_cells
    tokens = n_captions * padded_len
    real = n_captions * (real_len or padded_len)  # the head runs at real tokens only (decoder._on_real_tokens)
    if cfg.architecture == "lstm":
        return 3 * 2 * (tokens * (E + U) * 4 * U + real * U * V + n_images * 2 * D * U)
    if cfg.architecture == "merge":
        return 3 * 2 * (tokens * (E + U) * 4 * U + real * (U * U + U * V) + n_images * D * U)
    A = cfg.attention_width
    head = (2 * U * E + E * V) if cfg.deep_output else 2 * U * V
    per_image = P * D * U + P * U * A + 2 * U * U
    if cfg.attention_feed == "output":  # the LSTM over every padded token, then query, scores and context per token
        per_token = (E + U) * 4 * U + U * A + P * (A + U)
        return 3 * 2 * (tokens * per_token + real * head + n_images * per_image)
    grouped = cfg.attention_score == "dot" and n_images < n_captions
    cells = n_images * P if grouped else P
    per_loop_token = U * A + cells * (A + U) + 2 * U * 4 * U
    return 3 * 2 * (real * (per_loop_token + head) + tokens * E * 4 * U + n_images * per_image)


def batch_shapes(seqs, batch: int, max_length: int, by_image: bool, seed: int = 0) -> tuple[float, float, float]:
    """Mean (padded length, distinct images, real length) of one epoch's batches, planned as `training_dataset` does."""
    import numpy as np

    from toolkit.decoder import batch_plan

    _, inp, _ = seqs.arrays(max_length)
    lengths = (inp != 0).sum(axis=1)
    plan = batch_plan(lengths, batch, np.random.default_rng(seed), seqs.image_index if by_image else None)
    return (float(np.mean([lengths[b].max() for b in plan])),
            float(np.mean([len(np.unique(seqs.image_index[b])) for b in plan])), float(lengths.mean()))


def parse_variant(spec: str):
    """'attention', 'attention/attention_score=additive', 'lstm/batch_size=128' -> (name, DecoderConfig kw, TrainConfig kw)."""
    from dataclasses import fields

    from toolkit.config import DecoderConfig, TrainConfig

    name, *settings = spec.split("/")
    kw = ({}, {})
    for item in settings:
        key, _, value = item.partition("=")
        for i, cls in enumerate((DecoderConfig, TrainConfig)):
            f = next((f for f in fields(cls) if f.name == key), None)
            if f is not None:
                default = getattr(cls, key)
                kw[i][key] = (value.lower() in ("1", "true")) if isinstance(default, bool) else type(default)(value)
                break
        else:
            sys.exit(f"{spec}: {key} is no DecoderConfig or TrainConfig field")
    return name, kw[0], kw[1]


# -- one decoder on the real features -----------------------------------------------------------------------------


def _time_fit(model, ds, warmup: int, steps: int) -> float:
    import keras

    marks: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            marks.append(time.perf_counter())

    model.fit(ds.take(warmup + steps), epochs=1, verbose=0, callbacks=[Clock()], shuffle=False)
    return marks[-1] - marks[warmup - 1]


def measure_decoder(spec: str, packs_dir: Path, steps: int, warmup: int) -> dict:
    from toolkit.config import DecoderConfig, TrainConfig
    from toolkit.decoder import batches_by_image, training_dataset, training_model

    name, dec_kw, train_kw = parse_variant(spec)
    grid = name == "attention"
    t0 = time.perf_counter()
    train_f, train_s, _, _, tok, cells, _, _ = full_split(packs_dir, "en", grid)
    load_s = time.perf_counter() - t0
    cfg = DecoderConfig(architecture=name, vocab_size=tok.vocab_size, **dec_kw)
    tr = TrainConfig(**train_kw)
    model = training_model(cfg, tr, train_f)
    ds = training_dataset(train_f, train_s, cfg, tr.batch_size, shuffle=True, seed=tr.seed)
    by_image = batches_by_image(cfg)
    seconds = _time_fit(model, ds, warmup, steps)
    n_caps = len(train_s.tokens)
    captions_per_s = steps * tr.batch_size / seconds
    padded, images, real = batch_shapes(train_s, tr.batch_size, cfg.max_length, by_image)
    flops = step_flops(cfg, tr.batch_size, images if by_image else tr.batch_size, padded, cells, real)
    return {"decoder": spec, "train_captions": n_caps, "train_images": int(train_s.image_index.max() + 1),
            "vocab": tok.vocab_size, "batch": tr.batch_size, "steps": steps, "seconds": seconds,
            "captions_per_s": captions_per_s, "seconds_per_epoch": n_caps / captions_per_s,
            "padded_len": padded, "real_len": real, "images_per_batch": images, "per_image_work_once": by_image,
            "step_gflop": flops / 1e9, "gflops": flops * steps / seconds / 1e9,
            "features_in_memory": not hasattr(train_f, "keys"), "load_seconds": load_s, "peak_rss_mb": _peak_mb()}


# -- scale: synthetic memory-mapped features ----------------------------------------------------------------------


def measure_scale(n_images: int, steps: int, warmup: int) -> dict:
    """lstm training steps over `n_images` synthetic photos (5 captions each), features memory-mapped."""
    import numpy as np

    from toolkit.config import DecoderConfig, TrainConfig
    from toolkit.decoder import Sequences, training_dataset, training_model
    from toolkit.encoder import FEATURE_DIM, FeatureCache

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=ROOT / "runs") as tmp:
        cache = FeatureCache(Path(tmp), FEATURE_DIM, scale=1.0)
        keys = [f"{i:064x}" for i in range(n_images)]
        for i in range(0, n_images, 4096):  # written in blocks, as extraction would
            block = keys[i:i + 4096]
            cache.add(block, rng.random((len(block), FEATURE_DIM), np.float32))
        view = _cache_view(cache, keys)
        n_caps = n_images * CAPTIONS_PER_IMAGE
        lengths = rng.integers(8, 20, n_caps)
        tokens = [list(rng.integers(4, 2000, k)) for k in lengths]
        seqs = Sequences(np.repeat(np.arange(n_images, dtype=np.int32), CAPTIONS_PER_IMAGE), tokens)
        cfg, tr = DecoderConfig(vocab_size=2000), TrainConfig()
        model = training_model(cfg, tr, view)
        ds = training_dataset(view, seqs, cfg, tr.batch_size, shuffle=True, seed=0)
        seconds = _time_fit(model, ds, warmup, steps)
        return {"images": n_images, "captions": n_caps, "steps": steps, "seconds": seconds,
                "ms_per_caption": 1e3 * seconds / (steps * tr.batch_size),
                "feature_bytes_on_disk": n_images * FEATURE_DIM * 2, "peak_rss_mb": _peak_mb()}


def _cache_view(cache, keys):
    from toolkit.encoder import FEATURE_DIM, FeatureView

    return FeatureView(lambda ks: cache.get(ks), keys, (FEATURE_DIM,))


# -- driver -------------------------------------------------------------------------------------------------------


def _run(argv: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(res: dict) -> str:
    s = res["sgemm"]
    rows = ["| decoder | captions/s | s/epoch (30k captions) | step GFLOP | GFLOP/s | of sgemm | peak RSS |",
            "|---|---|---|---|---|---|---|"]
    for d in res.get("decoders", []):
        rows.append(f"| {d['decoder']} | {d['captions_per_s']:.0f} | {d['seconds_per_epoch']:.0f} | {d['step_gflop']:.1f} | "
                    f"{d['gflops']:.1f} | {d['gflops'] / s['gflops']:.0%} | {d['peak_rss_mb'] / 1024:.2f} GB |")
    kernel = ", ".join(f"{b['internal_api']} {b['version']} {b['architecture']} x{b['num_threads']}" for b in s["blas"])
    rows.append(f"\nsgemm ({s['n']}^3, numpy {s['numpy']}, {kernel}): {s['gflops']:.0f} GFLOP/s; "
                + ", ".join(f"{k}: {v:.0f}" for k, v in s.get("shapes", {}).items()))
    for sc in res.get("scale", []):
        rows.append(f"scale: {sc['images']:,} images / {sc['captions']:,} captions: {sc['ms_per_caption']:.2f} ms per caption, "
                    f"peak RSS {sc['peak_rss_mb'] / 1024:.2f} GB")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packs-dir", type=Path, default=ROOT / "runs" / "full")
    ap.add_argument("--decoders", default=",".join(DECODER_NAMES),
                    help="comma-separated NAME[/FIELD=VALUE...], a DecoderConfig or TrainConfig field, "
                         "e.g. attention/attention_score=additive,lstm/batch_size=128")
    ap.add_argument("--steps", type=int, default=100, help="timed training steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps first (tracing, first reads)")
    ap.add_argument("--scale", action="store_true", help="the synthetic 1x / 20x scaling runs instead of the decoders")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmark_train.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a child: one measurement, JSON on the last line
        kind, _, what = args.one.partition(":")
        if kind == "sgemm":
            res = measure_sgemm()
        elif kind == "scale":
            res = measure_scale(int(what), args.steps, args.warmup)
        else:
            res = measure_decoder(what, args.packs_dir, args.steps, args.warmup)
        print(json.dumps(res))
        return
    common = ["--packs-dir", str(args.packs_dir), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    clean = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    res = {"sgemm": _run(["--one", "sgemm"], env=clean)}
    if args.scale:
        res["scale"] = [_run([*common, "--one", f"scale:{n}"]) for n in (COCO_IMAGES // 20, COCO_IMAGES)]
    else:
        res["decoders"] = [_run([*common, "--one", f"train:{d}"]) for d in args.decoders.split(",")]
    res["sgemm_after"] = _run(["--one", "sgemm"], env=clean)  # the machine is shared: was the rate steady?
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"sgemm after: {res['sgemm_after']['gflops']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
