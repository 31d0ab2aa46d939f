"""Corpus BLEU and CIDEr-D per language, BLEU with the brevity penalty and
without, bootstrap intervals, the two baselines every score is shown beside,
and the table.

How a score is computed (fixed here, and written into every signature):

* Tokenization is per language. Space-delimited scripts are scored on
  **words**: NFKC, ``str.casefold``, every punctuation character (Unicode
  category ``P*``) becomes a word boundary, split on whitespace. Chinese,
  Japanese, Thai and the other ``CHAR_LANGS`` are scored on **chars**: one
  token per character (combining marks stay with their base), whitespace and
  punctuation dropped, while a run of Latin/Greek/Cyrillic letters or ASCII
  digits inside such text stays one word ("NBA", "T", "2024"), as
  sacrebleu's zh tokenizer does. Invisible separators are not tokens: a zero
  width space (U+200B) is a word boundary, a word joiner or byte-order mark
  (U+2060, U+FEFF) is dropped.
* BLEU-n is nltk's ``corpus_bleu`` with uniform weights over orders 1..n, on
  token lists, every reference of each image. No smoothing: an order with no
  match makes the score 0.0 (nltk would warn and return ~1e-77).
* The no-BP variant is the same geometric mean of modified precisions without
  the brevity penalty (as Flickr8k-CN reported), i.e. ``bleu / bp``.
* CIDEr-D is coco-caption's (``pycocoevalcap.cider``, sigma 6), on the same
  tokens, times 100 like BLEU (coco prints 0.53 where we print 53.0).
  Document frequencies come from the references of the scored images.

Bootstrap intervals resample images. Per-image n-gram match counts and lengths
are counted once; each resample only sums them (one matrix product), which
reproduces nltk's corpus BLEU on the full sample exactly (tested). CIDEr-D is
a mean of per-image scores, so a resample averages them; their document
frequencies stay those of the full sample.
"""

from __future__ import annotations

import math
import unicodedata
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import KW_ONLY, asdict, dataclass
from importlib.metadata import version as _dist_version

import numpy as np

from toolkit.errors import CapkitError

# Languages written without spaces between words: scored on characters.
CHAR_LANGS = frozenset({"zh", "ja", "th", "yue", "lo", "km", "my"})

MAX_ORDER = 4
SCORE_NAMES = tuple(f"bleu{n}" for n in range(1, MAX_ORDER + 1)) + tuple(
    f"bleu{n}_nobp" for n in range(1, MAX_ORDER + 1)
) + ("cider_d",)
# Bumped whenever tokenization or aggregation rules change, so old and new
# numbers are never silently compared. 2: CIDEr-D beside BLEU. 3: invisible
# separators are not tokens (25 of the Google Chinese dev references hold U+200B
# pairs inside words, each U+200B a token before).
SCORING_VERSION = 3
CIDER_SIGMA = 6.0  # width of CIDEr-D's Gaussian length penalty, in tokens (coco-caption's)
# Inside char-scored text these scripts are written as words (brand names,
# sizes, "T恤"), and scoring them letter by letter would inflate BLEU.
_WORD_SCRIPTS = ("LATIN", "GREEK", "CYRILLIC", "DIGIT")
# Zero-width characters nobody reads: U+200B separates words; U+2060 and U+FEFF join or mark.
# ZWJ and ZWNJ (U+200C, U+200D) stay: they change how Indic, Persian and emoji text is written.
INVISIBLE = str.maketrans({"\u200b": " ", "\u2060": None, "\ufeff": None})


def base_lang(lang: str) -> str:
    """'zh-CN', 'zh_Hans', 'ZH' -> 'zh'."""
    return lang.strip().lower().replace("_", "-").split("-")[0]


def tokenization_name(lang: str) -> str:
    """'chars' for CHAR_LANGS ('zh', 'ja-JP', ...), else 'words'."""
    return "chars" if base_lang(lang) in CHAR_LANGS else "words"


def _is_word_char(ch: str) -> bool:
    return ch.isalnum() and unicodedata.name(ch, "").startswith(_WORD_SCRIPTS)


