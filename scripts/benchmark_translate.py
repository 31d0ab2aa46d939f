"""Translation-stage benchmark against a local LibreTranslate look-alike (no internet).

Translates every caption of Flickr8k.token.txt (40,460) to Spanish through
the real `libre` back end (deep-translator's LibreTranslator) twice, with a
fresh cache: requests per caption, captions per second, and the second
run's requests (must be 0, everything cached). Optionally injects faults.

    python scripts/benchmark_translate.py [--captions PATH] [--delay 0.005] [--faults 429,500]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    from libre_server import LibreServer

    from toolkit.data import read_captions
    from toolkit.translate import translate_captions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=Path, default=ROOT.parent / "shared/data/flickr8k/Flickr8k.token.txt")
    ap.add_argument("--delay", type=float, default=0.005, help="server seconds per request (a fast LAN server)")
    ap.add_argument("--faults", default="", help="comma list of 429,500,hang,drop,lines each injected 3 times (retries absorb them)")
    ap.add_argument("--json", type=Path, default=ROOT / "runs" / "benchmark_translate.json")
    args = ap.parse_args()

    caps = read_captions(args.captions).captions
    rows = {}
    with LibreServer(delay=args.delay, hang_seconds=2.0) as server, tempfile.TemporaryDirectory() as tmp:
        for fault in filter(None, args.faults.split(",")):
            server.fail(fault, times=3)
        for run in ("first", "second"):
            before = server.requests
            t = time.perf_counter()
            out, rep = translate_captions(caps, source="en", target="es", translator="libre", url=server.url,
                                          cache_path=Path(tmp) / "cache.sqlite", timeout=1.0, retry_delay=0.05)
            secs = time.perf_counter() - t
            rows[run] = {
                "captions": rep.n_captions, "unique": rep.n_unique, "cached": rep.n_cached,
                "requests": server.requests - before, "requests_per_caption": (server.requests - before) / len(caps),
                "seconds": round(secs, 2), "captions_per_second": round(len(caps) / secs, 1),
                "failed": len(rep.failed),
            }
    print(f"{'run':7} {'captions':>8} {'unique':>7} {'cached':>7} {'requests':>8} {'req/caption':>11} {'seconds':>8} {'captions/s':>10}")
    for run, r in rows.items():
        print(f"{run:7} {r['captions']:8d} {r['unique']:7d} {r['cached']:7d} {r['requests']:8d} "
              f"{r['requests_per_caption']:11.4f} {r['seconds']:8.2f} {r['captions_per_second']:10.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"server_delay_s": args.delay, "faults": args.faults, **rows}, indent=1))
    print(f"written {args.json}")


if __name__ == "__main__":
    main()
