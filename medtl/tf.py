"""The one place that imports TensorFlow, after checking that tf.keras is Keras 2."""
import medtl  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

import tensorflow as tf  # noqa: E402

from medtl.errors import MedtlError  # noqa: E402


def _check_keras() -> None:
    module = tf.keras.__name__  # "tf_keras.api._v2.keras" for Keras 2
    if not module.startswith("tf_keras"):
        raise MedtlError(
            f"tf.keras is Keras 3 ({module}); medtl needs tf-keras 2.17. TensorFlow was "
            "imported before medtl could set TF_USE_LEGACY_KERAS=1: import medtl first, "
            "or export TF_USE_LEGACY_KERAS=1, and check that tf-keras==2.17.0 is installed."
        )


_check_keras()

__all__ = ["tf"]
