"""The training recipe's pieces: the caption loss with label smoothing, the merge reference decoder, search settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import build_tiny_pack


def test_caption_loss_is_masked_cross_entropy_and_smooths_labels():
    import keras
    import tensorflow as tf

    from toolkit.decoder import CaptionLoss

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, (4, 7))
    ids[:, 5:] = 0
    ids[0, 2:] = 0
    logits = tf.constant(rng.normal(size=(4, 7, 30)) * 3, tf.float32)
    builtin = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)(ids, logits)
    assert float(CaptionLoss()(ids, logits)) == pytest.approx(float(builtin), rel=1e-6)

    # Smoothing s: cross-entropy against (1 - s) one-hot + s / vocab, averaged over real tokens only.
    s = 0.2
    logp = tf.nn.log_softmax(logits).numpy()
    target = (1 - s) * np.eye(30)[ids] + s / 30
    per_token = -(target * logp).sum(-1)
    mask = ids != 0
    assert float(CaptionLoss(s)(ids, logits)) == pytest.approx(per_token[mask].mean(), rel=1e-5)
    # Padding never counts: changing the logits of padded positions changes nothing.
    noisy = logits.numpy().copy()
    noisy[~mask] += rng.normal(size=noisy[~mask].shape) * 10
    assert float(CaptionLoss(s)(ids, noisy)) == pytest.approx(float(CaptionLoss(s)(ids, logits)), rel=1e-6)


def test_merge_decoder_steps_as_it_trains_and_round_trips(tmp_path):
    import tensorflow as tf

    from toolkit.config import DecoderConfig, TrainConfig
    from toolkit.decoder import MergeDecoder, load_decoder, save_decoder, train_decoder
    from toolkit.decoder import Sequences

    rng = np.random.default_rng(1)
    feats = rng.normal(size=(12, 8)).astype(np.float32)
    seqs = Sequences(np.arange(24, dtype=np.int32) % 12, [list(rng.integers(4, 20, size=rng.integers(2, 7))) for _ in range(24)])
    cfg = DecoderConfig(architecture="merge", vocab_size=20, feature_dim=8, embed_dim=8, units=16, dropout=0.0, max_length=8)
    model, state = train_decoder(feats, seqs, feats, seqs, cfg,
                                 TrainConfig(epochs=3, batch_size=8, learning_rate=1e-2, label_smoothing=0.1), tmp_path / "ck")
    assert isinstance(model, MergeDecoder)
    losses = [h["loss"] for h in state["history"]]
    assert losses[-1] < losses[0]
    _, inputs, _ = seqs.arrays(8)
    full = tf.nn.log_softmax(model((feats[:5], inputs[:5]))).numpy()
    st = model.initial_state(feats[:5])
    for t in range(inputs.shape[1]):
        logp, *st = model.step(tf.constant(inputs[:5, t]), *st)
        real = inputs[:5, t] != 0  # the LSTM layer skips padding; fed one by one, padding would move the state
        np.testing.assert_allclose(logp.numpy()[real], full[real, t], atol=1e-5)
    save_decoder(model, tmp_path / "d.weights.h5")
    again = load_decoder(cfg, tmp_path / "d.weights.h5")
    np.testing.assert_allclose(tf.nn.log_softmax(again((feats[:5], inputs[:5]))).numpy(), full, atol=1e-6)


def test_merge_pack_with_smoothing_and_search_settings_end_to_end(tiny_dataset, tmp_path):
    from toolkit.pack import load_manifest
    from toolkit.pipeline import caption_images, evaluate_packs, load_pack

    packs = tmp_path / "packs"
    build_tiny_pack("en", tiny_dataset, packs, decoder=dict(architecture="merge"), train=dict(epochs=2, label_smoothing=0.2),
                    beam=2, length_penalty=1.0, no_repeat_ngram=2)
    m = load_manifest(packs / "en")
    assert m["decoder"]["architecture"] == "merge" and m["train"]["label_smoothing"] == 0.2
    model = m["scores"]["test"]["model"]
    assert (model["beam"], model["length_penalty"], model["no_repeat_ngram"]) == (2, 1.0, 2)
    assert type(load_pack(packs, "en").step.decoder).__name__ == "MergeDecoder"
    # evaluate with the same search reproduces the build's score; the settings reach the search.
    res = evaluate_packs(["en"], packs, tiny_dataset["images"], tiny_dataset["test"], beam=2, length_penalty=1.0,
                         no_repeat_ngram=2)[0]
    assert res["bleu4"] == pytest.approx(model["bleu4"], abs=1e-6) and res["no_repeat_ngram"] == 2
    imgs = sorted(tiny_dataset["images"].iterdir())[:6]
    for row in caption_images(imgs, ["en"], packs, beam=2, no_repeat_ngram=1).rows:
        words = row["caption"].split()
        assert len(words) == len(set(words))  # no token twice (these tiny captions are one piece a word)


def test_manifests_from_before_the_recipe_fields_still_load():
    from dataclasses import asdict

    from toolkit.config import TrainConfig, from_dict

    old = {k: v for k, v in asdict(TrainConfig()).items() if k not in ("label_smoothing", "lr_schedule", "clipnorm")}
    cfg = from_dict(TrainConfig, old)
    assert (cfg.label_smoothing, cfg.lr_schedule, cfg.clipnorm) == (0.0, "plateau", 5.0)  # what those packs had


@pytest.mark.parametrize("schedule", ["plateau", "cosine", "constant"])
def test_learning_rate_schedules(schedule, tmp_path):
    import math

    from toolkit.config import DecoderConfig, TrainConfig
    from toolkit.decoder import Sequences, train_decoder

    rng = np.random.default_rng(2)
    feats = rng.normal(size=(12, 8)).astype(np.float32)
    seqs = Sequences(np.arange(24, dtype=np.int32) % 12, [list(rng.integers(4, 20, size=rng.integers(2, 7))) for _ in range(24)])
    noise = Sequences(seqs.image_index, [list(rng.integers(4, 20, size=6)) for _ in range(24)])  # dev loss soon stalls
    cfg = DecoderConfig(vocab_size=20, feature_dim=8, embed_dim=8, units=16, dropout=0.0, max_length=8)
    tc = TrainConfig(epochs=4, batch_size=8, learning_rate=1e-2, lr_schedule=schedule, clipnorm=0, patience=10)
    _, state = train_decoder(feats, seqs, feats, noise, cfg, tc, tmp_path / "ck")
    lrs = [h["lr"] for h in state["history"]]  # the rate each epoch ended with
    assert len(lrs) == 4
    if schedule == "cosine":  # set at the start of each epoch from the epoch alone
        assert lrs == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)], rel=1e-5)
    elif schedule == "constant":
        assert lrs == pytest.approx([1e-2] * 4)
    else:  # halved after each epoch whose dev loss was no better than the best so far
        best, expected, lr = float("inf"), [], 1e-2
        for h in state["history"]:
            if h["val_loss"] < best:
                best = h["val_loss"]
            else:
                lr /= 2
            expected.append(lr)
        assert lrs == pytest.approx(expected, rel=1e-5) and lrs[-1] < 1e-2


def test_min_delta_stops_on_small_gains_and_keeps_the_lowest_dev_loss(tmp_path):
    from toolkit.config import DecoderConfig, TrainConfig
    from toolkit.decoder import CHECKPOINT_BEST_FILE, Sequences, load_decoder, train_decoder

    rng = np.random.default_rng(3)
    feats = rng.normal(size=(12, 8)).astype(np.float32)
    seqs = Sequences(np.arange(24, dtype=np.int32) % 12, [list(rng.integers(4, 20, size=rng.integers(2, 7))) for _ in range(24)])
    cfg = DecoderConfig(vocab_size=20, feature_dim=8, embed_dim=8, units=16, dropout=0.0, max_length=8)
    base = dict(epochs=6, batch_size=8, learning_rate=1e-2, lr_schedule="constant", clipnorm=0, patience=2)
    _, free = train_decoder(feats, seqs, feats, seqs, cfg, TrainConfig(**base, min_delta=0.0), tmp_path / "a")
    losses = [h["val_loss"] for h in free["history"]]
    assert len(losses) == 6 and losses == sorted(losses, reverse=True)  # dev = train: every epoch gains
    # A gain no epoch reaches: stopped after `patience` epochs, yet the best weights are the lowest loss seen.
    gain = max(a - b for a, b in zip(losses, losses[1:])) + 1e-3
    model, state = train_decoder(feats, seqs, feats, seqs, cfg, TrainConfig(**base, min_delta=gain), tmp_path / "b")
    assert state["epoch"] == 3 and state["best_epoch"] == 3  # epoch 1 improves on nothing-yet; 2 and 3 fall short
    assert state["best_val_loss"] == pytest.approx(losses[2], rel=1e-4)
    again = load_decoder(cfg, tmp_path / "b" / CHECKPOINT_BEST_FILE)
    np.testing.assert_allclose(again.get_weights()[0], model.get_weights()[0])


def test_auto_tokenizer_is_characters_where_bleu_counts_characters(tiny_packs):
    from toolkit.config import resolve_tokenizer
    from toolkit.pack import load_manifest
    from toolkit.pipeline import load_pack

    assert [resolve_tokenizer("auto", lang) for lang in ("en", "zh", "ja", "tr", "zh-TW")] == ["bpe", "char", "char", "bpe", "char"]
    assert resolve_tokenizer("unigram", "zh") == "unigram"
    for lang, model in (("en", "bpe"), ("zh", "char")):
        m = load_manifest(tiny_packs / lang)
        assert m["decoder"]["tokenizer"] == model and m["tokenizer"]["type"] == f"sentencepiece-{model}"
        card = (tiny_packs / lang / "README.md").read_text()  # the model card says what was trained, and how
        assert f"SentencePiece {model}, {m['tokenizer']['vocab_size']} pieces" in card
        assert f"dropout {m['decoder']['dropout']}; Adam from {m['train']['learning_rate']} (plateau)" in card
    from toolkit.data import read_captions

    zh = load_pack(tiny_packs, "zh").tokenizer
    text = read_captions(tiny_packs / "zh" / "captions.txt").captions[0].text
    pieces = zh.pieces(zh.encode([text])[0])
    assert "".join(pieces) == text.replace(" ", "") and all(len(p) <= 1 for p in pieces)


def _recipe_script():
    """scripts/recipe.py as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe", Path(__file__).parents[1] / "scripts" / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


