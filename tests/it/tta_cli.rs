//! `--tta flip`: features of an image and its left-right mirror averaged, recorded in the
//! provenance of features and heads, and refused where it does not match.

use crate::common;

use common::{dltool, fails_with, flowers, ok, photo_dir, run, shared};
use dltool::features::{FeatureTable, read_features};
use std::path::{Path, PathBuf};

/// Writes the left-right mirror of `src` as a lossless PNG in `dir`, decoded the way dltool
/// decodes (EXIF orientation applied), so the only difference from `src` is the mirroring.
fn mirror_png(src: &Path, dir: &Path) -> PathBuf {
    let rgb = dltool::image_io::decode_rgb8(src, u64::MAX).unwrap();
    let out = dir.join(format!(
        "{}-mirror.png",
        src.file_stem().unwrap().to_string_lossy()
    ));
    image::imageops::flip_horizontal(&rgb).save(&out).unwrap();
    out
}

fn featurize(dir: &Path, name: &str, args: &[&str], images: &[PathBuf]) -> FeatureTable {
    let out = dir.join(format!("{name}.safetensors"));
    ok(dltool()
        .args(["featurize", "-q"])
        .args(args)
        .args(images)
        .arg("-o")
        .arg(&out));
    read_features(&out).unwrap()
}

/// Largest |a - b| over the largest |b|.
fn relative_diff(a: &[f32], b: &[f32]) -> f32 {
    let (diff, scale) = common::max_abs_diff(a, b);
    diff / scale
}

/// `flip` against the mean of plain runs of the image and of its mirror, written as a PNG:
/// `unmirror_width` is `Some(W)` for unpooled maps, whose mirrored copy must be reversed back
/// along its width before averaging.
fn check_flip_is_mean_of_mirror(
    dir: &Path,
    images: &[PathBuf],
    args: &[&str],
    unmirror_width: Option<usize>,
) {
    let mirrors: Vec<PathBuf> = images.iter().map(|p| mirror_png(p, dir)).collect();
    let tag: String = args
        .join("")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let flip_args: Vec<&str> = args.iter().copied().chain(["--tta", "flip"]).collect();
    let flip = featurize(dir, &format!("flip{tag}"), &flip_args, images);
    let plain = featurize(dir, &format!("plain{tag}"), args, images);
    let mirrored = featurize(dir, &format!("mirrored{tag}"), args, &mirrors);
    assert_eq!(flip.meta.as_ref().unwrap().tta, "flip");
    assert_eq!(plain.meta.as_ref().unwrap().tta, "none");
    for i in 0..images.len() {
        let mut m = mirrored.row(i).to_vec();
        if let Some(w) = unmirror_width {
            m.chunks_exact_mut(w).for_each(<[f32]>::reverse);
        }
        let mean: Vec<f32> = plain
            .row(i)
            .iter()
            .zip(&m)
            .map(|(a, b)| 0.5 * (a + b))
            .collect();
        let rel = relative_diff(flip.row(i), &mean);
        eprintln!("{args:?} image {i}: relative difference {rel:.2e}");
        assert!(rel < 1e-4, "{args:?} image {i}: {rel}");
        // The mirror really is another input: the test would not pass with plain features.
        assert!(
            relative_diff(plain.row(i), &mean) > 1e-3,
            "{args:?} image {i}"
        );
    }
}

#[test]
fn flip_features_are_the_mean_of_the_image_and_its_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images: Vec<PathBuf> = [flowers("daisy", 1), flowers("sunflowers", 1)].concat();
    check_flip_is_mean_of_mirror(d, &images, &[], None);
    check_flip_is_mean_of_mirror(d, &images, &["--layer", "mixed_6e", "--pool", "max"], None);
    check_flip_is_mean_of_mirror(
        d,
        &images,
        &["--layer", "mixed_5d", "--pool", "none"],
        Some(35),
    );
    let mobilenet = shared("weights/mobilenet_v1_0.25_224/model.json");
    let mobilenet = mobilenet.to_str().unwrap();
    check_flip_is_mean_of_mirror(d, &images[..1], &["--weights", mobilenet], None);

    // A row does not depend on its batch: one image per batch gives the same bits.
    let batched = featurize(d, "b2", &["--tta", "flip", "--batch-size", "2"], &images);
    let single = featurize(d, "b1", &["--tta", "flip", "--batch-size", "1"], &images);
    assert!(batched.data == single.data);

    // A journal made without flip is not resumed with it.
    let out = d.join("resumed.safetensors");
    ok(dltool()
        .args(["featurize", "-q"])
        .args(&images)
        .arg("-o")
        .arg(&out));
    fails_with(
        dltool()
            .args(["featurize", "-q", "--resume", "--tta", "flip"])
            .args(&images)
            .arg("-o")
            .arg(&out),
        "tta 'none' vs 'flip'",
    );
    let out = run(dltool().args(["featurize", "--tta", "rot90"]).args(&images));
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected none or flip"));
}