def bleu_tokenize(text: str, lang: str) -> list[str]:
    """Tokens BLEU is computed on, per the language's tokenization.

    >>> bleu_tokenize("A dog, running!", "en")
    ['a', 'dog', 'running']
    >>> bleu_tokenize("穿NBA球衣的男孩。", "zh")
    ['穿', 'nba', '球', '衣', '的', '男', '孩']
    """
    text = unicodedata.normalize("NFKC", text).casefold().translate(INVISIBLE)
    # Punctuation is a boundary, not deleted: "black-and-white" -> 3 words.
    cleaned = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    if tokenization_name(lang) == "words":
        return cleaned.split()
    tokens: list[str] = []
    last = "space"  # what tokens[-1] is: "word" (an open Latin/digit run), "char", or closed by "space"
    for ch in cleaned:
        if ch.isspace():
            last = "space"
        elif unicodedata.category(ch).startswith("M") and last != "space":
            tokens[-1] += ch  # Thai vowel and tone marks belong to their consonant
        elif _is_word_char(ch):
            if last == "word":
                tokens[-1] += ch
            else:
                tokens.append(ch)
            last = "word"
        else:
            tokens.append(ch)
            last = "char"
    return tokens


@dataclass
class BleuResult:
    """Corpus BLEU of one system in one language, on the 0-100 scale."""

    lang: str
    bleu1: float  # BLEU-1..4 with the brevity penalty (the usual numbers)
    bleu2: float
    bleu3: float
    bleu4: float
    bleu1_nobp: float  # same precisions without the brevity penalty
    bleu2_nobp: float
    bleu3_nobp: float
    bleu4_nobp: float
    _: KW_ONLY
    cider_d: float | None = None  # CIDEr-D x 100; None in scores from before capkit-bleu:2
    n_images: int  # images scored (those with a hypothesis)
    n_references: int  # reference captions used, over all scored images
    tokenization: str  # "words" or "chars"
    signature: str  # how it was computed; quote it with the numbers
    ci: dict[str, tuple[float, float]] | None = None  # 95% bootstrap interval per score name

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.ci is not None:
            d["ci"] = {k: list(v) for k, v in self.ci.items()}
        return d


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _reference_clips(refs: list[list[str]]) -> tuple[list[Counter], list[int]]:
    """Per order 1..4, each n-gram's highest count in any one reference (what a match is clipped to); and the
    references' lengths."""
    clips = [Counter() for _ in range(MAX_ORDER)]
    for ref in refs:
        for n in range(1, MAX_ORDER + 1):
            clips[n - 1] |= _ngram_counts(ref, n)
    return clips, [len(r) for r in refs]


def _clipped_stats(hyp: Sequence[str], clips: list[Counter], ref_lens: list[int]) -> list[int]:
    """`_image_stats` against references already counted by `_reference_clips`."""
    matches, totals = [], []
    for n in range(1, MAX_ORDER + 1):
        counts = _ngram_counts(hyp, n)
        matches.append(sum(min(c, clips[n - 1][g]) for g, c in counts.items()))
        totals.append(max(1, sum(counts.values())))
    closest = min(ref_lens, key=lambda r: (abs(r - len(hyp)), r))
    return matches + totals + [len(hyp), closest]


def _image_stats(hyp: list[str], refs: list[list[str]]) -> list[int]:
    """[matches_1..4, totals_1..4, hyp_len, closest_ref_len] for one image,
    counted exactly as nltk does (clipped by the max count in any reference;
    totals at least 1, nltk's guard for hypotheses shorter than n)."""
    return _clipped_stats(hyp, *_reference_clips(refs))


