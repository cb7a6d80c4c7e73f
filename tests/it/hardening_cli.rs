//! Issue 16, tried as a hostile user would: output that cannot be written (a closed pipe, a
//! full disk), `-o` onto symlinks, FIFOs and inputs, file names that are not UTF-8, empty
//! shards, CSV features without provenance, and the messages a user reads. MobileNet v1 0.25
//! keeps the featurize runs short.

use crate::common;

use common::{blobs, dltool, fails_with, ok, run, shared, write_table};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MOBILENET: &str = "weights/mobilenet_v1_0.25_224";

fn mobilenet() -> PathBuf {
    shared(MOBILENET)
}

/// stdout/stderr of a child: a pipe whose reading end is already closed.
fn closed_pipe() -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just made by pipe() and are owned here alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    Stdio::from(write)
}

fn dev_full() -> Stdio {
    Stdio::from(
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full"),
    )
}

/// Runs with stdout going to `stdout`; returns the status and stderr.
fn run_with_stdout(cmd: &mut Command, stdout: Stdio) -> (Option<i32>, String) {
    let out = cmd
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("dltool runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("stderr:\n{stderr}");
    (out.status.code(), stderr)
}

/// A trained head and labelled features for it (known provenance), in `dir`.
fn head_and_features(dir: &Path) -> (PathBuf, PathBuf) {
    let features = write_table(dir, "f.safetensors", &blobs(&["a", "b", "c"], 30, 8, 1));
    let head = dir.join("head.safetensors");
    ok(dltool()
        .arg("train-head")
        .arg(&features)
        .arg("-o")
        .arg(&head)
        .arg("-q"));
    (head, features)
}

/// The first `n` daisies, copied into `dir` (copies: a test that overwrote an input must not
/// reach ../shared through a symlink).
fn copied_daisies(dir: &Path, n: usize) -> Vec<PathBuf> {
    common::flowers("daisy", n)
        .into_iter()
        .map(|f| {
            let to = dir.join(f.file_name().unwrap());
            std::fs::copy(&f, &to).unwrap();
            to
        })
        .collect()
}

fn featurize(images: &[PathBuf]) -> Command {
    let mut cmd = dltool();
    cmd.args(["featurize", "-q", "--weights"])
        .arg(mobilenet())
        .args(images);
    cmd
}

// ---------------------------------------------------------------------------------------------
// Item 2: output errors

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let (head, features) = head_and_features(dir.path());
    let images = copied_daisies(dir.path(), 1);
    let home = dir.path().join("home");
    let commands: Vec<(&str, Command)> = vec![
        ("weights list", {
            let mut c = dltool();
            c.args(["weights", "list"]).env("DLTOOL_HOME", &home);
            c
        }),
        ("tune", {
            let mut c = dltool();
            c.arg("tune")
                .arg(&features)
                .args(["--grid", "reg=0.1,1", "--folds", "3", "-q"]);
            c
        }),
        ("tune --json", {
            let mut c = dltool();
            c.arg("tune").arg(&features).args([
                "--grid",
                "reg=0.1,1",
                "--folds",
                "3",
                "--json",
                "-q",
            ]);
            c
        }),
        ("evaluate", {
            let mut c = dltool();
            c.arg("evaluate").arg(&head).arg(&features);
            c
        }),
        ("evaluate --json", {
            let mut c = dltool();
            c.arg("evaluate")
                .arg(&head)
                .arg(&features)
                .args(["--json", "--errors", "3"]);
            c
        }),
        ("predict", {
            let mut c = dltool();
            c.arg("predict").arg(&head).arg("--features").arg(&features);
            c
        }),
        ("featurize", featurize(&images)),
    ];
    for (name, mut cmd) in commands {
        let (code, stderr) = run_with_stdout(&mut cmd, closed_pipe());
        assert_eq!(
            code,
            Some(0),
            "{name}: a closed pipe is a normal end: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert!(!stderr.contains("error"), "{name}: quietly: {stderr}");
    }
}

#[test]
fn a_full_disk_on_stdout_is_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let (head, features) = head_and_features(dir.path());
    let home = dir.path().join("home");
    let mut list = dltool();
    list.args(["weights", "list"]).env("DLTOOL_HOME", &home);
    let mut evaluate = dltool();
    evaluate.arg("evaluate").arg(&head).arg(&features);
    let mut json = dltool();
    json.arg("evaluate").arg(&head).arg(&features).arg("--json");
    let mut tune = dltool();
    tune.arg("tune")
        .arg(&features)
        .args(["--grid", "reg=0.1,1", "--folds", "3", "-q"]);
    for (name, mut cmd) in [
        ("weights list", list),
        ("evaluate", evaluate),
        ("evaluate --json", json),
        ("tune", tune),
    ] {
        let (code, stderr) = run_with_stdout(&mut cmd, dev_full());
        assert_eq!(code, Some(1), "{name}: {stderr}");
        assert!(!stderr.contains("panicked"), "{name}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
        assert!(
            stderr.starts_with("dltool: error: cannot write to stdout")
                && stderr.contains("No space left on device"),
            "{name}: {stderr}"
        );
    }
}

#[test]
fn a_full_stderr_does_not_panic() {
    let dir = tempfile::tempdir().unwrap();
    let images = copied_daisies(dir.path(), 1);
    let missing = dir.path().join("missing.jpg");
    // A skipped input and the summary both go to stderr.
    let out = featurize(&images)
        .arg(&missing)
        .arg("--strict")
        .stdout(Stdio::piped())
        .stderr(dev_full())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "--strict, one input skipped");
    let csv = String::from_utf8(out.stdout).unwrap();
    assert_eq!(csv.lines().count(), 2, "header and the one row: {csv}");
    // An error whose message cannot be written still exits 1, not 101 (a panic).
    let out = dltool()
        .args(["evaluate", "/nonexistent/head", "/nonexistent/features"])
        .stderr(dev_full())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
}

