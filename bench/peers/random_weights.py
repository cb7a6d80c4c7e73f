#!/usr/bin/env python3
"""A full-size state dict with random values and the real names and shapes of resnet50, vgg16,
vgg19 or xception (timm's legacy_xception), for timing `dltool bench --backbone NET --weights
FILE` where the real weights are not at hand: the speed does not depend on the values.

Names and shapes come from the lists the tests use (tests/fixtures/classic/full_size_names.json,
tests/fixtures/xception/full_size_names.json); the values are scaled as tests/common/mod.rs's
`write_random` scales them, to keep activations finite: conv/linear weights uniform with variance
1/fan_in, BatchNorm scales around 1, variances 1-1.5, means and biases +-0.1.

Usage: bench/.venv/bin/python bench/peers/random_weights.py NET [OUT]
  [default OUT: bench/.cache/weights/NET-random.safetensors; never commit it]
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
LISTS = {
    "resnet50": ("tests/fixtures/classic/full_size_names.json", "resnet50"),
    "vgg16": ("tests/fixtures/classic/full_size_names.json", "vgg16"),
    "vgg19": ("tests/fixtures/classic/full_size_names.json", "vgg19"),
    "xception": ("tests/fixtures/xception/full_size_names.json", "legacy_xception"),
}


def main():
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in LISTS:
        sys.exit(f"usage: random_weights.py {{{','.join(LISTS)}}} [OUT]")
    net = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) == 3 else os.path.join(
        ROOT, "bench", ".cache", "weights", f"{net}-random.safetensors"
    )
    list_file, key = LISTS[net]
    with open(os.path.join(ROOT, list_file)) as f:
        names = json.load(f)[key]
    rng = np.random.default_rng(42)
    state = {}
    for name, shape, dtype in names:
        if dtype == "int64":
            state[name] = np.zeros(shape, dtype=np.int64)
            continue
        u = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        fan_in = max(int(np.prod(shape[1:])), 1) if len(shape) > 1 else 1
        if name.endswith("running_var"):
            v = 1.0 + 0.5 * np.abs(u)
        elif name.endswith("running_mean") or name.endswith("bias"):
            v = 0.1 * u
        elif len(shape) == 1:
            v = 1.0 + 0.2 * u
        else:
            v = u * np.float32(np.sqrt(3.0 / fan_in))
        state[name] = np.ascontiguousarray(v, dtype=np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(state, out)
    print(out)


if __name__ == "__main__":
    main()
