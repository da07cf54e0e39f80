"""medtl: distributed transfer-learning trainer for multi-label medical images.

Importing medtl selects Keras 2 (tf-keras) before TensorFlow loads: Keras 3
breaks Horovod (see docs/stack.md). Code in medtl uses `tf.keras` only.
"""
import os

__version__ = "0.1.0"

# Must happen before anything imports TensorFlow. setdefault would let a user's
# TF_USE_LEGACY_KERAS=0 through, which we know breaks Horovod, so force it.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
# TensorFlow's own errors show (level 2 hides its INFO and WARNING lines); export TF_CPP_MIN_LOG_LEVEL=0 to
# see all. medtl/tf.py drops the three spurious CUDA-plugin errors that TensorFlow prints at import.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