// ---------------------------------------------------------------------------------------------
// Item 3: what -o writes to

#[test]
fn output_through_a_symlink_replaces_its_target_and_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = copied_daisies(d, 1);
    std::fs::create_dir(d.join("real")).unwrap();
    std::fs::write(d.join("real/features.csv"), "stale").unwrap();
    std::fs::write(d.join("real/head.safetensors"), "stale").unwrap();
    std::os::unix::fs::symlink("real/features.csv", d.join("link.csv")).unwrap();
    // A dangling link: its target is where the new file goes.
    std::os::unix::fs::symlink("real/new-head.safetensors", d.join("head-link.safetensors"))
        .unwrap();
    ok(featurize(&images).arg("-o").arg(d.join("link.csv")));
    let link = std::fs::symlink_metadata(d.join("link.csv")).unwrap();
    assert!(link.file_type().is_symlink(), "the link stays a link");
    let text = std::fs::read_to_string(d.join("real/features.csv")).unwrap();
    assert!(
        text.starts_with("path,label,f0,"),
        "target replaced: {text}"
    );

    let features = write_table(d, "f.csv", &blobs(&["a", "b"], 10, 4, 2));
    ok(dltool()
        .arg("train-head")
        .arg(&features)
        .arg("-o")
        .arg(d.join("head-link.safetensors"))
        .arg("-q"));
    assert!(
        std::fs::symlink_metadata(d.join("head-link.safetensors"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    dltool::head::Head::load(&d.join("real/new-head.safetensors")).expect("a head at the target");
    let stray: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .chain(std::fs::read_dir(d.join("real")).unwrap())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(stray.is_empty(), "no temporary left: {stray:?}");
}

/// Makes a FIFO at `path` and reads it to the end on a thread.
fn fifo_reader(path: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let path = path.to_path_buf();
    std::thread::spawn(move || std::fs::read(&path).unwrap())
}

fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path)
        .unwrap()
        .file_type()
        .is_fifo()
}

