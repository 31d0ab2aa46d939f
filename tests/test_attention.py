"""The attention decoder: grid features, its config, the decoder itself, its searches, and a tiny pack end to end."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import encoder_with_cache


def photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return sorted(folder.iterdir())


# -- grid features ------------------------------------------------------------------


def test_grid_features_are_cached_and_average_to_the_pooled_ones(tiny_encoder, tmp_path):
    from toolkit.encoder import FEATURE_DIM

    paths = photos(tmp_path / "imgs", 5)
    enc = encoder_with_cache(tiny_encoder, tmp_path / "enc")
    assert enc.grid_size == 3  # Xception at 71 px
    ex = enc.extract(paths[:3])  # pooled only, as before: no grid written
    assert ex.n_extracted == 3 and len(enc.grid_cache) == 0
    pooled_before = enc.features([ex.keys[str(p)] for p in paths[:3]])

    ex = enc.extract(paths, grid=True)  # 3 images need their grid only, 2 need both
    assert (ex.n_extracted, ex.n_cached) == (5, 0)
    assert len(enc.cache) == 5 and len(enc.grid_cache) == 5  # pooled rows not written twice
    keys = [ex.keys[str(p)] for p in paths]
    grids = enc.grid_features(keys)
    assert grids.shape == (5, 9, FEATURE_DIM) and grids.dtype == np.float32
    pooled = enc.features(keys)
    np.testing.assert_array_equal(pooled[:3], pooled_before)
    # float16 rows: each stored value is within 2**-11 of its own size.
    np.testing.assert_allclose(grids.mean(axis=1), pooled, rtol=2e-3, atol=2e-3 * np.abs(pooled).max())
    assert np.abs(grids - grids.mean(axis=1, keepdims=True)).max() > 0  # positions differ: a real map

    # A second run, or another process on the same folder, extracts nothing.
    again = encoder_with_cache(tiny_encoder, tmp_path / "enc").extract(paths, grid=True)
    assert (again.n_extracted, again.n_cached) == (0, 5)
    assert enc.grid_features([]).shape == (0, 9, FEATURE_DIM)


def test_grid_features_stay_in_memory_when_the_cache_is_read_only(tiny_encoder, tmp_path, monkeypatch):
    import toolkit.features

    def refuse(path, data, keep):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(toolkit.features, "_append", refuse)
    paths = photos(tmp_path / "imgs", 3)
    enc = encoder_with_cache(tiny_encoder, tmp_path / "enc")
    ex = enc.extract(paths, grid=True)
    keys = [ex.keys[str(p)] for p in paths]
    assert ex.n_extracted == 3 and len(enc.grid_cache) == 0
    # Rows in memory are rounded to float16 as the cache's are, so the same tolerance as on disk.
    pooled = enc.features(keys)
    np.testing.assert_allclose(enc.grid_features(keys).mean(axis=1), pooled, rtol=2e-3, atol=2e-3 * np.abs(pooled).max())


def test_grid_extraction_keeps_the_encoder_identity(tmp_path):
    """Pooling moved out of the Keras model into the forward pass: same weights, digest, id and scale."""
    import keras

    from toolkit.config import EncoderConfig
    from toolkit.encoder import RANDOM_INIT_SEED, Encoder, _digest

    keras.utils.set_random_seed(RANDOM_INIT_SEED)
    pooled_model = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3), pooling="avg")
    enc = Encoder.prepare(EncoderConfig(weights="none", image_size=71), tmp_path)
    assert enc.identity["digest"] == _digest(pooled_model)
    noise = np.random.default_rng(0).uniform(-1, 1, (1, 71, 71, 3)).astype(np.float32)
    peak = float(np.abs(pooled_model(noise).numpy()).max())
    assert 0.5 <= peak * enc.identity["feature_scale"] < 2


# -- config and decoder ----------------------------------------------------------------


def test_old_manifests_without_the_architecture_load_as_lstm():
    from dataclasses import asdict

    from toolkit.config import ADDED_FIELDS, DecoderConfig, from_dict
    from toolkit.errors import CapkitError

    old = {k: v for k, v in asdict(DecoderConfig()).items() if k not in ADDED_FIELDS["DecoderConfig"]}
    # ... and an old attention pack is input-fed, attending 512 wide, whatever today's defaults are.
    assert from_dict(DecoderConfig, old) == DecoderConfig(architecture="lstm", tokenizer="unigram", attention_feed="input",
                                                          attention_units=0)
    new = asdict(DecoderConfig(architecture="attention", attention_reg=0.5))
    assert from_dict(DecoderConfig, new).architecture == "attention"
    with pytest.raises(CapkitError, match=r"missing \['units'\]"):  # every other field stays required
        from_dict(DecoderConfig, {k: v for k, v in new.items() if k != "units"})


def tiny_attention_data(seed=0, n=16, positions=4, fdim=8, vocab=20):
    from toolkit.decoder import Sequences

    rng = np.random.default_rng(seed)
    grids = rng.normal(size=(n, positions, fdim)).astype(np.float32)
    seqs = Sequences(np.arange(2 * n, dtype=np.int32) % n,
                     [list(rng.integers(3, vocab, size=rng.integers(2, 7))) for _ in range(2 * n)])
    return grids, seqs


@pytest.mark.parametrize("score", ["additive", "dot"])
@pytest.mark.parametrize("feed", ["input", "output"])
def test_attention_decoder_steps_as_it_trains_and_penalises_staring(tmp_path, score, feed):
    import tensorflow as tf

    from toolkit.config import DecoderConfig, TrainConfig
    from toolkit.decoder import AttentionDecoder, OutputAttentionDecoder, load_decoder, save_decoder, train_decoder
    from toolkit.tokenizer import BOS_ID

    grids, seqs = tiny_attention_data()
    cfg = DecoderConfig(architecture="attention", vocab_size=20, feature_dim=8, embed_dim=8, units=16, dropout=0.0,
                        max_length=8, deep_output=True, attention_score=score, attention_feed=feed, attention_units=6)
    model, state = train_decoder(grids, seqs, grids, seqs, cfg, TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2),
                                 tmp_path / "ck")
    assert isinstance(model, AttentionDecoder)
    assert isinstance(model, OutputAttentionDecoder) == (feed == "output")
    assert state["history"][-1]["loss"] < state["history"][0]["loss"]
    _, inputs, _ = seqs.arrays(8)
    inputs = inputs[:5]
    # Step by step (inference) equals the whole-sequence pass (training), token for token.
    full = tf.nn.log_softmax(model((grids[:5], inputs))).numpy()
    state_ = model.initial_state(grids[:5])
    assert [tuple(s.shape) for s in state_] == [(5, 16), (5, 16), (5, 4, 16), (5, 4, 6)]  # keys attention_units wide
    for t in range(inputs.shape[1]):  # at each caption's real positions (past its end the pass repeats its last)
        logp, *state_ = model.step(tf.constant(inputs[:, t]), *state_)
        real = inputs[:, t] != 0
        np.testing.assert_allclose(logp.numpy()[real], full[real, t], atol=1e-5)
    maps = model.attention_maps(grids[:5], inputs)
    assert maps.shape == (5, 8, 4)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    # The doubly stochastic penalty is added while training only, and only when asked for.
    model((grids[:5], inputs), training=True)
    assert len(model.losses) == 1 and float(model.losses[0]) > 0
    model.config.attention_reg = 0.0
    model((grids[:5], inputs), training=True)
    assert len(model.losses) == 0
    model.config.attention_reg = 1.0
    # Weights round-trip through the pack's file.
    save_decoder(model, tmp_path / "d.weights.h5")
    again = load_decoder(cfg, tmp_path / "d.weights.h5")
    np.testing.assert_allclose(tf.nn.log_softmax(again((grids[:5], inputs))).numpy(), full, atol=1e-6)


@pytest.mark.parametrize("score,width", [("additive", 0), ("dot", 0), ("additive", 6), ("dot", 6)])
def test_attention_unroll_computes_what_the_plain_cell_loop_did(score, width):
    """The hoisted input product, the longest-first running prefix and the grouped products change no number.

    Reference: the loop as first written, one keras LSTMCell call per step on
    [embedding, context] for every caption, padding included.
    """
    import tensorflow as tf

    from toolkit.config import DecoderConfig
    from toolkit.decoder import AttentionDecoder

    grids, seqs = tiny_attention_data(2)
    cfg = DecoderConfig(architecture="attention", vocab_size=20, feature_dim=8, embed_dim=8, units=16, dropout=0.0,
                        max_length=8, attention_score=score, attention_units=width)
    model = AttentionDecoder(cfg).build_all(8)
    _, inputs, _ = seqs.arrays(8)
    feats = grids[seqs.image_index]
    h, c, a, keys = model.initial_state(feats)
    x = model.embed(inputs)
    hs, contexts, alphas = [], [], []
    for t in range(inputs.shape[1]):
        alpha, context = model._attend(h, a, keys)
        _, (h, c) = model.cell(tf.concat([x[:, t], context], axis=-1), [h, c])
        hs.append(h), contexts.append(context), alphas.append(alpha)
    want = model._logits(tf.stack(hs, 1), tf.stack(contexts, 1), x).numpy()
    real = inputs != 0  # past a caption's end the new loop repeats its last state instead
    got, maps = model._unroll(feats, inputs)
    np.testing.assert_allclose(got.numpy()[real], want[real], atol=1e-5)
    np.testing.assert_allclose(maps.numpy()[real], tf.stack(alphas, 1).numpy()[real], atol=1e-6)
    # Grouped by image (each image once, `rows` per caption): the same numbers.
    grouped, _ = model._unroll(grids, inputs, rows=tf.constant(seqs.image_index))
    np.testing.assert_allclose(grouped.numpy()[real], want[real], atol=1e-5)


@pytest.mark.parametrize("score,width", [("additive", 0), ("dot", 0), ("additive", 6)])
def test_output_attention_computes_what_a_loop_of_cell_then_attention_does(score, width):
    """attention_feed="output": the LSTM over the sequence, then batched attention, equals step-by-step cell + attend.

    Reference: one keras LSTMCell call per step on the word alone, then the
    attention of the new h over its own image's annotations, then the head.
    """
    import tensorflow as tf

    from toolkit.config import DecoderConfig
    from toolkit.decoder import OutputAttentionDecoder, decoder_class

    grids, seqs = tiny_attention_data(3)
    cfg = DecoderConfig(architecture="attention", vocab_size=20, feature_dim=8, embed_dim=8, units=16, dropout=0.0,
                        max_length=8, attention_score=score, attention_feed="output", attention_units=width)
    assert decoder_class(cfg) is OutputAttentionDecoder
    model = OutputAttentionDecoder(cfg).build_all(8)
    _, inputs, _ = seqs.arrays(8)
    feats = grids[seqs.image_index]
    h, c, a, keys = model.initial_state(feats)
    x = model.embed(inputs)
    logits, alphas = [], []
    for t in range(inputs.shape[1]):
        _, (h, c) = model.lstm.cell(x[:, t], [h, c])
        alpha, context = model._attend(h, a, keys)
        logits.append(model._logits(h, context, x[:, t])), alphas.append(alpha)
    real = inputs != 0
    got, maps = model._unroll(feats, inputs)
    np.testing.assert_allclose(got.numpy()[real], tf.stack(logits, 1).numpy()[real], atol=1e-5)
    np.testing.assert_allclose(maps.numpy()[real], tf.stack(alphas, 1).numpy()[real], atol=1e-6)
    grouped, _ = model._unroll(grids, inputs, rows=tf.constant(seqs.image_index))
    np.testing.assert_allclose(grouped.numpy()[real], got.numpy()[real], atol=1e-5)
    # No cell of the input-fed decoder's shape: the LSTM reads the embedding alone.
    assert model.lstm.cell.kernel.shape == (8, 64)


@pytest.mark.parametrize("batch,feed", [(5, "input"), (8, "input"), (64, "input"), (8, "output")])
def test_batches_by_image_hold_each_caption_once_with_its_own_image(batch, feed):
    """Grouped batches: every caption once an epoch, its image's features once a batch, and the same logits."""
    import tensorflow as tf

    from toolkit.config import DecoderConfig
    from toolkit.decoder import decoder_class, training_dataset

    grids, seqs = tiny_attention_data()
    cfg = DecoderConfig(architecture="attention", vocab_size=20, feature_dim=8, embed_dim=8, units=16, dropout=0.0,
                        max_length=8, attention_feed=feed)
    _, inputs, targets = seqs.arrays(8)
    model = decoder_class(cfg)(cfg).build_all(8)
    seen = []
    for (feats, x, rows), y in training_dataset(grids, seqs, cfg, batch, shuffle=True, seed=1):
        feats, x, rows, y = feats.numpy(), x.numpy(), rows.numpy(), y.numpy()
        assert len(x) <= batch and len(feats) == len(np.unique(rows)) <= len(x)  # each image once
        for f, xi, yi in zip(feats[rows], x, y):
            i = next(i for i in range(len(inputs)) if (inputs[i, :len(xi)] == xi).all() and (targets[i, :len(yi)] == yi).all()
                     and (grids[seqs.image_index[i]] == f).all() and i not in seen)
            seen.append(i)
        # One projection per image gives what one per caption gave.
        np.testing.assert_allclose(model((feats, x, rows)).numpy(), model((feats[rows], x)).numpy(), atol=1e-5)
    assert sorted(seen) == list(range(len(inputs)))


