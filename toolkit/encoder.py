"""The shared Xception encoder and its on-disk feature caches (kept by `toolkit.features`).

One encoder serves every pack. Its identity is a digest of its weights and
input size, so packs can insist on the exact encoder they were trained with.
Encoders live in `<packs dir>/.encoders/<id>/`; features are cached there,
keyed by image content (sha256 of the file's bytes), so a second language on
the same photos extracts nothing.

Two caches, one forward pass: the average-pooled vector (`features/`, 2048
values per image) that every decoder reads, and, only when asked for, the
last convolutional feature map it is the mean of (`features/grid/`, G*G*2048
values: 10x10 at 299 px, 3x3 at 71 px) for the attention decoder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.config import ENCODER_PRECISIONS, PACKS_DIR_HINT, EncoderConfig
from toolkit.errors import CapkitError
from toolkit.features import (  # noqa: F401  (the cache's names, importable here as before)
    FEATURES_FILE, FEATURES_INDEX_FILE, CacheWriteError, FeatureCache, FeatureView, image_key,
)
from toolkit.images import DEFAULT_MAX_PIXELS, ImageBytes, ImageError, decode_image

ENCODERS_DIR = ".encoders"
ENCODER_FILE = "encoder.json"
ENCODER_WEIGHTS_FILE = "encoder.weights.h5"
FEATURES_DIR = "features"
GRID_DIR = "grid"           # inside FEATURES_DIR: the spatial feature maps
ENCODER_FORMAT = "capkit-encoder v1"
FEATURE_DIM = 2048
RANDOM_INIT_SEED = 1234
DEFAULT_IMAGE_SIZE = EncoderConfig.image_size
ENCODER_ID = re.compile(r"[a-z0-9]+-[0-9]+-[0-9a-f]{12}")  # "xception-299-1a2b3c4d5e6f", as `_identity` makes them
# Digests (`_digest`: sha256 of every weight as float32, in model order) of the ImageNet-trained
# Xception without its top; the same at every image size. This one is of the weights that
# ../shared/tools/xception-imagenet-weights writes (the stock ImageNet Xception, taken from a
# PyPI wheel), computed here from that file. Keras's own download could not be fetched to
# confirm it gives the same digest; if it does not, `--encoder-weights imagenet` is refused
# by the digest check below, never accepted wrongly.
IMAGENET_DIGESTS = frozenset({"dd8fa9fc31ba124382395512a133fe425aa5c6667b16e5832bb79910d1b77829"})


@dataclass
class Extraction:
    """What `Encoder.extract` did: image path -> cache key, and the failures."""

    keys: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    n_extracted: int = 0
    n_cached: int = 0
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.n_extracted / self.seconds if self.seconds > 0 else 0.0


class Encoder:
    """Xception (no top) with an identity and feature caches: pooled vectors, and grids on request.

    >>> enc = Encoder.prepare(EncoderConfig(weights="none", image_size=71), Path("packs"))
    >>> ex = enc.extract(["a.jpg", "b.png"]); feats = enc.features([ex.keys["a.jpg"]])  # (1, 2048)
    >>> ex = enc.extract(["a.jpg"], grid=True); enc.grid_features([ex.keys["a.jpg"]]).shape
    (1, 9, 2048)
    """

    def __init__(self, model, config: EncoderConfig, identity: dict, home: Path | None):
        self.model = model
        self.config = config
        self.identity = identity
        self.id: str = identity["id"]
        self.home = home
        scale = identity["feature_scale"]
        self.grid_size: int = int(model.output_shape[1])  # G: the feature map is G x G positions
        self.cache = FeatureCache(home / FEATURES_DIR, FEATURE_DIM, scale) if home else None
        # The same scale: a grid cell is of the pooled features' order (they are its mean).
        self.grid_cache = FeatureCache(home / FEATURES_DIR / GRID_DIR, self.grid_size**2 * FEATURE_DIM, scale) if home else None
        self._memory: dict[str, np.ndarray] = {}  # features when the cache is not writable
        self._grid_memory: dict[str, np.ndarray] = {}
        self._forward = None

    # -- identity and storage -------------------------------------------------

    @classmethod
    def prepare(cls, config: EncoderConfig, packs_dir: Path, progress: Callable[[str], None] | None = None) -> "Encoder":
        """Build the encoder `config.weights` names and register it in `packs_dir`.

        `config.weights` may be the id of an encoder registered there
        (`choose_encoder`): it is loaded, not rebuilt, and `config.image_size`
        must be its size; `config.batch_size`, `workers` and `precision` still apply.
        """
        if config.precision not in ENCODER_PRECISIONS:
            raise CapkitError(f"encoder precision must be one of {', '.join(ENCODER_PRECISIONS)}, "
                              f"not {config.precision!r}")
        if ENCODER_ID.fullmatch(config.weights):
            enc = cls.load(packs_dir, config.weights)
            if config.image_size != enc.config.image_size:
                raise CapkitError(f"encoder {enc.id} takes {enc.config.image_size} px images, not {config.image_size}",
                                  hint="drop --image-size, or pass weights (imagenet or a file) to make another encoder")
            enc.config = replace(enc.config, batch_size=config.batch_size, workers=config.workers,
                                 precision=config.precision)
            return enc
        model = _build(config, config.weights)
        identity = _identity(model, config)
        home = Path(packs_dir) / ENCODERS_DIR / identity["id"]
        if not (home / ENCODER_FILE).exists():
            from toolkit.pack import atomic_write_text

            try:
                home.mkdir(parents=True, exist_ok=True)
                if identity["source"] != "none":  # random init is rebuilt from its seed
                    tmp = home / (ENCODER_WEIGHTS_FILE + ".tmp.weights.h5")
                    model.save_weights(tmp)
                    os.replace(tmp, home / ENCODER_WEIGHTS_FILE)
                atomic_write_text(home / ENCODER_FILE, json.dumps(identity, indent=2))
            except OSError as e:
                raise CapkitError(
                    f"{packs_dir}: cannot register the encoder there ({e.strerror or e})",
                    hint=f"{PACKS_DIR_HINT}, with free space",
                ) from None
        return cls(model, config, identity, home)

    @classmethod
    def load(cls, packs_dir: Path, encoder_id: str) -> "Encoder":
        """Inverse of prepare(): the registered encoder `encoder_id`, digest checked."""
        home = Path(packs_dir) / ENCODERS_DIR / encoder_id
        path = home / ENCODER_FILE
        if not path.exists():
            have = sorted(p.name for p in (Path(packs_dir) / ENCODERS_DIR).glob("*") if p.is_dir())
            raise CapkitError(
                f"encoder {encoder_id} is not in {Path(packs_dir) / ENCODERS_DIR}",
                hint=f"encoders here: {', '.join(have) or 'none'}; rebuild the pack or copy that encoder folder",
            )
        try:
            identity = json.loads(path.read_text(encoding="utf-8"))
            if identity.get("format") != ENCODER_FORMAT:
                raise CapkitError(f"{path}: format {identity.get('format')!r}, this toolkit reads {ENCODER_FORMAT!r}")
            missing = [k for k in ("id", "name", "image_size", "source", "digest", "feature_scale") if k not in identity]
            if missing:
                raise CapkitError(f"{path}: encoder file lacks {', '.join(missing)}",
                                  hint="the folder is damaged; rebuild the pack or copy that encoder folder again")
            config = EncoderConfig(name=identity["name"], image_size=int(identity["image_size"]), weights=identity["source"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CapkitError(f"{path}: unreadable encoder file ({type(e).__name__}: {e})",
                              hint="the folder is damaged; rebuild the pack or copy that encoder folder again") from None
        source = "none" if identity["source"] == "none" else str(home / ENCODER_WEIGHTS_FILE)
        model = _build(config, source)
        if _digest(model) != identity["digest"]:
            raise CapkitError(f"{home}: encoder weights do not match their recorded digest", hint="the folder is damaged; rebuild it")
        return cls(model, config, identity, home)

    # -- extraction -----------------------------------------------------------

    def extract(
        self,
        paths: list[str | Path | ImageBytes],
        progress: Callable[[int, int], None] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        grid: bool = False,
    ) -> Extraction:
        """Features of every readable image in `paths`, cached; bad files are reported, not fatal.

        `keys` and `failures` are by path (as a string); an `ImageBytes` in
        `paths` (an image in memory) is keyed by itself and named in messages
        by its `name`.

        `grid=True` caches the spatial feature maps too (`grid_features`); an
        image counts as cached only when everything asked for is. Images whose
        pooled features are cached but not their grid go through the model
        again, and only the grid is added.

        Worker threads read, hash, decode and resize images ahead of the model
        (Pillow releases the GIL while decoding), so the forward pass is rarely
        waiting; batches are padded to a power of two so the graph is traced a few times only.
        """
        out = Extraction()
        paths = [p if isinstance(p, ImageBytes) else str(p) for p in paths]
        start = time.perf_counter()
        bs = self.config.batch_size
        batch_keys: list[str] = []
        batch_imgs: list[np.ndarray] = []
        pending: set[str] = set()

        def work(p: str | ImageBytes):
            if isinstance(p, ImageBytes):
                data, name = p.data, p.name
            else:
                try:
                    data, name = Path(p).read_bytes(), p
                except OSError as e:
                    return p, None, ImageError(f"{p}: cannot read ({e.strerror or e})")
            key = image_key(data)
            if self._has(key, grid):
                return p, key, None
            try:
                return p, key, decode_image(data, self.config.image_size, name, max_pixels)
            except ImageError as e:
                return p, None, e

        def flush():
            if batch_imgs:
                out_ = self._encode_batch(np.stack(batch_imgs), grid)
                pooled, grids = out_ if grid else (out_, None)
                self._store(list(batch_keys), pooled, grids)
                out.n_extracted += len(batch_keys)
                pending.difference_update(batch_keys)
                batch_keys.clear()
                batch_imgs.clear()

        done = 0
        with ThreadPoolExecutor(max(1, self.config.workers)) as pool:
            window: deque = deque()
            it = iter(paths)
            for p in it:
                window.append(pool.submit(work, p))
                if len(window) >= 2 * bs:
                    break
            while window:
                p, key, result = window.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    window.append(pool.submit(work, nxt))
                if isinstance(result, ImageError):  # one line per file, its hint included ("raise --max-pixels")
                    out.failures[p] = result.message + (f" ({result.hint})" if result.hint else "")
                elif result is None or key in pending:
                    out.keys[p] = key
                    out.n_cached += result is None
                else:
                    out.keys[p] = key
                    pending.add(key)
                    batch_keys.append(key)
                    batch_imgs.append(result)
                    if len(batch_imgs) == bs:
                        flush()
                done += 1
                if progress:
                    progress(done, len(paths))
            flush()
        out.seconds = time.perf_counter() - start
        return out

    def features(self, keys: list[str]) -> np.ndarray:
        """(n, 2048) float32 features of cached images, in `keys` order."""
        return self._rows(self.cache, self._memory, keys, FEATURE_DIM)

    def grid_features(self, keys: list[str]) -> np.ndarray:
        """(n, G*G, 2048) float32 feature maps of images extracted with `grid=True`, positions row-major."""
        P = self.grid_size**2
        return self._rows(self.grid_cache, self._grid_memory, keys, P * FEATURE_DIM).reshape(len(keys), P, FEATURE_DIM)

    @staticmethod
    def _rows(cache: "FeatureCache | None", memory: dict[str, np.ndarray], keys: list[str], width: int) -> np.ndarray:
        """Rows from the on-disk cache, or from this run's memory where the cache was not writable."""
        if not keys:
            return np.zeros((0, width), np.float32)
        if not memory:
            return cache.get(keys)
        on_disk = [k for k in keys if k not in memory]
        disk = dict(zip(on_disk, cache.get(on_disk))) if on_disk else {}
        return np.stack([memory[k] if k in memory else disk[k] for k in keys]).astype(np.float32, copy=False)

    def features_view(self, keys: list[str], grid: bool = False) -> FeatureView:
        """Like `features` / `grid_features`, but read lazily from the memory map."""
        if grid:
            return FeatureView(self.grid_features, keys, (self.grid_size**2, FEATURE_DIM))
        return FeatureView(self.features, keys, (FEATURE_DIM,))

    def encode_arrays(self, images: np.ndarray) -> np.ndarray:
        """Features of in-memory uint8 images (n, s, s, 3); no cache involved."""
        bs = self.config.batch_size
        return np.concatenate([self._encode_batch(images[i : i + bs]) for i in range(0, len(images), bs)]) if len(images) else np.zeros((0, FEATURE_DIM), np.float32)

    def _has(self, key: str, grid: bool = False) -> bool:
        pooled = key in self._memory or (self.cache is not None and key in self.cache)
        return pooled and (not grid or key in self._grid_memory or (self.grid_cache is not None and key in self.grid_cache))

    def _store(self, keys: list[str], feats: np.ndarray, grids: np.ndarray | None = None) -> None:
        # Pooled rows already cached stay as they are: a grid request re-encodes them, it does not duplicate them.
        new = [i for i, k in enumerate(keys) if not self._has(k)]
        self._store_rows(self.cache, self._memory, [keys[i] for i in new], feats[new], self.identity["feature_scale"])
        if grids is not None:
            self._store_rows(self.grid_cache, self._grid_memory, keys, grids.reshape(len(keys), -1),
                             self.identity["feature_scale"])

    def forget_features(self) -> None:
        """Drop the features held in memory (those of an encoder without a cache, or a read-only one)."""
        self._memory.clear()
        self._grid_memory.clear()

    @staticmethod
    def _store_rows(cache: FeatureCache | None, memory: dict, keys: list[str], rows: np.ndarray, scale: float) -> None:
        if not keys:
            return
        if cache is not None:
            try:
                cache.add(keys, rows)
                return
            except CacheWriteError as e:
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
        # No cache, or a read-only one (a shared install): keep features for this run only, rounded as the
        # cache rounds them, so a caption does not depend on whether the features went through the disk.
        rounded = np.asarray(np.asarray(rows * scale, dtype=np.float16), dtype=np.float32) / scale
        for k, f in zip(keys, rounded):
            memory[k] = f

    def _encode_batch(self, images: np.ndarray, grid: bool = False):
        """Pooled features (n, 2048), or (pooled, grids (n, G, G, 2048)) with `grid`: one forward pass."""
        import tensorflow as tf

        if self._forward is None:
            model = self.model if self.config.precision == "float32" else _in_bfloat16(self.model, self.config)

            @tf.function(reduce_retracing=True)
            def forward(x):
                x = tf.cast(x, tf.float32) / 127.5 - 1.0  # keras.applications.xception.preprocess_input
                maps = tf.cast(model(x, training=False), tf.float32)
                return tf.reduce_mean(maps, axis=[1, 2]), maps  # Xception's pooling="avg", done here

            self._forward = forward
        n = len(images)
        # Padded to the next power of two (at most the batch size): a few input shapes, so a few traces, and a
        # small batch (a server's, or one photo) costs its own rows rather than a whole batch's.
        size = min(self.config.batch_size, 1 << max(0, n - 1).bit_length())
        if n < size:
            images = np.concatenate([images, np.zeros((size - n, *images.shape[1:]), images.dtype)])
        pooled, maps = self._forward(images)
        return (pooled.numpy()[:n], maps.numpy()[:n]) if grid else pooled.numpy()[:n]


