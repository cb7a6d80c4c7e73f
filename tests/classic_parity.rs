//! ResNet and VGG on the CPU engine against torchvision.
//!
//! * Reduced networks (same blocks, smaller width/depth, random weights and BatchNorm
//!   statistics) against reference activations written by `tools/classic_reference.py` with
//!   torchvision's own code, in float64: every stage within 1e-4 x max|ref|.
//! * Full-size state dicts with torchvision's exact tensor names and shapes (listed by the
//!   same script from torchvision's resnet50/vgg16/vgg19), random values, written to a
//!   temporary safetensors file: they load and run one 224x224 image.

use dltool::backbone::Pool;
use dltool::backbones::resnet::{self, ResNet};
use dltool::backbones::vgg::{self, Vgg};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/classic")
        .join(name)
}

/// Every tensor of a safetensors file: shape and f32 values.
fn read_ref(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

/// Largest |got - want| relative to max|want|, asserting the lengths agree.
fn rel_err(stage: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{stage}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0, "{stage}: reference is all zeros");
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    diff / scale
}

fn assert_close(stage: &str, got: &[f32], want: &[f32]) {
    let e = rel_err(stage, got, want);
    println!("{stage}: max error {e:.2e} x max|ref|");
    assert!(e <= 1e-4, "{stage}: max error {e:.3e} x max|ref| > 1e-4");
}

fn input(reference: &HashMap<String, (Vec<usize>, Vec<f32>)>) -> (Vec<f32>, usize, [usize; 2]) {
    let (shape, x) = &reference["input"];
    (x.clone(), shape[0], [shape[2], shape[3]])
}