@pytest.mark.parametrize("feed", ["input", "output"])
def test_attention_decoder_trains_in_mixed_precision(tmp_path, feed):
    """The GPU path (mixed_float16) on the CPU: the loop's tensors in float16, a plain float32 model back."""
    from toolkit import decoder as dec
    from toolkit.config import DecoderConfig, TrainConfig
    from toolkit.generate import KerasStepModel, beam_search, beam_search_tf

    grids, seqs = tiny_attention_data(1)
    cfg = DecoderConfig(architecture="attention", vocab_size=20, feature_dim=8, embed_dim=8, units=16, dropout=0.1,
                        max_length=8, attention_feed=feed)
    model, state = dec.train_decoder(grids, seqs, grids, seqs, cfg, TrainConfig(epochs=2, batch_size=8, learning_rate=1e-2,
                                                                                precision="float16"), tmp_path)
    assert {w.dtype for w in model.weights if "float" in w.dtype} == {"float32"}
    assert np.isfinite(state["history"][-1]["loss"]) and state["history"][-1]["loss"] < state["history"][0]["loss"]
    step = KerasStepModel(model)
    assert beam_search_tf(step, grids, 1, 2, beam=2, max_length=8) == beam_search(step, grids, 1, 2, beam=2, max_length=8)


# -- a tiny attention pack, end to end --------------------------------------------------


