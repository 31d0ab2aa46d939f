"""A pack's model card (`MODEL_CARD_FILE`, README.md): the manifest in words, for a person deciding whether to use the pack.

It is written from the manifest alone, so a card can be rewritten for any installed pack.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.pack import MODEL_CARD_FILE, architecture, atomic_write_text


def write_model_card(folder: Path, m: dict) -> None:
    """`folder`/README.md: what the pack of manifest `m` is, how it was trained, its scores and limits."""
    d, t, dc, tc = m["data"], m["training"], m["decoder"], m["train"]
    kind = "LSTM decoder over the"
    if architecture(m) == "attention":
        looks = "after each word's LSTM step" if dc.get("attention_feed", "input") == "output" else "before each word"
        kind = f"LSTM decoder attending ({looks}) over the feature grid of the"
    lines = [
        f"# capkit language pack: {m['lang']}", "",
        f"Image captions in `{m['lang']}` from a {m['decoder']['units']}-unit {kind} shared "
        f"{m['encoder']['name']} encoder `{m['encoder']['id']}` (weights: {m['encoder']['source']}).", "",
        "## Data",
        f"- captions: `{d['captions']}` ({d['source_lang']}), translator: {d['translator']}",
        f"- images: {d['n_train_images']} train, {d['n_dev_images']} dev, {d['n_test_images']} test "
        f"({d['n_missing_images']} missing, {d['n_unreadable_images']} unreadable); {d['n_train_captions']} train captions",
        f"- tokenizer: SentencePiece {m['tokenizer']['type'].removeprefix('sentencepiece-')}, "
        f"{m['tokenizer']['vocab_size']} pieces, case {m['tokenizer'].get('case', 'folded')}, "
        "trained on the train split only", "",
        "## Training",
        f"- {dc['architecture']} decoder: embeddings {dc['embed_dim']}, LSTM {dc['units']}, dropout {dc['dropout']}; "
        f"Adam from {tc['learning_rate']} ({tc['lr_schedule']}), gradient norm clipped at {tc['clipnorm'] or 'none'}, "
        f"label smoothing {tc['label_smoothing']}, batches of {tc['batch_size']}, seed {tc['seed']}"
        f"{'' if tc.get('precision', 'auto') in ('auto', 'float32') else ', in mixed ' + tc['precision']}",
        f"- {t['epochs_run']} epochs (best {t['best_epoch']}, dev loss {t['best_dev_loss']:.3f}), {t['seconds']} s on {t['hardware']}",
        *_self_critical_line(t, tc), "",
        "## Scores (corpus BLEU, 0-100; CIDEr-D x100)", "",
        "| split | system | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | CIDEr-D |", "|---|---|---|---|---|---|---|",
    ]
    sig = ""
    for split, systems in m["scores"].items():
        for name, r in systems.items():
            cider = "-" if r.get("cider_d") is None else f"{r['cider_d']:.1f}"  # none before capkit-bleu:2
            lines.append(f"| {split} | {name} | {r['bleu1']:.1f} | {r['bleu2']:.1f} | {r['bleu3']:.1f} | {r['bleu4']:.1f} "
                         f"| {cider} |")
            sig = r["signature"]
    lines += ["", f"Signature: `{sig}`. `retrieval` is the first train caption of the most similar train image; "
              "`constant` is the most frequent train caption for every image.", "",
              "## Known limits",
              "- Trained on the images and captions above only; expect generic captions for scenes unlike them.",
              "- Machine-translated training captions carry the translator's errors." if "none" not in d["translator"] else
              "- Scores are against references from the same source as the training captions.",
              ]
    atomic_write_text(folder / MODEL_CARD_FILE, "\n".join(lines) + "\n")


def _self_critical_line(t: dict, tc: dict) -> list[str]:
    sc = t.get("self_critical")
    if not sc:
        return []
    by_epoch = {h["epoch"]: h for h in sc["history"]}
    before, kept = by_epoch[0], by_epoch[sc["best_epoch"]]
    reward = {"bleu4": "sentence BLEU-4", "cider-d+bleu4": "CIDEr-D + sentence BLEU-4"}.get(
        tc.get("self_critical_reward"), "CIDEr-D")
    scores = [(name, key) for name, key in (("CIDEr-D", "dev_cider_d"), ("BLEU-4", "dev_bleu4")) if key in before]
    return [f"- then {sc['epoch']} epochs of self-critical training on {reward} (Adam from {tc['self_critical_lr']}"
            f"{', cosine to 0' if tc.get('self_critical_lr_schedule') == 'cosine' else ''}"
            f"{', no dropout' if tc.get('self_critical_dropout') is False else ''}, "
            f"{tc['self_critical_samples']} samples an image): greedy dev captions' "
            + ", ".join(f"{name} {before[key]:.1f} before, {kept[key]:.1f}" for name, key in scores)
            + f" at the epoch kept ({sc['best_epoch']})"]
