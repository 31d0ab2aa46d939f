"""Caption generation: greedy and beam search, batched over images and beams.

Search talks to the model through a narrow interface (`StepModel`), so it is
tested against a hand-written table of next-token probabilities, and the
TensorFlow decoder plugs in through `KerasStepModel`, whose step is one
compiled call for every image and beam at once, carrying the LSTM state.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

State = tuple[np.ndarray, ...]


class StepModel(Protocol):
    def initial_state(self, features: np.ndarray) -> State: ...

    def step(self, tokens: np.ndarray, state: State) -> tuple[np.ndarray, State]:
        """tokens (n,) -> log-probabilities (n, vocab) of the next token, new state (rows follow tokens)."""
        ...


class KerasStepModel:
    """Adapts a `CaptionDecoder` to `StepModel` with traced, shape-generic TF functions."""

    def __init__(self, decoder):
        import tensorflow as tf

        self.decoder = decoder
        units = decoder.config.units
        fdim = decoder.config.feature_dim
        self._init = tf.function(
            lambda f: decoder.initial_state(f),
            input_signature=[tf.TensorSpec([None, fdim], tf.float32)],
        )
        self._step = tf.function(
            lambda t, h, c: decoder.step(t, h, c),
            input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, units], tf.float32),
                             tf.TensorSpec([None, units], tf.float32)],
        )

    def initial_state(self, features):
        h, c = self._init(np.asarray(features, np.float32))
        return h.numpy(), c.numpy()

    def step(self, tokens, state):
        logp, h, c = self._step(np.asarray(tokens, np.int32), *state)
        return logp.numpy(), (h.numpy(), c.numpy())


def greedy(model: StepModel, features: np.ndarray, bos: int, eos: int, max_length: int = 40) -> list[list[int]]:
    """Most likely token at each step, for all images at once; ids without BOS/EOS."""
    return beam_search(model, features, bos, eos, beam=1, max_length=max_length)


def beam_search(
    model: StepModel,
    features: np.ndarray,
    bos: int,
    eos: int,
    beam: int = 3,
    max_length: int = 40,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
) -> list[list[int]]:
    """The best caption of each image by beam search; ids without BOS/EOS.

    Rows are image-major: row b*K + k is beam k of image b. A finished beam
    keeps its score and only extends by EOS, so it competes with the live
    ones unchanged. Final choice divides the score by length**length_penalty
    (0: raw log-probability). `no_repeat_ngram=n` forbids any n-gram twice
    in one caption (the "a dog a dog a dog" failure).

    >>> beam_search(table_model, feats, bos=1, eos=2, beam=2)
    [[5, 7], [6]]
    """
    n = len(features)
    if n == 0:
        return []
    K = max(1, int(beam))
    state = model.initial_state(features)
    state = tuple(np.repeat(s, K, axis=0) for s in state)
    scores = np.full((n, K), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    scores = scores.reshape(-1)
    seqs = np.zeros((n * K, 0), np.int64)
    finished = np.zeros(n * K, bool)
    tokens = np.full(n * K, bos, np.int64)
    for t in range(max_length):
        logp, state = model.step(tokens, state)
        logp = np.asarray(logp, np.float64)
        V = logp.shape[1]
        if no_repeat_ngram > 0 and t + 1 >= no_repeat_ngram:
            _ban_repeats(logp, seqs, no_repeat_ngram, finished)
            dead = np.isneginf(logp).all(axis=1)
            logp[dead, eos] = -1e9  # every word banned: end the caption rather than emit garbage
        logp[finished] = -np.inf
        logp[finished, eos] = 0.0
        cand = (scores[:, None] + logp).reshape(n, K * V)
        top = np.argpartition(-cand, K - 1, axis=1)[:, :K] if K < K * V else np.tile(np.arange(K * V), (n, 1))
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(cand, top, 1), axis=1), 1)
        src = (top // V + np.arange(n)[:, None] * K).reshape(-1)
        tok = (top % V).reshape(-1)
        scores = np.take_along_axis(cand, top, 1).reshape(-1)
        seqs = np.concatenate([seqs[src], tok[:, None]], axis=1)
        finished = finished[src] | (tok == eos)
        state = tuple(s[src] for s in state)
        tokens = tok
        if finished.all():
            break
    out = []
    for b in range(n):
        best, best_score = None, -np.inf
        for k in range(K):
            r = b * K + k
            ids = list(seqs[r])
            ids = ids[: ids.index(eos)] if eos in ids else ids
            s = scores[r] / (max(1, len(ids) + 1) ** length_penalty)
            if best is None or s > best_score:  # all beams may be -inf when every token was banned
                best, best_score = ids, s
        out.append([int(i) for i in best])
    return out


def _ban_repeats(logp: np.ndarray, seqs: np.ndarray, n: int, finished: np.ndarray) -> None:
    for r in range(len(seqs)):
        if finished[r]:
            continue
        seq = seqs[r].tolist()
        prefix = tuple(seq[len(seq) - n + 1 :]) if n > 1 else ()
        for i in range(len(seq) - n + 1):
            if tuple(seq[i : i + n - 1]) == prefix:
                logp[r, seq[i + n - 1]] = -np.inf
