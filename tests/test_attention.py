"""The attention decoder: grid features, its config, the decoder itself, its searches, and a tiny pack end to end."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import encoder_with_cache


def photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return sorted(folder.iterdir())


# -- grid features ------------------------------------------------------------------


def test_grid_features_are_cached_and_average_to_the_pooled_ones(tiny_encoder, tmp_path):
    from toolkit.encoder import FEATURE_DIM

    paths = photos(tmp_path / "imgs", 5)
    enc = encoder_with_cache(tiny_encoder, tmp_path / "enc")
    assert enc.grid_size == 3  # Xception at 71 px
    ex = enc.extract(paths[:3])  # pooled only, as before: no grid written
    assert ex.n_extracted == 3 and len(enc.grid_cache) == 0
    pooled_before = enc.features([ex.keys[str(p)] for p in paths[:3]])

    ex = enc.extract(paths, grid=True)  # 3 images need their grid only, 2 need both
    assert (ex.n_extracted, ex.n_cached) == (5, 0)
    assert len(enc.cache) == 5 and len(enc.grid_cache) == 5  # pooled rows not written twice
    keys = [ex.keys[str(p)] for p in paths]
    grids = enc.grid_features(keys)
    assert grids.shape == (5, 9, FEATURE_DIM) and grids.dtype == np.float32
    pooled = enc.features(keys)
    np.testing.assert_array_equal(pooled[:3], pooled_before)
    # float16 rows: each stored value is within 2**-11 of its own size.
    np.testing.assert_allclose(grids.mean(axis=1), pooled, rtol=2e-3, atol=2e-3 * np.abs(pooled).max())
    assert np.abs(grids - grids.mean(axis=1, keepdims=True)).max() > 0  # positions differ: a real map

    # A second run, or another process on the same folder, extracts nothing.
    again = encoder_with_cache(tiny_encoder, tmp_path / "enc").extract(paths, grid=True)
    assert (again.n_extracted, again.n_cached) == (0, 5)
    assert enc.grid_features([]).shape == (0, 9, FEATURE_DIM)


def test_grid_features_stay_in_memory_when_the_cache_is_read_only(tiny_encoder, tmp_path, monkeypatch):
    import toolkit.encoder

    def refuse(path, data, keep):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(toolkit.encoder, "_append", refuse)
    paths = photos(tmp_path / "imgs", 3)
    enc = encoder_with_cache(tiny_encoder, tmp_path / "enc")
    ex = enc.extract(paths, grid=True)
    keys = [ex.keys[str(p)] for p in paths]
    assert ex.n_extracted == 3 and len(enc.grid_cache) == 0
    np.testing.assert_allclose(enc.grid_features(keys).mean(axis=1), enc.features(keys), rtol=1e-5, atol=1e-12)


def test_grid_extraction_keeps_the_encoder_identity(tmp_path):
    """Pooling moved out of the Keras model into the forward pass: same weights, digest, id and scale."""
    import keras

    from toolkit.config import EncoderConfig
    from toolkit.encoder import RANDOM_INIT_SEED, Encoder, _digest

    keras.utils.set_random_seed(RANDOM_INIT_SEED)
    pooled_model = keras.applications.Xception(include_top=False, weights=None, input_shape=(71, 71, 3), pooling="avg")
    enc = Encoder.prepare(EncoderConfig(weights="none", image_size=71), tmp_path)
    assert enc.identity["digest"] == _digest(pooled_model)
    noise = np.random.default_rng(0).uniform(-1, 1, (1, 71, 71, 3)).astype(np.float32)
    peak = float(np.abs(pooled_model(noise).numpy()).max())
    assert 0.5 <= peak * enc.identity["feature_scale"] < 2
