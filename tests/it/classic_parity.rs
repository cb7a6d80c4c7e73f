//! ResNet and VGG on the CPU engine against torchvision, Xception against timm.
//!
//! * Reduced networks (same blocks, smaller width/depth, random weights and BatchNorm
//!   statistics) against reference activations written by `tools/classic_reference.py` with
//!   torchvision's own code, in float64: every stage within 1e-4 x max|ref|.
//! * Full-size state dicts with torchvision's exact tensor names and shapes (listed by the
//!   same script from torchvision's resnet50/vgg16/vgg19), random values, written to a
//!   temporary safetensors file: they load and run one 224x224 image.
//! * The same for Xception with `tools/xception_reference.py` and timm's `legacy_xception`
//!   (tests/fixtures/xception), full size at 299x299.

use crate::common;

use dltool::backbone::Pool;
use dltool::backbones::resnet::{self, ResNet};
use dltool::backbones::vgg::{self, Vgg};
use dltool::backbones::xception::{self, Xception};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/classic")
        .join(name)
}

fn xception_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/xception")
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
    check_vgg_weights(file, &fixture(&format!("{file}.safetensors")), blocks);
}

/// [`check_vgg`] with the weights read from `weights`.
fn check_vgg_weights(file: &str, weights: &Path, blocks: [usize; 5]) {
    let r = read_ref(&fixture(&format!("{file}_ref.safetensors")));
    let net = Vgg::load(weights, "VGG", blocks).unwrap();
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

/// The same weights as torch.save writes them (the format torchvision publishes VGG in): the
/// PyTorch reader must keep torchvision's `features.N` indices, whose gaps place the pools
/// (burn's reader renumbers them 0, 1, 2... unless told not to).
#[test]
fn reduced_vgg16_from_a_pytorch_file_matches_too() {
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("vgg16_tiny.pth");
    common::pth_from(&fixture("vgg16_tiny.safetensors"), &pth, &[]);
    check_vgg_weights("vgg16_tiny", &pth, vgg::VGG16_BLOCKS);
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
    common::names_in(&fixture("full_size_names.json"), net)
}

/// One 224x224 image of small random values.
fn image() -> Vec<f32> {
    image_of(224)
}

/// One `side` x `side` image of small random values.
fn image_of(side: usize) -> Vec<f32> {
    let mut rng = common::Rng(42);
    (0..3 * side * side).map(|_| rng.next()).collect()
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
    common::write_random(&names, &path);
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
    common::write_random(&short, &path);
    let err = ResNet::load(&path).err().unwrap().to_string();
    assert!(err.contains("layer3.5.bn2.running_var"), "{err}");
}

fn full_size_vgg(net_name: &str, blocks: [usize; 5]) {
    let names = full_size_names(net_name);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{net_name}.safetensors"));
    common::write_random(&names, &path);
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

// ---- Xception (timm's legacy_xception) ----

#[test]
fn reduced_xception_matches_timm_at_every_stage() {
    let r = read_ref(&xception_fixture("xception_tiny_ref.safetensors"));
    let net = Xception::load(&xception_fixture("xception_tiny.safetensors")).unwrap();
    assert_eq!(net.channels, [32, 64, 96, 96, 128, 256]);
    assert_eq!(net.num_classes(), Some(10));
    let (x, n, hw) = input(&r);
    let s = net.forward_stages(&x, n, hw);
    assert_close("xception stem", &s.stem, &r["stem"].1);
    for (got, name) in s.layers.iter().zip(xception::LAYERS) {
        assert_close(&format!("xception {name}"), got, &r[name].1);
        let [c, h, w] = net.layer_shape(name, hw[0], hw[1]).unwrap();
        assert_eq!(vec![n, c, h, w], r[name].0, "{name} shape");
    }
    assert_close("xception pool", &s.pool, &r["pool"].1);
    assert_close(
        "xception logits",
        s.logits.as_ref().unwrap(),
        &r["logits"].1,
    );

    // The feature API (stem and block1 a few images at a time) reads the same stages.
    let f = net.features(&x, n, hw, "block2", Pool::None);
    assert_close("xception features block2", &f, &r["block2"].1);
    let f = net.features(&x, n, hw, "middle", Pool::None);
    assert_close("xception features middle", &f, &r["middle"].1);
    let f = net.features(&x, n, hw, "pool", Pool::Max);
    assert_close("xception features pool", &f, &r["pool"].1);
    let p = net.classify(&x, n, hw).unwrap();
    for (img, row) in p.chunks(10).enumerate() {
        let logits = &r["logits"].1[img * 10..(img + 1) * 10];
        let best = |v: &[f32]| (0..10).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
        assert_eq!(best(row), best(logits));
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }
}

/// As torch.save writes it (timm's published file is a `.pth`).
#[test]
fn reduced_xception_from_a_pytorch_file_matches_too() {
    let r = read_ref(&xception_fixture("xception_tiny_ref.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("xception_tiny.pth");
    common::pth_from(&xception_fixture("xception_tiny.safetensors"), &pth, &[]);
    let net = Xception::load(&pth).unwrap();
    let (x, n, hw) = input(&r);
    let f = net.features(&x, n, hw, "act4", Pool::Avg);
    assert_close("xception .pth act4", &f, &r["pool"].1);
}

#[test]
fn a_resnet_file_is_refused_as_xception_with_what_it_holds() {
    let path = fixture("resnet_tiny.safetensors");
    let err = dltool::backbones::check_weights_for(&xception::SPEC, &path)
        .expect_err("ResNet weights must not pass for Xception")
        .to_string();
    assert!(
        err.contains("resnet_tiny.safetensors")
            && err.contains("ResNet50")
            && err.contains("not Xception"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // Loaded anyway, the layout itself is refused in one line naming the file.
    let err = Xception::load(&path).err().unwrap().to_string();
    assert!(
        err.contains("resnet_tiny.safetensors") && err.contains("conv1.weight"),
        "{err}"
    );
    // And the other way round: Xception weights are not ResNet's.
    let err = dltool::backbones::check_weights_for(
        &resnet::SPEC,
        &xception_fixture("xception_tiny.safetensors"),
    )
    .expect_err("Xception weights must not pass for ResNet50")
    .to_string();
    assert!(
        err.contains("Xception") && err.contains("not ResNet50"),
        "{err}"
    );
}

#[test]
fn full_size_xception_state_dict_loads_and_runs_one_image() {
    let names = common::names_in(&xception_fixture("full_size_names.json"), "legacy_xception");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("xception.safetensors");
    common::write_random(&names, &path);
    let net = Xception::load(&path).unwrap();
    assert_eq!(net.channels, [128, 256, 728, 728, 1024, 2048]);
    assert_eq!(net.num_classes(), Some(1000));
    for (layer, want) in xception::LAYERS.iter().zip([
        [128, 74, 74],
        [256, 37, 37],
        [728, 19, 19],
        [728, 19, 19],
        [1024, 10, 10],
        [2048, 10, 10],
        [2048, 1, 1],
    ]) {
        assert_eq!(net.layer_shape(layer, 299, 299), Some(want), "{layer}");
        let spec = xception::SPEC.layers.iter().find(|l| l.name == *layer);
        assert_eq!(spec.and_then(|l| l.shape), Some(want), "{layer} in SPEC");
    }
    let x = image_of(299);
    let f = net.features(&x, 1, [299, 299], "pool", Pool::Avg);
    assert_eq!(f.len(), 2048);
    assert!(f.iter().all(|v| v.is_finite()) && f.iter().any(|v| *v > 0.0));
    assert_probabilities(&net.classify(&x, 1, [299, 299]).unwrap(), 1000);
    // The file is recognised as Xception by its names, and as nothing else.
    assert_eq!(
        dltool::backbones::of_weights(&path).map(|s| s.name),
        Some("xception")
    );

    // Without one of its tensors the file is refused, naming the tensor.
    let short: Vec<_> = names
        .iter()
        .filter(|(n, _, _)| n != "block7.rep.5.running_var")
        .cloned()
        .collect();
    common::write_random(&short, &path);
    let err = Xception::load(&path).err().unwrap().to_string();
    assert!(err.contains("block7.rep.5.running_var"), "{err}");
}
