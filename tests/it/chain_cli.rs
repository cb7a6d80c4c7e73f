//! `split`, `train-head`, `evaluate` and `predict` as a user chains them, and their errors.

use crate::common;

use common::{
    blobs, dltool, fails_with, feature_meta as meta, ok, run, shared, shared_dir,
    write_table as write,
};
use std::path::{Path, PathBuf};

#[test]
fn split_is_stratified_deterministic_and_hash_stable() {
    let dir = tempfile::tempdir().unwrap();
    let all = write(
        dir.path(),
        "all.safetensors",
        &blobs(&["a", "b", "c"], 50, 4, 1),
    );
    let (tr, te) = (
        dir.path().join("train.csv"),
        dir.path().join("test.safetensors"),
    );
    let split = |seed: &str, extra: &[&str]| {
        ok(dltool()
            .arg("split")
            .arg(&all)
            .args(["--fractions", "0.6,0.4", "--seed", seed, "-q", "-o"])
            .arg(&tr)
            .arg("-o")
            .arg(&te)
            .args(extra));
        (
            dltool::features::read_features(&tr).unwrap(),
            dltool::features::read_features(&te).unwrap(),
        )
    };
    let (train, test) = split("42", &[]);
    assert_eq!((train.len(), test.len()), (90, 60));
    for class in ["a", "b", "c"] {
        assert_eq!(train.labels.iter().filter(|l| *l == class).count(), 30);
    }
    assert_eq!(test.meta, Some(meta()), "provenance survives a split");
    let (train2, _) = split("42", &[]);
    assert_eq!(train.paths, train2.paths, "same seed, same split");
    let (train3, _) = split("43", &[]);
    assert_ne!(train.paths, train3.paths, "another seed, another split");

    let (h_train, h_test) = split("0", &["--by-hash"]);
    assert_eq!(h_train.len() + h_test.len(), 150);
    // Adding rows never moves an existing row to the other side.
    let more = write(
        dir.path(),
        "more.safetensors",
        &blobs(&["a", "b", "c", "d"], 60, 4, 1),
    );
    let (tr2, te2) = (dir.path().join("t2.csv"), dir.path().join("e2.csv"));
    ok(dltool()
        .arg("split")
        .arg(&more)
        .args(["--by-hash", "-q", "-o"])
        .arg(&tr2)
        .arg("-o")
        .arg(&te2));
    let bigger_test = dltool::features::read_features(&te2).unwrap();
    for p in &h_test.paths {
        assert!(bigger_test.paths.contains(p), "{p} changed sides");
    }

    fails_with(
        dltool()
            .arg("split")
            .arg(&all)
            .args(["--fractions", "0.5,0.3,0.2", "-o"])
            .arg(&tr)
            .arg("-o")
            .arg(&te),
        "one -o per fraction",
    );
}