@pytest.fixture(scope="module")
def attention_packs(tmp_path_factory, tiny_dataset):
    """An attention `en` pack, built through a Ctrl-C after epoch 1 and a resume, beside an lstm `zh` pack.

    Input-fed, as every attention pack before the sixteenth session (the output-fed default has its own test).
    """
    from conftest import build_tiny_pack
    from toolkit.pipeline import Report

    packs = tmp_path_factory.mktemp("attention-packs")

    def stop_after_first_epoch(kind, **f):
        if kind == "epoch" and f["epoch"] == 1:
            raise KeyboardInterrupt

    attention = dict(decoder=dict(architecture="attention", attention_feed="input", attention_units=0))  # as old packs
    with pytest.raises(KeyboardInterrupt):
        build_tiny_pack("en", tiny_dataset, packs, report=Report(stop_after_first_epoch), **attention)
    assert not (packs / "en").exists()
    events = []
    build_tiny_pack("en", tiny_dataset, packs, report=Report(lambda kind, **f: events.append((kind, f))), **attention)
    build_tiny_pack("zh", tiny_dataset, packs, train=dict(epochs=1))
    return packs, events


def test_attention_pack_resumes_and_names_its_architecture(attention_packs):
    from toolkit.encoder import Encoder
    from toolkit.pack import MODEL_CARD_FILE, load_manifest, verify_files

    packs, events = attention_packs
    epochs = [f["epoch"] for kind, f in events if kind == "epoch"]
    assert epochs[0] == 2  # resumed where the Ctrl-C stopped it
    assert [f for kind, f in events if kind == "encoded"][0]["extracted"] == 0  # features and grids cached by the first try
    m = load_manifest(packs / "en")
    assert m["decoder"]["architecture"] == "attention" and load_manifest(packs / "zh")["decoder"]["architecture"] == "lstm"
    assert verify_files(packs / "en", m) == []
    assert "attending (before each word) over the feature grid" in (packs / "en" / MODEL_CARD_FILE).read_text()
    for system in ("model", "retrieval", "constant"):
        assert 0 <= m["scores"]["test"][system]["bleu4"] <= 100
    enc = Encoder.load(packs, m["encoder"]["id"])
    assert len(enc.grid_cache) == 48 and len(enc.cache) == 48