#[test]
fn output_to_a_fifo_is_written_in_place_without_a_journal() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = copied_daisies(d, 2);

    let fifo = d.join("rows.csv");
    let reader = fifo_reader(&fifo);
    ok(featurize(&images).arg("-o").arg(&fifo));
    let csv = String::from_utf8(reader.join().unwrap()).unwrap();
    assert_eq!(csv.lines().count(), 3, "the reader gets every row: {csv}");
    assert!(is_fifo(&fifo), "still a FIFO");
    assert!(!d.join("rows.csv.journal").exists(), "no journal beside it");

    // safetensors seeks while writing: it is spooled, then copied into the FIFO.
    let fifo = d.join("rows.safetensors");
    let reader = fifo_reader(&fifo);
    ok(featurize(&images).arg("-o").arg(&fifo));
    let bytes = reader.join().unwrap();
    assert!(is_fifo(&fifo));
    let copy = d.join("copy.safetensors");
    std::fs::write(&copy, bytes).unwrap();
    let table = dltool::features::read_features(&copy).unwrap();
    assert_eq!(table.len(), 2);

    fails_with(
        featurize(&images).arg("-o").arg(&fifo).arg("--resume"),
        "--resume needs a regular output file",
    );

    // predict's -o goes the same way.
    let (head, features) = head_and_features(d);
    let fifo = d.join("predictions.csv");
    let reader = fifo_reader(&fifo);
    ok(dltool()
        .arg("predict")
        .arg(&head)
        .arg("--features")
        .arg(&features)
        .arg("-o")
        .arg(&fifo));
    let text = String::from_utf8(reader.join().unwrap()).unwrap();
    assert_eq!(text.lines().count(), 91, "header and 90 rows");
    assert!(is_fifo(&fifo));
}

#[test]
fn an_output_that_is_an_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = copied_daisies(d, 2);
    let before = std::fs::read(&images[0]).unwrap();
    // The same file by another spelling.
    let other_spelling = d.join(".").join(images[0].file_name().unwrap());
    fails_with(
        featurize(&images).arg("-o").arg(&other_spelling),
        "is also an input",
    );
    assert_eq!(
        std::fs::read(&images[0]).unwrap(),
        before,
        "the image is untouched"
    );
    // A folder of images, the output one of them.
    fails_with(
        featurize(&[d.to_path_buf()]).arg("-o").arg(&images[1]),
        "is also an input",
    );

    let features = write_table(d, "f.csv", &blobs(&["a", "b"], 10, 4, 3));
    let before = std::fs::read(&features).unwrap();
    let link = d.join("f-link.csv");
    std::os::unix::fs::symlink(&features, &link).unwrap();
    fails_with(
        dltool()
            .arg("train-head")
            .arg(&features)
            .arg("-o")
            .arg(&link),
        "is also an input",
    );
    fails_with(
        dltool()
            .arg("tune")
            .arg(&link)
            .args(["--grid", "reg=1", "--folds", "2", "-o"])
            .arg(&features),
        "is also an input",
    );
    fails_with(
        dltool()
            .arg("split")
            .arg(&features)
            .arg("-o")
            .arg(d.join("train.csv"))
            .arg("-o")
            .arg(&link),
        "is also an input",
    );
    let (head, _) = head_and_features(d);
    fails_with(
        dltool()
            .arg("predict")
            .arg(&head)
            .arg("--features")
            .arg(&link)
            .arg("-o")
            .arg(&features),
        "is also an input",
    );
    assert_eq!(
        std::fs::read(&features).unwrap(),
        before,
        "features untouched"
    );
}

#[test]
fn output_into_a_missing_folder_names_the_users_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = copied_daisies(d, 1);
    let out = d.join("no/such/folder/features.csv");
    let line = fails_with(featurize(&images).arg("-o").arg(&out), "does not exist");
    assert!(line.contains(&out.display().to_string()), "{line}");
    // Neither the temporary (`.features.csv.PID.N.tmp`) nor the journal.
    assert!(
        !line.contains(".features.csv.") && !line.contains(".journal"),
        "no internal file name: {line}"
    );

    let features = write_table(d, "f.csv", &blobs(&["a", "b"], 10, 4, 4));
    let head = d.join("missing/head.safetensors");
    let line = fails_with(
        dltool()
            .arg("train-head")
            .arg(&features)
            .arg("-o")
            .arg(&head),
        "does not exist",
    );
    assert!(
        line.contains(&head.display().to_string()) && !line.contains(".head.safetensors."),
        "{line}"
    );
}

// ---------------------------------------------------------------------------------------------
// Item 4: file names that are not UTF-8

