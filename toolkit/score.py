"""The evaluate job: BLEU and CIDEr-D of installed packs on a split's images,
beside the constant-caption and retrieval reference points.

The metrics themselves (BLEU, CIDEr-D, the baselines, the bootstrap) are
`toolkit.evaluate`; this module captions the split through a `Captioner` and
scores what it wrote. One entry per pack:

    evaluate_packs(["en"], packs, Path("Images"), Path("dev.txt"))[0]["bleu4"]  # 15.1
"""

from __future__ import annotations

from pathlib import Path

from toolkit.captioner import Captioner
from toolkit.config import SEARCH, SearchConfig
from toolkit.data import group_by_image, read_captions, read_split
from toolkit.errors import CapkitError
from toolkit.pack import CAPTIONS_FILE, REFERENCES_FILE, find_pack, resolve_langs
from toolkit.progress import Report


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
    captioner: Captioner | None = None,
) -> list[dict]:
    """BLEU and CIDEr-D of each pack on the split's images, with constant and retrieval reference points.

    References default to the pack's own `references.txt` (its dev/test
    captions in its language); `references` overrides for every language.
    Each entry also holds the pack's captions (`captions`: image name ->
    text) and their tokens (`caption_ids`: image name -> ids). `captioner`
    reuses packs already loaded (it must hold `langs`).
    """
    report = report or Report()
    packs_dir, images_dir = Path(packs_dir), Path(images_dir)
    every = "all" in langs
    captioner = captioner or Captioner(packs_dir, langs)
    langs = resolve_langs(packs_dir, langs)
    split = read_split(split_file)
    search = SearchConfig(beam, length_penalty, no_repeat_ngram)
    results = []
    for lang in langs:
        folder = find_pack(packs_dir, lang)
        ref_path = Path(references) if references else folder / REFERENCES_FILE
        refs_all = _references(ref_path, every)
        names = _split_images(split, refs_all, images_dir, split_file, report)
        if not names:
            msg = f"no image of {split_file} has both a reference in {ref_path} and a file in {images_dir}"
            if every:  # --lang all: score the packs that can be scored, say which could not
                report("warning", message=f"{lang}: {msg}; not evaluated")
                continue
            raise CapkitError(msg)
        entry = score_pack(captioner, lang, images_dir, names, refs_all, search, bootstrap=bootstrap,
                           baselines=baselines, report=report)
        results.append(entry)
    if not results:
        raise CapkitError(f"no installed pack has references for the images of {split_file}",
                          hint="pass --references with captions of those images")
    return results


def _references(ref_path: Path, every: bool) -> dict[str, list[str]]:
    """image -> reference captions; with --lang all an unreadable file counts as none (the pack is skipped)."""
    try:
        return group_by_image(read_captions(ref_path).captions)
    except CapkitError:
        if not every:
            raise
        return {}


def _split_images(split: list[str], refs_all: dict, images_dir: Path, split_file: Path, report: Report) -> list[str]:
    """The split's images that have references and a file; the missing files are counted in a warning."""
    names = [n for n in split if n in refs_all and (images_dir / n).is_file()]
    n_missing = sum(1 for n in split if n in refs_all and not (images_dir / n).is_file())
    if n_missing:
        report("warning", message=f"{n_missing} images of {split_file} with references are not in {images_dir}; skipped")
    return names


def score_pack(
    captioner: Captioner,
    lang: str,
    images_dir: Path,
    names: list[str],
    refs_all: dict[str, list[str]],
    search: SearchConfig = SEARCH,
    *,
    bootstrap: int = 0,
    baselines: bool = True,
    report: Report | None = None,
) -> dict:
    """One `evaluate_packs` entry: `lang`'s pack captions `names` (files of `images_dir`) and is scored on `refs_all`."""
    from toolkit.evaluate import corpus_bleu_scores, repetition_rate

    report = report or Report()
    m = captioner.manifests[lang]
    batch = captioner.caption([images_dir / n for n in names], [lang], search, report=report)
    for msg in batch.failures.values():
        report("warning", message=f"{msg}; not scored")
    done = [(n, im) for n, im in zip(names, batch.images) if im.error is None]
    names = [n for n, _ in done]
    hyps = {n: im.captions[lang].text for n, im in done}
    refs = {n: refs_all[n] for n in names}
    res = corpus_bleu_scores(hyps, refs, lang, bootstrap=bootstrap, pack_version=m["pack_version"]).to_dict()
    res.update(beam=search.beam, length_penalty=search.length_penalty, no_repeat_ngram=search.no_repeat_ngram,
               system="pack", repetition=repetition_rate(list(hyps.values()), lang),
               references_repetition=repetition_rate([t for ts in refs.values() for t in ts], lang))
    entry = {"lang": lang, **res, "baselines": {}}
    if baselines:
        feats = captioner.encoder(lang).features([im.key for _, im in done])  # pooled: the retrieval baseline's
        entry["baselines"] = _baselines(captioner, lang, images_dir, hyps, refs, feats, bootstrap, report)
    entry["captions"] = hyps
    entry["caption_ids"] = {n: im.captions[lang].ids for n, im in done}
    return entry


def _baselines(captioner: Captioner, lang: str, images_dir: Path, hyps: dict, refs: dict, feats, bootstrap: int,
               report: Report) -> dict:
    """"constant" and "retrieval" scores on the same images; with `bootstrap`, each paired against the pack."""
    from toolkit.evaluate import corpus_bleu_scores, most_frequent_caption, nearest_neighbour_captions

    m = captioner.manifests[lang]
    names = list(hyps)
    out, captions = {}, {}
    train_texts = group_by_image(read_captions(find_pack(captioner.packs_dir, lang) / CAPTIONS_FILE).captions)
    const = most_frequent_caption([t for ts in train_texts.values() for t in ts])
    out["constant"] = corpus_bleu_scores({n: const for n in names}, refs, lang,
                                         bootstrap=bootstrap, pack_version=m["pack_version"]).to_dict()
    train_paths = [images_dir / n for n in train_texts if (images_dir / n).is_file()]
    if train_paths:
        encoder = captioner.encoder(lang)
        tex = encoder.extract(train_paths)
        tnames = [p.name for p in train_paths if str(p) in tex.keys]
        tf_ = encoder.features([tex.keys[str(images_dir / n)] for n in tnames])
        nn = nearest_neighbour_captions(feats, tf_, [train_texts[n][0] for n in tnames])
        out["retrieval"] = corpus_bleu_scores(dict(zip(names, nn)), refs, lang,
                                              bootstrap=bootstrap, pack_version=m["pack_version"]).to_dict()
        captions["retrieval"] = dict(zip(names, nn))
    else:
        report("warning", message=f"{lang}: the pack's train images are not in {images_dir}; no retrieval baseline")
    if bootstrap:
        # Paired over the same resampled images: is the pack really better than each baseline?
        from toolkit.evaluate import paired_bootstrap

        captions["constant"] = {n: const for n in names}
        for name, caps in captions.items():
            pb = paired_bootstrap(hyps, caps, refs, lang, n=bootstrap)
            out[name]["vs_pack"] = {"p_pack_better": pb["p_a_better"], "delta_bleu4_ci": pb["delta_ci"],
                                    "delta_cider_d_ci": pb["cider_d_delta_ci"]}
    return out
