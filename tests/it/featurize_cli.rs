//! `dltool featurize` as a user runs it: bad files, determinism, crash safety and resume.

use crate::common;

use common::{dltool, flowers, photo_dir, png_claiming, run};
use std::process::{Command, Stdio};

fn is_root() -> bool {
    // /proc/self/status "Uid:" line: real, effective, ...
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

#[test]
fn bad_files_are_skipped_with_a_reason_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("in");
    let good = flowers("daisy", 2);
    std::fs::create_dir_all(root.join("ok")).unwrap();
    std::fs::copy(&good[0], root.join("ok/good1.jpg")).unwrap();
    std::fs::copy(&good[1], root.join("ok/good2.jpg")).unwrap();

    let bad = root.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let jpeg = std::fs::read(&good[0]).unwrap();
    std::fs::write(bad.join("empty.jpg"), b"").unwrap();
    std::fs::write(bad.join("truncated.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
    let mut corrupt = jpeg.clone();
    for b in corrupt[600..].iter_mut().step_by(7) {
        *b = 0xff;
    }
    corrupt.truncate(4000);
    std::fs::write(bad.join("corrupt.jpg"), &corrupt).unwrap();
    std::fs::write(bad.join("notes.txt"), b"these are not pixels\n").unwrap();
    std::fs::write(bad.join("bomb.png"), png_claiming(100_000, 100_000)).unwrap();
    std::fs::write(bad.join("locked.jpg"), b"garbage that is no image").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        bad.join("locked.jpg"),
        std::fs::Permissions::from_mode(0o000),
    )
    .unwrap();
    std::os::unix::fs::symlink(bad.join("gone.jpg"), bad.join("broken.jpg")).unwrap();
    std::os::unix::fs::symlink(bad.join("loop2.jpg"), bad.join("loop1.jpg")).unwrap();
    std::os::unix::fs::symlink(bad.join("loop1.jpg"), bad.join("loop2.jpg")).unwrap();
    let fifo = bad.join("pipe.jpg");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success(),
        "mkfifo"
    );

    let arg = root.display().to_string();
    let out = run(dltool().args(["featurize", &arg]));
    assert_eq!(out.status.code(), Some(0), "at least one image featurized");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "only the two good images become rows");
    assert!(rows[0].starts_with(&format!("{arg}/ok/good1.jpg,ok,")));
    assert!(rows[1].starts_with(&format!("{arg}/ok/good2.jpg,ok,")));

    let stderr = String::from_utf8(out.stderr).unwrap();
    let reason = |name: &str| -> String {
        let prefix = format!("skipped {arg}/bad/{name}: ");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&prefix)).collect();
        assert_eq!(lines.len(), 1, "one line for {name} in:\n{stderr}");
        lines[0][prefix.len()..].to_string()
    };
    assert_eq!(reason("empty.jpg"), "empty file");
    // Both lack the end-of-image marker: the reason says what the file is and what is wrong.
    for name in ["truncated.jpg", "corrupt.jpg"] {
        let why = reason(name);
        assert!(
            why.starts_with("truncated or corrupt JPEG"),
            "{name}: {why}"
        );
    }
    assert!(reason("notes.txt").contains("not an image"));
    assert!(reason("bomb.png").contains("100000x100000"));
    if is_root() {
        // root reads any file: the garbage inside is what gets it skipped.
        assert!(reason("locked.jpg").contains("not an image"));
    } else {
        assert_eq!(reason("locked.jpg"), "permission denied");
    }
    assert_eq!(reason("broken.jpg"), "broken symlink");
    assert_eq!(reason("loop1.jpg"), "symlink loop");
    assert_eq!(reason("loop2.jpg"), "symlink loop");
    assert!(reason("pipe.jpg").contains("not a regular file"));
    assert!(
        stderr.contains("featurized 2 image(s), skipped 10"),
        "summary line in:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"));

    // --strict: the same run is incomplete.
    let out = run(dltool().args(["featurize", "--strict", "--quiet", &arg]));
    assert_eq!(out.status.code(), Some(2));
    // Nothing usable at all: exit 2.
    let bad_arg = bad.display().to_string();
    let out = run(dltool().args(["featurize", "--quiet", &bad_arg]));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no image was featurized"));
}

#[test]
fn output_is_identical_for_any_thread_count_batch_size_and_target() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    let names = photo_dir(&root, 3);
    let arg = root.display().to_string();

    let a = run(dltool().args([
        "featurize",
        "-q",
        "--threads",
        "1",
        "--batch-size",
        "1",
        &arg,
    ]));
    assert!(a.status.success());
    let b_out = dir.path().join("b.csv");
    let b = run(dltool()
        .args([
            "featurize",
            "-q",
            "--threads",
            "2",
            "--batch-size",
            "4",
            &arg,
            "-o",
        ])
        .arg(&b_out));
    assert!(b.status.success());
    assert!(b.stdout.is_empty(), "nothing on stdout with -o");
    let b_bytes = std::fs::read(&b_out).unwrap();
    assert!(a.stdout == b_bytes, "byte-identical CSV");

    // Rows in sorted order, labelled by folder, and the binary format holds the same numbers.
    let csv = dltool::features::read_features(&b_out).unwrap();
    let shown: Vec<String> = csv
        .paths
        .iter()
        .map(|p| p.strip_prefix(&format!("{arg}/")).unwrap().to_string())
        .collect();
    assert_eq!(shown, names);
    assert_eq!(csv.labels[0], "daisy");
    assert_eq!(csv.labels[5], "tulips");
    let st_out = dir.path().join("c.safetensors");
    let c = run(dltool()
        .args(["featurize", "-q", "--batch-size", "3", &arg, "-o"])
        .arg(&st_out));
    assert!(c.status.success());
    let st = dltool::features::read_features(&st_out).unwrap();
    assert_eq!(st.paths, csv.paths);
    assert_eq!(st.labels, csv.labels);
    assert!(
        st.data == csv.data,
        "CSV parses back to the exact f32 values"
    );
    let meta = st.meta.expect("provenance in safetensors");
    assert_eq!(meta.layer, "mixed_7c");
    assert_eq!(meta.pool, "avg");
    assert_eq!(
        meta.weights_sha256,
        "0e2b313a6e50d4a03c228570ed7aa34da66ebb9b58bf649e0947949a5f57de7e"
    );
}

