//! Weight files as they come from elsewhere: half-precision and f64 checkpoints, non-finite
//! values, files of another network, wrong names and shapes, absurd TF.js input sizes. Each bad
//! file is generated here from the shared weights; the messages must name the file and speak
//! its language (its tensor names, plain shapes).

use crate::common;

use burn::prelude::*;
use common::{Golden, dltool, fails_with, max_abs_diff, shared};
use dltool::backbones;
use dltool::inception_fast::FastInceptionV3;
use dltool::inception_v3;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const WEIGHTS: &str = "weights/inception_v3_tf2015.safetensors";
const MOBILENET: &str = "weights/mobilenet_v1_0.25_224";

fn shared_bytes() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| std::fs::read(shared(WEIGHTS)).unwrap())
}

/// Name, dtype, shape and bytes of every shared tensor, in the file's order.
type Owned = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn shared_tensors() -> Owned {
    let st = SafeTensors::deserialize(shared_bytes()).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect()
}

fn write(path: &Path, tensors: &Owned) {
    let (_, meta) = SafeTensors::read_metadata(shared_bytes()).unwrap();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, meta.metadata(), path).unwrap();
}

fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The shared tensors with those `pick` selects converted to `dtype` (F16, BF16 or F64).
fn converted(dtype: Dtype, pick: impl Fn(usize) -> bool) -> Owned {
    shared_tensors()
        .into_iter()
        .enumerate()
        .map(|(i, (n, d, s, b))| {
            if d != Dtype::F32 || !pick(i) {
                return (n, d, s, b);
            }
            let bytes: Vec<u8> = match dtype {
                Dtype::F16 => f32s(&b)
                    .flat_map(|v| half::f16::from_f32(v).to_le_bytes())
                    .collect(),
                Dtype::BF16 => f32s(&b)
                    .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                    .collect(),
                Dtype::F64 => f32s(&b).flat_map(|v| f64::from(v).to_le_bytes()).collect(),
                other => panic!("no conversion to {other:?}"),
            };
            (n, dtype, s, bytes)
        })
        .collect()
}

/// `make_pth.py IN OUT`: the same tensors as a torch zip state dict.
fn to_pth(input: &Path, out: &Path) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_pth.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = std::process::Command::new(&python)
        .arg(&script)
        .arg(input)
        .arg(out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(status.success(), "make_pth.py failed: {status}");
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Pooled features of the golden input on the CPU engine and on burn, and the golden pool.
fn pools(path: &Path) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let device = Device::flex();
    let (model, _) = inception_v3::load(path, None, &device)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", path.display()));
    let golden = Golden::open("golden/inception_v3_tf2015/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let (_, reference) = golden.tensor("pool");
    let fast = FastInceptionV3::from_model(&model).forward_stages(&input, shape[0]);
    let x = Tensor::<4>::from_data(TensorData::new(input, shape), &device);
    let burn = model
        .forward_stages(x)
        .pool
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    (fast.pool, burn, reference)
}

fn assert_near_golden(what: &str, path: &Path, min_cosine: f64) {
    let (fast, burn, reference) = pools(path);
    for (engine, ours) in [("cpu engine", &fast), ("burn", &burn)] {
        for (row, (a, b)) in ours.chunks(2048).zip(reference.chunks(2048)).enumerate() {
            let c = cosine(a, b);
            eprintln!("{what} on {engine}, image {row}: cosine {c:.6}");
            assert!(
                c >= min_cosine,
                "{what} on {engine}, image {row}: cosine {c}"
            );
        }
    }
}

#[test]
fn half_precision_and_f64_checkpoints_load_as_f32_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let f16 = dir.path().join("f16.safetensors");
    write(&f16, &converted(Dtype::F16, |_| true));
    // f16 keeps 11 significant bits: features move a little, their direction hardly.
    assert_near_golden("f16 safetensors", &f16, 0.999);

    let f16_pth = dir.path().join("pt_inception-2015-12-05-f16.pth");
    to_pth(&f16, &f16_pth);
    assert_near_golden("f16 .pth", &f16_pth, 0.999);

    let bf16 = dir.path().join("bf16.safetensors");
    write(&bf16, &converted(Dtype::BF16, |_| true));
    assert_near_golden("bf16 safetensors", &bf16, 0.99);

    // f64 holds every f32 exactly: the same features as the f32 file. A third of the tensors
    // keeps the file small; the loader meets both dtypes in one file.
    let f64 = dir.path().join("f64.safetensors");
    write(&f64, &converted(Dtype::F64, |i| i % 3 == 0));
    let (fast, burn, reference) = pools(&f64);
    for ours in [&fast, &burn] {
        let (diff, scale) = max_abs_diff(ours, &reference);
        assert!(
            diff <= 1e-4 * scale,
            "f64: max |diff| {diff}, max |ref| {scale}"
        );
    }
}

