"""Self-critical fine-tuning: the sampler, the baseline, the reward it climbs, the weights it keeps, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from toolkit import decoder as dec
from toolkit import selfcritical as sc
from toolkit.config import DecoderConfig, TrainConfig
from toolkit.evaluate import CiderD, _cider_d, bleu_tokenize
from toolkit.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

# Four kinds of photo, each always described by one of two captions.
CAPTIONS = [["a dog runs", "a dog runs on grass"], ["a cat sleeps", "a cat sleeps on a bed"],
            ["two men ride bikes", "two men ride"], ["a girl swims", "a girl swims in water"]]


def _task(n_per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    classes = np.repeat(np.arange(4), n_per_class)
    feats = np.eye(4, 8, dtype=np.float32)[classes] * 3 + rng.normal(scale=0.1, size=(len(classes), 8)).astype(np.float32)
    refs = [[bleu_tokenize(t, "en") for t in CAPTIONS[k]] for k in classes]
    return feats, refs


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for pair in CAPTIONS for t in pair] * 5
    return train_tokenizer(texts, "en", vocab_size=40, model_type="unigram")


def _model(tokenizer, feats, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    cfg = DecoderConfig(vocab_size=tokenizer.vocab_size, feature_dim=8, embed_dim=16, units=32, dropout=0.0, max_length=8)
    return dec.training_model(cfg, TrainConfig(), feats)


def test_the_baseline_is_the_mean_of_the_other_samples():
    r = np.array([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    # image 0: 1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2; image 1 likewise
    assert sc.advantages(r, 3).tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]


def test_cider_d_with_fixed_document_frequencies_is_coco_cider_on_its_own_corpus():
    _, refs = _task(3)
    hyps = [bleu_tokenize(t, "en") for t in ["a dog runs on a bed", "a cat", "two men", "a girl swims in water"] * 3]
    scorer = CiderD(refs)
    assert np.allclose(scorer.score(hyps, range(len(hyps))), _cider_d(hyps, refs))
    # Scored against another image's references: the same as moving the caption there.
    moved = [hyps[1]] + hyps[1:]
    assert scorer.score([hyps[1]], [0])[0] == pytest.approx(_cider_d(moved, refs)[0])


def test_samples_follow_the_models_distribution_and_end_with_eos(tokenizer):
    feats, _ = _task(1)
    model = _model(tokenizer, feats)
    draw = sc.sampler(model, samples=2000, max_length=8)
    ids = draw(feats[:1], np.array([3, 4], np.int32)).numpy()
    assert ids.shape[0] == 2000
    assert np.array_equal(ids, draw(feats[:1], np.array([3, 4], np.int32)).numpy())  # stateless: same seed, same ids
    ended = (ids == EOS_ID).any(axis=1)
    for row in ids[ended]:  # EOS, then only padding
        assert (row[int(np.argmax(row == EOS_ID)) + 1:] == PAD_ID).all()
    assert not (ids[~ended] == PAD_ID).any()  # a sample cut at max_length has no padding
    # The first token's frequencies against the model's own probabilities of it.
    h, c = model.initial_state(feats[:1])
    logp, _, _ = model.step(np.array([BOS_ID], np.int32), h, c)
    p = np.exp(logp.numpy()[0])
    p[[PAD_ID, BOS_ID]] = 0  # never sampled
    p /= p.sum()
    assert not np.isin(ids, [BOS_ID]).any()
    freq = np.bincount(ids[:, 0], minlength=len(p)) / len(ids)
    assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / len(ids)) + 1e-3


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_fine_tuning_raises_the_reward_and_keeps_the_best_dev_weights(tokenizer, tmp_path, precision):
    """In float32 and in mixed bfloat16, which hands back the float32 model it was given, at the best dev epoch."""
    feats, refs = _task(12)
    dev_feats, dev_refs = _task(3, seed=1)
    model = given = _model(tokenizer, feats)
    tc = TrainConfig(self_critical_epochs=6, self_critical_lr=3e-2, self_critical_samples=4, self_critical_batch=12,
                     precision=precision)
    seen = []
    model, state = sc.fine_tune(model, feats, refs, dev_feats, dev_refs, tokenizer, "en", tc, tmp_path / "sc",
                                progress=lambda e: "step" not in e and seen.append(e["epoch"]))
    history = state["history"]
    assert model is given and model.dtype_policy.name == "float32"
    assert {w.dtype for w in model.weights if "float" in w.dtype} == {"float32"}
    assert seen == [1, 2, 3, 4, 5, 6] and [h["epoch"] for h in history] == [0, 1, 2, 3, 4, 5, 6]
    assert history[-1]["reward"] > 3 * history[1]["reward"]  # the training samples score higher and higher
    best = max(history, key=lambda h: h["dev_cider_d"])
    assert state["best_epoch"] == best["epoch"] > 0
    # The model returned is the best epoch's: its greedy dev captions score what that epoch scored.
    from toolkit.generate import beam_search_tf

    ids = beam_search_tf(model, dev_feats, BOS_ID, EOS_ID, beam=1, max_length=8)
    hyps = [bleu_tokenize(t, "en") for t in tokenizer.decode(ids)]
    assert CiderD(dev_refs).score(hyps, range(len(hyps))).mean() == pytest.approx(best["dev_cider_d"], abs=1e-6)


def _taught_model(tokenizer, feats, max_length=16):
    """A decoder teacher-forced on each photo's longer caption (its pieces are nearly letters: 16 steps, not 8)."""
    import keras

    keras.utils.set_random_seed(0)
    cfg = DecoderConfig(vocab_size=tokenizer.vocab_size, feature_dim=8, embed_dim=16, units=32, dropout=0.0,
                        max_length=max_length)
    model = dec.training_model(cfg, TrainConfig(), feats)
    ids = tokenizer.encode([CAPTIONS[k][1] for k in np.argmax(feats[:, :4], axis=1)])
    inputs, targets = (np.full((len(ids), max_length), PAD_ID, np.int32) for _ in range(2))
    for i, s in enumerate(ids):
        s = (s + [EOS_ID])[:max_length]
        targets[i, :len(s)], inputs[i, :len(s)] = s, [BOS_ID] + s[:-1]
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD_ID))
    model.fit((feats, inputs), targets, epochs=30, batch_size=16, verbose=0)
    return model


