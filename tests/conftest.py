"""Shared test fixtures. The `realdata` and `slow` markers are registered in pyproject.toml."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data_dir() -> Path:
    """The read-only real data: $CAPKIT_SHARED_DATA, else ../shared/data beside the repo."""
    env = os.environ.get("CAPKIT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder, or a clean skip where this machine has none."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"no real data at {path} (set CAPKIT_SHARED_DATA)")
    return path


# -- tiny generated data and packs ------------------------------------------------
# Random-init Xception at its minimum input size (71 px) and a 32-unit decoder:
# every stage runs for real, in seconds.

TINY_ENCODER = dict(weights="none", image_size=71, batch_size=16, workers=2)
TINY_DECODER = dict(vocab_size=60, units=32, embed_dim=16, dropout=0.1, max_length=16)
TINY_TRAIN = dict(epochs=3, batch_size=32, learning_rate=1e-2, patience=2, self_critical_epochs=0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> dict[str, Path]:
    """48 synthetic images with English and Chinese captions and train/dev/test splits."""
    from toolkit.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("data"), n_images=48, image_size=64, dev_fraction=0.17, test_fraction=0.17)


def build_tiny_pack(lang: str, data: dict[str, Path], packs_dir: Path, **overrides):
    """A real pack from `data`, built by the same function the CLI calls."""
    from toolkit.config import DecoderConfig, EncoderConfig, TrainConfig
    from toolkit.pipeline import build_pack

    return build_pack(
        lang, data[f"captions_{lang}"], data["images"],
        {"train": data["train"], "dev": data["dev"], "test": data["test"]}, packs_dir,
        source_lang=lang,
        encoder_config=EncoderConfig(**TINY_ENCODER),
        decoder_config=DecoderConfig(**{**TINY_DECODER, **overrides.pop("decoder", {})}),
        train_config=TrainConfig(**{**TINY_TRAIN, **overrides.pop("train", {})}),
        **overrides,
    )


@pytest.fixture(scope="session")
def tiny_packs(tmp_path_factory, tiny_dataset) -> Path:
    """A packs dir holding tiny `en` and `zh` packs over one random-init encoder.

    Session-wide and shared: tests that change packs copy it first
    (`shutil.copytree(tiny_packs, tmp_path / "packs")`).
    """
    packs = tmp_path_factory.mktemp("packs")
    build_tiny_pack("en", tiny_dataset, packs)
    build_tiny_pack("zh", tiny_dataset, packs)
    return packs


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A random-init 71-px `Encoder` (batch 4), built once: Xception takes seconds to build.

    Tests that extract give it a cache of their own with `encoder_with_cache`.
    """
    from toolkit.config import EncoderConfig
    from toolkit.encoder import Encoder

    import numpy as np

    enc = Encoder.prepare(EncoderConfig(weights="none", image_size=71, batch_size=4, workers=2),
                          tmp_path_factory.mktemp("encoder"))
    enc.encode_arrays(np.zeros((1, 71, 71, 3), np.uint8))  # trace the forward pass once, for every copy
    return enc


def encoder_with_cache(base, home: Path):
    """`base`'s model and identity with its feature cache in `home` (its traced forward pass reused)."""
    from toolkit.encoder import Encoder

    enc = Encoder(base.model, base.config, base.identity, home)
    enc._forward = base._forward
    return enc
