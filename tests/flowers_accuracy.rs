//! The Spark Deep Learning Pipelines example on ../shared/flowers, end to end through the CLI:
//! featurize (InceptionV3 mixed_7c, avg), stratified 60/40 split, train, evaluate.
//! Spark's example reported 0.975 on daisy vs tulips.

mod common;

use common::{shared, shared_dir};
use dltool::features::{Format, read_features, write_features};
use std::path::Path;
use std::process::{Command, Stdio};

fn dltool() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dltool"));
    cmd.env(
        "DLTOOL_WEIGHTS",
        shared("weights/inception_v3_tf2015.safetensors"),
    );
    cmd.stdin(Stdio::null());
    cmd
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("dltool runs");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "command failed: {:?}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

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
    assert!(acc >= 0.97, "daisy vs tulips accuracy {acc} < 0.97");

    let logistic = accuracy(d, &all, "five-logistic", &seed_recipe);
    eprintln!("five classes, logistic: test accuracy {logistic:.4}");
    assert!(
        logistic >= 0.88,
        "five-class logistic accuracy {logistic} < 0.88"
    );

    let mlp = accuracy(
        d,
        &all,
        "five-mlp",
        &[
            "--head",
            "mlp",
            "--hidden",
            "256",
            "--dropout",
            "0.2",
            "--seed",
            "1",
        ],
    );
    eprintln!("five classes, mlp: test accuracy {mlp:.4}");
    assert!(mlp >= logistic, "mlp {mlp} below logistic {logistic}");
}
