"""Caption generation: greedy and beam search, batched over images and beams.

Search talks to the model through a narrow interface (`StepModel`), so it is
tested against a hand-written table of next-token probabilities, and the
TensorFlow decoders plug in through `KerasStepModel`, whose step is one
compiled call for every image and beam at once, carrying the decoder's state:
a tuple of tensors with one row per image and beam, whatever the
architecture puts in it ((h, c) for the LSTM; h, c and the image's
annotations for the attention decoder).
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
    """Adapts a decoder (`CaptionDecoder`, `AttentionDecoder`) to `StepModel` with traced, shape-generic TF functions.

    The decoder provides `feature_spec()` (what its features look like),
    `initial_state(features)` -> tuple of tensors and
    `step(tokens, *state)` -> (log_probs, *state).
    """

    def __init__(self, decoder):
        import tensorflow as tf

        self.decoder = decoder
        self._searches: dict[tuple, object] = {}  # compiled whole searches, by setting
        self._init = tf.function(lambda f: tuple(decoder.initial_state(f)), input_signature=[decoder.feature_spec()])
        self._step = None  # traced at the first step, once the state's shapes are known

    def initial_state(self, features):
        return tuple(s.numpy() for s in self._init(np.asarray(features, np.float32)))

    def step(self, tokens, state):
        if self._step is None:
            import tensorflow as tf

            # Any number of rows (and grid positions): only the widths are fixed.
            specs = [tf.TensorSpec([None] * (np.ndim(s) - 1) + [np.shape(s)[-1]], tf.float32) for s in state]
            decoder = self.decoder
            self._step = tf.function(lambda t, *s: decoder.step(t, *s),
                                     input_signature=[tf.TensorSpec([None], tf.int32), *specs])
        logp, *state = self._step(np.asarray(tokens, np.int32), *state)
        return logp.numpy(), tuple(s.numpy() for s in state)

    def search(self, features, bos, eos, beam=3, max_length=40, length_penalty=0.0, no_repeat_ngram=0):
        """The whole search as one compiled call (see `beam_search_tf`); ids without BOS/EOS."""
        features = np.asarray(features, np.float32)
        if len(features) == 0:
            return []
        key = (int(bos), int(eos), max(1, int(beam)), int(max_length), float(length_penalty), int(no_repeat_ngram))
        if key not in self._searches:
            self._searches[key] = _compiled_search(self.decoder, *key)
        ids, lengths = self._searches[key](features)
        return [row[:n].tolist() for row, n in zip(ids.numpy(), lengths.numpy())]


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


def beam_search_batched(step, feats, bos, eos, beam, max_length, length_penalty=0.0, no_repeat_ngram=0, batch=64):
    """Beam search in chunks of `batch` images, so memory stays flat on big folders.

    `feats` is an array or anything sliceable into arrays (`Encoder.features_view`). A `KerasStepModel` runs the compiled search (one TensorFlow call per
    chunk); any other `StepModel` the numpy reference, which picks the same ids.
    """
    search = getattr(step, "search", None) or (lambda f, *a: beam_search(step, f, *a))
    out = []
    for i in range(0, len(feats), batch):
        out += search(feats[i : i + batch], bos, eos, beam, max_length, length_penalty, no_repeat_ngram)
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


# -- compiled search --------------------------------------------------------------
# The same algorithm as `beam_search`, as one TensorFlow graph per search setting:
# a tf.while_loop over steps carrying the decoder's state tuple, all images x beams
# in one batch.
# Scores are float64 like the numpy reference, so both pick the same ids.


def greedy_tf(decoder, features: np.ndarray, bos: int, eos: int, max_length: int = 40,
              no_repeat_ngram: int = 0) -> list[list[int]]:
    """`greedy` as one compiled TensorFlow loop over a `CaptionDecoder`; ids without BOS/EOS."""
    return beam_search_tf(decoder, features, bos, eos, beam=1, max_length=max_length, no_repeat_ngram=no_repeat_ngram)


def beam_search_tf(
    decoder,
    features: np.ndarray,
    bos: int,
    eos: int,
    beam: int = 3,
    max_length: int = 40,
    length_penalty: float = 0.0,
    no_repeat_ngram: int = 0,
) -> list[list[int]]:
    """`beam_search` as one compiled TensorFlow loop; same arguments, same ids.

    `decoder` is a `CaptionDecoder` or `AttentionDecoder` (anything with
    `feature_spec()`, `initial_state(f)` and `step(tokens, *state)`) or a
    `KerasStepModel` wrapping one. One graph is
    traced per (beam, max_length, length_penalty, no_repeat_ngram, bos, eos)
    and reused for any number of images.

    >>> beam_search_tf(decoder, feats, BOS_ID, EOS_ID, beam=3)
    [[12, 7, 40], [9, 33]]
    """
    step = decoder if isinstance(decoder, KerasStepModel) else KerasStepModel(decoder)
    return step.search(features, bos, eos, beam, max_length, length_penalty, no_repeat_ngram)


def _compiled_search(decoder, bos: int, eos: int, K: int, L: int, length_penalty: float, n_gram: int):
    """A tf.function features (n, ...) -> (ids (n, L) int32, lengths (n,) int32) for one search setting."""
    import tensorflow as tf

    V = decoder.config.vocab_size
    NEG = tf.constant(-np.inf, tf.float64)

    def ban_repeats(logp, seqs, t, finished):
        # Tokens that would complete an n-gram already in the row: windows i of
        # seqs[:, i:i+n-1] equal to the last n-1 tokens ban the token at i+n-1.
        W = L - n_gram + 1
        if W <= 0:
            return logp
        i = tf.range(W)
        match = tf.broadcast_to(i[None, :] <= t - n_gram, tf.shape(seqs[:, :W]))
        for j in range(n_gram - 1):
            last = tf.gather(seqs, tf.maximum(t - n_gram + 1 + j, 0), axis=1)
            match &= tf.equal(seqs[:, j : j + W], last[:, None])
        match &= ~finished[:, None]
        R = tf.shape(seqs)[0]
        rows = tf.broadcast_to(tf.range(R)[:, None], [R, W])
        idx = tf.stack([rows, seqs[:, n_gram - 1 : n_gram - 1 + W]], axis=-1)
        banned = tf.scatter_nd(tf.reshape(idx, [-1, 2]), tf.reshape(tf.cast(match, tf.int32), [-1]), [R, V]) > 0
        logp = tf.where(banned, NEG, logp)
        # Every word banned: end the caption rather than emit garbage.
        dead = tf.reduce_all(tf.math.is_inf(logp) & (logp < 0), axis=1)
        return tf.where(dead[:, None] & tf.equal(tf.range(V), eos)[None, :], tf.constant(-1e9, tf.float64), logp)

    @tf.function(input_signature=[decoder.feature_spec()])
    def search(features):
        n = tf.shape(features)[0]
        R = n * K
        state = tuple(tf.repeat(s, K, axis=0) for s in decoder.initial_state(features))
        first = tf.one_hot(0, K, on_value=0.0, off_value=-np.inf, dtype=tf.float64)  # expand only beam 0
        scores = tf.reshape(tf.tile(first[None], [n, 1]), [-1])
        seqs = tf.zeros([R, L], tf.int32)
        finished = tf.zeros([R], tf.bool)
        tokens = tf.fill([R], bos)
        eos_only = tf.where(tf.equal(tf.range(V), eos), tf.constant(0.0, tf.float64), NEG)
        offsets = tf.repeat(tf.range(n) * K, K)

        def body(t, state, scores, seqs, finished, tokens):
            logp, *state = decoder.step(tokens, *state)
            logp = tf.cast(logp, tf.float64)
            if n_gram > 0:
                logp = ban_repeats(logp, seqs, t, finished)
            logp = tf.where(finished[:, None], eos_only[None, :], logp)
            cand = tf.reshape(scores[:, None] + logp, [n, K * V])
            top_scores, top = tf.math.top_k(cand, k=K, sorted=True)
            tok = tf.reshape(top % V, [-1])
            scores = tf.reshape(top_scores, [-1])
            if K > 1:  # beams reorder: every row follows its source
                src = tf.reshape(top // V, [-1]) + offsets
                state = [tf.gather(s, src) for s in state]
                seqs, finished = tf.gather(seqs, src), tf.gather(finished, src)
            seqs = tf.where(tf.equal(tf.range(L), t)[None, :], tok[:, None], seqs)
            finished = finished | tf.equal(tok, eos)
            return t + 1, tuple(state), scores, seqs, finished, tok

        def cond(t, state, scores, seqs, finished, tokens):
            return (t < L) & ~tf.reduce_all(finished)

        t, _, scores, seqs, _, _ = tf.while_loop(
            cond, body, (tf.constant(0), state, scores, seqs, finished, tokens), maximum_iterations=L)
        is_eos = tf.equal(seqs, eos) & (tf.range(L)[None, :] < t)
        lengths = tf.where(tf.reduce_any(is_eos, axis=1), tf.argmax(tf.cast(is_eos, tf.int32), axis=1, output_type=tf.int32), t)
        if length_penalty:
            norm = tf.cast(lengths + 1, tf.float64) ** tf.constant(length_penalty, tf.float64)
            scores = scores / norm
        best = tf.argmax(tf.reshape(scores, [n, K]), axis=1, output_type=tf.int32) + tf.range(n) * K
        return tf.gather(seqs, best), tf.gather(lengths, best)

    return search
