"""The compiled searches (`greedy_tf`, `beam_search_tf`) pick the same ids as the numpy reference."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from toolkit.generate import KerasStepModel, beam_search, beam_search_tf, greedy, greedy_tf

BOS, EOS = 1, 2


ARCHITECTURES = ("lstm", "merge", "attention")


@functools.lru_cache(maxsize=None)
def random_step_model(architecture: str, seed: int):
    """One traced step function per decoder, shared by its tests."""
    model, feats = random_decoder(seed, architecture)
    return KerasStepModel(model), feats


def random_decoder(seed: int, architecture: str = "lstm", vocab: int = 12, units: int = 16, fdim: int = 8,
                   positions: int = 5):
    """A small random decoder and features for 7 images (grids of `positions` cells for attention).

    The attention decoder's state is four tensors, two of them per-image
    grids that beams must reorder with h and c; the others carry (h, c) or
    (h, c, image vector).
    """
    import keras

    from toolkit.config import DecoderConfig
    from toolkit.decoder import decoder_class

    keras.utils.set_random_seed(seed)
    cfg = DecoderConfig(architecture=architecture, vocab_size=vocab, feature_dim=fdim, embed_dim=8, units=units,
                        dropout=0.0, max_length=12, deep_output=bool(seed % 2))
    model = decoder_class(cfg)(cfg)
    shape = (positions, fdim) if architecture == "attention" else (fdim,)
    model.norm.adapt(np.random.default_rng(seed).normal(size=(20, *shape)).astype(np.float32))
    model.build_all(fdim)
    # Sharper next-token distributions than the initialisation gives, so captions end and beams diverge.
    w, b = model.head.get_weights()
    model.head.set_weights([w * 4, b])
    if architecture == "attention":  # sharper attention too, so that where the model looks changes what it says
        sharpen = model.att_keys if model.att_score is None else model.att_score  # dot-product scores: the keys
        sharpen.set_weights([w * 8 for w in sharpen.get_weights()])
    feats = np.random.default_rng(seed + 100).normal(size=(7, *shape)).astype(np.float32)
    return model, feats


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beam,length_penalty,no_repeat",
                         [(1, 0.0, 0), (3, 0.0, 0), (5, 0.0, 0), (3, 1.0, 0), (5, 0.0, 2), (3, 0.7, 1)])
def test_compiled_beam_search_equals_numpy(architecture, seed, beam, length_penalty, no_repeat):
    step, feats = random_step_model(architecture, seed)
    want = beam_search(step, feats, BOS, EOS, beam=beam, max_length=12,
                       length_penalty=length_penalty, no_repeat_ngram=no_repeat)
    got = beam_search_tf(step, feats, BOS, EOS, beam=beam, max_length=12,
                         length_penalty=length_penalty, no_repeat_ngram=no_repeat)
    assert got == want
    assert len({str(c) for c in got}) > 1  # the images are told apart


def test_compiled_greedy_equals_numpy_and_the_settings_matter():
    model, feats = random_decoder(5)
    step = KerasStepModel(model)
    g = greedy_tf(model, feats, BOS, EOS, max_length=12)
    assert g == greedy(step, feats, BOS, EOS, max_length=12)
    # The test would be vacuous if beams, penalties and bans changed nothing on this model.
    outs = {str(beam_search_tf(step, feats, BOS, EOS, beam=k, max_length=12, length_penalty=lp, no_repeat_ngram=nr))
            for k, lp, nr in [(1, 0, 0), (5, 0, 0), (5, 1.0, 0), (1, 0, 1)]}
    assert len(outs) >= 3
    assert any(len(c) == 12 for c in g) or any(len(c) < 12 for c in g)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_compiled_search_handles_any_batch_and_no_images(architecture):
    model, feats = random_decoder(0, architecture)
    step = KerasStepModel(model)
    whole = beam_search_tf(step, feats, BOS, EOS, beam=3, max_length=12)
    # One traced graph serves every batch size; rows do not influence each other: beams reorder every part of
    # the state (for attention, the per-image annotations with h and c), so an image gets its own caption
    # alone or in a batch.
    assert [beam_search_tf(step, feats[i : i + 1], BOS, EOS, beam=3, max_length=12)[0] for i in range(len(feats))] == whole
    assert beam_search_tf(step, feats[:0], BOS, EOS, beam=3, max_length=12) == []
    assert len(step._searches) == 1


def test_no_repeat_ngram_holds_in_the_compiled_search():
    model, feats = random_decoder(1, vocab=6)
    for n in (1, 2, 3):
        for caption in beam_search_tf(model, feats, BOS, EOS, beam=3, max_length=12, no_repeat_ngram=n):
            grams = [tuple(caption[i : i + n]) for i in range(len(caption) - n + 1)]
            assert len(grams) == len(set(grams)), (n, caption)
