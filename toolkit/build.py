"""The build job: `build_pack` runs the stages of `STAGES`, in the README's order.

    read -> translate -> encode -> tokenize -> train -> score -> write

Each stage is a function of plain values returning a small dataclass (or a
plain value), so it can be read, tested and re-run alone: `score_splits`
scores any decoder behind the search interface (an installed pack's
`LoadedPack.step`, say) under another search. What a stage finishes stays on
disk (translations in the cache, features in the encoder's cache, checkpoints
in `WORK_DIR`), so an interrupted build resumes. Progress and warnings go to
`report`, never print.

At about 500 lines this module is over the project's 400 on purpose: it is
the seven stages side by side, none over 50 lines, each beside the
dataclass it returns, so one build reads top to bottom in one file. The
stages' own work is in the stage modules (data, translate, encoder,
tokenizer, decoder, generate, evaluate, pack, modelcard).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from toolkit import __version__
from toolkit.config import (ADDED_FIELDS, LR_SCHEDULES, PACKS_DIR_HINT, SEARCH, SELF_CRITICAL_EPOCHS,
                            SELF_CRITICAL_LR_SCHEDULES, SELF_CRITICAL_REWARDS, DecoderConfig, EncoderConfig, SearchConfig,
                            TrainConfig, resolve_tokenizer)
from toolkit.data import Caption, check_splits, group_by_image, read_captions, read_split, write_captions
from toolkit.errors import CapkitError
from toolkit.generate import beam_search_batched
from toolkit.modelcard import write_model_card
from toolkit.pack import (
    CAPTIONS_FILE, DECODER_WEIGHTS_FILE, FORMAT_VERSION, HISTORY_FILE, MANIFEST_FILE, PACK_FORMAT, REFERENCES_FILE,
    TOKENIZER_FILE, WORK_DIR, atomic_write_text, file_sha256, install_dir, load_manifest, validate_manifest,
    verify_files,
)
from toolkit.progress import Report

IN_MEMORY_FEATURES_BYTES = 2 << 30  # above this, training reads features memory-mapped
CACHE_DIR = ".cache"        # translation cache shared by all builds
TRANSLATION_CACHE_FILE = "translations.sqlite"

STAGES = ("read", "translate", "encode", "tokenize", "train", "score", "write")  # the "stage" events, in order


def find_split_files(splits_dir: Path) -> dict[str, Path]:
    """train/dev/test split files in a folder, by name: Flickr_8k.trainImages.txt, *dev*/*val*, *test*."""
    splits_dir = Path(splits_dir)
    if not splits_dir.is_dir():
        raise CapkitError(f"{splits_dir}: not a folder", hint="--splits takes the folder holding the split files")
    found: dict[str, Path] = {}
    for p in sorted(splits_dir.glob("*.txt")):
        name = p.name.lower()
        for split, words in (("train", ("train",)), ("dev", ("dev", "val")), ("test", ("test",))):
            if any(w in name for w in words) and split not in found:
                found[split] = p
    if "train" not in found or "dev" not in found:
        raise CapkitError(
            f"{splits_dir}: no train and dev split files found (have: {', '.join(p.name for p in splits_dir.glob('*.txt')) or 'none'})",
            hint="name them *train*.txt and *dev*.txt, or pass --train-split and --dev-split",
        )
    return found


@dataclass
class BuildResult:
    pack_dir: Path
    manifest: dict
    warnings: list[str] = field(default_factory=list)
    chief: bool = True  # False on a multiworker cluster's other workers: they train, the chief writes (manifest {})


def build_pack(
    lang: str,
    captions_path: Path,
    images_dir: Path,
    split_files: dict[str, Path],
    packs_dir: Path,
    *,
    source_lang: str = "en",
    translator: str = "google",
    translator_options: dict | None = None,
    encoder_config: EncoderConfig | None = None,
    decoder_config: DecoderConfig | None = None,
    train_config: TrainConfig | None = None,
    pack_version: str = "1.0.0",
    beam: int = SEARCH.beam,
    length_penalty: float = SEARCH.length_penalty,
    no_repeat_ngram: int = SEARCH.no_repeat_ngram,
    report: Report | None = None,
    split_method: dict | None = None,
) -> BuildResult:
    """Every stage, in order: read, translate, encode, tokenize, train, score, write `packs_dir/lang/`.

    `split_method` says how `split_files` were made, for the manifest
    (`toolkit.layout.DataPlan.split`); default {"method": "files"}.

    An "attention" decoder (`decoder_config.architecture`) trains and is
    scored on the encoder's feature grids, extracted and cached alongside
    the pooled features; the retrieval baseline stays on pooled features.
    """
    report = report or Report()
    dec_cfg = replace(decoder_config) if decoder_config else DecoderConfig()  # a copy: the build fills in fields
    tr_cfg = replace(train_config) if train_config else TrainConfig()  # a copy: check_settings resolves a field
    strategy = check_settings(lang, dec_cfg, tr_cfg)
    from toolkit.train import barrier, is_chief

    chief = is_chief(strategy)  # on a multiworker cluster only the chief writes the pack; the others train with it
    packs_dir, started = Path(packs_dir), time.perf_counter()
    _check_writable(packs_dir)
    report("stage", name="read")
    source = read_data(captions_path, Path(images_dir), split_files, report)
    if not chief:  # the chief translates and extracts first: with a shared packs folder, the others find it cached
        barrier(strategy)
    report("stage", name="translate")
    translation = translate_data(source.captions, lang, packs_dir, source_lang, translator, translator_options, report,
                                 write_report=chief)
    report("stage", name="encode")
    features = encode_images(source.present, Path(images_dir), encoder_config or EncoderConfig(), packs_dir,
                             dec_cfg.architecture == "attention", report)
    if chief:
        barrier(strategy)  # the other workers may read the caches now
    report("stage", name="tokenize")
    learned = training_texts(translation.texts, features.present["train"], lang)
    tokenizer = tokenize(learned, features.present["train"], lang, dec_cfg)
    dec_cfg.vocab_size = tokenizer.vocab_size
    report("stage", name="train")
    trained = train(lang, features, learned, tokenizer, dec_cfg, tr_cfg, packs_dir, report)
    if not chief:
        return BuildResult(packs_dir / lang, {}, report.warnings, chief=False)
    if tr_cfg.self_critical_epochs and features.present.get("dev"):
        report("stage", name="self-critical")
        trained = self_critical(lang, features, learned, translation.texts, tokenizer, tr_cfg, trained, report)
    report("stage", name="score")
    from toolkit.generate import KerasStepModel

    scores = score_splits(KerasStepModel(trained.model), tokenizer, features, translation.texts, lang, dec_cfg.max_length,
                          pack_version, SearchConfig(beam, length_penalty, no_repeat_ngram))
    report("stage", name="write")
    manifest = make_manifest(lang, pack_version, captions_path, split_files, source_lang, source, translation, features,
                             tokenizer, dec_cfg, tr_cfg, trained, scores, split_method)
    final = write_pack(packs_dir, lang, trained, tokenizer, translation.captions, features.present, manifest)
    manifest["build_seconds"] = round(time.perf_counter() - started, 1)
    report.end_stage()
    manifest["stage_seconds"] = dict(report.stage_seconds)  # returned, not in the pack's file
    return BuildResult(final, manifest, report.warnings)


def check_settings(lang: str, dec_cfg: DecoderConfig, tr_cfg: TrainConfig):
    """Fail now, not after the translation, on settings no stage can run; resolve what `dec_cfg` and `tr_cfg` leave open.

    The tokenizer model `dec_cfg` means is named, "auto" precision becomes the
    one this machine trains in, and self-critical epochs left at None become
    SELF_CRITICAL_EPOCHS on one device, 0 under a distributed strategy.
    Returns the `tf.distribute` strategy `tr_cfg.strategy` names.
    """
    from toolkit.decoder import decoder_class, resolve_precision
    from toolkit.train import distribution_strategy

    decoder_class(dec_cfg)  # an unknown architecture fails now, not after the translation
    for name, value, allowed in (("lr_schedule", tr_cfg.lr_schedule, LR_SCHEDULES),
                                 ("self_critical_lr_schedule", tr_cfg.self_critical_lr_schedule,
                                  SELF_CRITICAL_LR_SCHEDULES),
                                 ("self_critical_reward", tr_cfg.self_critical_reward, SELF_CRITICAL_REWARDS)):
        if value not in allowed:  # the CLI checks its flags; a Python caller's typo would train on another schedule
            raise CapkitError(f"TrainConfig.{name} must be one of {', '.join(allowed)}, not {value!r}")
    tr_cfg.precision = resolve_precision(tr_cfg.precision)  # the manifest names the arithmetic really used
    if tr_cfg.self_critical_epochs is None:
        tr_cfg.self_critical_epochs = SELF_CRITICAL_EPOCHS if tr_cfg.strategy == "default" else 0
    if tr_cfg.self_critical_epochs and tr_cfg.strategy != "default":
        raise CapkitError("self-critical training runs on one device only",
                          hint="drop --self-critical-epochs, or train with --strategy default")
    dec_cfg.tokenizer = resolve_tokenizer(dec_cfg.tokenizer, lang)  # the manifest names the model really trained
    return distribution_strategy(tr_cfg.strategy)  # a strategy capkit cannot train under fails now, before any work


# -- 1. read -----------------------------------------------------------------------

@dataclass
class SourceData:
    """What `read_data` found: the captions of the split images that are on disk."""

    captions: list[Caption]          # every caption of an image in `present`, in the source language
    present: dict[str, list[str]]    # split -> its images that are captioned and on disk, in split-file order
    n_missing: int                   # images named in the splits and captioned, but not on disk


def read_data(captions_path: Path, images_dir: Path, split_files: dict[str, Path], report: Report) -> SourceData:
    """Captions, splits, images present; problems become warnings, no usable train image an error."""
    source = read_captions(captions_path)
    for p in source.problems[:20]:
        report("warning", message=p)
    if len(source.problems) > 20:
        report("warning", message=f"{captions_path}: {len(source.problems) - 20} more problems not shown")
    splits = {k: read_split(v) for k, v in split_files.items()}
    for w in check_splits({str(split_files[k]): v for k, v in splits.items()}, source):
        report("warning", message=w)
    by_image_src = {}
    for c in source.captions:
        by_image_src.setdefault(c.image, []).append(c)
    if not images_dir.is_dir():
        raise CapkitError(f"{images_dir}: not a folder of images")
    present: dict[str, list[str]] = {}
    missing = 0
    for split, names in splits.items():
        have = [n for n in names if n in by_image_src and (images_dir / n).is_file()]
        missing += sum(1 for n in names if n in by_image_src and not (images_dir / n).is_file())
        present[split] = have
    if missing:
        report("warning", message=f"{missing} images named in the splits are not in {images_dir}; they are skipped")
    if not present.get("train"):
        raise CapkitError(
            f"no train image of {split_files['train']} is both captioned in {captions_path} and present in {images_dir}",
            hint="check that --images points at the photos and --captions at their caption file",
        )
    used = [c for s in present.values() for n in s for c in by_image_src[n]]
    return SourceData(used, present, missing)


# -- 2. translate --------------------------------------------------------------------

@dataclass
class Translation:
    """The captions in the pack's language (`translate_data`)."""

    captions: list[Caption]        # the source captions translated, same images, indices and order
    translator: str                # what the manifest records: the back end, or "none (...)"
    texts: dict[str, list[str]]    # image -> its caption texts (`group_by_image(captions)`)


def translate_data(captions: list[Caption], lang: str, packs_dir: Path, source_lang: str = "en",
                   translator: str = "google", translator_options: dict | None = None,
                   report: Report | None = None, write_report: bool = True) -> Translation:
    """Translate through the cache in `packs_dir` (nothing is sent twice); nothing to do when already in `lang`.

    A quality report (empty, identical, odd-length translations) is written beside the cache.
    """
    report = report or Report()
    if source_lang == lang or translator == "identity":
        translated, translator_used = captions, "none (captions already in the target language)"
    else:
        from toolkit.translate import translate_captions

        translated, trep = translate_captions(
            captions, source=source_lang, target=lang, translator=translator,
            cache_path=packs_dir / CACHE_DIR / TRANSLATION_CACHE_FILE,
            progress=lambda d: report("progress", stage="translate", **d),
            **(translator_options or {}),
        )
        translator_used = translator
        from toolkit.translate import write_quality_report

        # Beside the translations (the cache), so a user can inspect what the translator did.
        tag = "file-" + Path(translator[5:]).name if translator.startswith("file:") else translator
        if write_report:  # not on a multiworker cluster's other workers
            (packs_dir / CACHE_DIR).mkdir(parents=True, exist_ok=True)
            write_quality_report(packs_dir / CACHE_DIR / f"{lang}-{tag}.quality.json", trep)
        for k in ("empty", "identical", "ratio_outliers"):
            items = (trep.quality or {}).get(k)
            if items:
                report("warning", message=f"translation quality: {len(items) if hasattr(items, '__len__') else items} {k.replace('_', ' ')}")
    return Translation(translated, translator_used, group_by_image(translated))


# -- 3. encode -------------------------------------------------------------------------

@dataclass
class Features:
    """The images in the shared encoder's cache (`encode_images`)."""

    encoder: object                  # the `Encoder`; its cache holds every image of `present`
    key_of: dict[str, str]           # image name -> cache key
    present: dict[str, list[str]]    # split -> readable images (`SourceData.present` less the unreadable ones)
    n_unreadable: int                # images that could not be decoded (each one a warning)
    grid: bool                       # whether the feature grids were cached too (an attention decoder reads them)


def encode_images(present: dict[str, list[str]], images_dir: Path, encoder_config: EncoderConfig, packs_dir: Path,
                  grid: bool = False, report: Report | None = None) -> Features:
    """Features of every image in `present` (the shared encoder, its cache keyed by image content)."""
    from toolkit.encoder import Encoder

    report = report or Report()
    encoder = Encoder.prepare(encoder_config, packs_dir)
    if encoder.identity["source"] == "none":
        report("warning", message="encoder has RANDOM weights (--encoder-weights none): fine for tests and the demo, useless for real photos")
    all_names = [n for s in present.values() for n in s]
    ex = encoder.extract([images_dir / n for n in all_names],
                         progress=lambda d, t: report("progress", stage="encode", done=d, total=t), grid=grid)
    for path, msg in ex.failures.items():
        report("warning", message=msg)
    report("encoded", extracted=ex.n_extracted, cached=ex.n_cached, seconds=ex.seconds)
    key_of = {n: ex.keys[str(images_dir / n)] for n in all_names if str(images_dir / n) in ex.keys}
    present = {s: [n for n in names if n in key_of] for s, names in present.items()}
    if not present["train"]:
        raise CapkitError("no train image could be read", hint="see the warnings above")
    return Features(encoder, key_of, present, len(ex.failures), grid)


# -- 4. tokenize -------------------------------------------------------------------------

def training_texts(texts: dict[str, list[str]], train_names: list[str], lang: str) -> dict[str, list[str]]:
    """Every image's captions as the decoder learns them (`written.training_form`): "A man 's dog ." -> "a man's dog.".

    The first words' case is learned from the train split only, like the
    tokenizer; scores stay on the captions as given (their BLEU tokens are the same).
    """
    from toolkit.written import learn_casing, training_form

    casing = learn_casing(_train_texts(texts, train_names))
    return {n: [training_form(t, lang, casing) for t in ts] for n, ts in texts.items()}


def tokenize(texts: dict[str, list[str]], train_names: list[str], lang: str, dec_cfg: DecoderConfig):
    """A SentencePiece `Tokenizer` trained on the captions of `train_names` only (`dec_cfg.tokenizer`, `vocab_size`)."""
    from toolkit.tokenizer import train_tokenizer

    return train_tokenizer(_train_texts(texts, train_names), lang, dec_cfg.vocab_size, dec_cfg.tokenizer)


def _train_texts(texts: dict[str, list[str]], train_names: list[str]) -> list[str]:
    return [t for n in train_names for t in texts[n]]


# -- 5. train ------------------------------------------------------------------------------

@dataclass
class Trained:
    """A decoder trained by `train`, with its run."""

    model: object      # the Keras decoder with the best dev-loss weights
    state: dict        # `decoder.train_decoder`'s: epoch, best_epoch, best_val_loss, history
    seconds: float     # training time over every (resumed) run
    work: Path         # the checkpoint folder; `write_pack` removes it once the pack is installed
    run_key: str       # digest of everything the weights depend on: a changed setting starts afresh


def train(lang: str, features: Features, texts: dict[str, list[str]], tokenizer, dec_cfg: DecoderConfig,
          tr_cfg: TrainConfig, packs_dir: Path, report: Report | None = None) -> Trained:
    """The decoder, trained on the train split with early stopping on dev; resumes from its checkpoints."""
    from toolkit.decoder import Sequences, train_decoder
    from toolkit.train import CHECKPOINT_STATE_FILE

    report = report or Report()
    present = features.present

    def sequences(split):
        names = present.get(split, [])
        idx, toks = [], []
        for i, n in enumerate(names):
            enc = tokenizer.encode(texts[n])
            idx += [i] * len(enc)
            toks += enc
        return _decoder_features(features, split), Sequences(np.array(idx, np.int32), toks)

    train_f, train_s = sequences("train")
    dev_f, dev_s = sequences("dev")
    key_args = (lang, dec_cfg, tr_cfg, features.encoder.id, present["train"], _train_texts(texts, present["train"]))
    run_key, exact_key = _run_key(*key_args), _run_key(*key_args, with_limits=True)
    work = _checkpoints_to_resume(packs_dir, lang, run_key, exact_key, tr_cfg, report)
    if tr_cfg.self_critical_epochs and not (work / CHECKPOINT_STATE_FILE).exists():
        installed = _teacher_forced_from_pack(packs_dir / lang, (run_key, exact_key), tr_cfg, tokenizer, dec_cfg, work)
        if installed is not None:
            report("reused", what=f"the installed {lang} pack's teacher-forced decoder (same data and settings)")
            return installed
    t0 = time.perf_counter()
    model, state = train_decoder(train_f, train_s, dev_f, dev_s, dec_cfg, tr_cfg, work,
                                 progress=lambda e: report("epoch", **e))
    train_seconds = sum(h.get("seconds", 0) for h in state["history"]) or time.perf_counter() - t0
    return Trained(model, state, train_seconds, work, run_key)


def _checkpoints_to_resume(packs_dir: Path, lang: str, run_key: str, exact_key: str, tr_cfg: TrainConfig,
                           report: Report) -> Path:
    """The checkpoint folder this run trains in: its run key's, unless that cannot serve this run's limits.

    The run key leaves out the epoch limit and the patience (see `_run_key`),
    so a build stopped by either resumes with larger ones where it stopped.
    A folder already past this run's epoch limit holds weights trained for
    longer than asked: such a run trains afresh in a folder of its own (keyed
    with its limits). Builds begun before the limits left the key kept their
    checkpoints under the key with them (`exact_key`), so they resume there.
    """
    from toolkit.train import CHECKPOINT_STATE_FILE

    work, exact = (packs_dir / WORK_DIR / f"{lang}-{k}" for k in (run_key, exact_key))
    if not (work / CHECKPOINT_STATE_FILE).exists():
        return exact if (exact / CHECKPOINT_STATE_FILE).exists() else work
    try:
        done = json.loads((work / CHECKPOINT_STATE_FILE).read_text())["epoch"]
    except (OSError, ValueError, KeyError):
        return work  # train_decoder says what is wrong with it
    if done <= tr_cfg.epochs:
        if done:
            report("resumed", epoch=done, folder=str(work))
        return work
    return exact


def _teacher_forced_from_pack(pack: Path, run_keys: tuple[str, ...], tr_cfg: TrainConfig, tokenizer,
                              dec_cfg: DecoderConfig, work: Path) -> Trained | None:
    """The installed pack's decoder as this build's teacher-forced result, where it is exactly that; else None.

    Exactly: the pack was built with one of these run keys (same data, encoder
    and teacher-forcing settings) and the same epoch limit and patience (a
    pack stopped by a smaller limit is not what a larger one trains), the
    same tokenizer, intact files, and no
    self-critical epochs of its own (its weights would be the fine-tuned
    ones). A build that adds `--self-critical-epochs` to a finished one then
    trains no teacher-forced epoch again, though its checkpoints went when
    the pack was installed. (Only such builds look: a plain rebuild still
    trains afresh, as it always has.)
    """
    from toolkit.decoder import load_decoder

    try:
        m = load_manifest(pack)
    except CapkitError:
        return None
    t, tc = m.get("training", {}), m.get("train", {})
    if t.get("run_key") not in run_keys or "self_critical" in t or verify_files(pack, m):
        return None
    if (tc.get("epochs"), tc.get("patience")) != (tr_cfg.epochs, tr_cfg.patience):
        return None
    if (pack / TOKENIZER_FILE).read_bytes() != tokenizer.proto:
        return None
    state = {"epoch": t["epochs_run"], "best_epoch": t["best_epoch"], "best_val_loss": t["best_dev_loss"], "wait": 0,
             "lr": None, "history": json.loads((pack / HISTORY_FILE).read_text())}
    return Trained(load_decoder(dec_cfg, pack / DECODER_WEIGHTS_FILE), state, t["seconds"], work, t["run_key"])


def _decoder_features(features: Features, split: str):
    """What the decoder reads for `split`'s images, in `present` order: pooled vectors, or grids for attention."""
    keys = [features.key_of[n] for n in features.present.get(split, [])]
    view = features.encoder.features_view(keys, grid=features.grid)
    # Small splits train fastest from memory; large ones read the memory map batch by batch.
    return view if view.nbytes > IN_MEMORY_FEATURES_BYTES else view[np.arange(len(view))]


def self_critical(lang: str, features: Features, train_texts: dict[str, list[str]], dev_texts: dict[str, list[str]],
                  tokenizer, tr_cfg: TrainConfig, trained: Trained, report: Report | None = None) -> Trained:
    """`trained` fine-tuned on its reward (`toolkit.selfcritical`), in a checkpoint folder of its own under `trained.work`.

    The teacher-forced checkpoints are untouched, so a build that adds or
    changes self-critical settings resumes from them instead of training
    again. The manifest's `training.self_critical` records each epoch.
    """
    from toolkit.selfcritical import fine_tune, reference_tokens

    report = report or Report()
    present = features.present
    settings = {k: v for k, v in asdict(tr_cfg).items() if k.startswith("self_critical") or k in ("seed", "clipnorm")}
    if settings["self_critical_reward"] == "cider-d":
        del settings["self_critical_reward"]  # the only reward before the field: those builds keep their folder
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]

    def progress(e):
        if "step" in e:
            report("progress", stage="self-critical", done=e["step"], total=e["steps"], unit="batch",
                   reward=round(e["reward"], 1))  # the mean reward of this epoch's samples so far
        else:
            report("self_critical_epoch", **e)

    model, state = fine_tune(trained.model, _decoder_features(features, "train"),
                             reference_tokens(train_texts, present["train"], lang), _decoder_features(features, "dev"),
                             reference_tokens(dev_texts, present.get("dev", []), lang), tokenizer, lang, tr_cfg,
                             trained.work / f"self-critical-{key}", progress)
    seconds = sum(h.get("seconds", 0) for h in state["history"])
    return replace(trained, model=model, state={**trained.state, "self_critical": state},
                   seconds=trained.seconds + seconds)


# Defaults changed after their field joined the run key, with the value they had then. A key leaves an added
# field out where it has its default; were that today's default, a changed one would give new builds the key of
# older builds' runs (and resume their checkpoints, of another architecture) while older ones lost theirs.
KEYED_DEFAULTS = {"DecoderConfig": {"attention_feed": "input", "attention_units": 0}, "TrainConfig": {}}


def _run_key(lang: str, dec_cfg: DecoderConfig, tr_cfg: TrainConfig, encoder_id: str, train_names: list[str],
             train_texts: list[str], with_limits: bool = False) -> str:
    """Digest of what the teacher-forced weights depend on; runs with one key resume one another's checkpoints.

    Without the epoch limit and the patience, which say when to stop, not
    what an epoch does: a build stopped by either resumes where it stopped
    when asked for more. (Under the cosine schedule the limit shapes every
    epoch's rate, so it stays.) `with_limits`: the key as it was before,
    with both, for builds begun then (`_checkpoints_to_resume`).
    """
    defaults = {**asdict(DecoderConfig()), **KEYED_DEFAULTS["DecoderConfig"]}
    train_defaults = {**asdict(TrainConfig()), **KEYED_DEFAULTS["TrainConfig"]}
    limits = () if with_limits else ("patience",) if tr_cfg.lr_schedule == "cosine" else ("epochs", "patience")
    return hashlib.sha256(json.dumps(
        # Without the strategy: a run interrupted on GPUs may resume on a CPU, the weights are the same. So
        # without the precision each of them picks by itself (float16 on GPUs, float32 on CPUs); bfloat16, asked
        # for by name, is a run of its own. Fields added later count only where they differ from the default
        # they had when they joined (KEYED_DEFAULTS where it has changed since): a build begun before still resumes.
        [lang, {k: v for k, v in asdict(dec_cfg).items() if k not in ADDED_FIELDS["DecoderConfig"] or v != defaults[k]},
         {k: v for k, v in asdict(tr_cfg).items()
          # Self-critical settings only shape the fine-tuning after it, which keeps checkpoints of its own.
          if k != "strategy" and not k.startswith("self_critical") and k not in limits
          and not (k == "precision" and v in ("auto", "float32", "float16"))
          and (k not in ADDED_FIELDS["TrainConfig"] or v != train_defaults[k])}, encoder_id,
         sorted(train_names), train_texts[:50]], sort_keys=True
    ).encode()).hexdigest()[:12]


# -- 6. score --------------------------------------------------------------------------------

def score_splits(step, tokenizer, features: Features, texts: dict[str, list[str]], lang: str, max_length: int,
                 pack_version: str, search: SearchConfig = SEARCH) -> dict:
    """The manifest's `scores`: per split (dev, test), BLEU and CIDEr-D of `step`'s captions beside the reference points.

    `step` is any decoder behind the search interface: the build's freshly
    trained one, or an installed pack's (`load_pack(...).step`) to score it
    again under another `search`.
    """
    from toolkit.tokenizer import BOS_ID, EOS_ID
    from toolkit.written import written_form

    encoder, key_of, present = features.encoder, features.key_of, features.present
    train_pooled = encoder.features([key_of[n] for n in present["train"]])  # the retrieval baseline's
    scores = {}
    for split in ("dev", "test"):
        names = present.get(split) or []
        if not names:
            continue
        keys = [key_of[n] for n in names]
        ids = beam_search_batched(step, encoder.features_view(keys, grid=True) if features.grid else encoder.features(keys),
                                  BOS_ID, EOS_ID, search.beam, max_length, search.length_penalty, search.no_repeat_ngram)
        hyps = {n: written_form(text, lang) for n, text in zip(names, tokenizer.decode(ids))}  # as `caption` shows them
        refs = {n: texts[n] for n in names}
        scores[split] = _score_with_baselines(hyps, refs, lang, encoder.features(keys), train_pooled, present["train"],
                                              texts, pack_version,
                                              dict(beam=search.beam, length_penalty=search.length_penalty,
                                                   no_repeat_ngram=search.no_repeat_ngram))
    return scores


def _score_with_baselines(hyps, refs, lang, feats, train_f, train_names, texts, pack_version, search: dict) -> dict:
    from toolkit.evaluate import corpus_bleu_scores, most_frequent_caption, nearest_neighbour_captions

    train_first = [texts[n][0] for n in train_names]
    constant = most_frequent_caption([t for n in train_names for t in texts[n]])
    names = list(hyps)
    retrieval = dict(zip(names, nearest_neighbour_captions(feats, train_f, train_first)))
    out = {"model": corpus_bleu_scores(hyps, refs, lang, pack_version=pack_version).to_dict()}
    out["model"].update(search)  # beam, length_penalty, no_repeat_ngram
    out["retrieval"] = corpus_bleu_scores(retrieval, refs, lang, pack_version=pack_version).to_dict()
    out["constant"] = corpus_bleu_scores({n: constant for n in names}, refs, lang, pack_version=pack_version).to_dict()
    return out


# -- 7. write ----------------------------------------------------------------------------------

def make_manifest(lang: str, pack_version: str, captions_path: Path, split_files: dict[str, Path], source_lang: str,
                  source: SourceData, translation: Translation, features: Features, tokenizer, dec_cfg: DecoderConfig,
                  tr_cfg: TrainConfig, trained: Trained, scores: dict, split_method: dict | None = None) -> dict:
    """The manifest of the pack the stages made, its `files` still empty (`write_pack` fills them in)."""
    present, state = features.present, trained.state
    return {
        "format": PACK_FORMAT,
        "format_version": FORMAT_VERSION,
        "lang": lang,
        "name": f"capkit-{lang}",
        "pack_version": pack_version,
        "toolkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoder": {k: features.encoder.identity[k] for k in ("id", "name", "image_size", "digest", "source")},
        "tokenizer": {"file": TOKENIZER_FILE, "type": f"sentencepiece-{dec_cfg.tokenizer}", "vocab_size": tokenizer.vocab_size,
                      "case": tokenizer.case},  # "folded" where absent: every pack before case was kept
        "decoder": asdict(dec_cfg),
        "train": asdict(tr_cfg),
        "data": {
            "captions": Path(captions_path).name,
            "captions_sha256": file_sha256(Path(captions_path)),
            "source_lang": source_lang,
            "translator": translation.translator,
            "splits": {k: Path(v).name for k, v in split_files.items()},
            "split": split_method or {"method": "files"},
            "n_train_images": len(present["train"]),
            "n_dev_images": len(present.get("dev", [])),
            "n_test_images": len(present.get("test", [])),
            "n_train_captions": len(_train_texts(translation.texts, present["train"])),
            "n_missing_images": source.n_missing,
            "n_unreadable_images": features.n_unreadable,
        },
        "training": {
            "epochs_run": state["epoch"],
            "best_epoch": state["best_epoch"],
            "best_dev_loss": state["best_val_loss"],
            "seconds": round(trained.seconds, 1),
            "hardware": _hardware(),
            "run_key": trained.run_key,  # what the teacher-forced weights depend on (`_teacher_forced_from_pack`)
            **({"self_critical": {k: state["self_critical"][k] for k in ("epoch", "best_epoch", "history")}}
               if "self_critical" in state else {}),
        },
        "scores": scores,
        "files": {},
    }


def write_pack(packs_dir: Path, lang: str, trained: Trained, tokenizer, captions: list[Caption],
               present: dict[str, list[str]], manifest: dict) -> Path:
    """Write the pack whole in a staging folder and swap it in as `packs_dir/lang`; the old one stays until then."""
    from toolkit.decoder import save_decoder

    staging = packs_dir / f".staging-{lang}-{trained.run_key}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    tokenizer.save(staging / TOKENIZER_FILE)
    save_decoder(trained.model, staging / DECODER_WEIGHTS_FILE)
    write_captions(staging / CAPTIONS_FILE, [c for c in captions if c.image in set(present["train"])])
    eval_names = set(present.get("dev", [])) | set(present.get("test", []))
    write_captions(staging / REFERENCES_FILE, [c for c in captions if c.image in eval_names])
    atomic_write_text(staging / HISTORY_FILE, json.dumps(trained.state["history"], indent=1))
    write_model_card(staging, manifest)
    manifest["files"] = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    validate_manifest(manifest, "new manifest")
    atomic_write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False))
    final = packs_dir / lang
    install_dir(staging, final)
    shutil.rmtree(trained.work, ignore_errors=True)
    return final


def _hardware() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"{platform.machine()}, {os.cpu_count()} CPU cores" + (f", {len(gpus)} GPU" if gpus else ", no GPU")


def _check_writable(packs_dir: Path) -> None:
    try:
        packs_dir.mkdir(parents=True, exist_ok=True)
        # Named per process: a multiworker cluster's workers probe one shared folder at the same moment, and
        # a shared name let one worker's unlink meet the other's already-removed probe (ENOENT).
        probe = packs_dir / f".write-probe-{os.getpid()}-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CapkitError(f"{packs_dir}: packs folder is not writable ({e.strerror or e})",
                          hint=PACKS_DIR_HINT) from None
