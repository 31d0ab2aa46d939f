"""Importing TensorFlow without the noise.

The TensorFlow wheel probes for CUDA at import and at first device use and
writes several lines to stderr on every machine without a GPU, before its
own log level applies. Users of a CLI should see their results, not that:
stderr is pointed at /dev/null during those two moments only, and
TensorFlow's C++ log is limited to fatal messages (TF_CPP_MIN_LOG_LEVEL=3
unless set), since its first training step logs a harmless fallback as an
error, and its Python logger to errors (it warns of tf.function retracing).
Set CAPKIT_TF_VERBOSE=1 to see everything.

Where TF_CONFIG describes a cluster, the eager context is left for later:
MultiWorkerMirroredStrategy must configure it before it exists
(`toolkit.train.distribution_strategy("multiworker")`).
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


def import_tensorflow():
    """`import tensorflow` with the start-up chatter silenced; returns the module."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if os.environ.get("CAPKIT_TF_VERBOSE") == "1":
        import tensorflow as tf

        return tf
    # 3, not 2: the first training step logs "oneDNN supports DT_BOOL only on platforms with AVX-512" as an
    # error (E...), though nothing failed. TensorFlow's real errors still arrive as Python exceptions.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
        import tensorflow as tf

        # Its Python logger too: "triggered tf.function retracing" (a self-critical epoch's new weights) is advice
        # for TensorFlow's developers, not for capkit's users.
        tf.get_logger().setLevel("ERROR")
        tf.config.list_physical_devices()
        if not os.environ.get("TF_CONFIG"):  # a multi-worker strategy must set up the context itself
            tf.constant(0)  # creates the eager context, which probes CUDA a second time
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf


@contextmanager
def dtype_policy(name: str):
    """Keras layers built inside compute in policy `name` ("float32", "mixed_bfloat16", ...); restored after."""
    import keras

    saved = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(saved)
