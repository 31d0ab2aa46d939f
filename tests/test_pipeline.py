"""The whole path on tiny generated data: build, caption, evaluate, and the packs they leave."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from conftest import TINY_TRAIN, build_tiny_pack
from toolkit.errors import CapkitError
from toolkit.pack import MANIFEST_FILE, PACK_FILES, installed_packs, load_manifest, verify_files


def test_build_writes_a_complete_verified_pack(tiny_packs):
    assert set(installed_packs(tiny_packs)) == {"en", "zh"}
    for lang in ("en", "zh"):
        m = load_manifest(tiny_packs / lang)
        assert m["lang"] == lang and m["format_version"] == 1
        assert set(m["files"]) == set(PACK_FILES)
        assert verify_files(tiny_packs / lang, m) == []
        assert m["data"]["n_train_images"] == 32 and m["data"]["n_train_captions"] == 160
        assert {"dev", "test"} <= set(m["scores"])
        for system in ("model", "retrieval", "constant"):
            assert 0 <= m["scores"]["dev"][system]["bleu4"] <= 100
        assert m["scores"]["dev"]["model"]["tokenization"] == ("chars" if lang == "zh" else "words")
        assert len(m["training"]) and m["training"]["epochs_run"] >= 1
    # Both packs share one encoder, stored once.
    assert load_manifest(tiny_packs / "en")["encoder"] == load_manifest(tiny_packs / "zh")["encoder"]
    assert len(list((tiny_packs / ".encoders").iterdir())) == 1


def test_second_language_extracts_no_features(tiny_packs, tiny_dataset):
    from toolkit.pipeline import Report

    events = []
    build_tiny_pack("zh", tiny_dataset, tiny_packs, report=Report(lambda kind, **f: events.append((kind, f))))
    encoded = [f for kind, f in events if kind == "encoded"]
    assert encoded and encoded[0]["extracted"] == 0 and encoded[0]["cached"] == 48


def test_caption_every_language_in_one_encoder_pass(tiny_packs, tiny_dataset):
    from toolkit.pipeline import caption_images

    out = caption_images([tiny_dataset["images"]], ["all"], tiny_packs, beam=2)
    assert len(out.rows) == 2 * 48 and not out.failures
    assert {r["lang"] for r in out.rows} == {"en", "zh"}
    assert all(isinstance(r["caption"], str) for r in out.rows)
    zh = [r["caption"] for r in out.rows if r["lang"] == "zh"]
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in c) for c in zh)


def test_caption_is_deterministic_and_beam1_is_greedy(tiny_packs, tiny_dataset):
    from toolkit.pipeline import caption_images

    imgs = sorted(tiny_dataset["images"].iterdir())[:6]
    a = caption_images(imgs, ["en"], tiny_packs, beam=1).rows
    b = caption_images(imgs, ["en"], tiny_packs, beam=1).rows
    assert a == b


def test_evaluate_matches_pack_scores_and_has_baselines(tiny_packs, tiny_dataset):
    from toolkit.pipeline import evaluate_packs

    # The manifest scored at the default search, so these must too (at beam 3 only a 0.0 BLEU-4 would match).
    res = evaluate_packs(["en", "zh"], tiny_packs, tiny_dataset["images"], tiny_dataset["test"])
    for r in res:
        m = load_manifest(tiny_packs / r["lang"])
        assert r["bleu4"] == pytest.approx(m["scores"]["test"]["model"]["bleu4"], abs=1e-6)
        assert r["cider_d"] == pytest.approx(m["scores"]["test"]["model"]["cider_d"], abs=1e-6)
        assert r["n_images"] == 8 and r["n_references"] == 40
        assert r["baselines"]["retrieval"]["bleu4"] == pytest.approx(m["scores"]["test"]["retrieval"]["bleu4"], abs=1e-6)
        assert r["baselines"]["retrieval"]["cider_d"] == pytest.approx(m["scores"]["test"]["retrieval"]["cider_d"], abs=1e-6)
        assert "constant" in r["baselines"]


def test_pack_refuses_a_different_encoder(tiny_packs, tmp_path):
    from toolkit.pipeline import load_pack

    with pytest.raises(CapkitError, match="trained with encoder"):
        load_pack(tiny_packs, "en", encoder_id="xception-299-000000000000")


def test_missing_pack_lists_installed(tiny_packs):
    from toolkit.pipeline import load_pack

    with pytest.raises(CapkitError) as e:
        load_pack(tiny_packs, "tr")
    assert "en" in e.value.hint and "zh" in e.value.hint


def test_build_refuses_zero_train_images(tiny_dataset, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    data = dict(tiny_dataset, images=empty)
    with pytest.raises(CapkitError, match="no train image"):
        build_tiny_pack("en", data, tmp_path / "packs")


def test_missing_images_are_counted_and_skipped(tiny_dataset, tmp_path):
    images = tmp_path / "Images"
    shutil.copytree(tiny_dataset["images"], images)
    gone = sorted(images.iterdir())[:5]
    for p in gone:
        p.unlink()
    res = build_tiny_pack("en", dict(tiny_dataset, images=images), tmp_path / "packs", train=dict(epochs=1))
    assert res.manifest["data"]["n_missing_images"] == 5
    assert any("5 images" in w for w in res.warnings)
    from toolkit.build import STAGES

    stages = res.manifest["stage_seconds"]  # what the CLI prints as the build's stage times
    assert list(stages) == list(STAGES) and all(v >= 0 for v in stages.values())
    assert sum(stages.values()) <= res.manifest["build_seconds"] + 0.5


def test_interrupted_training_resumes_from_checkpoint(tiny_dataset, tmp_path):
    """Ctrl-C during epoch 2; the same build resumes at epoch 2, not 1."""
    from toolkit.pipeline import Report

    def stop_after_first_epoch(kind, **f):
        if kind == "epoch" and f["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_tiny_pack("en", tiny_dataset, tmp_path / "packs", report=Report(stop_after_first_epoch))
    assert not (tmp_path / "packs" / "en").exists()
    epochs = []
    build_tiny_pack("en", tiny_dataset, tmp_path / "packs",
                    report=Report(lambda kind, **f: kind == "epoch" and epochs.append(f["epoch"])))
    assert epochs[0] == 2
    assert (tmp_path / "packs" / "en" / MANIFEST_FILE).is_file()
    assert not (tmp_path / "packs" / ".work").exists() or not any((tmp_path / "packs" / ".work").iterdir())


def test_features_are_normalised_inside_the_decoder(tiny_packs):
    """Random-init features are ~1e-5 and alike; the decoder's Normalization layer carries train stats."""
    from toolkit.pipeline import load_pack

    pack = load_pack(tiny_packs, "en")
    norm = pack.step.decoder.norm
    mean = np.asarray(norm.mean).ravel()
    assert mean.shape == (2048,) and np.abs(mean).max() < 1.0 and np.abs(mean).max() > 0


