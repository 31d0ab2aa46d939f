"""The three user jobs, each one function: build a pack, caption images, evaluate packs.

Stages live in their own modules; this file wires them in order and keeps
what each finished (translations, features, checkpoints) on disk so that an
interrupted build resumes. Progress and warnings go to `report`, never print.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from toolkit import __version__
from toolkit.config import ADDED_FIELDS, SEARCH, DecoderConfig, EncoderConfig, TrainConfig, from_dict, resolve_tokenizer
from toolkit.data import Caption, check_splits, group_by_image, read_captions, read_split, write_captions
from toolkit.errors import CapkitError
from toolkit.generate import beam_search_batched  # noqa: F401  (moved; importable here as before)
from toolkit.pack import (
    CAPTIONS_FILE, DECODER_WEIGHTS_FILE, FORMAT_VERSION, HISTORY_FILE, MANIFEST_FILE, MODEL_CARD_FILE,
    PACK_FORMAT, REFERENCES_FILE, TOKENIZER_FILE, LoadedPack, architecture, atomic_write_text, file_sha256, find_pack,
    install_dir, load_manifest, load_pack, resolve_langs, validate_manifest,
)
from toolkit.progress import Report
from toolkit.captioner import Captioner, Captions, caption_images  # noqa: F401  (the caption job)
from toolkit.score import evaluate_packs  # noqa: F401  (the evaluate job)

IN_MEMORY_FEATURES_BYTES = 2 << 30  # above this, training reads features memory-mapped
WORK_DIR = ".work"          # per-build checkpoints, removed once the pack is installed
CACHE_DIR = ".cache"        # translation cache shared by all builds
TRANSLATION_CACHE_FILE = "translations.sqlite"


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
) -> BuildResult:
    """Every stage, in order: read, translate, encode, tokenize, train, score, write `packs_dir/lang/`.

    An "attention" decoder (`decoder_config.architecture`) trains and is
    scored on the encoder's feature grids, extracted and cached alongside
    the pooled features; the retrieval baseline stays on pooled features.
    """
    report = report or Report()
    enc_cfg = encoder_config or EncoderConfig()
    dec_cfg = replace(decoder_config) if decoder_config else DecoderConfig()  # a copy: the build fills in fields
    tr_cfg = train_config or TrainConfig()
    from toolkit.decoder import decoder_class, distribution_strategy

    decoder_class(dec_cfg)  # an unknown architecture fails now, not after the translation
    dec_cfg.tokenizer = resolve_tokenizer(dec_cfg.tokenizer, lang)  # the manifest names the model really trained
    distribution_strategy(tr_cfg.strategy)  # a strategy capkit cannot train under fails now, before any work
    grid = dec_cfg.architecture == "attention"
    packs_dir = Path(packs_dir)
    images_dir = Path(images_dir)
    started = time.perf_counter()
    _check_writable(packs_dir)

    # 1. Data: captions, splits, images present.
    report("stage", name="read")
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

    # 2. Translation (cached; nothing is sent twice).
    report("stage", name="translate")
    if source_lang == lang or translator == "identity":
        translated, translator_used = used, "none (captions already in the target language)"
    else:
        from toolkit.translate import translate_captions

        translated, trep = translate_captions(
            used, source=source_lang, target=lang, translator=translator,
            cache_path=packs_dir / CACHE_DIR / TRANSLATION_CACHE_FILE,
            progress=lambda d: report("progress", stage="translate", **d),
            **(translator_options or {}),
        )
        translator_used = translator
        from toolkit.translate import write_quality_report

        # Beside the translations (the cache), so a user can inspect what the translator did.
        tag = "file-" + Path(translator[5:]).name if translator.startswith("file:") else translator
        (packs_dir / CACHE_DIR).mkdir(parents=True, exist_ok=True)
        write_quality_report(packs_dir / CACHE_DIR / f"{lang}-{tag}.quality.json", trep)
        for k in ("empty", "identical", "ratio_outliers"):
            items = (trep.quality or {}).get(k)
            if items:
                report("warning", message=f"translation quality: {len(items) if hasattr(items, '__len__') else items} {k.replace('_', ' ')}")
    texts = group_by_image(translated)

    # 3. Features (shared encoder, cache keyed by image content).
    report("stage", name="encode")
    from toolkit.encoder import Encoder

    encoder = Encoder.prepare(enc_cfg, packs_dir)
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

    # 4. Tokenizer on the train split only.
    report("stage", name="tokenize")
    from toolkit.tokenizer import BOS_ID, EOS_ID, train_tokenizer

    train_texts = [t for n in present["train"] for t in texts[n]]
    tokenizer = train_tokenizer(train_texts, lang, dec_cfg.vocab_size, dec_cfg.tokenizer)
    dec_cfg.vocab_size = tokenizer.vocab_size

    # 5. Decoder, resumable from its checkpoints.
    report("stage", name="train")
    from toolkit.decoder import Sequences, train_decoder

    def decoder_features(split):
        keys = [key_of[n] for n in present.get(split, [])]
        view = encoder.features_view(keys, grid=grid)
        # Small splits train fastest from memory; large ones read the memory map batch by batch.
        return view if view.nbytes > IN_MEMORY_FEATURES_BYTES else view[np.arange(len(view))]

    def sequences(split):
        names = present.get(split, [])
        idx, toks = [], []
        for i, n in enumerate(names):
            enc = tokenizer.encode(texts[n])
            idx += [i] * len(enc)
            toks += enc
        return decoder_features(split), Sequences(np.array(idx, np.int32), toks)

    train_f, train_s = sequences("train")
    dev_f, dev_s = sequences("dev")
    train_pooled = encoder.features([key_of[n] for n in present["train"]])  # the retrieval baseline's
    defaults, train_defaults = DecoderConfig(), TrainConfig()
    run_key = hashlib.sha256(json.dumps(
        # Without the strategy: a run interrupted on GPUs may resume on a CPU, the weights are the same.
        # Fields added later count only when set: a build begun before they existed still resumes.
        [lang, {k: v for k, v in asdict(dec_cfg).items()
                if k not in ADDED_FIELDS["DecoderConfig"] or v != getattr(defaults, k)},
         {k: v for k, v in asdict(tr_cfg).items()
          if k != "strategy" and (k not in ADDED_FIELDS["TrainConfig"] or v != getattr(train_defaults, k))}, encoder.id,
         sorted(present["train"]), train_texts[:50]], sort_keys=True
    ).encode()).hexdigest()[:12]
    work = packs_dir / WORK_DIR / f"{lang}-{run_key}"
    t0 = time.perf_counter()
    model, state = train_decoder(train_f, train_s, dev_f, dev_s, dec_cfg, tr_cfg, work,
                                 progress=lambda e: report("epoch", **e))
    train_seconds = sum(h.get("seconds", 0) for h in state["history"]) or time.perf_counter() - t0

    # 6. Scores on dev (and test), with the reference points beside them.
    report("stage", name="score")
    from toolkit.generate import KerasStepModel

    step = KerasStepModel(model)
    scores = {}
    for split in ("dev", "test"):
        names = present.get(split) or []
        if not names:
            continue
        keys = [key_of[n] for n in names]
        ids = beam_search_batched(step, encoder.features_view(keys, grid=True) if grid else encoder.features(keys),
                                  BOS_ID, EOS_ID, beam, dec_cfg.max_length, length_penalty, no_repeat_ngram)
        hyps = dict(zip(names, tokenizer.decode(ids)))
        refs = {n: texts[n] for n in names}
        scores[split] = _score_with_baselines(hyps, refs, lang, encoder.features(keys), train_pooled, present["train"],
                                              texts, pack_version,
                                              dict(beam=beam, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram))

    # 7. The pack, written whole in a staging folder and swapped in.
    report("stage", name="write")
    staging = packs_dir / f".staging-{lang}-{run_key}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    tokenizer.save(staging / TOKENIZER_FILE)
    from toolkit.decoder import save_decoder

    save_decoder(model, staging / DECODER_WEIGHTS_FILE)
    write_captions(staging / CAPTIONS_FILE, [c for c in translated if c.image in set(present["train"])])
    eval_names = set(present.get("dev", [])) | set(present.get("test", []))
    write_captions(staging / REFERENCES_FILE, [c for c in translated if c.image in eval_names])
    atomic_write_text(staging / HISTORY_FILE, json.dumps(state["history"], indent=1))
    manifest = {
        "format": PACK_FORMAT,
        "format_version": FORMAT_VERSION,
        "lang": lang,
        "name": f"capkit-{lang}",
        "pack_version": pack_version,
        "toolkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "encoder": {k: encoder.identity[k] for k in ("id", "name", "image_size", "digest", "source")},
        "tokenizer": {"file": TOKENIZER_FILE, "type": f"sentencepiece-{dec_cfg.tokenizer}", "vocab_size": tokenizer.vocab_size},
        "decoder": asdict(dec_cfg),
        "train": asdict(tr_cfg),
        "data": {
            "captions": Path(captions_path).name,
            "captions_sha256": file_sha256(Path(captions_path)),
            "source_lang": source_lang,
            "translator": translator_used,
            "splits": {k: Path(v).name for k, v in split_files.items()},
            "n_train_images": len(present["train"]),
            "n_dev_images": len(present.get("dev", [])),
            "n_test_images": len(present.get("test", [])),
            "n_train_captions": len(train_texts),
            "n_missing_images": missing,
            "n_unreadable_images": len(ex.failures),
        },
        "training": {
            "epochs_run": state["epoch"],
            "best_epoch": state["best_epoch"],
            "best_dev_loss": state["best_val_loss"],
            "seconds": round(train_seconds, 1),
            "hardware": _hardware(),
        },
        "scores": scores,
        "files": {},
    }
    _write_model_card(staging, manifest)
    manifest["files"] = {p.name: file_sha256(p) for p in sorted(staging.iterdir()) if p.is_file()}
    validate_manifest(manifest, "new manifest")
    atomic_write_text(staging / MANIFEST_FILE, json.dumps(manifest, indent=2, ensure_ascii=False))
    final = packs_dir / lang
    install_dir(staging, final)
    shutil.rmtree(work, ignore_errors=True)
    manifest["build_seconds"] = round(time.perf_counter() - started, 1)
    return BuildResult(final, manifest, report.warnings)


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


def _hardware() -> str:
    import os

    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"{platform.machine()}, {os.cpu_count()} CPU cores" + (f", {len(gpus)} GPU" if gpus else ", no GPU")


def _check_writable(packs_dir: Path) -> None:
    try:
        packs_dir.mkdir(parents=True, exist_ok=True)
        probe = packs_dir / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CapkitError(f"{packs_dir}: packs folder is not writable ({e.strerror or e})",
                          hint="pass --packs-dir or set CAPKIT_PACKS_DIR to a folder you can write") from None


def _write_model_card(folder: Path, m: dict) -> None:
    d, t, dc, tc = m["data"], m["training"], m["decoder"], m["train"]
    kind = "LSTM decoder attending over the feature grid of the" if architecture(m) == "attention" else "LSTM decoder over the"
    lines = [
        f"# capkit language pack: {m['lang']}", "",
        f"Image captions in `{m['lang']}` from a {m['decoder']['units']}-unit {kind} shared "
        f"{m['encoder']['name']} encoder `{m['encoder']['id']}` (weights: {m['encoder']['source']}).", "",
        "## Data",
        f"- captions: `{d['captions']}` ({d['source_lang']}), translator: {d['translator']}",
        f"- images: {d['n_train_images']} train, {d['n_dev_images']} dev, {d['n_test_images']} test "
        f"({d['n_missing_images']} missing, {d['n_unreadable_images']} unreadable); {d['n_train_captions']} train captions",
        f"- tokenizer: SentencePiece {m['tokenizer']['type'].removeprefix('sentencepiece-')}, "
        f"{m['tokenizer']['vocab_size']} pieces, trained on the train split only", "",
        "## Training",
        f"- {dc['architecture']} decoder: embeddings {dc['embed_dim']}, LSTM {dc['units']}, dropout {dc['dropout']}; "
        f"Adam from {tc['learning_rate']} ({tc['lr_schedule']}), gradient norm clipped at {tc['clipnorm'] or 'none'}, "
        f"label smoothing {tc['label_smoothing']}, batches of {tc['batch_size']}, seed {tc['seed']}",
        f"- {t['epochs_run']} epochs (best {t['best_epoch']}, dev loss {t['best_dev_loss']:.3f}), {t['seconds']} s on {t['hardware']}", "",
        "## Scores (corpus BLEU, 0-100)", "",
        "| split | system | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 |", "|---|---|---|---|---|---|",
    ]
    sig = ""
    for split, systems in m["scores"].items():
        for name, r in systems.items():
            lines.append(f"| {split} | {name} | {r['bleu1']:.1f} | {r['bleu2']:.1f} | {r['bleu3']:.1f} | {r['bleu4']:.1f} |")
            sig = r["signature"]
    lines += ["", f"Signature: `{sig}`. `retrieval` is the first train caption of the most similar train image; "
              "`constant` is the most frequent train caption for every image.", "",
              "## Known limits",
              "- Trained on the images and captions above only; expect generic captions for scenes unlike them.",
              "- Machine-translated training captions carry the translator's errors." if "none" not in d["translator"] else
              "- Scores are against references from the same source as the training captions.",
              ]
    atomic_write_text(folder / MODEL_CARD_FILE, "\n".join(lines) + "\n")