def test_a_bleu_reward_climbs_and_the_kept_epoch_is_the_best_dev_bleu4(tokenizer, tmp_path):
    """Rewarded by sentence BLEU-4, the stage keeps the epoch whose greedy dev captions score the best corpus BLEU-4."""
    import warnings

    from nltk.translate.bleu_score import corpus_bleu

    feats, refs = _task(12)
    dev_feats, dev_refs = _task(3, seed=1)
    tc = TrainConfig(self_critical_epochs=3, self_critical_lr=1e-2, self_critical_samples=4, self_critical_batch=12,
                     self_critical_reward="bleu4")
    model, state = sc.fine_tune(_taught_model(tokenizer, feats), feats, refs, dev_feats, dev_refs, tokenizer, "en",
                                tc, tmp_path / "sc")
    history = state["history"]
    assert history[-1]["reward"] > history[1]["reward"]
    assert all(h["dev_score"] == h["dev_bleu4"] for h in history)
    best = max(history, key=lambda h: h["dev_bleu4"])
    assert state["best_epoch"] == best["epoch"] and best["dev_bleu4"] > 50
    from toolkit.generate import beam_search_tf

    ids = beam_search_tf(model, dev_feats, BOS_ID, EOS_ID, beam=1, max_length=16)
    hyps = [bleu_tokenize(t, "en") for t in tokenizer.decode(ids)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert 100 * corpus_bleu(dev_refs, hyps) == pytest.approx(best["dev_bleu4"], abs=1e-9)


def test_the_summed_reward_is_cider_d_plus_sentence_bleu4_and_so_is_its_dev_measure():
    from toolkit.evaluate import SentenceBleu

    _, refs = _task(3)
    hyps = [bleu_tokenize(t, "en") for t in ["a dog runs on a bed", "a cat", "two men", "a girl swims in water"] * 3]
    both = sc.Reward("cider-d+bleu4", refs)
    images = [0, 5, 6, 11, 2, 2]
    assert both.score(hyps[:6], images) == pytest.approx(
        CiderD(refs).score(hyps[:6], images) + SentenceBleu(refs).score(hyps[:6], images))
    dev = both.dev(hyps)
    assert dev["dev_score"] == pytest.approx(dev["dev_cider_d"] + dev["dev_bleu4"])
    assert dev["dev_cider_d"] == pytest.approx(sc.Reward("cider-d", refs).dev(hyps)["dev_score"])
    assert "dev_bleu4" not in sc.Reward("cider-d", refs).dev(hyps)
    with pytest.raises(ValueError, match="must be one of cider-d, bleu4, cider-d\\+bleu4, not 'bleu'"):
        sc.Reward("bleu", refs)


def test_a_fine_tuning_that_only_hurts_returns_the_model_it_was_given(tokenizer, tmp_path):
    feats, refs = _task(12)
    model = _model(tokenizer, feats)
    tc = TrainConfig(self_critical_epochs=2, self_critical_lr=3e-2, self_critical_samples=4, self_critical_batch=12)
    # First teach it the task, then fine-tune again with a step so large it can only wreck it.
    model, _ = sc.fine_tune(model, feats, refs, feats, refs, tokenizer, "en",
                            TrainConfig(**{**tc.__dict__, "self_critical_epochs": 6}), tmp_path / "teach")
    before = [w.copy() for w in model.get_weights()]
    wreck = TrainConfig(**{**tc.__dict__, "self_critical_lr": 50.0, "clipnorm": 0})
    model, state = sc.fine_tune(model, feats, refs, feats, refs, tokenizer, "en", wreck, tmp_path / "wreck")
    assert state["best_epoch"] == 0
    assert all(h["dev_cider_d"] < state["history"][0]["dev_cider_d"] for h in state["history"][1:])
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_a_stopped_fine_tuning_resumes_at_its_next_epoch(tokenizer, tmp_path):
    feats, refs = _task(6)
    tc = TrainConfig(self_critical_epochs=1, self_critical_lr=1e-2, self_critical_samples=3, self_critical_batch=8)
    _, first = sc.fine_tune(_model(tokenizer, feats), feats, refs, feats, refs, tokenizer, "en", tc, tmp_path / "sc")
    epochs = []
    more = TrainConfig(**{**tc.__dict__, "self_critical_epochs": 3})
    _, state = sc.fine_tune(_model(tokenizer, feats, seed=5), feats, refs, feats, refs, tokenizer, "en", more,
                            tmp_path / "sc", progress=lambda e: "step" not in e and epochs.append(e["epoch"]))
    assert epochs == [2, 3]
    assert state["history"][:2] == first["history"]
    assert json.loads((tmp_path / "sc" / sc.STATE_FILE).read_text())["epoch"] == 3


def test_a_stage_stopped_before_rewards_had_names_resumes(tokenizer, tmp_path):
    """A state file written before `self_critical_reward` (its best under "best_dev_cider_d") resumes as CIDEr-D's."""
    feats, refs = _task(6)
    tc = TrainConfig(self_critical_epochs=1, self_critical_lr=1e-2, self_critical_samples=3, self_critical_batch=8)
    _, first = sc.fine_tune(_model(tokenizer, feats), feats, refs, feats, refs, tokenizer, "en", tc, tmp_path / "sc")
    old = {**first, "best_dev_cider_d": first["best_dev_score"],
           "history": [{k: v for k, v in h.items() if k != "dev_score"} for h in first["history"]]}
    del old["best_dev_score"]
    (tmp_path / "sc" / sc.STATE_FILE).write_text(json.dumps(old))
    _, state = sc.fine_tune(_model(tokenizer, feats), feats, refs, feats, refs, tokenizer, "en",
                            TrainConfig(**{**tc.__dict__, "self_critical_epochs": 2}), tmp_path / "sc")
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2]
    best = max(state["history"], key=lambda h: h["dev_cider_d"])
    assert state["best_epoch"] == best["epoch"] and state["best_dev_score"] == best["dev_cider_d"]


