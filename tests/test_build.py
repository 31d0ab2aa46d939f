"""The build's stages one by one on tiny data (toolkit.build): each takes plain values and gives them back."""

from __future__ import annotations

import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest

from conftest import TINY_DECODER, TINY_ENCODER, TINY_TRAIN
from toolkit import build
from toolkit.config import SELF_CRITICAL_EPOCHS, DecoderConfig, EncoderConfig, SearchConfig, TrainConfig
from toolkit.errors import CapkitError
from toolkit.pack import MANIFEST_FILE, PACK_FILES, load_manifest, load_pack, verify_files
from toolkit.progress import Report


def splits_of(data) -> dict:
    return {"train": data["train"], "dev": data["dev"], "test": data["test"]}


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    """The stages of an `en` build called one after the other, as `build_pack` calls them."""
    d, packs = tiny_dataset, tmp_path_factory.mktemp("stage-packs")
    events = []
    report = Report(lambda kind, **f: events.append((kind, f)))
    dec_cfg, tr_cfg = DecoderConfig(**TINY_DECODER), TrainConfig(**{**TINY_TRAIN, "epochs": 1})
    build.check_settings("en", dec_cfg, tr_cfg)
    source = build.read_data(d["captions_en"], d["images"], splits_of(d), report)
    translation = build.translate_data(source.captions, "en", packs, source_lang="en", report=report)
    features = build.encode_images(source.present, d["images"], EncoderConfig(**TINY_ENCODER), packs, report=report)
    tokenizer = build.tokenize(translation.texts, features.present["train"], "en", dec_cfg)
    dec_cfg.vocab_size = tokenizer.vocab_size
    trained = build.train("en", features, translation.texts, tokenizer, dec_cfg, tr_cfg, packs, report)
    return SimpleNamespace(packs=packs, events=events, dec_cfg=dec_cfg, tr_cfg=tr_cfg, source=source,
                           translation=translation, features=features, tokenizer=tokenizer, trained=trained)


def test_the_stages_are_the_readmes_in_order(tiny_dataset, tmp_path):
    events = []
    build.build_pack("en", tiny_dataset["captions_en"], tiny_dataset["images"], splits_of(tiny_dataset), tmp_path,
                     source_lang="en", encoder_config=EncoderConfig(**TINY_ENCODER),
                     decoder_config=DecoderConfig(**TINY_DECODER), train_config=TrainConfig(**{**TINY_TRAIN, "epochs": 1}),
                     report=Report(lambda kind, **f: kind == "stage" and events.append(f["name"])))
    assert tuple(events) == build.STAGES == ("read", "translate", "encode", "tokenize", "train", "score", "write")


def test_check_settings_refuses_before_any_work_and_names_the_tokenizer():
    cfg = DecoderConfig(tokenizer="auto")
    build.check_settings("zh", cfg, TrainConfig())
    assert cfg.tokenizer == "char"
    with pytest.raises(CapkitError):
        build.check_settings("en", DecoderConfig(architecture="transformer"), TrainConfig())
    with pytest.raises(CapkitError):
        build.check_settings("en", DecoderConfig(), TrainConfig(strategy="multiworker"))
    with pytest.raises(CapkitError, match="precision must be one of auto, float32, bfloat16, float16, not 'fp8'"):
        build.check_settings("en", DecoderConfig(), TrainConfig(precision="fp8"))
    auto = TrainConfig()
    build.check_settings("en", DecoderConfig(), auto)
    assert auto.precision == "float32"  # resolved (no GPU in tests), so the manifest says what was trained
    for field in ("lr_schedule", "self_critical_lr_schedule", "self_critical_reward"):  # a typo is refused, not
        with pytest.raises(CapkitError, match=f"TrainConfig.{field} must be one of .*not 'cosin'"):  # trained as another
            build.check_settings("en", DecoderConfig(), TrainConfig(**{field: "cosin"}))