#[test]
fn names_that_are_not_utf8_stay_distinct_through_resume() {
    use std::ffi::OsStr;
    let dir = tempfile::tempdir().unwrap();
    let photos = dir.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    // Same size, same modification time, different pixels.
    let names: [&[u8]; 2] = [b"x\xff.bmp", b"x\xfe.bmp"];
    let when = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    for (k, name) in names.iter().enumerate() {
        let img = image::RgbImage::from_fn(48, 48, |x, y| {
            let v = if k == 0 { x * 5 } else { 255 - y * 5 };
            image::Rgb([v as u8, (x * y) as u8, 128])
        });
        let path = photos.join(OsStr::from_bytes(name));
        img.save_with_format(&path, image::ImageFormat::Bmp)
            .unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }
    let out = dir.path().join("f.csv");
    let first = || {
        let t = dltool::features::read_features(&out).unwrap();
        (t.paths.clone(), t.data.clone(), t.dim)
    };
    ok(featurize(std::slice::from_ref(&photos)).arg("-o").arg(&out));
    let (paths, data, dim) = first();
    let shown = |b: &str| format!("{}/x\\x{b}.bmp", photos.display());
    assert_eq!(
        paths,
        vec![shown("fe"), shown("ff")],
        "escaped, in byte order"
    );
    assert_ne!(data[..dim], data[dim..], "two different images, two rows");

    // featurize() passes -q; the resume message is wanted here.
    let out2 = run(dltool()
        .args(["featurize", "--weights"])
        .arg(mobilenet())
        .arg(&photos)
        .arg("-o")
        .arg(&out)
        .arg("--resume"));
    assert!(out2.status.success());
    let stderr = String::from_utf8_lossy(&out2.stderr);
    assert!(stderr.contains("resuming: 2 row(s) reused"), "{stderr}");
    let (paths2, data2, _) = first();
    assert_eq!(paths2, paths);
    assert_eq!(data2, data, "resume gives each file its own row");
    let journal = std::fs::read(dir.path().join("f.csv.journal")).unwrap();
    assert!(
        !journal.windows(3).any(|w| w == "\u{fffd}".as_bytes()),
        "no lossy keys"
    );

    // safetensors keeps the raw bytes; reading shows the same escaped form as CSV.
    let st = dir.path().join("f.safetensors");
    ok(featurize(std::slice::from_ref(&photos)).arg("-o").arg(&st));
    let table = dltool::features::read_features(&st).unwrap();
    assert_eq!(table.paths, paths);
    assert_eq!(table.data, data);
    let bytes = std::fs::read(&st).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let raw = parsed.tensor("path_bytes").unwrap().data().to_vec();
    let mut want = Vec::new();
    for name in [names[1], names[0]] {
        want.extend_from_slice(photos.as_os_str().as_bytes());
        want.push(b'/');
        want.extend_from_slice(name);
    }
    assert_eq!(raw, want, "raw file-name bytes");
}

// ---------------------------------------------------------------------------------------------
// Item 5: empty shards

#[test]
fn an_empty_shard_writes_its_part() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let images = copied_daisies(d, 1);
    let parts = d.join("parts");
    std::fs::create_dir(&parts).unwrap();
    // One image, two shards: shard 0 gets none of it.
    for ext in ["csv", "safetensors", "parquet"] {
        let empty = d.join(format!("part-0.{ext}"));
        let out = run(featurize(&images)
            .args(["--shard", "0/2", "-o"])
            .arg(&empty));
        assert_eq!(out.status.code(), Some(0), "{ext}");
        assert!(empty.is_file(), "{ext}: the empty part exists");
        if ext == "csv" {
            let text = std::fs::read_to_string(&empty).unwrap();
            assert_eq!(text.lines().count(), 1, "header only: {text}");
            assert!(text.starts_with("path,label,f0,"));
        }
    }
    for k in 0..2 {
        ok(featurize(&images)
            .args(["--shard", &format!("{k}/2"), "-o"])
            .arg(parts.join(format!("part-{k}.parquet"))));
    }
    let table = dltool::features::read_features(&parts).unwrap();
    assert_eq!(
        table.len(),
        1,
        "the empty part reads as nothing in a folder"
    );
    // Alone, an empty part has no rows to train on: one clear line.
    fails_with(
        dltool()
            .arg("train-head")
            .arg(parts.join("part-0.parquet"))
            .arg("-o")
            .arg(d.join("h.safetensors")),
        "no rows",
    );
}