class CiderD:
    """CIDEr-D of captions against the references of their image, with document frequencies fixed by a corpus.

    `references[i]` are image i's tokenised references; the idf of an n-gram
    is log(images) - log(max(1, images whose references contain it)), over
    these images. `score(hyps, images)` scores hyps[k] against the
    references of image images[k], x100 (see `_cider_d`, which is this with
    the scored images as the corpus). Each reference's tf-idf vectors are
    computed once, so scoring many captions of the same images (a reward
    during training) costs only the hypotheses' own n-grams.

    >>> CiderD([[["a", "dog"]], [["a", "cat"]]]).score([["a", "dog"], ["a", "cat"]], [0, 0])
    array([500.,   0.])
    """

    def __init__(self, references: list[list[list[str]]]):
        orders = range(1, MAX_ORDER + 1)
        grams = [[[_ngram_counts(r, n) for n in orders] for r in rs] for rs in references]
        df: Counter = Counter()
        for image in grams:
            df.update({g for ref in image for counts in ref for g in counts})
        self._df, self._log_images = df, math.log(max(len(references), 1))
        self._refs = [[(len(r), [self._tfidf(c) for c in counts]) for r, counts in zip(rs, image)]
                      for rs, image in zip(references, grams)]

    def _tfidf(self, counts: Counter) -> tuple[dict, float]:
        vec = {g: c * (self._log_images - math.log(max(1, self._df[g]))) for g, c in counts.items()}
        return vec, math.sqrt(sum(w * w for w in vec.values()))

    def score(self, hyps: Sequence[Sequence[str]], images: Sequence[int]) -> np.ndarray:
        scores = np.zeros(len(hyps))
        for k, (hyp, image) in enumerate(zip(hyps, images)):
            refs = self._refs[image]
            hyp_vecs = [self._tfidf(_ngram_counts(hyp, n)) for n in range(1, MAX_ORDER + 1)]
            total = 0.0
            for ref_len, ref_vecs in refs:
                penalty = math.exp(-((len(hyp) - ref_len) ** 2) / (2 * CIDER_SIGMA**2))
                for (h, h_norm), (r, r_norm) in zip(hyp_vecs, ref_vecs):
                    if h_norm and r_norm:
                        dot = sum(min(w, r.get(g, 0.0)) * r.get(g, 0.0) for g, w in h.items())
                        total += penalty * dot / (h_norm * r_norm)
            scores[k] = 100 * 10 * total / (MAX_ORDER * max(len(refs), 1))
        return scores


class SentenceBleu:
    """BLEU-4 of single captions against their image's references, smoothed so that a caption without a matching
    4-gram still scores by its lower orders: a training reward, not a reported score.

    Lin and Och's (2004) BLEU+1, as nltk's `sentence_bleu` with `SmoothingFunction().method2` computes it: orders
    2-4 add one to both matches and totals, unigrams stay as they are (none matching scores 0), brevity penalty
    against the reference closest in length. Clipping counts are taken once per image, so scoring many samples
    of the same images costs only the samples' own n-grams. x100, like every score here.

    >>> SentenceBleu([[["a", "dog", "runs", "on", "grass"]]]).score([["a", "dog", "runs", "on", "grass"]], [0])
    array([100.])
    """

    def __init__(self, references: list[list[list[str]]]):
        self._refs = [_reference_clips(refs) for refs in references]

    def score(self, hyps: Sequence[Sequence[str]], images: Sequence[int]) -> np.ndarray:
        scores = np.zeros(len(hyps))
        for k, (hyp, image) in enumerate(zip(hyps, images)):
            clips, ref_lens = self._refs[image]
            if not hyp or not ref_lens:
                continue
            stats = _clipped_stats(hyp, clips, ref_lens)
            matches, totals = stats[:MAX_ORDER], stats[MAX_ORDER : 2 * MAX_ORDER]
            if not matches[0]:
                continue
            # add one to matches and totals of orders 2-4 (index 1-3), not of unigrams
            log_p = sum(math.log((m + (n > 0)) / (t + (n > 0))) for n, (m, t) in enumerate(zip(matches, totals)))
            hyp_len, closest = stats[2 * MAX_ORDER :]
            bp = 1.0 if hyp_len > closest else math.exp(1 - closest / hyp_len)
            scores[k] = 100 * bp * math.exp(log_p / MAX_ORDER)
        return scores


