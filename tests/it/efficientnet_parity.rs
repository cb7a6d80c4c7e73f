//! EfficientNet-Lite0/Lite2 on the CPU engine against the PyTorch reference (the wheel's model
//! code, float32, eval mode) at every golden stage, and the ImageNet classifier on the golden
//! daisy. The whole pipeline (decode, resize, network) is tests/it/efficientnet_cli.rs.

use crate::common;

use common::{Golden, max_abs_diff, shared};
use dltool::backbones::efficientnet_lite::{EfficientNetLite, LITE0, LITE2, LiteLayer, LiteSpec};

/// ImageNet index of `daisy` (n11939491), the first golden image's true class.
const DAISY: usize = 985;

fn weights(spec: &LiteSpec) -> std::path::PathBuf {
    let dir = shared(&format!("weights/{}", spec.name));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "pth"))
        .collect();
    assert_eq!(files.len(), 1, "one .pth in {}", dir.display());
    files.pop().unwrap()
}

fn load(spec: &LiteSpec) -> EfficientNetLite {
    let net =
        EfficientNetLite::load(&weights(spec), Some(spec.name)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(net.spec, spec, "recognised from the file");
    assert!(net.has_classifier());
    net
}

/// Every stage within 1e-4 x max |ref|; returns the class probabilities of the two images.
fn stages_match(spec: &LiteSpec) -> Vec<f32> {
    let net = load(spec);
    let golden = Golden::open(&format!("golden/{}/net.safetensors", spec.name));
    let (shape, input) = golden.tensor("input");
    assert_eq!(shape, vec![2, 3, spec.size, spec.size]);
    let got = net.forward_stages(&input, 2);

    // The layers dltool names are the golden's stage ends, in order.
    let blocks: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&golden.metadata("blocks")).unwrap();
    let mut golden_ends: Vec<usize> = blocks.keys().map(|k| k.parse().unwrap()).collect();
    golden_ends.sort();
    assert_eq!(spec.stage_ends(), golden_ends, "{}: stage ends", spec.name);

    let mut stages: Vec<(String, Vec<f32>)> = got.blocks;
    stages.push(("head".into(), got.head));
    stages.push(("pool".into(), got.pool));
    stages.push(("logits".into(), got.logits.expect("classifier")));
    let probs = got.probs.expect("classifier");
    stages.push(("probs".into(), probs.clone()));
    assert_eq!(stages.len(), 7 + 4);
    for (name, ours) in &stages {
        let (_, want) = golden.tensor(name);
        let (diff, scale) = max_abs_diff(ours, &want);
        eprintln!(
            "{} {name}: max |diff| {diff:.3e}, max |ref| {scale:.3e}, ratio {:.2e}",
            spec.name,
            diff / scale
        );
        assert!(
            diff <= 1e-4 * scale,
            "{} {name}: max |diff| {diff:e} > 1e-4 x {scale:e}",
            spec.name
        );
    }

    // The layer shapes dltool reports are those of the golden tensors.
    for (i, name) in spec.layer_names().iter().enumerate() {
        let layer = spec.layer(name).unwrap();
        let want = golden.tensor(name).0;
        let [c, h, w] = spec.layer_shape(layer);
        assert_eq!(want, vec![2, c, h, w], "{name} shape");
        assert_eq!(
            layer,
            if i == 7 {
                LiteLayer::Head
            } else {
                LiteLayer::Stage(i)
            }
        );
    }
    probs
}

#[test]
fn lite0_matches_reference_at_every_stage() {
    stages_match(&LITE0);
}

#[test]
fn lite2_matches_reference_at_every_stage_and_sees_a_daisy() {
    let probs = stages_match(&LITE2);
    let classes: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared("imagenet/imagenet_class_index.json")).unwrap(),
    )
    .unwrap();
    let top = probs[..1000]
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap();
    let name = classes[top.to_string()][1].as_str().unwrap();
    eprintln!(
        "efficientnet_lite2 on the golden daisy: class {top} ({name}), p = {:.3}",
        probs[top]
    );
    assert_eq!((top, name), (DAISY, "daisy"));
}

/// The two golden images, then `count` mixtures of them (`t * a + (1 - t) * b`, `t` evenly
/// spaced strictly between 0 and 1).
fn with_mixtures(input: &[f32], count: usize) -> Vec<f32> {
    let (a, b) = input.split_at(input.len() / 2);
    let mut pixels = input.to_vec();
    for k in 0..count {
        let t = (k + 1) as f32 / (count + 1) as f32;
        pixels.extend(a.iter().zip(b).map(|(x, y)| x * t + y * (1.0 - t)));
    }
    pixels
}

/// An image's features are bit-identical whatever else is in its batch (batches cross the
/// network's internal passes of several images) and however many threads run.
#[test]
fn features_do_not_depend_on_batch_or_threads() {
    let net = load(&LITE0);
    let golden = Golden::open("golden/efficientnet_lite0/net.safetensors");
    let (_, input) = golden.tensor("input");
    let image = input.len() / 2;
    // Six images: the two golden ones and mixtures, so a batch of 6 spans two passes.
    let pixels = with_mixtures(&input, 4);
    for layer in [LiteLayer::Head, LiteLayer::Stage(3)] {
        let batch = net.forward_act(&pixels, 6, layer);
        let per = batch.data.len() / 6;
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for i in [0, 3, 5] {
            let alone = one_thread
                .install(|| net.forward_act(&pixels[i * image..(i + 1) * image], 1, layer));
            assert!(
                alone.data[..] == batch.data[i * per..(i + 1) * per],
                "{layer:?} image {i}: alone on one thread differs from batch of 6"
            );
        }
    }
}

/// With an image for every thread, a batch runs as one group of images per thread
/// (`engine::batch_split`): features and classes are the same bits as on one thread, whose
/// single group runs every layer over the whole batch, and classes the same alone as in a
/// batch.
#[test]
fn features_split_by_thread_equal_one_thread() {
    use dltool::backbones::{Network, Pool};
    let net = load(&LITE0);
    let golden = Golden::open("golden/efficientnet_lite0/net.safetensors");
    let (_, input) = golden.tensor("input");
    let image = input.len() / 2;
    let pixels = with_mixtures(&input, 3);
    let pool = |threads| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    };
    let (one, three) = (pool(1), pool(3));
    for (layer, how) in [("head", Pool::Avg), ("block7", Pool::None)] {
        let want = one.install(|| net.features(&pixels, 5, layer, how));
        // Five images on three threads: groups of 2, 2 and 1.
        let got = three.install(|| net.features(&pixels, 5, layer, how));
        assert_eq!(got.len(), want.len(), "{layer}");
        assert!(got == want, "{layer}: three groups differ from one thread");
    }
    let want = one.install(|| Network::classify(&net, &pixels, 5)).unwrap();
    let got = three
        .install(|| Network::classify(&net, &pixels, 5))
        .unwrap();
    assert!(got == want, "classes: three groups differ from one thread");
    // And an image's classes do not depend on its batch either.
    for i in [0, 4] {
        let alone = one
            .install(|| Network::classify(&net, &pixels[i * image..(i + 1) * image], 1))
            .unwrap();
        assert!(
            alone[..] == want[i * 1000..(i + 1) * 1000],
            "image {i}: classes alone differ from in a batch of 5"
        );
    }
}
