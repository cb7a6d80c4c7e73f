//! ResNet50 and VGG16/VGG19 through the command line: featurize, train-head, predict from
//! images (the head reloads its network), classify with the network's own classifier, and the
//! bad-input lines. The reduced torchvision networks of tests/fixtures/classic stand in for the
//! real weights (random weights: the tests check wiring and consistency, not accuracy).

use crate::common;

use common::{dltool, ok, photo_dir, run};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/classic")
        .join(name)
}

fn read(path: &Path) -> dltool::features::FeatureTable {
    dltool::features::read_features(path).unwrap()
}

/// `predict`'s rows as `file,class`, sorted: the same images from images or from features.
fn classes_by_file(text: &str) -> Vec<String> {
    let mut rows: Vec<String> = text
        .lines()
        .skip(1)
        .map(|l| {
            let mut f = l.split(',');
            let path = f.next().unwrap();
            let file = Path::new(path).file_name().unwrap().to_string_lossy();
            format!("{file},{}", f.next().unwrap())
        })
        .collect();
    rows.sort();
    rows
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

#[test]
fn resnet_runs_the_chain_and_classifies() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    let names = photo_dir(&root, 4);
    let d = |name: &str| dir.path().join(name);
    let weights = fixture("resnet_tiny.safetensors");

    // The backbone is recognised from the file's tensor names.
    ok(dltool()
        .args(["featurize", "-q", "--weights"])
        .arg(&weights)
        .arg(&root)
        .arg("-o")
        .arg(d("f.safetensors")));
    let pool = read(&d("f.safetensors"));
    assert_eq!((pool.len(), pool.dim), (names.len(), 256));
    let meta = pool.meta.clone().unwrap();
    assert_eq!(
        (meta.backbone.as_str(), meta.layer.as_str()),
        ("resnet50/torchvision", "pool")
    );

    // `pool` is the average of layer4: the same numbers through --layer layer4 --pool avg.
    ok(dltool()
        .args([
            "featurize",
            "-q",
            "--backbone",
            "resnet50",
            "--layer",
            "layer4",
        ])
        .arg("--weights")
        .arg(&weights)
        .arg(&root)
        .arg("-o")
        .arg(d("l4.safetensors")));
    let l4 = read(&d("l4.safetensors"));
    assert!(
        max_diff(&l4.data, &pool.data)
            <= 1e-5 * pool.data.iter().fold(1.0f32, |m, v| m.max(v.abs()))
    );
    // Unpooled layer3: 128 channels x 14 x 14 at 224.
    ok(dltool()
        .args([
            "featurize",
            "-q",
            "--layer",
            "layer3",
            "--pool",
            "none",
            "--weights",
        ])
        .arg(&weights)
        .arg(root.join("daisy"))
        .arg("-o")
        .arg(d("l3.safetensors")));
    assert_eq!(read(&d("l3.safetensors")).dim, 128 * 14 * 14);

    // A head on the features, then predict from images: the head finds its network again and
    // gives each image the class the head gives its feature row.
    ok(dltool()
        .args(["train-head", "-q"])
        .arg(d("f.safetensors"))
        .arg("-o")
        .arg(d("head.safetensors")));
    let from_images = ok(dltool()
        .args(["predict", "-q"])
        .arg(d("head.safetensors"))
        .arg("--weights")
        .arg(&weights)
        .arg(&root));
    let from_features = ok(dltool()
        .args(["predict", "-q"])
        .arg(d("head.safetensors"))
        .arg("--features")
        .arg(d("f.safetensors")));
    assert_eq!(
        classes_by_file(&from_images),
        classes_by_file(&from_features)
    );
    assert_eq!(classes_by_file(&from_images).len(), names.len());

    // classify uses fc (10 classes here) with the labels given.
    let labels = d("labels.txt");
    let text: String = (0..10).map(|i| format!("n{i:08} class {i}\n")).collect();
    std::fs::write(&labels, text).unwrap();
    let out = ok(dltool()
        .args([
            "classify",
            "--top-k",
            "3",
            "--backbone",
            "resnet50",
            "--weights",
        ])
        .arg(&weights)
        .arg("--labels")
        .arg(&labels)
        .arg(root.join("daisy")));
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 4 * 3, "{out}");
    assert!(rows.iter().all(|r| r.contains(",class ")), "{out}");
}