def test_caption_and_evaluate_feed_grids_to_attention_packs(attention_packs, tiny_dataset):
    from toolkit.decoder import AttentionDecoder, CaptionDecoder
    from toolkit.encoder import Encoder
    from toolkit.generate import beam_search
    from toolkit.pack import load_manifest
    from toolkit.pipeline import caption_images, evaluate_packs, load_pack
    from toolkit.tokenizer import BOS_ID, EOS_ID
    from toolkit.written import written_form

    packs, _ = attention_packs
    en, zh = load_pack(packs, "en"), load_pack(packs, "zh")
    assert en.needs_grid and isinstance(en.step.decoder, AttentionDecoder)
    assert not zh.needs_grid and isinstance(zh.step.decoder, CaptionDecoder)

    imgs = sorted(tiny_dataset["images"].iterdir())[:5]
    out = caption_images(imgs, ["all"], packs, beam=2, length_penalty=0.0, no_repeat_ngram=0)
    assert len(out.rows) == 10 and not out.failures
    enc = Encoder.load(packs, en.manifest["encoder"]["id"])
    grids = enc.grid_features([enc.extract(imgs).keys[str(p)] for p in imgs])
    want = [written_form(t, "en") for t in en.tokenizer.decode(beam_search(en.step, grids, BOS_ID, EOS_ID, beam=2, max_length=16))]
    assert [r["caption"] for r in out.rows if r["lang"] == "en"] == want

    res = evaluate_packs(["en", "zh"], packs, tiny_dataset["images"], tiny_dataset["test"], beam=3)
    for r in res:
        m = load_manifest(packs / r["lang"])
        assert r["bleu4"] == pytest.approx(m["scores"]["test"]["model"]["bleu4"], abs=1e-6)
        assert r["baselines"]["retrieval"]["bleu4"] == pytest.approx(m["scores"]["test"]["retrieval"]["bleu4"], abs=1e-6)

    # Where the pack looked for each word of its captions (and the end): one distribution over the 3x3 grid per word.
    ids = en.step.search(grids, BOS_ID, EOS_ID, beam=2, max_length=16)
    width = max(map(len, ids)) + 1
    inputs = np.array([[BOS_ID, *c] + [0] * (width - 1 - len(c)) for c in ids], np.int32)
    maps = en.step.decoder.attention_maps(grids, inputs)
    assert maps.shape == (5, width, 9) and (maps >= 0).all()
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)