def test_self_critical_epochs_default_to_five_on_one_device_and_zero_when_distributed(monkeypatch):
    """Left unset, a one-device build fine-tunes on CIDEr-D; a distributed one cannot, so it skips it rather than fail."""
    import toolkit.train

    monkeypatch.setattr(toolkit.train, "distribution_strategy", lambda name: name)  # no MirroredStrategy in this process
    one, mirrored = TrainConfig(), TrainConfig(strategy="mirrored")
    assert one.self_critical_epochs is None
    build.check_settings("en", DecoderConfig(), one)
    assert one.self_critical_epochs == SELF_CRITICAL_EPOCHS == 5
    build.check_settings("en", DecoderConfig(), mirrored)
    assert mirrored.self_critical_epochs == 0
    with pytest.raises(CapkitError, match="one device only"):  # asked for by name, it is still refused
        build.check_settings("en", DecoderConfig(), TrainConfig(strategy="mirrored", self_critical_epochs=2))


def test_read_finds_the_split_images_on_disk(run, tiny_dataset, tmp_path):
    src = run.source
    assert {k: len(v) for k, v in src.present.items()} == {"train": 32, "dev": 8, "test": 8}
    assert len(src.captions) == 5 * 48 and src.n_missing == 0
    assert {c.image for c in src.captions} == {n for names in src.present.values() for n in names}

    images = tmp_path / "Images"
    shutil.copytree(tiny_dataset["images"], images)
    for name in src.present["dev"][:3]:
        (images / name).unlink()
    rep = Report()
    fewer = build.read_data(tiny_dataset["captions_en"], images, splits_of(tiny_dataset), rep)
    assert fewer.n_missing == 3 and len(fewer.present["dev"]) == 5 and len(fewer.captions) == 5 * 45
    assert any("3 images" in w for w in rep.warnings)
    with pytest.raises(CapkitError, match="not a folder of images"):
        build.read_data(tiny_dataset["captions_en"], tmp_path / "nowhere", splits_of(tiny_dataset), Report())


def test_translate_is_nothing_to_do_in_the_captions_language(run):
    t = run.translation
    assert t.captions == run.source.captions and t.translator.startswith("none")
    assert sum(map(len, t.texts.values())) == len(t.captions)


def test_translate_from_a_file_aligns_by_caption_id(run, tiny_dataset, tmp_path):
    t = build.translate_data(run.source.captions, "zh", tmp_path, "en", f"file:{tiny_dataset['captions_zh']}")
    assert t.translator.startswith("file:") and len(t.captions) == len(run.source.captions)
    assert [(c.image, c.index) for c in t.captions] == [(c.image, c.index) for c in run.source.captions]
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in c.text) for c in t.captions)
    assert (tmp_path / build.CACHE_DIR / "zh-file-captions.zh.txt.quality.json").is_file()


def test_encode_caches_every_image_and_drops_the_unreadable(run, tiny_dataset, tmp_path):
    f = run.features
    assert set(f.key_of) == {n for names in run.source.present.values() for n in names}
    assert f.present == run.source.present and f.n_unreadable == 0 and not f.grid
    assert f.encoder.features([f.key_of[n] for n in f.present["dev"]]).shape == (8, 2048)
    assert [f for kind, f in run.events if kind == "encoded"][0]["extracted"] == 48

    images = tmp_path / "Images"
    shutil.copytree(tiny_dataset["images"], images)
    bad = run.source.present["train"][0]
    (images / bad).write_bytes(b"not an image")
    rep = Report()
    again = build.encode_images(run.source.present, images, EncoderConfig(**TINY_ENCODER), run.packs, report=rep)
    assert again.n_unreadable == 1 and bad not in again.present["train"] and len(again.present["train"]) == 31
    assert any(bad in w for w in rep.warnings)