def registered_encoders(packs_dir: Path) -> list[dict]:
    """Identities (`encoder.json`) of the encoders registered in `packs_dir`, by id; nothing is built or loaded."""
    found = []
    for path in sorted((Path(packs_dir) / ENCODERS_DIR).glob(f"*/{ENCODER_FILE}")):
        try:
            identity = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a damaged folder is reported by Encoder.load when it is asked for by id
        if isinstance(identity, dict) and identity.get("format") == ENCODER_FORMAT and identity.get("id") == path.parent.name:
            found.append(identity)
    return found


@dataclass
class EncoderChoice:
    """Which encoder a build without --encoder-weights uses, and the line that says so."""

    weights: str        # for EncoderConfig.weights: as given, a registered encoder's id, or "imagenet" (a download)
    image_size: int     # for EncoderConfig.image_size
    note: str | None    # one line for the user when capkit chose; None when `weights` was given


def choose_encoder(packs_dir: Path, weights: str | None = None, image_size: int | None = None) -> EncoderChoice:
    """The encoder of a build or an extraction: `weights` when given, else the packs dir's one, else ImageNet's.

    With no `weights`: the packs dir's encoder when it holds exactly one (of
    `image_size`, when given); the ImageNet download when it holds none;
    several raise CapkitError naming them, since which is the user's choice.

    ``packs`` holding ``.encoders/xception-299-1a2b3c4d5e6f/`` ->
    ``EncoderChoice("xception-299-1a2b3c4d5e6f", 299, "encoder: xception-299-1a2b3c4d5e6f ...")``
    """
    if weights is not None:
        size = image_size
        if size is None and ENCODER_ID.fullmatch(weights):  # an id: its own size, whatever the default
            size = next((e["image_size"] for e in registered_encoders(packs_dir) if e["id"] == weights), None)
        return EncoderChoice(weights, int(size or DEFAULT_IMAGE_SIZE), None)
    have = [e for e in registered_encoders(packs_dir) if image_size is None or e.get("image_size") == image_size]
    home = Path(packs_dir) / ENCODERS_DIR
    if not have:
        size = image_size or DEFAULT_IMAGE_SIZE
        return EncoderChoice("imagenet", size, f"encoder: none registered in {home}"
                             f"{f' for {size} px' if image_size else ''}; the ImageNet weights (a download)")
    if len(have) > 1:
        listed = ", ".join(f"{e['id']} ({e.get('source')} weights)" for e in have)
        raise CapkitError(f"{home} holds {len(have)} encoders: {listed}",
                          hint="say which with --encoder-weights ID (or imagenet, none or a weights file for a new one)")
    e = have[0]
    weights = "RANDOM weights, for tests and demos only" if e.get("source") == "none" else f"{e.get('source')} weights"
    return EncoderChoice(e["id"], int(e["image_size"]),
                         f"encoder: {e['id']} ({weights}, {e['image_size']} px), the one registered in {home}")


