#!/usr/bin/env python3
"""Small ONNX graphs with random weights, and ONNX Runtime's outputs on them, for the tests of
`src/onnx_net.rs` (tests/it/onnx_net.rs, tests/it/onnx_cli.rs): the ops of a vision transformer and of
a ConvNeXt block that the shared EfficientNet-Lite0 graph (Conv, Clip, Pad, ReduceMean) does not
exercise, plus the malformed models the bad-input tests need.

Setup (no torch):
    python3 -m venv /work/venvs/onnx
    /work/venvs/onnx/bin/pip install onnx==1.23.2 onnxruntime==1.31.1 numpy==2.4.6 protobuf==7.36.2
Run from the repository root:
    /work/venvs/onnx/bin/python tools/onnx_fixtures.py

Writes tests/fixtures/onnx/ (all committed, about 300 KB):
  vit_block.onnx        NCHW [N,3,32,32] -> patch Conv 8x8/8 -> Reshape, Transpose, Concat of a
                        class token (Expand to the batch from Shape), position embedding, one
                        pre-norm transformer block (LayerNormalization, MatMul, 2-head attention
                        with Softmax, Gelu written with Erf), final LayerNormalization, the class
                        token (Gather) -> `embedding` [N,32]; `tokens` [N,17,32] is also a graph
                        output (after the block, before the final norm). Opset 17.
  convnext_block.onnx   NHWC [N,32,32,3] -> Transpose, stem Conv 4x4/4, one ConvNeXt block
                        (depthwise Conv 7x7, channels-last LayerNormalization, MatMul, the Gelu
                        op, MatMul, layer scale, residual), GlobalAveragePool, Flatten ->
                        `pool` [N,32]. Opset 20 (Gelu is an opset-20 op). Its input is NHWC, as
                        a Keras/TF export's is.
  symbolic_hw.onnx      NCHW [N,3,H,W] with symbolic H and W: Conv 3x3/2, Relu, Conv, then
                        `features` [N,16,H',W'] (a 4-D map dltool pools) and `pool` [N,16]
                        (GlobalAveragePool, Flatten).
  *.safetensors         for each model above: `input` (batch 2, float32, the layout the model
                        takes) and ONNX Runtime's output for every graph output, under the
                        output's name; symbolic_hw's at 40x40 (`--size 40`).
  bad_op.onnx           a valid graph with a CenterCropPad node (opset 18), which tract does not
                        implement.
  bad_grey.onnx         input [N,1,32,32]: one channel, not an RGB image tensor.
  bad_batch_flat.onnx   output Reshape'd to [-1]: its size changes with the batch.

Every tensor is float32 with the seed fixed, so running the script again rewrites the same
files. ONNX Runtime's CPU provider runs with all graph optimisations off, so its numbers are
the plain float32 evaluation of each op.
"""

import json
import os
import struct

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OUT = os.path.join("tests", "fixtures", "onnx")
RNG = np.random.default_rng(20261201)


def rand(*shape, scale=0.2):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def save_model(graph, opset, name):
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="dltool tools/onnx_fixtures.py",
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = os.path.join(OUT, name)
    onnx.save(model, path)
    return path


