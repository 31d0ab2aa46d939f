"""Settings of every trainable stage, as plain dataclasses.

CLI flags override fields; a pack's manifest stores them (`asdict`), so a pack
alone rebuilds its model: `DecoderConfig(**manifest["decoder"])`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

PACKS_DIR_ENV = "CAPKIT_PACKS_DIR"
DEFAULT_PACKS_DIR = "lang_packs"
# what every refusal to write into a packs dir suggests
PACKS_DIR_HINT = f"pass --packs-dir or set {PACKS_DIR_ENV} to a folder you can write"


def packs_dir(override: str | Path | None = None) -> Path:
    """Where packs live: `override`, else $CAPKIT_PACKS_DIR, else ./lang_packs."""
    return Path(override or os.environ.get(PACKS_DIR_ENV) or DEFAULT_PACKS_DIR)


@dataclass
class EncoderConfig:
    name: str = "xception"      # the only backbone today; part of the encoder's identity
    image_size: int = 299       # square input side; Xception's own is 299, tests use 71 (its minimum)
    weights: str = "imagenet"   # "imagenet" (Keras download), "none" (random init, tests/demo) or a .weights.h5 path
                                # or the id of an encoder registered in the packs dir (loaded, not rebuilt)
    batch_size: int = 32        # images per forward pass
    workers: int = 4            # threads decoding and resizing images ahead of the model
    precision: str = "float32"  # or "bfloat16": the forward pass under Keras mixed_bfloat16, 1.5x on CPUs with
                                # AVX512_BF16; features within 2% of float32's, a pack's captions level with them
                                # (docs/experiments.md). Like the batch size, not part of the encoder's identity


DECODER_ARCHITECTURES = ("lstm", "attention", "merge")
ATTENTION_SCORES = ("dot", "additive")
ATTENTION_FEEDS = ("input", "output")
LR_SCHEDULES = ("plateau", "cosine", "constant")
SELF_CRITICAL_LR_SCHEDULES = ("constant", "cosine")
# What a self-critical sample is rewarded with against its image's training references (toolkit.selfcritical).
SELF_CRITICAL_REWARDS = ("cider-d", "bleu4", "cider-d+bleu4")
# TrainConfig.precision and EncoderConfig.precision; the weights, and every pack, stay float32.
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
ENCODER_PRECISIONS = ("float32", "bfloat16")
TOKENIZER_MODELS = ("auto", "unigram", "bpe", "char")


def resolve_tokenizer(model: str, lang: str) -> str:
    """The SentencePiece model `model` means for `lang`: "auto" is "char" where BLEU counts characters, else "bpe".

    Chosen on the dev split (docs/experiments.md): in Chinese one piece per
    character took BLEU-4 from 16 to 21; in English BPE keeps frequent words
    whole where the unigram model cut them.
    """
    if model != "auto":
        return model
    from toolkit.evaluate import tokenization_name

    return "char" if tokenization_name(lang) == "chars" else "bpe"


@dataclass
class DecoderConfig:
    # "lstm": the pooled image vector sets the LSTM's initial state (toolkit.decoder.CaptionDecoder);
    # "attention": the LSTM attends over the encoder's feature grid at every word (AttentionDecoder);
    # "merge": the classic tutorials' design, image vector added to the LSTM's output (MergeDecoder), kept as
    # the reference point the others must beat.
    architecture: str = "lstm"
    tokenizer: str = "auto"     # SentencePiece model: unigram, bpe, char (one piece per character), or auto:
                                # char for languages scored by characters (zh, ja, th, ...), else bpe
    vocab_size: int = 2000      # SentencePiece vocabulary; a soft cap, shrunk for small corpora
    feature_dim: int = 2048     # encoder output width (channels of the Xception feature map)
    embed_dim: int = 256        # token embedding width; on the full Flickr8k split 512 lowered English dev loss by
                                # 0.042 and scored level BLEU-4 (+0.2, one seed; docs/experiments.md)
    units: int = 512            # LSTM state width
    dropout: float = 0.5        # on the embedding and the LSTM output; small data overfits fast
    max_length: int = 40        # longest caption in tokens (incl. end); longer captions are cut at training
    attention_reg: float = 1.0  # attention only: weight of the doubly stochastic penalty pushing every grid cell
                                # to be looked at over a caption (Show, Attend and Tell's lambda); 0 turns it off
    attention_score: str = "additive"  # attention only: "additive" (Bahdanau's v . tanh(W a + W h), the paper's)
                                # or "dot" (scaled dot product of query and key): products only, an epoch 1.24x
                                # shorter on a CPU; with the output feed it learnt less per epoch (docs/experiments.md)
    deep_output: bool = False   # attention only: the head reads tanh(W [h, context] + word embedding), the
                                # paper's deep output, instead of [h, context]
    attention_feed: str = "output"  # attention only: where the context goes. "output": the LSTM reads the words
                                # alone and its current h queries the grid, the context joining h at the head (Lu et
                                # al. 2017's spatial attention): every word's attention is one batched product after
                                # a plain LSTM. "input": into the LSTM's next step, the query being the previous h
                                # (Show, Attend and Tell), a serial loop per word; every pack before the sixteenth
                                # session. On the full split the output feed learnt as much per epoch (two epochs, one
                                # seed) in 1.7x less time; with 128-wide additive scores its epoch is 1.9x the lstm's
                                # against the input feed's 4.3x (docs/experiments.md)
    attention_units: int = 128  # attention only: width of the attention's keys and query (its score space); 0 is
                                # `units` (every pack before the sixteenth session). The additive score's tanh runs
                                # over (captions, words, cells, this): 128 costs 1.3x less time an epoch than 512,
                                # and 0.015 nats of dev loss over two epochs on the full split (docs/experiments.md)

    @property
    def attention_width(self) -> int:
        return self.attention_units or self.units


# Self-critical epochs a build runs unless told otherwise: on the full Flickr8k split, two seeds a language,
# five epochs at 5e-4 bought more dev BLEU-4 and CIDEr-D than the teacher-forced decoder they start from
# (English +1.3 and +1.8 BLEU-4, Chinese +3.0 and +2.9; docs/experiments.md), for 12-13 more minutes a build
# on 2 CPU cores.
SELF_CRITICAL_EPOCHS = 5


@dataclass
class TrainConfig:
    epochs: int = 30            # upper bound; early stopping on dev loss usually ends sooner
    batch_size: int = 64        # captions per step
    learning_rate: float = 2e-3 # Adam's starting rate
    lr_schedule: str = "plateau"  # "plateau": halved after each epoch without dev-loss improvement; "cosine": from
                                # learning_rate down to 0 over `epochs`, by epoch (over 16 epochs on the full
                                # Flickr8k split: -0.5 English BLEU-4, one seed); "constant"
    clipnorm: float = 5.0       # each gradient's norm is clipped to this; 0 turns clipping off
    label_smoothing: float = 0.1  # share of each target's probability spread over the whole vocabulary
    patience: int = 3           # epochs without dev-loss improvement before stopping
    min_delta: float = 0.005    # an epoch improves only if dev loss falls by more than this (nats per token); the
                                # best weights are kept whatever the gain. On the full Flickr8k split, epochs 10-22
                                # each gained under 0.005 and bought no dev BLEU (docs/experiments.md)
    self_critical_epochs: int | None = None  # after teacher forcing, epochs of self-critical training on
                                # `self_critical_reward` (toolkit.selfcritical); 0 skips it. The best dev epoch is
                                # kept, 0 included.
                                # None: SELF_CRITICAL_EPOCHS under the "default" strategy, else 0 (it runs on one
                                # device only); `build_pack` writes the resolved number into the manifest
    self_critical_lr: float = 5e-4  # Adam's rate for those epochs; on the full Flickr8k split 5 epochs at 5e-4
                                # bought +1.3 English BLEU-4 over the teacher-forced decoder, at 2e-4 +0.5 (one seed)
    self_critical_lr_schedule: str = "constant"  # "constant", or "cosine": from self_critical_lr down to 0 over
                                # the self-critical epochs, step by step
    self_critical_reward: str = "cider-d"  # each sample's reward: "cider-d"; "bleu4", sentence BLEU-4 (BLEU+1
                                # smoothing); "cider-d+bleu4", their sum. The kept epoch is the one whose greedy dev
                                # captions score best on the same measure (corpus BLEU-4 for the BLEU part)
    self_critical_samples: int = 5  # captions sampled per image and step; each is judged against the others' mean
    self_critical_batch: int = 50   # images per self-critical step
    self_critical_dropout: bool = True  # dropout on in the gradient step. The samples are drawn without it, so
                                # with it the step raises the log-probabilities of another policy than the one
                                # sampled (a fresh mask each step); off, the gradient is the sampled policy's own
    seed: int = 0               # shuffling and initialisation
    precision: str = "auto"     # training's arithmetic: "float16" (Keras mixed_float16, for GPUs' tensor cores;
                                # teacher forcing only), "bfloat16" (mixed_bfloat16, for CPUs with AVX512_BF16 or
                                # AMX; the self-critical steps too), "float32"; "auto": float16 where a GPU is
                                # present, else float32. Variables stay float32; `build_pack` writes the resolved
                                # name into the manifest. Extraction has its own, EncoderConfig.precision
    strategy: str = "default"   # tf.distribute: default (one device), mirrored (all local GPUs) or multiworker
                                # (every worker of the TF_CONFIG cluster; see toolkit.train)


@dataclass
class SearchConfig:
    """How captions are generated, by default, by `caption`, `evaluate`, `report` and the scores of `build-pack`.

    Chosen on the dev split (docs/experiments.md); every command can override each field.
    """

    beam: int = 5                 # beams per image; 1 is greedy
    length_penalty: float = 0.5   # final beam choice by log-probability / (length + 1)**this; 0 favours short captions
    no_repeat_ngram: int = 3      # forbid any n-gram of this many tokens twice in one caption; 0 allows all


SEARCH = SearchConfig()


# Fields added after packs were first written, by class, with the value every
# pack written before the field had. A manifest that lacks one predates it and
# gets that value (not today's default): every pack before `architecture` is an
# "lstm" one with a unigram tokenizer, trained without label smoothing. Any
# other missing field is still an error.
ADDED_FIELDS = {
    "DecoderConfig": {"architecture": "lstm", "attention_reg": 1.0, "deep_output": False, "tokenizer": "unigram",
                      "attention_score": "additive", "attention_feed": "input", "attention_units": 0},
    "TrainConfig": {"label_smoothing": 0.0, "lr_schedule": "plateau", "clipnorm": 5.0, "min_delta": 0.0,
                    "self_critical_epochs": 0, "self_critical_lr": 5e-4, "self_critical_samples": 5,
                    "self_critical_lr_schedule": "constant", "precision": "auto",
                    "self_critical_batch": 50, "self_critical_dropout": True,
                    "self_critical_reward": "cider-d"},
}


def from_dict(cls, data: dict):
    """Rebuild a config from a manifest section; unknown or missing keys are errors (but see ADDED_FIELDS)."""
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    missing = names - set(data) - set(ADDED_FIELDS.get(cls.__name__, ()))
    if unknown or missing:
        from toolkit.errors import CapkitError

        raise CapkitError(
            f"{cls.__name__} in manifest does not match this toolkit: "
            f"unknown {sorted(unknown)}, missing {sorted(missing)}"
        )
    return cls(**{**ADDED_FIELDS.get(cls.__name__, {}), **data})