def is_imagenet(identity: dict) -> bool:
    """Whether an encoder identity (a manifest's "encoder" section) is the ImageNet Xception."""
    return identity.get("source") == "imagenet" or identity.get("digest") in IMAGENET_DIGESTS


def register_encoder(packs_dir: Path, expected: dict, weights: str | Path, *, move: bool = False) -> Path:
    """Register in `packs_dir` the encoder `expected` names (a manifest's "encoder" section), from `weights`.

    `weights` is "imagenet", "none" or a .weights.h5 path (moved into place
    with `move`, else copied). Refused, with nothing written, unless the
    weights as loaded have `expected["digest"]`; the folder appears whole or
    not at all. Returns `.encoders/<id>/`.

        register_encoder(packs, manifest["encoder"], "xception.weights.h5") -> packs/.encoders/xception-299-dd8f.../
    """
    import secrets
    import shutil

    from toolkit.pack import atomic_write_text

    config = EncoderConfig(name=expected["name"], image_size=int(expected["image_size"]), weights=str(weights))
    model = _build(config, str(weights))
    identity = _identity(model, config)
    if identity["digest"] != expected["digest"]:
        what = "Keras's ImageNet weights" if weights == "imagenet" else f"the weights in {weights}"
        raise CapkitError(
            f"{what} are not the encoder {expected['id']} the pack was trained with (digest {identity['digest'][:12]}, "
            f"the pack's {expected['digest'][:12]}); not registered",
            hint="give the very weights the pack was built with",
        )
    identity["source"] = expected["source"]  # the pack's own record of where they came from
    root = Path(packs_dir) / ENCODERS_DIR
    home = root / expected["id"]
    if home.exists():
        raise CapkitError(f"{home} exists but holds no usable encoder; not overwritten",
                          hint="move it away and run the same command again")
    staging = root / f".register-{expected['id']}-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True)
        if identity["source"] != "none":  # random init is rebuilt from its seed
            dst = staging / ENCODER_WEIGHTS_FILE
            if weights == "imagenet":
                model.save_weights(dst)
            elif move:
                os.replace(weights, dst)
            else:
                shutil.copyfile(weights, dst)
        atomic_write_text(staging / ENCODER_FILE, json.dumps(identity, indent=2))
        os.rename(staging, home)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise CapkitError(f"{packs_dir}: cannot register the encoder there ({e.strerror or e})",
                              hint=f"{PACKS_DIR_HINT}, with free space") from None
        raise
    return home


