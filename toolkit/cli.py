"""The `capkit` command: parse, call one library function, print.

Heavy modules (TensorFlow above all) are imported inside the commands, so
`capkit --help` stays instant. Every `CapkitError` ends here as a message
and a hint on stderr with a non-zero exit; `--debug` shows the traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from toolkit.config import SEARCH, SELF_CRITICAL_EPOCHS, DecoderConfig, TrainConfig
from toolkit.errors import CapkitError

app = typer.Typer(
    help="Multilingual image captioning: build language packs from Flickr8k-style data, caption, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
packs_app = typer.Typer(help="Manage installed language packs.", no_args_is_help=True)
app.add_typer(packs_app, name="packs")

_state = {"debug": False}

PacksDir = typer.Option(None, "--packs-dir", help="Where packs live (default: $CAPKIT_PACKS_DIR or ./lang_packs).")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")):
    _state["debug"] = debug


class _Progress:
    """Turns library `Report` events into tqdm bars and warnings on stderr."""

    def __init__(self, quiet: bool = False):
        self.bar = None
        self.stage = None
        self.quiet = quiet
        _state["progress"] = self  # main() closes the bar before an error, which would land on its line

    def __call__(self, kind: str, **f) -> None:
        if kind == "warning":
            self._close()
            typer.echo(f"warning: {f['message']}", err=True)
        elif kind == "stage" and not self.quiet:
            self._close()
            typer.echo(f"[{f['name']}]", err=True)
        elif kind == "progress" and not self.quiet:
            from tqdm import tqdm

            if self.stage != f["stage"] or self.bar is None:
                self._close()
                self.stage = f["stage"]
                unit = f.get("unit") or ("img" if f["stage"] == "encode" else "cap")
                self.bar = tqdm(total=f["total"], desc=f["stage"], unit=unit, unit_scale=unit == "B",
                                unit_divisor=1024 if unit == "B" else 1000,
                                file=sys.stderr, leave=False, dynamic_ncols=True)
            self.bar.update(f["done"] - self.bar.n)
            counts = {k: f[k] for k in ("cached", "sent", "failed", "reward") if k in f}
            if counts:
                self.bar.set_postfix(counts, refresh=False)
        elif kind == "epoch" and not self.quiet:
            typer.echo(f"  epoch {f['epoch']:3d}  loss {f['loss']:.3f}  dev loss {f['val_loss']:.3f}  "
                       f"lr {f['lr']:.2g}  {f['seconds']:.1f}s", err=True)
        elif kind == "resumed" and not self.quiet:
            typer.echo(f"  resuming after epoch {f['epoch']} from {f['folder']}", err=True)
        elif kind == "reused" and not self.quiet:
            typer.echo(f"  {f['what']}: not trained again", err=True)
        elif kind == "self_critical_epoch" and not self.quiet:
            self._close()
            reward = f"  reward {f['reward']:.3f}" if "reward" in f else ""
            bleu = f"  dev BLEU-4 {f['dev_bleu4']:.1f}" if "dev_bleu4" in f else ""
            typer.echo(f"  self-critical epoch {f['epoch']:3d}{reward}  dev CIDEr-D {f['dev_cider_d']:.1f}{bleu}  "
                       f"{f.get('seconds', 0):.1f}s", err=True)
        elif kind == "encoded" and not self.quiet:
            typer.echo(f"  {f['extracted']} images encoded, {f['cached']} from cache, {f['seconds']:.1f}s", err=True)

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _packs_dir(value):
    from toolkit.config import packs_dir

    return packs_dir(value)


def _check_lang(lang: str) -> str:
    import re

    if not re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]+)?", lang or ""):
        raise CapkitError(f"{lang!r} is not a language code", hint="use an ISO 639-1 code such as en, zh, ar, tr")
    return lang


def _at_least(flag: str, value, low) -> None:
    """Refuse a numeric flag below `low` here, not after an hour of translation and encoding."""
    if value < low:
        raise CapkitError(f"{flag} must be at least {low}, not {value}")


def _encoder_config(weights: str, image_size: int, batch_size: int, precision: str = "float32"):
    from toolkit.config import EncoderConfig

    return EncoderConfig(weights=weights, image_size=image_size, batch_size=batch_size, precision=precision)


def EncoderWeightsOption():
    return typer.Option(None, "--encoder-weights",
                        help="imagenet (a download), none (random, tests only), a .weights.h5 path, or the id of an encoder "
                        "in the packs dir. Default: the packs dir's encoder when it holds one, else imagenet.")


def _choose_encoder(weights: str | None, image_size: int | None, packs_dir: Path) -> tuple[str, int]:
    """--encoder-weights and --image-size as given, or the packs dir's registered encoder (said on stderr)."""
    from toolkit.encoder import choose_encoder

    choice = choose_encoder(packs_dir, weights, image_size)
    if choice.note:
        typer.echo(choice.note, err=True)
    return choice.weights, choice.image_size


def _search_options(beam: int, length_penalty: float, no_repeat_ngram: int) -> dict:
    """The search flags, checked."""
    _at_least("--beam", beam, 1)
    _at_least("--no-repeat-ngram", no_repeat_ngram, 0)
    if not length_penalty >= 0:
        raise CapkitError(f"--length-penalty must be 0 or more, not {length_penalty}")
    return dict(beam=beam, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram)


def BeamOption(help_="Beam width; 1 is greedy."):
    return typer.Option(SEARCH.beam, "--beam", help=help_)


def LengthPenaltyOption():
    return typer.Option(SEARCH.length_penalty, "--length-penalty",
                        help="Choose the final beam by log-probability / (length + 1)**this; 0 favours short captions.")