#[test]
fn logistic_and_mlp_heads_train_evaluate_and_predict_features() {
    let dir = tempfile::tempdir().unwrap();
    let train = write(
        dir.path(),
        "train.safetensors",
        &blobs(&["daisy", "roses", "tulips"], 40, 12, 2),
    );
    let test = write(
        dir.path(),
        "test.csv",
        &blobs(&["daisy", "roses", "tulips"], 20, 12, 3),
    );
    let head = dir.path().join("head.safetensors");
    ok(dltool()
        .arg("train-head")
        .arg(&train)
        .arg("-o")
        .arg(&head)
        .args([
            "--head",
            "logistic",
            "--reg",
            "0.05",
            "--elastic-net",
            "0.3",
            "-q",
        ]));

    let report = ok(dltool().arg("evaluate").arg(&head).arg(&test));
    assert!(report.contains("accuracy"), "{report}");
    assert!(report.contains("true \\ predicted"), "{report}");
    let json: serde_json::Value = serde_json::from_str(&ok(dltool()
        .arg("evaluate")
        .arg(&head)
        .arg(&test)
        .args(["--json", "--errors", "3"])))
    .unwrap();
    let accuracy = json["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.95, "logistic accuracy {accuracy}");
    assert_eq!(json["per_class"].as_array().unwrap().len(), 3);
    assert_eq!(json["confusion"].as_array().unwrap().len(), 3);
    // As many mistakes as the accuracy leaves (up to the 3 asked for), each one really wrong.
    let rows = json["rows"].as_u64().unwrap() as f64;
    let wrong = ((1.0 - accuracy) * rows).round() as usize;
    let errors = json["errors"].as_array().unwrap();
    assert_eq!(errors.len(), wrong.min(3), "{json}");
    for e in errors {
        assert_ne!(e["truth"], e["predicted"], "{e}");
    }

    let csv = ok(dltool()
        .arg("predict")
        .arg(&head)
        .arg("--features")
        .arg(&test));
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "path,prediction,probability,p_daisy,p_roses,p_tulips"
    );
    let first: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(first[0], "photos/daisy/0.jpg");
    assert_eq!(first[1], "daisy");
    let p: Vec<f64> = first[3..].iter().map(|x| x.parse().unwrap()).collect();
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    assert_eq!(first[2].parse::<f64>().unwrap(), p[0]);
    let top = ok(dltool()
        .arg("predict")
        .arg(&head)
        .arg("--features")
        .arg(&test)
        .args(["--top-k", "2", "--format", "jsonl"]));
    let row: serde_json::Value = serde_json::from_str(top.lines().next().unwrap()).unwrap();
    assert_eq!(row["top"].as_array().unwrap().len(), 2);
    assert_eq!(row["prediction"], "daisy");

    let mlp = dir.path().join("mlp.safetensors");
    ok(dltool()
        .arg("train-head")
        .arg(&train)
        .arg("-o")
        .arg(&mlp)
        .args([
            "--head", "mlp", "--hidden", "16", "--epochs", "60", "--seed", "1", "-q",
        ]));
    let json: serde_json::Value = serde_json::from_str(&ok(dltool()
        .arg("evaluate")
        .arg(&mlp)
        .arg(&test)
        .arg("--json")))
    .unwrap();
    assert!(
        json["accuracy"].as_f64().unwrap() > 0.95,
        "mlp accuracy {}",
        json["accuracy"]
    );
    // The same seed gives the same head, byte for byte.
    let mlp2 = dir.path().join("mlp2.safetensors");
    ok(dltool()
        .arg("train-head")
        .arg(&train)
        .arg("-o")
        .arg(&mlp2)
        .args([
            "--head", "mlp", "--hidden", "16", "--epochs", "60", "--seed", "1", "-q",
        ]));
    assert!(
        std::fs::read(&mlp).unwrap() == std::fs::read(&mlp2).unwrap(),
        "same seed, same bytes"
    );

    // --no-standardize reaches the MLP: the head records it and keeps an identity transform.
    let raw = dir.path().join("mlp-raw.safetensors");
    ok(dltool()
        .arg("train-head")
        .arg(&train)
        .arg("-o")
        .arg(&raw)
        .args([
            "--head",
            "mlp",
            "--hidden",
            "16",
            "--epochs",
            "60",
            "--seed",
            "1",
            "--no-standardize",
            "-q",
        ]));
    let dltool::head::HeadModel::Mlp { model, params } =
        dltool::head::Head::load(&raw).unwrap().model
    else {
        panic!("an mlp head");
    };
    assert!(!params.standardize);
    assert!(model.mean.iter().all(|&m| m == 0.0) && model.std.iter().all(|&s| s == 1.0));
    let dltool::head::HeadModel::Mlp { params, .. } = dltool::head::Head::load(&mlp).unwrap().model
    else {
        panic!("an mlp head");
    };
    assert!(params.standardize, "standardized by default");
}

