"""Training on a TF_CONFIG cluster: two worker processes on 127.0.0.1, CPU, tiny data.

Each worker runs the same `build_pack` with its own TF_CONFIG, as `capkit
build-pack --strategy multiworker` does on each machine; they share one packs
folder here, as machines sharing a network folder would.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import TINY_DECODER, TINY_ENCODER, TINY_TRAIN, build_tiny_pack

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    from pathlib import Path

    from toolkit.config import DecoderConfig, EncoderConfig, TrainConfig
    from toolkit.pipeline import Report, build_pack
    from toolkit import train

    args = json.loads(sys.argv[1])
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    data = {k: Path(v) for k, v in args["data"].items()}
    real_loop = train.custom_loop

    def digest(model):
        return hashlib.sha256(b"".join(w.tobytes() for w in model.get_weights())).hexdigest()[:16]

    def loop(model, strategy, *a, **kw):  # what each worker holds when training starts, after any resume
        print("START", json.dumps({"task": task, "weights": digest(model),
                                   "optimizer": digest(type("O", (), {"get_weights": lambda s: [v.numpy() for v in model.optimizer.variables]})())}),
              flush=True)
        real_loop(model, strategy, *a, **kw)

    train.custom_loop = loop

    def events(kind, **f):
        if kind == "epoch":
            print("EPOCH", json.dumps({"task": task, **f}), flush=True)
            if args.get("kill_at") == f["epoch"] and task == args.get("kill_task"):
                os.kill(os.getpid(), 9)  # killed mid-training, as by a lost machine

    r = build_pack("en", data["captions_en"], data["images"],
                   {"train": data["train"], "dev": data["dev"], "test": data["test"]}, Path(args["packs"]),
                   encoder_config=EncoderConfig(**args["encoder"]), decoder_config=DecoderConfig(**args["decoder"]),
                   train_config=TrainConfig(**args["train"], strategy="multiworker"), report=Report(events))
    print("RESULT", json.dumps({"task": task, "chief": r.chief, "pack": str(r.pack_dir), "training": r.manifest.get("training")}))
""")
# No dropout: each replica draws its own masks, noise that hides what is compared here.
DECODER = {**TINY_DECODER, "dropout": 0.0}
# 160 train captions in batches of 53: the last batch holds one, and one worker's share of it is empty.
TRAIN = {**TINY_TRAIN, "epochs": 4, "patience": 10, "batch_size": 53}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _start(tiny_dataset, packs: Path, ports: list[int], **extra) -> list[subprocess.Popen]:
    args = {"data": {k: str(v) for k, v in tiny_dataset.items()}, "packs": str(packs), "encoder": TINY_ENCODER,
            "decoder": DECODER, "train": TRAIN, **extra}
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(len(ports)):
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(args)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def _lines(out: str, tag: str) -> list[dict]:
    return [json.loads(l[len(tag) + 1:]) for l in out.splitlines() if l.startswith(tag + " ")]


def _finish(procs, timeout=300) -> list[str]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def test_two_workers_train_like_one_and_resume_after_a_kill(tiny_dataset, tmp_path):
    one = build_tiny_pack("en", tiny_dataset, tmp_path / "one", decoder=DECODER, train=TRAIN)
    one_losses = [h["loss"] for h in json.loads((one.pack_dir / "history.json").read_text())]

    # 1. Two workers, uninterrupted.
    outs = _finish(_start(tiny_dataset, tmp_path / "two", _free_ports(2)))
    results = [_lines(o, "RESULT")[0] for o in outs]
    assert [r["chief"] for r in results] == [True, False]
    packs = tmp_path / "two"
    assert sorted(p.name for p in packs.iterdir() if not p.name.startswith(".")) == ["en"]  # installed once
    assert not list(packs.glob(".staging-*")) and not list((packs / ".work").glob("*"))
    manifest = json.loads((packs / "en" / "manifest.json").read_text())
    assert manifest["train"]["strategy"] == "multiworker"
    two_losses = [h["loss"] for h in json.loads((packs / "en" / "history.json").read_text())]
    # Every worker saw every epoch with the same losses (all-reduced), though each read half of each batch.
    per_task = [[e["loss"] for e in _lines(o, "EPOCH")] for o in outs]
    assert per_task[0] == per_task[1] == two_losses and all(math.isfinite(x) for x in two_losses)
    print("one worker", one_losses, "two workers", two_losses)
    assert len(two_losses) == len(one_losses) == 4 and two_losses[-1] < two_losses[0]
    # As MirroredStrategy on two devices (tests/test_distribute.py): each worker averages the loss over its
    # half-batch's tokens, so the curves differ slightly; a doubled or undivided step would differ by far more.
    for a, b in zip(one_losses, two_losses):
        assert abs(a - b) <= 0.02 * a, (one_losses, two_losses)

    # 2. The second worker is killed after epoch 2; the chief, its peer gone, is stopped too; both restart.
    packs = tmp_path / "resumed"
    chief, worker = _start(tiny_dataset, packs, _free_ports(2), kill_at=2, kill_task=1)
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == -signal.SIGKILL, err[-3000:]
    state_file = next((packs / ".work").glob("en-*")) / "state.json"
    deadline = time.time() + 60
    while time.time() < deadline and json.loads(state_file.read_text() if state_file.exists() else "{}").get("epoch", 0) < 2:
        time.sleep(0.2)
    chief.kill()
    chief.communicate()
    saved = json.loads(state_file.read_text())
    assert saved["epoch"] == 2 and not (packs / "en").exists()
    outs = _finish(_start(tiny_dataset, packs, _free_ports(2)))
    starts = [_lines(o, "START")[0] for o in outs]
    assert starts[0]["weights"] == starts[1]["weights"] and starts[0]["optimizer"] == starts[1]["optimizer"]
    assert [e["epoch"] for e in _lines(outs[1], "EPOCH")] == [3, 4]  # the worker, too, went on from epoch 3
    history = json.loads((packs / "en" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[:2] == saved["history"]
    assert history[:2] == [{**h, "seconds": history[i]["seconds"]} for i, h in enumerate(
        json.loads((tmp_path / "two" / "en" / "history.json").read_text())[:2])]  # the same first epochs
    resumed = [h["loss"] for h in history]
    # After the resume the shuffles start again from the first epoch's (as fit's do), so the last
    # epochs see other batches than the uninterrupted run: close, not equal.
    for a, b in zip(two_losses, resumed):
        assert abs(a - b) <= 0.02 * a, (two_losses, resumed)
