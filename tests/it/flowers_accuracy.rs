//! The Spark Deep Learning Pipelines example on ../shared/flowers, end to end through the CLI:
//! featurize (InceptionV3 mixed_7c, avg), stratified 60/40 split (seed 42), train, evaluate.
//!
//! Spark's example reported 0.975 on daisy vs tulips (one random split, Keras' 2016 InceptionV3).
//! With the shared 2015 weights the split matters more than the head: over 20 seeds the seed
//! recipe averages 0.968 on daisy vs tulips (0.944 to 0.988), and seed 42 gives 0.969; L2
//! logistic averages 0.885 on five classes over seeds 0-4, seed 42 gives 0.8675. The seed-42
//! figures are deterministic on one machine, but features that differ by 1e-5 (another SIMD
//! path, another summation order) move a split by a few test rows: each floor sits about eight
//! test rows of 400 (three of 160 for daisy vs tulips) under the measured figure, so noise
//! passes and a real regression (a broken layer, split or solver loses far more) fails.
//! BENCHMARKS.md records the figures.
//!
//! With `--tta flip` (each image and its mirror, features averaged) the logistic targets are met
//! on seed 42. The MLP that cross-validation on the training split picks (on raw features)
//! scores below logistic on seed 42 and equal to it on average over splits 0-9, which the test
//! checks too. Both settings come from `dltool tune` on the seed-42 training rows, not from a
//! test set.

use crate::common;

use common::{dltool, ok, shared_dir};
use dltool::features::{FeatureTable, Format, read_features, write_features};
use std::path::{Path, PathBuf};

/// Features of every flower with `featurize_args`, written to `dir/name`.
fn featurize_flowers(dir: &Path, name: &str, featurize_args: &[&str]) -> PathBuf {
    let all = dir.join(name);
    ok(dltool()
        .arg("featurize")
        .arg(shared_dir().join("flowers"))
        .args(featurize_args)
        .arg("-o")
        .arg(&all));
    all
}

/// The daisy and tulips rows of `all`, written beside it.
fn daisy_tulips(dir: &Path, table: &FeatureTable, name: &str) -> PathBuf {
    let rows: Vec<usize> = (0..table.len())
        .filter(|&i| table.labels[i] == "daisy" || table.labels[i] == "tulips")
        .collect();
    let binary = dir.join(name);
    write_features(&binary, Format::Safetensors, &table.select(&rows)).unwrap();
    binary
}

/// Spark's recipe for daisy vs tulips.
const SEED_RECIPE: [&str; 6] = [
    "--head",
    "logistic",
    "--reg",
    "0.05",
    "--elastic-net",
    "0.3",
];

/// Splits 60/40 with seed 42, trains a head with `train_args`, returns test accuracy.
fn accuracy(dir: &Path, features: &Path, name: &str, train_args: &[&str]) -> f64 {
    accuracy_on_split(dir, features, 42, name, train_args)
}

