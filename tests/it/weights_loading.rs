//! `inception_v3::load` on the shared weights and on files derived from them: a PyTorch state
//! dict written by `tests/fixtures/make_pth.py` (torch's zip format, stdlib Python only) and
//! safetensors files edited here. Variant detection, the classifier, and errors that name the
//! file and the offending tensors instead of panicking.

use crate::common;

use burn::prelude::*;
use common::{Golden, make_pth, max_abs_diff, shared};
use dltool::inception_v3::{self, BlockVariant, LoadError, WeightFormat};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

const WEIGHTS: &str = "weights/inception_v3_tf2015.safetensors";
const GOLDEN: &str = "golden/inception_v3_tf2015/net.safetensors";

fn device() -> Device {
    Device::flex()
}

/// The shared weight file's bytes, read once.
fn shared_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let path = shared(WEIGHTS);
        std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

fn shared_st() -> SafeTensors<'static> {
    SafeTensors::deserialize(shared_bytes()).expect("shared weights parse")
}

fn shared_metadata() -> HashMap<String, String> {
    let (_, meta) = SafeTensors::read_metadata(shared_bytes()).expect("shared header");
    meta.metadata().clone().unwrap_or_default()
}

/// Writes `tensors` as a safetensors file at `path`.
fn write_st(path: &Path, tensors: Vec<(String, TensorView<'_>)>, meta: HashMap<String, String>) {
    let meta = (!meta.is_empty()).then_some(meta);
    safetensors::serialize_to_file(tensors, &meta, path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// The shared tensors less `drop`.
fn shared_without(drop: &str) -> Vec<(String, TensorView<'static>)> {
    let tensors = shared_st().tensors();
    let before = tensors.len();
    let kept: Vec<_> = tensors.into_iter().filter(|(n, _)| n != drop).collect();
    assert_eq!(kept.len() + 1, before, "{drop} is in the shared weights");
    kept
}

fn to_vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec::<f32>().unwrap()
}

/// Golden `input` and `pool`.
fn golden() -> &'static (Vec<usize>, Vec<f32>, Vec<f32>) {
    static GOLD: OnceLock<(Vec<usize>, Vec<f32>, Vec<f32>)> = OnceLock::new();
    GOLD.get_or_init(|| {
        let g = Golden::open(GOLDEN);
        let (shape, input) = g.tensor("input");
        let (pool_shape, pool) = g.tensor("pool");
        assert_eq!(pool_shape, [2, 2048]);
        (shape, input, pool)
    })
}

fn pool_of(model: &inception_v3::InceptionV3) -> Vec<f32> {
    let (shape, input, _) = golden();
    let x = Tensor::<4>::from_data(TensorData::new(input.clone(), shape.clone()), &device());
    let pool = model.forward_stages(x).pool;
    assert_eq!(pool.dims(), [2, 2048]);
    to_vec(pool)
}

/// `pool` of the shared safetensors model on the golden input, computed once.
fn reference_pool() -> &'static [f32] {
    static POOL: OnceLock<Vec<f32>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (model, _) = inception_v3::load(&shared(WEIGHTS), None, &device()).expect("loads");
        pool_of(&model)
    })
}

fn assert_matches_golden(what: &str, pool: &[f32]) {
    let (diff, scale) = max_abs_diff(pool, &golden().2);
    eprintln!("{what}: max |pool - golden| = {diff:e}, max |golden| = {scale}");
    assert!(
        diff <= 1e-4 * scale,
        "{what}: pool differs from the golden pool by {diff} (max |ref| {scale})"
    );
}

/// `load` must fail; its message names `path` and every one of `names`.
fn load_err(path: &Path, variant: Option<BlockVariant>, names: &[&str]) -> LoadError {
    let err = match inception_v3::load(path, variant, &device()) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => e,
    };
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "message does not name the file {}: {msg}",
        path.display()
    );
    for name in names {
        assert!(msg.contains(name), "message does not name {name}: {msg}");
    }
    err
}

#[test]
fn shared_safetensors_loads_as_tf2015_feature_extractor() {
    let (model, loaded) = inception_v3::load(&shared(WEIGHTS), None, &device()).expect("loads");
    assert_eq!(loaded.format, WeightFormat::Safetensors);
    assert_eq!(loaded.config.variant, BlockVariant::Tf2015);
    assert_eq!(loaded.config.num_classes, None);
    assert!(!model.has_classifier());
    assert_eq!(shared_st().len(), 470);
    assert_matches_golden("safetensors", reference_pool());
}

