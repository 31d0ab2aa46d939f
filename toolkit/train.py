"""Training a decoder: strategies, the training loop, checkpoints and resume.

Two loops, one set of rules (optimizer, loss, clipping, schedule, early
stopping, best weights, all in `_EpochBook`):

- "default" and "mirrored" (one machine) train with Keras `fit`;
- "multiworker" (a `TF_CONFIG` cluster) trains with `custom_loop`:
  `strategy.run` of one step over `strategy.experimental_distribute_dataset`,
  the optimizer all-reducing gradients as it does under `fit`, since Keras 3's
  `fit` cannot run under `MultiWorkerMirroredStrategy` (keras-team/keras#20585).
  On one worker it gives `fit`'s losses (tests/test_train.py).

Under "multiworker" each worker reads its share of every batch (tf.data
auto-sharding by data: the features are in memory or memory-mapped, not in
files to shard). Only the chief writes checkpoints; a restarted cluster
resumes from them, the chief's restored weights, optimizer state and
early-stopping counters broadcast to every worker, so all hold the same state
whether or not their disks are shared.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit import decoder as dec
from toolkit.config import TrainConfig
from toolkit.decoder import Sequences, batches_by_image, load_decoder, training_dataset, training_model, tf, keras
from toolkit.errors import CapkitError

CHECKPOINT_STATE_FILE = "state.json"
CHECKPOINT_LAST_FILE = "last.weights.h5"
CHECKPOINT_BEST_FILE = "best.weights.h5"
STRATEGIES = ("default", "mirrored", "multiworker")
_STATE_SCALARS = ("epoch", "best_val_loss", "best_epoch", "wait", "lr")  # what a worker takes from the chief on resume

_strategies: dict[str, object] = {}


def distribution_strategy(name: str = "default"):
    """The `tf.distribute` strategy `name` selects, created once per process.

    "mirrored": every local GPU, else every logical CPU device (one on a plain
    machine; tests split the CPU in two). "multiworker": every worker of the
    cluster the `TF_CONFIG` environment variable describes (each worker's local
    GPUs, else its CPU); it waits until all workers are up, and must be created
    before TensorFlow runs its first operation in the process. `build_pack`
    calls this before any work, so a bad name fails first.
    """
    if name not in STRATEGIES:
        raise CapkitError(f"unknown strategy {name!r}", hint=f"use one of {', '.join(STRATEGIES)}")
    if name not in _strategies:
        if name == "multiworker":
            _strategies[name] = _multiworker_strategy()
        elif name == "mirrored":
            devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
            _strategies[name] = tf.distribute.MirroredStrategy([d.name for d in devices])
        else:
            _strategies[name] = tf.distribute.get_strategy()
    return _strategies[name]


def _multiworker_strategy():
    if not os.environ.get("TF_CONFIG"):
        raise CapkitError("strategy 'multiworker' needs the TF_CONFIG environment variable",
                          hint='set it on every worker: {"cluster": {"worker": ["host1:port", "host2:port"]}, '
                               '"task": {"type": "worker", "index": 0}} (see the README)')
    try:
        json.loads(os.environ["TF_CONFIG"])
    except ValueError:
        raise CapkitError("TF_CONFIG is not JSON", hint="see the README for its form") from None
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as e:  # "Collective ops must be configured at program startup"
        raise CapkitError(f"cannot start MultiWorkerMirroredStrategy: {str(e)[:200]}",
                          hint="create it before any TensorFlow operation runs: call "
                               "toolkit.train.distribution_strategy('multiworker') first in the process") from None


def is_chief(strategy) -> bool:
    """Whether this process is the one that writes (checkpoints, the pack): the only one but under "multiworker".

    The chief is the task of type "chief", else worker 0, as TensorFlow defines it.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if resolver.task_type == "chief":
        return True
    return resolver.task_type == "worker" and resolver.task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()


def barrier(strategy) -> None:
    """Return once every worker has reached this point (at once outside a cluster)."""
    if not strategy.extended._in_multi_worker_mode():  # noqa: SLF001 (tf.distribute's own test of a cluster)
        return

    def one():
        return tf.constant(1.0)

    @tf.function
    def meet():
        return strategy.reduce("SUM", strategy.run(one), axis=None)

    meet()