def run_ort(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outs = session.run(names, {session.get_inputs()[0].name: x})
    return dict(zip(names, outs))


def write_safetensors(path, tensors, metadata):
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data),
    written here so the script needs no package beyond onnx and onnxruntime."""
    header = {"__metadata__": metadata}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype="<f4").tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def fixture(model_name, x, opset):
    path = os.path.join(OUT, model_name)
    outs = run_ort(path, x)
    tensors = {"input": x, **outs}
    meta = {
        "model": model_name,
        "outputs": ",".join(outs),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "opset": str(opset),
    }
    write_safetensors(path.replace(".onnx", ".safetensors"), tensors, meta)
    for k, v in outs.items():
        print(f"{model_name}: {k} {list(v.shape)} max|.|={np.abs(v).max():.3f}")


def gelu_erf(prefix, x, nodes, inits):
    """x * 0.5 * (1 + erf(x / sqrt(2))): how torch.onnx writes nn.GELU before opset 20."""
    inits += [
        init(f"{prefix}_sqrt2", np.float32(np.sqrt(2.0))),
        init(f"{prefix}_one", np.float32(1.0)),
        init(f"{prefix}_half", np.float32(0.5)),
    ]
    nodes += [
        helper.make_node("Div", [x, f"{prefix}_sqrt2"], [f"{prefix}_d"], name=f"{prefix}_div"),
        helper.make_node("Erf", [f"{prefix}_d"], [f"{prefix}_e"], name=f"{prefix}_erf"),
        helper.make_node("Add", [f"{prefix}_e", f"{prefix}_one"], [f"{prefix}_a"], name=f"{prefix}_add"),
        helper.make_node("Mul", [x, f"{prefix}_a"], [f"{prefix}_m"], name=f"{prefix}_mul"),
        helper.make_node("Mul", [f"{prefix}_m", f"{prefix}_half"], [f"{prefix}_out"], name=f"{prefix}_scale"),
    ]
    return f"{prefix}_out"


def layer_norm(prefix, x, dim, nodes, inits, axis=-1):
    inits += [
        init(f"{prefix}_g", 1.0 + rand(dim, scale=0.1)),
        init(f"{prefix}_b", rand(dim, scale=0.1)),
    ]
    nodes.append(
        helper.make_node(
            "LayerNormalization",
            [x, f"{prefix}_g", f"{prefix}_b"],
            [f"{prefix}_out"],
            name=prefix,
            axis=axis,
            epsilon=1e-6,
        )
    )
    return f"{prefix}_out"


def vit_block():
    d, heads, patch, size = 32, 2, 8, 32
    hd = d // heads
    t = (size // patch) ** 2 + 1
    nodes, inits = [], []
    inits += [
        init("patch_w", rand(d, 3, patch, patch, scale=0.05)),
        init("patch_b", rand(d, scale=0.05)),
        init("cls_token", rand(1, 1, d)),
        init("pos_embed", rand(1, t, d)),
        i64("flat_shape", [0, d, -1]),
        i64("one_d", [1, d]),
        i64("qkv_shape", [0, 0, 3, heads, hd]),
        i64("merge_shape", [0, 0, d]),
        i64("batch_slice_start", [0]),
        i64("batch_slice_end", [1]),
        init("qkv_w", rand(d, 3 * d)),
        init("qkv_b", rand(3 * d, scale=0.05)),
        init("proj_w", rand(d, d)),
        init("proj_b", rand(d, scale=0.05)),
        init("fc1_w", rand(d, 4 * d)),
        init("fc1_b", rand(4 * d, scale=0.05)),
        init("fc2_w", rand(4 * d, d)),
        init("fc2_b", rand(d, scale=0.05)),
        init("attn_scale", np.float32(1.0 / np.sqrt(hd))),
        i64("cls_index", 0),
    ]
    nodes += [
        helper.make_node("Conv", ["input", "patch_w", "patch_b"], ["patches"], name="patch_embed",
                         kernel_shape=[patch, patch], strides=[patch, patch]),
        helper.make_node("Reshape", ["patches", "flat_shape"], ["patches_flat"], name="flatten_patches"),
        helper.make_node("Transpose", ["patches_flat"], ["patch_tokens"], name="to_tokens", perm=[0, 2, 1]),
        # The class token is expanded to the batch, whose size only the input knows.
        helper.make_node("Shape", ["input"], ["in_shape"], name="input_shape"),
        helper.make_node("Slice", ["in_shape", "batch_slice_start", "batch_slice_end"], ["batch"], name="batch_dim"),
        helper.make_node("Concat", ["batch", "one_d"], ["cls_shape"], name="cls_shape", axis=0),
        helper.make_node("Expand", ["cls_token", "cls_shape"], ["cls"], name="expand_cls"),
        helper.make_node("Concat", ["cls", "patch_tokens"], ["tokens0"], name="concat_cls", axis=1),
        helper.make_node("Add", ["tokens0", "pos_embed"], ["x0"], name="add_pos"),
    ]
    h = layer_norm("ln1", "x0", d, nodes, inits)
    nodes += [
        helper.make_node("MatMul", [h, "qkv_w"], ["qkv_mm"], name="qkv"),
        helper.make_node("Add", ["qkv_mm", "qkv_b"], ["qkv_out"], name="qkv_bias"),
        helper.make_node("Reshape", ["qkv_out", "qkv_shape"], ["qkv5"], name="split_heads"),
        # [N, T, 3, H, hd] -> [3, N, H, T, hd]
        helper.make_node("Transpose", ["qkv5"], ["qkv_t"], name="heads_first", perm=[2, 0, 3, 1, 4]),
        helper.make_node("Split", ["qkv_t"], ["q3", "k3", "v3"], name="split_qkv", axis=0),
        helper.make_node("Squeeze", ["q3", "axis0"], ["q"], name="squeeze_q"),
        helper.make_node("Squeeze", ["k3", "axis0"], ["k"], name="squeeze_k"),
        helper.make_node("Squeeze", ["v3", "axis0"], ["v"], name="squeeze_v"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_transpose", perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["scores_raw"], name="qk"),
        helper.make_node("Mul", ["scores_raw", "attn_scale"], ["scores"], name="scale"),
        helper.make_node("Softmax", ["scores"], ["attn"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["attn", "v"], ["ctx"], name="attn_v"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="merge_transpose", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx_m"], name="merge_heads"),
        helper.make_node("MatMul", ["ctx_m", "proj_w"], ["proj_mm"], name="proj"),
        helper.make_node("Add", ["proj_mm", "proj_b"], ["proj_out"], name="proj_bias"),
        helper.make_node("Add", ["x0", "proj_out"], ["x1"], name="residual1"),
    ]
    inits.append(i64("axis0", [0]))
    h2 = layer_norm("ln2", "x1", d, nodes, inits)
    nodes += [
        helper.make_node("MatMul", [h2, "fc1_w"], ["fc1_mm"], name="fc1"),
        helper.make_node("Add", ["fc1_mm", "fc1_b"], ["fc1_out"], name="fc1_bias"),
    ]
    g = gelu_erf("gelu", "fc1_out", nodes, inits)
    nodes += [
        helper.make_node("MatMul", [g, "fc2_w"], ["fc2_mm"], name="fc2"),
        helper.make_node("Add", ["fc2_mm", "fc2_b"], ["fc2_out"], name="fc2_bias"),
        helper.make_node("Add", ["x1", "fc2_out"], ["tokens"], name="residual2"),
    ]
    hn = layer_norm("final_norm", "tokens", d, nodes, inits)
    nodes.append(helper.make_node("Gather", [hn, "cls_index"], ["embedding"], name="cls_pick", axis=1))
    graph = helper.make_graph(
        nodes,
        "vit_block",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", d]),
            helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["N", t, d]),
        ],
        inits,
    )
    save_model(graph, 17, "vit_block.onnx")
    fixture("vit_block.onnx", rand(2, 3, size, size, scale=1.0), 17)


def convnext_block():
    d, size = 32, 32
    nodes, inits = [], []
    inits += [
        init("stem_w", rand(d, 3, 4, 4, scale=0.1)),
        init("stem_b", rand(d, scale=0.05)),
        init("dw_w", rand(d, 1, 7, 7, scale=0.1)),
        init("dw_b", rand(d, scale=0.05)),
        init("pw1_w", rand(d, 4 * d)),
        init("pw1_b", rand(4 * d, scale=0.05)),
        init("pw2_w", rand(4 * d, d)),
        init("pw2_b", rand(d, scale=0.05)),
        init("gamma", rand(d, scale=0.5)),
    ]
    nodes += [
        helper.make_node("Transpose", ["input"], ["nchw"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "stem_w", "stem_b"], ["stem"], name="stem",
                         kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Conv", ["stem", "dw_w", "dw_b"], ["dw"], name="dwconv",
                         kernel_shape=[7, 7], pads=[3, 3, 3, 3], group=d),
        helper.make_node("Transpose", ["dw"], ["dw_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
    ]
    h = layer_norm("block_norm", "dw_nhwc", d, nodes, inits)
    nodes += [
        helper.make_node("MatMul", [h, "pw1_w"], ["pw1_mm"], name="pwconv1"),
        helper.make_node("Add", ["pw1_mm", "pw1_b"], ["pw1_out"], name="pwconv1_bias"),
        helper.make_node("Gelu", ["pw1_out"], ["act"], name="gelu"),
        helper.make_node("MatMul", ["act", "pw2_w"], ["pw2_mm"], name="pwconv2"),
        helper.make_node("Add", ["pw2_mm", "pw2_b"], ["pw2_out"], name="pwconv2_bias"),
        helper.make_node("Mul", ["pw2_out", "gamma"], ["scaled"], name="layer_scale"),
        helper.make_node("Transpose", ["scaled"], ["branch"], name="back_to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Add", ["stem", "branch"], ["block_out"], name="residual"),
        helper.make_node("GlobalAveragePool", ["block_out"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["pool"], name="flatten", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "convnext_block",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["N", d])],
        inits,
    )
    save_model(graph, 20, "convnext_block.onnx")
    fixture("convnext_block.onnx", rand(2, size, size, 3, scale=1.0), 20)


def symbolic_hw():
    nodes, inits = [], []
    inits += [
        init("c1_w", rand(8, 3, 3, 3)),
        init("c1_b", rand(8, scale=0.05)),
        init("c2_w", rand(16, 8, 3, 3)),
        init("c2_b", rand(16, scale=0.05)),
    ]
    nodes += [
        helper.make_node("Conv", ["input", "c1_w", "c1_b"], ["c1"], name="conv1",
                         kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["features"], name="conv2",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["features"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["pool"], name="flatten", axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "symbolic_hw",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [
            helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 16, "H2", "W2"]),
        ],
        inits,
    )
    save_model(graph, 17, "symbolic_hw.onnx")
    fixture("symbolic_hw.onnx", rand(2, 3, 40, 40, scale=1.0), 17)


def bad_models():
    # CenterCropPad: a real ONNX op (opset 18) that tract has no implementation of.
    graph = helper.make_graph(
        [
            helper.make_node("CenterCropPad", ["input", "crop"], ["cropped"], name="crop_center", axes=[2, 3]),
            helper.make_node("GlobalAveragePool", ["cropped"], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["pool"], name="flatten", axis=1),
        ],
        "bad_op",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["N", 3])],
        [i64("crop", [24, 24])],
    )
    save_model(graph, 18, "bad_op.onnx")

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["gap"], name="gap"),
            helper.make_node("Flatten", ["gap"], ["pool"], name="flatten", axis=1),
        ],
        "bad_grey",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 32, 32])],
        [helper.make_tensor_value_info("pool", TensorProto.FLOAT, ["N", 1])],
        [],
    )
    save_model(graph, 17, "bad_grey.onnx")

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["input"], ["gap"], name="gap"),
            helper.make_node("Reshape", ["gap", "minus_one"], ["flat"], name="flatten_all"),
        ],
        "bad_batch_flat",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["M"])],
        [i64("minus_one", [-1])],
    )
    save_model(graph, 17, "bad_batch_flat.onnx")


def main():
    os.makedirs(OUT, exist_ok=True)
    vit_block()
    convnext_block()
    symbolic_hw()
    bad_models()
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"{OUT}: {total} bytes in {len(os.listdir(OUT))} files")


if __name__ == "__main__":
    main()
