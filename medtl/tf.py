"""The one place that imports TensorFlow, after checking that tf.keras is Keras 2."""
import os
import re
import sys
import tempfile

import medtl  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow loads)

from medtl.errors import MedtlError  # noqa: E402

# TensorFlow 2.17 registers its CUDA plugins twice at import and says so as errors, GPU or not
# (tensorflow/tensorflow#62075). These lines only; every other line TensorFlow prints passes.
_SPURIOUS = re.compile(r"^\S+ \S+: E \S+\] Unable to register (cuFFT|cuDNN|cuBLAS) factory: Attempting to "
                       r"register factory for plugin \S+ when one has already been registered\n?$")


def _import_tensorflow():
    """`import tensorflow`, with its C++ stderr held back and replayed without the spurious lines
    (unless TF_CPP_MIN_LOG_LEVEL=0 asks for everything)."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        import tensorflow

        return tensorflow
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            text = held.read().decode("utf-8", "replace")
            kept = "".join(line for line in text.splitlines(keepends=True) if not _SPURIOUS.match(line))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
    return tensorflow


tf = _import_tensorflow()


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