def test_recipe_ensemble_averages_the_members_probabilities():
    from test_generate_tf import BOS, EOS, random_step_model
    from toolkit.generate import beam_search

    recipe = _recipe_script()
    a, feats = random_step_model("lstm", 0)
    b, _ = random_step_model("merge", 0)
    alone = beam_search(a, feats, BOS, EOS, beam=3, max_length=12)
    assert beam_search(recipe._Ensemble([a]), feats, BOS, EOS, beam=3, max_length=12) == alone
    assert beam_search(recipe._Ensemble([a, a]), feats, BOS, EOS, beam=3, max_length=12) == alone
    both = recipe._Ensemble([a, b])
    state = both.initial_state(feats)
    assert len(state) == 2 + 3  # (h, c) of the lstm beside (h, c, image) of the merge decoder
    logp, _ = both.step(np.full(len(feats), BOS), state)
    pa, _ = a.step(np.full(len(feats), BOS), a.initial_state(feats))
    pb, _ = b.step(np.full(len(feats), BOS), b.initial_state(feats))
    np.testing.assert_allclose(np.exp(logp), (np.exp(pa) + np.exp(pb)) / 2, rtol=1e-5)


def test_recipe_compare_scores_a_side_of_several_runs_by_their_mean(tiny_packs, tiny_dataset, capsys):
    import argparse

    recipe = _recipe_script()
    args = argparse.Namespace(lang="en", packs_dir=[tiny_packs, tiny_packs], against=[tiny_packs],
                              search="3,0,0", against_search="3,0,0", images=tiny_dataset["images"],
                              split=tiny_dataset["dev"], bootstrap=50, references=None)
    recipe.compare(args)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"en: a = {tiny_packs} (") and out[0].count(str(tiny_packs)) == 2
    assert out[1].startswith(f"en: b = {tiny_packs} (3,0,0)")
    # The same pack twice, under the same search, is that pack: no difference on any resample.
    assert out[2].startswith("en: a - b BLEU-4 +0.0 (95% CI +0.0 to +0.0); a better in 0.0% of 50")
    assert out[2].endswith("; CIDEr-D +0.0 (95% CI +0.0 to +0.0)") and "CIDEr-D" in out[0]


