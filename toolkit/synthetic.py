"""A small captioned dataset made on the spot, for the offline demo and the tests.

Each image is a coloured shape on a plain background; its five captions say
so in English and Chinese, written by the generator itself, so no dataset,
download or translation service is needed. Layout mirrors Flickr8k: an
`Images/` folder, `captions.<lang>.txt` in the token layout, and split files.

    make_dataset(Path("demo"), n_images=240)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = {  # name -> (rgb, Chinese)
    "red": ((220, 30, 30), "红色"),
    "green": ((30, 170, 60), "绿色"),
    "blue": ((40, 70, 220), "蓝色"),
    "yellow": ((240, 210, 40), "黄色"),
}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
BACKGROUNDS = {"white": ((250, 250, 250), "白色"), "black": ((15, 15, 15), "黑色")}

_EN = [
    "a {c} {s} on a {b} background",
    "a {c} {s} in front of a {b} background",
    "the {s} is {c} and the background is {b}",
    "a {b} picture with a {c} {s}",
    "one {c} {s} on {b}",
]
_ZH = [
    "{b}背景上的一个{c}{s}",
    "一个{c}的{s}在{b}背景前面",
    "{s}是{c}的，背景是{b}的",
    "一张有{c}{s}的{b}图片",
    "{b}上的{c}{s}",
]


def _draw(shape: str, colour, background, size: int, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    noise = rng.normal(0, 6, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float64) + noise, 0, 255).astype(np.uint8))


def make_dataset(root: Path, n_images: int = 240, image_size: int = 96, seed: int = 0,
                 dev_fraction: float = 0.125, test_fraction: float = 0.125) -> dict[str, Path]:
    """Write images, English and Chinese captions and train/dev/test splits under `root`.

    Returns the paths: images, captions_en, captions_zh, train, dev, test.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    images = root / "Images"
    images.mkdir(parents=True, exist_ok=True)
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    en_lines, zh_lines, names = [], [], []
    for i in range(n_images):
        c, s, b = combos[i % len(combos)] if i < len(combos) else combos[rng.integers(len(combos))]
        name = f"synthetic_{i:05d}.png"
        _draw(s, COLOURS[c][0], BACKGROUNDS[b][0], image_size, rng).save(images / name)
        names.append(name)
        for k, (en, zh) in enumerate(zip(_EN, _ZH)):
            en_lines.append(f"{name}#{k}\t{en.format(c=c, s=s, b=b)}")
            zh_lines.append(f"{name}#{k}\t{zh.format(c=COLOURS[c][1], s=SHAPES[s], b=BACKGROUNDS[b][1])}")
    order = rng.permutation(n_images)
    n_dev, n_test = int(n_images * dev_fraction), int(n_images * test_fraction)
    split = {"dev": order[:n_dev], "test": order[n_dev : n_dev + n_test], "train": order[n_dev + n_test :]}
    out = {"images": images}
    for lang, lines in (("en", en_lines), ("zh", zh_lines)):
        out[f"captions_{lang}"] = root / f"captions.{lang}.txt"
        out[f"captions_{lang}"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    for k, idx in split.items():
        out[k] = root / f"{k}Images.txt"
        out[k].write_text("".join(names[i] + "\n" for i in sorted(idx)))
    return out