#[test]
fn vgg_features_and_classifier_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    photo_dir(&root, 2);
    let d = |name: &str| dir.path().join(name);
    for (backbone, file) in [
        ("vgg16", "vgg16_tiny.safetensors"),
        ("vgg19", "vgg19_tiny.safetensors"),
    ] {
        let weights = fixture(file);
        ok(dltool()
            .args(["featurize", "-q", "--weights"])
            .arg(&weights)
            .arg(&root)
            .arg("-o")
            .arg(d("f.safetensors")));
        let t = read(&d("f.safetensors"));
        let meta = t.meta.clone().unwrap();
        assert_eq!(meta.backbone, format!("{backbone}/torchvision"));
        assert_eq!((meta.layer.as_str(), t.dim), ("fc7", 64));
        ok(dltool()
            .args([
                "featurize",
                "-q",
                "--layer",
                "block5",
                "--pool",
                "none",
                "--weights",
            ])
            .arg(&weights)
            .arg(&root)
            .arg("-o")
            .arg(d("b5.csv")));
        // Spark's VGG feature: block5's pool flattened, 7 x 7 positions at 224.
        assert_eq!(read(&d("b5.csv")).dim, 64 * 7 * 7);
        let labels = d("labels.txt");
        let text: String = (0..10).map(|i| format!("class {i}\n")).collect();
        std::fs::write(&labels, text).unwrap();
        let out = ok(dltool()
            .args([
                "classify",
                "--top-k",
                "1",
                "--backbone",
                backbone,
                "--weights",
            ])
            .arg(&weights)
            .arg("--labels")
            .arg(&labels)
            .arg(&root));
        assert_eq!(out.lines().count(), 1 + 4, "{out}");
    }
}

#[test]
fn wrong_network_files_and_layers_are_one_line_each() {
    let daisy = common::shared("flowers/daisy");
    // VGG19 weights for --backbone vgg16: names what the file holds.
    let out = run(dltool()
        .args(["featurize", "--backbone", "vgg16", "--weights"])
        .arg(fixture("vgg19_tiny.safetensors"))
        .arg(&daisy));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("VGG19") && err.contains("VGG16"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // ResNet weights for VGG16.
    let out = run(dltool()
        .args(["featurize", "--backbone", "vgg16", "--weights"])
        .arg(fixture("resnet_tiny.safetensors"))
        .arg(&daisy));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("ResNet50") && err.contains("VGG16"), "{err}");

    // A layer ResNet does not have lists the ones it has.
    let out = run(dltool()
        .args(["featurize", "--layer", "fc7", "--weights"])
        .arg(fixture("resnet_tiny.safetensors"))
        .arg(&daisy));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("layer1, layer2, layer3, layer4, pool"),
        "{err}"
    );
}

#[test]
fn featurize_preprocesses_as_torchvision_and_runs_the_library_network() {
    use dltool::backbones::{resnet::ResNet, torchvision};
    use dltool::image_io::{self, Resize};
    let dir = tempfile::tempdir().unwrap();
    let weights = fixture("resnet_tiny.safetensors");
    // A landscape photo: a centre crop and a squash give different pixels.
    let photo = common::flowers("daisy", 1).remove(0);
    let img = image_io::decode_rgb8(&photo, image_io::DEFAULT_MAX_PIXELS).unwrap();
    assert_ne!(img.width(), img.height(), "{}", photo.display());
    let out = dir.path().join("f.safetensors");
    ok(dltool()
        .args(["featurize", "-q", "--weights"])
        .arg(&weights)
        .arg(&photo)
        .arg("-o")
        .arg(&out));
    let cli = read(&out).data;

    let pre = torchvision::preprocess();
    assert_eq!(
        (pre.width, pre.height, pre.resize),
        (224, 224, Resize::Crop)
    );
    let net = ResNet::load(&weights).unwrap();
    let run = |pre: &image_io::Preprocess| {
        let pixels = image_io::preprocess_rgb8(&img, pre).unwrap();
        net.features(&pixels, 1, [224, 224], "pool", dltool::backbone::Pool::Avg)
    };
    let lib = run(&pre);
    let scale = lib.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(
        max_diff(&cli, &lib) <= 1e-5 * scale,
        "CLI and library features differ"
    );
    let squashed = run(&image_io::Preprocess {
        resize: Resize::Stretch,
        ..pre
    });
    assert!(
        max_diff(&cli, &squashed) > 1e-3 * scale,
        "the crop made no difference"
    );
}

fn xception_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/xception")
        .join(name)
}

