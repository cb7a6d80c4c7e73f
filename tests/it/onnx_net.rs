//! The ONNX runtime path (src/onnx_net.rs, tract) against references computed elsewhere:
//! EfficientNet-Lite0's ONNX export against the PyTorch golden (../shared), and small ViT /
//! ConvNeXt graphs against ONNX Runtime's outputs (tests/fixtures/onnx, made by
//! tools/onnx_fixtures.py).

use crate::common;

use common::{Golden, max_abs_diff, shared};
use dltool::backbone::Pool;
use dltool::onnx_net::{Layout, Limits, OnnxError, OnnxNet, OnnxOptions};
use std::path::PathBuf;
use std::time::Duration;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(name)
}

/// A fixture's safetensors (input and ONNX Runtime's outputs), read in place.
fn fixture_tensors(name: &str) -> Golden {
    Golden::read(&fixture(name))
}

/// NHWC images back to CHW, which is what OnnxNet takes whatever the model's layout.
fn hwc_to_chw(x: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
    let plane = h * w;
    let mut out = vec![0f32; x.len()];
    for i in 0..n {
        for p in 0..plane {
            for c in 0..3 {
                out[i * 3 * plane + c * plane + p] = x[i * 3 * plane + p * 3 + c];
            }
        }
    }
    out
}

fn assert_close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    let (diff, scale) = max_abs_diff(got, want);
    eprintln!("{what}: max |diff| {diff:.3e}, max |ref| {scale:.3}");
    assert!(
        diff <= rel * scale.max(1.0),
        "{what}: max |diff| {diff} over {rel} x {scale}"
    );
}

#[test]
fn efficientnet_lite0_onnx_matches_the_pytorch_golden() {
    let model = shared("models/efficientnet_lite0_pool.onnx");
    let net = OnnxNet::load(&model, &OnnxOptions::default()).unwrap();
    assert_eq!(net.input.layout, Layout::Nchw);
    assert_eq!((net.height, net.width), (224, 224));
    assert_eq!(net.node, "pool");
    assert_eq!(net.output_shape, vec![1280]);

    let golden = Golden::open("golden/efficientnet_lite0/net.safetensors");
    let (shape, input) = golden.tensor("input");
    assert_eq!(shape, vec![2, 3, 224, 224]);
    let (_, pool) = golden.tensor("pool");
    let got = net.features(&input, 2, Pool::Avg).unwrap();
    let (diff, scale) = max_abs_diff(&got, &pool);
    eprintln!("lite0 pool: max |diff| {diff:.3e}, max |ref| {scale:.3}");
    assert!(
        diff <= 1e-4 * scale,
        "max |diff| {diff} over 1e-4 x {scale}"
    );

    // One image at a time gives the same rows as the batch of two.
    let one = net.features(&input[..3 * 224 * 224], 1, Pool::Avg).unwrap();
    assert_close(&one, &got[..1280], 1e-5, "lite0 batch of one");
}

#[test]
fn efficientnet_lite0_intermediate_node_is_pooled_like_a_built_in_layer() {
    let model = shared("models/efficientnet_lite0_pool.onnx");
    let golden = Golden::open("golden/efficientnet_lite0/net.safetensors");
    let (_, input) = golden.tensor("input");
    // The head activation (after the head conv + BN + ReLU6) is the last 4-D map; its
    // average pool is `pool` and its max pool is at least that.
    let head = find_head_node(&model);
    let opts = |pool_layer: &str| OnnxOptions {
        layer: Some(pool_layer.to_string()),
        ..OnnxOptions::default()
    };
    let net = OnnxNet::load(&model, &opts(&head)).unwrap();
    assert_eq!(net.output_shape, vec![1280, 7, 7]);
    let (_, want_head) = golden.tensor("head");
    let raw = net.features(&input, 2, Pool::None).unwrap();
    assert_close(&raw, &want_head, 1e-4, "lite0 head map");
    let avg = net.features(&input, 2, Pool::Avg).unwrap();
    let (_, pool) = golden.tensor("pool");
    assert_close(&avg, &pool, 1e-4, "lite0 head map, averaged");
    let max = net.features(&input, 2, Pool::Max).unwrap();
    assert!(max.iter().zip(&avg).all(|(m, a)| m >= a));
    assert_eq!(net.feature_dim(Pool::None), 1280 * 49);
    assert_eq!(net.feature_dim(Pool::Max), 1280);
}

/// The tensor feeding the final ReduceMean: the head's ReLU6 (Clip) output.
fn find_head_node(model: &std::path::Path) -> String {
    let m = dltool::onnx_net::OnnxModel::open(model, &Limits::default()).unwrap();
    let nodes = m.nodes(None).unwrap();
    nodes
        .iter()
        .rev()
        .find(|n| n.op == "Clip" && n.shape.as_deref() == Some(&[1280, 7, 7][..]))
        .map(|n| n.node.clone())
        .expect("a Clip node of 1280x7x7")
}

