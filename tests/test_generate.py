"""Greedy and beam search against hand-written next-token tables (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.generate import beam_search, greedy

BOS, EOS = 1, 2


class TableModel:
    """Next-token probabilities by the previous token (a bigram table per image).

    State is (image row, last token), so rows reorder exactly as the search permutes them.
    """

    def __init__(self, tables: list[dict[int, dict[int, float]]], vocab: int = 8):
        self.tables, self.vocab = tables, vocab
        self.calls = 0

    def initial_state(self, features):
        return (np.asarray(features, np.int64).reshape(-1),)

    def step(self, tokens, state):
        self.calls += 1
        (img,) = state
        out = np.full((len(tokens), self.vocab), -np.inf)
        for r, (i, t) in enumerate(zip(img, tokens)):
            for tok, p in self.tables[i].get(int(t), {EOS: 1.0}).items():
                out[r, tok] = np.log(p)
        return out, (img,)


# Image 0: greedy takes 3 (0.6) then 5 (0.55): 0.33 in all;
# the path 4 (0.4) -> 7 (1.0) -> EOS is 0.40, so beam 2 finds [4, 7] and greedy [3, 5].
TABLE_0 = {BOS: {3: 0.6, 4: 0.4}, 3: {5: 0.55, 6: 0.45}, 4: {7: 1.0}, 5: {EOS: 1.0}, 6: {EOS: 1.0}, 7: {EOS: 1.0}}
# Image 1: a single obvious caption.
TABLE_1 = {BOS: {6: 0.9, 3: 0.1}, 6: {EOS: 1.0}, 3: {EOS: 1.0}}


def test_greedy_takes_the_locally_best_token():
    m = TableModel([TABLE_0, TABLE_1])
    assert greedy(m, np.array([0, 1]), BOS, EOS) == [[3, 5], [6]]


def test_beam_finds_the_globally_better_caption():
    m = TableModel([TABLE_0, TABLE_1])
    assert beam_search(m, np.array([0, 1]), BOS, EOS, beam=2) == [[4, 7], [6]]


def test_batched_over_images_one_step_call_per_token():
    m = TableModel([TABLE_0, TABLE_1] * 10)
    out = beam_search(m, np.array([0, 1] * 10), BOS, EOS, beam=3)
    assert out == [[4, 7], [6]] * 10
    assert m.calls <= 4  # three tokens at most, all 20 images x 3 beams per call


def test_max_length_cuts_endless_captions():
    loop = {BOS: {3: 1.0}, 3: {3: 1.0}}
    assert greedy(TableModel([loop]), np.array([0]), BOS, EOS, max_length=5) == [[3, 3, 3, 3, 3]]


def test_no_repeat_ngram_stops_a_dog_a_dog():
    # "a dog a dog ..." is the most likely path; forbidding a repeated bigram forces the way out.
    a, dog, runs, cat = 3, 4, 5, 6
    table = {BOS: {a: 1.0}, a: {dog: 0.9, cat: 0.1}, dog: {a: 0.7, runs: 0.3}, runs: {EOS: 1.0}, cat: {EOS: 1.0}}
    assert greedy(TableModel([table]), np.array([0]), BOS, EOS, max_length=7)[0][:4] == [a, dog, a, dog]
    assert beam_search(TableModel([table]), np.array([0]), BOS, EOS, beam=1, no_repeat_ngram=2) == [[a, dog, a, cat]]
    # Where nothing but a repeat is possible, the caption ends instead.
    only = {BOS: {a: 1.0}, a: {dog: 1.0}, dog: {a: 1.0}}
    assert beam_search(TableModel([only]), np.array([0]), BOS, EOS, beam=2, no_repeat_ngram=2) == [[a, dog, a]]


def test_length_penalty_prefers_longer_captions():
    # Short: 0.5 -> EOS. Long: 0.5 * 0.9 * 0.9 ... ; raw scores pick short, normalised pick long.
    table = {BOS: {3: 0.5, 4: 0.5}, 3: {EOS: 1.0}, 4: {5: 0.9}, 5: {6: 0.9}, 6: {EOS: 1.0}}
    assert beam_search(TableModel([table]), np.array([0]), BOS, EOS, beam=2) == [[3]]
    assert beam_search(TableModel([table]), np.array([0]), BOS, EOS, beam=2, length_penalty=1.0) == [[4, 5, 6]]


def test_empty_batch():
    assert beam_search(TableModel([]), np.zeros((0,)), BOS, EOS, beam=3) == []



def test_batched_search_in_chunks_equals_one_search_over_all():
    from toolkit.generate import beam_search_batched

    feats = np.array([0, 1] * 5)
    whole = beam_search(TableModel([TABLE_0, TABLE_1] * 5), feats, BOS, EOS, beam=2)
    m = TableModel([TABLE_0, TABLE_1] * 5)
    assert beam_search_batched(m, feats, BOS, EOS, 2, 40, batch=3) == whole == [[4, 7], [6]] * 5
    assert beam_search_batched(m, feats[:0], BOS, EOS, 2, 40) == []


def test_batched_search_reads_a_feature_view_one_chunk_at_a_time():
    """The grids of a big folder never sit in memory at once: each chunk is read when its search starts."""
    from toolkit.encoder import FeatureView
    from toolkit.generate import beam_search_batched

    rows = {f"k{i}": np.array([i % 2]) for i in range(7)}
    reads = []

    def read(keys):
        reads.append(list(keys))
        return np.stack([rows[k] for k in keys])

    view = FeatureView(read, list(rows), (1,))
    np.testing.assert_array_equal(view[2:5], [[0], [1], [0]])
    reads.clear()
    out = beam_search_batched(TableModel([TABLE_0, TABLE_1]), view, BOS, EOS, 2, 40, batch=3)
    assert out == [[4, 7], [6]] * 3 + [[4, 7]]
    assert [len(r) for r in reads] == [3, 3, 1]

@pytest.mark.parametrize("beam", [1, 2, 4])
def test_keras_step_model_agrees_with_the_full_sequence_model(beam):
    """Stepping the LSTM with carried state gives the same logits as the teacher-forced pass."""
    import tensorflow as tf

    from toolkit.config import DecoderConfig
    from toolkit.decoder import CaptionDecoder
    from toolkit.generate import KerasStepModel

    cfg = DecoderConfig(vocab_size=20, feature_dim=8, embed_dim=4, units=6, dropout=0.0)
    model = CaptionDecoder(cfg)
    model.norm.adapt(np.random.default_rng(0).normal(size=(10, 8)).astype(np.float32))
    model.build_all(8)
    feats = np.random.default_rng(1).normal(size=(3, 8)).astype(np.float32)
    tokens = np.array([[BOS, 5, 7, 9]] * 3, np.int32)
    full = tf.nn.log_softmax(model((feats, tokens))).numpy()
    step = KerasStepModel(model)
    state = step.initial_state(feats)
    for t in range(tokens.shape[1]):
        logp, state = step.step(tokens[:, t], state)
        np.testing.assert_allclose(logp, full[:, t], atol=1e-5)
    out = beam_search(step, feats, BOS, EOS, beam=beam, max_length=5)
    assert len(out) == 3 and all(len(o) <= 5 for o in out)
