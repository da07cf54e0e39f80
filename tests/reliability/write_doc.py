"""Write docs/reliability.md from the summary the reliability suite left (see conftest.py).

    python tests/reliability/write_doc.py SUMMARY.md docs/reliability.md
"""
import datetime
import sys

HEADER = """# Reliability and security checks

`make reliability` runs `tests/reliability/` (also part of `make test`): each check drives the real
`medtl` CLI on tiny synthetic data on CPU, injects a fault or a bad input, and asserts what must
hold afterwards. This page is rewritten from the suite's summary table by `make reliability`.

Last run: {date}.

"""


# Kept under the table at every rewrite: why the NaN checks once failed on Intel Xeons (issue 15).
NOTES = """

## NaN checks and the CPU's kernels

Checks 9a and 9b once failed on an Intel Xeon (AVX512_VNNI, AVX512_BF16, AMX: Sapphire Rapids or newer)
and passed on AMD EPYC. The cause, measured on the Xeon:

- TensorFlow 2.17 turns its oneDNN ops on by default on x86 CPUs with AVX512_VNNI, AVX512_BF16
  or AMX, and off on CPUs without them (the EPYCs the earlier runs came from). `medtl env`
  prints the CPU and this state; `TF_ENABLE_ONEDNN_OPTS=0` or `=1` overrides it.
- With oneDNN on, the graph optimiser (Grappler's remapper) fuses Conv2D or DepthwiseConv2D
  with an inference-mode BatchNorm (or a bias) and a ReLU into one oneDNN kernel, whose ReLU
  is max(x, 0): it returns 0 for NaN. Eager execution and Eigen's kernels return NaN.
  A NaN image through such a block in a `tf.function`: NaN fraction of the output 0.0 with
  oneDNN on; 1.0 with `TF_ENABLE_ONEDNN_OPTS=0`, with Grappler's remapping off, or eagerly.
- medtl freezes BatchNorm, so its bases run exactly that form. MobileNetV3Small's first
  depthwise block turned an all-NaN batch into finite features: loss and gradients of the
  head were finite, no step was skipped (`skipped_steps_total` 0) and a persistent NaN input
  trained to the end. The injected batch itself was float32 and all NaN.
- XLA was off in these runs (`train.jit_compile: false`); the stall watchdog and Horovod's
  allreduce were not involved.

The fix is in the guard, not the test: the train step now counts a step as finite only when
its inputs, its loss and its gradients all are, and it averages that flag across ranks with
the gradients, so every rank skips the same step. It no longer assumes that NaN propagates
through the network on any CPU. `tests/test_nonfinite.py` holds a frozen Conv-BN-ReLU model
to that on whatever CPU runs it (it failed on the Xeon before the fix), and the summary
above names the CPU it ran on.
"""


def main(summary: str, out: str) -> None:
    table = open(summary, encoding="utf-8").read()
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(HEADER.format(date=datetime.date.today().isoformat()) + table.rstrip("\n") + "\n" + NOTES)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