def test_an_output_fed_attention_pack_records_its_feed_and_captions_as_it_scored(attention_packs, tiny_dataset, tmp_path):
    """The default attention pack (output feed, 128-wide scores) end to end: manifest, model card, search, score."""
    import shutil

    from conftest import build_tiny_pack
    from toolkit.decoder import OutputAttentionDecoder
    from toolkit.pack import MODEL_CARD_FILE, load_manifest
    from toolkit.pipeline import caption_images, evaluate_packs, load_pack

    packs = tmp_path / "packs"
    shutil.copytree(attention_packs[0] / ".encoders", packs / ".encoders")  # features and grids cached: nothing extracted
    build_tiny_pack("en", tiny_dataset, packs, decoder=dict(architecture="attention"))
    m = load_manifest(packs / "en")
    assert (m["decoder"]["attention_feed"], m["decoder"]["attention_units"]) == ("output", 128)
    assert (m["decoder"]["architecture"], m["decoder"]["attention_feed"]) == ("attention", "output")
    assert "attending (after each word's LSTM step)" in (packs / "en" / MODEL_CARD_FILE).read_text()
    en = load_pack(packs, "en")
    assert en.needs_grid and isinstance(en.step.decoder, OutputAttentionDecoder)
    out = caption_images(sorted(tiny_dataset["images"].iterdir())[:3], ["en"], packs, beam=2)
    assert len(out.rows) == 3 and not out.failures
    (r,) = evaluate_packs(["en"], packs, tiny_dataset["images"], tiny_dataset["test"])
    assert r["bleu4"] == pytest.approx(m["scores"]["test"]["model"]["bleu4"], abs=1e-6)