// ---------------------------------------------------------------------------------------------
// Item 7: CSV features without --weights

#[test]
fn csv_features_train_without_weights_and_predict_asks_for_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let photos = d.join("photos");
    common::photo_dir(&photos, 3);
    let csv = d.join("features.csv");
    ok(dltool()
        .args(["featurize", "-q", "--weights"])
        .arg(mobilenet())
        .arg(&photos)
        .arg("-o")
        .arg(&csv));

    // The natural next step: no --weights repeated.
    let head = d.join("head.safetensors");
    let out = run(dltool()
        .arg("train-head")
        .arg(&csv)
        .arg("-o")
        .arg(&head)
        .args(["--reg", "0.01", "-q"]));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("carry no provenance"), "a note: {stderr}");
    let loaded = dltool::head::Head::load(&head).unwrap();
    assert_eq!(loaded.provenance.backbone, "", "recorded as unknown");
    assert_eq!(loaded.provenance.weights_sha256, "");
    ok(dltool().arg("evaluate").arg(&head).arg(&csv));
    ok(dltool()
        .arg("tune")
        .arg(&csv)
        .args(["--grid", "reg=0.01,1", "--folds", "2", "-q", "-o"])
        .arg(d.join("tuned.safetensors")));

    // From images, the head cannot know the network: --weights is required, and its width
    // checked (InceptionV3, the default weights here, is 2048 wide, MobileNet 0.25 256).
    fails_with(
        dltool().arg("predict").arg(&head).arg(&photos),
        "unknown provenance",
    );
    let wrong_network = || {
        let mut c = dltool();
        c.arg("predict")
            .arg(&head)
            .arg("--weights")
            .arg(shared("weights/inception_v3_tf2015.safetensors"))
            .arg(&photos);
        c
    };
    fails_with(&mut wrong_network(), "the head expects 256 features");
    // A refused run writes nothing on stdout, not even the CSV header.
    let mut unknown = dltool();
    unknown.arg("predict").arg(&head).arg(&photos);
    for mut refused in [unknown, wrong_network()] {
        let out = run(&mut refused);
        assert!(!out.status.success());
        assert!(
            out.stdout.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let from_images = ok(dltool()
        .arg("predict")
        .arg(&head)
        .arg("--weights")
        .arg(mobilenet())
        .arg(&photos)
        .arg("-q"));
    let from_features = ok(dltool()
        .arg("predict")
        .arg(&head)
        .arg("--features")
        .arg(&csv));
    assert_eq!(from_images, from_features, "the same rows either way");
}

#[test]
fn same_width_features_without_provenance_are_not_passed_silently() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A head that knows its features (InceptionV3 provenance), and CSV rows of the same width.
    let (head, _) = head_and_features(d);
    let csv = write_table(d, "other.csv", &blobs(&["a", "b", "c"], 5, 8, 9));
    let out = run(dltool().arg("evaluate").arg(&head).arg(&csv));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("carry no provenance: only their width (8) was checked"),
        "{stderr}"
    );
    // Where both sides are known, another network is refused.
    let mut other = blobs(&["a", "b", "c"], 5, 8, 9);
    other.meta.as_mut().unwrap().backbone = "mobilenet_v1/0.75_224".into();
    let other = write_table(d, "other.safetensors", &other);
    fails_with(
        dltool().arg("evaluate").arg(&head).arg(&other),
        "features were made with backbone mobilenet_v1/0.75_224",
    );
}

// ---------------------------------------------------------------------------------------------
// Messages

#[test]
fn a_damaged_head_says_truncated_or_not_a_head() {
    let dir = tempfile::tempdir().unwrap();
    let (head, features) = head_and_features(dir.path());
    let bytes = std::fs::read(&head).unwrap();
    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let garbage = dir.path().join("garbage.safetensors");
    std::fs::write(
        &garbage,
        b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a head at all",
    )
    .unwrap();
    for file in [&cut, &garbage] {
        let line = fails_with(
            dltool().arg("evaluate").arg(file).arg(&features),
            "truncated or not a dltool head file",
        );
        assert!(line.contains(&file.display().to_string()), "{line}");
        assert!(
            !line.contains("HeaderTooLarge") && !line.contains("Incomplete"),
            "{line}"
        );
    }
}

