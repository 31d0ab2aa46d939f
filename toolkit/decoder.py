"""The per-language decoders and what they train with (the training loop: `toolkit.train`).

Three architectures, chosen by `DecoderConfig.architecture`:

- "lstm" (`CaptionDecoder`): the pooled image vector enters as the LSTM's
  initial state (normalised features -> Dense -> h0, c0);
- "attention": the LSTM looks at the encoder's feature grid afresh for
  every word; by default (`attention_feed="output"`,
  `OutputAttentionDecoder`) after each word's LSTM step, so teacher forcing
  needs no loop of its own; with "input" (`AttentionDecoder`, Show, Attend
  and Tell, every pack before the sixteenth session) before it;
- "merge" (`MergeDecoder`): the classic tutorials' design, the image vector
  added to the LSTM's output; the reference point the others must beat.

Both train on tokens by teacher forcing over whole captions, loss masked on
padding. Feature normalisation is a Keras `Normalization` layer adapted on
the train split, so its statistics travel inside the decoder weights. Both
decode through the same narrow interface: `initial_state(features)` returns
a tuple of per-row tensors, `step(tokens, *state)` returns
`(log_probs, *state)`; searches reorder every state tensor with the beams.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.config import DECODER_ARCHITECTURES, PRECISIONS, DecoderConfig, TrainConfig
from toolkit.errors import CapkitError
from toolkit.tokenizer import BOS_ID, EOS_ID, PAD_ID

from toolkit.backend import dtype_policy, import_tensorflow

tf = import_tensorflow()
import keras  # noqa: E402

# TrainConfig.precision -> Keras dtype policy; under the mixed ones logits and loss stay float32.
PRECISION_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


class _PooledFeatures:
    """For the decoders that read one pooled vector per image: their input spec and how their weights are made."""

    def feature_spec(self):
        """What `initial_state` takes: pooled features (n, feature_dim)."""
        return tf.TensorSpec([None, self.config.feature_dim], tf.float32)

    def build_all(self, feature_dim: int):
        """Create every weight (needed before load_weights); returns the model."""
        if not self.norm.built:
            self.norm.build((None, feature_dim))
        self((np.zeros((1, feature_dim), np.float32), np.full((1, 2), BOS_ID, np.int32)))
        return self


class CaptionDecoder(_PooledFeatures, keras.Model):
    """features (n, 2048) + tokens (n, t) -> next-token logits (n, t, vocab).

    Inference goes through `initial_state` and `step`, one token per image per
    call, carrying (h, c); see `toolkit.generate`.
    """

    def __init__(self, config: DecoderConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        c = config
        self.norm = keras.layers.Normalization(axis=-1)
        self.feat_drop = keras.layers.Dropout(c.dropout)
        self.init_h = keras.layers.Dense(c.units, activation="tanh")
        self.init_c = keras.layers.Dense(c.units, activation="tanh")
        self.embed = keras.layers.Embedding(c.vocab_size, c.embed_dim, mask_zero=True)
        self.emb_drop = keras.layers.Dropout(c.dropout)
        self.lstm = keras.layers.LSTM(c.units, return_sequences=True, return_state=True)
        self.out_drop = keras.layers.Dropout(c.dropout)
        self.head = keras.layers.Dense(c.vocab_size, dtype="float32")  # float32 logits under mixed precision

    def initial_state(self, features, training=False):
        x = self.feat_drop(self.norm(features), training=training)
        return self.init_h(x), self.init_c(x)

    def call(self, inputs, training=False):
        features, tokens = inputs
        h, c = self.initial_state(features, training)
        x = self.emb_drop(self.embed(tokens), training=training)
        y, _, _ = self.lstm(x, initial_state=[h, c], mask=tokens != PAD_ID, training=training)
        return _on_real_tokens(self.head, self.out_drop(y, training=training), tokens)

    def step(self, tokens, h, c):
        """One token per row -> (log-probabilities of the next token, h, c)."""
        # The cell alone: one token needs no loop over time (the layer would build one per call).
        # Looked up directly: the layer would attach its padding mask, which the cell cannot take.
        y, (h, c) = self.lstm.cell(tf.gather(self.embed.embeddings, tokens), [h, c])
        return tf.nn.log_softmax(tf.cast(self.head(y), tf.float32)), h, c


class AttentionDecoder(keras.Model):
    """grid features (n, P, 2048) + tokens (n, t) -> next-token logits (n, t, vocab).

    Show, Attend and Tell (Xu et al. 2015) with soft attention. The P = G*G
    grid vectors are normalised per channel and projected to annotations
    a_1..a_P (`units` wide); h0 and c0 come from their mean. For each word
    the previous h scores every annotation, alpha = softmax_i(e_i), the
    context is sum_i alpha_i a_i, and the LSTM cell reads [word embedding,
    context]. The score (`DecoderConfig.attention_score`) is scaled
    dot-product, e_i = (W_h h) . (W_a a_i) / sqrt(units), or the paper's
    additive e_i = v . tanh(W_a a_i + W_h h). The head reads [h, context]
    (or the paper's deep output, see `DecoderConfig.deep_output`). While
    training, the doubly stochastic penalty `attention_reg * sum_i (1 -
    sum_t alpha_ti)**2`, per caption token, keeps the model from staring at
    one cell for the whole caption.

    Teacher forcing runs one tf.while_loop over the batch's steps; dropout,
    the word embeddings, their share of the cell's input product and the
    head act on whole sequences outside it, so the loop holds only the
    attention and the cell's recurrent products. When a batch holds each
    image once (`rows`), dot-product scores and contexts are two products
    against all the batch's annotations at once, masked to each caption's
    own image: no per-caption copy of a 100-cell grid is made, read or
    differentiated; captions are then ordered longest first and step t runs
    only those still going.

    The decoding state is (h, c, annotations, attention keys): the last two
    are per-image tensors the step needs, carried as state so that beams
    reorder them with h and c.

    >>> dec = AttentionDecoder(DecoderConfig(architecture="attention", vocab_size=60)).build_all(2048)
    >>> dec.attention_maps(grids, inputs).shape   # grids (n, 100, 2048), inputs (n, T) BOS first
    (n, T, 100)
    """

    def __init__(self, config: DecoderConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        c = config
        self.norm = keras.layers.Normalization(axis=-1)  # per channel, over images and positions
        self.feat_drop = keras.layers.Dropout(c.dropout)
        self.project = keras.layers.Dense(c.units, activation="relu")  # grid vector -> annotation
        self.init_h = keras.layers.Dense(c.units, activation="tanh")
        self.init_c = keras.layers.Dense(c.units, activation="tanh")
        self.att_keys = keras.layers.Dense(c.attention_width, use_bias=False)  # W_a a_i, once per image
        self.att_query = keras.layers.Dense(c.attention_width)  # W_h h, once per word
        self.att_score = keras.layers.Dense(1, use_bias=False) if c.attention_score == "additive" else None  # v
        self.embed = keras.layers.Embedding(c.vocab_size, c.embed_dim)
        self.emb_drop = keras.layers.Dropout(c.dropout)
        self._recurrent_layers()
        self.deep = keras.layers.Dense(c.embed_dim) if c.deep_output else None
        self.out_drop = keras.layers.Dropout(c.dropout)
        self.head = keras.layers.Dense(c.vocab_size, dtype="float32")  # float32 logits under mixed precision

    def _recurrent_layers(self):
        self.cell = keras.layers.LSTMCell(self.config.units)  # its weights; `_gates` computes what its call would

    def initial_state(self, features, training=False):
        """features (n, P, feature_dim) -> (h, c, annotations (n, P, units), keys (n, P, attention_width))."""
        a = self.project(self.feat_drop(self.norm(features), training=training))
        mean = tf.reduce_mean(a, axis=1)
        return self.init_h(mean), self.init_c(mean), a, self.att_keys(a)

    def _weights(self, dtype):
        """The cell's kernel split by what it reads (embedding, context), its recurrent kernel and bias, as `dtype`."""
        e = self.config.embed_dim
        if not self.cell.built:  # never called as a layer, so built here
            self.cell.build((None, e + self.config.units))
        kernel = tf.cast(self.cell.kernel, dtype)
        return kernel[:e], kernel[e:], tf.cast(self.cell.recurrent_kernel, dtype), tf.cast(self.cell.bias, dtype)

    @staticmethod
    def _gates(z, c):
        """keras.layers.LSTMCell's step from its pre-activations z (n, 4*units): (h, c)."""
        i, f, g, o = tf.split(z, 4, axis=-1)
        c = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
        return tf.sigmoid(o) * tf.tanh(c), c

    def _attend(self, h, a, keys):
        """Each row against its own image: a, keys (n, P, units) -> (alpha (n, P), context (n, units))."""
        alpha, context = self._attend_steps(h[:, None], a, keys)
        return alpha[:, 0], context[:, 0]

    def _attend_steps(self, hs, a, keys):
        """Every step's state against its row's image: hs (n, T, units) -> (alphas (n, T, P), contexts (n, T, units))."""
        q = self.att_query(hs)
        if self.att_score is not None:
            e = self.att_score(tf.tanh(keys[:, None] + q[:, :, None]))[..., 0]
        else:
            e = tf.einsum("ntu,npu->ntp", q, keys) * (self.config.attention_width ** -0.5)
        alphas = tf.nn.softmax(e, axis=-1)
        return alphas, tf.einsum("ntp,npu->ntu", alphas, a)

    def _attend_images(self, h, a, keys, own):
        """Rows against a batch of images: a, keys (m, P, units), own (n, m) one-hot -> (alpha (n, P), context).

        Dot-product scores of every row against every image's cells are one
        product, (n, units) x (units, m*P); each row keeps its own image's.
        """
        m, p = tf.shape(a)[0], tf.shape(a)[1]
        q = self.att_query(h)
        e = tf.reshape(tf.matmul(q, tf.reshape(keys, [m * p, -1]), transpose_b=True), [-1, m, p])
        e = tf.reduce_sum(e * own[:, :, None], axis=1) * (self.config.attention_width ** -0.5)
        alpha = tf.nn.softmax(e, axis=-1)
        spread = tf.reshape(own[:, :, None] * alpha[:, None, :], [-1, m * p])  # alpha at the row's image, 0 elsewhere
        return alpha, tf.matmul(spread, tf.reshape(a, [m * p, -1]))

    def _logits(self, h, context, x, training=False, tokens=None):
        """The head over [h, context] (or the deep output); with `tokens` (n, T), at their real positions only."""
        y = tf.concat([h, context], axis=-1)
        if self.deep is not None:
            y = tf.tanh(self.deep(y) + x)
        y = self.out_drop(y, training=training)
        return self.head(y) if tokens is None else _on_real_tokens(self.head, y, tokens)

    def _unroll(self, features, tokens, training=False, rows=None):
        """Teacher forcing over all steps: (logits (n, T, vocab), alphas (n, T, P)).

        With `rows` (n,), `features` holds each distinct image once and caption
        i reads row `rows[i]`: the per-image work runs once per image.
        Positions past a caption's end repeat its last state and attention
        (their loss is masked).
        """
        h, c, a, keys = self.initial_state(features, training)
        n, steps = tf.shape(tokens)[0], tf.shape(tokens)[1]
        given = tokens  # in the captions' order (grouped batches reorder `tokens` below)
        # Dot scores against a batch of images: no per-caption grid, so finished captions can drop out each step
        # (longest first, the running ones are a prefix). Per-caption grids would be sliced (copied) every step.
        grouped = rows is not None and self.att_score is None
        if grouped:
            lengths = tf.reduce_sum(tf.cast(tokens != PAD_ID, tf.int32), axis=1)
            order = tf.argsort(lengths, direction="DESCENDING", stable=True)
            lengths, tokens, rows = (tf.gather(v, order) for v in (lengths, tokens, rows))
            own = tf.one_hot(rows, tf.shape(a)[0], dtype=h.dtype)
        elif rows is not None:
            a, keys = tf.gather(a, rows), tf.gather(keys, rows)
        if rows is not None:
            h, c = tf.gather(h, rows), tf.gather(c, rows)
        x = self.emb_drop(self.embed(tokens), training=training)  # (n, T, E)
        w_x, w_ctx, w_rec, bias = self._weights(h.dtype)
        zxs = tf.transpose(tf.tensordot(x, w_x, 1) + bias, [1, 0, 2])  # (T, n, 4*units), one product for all steps
        outs = [tf.TensorArray(h.dtype, size=steps) for _ in range(3)]
        context = tf.zeros_like(h)
        alpha = tf.zeros([n, tf.shape(a)[1]], h.dtype)

        def body(t, h, c, context, alpha, hs, contexts, alphas):
            if grouped:
                k = tf.reduce_sum(tf.cast(lengths > t, tf.int32))
                al, ctx = self._attend_images(h[:k], a, keys, own[:k])
                h_k, c_k = self._gates(zxs[t][:k] + tf.matmul(ctx, w_ctx) + tf.matmul(h[:k], w_rec), c[:k])
                h, c, context, alpha = (_update_prefix(old, new) for old, new in ((h, h_k), (c, c_k), (context, ctx),
                                                                                  (alpha, al)))
            else:
                alpha, context = self._attend(h, a, keys)
                h, c = self._gates(zxs[t] + tf.matmul(context, w_ctx) + tf.matmul(h, w_rec), c)
            return t + 1, h, c, context, alpha, hs.write(t, h), contexts.write(t, context), alphas.write(t, alpha)

        *_, hs, contexts, alphas = tf.while_loop(lambda t, *_: t < steps, body,
                                                 (tf.constant(0), h, c, context, alpha, *outs))
        back = tf.math.invert_permutation(order) if grouped else None

        def seq(v):  # (T, n, ...) in loop order -> (n, T, ...) in the captions' order
            v = tf.transpose(v, [1, 0, 2])
            return tf.gather(v, back) if grouped else v

        if grouped:
            x = tf.gather(x, back)
        return self._logits(seq(hs.stack()), seq(contexts.stack()), x, training, given), seq(alphas.stack())

    def call(self, inputs, training=False):
        features, tokens, *rows = inputs  # rows: see `training_dataset`
        logits, alphas = self._unroll(features, tokens, training, rows[0] if rows else None)
        if training and self.config.attention_reg:
            # How much each cell was looked at over the caption's real words.
            mask = tf.cast(tokens != PAD_ID, alphas.dtype)
            seen = tf.reduce_sum(alphas * mask[..., None], axis=1)  # (n, P)
            per_token = tf.reduce_sum(tf.square(1.0 - seen), axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)
            self.add_loss(self.config.attention_reg * tf.cast(tf.reduce_mean(per_token), tf.float32))
        return logits

    def step(self, tokens, h, c, a, keys):
        """One token per row -> (log-probabilities of the next token, h, c, annotations, keys)."""
        x = self.embed(tokens)
        _, context = self._attend(h, a, keys)
        w_x, w_ctx, w_rec, bias = self._weights(h.dtype)
        h, c = self._gates(tf.matmul(x, w_x) + tf.matmul(context, w_ctx) + tf.matmul(h, w_rec) + bias, c)
        return tf.nn.log_softmax(tf.cast(self._logits(h, context, x), tf.float32)), h, c, a, keys

    def attention_maps(self, features, tokens) -> np.ndarray:
        """Where the model looked: features (n, P, d), tokens (n, T) decoder inputs, BOS first -> (n, T, P).

        Row t is the attention used to choose the word after tokens[:, t], so
        for a caption w1..wk the inputs are [BOS, w1..wk] and the rows belong
        to w1..wk and the end. Each row sums to 1.
        """
        _, alphas = self._unroll(tf.convert_to_tensor(features, tf.float32), tf.convert_to_tensor(tokens, tf.int32))
        return alphas.numpy()

    def feature_spec(self):
        """What `initial_state` takes: grid features (n, P, feature_dim), any P."""
        return tf.TensorSpec([None, None, self.config.feature_dim], tf.float32)

    def build_all(self, feature_dim: int) -> "AttentionDecoder":
        """Create every weight (needed before load_weights); no weight depends on the grid size."""
        if not self.norm.built:
            self.norm.build((None, None, feature_dim))
        self((np.zeros((1, 1, feature_dim), np.float32), np.full((1, 2), BOS_ID, np.int32)))
        return self


class OutputAttentionDecoder(AttentionDecoder):
    """The attention decoder with `attention_feed="output"`: the LSTM first, the attention after it.

    Lu et al. 2017 ("Knowing when to look", their spatial attention without
    the sentinel) and Luong et al. 2015: the LSTM reads the words alone,
    from the same h0, c0 (the annotations' mean); its current state h_t
    queries the annotations, and the head reads [h_t, context_t] (or the
    deep output). Since no step's input waits for an attention, teacher
    forcing is the lstm decoder's LSTM over the whole sequence, then every
    word's scores and context for the whole batch in two batched products:
    no loop of the model's own. Same state for decoding (h, c, annotations,
    keys), same scores, penalty and attention maps as `AttentionDecoder`.
    """

    def _recurrent_layers(self):
        self.lstm = keras.layers.LSTM(self.config.units, return_sequences=True)

    def _unroll(self, features, tokens, training=False, rows=None):
        """Teacher forcing: (logits (n, T, vocab), alphas (n, T, P)); `rows` as in `AttentionDecoder._unroll`."""
        h, c, a, keys = self.initial_state(features, training)
        if rows is not None:  # per-image work done once per image; each caption reads its own (a copy, n x P x units)
            h, c, a, keys = (tf.gather(v, rows) for v in (h, c, a, keys))
        x = self.emb_drop(self.embed(tokens), training=training)
        hs = self.lstm(x, initial_state=[h, c], mask=tokens != PAD_ID, training=training)  # (n, T, units)
        alphas, contexts = self._attend_steps(hs, a, keys)  # every word's at once: nothing waits for them
        return self._logits(hs, contexts, x, training, tokens), alphas

    def step(self, tokens, h, c, a, keys):
        """One token per row -> (log-probabilities of the next token, h, c, annotations, keys)."""
        x = self.embed(tokens)
        _, (h, c) = self.lstm.cell(x, [h, c])
        _, context = self._attend(h, a, keys)
        return tf.nn.log_softmax(tf.cast(self._logits(h, context, x), tf.float32)), h, c, a, keys


def _on_real_tokens(head, y, tokens):
    """head(y) for y (n, T, d) at the real (non-padding) positions of tokens (n, T); zeros at the padding.

    The per-token head is the largest product of a training step, and batches
    pad to their longest caption (by photo, 20.3 tokens for 14.3 on Flickr8k); the loss masks the
    padding anyway, so its logits are never computed.
    """
    where = tf.where(tokens != PAD_ID)
    out = head(tf.gather_nd(y, where))
    shape = tf.concat([tf.shape(tokens, out_type=tf.int64), tf.shape(out, out_type=tf.int64)[-1:]], 0)
    return tf.scatter_nd(where, out, shape)


def _update_prefix(old, new):
    """`old` with its first len(new) rows replaced by `new`, keeping old's static shape (a while_loop invariant)."""
    out = tf.concat([new, old[tf.shape(new)[0]:]], 0)
    out.set_shape(old.shape)
    return out


class MergeDecoder(_PooledFeatures, keras.Model):
    """The classic tutorials' "merge" captioner, kept as the reference point the other decoders must beat.

    The LSTM reads the words alone; the image enters after it: the pooled
    features (normalised, dropout, Dense relu) are added to the LSTM's output
    at every step, then Dense relu and the head. The LSTM starts from zeros.
    The decoding state is (h, c, image vector), the vector carried so beams
    reorder it with h and c.
    """

    def __init__(self, config: DecoderConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        c = config
        self.norm = keras.layers.Normalization(axis=-1)
        self.feat_drop = keras.layers.Dropout(c.dropout)
        self.image = keras.layers.Dense(c.units, activation="relu")
        self.embed = keras.layers.Embedding(c.vocab_size, c.embed_dim, mask_zero=True)
        self.emb_drop = keras.layers.Dropout(c.dropout)
        self.lstm = keras.layers.LSTM(c.units, return_sequences=True)
        self.merge = keras.layers.Dense(c.units, activation="relu")
        self.head = keras.layers.Dense(c.vocab_size, dtype="float32")

    def initial_state(self, features, training=False):
        v = self.image(self.feat_drop(self.norm(features), training=training))
        zeros = tf.zeros_like(v)
        return zeros, zeros, v

    def call(self, inputs, training=False):
        features, tokens = inputs
        _, _, v = self.initial_state(features, training)
        x = self.emb_drop(self.embed(tokens), training=training)
        y = self.lstm(x, mask=tokens != PAD_ID, training=training)
        return _on_real_tokens(lambda y: self.head(self.merge(y)), y + v[:, None, :], tokens)

    def step(self, tokens, h, c, v):
        """One token per row -> (log-probabilities of the next token, h, c, image vector)."""
        y, (h, c) = self.lstm.cell(tf.gather(self.embed.embeddings, tokens), [h, c])
        return tf.nn.log_softmax(tf.cast(self.head(self.merge(y + v)), tf.float32)), h, c, v


DECODERS = {"lstm": CaptionDecoder, "attention": AttentionDecoder, "merge": MergeDecoder}
assert tuple(DECODERS) == DECODER_ARCHITECTURES


def decoder_class(config: DecoderConfig):
    """The class `config.architecture` names (for attention, `config.attention_feed` picks which)."""
    if config.architecture == "attention" and config.attention_feed != "input":
        if config.attention_feed != "output":
            raise CapkitError(f"unknown attention feed {config.attention_feed!r}", hint="use input or output")
        return OutputAttentionDecoder
    try:
        return DECODERS[config.architecture]
    except KeyError:
        raise CapkitError(f"unknown decoder architecture {config.architecture!r}",
                          hint=f"use one of {', '.join(DECODERS)}") from None


def save_decoder(model, path: Path) -> None:
    """Weights only, without optimizer state (Keras would add Adam's two moments: 3x the size).

    The inverse is `load_decoder(config, path)`.
    """
    clean = decoder_class(model.config)(model.config).build_all(model.config.feature_dim)
    clean.set_weights(model.get_weights())
    _save_weights(clean, Path(path))


def load_decoder(config: DecoderConfig, weights: Path):
    """Rebuild the architecture from plain settings, then load weights only (no deserialised code)."""
    model = decoder_class(config)(config).build_all(config.feature_dim)
    try:
        model.load_weights(weights)
    except Exception as e:
        raise CapkitError(f"{weights}: decoder weights do not fit the manifest's architecture ({str(e)[:200]})") from None
    return model


@dataclass
class Sequences:
    """Captions as token ids, each tied to a row of a feature matrix."""

    image_index: np.ndarray  # (n,) int32, row in the features
    tokens: list[list[int]]  # ids without BOS/EOS

    def arrays(self, max_length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image_index, inputs, targets): inputs BOS+ids, targets ids+EOS, 0-padded, cut to max_length."""
        n = len(self.tokens)
        inp = np.zeros((n, max_length), np.int32)
        tgt = np.zeros((n, max_length), np.int32)
        for i, ids in enumerate(self.tokens):
            ids = ids[: max_length - 1]
            inp[i, : len(ids) + 1] = [BOS_ID, *ids]
            tgt[i, : len(ids) + 1] = [*ids, EOS_ID]
        return self.image_index.astype(np.int32), inp, tgt


def batches_by_image(config: DecoderConfig) -> bool:
    """Whether batches hold all captions of each of their images, each image's features once.

    For the attention decoder, whose per-image work (projecting a 10x10x2048
    grid, its attention keys) costs more than a caption's words: with five
    captions a photo it then runs a fifth as often, and a fifth of the grid
    bytes are read. The pooled decoders' per-image work is one small Dense,
    so they keep batches of independent captions.
    """
    return config.architecture == "attention"


BUCKET_WINDOW = 32  # batches' worth of shuffled captions (or images) sorted by length together


def batch_plan(lengths: np.ndarray, batch: int, rng: np.random.Generator, images: np.ndarray | None = None) -> list[np.ndarray]:
    """One epoch's batches of caption rows, by length bucket: shuffled, then sorted by length within windows.

    Captions are shuffled, cut into windows of `BUCKET_WINDOW` batches, sorted
    by length inside each window and cut into batches, whose order is
    shuffled again: a batch's captions have about the same length, so little
    of it is padding (on Flickr8k a random batch pads to twice its mean
    length), yet every epoch mixes differently. With `images` (row -> image),
    the units shuffled and sorted are images, by their longest caption, and
    each image's captions stay together (see `batches_by_image`).

    >>> [len(b) for b in batch_plan(np.array([3, 9, 4, 8]), 2, np.random.default_rng(0))]
    [2, 2]
    """
    unit_of = np.arange(len(lengths)) if images is None else np.asarray(images)
    n_units = int(unit_of.max()) + 1 if len(unit_of) else 0
    keys = np.zeros(n_units, np.int64)
    np.maximum.at(keys, unit_of, lengths)
    per_window = max(1, batch * BUCKET_WINDOW * n_units // max(len(lengths), 1))
    perm = rng.permutation(n_units)
    order = np.concatenate([w[np.argsort(keys[w], kind="stable")] for w in np.split(perm, range(per_window, n_units, per_window))]
                           ) if n_units else perm
    rank = np.empty(n_units, np.int64)
    rank[order] = np.arange(n_units)
    rows = np.argsort(rank[unit_of], kind="stable")  # captions in unit order, each unit's together
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def training_dataset(features: np.ndarray, seqs: Sequences, cfg: DecoderConfig, batch: int, shuffle: bool, seed: int,
                     by_image: bool | None = None, first_epoch: int = 0):
    """Batches ((features, inputs), targets) of `seqs`, padded to the batch's longest caption.

    With `shuffle` (training), batches come from `batch_plan`, drawn afresh
    each epoch from a generator seeded by (`seed`, epoch), counting from
    `first_epoch`: a resumed run sees the batches it would have seen
    unstopped, not epoch 1's again; without `shuffle`, in order. Where
    `by_image` (default: `batches_by_image(cfg)`), a batch's inputs are
    (its distinct images' features, inputs, row of each caption's image).
    """
    idx, inp, tgt = seqs.arrays(cfg.max_length)
    by_image = batches_by_image(cfg) if by_image is None else by_image
    if isinstance(features, np.ndarray):
        feats = tf.constant(features, tf.float32)

        def gather(i):
            return tf.gather(feats, i)
    else:  # a FeatureView: each batch reads its rows from the memory-mapped cache
        row_shape = list(features.shape[1:])

        def gather(i):
            rows = tf.numpy_function(lambda j: features[j], [i], tf.float32, stateful=False)
            rows.set_shape([None, *row_shape])
            return rows

    if shuffle:
        lengths = (inp != PAD_ID).sum(axis=1)
        epochs = itertools.count(first_epoch)
        plan = lambda: iter(batch_plan(lengths, batch, np.random.default_rng((seed, next(epochs))),  # noqa: E731
                                       idx if by_image else None))
        batches = tf.data.Dataset.from_generator(plan, output_signature=tf.TensorSpec([None], tf.int64))
        # Known, so that Keras counts steps instead of warning that the input "ran out of data".
        batches = batches.apply(tf.data.experimental.assert_cardinality(-(-len(idx) // batch)))
    else:
        batches = tf.data.Dataset.range(len(idx)).batch(batch)
    idx_t, inp_t, tgt_t = tf.constant(idx), tf.constant(inp), tf.constant(tgt)

    def assemble(rows):
        x, y = tf.gather(inp_t, rows), tf.gather(tgt_t, rows)
        t = tf.reduce_max(tf.reduce_sum(tf.cast(x != PAD_ID, tf.int32), axis=1))  # cut columns no caption reaches
        x, y, i = x[:, :t], y[:, :t], tf.gather(idx_t, rows)
        if by_image:
            images, local = tf.unique(i)
            return (gather(images), x, local), y
        return (gather(i), x), y

    return batches.map(assemble, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)


def _adapt_data(features):
    """Arrays as they are; a FeatureView as a dataset of row blocks, never all in memory."""
    if isinstance(features, np.ndarray):
        return features
    spec = tf.TensorSpec([None, *features.shape[1:]], tf.float32)
    return tf.data.Dataset.from_generator(features.chunks, output_signature=spec)


def resolve_precision(precision: str) -> str:
    """A TrainConfig.precision as trained: "auto" is float16 where a GPU is present (tensor cores), else float32.

    float16 on a CPU is slower than float32; bfloat16 is faster on CPUs with
    AVX512_BF16 or AMX (docs/experiments.md), and left to be asked for.
    """
    if precision == "auto":
        return "float16" if tf.config.list_physical_devices("GPU") else "float32"
    if precision not in PRECISION_POLICIES:
        raise CapkitError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


class CaptionLoss(keras.losses.Loss):
    """Cross-entropy of next-token logits (n, t, vocab) against ids (n, t), averaged over non-padding tokens.

    With `label_smoothing` s the target is (1 - s) on the true token and s
    spread evenly over the vocabulary: the loss is
    (1 - s) * -log p(true) + s * mean_v(-log p(v)). With s = 0 it equals
    Keras's SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD).
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "caption_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # The padding mask and the mean are applied in call(): Keras's own masking expects per-token
        # losses and would multiply the mean by the logits' propagated mask instead.
        loss = self.call(y_true, y_pred)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync  # gradients are summed over replicas
        return loss / replicas if replicas > 1 else loss

    def call(self, y_true, y_pred):
        ids = tf.cast(y_true, tf.int32)
        mask = tf.cast(tf.not_equal(ids, PAD_ID), tf.float32)
        logp = tf.nn.log_softmax(tf.cast(y_pred, tf.float32))
        nll = -tf.gather(logp, ids, batch_dims=2)
        if self.label_smoothing:
            nll = (1.0 - self.label_smoothing) * nll - self.label_smoothing * tf.reduce_mean(logp, axis=-1)
        return tf.reduce_sum(nll * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def _save_weights(model, path: Path) -> None:
    tmp = path.with_name(path.name.replace(".weights.h5", ".tmp.weights.h5"))
    model.save_weights(tmp)
    os.replace(tmp, path)


def training_model(config: DecoderConfig, train_config: TrainConfig, train_features, learning_rate: float | None = None):
    """A new decoder, its normalisation adapted to `train_features`, compiled with the training loss and optimizer.

    Call under the strategy's scope. Its layers compute in `train_config.precision` (see
    `resolve_precision`); the float32 head keeps logits and loss in float32.
    """
    with dtype_policy(PRECISION_POLICIES[resolve_precision(train_config.precision)]):  # layers take it when built
        model = decoder_class(config)(config)
        model.norm.adapt(_adapt_data(train_features))  # train-split statistics, stored with the weights
        model.build_all(config.feature_dim)
    lr = train_config.learning_rate if learning_rate is None else learning_rate
    model.compile(  # under mixed_float16 Keras wraps Adam in a LossScaleOptimizer
        optimizer=keras.optimizers.Adam(lr, clipnorm=train_config.clipnorm or None),
        loss=CaptionLoss(train_config.label_smoothing),
    )
    return model


# The training loop, its strategies and checkpoints live in toolkit.train; these names stay importable from here.
_TRAIN_NAMES = ("train_decoder", "distribution_strategy", "STRATEGIES", "CHECKPOINT_STATE_FILE", "CHECKPOINT_LAST_FILE",
                "CHECKPOINT_BEST_FILE")


def __getattr__(name):
    if name in _TRAIN_NAMES:  # lazily: toolkit.train imports this module
        from toolkit import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