def test_tokenize_learns_from_the_train_split_only():
    from toolkit.tokenizer import UNK_ID

    texts = {"train.jpg": ["一只狗在跑。", "一只狗。"] * 5, "dev.jpg": ["猫"]}
    tok = build.tokenize(texts, ["train.jpg"], "zh", DecoderConfig(tokenizer="char", vocab_size=100))
    assert UNK_ID not in tok.encode(["一只狗"])[0] and UNK_ID in tok.encode(["猫"])[0]


def test_train_runs_its_epochs_and_keys_its_checkpoints_by_its_settings(run):
    t = run.trained
    assert t.state["epoch"] == 1 and len(t.state["history"]) == 1 and t.seconds > 0
    assert t.work == run.packs / build.WORK_DIR / f"en-{t.run_key}"
    names, texts = run.features.present["train"], build._train_texts(run.translation.texts, run.features.present["train"])
    key = build._run_key("en", run.dec_cfg, run.tr_cfg, run.features.encoder.id, names, texts)
    assert key == t.run_key
    assert build._run_key("en", run.dec_cfg, replace(run.tr_cfg, strategy="mirrored"), run.features.encoder.id, names, texts) == key
    assert build._run_key("en", run.dec_cfg, replace(run.tr_cfg, seed=1), run.features.encoder.id, names, texts) != key
    # When to stop is no part of what an epoch does: a larger limit or patience resumes the same run. Under the
    # cosine schedule the limit shapes every epoch's rate, so there it is another run.
    for change in ({"epochs": 9}, {"patience": 9}):
        assert build._run_key("en", run.dec_cfg, replace(run.tr_cfg, **change), run.features.encoder.id, names, texts) == key
    cosine = replace(run.tr_cfg, lr_schedule="cosine")
    assert (build._run_key("en", run.dec_cfg, replace(cosine, epochs=9), run.features.encoder.id, names, texts)
            != build._run_key("en", run.dec_cfg, cosine, run.features.encoder.id, names, texts))
    # The attention feed's default changed after it joined the key: today's output-fed default and the input feed
    # of older builds are two runs, whichever is the default.
    att = replace(run.dec_cfg, architecture="attention")
    assert len({build._run_key("en", replace(att, attention_feed=feed, attention_units=width), run.tr_cfg,
                               run.features.encoder.id, names, texts)
                for feed, width in (("input", 0), ("output", 0), ("output", 128), ("input", 128))}) == 4
    # Each device's own precision resumes the same run, as the strategy does; bfloat16, asked for, is another run.
    for precision, same in (("float32", True), ("float16", True), ("auto", True), ("bfloat16", False)):
        other = build._run_key("en", run.dec_cfg, replace(run.tr_cfg, precision=precision), run.features.encoder.id,
                               names, texts)
        assert (other == key) == same, precision


def test_a_stopped_run_resumes_where_it_stopped_when_asked_for_more_epochs(run, tmp_path):
    events = []
    report = Report(lambda kind, **f: events.append((kind, f)))

    def train(packs, **change):
        events.clear()
        return build.train("en", run.features, run.translation.texts, run.tokenizer, run.dec_cfg,
                           replace(run.tr_cfg, **change), packs, report)

    one = train(tmp_path, epochs=1)
    two = train(tmp_path, epochs=2)
    assert two.work == one.work and [h["epoch"] for h in two.state["history"]] == [1, 2]
    assert ("resumed", {"epoch": 1, "folder": str(one.work)}) in events
    assert [f["epoch"] for kind, f in events if kind == "epoch"] == [2]  # epoch 1 was not trained again
    # Fewer epochs than the checkpoints hold: weights trained that long are not what was asked; a run of its own.
    short = train(tmp_path, epochs=1)
    assert short.work != one.work and [h["epoch"] for h in short.state["history"]] == [1]
    assert [f["epoch"] for kind, f in events if kind == "epoch"] == [1] and "resumed" not in [k for k, _ in events]
    # A build begun while the key held its limits kept its checkpoints there, and still resumes from them.
    names, texts = run.features.present["train"], build._train_texts(run.translation.texts, run.features.present["train"])
    old = build._run_key("en", run.dec_cfg, replace(run.tr_cfg, epochs=3), run.features.encoder.id, names, texts,
                         with_limits=True)
    (tmp_path / "older").mkdir()
    shutil.copytree(one.work, tmp_path / "older" / build.WORK_DIR / f"en-{old}")
    resumed = train(tmp_path / "older", epochs=3)
    assert resumed.work.name == f"en-{old}" and [h["epoch"] for h in resumed.state["history"]] == [1, 2, 3]
    assert [f["epoch"] for kind, f in events if kind == "epoch"] == [3]


