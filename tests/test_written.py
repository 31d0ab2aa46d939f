"""Captions as the language is written: the rules per language, and BLEU's tokens unchanged."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolkit.written import NNBSP, attach_punctuation, learn_casing, training_form, written_form


@pytest.mark.parametrize("lang,raw,written", [
    ("en", "a man is sitting on a table .", "A man is sitting on a table."),
    ("en", "A girl holding a horse 's lead , behind a fire .", "A girl holding a horse's lead, behind a fire."),
    ("en", 'a sign that says " active . "', 'A sign that says "active."'),
    ("en", "a dog ( # 7 ) runs ; it is fast !", "A dog (# 7) runs; it is fast!"),
    ("en", "a man is setting up a camera that ca n't be seen", "A man is setting up a camera that ca n't be seen"),
    ("en", "2 dogs run", "2 dogs run"),                      # no letter to capitalise first
    ("en", "A .NET logo at 10:30 .", "A .NET logo at 10:30."),  # a stop before a word is not a stop
    ("de", "ein mann sitzt auf einem stein .", "Ein mann sitzt auf einem stein."),
    ("de", "Ein Hund , der über „ Stöcke “ springt .", "Ein Hund, der über „ Stöcke “ springt."),  # curly quotes as given
    ("pt", "um homem está sentado em uma mesa .", "Um homem está sentado em uma mesa."),
    ("es", "¿ qué hace el perro ?", "¿Qué hace el perro?"),
    ("fr", "un chien court dans l'herbe !", f"Un chien court dans l'herbe{NNBSP}!"),
    ("fr", "un chien court ?", f"Un chien court{NNBSP}?"),
    ("fr", "un chien , un chat ; deux amis .", f"Un chien, un chat{NNBSP}; deux amis."),
    ("fr", "Quoi?!", f"Quoi{NNBSP}?!"),
    ("zh", "一只狗 在 草地上 奔跑 。", "一只狗在草地上奔跑。"),
    ("zh", "穿 NBA 球衣的男孩", "穿NBA球衣的男孩"),
    ("zh", "一个女孩拿着Hello Kitty的气球。", "一个女孩拿着Hello Kitty的气球。"),
    ("ja", "犬 が 走る 。", "犬が走る。"),
    ("ru", "собака бежит по траве .", "Собака бежит по траве."),
    ("el", "ένας σκύλος τρέχει .", "Ένας σκύλος τρέχει."),
    ("ar", "كلب يجري على العشب .", "كلب يجري على العشب."),
    ("nl", "ijsjes op een bord .", "IJsjes op een bord."),
    ("tr", "iki köpek koşuyor .", "İki köpek koşuyor."),
])
def test_written_form_per_language(lang, raw, written):
    assert written_form(raw, lang) == written
    assert written_form(written, lang) == written  # idempotent


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("aAbßiIé 2.,;:!?'\"()¿«»-狗在。，！Ａ１\u202f\u00a0") + ["'s", " n't"]), max_size=30)
       .map("".join),
       st.sampled_from(["en", "de", "fr", "es", "nl", "ru", "zh", "ja"]))
def test_any_text_keeps_its_bleu_tokens_and_is_written_once(text, lang):
    from toolkit.evaluate import bleu_tokenize

    written = written_form(text, lang)
    assert bleu_tokenize(written, lang) == bleu_tokenize(text, lang)
    assert written_form(written, lang) == written


def test_attaching_punctuation_keeps_case_and_an_unpaired_quote():
    assert attach_punctuation('a man says " hello', "en") == 'a man says " hello'
    assert attach_punctuation("the Eiffel tower .", "en") == "the Eiffel tower."


def test_training_form_lowers_the_first_word_only_where_captions_write_it_lower():
    train = ["A dog runs in Paris .", "Paris at night .", "Two dogs and a cat .", "Ein Hund auf dem Rasen .",
             "Der Hund läuft ."]
    casing = learn_casing(train)
    assert training_form("A man 's dog .", "en", casing) == "a man's dog."
    assert training_form("Paris at night .", "en", casing) == "Paris at night."         # written so inside captions
    assert training_form("Two cats .", "en", casing) == "Two cats."                     # never seen inside: kept
    assert training_form("Hund und Katze .", "de", casing) == "Hund und Katze."         # a German noun stays up
    assert training_form(" . ", "en", casing) == "."


def test_bleu_of_written_captions_is_bleu_of_the_raw_ones():
    from toolkit.evaluate import corpus_bleu_scores

    refs = {"a.jpg": ["A dog runs on the grass .", "a brown dog is running ."],
            "b.jpg": ["A man 's hat , on a table .", "a hat sits on a table ."]}
    hyps = {"a.jpg": "a dog is running on the grass .", "b.jpg": "a man 's hat on a table ."}
    raw = corpus_bleu_scores(hyps, refs, "en")
    written = corpus_bleu_scores({k: written_form(v, "en") for k, v in hyps.items()}, refs, "en")
    assert written.to_dict() == raw.to_dict() and raw.bleu2 > 0


def _captions(path, sep):
    return [line.split(sep, 1)[1].strip() for line in path.read_text(encoding="utf-8").splitlines() if sep in line]


@pytest.mark.realdata
@pytest.mark.parametrize("lang,file,sep", [("en", "flickr8k/Flickr8k.token.txt", "\t"),
                                           ("zh", "flickr8k-cn/flickr8kzhg.caption.txt", " ")])
def test_every_real_caption_keeps_its_bleu_tokens(shared_data, lang, file, sep):
    from toolkit.evaluate import bleu_tokenize

    path = shared_data / file
    if not path.is_file():
        pytest.skip(f"{path} absent")
    texts = _captions(path, sep)
    assert len(texts) == 40460
    written = [written_form(t, lang) for t in texts]
    assert [bleu_tokenize(w, lang) for w in written] == [bleu_tokenize(t, lang) for t in texts]
    assert [written_form(w, lang) for w in written] == written
    if lang == "en":
        assert not [w for w in written if " ." in w or " ," in w or w[0].islower()]


@pytest.mark.realdata
def test_corpus_bleu_of_written_real_captions_equals_bleu_of_the_raw_ones(shared_data):
    """Each image's first caption scored against its other four, as given and in written form."""
    from toolkit.data import group_by_image, read_captions
    from toolkit.evaluate import corpus_bleu_scores

    path = shared_data / "flickr8k" / "Flickr8k.token.txt"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    by_image = group_by_image(read_captions(path).captions)
    hyps = {n: ts[0] for n, ts in by_image.items()}
    refs = {n: ts[1:] for n, ts in by_image.items()}
    raw = corpus_bleu_scores(hyps, refs, "en")
    written = corpus_bleu_scores({n: written_form(t, "en") for n, t in hyps.items()}, refs, "en")
    assert written.to_dict() == raw.to_dict() and raw.bleu4 > 5
