//! EfficientNet-Lite's loader on files that are not what the caller asked for, on changed
//! tensors, and on half-precision copies of the real weights.

use crate::common;

use common::{Golden, shared};
use dltool::backbones::efficientnet_lite::{EfficientNetLite, LITE0, LiteLayer};
use std::path::Path;

const LITE0_PTH: &str = "weights/efficientnet_lite0/efficientnet-lite0-57934424.pth";
const LITE2_PTH: &str = "weights/efficientnet_lite2/efficientnet-lite2-9656183e.pth";

fn load_err(path: &Path, expected: Option<&str>) -> String {
    match EfficientNetLite::load(path, expected) {
        Ok(_) => panic!("{} loaded as {expected:?}", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_wrong_network_is_named() {
    let err = load_err(&shared(LITE2_PTH), Some("efficientnet_lite0"));
    assert!(
        err.contains("expected efficientnet_lite0 weights, but the file holds efficientnet_lite2"),
        "{err}"
    );
    let inception = shared("weights/inception_v3_tf2015.safetensors");
    let err = load_err(&inception, None);
    assert!(err.contains("the file holds InceptionV3 weights"), "{err}");
    assert!(err.starts_with(&inception.display().to_string()), "{err}");
}

/// The real tensors, as (name, dtype, shape, little-endian bytes), written to safetensors with
/// `change` applied to each.
fn rewrite(
    out: &Path,
    change: impl Fn(&str, &[usize], Vec<f32>) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>,
) {
    rewrite_with(out, change, &[]);
}

/// [`rewrite`], plus extra f32 tensors of the given names and lengths.
fn rewrite_with(
    out: &Path,
    change: impl Fn(&str, &[usize], Vec<f32>) -> Option<(safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    extra: &[(&str, usize)],
) {
    use burn::store::{ModuleStore, PytorchStore};
    let mut store = PytorchStore::from_file(shared(LITE0_PTH));
    let mut tensors = Vec::new();
    for (name, t) in store.get_all_tensors().unwrap() {
        if t.dtype != burn::tensor::DType::F32 {
            continue;
        }
        let values: Vec<f32> = t
            .to_bytes()
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(changed) = change(name, &t.shape.to_vec(), values) {
            tensors.push((name.clone(), changed));
        }
    }
    for (name, len) in extra {
        tensors.push((
            name.to_string(),
            (
                safetensors::Dtype::F32,
                vec![*len],
                f32_bytes(&vec![0.5; *len]),
            ),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let bytes = safetensors::tensor::serialize(views, &None).unwrap();
    std::fs::write(out, bytes).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn a_changed_or_missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("w.safetensors");
    // Block 3's depthwise filters as 3x3 instead of 5x5.
    rewrite(&p, |name, shape, v| {
        let mut shape = shape.to_vec();
        let mut v = v;
        if name == "_blocks.3._depthwise_conv.weight" {
            shape[2] = 3;
            shape[3] = 3;
            v.truncate(shape.iter().product());
        }
        Some((safetensors::Dtype::F32, shape, f32_bytes(&v)))
    });
    let err = load_err(&p, None);
    assert!(
        err.contains(
            "tensor _blocks.3._depthwise_conv.weight: shape [144, 1, 3, 3], expected [144, 1, 5, 5]"
        ),
        "{err}"
    );
    rewrite(&p, |name, shape, v| {
        (name != "_blocks.5._bn1.running_var")
            .then(|| (safetensors::Dtype::F32, shape.to_vec(), f32_bytes(&v)))
    });
    let err = load_err(&p, None);
    assert!(
        err.contains("tensor _blocks.5._bn1.running_var: missing"),
        "{err}"
    );
    let same = |_: &str, shape: &[usize], v: Vec<f32>| {
        Some((safetensors::Dtype::F32, shape.to_vec(), f32_bytes(&v)))
    };
    rewrite_with(&p, same, &[("_head_extra.weight", 4)]);
    let err = load_err(&p, None);
    assert!(
        err.contains(
            "unexpected tensor(s) that are not part of efficientnet_lite0: _head_extra.weight"
        ),
        "{err}"
    );
    rewrite_with(&p, same, &[("_blocks.0._se_reduce.weight", 4)]);
    let err = load_err(&p, None);
    assert!(err.contains("squeeze-and-excitation"), "{err}");
    rewrite(&p, same);
    assert!(
        EfficientNetLite::load(&p, None).is_ok(),
        "the unchanged copy loads"
    );
}

#[test]
fn half_precision_copies_load_as_f32() {
    let net32 = EfficientNetLite::load(&shared(LITE0_PTH), None).unwrap();
    let golden = Golden::open("golden/efficientnet_lite0/net.safetensors");
    let (_, input) = golden.tensor("input");
    let want = net32.forward_act(&input, 2, LiteLayer::Head).global_avg();
    let dir = tempfile::tempdir().unwrap();
    for dtype in [safetensors::Dtype::F16, safetensors::Dtype::BF16] {
        let p = dir.path().join(format!("{dtype:?}.safetensors"));
        rewrite(&p, |_, shape, v| {
            let bytes = match dtype {
                safetensors::Dtype::F16 => v
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect(),
                _ => v
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                    .collect(),
            };
            Some((dtype, shape.to_vec(), bytes))
        });
        let net = EfficientNetLite::load(&p, Some("efficientnet_lite0"))
            .unwrap_or_else(|e| panic!("{dtype:?}: {e}"));
        assert_eq!(net.spec, &LITE0);
        let got = net.forward_act(&input, 2, LiteLayer::Head).global_avg();
        // Rounded weights give close, not equal, features.
        for i in 0..2 {
            let (a, b) = (
                &got[i * 1280..(i + 1) * 1280],
                &want[i * 1280..(i + 1) * 1280],
            );
            let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x * *y) as f64).sum();
            let na: f64 = a.iter().map(|x| (*x * *x) as f64).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| (*x * *x) as f64).sum::<f64>().sqrt();
            let cos = dot / (na * nb);
            eprintln!("{dtype:?} image {i}: cosine to f32 features {cos:.5}");
            assert!(cos > 0.98, "{dtype:?} image {i}: cosine {cos}");
            assert!(a != b, "{dtype:?}: the rounded weights were used");
        }
    }
}
