//! Scaling out: `featurize --shard K/N`, rows streamed from paths on stdin, and Parquet feature
//! files read back by the rest of the chain.

use crate::common;

use common::{dltool, line_reader, ok, photo_dir, run};
use dltool::features::{self, FeatureTable};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn featurize(args: &[&str]) -> Command {
    let mut cmd = dltool();
    cmd.arg("featurize").arg("--quiet").args(args);
    cmd
}

fn stdout_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = run(cmd);
    assert!(out.status.success(), "command failed: {:?}", out.status);
    out.stdout
}

fn assert_same_table(a: &FeatureTable, b: &FeatureTable) {
    assert_eq!(a.paths, b.paths);
    assert_eq!(a.labels, b.labels);
    assert_eq!(a.dim, b.dim);
    let bits = |t: &FeatureTable| t.data.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert!(bits(a) == bits(b), "features differ");
}

#[test]
fn shards_concatenated_are_one_run_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    let names = photo_dir(&root, 4);
    let root = root.to_str().unwrap();
    // A file that cannot be decoded lands in one shard and is skipped there, as in one run.
    std::fs::write(dir.path().join("photos/daisy/broken.jpg"), b"not a jpeg").unwrap();

    let whole = stdout_bytes(&mut featurize(&[root]));
    let text = String::from_utf8(whole.clone()).unwrap();
    assert_eq!(
        text.lines().count(),
        1 + names.len(),
        "header + one row per photo"
    );

    // 3 shards of 9 inputs; shards 1 and 2 without the header so that `cat` gives one file.
    let mut joined = Vec::new();
    for k in 0..3 {
        let shard = format!("{k}/3");
        let mut args = vec![root, "--shard", &shard];
        if k > 0 {
            args.push("--no-header");
        }
        let part = stdout_bytes(&mut featurize(&args));
        assert!(!part.is_empty());
        joined.extend(part);
    }
    assert!(joined == whole, "concatenated shards differ from one run");

    // More shards than inputs: some are empty, and an empty shard is not a failure. (A shard
    // holding only the broken file would exit 2, as any run that featurizes nothing.)
    std::fs::remove_file(dir.path().join("photos/daisy/broken.jpg")).unwrap();
    let mut rows = 0;
    for k in 0..12 {
        let shard = format!("{k}/12");
        let out = run(&mut featurize(&[root, "--shard", &shard, "--no-header"]));
        assert!(out.status.success(), "shard {shard}: {:?}", out.status);
        rows += out.stdout.iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(rows, names.len());

    // File shards (Parquet here) are read back as one table from their directory, in name
    // order, and equal one Parquet run.
    let parts = dir.path().join("parts");
    std::fs::create_dir(&parts).unwrap();
    for k in 0..2 {
        let out = parts.join(format!("features-{k}.parquet"));
        let shard = format!("{k}/2");
        ok(&mut featurize(&[
            root,
            "--shard",
            &shard,
            "-o",
            out.to_str().unwrap(),
        ]));
    }
    let one = dir.path().join("one.parquet");
    ok(&mut featurize(&[root, "-o", one.to_str().unwrap()]));
    let from_parts = features::read_features(&parts).unwrap();
    let from_one = features::read_features(&one).unwrap();
    assert_same_table(&from_parts, &from_one);
    assert_eq!(from_one.len(), names.len());
}

