#!/usr/bin/env python3
"""ONNX Runtime peer of `dltool featurize`: torch_peer.py's module for --network exported to ONNX
once (cached by network, input size and the weights' SHA-256), or the --weights MODEL.onnx file
itself, then run on the CPU provider with intra_op_num_threads = --threads, inter_op 1,
sequential execution, every graph optimisation and no spin-waiting.

torch is imported only when the cached model is missing, so a timed run's memory is
ONNX Runtime's alone.
"""

import hashlib
import os
import sys
import warnings

import numpy as np
import onnxruntime as ort

import common

OPSET = 17


def cache_dir():
    """$BENCH_ONNX_CACHE, else onnx-cache/ inside the venv running this script."""
    return os.environ.get("BENCH_ONNX_CACHE") or os.path.join(sys.prefix, "onnx-cache")


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def exported_model(network, weights):
    # An ONNX model (`dltool bench --weights MODEL.onnx`) runs as it is.
    if weights.endswith(".onnx"):
        return weights
    w, h = common.PRE["size"]
    path = os.path.join(cache_dir(), f"{network}-{w}x{h}-{sha256(weights)[:16]}-opset{OPSET}.onnx")
    if os.path.isfile(path):
        return path
    import torch

    import torch_peer

    os.makedirs(os.path.dirname(path), exist_ok=True)
    model = torch_peer.build_model(network, weights)
    tmp = f"{path}.tmp-{os.getpid()}"
    # The TorchScript exporter: it needs no package beyond torch and onnx (the torch.export
    # one wants onnxscript too); it warns that it is the legacy path, which is known.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, h, w),),
            tmp,
            input_names=["input"],
            output_names=["pool"],
            dynamic_axes={"input": {0: "batch"}, "pool": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    os.replace(tmp, path)
    print(f"exported {path}", file=sys.stderr)
    return path


def main():
    args = common.parse_args(__doc__.splitlines()[0])
    model = exported_model(args.network, args.weights)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle pool threads wait instead of spinning, as torch_peer's OpenMP threads do: on a
    # machine shared with other work, spinning threads take the cores the working ones need.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    # An NHWC model ([N, H, W, 3]) gets the CHW batches transposed, as dltool does.
    nhwc = len(session.get_inputs()[0].shape) == 4 and session.get_inputs()[0].shape[3] == 3
    output = session.get_outputs()[0].name

    def forward(x):
        if nhwc:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return session.run([output], {name: x})[0]

    common.main("onnxruntime", ort.__version__, args, forward)


if __name__ == "__main__":
    main()