def test_cli_decoder_flag(monkeypatch, capsys, tiny_dataset, tmp_path):
    import sys

    import toolkit.build
    from toolkit.cli import main
    from toolkit.errors import CapkitError

    got = []

    base = ["capkit", "build-pack", "en", "--captions", str(tiny_dataset["captions_en"]), "--images",
            str(tiny_dataset["images"]), "--train-split", str(tiny_dataset["train"]), "--dev-split", str(tiny_dataset["dev"]),
            "--packs-dir", str(tmp_path)]

    def fake_build(*args, decoder_config, **kw):
        got.append((decoder_config.architecture, decoder_config.attention_feed, decoder_config.deep_output,
                    decoder_config.attention_units))
        raise CapkitError("stopped here")

    monkeypatch.setattr(toolkit.build, "build_pack", fake_build)
    for flags, want in (([], ("lstm", "output", False, 128)), (["--decoder", "attention"], ("attention", "output", False, 128)),
                        (["--decoder", "merge"], ("merge", "output", False, 128)),
                        (["--decoder", "attention", "--attention-feed", "input", "--deep-output", "--attention-units", "0"],
                         ("attention", "input", True, 0)),
                        (["--attention-units", "-1"], "--attention-units must be 0 (the LSTM's width) or more, not -1"),
                        (["--decoder", "transformer"], "--decoder must be one of lstm, attention, merge, not 'transformer'"),
                        (["--attention-feed", "after"], "--attention-feed must be one of input, output, not 'after'")):
        monkeypatch.setattr(sys, "argv", base + flags)
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code != 0
        err = capsys.readouterr().err
        if isinstance(want, tuple):
            assert got.pop() == want and "stopped here" in err
        else:
            assert want in err and not got


# -- the report's heat maps ---------------------------------------------------------------