#[test]
fn a_csv_header_without_commas_is_shown_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let semi = dir.path().join("semi.csv");
    std::fs::write(&semi, "path;label;f0\na;b;1\n").unwrap();
    fails_with(
        dltool()
            .arg("train-head")
            .arg(&semi)
            .arg("-o")
            .arg(dir.path().join("h")),
        "found 'path;label;f0' (columns must be separated by commas)",
    );
    let wrong = dir.path().join("wrong.csv");
    std::fs::write(&wrong, "file,label,f0\na,b,1\n").unwrap();
    fails_with(
        dltool()
            .arg("train-head")
            .arg(&wrong)
            .arg("-o")
            .arg(dir.path().join("h")),
        "found 'file,label,f0'",
    );
}

#[test]
fn top_k_over_the_classes_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let images = copied_daisies(dir.path(), 1);
    let out = run(dltool()
        .args(["classify", "-q", "--top-k", "5000", "--weights"])
        .arg(mobilenet())
        .arg("--labels")
        .arg(shared("imagenet/imagenet_class_index.json"))
        .args(&images));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--top-k 5000 is more than the 1000 classes"),
        "{stderr}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        1 + 1000
    );

    let (head, features) = head_and_features(dir.path());
    let out = run(dltool()
        .arg("predict")
        .arg(&head)
        .arg("--features")
        .arg(&features)
        .args(["--top-k", "5000"]));
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--top-k 5000 is more than the head's 3 classes"),
    );
}

#[test]
fn a_newline_in_a_label_keeps_the_evaluate_table_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut table = blobs(&["a", "b"], 10, 4, 5);
    for l in table.labels.iter_mut().filter(|l| *l == "b") {
        *l = "two\nlines".into();
    }
    let features = write_table(dir.path(), "f.safetensors", &table);
    let head = dir.path().join("head.safetensors");
    ok(dltool()
        .arg("train-head")
        .arg(&features)
        .arg("-o")
        .arg(&head)
        .arg("-q"));
    let report = ok(dltool().arg("evaluate").arg(&head).arg(&features));
    assert!(report.contains("two\\nlines"), "{report}");
    // Every row of the per-class table and the confusion matrix starts with its class.
    let lines: Vec<&str> = report.lines().collect();
    assert!(
        !lines.iter().any(|l| l.trim_start().starts_with("lines")),
        "{report}"
    );
    let rows = lines
        .iter()
        .filter(|l| l.starts_with("two\\nlines"))
        .count();
    assert_eq!(rows, 2, "per class and confusion: {report}");
}

#[test]
fn classify_does_not_suggest_a_flag_it_does_not_take() {
    // InceptionV3 weights without their metadata and without an fc layer: the loader cannot
    // tell the variant, and classify could not use them anyway.
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(shared("weights/inception_v3_tf2015.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let weights = dir.path().join("weights.safetensors");
    safetensors::serialize_to_file(st.tensors(), &None, &weights).unwrap();
    let images = copied_daisies(dir.path(), 1);
    let line = fails_with(
        dltool()
            .arg("classify")
            .arg("--weights")
            .arg(&weights)
            .args(&images),
        "have no classifier",
    );
    assert!(!line.contains("--variant"), "{line}");
    assert!(line.contains(&weights.display().to_string()), "{line}");
}

#[test]
fn tune_marks_a_diverging_mlp_failed() {
    let dir = tempfile::tempdir().unwrap();
    let features = write_table(dir.path(), "f.safetensors", &blobs(&["a", "b"], 20, 4, 6));
    let text = ok(dltool().arg("tune").arg(&features).args([
        "--head",
        "mlp",
        "--hidden",
        "8",
        "--epochs",
        "20",
        "--grid",
        "lr=1e10,0.01",
        "--folds",
        "2",
        "--json",
        "-q",
    ]));
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let results = json["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{json}");
    assert_eq!(results[0]["grid"]["lr"], 0.01, "the sane one first: {json}");
    assert!(results[0]["error"].is_null(), "{json}");
    let failed = &results[1];
    assert_eq!(failed["grid"]["lr"], 1e10, "{json}");
    assert!(
        failed["error"].as_str().unwrap().contains("diverged"),
        "{json}"
    );
    assert_eq!(json["best"]["lr"], 0.01, "{json}");
}
