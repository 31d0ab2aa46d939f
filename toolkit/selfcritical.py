"""Self-critical fine-tuning: after teacher forcing, train the decoder on the metric it is judged by (CIDEr-D).

Teacher forcing trains each word given the reference's previous words; the
captions a user gets are searched from the model's own words. Self-critical
sequence training (Rennie et al. 2017) closes that gap: sample captions
from the model, reward each with its CIDEr-D against its image's training
references, and raise the log-probability of the samples that scored above a
baseline, lower those below. The baseline here is the mean reward of the
same image's other samples (Luo 2020, "A better variant of self-critical
sequence training"), so no greedy caption is decoded per step.

An epoch goes over every training image once, in batches of
`TrainConfig.self_critical_batch` images with `self_critical_samples`
captions each, at Adam's `self_critical_lr` (constant, or falling to 0 by
a cosine over every step of every epoch: `self_critical_lr_schedule`), in
mixed bfloat16 where `TrainConfig.precision` asks for it. The samples are
drawn without dropout; the gradient step runs with it
(`self_critical_dropout`, on as in every pack so far) or without, when it is
exactly the gradient of the policy that drew them.
The reward is CIDEr-D by default; `self_critical_reward` can make it
sentence BLEU-4 (BLEU+1 smoothing, `SentenceBleu`) or the sum of the two,
as Rennie et al. compared training on either. After each epoch the dev photos
are captioned greedily and scored by CIDEr-D (document frequencies of the
dev references) and, where the reward has a BLEU part, by corpus BLEU-4;
the weights scoring best on the reward's measure are kept (CIDEr-D, BLEU-4
or their sum), epoch 0 (the teacher-forced model) included, so the
fine-tuning never returns a decoder worse on dev than the one it was given.
Checkpoints as in `toolkit.train`: a run stopped between epochs resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from toolkit import decoder as dec
from toolkit.backend import dtype_policy
from toolkit.config import SELF_CRITICAL_REWARDS, TrainConfig
from toolkit.decoder import keras, tf
from toolkit.evaluate import MAX_ORDER, CiderD, SentenceBleu, _image_stats, _scores_from_sums, bleu_tokenize
from toolkit.pack import atomic_write_text
from toolkit.tokenizer import BOS_ID, EOS_ID, PAD_ID
from toolkit.train import cosine_rate

STATE_FILE = "self_critical.json"
LAST_FILE = "self_critical_last.weights.h5"
BEST_FILE = "self_critical_best.weights.h5"


def reference_tokens(texts: dict[str, list[str]], names: Sequence[str], lang: str) -> list[list[list[str]]]:
    """Each image's references as BLEU tokenizes them (words, or characters in Chinese), in `names` order."""
    return [[bleu_tokenize(t, lang) for t in texts[n]] for n in names]


def sampler(decoder, samples: int, max_length: int):
    """A tf.function (features (n, ...), seed (2,) int32) -> ids (n * samples, T), sampled from the model.

    Row i * samples + k is image i's k-th sample. Each row holds its tokens
    up to and including EOS, then PAD; T is the longest sample (at most
    `max_length`). Stateless: the same seed gives the same samples.
    """

    # Never PAD or BOS: no caption holds them, though an untrained model gives them some probability.
    never = tf.constant(np.isin(np.arange(decoder.config.vocab_size), [PAD_ID, BOS_ID]))

    @tf.function(input_signature=[decoder.feature_spec(), tf.TensorSpec([2], tf.int32)])
    def sample(features, seed):
        state = tuple(tf.repeat(s, samples, axis=0) for s in decoder.initial_state(features))
        rows = tf.shape(features)[0] * samples
        out = tf.TensorArray(tf.int32, size=max_length)

        def body(t, state, tokens, finished, out):
            logp, *state = decoder.step(tokens, *state)
            logits = tf.where(never[None, :], -np.inf, tf.cast(logp, tf.float32))
            tok = tf.cast(tf.random.stateless_categorical(logits, 1, seed + tf.stack([0, t]))[:, 0], tf.int32)
            tok = tf.where(finished, PAD_ID, tok)
            return t + 1, tuple(state), tok, finished | tf.equal(tok, EOS_ID), out.write(t, tok)

        def cond(t, state, tokens, finished, out):
            return (t < max_length) & ~tf.reduce_all(finished)

        _, _, _, _, out = tf.while_loop(
            cond, body, (tf.constant(0), state, tf.fill([rows], BOS_ID), tf.zeros([rows], tf.bool), out))
        return tf.transpose(out.stack())

    return sample


