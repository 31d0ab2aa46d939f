"""Captions as the language is written: the rules per language, BLEU's tokens unchanged, and `capkit caption` showing them."""

from __future__ import annotations

import json

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


def test_zero_width_spaces_are_not_learned():
    # 209 Google Flickr8k-CN captions hold U+200B pairs inside words; SentencePiece would read each as a space.
    assert attach_punctuation("两个人爬\u200b\u200b上雪山。", "zh") == "两个人爬上雪山。"
    assert attach_punctuation("a\u200bdog .", "en") == "a dog."


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


# -- a pack trained on cased, pre-tokenised captions, through the real CLI -------------

@pytest.fixture(scope="module")
def cased_pack(tmp_path_factory, tiny_dataset):
    """A tiny `en` pack whose captions are written as Flickr8k's: "A red circle on a white background ."."""
    from conftest import build_tiny_pack

    root = tmp_path_factory.mktemp("cased")
    lines = []
    for line in tiny_dataset["captions_en"].read_text(encoding="utf-8").splitlines():
        key, text = line.split("\t")
        lines.append(f"{key}\t{text[0].upper() + text[1:] if int(key[-1]) % 2 == 0 else text} .")
    captions = root / "captions.en.txt"
    captions.write_text("\n".join(lines) + "\n", encoding="utf-8")
    packs = root / "packs"
    # Trained longer than the other tiny packs, so that its captions end with a learned "." ("A blue triangle on black.").
    build_tiny_pack("en", {**tiny_dataset, "captions_en": captions}, packs, decoder={"vocab_size": 150},
                    train={"epochs": 20, "patience": 20})
    return packs


def test_a_cased_pack_keeps_case_and_captions_in_written_form(cased_pack, tiny_dataset):
    from typer.testing import CliRunner

    from toolkit.cli import app
    from toolkit.pack import load_manifest, load_pack

    m = load_manifest(cased_pack / "en")
    assert m["tokenizer"]["case"] == "kept" and "case kept" in (cased_pack / "en" / "README.md").read_text()
    tok = load_pack(cased_pack, "en").tokenizer
    assert tok.case == "kept"
    pieces = {tok.sp.id_to_piece(i) for i in range(tok.vocab_size)}
    assert "▁A" not in pieces and "." in pieces  # trained on "a red circle ... background.": no capital, "." attached
    images = sorted(tiny_dataset["images"].iterdir())[:4]
    args = ["caption", *map(str, images), "--lang", "en", "--packs-dir", str(cased_pack)]
    text = CliRunner().invoke(app, args)
    assert text.exit_code == 0, text.output
    captions = [line.split("\t")[1] for line in text.output.splitlines()]
    assert len(captions) == 4 and all(c[:1].isupper() and " ." not in c for c in captions), captions
    assert any(c.endswith(".") for c in captions), captions
    rows = json.loads(CliRunner().invoke(app, args + ["--format", "json"]).output)
    assert [r["caption"] for r in rows] == captions


def test_a_pack_from_before_case_was_kept_loads_and_captions_in_written_form(tiny_packs, tiny_dataset, tmp_path):
    """Its manifest has no tokenizer `case`: it reads as "folded", and its captions are written as every pack's are."""
    import shutil

    from toolkit.captioner import Captioner
    from toolkit.modelcard import write_model_card
    from toolkit.pack import MANIFEST_FILE, load_manifest

    packs = shutil.copytree(tiny_packs, tmp_path / "packs")
    for lang in ("en", "zh"):
        m = load_manifest(packs / lang)
        del m["tokenizer"]["case"]
        (packs / lang / MANIFEST_FILE).write_text(json.dumps(m), encoding="utf-8")
    write_model_card(tmp_path, m)
    assert "case folded" in (tmp_path / "README.md").read_text()
    images = sorted(tiny_dataset["images"].iterdir())[:3]
    for im in Captioner(packs, ["en", "zh"]).caption(images).images:
        en, zh = im.captions["en"].text, im.captions["zh"].text  # lower case and unpunctuated, as decoded
        assert en[:1].isupper() and en == written_form(en, "en")
        assert " " not in zh and zh == written_form(zh, "zh")  # an undertrained tiny pack may say nothing