def _caption_cells(page: str, lang: str) -> dict[str, str]:
    """Image name -> the inside of its caption cell in the `lang` column."""
    import html
    import re

    out = {}
    for row in re.findall(r'<tr class="image-row">(.*?)</tr>', page, re.S):
        name = html.unescape(re.search(r"<figcaption>(.*?)</figcaption>", row).group(1))
        out[name] = re.search(rf'<td class="caption[^"]*" lang="{lang}"[^>]*>(.*?)</td>', row, re.S).group(1)
    return out


def _strip(cell: str) -> list[tuple[str, str]]:
    """(token, title) of each heat map in a caption cell, in order."""
    import html
    import re

    return [(html.unescape(alt), html.unescape(title))
            for alt, title in re.findall(r'<img src="data:image/jpeg;base64,[^"]*" width="\d+" height="\d+" '
                                         r'alt="([^"]*)" title="([^"]*)">', cell)]


def test_report_shows_where_the_attention_pack_looked_for_each_token(attention_packs, tiny_dataset, tmp_path):
    from toolkit.encoder import Encoder
    from toolkit.pipeline import caption_images, load_pack
    from toolkit.report import build_report, decoder_inputs

    packs, _ = attention_packs
    imgs = sorted(tiny_dataset["images"].iterdir())[:4]
    page = build_report(imgs, ["all"], packs, beam=2, out=tmp_path / "r.html")
    ids = {Path(r["image"]).name: r["ids"] for r in caption_images(imgs, ["en"], packs, beam=2).rows}
    assert any(ids.values()), "the tiny pack captioned nothing: no strip to check"
    en = load_pack(packs, "en")
    enc = Encoder.load(packs, en.manifest["encoder"]["id"])
    keys = enc.extract(imgs, grid=True).keys
    cells = _caption_cells(page, "en")
    assert sorted(cells) == sorted(ids)
    for p in imgs:
        caption_ids = ids[p.name]
        strip = _strip(cells[p.name])
        # One heat map per generated token, labelled with that token's text, in order.
        assert [token for token, _ in strip] == en.tokenizer.pieces(caption_ids)
        assert cells[p.name].count("<figure>") == len(caption_ids) == cells[p.name].count("<img")
        if caption_ids:
            # Each map is the decoder's attention for its own token: the peaks the titles give are those rows'.
            maps = en.step.decoder.attention_maps(enc.grid_features([keys[str(p)]]), decoder_inputs([caption_ids]))[0]
            assert [title.split(": ")[1].split("%")[0] for _, title in strip] == [f"{m.max():.1%}"[:-1] for m in maps]
    assert page.count("<img") == len(imgs) + sum(map(len, ids.values()))  # the thumbnails and the heat maps
    # The lstm pack's captions have no strip.
    assert all("<img" not in cell and 'class="attention"' not in cell for cell in _caption_cells(page, "zh").values())


def test_report_over_a_split_cuts_long_strips(attention_packs, tiny_dataset, tmp_path, monkeypatch):
    import toolkit.report
    from toolkit.pipeline import evaluate_packs, load_pack

    monkeypatch.setattr(toolkit.report, "ATTENTION_MAX_TOKENS", 3)
    packs, _ = attention_packs
    page = toolkit.report.build_report([tiny_dataset["images"]], ["en"], packs, split=tiny_dataset["test"], beam=3, limit=5)
    ids = evaluate_packs(["en"], packs, tiny_dataset["images"], tiny_dataset["test"], beam=3, baselines=False)[0]["caption_ids"]
    pieces = load_pack(packs, "en").tokenizer.pieces
    cells = _caption_cells(page, "en")
    assert len(cells) == 5 and any(ids[name] for name in cells)
    for name, cell in cells.items():
        assert [token for token, _ in _strip(cell)] == pieces(ids[name])[:3]
        assert (f"first 3 of {len(ids[name])} tokens" in cell) == (len(ids[name]) > 3)