def test_recipe_captions_file_stands_in_for_its_pack_in_compare(tiny_packs, tiny_dataset, tmp_path, capsys):
    import argparse

    recipe = _recipe_script()
    saved = tmp_path / "caps" / "en-tiny.json"
    common = dict(lang="en", images=tiny_dataset["images"], split=tiny_dataset["dev"])
    recipe.captions(argparse.Namespace(**common, packs_dir=tiny_packs, search="3,0,0", bootstrap=0, out=saved))
    written = json.loads(saved.read_text(encoding="utf-8"))
    assert written["lang"] == "en" and written["search"] == "3,0,0" and written["built_with"]["decoder"]
    assert capsys.readouterr().out.startswith(f"en: {len(written['captions'])} captions of {tiny_packs} (3,0,0)")

    # The pack against its own saved captions, either way round: the same captions, no difference.
    # (A file keeps the search it was captioned with, whatever its side's --search says.)
    for a, b, search in (([tiny_packs], [saved], ("3,0,0", "5,0.5,3")), ([saved], [tiny_packs], ("5,0.5,3", "3,0,0"))):
        recipe.compare(argparse.Namespace(**common, packs_dir=a, against=b, search=search[0], against_search=search[1],
                                          bootstrap=50, references=None))
        out = capsys.readouterr().out.splitlines()
        assert "(3,0,0): BLEU-1" in out[0] and "(3,0,0): BLEU-1" in out[1]
        assert out[0].split("): ")[1] == out[1].split("): ")[1]  # BLEU-1, BLEU-4 and CIDEr-D alike
        assert f"BLEU-1 {written['scores']['bleu1']:.1f} BLEU-4 {written['scores']['bleu4']:.1f} (" in out[0]
        assert out[2].startswith("en: a - b BLEU-4 +0.0 (95% CI +0.0 to +0.0)")

    # Both sides files: the references must be named; a file that is not one, or of another language, is refused.
    args = argparse.Namespace(**common, packs_dir=[saved], against=[saved], search="3,0,0", against_search="3,0,0",
                              bootstrap=10, references=None)
    from toolkit.errors import CapkitError

    with pytest.raises(CapkitError, match="--references"):
        recipe.compare(args)
    from toolkit.pack import REFERENCES_FILE, find_pack

    args.references = find_pack(tiny_packs, "en") / REFERENCES_FILE
    recipe.compare(args)
    assert capsys.readouterr().out.splitlines()[2].startswith("en: a - b BLEU-4 +0.0")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(CapkitError, match="bad.json: not a captions file"):
        recipe.compare(argparse.Namespace(**common, packs_dir=[tiny_packs], against=[bad], search="3,0,0",
                                          against_search="3,0,0", bootstrap=10, references=None))
    other = tmp_path / "other_refs.txt"  # references of other images than those captioned
    other.write_text("elsewhere.jpg#0\tA dog runs.\n", encoding="utf-8")
    args.references = other
    with pytest.raises(CapkitError, match="captioned images have no references"):
        recipe.compare(args)
    with pytest.raises(CapkitError, match="captions in 'en', not 'zh'"):
        recipe._saved(saved, "zh")