def NoRepeatOption():
    return typer.Option(SEARCH.no_repeat_ngram, "--no-repeat-ngram",
                        help="Forbid any n-gram of this many tokens twice in a caption; 0 allows repeats.")


@app.command("build-pack")
def build_pack(
    lang: str = typer.Argument(..., help="Target language, ISO 639-1 (en, zh, ar, tr, ...)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of a download: finds its captions, photos and "
                                        "splits (Kaggle's captions.txt + Images/, Flickr8k_text/ + Flicker8k_Dataset/, "
                                        "or one flat folder). The flags below win over what it finds."),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Caption file: Flickr8k.token.txt, Flickr8k-CN layout or Kaggle captions.txt."),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of the photos."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Folder with *train*, *dev* (and *test*) split files. "
                                          "Without split files: Flickr8k's official split for its photos, else a split by photo."),
    train_split: Optional[Path] = typer.Option(None, "--train-split"),
    dev_split: Optional[Path] = typer.Option(None, "--dev-split"),
    test_split: Optional[Path] = typer.Option(None, "--test-split"),
    split_ratios: Optional[str] = typer.Option(None, "--split-ratios", help="Make a split by photo with these train/dev/test "
                                               "shares (default for data without split files: 90/5/5)."),
    split_seed: int = typer.Option(0, "--split-seed", help="Seed of a split made by photo."),
    source_lang: str = typer.Option("en", "--source-lang", help="Language of --captions; equal to LANG means no translation."),
    translator: str = typer.Option("google", "--translator", help="google, mymemory, libre, deepl, microsoft, identity or file:PATH."),
    translator_url: Optional[str] = typer.Option(None, "--translator-url", help="Server of the libre back end."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Translator key (or its environment variable); never stored."),
    encoder_weights: Optional[str] = EncoderWeightsOption(),
    image_size: Optional[int] = typer.Option(None, "--image-size",
                                             help="Encoder input side (Xception: 299; at least 71). 224 halves "
                                             "feature extraction but scored -1.5 BLEU-4 on the full dev split "
                                             "(README, Design)."),
    packs_dir: Optional[Path] = PacksDir,
    decoder: str = typer.Option(DecoderConfig.architecture, "--decoder",
                                help="lstm (the image sets the LSTM's first state), attention (the LSTM looks over "
                                "the encoder's feature grid for every word; caches the grids, 400 KB an image at 299 px) "
                                "or merge (the classic tutorials' design, for comparison)."),
    epochs: int = typer.Option(TrainConfig.epochs, "--epochs", help="Most epochs; early stopping on dev loss ends sooner."),
    tokenizer: str = typer.Option(DecoderConfig.tokenizer, "--tokenizer",
                                  help="SentencePiece model: auto (char for languages scored by characters, "
                                  "such as zh and ja; bpe elsewhere), bpe, unigram, or char (one piece per character)."),
    vocab_size: int = typer.Option(DecoderConfig.vocab_size, "--vocab-size", help="Tokenizer vocabulary (a cap; small corpora get less)."),
    units: int = typer.Option(DecoderConfig.units, "--units", help="LSTM width."),
    embed_dim: int = typer.Option(DecoderConfig.embed_dim, "--embed-dim"),
    dropout: float = typer.Option(DecoderConfig.dropout, "--dropout"),
    batch_size: int = typer.Option(TrainConfig.batch_size, "--batch-size", help="Captions per training step."),
    learning_rate: float = typer.Option(TrainConfig.learning_rate, "--learning-rate", help="Adam's starting rate."),
    lr_schedule: str = typer.Option(TrainConfig.lr_schedule, "--lr-schedule",
                                    help="plateau (halve after an epoch without dev improvement), cosine (down to 0 "
                                    "over --epochs) or constant."),
    clipnorm: float = typer.Option(TrainConfig.clipnorm, "--clipnorm", help="Clip each gradient's norm to this; 0: no clipping."),
    label_smoothing: float = typer.Option(TrainConfig.label_smoothing, "--label-smoothing", help="Target probability spread over the vocabulary."),
    attention_reg: float = typer.Option(DecoderConfig.attention_reg, "--attention-reg",
                                        help="attention only: weight of the penalty spreading attention over every grid cell."),
    attention_score: str = typer.Option(DecoderConfig.attention_score, "--attention-score",
                                        help="attention only: additive (Bahdanau's, the paper's) or dot (scaled dot product; "
                                        "trains faster; with --attention-feed output it learnt less per epoch on the full split)."),
    attention_feed: str = typer.Option(DecoderConfig.attention_feed, "--attention-feed",
                                       help="attention only: output (the LSTM's current state looks, the context joins "
                                       "it at the head; no loop of its own in training) or input (the context enters "
                                       "the LSTM's next step, Show, Attend and Tell; 2.3x slower an epoch on a CPU)."),
    attention_units: int = typer.Option(DecoderConfig.attention_units, "--attention-units",
                                        help="attention only: width of the attention's keys and query; 0 is the "
                                        "LSTM's width. Narrower is faster with additive scores."),
    deep_output: bool = typer.Option(DecoderConfig.deep_output, "--deep-output/--no-deep-output",
                                     help="attention only: the head reads tanh(W (h, context) + word embedding) "
                                     "(Show, Attend and Tell's deep output) instead of h and the context; a smaller head."),
    patience: int = typer.Option(TrainConfig.patience, "--patience", help="Epochs without dev improvement before stopping."),
    min_delta: float = typer.Option(TrainConfig.min_delta, "--min-delta",
                                    help="Smallest dev-loss fall that counts as an improvement."),
    self_critical_epochs: Optional[int] = typer.Option(
        None, "--self-critical-epochs", show_default=False,
        help=f"After teacher forcing, epochs of self-critical training on --self-critical-reward (the best dev "
             f"epoch is kept); 0 skips it. Default: {SELF_CRITICAL_EPOCHS} with --strategy default, else 0."),
    self_critical_lr: float = typer.Option(TrainConfig.self_critical_lr, "--self-critical-lr",
                                           help="Adam's rate for the self-critical epochs."),
    self_critical_lr_schedule: str = typer.Option(
        TrainConfig.self_critical_lr_schedule, "--self-critical-lr-schedule",
        help="constant, or cosine: from --self-critical-lr down to 0 over the self-critical epochs."),
    self_critical_reward: str = typer.Option(
        TrainConfig.self_critical_reward, "--self-critical-reward",
        help="What the self-critical samples are rewarded with: cider-d, bleu4 (sentence BLEU-4, BLEU+1 "
             "smoothing) or cider-d+bleu4 (their sum). The kept epoch is the best on dev by the same measure."),
    self_critical_dropout: bool = typer.Option(
        TrainConfig.self_critical_dropout, "--self-critical-dropout/--no-self-critical-dropout",
        help="Dropout in the self-critical gradient step. The captions are sampled without it; off, the step "
             "follows the policy that sampled them."),
    precision: str = typer.Option(TrainConfig.precision, "--precision",
                                  help="Training's arithmetic: auto (float16 on a GPU, else float32), float32, bfloat16 "
                                  "(extraction, teacher forcing and self-critical steps; 1.25-1.7x on CPUs with "
                                  "AVX512_BF16 or AMX) or float16 (teacher forcing). Packs stay float32."),
    beam: int = BeamOption("Beam width for the scores written into the pack."),
    length_penalty: float = LengthPenaltyOption(),
    no_repeat_ngram: int = NoRepeatOption(),
    pack_version: str = typer.Option("1.0.0", "--pack-version"),
    seed: int = typer.Option(TrainConfig.seed, "--seed"),
    strategy: str = typer.Option("default", "--strategy",
                                 help="Training devices: default (one), mirrored (every GPU of this machine) or multiworker "
                                      "(every machine of the TF_CONFIG cluster; run the same command on each)."),
):
    """Translate, encode, tokenize, train and score: writes PACKS_DIR/LANG/."""
    from toolkit.config import (ATTENTION_FEEDS, ATTENTION_SCORES, DECODER_ARCHITECTURES, LR_SCHEDULES, PRECISIONS,
                                SELF_CRITICAL_LR_SCHEDULES, SELF_CRITICAL_REWARDS, TOKENIZER_MODELS)

    _check_lang(lang)
    if decoder not in DECODER_ARCHITECTURES:
        raise CapkitError(f"--decoder must be one of {', '.join(DECODER_ARCHITECTURES)}, not {decoder!r}")
    _check_lang(source_lang)
    if tokenizer not in TOKENIZER_MODELS:
        raise CapkitError(f"--tokenizer must be one of {', '.join(TOKENIZER_MODELS)}, not {tokenizer!r}")
    if epochs < 1:
        raise CapkitError(f"--epochs must be at least 1, not {epochs}")
    search = _search_options(beam, length_penalty, no_repeat_ngram)
    for flag, value, low in (("--image-size", 71 if image_size is None else image_size, 71), ("--units", units, 1),
                             ("--embed-dim", embed_dim, 1), ("--batch-size", batch_size, 1), ("--patience", patience, 0),
                             ("--self-critical-epochs", self_critical_epochs or 0, 0)):
        _at_least(flag, value, low)
    if not 0 <= dropout < 1:
        raise CapkitError(f"--dropout must be in [0, 1), not {dropout}")
    if not learning_rate > 0:
        raise CapkitError(f"--learning-rate must be positive, not {learning_rate}")
    if not self_critical_lr > 0:
        raise CapkitError(f"--self-critical-lr must be positive, not {self_critical_lr}")
    if self_critical_lr_schedule not in SELF_CRITICAL_LR_SCHEDULES:
        raise CapkitError(f"--self-critical-lr-schedule must be one of {', '.join(SELF_CRITICAL_LR_SCHEDULES)}, "
                          f"not {self_critical_lr_schedule!r}")
    if self_critical_reward not in SELF_CRITICAL_REWARDS:
        raise CapkitError(f"--self-critical-reward must be one of {', '.join(SELF_CRITICAL_REWARDS)}, "
                          f"not {self_critical_reward!r}")
    if lr_schedule not in LR_SCHEDULES:
        raise CapkitError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, not {lr_schedule!r}")
    if precision not in PRECISIONS:
        raise CapkitError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not clipnorm >= 0:
        raise CapkitError(f"--clipnorm must be 0 or more, not {clipnorm}")
    if not min_delta >= 0:
        raise CapkitError(f"--min-delta must be 0 or more, not {min_delta}")
    if attention_score not in ATTENTION_SCORES:
        raise CapkitError(f"--attention-score must be one of {', '.join(ATTENTION_SCORES)}, not {attention_score!r}")
    if attention_feed not in ATTENTION_FEEDS:
        raise CapkitError(f"--attention-feed must be one of {', '.join(ATTENTION_FEEDS)}, not {attention_feed!r}")
    if attention_units < 0:
        raise CapkitError(f"--attention-units must be 0 (the LSTM's width) or more, not {attention_units}")
    if not attention_reg >= 0:
        raise CapkitError(f"--attention-reg must be 0 or more, not {attention_reg}")
    if not 0 <= label_smoothing < 1:
        raise CapkitError(f"--label-smoothing must be in [0, 1), not {label_smoothing}")
    split_files = None
    if splits:
        from toolkit.build import find_split_files

        split_files = find_split_files(splits)
    elif train_split and dev_split:
        split_files = {"train": train_split, "dev": dev_split}
        if test_split:
            split_files["test"] = test_split
    elif train_split or dev_split or test_split:
        raise CapkitError("give both --train-split and --dev-split", hint="or no split flag: capkit then finds or makes the split")
    from toolkit.data import parse_split_ratios
    from toolkit.layout import plan_data
    from toolkit.build import build_pack as run
    from toolkit.progress import Report

    plan = plan_data(data=data, captions=captions, images=images, split_files=split_files,
                     ratios=parse_split_ratios(split_ratios) if split_ratios else None, seed=split_seed,
                     packs_dir=_packs_dir(packs_dir))
    for line in plan.notes:
        typer.echo(line, err=True)
    weights, image_size = _choose_encoder(encoder_weights, image_size, _packs_dir(packs_dir))
    options = {k: v for k, v in (("url", translator_url), ("api_key", api_key)) if v}
    result = run(
        lang, plan.captions, plan.images, plan.split_files, _packs_dir(packs_dir),
        source_lang=source_lang, translator=translator, translator_options=options, split_method=plan.split,
        # bfloat16 asked for by name covers the extraction too; auto, float16 and float32 extract in float32
        encoder_config=_encoder_config(weights, image_size, 32, "bfloat16" if precision == "bfloat16" else "float32"),
        decoder_config=DecoderConfig(architecture=decoder, vocab_size=vocab_size, units=units, embed_dim=embed_dim,
                                     dropout=dropout, attention_reg=attention_reg, attention_score=attention_score,
                                     attention_feed=attention_feed, attention_units=attention_units,
                                     deep_output=deep_output, tokenizer=tokenizer),
        train_config=TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                 lr_schedule=lr_schedule, clipnorm=clipnorm, label_smoothing=label_smoothing,
                                 patience=patience, min_delta=min_delta, seed=seed, strategy=strategy,
                                 self_critical_epochs=self_critical_epochs, self_critical_lr=self_critical_lr,
                                 self_critical_lr_schedule=self_critical_lr_schedule,
                                 self_critical_reward=self_critical_reward,
                                 self_critical_dropout=self_critical_dropout, precision=precision),
        pack_version=pack_version, report=Report(_Progress()), **search,
    )
    if not result.chief:
        typer.echo(f"worker done: trained {lang} with the cluster; the chief writes the pack")
        return
    m = result.manifest
    typer.echo(f"pack {lang} written to {result.pack_dir} in {m['build_seconds']:.0f}s "
               f"({decoder} decoder, {m['data']['n_train_images']} train images, {m['training']['epochs_run']} epochs)")
    typer.echo("stages: " + ", ".join(f"{k} {v:.0f}s" for k, v in m["stage_seconds"].items()))
    from toolkit.evaluate import BleuResult, format_table

    for split, systems in m["scores"].items():
        rows = [_bleu_from_dict(systems["model"])]
        base = {lang: {k: _bleu_from_dict(v) for k, v in systems.items() if k != "model"}}
        typer.echo(f"\n{split} split ({_search_text(systems['model'])}):")
        typer.echo(format_table(rows, base))