#[test]
fn heads_carry_the_tta_mode_and_refuse_features_made_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let photos = d.join("photos");
    photo_dir(&photos, 2);
    let featurize_dir = |name: &str, tta: &str| -> PathBuf {
        let out = d.join(name);
        ok(dltool()
            .args(["featurize", "-q", "--tta", tta])
            .arg(&photos)
            .arg("-o")
            .arg(&out));
        out
    };
    let flip = featurize_dir("flip.safetensors", "flip");
    let plain = featurize_dir("plain.safetensors", "none");
    let train = |features: &Path, name: &str| -> PathBuf {
        let head = d.join(name);
        ok(dltool()
            .arg("train-head")
            .arg(features)
            .arg("-o")
            .arg(&head)
            .args(["--reg", "0.01", "-q"]));
        head
    };
    let flip_head = train(&flip, "flip-head.safetensors");
    let plain_head = train(&plain, "plain-head.safetensors");
    let tta_of = |head: &Path| dltool::head::Head::load(head).unwrap().provenance.tta;
    assert_eq!(tta_of(&flip_head), "flip");
    assert_eq!(tta_of(&plain_head), "none");

    // CSV features carry no provenance: train-head records what --tta says.
    let csv = d.join("flip.csv");
    ok(dltool()
        .args(["featurize", "-q", "--tta", "flip"])
        .arg(&photos)
        .arg("-o")
        .arg(&csv));
    let csv_head = d.join("csv-head.safetensors");
    ok(dltool()
        .arg("train-head")
        .arg(&csv)
        .arg("-o")
        .arg(&csv_head)
        .args(["--reg", "0.01", "--tta", "flip", "-q"]));
    assert_eq!(tta_of(&csv_head), "flip");

    // Predicting from images featurizes with the head's own mode: the same probabilities as
    // the head on --tta flip features, and not those of plain features.
    let probabilities = |args: &[&Path]| -> Vec<f64> {
        let text = ok(dltool().arg("predict").args(args).arg("-q"));
        text.lines()
            .skip(1)
            .flat_map(|l| l.split(',').skip(3).map(|p| p.parse::<f64>().unwrap()))
            .collect::<Vec<f64>>()
    };
    let from_images = probabilities(&[&flip_head, &photos]);
    let from_flip = probabilities(&[&flip_head, Path::new("--features"), &flip]);
    assert_eq!(from_images.len(), 8, "4 images x 2 classes");
    for (a, b) in from_images.iter().zip(&from_flip) {
        assert!((a - b).abs() < 1e-6, "{from_images:?} vs {from_flip:?}");
    }
    let plain_head_from_images = probabilities(&[&plain_head, &photos]);
    let plain_head_from_plain = probabilities(&[&plain_head, Path::new("--features"), &plain]);
    for (a, b) in plain_head_from_images.iter().zip(&plain_head_from_plain) {
        assert!((a - b).abs() < 1e-6);
    }

    // Features made with another mode than the head's: one clear line naming the file.
    for (head, features, msg) in [
        (
            &plain_head,
            &flip,
            "test-time augmentation flip, the head with none",
        ),
        (
            &flip_head,
            &plain,
            "test-time augmentation none, the head with flip",
        ),
    ] {
        let line = fails_with(dltool().arg("evaluate").arg(head).arg(features), msg);
        assert!(line.contains(&features.display().to_string()), "{line}");
        fails_with(
            dltool()
                .arg("predict")
                .arg(head)
                .arg("--features")
                .arg(features),
            msg,
        );
    }
}

#[test]
fn classify_with_flip_averages_the_probabilities_of_both_views() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = flowers("roses", 1).remove(0);
    let mirror = mirror_png(&image, d);
    let weights = shared("weights/mobilenet_v1_0.25_224/model.json");
    // The shared model comes without class names; any 1000 distinct ones do here.
    let labels = d.join("labels.txt");
    let names: Vec<String> = (0..1000).map(|i| format!("class{i}")).collect();
    std::fs::write(&labels, names.join("\n")).unwrap();
    // Top-1000 of MobileNet's 1000 classes: every probability, by class name.
    let probs = |tta: &str, img: &Path| -> std::collections::HashMap<String, f64> {
        let text = ok(dltool()
            .args([
                "classify",
                "-q",
                "--top-k",
                "1000",
                "--tta",
                tta,
                "--weights",
            ])
            .arg(&weights)
            .arg("--labels")
            .arg(&labels)
            .arg(img));
        text.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[3].to_string(), f[4].parse().unwrap())
            })
            .collect()
    };
    let flip = probs("flip", &image);
    let plain = probs("none", &image);
    let mirrored = probs("none", &mirror);
    assert_eq!(flip.len(), 1000);
    let mut moved = 0.0f64;
    for (synset, p) in &flip {
        let mean = 0.5 * (plain[synset] + mirrored[synset]);
        assert!((p - mean).abs() < 1e-4, "{synset}: {p} vs {mean}");
        moved += (p - plain[synset]).abs();
    }
    assert!(moved > 1e-3, "flip changed nothing");
    let out = run(dltool().args(["classify", "--tta", "sideways"]).arg(&image));
    assert_eq!(out.status.code(), Some(2), "a usage error");
}
