"""Tokenizer, encoder identity and feature cache, each alone."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from toolkit.errors import CapkitError


def test_tokenizer_round_trips_and_caps_vocab_for_small_corpora(tmp_path):
    from toolkit.tokenizer import EOS_ID, Tokenizer, train_tokenizer

    tok = train_tokenizer(["a dog runs on the grass", "a cat sits on a mat"] * 5, "en", vocab_size=5000)
    assert tok.vocab_size < 100  # soft cap: no "vocabulary size too high" failure
    ids = tok.encode(["a dog sits on the mat"])
    assert tok.decode(ids) == ["a dog sits on the mat"]
    tok.save(tmp_path / "t.model")
    again = Tokenizer.load(tmp_path / "t.model")
    assert again.encode(["a cat runs"]) == tok.encode(["a cat runs"])
    assert tok.decode([ids[0] + [EOS_ID]]) == tok.decode(ids)  # specials never decoded


def test_tokenizer_keeps_case_and_an_old_case_folding_one_still_folds(tmp_path):
    import io

    import sentencepiece as spm

    from toolkit.tokenizer import Tokenizer, train_tokenizer

    texts = ["a dog runs in Paris.", "Ein Hund läuft im Park."] * 10
    tok = train_tokenizer(texts, "en", vocab_size=80)
    assert tok.case == "kept" and tok.decode(tok.encode(texts[:2])) == texts[:2]
    old = io.BytesIO()  # as every pack before case was kept trained its tokenizer
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=old, vocab_size=60, hard_vocab_limit=False,
                                   normalization_rule_name="nmt_nfkc_cf", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   minloglevel=2)
    (tmp_path / "old.model").write_bytes(old.getvalue())
    folded = Tokenizer.load(tmp_path / "old.model")
    assert folded.case == "folded" and folded.decode(folded.encode(["a dog runs in Paris."])) == ["a dog runs in paris."]


@pytest.mark.parametrize("lang,texts", [
    ("zh", ["一只狗在草地上跑", "一只猫坐在垫子上"]),
    ("ja", ["犬が草の上を走る", "猫がマットに座る"]),
    ("ar", ["كلب يجري على العشب", "قطة تجلس على الحصيرة"]),
    ("th", ["สุนัขวิ่งบนหญ้า", "แมวนั่งบนเสื่อ"]),
])
def test_tokenizer_handles_unspaced_and_rtl_scripts(lang, texts):
    from toolkit.tokenizer import UNK_ID, train_tokenizer

    tok = train_tokenizer(texts * 5, lang, vocab_size=200)
    ids = tok.encode(texts)
    assert tok.decode(ids) == texts
    assert all(UNK_ID not in seq for seq in ids)


def test_a_cap_below_the_characters_of_a_wide_script_gives_characters():
    from toolkit.tokenizer import UNK_ID, train_tokenizer

    rng = np.random.default_rng(0)
    chars = [chr(0x4E00 + i) for i in range(300)]  # 300 distinct CJK characters, each needed
    texts = ["".join(rng.choice(chars, 12)) for _ in range(400)]
    tok = train_tokenizer(texts, "zh", vocab_size=50)  # SentencePiece alone refuses: 50 < 300 characters
    assert 300 <= tok.vocab_size < 400
    ids = tok.encode(texts[:20])
    assert tok.decode(ids) == texts[:20] and all(UNK_ID not in seq for seq in ids)


def test_tokenizer_models_bpe_keeps_frequent_words_whole_and_char_splits_characters():
    from toolkit.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = ["a", "black", "little", "dog", "girl", "runs", "climbing", "wooden", "fence", "on", "the", "grass"]
    texts = [" ".join(rng.choice(words, 8)) for _ in range(300)]
    bpe = train_tokenizer(texts, "en", vocab_size=200, model_type="bpe")
    assert [len(ids) for ids in bpe.encode(words)] == [1] * len(words)  # every frequent word is one piece
    assert bpe.decode(bpe.encode(texts[:5])) == texts[:5]
    zh = ["一只狗在草地上跑", "一只猫坐在垫子上"] * 10
    char = train_tokenizer(zh, "zh", vocab_size=5000, model_type="char")
    assert char.vocab_size < 30 and char.decode(char.encode(zh[:2])) == zh[:2]
    assert all(len(p) <= 1 for p in char.pieces(char.encode(zh[:1])[0]))


def test_a_char_vocabulary_is_capped_by_vocab_size_and_the_rarest_characters_read_as_unknown():
    from toolkit.tokenizer import UNK_ID, train_tokenizer

    rng = np.random.default_rng(0)
    chars = [chr(0x4E00 + i) for i in range(300)]
    p = 1.0 / np.arange(1, 301)  # Zipf: chars[0] the most frequent, chars[-1] the rarest
    texts = ["".join(rng.choice(chars, 12, p=p / p.sum())) for _ in range(2000)]
    counts = Counter("".join(texts))
    commonest, rarest = counts.most_common()[0][0], counts.most_common()[-1][0]
    capped = train_tokenizer(texts, "zh", vocab_size=100, model_type="char")
    whole = train_tokenizer(texts, "zh", vocab_size=5000, model_type="char")

    def unknown(tok):
        return {c for c in counts if UNK_ID in tok.encode(c)}

    assert capped.vocab_size == 100 and len(unknown(capped)) > len(counts) - 100
    assert commonest not in unknown(capped) and rarest in unknown(capped)
    # Uncapped, only what the wide scripts' character coverage (99.95%) leaves out is unknown.
    assert len(unknown(whole)) < 10 and unknown(whole) < unknown(capped)


def test_manifests_get_the_values_old_packs_had_for_fields_added_later():
    from dataclasses import asdict

    from toolkit.config import ADDED_FIELDS, DecoderConfig, from_dict

    old = {k: v for k, v in asdict(DecoderConfig(tokenizer="bpe")).items() if k not in ADDED_FIELDS["DecoderConfig"]}
    assert from_dict(DecoderConfig, old).tokenizer == "unigram"  # what they were trained with, whatever today's default
    with pytest.raises(CapkitError, match="missing"):
        from_dict(DecoderConfig, {k: v for k, v in old.items() if k != "units"})


def test_tokenizer_pieces_give_each_id_its_text():
    from toolkit.tokenizer import WORD_START, train_tokenizer

    for lang, texts in (("en", ["a dog runs on the grass", "a cat sits on a mat"]), ("zh", ["一只狗在草地上跑", "一只猫坐在垫子上"])):
        tok = train_tokenizer(texts * 5, lang, vocab_size=200)
        ids = tok.encode(texts[:1])[0]
        pieces = tok.pieces(ids)
        assert len(pieces) == len(ids) and not any(WORD_START in p for p in pieces)
        assert "".join(pieces) == texts[0].replace(" ", "")
        assert pieces == [tok.decode([[i]])[0].strip() for i in ids]  # each piece alone reads as itself


def test_unreadable_tokenizer_is_a_clear_error(tmp_path):
    from toolkit.tokenizer import Tokenizer

    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(CapkitError, match="bad.model"):
        Tokenizer.load(tmp_path / "bad.model")


def test_feature_cache_round_trip_and_crash_recovery(tmp_path):
    from toolkit.encoder import FeatureCache

    cache = FeatureCache(tmp_path, dim=4, scale=1024.0)
    f = np.arange(8, dtype=np.float32).reshape(2, 4) / 1000
    cache.add(["a", "b"], f)
    np.testing.assert_allclose(FeatureCache(tmp_path, 4, 1024.0).get(["b", "a"]), f[::-1], rtol=1e-3)
    # A writer that died after its rows but before its keys leaves stray bytes: ignored, then cut.
    with open(tmp_path / "features.f16", "ab") as fh:
        fh.write(b"\x00" * 6)
    cache = FeatureCache(tmp_path, 4, 1024.0)
    assert len(cache) == 2 and "c" not in cache
    cache.add(["c"], f[:1])
    assert len(FeatureCache(tmp_path, 4, 1024.0)) == 3
    np.testing.assert_allclose(cache.get(["c"]), f[:1], rtol=1e-3)


def test_encoder_identity_is_stable_and_cache_is_keyed_by_content(tmp_path, tiny_dataset):
    import shutil

    from toolkit.config import EncoderConfig
    from toolkit.encoder import Encoder

    cfg = EncoderConfig(weights="none", image_size=71, batch_size=4)
    enc = Encoder.prepare(cfg, tmp_path)
    imgs = sorted(tiny_dataset["images"].iterdir())[:5]
    ex = enc.extract(imgs)
    assert ex.n_extracted == 5 and not ex.failures
    # A renamed copy is the same content: a cache hit.
    copy = tmp_path / "renamed.png"
    shutil.copy(imgs[0], copy)
    again = Encoder.load(tmp_path, enc.id)
    ex2 = again.extract([copy, *imgs])
    assert ex2.n_extracted == 0 and ex2.n_cached == 6
    np.testing.assert_array_equal(again.features([ex2.keys[str(copy)]]), enc.features([ex.keys[str(imgs[0])]]))
    # Batched cached features match a direct forward pass (float16 storage, relative error).
    from toolkit.images import read_image

    direct = enc.encode_arrays(np.stack([read_image(p, 71) for p in imgs]))
    np.testing.assert_allclose(enc.features([ex.keys[str(p)] for p in imgs]), direct, rtol=2e-3, atol=1e-9)


def test_a_bfloat16_encoder_is_the_same_encoder_to_within_its_rounding(tmp_path, tiny_dataset):
    """Same identity, weights and cache; features within a few percent of float32's; an unknown precision refused."""
    from dataclasses import replace

    from toolkit.config import EncoderConfig
    from toolkit.encoder import Encoder
    from toolkit.errors import CapkitError
    from toolkit.images import read_image

    cfg = EncoderConfig(weights="none", image_size=71, batch_size=4)
    full = Encoder.prepare(cfg, tmp_path / "a")
    half = Encoder.prepare(replace(cfg, precision="bfloat16"), tmp_path / "b")
    assert half.id == full.id and half.identity["digest"] == full.identity["digest"]
    again = Encoder.prepare(EncoderConfig(weights=full.id, image_size=71, precision="bfloat16"), tmp_path / "a")
    assert again.config.precision == "bfloat16"  # a registered encoder, loaded by id, takes the precision asked for
    arrays = np.stack([read_image(p, 71) for p in sorted(tiny_dataset["images"].iterdir())[:6]])
    a, b = full.encode_arrays(arrays), half.encode_arrays(arrays)
    assert b.dtype == np.float32 and b.shape == a.shape
    assert 0 < np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05  # rounded, not another model
    assert {w.dtype for w in half.model.weights} == {"float32"}  # the registered model itself is untouched
    with pytest.raises(CapkitError, match="encoder precision must be one of float32, bfloat16, not 'float16'"):
        Encoder.prepare(replace(cfg, precision="float16"), tmp_path / "c")


def test_encoder_weights_file_round_trip_and_mismatch(tmp_path):
    import keras

    from toolkit.config import EncoderConfig
    from toolkit.encoder import Encoder

    keras.utils.set_random_seed(7)
    src = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3), pooling="avg")
    src.save_weights(tmp_path / "x.weights.h5")
    enc = Encoder.prepare(EncoderConfig(weights=str(tmp_path / "x.weights.h5"), image_size=71), tmp_path / "packs")
    assert enc.identity["source"] == "file"
    none = Encoder.prepare(EncoderConfig(weights="none", image_size=71), tmp_path / "packs")
    assert none.id != enc.id
    loaded = Encoder.load(tmp_path / "packs", enc.id)  # from the packs dir's own copy of the weights
    assert loaded.identity["digest"] == enc.identity["digest"]
    with pytest.raises(CapkitError, match="not in"):
        Encoder.load(tmp_path / "packs", "xception-299-ffffffffffff")
    with pytest.raises(CapkitError, match="no such weights file"):
        Encoder.prepare(EncoderConfig(weights=str(tmp_path / "missing.h5"), image_size=71), tmp_path / "packs")