def advantages(rewards: np.ndarray, samples: int) -> np.ndarray:
    """Each sample's reward minus the mean of its image's other samples' (rows grouped by image, `samples` each).

    >>> advantages(np.array([1.0, 3.0, 2.0, 2.0]), 2)
    array([-2.,  2.,  0.,  0.])
    """
    r = rewards.reshape(-1, samples)
    others = (r.sum(axis=1, keepdims=True) - r) / (samples - 1)
    return (r - others).reshape(-1)


def learning_rate(train_config: TrainConfig, step: int, total: int) -> float:
    """Adam's rate at self-critical step `step` of `total`: constant, or cosine from `self_critical_lr` to 0.

    >>> [round(learning_rate(TrainConfig(self_critical_lr_schedule="cosine"), s, 4) * 1e4, 3) for s in range(4)]
    [5.0, 4.268, 2.5, 0.732]
    """
    if train_config.self_critical_lr_schedule == "cosine":
        return cosine_rate(train_config.self_critical_lr, step, total)
    return float(train_config.self_critical_lr)


def policy_loss(model, feats, inputs, targets, adv, training: bool):
    """Minus the advantage-weighted log-probability of each sampled token, averaged over the real tokens.

    `targets` (n, T) are the samples, `inputs` the same shifted right after
    BOS (`_teacher_inputs`), `adv` (n,) each sample's advantage. `training`
    runs the decoder's dropout; without it the log-probabilities are those
    the sampler drew from.
    """
    logits = model((feats, inputs), training=training)
    logp = tf.gather(tf.nn.log_softmax(tf.cast(logits, tf.float32)), targets, batch_dims=2)
    mask = tf.cast(tf.not_equal(targets, PAD_ID), tf.float32)
    return -tf.reduce_sum(adv[:, None] * logp * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


def _teacher_inputs(ids: np.ndarray) -> np.ndarray:
    """Decoder inputs that replay sampled `ids` (n, T): BOS, then each sampled token but the last."""
    return np.concatenate([np.full((len(ids), 1), BOS_ID, np.int32), ids[:, :-1]], axis=1)


class Reward:
    """The reward `kind` (a SELF_CRITICAL_REWARDS name) of captions against `references`, and its dev measure.

    `score(hyps, images)` is each caption's reward against the references of
    its image: CIDEr-D, sentence BLEU-4, or their sum. `dev(hyps)` scores one
    greedy caption per image of the corpus, in order: "dev_cider_d" (mean
    CIDEr-D, always), "dev_bleu4" (corpus BLEU-4, where the reward has a
    BLEU part) and "dev_score", the sum of the reward's own parts, by which
    the kept epoch is chosen.
    """

    def __init__(self, kind: str, references: list[list[list[str]]]):
        if kind not in SELF_CRITICAL_REWARDS:
            raise ValueError(f"self_critical_reward must be one of {', '.join(SELF_CRITICAL_REWARDS)}, not {kind!r}")
        self.parts, self.references = kind.split("+"), references
        self._scorers = {}

    def _scorer(self, part: str):
        if part not in self._scorers:  # built once, on first use: 6,000 images' reference n-grams take seconds
            self._scorers[part] = (CiderD if part == "cider-d" else SentenceBleu)(self.references)
        return self._scorers[part]

    def score(self, hyps: Sequence[Sequence[str]], images: Sequence[int]) -> np.ndarray:
        return sum(self._scorer(part).score(hyps, images) for part in self.parts)

    def dev(self, hyps: list[list[str]]) -> dict:
        scores = {"cider-d": float(self._scorer("cider-d").score(hyps, range(len(hyps))).mean())}
        if "bleu4" in self.parts:
            sums = np.sum([_image_stats(h, r) for h, r in zip(hyps, self.references)], axis=0)
            scores["bleu4"] = float(_scores_from_sums(sums)[0][MAX_ORDER - 1])
        return {**{f"dev_{k.replace('-', '_')}": v for k, v in scores.items()},
                "dev_score": sum(scores[part] for part in self.parts)}


def _hypotheses(tokenizer, ids, lang: str) -> list[list[str]]:
    """Sampled or searched ids (EOS and PAD dropped by `decode`) as the tokens CIDEr-D scores."""
    return [bleu_tokenize(t, lang) for t in tokenizer.decode(ids)]


def fine_tune(
    model,
    train_features,
    train_refs: list[list[list[str]]],
    dev_features,
    dev_refs: list[list[list[str]]],
    tokenizer,
    lang: str,
    train_config: TrainConfig,
    checkpoint_dir: Path,
    progress: Callable[[dict], None] | None = None,
):
    """`model` fine-tuned by self-critical training for `train_config.self_critical_epochs`; returns (model, state).

    `train_features` (n, ...) are what the decoder reads (pooled vectors or
    grids), row i the image of `train_refs[i]`; the same for dev. The state
    holds, per epoch, the mean reward of the training samples and the dev
    scores of greedy captions (`Reward.dev`), and the epoch whose weights
    were kept.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    cfg, tc = model.config, train_config
    plain, model = model, _in_precision(model, tc.precision)
    K, B = tc.self_critical_samples, tc.self_critical_batch
    model.compile(optimizer=keras.optimizers.Adam(tc.self_critical_lr, clipnorm=tc.clipnorm or None))
    model.optimizer.build(model.trainable_variables)
    state_path = checkpoint_dir / STATE_FILE
    reward = Reward(tc.self_critical_reward, train_refs)
    dev_reward = Reward(tc.self_critical_reward, dev_refs)

    def dev_scores() -> dict:
        """Of the float32 model this returns, whatever the steps compute in: the score kept is what it gets."""
        from toolkit.generate import beam_search_tf

        if plain is not model:
            plain.set_weights(model.get_weights())
        ids = beam_search_tf(plain, dev_f, BOS_ID, EOS_ID, beam=1, max_length=cfg.max_length)
        return dev_reward.dev(_hypotheses(tokenizer, ids, lang))

    dev_f = np.asarray(dev_features[np.arange(len(dev_refs))], np.float32)
    if state_path.exists() and (checkpoint_dir / LAST_FILE).exists():
        state = json.loads(state_path.read_text())
        state.setdefault("best_dev_score", state.get("best_dev_cider_d"))  # written before other rewards
        model.load_weights(checkpoint_dir / LAST_FILE)
    else:
        start = dev_scores()
        state = {"epoch": 0, "best_epoch": 0, "best_dev_score": start["dev_score"],
                 "history": [{"epoch": 0, **start}]}
        dec._save_weights(model, checkpoint_dir / BEST_FILE)
    sample = sampler(model, K, cfg.max_length)

    @tf.function(reduce_retracing=True)
    def train_step(feats, inputs, targets, adv):
        with tf.GradientTape() as tape:
            loss = policy_loss(model, feats, inputs, targets, adv, training=tc.self_critical_dropout)
        grads = tape.gradient(loss, model.trainable_variables)
        model.optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    n = len(train_refs)
    steps = -(-n // B)
    for epoch in range(state["epoch"], tc.self_critical_epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng((tc.seed, 104729, epoch))
        order = rng.permutation(n)
        rewards = []
        for step, start in enumerate(range(0, n, B)):
            model.optimizer.learning_rate.assign(
                learning_rate(tc, epoch * steps + step, tc.self_critical_epochs * steps))
            images = np.sort(order[start:start + B])
            feats = np.asarray(train_features[images], np.float32)
            ids = sample(feats, tf.constant(rng.integers(0, 2**31 - 1, 2), tf.int32)).numpy()
            r = reward.score(_hypotheses(tokenizer, ids.tolist(), lang), np.repeat(images, K))
            rewards.append(r.mean())
            train_step(tf.repeat(feats, K, axis=0), _teacher_inputs(ids), ids,
                       tf.constant(advantages(r, K) / 100.0, tf.float32))
            if progress:
                progress({"stage": "self_critical", "epoch": epoch + 1, "step": step + 1, "steps": steps,
                          "reward": float(np.mean(rewards))})
        scores = dev_scores()
        state["history"].append({"epoch": epoch + 1, "reward": float(np.mean(rewards)), **scores,
                                 "lr": float(model.optimizer.learning_rate.numpy()),
                                 "seconds": time.perf_counter() - t0})
        if scores["dev_score"] > state["best_dev_score"]:
            state.update(best_dev_score=scores["dev_score"], best_epoch=epoch + 1)
            dec._save_weights(model, checkpoint_dir / BEST_FILE)
        state["epoch"] = epoch + 1
        dec._save_weights(model, checkpoint_dir / LAST_FILE)
        atomic_write_text(state_path, json.dumps(state, indent=1))
        if progress:
            progress(dict(state["history"][-1], stage="self_critical", best_epoch=state["best_epoch"]))
    model.load_weights(checkpoint_dir / BEST_FILE)
    if plain is not model:
        plain.set_weights(model.get_weights())  # float32, whatever the steps computed in
    return plain, state


def _in_precision(model, precision: str):
    """`model` itself, or under bfloat16 a copy whose layers compute in mixed_bfloat16 (float32 variables).

    bfloat16 needs no loss scaling, so the stage's own gradient step runs in
    it as it is (1.25x a step on an AVX512_BF16 CPU, docs/experiments.md);
    float16 would, and stays float32 here.
    """
    if dec.resolve_precision(precision) != "bfloat16":
        return model
    with dtype_policy(dec.PRECISION_POLICIES["bfloat16"]):
        twin = dec.decoder_class(model.config)(model.config).build_all(model.config.feature_dim)
    twin.set_weights(model.get_weights())  # the normalisation's statistics included
    return twin
