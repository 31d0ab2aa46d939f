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
from typing import Callable

import numpy as np

from toolkit import __version__
from toolkit.config import ADDED_FIELDS, SEARCH, DecoderConfig, EncoderConfig, TrainConfig, from_dict, resolve_tokenizer
from toolkit.data import Caption, check_splits, group_by_image, read_captions, read_split, write_captions
from toolkit.errors import CapkitError
from toolkit.pack import (
    CAPTIONS_FILE, DECODER_WEIGHTS_FILE, FORMAT_VERSION, HISTORY_FILE, MANIFEST_FILE, MODEL_CARD_FILE,
    PACK_FORMAT, REFERENCES_FILE, TOKENIZER_FILE, atomic_write_text, file_sha256, find_pack, install_dir,
    installed_packs, load_manifest, validate_manifest,
)

IN_MEMORY_FEATURES_BYTES = 2 << 30  # above this, training reads features memory-mapped
WORK_DIR = ".work"          # per-build checkpoints, removed once the pack is installed
CACHE_DIR = ".cache"        # translation cache shared by all builds
TRANSLATION_CACHE_FILE = "translations.sqlite"


class Report:
    """How library code tells the caller what happens: `event(kind, **fields)`.

    Kinds: "stage" (name), "progress" (stage, done, total), "warning" (message),
    "epoch" (epoch, loss, val_loss, ...). The CLI renders them; tests record them.
    """

    def __init__(self, callback: Callable[..., None] | None = None):
        self.callback = callback
        self.warnings: list[str] = []

    def __call__(self, kind: str, **fields) -> None:
        if kind == "warning":
            self.warnings.append(fields["message"])
        if self.callback:
            self.callback(kind, **fields)


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
    enc_cfg = encoder_config or EncoderConfig()
    dec_cfg = replace(decoder_config) if decoder_config else DecoderConfig()  # a copy: the build fills in fields
    tr_cfg = train_config or TrainConfig()
    from toolkit.decoder import decoder_class
    from toolkit.train import barrier, distribution_strategy, is_chief

    decoder_class(dec_cfg)  # an unknown architecture fails now, not after the translation
    dec_cfg.tokenizer = resolve_tokenizer(dec_cfg.tokenizer, lang)  # the manifest names the model really trained
    strategy = distribution_strategy(tr_cfg.strategy)  # a strategy capkit cannot train under fails now, before any work
    # On a multiworker cluster only the chief writes the pack; the others train with it.
    chief = is_chief(strategy)
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
    if not chief:  # the chief translates and extracts first: with a shared packs folder, the others find it cached
        barrier(strategy)
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
        if chief:
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
    if chief:
        barrier(strategy)  # the other workers may read the caches now
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
    if not chief:
        return BuildResult(packs_dir / lang, {}, report.warnings, chief=False)

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
        ids = beam_search_batched(step, LazyGrids(encoder, keys) if grid else encoder.features(keys),
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
            "split": split_method or {"method": "files"},
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
    kind = "LSTM decoder attending over the feature grid of the" if _architecture(m) == "attention" else "LSTM decoder over the"
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


# -- inference ----------------------------------------------------------------

@dataclass
class LoadedPack:
    lang: str
    dir: Path
    manifest: dict
    tokenizer: object
    step: object  # a KerasStepModel; its `decoder` is the Keras model

    @property
    def needs_grid(self) -> bool:
        """Whether the decoder reads feature grids (`Encoder.grid_features`) rather than pooled features."""
        return _architecture(self.manifest) == "attention"


def _architecture(manifest: dict) -> str:
    """The manifest's decoder architecture; packs from before the field are "lstm" (see config.ADDED_FIELDS)."""
    return from_dict(DecoderConfig, manifest["decoder"]).architecture


class LazyGrids:
    """The grids of `keys`, read from the memory-mapped cache a slice at a time.

    Stands in for an (n, P, 2048) array in `beam_search_batched`, so a big
    folder never holds all its grids (800 KB an image at 299 px) at once.
    """

    def __init__(self, encoder, keys: list[str]):
        self.encoder, self.keys = encoder, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.encoder.grid_features(self.keys[rows])


def load_pack(packs_dir: Path, lang: str, encoder_id: str | None = None) -> LoadedPack:
    """A pack ready to caption; refused when `encoder_id` differs from the one it was trained with."""
    from toolkit.decoder import load_decoder
    from toolkit.generate import KerasStepModel
    from toolkit.tokenizer import Tokenizer

    folder = find_pack(packs_dir, lang)
    m = load_manifest(folder)
    if encoder_id and m["encoder"]["id"] != encoder_id:
        raise CapkitError(
            f"pack {lang} was trained with encoder {m['encoder']['id']}, not {encoder_id}",
            hint="a decoder only understands the features of its own encoder; rebuild the pack for this encoder",
        )
    cfg = from_dict(DecoderConfig, m["decoder"])
    model = load_decoder(cfg, folder / DECODER_WEIGHTS_FILE)
    return LoadedPack(lang, folder, m, Tokenizer.load(folder / TOKENIZER_FILE), KerasStepModel(model))


def resolve_langs(packs_dir: Path, langs: list[str]) -> list[str]:
    if "all" in langs:
        have = list(installed_packs(packs_dir))
        if not have:
            raise CapkitError(f"no packs installed in {packs_dir}", hint="build one with `capkit build-pack`")
        return have
    return list(dict.fromkeys(langs))


@dataclass
class Captions:
    rows: list[dict]                 # {"image", "lang", "caption", "ids"}, image-major; ids: the caption's tokens
    failures: dict[str, str]         # image path -> why it was skipped
    seconds: dict[str, float]        # stage -> seconds


def caption_images(
    inputs: list[str | Path],
    langs: list[str],
    packs_dir: Path,
    *,
    beam: int = SEARCH.beam,
    length_penalty: float = SEARCH.length_penalty,
    no_repeat_ngram: int = SEARCH.no_repeat_ngram,
    max_pixels: int | None = None,
    report: Report | None = None,
) -> Captions:
    """Caption every image in `inputs` (files or folders) in every language of `langs`, one encoder pass."""
    from toolkit.encoder import Encoder
    from toolkit.images import DEFAULT_MAX_PIXELS, list_images
    from toolkit.tokenizer import BOS_ID, EOS_ID

    if beam < 1:
        raise CapkitError(f"--beam must be at least 1, not {beam}")
    report = report or Report()
    packs_dir = Path(packs_dir)
    langs = resolve_langs(packs_dir, langs)
    manifests = {lang: load_manifest(find_pack(packs_dir, lang)) for lang in langs}
    enc_ids = {m["encoder"]["id"] for m in manifests.values()}
    if len(enc_ids) > 1:
        raise CapkitError(f"packs {', '.join(langs)} use different encoders ({', '.join(sorted(enc_ids))})",
                          hint="caption with packs of one encoder at a time")
    paths = list_images(inputs)
    if not paths:
        raise CapkitError(f"no images found in {', '.join(map(str, inputs))}")
    t0 = time.perf_counter()
    encoder = Encoder.load(packs_dir, enc_ids.pop())
    grid = any(_architecture(m) == "attention" for m in manifests.values())  # one pass serves every pack
    ex = encoder.extract(paths, progress=lambda d, t: report("progress", stage="encode", done=d, total=t),
                         max_pixels=max_pixels or DEFAULT_MAX_PIXELS, grid=grid)
    t1 = time.perf_counter()
    ok = [p for p in map(str, paths) if p in ex.keys]
    keys = [ex.keys[p] for p in ok]
    feats = encoder.features(keys)
    by_lang, ids_by_lang = {}, {}
    for lang in langs:
        pack = load_pack(packs_dir, lang, encoder.id)
        ids = beam_search_batched(pack.step, LazyGrids(encoder, keys) if pack.needs_grid else feats, BOS_ID, EOS_ID,
                                  beam, pack.manifest["decoder"]["max_length"], length_penalty, no_repeat_ngram)
        by_lang[lang], ids_by_lang[lang] = pack.tokenizer.decode(ids), ids
    t2 = time.perf_counter()
    rows = [{"image": p, "lang": lang, "caption": by_lang[lang][i], "ids": ids_by_lang[lang][i]}
            for i, p in enumerate(ok) for lang in langs]
    return Captions(rows, ex.failures, {"encode": t1 - t0, "decode": t2 - t1})


def beam_search_batched(step, feats, bos, eos, beam, max_length, length_penalty=0.0, no_repeat_ngram=0, batch=64):
    """Beam search in chunks of `batch` images, so memory stays flat on big folders.

    `feats` is an array or anything sliceable into arrays (`LazyGrids`). A `KerasStepModel` runs the compiled search (one TensorFlow call per
    chunk); any other `StepModel` the numpy reference, which picks the same ids.
    """
    from toolkit.generate import beam_search

    search = getattr(step, "search", None) or (lambda f, *a: beam_search(step, f, *a))
    out = []
    for i in range(0, len(feats), batch):
        out += search(feats[i : i + batch], bos, eos, beam, max_length, length_penalty, no_repeat_ngram)
    return out


def evaluate_packs(
    langs: list[str],
    packs_dir: Path,
    images_dir: Path,
    split_file: Path,
    references: Path | None = None,
    *,
    beam: int = SEARCH.beam,
    length_penalty: float = SEARCH.length_penalty,
    no_repeat_ngram: int = SEARCH.no_repeat_ngram,
    bootstrap: int = 0,
    baselines: bool = True,
    report: Report | None = None,
) -> list[dict]:
    """BLEU of each pack on the split's images, with constant and retrieval reference points.

    References default to the pack's own `references.txt` (its dev/test
    captions in its language); `references` overrides for every language.
    Each entry also holds the pack's captions (`captions`: image name ->
    text) and their tokens (`caption_ids`: image name -> ids).
    """
    from toolkit.encoder import Encoder
    from toolkit.evaluate import corpus_bleu_scores, most_frequent_caption, nearest_neighbour_captions, repetition_rate
    from toolkit.tokenizer import BOS_ID, EOS_ID

    report = report or Report()
    packs_dir, images_dir = Path(packs_dir), Path(images_dir)
    every = "all" in langs
    langs = resolve_langs(packs_dir, langs)
    split = read_split(split_file)
    results = []
    encoders: dict[str, Encoder] = {}
    folders = {lang: find_pack(packs_dir, lang) for lang in langs}
    manifests = {lang: load_manifest(folder) for lang, folder in folders.items()}
    # Grids once per encoder, on its first pass, if any pack on it attends.
    grid_for: dict[str, bool] = {}
    for m in manifests.values():
        eid = m["encoder"]["id"]
        grid_for[eid] = grid_for.get(eid, False) or _architecture(m) == "attention"
    for lang in langs:
        folder, m = folders[lang], manifests[lang]
        ref_path = Path(references) if references else folder / REFERENCES_FILE
        try:
            refs_all = group_by_image(read_captions(ref_path).captions)
        except CapkitError:
            if not every:
                raise
            refs_all = {}
        names = [n for n in split if n in refs_all and (images_dir / n).is_file()]
        n_missing = sum(1 for n in split if n in refs_all and not (images_dir / n).is_file())
        if n_missing:
            report("warning", message=f"{n_missing} images of {split_file} with references are not in {images_dir}; skipped")
        if not names:
            msg = f"no image of {split_file} has both a reference in {ref_path} and a file in {images_dir}"
            if every:  # --lang all: score the packs that can be scored, say which could not
                report("warning", message=f"{lang}: {msg}; not evaluated")
                continue
            raise CapkitError(msg)
        eid = m["encoder"]["id"]
        if eid not in encoders:
            encoders[eid] = Encoder.load(packs_dir, eid)
        encoder = encoders[eid]
        ex = encoder.extract([images_dir / n for n in names],
                             progress=lambda d, t: report("progress", stage="encode", done=d, total=t), grid=grid_for[eid])
        for msg in ex.failures.values():
            report("warning", message=f"{msg}; not scored")
        names = [n for n in names if str(images_dir / n) in ex.keys]
        keys = [ex.keys[str(images_dir / n)] for n in names]
        feats = encoder.features(keys)  # pooled: the retrieval baseline's, and the lstm decoder's
        pack = load_pack(packs_dir, lang, eid)
        ids = beam_search_batched(pack.step, LazyGrids(encoder, keys) if pack.needs_grid else feats,
                                  BOS_ID, EOS_ID, beam, m["decoder"]["max_length"], length_penalty, no_repeat_ngram)
        hyps = dict(zip(names, pack.tokenizer.decode(ids)))
        refs = {n: refs_all[n] for n in names}
        res = corpus_bleu_scores(hyps, refs, lang, bootstrap=bootstrap, pack_version=m["pack_version"]).to_dict()
        res.update(beam=beam, length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram, system="pack",
                   repetition=repetition_rate(list(hyps.values()), lang),
                   references_repetition=repetition_rate([t for ts in refs.values() for t in ts], lang))
        entry = {"lang": lang, **res, "baselines": {}}
        baseline_captions: dict[str, dict[str, str]] = {}
        if baselines:
            train_texts = group_by_image(read_captions(folder / CAPTIONS_FILE).captions)
            const = most_frequent_caption([t for ts in train_texts.values() for t in ts])
            entry["baselines"]["constant"] = corpus_bleu_scores({n: const for n in names}, refs, lang,
                                                                bootstrap=bootstrap, pack_version=m["pack_version"]).to_dict()
            train_paths = [images_dir / n for n in train_texts if (images_dir / n).is_file()]
            if train_paths:
                tex = encoder.extract(train_paths)
                tnames = [p.name for p in train_paths if str(p) in tex.keys]
                tf_ = encoder.features([tex.keys[str(images_dir / n)] for n in tnames])
                nn = nearest_neighbour_captions(feats, tf_, [train_texts[n][0] for n in tnames])
                entry["baselines"]["retrieval"] = corpus_bleu_scores(dict(zip(names, nn)), refs, lang,
                                                                     bootstrap=bootstrap, pack_version=m["pack_version"]).to_dict()
                baseline_captions["retrieval"] = dict(zip(names, nn))
            else:
                report("warning", message=f"{lang}: the pack's train images are not in {images_dir}; no retrieval baseline")
            if bootstrap:
                # Paired over the same resampled images: is the pack really better than each baseline?
                from toolkit.evaluate import paired_bootstrap

                baseline_captions["constant"] = {n: const for n in names}
                for name, caps in baseline_captions.items():
                    pb = paired_bootstrap(hyps, caps, refs, lang, n=bootstrap)
                    entry["baselines"][name]["vs_pack"] = {"p_pack_better": pb["p_a_better"], "delta_bleu4_ci": pb["delta_ci"]}
        entry["captions"] = hyps
        entry["caption_ids"] = dict(zip(names, ids))
        results.append(entry)
    if not results:
        raise CapkitError(f"no installed pack has references for the images of {split_file}",
                          hint="pass --references with captions of those images")
    return results
