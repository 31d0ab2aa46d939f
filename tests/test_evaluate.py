"""BLEU and CIDEr-D on known values, agreement with nltk and coco-caption, bootstrap and the baselines."""

import math
import random
import warnings

import numpy as np
import pytest
from nltk.translate.bleu_score import corpus_bleu

from toolkit.errors import CapkitError
from toolkit.evaluate import (
    CHAR_LANGS,
    SCORING_VERSION,
    BleuResult,
    SentenceBleu,
    bleu_tokenize,
    corpus_bleu_scores,
    format_table,
    most_frequent_caption,
    nearest_neighbour_captions,
    paired_bootstrap,
    tokenization_name,
)

# --- tokenization -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, lang, tokens",
    [
        ("A dog, running!", "en", ["a", "dog", "running"]),
        ("A black-and-white dog's ball", "en", ["a", "black", "and", "white", "dog", "s", "ball"]),
        ("Die Straße", "de", ["die", "strasse"]),  # casefold, not lower
        ("كلب يجري، في الحديقة.", "ar", ["كلب", "يجري", "في", "الحديقة"]),  # Arabic comma is P*
        ("Собака бежит по траве!", "ru", ["собака", "бежит", "по", "траве"]),
        ("כלב רץ בפארק.", "he", ["כלב", "רץ", "בפארק"]),
        ("一只狗在跑。", "zh", ["一", "只", "狗", "在", "跑"]),
        # Latin and digit runs stay words; full-width ＮＢＡ is NFKC-folded first.
        ("穿着ＮＢＡ球衣的T恤男孩, 3岁", "zh-CN", ["穿", "着", "nba", "球", "衣", "的", "t", "恤", "男", "孩", "3", "岁"]),
        ("犬が走っている。", "ja", ["犬", "が", "走", "っ", "て", "い", "る"]),
        ("แมว วิ่ง", "th", ["แ", "ม", "ว", "วิ่", "ง"]),  # vowel and tone marks stay on their consonant
        ("...!?", "en", []),
        ("。！、", "zh", []),
        ("", "ja", []),
        # Invisible separators (a real Flickr8k-CN reference): not tokens, and no n-gram is broken by them.
        ("两个人爬\u200b\u200b上雪山。", "zh", ["两", "个", "人", "爬", "上", "雪", "山"]),
        ("a\u200bdog\u2060s \ufeffball", "en", ["a", "dogs", "ball"]),
        ("می\u200cخواهم", "fa", ["می\u200cخواهم"]),  # ZWNJ is part of the Persian word
    ],
)
def test_bleu_tokenize(text, lang, tokens):
    assert bleu_tokenize(text, lang) == tokens


def test_tokenization_name():
    assert {tokenization_name(x) for x in ("zh", "ZH_hans", "ja-JP", "th", "yue")} == {"chars"}
    assert {tokenization_name(x) for x in ("en", "ar", "ru", "ko", "de")} == {"words"}
    assert {"zh", "ja", "th"} <= CHAR_LANGS


# --- known values -----------------------------------------------------------


def test_words_known_value():
    # hyp  a man rides a red bike          (6 tokens)
    # ref1 a man rides a bike              (5)
    # ref2 a man is riding a red bicycle   (7)
    # p1 = 6/6: a x2 (both refs have 2), man, rides (ref1), red (ref2), bike (ref1)
    # p2 = 4/5: a man, man rides, rides a, a red (ref2); not red bike
    # p3 = 2/4: a man rides, man rides a; not rides a red, a red bike
    # p4 = 1/3: a man rides a; not man rides a red, rides a red bike
    # closest ref length: 5 and 7 tie at distance 1, the shorter wins -> 5 < 6, so BP = 1
    # B1 = 100, B2 = 100*(0.8)^(1/2) = 89.4427, B3 = 100*(0.4)^(1/3) = 73.6806,
    # B4 = 100*(0.4/3)^(1/4) = 60.4275
    r = corpus_bleu_scores(
        {"a.jpg": "A man rides a red bike."},
        {"a.jpg": ["A man rides a bike.", "A man is riding a red bicycle."]},
        "en",
    )
    assert [r.bleu1, r.bleu2, r.bleu3, r.bleu4] == pytest.approx([100, 89.4427, 73.6806, 60.4275], abs=1e-4)
    assert [r.bleu1_nobp, r.bleu4_nobp] == pytest.approx([r.bleu1, r.bleu4])  # BP = 1
    assert (r.n_images, r.n_references, r.tokenization) == (1, 2, "words")