/// `n` labels `class 0`, `class 1`, ... in `dir/labels.txt`.
fn labels(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("labels.txt");
    let text: String = (0..n).map(|i| format!("class {i}\n")).collect();
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn xception_runs_the_chain_and_classifies() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    let names = photo_dir(&root, 2);
    let d = |name: &str| dir.path().join(name);
    let weights = xception_fixture("xception_tiny.safetensors");

    // Recognised from timm's tensor names; `pool` by default.
    ok(dltool()
        .args(["featurize", "-q", "--weights"])
        .arg(&weights)
        .arg(&root)
        .arg("-o")
        .arg(d("f.safetensors")));
    let pool = read(&d("f.safetensors"));
    assert_eq!((pool.len(), pool.dim), (names.len(), 256));
    let meta = pool.meta.clone().unwrap();
    assert_eq!(
        (meta.backbone.as_str(), meta.layer.as_str()),
        ("xception/keras", "pool")
    );
    // `pool` is the average of act4.
    ok(dltool()
        .args([
            "featurize",
            "-q",
            "--backbone",
            "xception",
            "--layer",
            "act4",
        ])
        .arg("--weights")
        .arg(&weights)
        .arg(&root)
        .arg("-o")
        .arg(d("a4.safetensors")));
    let a4 = read(&d("a4.safetensors"));
    assert!(
        max_diff(&a4.data, &pool.data)
            <= 1e-5 * pool.data.iter().fold(1.0f32, |m, v| m.max(v.abs()))
    );
    // Unpooled middle flow: 96 channels x 19 x 19 at 299.
    ok(dltool()
        .args(["featurize", "-q", "--layer", "middle", "--pool", "none"])
        .arg("--weights")
        .arg(&weights)
        .arg(root.join("daisy"))
        .arg("-o")
        .arg(d("m.safetensors")));
    assert_eq!(read(&d("m.safetensors")).dim, 96 * 19 * 19);

    // A head, then predict from images: the head reloads Xception and agrees with itself.
    ok(dltool()
        .args(["train-head", "-q"])
        .arg(d("f.safetensors"))
        .arg("-o")
        .arg(d("head.safetensors")));
    let from_images = ok(dltool()
        .args(["predict", "-q"])
        .arg(d("head.safetensors"))
        .arg("--weights")
        .arg(&weights)
        .arg(&root));
    let from_features = ok(dltool()
        .args(["predict", "-q"])
        .arg(d("head.safetensors"))
        .arg("--features")
        .arg(d("f.safetensors")));
    assert_eq!(
        classes_by_file(&from_images),
        classes_by_file(&from_features)
    );
    assert_eq!(classes_by_file(&from_images).len(), names.len());

    let out = ok(dltool()
        .args(["classify", "--top-k", "2", "--backbone", "xception"])
        .arg("--weights")
        .arg(&weights)
        .arg("--labels")
        .arg(labels(dir.path(), 10))
        .arg(root.join("daisy")));
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2 * 2, "{out}");
    assert!(rows.iter().all(|r| r.contains(",class ")), "{out}");

    // A layer Xception does not have lists the ones it has.
    let out = run(dltool()
        .args(["featurize", "--layer", "layer4", "--weights"])
        .arg(&weights)
        .arg(&root));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("block1, block2, block3, middle, exit, act4, pool"),
        "{err}"
    );
}

/// A full-size state dict with timm's exact names and shapes (random values, written at test
/// time from the committed list) through featurize and classify at 299x299.
#[test]
fn full_size_xception_featurizes_and_classifies_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    photo_dir(&root, 1);
    let weights = dir.path().join("xception.safetensors");
    let names = common::names_in(&xception_fixture("full_size_names.json"), "legacy_xception");
    common::write_random(&names, &weights);
    let out = dir.path().join("f.safetensors");
    ok(dltool()
        .args(["featurize", "-q", "--weights"])
        .arg(&weights)
        .arg(&root)
        .arg("-o")
        .arg(&out));
    let t = read(&out);
    assert_eq!(t.dim, 2048);
    assert!(t.data.iter().all(|v| v.is_finite()) && t.data.iter().any(|v| *v > 0.0));
    assert_eq!(t.meta.as_ref().unwrap().backbone, "xception/keras");
    let text = ok(dltool()
        .args(["classify", "--top-k", "1", "--weights"])
        .arg(&weights)
        .arg("--labels")
        .arg(labels(dir.path(), 1000))
        .arg(&root));
    assert_eq!(text.lines().count(), 1 + t.len(), "{text}");
}