#[test]
fn pytorch_state_dict_with_fc_and_aux_matches_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pt_inception-2015-12-05-6726825d.pth");
    make_pth(&path, &["--add-fc", "1008", "--add-aux"]);

    let (model, loaded) = inception_v3::load(&path, None, &device()).expect("pth loads");
    assert_eq!(loaded.format, WeightFormat::Pytorch);
    assert_eq!(loaded.config.variant, BlockVariant::Tf2015);
    assert_eq!(loaded.config.num_classes, Some(1008));
    assert!(model.has_classifier());

    let pool = pool_of(&model);
    assert_matches_golden("pth", &pool);
    let (diff, _) = max_abs_diff(&pool, reference_pool());
    assert!(diff <= 1e-5, "pth and safetensors pools differ by {diff}");

    let pooled = Tensor::<2>::from_data(TensorData::new(pool, vec![2, 2048]), &device());
    let logits = model.classify(pooled).expect("fc present");
    assert_eq!(logits.dims(), [2, 1008]);
    let logits = to_vec(logits);
    assert!(logits.iter().all(|v| v.is_finite()));
    assert!(
        logits.iter().any(|v| *v != 0.0),
        "fc weights were not loaded"
    );
}

#[test]
fn pytorch_variant_comes_from_fc_rows_or_the_caller() {
    let dir = tempfile::tempdir().unwrap();

    // A neutral name and 1000 classes: torchvision's classifier.
    let fc1000 = dir.path().join("weights.pth");
    make_pth(&fc1000, &["--add-fc", "1000"]);
    let (model, loaded) = inception_v3::load(&fc1000, None, &device()).expect("loads");
    assert_eq!(loaded.format, WeightFormat::Pytorch);
    assert_eq!(loaded.config.variant, BlockVariant::Torchvision);
    assert_eq!(loaded.config.num_classes, Some(1000));
    assert!(model.has_classifier());

    // Nothing to tell by: an error that says what to do, until the caller says.
    let bare_dir = dir.path().join("bare");
    std::fs::create_dir(&bare_dir).unwrap();
    let bare = bare_dir.join("weights.pth");
    make_pth(&bare, &[]);
    let err = load_err(&bare, None, &["--variant"]);
    assert!(matches!(err, LoadError::UnknownVariant { .. }), "{err:?}");

    let (model, loaded) =
        inception_v3::load(&bare, Some(BlockVariant::Tf2015), &device()).expect("loads");
    assert_eq!(loaded.format, WeightFormat::Pytorch);
    assert_eq!(loaded.config.variant, BlockVariant::Tf2015);
    assert_eq!(loaded.config.num_classes, None);
    assert!(!model.has_classifier());
}

#[test]
fn pytorch_missing_tensor_is_named_as_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.pth");
    make_pth(
        &path,
        &[
            "--rename",
            "Mixed_5b.branch1x1.bn.weight=Mixed_5b.branch1x1.bn.scale",
        ],
    );
    let err = load_err(
        &path,
        Some(BlockVariant::Tf2015),
        &["Mixed_5b.branch1x1.bn.weight"],
    );
    assert!(matches!(err, LoadError::Missing { .. }), "{err:?}");
    assert!(!err.to_string().contains("gamma"), "{err}");
}

#[test]
fn missing_conv_weight_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let name = "Mixed_6b.branch7x7_2.conv.weight";
    write_st(&path, shared_without(name), shared_metadata());
    let err = load_err(&path, None, &[name]);
    assert!(matches!(err, LoadError::Missing { .. }), "{err:?}");
}

#[test]
fn missing_batchnorm_weight_is_named_in_torch_terms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let name = "Mixed_5b.branch1x1.bn.weight";
    write_st(&path, shared_without(name), shared_metadata());
    let err = load_err(&path, None, &[name]);
    assert!(matches!(err, LoadError::Missing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(!msg.contains("gamma"), "burn's name leaked: {msg}");
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let extra = vec![0u8; 4 * 32];
    let mut tensors = shared_st().tensors();
    tensors.push((
        "Mixed_5b.foo.weight".to_string(),
        TensorView::new(Dtype::F32, vec![32], &extra).unwrap(),
    ));
    write_st(&path, tensors, shared_metadata());
    let err = load_err(&path, None, &["Mixed_5b.foo.weight"]);
    assert!(matches!(err, LoadError::Unexpected { .. }), "{err:?}");
}

#[test]
fn wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let name = "Conv2d_1a_3x3.conv.weight";
    let tensors: Vec<_> = shared_st()
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            if n == name {
                assert_eq!(v.shape(), [32, 3, 3, 3]);
                let reshaped = TensorView::new(v.dtype(), vec![16, 6, 3, 3], v.data()).unwrap();
                (n, reshaped)
            } else {
                (n, v)
            }
        })
        .collect();
    write_st(&path, tensors, shared_metadata());
    let err = load_err(&path, None, &[name]);
    assert!(matches!(err, LoadError::Mismatch { .. }), "{err:?}");
}