def test_translated_build_writes_a_quality_report_beside_the_cache(tiny_dataset, tmp_path):
    """file: translations (zh aligned to en by id) go through the translation stage and report on themselves."""
    import json as _json

    from conftest import TINY_DECODER, TINY_ENCODER
    from toolkit.config import DecoderConfig, EncoderConfig, TrainConfig
    from toolkit.pipeline import build_pack

    d = tiny_dataset
    res = build_pack("zh", d["captions_en"], d["images"], {"train": d["train"], "dev": d["dev"]}, tmp_path,
                     source_lang="en", translator=f"file:{d['captions_zh']}",
                     encoder_config=EncoderConfig(**TINY_ENCODER), decoder_config=DecoderConfig(**TINY_DECODER),
                     train_config=TrainConfig(epochs=1))
    assert res.manifest["data"]["translator"].startswith("file:")
    # Left at its default, the build fine-tunes on CIDEr-D after teacher forcing, and the manifest says how long.
    assert res.manifest["train"]["self_critical_epochs"] == 5 and res.manifest["stage_seconds"]["self-critical"] > 0
    assert [h["epoch"] for h in res.manifest["training"]["self_critical"]["history"]] == [0, 1, 2, 3, 4, 5]  # 0: before
    report = tmp_path / ".cache" / "zh-file-captions.zh.txt.quality.json"
    assert _json.loads(report.read_text())
    # The pack's captions are the Chinese ones, aligned by id.
    text = (res.pack_dir / "captions.txt").read_text(encoding="utf-8")
    assert "背景" in text and "background" not in text


def test_evaluate_all_skips_packs_without_references(tiny_packs, tiny_dataset, tmp_path):
    from toolkit.pipeline import Report, evaluate_packs

    packs = tmp_path / "packs"
    shutil.copytree(tiny_packs, packs)
    (packs / "zh" / "references.txt").unlink()
    rep = Report()
    res = evaluate_packs(["all"], packs, tiny_dataset["images"], tiny_dataset["test"], report=rep)
    assert [r["lang"] for r in res] == ["en"]
    assert any(w.startswith("zh:") for w in rep.warnings)
    with pytest.raises(CapkitError):
        evaluate_packs(["zh"], packs, tiny_dataset["images"], tiny_dataset["test"])


@pytest.mark.parametrize("architecture", ["lstm", "attention"])
def test_training_from_the_memory_map_matches_training_from_memory(tiny_dataset, tmp_path, monkeypatch, architecture):
    """Above a size threshold features are read batch by batch from the cache's memory map; same losses."""
    import toolkit.build as build

    dense = build_tiny_pack("en", tiny_dataset, tmp_path / "a", train=dict(epochs=2),
                            decoder=dict(architecture=architecture))
    monkeypatch.setattr(build, "IN_MEMORY_FEATURES_BYTES", 0)
    lazy = build_tiny_pack("en", tiny_dataset, tmp_path / "b", train=dict(epochs=2),
                           decoder=dict(architecture=architecture))
    a = [h["loss"] for h in json.loads((dense.pack_dir / "history.json").read_text())]
    b = [h["loss"] for h in json.loads((lazy.pack_dir / "history.json").read_text())]
    # The same rows in the same order; only float rounding may differ (summation order in the kernels
    # depends on the buffers' layout). On an Intel AVX-512 CPU the attention decoder's losses differed,
    # every run alike, by 1e-5 relative after one epoch and 1.9e-4 after two: rounding, compounded by
    # training. The first epoch, before much compounding, is held to the tighter bound.
    np.testing.assert_allclose(a[0], b[0], rtol=1e-4)
    np.testing.assert_allclose(a, b, rtol=1e-3)