def test_chars_known_value():
    # hyp  一只狗在跑。          -> 5 chars, the 。 dropped
    # ref1 一只黑狗在草地上跑 (9 chars), ref2 一只狗在草地上跑 (8 chars)
    # p1 = 5/5; p2 = 3/4 (一只 只狗 狗在; not 在跑); p3 = 2/3 (一只狗 只狗在); p4 = 1/2 (一只狗在)
    # closest ref length 8 > 5: BP = exp(1 - 8/5) = exp(-0.6) = 0.548812
    # B1 = 54.8812, B2 = 54.8812*(3/4)^(1/2) = 47.5285, B3 = 54.8812*(1/2)^(1/3) = 43.5592,
    # B4 = 54.8812*(1/4)^(1/4) = 38.8068; no BP: 100, 86.6025, 79.3701, 70.7107
    refs = {"x": ["一只黑狗在草地上跑", "一只狗在草地上跑。"]}
    r = corpus_bleu_scores({"x": "一只狗在跑。"}, refs, "zh")
    assert [r.bleu1, r.bleu2, r.bleu3, r.bleu4] == pytest.approx([54.8812, 47.5285, 43.5592, 38.8068], abs=1e-4)
    assert [r.bleu1_nobp, r.bleu2_nobp, r.bleu3_nobp, r.bleu4_nobp] == pytest.approx(
        [100, 86.6025, 79.3701, 70.7107], abs=1e-4
    )
    assert r.tokenization == "chars" and "tok:chars" in r.signature
    # The same text scored as words is one unmatched "sentence token": why zh needs chars.
    assert corpus_bleu_scores({"x": "一只狗在跑。"}, refs, "en").bleu1 == 0.0


def test_corpus_pools_counts_and_zero_order_is_zero_without_warnings():
    # image 1: hyp a dog runs (3); refs a dog is running (4), the dog runs fast (4)
    #   p1 3/3, p2 2/2 (a dog, dog runs), p3 0/1, p4 0/1 (nltk counts at least 1 per image)
    # image 2: hyp two cats (2); ref two cats sleep (3): p1 2/2, p2 1/1, p3 0/1, p4 0/1
    # corpus: c = 5, r = 4 + 3 = 7, BP = exp(1 - 7/5) = 0.670320; B1 = B2 = 67.0320, B3 = B4 = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = corpus_bleu_scores(
            {"1": "a dog runs", "2": "two cats"},
            {"1": ["a dog is running", "the dog runs fast"], "2": ["two cats sleep"]},
            "en",
        )
    assert [r.bleu1, r.bleu2, r.bleu3, r.bleu4] == pytest.approx([67.0320, 67.0320, 0, 0], abs=1e-4)
    assert r.bleu3 == 0.0 and r.bleu4_nobp == 0.0
    assert "refs:1-2" in r.signature


def test_nobp_is_bleu_over_bp_when_hyp_is_shorter():
    # hyp a man rides a bike (5), ref a man rides a red bike (6): p = 5/5, 3/4, 2/3, 1/2
    # BP = exp(1 - 6/5) = 0.818731; B4 no BP = (1/4)^(1/4) = 70.7107, B4 = 57.8930
    r = corpus_bleu_scores({"a": "a man rides a bike"}, {"a": ["a man rides a red bike"]}, "en")
    bp = math.exp(1 - 6 / 5)
    assert r.bleu4_nobp == pytest.approx(70.7107, abs=1e-4)
    assert r.bleu4 == pytest.approx(57.8930, abs=1e-4)
    for n in range(1, 5):
        assert getattr(r, f"bleu{n}_nobp") == pytest.approx(getattr(r, f"bleu{n}") / bp)