#[test]
fn classifier_that_is_not_a_matrix_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let fc = vec![0u8; 4 * 2048];
    let mut tensors = shared_st().tensors();
    tensors.push((
        "fc.weight".to_string(),
        TensorView::new(Dtype::F32, vec![2048], &fc).unwrap(),
    ));
    write_st(&path, tensors, shared_metadata());
    let err = load_err(&path, None, &["fc.weight", "[2048]"]);
    assert!(matches!(err, LoadError::Mismatch { .. }), "{err:?}");
}

#[test]
fn aux_logits_and_batch_counters_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    let aux = vec![0u8; 4 * 1000 * 768];
    let count = 1000i64.to_le_bytes();
    let mut tensors = shared_st().tensors();
    tensors.push((
        "AuxLogits.fc.weight".to_string(),
        TensorView::new(Dtype::F32, vec![1000, 768], &aux).unwrap(),
    ));
    tensors.push((
        "Conv2d_1a_3x3.bn.num_batches_tracked".to_string(),
        TensorView::new(Dtype::I64, vec![], &count).unwrap(),
    ));
    write_st(&path, tensors, shared_metadata());
    let (model, loaded) = inception_v3::load(&path, None, &device()).expect("loads");
    assert_eq!(loaded.config.variant, BlockVariant::Tf2015);
    assert_eq!(loaded.config.num_classes, None);
    assert!(!model.has_classifier());
}

#[test]
fn metadata_variant_selects_the_blocks() {
    let dir = tempfile::tempdir().unwrap();

    let mut meta = shared_metadata();
    assert_eq!(meta.get("variant").map(String::as_str), Some("tf2015_fid"));
    meta.insert("variant".to_string(), "torchvision".to_string());
    let tv = dir.path().join("weights.safetensors");
    write_st(&tv, shared_st().tensors(), meta.clone());
    let (model, loaded) = inception_v3::load(&tv, None, &device()).expect("loads");
    assert_eq!(loaded.config.variant, BlockVariant::Torchvision);
    let pool = pool_of(&model);
    let (diff, scale) = max_abs_diff(&pool, reference_pool());
    eprintln!("torchvision vs tf2015 blocks: max |pool diff| = {diff:e}, max |pool| = {scale}");
    assert!(
        diff > 1e-2 * scale,
        "torchvision blocks gave the tf2015 pool (diff {diff})"
    );

    // No metadata variant, no telling name, no fc.
    meta.remove("variant");
    let anon = dir.path().join("x.safetensors");
    write_st(&anon, shared_st().tensors(), meta);
    let err = load_err(&anon, None, &["--variant"]);
    assert!(matches!(err, LoadError::UnknownVariant { .. }), "{err:?}");
}

#[test]
fn damaged_files_are_errors_that_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = shared_bytes();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    // Header intact, tensor data cut short.
    let cut = dir.path().join("inception_v3_tf2015.safetensors");
    std::fs::write(&cut, &bytes[..header_end + (bytes.len() - header_end) / 2]).unwrap();
    load_err(&cut, None, &[]);

    // Cut inside the header.
    let cut_header = dir.path().join("header.safetensors");
    std::fs::write(&cut_header, &bytes[..header_end / 2]).unwrap();
    load_err(&cut_header, Some(BlockVariant::Tf2015), &[]);

    let text = dir.path().join("weights.pth");
    std::fs::write(&text, "these are not the weights you are looking for\n").unwrap();
    load_err(&text, Some(BlockVariant::Tf2015), &[]);

    let empty = dir.path().join("empty.safetensors");
    std::fs::write(&empty, b"").unwrap();
    load_err(&empty, Some(BlockVariant::Tf2015), &[]);

    let missing = dir.path().join("does-not-exist.safetensors");
    load_err(&missing, Some(BlockVariant::Tf2015), &[]);
}

#[test]
fn truncated_pytorch_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let full = dir.path().join("full.pth");
    make_pth(&full, &[]);
    let bytes = std::fs::read(&full).unwrap();
    let cut = dir.path().join("cut.pth");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    load_err(&cut, Some(BlockVariant::Tf2015), &[]);
}