def test_feature_view_reads_rows_lazily(tiny_packs, tiny_dataset):
    from toolkit.encoder import Encoder

    enc = Encoder.load(tiny_packs, load_manifest(tiny_packs / "en")["encoder"]["id"])
    imgs = sorted(tiny_dataset["images"].iterdir())[:4]
    ex = enc.extract(imgs)
    keys = [ex.keys[str(p)] for p in imgs]
    view = enc.features_view(keys)
    assert view.shape == (4, 2048) and len(view) == 4
    np.testing.assert_array_equal(view[[2, 0]], enc.features([keys[2], keys[0]]))
    assert sum(len(c) for c in view.chunks(3)) == 4


def test_self_critical_epochs_fine_tune_after_the_teacher_forced_checkpoint(tiny_dataset, tmp_path):
    """Ctrl-C in the self-critical stage: the rerun trains no teacher-forced epoch again, and the manifest says what ran."""
    from toolkit.pipeline import Report

    def stop_in_self_critical(kind, **f):
        if kind == "progress" and f["stage"] == "self-critical":
            raise KeyboardInterrupt

    sc = {"self_critical_epochs": 2, "self_critical_batch": 8}
    with pytest.raises(KeyboardInterrupt):
        build_tiny_pack("en", tiny_dataset, tmp_path / "packs", train=sc, report=Report(stop_in_self_critical))
    events = []
    result = build_tiny_pack("en", tiny_dataset, tmp_path / "packs", train=sc,
                             report=Report(lambda kind, **f: events.append((kind, f.get("epoch")))))
    assert ("epoch", 1) not in events  # the teacher-forced run resumed finished
    assert [e for k, e in events if k == "self_critical_epoch"] == [1, 2]
    m = load_manifest(result.pack_dir)
    done = m["training"]["self_critical"]
    assert done["epoch"] == 2 and [h["epoch"] for h in done["history"]] == [0, 1, 2]
    assert done["best_epoch"] == max(done["history"], key=lambda h: h["dev_cider_d"])["epoch"]
    assert m["train"]["self_critical_epochs"] == 2
    assert result.manifest["stage_seconds"]["self-critical"] > 0
    card = (result.pack_dir / "README.md").read_text()
    assert "then 2 epochs of self-critical training" in card and f"({done['best_epoch']})" in card


def test_self_critical_epochs_added_to_a_finished_build_reuse_its_installed_decoder(tiny_dataset, tmp_path):
    """The checkpoints went when the pack was installed; its decoder is the teacher-forced result, so none is retrained."""
    from toolkit.pipeline import Report

    first = build_tiny_pack("en", tiny_dataset, tmp_path / "packs")
    events = []
    result = build_tiny_pack("en", tiny_dataset, tmp_path / "packs",
                             train={"self_critical_epochs": 1, "self_critical_dropout": False,
                                    "self_critical_reward": "cider-d+bleu4"},
                             report=Report(lambda kind, **f: events.append(kind)))
    assert "reused" in events and "epoch" not in events and events.count("self_critical_epoch") == 1
    m = load_manifest(result.pack_dir)
    assert m["train"]["self_critical_dropout"] is False  # a fine-tuning setting: the teacher-forced run is the same
    assert m["train"]["self_critical_reward"] == "cider-d+bleu4"
    assert {"dev_cider_d", "dev_bleu4"} <= set(m["training"]["self_critical"]["history"][1])
    card = (result.pack_dir / "README.md").read_text()
    assert "no dropout" in card and "self-critical training on CIDEr-D + sentence BLEU-4" in card
    assert re.search(r"greedy dev captions' CIDEr-D [\d.]+ before, [\d.]+, BLEU-4 [\d.]+ before, [\d.]+ at the epoch "
                     r"kept", card)  # the kept epoch was chosen on BLEU-4 too: the card shows it
    assert m["training"]["epochs_run"] == first.manifest["training"]["epochs_run"]
    assert m["training"]["run_key"] == first.manifest["training"]["run_key"]
    # A larger epoch limit asks for more than the installed decoder had: trained (its checkpoints went with the
    # install, so from the start).
    build_tiny_pack("en", tiny_dataset, tmp_path / "more")
    events.clear()
    build_tiny_pack("en", tiny_dataset, tmp_path / "more", train={"self_critical_epochs": 1, "epochs": TINY_TRAIN["epochs"] + 1},
                    report=Report(lambda kind, **f: events.append(kind)))
    assert "reused" not in events and "epoch" in events
    # Now fine-tuned, the pack no longer holds teacher-forced weights: another change trains again.
    events.clear()
    build_tiny_pack("en", tiny_dataset, tmp_path / "packs", train={"self_critical_epochs": 2},
                    report=Report(lambda kind, **f: events.append(kind)))
    assert "reused" not in events and "epoch" in events
