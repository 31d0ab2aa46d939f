"""Per-language SentencePiece tokenizer, trained on the train split only.

Unigram model over raw text, so languages without spaces (Chinese, Japanese,
Thai) and right-to-left scripts need no pre-tokenization. Fixed special ids:
pad 0, unk 1, bos 2, eos 3 (the decoder masks id 0).

Case is kept ("Paris", German "Hund"); packs built before that fold it, and
their model files say so (`Tokenizer.case`), so they encode as they always did.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable

from toolkit.errors import CapkitError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
WORD_START = "\u2581"  # SentencePiece's mark of a piece that begins a word ("▁dog")
# Languages whose scripts have many distinct characters: cover almost all of them.
_WIDE_SCRIPTS = {"zh", "ja", "ko", "yue"}


class Tokenizer:
    """A trained SentencePiece model: `encode("a dog") -> [5, 9]`, `decode([5, 9]) -> "a dog"`."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def case(self) -> str:
        """"kept", or "folded" for a model trained with case folding (every pack before case was kept)."""
        return "folded" if self.sp.normalize("A").lstrip(WORD_START) == "a" else "kept"

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def decode(self, ids: list[list[int]]) -> list[str]:
        return self.sp.decode([[i for i in seq if i > EOS_ID] for seq in ids])

    def pieces(self, ids: list[int]) -> list[str]:
        """The text of each id of one caption, word-start marks dropped: `[5, 9, 14] -> ["a", "do", "g"]`.

        One entry per id (a lone word-start piece gives ""), so entry i
        belongs to ids[i] (and to row i of `AttentionDecoder.attention_maps`).
        """
        return [self.sp.id_to_piece(int(i)).replace(WORD_START, "") for i in ids]

    def save(self, path: str | Path) -> None:
        from toolkit.pack import atomic_write_bytes

        atomic_write_bytes(Path(path), self.proto)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Inverse of save()."""
        try:
            return cls(Path(path).read_bytes())
        except (OSError, RuntimeError) as e:
            raise CapkitError(f"{path}: not a readable SentencePiece model ({e})") from e


def train_tokenizer(texts: Iterable[str], lang: str, vocab_size: int = 2000, model_type: str = "unigram") -> Tokenizer:
    """Train on `texts` (the train split's captions). `vocab_size` is a soft cap:
    a small corpus gets the vocabulary it can support instead of an error.

    >>> tok = train_tokenizer(["a dog runs", "a cat sits"] * 20, "en", vocab_size=50)

    In Chinese or Japanese a cap below the number of characters the corpus
    needs gives that many pieces instead: a character-level vocabulary.

    `model_type` is SentencePiece's: "unigram", "bpe" (on small English
    corpora it keeps frequent words whole, where unigram cuts "bl|ack"), or
    "char" (one piece per character; `vocab_size` still caps them: past it,
    the rarest characters read as unknown).
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CapkitError("no captions to train the tokenizer on")
    try:
        return _train(texts, lang, max(8, vocab_size), model_type)
    except RuntimeError as e:
        # Wide scripts: every kept character needs a piece, so the cap cannot go below their count.
        need = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(e))
        if not need:
            raise CapkitError(f"SentencePiece could not train a {vocab_size}-piece vocabulary: {str(e)[-300:]}") from None
        return _train(texts, lang, int(need.group(1)) + 4, model_type)  # + pad, unk, bos, eos


def _train(texts: list[str], lang: str, vocab_size: int, model_type: str) -> Tokenizer:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        # NFKC, case kept: the captions' sentence-initial capitals are gone already (`written.training_form`).
        normalization_rule_name="nmt_nfkc",
        character_coverage=0.9995 if lang in _WIDE_SCRIPTS else 1.0,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=2,
        minloglevel=2,
    )
    return Tokenizer(model.getvalue())