def _in_bfloat16(model, config: EncoderConfig):
    """`model`'s weights in an Xception built under mixed_bfloat16: convolutions in bfloat16, float32 variables."""
    import keras

    from toolkit.backend import dtype_policy

    with dtype_policy("mixed_bfloat16"):  # layers take the policy when built
        twin = keras.applications.Xception(include_top=False, weights=None, pooling=None,
                                           input_shape=(config.image_size, config.image_size, 3))
    twin.set_weights(model.get_weights())
    return twin


def _build(config: EncoderConfig, weights: str):
    from toolkit.backend import import_tensorflow

    import_tensorflow()
    import keras

    if config.name != "xception":
        raise CapkitError(f"unknown encoder {config.name!r}", hint="capkit has one encoder: xception")
    shape = (config.image_size, config.image_size, 3)
    if config.image_size < 71:
        raise CapkitError(f"image size {config.image_size} is below Xception's minimum of 71")
    # No pooling in the model: the forward pass averages the feature map itself, so one
    # pass gives both the pooled vector and the grid. Pooling has no weights: the digest,
    # the id and weight files saved by pooled models are unchanged.
    if weights == "imagenet":
        try:
            return keras.applications.Xception(include_top=False, weights="imagenet", input_shape=shape, pooling=None)
        except Exception as e:  # the download is the only thing that fails here: say how to work offline
            raise CapkitError(
                f"cannot download the ImageNet Xception weights ({type(e).__name__}: {str(e)[:200]})",
                hint="on an offline machine, write them to a file (../shared/tools/xception-imagenet-weights OUT) "
                "and pass --encoder-weights OUT",
            ) from None
    if weights == "none":
        keras.utils.set_random_seed(RANDOM_INIT_SEED)
    model = keras.applications.Xception(include_top=False, weights=None, input_shape=shape, pooling=None)
    if weights not in ("none", ""):
        path = Path(weights)
        if not path.is_file():
            raise CapkitError(f"{path}: no such weights file",
                              hint="--encoder-weights takes imagenet, none, a .weights.h5 path or a registered encoder's id")
        try:
            model.load_weights(path)
        except Exception as e:
            raise CapkitError(f"{path}: not Xception (no top) weights ({str(e)[:200]})") from None
    return model


def _digest(model) -> str:
    h = hashlib.sha256()
    for w in model.weights:
        h.update(np.ascontiguousarray(w.numpy(), dtype=np.float32).tobytes())
    return h.hexdigest()


def _identity(model, config: EncoderConfig) -> dict:
    digest = _digest(model)
    source = config.weights if config.weights in ("imagenet", "none") else "file"
    # A power of two that brings a noise image's largest feature near 1: random-init
    # features (~1e-5) would otherwise vanish in float16; exact to undo.
    noise = np.random.default_rng(0).uniform(-1, 1, (1, config.image_size, config.image_size, 3)).astype(np.float32)
    pooled = model(noise, training=False).numpy().mean(axis=(1, 2))  # the scale is the pooled features', as ever
    peak = float(np.abs(pooled).max()) or 1.0
    scale = 2.0 ** -round(math.log2(peak))
    return {
        "format": ENCODER_FORMAT,
        "id": f"{config.name}-{config.image_size}-{digest[:12]}",
        "name": config.name,
        "image_size": config.image_size,
        "source": source,
        "digest": digest,
        "feature_dim": FEATURE_DIM,
        "feature_scale": scale,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
