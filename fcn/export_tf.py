"""fcn.export's TensorFlow side: the SavedModel and TFLite artifacts through jax2tf. TensorFlow is imported
only when they are written."""

from __future__ import annotations

import contextlib
from pathlib import Path

from fcn.exported import SAVED_MODEL, TFLITE


def input_shape(size: tuple[int, int] | None) -> str:
    """The images' shape for jax.export and jax2tf: a symbolic batch, and H, W symbolic too unless `size`."""
    return "b, h, w, 3" if size is None else f"b, {size[0]}, {size[1]}, 3"


INSTALL_TF = "pip install tensorflow-cpu (in fcn's checkout: pip install '.[tfds]')"  # fcn is not on PyPI


def tensorflow_available() -> bool:
    """Whether tensorflow is installed, without importing it (seconds): a command that stops at a bad
    --workdir should not have paid for it."""
    import importlib.util

    return importlib.util.find_spec("tensorflow") is not None


@contextlib.contextmanager
def _stablehlo_tf_reads():
    """Inside, jax serializes StableHLO in a version the installed TensorFlow reads. jax.export targets
    consumers up to 4 weeks older than jax (StableHLO 1.18.0 with jax 0.11.2), TF's XlaCallModule reads its
    own (1.13.7 in TF 2.21, the newest): a SavedModel from jax 0.11 was written, then refused by TF when
    run ("unregistered operation 'vhlo.custom_call_v2'"). Neither offers a setting; jax's hook is patched
    for the export only, and left alone where either lacks the names (older or newer versions)."""
    try:
        from jax._src.lib.mlir.dialects import hlo
        from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_hlo

        jax_version, tf_version = hlo.get_version_from_compatibility_requirement, tf_hlo.get_current_version()
        older = tf_hlo.get_smaller_version
    except (ImportError, AttributeError):
        yield
        return
    hlo.get_version_from_compatibility_requirement = lambda requirement: older(jax_version(requirement), tf_version)
    try:
        yield
    finally:
        hlo.get_version_from_compatibility_requirement = jax_version


def export_tf(fn, out: Path, platforms, saved_model: bool, tflite_size, size) -> list[str]:
    """SavedModel (any size, or `size`) and/or TFLite (fixed size) through jax2tf; TF imported here only."""
    import tensorflow as tf

    with _stablehlo_tf_reads():
        return _export_tf_in(tf, fn, out, platforms, saved_model, tflite_size, size)


def _export_tf_in(tf, fn, out: Path, platforms, saved_model: bool, tflite_size, size) -> list[str]:
    from jax.experimental import jax2tf

    written = []
    if saved_model:
        tf_fn = jax2tf.convert(
            fn,
            polymorphic_shapes=[f"({input_shape(size)})"],
            with_gradient=False,
            native_serialization_platforms=platforms,
        )
        module = tf.Module()
        images = tf.TensorSpec([None, *(size or (None, None)), 3], tf.float32, name="images")
        module.serve = tf.function(lambda x: {"logits": tf_fn(x)}, input_signature=[images], autograph=False)
        tf.saved_model.save(module, str(out / SAVED_MODEL), signatures={"serving_default": module.serve})
        written.append(SAVED_MODEL)
    if tflite_size:
        h, w = tflite_size
        # TFLite cannot run the dynamic gathers of a symbolic size: convert for one fixed size, on CPU.
        tf_fn = jax2tf.convert(fn, with_gradient=False, native_serialization_platforms=("cpu",))
        module = tf.Module()
        module.serve = tf.function(
            tf_fn, input_signature=[tf.TensorSpec([1, h, w, 3], tf.float32, name="images")], autograph=False
        )
        converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
        (out / TFLITE).write_bytes(converter.convert())
        written.append(TFLITE)
    return written
