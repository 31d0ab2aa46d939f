"""The per-language LSTM decoder and its training.

The image enters as the LSTM's initial state (normalised features -> Dense ->
h0, c0), tokens by teacher forcing over whole captions, loss masked on
padding. Feature normalisation is a Keras `Normalization` layer adapted on
the train split, so its statistics travel inside the decoder weights.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.config import DecoderConfig, TrainConfig
from toolkit.errors import CapkitError
from toolkit.tokenizer import BOS_ID, EOS_ID, PAD_ID

from toolkit.backend import import_tensorflow

tf = import_tensorflow()
import keras  # noqa: E402

CHECKPOINT_STATE_FILE = "state.json"
CHECKPOINT_LAST_FILE = "last.weights.h5"
CHECKPOINT_BEST_FILE = "best.weights.h5"
STRATEGIES = ("default", "mirrored", "multiworker")
MIXED_PRECISION_POLICY = "mixed_float16"  # on a GPU; logits and loss stay float32


class CaptionDecoder(keras.Model):
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
        return self.head(self.out_drop(y, training=training))

    def step(self, tokens, h, c):
        """One token per row -> (log-probabilities of the next token, h, c)."""
        # The cell alone: one token needs no loop over time (the layer would build one per call).
        # Looked up directly: the layer would attach its padding mask, which the cell cannot take.
        y, (h, c) = self.lstm.cell(tf.gather(self.embed.embeddings, tokens), [h, c])
        return tf.nn.log_softmax(tf.cast(self.head(y), tf.float32)), h, c

    def build_all(self, feature_dim: int) -> "CaptionDecoder":
        """Create every weight (needed before load_weights)."""
        if not self.norm.built:
            self.norm.build((None, feature_dim))
        self((np.zeros((1, feature_dim), np.float32), np.full((1, 2), BOS_ID, np.int32)))
        return self


def save_decoder(model: CaptionDecoder, path: Path) -> None:
    """Weights only, without optimizer state (Keras would add Adam's two moments: 3x the size).

    The inverse is `load_decoder(config, path)`.
    """
    clean = CaptionDecoder(model.config).build_all(model.config.feature_dim)
    clean.set_weights(model.get_weights())
    _save_weights(clean, Path(path))


def load_decoder(config: DecoderConfig, weights: Path) -> CaptionDecoder:
    """Rebuild the architecture from plain settings, then load weights only (no deserialised code)."""
    model = CaptionDecoder(config).build_all(config.feature_dim)
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


def _dataset(features: np.ndarray, seqs: Sequences, cfg: DecoderConfig, batch: int, shuffle: bool, seed: int,
             shard_by_data: bool = False):
    idx, inp, tgt = seqs.arrays(cfg.max_length)
    feats = tf.constant(features, tf.float32)
    ds = tf.data.Dataset.from_tensor_slices((idx, inp, tgt))
    if shuffle:
        ds = ds.shuffle(len(idx), seed=seed, reshuffle_each_iteration=True)

    def assemble(i, x, y):
        # Pad by batch: cut the columns no caption of this batch reaches.
        t = tf.reduce_max(tf.reduce_sum(tf.cast(x != PAD_ID, tf.int32), axis=1))
        return (tf.gather(feats, i), x[:, :t]), y[:, :t]

    ds = ds.batch(batch).map(assemble, num_parallel_calls=tf.data.AUTOTUNE).prefetch(2)
    if shard_by_data:  # in-memory data has no files to shard by: each worker takes its share of every batch
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        ds = ds.with_options(options)
    return ds


_strategies: dict[str, object] = {}


def distribution_strategy(name: str = "default"):
    """The `tf.distribute` strategy `name` selects, created once per process.

    "mirrored": every local GPU, else every logical CPU device (one on a plain
    machine; tests split the CPU in two); "multiworker": the cluster in
    `TF_CONFIG`. TensorFlow wants collective strategies created before any
    other op runs, so `build_pack` calls this before extracting features.
    """
    if name not in STRATEGIES:
        raise CapkitError(f"unknown strategy {name!r}", hint=f"use one of {', '.join(STRATEGIES)}")
    if name not in _strategies:
        if name == "mirrored":
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            _strategies[name] = tf.distribute.MirroredStrategy([d.name for d in devices])
        elif name == "multiworker":
            _strategies[name] = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            _strategies[name] = tf.distribute.get_strategy()
    return _strategies[name]


def _mixed_precision_wanted() -> bool:
    """float16 pays on GPUs (tensor cores); on CPUs it is slower, so only there."""
    return bool(tf.config.list_physical_devices("GPU"))


def _is_chief(strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (resolver.task_type == "worker" and resolver.task_id == 0
                                             and "chief" not in resolver.cluster_spec().as_dict())


class _Checkpoints(keras.callbacks.Callback):
    """Best weights for early stopping, last weights + state each epoch for resuming."""

    def __init__(self, folder: Path, state: dict, patience: int, progress):
        super().__init__()
        self.folder, self.state, self.patience, self.progress = folder, state, patience, progress

    def on_epoch_end(self, epoch, logs=None):
        from toolkit.pack import atomic_write_text

        logs = logs or {}
        s = self.state
        val = float(logs.get("val_loss", logs.get("loss")))
        s["history"].append({"epoch": epoch + 1, "loss": float(logs["loss"]), "val_loss": val,
                             "lr": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
                             "seconds": time.perf_counter() - s.pop("_t0", time.perf_counter())})
        if val < s["best_val_loss"]:
            s.update(best_val_loss=val, best_epoch=epoch + 1, wait=0)
            _save_weights(self.model, self.folder / CHECKPOINT_BEST_FILE)
        else:
            s["wait"] += 1
            # Halve the learning rate when dev loss stalls.
            lr = self.model.optimizer.learning_rate
            lr.assign(lr * 0.5)
        s["epoch"] = epoch + 1
        s["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        _save_weights(self.model, self.folder / CHECKPOINT_LAST_FILE)
        atomic_write_text(self.folder / CHECKPOINT_STATE_FILE, json.dumps(s, indent=1))
        if self.progress:
            self.progress(dict(s["history"][-1], best_epoch=s["best_epoch"]))
        if s["wait"] >= self.patience:
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self.state["_t0"] = time.perf_counter()


def _save_weights(model, path: Path) -> None:
    tmp = path.with_name(path.name.replace(".weights.h5", ".tmp.weights.h5"))
    model.save_weights(tmp)
    os.replace(tmp, path)


def train_decoder(
    train_features: np.ndarray,
    train: Sequences,
    dev_features: np.ndarray,
    dev: Sequences,
    config: DecoderConfig,
    train_config: TrainConfig,
    checkpoint_dir: Path,
    progress: Callable[[dict], None] | None = None,
) -> tuple[CaptionDecoder, dict]:
    """Train with teacher forcing and early stopping on dev loss; returns the best model and the run's state.

    `checkpoint_dir` keeps the last and best weights and the epoch reached; a
    call with the same folder resumes where it stopped, optimizer state included.
    The model is built and compiled under `train_config.strategy` (see
    `distribution_strategy`), in mixed precision where a GPU is present; the
    model returned is always a plain float32 one, ready for inference.
    """
    checkpoint_dir = Path(checkpoint_dir)
    strategy = distribution_strategy(train_config.strategy)
    if not _is_chief(strategy):  # every worker saves (collectively), only the chief into the real folder
        checkpoint_dir = checkpoint_dir / f".worker-{strategy.cluster_resolver.task_id}"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(train_config.seed)
    mixed = _mixed_precision_wanted()
    policy = keras.config.dtype_policy()
    with strategy.scope():
        if mixed:  # layers take the policy when built; the float32 head keeps logits and loss in float32
            keras.config.set_dtype_policy(MIXED_PRECISION_POLICY)
        try:
            model = CaptionDecoder(config)
            model.norm.adapt(train_features)  # statistics of the train split, stored with the weights
            model.build_all(config.feature_dim)
        finally:
            keras.config.set_dtype_policy(policy)

        state_path = checkpoint_dir / CHECKPOINT_STATE_FILE
        state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": 0, "wait": 0,
                 "lr": train_config.learning_rate, "history": []}
        resume = state_path.exists() and (checkpoint_dir / CHECKPOINT_LAST_FILE).exists()
        if resume:
            state = json.loads(state_path.read_text())
        model.compile(  # under mixed_float16 Keras wraps Adam in a LossScaleOptimizer
            optimizer=keras.optimizers.Adam(state["lr"], clipnorm=5.0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD_ID),
        )
        if resume:
            # Build the optimizer first so the checkpoint restores Adam's moments too.
            model.optimizer.build(model.trainable_variables)
            model.load_weights(checkpoint_dir / CHECKPOINT_LAST_FILE)
    done = state["epoch"] >= train_config.epochs or state["wait"] >= train_config.patience
    if not done:
        shard = train_config.strategy == "multiworker"
        model.fit(
            _dataset(train_features, train, config, train_config.batch_size, True, train_config.seed, shard),
            validation_data=_dataset(dev_features, dev, config, 256, False, 0, shard) if len(dev.tokens) else None,
            epochs=train_config.epochs,
            initial_epoch=state["epoch"],
            callbacks=[_Checkpoints(checkpoint_dir, state, train_config.patience, progress)],
            shuffle=False,  # the dataset shuffles itself, reproducibly by seed
            verbose=0,
        )
    best = checkpoint_dir / CHECKPOINT_BEST_FILE
    if mixed or train_config.strategy != "default":
        # Distributed or float16 variables are for training; inference gets plain float32 ones.
        if not best.exists():
            best = checkpoint_dir / CHECKPOINT_LAST_FILE
            _save_weights(model, best)
        return load_decoder(config, best), state
    if best.exists():
        model.load_weights(best)
    return model, state