def test_a_cosine_schedule_decays_the_rate_to_zero_over_every_epoch_and_survives_a_resume(tokenizer, tmp_path):
    feats, refs = _task(6)
    tc = TrainConfig(self_critical_epochs=1, self_critical_lr=1e-2, self_critical_samples=3, self_critical_batch=8,
                     self_critical_lr_schedule="cosine")
    steps = -(-len(refs) // 8)
    assert [sc.learning_rate(tc, s, 2 * steps) for s in (0, steps, 2 * steps)] == pytest.approx([1e-2, 5e-3, 0.0])
    _, first = sc.fine_tune(_model(tokenizer, feats), feats, refs, feats, refs, tokenizer, "en",
                            TrainConfig(**{**tc.__dict__, "self_critical_epochs": 2}), tmp_path / "whole")
    # The optimizer's rate at each epoch's end is the schedule's over both epochs, also when the second is resumed.
    assert [h["lr"] for h in first["history"][1:]] == pytest.approx(
        [sc.learning_rate(tc, s, 2 * steps) for s in (steps - 1, 2 * steps - 1)])
    sc.fine_tune(_model(tokenizer, feats), feats, refs, feats, refs, tokenizer, "en", tc, tmp_path / "split")
    _, resumed = sc.fine_tune(_model(tokenizer, feats), feats, refs, feats, refs, tokenizer, "en",
                              TrainConfig(**{**tc.__dict__, "self_critical_epochs": 2}), tmp_path / "split")
    assert resumed["history"][-1]["lr"] == pytest.approx(first["history"][-1]["lr"], rel=1e-6)


def test_fine_tuning_an_output_fed_attention_decoder_on_grids(tokenizer, tmp_path):
    """Self-critical steps replay samples through the attention decoder's batched teacher forcing, on grids."""
    import keras

    feats, refs = _task(12)
    dev_feats, dev_refs = _task(3, seed=1)
    grids, dev_grids = (np.stack([f, 0.5 * f], axis=1) for f in (feats, dev_feats))  # (n, 2 cells, 8)
    keras.utils.set_random_seed(0)
    cfg = DecoderConfig(architecture="attention", attention_feed="output", attention_score="dot", vocab_size=tokenizer.vocab_size,
                        feature_dim=8, embed_dim=16, units=32, dropout=0.0, max_length=8)
    model = dec.training_model(cfg, TrainConfig(), grids)
    tc = TrainConfig(self_critical_epochs=4, self_critical_lr=3e-2, self_critical_samples=4, self_critical_batch=12)
    model, state = sc.fine_tune(model, grids, refs, dev_grids, dev_refs, tokenizer, "en", tc, tmp_path / "sc")
    history = state["history"]
    assert isinstance(model, dec.OutputAttentionDecoder)
    assert history[-1]["reward"] > 2 * history[1]["reward"]
    best = max(history, key=lambda h: h["dev_cider_d"])
    assert state["best_epoch"] == best["epoch"] > 0
    from toolkit.generate import beam_search_tf

    ids = beam_search_tf(model, dev_grids, BOS_ID, EOS_ID, beam=1, max_length=8)
    hyps = [bleu_tokenize(t, "en") for t in tokenizer.decode(ids)]
    assert CiderD(dev_refs).score(hyps, range(len(hyps))).mean() == pytest.approx(best["dev_cider_d"], abs=1e-6)


def test_without_dropout_the_gradient_step_scores_the_samples_by_the_policy_that_drew_them(tokenizer):
    """The loss's log-probabilities are the step-by-step ones the sampler used; with dropout on they are not."""
    import keras

    feats, _ = _task(1)
    keras.utils.set_random_seed(0)
    cfg = DecoderConfig(vocab_size=tokenizer.vocab_size, feature_dim=8, embed_dim=16, units=32, dropout=0.5, max_length=8)
    model = dec.training_model(cfg, TrainConfig(), feats)
    model.head.kernel.assign(model.head.kernel * 10)  # peaked, as a trained model's, so dropout shows in its output
    ids = sc.sampler(model, samples=6, max_length=8)(feats[:2], np.array([1, 2], np.int32)).numpy()
    images = np.repeat(feats[:2], 6, axis=0)
    adv = np.linspace(-1, 1, len(ids)).astype(np.float32)
    # The sampler's own log-probabilities: one step at a time from the initial state, feeding the samples back.
    state, tokens, total = model.initial_state(images), np.full(len(ids), BOS_ID, np.int32), 0.0
    for t in range(ids.shape[1]):
        logp, *state = model.step(tokens, *state)
        real = ids[:, t] != PAD_ID
        total += float(np.sum(adv[real] * logp.numpy()[real, ids[real, t]]))
        tokens = ids[:, t]
    expected = -total / np.sum(ids != PAD_ID)
    inputs = sc._teacher_inputs(ids)
    assert float(sc.policy_loss(model, images, inputs, ids, adv, training=False)) == pytest.approx(expected, rel=1e-4)
    assert float(sc.policy_loss(model, images, inputs, ids, adv, training=True)) != pytest.approx(expected, rel=1e-2)