def test_score_an_installed_pack_again_reproduces_its_scores(tiny_packs, tiny_dataset):
    """The score stage alone, on an installed pack's decoder: its manifest's scores, then another search's."""
    from toolkit.config import SEARCH

    d = tiny_dataset
    source = build.read_data(d["captions_en"], d["images"], splits_of(d), Report())
    texts = build.translate_data(source.captions, "en", tiny_packs, "en").texts
    features = build.encode_images(source.present, d["images"], EncoderConfig(**TINY_ENCODER), tiny_packs)
    pack, m = load_pack(tiny_packs, "en"), load_manifest(tiny_packs / "en")
    scores = build.score_splits(pack.step, pack.tokenizer, features, texts, "en", m["decoder"]["max_length"],
                                m["pack_version"], SEARCH)
    assert set(scores) == {"dev", "test"}
    for split in scores:
        for system in ("model", "retrieval", "constant"):
            for name in ("bleu4", "cider_d"):
                assert scores[split][system][name] == pytest.approx(m["scores"][split][system][name], abs=1e-6)
    greedy = build.score_splits(pack.step, pack.tokenizer, features, texts, "en", m["decoder"]["max_length"],
                                m["pack_version"], SearchConfig(beam=1, length_penalty=0.0, no_repeat_ngram=0))
    assert (greedy["dev"]["model"]["beam"], greedy["dev"]["model"]["no_repeat_ngram"]) == (1, 0)
    assert greedy["dev"]["retrieval"] == scores["dev"]["retrieval"]


def test_write_installs_a_verified_pack_and_clears_the_checkpoints(run, tiny_dataset):
    from toolkit.captioner import Captioner
    from toolkit.generate import KerasStepModel

    d = tiny_dataset
    scores = build.score_splits(KerasStepModel(run.trained.model), run.tokenizer, run.features, run.translation.texts,
                                "en", run.dec_cfg.max_length, "1.0.0", SearchConfig(beam=2))
    manifest = build.make_manifest("en", "1.0.0", d["captions_en"], splits_of(d), "en", run.source, run.translation,
                                   run.features, run.tokenizer, run.dec_cfg, run.tr_cfg, run.trained, scores)
    assert manifest["data"]["n_train_captions"] == 160 and manifest["scores"]["dev"]["model"]["beam"] == 2
    assert run.trained.work.is_dir()
    folder = build.write_pack(run.packs, "en", run.trained, run.tokenizer, run.translation.captions,
                              run.features.present, manifest)
    assert folder == run.packs / "en" and not run.trained.work.exists()
    m = load_manifest(folder)
    assert set(m["files"]) == set(PACK_FILES) and verify_files(folder, m) == [] and (folder / MANIFEST_FILE).is_file()
    assert not [p for p in run.packs.iterdir() if p.name.startswith(".staging")]
    refs = (folder / "references.txt").read_text(encoding="utf-8").splitlines()
    assert len(refs) == 5 * 16  # dev and test captions
    batch = Captioner(run.packs, ["en"]).caption(sorted(d["images"].iterdir())[:2], search=SearchConfig(beam=1))
    assert [im.error for im in batch.images] == [None, None]
