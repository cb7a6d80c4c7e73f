//! The whole pipeline (decode, resize, network, pooling) against reference features computed
//! with PIL preprocessing and the original network.

use crate::common;

use common::{Golden, shared, shared_dir};
use std::process::Command;

#[test]
fn featurize_matches_reference_features_of_20_flowers() {
    let golden = Golden::open("golden/inception_v3_tf2015/pipeline.safetensors");
    let images: Vec<String> = golden
        .metadata("images")
        .split(',')
        .map(str::to_string)
        .collect();
    assert_eq!(images.len(), 20);
    let (shape, reference) = golden.tensor("features");
    assert_eq!(shape, vec![20, 2048]);

    let table = featurize(&images, None);
    assert_eq!(table.len(), 20);
    assert_eq!(table.dim, 2048);
    let mut worst = 1.0f64;
    for (i, rel) in images.iter().enumerate() {
        assert!(
            table.paths[i].ends_with(rel.as_str()),
            "row order: {}",
            table.paths[i]
        );
        let ours = table.row(i);
        let theirs = &reference[i * 2048..(i + 1) * 2048];
        let cos = cosine(ours, theirs);
        eprintln!("{rel}: cosine {cos:.6}");
        worst = worst.min(cos);
    }
    eprintln!("worst cosine similarity: {worst:.6}");
    assert!(worst >= 0.995, "worst cosine similarity {worst} < 0.995");

    // The burn model (DLTOOL_ENGINE=burn) and the default CPU engine compute the same function.
    let burn = featurize(&images, Some("burn"));
    let scale = burn.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = burn
        .data
        .iter()
        .zip(&table.data)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    eprintln!("burn vs cpu engine: max |diff| {diff:e}, max |burn| {scale}");
    assert!(
        diff <= 1e-4 * scale,
        "engines differ by {diff} (max |burn| {scale})"
    );
}

/// `dltool featurize` of the given flowers into safetensors, with `DLTOOL_ENGINE` set if given.
fn featurize(images: &[String], engine: Option<&str>) -> dltool::features::FeatureTable {
    let flowers = shared_dir().join("flowers");
    let stdin: String = images
        .iter()
        .map(|rel| format!("{}\n", flowers.join(rel).display()))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("f.safetensors");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dltool"));
    if let Some(engine) = engine {
        cmd.env("DLTOOL_ENGINE", engine);
    }
    let mut child = cmd
        .args(["featurize", "-", "--quiet", "-o"])
        .arg(&out)
        .arg("--weights")
        .arg(shared("weights/inception_v3_tf2015.safetensors"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());

    dltool::features::read_features(&out).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