fn load_error(path: &Path) -> String {
    match inception_v3::load(path, None, &Device::flex()) {
        Ok(_) => panic!("{} loaded but should not have", path.display()),
        Err(e) => {
            let msg = e.to_string();
            eprintln!("{msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
            msg
        }
    }
}

#[test]
fn non_finite_weights_are_refused_with_the_tensor_name() {
    let dir = tempfile::tempdir().unwrap();
    for (name, value, what) in [
        ("Mixed_6b.branch1x1.conv.weight", f32::NAN, "NaN"),
        ("Conv2d_1a_3x3.bn.running_var", f32::INFINITY, "infinity"),
    ] {
        let mut tensors = shared_tensors();
        let t = tensors.iter_mut().find(|t| t.0 == name).unwrap();
        t.3[4..8].copy_from_slice(&value.to_le_bytes());
        let path = dir.path().join("bad.safetensors");
        write(&path, &tensors);
        let msg = load_error(&path);
        assert!(msg.contains(name) && msg.contains(what), "{msg}");
    }

    // MobileNet: a NaN in the first shard (conv1/kernel's first value).
    let copy = dir.path().join("mobilenet");
    std::fs::create_dir(&copy).unwrap();
    for entry in std::fs::read_dir(shared(MOBILENET)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
    }
    let shard = copy.join("mobilenet_group1-shard1of1");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&shard, bytes).unwrap();
    let err = match dltool::mobilenet_v1::load(&copy.join("model.json"), &Device::flex()) {
        Ok(_) => panic!("a NaN weight loaded"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("conv1/kernel") && err.contains("NaN"), "{err}");
}

#[test]
fn wrong_names_are_listed_briefly_and_wrong_shapes_in_the_files_words() {
    let dir = tempfile::tempdir().unwrap();
    // A DataParallel checkpoint: every name behind `module.`.
    let renamed: Owned = shared_tensors()
        .into_iter()
        .map(|(n, d, s, b)| (format!("module.{n}"), d, s, b))
        .collect();
    let st = dir.path().join("renamed.safetensors");
    write(&st, &renamed);
    // pytorch-fid's file name says the variant, so the loader gets as far as the names.
    let pth = dir.path().join("pt_inception-2015-12-05-renamed.pth");
    to_pth(&st, &pth);
    let msg = load_error(&pth);
    assert!(
        msg.contains("missing tensor(s)") && msg.contains("in all)"),
        "{msg}"
    );
    assert!(msg.len() < 600, "{} characters: {msg}", msg.len());

    let mut tensors = shared_tensors();
    let t = tensors
        .iter_mut()
        .find(|t| t.0 == "Conv2d_1a_3x3.bn.bias")
        .unwrap();
    assert_eq!(t.2, [32]);
    t.2 = vec![31];
    t.3.truncate(31 * 4);
    let path = dir.path().join("misshaped.safetensors");
    write(&path, &tensors);
    let msg = load_error(&path);
    assert!(
        msg.contains("Conv2d_1a_3x3.bn.bias has shape [31], expected [32]"),
        "{msg}"
    );
    assert!(!msg.contains("beta") && !msg.contains("Shape {"), "{msg}");
}

#[test]
fn weights_of_another_network_are_named_for_what_they_hold() {
    let mobilenet = shared(MOBILENET);
    let image = common::flowers("daisy", 1).remove(0);
    let err = fails_with(
        dltool()
            .args(["featurize", "--backbone", "inception_v3", "--weights"])
            .arg(&mobilenet)
            .arg(&image),
        "this file holds MobileNet v1 weights (conv1/kernel, ",
    );
    assert!(err.contains("not InceptionV3"), "{err}");

    let err = fails_with(
        dltool()
            .args(["featurize", "--backbone", "mobilenet_v1", "--weights"])
            .arg(shared(WEIGHTS))
            .arg(&image),
        "this file holds InceptionV3 weights (",
    );
    assert!(err.contains("not MobileNet v1"), "{err}");

    // Recognised from the contents, whatever the file is called.
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("checkpoint.bin");
    common::make_pth(&pth, &[]);
    assert_eq!(
        backbones::of_weights(&pth).map(|s| s.name),
        Some("inception_v3")
    );
    for path in [mobilenet.join("model.json"), mobilenet.clone()] {
        assert_eq!(
            backbones::of_weights(&path).map(|s| s.name),
            Some("mobilenet_v1"),
            "{}",
            path.display()
        );
    }
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not weights at all").unwrap();
    assert!(backbones::of_weights(&junk).is_none());
}

#[test]
fn an_unknown_layer_lists_the_valid_ones() {
    let image = common::flowers("daisy", 1).remove(0);
    fails_with(
        dltool()
            .args(["featurize", "--layer", "mixed_9z"])
            .arg(&image),
        "--layer mixed_9z: InceptionV3 has no such layer (it has mixed_5d, mixed_6e, mixed_7a, mixed_7c)",
    );
}

/// A copy of the shared MobileNet's model.json declaring `shape` as its input, its shards
/// still the shared ones (absolute paths).
fn mobilenet_with_input(dir: &Path, shape: &str) -> PathBuf {
    let src = shared(MOBILENET);
    let text = std::fs::read_to_string(src.join("model.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for group in json["weightsManifest"].as_array_mut().unwrap() {
        for p in group["paths"].as_array_mut().unwrap() {
            *p = serde_json::Value::String(src.join(p.as_str().unwrap()).display().to_string());
        }
    }
    let text = serde_json::to_string(&json)
        .unwrap()
        .replace("\"batch_input_shape\":[null,224,224,3]", shape);
    assert!(text.contains(shape), "the input layer was not rewritten");
    let path = dir.join("model.json");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn absurd_tfjs_input_sizes_are_errors_not_crashes() {
    let image = common::flowers("daisy", 1).remove(0);
    for (shape, needle) in [
        (
            "\"batch_input_shape\":[null,0,0,3]",
            "input size 0 is outside 32..=2048",
        ),
        (
            "\"batch_input_shape\":[null,100000,100000,3]",
            "input size 100000 is outside 32..=2048",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let model = mobilenet_with_input(dir.path(), shape);
        fails_with(
            dltool()
                .args(["featurize", "--weights"])
                .arg(&model)
                .arg(&image),
            needle,
        );
    }
}