#[test]
fn reduced_resnet_matches_torchvision_at_every_stage() {
    let r = read_ref(&fixture("resnet_tiny_ref.safetensors"));
    let net = ResNet::load(&fixture("resnet_tiny.safetensors")).unwrap();
    assert_eq!(net.depths, [2, 2, 2, 2]);
    assert_eq!(net.channels, [32, 64, 128, 256]);
    assert_eq!(net.num_classes(), Some(10));
    let (x, n, hw) = input(&r);
    let s = net.forward_stages(&x, n, hw);
    assert_close("stem", &s.stem, &r["stem"].1);
    for (i, got) in s.layers.iter().enumerate() {
        let name = format!("layer{}", i + 1);
        assert_close(&name, got, &r[&name].1);
        let [c, h, w] = net.layer_shape(&name, hw[0], hw[1]).unwrap();
        assert_eq!(vec![n, c, h, w], r[&name].0, "{name} shape");
    }
    assert_close("pool", &s.pool, &r["pool"].1);
    assert_close("logits", s.logits.as_ref().unwrap(), &r["logits"].1);

    // The feature API reads the same stages, pooled as asked.
    let f = net.features(&x, n, hw, "layer3", Pool::None);
    assert_close("features layer3", &f, &r["layer3"].1);
    let f = net.features(&x, n, hw, "pool", Pool::Max);
    assert_close("features pool", &f, &r["pool"].1);
    let p = net.classify(&x, n, hw).unwrap();
    for (img, row) in p.chunks(10).enumerate() {
        let logits = &r["logits"].1[img * 10..(img + 1) * 10];
        let best = |v: &[f32]| (0..10).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
        assert_eq!(best(row), best(logits));
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

fn check_vgg(file: &str, blocks: [usize; 5]) {
    let r = read_ref(&fixture(&format!("{file}_ref.safetensors")));
    let net = Vgg::load(&fixture(&format!("{file}.safetensors")), "VGG", blocks).unwrap();
    assert_eq!(net.num_classes(), Some(10));
    let (x, n, hw) = input(&r);
    let s = net.forward_stages(&x, n, hw);
    for (i, got) in s.blocks.iter().enumerate() {
        let name = format!("block{}", i + 1);
        assert_close(&format!("{file} {name}"), got, &r[&name].1);
        let [c, h, w] = net.layer_shape(&name, hw[0], hw[1]).unwrap();
        assert_eq!(vec![n, c, h, w], r[&name].0, "{name} shape");
    }
    assert_close(&format!("{file} fc6"), s.fc6.as_ref().unwrap(), &r["fc6"].1);
    assert_close(&format!("{file} fc7"), s.fc7.as_ref().unwrap(), &r["fc7"].1);
    assert_close(
        &format!("{file} logits"),
        s.logits.as_ref().unwrap(),
        &r["logits"].1,
    );
    // Through the feature API, with the early blocks run a few images at a time.
    let f = net.features(&x, n, hw, "fc7", Pool::Avg);
    assert_close(&format!("{file} features fc7"), &f, &r["fc7"].1);
    let f = net.features(&x, n, hw, "block3", Pool::None);
    assert_close(&format!("{file} features block3"), &f, &r["block3"].1);
}

#[test]
fn reduced_vgg16_matches_torchvision_at_every_stage() {
    check_vgg("vgg16_tiny", vgg::VGG16_BLOCKS);
}

#[test]
fn reduced_vgg19_matches_torchvision_at_every_stage() {
    check_vgg("vgg19_tiny", vgg::VGG19_BLOCKS);
}

#[test]
fn a_vgg19_file_is_refused_as_vgg16_with_what_it_holds() {
    let path = fixture("vgg19_tiny.safetensors");
    let err = Vgg::load(&path, "VGG16", vgg::VGG16_BLOCKS)
        .err()
        .expect("VGG19 weights must not load as VGG16")
        .to_string();
    assert!(
        err.contains("vgg19_tiny.safetensors")
            && err.contains("(VGG19)")
            && err.contains("not VGG16"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

// ---- full-size state dicts ----

/// torchvision's names, shapes and dtypes for `net` (from the committed list).
fn full_size_names(net: &str) -> Vec<(String, Vec<usize>, String)> {
    let text = std::fs::read_to_string(fixture("full_size_names.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[net]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let shape = row[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (
                row[0].as_str().unwrap().to_string(),
                shape,
                row[2].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A small deterministic generator (xorshift): values in -1..1.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Writes a state dict of `names` with random values scaled to keep activations finite
/// (He-like weights, BatchNorm variances around 1), optionally dropping or renaming one.
fn write_random(names: &[(String, Vec<usize>, String)], path: &Path) {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut buffers: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
    for (name, shape, dtype) in names {
        let count: usize = shape.iter().product();
        if dtype == "int64" {
            buffers.push((
                name.clone(),
                shape.clone(),
                safetensors::Dtype::I64,
                vec![0; 8 * count],
            ));
            continue;
        }
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let values: Vec<f32> = (0..count)
            .map(|_| {
                let u = rng.next();
                if name.ends_with("running_var") {
                    1.0 + 0.5 * u.abs()
                } else if name.ends_with("running_mean") || name.ends_with("bias") {
                    0.1 * u
                } else if shape.len() == 1 {
                    1.0 + 0.2 * u
                } else {
                    u * (3.0 / fan_in as f32).sqrt()
                }
            })
            .collect();
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), shape.clone(), safetensors::Dtype::F32, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = buffers
        .iter()
        .map(|(n, s, d, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

/// One 224x224 image of small random values.
fn image() -> Vec<f32> {
    let mut rng = Rng(42);
    (0..3 * 224 * 224).map(|_| rng.next()).collect()
}

fn assert_probabilities(p: &[f32], classes: usize) {
    assert_eq!(p.len(), classes);
    assert!(p.iter().all(|v| v.is_finite() && *v >= 0.0));
    assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
}

#[test]
fn full_size_resnet50_state_dict_loads_and_runs_one_image() {
    let names = full_size_names("resnet50");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet50.safetensors");
    write_random(&names, &path);
    let net = ResNet::load(&path).unwrap();
    assert_eq!(net.depths, [3, 4, 6, 3]);
    assert_eq!(net.channels, [256, 512, 1024, 2048]);
    assert_eq!(net.num_classes(), Some(1000));
    for (layer, want) in resnet::LAYERS.iter().zip([
        [256, 56, 56],
        [512, 28, 28],
        [1024, 14, 14],
        [2048, 7, 7],
        [2048, 1, 1],
    ]) {
        assert_eq!(net.layer_shape(layer, 224, 224), Some(want), "{layer}");
    }
    let x = image();
    let f = net.features(&x, 1, [224, 224], "pool", Pool::Avg);
    assert_eq!(f.len(), 2048);
    assert!(f.iter().all(|v| v.is_finite()) && f.iter().any(|v| *v > 0.0));
    assert_probabilities(&net.classify(&x, 1, [224, 224]).unwrap(), 1000);

    // Without one of its tensors the file is refused, naming the tensor.
    let short: Vec<_> = names
        .iter()
        .filter(|(n, _, _)| n != "layer3.5.bn2.running_var")
        .cloned()
        .collect();
    write_random(&short, &path);
    let err = ResNet::load(&path).err().unwrap().to_string();
    assert!(err.contains("layer3.5.bn2.running_var"), "{err}");
}

fn full_size_vgg(net_name: &str, blocks: [usize; 5]) {
    let names = full_size_names(net_name);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{net_name}.safetensors"));
    write_random(&names, &path);
    let net = Vgg::load(&path, "VGG", blocks).unwrap();
    drop(names);
    assert_eq!(net.channels, vec![64, 128, 256, 512, 512]);
    assert_eq!(net.num_classes(), Some(1000));
    assert_eq!(net.layer_shape("block5", 224, 224), Some([512, 7, 7]));
    assert_eq!(net.layer_shape("fc7", 224, 224), Some([4096, 1, 1]));
    let x = image();
    let f = net.features(&x, 1, [224, 224], "fc7", Pool::Avg);
    assert_eq!(f.len(), 4096);
    assert!(f.iter().all(|v| v.is_finite() && *v >= 0.0));
    assert_probabilities(&net.classify(&x, 1, [224, 224]).unwrap(), 1000);
}

#[test]
fn full_size_vgg16_state_dict_loads_and_runs_one_image() {
    full_size_vgg("vgg16", vgg::VGG16_BLOCKS);
}

#[test]
fn full_size_vgg19_state_dict_loads_and_runs_one_image() {
    full_size_vgg("vgg19", vgg::VGG19_BLOCKS);
}

/// The fixture's tensors rewritten in `dtype` (f16 or bf16) into `path`.
fn rewrite_half(src: &Path, path: &Path, dtype: safetensors::Dtype) {
    let tensors = read_ref(src);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, (shape, data))| {
            let b = data
                .iter()
                .flat_map(|v| match dtype {
                    safetensors::Dtype::F16 => half::f16::from_f32(*v).to_le_bytes(),
                    _ => half::bf16::from_f32(*v).to_le_bytes(),
                })
                .collect();
            (name, shape, b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

#[test]
fn half_precision_state_dicts_load_as_f32() {
    let src = fixture("resnet_tiny.safetensors");
    let r = read_ref(&fixture("resnet_tiny_ref.safetensors"));
    let (x, n, hw) = input(&r);
    let dir = tempfile::tempdir().unwrap();
    // Rounding the weights to 11 (f16) or 8 (bf16) significant bits moves the outputs by about
    // that much; bytes misread as another type would move them by orders of magnitude.
    for (dtype, tol) in [
        (safetensors::Dtype::F16, 1e-2),
        (safetensors::Dtype::BF16, 5e-2),
    ] {
        let path = dir.path().join(format!("{dtype:?}.safetensors"));
        rewrite_half(&src, &path, dtype);
        let net = ResNet::load(&path).unwrap();
        let got = net.forward_stages(&x, n, hw).pool;
        let e = rel_err(&format!("{dtype:?} pool"), &got, &r["pool"].1);
        println!("{dtype:?}: pool within {e:.2e} x max|ref|");
        assert!(e <= tol, "{dtype:?}: {e}");
    }
}