/// Splits 60/40 with `seed`, trains a head with `train_args`, returns test accuracy.
fn accuracy_on_split(
    dir: &Path,
    features: &Path,
    seed: u64,
    name: &str,
    train_args: &[&str],
) -> f64 {
    let train = dir.join(format!("{name}-train.safetensors"));
    let test = dir.join(format!("{name}-test.safetensors"));
    ok(dltool()
        .arg("split")
        .arg(features)
        .args(["--fractions", "0.6,0.4", "--seed", &seed.to_string(), "-o"])
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
    let all = featurize_flowers(d, "flowers.safetensors", &[]);
    let table = read_features(&all).unwrap();
    assert_eq!(table.len(), 1000);

    let binary = daisy_tulips(d, &table, "daisy-tulips.safetensors");
    let acc = accuracy(d, &binary, "daisy-tulips", &SEED_RECIPE);
    eprintln!("daisy vs tulips, logistic reg 0.05 elastic-net 0.3: test accuracy {acc:.4}");
    // Measured 0.9688 (160 test rows: one row is 0.00625).
    assert!(acc >= 0.95, "daisy vs tulips accuracy {acc} < 0.95");

    let l2 = ["--head", "logistic", "--reg", "0.05", "--elastic-net", "0"];
    let logistic = accuracy(d, &all, "five-logistic", &l2);
    eprintln!("five classes, logistic: test accuracy {logistic:.4}");
    // Measured 0.8675 (400 test rows: one row is 0.0025).
    assert!(
        logistic >= 0.845,
        "five-class logistic accuracy {logistic} < 0.845"
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
    // Measured 0.86.
    assert!(mlp >= 0.84, "five-class mlp accuracy {mlp} < 0.84");
}

#[test]
fn flip_tta_heads_on_seed_42_and_over_ten_splits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let all = featurize_flowers(d, "flowers-flip.safetensors", &["--tta", "flip"]);
    let table = read_features(&all).unwrap();
    assert_eq!(table.len(), 1000);
    assert_eq!(table.meta.as_ref().unwrap().tta, "flip");

    let binary = daisy_tulips(d, &table, "daisy-tulips-flip.safetensors");
    let acc = accuracy(d, &binary, "daisy-tulips-flip", &SEED_RECIPE);
    eprintln!("flip, daisy vs tulips, logistic reg 0.05 elastic-net 0.3: test accuracy {acc:.4}");
    // Measured 0.9812.
    assert!(
        acc >= 0.9625,
        "flip daisy vs tulips accuracy {acc} < 0.9625"
    );

    // The logistic setting `dltool tune` ranks first by 5-fold CV on the seed-42 training split
    // (grid reg 0.001..0.3, elastic-net 0/0.3, standardize true/false).
    let tuned = [
        "--head",
        "logistic",
        "--reg",
        "0.001",
        "--elastic-net",
        "0.3",
        "--no-standardize",
    ];
    let logistic = accuracy(d, &all, "five-flip-logistic", &tuned);
    eprintln!("flip, five classes, logistic (CV-chosen): test accuracy {logistic:.4}");
    // Measured 0.8925.
    assert!(
        logistic >= 0.87,
        "flip five-class logistic accuracy {logistic} < 0.87"
    );

    // The MLP that `dltool tune --seed 1` ranks first by 5-fold CV on the same training split
    // (grid standardize true/false, hidden 256/512, dropout 0.5/0.7, validation-fraction 0/0.1,
    // 100 epochs): raw features, no early stopping. Measured 0.885 (logistic: 0.8925).
    let mlp_args = [
        "--head",
        "mlp",
        "--hidden",
        "256",
        "--dropout",
        "0.7",
        "--validation-fraction",
        "0",
        "--epochs",
        "100",
        "--no-standardize",
        "--seed",
        "1",
    ];
    let mlp = accuracy(d, &all, "five-flip-mlp", &mlp_args);
    eprintln!("flip, five classes, mlp (CV-chosen): test accuracy {mlp:.4}");
    assert!(mlp >= 0.865, "flip five-class mlp accuracy {mlp} < 0.865");

    // One split decides little: both heads move by a point or more with the split, and the
    // seed-42 logistic figure moved 0.885 -> 0.8925 when the engine's rounding changed features
    // by ~1e-5. So the two CV-chosen settings are also compared over splits 0-9, unchanged.
    // Measured means: mlp 0.8873, logistic 0.8870 (each better on five splits).
    let (mut sum_mlp, mut sum_logistic) = (0.0, 0.0);
    for seed in 0..10 {
        let l = accuracy_on_split(d, &all, seed, &format!("flip-logistic-{seed}"), &tuned);
        let m = accuracy_on_split(d, &all, seed, &format!("flip-mlp-{seed}"), &mlp_args);
        eprintln!("flip, five classes, split seed {seed}: logistic {l:.4}, mlp {m:.4}");
        sum_logistic += l;
        sum_mlp += m;
    }
    let (mean_mlp, mean_logistic) = (sum_mlp / 10.0, sum_logistic / 10.0);
    eprintln!(
        "flip, five classes, splits 0-9: mean logistic {mean_logistic:.4}, mean mlp {mean_mlp:.4}"
    );
    // A mean over 4000 test rows moves little with noise: floors 0.007 (28 rows) under it.
    assert!(
        mean_logistic >= 0.88,
        "mean logistic accuracy {mean_logistic} < 0.88"
    );
    assert!(mean_mlp >= 0.88, "mean mlp accuracy {mean_mlp} < 0.88");
    // As good as logistic up to two test rows in 400 on average (noise can move each split's
    // pair by a row or two); an MLP that really falls behind fails.
    assert!(
        mean_mlp >= mean_logistic - 0.005,
        "mean mlp accuracy {mean_mlp} below mean logistic {mean_logistic} - 0.005"
    );
}