def _cider_d(hyps: list[list[str]], refs: list[list[list[str]]]) -> np.ndarray:
    """CIDEr-D of each image, x100, computed as coco-caption's `CiderScorer`
    does (n-grams 1-4, sigma 6), document frequencies from `refs` itself:

    * an n-gram's weight is its raw count in the caption times its idf,
      log(images) - log(max(1, images whose references contain it));
    * per order n, the hypothesis' vector against each reference's: the
      dot product with the hypothesis' weights clipped to the reference's
      (``min(h, r) * r``), over the product of the two (unclipped) norms,
      times exp(-(len_h - len_r)**2 / (2 * 6**2));
    * the image's score is 10 x the mean over orders and references (coco's
      scale; returned x100, as BLEU is).

    coco measures lengths in bigrams (tokens - 1): the same difference
    whenever both captions have a token, and otherwise nothing matches.
    One image alone scores 0 (every idf is log 1 - log 1).
    """
    return CiderD(refs).score(hyps, range(len(hyps)))


def _scores_from_sums(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Summed stats (..., 10) -> (BLEU-1..4, no-BP BLEU-1..4), each (..., 4), 0-100."""
    sums = np.asarray(sums, dtype=np.float64)
    m, t = sums[..., :MAX_ORDER], sums[..., MAX_ORDER : 2 * MAX_ORDER]
    c, r = sums[..., 2 * MAX_ORDER], sums[..., 2 * MAX_ORDER + 1]
    # log(0) = -inf propagates through the running mean to exp(-inf) = 0.0.
    logp = np.where(m > 0, np.log(np.maximum(m, 1)) - np.log(t), -np.inf)
    nobp = np.exp(np.cumsum(logp, axis=-1) / np.arange(1, MAX_ORDER + 1))
    bp = np.where(c > r, 1.0, np.where(c == 0, 0.0, np.exp(1 - r / np.maximum(c, 1))))
    return 100 * bp[..., None] * nobp, 100 * nobp


def _prepare(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], lang: str):
    """Validated, tokenized (ids, hyp tokens, ref tokens), ids sorted so that a
    seed resamples the same images whatever the dict order."""
    if not lang or not lang.strip():
        raise CapkitError("no language given for BLEU", hint="pass a language code such as 'en' or 'zh'")
    if not hypotheses:
        raise CapkitError("no captions to score", hint="caption at least one image that has references")
    missing = [k for k in hypotheses if not references.get(k)]
    if missing:
        raise CapkitError(
            f"{len(missing)} of {len(hypotheses)} captioned images have no references: "
            + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""),
            hint="references must come from the same split and use the same image ids",
        )
    ids = sorted(hypotheses)
    for k in ids:
        if isinstance(references[k], str):  # would be scored letter by letter
            raise CapkitError(f"references for {k} are one string, not a list of captions")
    hyps = [bleu_tokenize(hypotheses[k], lang) for k in ids]
    refs = [[bleu_tokenize(r, lang) for r in references[k]] for k in ids]
    return ids, hyps, refs


def _nltk_bleu(hyps: list[list[str]], refs: list[list[list[str]]]) -> list[float]:
    from nltk.translate.bleu_score import corpus_bleu

    weights = [(1 / n,) * n for n in range(1, MAX_ORDER + 1)]
    with warnings.catch_warnings():
        # nltk warns once per call about a zero order; we report that as 0.0 instead.
        warnings.filterwarnings("ignore", message=r"\s*The hypothesis contains 0 counts")
        scores = corpus_bleu(refs, hyps, weights=weights)
    return [100 * float(s) for s in scores]


def _resample_weights(rng: np.random.Generator, n_images: int, n: int, chunk: int):
    """Yield (rows, n_images) arrays: how often each image is drawn per resample."""
    done = 0
    while done < n:
        rows = min(chunk, n - done)
        idx = rng.integers(0, n_images, size=(rows, n_images))
        flat = (np.arange(rows)[:, None] * n_images + idx).ravel()
        yield np.bincount(flat, minlength=rows * n_images).reshape(rows, n_images).astype(np.float64)
        done += rows


def _bootstrap_scores(stats: np.ndarray, n: int, seed: int, others: Sequence[np.ndarray] = (),
                      cider: np.ndarray | None = None, others_cider: Sequence[np.ndarray] = ()):
    """Scores (n, 8) of `stats` and of each of `others` on the same resamples;
    with `cider` (the per-image CIDEr-D of `stats`' system) the first gets a
    ninth column, its mean over each resample's images, and so do `others`
    with `others_cider` (one per-image array each)."""
    if n < 1:
        raise CapkitError(f"bootstrap needs at least 1 resample, got {n}")
    rng = np.random.default_rng(seed)
    chunk = max(1, 4_000_000 // len(stats))  # bounds the (chunk, images) count matrix
    ciders = [cider, *others_cider, *[None] * (len(others) - len(others_cider))]
    out: list[list[np.ndarray]] = [[] for _ in range(1 + len(others))]
    for w in _resample_weights(rng, len(stats), n, chunk):
        for i, (s, c) in enumerate(zip((stats, *others), ciders)):
            bleu, nobp = _scores_from_sums(w @ s)  # float64 sums of ints: exact below 2**53
            cols = [bleu, nobp] + ([(w @ c / len(stats))[:, None]] if c is not None else [])
            out[i].append(np.concatenate(cols, axis=1))
    return [np.concatenate(o) for o in out]


def _interval(samples: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def _signature(lang: str, tok: str, refs: list[list[list[str]]], pack_version: str) -> str:
    lo, hi = min(map(len, refs)), max(map(len, refs))
    return "|".join([
        f"capkit-bleu:{SCORING_VERSION}",
        f"lang:{lang}",
        f"tok:{tok}",
        "smooth:none",
        f"cider-d:sigma{CIDER_SIGMA:g}",
        f"nltk:{_dist_version('nltk')}",
        f"pack:{pack_version or 'none'}",
        f"refs:{lo}" if lo == hi else f"refs:{lo}-{hi}",
    ])


def corpus_bleu_scores(
    hypotheses: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    lang: str,
    *,
    bootstrap: int = 0,
    seed: int = 0,
    pack_version: str = "",
) -> BleuResult:
    """Corpus BLEU-1..4 and CIDEr-D of {image id: caption} against {image id: [references]}.

    References of images without a hypothesis are ignored; a hypothesis
    without references is an error. ``bootstrap=N`` adds 95% percentile
    intervals over N resamples of the images (CIDEr-D's document
    frequencies stay those of all the scored images).

    >>> r = corpus_bleu_scores({"a.jpg": "a man rides a red bike"},
    ...     {"a.jpg": ["a man rides a bike", "a man is riding a red bicycle"]}, "en")
    >>> round(r.bleu4, 2), r.signature.split("|")[:5]
    (60.43, ['capkit-bleu:3', 'lang:en', 'tok:words', 'smooth:none', 'cider-d:sigma6'])
    """
    ids, hyps, refs = _prepare(hypotheses, references, lang)
    stats = np.array([_image_stats(h, r) for h, r in zip(hyps, refs)], dtype=np.int64)
    cider = _cider_d(hyps, refs)
    bleu = _nltk_bleu(hyps, refs)
    sums = stats.sum(axis=0)
    # No order may be left without a match; nltk returns ~1e-77 there, we say 0.0.
    for n in range(1, MAX_ORDER + 1):
        if sums[:n].min() == 0:
            bleu[n - 1] = 0.0
    _, nobp = _scores_from_sums(sums)
    tok = tokenization_name(lang)
    ci = None
    if bootstrap:
        samples = _bootstrap_scores(stats, bootstrap, seed, cider=cider)[0]
        ci = {name: _interval(samples[:, j]) for j, name in enumerate(SCORE_NAMES)}
    return BleuResult(
        lang, *bleu, *map(float, nobp), cider_d=float(cider.mean()),
        n_images=len(ids), n_references=sum(map(len, refs)), tokenization=tok,
        signature=_signature(lang, tok, refs, pack_version), ci=ci,
    )


def paired_bootstrap(
    hyps_a: Mapping[str, str] | Sequence[Mapping[str, str]],
    hyps_b: Mapping[str, str] | Sequence[Mapping[str, str]],
    references: Mapping[str, Sequence[str]],
    lang: str,
    n: int = 1000,
    seed: int = 0,
) -> dict:
    """Is system a really better than b? Both are scored on the same n
    resamples of the images (paired), so image difficulty cancels out.

    Either side may be several runs of one system (trained with other
    seeds): its score is then the runs' mean BLEU-4, on the full sample and
    on each resample, so the interval is the images' and the seeds' luck
    averages out.

    Returns {"bleu4_a", "bleu4_b", "ci_a", "ci_b", "delta_ci" (a - b),
    "p_a_better" (share of resamples where a's BLEU-4 is higher),
    "cider_d_a", "cider_d_b", "cider_d_delta_ci" (CIDEr-D the same way, document
    frequencies those of all the images), "n", "n_images", "runs_a", "runs_b"}.
    """
    sides = [[h] if isinstance(h, Mapping) else list(h) for h in (hyps_a, hyps_b)]
    if not sides[0] or not sides[1]:
        raise CapkitError("each side of a comparison needs at least one system's captions")
    runs = sides[0] + sides[1]
    for hyps in runs[1:]:
        if set(hyps) != set(runs[0]):
            only = sorted(set(hyps) ^ set(runs[0]))
            raise CapkitError(
                f"the systems captioned different images ({len(only)} differ: {', '.join(only[:5])})",
                hint="compare systems on the same images",
            )
    stats, tokens = [], []
    for hyps in runs:
        _, h, r = _prepare(hyps, references, lang)
        stats.append(np.array([_image_stats(x, y) for x, y in zip(h, r)], dtype=np.int64))
        tokens.append(h)
    cider_d = CiderD(r)  # every run has the same images, so the same references and document frequencies
    ciders = [cider_d.score(h, range(len(h))) for h in tokens]
    b4, cd = SCORE_NAMES.index("bleu4"), -1
    k = len(sides[0])
    resampled = _bootstrap_scores(stats[0], n, seed, others=stats[1:], cider=ciders[0], others_cider=ciders[1:])
    a, b = (np.mean([s[:, b4] for s in part], axis=0) for part in (resampled[:k], resampled[k:]))
    ca, cb = (np.mean([s[:, cd] for s in part], axis=0) for part in (resampled[:k], resampled[k:]))
    full = [_scores_from_sums(s.sum(axis=0))[0][b4] for s in stats]
    mean_cider = [float(c.mean()) for c in ciders]
    return {
        "bleu4_a": float(np.mean(full[:k])),
        "bleu4_b": float(np.mean(full[k:])),
        "ci_a": _interval(a),
        "ci_b": _interval(b),
        "delta_ci": _interval(a - b),
        "p_a_better": float(np.mean(a > b)),
        "cider_d_a": float(np.mean(mean_cider[:k])),
        "cider_d_b": float(np.mean(mean_cider[k:])),
        "cider_d_delta_ci": _interval(ca - cb),
        "n": n,
        "n_images": len(stats[0]),
        "runs_a": k,
        "runs_b": len(runs) - k,
    }


REPEAT_ORDER = 3  # a caption "repeats itself" when one of its n-grams of scoring tokens occurs twice


def repetition_rate(captions: Sequence[str], lang: str, n: int = REPEAT_ORDER) -> float:
    """Share of `captions` in which some n-gram of scoring tokens (words, or
    characters for `CHAR_LANGS`) occurs more than once: "a dog and a dog and
    a dog", "一个女人和一个女人和一个女人". Human references are the yardstick:
    on the Flickr8k dev split 0.7% of English and 2.5% of Chinese ones do it.

    >>> repetition_rate(["a dog and a dog and a dog", "a dog runs"], "en")
    0.5
    """
    if not captions:
        return 0.0
    repeated = 0
    for caption in captions:
        tokens = bleu_tokenize(caption, lang)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        repeated += len(grams) != len(set(grams))
    return repeated / len(captions)


def format_table(
    results: Sequence[BleuResult],
    baselines: Mapping[str, Mapping[str, BleuResult]] | None = None,
) -> str:
    """Plain-text table, one row per language and, under it, one row per
    baseline ("baseline: constant", "baseline: retrieval"); then the signatures.
    Scores from before CIDEr-D (old manifests) show "-" there.

    lang  system               B1    B2    B3    B4  B4 noBP  CIDEr-D  images  refs  tok
    en    pack               58.1  38.0  24.3  15.2     15.9     33.0     100   500  words
    en    baseline: constant 31.0  14.2   6.1   2.5      4.0      4.1     100   500  words
    """
    baselines = baselines or {}
    show_ci = any(r.ci for r in results)
    head = ["lang", "system", "B1", "B2", "B3", "B4", "B4 noBP", "CIDEr-D"]
    head += ["B4 95% CI", "CIDEr-D 95% CI"] if show_ci else []
    head += ["images", "refs", "tok"]
    rows, signatures = [], []

    def row(r: BleuResult, system: str) -> None:
        cells = [r.lang, system] + [f"{v:.1f}" for v in (r.bleu1, r.bleu2, r.bleu3, r.bleu4, r.bleu4_nobp)]
        cells.append("-" if r.cider_d is None else f"{r.cider_d:.1f}")
        if show_ci:
            cells += ["{:.1f}-{:.1f}".format(*r.ci[k]) if r.ci and k in r.ci else "" for k in ("bleu4", "cider_d")]
        rows.append(cells + [str(r.n_images), str(r.n_references), r.tokenization])
        if r.signature not in signatures:
            signatures.append(r.signature)

    for r in results:
        row(r, "pack")
        for name, b in baselines.get(r.lang, {}).items():
            row(b, f"baseline: {name}")
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    left = {0, 1, len(head) - 1}  # text columns; numbers align right

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(padded).rstrip()

    out = [line(head)] + [line(c) for c in rows]
    out += [""] + [f"signature: {s}" for s in signatures]
    return "\n".join(out)


def most_frequent_caption(captions: Sequence[str]) -> str:
    """The constant-caption baseline: the most frequent caption, compared
    case- and space-insensitively; ties go to the first seen.

    >>> most_frequent_caption(["A dog runs.", "a cat", "a  dog runs."])
    'A dog runs.'
    """
    if not captions:
        raise CapkitError("no training captions to pick a constant caption from")
    first: dict[str, str] = {}
    counts: Counter = Counter()
    for c in captions:
        key = " ".join(c.casefold().split())
        first.setdefault(key, c)
        counts[key] += 1
    # Counter.most_common sorts stably, so equal counts keep first-seen order.
    return first[counts.most_common(1)[0][0]]


def nearest_neighbour_captions(
    query: np.ndarray,
    train: np.ndarray,
    train_captions: Sequence[str],
    *,
    block_elems: int = 8_000_000,
) -> list[str]:
    """The retrieval baseline: for each query row (n, d), the caption of the
    train row (m, d) with the highest cosine similarity (first on ties).
    Similarities are computed ``block_elems // m`` query rows at a time, so
    memory stays bounded whatever n.

    >>> nearest_neighbour_captions(np.array([[1.0, 0.1]]), np.array([[0.0, 1.0], [2.0, 0.0]]), ["up", "right"])
    ['right']
    """
    query, train = np.asarray(query), np.asarray(train)
    if query.ndim != 2 or train.ndim != 2 or query.shape[1] != train.shape[1]:
        raise CapkitError(f"feature matrices do not match: query {query.shape}, train {train.shape}",
                          hint="both must be (images, features) from the same encoder")
    if len(train) == 0 or len(train) != len(train_captions):
        raise CapkitError(f"{len(train)} training feature rows but {len(train_captions)} training captions")
    dtype = np.result_type(query, train, np.float32)

    def unit(x: np.ndarray) -> np.ndarray:
        x = x.astype(dtype)
        norm = np.linalg.norm(x, axis=1, keepdims=True)
        return x / np.where(norm == 0, 1, norm)  # an all-zero row is similar to nothing

    train_u = unit(train)
    step = max(1, block_elems // len(train))
    best = [np.argmax(unit(query[i : i + step]) @ train_u.T, axis=1) for i in range(0, len(query), step)]
    return [train_captions[j] for j in (np.concatenate(best) if best else [])]
