//! `dltool tune` as a user runs it: the table, the JSON, the best head, bad grids, Ctrl-C.

use crate::common;

use common::{blobs_with, dltool, fails_with, ok, run, write_table as write};
use dltool::features::FeatureTable;
use dltool::head::{Head, HeadModel};
use std::path::Path;
use std::process::Command;

/// Classes that overlap, so that parameters change the scores.
fn overlapping(classes: &[&str], per_class: usize, dim: usize, seed: u64) -> FeatureTable {
    blobs_with(classes, per_class, dim, seed, 1.0, 2.0)
}

fn tune(features: &Path, args: &[&str]) -> Command {
    let mut cmd = dltool();
    cmd.arg("tune").arg(features).args(args);
    cmd
}

/// The table's data rows: (marked best, parameter cells, mean).
fn table_rows(stdout: &str) -> Vec<(bool, Vec<String>, f64)> {
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(header[0], "rank", "{stdout}");
    lines
        .map(|l| {
            let best = l.trim_start().starts_with('*');
            let cells: Vec<String> = l
                .trim_start_matches([' ', '*'])
                .split_whitespace()
                .map(String::from)
                .collect();
            let params = cells[1..cells.len() - 3].to_vec();
            let mean = cells[cells.len() - 3].parse().expect("a mean");
            (best, params, mean)
        })
        .collect()
}

#[test]
fn table_is_ranked_and_the_best_head_is_retrained_on_all_rows() {
    let dir = tempfile::tempdir().unwrap();
    let features = write(
        dir.path(),
        "train.safetensors",
        &overlapping(&["a", "b", "c"], 40, 6, 1),
    );
    let head = dir.path().join("best.safetensors");
    let out = run(tune(
        &features,
        &[
            "--grid",
            "reg=0.001,0.3,3",
            "--grid",
            "elastic-net=0,1",
            "--folds",
            "4",
            "--seed",
            "5",
        ],
    )
    .arg("-o")
    .arg(&head));
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stdout.lines().next().unwrap().contains("f1 mean"),
        "{stdout}"
    );
    let rows = table_rows(&stdout);
    assert_eq!(rows.len(), 6, "{stdout}");
    assert_eq!(rows.iter().filter(|r| r.0).count(), 1, "one best: {stdout}");
    assert!(rows[0].0, "the best comes first: {stdout}");
    assert!(
        rows.windows(2).all(|w| w[0].2 >= w[1].2),
        "sorted by mean: {stdout}"
    );
    // Strong L1 (reg 3, elastic-net 1) zeroes every coefficient: the worst row.
    assert_eq!(rows[5].1, ["3", "1"], "{stdout}");
    assert!(
        stderr.contains("best of 6 combinations by 4-fold f1"),
        "{stderr}"
    );

    let saved = Head::load(&head).unwrap();
    assert_eq!(saved.training.rows, 120, "retrained on all rows");
    assert_eq!(saved.classes, ["a", "b", "c"]);
    let HeadModel::Logistic { params, .. } = &saved.model else {
        panic!("a logistic head")
    };
    assert_eq!(
        [params.reg.to_string(), params.elastic_net.to_string()],
        [rows[0].1[0].clone(), rows[0].1[1].clone()],
        "the saved head has the best parameters"
    );
    let report: serde_json::Value = serde_json::from_str(&ok(dltool()
        .arg("evaluate")
        .arg(&head)
        .arg(&features)
        .arg("--json")))
    .unwrap();
    assert!(report["accuracy"].as_f64().unwrap() > 0.6, "{report}");
}

/// Drops every "seconds" field: the only thing allowed to differ between runs.
fn without_times(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.remove("seconds");
            map.values_mut().for_each(without_times);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(without_times),
        _ => {}
    }
}