def _search_text(d: dict) -> str:
    """'beam 3, length penalty 1.0, no repeated 3-grams' from a scores entry."""
    parts = [f"beam {d.get('beam')}"]
    if d.get("length_penalty"):
        parts.append(f"length penalty {d['length_penalty']:g}")
    if d.get("no_repeat_ngram"):
        parts.append(f"no repeated {d['no_repeat_ngram']}-grams")
    return ", ".join(parts)


def _bleu_from_dict(d: dict):
    from dataclasses import fields

    from toolkit.evaluate import BleuResult

    names = {f.name for f in fields(BleuResult)}
    kw = {k: v for k, v in d.items() if k in names}
    if kw.get("ci"):
        kw["ci"] = {k: tuple(v) for k, v in kw["ci"].items()}
    return BleuResult(**kw)


@app.command()
def caption(
    inputs: List[Path] = typer.Argument(..., help="Images or folders of images."),
    lang: List[str] = typer.Option(..., "--lang", help="Pack language; repeat for several, or 'all'."),
    beam: int = BeamOption(),
    length_penalty: float = LengthPenaltyOption(),
    no_repeat_ngram: int = NoRepeatOption(),
    fmt: str = typer.Option("text", "--format", help="text or json."),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels", help="Refuse images with more pixels (decompression bombs)."),
    packs_dir: Optional[Path] = PacksDir,
):
    """Print one caption per image (and per language)."""
    if fmt not in ("text", "json"):
        raise CapkitError(f"--format must be text or json, not {fmt!r}")
    for code in lang:
        code == "all" or _check_lang(code)
    search = _search_options(beam, length_penalty, no_repeat_ngram)
    _at_least("--max-pixels", max_pixels, 1)
    from toolkit.captioner import caption_images
    from toolkit.progress import Report

    out = caption_images(inputs, lang, _packs_dir(packs_dir), max_pixels=max_pixels,
                         report=Report(_Progress(quiet=True)), **search)
    # A file name that is not UTF-8 must not crash the output after all the work: show it with U+FFFD.
    rows = [{"image": typer.format_filename(r["image"]), "lang": r["lang"], "caption": r["caption"]} for r in out.rows]
    if fmt == "json":
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        several = len({r["lang"] for r in rows}) > 1
        for r in rows:
            typer.echo(f"{r['image']}\t" + (f"{r['lang']}\t" if several else "") + r["caption"])
    _fail_on_skipped(out.failures)


