//! `dltool weights` against a local HTTP server standing in for the weights' real homes
//! (`DLTOOL_WEIGHTS_MIRROR`), with a fresh `DLTOOL_HOME` per test.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MN: &str = "mobilenet_v1_0.25_224";

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

type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A bounded HTTP/1.1 server on 127.0.0.1 (at most `max_requests` requests, at most 60 s).
/// Each path has a body and the modes of its successive requests (the last repeats); `Range:
/// bytes=N-` is answered with 206. Returns the base URL and a log of (path, Range header).
fn serve(routes: HashMap<String, (Vec<u8>, Vec<Mode>)>, max_requests: usize) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    listener.set_nonblocking(true).unwrap();
    let log: Log = Arc::default();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut routes = routes;
        let deadline = Instant::now() + Duration::from_secs(60);
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
            let mut range = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.split_once(':')
                    && k.eq_ignore_ascii_case("range")
                {
                    range = Some(v.trim().to_string());
                }
            }
            log2.lock().unwrap().push((path.clone(), range.clone()));
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
                                .filter(|&n| n < body.len());
                            let (status, extra, slice) = match start {
                                Some(n) => (
                                    "206 Partial Content",
                                    format!(
                                        "Content-Range: bytes {n}-{}/{}\r\n",
                                        body.len() - 1,
                                        body.len()
                                    ),
                                    body[n..].to_vec(),
                                ),
                                None => ("200 OK", String::new(), body),
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

/// Every file of mobilenet_v1_0.25_224 from ../shared, `Good` unless named in `special`.
fn mobilenet_server(special: &[(&str, Vec<Mode>)]) -> (String, Log) {
    let dir = common::shared(&format!("weights/{MN}"));
    let mut routes = HashMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let modes = special
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(vec![Mode::Good], |(_, m)| m.clone());
        let body = std::fs::read(dir.join(&name)).unwrap();
        routes.insert(format!("/{MN}/{name}"), (body, modes));
    }
    assert_eq!(routes.len(), 56, "expected model.json and 55 shards");
    serve(routes, 300)
}

fn weights(home: &Path, base: &str, args: &[&str]) -> std::process::Output {
    common::run(
        common::dltool()
            .arg("weights")
            .args(args)
            .env("DLTOOL_HOME", home)
            .env("DLTOOL_WEIGHTS_MIRROR", base),
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
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
    assert_eq!(
        std::fs::read_dir(main.parent().unwrap()).unwrap().count(),
        56
    );

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
            .any(|l| l.starts_with(MN) && l.contains(" yes ")),
        "{list}"
    );
}

#[test]
fn truncated_download_resumes() {
    let shard = "mobilenet_group29-shard1of1";
    let home = tempfile::tempdir().unwrap();
    let (base, log) = mobilenet_server(&[(shard, vec![Mode::Truncate(300_000), Mode::Good])]);
    let out = weights(home.path(), &base, &["fetch", MN]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("resume"), "{}", stderr(&out));
    let part = home
        .path()
        .join("weights")
        .join(MN)
        .join(format!("{shard}.part"));
    assert_eq!(std::fs::metadata(&part).unwrap().len(), 300_000);

    assert!(weights(home.path(), &base, &["fetch", MN]).status.success());
    assert!(!part.exists());
    assert!(
        weights(home.path(), &base, &["verify", MN])
            .status
            .success()
    );
    let path = format!("/{MN}/{shard}");
    let log = log.lock().unwrap();
    assert!(
        log.iter()
            .any(|(p, r)| *p == path && r.as_deref() == Some("bytes=300000-"))
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
    let dir = home.path().join("weights").join(MN);
    assert!(!dir.join(shard).exists() && !dir.join(format!("{shard}.part")).exists());

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
    ] {
        let home = tempfile::tempdir().unwrap();
        let path = format!("/{entry}/{file}");
        let routes = HashMap::from([(
            path.clone(),
            (b"not the weights".to_vec(), vec![Mode::Good]),
        )]);
        let (base, log) = serve(routes, 5);
        let out = weights(home.path(), &base, &["fetch", entry]);
        assert_eq!(out.status.code(), Some(1), "{entry}");
        let err = stderr(&out);
        assert!(
            err.contains("sha256 mismatch") && err.contains(prefix),
            "{entry}: {err}"
        );
        assert!(
            log.lock().unwrap().iter().any(|(p, _)| *p == path),
            "{entry}"
        );
        let dir = home.path().join("weights").join(entry);
        assert!(
            !dir.join(file).exists(),
            "{entry}: a file failing its hash was installed"
        );
    }
}
