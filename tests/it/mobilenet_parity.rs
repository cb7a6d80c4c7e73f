//! The burn port of MobileNet v1 against TensorFlow.js running the same TF.js export, and the
//! loader's errors for broken exports.

use crate::common;

use burn::prelude::*;
use common::{Golden, max_abs_diff, shared};
use dltool::mobilenet_v1;
use std::path::Path;

const MODEL: &str = "weights/mobilenet_v1_0.25_224/model.json";
/// ImageNet index of `daisy` (n11939491), the first golden image's true class.
const DAISY: usize = 985;

fn to_vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("f32 tensor")
}

#[test]
fn pool_and_probs_match_tensorflow_js() {
    let device = common::test_device();
    let (model, config) = mobilenet_v1::load(&shared(MODEL), &device).expect("shared model loads");
    assert_eq!(config.alpha, 0.25);
    assert_eq!(config.input_size, 224);
    assert_eq!(config.num_classes, Some(1000));
    assert_eq!(config.feature_dim, 256);
    assert_eq!(config.bn_eps, 1e-3);
    let pre = config.preprocess();
    assert_eq!((pre.width, pre.height), (224, 224));
    assert_eq!((pre.mean, pre.std), ([127.5; 3], [127.5; 3]));

    let golden = Golden::open("golden/mobilenet_v1_0.25_224/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let x = Tensor::<4>::from_data(TensorData::new(input, shape), &device);
    let pool = model.forward_features(x);
    assert_eq!(pool.dims(), [2, 256]);
    let probs = model
        .classify(pool.clone())
        .expect("the export has conv_preds");
    assert_eq!(probs.dims(), [2, 1000]);

    let probs = to_vec(probs);
    for (name, got) in [("pool", to_vec(pool)), ("probs", probs.clone())] {
        let (_, want) = golden.tensor(name);
        let (diff, scale) = max_abs_diff(&got, &want);
        eprintln!("{name}: max |diff| = {diff:e}, max |ref| = {scale:e}");
        // The issue asks for 1e-4 relative to the largest reference value.
        assert!(
            diff <= 1e-4 * scale,
            "{name}: max |diff| {diff:e} > 1e-4 * {scale:e}"
        );
    }
    let argmax = probs[..1000]
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i);
    assert_eq!(argmax, Some(DAISY), "image 0 is a daisy");
}

/// A writable copy of the shared export: model.json and every shard.
fn copy_model(dir: &Path) -> std::path::PathBuf {
    let src = shared(MODEL);
    let src_dir = src.parent().unwrap();
    for entry in std::fs::read_dir(src_dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir.join("model.json")
}

fn load_error(model_json: &Path) -> String {
    match mobilenet_v1::load(model_json, &Device::flex()) {
        Ok(_) => panic!("a broken export loaded"),
        Err(e) => {
            eprintln!("{e}");
            e.to_string()
        }
    }
}

#[test]
fn a_missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let json = copy_model(dir.path());
    let shard = dir.path().join("mobilenet_group29-shard1of1");
    std::fs::remove_file(&shard).unwrap();
    let err = load_error(&json);
    assert!(err.contains("mobilenet_group29-shard1of1"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[test]
fn a_truncated_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let json = copy_model(dir.path());
    let shard = dir.path().join("mobilenet_group37-shard1of1");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 4]).unwrap();
    let err = load_error(&json);
    assert!(err.contains("mobilenet_group37-shard1of1"), "{err}");
    assert!(err.contains("too short"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[test]
fn a_missing_or_misshaped_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let json = copy_model(dir.path());
    let text = std::fs::read_to_string(&json).unwrap();
    // Renaming a manifest entry leaves the bytes in place but the tensor unfindable.
    std::fs::write(
        &json,
        text.replace("\"conv_pw_13_bn/gamma\"", "\"renamed/gamma\""),
    )
    .unwrap();
    let err = load_error(&json);
    assert!(
        err.contains("missing tensor(s): conv_pw_13_bn/gamma"),
        "{err}"
    );

    // Same byte count, wrong layout: [1, 1, 256, 256] declared as [1, 1, 128, 512].
    let misshaped = text.replace(
        "\"shape\": [1, 1, 256, 256], \"name\": \"conv_pw_13/kernel\"",
        "\"shape\": [1, 1, 128, 512], \"name\": \"conv_pw_13/kernel\"",
    );
    assert_ne!(misshaped, text, "the manifest entry was found");
    std::fs::write(&json, misshaped).unwrap();
    let err = load_error(&json);
    assert!(
        err.contains("conv_pw_13/kernel") && err.contains("[1, 1, 128, 512]"),
        "{err}"
    );
}