def _random_corpus(seed, n_images=40, lang="en"):
    rng = random.Random(seed)
    words = "a the dog cat man runs sits on red grass ball in water two".split()
    sent = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))  # noqa: E731
    hyps = {f"{i}.jpg": sent() for i in range(n_images)}
    refs = {k: [sent() for _ in range(rng.randint(1, 5))] for k in hyps}
    return hyps, refs


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_nltk_corpus_bleu(seed):
    hyps, refs = _random_corpus(seed)
    r = corpus_bleu_scores(hyps, refs, "en")
    ids = sorted(hyps)
    toks = [bleu_tokenize(hyps[k], "en") for k in ids]
    ref_toks = [[bleu_tokenize(x, "en") for x in refs[k]] for k in ids]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [100 * corpus_bleu(ref_toks, toks, weights=(1 / n,) * n) for n in range(1, 5)]
    assert [r.bleu1, r.bleu2, r.bleu3, r.bleu4] == pytest.approx(expected, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_sentence_bleu_agrees_with_nltk_bleu_plus_one(seed):
    """The self-critical BLEU reward is nltk's sentence BLEU-4 with Lin and Och's add-one smoothing (method2)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    hyps, refs = _random_corpus(seed)
    ids = sorted(hyps)
    toks = [bleu_tokenize(hyps[k], "en") for k in ids]
    ref_toks = [[bleu_tokenize(x, "en") for x in refs[k]] for k in ids]
    ours = SentenceBleu(ref_toks).score(toks, range(len(ids)))
    with warnings.catch_warnings():  # nltk warns of every caption without a matching 4-gram
        warnings.simplefilter("ignore")
        expected = [100 * sentence_bleu(r, h, smoothing_function=SmoothingFunction().method2) if h else 0.0
                    for r, h in zip(ref_toks, toks)]
        plain = np.array([100 * sentence_bleu(r, h) if h else 0.0 for r, h in zip(ref_toks, toks)])
    assert ours == pytest.approx(expected, rel=1e-12, abs=1e-9)
    assert (ours > 0).mean() > (plain > 1e-6).mean()  # smoothed: a caption without a matching 4-gram still scores


def test_sentence_bleu_by_hand():
    # "a dog runs fast" against "a dog runs" and "the dog": p1 3/4, p2 (2+1)/(3+1), p3 (1+1)/(2+1), p4 (0+1)/(1+1);
    # 4 tokens, closest reference 3: no brevity penalty.
    scorer = SentenceBleu([[["a", "dog", "runs"], ["the", "dog"]], [["a", "cat"]]])
    expected = 100 * (3 / 4 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert scorer.score([["a", "dog", "runs", "fast"]], [0])[0] == pytest.approx(expected)
    # Against the other image's references only "a" matches, and the smoothed higher orders still count: p1 1/4,
    # p2 1/4, p3 1/3, p4 1/2. No matching unigram scores 0, and so does an empty caption.
    other, none, empty = scorer.score([["a", "dog", "runs", "fast"], ["the", "bird"], []], [1, 1, 0])
    assert other == pytest.approx(100 * (1 / 4 * 1 / 4 * 1 / 3 * 1 / 2) ** 0.25) and none == empty == 0.0


# --- CIDEr-D ----------------------------------------------------------------


def test_cider_d_known_value():
    # Two images, so idf = log 2 - log(images whose references hold the n-gram):
    # "a" is in both images' references -> idf 0; every other reference n-gram,
    # and an n-gram in no reference, -> idf log 2 =: L. Weights are raw counts x idf.
    #
    # image 1: hyp "dog runs"; refs "dog runs", "a dog"
    #   vs "dog runs": identical vectors, cosine 1 for n = 1 and n = 2; no 3- or
    #     4-grams (0); same length, penalty 1 -> 1 + 1 + 0 + 0 = 2
    #   vs "a dog": n = 1: hyp {dog: L, runs: L}, norm L*sqrt(2); ref {a: 0, dog: L},
    #     norm L; dot min(L, L)*L = L^2 -> 1/sqrt(2); n = 2: "dog runs" vs "a dog" -> 0
    #   score = 10 * (2 + 1/sqrt(2)) / (4 orders * 2 refs) = 3.383883
    # image 2: hyp "cat cat"; ref "a cat sits"
    #   n = 1: hyp {cat: 2L}, norm 2L; ref {a: 0, cat: L, sits: L}, norm L*sqrt(2);
    #     clipped dot min(2L, L)*L = L^2 -> 1/(2*sqrt(2)) = 0.353553 (unclipped
    #     cosine would give 1/sqrt(2): the repeat is what clipping punishes)
    #   n = 2: "cat cat" vs "a cat", "cat sits" -> 0; n = 3, 4: no hyp n-grams -> 0
    #   lengths 2 vs 3: penalty exp(-1/(2*6^2)) = exp(-1/72) = 0.986207
    #   score = 10 * 0.353553 * 0.986207 / (4 * 1) = 0.871692
    # corpus = 100 * (3.383883 + 0.871692) / 2 = 212.7788
    r = corpus_bleu_scores({"1": "Dog runs.", "2": "cat cat"}, {"1": ["dog runs", "a dog"], "2": ["A cat sits."]}, "en")
    assert r.cider_d == pytest.approx(212.7788, abs=1e-3)
    # Chinese by characters: 狗跑 / 猫猫 against 狗跑, 一狗 / 一猫坐 is the same example.
    zh = corpus_bleu_scores({"1": "狗跑。", "2": "猫猫"}, {"1": ["狗跑", "一狗"], "2": ["一猫坐"]}, "zh")
    assert zh.cider_d == pytest.approx(r.cider_d)


def test_cider_d_of_one_image_is_zero_as_in_coco():
    # One image: every idf is log 1 - log 1 = 0, so nothing has weight.
    r = corpus_bleu_scores({"a": "a dog runs"}, {"a": ["a dog runs"]}, "en")
    assert r.cider_d == 0.0


def _coco_cider(hyps: dict, refs: dict, lang: str) -> tuple[float, list[float]]:
    """pycocoevalcap's CIDEr-D (its `Cider` is the -D variant: sigma 6, clipped
    counts) on capkit's tokens joined by spaces; coco's scale (x1)."""
    cider = pytest.importorskip("pycocoevalcap.cider.cider", reason="pip install pycocoevalcap (the test extra)")
    ids = sorted(hyps)
    gts = {k: [" ".join(bleu_tokenize(x, lang)) for x in refs[k]] for k in ids}
    res = {k: [" ".join(bleu_tokenize(hyps[k], lang))] for k in ids}
    score, per_image = cider.Cider().compute_score(gts, res)
    return float(score), [float(x) for x in per_image]


def _assert_matches_coco(hyps: dict, refs: dict, lang: str) -> None:
    from toolkit.evaluate import _cider_d, _prepare

    score, per_image = _coco_cider(hyps, refs, lang)
    assert corpus_bleu_scores(hyps, refs, lang).cider_d / 100 == pytest.approx(score, abs=1e-6)
    _, h, r = _prepare(hyps, refs, lang)
    assert _cider_d(h, r) / 100 == pytest.approx(per_image, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_cider_d_agrees_with_pycocoevalcap(seed):
    hyps, refs = _random_corpus(seed, n_images=300)
    hyps["empty.jpg"], refs["empty.jpg"] = "...", ["a dog", "!"]  # nothing to score on either side
    _assert_matches_coco(hyps, refs, "en")


def test_cider_d_agrees_with_pycocoevalcap_on_chinese_characters():
    rng = random.Random(3)
    chars = "一只狗在草地上跑黑白色的猫男人女孩水里"
    sent = lambda: "".join(rng.choice(chars) for _ in range(rng.randint(1, 14))) + "。"  # noqa: E731
    hyps = {f"{i}.jpg": sent() for i in range(200)}
    refs = {k: [sent() for _ in range(rng.randint(1, 5))] for k in hyps}
    _assert_matches_coco(hyps, refs, "zh")


@pytest.mark.realdata
def test_cider_d_agrees_with_pycocoevalcap_on_flickr8k(shared_data):
    from toolkit.data import group_by_image, read_captions

    dev = (shared_data / "flickr8k" / "Flickr_8k.devImages.txt").read_text().split()[:300]
    en = group_by_image(read_captions(shared_data / "flickr8k" / "Flickr8k.token.txt").captions)
    # One human caption scored against the other four.
    _assert_matches_coco({k: en[k][0] for k in dev}, {k: en[k][1:] for k in dev}, "en")
    cn = shared_data / "flickr8k-cn"
    baidu = group_by_image(read_captions(cn / "flickr8kzhb.caption.txt").captions)
    google = group_by_image(read_captions(cn / "flickr8kzhg.caption.txt").captions)
    both = [k for k in dev if k in baidu and k in google]
    # Baidu's translation of the first caption against Google's of all five.
    _assert_matches_coco({k: baidu[k][0] for k in both}, {k: google[k] for k in both}, "zh")


# --- bootstrap --------------------------------------------------------------


def test_bootstrap_interval_contains_point_and_is_deterministic():
    hyps, refs = _random_corpus(7, n_images=60)
    a = corpus_bleu_scores(hyps, refs, "en", bootstrap=200, seed=3)
    b = corpus_bleu_scores(dict(reversed(hyps.items())), refs, "en", bootstrap=200, seed=3)
    assert a.ci == b.ci  # same seed, same interval, whatever the dict order
    assert a.ci != corpus_bleu_scores(hyps, refs, "en", bootstrap=200, seed=4).ci
    assert set(a.ci) == {f"bleu{n}{s}" for n in range(1, 5) for s in ("", "_nobp")} | {"cider_d"}
    for name, (lo, hi) in a.ci.items():
        assert lo <= getattr(a, name) <= hi, name
    assert a.ci["cider_d"][0] < a.ci["cider_d"][1]


def test_cider_d_resamples_average_the_full_sample_per_image_scores():
    from toolkit.evaluate import _bootstrap_scores, _cider_d, _image_stats, _prepare

    hyps, refs = _random_corpus(8, n_images=50)
    _, h, r = _prepare(hyps, refs, "en")
    stats = np.array([_image_stats(x, y) for x, y in zip(h, r)])
    per_image = _cider_d(h, r)
    samples = _bootstrap_scores(stats, 2000, 0, cider=per_image)[0][:, -1]
    # Document frequencies stay the full sample's, so each resample is a plain
    # mean of fixed per-image scores, whose bootstrap mean is the full mean.
    assert samples.mean() == pytest.approx(per_image.mean(), abs=3 * per_image.std() / math.sqrt(50 * 2000) + 1e-9)
    assert samples.min() >= per_image.min() and samples.max() <= per_image.max()
    assert corpus_bleu_scores(hyps, refs, "en").cider_d == pytest.approx(per_image.mean())


def test_fast_bootstrap_sums_equal_nltk_on_the_full_sample():
    from toolkit.evaluate import _image_stats, _prepare, _scores_from_sums

    hyps, refs = _random_corpus(11)
    _, h, r = _prepare(hyps, refs, "en")
    stats = np.array([_image_stats(x, y) for x, y in zip(h, r)])
    bleu, _ = _scores_from_sums(stats.sum(axis=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = [100 * corpus_bleu(r, h, weights=(1 / n,) * n) for n in range(1, 5)]
    assert bleu == pytest.approx(expected, rel=1e-12)
    # A resample that draws every image once is the full sample.
    assert _scores_from_sums(np.ones(len(stats)) @ stats)[0] == pytest.approx(bleu)


def test_paired_bootstrap_prefers_the_better_system():
    hyps, refs = _random_corpus(5, n_images=50)
    good = {k: v[0] for k, v in refs.items()}  # a reference itself: near-perfect
    out = paired_bootstrap(good, hyps, refs, "en", n=300, seed=1)
    assert out["p_a_better"] > 0.99 and out["bleu4_a"] > out["bleu4_b"]
    assert out["ci_a"][0] <= out["bleu4_a"] <= out["ci_a"][1]
    assert out["delta_ci"][0] > 0
    # CIDEr-D the same way: each side's full-sample score is corpus_bleu_scores', its difference clear of 0.
    assert out["cider_d_a"] == pytest.approx(corpus_bleu_scores(good, refs, "en").cider_d)
    assert out["cider_d_b"] == pytest.approx(corpus_bleu_scores(hyps, refs, "en").cider_d)
    lo, hi = out["cider_d_delta_ci"]
    assert 0 < lo < out["cider_d_a"] - out["cider_d_b"] < hi
    assert out == paired_bootstrap(good, hyps, refs, "en", n=300, seed=1)
    with pytest.raises(CapkitError, match="different images"):
        paired_bootstrap(good, {"0.jpg": "a dog"}, refs, "en")


def test_paired_bootstrap_averages_the_runs_of_a_side():
    hyps, refs = _random_corpus(5, n_images=50)
    other, _ = _random_corpus(6, n_images=50)
    good = {k: v[0] for k, v in refs.items()}
    one = paired_bootstrap(good, hyps, refs, "en", n=200, seed=2)
    # The same run twice is that run.
    assert paired_bootstrap([good, good], [hyps], refs, "en", n=200, seed=2) == dict(one, runs_a=2)
    two = paired_bootstrap([good, other], [hyps, hyps], refs, "en", n=200, seed=2)
    alone = paired_bootstrap(other, hyps, refs, "en", n=200, seed=2)
    assert two["bleu4_a"] == pytest.approx((one["bleu4_a"] + alone["bleu4_a"]) / 2)
    assert two["bleu4_b"] == pytest.approx(one["bleu4_b"])
    assert two["cider_d_a"] == pytest.approx((one["cider_d_a"] + alone["cider_d_a"]) / 2)
    assert (two["runs_a"], two["runs_b"]) == (2, 2)
    with pytest.raises(CapkitError, match="different images"):
        paired_bootstrap([good, {"0.jpg": "a dog"}], hyps, refs, "en")
    with pytest.raises(CapkitError, match="at least one"):
        paired_bootstrap([], hyps, refs, "en")


# --- errors -----------------------------------------------------------------


def test_bad_input_is_a_capkit_error():
    with pytest.raises(CapkitError, match="no captions"):
        corpus_bleu_scores({}, {"a": ["x"]}, "en")
    with pytest.raises(CapkitError, match="2 of 3 .*b.jpg, c.jpg"):
        corpus_bleu_scores({"a.jpg": "x", "b.jpg": "y", "c.jpg": "z"}, {"a.jpg": ["x"], "b.jpg": []}, "en")
    with pytest.raises(CapkitError, match="one string"):
        corpus_bleu_scores({"a": "x"}, {"a": "x y"}, "en")
    with pytest.raises(CapkitError, match="at least 1"):
        paired_bootstrap({"a": "x"}, {"a": "x"}, {"a": ["x"]}, "en", n=0)


def test_extra_references_are_ignored_and_empty_hyp_scores_zero():
    r = corpus_bleu_scores({"a": "!!!"}, {"a": ["a dog"], "b": ["a cat"]}, "en")
    assert (r.n_images, r.bleu1, r.bleu1_nobp) == (1, 0.0, 0.0)


# --- table and baselines ----------------------------------------------------


def test_format_table_marks_baselines_and_lists_signatures():
    refs = {"a": ["a dog runs"], "b": ["a cat sits"]}
    pack = corpus_bleu_scores({"a": "a dog runs", "b": "a cat runs"}, refs, "en", pack_version="1.0.0", bootstrap=20)
    const = corpus_bleu_scores({"a": "a dog", "b": "a dog"}, refs, "en", pack_version="1.0.0")
    zh = corpus_bleu_scores({"a": "一只狗"}, {"a": ["一只狗在跑"]}, "zh")
    table = format_table([pack, zh], {"en": {"constant": const, "retrieval": const}})
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["lang", "system", "B1"] and "B4 95% CI" in lines[0]
    assert "CIDEr-D 95% CI" in lines[0] and f"{pack.cider_d:.1f}" in lines[1].split()
    assert [ln.split()[1:3] for ln in lines[1:4]] == [["pack", f"{pack.bleu1:.1f}"], ["baseline:", "constant"],
                                                       ["baseline:", "retrieval"]]
    assert lines[4].startswith("zh") and "chars" in lines[4]
    sigs = [ln for ln in lines if ln.startswith("signature: ")]
    assert sigs == [f"signature: {pack.signature}", f"signature: {zh.signature}"]
    assert "pack:1.0.0" in pack.signature and "pack:none" in zh.signature
    assert f"capkit-bleu:{SCORING_VERSION}" in pack.signature and "cider-d:sigma6" in pack.signature


def test_format_table_shows_a_dash_for_scores_from_before_cider_d():
    old = corpus_bleu_scores({"a": "a dog runs fast", "b": "a cat sits down"},
                             {"a": ["a dog runs fast"], "b": ["a cat sits down"]}, "en")
    old.cider_d = None  # as read from a manifest written before capkit-bleu:2
    row = format_table([old]).splitlines()[1].split()
    assert row[2:8] == ["100.0"] * 5 + ["-"]


def test_to_dict_round_trips_through_json():
    import json

    r = corpus_bleu_scores({"a": "a dog"}, {"a": ["a dog"]}, "en", bootstrap=5)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["bleu1"] == 100 and d["ci"]["bleu1"] == [100, 100]
    assert BleuResult(**{**d, "ci": None}).signature == r.signature
    assert "cider_d" in d and "cider_d" in d["ci"]
    old = {k: v for k, v in d.items() if k not in ("cider_d", "ci")}  # a manifest from before CIDEr-D
    assert BleuResult(**old).cider_d is None


def test_most_frequent_caption():
    assert most_frequent_caption(["a cat", "A dog.", "a dog.", "a cat", "b"]) == "a cat"  # tie: first seen
    assert most_frequent_caption(["x", "A  dog", "a dog"]) == "A  dog"
    with pytest.raises(CapkitError):
        most_frequent_caption([])


def test_nearest_neighbour_captions():
    train = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]])
    query = np.array([[3.0, 0.5], [0.1, 1.0], [-2.0, -1.5], [0.0, 0.0]])
    caps = ["east", "north", "south-west"]
    expected = ["east", "north", "south-west", "east"]  # an all-zero row ties everywhere: first
    assert nearest_neighbour_captions(query, train, caps) == expected
    # Blocks of one row give the same answer as one block.
    assert nearest_neighbour_captions(query, train, caps, block_elems=1) == expected
    assert nearest_neighbour_captions(np.zeros((0, 2)), train, caps) == []
    with pytest.raises(CapkitError, match="do not match"):
        nearest_neighbour_captions(np.zeros((2, 3)), train, caps)
    with pytest.raises(CapkitError, match="training captions"):
        nearest_neighbour_captions(query, train, caps[:2])


def test_repetition_rate_counts_captions_that_repeat_an_ngram_of_scoring_tokens():
    from toolkit.evaluate import repetition_rate

    assert repetition_rate(["a dog and a dog and a dog", "a dog runs", "a man and a woman"], "en") == pytest.approx(1 / 3)
    # Chinese by characters: the classic failure repeats, a caption with "一个" twice does not.
    assert repetition_rate(["一个女人和一个女人和一个女人", "一个男人和一个女人"], "zh") == 0.5
    assert repetition_rate(["一个男人和一个女人"], "zh", n=2) == 1.0
    assert repetition_rate([], "en") == 0.0
