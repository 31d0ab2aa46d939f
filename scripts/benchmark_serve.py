"""`capkit serve` under load, on loopback: throughput against `capkit caption`, and abuse.

1. throughput: N photos (default 256) sent by C concurrent clients (default
   16), one photo per request, to a `capkit serve` subprocess; images/s and
   p50/p99 request latency, against `caption_images` (what `capkit caption`
   runs) of the same photos in one call in this process, its feature cache
   off so that it encodes them as the server does. Both have their packs
   loaded and their graphs traced before the clock starts. Between them,
   `caption_images` again in calls of C photos, the largest batch C
   clients of one photo each can give the server: what batching alone costs,
   so that the rest of the gap is HTTP and the client threads.
2. load: R requests (default 2,000) from K clients (default 32), a tenth of
   them malformed in every way the server must refuse (not an image,
   truncated, too many pixels, unknown language, broken multipart, too many
   images, an upload over the limit, not multipart, a client that stops
   sending); every answer is checked: no 5xx, each good request answered
   200 with exactly the captions of step 1's reference.

    python scripts/benchmark_serve.py --packs-dir lang_packs --images ../shared/data/flickr8k/Images224
    python scripts/benchmark_serve.py --tiny --images DIR   # builds small packs on synthetic data first
    python scripts/benchmark_serve.py --tiny --tiny-image-size 299 --skip-load ...  # Xception's real input size

Bounded: at most --max-seconds for the load phase; loopback only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BAD_KINDS = ("not_image", "truncated", "too_many_pixels", "unknown_lang", "broken_multipart", "too_many_images",
             "over_upload_limit", "not_multipart", "stops_sending")
SERVER_LIMITS = {"max_images": 8, "max_upload_mb": 5, "max_pixels": 20_000_000, "body_timeout": 2}


def build_tiny_packs(root: Path, image_size: int, langs=("en", "zh")) -> Path:
    """Packs of a random-init Xception at `image_size` px and 32-unit decoders, trained on synthetic shapes."""
    from toolkit.build import build_pack
    from toolkit.config import DecoderConfig, EncoderConfig, TrainConfig
    from toolkit.synthetic import make_dataset

    data = make_dataset(root / "data", n_images=48, image_size=64, dev_fraction=0.17, test_fraction=0.17)
    packs = root / "packs"
    for lang in langs:
        build_pack(lang, data[f"captions_{lang}"], data["images"], {k: data[k] for k in ("train", "dev", "test")}, packs,
                   source_lang=lang, encoder_config=EncoderConfig(weights="none", image_size=image_size, batch_size=16),
                   decoder_config=DecoderConfig(vocab_size=60, units=32, embed_dim=16, dropout=0.1, max_length=16),
                   train_config=TrainConfig(epochs=3, batch_size=32, learning_rate=1e-2, patience=2, self_critical_epochs=0))
    return packs


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))] if xs else float("nan")


def start_server(packs: Path, langs: list[str]) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "toolkit", "serve", "--packs-dir", str(packs), "--port", "0",
            "--max-images", str(SERVER_LIMITS["max_images"]), "--max-upload-mb", str(SERVER_LIMITS["max_upload_mb"]),
            "--max-pixels", str(SERVER_LIMITS["max_pixels"]), "--body-timeout", str(SERVER_LIMITS["body_timeout"])]
    for lang in langs:
        args += ["--lang", lang]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, m.group(1)


def post(client, url: str, files, data=None):
    return client.post(url + "v1/captions", files=files, data=data or {}, timeout=120)


def throughput(url: str, paths: list[Path], langs: list[str], clients: int) -> dict:
    import httpx

    shares = [paths[i::clients] for i in range(clients)]
    latencies: list[float] = []
    answers: dict[str, dict] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(share):
        with httpx.Client() as c:
            barrier.wait()
            for p in share:
                t0 = time.perf_counter()
                r = post(c, url, [("image", (p.name, p.read_bytes(), "image/jpeg"))], {"lang": langs})
                dt = time.perf_counter() - t0
                r.raise_for_status()
                with lock:
                    latencies.append(dt)
                    answers[p.name] = r.json()["results"][0]["captions"]

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, s) for s in shares]
        barrier.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
    return {"images": len(paths), "clients": clients, "seconds": wall, "images_per_s": len(paths) / wall,
            "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99), "answers": answers}


def bad_request(kind: str, url: str, good: bytes, bomb: bytes, client):
    """Send one malformed request; -> (status or None, body text)."""
    one = [("image", ("a.jpg", good, "image/jpeg"))]
    if kind == "stops_sending":
        host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 50000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
                      b"filename=\"a.jpg\"\r\n\r\n" + good[:100])
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        m = re.match(rb"HTTP/1\.1 (\d+)", out)
        return (int(m.group(1)) if m else None), out.decode("utf-8", "replace")
    if kind == "not_image":
        r = post(client, url, [("image", ("notes.txt", b"just text " * 50, "text/plain"))])
    elif kind == "truncated":
        r = post(client, url, [("image", ("cut.jpg", good[: len(good) // 3], "image/jpeg"))])
    elif kind == "too_many_pixels":
        r = post(client, url, [("image", ("bomb.png", bomb, "image/png"))])
    elif kind == "unknown_lang":
        r = post(client, url, one, {"lang": "xx"})
    elif kind == "broken_multipart":
        r = client.post(url + "v1/captions", content=b"\x00garbage" * 100,
                        headers={"content-type": "multipart/form-data; boundary=zz"}, timeout=60)
    elif kind == "too_many_images":
        r = post(client, url, one * (SERVER_LIMITS["max_images"] + 1))
    elif kind == "over_upload_limit":
        r = post(client, url, [("image", ("big.jpg", os.urandom(int((SERVER_LIMITS["max_upload_mb"] + 1) * 2**20)),
                                          "image/jpeg"))])
    elif kind == "not_multipart":
        r = client.post(url + "v1/captions", json={"image": "/etc/passwd"}, timeout=60)
    else:
        raise ValueError(kind)
    return r.status_code, r.text


def load_test(url: str, paths: list[Path], langs: list[str], expected: dict, n_requests: int, clients: int,
              max_seconds: float, seed: int = 0) -> dict:
    import httpx
    from PIL import Image

    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.new("L", (6000, 4000)).save(buf, "PNG")  # 24M pixels in a few kB: over the server's 20M
    bomb = buf.getvalue()
    plan = []
    for i in range(n_requests):
        if i % 10 == 9:
            plan.append(("bad", BAD_KINDS[(i // 10) % len(BAD_KINDS)]))
        else:
            plan.append(("good", rng.sample(paths, rng.choice((1, 1, 1, 2)))))
    rng.shuffle(plan)
    good_bytes = paths[0].read_bytes()
    deadline = time.time() + max_seconds
    stats = {"sent": 0, "good_ok": 0, "good_wrong": [], "bad_4xx": {}, "5xx": [], "unexpected": [], "skipped": 0}
    lock = threading.Lock()

    def worker(items):
        with httpx.Client() as c:
            for kind, what in items:
                if time.time() > deadline:
                    with lock:
                        stats["skipped"] += 1
                    continue
                try:
                    if kind == "good":
                        r = post(c, url, [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in what], {"lang": langs})
                        status, text = r.status_code, r.text
                    else:
                        status, text = bad_request(what, url, good_bytes, bomb, c)
                except httpx.HTTPError as e:  # a refused upload may end its connection before the answer is read
                    status, text = None, f"{type(e).__name__}: {e}"
                with lock:
                    stats["sent"] += 1
                    if status is not None and status >= 500:
                        stats["5xx"].append((kind, what if kind == "bad" else None, status, text[:200]))
                    elif kind == "good":
                        ok = status == 200 and [x["captions"] for x in json.loads(text)["results"]] == \
                            [expected[p.name] for p in what]
                        if ok:
                            stats["good_ok"] += 1
                        else:
                            stats["good_wrong"].append((status, text[:200]))
                    elif status is not None and 400 <= status < 500 and "error" in json.loads(text[text.find("{"):]):
                        stats["bad_4xx"].setdefault(what, {}).setdefault(status, 0)
                        stats["bad_4xx"][what][status] += 1
                    else:
                        stats["unexpected"].append((what, status, text[:200]))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker, plan[i::clients]) for i in range(clients)]:
            f.result()
    stats["seconds"] = time.perf_counter() - t0
    stats["planned"] = n_requests
    stats["good_planned"] = sum(k == "good" for k, _ in plan)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packs-dir", type=Path)
    ap.add_argument("--tiny", action="store_true", help="build small packs on synthetic data in a temporary folder")
    ap.add_argument("--tiny-image-size", type=int, default=71, help="their encoder's input side (299: Xception's own)")
    ap.add_argument("--images", type=Path, required=True, help="folder of photos (at least --n of them)")
    ap.add_argument("--lang", action="append", default=None)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--load-requests", type=int, default=2000)
    ap.add_argument("--load-clients", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=900)
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    from toolkit.captioner import Captioner, caption_images
    from toolkit.images import IMAGE_SUFFIXES
    from toolkit.serve import pack_summary

    tmp = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory(prefix="capkit-bench-serve-")
        packs = build_tiny_packs(Path(tmp.name), args.tiny_image_size)
    elif args.packs_dir:
        packs = args.packs_dir
    else:
        raise SystemExit("give --packs-dir or --tiny")
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.n]
    if len(paths) < args.n:
        raise SystemExit(f"{args.images} has {len(paths)} photos, fewer than --n {args.n}")

    captioner = Captioner(packs, args.lang or ["all"], feature_cache=False).load()
    langs = captioner.langs
    caption_images(paths[:20], langs, packs, captioner=captioner)  # trace the graphs, as the server's warm-up does
    captioner.forget_features()
    t0 = time.perf_counter()
    base = caption_images(paths, langs, packs, captioner=captioner)
    base_s = time.perf_counter() - t0
    captioner.forget_features()
    caption_images(paths[:args.clients], langs, packs, captioner=captioner)  # trace the batch shape too
    captioner.forget_features()
    t0 = time.perf_counter()
    for i in range(0, len(paths), args.clients):
        caption_images(paths[i:i + args.clients], langs, packs, captioner=captioner)
    batched_s = time.perf_counter() - t0
    captioner.forget_features()
    expected: dict[str, dict] = {}
    for r in base.rows:
        expected.setdefault(Path(r["image"]).name, {})[r["lang"]] = {
            "text": r["caption"], "pack_version": captioner.manifests[r["lang"]]["pack_version"]}
    del captioner

    proc, url = start_server(packs, langs)
    try:
        throughput(url, paths[:64], langs, args.clients)  # warm-up: every batch shape the burst will use
        tp = throughput(url, paths, langs, args.clients)
        wrong = [n for n, caps in tp.pop("answers").items() if caps != expected[n]]
        load = None if args.skip_load else load_test(url, paths, langs, expected, args.load_requests, args.load_clients,
                                                     args.max_seconds)
    finally:
        proc.terminate()
        proc.wait(60)

    enc = pack_summary(langs[0], json.loads((packs / langs[0] / "manifest.json").read_text()))["encoder"]
    out = {
        "packs": str(packs) if not args.tiny else f"tiny (synthetic, encoder {args.tiny_image_size} px)",
        "encoder": enc, "langs": langs, "images_dir": str(args.images), "cpus": os.cpu_count(),
        "caption_one_process": {"images": len(paths), "seconds": base_s, "images_per_s": len(paths) / base_s},
        "caption_batches_of_clients": {"images": len(paths), "batch": args.clients, "seconds": batched_s,
                                       "images_per_s": len(paths) / batched_s},
        "serve": tp, "serve_vs_caption": tp["images_per_s"] / (len(paths) / base_s),
        "batches_vs_caption": base_s / batched_s, "serve_vs_batches": batched_s / tp["seconds"], "wrong_captions": wrong,
        "load": load,
    }
    print(f"caption in one process: {len(paths)} images in {base_s:.1f}s = {len(paths) / base_s:.1f} images/s")
    print(f"caption in calls of {args.clients}: {batched_s:.1f}s = {len(paths) / batched_s:.1f} images/s "
          f"({out['batches_vs_caption']:.2f} of one call)")
    print(f"serve, {args.clients} clients: {tp['seconds']:.1f}s = {tp['images_per_s']:.1f} images/s "
          f"({out['serve_vs_caption']:.2f} of caption, {out['serve_vs_batches']:.2f} of calls of {args.clients}), p50 {tp['p50_s'] * 1000:.0f} ms, p99 {tp['p99_s'] * 1000:.0f} ms; "
          f"{len(wrong)} captions differ from caption's")
    if load:
        print(f"load: {load['sent']} of {load['planned']} requests in {load['seconds']:.0f}s; good {load['good_ok']}/"
              f"{load['good_planned']} right; 5xx {len(load['5xx'])}; wrong {len(load['good_wrong'])}; "
              f"unexpected {len(load['unexpected'])}; refused: " +
              ", ".join(f"{k} {v}" for k, v in sorted(load["bad_4xx"].items())))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, ensure_ascii=False, default=str))
    if tmp:
        tmp.cleanup()
    bad = wrong or (load and (load["5xx"] or load["good_wrong"] or load["unexpected"]))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