def cosine_rate(base: float, done: float, total: float) -> float:
    """`base` scaled by half a cosine: `base` at `done` 0, 0 at `done` == `total` (epochs or steps)."""
    return float(base * 0.5 * (1.0 + math.cos(math.pi * done / max(total, 1))))


class _EpochBook:
    """The per-epoch rules both loops share: schedule, history, best and last weights, state for resuming, patience."""

    def __init__(self, folder: Path, state: dict, train_config: TrainConfig, progress, writes: bool = True):
        self.folder, self.state, self.progress, self.writes = folder, state, progress, writes
        self.patience, self.schedule = train_config.patience, train_config.lr_schedule
        self.min_delta = train_config.min_delta
        self.base_lr, self.epochs = train_config.learning_rate, train_config.epochs

    def begin(self, epoch: int, optimizer) -> None:
        self.state["_t0"] = time.perf_counter()
        if self.schedule == "cosine":  # a function of the epoch alone, so a resumed run follows the same curve
            optimizer.learning_rate.assign(cosine_rate(self.base_lr, epoch, self.epochs))

    def end(self, epoch: int, loss: float, val_loss: float | None, model) -> bool:
        """Book the epoch; returns whether training should stop."""
        from toolkit.pack import atomic_write_text

        s = self.state
        val = float(loss if val_loss is None else val_loss)
        s["history"].append({"epoch": epoch + 1, "loss": float(loss), "val_loss": val,
                             "lr": float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)),
                             "seconds": time.perf_counter() - s.pop("_t0", time.perf_counter())})
        if val < s["best_val_loss"] - self.min_delta:
            s["wait"] = 0
        else:  # no gain worth an epoch: count towards stopping
            s["wait"] += 1
            if self.schedule == "plateau":  # halve the learning rate when dev loss stalls
                lr = model.optimizer.learning_rate
                lr.assign(lr * 0.5)
        if val < s["best_val_loss"]:
            s.update(best_val_loss=val, best_epoch=epoch + 1)
            if self.writes:
                dec._save_weights(model, self.folder / CHECKPOINT_BEST_FILE)
        s["epoch"] = epoch + 1
        s["lr"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        if self.writes:
            dec._save_weights(model, self.folder / CHECKPOINT_LAST_FILE)
            atomic_write_text(self.folder / CHECKPOINT_STATE_FILE, json.dumps(s, indent=1))
        if self.progress:
            self.progress(dict(s["history"][-1], best_epoch=s["best_epoch"]))
        return s["wait"] >= self.patience


class _Checkpoints(keras.callbacks.Callback):
    """`_EpochBook` as a callback of `fit`."""

    def __init__(self, book: _EpochBook):
        super().__init__()
        self.book = book

    def on_epoch_begin(self, epoch, logs=None):
        self.book.begin(epoch, self.model.optimizer)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.book.end(epoch, logs["loss"], logs.get("val_loss"), self.model):
            self.model.stop_training = True


def custom_loop(model, strategy, train_ds, dev_ds, book: _EpochBook, initial_epoch: int, epochs: int) -> None:
    """What `fit(train_ds, validation_data=dev_ds, epochs, initial_epoch, callbacks=[_Checkpoints(book)])` does.

    Each step runs on every replica of `strategy` over its share of the
    batch: `fit`'s train step (forward, `compute_loss` with the layers' added
    losses, the optimizer's loss scaling, gradients, `apply_gradients`, which
    clips and all-reduces them). An epoch's loss is `fit`'s: the mean of
    the batches' losses weighted by their number of captions.
    """
    opt = model.optimizer
    replicas = strategy.num_replicas_in_sync

    def rows(x):
        return tf.cast(tf.shape(x[0])[0], tf.float32)

    def train_step(x, y):
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            scaled = opt.scale_loss(loss)
        opt.apply_gradients(zip(tape.gradient(scaled, model.trainable_weights), model.trainable_weights))
        return _weighted(loss * replicas, rows(x))  # the loss as one device would report it

    def test_step(x, y):
        y_pred = model(x, training=False)
        return _weighted(model.compute_loss(x=x, y=y, y_pred=y_pred, training=False) * replicas, rows(x))

    def distributed(step, ds):
        @tf.function(input_signature=[ds.element_spec])
        def run(batch):
            total, n = strategy.run(step, args=batch)
            return strategy.reduce("SUM", total, axis=None), strategy.reduce("SUM", n, axis=None)

        return run

    def mean(run, ds):
        total, n = tf.constant(0.0), tf.constant(0.0)
        for batch in ds:
            t, k = run(batch)
            total, n = total + t, n + k
        return float(total / tf.maximum(n, 1.0))

    options = tf.data.Options()
    # By data: every worker reads the whole (in-memory) pipeline and keeps its share of each batch.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_dist = strategy.experimental_distribute_dataset(train_ds.with_options(options))
    dev_dist = strategy.experimental_distribute_dataset(dev_ds.with_options(options)) if dev_ds is not None else None
    with strategy.scope():
        train_fn = distributed(train_step, train_dist)
        test_fn = distributed(test_step, dev_dist) if dev_dist is not None else None
    known_length = int(train_ds.cardinality()) > 0
    for epoch in range(initial_epoch, epochs):
        book.begin(epoch, opt)
        loss = mean(train_fn, train_dist)
        if known_length:
            # fit, on a dataset of known length, makes a fresh iterator at the end of an epoch and another at
            # the start of the next (Keras's EpochIterator without steps_per_epoch); each draws the next
            # shuffle. Drawn the same way here, both loops read the same batches. (Of unknown length, as
            # batches by image are, it makes one an epoch, as this loop does.)
            iter(train_dist)
        val = mean(test_fn, dev_dist) if test_fn is not None else None
        if book.end(epoch, loss, val, model):
            break


def _weighted(loss, n):
    """(loss * n, n); nothing from a replica whose share of the last batch is empty (its added losses are NaN)."""
    return tf.where(n > 0, loss * n, 0.0), n


def _broadcast_from_chief(strategy, variables, sources, state: dict, chief: bool) -> dict:
    """Set `variables` on every worker to the chief's `sources` (same shapes, same order), and the state's counters.

    A masked all-reduce: the chief's first replica contributes its values,
    every other replica zeros. Exact (float64 holds every float32 and counter).
    Returns the state with the chief's counters.
    """
    local = len(strategy.extended.worker_devices)
    scalars = np.array([state[k] for k in _STATE_SCALARS], np.float64)
    masks = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(chief and ctx.replica_id_in_sync_group % local == 0))

    @tf.function
    def sync(mask):
        def share(mask):
            values = [tf.cast(v.value if isinstance(v, keras.Variable) else v, tf.float64) for v in sources]
            values.append(tf.constant(scalars))
            return tf.distribute.get_replica_context().all_reduce(
                "SUM", [tf.where(mask, t, tf.zeros_like(t)) for t in values])

        return strategy.run(share, args=(mask,))

    out = [strategy.experimental_local_results(t)[0] for t in sync(masks)]
    for v, value in zip(variables, out):
        v.assign(tf.cast(value, v.dtype))
    got = out[-1].numpy()
    shared = {k: (int(got[i]) if k in ("epoch", "best_epoch", "wait") else float(got[i])) for i, k in enumerate(_STATE_SCALARS)}
    return {**state, **shared}