#[test]
fn bad_shard_and_header_options_are_refused_clearly() {
    let out = run(&mut featurize(&[".", "--shard", "3/3"]));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'3/3'") && err.contains("numbered 0 to 2"),
        "{err}"
    );

    let out = run(&mut featurize(&[".", "--shard", "1-3"]));
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("0 <= K < N"));

    let out = run(&mut featurize(&[".", "-o", "x.parquet", "--no-header"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-header is for CSV output"));

    let out = run(&mut featurize(&[".", "--format", "parquet"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("-o FILE.parquet"));
}

/// Reads lines from `stdout` on a thread, so a test can wait for one with a timeout instead of
/// hanging if the rows never come.
fn next_line(rx: &mpsc::Receiver<String>, what: &str) -> String {
    rx.recv_timeout(Duration::from_secs(180))
        .unwrap_or_else(|_| panic!("no {what} on stdout while stdin stays open"))
}

#[test]
fn rows_stream_out_while_stdin_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    let names = photo_dir(&root, 2);
    let paths: Vec<String> = names
        .iter()
        .map(|n| root.join(n).to_str().unwrap().to_string())
        .collect();

    let mut child = featurize(&["-", "--batch-size", "8"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let rows = line_reader(child.stdout.take().unwrap());

    let header = next_line(&rows, "header");
    assert!(header.starts_with("path,label,f0,f1,"), "{header}");
    let mut streamed = vec![header];
    // One path at a time, each row read back before the next path is written: the batch of 8
    // is never full, yet every row comes.
    for (i, p) in paths.iter().enumerate() {
        writeln!(stdin, "{p}").unwrap();
        stdin.flush().unwrap();
        let row = next_line(&rows, &format!("row {i}"));
        assert!(row.starts_with(&format!("{p},")), "row {i}: {}", &row[..80]);
        streamed.push(row);
    }
    // A missing file is reported and skipped without blocking the rows after it.
    writeln!(stdin, "{}/nope.jpg\n{}", dir.path().display(), paths[0]).unwrap();
    stdin.flush().unwrap();
    let again = next_line(&rows, "row after a skipped path");
    assert_eq!(again, streamed[1], "the same image gives the same row");
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert!(
        rows.recv_timeout(Duration::from_secs(10)).is_err(),
        "no extra rows"
    );

    // The streamed rows are the rows of an ordinary run over the same list.
    let mut whole = featurize(&["-"]);
    whole.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut child = whole.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n", paths.join("\n")).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let expected: Vec<&str> = text.lines().collect();
    assert_eq!(expected, streamed);
}

#[test]
fn parquet_features_feed_the_whole_chain() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    photo_dir(&root, 6);
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();

    ok(&mut featurize(&[
        root.to_str().unwrap(),
        "-o",
        &p("f.parquet"),
    ]));
    ok(&mut featurize(&[root.to_str().unwrap(), "-o", &p("f.csv")]));
    let parquet = features::read_features(Path::new(&p("f.parquet"))).unwrap();
    let csv = features::read_features(Path::new(&p("f.csv"))).unwrap();
    assert_eq!(parquet.paths, csv.paths);
    assert_eq!(parquet.labels, csv.labels);
    assert_eq!(parquet.data, csv.data);
    let meta = parquet
        .meta
        .as_ref()
        .expect("provenance in the key-value metadata");
    assert_eq!(meta.layer, "mixed_7c");
    assert!(
        meta.backbone.starts_with("inception_v3"),
        "{}",
        meta.backbone
    );
    assert_eq!(meta.weights_sha256.len(), 64);
    assert!(std::fs::read(p("f.parquet")).unwrap().starts_with(b"PAR1"));

    ok(dltool().args([
        "split",
        &p("f.parquet"),
        "--fractions",
        "0.5,0.5",
        "--seed",
        "1",
        "-o",
        &p("train.parquet"),
        "-o",
        &p("test.parquet"),
    ]));
    let train = features::read_features(Path::new(&p("train.parquet"))).unwrap();
    assert_eq!(train.len(), 6);
    assert_eq!(train.meta, parquet.meta, "split keeps the provenance");
    ok(dltool().args([
        "train-head",
        &p("train.parquet"),
        "-o",
        &p("head.safetensors"),
        "--quiet",
    ]));
    let report = ok(dltool().args(["evaluate", &p("head.safetensors"), &p("test.parquet")]));
    assert!(report.contains("accuracy"), "{report}");
    let predictions = ok(dltool().args([
        "predict",
        &p("head.safetensors"),
        "--features",
        &p("test.parquet"),
    ]));
    assert_eq!(predictions.lines().count(), 1 + 6, "{predictions}");
}