def _fail_on_skipped(failures: dict) -> None:
    if failures:
        for msg in failures.values():
            typer.echo(f"skipped: {msg}", err=True)
        typer.echo(f"{len(failures)} image(s) skipped; the others are done", err=True)
        raise typer.Exit(1)


@app.command()
def evaluate(
    lang: List[str] = typer.Option(..., "--lang", help="Pack language; repeat for several, or 'all'."),
    references: Optional[Path] = typer.Option(None, "--references", help="Reference captions (default: the pack's own references.txt)."),
    images: Path = typer.Option(..., "--images", help="Folder of the photos."),
    split: Path = typer.Option(..., "--split", help="File of the image names to score (e.g. the test split)."),
    beam: int = BeamOption(),
    length_penalty: float = LengthPenaltyOption(),
    no_repeat_ngram: int = NoRepeatOption(),
    bootstrap: int = typer.Option(0, "--bootstrap", help="Resamples for 95% confidence intervals (e.g. 1000)."),
    fmt: str = typer.Option("table", "--format", help="table or json."),
    packs_dir: Optional[Path] = PacksDir,
):
    """Corpus BLEU-1..4 and CIDEr-D per language, beside constant-caption and retrieval baselines."""
    if fmt not in ("table", "json"):
        raise CapkitError(f"--format must be table or json, not {fmt!r}")
    search = _search_options(beam, length_penalty, no_repeat_ngram)
    _at_least("--bootstrap", bootstrap, 0)
    for code in lang:
        code == "all" or _check_lang(code)
    from toolkit.evaluate import REPEAT_ORDER, format_table
    from toolkit.progress import Report
    from toolkit.score import evaluate_packs

    results = evaluate_packs(lang, _packs_dir(packs_dir), images, split, references, bootstrap=bootstrap,
                             report=Report(_Progress(quiet=True)), **search)
    if fmt == "json":
        typer.echo(json.dumps([{k: v for k, v in r.items() if k not in ("captions", "caption_ids")} for r in results], ensure_ascii=False, indent=1))
    else:
        rows = [_bleu_from_dict(r) for r in results]
        base = {r["lang"]: {k: _bleu_from_dict(v) for k, v in r["baselines"].items()} for r in results}
        typer.echo(format_table(rows, base))
        for r in results:
            typer.echo(f"{r['lang']}: {100 * r['repetition']:.1f}% of the captions repeat a {REPEAT_ORDER}-gram "
                       f"(references: {100 * r['references_repetition']:.1f}%)")
            for name, b in r["baselines"].items():
                if "vs_pack" in b:
                    lo, hi = b["vs_pack"]["delta_bleu4_ci"]
                    clo, chi = b["vs_pack"]["delta_cider_d_ci"]
                    typer.echo(f"{r['lang']}: pack - {name} BLEU-4 = {r['bleu4'] - b['bleu4']:+.1f} (95% CI {lo:+.1f} to {hi:+.1f}); "
                               f"pack better in {100 * b['vs_pack']['p_pack_better']:.1f}% of {bootstrap} paired resamples; "
                               f"CIDEr-D {r['cider_d'] - b['cider_d']:+.1f} (95% CI {clo:+.1f} to {chi:+.1f})")