def train_decoder(
    train_features: np.ndarray,
    train: Sequences,
    dev_features: np.ndarray,
    dev: Sequences,
    config,
    train_config: TrainConfig,
    checkpoint_dir: Path,
    progress: Callable[[dict], None] | None = None,
) -> tuple[keras.Model, dict]:
    """Train with teacher forcing and early stopping on dev loss; returns the best model and the run's state.

    Features are what `config.architecture` reads: pooled (n, 2048) for
    "lstm", grids (n, P, 2048) for "attention"; `train.image_index` and
    `dev.image_index` point into their rows.

    `checkpoint_dir` keeps the last and best weights and the epoch reached; a
    call with the same folder resumes where it stopped, optimizer state included.
    The model is built and compiled under `train_config.strategy` (see
    `distribution_strategy`), in `train_config.precision`; the model returned
    is always a plain float32 one, ready for inference.

    Under "multiworker" every worker of the cluster calls this with the same
    arguments; only the chief (`is_chief`) touches `checkpoint_dir`, the others
    take its state and return their last weights, `state["chief"]` False.
    """
    checkpoint_dir = Path(checkpoint_dir)
    strategy = distribution_strategy(train_config.strategy)
    multiworker = train_config.strategy == "multiworker"
    chief = is_chief(strategy)
    if chief:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(train_config.seed)
    mixed = dec.resolve_precision(train_config.precision) != "float32"
    state_path = checkpoint_dir / CHECKPOINT_STATE_FILE
    state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": 0, "wait": 0,
             "lr": train_config.learning_rate, "history": []}
    resume = chief and state_path.exists() and (checkpoint_dir / CHECKPOINT_LAST_FILE).exists()
    if resume:
        state = json.loads(state_path.read_text())
    with strategy.scope():
        model = training_model(config, train_config, train_features, state["lr"])
        if resume or multiworker:
            # Build the optimizer first so the checkpoint restores Adam's moments too.
            model.optimizer.build(model.trainable_variables)
        if resume and not multiworker:
            model.load_weights(checkpoint_dir / CHECKPOINT_LAST_FILE)
    if multiworker:
        # Every worker must run the same collective ops: an assignment to a distributed variable is one, so
        # the chief reads its checkpoint into a plain copy and every worker takes the values from it.
        source = model
        if resume:
            source = training_model(config, train_config, train_features, state["lr"])
            source.optimizer.build(source.trainable_variables)
            source.load_weights(checkpoint_dir / CHECKPOINT_LAST_FILE)
        with strategy.scope():
            state = _broadcast_from_chief(strategy, model.variables + model.optimizer.variables,
                                          source.variables + source.optimizer.variables, state, chief)
    if state["epoch"]:
        # A resumed run draws new dropout masks: replaying epoch 1's, with epoch 1's batches, let dev loss climb
        # from the third epoch of a run resumed every epoch (scripts/epoch_bleu.py's first version).
        keras.utils.set_random_seed(train_config.seed + 7919 * state["epoch"])
    done = state["epoch"] >= train_config.epochs or state["wait"] >= train_config.patience
    # A distributed batch is split row by row, which would part captions from their image's row.
    by_image = batches_by_image(config) and strategy.num_replicas_in_sync == 1
    book = _EpochBook(checkpoint_dir, state, train_config, progress, writes=chief)
    if not done:
        train_ds = training_dataset(train_features, train, config, train_config.batch_size, True, train_config.seed, by_image,
                                    first_epoch=state["epoch"])
        dev_ds = training_dataset(dev_features, dev, config, 256, False, 0, by_image) if len(dev.tokens) else None
        if multiworker:
            custom_loop(model, strategy, train_ds, dev_ds, book, state["epoch"], train_config.epochs)
        else:
            model.fit(train_ds, validation_data=dev_ds, epochs=train_config.epochs, initial_epoch=state["epoch"],
                      callbacks=[_Checkpoints(book)],
                      shuffle=False,  # the dataset shuffles itself, reproducibly by seed
                      verbose=0)
    if not chief:
        plain = dec.decoder_class(config)(config).build_all(config.feature_dim)
        plain.set_weights(model.get_weights())
        return plain, {**state, "chief": False}
    best = checkpoint_dir / CHECKPOINT_BEST_FILE
    if mixed or train_config.strategy != "default":
        # Distributed or mixed-precision models are for training; inference gets a plain float32 one.
        if not best.exists():
            best = checkpoint_dir / CHECKPOINT_LAST_FILE
            dec._save_weights(model, best)
        return load_decoder(config, best), state
    if best.exists():
        model.load_weights(best)
    return model, state
