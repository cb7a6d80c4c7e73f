//! EfficientNet-Lite0/Lite2 through the command line: the whole pipeline (dltool's decode and
//! resize, then the network) against reference features, `classify` with the network's own
//! classifier, the chain featurize -> train-head -> predict from images, and bad input.

use crate::common;

use common::{Golden, dltool, fails_with, flower_subset, ok, run, shared, shared_dir};
use std::path::Path;

const LITE0: &str = "weights/efficientnet_lite0/efficientnet-lite0-57934424.pth";
const LITE2: &str = "weights/efficientnet_lite2/efficientnet-lite2-9656183e.pth";
const LABELS: &str = "imagenet/imagenet_class_index.json";

/// `dltool featurize` of the 20 flowers of the pipeline golden, then cosine >= 0.999 per image
/// against the reference (PIL resize, PyTorch network). Lite0 is recognised from its file,
/// Lite2 is also named with --backbone.
#[test]
fn featurize_matches_reference_features_of_20_flowers() {
    for (name, weights, backbone) in [
        ("efficientnet_lite0", LITE0, None),
        ("efficientnet_lite2", LITE2, Some("efficientnet_lite2")),
    ] {
        let golden = Golden::open(&format!("golden/{name}/pipeline.safetensors"));
        let images: Vec<String> = golden
            .metadata("images")
            .split(',')
            .map(str::to_string)
            .collect();
        assert_eq!(images.len(), 20);
        let (shape, reference) = golden.tensor("features");
        assert_eq!(shape, vec![20, 1280]);

        let dir = tempfile::tempdir().unwrap();
        let flowers = shared_dir().join("flowers");
        let out = dir.path().join("f.safetensors");
        let mut cmd = dltool();
        cmd.args(["featurize", "-q"]);
        cmd.args(images.iter().map(|rel| flowers.join(rel)));
        if let Some(b) = backbone {
            cmd.args(["--backbone", b]);
        }
        ok(cmd
            .arg("--weights")
            .arg(shared(weights))
            .arg("-o")
            .arg(&out));
        let table = dltool::features::read_features(&out).unwrap();
        assert_eq!((table.len(), table.dim), (20, 1280));
        let meta = table.meta.clone().unwrap();
        let size = if name.ends_with('0') { 224 } else { 260 };
        assert_eq!(meta.backbone, format!("{name}/{size}"));
        assert_eq!(meta.layer, "head");
        let mut worst = 1.0f64;
        for (i, rel) in images.iter().enumerate() {
            assert!(table.paths[i].ends_with(rel.as_str()), "row order");
            let cos = cosine(table.row(i), &reference[i * 1280..(i + 1) * 1280]);
            worst = worst.min(cos);
        }
        eprintln!("{name}: worst cosine of 20 flowers {worst:.6}");
        assert!(worst >= 0.999, "{name}: worst cosine {worst} < 0.999");
    }
}

#[test]
fn classify_names_the_daisy_of_the_golden() {
    let golden = Golden::open("golden/efficientnet_lite2/net.safetensors");
    let daisy = golden
        .metadata("images")
        .split(',')
        .next()
        .unwrap()
        .to_string();
    assert!(daisy.starts_with("daisy/"));
    let text = ok(dltool()
        .args([
            "classify",
            "--top-k",
            "3",
            "--backbone",
            "efficientnet_lite2",
        ])
        .arg("--weights")
        .arg(shared(LITE2))
        .arg("--labels")
        .arg(shared(LABELS))
        .arg(shared(&format!("flowers/{daisy}"))));
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert_eq!(&rows[0][1..4], ["1", "n11939491", "daisy"], "{text}");
}

#[test]
fn lite0_runs_the_whole_chain() {
    let dir = tempfile::tempdir().unwrap();
    let images = flower_subset(dir.path(), &["daisy", "tulips"], 20);
    let d = |name: &str| dir.path().join(name).display().to_string();
    let weights = shared(LITE0);
    ok(dltool()
        .args(["featurize", "-q", "--layer", "block14", "--weights"])
        .arg(&weights)
        .arg(&images)
        .args(["-o", &d("f.safetensors")]));
    let table = dltool::features::read_features(Path::new(&d("f.safetensors"))).unwrap();
    assert_eq!((table.len(), table.dim), (40, 192));
    assert_eq!(table.meta.as_ref().unwrap().layer, "block14");
    ok(dltool()
        .args(["split", &d("f.safetensors"), "--fractions", "0.5,0.5"])
        .args(["--seed", "3", "-o", &d("train.safetensors")])
        .args(["-o", &d("test.safetensors")]));
    ok(dltool().args([
        "train-head",
        "-q",
        &d("train.safetensors"),
        "-o",
        &d("head.safetensors"),
    ]));
    let json = ok(dltool().args([
        "evaluate",
        "--json",
        &d("head.safetensors"),
        &d("test.safetensors"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let accuracy = v["accuracy"].as_f64().unwrap();
    assert!(accuracy >= 0.8, "accuracy {accuracy}");

    // predict runs the images through the head's own network and layer again.
    let text = ok(dltool()
        .args(["predict", "-q", &d("head.safetensors"), "--weights"])
        .arg(&weights)
        .arg(images.join("tulips")));
    assert_eq!(text.lines().count(), 21, "{text}");
    let tulips = text
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(1) == Some("tulips"))
        .count();
    assert!(tulips >= 16, "{text}");

    // Lite2's weights for a Lite0 head: one line naming both.
    let out = run(dltool()
        .args(["predict", &d("head.safetensors"), "--weights"])
        .arg(shared(LITE2))
        .arg(images.join("tulips")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("EfficientNet-Lite2") || err.contains("efficientnet_lite2"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn bad_layers_and_mismatched_weights_are_one_line() {
    let daisy = shared("flowers/daisy");
    let err = fails_with(
        dltool()
            .args(["featurize", "--layer", "mixed_7c", "--weights"])
            .arg(shared(LITE0))
            .arg(&daisy),
        "block0, block2, block4, block7, block10, block14, block15, head",
    );
    assert!(err.contains("mixed_7c"), "{err}");
    let err = fails_with(
        dltool()
            .args(["featurize", "--backbone", "efficientnet_lite2", "--weights"])
            .arg(shared(LITE0))
            .arg(&daisy),
        "EfficientNet-Lite0",
    );
    assert!(err.contains("EfficientNet-Lite2"), "{err}");
    fails_with(
        dltool()
            .args(["featurize", "--backbone", "efficientnet_lite0", "--weights"])
            .arg(shared("weights/inception_v3_tf2015.safetensors"))
            .arg(&daisy),
        "InceptionV3",
    );
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
