"""Export small Keras models with tf2onnx into tests/data/tf2onnx/ (committed; the tests only read them).

tensorflow and tf2onnx are not test dependencies (hundreds of MB): run this script in a separate environment,

    python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu tf2onnx
    /tmp/tfvenv/bin/python tools/export_tf2onnx.py

Each model is NHWC as Keras writes it (tf2onnx inserts Transposes around the convolutions), with BatchNormalization
layers that have non-trivial statistics, and every Keras activation spelling we recognise.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
import tf2onnx

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "tf2onnx"
OPSET = 17


def _randomize_bn(model: tf.keras.Model, rng: np.random.Generator) -> None:
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.uniform(-0.2, 0.2, beta.shape),
                               rng.uniform(-0.2, 0.2, mean.shape), rng.uniform(0.5, 1.5, var.shape)])


def cnn() -> tf.keras.Model:
    """Conv-BN-ReLU, depthwise-BN-ReLU6, 1x1 conv-BN (residual), hard-swish, GAP, Dense-GELU-Dense."""
    L = tf.keras.layers
    x = L.Input((12, 12, 3), name="x")
    h = L.ReLU()(L.BatchNormalization()(L.Conv2D(8, 3, padding="same", use_bias=False)(x)))
    b = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", use_bias=False)(h)))
    b = L.BatchNormalization()(L.Conv2D(8, 1, use_bias=False)(b))
    h = L.Add()([h, b])
    h = L.Activation("hard_swish" if hasattr(tf.keras.activations, "hard_swish") else "swish")(L.Conv2D(12, 1)(h))
    h = L.GlobalAveragePooling2D()(h)
    h = L.Lambda(lambda t: tf.nn.gelu(t, approximate=True))(L.Dense(16)(h))  # exact gelu exports as Erfc
    y = L.Dense(5, name="y")(h)
    return tf.keras.Model(x, y)


def mlp() -> tf.keras.Model:
    """Dense chains with relu, swish (SiLU), leaky relu, sigmoid-free hard sigmoid, and an activation-free pair."""
    L = tf.keras.layers
    x = L.Input((20,), name="x")
    h = L.Dense(32, activation="relu")(x)
    h = L.Dense(32, activation="swish")(h)
    h = L.LeakyReLU(0.1)(L.Dense(24)(h))
    h = L.Dense(16)(L.Dense(24)(h))  # two linear layers in a row: one Gemm after fusion
    y = L.Dense(4, name="y")(L.Activation("hard_sigmoid")(h))
    return tf.keras.Model(x, y)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    tf.random.set_seed(0)
    for name, build in (("keras_cnn", cnn), ("keras_mlp", mlp)):
        model = build()
        _randomize_bn(model, rng)
        spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="x")]
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=OPSET)
        (OUT / f"{name}.onnx").write_bytes(proto.SerializeToString())
        print(f"{name}: {len(proto.graph.node)} nodes, ops {sorted({n.op_type for n in proto.graph.node})}")


if __name__ == "__main__":
    main()
