"""Writes the code-on-load fixtures of tests/test_safety.py with the real
libraries (tf_keras, Keras 3, TensorFlow); run as a script with the output
folder as argument. The committed copies next to this file were made by it;
``test_code_on_load_fixtures_regenerate`` (slow) makes them again and checks
that ckptconv judges the fresh ones alike."""
from __future__ import annotations

import os
import sys


def main(out: str) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras as keras3
    import tensorflow as tf
    import tf_keras

    os.makedirs(out, exist_ok=True)
    for keras, ext in ((tf_keras, ".h5"), (keras3, ".keras")):
        inp = keras.Input((3,))
        keras.Model(inp, keras.layers.Lambda(lambda x: x * 2)(inp)).save(f"{out}/lambda{ext}")
        inp = keras.Input((3,))
        keras.Model(inp, keras.layers.Dense(2)(inp)).save(f"{out}/dense{ext}")

    class PyFunc(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def f(self, x):
            return tf.py_function(lambda a: a * 2, [x], tf.float32)

    class Plain(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable([1.0, 2.0])

        @tf.function(input_signature=[tf.TensorSpec([2], tf.float32)])
        def f(self, x):
            return x * self.w

    tf.saved_model.save(PyFunc(), f"{out}/savedmodel_pyfunc")
    tf.saved_model.save(Plain(), f"{out}/savedmodel_plain")


if __name__ == "__main__":
    main(sys.argv[1])
