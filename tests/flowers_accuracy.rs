//! The Spark Deep Learning Pipelines example on ../shared/flowers, end to end through the CLI:
//! featurize (InceptionV3 mixed_7c, avg), stratified 60/40 split (seed 42), train, evaluate.
//!
//! Spark's example reported 0.975 on daisy vs tulips (one random split, Keras' 2016 InceptionV3).
//! With the shared 2015 weights the split matters more than the head: over 20 seeds the seed
//! recipe averages 0.968 on daisy vs tulips (0.944 to 0.988), and seed 42 gives 0.969; L2
//! logistic averages 0.885 on five classes over seeds 0-4, seed 42 gives 0.8675. The floors
//! below sit just under the seed-42 figures, which are deterministic, so any regression in the
//! features, the split or the solvers fails the test. BENCHMARKS.md records the figures.

mod common;

use common::{dltool, ok, shared_dir};
use dltool::features::{Format, read_features, write_features};
use std::path::Path;

/// Splits 60/40 with seed 42, trains a head with `train_args`, returns test accuracy.
fn accuracy(dir: &Path, features: &Path, name: &str, train_args: &[&str]) -> f64 {
    let train = dir.join(format!("{name}-train.safetensors"));
    let test = dir.join(format!("{name}-test.safetensors"));
    ok(dltool()
        .arg("split")
        .arg(features)
        .args(["--fractions", "0.6,0.4", "--seed", "42", "-o"])
        .arg(&train)
        .arg("-o")
        .arg(&test));
    let head = dir.join(format!("{name}-head.safetensors"));
    ok(dltool()
        .arg("train-head")
        .arg(&train)
        .arg("-o")
        .arg(&head)
        .args(train_args));
    let report = ok(dltool().arg("evaluate").arg(&head).arg(&test));
    eprintln!("{name}:\n{report}");
    let json: serde_json::Value = serde_json::from_str(&ok(dltool()
        .arg("evaluate")
        .arg(&head)
        .arg(&test)
        .arg("--json")))
    .unwrap();
    json["accuracy"].as_f64().unwrap()
}

#[test]
fn flowers_heads_reach_the_spark_example_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let all = d.join("flowers.safetensors");
    ok(dltool()
        .arg("featurize")
        .arg(shared_dir().join("flowers"))
        .arg("-o")
        .arg(&all));
    let table = read_features(&all).unwrap();
    assert_eq!(table.len(), 1000);

    let rows: Vec<usize> = (0..table.len())
        .filter(|&i| table.labels[i] == "daisy" || table.labels[i] == "tulips")
        .collect();
    let binary = d.join("daisy-tulips.safetensors");
    write_features(&binary, Format::Safetensors, &table.select(&rows)).unwrap();
    let seed_recipe = [
        "--head",
        "logistic",
        "--reg",
        "0.05",
        "--elastic-net",
        "0.3",
    ];
    let acc = accuracy(d, &binary, "daisy-tulips", &seed_recipe);
    eprintln!("daisy vs tulips, logistic reg 0.05 elastic-net 0.3: test accuracy {acc:.4}");
    assert!(acc >= 0.965, "daisy vs tulips accuracy {acc} < 0.965");

    let l2 = ["--head", "logistic", "--reg", "0.05", "--elastic-net", "0"];
    let logistic = accuracy(d, &all, "five-logistic", &l2);
    eprintln!("five classes, logistic: test accuracy {logistic:.4}");
    assert!(
        logistic >= 0.86,
        "five-class logistic accuracy {logistic} < 0.86"
    );

    let mlp_args = [
        "--head",
        "mlp",
        "--hidden",
        "1024",
        "--dropout",
        "0.5",
        "--patience",
        "20",
        "--seed",
        "1",
    ];
    let mlp = accuracy(d, &all, "five-mlp", &mlp_args);
    eprintln!("five classes, mlp: test accuracy {mlp:.4}");
    assert!(mlp >= 0.85, "five-class mlp accuracy {mlp} < 0.85");
}