def test_recipe_ensemble_reports_each_member_and_the_paired_gain(tiny_packs, tiny_dataset, tmp_path, capsys):
    import argparse

    recipe = _recipe_script()
    saved = tmp_path / "en-ensemble.json"
    common = dict(lang="en", images=tiny_dataset["images"], split=tiny_dataset["dev"])
    args = argparse.Namespace(**common, packs_dir=tiny_packs, members=[tiny_packs], search="3,0,0", bootstrap=50,
                              out=saved)
    recipe.ensemble(args)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == [f"en {tiny_packs}", f"en {tiny_packs}",
                                                    f"en {tiny_packs} + {tiny_packs}", "en", "en"]
    scores = {line.split(": ", 1)[1] for line in out[:3]}
    assert len(scores) == 1 and "CIDEr-D" in out[0]  # a pack with itself is that pack
    assert out[3].startswith("en: ensemble - members' mean BLEU-4 +0.0 (95% CI +0.0 to +0.0); ensemble better in 0.0% of 50")
    assert out[3].endswith("; CIDEr-D +0.0 (95% CI +0.0 to +0.0)")
    assert out[4].startswith("en: ") and out[4].endswith(f"-> {saved}")

    # The saved ensemble stands in for itself in `compare`: against its member it is that member, on every resample.
    written = json.loads(saved.read_text(encoding="utf-8"))
    assert written["pack"] == f"{tiny_packs} + {tiny_packs}" and len(written["built_with"]) == 2
    assert written["search"] == "3,0,0" and written["scores"]["beam"] == 3
    alone = tmp_path / "en-alone.json"  # the pack's own captions, as `recipe.py captions` writes them
    recipe.captions(argparse.Namespace(**common, packs_dir=tiny_packs, search="3,0,0", bootstrap=0, out=alone))
    assert written["captions"] == json.loads(alone.read_text(encoding="utf-8"))["captions"]  # written form alike
    capsys.readouterr()
    recipe.compare(argparse.Namespace(**common, packs_dir=[saved], against=[tiny_packs], search="5,0.5,3",
                                      against_search="3,0,0", bootstrap=50, references=None))
    out = capsys.readouterr().out.splitlines()
    assert out[0].split("): ")[1] == out[1].split("): ")[1]  # BLEU-1, BLEU-4, CIDEr-D and repeats alike
    assert f"BLEU-4 {written['scores']['bleu4']:.1f} (" in out[0]
    assert out[2].startswith("en: a - b BLEU-4 +0.0 (95% CI +0.0 to +0.0)")
