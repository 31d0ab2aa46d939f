"""Training batches: length buckets, captions grouped by image, every caption once an epoch."""

from __future__ import annotations

import numpy as np
import pytest


def lengths_and_images(n_images=300, per_image=5, seed=0):
    rng = np.random.default_rng(seed)  # an image's captions are of like length, as Flickr8k's are
    base = np.repeat(rng.integers(6, 24, n_images), per_image)
    return base + rng.integers(-2, 7, n_images * per_image), np.repeat(np.arange(n_images), per_image)


@pytest.mark.parametrize("grouped", [False, True])
def test_batch_plan_covers_every_caption_once_with_little_padding(grouped):
    from toolkit.decoder import batch_plan

    lengths, images = lengths_and_images()
    rng = np.random.default_rng(1)
    plan = batch_plan(lengths, 64, rng, images if grouped else None)
    assert sorted(np.concatenate(plan)) == list(range(len(lengths)))
    assert all(len(b) <= 64 for b in plan) and sum(len(b) < 64 for b in plan) <= 1
    padded = np.mean([lengths[b].max() for b in plan])
    shuffled = np.random.default_rng(2).permutation(len(lengths))
    random_padded = np.mean([lengths[shuffled[i:i + 64]].max() for i in range(0, len(lengths), 64)])
    assert padded < 0.8 * random_padded  # length buckets: far less padding than random batches
    if grouped:  # an image's captions are together: consecutive in a batch, in at most two batches (a cut)
        where = {}
        for k, b in enumerate(plan):
            im = images[b]
            assert len(np.unique(im)) == 1 + np.count_nonzero(np.diff(im))
            for m in np.unique(im):
                where.setdefault(m, set()).add(k)
        assert max(map(len, where.values())) <= 2
    again = batch_plan(lengths, 64, rng, images if grouped else None)  # the next epoch mixes differently
    assert [list(b) for b in again] != [list(b) for b in plan]
    same = batch_plan(lengths, 64, np.random.default_rng(1), images if grouped else None)  # a seed repeats itself
    assert [list(b) for b in same] == [list(b) for b in plan]


def test_training_dataset_gives_each_caption_its_own_image_and_tokens():
    from toolkit.config import DecoderConfig
    from toolkit.decoder import Sequences, training_dataset

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 6)).astype(np.float32)
    seqs = Sequences(np.repeat(np.arange(40, dtype=np.int32), 3), [list(rng.integers(4, 20, rng.integers(1, 12))) for _ in range(120)])
    cfg = DecoderConfig(vocab_size=20, feature_dim=6, max_length=10)
    _, inputs, targets = seqs.arrays(10)
    epochs = []
    ds = training_dataset(feats, seqs, cfg, 16, shuffle=True, seed=0)
    for _ in range(2):
        seen = []
        for (f, x), y in ds:
            f, x, y = f.numpy(), x.numpy(), y.numpy()
            assert (x != 0).any(axis=0).all()  # cut to the batch's longest caption
            for fi, xi, yi in zip(f, x, y):
                i = next(i for i in range(120) if i not in seen and (inputs[i, :len(xi)] == xi).all()
                         and (inputs[i, len(xi):] == 0).all() and (targets[i, :len(yi)] == yi).all()
                         and (feats[seqs.image_index[i]] == fi).all())
                seen.append(i)
        assert sorted(seen) == list(range(120))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # reshuffled every epoch


def test_a_resumed_run_gets_the_batches_of_its_epoch_not_the_first_ones():
    from toolkit.config import DecoderConfig
    from toolkit.decoder import Sequences, training_dataset

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 4)).astype(np.float32)
    seqs = Sequences(np.repeat(np.arange(30, dtype=np.int32), 2), [list(rng.integers(4, 20, rng.integers(1, 12))) for _ in range(60)])
    cfg = DecoderConfig(vocab_size=20, feature_dim=4, max_length=10)

    def epoch(ds):
        return [x.numpy().tolist() for (_, x), _ in ds]

    unstopped = training_dataset(feats, seqs, cfg, 8, shuffle=True, seed=3)
    first, second = epoch(unstopped), epoch(unstopped)
    resumed = training_dataset(feats, seqs, cfg, 8, shuffle=True, seed=3, first_epoch=1)
    assert epoch(resumed) == second != first


@pytest.mark.parametrize("architecture", ["lstm", "merge", "attention"])
def test_the_head_runs_at_real_tokens_only_and_the_loss_is_what_it_was(architecture, monkeypatch):
    """Logits at padding are never computed (zeros); at real tokens, and so the masked loss, they are the full head's."""
    import tensorflow as tf

    from toolkit import decoder as dec
    from toolkit.config import DecoderConfig

    rng = np.random.default_rng(0)
    attention = architecture == "attention"
    cfg = DecoderConfig(architecture=architecture, vocab_size=20, feature_dim=8, embed_dim=8, units=16, dropout=0.0,
                        max_length=8, attention_feed="output")
    model = dec.decoder_class(cfg)(cfg).build_all(8)
    feats = rng.normal(size=(3, 4, 8) if attention else (3, 8)).astype(np.float32)
    tokens = np.array([[1, 5, 6, 7], [1, 8, 0, 0], [1, 0, 0, 0]], np.int32)
    targets = np.array([[5, 6, 7, 2], [8, 2, 0, 0], [2, 0, 0, 0]], np.int32)
    got = model((feats, tokens)).numpy()
    real = tokens != 0
    assert (got[~real] == 0).all() and (got[real] != 0).all()
    calls = []  # the same model with the head over every position, padding included
    monkeypatch.setattr(dec, "_on_real_tokens", lambda head, y, tokens: calls.append(1) or head(y))
    full = model((feats, tokens)).numpy()
    assert calls
    np.testing.assert_allclose(got[real], full[real], atol=1e-5)
    loss = dec.CaptionLoss(label_smoothing=0.1)
    assert float(loss(targets, got)) == pytest.approx(float(loss(targets, full)), abs=1e-5)
