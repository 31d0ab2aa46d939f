"""capkit: multilingual image captioning with language packs over one shared encoder.

Nothing heavy is imported here: `capkit --help` must not load TensorFlow.
Stages: data, translate, tokenizer, images, encoder, decoder, generate,
evaluate, pack, share. Jobs: `build` (build_pack, as its stages), `captioner`
(Captioner, caption_images), `score` (evaluate_packs), `report`.
"""

__version__ = "0.1.0"
