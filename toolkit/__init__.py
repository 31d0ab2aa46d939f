"""capkit: multilingual image captioning with language packs over one shared encoder.

Nothing heavy is imported here: `capkit --help` must not load TensorFlow.
Stages: data, translate, tokenizer, images, encoder, decoder, generate,
evaluate, pack, share; `pipeline` wires them into build / caption / evaluate.
"""

__version__ = "0.1.0"