#[test]
fn json_is_the_same_whatever_the_thread_count() {
    let dir = tempfile::tempdir().unwrap();
    let features = write(
        dir.path(),
        "train.safetensors",
        &overlapping(&["a", "b", "c"], 30, 6, 2),
    );
    let grids: [&[&str]; 2] = [
        &["--grid", "reg=0.01,0.1,1", "--grid", "elastic-net=0,0.5"],
        &[
            "--head",
            "mlp",
            "--epochs",
            "5",
            "--grid",
            "hidden=8,4:4,none",
            "--grid",
            "dropout=0,0.3",
            "--metric",
            "logloss",
        ],
    ];
    for grid in grids {
        let json = |threads: &str| {
            let text = ok(tune(&features, grid).args([
                "--json",
                "--folds",
                "3",
                "--seed",
                "9",
                "--threads",
                threads,
            ]));
            let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["results"].as_array().unwrap().len(), 6, "{text}");
            assert!(v["results"][0]["seconds"].as_f64().unwrap() > 0.0, "{text}");
            without_times(&mut v);
            v
        };
        let one = json("1");
        assert_eq!(one, json("2"), "--threads 1 and 2 disagree on {grid:?}");
        assert_eq!(one["interrupted"], false);
        assert_eq!(one["best"], one["results"][0]["grid"]);
        let scores = one["results"][0]["folds"].as_array().unwrap();
        assert_eq!(scores.len(), 3);
        // Another seed gives other folds, so other scores.
        let mut other: serde_json::Value =
            serde_json::from_str(&ok(tune(&features, grid).args(["--json", "--folds", "3"])))
                .unwrap();
        without_times(&mut other);
        assert_ne!(one["results"], other["results"]);
    }
}

#[test]
fn bad_grids_and_folds_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = overlapping(&["a", "b"], 10, 4, 3);
    // A small class of 3 rows.
    let small = overlapping(&["rare"], 3, 4, 4);
    table.paths.extend(small.paths);
    table.labels.extend(small.labels);
    table.data.extend(small.data);
    let features = write(dir.path(), "train.csv", &table);
    let name = features.display().to_string();
    fails_with(
        &mut tune(&features, &["--grid", "alpha=1,2", "--folds", "3"]),
        "unknown parameter 'alpha' (the logistic head takes reg, elastic-net",
    );
    fails_with(
        &mut tune(&features, &["--grid", "reg=", "--folds", "3"]),
        "empty list",
    );
    fails_with(
        &mut tune(
            &features,
            &["--grid", "reg=0.1", "--grid", "reg=1", "--folds", "3"],
        ),
        "'reg' is given twice",
    );
    fails_with(
        &mut tune(&features, &["--grid", "elastic-net=0,two", "--folds", "3"]),
        "'two' is not a number",
    );
    fails_with(
        &mut tune(&features, &["--grid", "hidden=64", "--folds", "3"]),
        "not a parameter of the logistic head",
    );
    fails_with(&mut tune(&features, &["--folds", "1"]), "at least 2 folds");
    let err = fails_with(
        &mut tune(&features, &["--grid", "reg=0.1"]),
        "--folds 5: class 'rare' has only 3 row(s)",
    );
    assert!(err.contains(&name), "names the file: {err}");
    fails_with(
        &mut tune(&dir.path().join("missing.csv"), &["--grid", "reg=0.1"]),
        "missing.csv",
    );
    // CSV features tune without the weights (provenance is needed only for -o).
    let mut cmd = tune(&features, &["--grid", "reg=0.1,1", "--folds", "3"]);
    cmd.env("DLTOOL_WEIGHTS", dir.path().join("no-weights.safetensors"));
    assert_eq!(table_rows(&ok(&mut cmd)).len(), 2);
}

#[cfg(unix)]
#[test]
fn ctrl_c_prints_the_finished_combinations_and_writes_no_head() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let features = write(
        dir.path(),
        "train.safetensors",
        &overlapping(&["a", "b", "c"], 100, 16, 6),
    );
    let head = dir.path().join("best.safetensors");
    // Combinations alternate between one epoch (done at once) and a hundred thousand (hours,
    // without early stopping), so the search is certainly still running when interrupted.
    let child = tune(
        &features,
        &[
            "--head",
            "mlp",
            "--validation-fraction",
            "0",
            "--hidden",
            "16",
            "--grid",
            "lr=0.001,0.002,0.003,0.004",
            "--grid",
            "epochs=1,100000",
        ],
    )
    .arg("-o")
    .arg(&head)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let start = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        start.elapsed()
    );
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted: "), "{stderr}");
    assert!(
        stderr.contains("of 8 combinations finished all 5 folds"),
        "{stderr}"
    );
    assert!(stderr.contains("best.safetensors not written"), "{stderr}");
    assert!(!head.exists());
    // The one-epoch combination that starts the grid finished; no 100000-epoch one could.
    let rows = table_rows(&stdout);
    assert!(!rows.is_empty(), "{stdout}");
    assert!(rows.iter().all(|r| r.1[1] == "1"), "{stdout}");
    assert!(rows.iter().any(|r| r.1 == ["0.001", "1"]), "{stdout}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "only the features: {leftovers:?}");
}