@app.command("report")
def report_cmd(
    inputs: Optional[List[Path]] = typer.Argument(None, help="Images or folders of images, as `caption` takes them."),
    lang: List[str] = typer.Option(..., "--lang", help="Pack language; repeat for several, or 'all'."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Folder or image files (with --split: the one "
                                                "folder); the same as naming them after the options."),
    out: Path = typer.Option(..., "-o", "--out", help="HTML file to write."),
    references: Optional[Path] = typer.Option(None, "--references", help="Reference captions to show (and score, with --split)."),
    split: Optional[Path] = typer.Option(None, "--split", help="Score the packs on these images: adds the BLEU and CIDEr-D table."),
    beam: int = BeamOption(),
    length_penalty: float = LengthPenaltyOption(),
    no_repeat_ngram: int = NoRepeatOption(),
    bootstrap: int = typer.Option(0, "--bootstrap", help="Resamples for 95% confidence intervals (with --split)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Show at most N images (BLEU still uses the whole split)."),
    packs_dir: Optional[Path] = PacksDir,
):
    """One self-contained HTML page: images with captions per language, BLEU and CIDEr-D table, loss curves."""
    images = [*(inputs or []), *(images or [])]
    if not images:
        raise CapkitError("no images to report on", hint="name images or folders: capkit report photos/ --lang en -o r.html")
    search = _search_options(beam, length_penalty, no_repeat_ngram)
    for code in lang:
        code == "all" or _check_lang(code)
    from toolkit.progress import Report
    from toolkit.report import build_report

    page = build_report(images, lang, _packs_dir(packs_dir), references=references, split=split,
                        bootstrap=bootstrap, **search, limit=limit, out=out, report=Report(_Progress(quiet=True)))
    typer.echo(f"report written to {out} ({len(page.encode()) / 1e6:.1f} MB)")


@app.command()
def serve(
    lang: List[str] = typer.Option(["all"], "--lang", help="Pack language to serve; repeat for several, or 'all'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network."),
    port: int = typer.Option(8000, "--port", help="TCP port; 0 picks a free one."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Refuse request bodies bigger than this (413)."),
    max_images: int = typer.Option(16, "--max-images", help="Most images in one request."),
    max_pixels: int = typer.Option(50_000_000, "--max-pixels", help="Refuse images with more pixels (decompression bombs)."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms",
                                        help="How long to wait for other requests to caption together with one."),
    max_batch_images: int = typer.Option(64, "--max-batch-images", help="Most images captioned in one batch."),
    body_timeout: float = typer.Option(30.0, "--body-timeout", help="Seconds a request's upload may take (408 after)."),
    packs_dir: Optional[Path] = PacksDir,
):
    """Serve the packs: a web page at / and a JSON API under /v1, until Ctrl-C or SIGTERM."""
    for code in lang:
        code == "all" or _check_lang(code)
    if not 0 <= port <= 65535:
        raise CapkitError(f"--port must be from 0 to 65535, not {port}")
    if not max_upload_mb > 0:
        raise CapkitError(f"--max-upload-mb must be positive, not {max_upload_mb}")
    for flag, value, low in (("--max-images", max_images, 1), ("--max-pixels", max_pixels, 1),
                             ("--max-batch-images", max_batch_images, 1)):
        _at_least(flag, value, low)
    if not 0 <= batch_wait_ms <= 10_000:
        raise CapkitError(f"--batch-wait-ms must be from 0 to 10000, not {batch_wait_ms}")
    if not body_timeout > 0:
        raise CapkitError(f"--body-timeout must be positive, not {body_timeout}")
    from toolkit.captioner import Captioner
    from toolkit.serve import ServeConfig, address, bind, create_app, server

    config = ServeConfig(host=host, port=port, max_upload_mb=max_upload_mb, max_images=max_images, max_pixels=max_pixels,
                         batch_wait_ms=batch_wait_ms, max_batch_images=max(max_batch_images, max_images),
                         body_timeout_s=body_timeout)
    sock = bind(host, port)  # before loading anything: a port in use fails in a second, not after the encoder
    captioner = Captioner(_packs_dir(packs_dir), lang, feature_cache=False)
    typer.echo(f"loading {', '.join(captioner.langs)}...", err=True)
    captioner.load()
    srv = server(create_app(captioner, config), sock, config)
    typer.echo(f"serving {', '.join(captioner.langs)} at {address(sock)} (Ctrl-C stops)")
    sys.stdout.flush()
    srv.run(sockets=[sock])
    typer.echo("stopped", err=True)


@app.command()
def translate(
    captions: Path = typer.Option(..., "--captions", help="Caption file to translate."),
    lang: str = typer.Option(..., "--lang", help="Target language."),
    translator: str = typer.Option(..., "--translator", help="google, mymemory, libre, deepl, microsoft, identity or file:PATH."),
    out: Path = typer.Option(..., "-o", "--out", help="Where to write the translations (Flickr8k token layout)."),
    source_lang: str = typer.Option("en", "--source-lang"),
    translator_url: Optional[str] = typer.Option(None, "--translator-url"),
    api_key: Optional[str] = typer.Option(None, "--api-key"),
    concurrency: int = typer.Option(4, "--concurrency", help="Requests in flight at once."),
    rate_limit: Optional[float] = typer.Option(None, "--rate-limit", help="Most requests per second."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Write what succeeded even if some captions failed."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Translation cache (default: PACKS_DIR/.cache/translations.sqlite)."),
    packs_dir: Optional[Path] = PacksDir,
):
    """Run the translation stage alone; re-runs send only what is not cached."""
    _check_lang(lang)
    _check_lang(source_lang)
    from toolkit.data import read_captions, write_captions
    from toolkit.build import CACHE_DIR, TRANSLATION_CACHE_FILE
    from toolkit.translate import translate_captions, write_quality_report

    src = read_captions(captions)
    for p in src.problems[:20]:
        typer.echo(f"warning: {p}", err=True)
    progress = _Progress()
    done, rep = translate_captions(
        src.captions, source=source_lang, target=lang, translator=translator,
        cache_path=cache or _packs_dir(packs_dir) / CACHE_DIR / TRANSLATION_CACHE_FILE,
        url=translator_url, api_key=api_key, concurrency=concurrency, rate_limit=rate_limit,
        allow_partial=allow_partial,
        progress=lambda d: progress("progress", stage="translate", **d),
    )
    progress._close()
    failed = set(rep.failed)
    write_captions(out, [c for c in done if c.id not in failed])
    write_quality_report(out.with_name(out.name + ".quality.json"), rep)
    typer.echo(f"{rep.n_captions} captions ({rep.n_unique} unique): {rep.n_cached} cached, {rep.n_sent} sent in "
               f"{rep.n_requests} requests, {len(rep.failed)} failed -> {out}")
    if rep.failed:
        raise typer.Exit(1)


@app.command()
def encode(
    images: List[Path] = typer.Option(..., "--images", help="Images or folders of images."),
    encoder_weights: Optional[str] = EncoderWeightsOption(),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Encoder input side (default 299, or the packs dir's encoder's)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_pixels: int = typer.Option(100_000_000, "--max-pixels"),
    grid: bool = typer.Option(False, "--grid", help="Cache the spatial feature maps too, as attention packs need."),
    packs_dir: Optional[Path] = PacksDir,
):
    """Run feature extraction alone (into the shared cache) and report images/s."""
    from toolkit.encoder import Encoder
    from toolkit.images import list_images

    if image_size is not None:
        _at_least("--image-size", image_size, 71)
    _at_least("--batch-size", batch_size, 1)
    _at_least("--max-pixels", max_pixels, 1)
    paths = list_images(images)
    if not paths:
        raise CapkitError(f"no images found in {', '.join(map(str, images))}")
    progress = _Progress()
    weights, image_size = _choose_encoder(encoder_weights, image_size, _packs_dir(packs_dir))
    enc = Encoder.prepare(_encoder_config(weights, image_size, batch_size), _packs_dir(packs_dir))
    ex = enc.extract(paths, progress=lambda d, t: progress("progress", stage="encode", done=d, total=t), max_pixels=max_pixels,
                     grid=grid)
    progress._close()
    typer.echo(f"encoder {enc.id}: {ex.n_extracted} images extracted in {ex.seconds:.1f}s "
               f"({ex.images_per_second:.1f} images/s), {ex.n_cached} from cache, {len(ex.failures)} skipped")
    _fail_on_skipped(ex.failures)


@packs_app.command("list")
def packs_list(packs_dir: Optional[Path] = PacksDir):
    """Installed packs: language, version, size, BLEU-4 and CIDEr-D, encoder, created."""
    from toolkit.pack import installed_packs, load_manifest

    pd = _packs_dir(packs_dir)
    packs = installed_packs(pd)
    if not packs:
        typer.echo(f"no packs in {pd}")
        return
    typer.echo(f"{'lang':6} {'name':14} {'version':9} {'size':>8} {'BLEU-4':>7} {'CIDEr-D':>7}  {'encoder':28} created")
    for lang, folder in packs.items():
        try:
            m = load_manifest(folder)
        except CapkitError as e:
            typer.echo(f"{lang:6} BROKEN: {e.message}")
            continue
        size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
        s = m["scores"].get("test") or m["scores"].get("dev") or {}
        b4 = f"{s['model']['bleu4']:.1f}" if s else "-"
        c = s.get("model", {}).get("cider_d")  # none in scores from before capkit-bleu:2
        cider = "-" if c is None else f"{c:.1f}"
        typer.echo(f"{lang:6} {m['name']:14} {m['pack_version']:9} {size / 1e6:7.1f}M {b4:>7} {cider:>7}  "
                   f"{m['encoder']['id']:28} {m['created']}")


@packs_app.command("info")
def packs_info(lang: str = typer.Argument(...), packs_dir: Optional[Path] = PacksDir):
    """The whole manifest of a pack."""
    from toolkit.pack import find_pack, load_manifest

    typer.echo(json.dumps(load_manifest(find_pack(_packs_dir(packs_dir), lang)), indent=2, ensure_ascii=False))


@packs_app.command("remove")
def packs_remove(lang: str = typer.Argument(...), packs_dir: Optional[Path] = PacksDir):
    """Delete an installed pack (the shared encoder stays)."""
    import shutil

    from toolkit.pack import find_pack

    folder = find_pack(_packs_dir(packs_dir), lang)
    shutil.rmtree(folder)
    typer.echo(f"removed {folder}")


@packs_app.command("verify")
def packs_verify(lang: Optional[str] = typer.Argument(None), packs_dir: Optional[Path] = PacksDir):
    """Check every pack file against the manifest's checksums, and that its encoder is present."""
    from toolkit.pack import find_pack, installed_packs, load_manifest, verify_files
    from toolkit.share import encoder_problem

    pd = _packs_dir(packs_dir)
    langs = [lang] if lang else list(installed_packs(pd))
    bad = 0
    for code in langs:
        folder = find_pack(pd, code)
        m = load_manifest(folder)
        problems = [f"{name}: checksum mismatch or missing" for name in verify_files(folder, m)]
        enc = encoder_problem(pd, m)
        if enc:
            problems.append(f"{enc[0]} (hint: {enc[1]})")
        bad += bool(problems)
        typer.echo(f"{code}: " + ("ok" if not problems else "; ".join(problems)))
    if bad:
        raise typer.Exit(1)


@packs_app.command("export")
def packs_export(
    lang: str = typer.Argument(...),
    out: str = typer.Option(..., "-o", "--out", help="Archive to write (LANG.cappack), or a folder to write it in (DIR/ is made)."),
    with_encoder: bool = typer.Option(False, "--with-encoder",
                                      help="Put the encoder's weights in the archive too (about 84 MB), so it installs anywhere."),
    packs_dir: Optional[Path] = PacksDir,
):
    """Write a pack to one .cappack zip to share; its encoder is named, or with --with-encoder carried."""
    from toolkit.share import export_pack

    r = export_pack(_packs_dir(packs_dir), _check_lang(lang), out, with_encoder=with_encoder)
    typer.echo(f"exported {r.lang} {r.pack_version} ({r.n_files} files{', encoder included' if r.with_encoder else ''}, "
               f"{r.size / 1e6:.1f} MB) to {r.path}")


def EncoderWeightsOption():
    return typer.Option(None, "--encoder-weights",
                        help="When the pack's encoder is missing here and not in the archive: imagenet (Keras's "
                        "download) or a .weights.h5 path; used only if its digest is the pack's.")


def MaxSizeOption():
    return typer.Option(512, "--max-size-mb", help="Refuse archives that unpack to more than this.")


def _import_summary(r) -> None:
    if r.action == "unchanged":
        typer.echo(f"{r.lang} {r.manifest['pack_version']} is already installed, identical; nothing to do")
    elif r.action == "replaced":
        typer.echo(f"replaced {r.lang} {r.previous_version or '(broken)'} by {r.manifest['pack_version']} in {r.pack_dir}")
    else:
        typer.echo(f"installed {r.lang} {r.manifest['pack_version']} in {r.pack_dir}")
    if r.encoder_registered:
        where = "the archive" if r.encoder_registered == "archive" else r.encoder_registered
        typer.echo(f"registered encoder {r.manifest['encoder']['id']} from {where}")


@packs_app.command("import")
def packs_import(
    archive: Path = typer.Argument(..., help="A .cappack written by `capkit packs export`."),
    force: bool = typer.Option(False, "--force", help="Replace an installed pack of another version or build."),
    max_size_mb: int = MaxSizeOption(),
    encoder_weights: Optional[str] = EncoderWeightsOption(),
    packs_dir: Optional[Path] = PacksDir,
):
    """Check a .cappack completely, then install it in one swap."""
    from toolkit.progress import Report
    from toolkit.share import import_pack

    r = import_pack(archive, _packs_dir(packs_dir), force=force, max_bytes=max_size_mb * 2**20,
                    encoder_weights=encoder_weights, report=Report(_Progress()))
    _import_summary(r)


IndexOption = typer.Option(None, "--index", help="Pack index: a URL or a file (default: $CAPKIT_INDEX; there is no built-in one).")


@packs_app.command("install")
def packs_install(
    source: str = typer.Argument(..., help="A .cappack file, an http(s) URL of one, or a pack name in the index: zh, zh==1.2.0."),
    index: Optional[str] = IndexOption,
    force: bool = typer.Option(False, "--force", help="Replace an installed pack of another version or build."),
    max_size_mb: int = MaxSizeOption(),
    encoder_weights: Optional[str] = EncoderWeightsOption(),
    packs_dir: Optional[Path] = PacksDir,
):
    """Download (size and sha256 checked, resumed if cut), check like `import`, install."""
    from toolkit.index import install
    from toolkit.progress import Report

    progress = _Progress()
    r = install(source, _packs_dir(packs_dir), index=index, force=force, max_bytes=max_size_mb * 2**20,
                encoder_weights=encoder_weights, report=Report(progress))
    progress._close()
    _import_summary(r.imported)


@packs_app.command("available")
def packs_available(index: Optional[str] = IndexOption, packs_dir: Optional[Path] = PacksDir):
    """What an index offers, beside what is installed; a newer version is marked."""
    from toolkit.index import available, index_location, load_index

    idx = load_index(index_location(index))
    rows = available(idx, _packs_dir(packs_dir))
    if not rows:
        typer.echo(f"{idx.location} offers no packs")
        return
    typer.echo(f"{'lang':6} {'name':14} {'version':9} {'size':>8} {'BLEU-4':>7} {'encoder':9} {'installed':10} note")
    for r in rows:
        s = r["scores"].get("test") or r["scores"].get("dev") or {}
        b4 = f"{s['bleu4']:.1f}" if "bleu4" in s else "-"
        note = {"newer": "newer than installed", "older": "older than installed", "installed": "installed"}.get(r["status"], "")
        if r["needs"]:
            note = f"needs capkit {r['needs']}" + (f"; {note}" if note else "")
        typer.echo(f"{r['lang']:6} {r['name']:14} {r['version']:9} {r['size'] / 1e6:7.1f}M {b4:>7} "
                   f"{'included' if r['encoder']['included'] else 'named':9} {r['installed'] or '-':10} {note}".rstrip())


@packs_app.command("index")
def packs_index(
    folder: Path = typer.Argument(..., help="Folder of .cappack files to list."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Index to write (default: FOLDER/index.json)."),
):
    """Write the index of a folder of .cappack files, to serve beside them."""
    from toolkit.index import build_index

    data = build_index(folder, out)
    where = out or folder / "index.json"
    typer.echo(f"indexed {len(data['packs'])} pack(s) in {where}: "
               + ", ".join(f"{e['lang']} {e['version']}" for e in data["packs"]))


def main() -> None:
    """Entry point: run the app; turn user errors and Ctrl-C into messages and exit codes.

    Exit codes: 0 done; 1 some inputs skipped, or an unexpected failure; 2 a user
    error or bad usage; 130 interrupted. No traceback unless --debug.
    """
    debug = "--debug" in sys.argv[1:]
    if not debug:
        import warnings

        # Pillow warns about damaged metadata it works around (corrupt EXIF, ...): nothing a user can act on.
        warnings.filterwarnings("ignore", module="PIL")
    try:
        # Without standalone mode typer returns the code of a typer.Exit, and 130 for Ctrl-C, instead of exiting.
        code = app(standalone_mode=False)
    except CapkitError as e:
        if debug:
            raise
        _error(e.message, e.hint)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        code = 130
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:  # EOF at a prompt (and Ctrl-C in older typer)
        code = 130
    except typer.TyperException as e:
        # Usage errors (unknown option, missing argument, a value of the wrong type) in capkit's form; typer's
        # copy of click names the class as click does, so it is found by name.
        if any(c.__name__ == "UsageError" for c in type(e).__mro__):
            _usage_error(e)
        else:
            e.show()
        sys.exit(e.exit_code)
    except OSError as e:  # the disk or the system refused, somewhere no check names it more precisely
        if debug:
            raise
        import errno

        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        _error(f"{e.filename}: {e.strerror or e}" if e.filename else f"{e.strerror or e}",
               "free some disk space and run the same command again; finished work is kept" if full
               else "rerun with --debug to see where it happened")
        sys.exit(1)
    except Exception as e:
        if debug:
            raise
        _error(f"unexpected {type(e).__name__}: {e}", "this is a bug in capkit: rerun with --debug and report the traceback")
        sys.exit(1)
    if code == 130:
        _close_progress()
        typer.echo("\ninterrupted: finished work (translations, features, checkpoints, downloads) is kept; "
                   "run the same command to resume", err=True)
    if isinstance(code, int) and code:
        sys.exit(code)


def _usage_error(e) -> None:
    """click's usage error in capkit's one-line form, the hint naming the command's --help."""
    message = e.format_message().strip().rstrip(".")
    # The command names in argv (click's context may not exist yet, and names `python -m pytest` under tests).
    group, names = typer.main.get_command(app), ["capkit"]
    for word in (w for w in sys.argv[1:] if w != "--debug"):
        group = getattr(group, "commands", {}).get(word)
        if group is None:
            break
        names.append(word)
    command = " ".join(names)
    _error(message[:1].lower() + message[1:], f"`{command} --help` lists its options and arguments")


def _close_progress() -> None:
    if _state.get("progress") is not None:
        _state["progress"]._close()


def _error(message: str, hint: str | None) -> None:
    _close_progress()
    typer.echo(f"error: {message}", err=True)
    if hint:
        typer.echo(f"  hint: {hint}", err=True)