#[test]
fn vit_block_matches_onnx_runtime() {
    let t = fixture_tensors("vit_block.safetensors");
    let (shape, input) = t.tensor("input");
    assert_eq!(shape, vec![2, 3, 32, 32]);
    let net = OnnxNet::load(&fixture("vit_block.onnx"), &OnnxOptions::default()).unwrap();
    assert_eq!(net.node, "embedding");
    let (_, want) = t.tensor("embedding");
    let got = net.features(&input, 2, Pool::Avg).unwrap();
    assert_close(&got, &want, 1e-4, "vit embedding");

    // The token sequence as a second output, by tensor name: raw, and averaged over tokens.
    let tokens = OnnxNet::load(
        &fixture("vit_block.onnx"),
        &OnnxOptions {
            layer: Some("tokens".into()),
            ..OnnxOptions::default()
        },
    )
    .unwrap();
    assert_eq!(tokens.output_shape, vec![17, 32]);
    let (_, want_tokens) = t.tensor("tokens");
    let raw = tokens.features(&input, 2, Pool::None).unwrap();
    assert_close(&raw, &want_tokens, 1e-4, "vit tokens");
    let mean = tokens.features(&input, 2, Pool::Avg).unwrap();
    let want_mean: Vec<f32> = want_tokens
        .chunks_exact(17 * 32)
        .flat_map(|img| {
            (0..32)
                .map(|d| (0..17).map(|t| img[t * 32 + d]).sum::<f32>() / 17.0)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_close(&mean, &want_mean, 1e-5, "vit tokens, averaged over tokens");

    // A node name reads the node's first output: the residual Add that writes `tokens`.
    let by_node = OnnxNet::load(
        &fixture("vit_block.onnx"),
        &OnnxOptions {
            layer: Some("residual2".into()),
            ..OnnxOptions::default()
        },
    )
    .unwrap();
    assert_eq!(by_node.node, "tokens");
}

#[test]
fn convnext_block_in_nhwc_matches_onnx_runtime() {
    let t = fixture_tensors("convnext_block.safetensors");
    let (shape, input) = t.tensor("input");
    assert_eq!(shape, vec![2, 32, 32, 3]);
    let net = OnnxNet::load(&fixture("convnext_block.onnx"), &OnnxOptions::default()).unwrap();
    assert_eq!(net.input.layout, Layout::Nhwc);
    let (_, want) = t.tensor("pool");
    let chw = hwc_to_chw(&input, 2, 32, 32);
    let got = net.features(&chw, 2, Pool::Avg).unwrap();
    assert_close(&got, &want, 1e-4, "convnext pool");
}

#[test]
fn symbolic_height_and_width_take_size() {
    let t = fixture_tensors("symbolic_hw.safetensors");
    let (shape, input) = t.tensor("input");
    assert_eq!(shape, vec![2, 3, 40, 40]);
    let err = OnnxNet::load(&fixture("symbolic_hw.onnx"), &OnnxOptions::default()).unwrap_err();
    assert!(matches!(err, OnnxError::Unresolved { .. }), "{err}");
    assert!(err.to_string().contains("--size"), "{err}");

    let opts = |layer: Option<&str>| OnnxOptions {
        size: Some(40),
        layer: layer.map(str::to_string),
        ..OnnxOptions::default()
    };
    let net = OnnxNet::load(&fixture("symbolic_hw.onnx"), &opts(None)).unwrap();
    assert_eq!(net.node, "pool");
    let (_, want) = t.tensor("pool");
    assert_close(
        &net.features(&input, 2, Pool::Avg).unwrap(),
        &want,
        1e-4,
        "symbolic pool",
    );

    let map = OnnxNet::load(&fixture("symbolic_hw.onnx"), &opts(Some("features"))).unwrap();
    assert_eq!(map.output_shape, vec![16, 20, 20]);
    let (_, want_map) = t.tensor("features");
    assert_close(
        &map.features(&input, 2, Pool::None).unwrap(),
        &want_map,
        1e-4,
        "symbolic feature map",
    );
    // The map's average pool is the graph's own GlobalAveragePool output.
    assert_close(
        &map.features(&input, 2, Pool::Avg).unwrap(),
        &want,
        1e-4,
        "symbolic feature map, averaged",
    );
}

#[test]
fn optimisation_time_limit_is_enforced() {
    let model = shared("models/efficientnet_lite0_pool.onnx");
    let opts = OnnxOptions {
        limits: Limits {
            optimize_timeout: Duration::from_millis(1),
            ..Limits::default()
        },
        ..OnnxOptions::default()
    };
    let err = OnnxNet::load(&model, &opts).unwrap_err();
    assert!(matches!(err, OnnxError::OptimizeTimeout { .. }), "{err}");
    assert!(err.to_string().contains("--max-optimize-secs"), "{err}");
}