#[test]
fn bad_feature_files_and_heads_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = write(d, "train.safetensors", &blobs(&["a", "b"], 20, 6, 4));
    let head = d.join("head.safetensors");
    ok(dltool()
        .arg("train-head")
        .arg(&train)
        .arg("-o")
        .arg(&head)
        .arg("-q"));

    // Wrong width.
    let wide = write(d, "wide.safetensors", &blobs(&["a", "b"], 5, 7, 5));
    fails_with(dltool().arg("evaluate").arg(&head).arg(&wide), "7 columns");
    // NaN in a CSV.
    let mut csv = String::from("path,label,f0,f1\nx.jpg,a,1.0,NaN\n");
    std::fs::write(d.join("nan.csv"), &csv).unwrap();
    fails_with(
        dltool()
            .arg("train-head")
            .arg(d.join("nan.csv"))
            .arg("-o")
            .arg(d.join("h.st")),
        "nan.csv",
    );
    // No rows.
    csv = "path,label,f0,f1\n".into();
    std::fs::write(d.join("empty.csv"), &csv).unwrap();
    fails_with(
        dltool()
            .arg("train-head")
            .arg(d.join("empty.csv"))
            .arg("-o")
            .arg(d.join("h.st")),
        "empty.csv",
    );
    // One class only.
    let one = write(d, "one.safetensors", &blobs(&["a"], 10, 6, 6));
    fails_with(
        dltool()
            .arg("train-head")
            .arg(&one)
            .arg("-o")
            .arg(d.join("h.st")),
        "only one class",
    );
    // Labels the head never saw.
    let other = write(d, "other.safetensors", &blobs(&["a", "zebra"], 5, 6, 7));
    fails_with(
        dltool().arg("evaluate").arg(&head).arg(&other),
        "'zebra' (5 rows)",
    );
    // Features from another layer.
    let mut t = blobs(&["a", "b"], 5, 6, 8);
    t.meta.as_mut().unwrap().layer = "mixed_6e".into();
    let other_layer = write(d, "layer.safetensors", &t);
    fails_with(
        dltool().arg("evaluate").arg(&head).arg(&other_layer),
        "layer mixed_6e",
    );
    // A corrupt head.
    let mut bytes = std::fs::read(&head).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(d.join("corrupt.safetensors"), &bytes).unwrap();
    fails_with(
        dltool()
            .arg("evaluate")
            .arg(d.join("corrupt.safetensors"))
            .arg(&train),
        "corrupt.safetensors",
    );
    fails_with(
        dltool().arg("evaluate").arg(&train).arg(&train),
        "not a dltool head",
    );
    // A head from another dltool version.
    let future = rewrite_metadata(&head, d, "dltool_version", "9.1.0");
    fails_with(
        dltool().arg("evaluate").arg(&future).arg(&train),
        "made by dltool 9.1.0",
    );
    // Hyper-parameters out of range.
    fails_with(
        dltool()
            .arg("train-head")
            .arg(&train)
            .arg("-o")
            .arg(d.join("h.st"))
            .args(["--elastic-net", "1.5"]),
        "elastic",
    );
}

/// A copy of a safetensors file with one metadata value changed.
fn rewrite_metadata(src: &Path, dir: &Path, key: &str, value: &str) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    meta.insert(key.into(), value.into());
    let tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let out = dir.join(format!("rewritten-{key}.safetensors"));
    safetensors::serialize_to_file(tensors, &Some(meta), &out).unwrap();
    out
}

#[test]
fn predict_runs_images_through_the_heads_own_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A head on real features of four photos (two classes) is enough to exercise the chain.
    let photos = d.join("photos");
    for class in ["daisy", "tulips"] {
        std::fs::create_dir_all(photos.join(class)).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(shared_dir().join("flowers").join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in &files[..2] {
            std::os::unix::fs::symlink(f, photos.join(class).join(f.file_name().unwrap())).unwrap();
        }
    }
    let feats = d.join("f.safetensors");
    ok(dltool()
        .arg("featurize")
        .arg(&photos)
        .arg("-o")
        .arg(&feats)
        .arg("-q"));
    let head = d.join("head.safetensors");
    ok(dltool()
        .arg("train-head")
        .arg(&feats)
        .arg("-o")
        .arg(&head)
        .args(["--reg", "0.01", "-q"]));

    std::fs::write(photos.join("daisy/broken.jpg"), b"nope").unwrap();
    let out = run(dltool()
        .arg("predict")
        .arg(&head)
        .arg(&photos)
        .args(["--top-k", "1"]));
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "path,prediction,probability,top1,p1");
    assert_eq!(lines.len(), 5, "header + 4 images: {text}");
    for line in &lines[1..] {
        let fields: Vec<&str> = line.split(',').collect();
        let truth = if fields[0].contains("/daisy/") {
            "daisy"
        } else {
            "tulips"
        };
        assert_eq!(
            fields[1], truth,
            "training images are predicted as their class"
        );
    }
    assert!(String::from_utf8_lossy(&out.stderr).contains("broken.jpg: not an image"));

    // Other weights than the head's: refused. (A copy of the weights with one tensor changed.)
    let bytes = std::fs::read(shared("weights/inception_v3_tf2015.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> = st.tensors();
    let bias = st.tensor("Conv2d_1a_3x3.bn.bias").unwrap();
    let changed: Vec<u8> = bias.data().iter().map(|b| b ^ 1).collect();
    for t in tensors.iter_mut() {
        if t.0 == "Conv2d_1a_3x3.bn.bias" {
            t.1 =
                safetensors::tensor::TensorView::new(bias.dtype(), bias.shape().to_vec(), &changed)
                    .unwrap();
        }
    }
    let other = d.join("other.safetensors");
    safetensors::serialize_to_file(tensors, header.metadata(), &other).unwrap();
    fails_with(
        dltool()
            .arg("predict")
            .arg(&head)
            .arg(&photos)
            .arg("--weights")
            .arg(&other),
        "pass the same weights",
    );
}