#[test]
fn other_layers_and_pooling() {
    let dir = tempfile::tempdir().unwrap();
    let img = flowers("roses", 1).remove(0);
    let img = img.display().to_string();
    let width = |args: &[&str]| -> usize {
        let out = run(dltool().args(["featurize", "-q"]).args(args).arg(&img));
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let header = text.lines().next().unwrap();
        let data = text.lines().nth(1).unwrap();
        assert_eq!(header.split(',').count(), data.split(',').count());
        header.split(',').count() - 2
    };
    assert_eq!(width(&["--layer", "mixed_5d"]), 288);
    assert_eq!(width(&["--layer", "mixed_6e", "--pool", "max"]), 768);
    let out = dir.path().join("flat.safetensors");
    let flat = run(dltool()
        .args(["featurize", "-q", "--pool", "none", &img, "-o"])
        .arg(&out));
    assert!(flat.status.success());
    let flat = dltool::features::read_features(&out).unwrap();
    assert_eq!(flat.dim, 131_072);
    // Average pooling is the mean of each channel's 64 flattened values (channel-major).
    let avg = run(dltool()
        .args(["featurize", "-q", &img, "-o"])
        .arg(dir.path().join("a.csv")));
    assert!(avg.status.success());
    let avg = dltool::features::read_features(&dir.path().join("a.csv")).unwrap();
    for c in [0usize, 1000, 2047] {
        let mean: f32 = flat.row(0)[c * 64..(c + 1) * 64].iter().sum::<f32>() / 64.0;
        assert!((mean - avg.row(0)[c]).abs() < 1e-5, "channel {c}");
    }
}

#[test]
fn a_killed_run_resumes_and_ends_with_the_same_output() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("photos");
    photo_dir(&root, 6);
    let arg = root.display().to_string();

    let reference = dir.path().join("ref.csv");
    assert!(
        run(dltool()
            .args(["featurize", "-q", &arg, "-o"])
            .arg(&reference))
        .status
        .success()
    );

    let out = dir.path().join("out.csv");
    let journal = dir.path().join("out.csv.journal");
    let mut child = dltool()
        .args([
            "featurize",
            "-q",
            "--batch-size",
            "1",
            "--threads",
            "1",
            &arg,
            "-o",
        ])
        .arg(&out)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once a few rows are in the journal (each record holds 8 KiB of features).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let len = std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
        if len > 3 * 8192 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.exists(), "no half-written output after a kill");

    let resumed = run(dltool()
        .args(["featurize", "--resume", &arg, "-o"])
        .arg(&out));
    assert!(resumed.status.success());
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    let reused: usize = stderr
        .split("resuming: ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("resume reports reused rows");
    assert!((3..12).contains(&reused), "reused {reused} of 12");
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&reference).unwrap()
    );

    // A changed file (new mtime) is featurized again; the rest comes from the journal.
    let first = root
        .join("daisy")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let target = std::fs::read_link(&first).unwrap();
    std::fs::remove_file(&first).unwrap();
    std::fs::copy(&target, &first).unwrap();
    let again = run(dltool()
        .args(["featurize", "--resume", &arg, "-o"])
        .arg(&out));
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("resuming: 11 row(s) reused"), "{stderr}");
    assert!(
        stderr.contains("featurized 12 image(s) (11 reused"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&reference).unwrap()
    );
}

#[test]
fn usage_errors_are_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let img = flowers("daisy", 1).remove(0).display().to_string();

    let out = run(dltool().args(["featurize", "--format", "safetensors", &img]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs an output file"));

    let out = run(dltool().args(["featurize", "--resume", &img]));
    assert_eq!(out.status.code(), Some(1));

    // No weights anywhere: the message says where they were looked for and how to fix it.
    let out = run(Command::new(env!("CARGO_BIN_EXE_dltool"))
        .args(["featurize", &img])
        .current_dir(dir.path())
        .env_remove("DLTOOL_WEIGHTS")
        .env("DLTOOL_OFFLINE", "1")
        .env("DLTOOL_HOME", dir.path().join("home")));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no inception_v3 weights found"));
    assert!(stderr.contains("`dltool weights fetch inception_v3_tf2015`"));
    assert!(stderr.contains("--weights FILE"));
    assert!(stderr.contains(&dir.path().join("home/weights").display().to_string()));

    // A feature file whose journal came from another layer is not silently mixed.
    let out_csv = dir.path().join("x.csv");
    assert!(
        run(dltool().args(["featurize", "-q", &img, "-o"]).arg(&out_csv))
            .status
            .success()
    );
    let out = run(dltool()
        .args([
            "featurize",
            "-q",
            "--resume",
            "--layer",
            "mixed_6e",
            &img,
            "-o",
        ])
        .arg(&out_csv));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run without --resume"));
}
