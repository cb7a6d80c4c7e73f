//! `dltool serve` over real HTTP on 127.0.0.1 (a port the OS picks), with a real client: the
//! answers equal `dltool predict`/`featurize`/`classify` on the same images, concurrent
//! requests are all answered, bad bodies get 4xx while good ones succeed, a full queue answers
//! 503, and SIGTERM drains what is in flight. Heads are trained here with `featurize` +
//! `train-head` on a few flowers, on the small MobileNet (InceptionV3 once). Every wait is
//! bounded, and a server is killed when its test ends, however it ends.

use crate::common;

use common::{dltool, flowers, line_reader, ok, png_claiming, shared};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const MOBILENET: &str = "weights/mobilenet_v1_0.25_224";
const INCEPTION: &str = "weights/inception_v3_tf2015.safetensors";
const LABELS: &str = "imagenet/imagenet_class_index.json";
const CLASSES: [&str; 3] = ["daisy", "roses", "tulips"];

/// A running `dltool serve`, killed on drop.
struct Server {
    child: Child,
    base: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `dltool serve ARGS --listen 127.0.0.1:0` and waits (at most a minute) until it
    /// says where it listens and `/readyz` answers 200.
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dltool"))
            .arg("serve")
            .args(args)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dltool serve starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        // Drained all along, so that the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut server = Server {
            child,
            base: String::new(),
            stderr,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no address within 60 s; stderr:\n{}", server.log()));
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}; stderr:\n{}", server.log()));
        server.base = addr.to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, _) = server.get("/readyz");
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "readyz before ready");
            if let Some(exit) = server.child.try_wait().unwrap() {
                panic!("the server exited ({exit}); stderr:\n{}", server.log());
            }
            assert!(
                Instant::now() < deadline,
                "not ready in 60 s:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn get(&self, path: &str) -> (u16, String) {
        match agent().get(&self.url(path)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    fn post(&self, path: &str, content_type: &str, body: &[u8]) -> Answer {
        post(&self.url(path), content_type, body)
    }

    fn post_image(&self, path: &str, image: &Path) -> Answer {
        self.post(path, "image/jpeg", &std::fs::read(image).unwrap())
    }

    /// A number from `/metrics` (the first line that starts with `name`).
    fn metric(&self, name: &str) -> f64 {
        let (status, text) = self.get("/metrics");
        assert_eq!(status, 200);
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits (at most 30 s) until `/metrics` shows `depth` images in the server.
    fn wait_for_queue_depth(&self, depth: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.metric("dltool_queue_depth") as usize != depth {
            assert!(Instant::now() < deadline, "queue never reached {depth}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// Status, JSON body and Retry-After of an answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    json: Value,
    retry_after: Option<String>,
}

fn post(url: &str, content_type: &str, body: &[u8]) -> Answer {
    let result = agent()
        .post(url)
        .set("Content-Type", content_type)
        .send_bytes(body);
    let (status, resp) = match result {
        Ok(r) => (r.status(), r),
        Err(ureq::Error::Status(code, r)) => (code, r),
        Err(e) => panic!("POST {url}: {e}"),
    };
    let retry_after = resp.header("Retry-After").map(str::to_string);
    let text = resp.into_string().unwrap();
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("POST {url}: {status} answer is not JSON ({e}): {text}"));
    Answer {
        status,
        json,
        retry_after,
    }
}

const BOUNDARY: &str = "dltool-test-boundary-7MA4YWxkTrZu0gW";

/// A `multipart/form-data` body with one part per (file name, bytes).
fn multipart(files: &[(&str, Vec<u8>)]) -> (String, Vec<u8>) {
    let mut body = Vec::new();
    for (name, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; \
                 filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={BOUNDARY}"), body)
}

/// A folder of `class/photo.jpg` symlinks: `per_class` flowers of each of `classes`.
fn photo_dir(root: &Path, classes: &[&str], per_class: usize) -> PathBuf {
    for class in classes {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for f in flowers(class, per_class) {
            std::os::unix::fs::symlink(&f, root.join(class).join(f.file_name().unwrap())).unwrap();
        }
    }
    root.to_path_buf()
}

/// A head trained on `weights` features of the first `per_class` photos of each class.
fn train_head(dir: &Path, weights: &Path, per_class: usize) -> PathBuf {
    let photos = photo_dir(&dir.join("photos"), &CLASSES, per_class);
    let features = dir.join("features.safetensors");
    let head = dir.join("head.safetensors");
    ok(dltool()
        .args(["featurize", "-q", "--weights"])
        .arg(weights)
        .arg(&photos)
        .arg("-o")
        .arg(&features));
    ok(dltool()
        .args(["train-head", "-q"])
        .arg(&features)
        .arg("-o")
        .arg(&head)
        .args(["--reg", "0.05"]));
    head
}

/// The MobileNet head, trained once for the whole test binary.
fn mobilenet_head() -> &'static Path {
    static HEAD: OnceLock<PathBuf> = OnceLock::new();
    HEAD.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("serve_cli_{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        train_head(&dir, &shared(MOBILENET), 6)
    })
}

/// Photos the heads were not trained on: from the end of each class folder.
fn test_images(per_class: usize) -> Vec<PathBuf> {
    CLASSES
        .iter()
        .flat_map(|c| {
            let mut all = flowers(c, 200);
            all.split_off(all.len() - per_class)
        })
        .collect()
}

/// `dltool predict HEAD IMAGES --format jsonl` (plus `extra`), by path.
fn predict_jsonl(head: &Path, weights: &Path, images: &[PathBuf], extra: &[&str]) -> Vec<Value> {
    let text = ok(dltool()
        .args(["predict", "-q", "--format", "jsonl", "--weights"])
        .arg(weights)
        .args(extra)
        .arg(head)
        .args(images));
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), images.len(), "{text}");
    rows
}

/// `row` without its `path`: what the server answers for one image.
fn without_path(row: &Value) -> Value {
    let mut row = row.clone();
    row.as_object_mut().unwrap().remove("path");
    row
}

fn mobilenet_server(extra: &[&str]) -> Server {
    let head = mobilenet_head().display().to_string();
    let weights = shared(MOBILENET).display().to_string();
    let mut args = vec![head.as_str(), "--weights", weights.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn predictions_equal_dltool_predict() {
    let weights = shared(MOBILENET);
    let images = test_images(3);
    let expected = predict_jsonl(mobilenet_head(), &weights, &images, &[]);
    let server = mobilenet_server(&[]);

    // One image per request, as the body.
    for (image, want) in images.iter().zip(&expected) {
        let a = server.post_image("/v1/predict", image);
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.json, without_path(want), "{}", image.display());
    }
    // All of them in one multipart request: one result per part, in order.
    let files: Vec<(String, Vec<u8>)> = images
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(p).unwrap())
        })
        .collect();
    let parts: Vec<(&str, Vec<u8>)> = files.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let (ct, body) = multipart(&parts);
    let a = server.post("/v1/predict", &ct, &body);
    assert_eq!(a.status, 200, "{a:?}");
    let results = a.json["results"].as_array().unwrap();
    assert_eq!(results.len(), images.len());
    for ((name, _), (got, want)) in files.iter().zip(results.iter().zip(&expected)) {
        let mut got = got.clone();
        assert_eq!(got["file"], name.as_str());
        got.as_object_mut().unwrap().remove("file");
        assert_eq!(got, without_path(want));
    }
    // ?top_k=2 as predict --top-k 2.
    let top = predict_jsonl(mobilenet_head(), &weights, &images[..1], &["--top-k", "2"]);
    let a = server.post_image("/v1/predict?top_k=2", &images[0]);
    assert_eq!(a.json, without_path(&top[0]));
    assert_eq!(a.json["top"].as_array().unwrap().len(), 2);

    // The model: the head's classes and provenance, the network it runs.
    let (status, text) = server.get("/v1/model");
    assert_eq!(status, 200);
    let model: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(model["head"]["classes"], serde_json::json!(CLASSES));
    assert_eq!(
        model["head"]["provenance"]["backbone"],
        "mobilenet_v1/0.25_224"
    );
    assert_eq!(model["network"]["backbone"], "mobilenet_v1/0.25_224");
    assert_eq!(
        model["network"]["weights_sha256"],
        model["head"]["provenance"]["weights_sha256"]
    );
    let (status, health) = server.get("/healthz");
    assert_eq!((status, health.contains("ok")), (200, true));
}

#[test]
fn a_lone_client_never_waits_for_company() {
    let images = test_images(2);
    let server = mobilenet_server(&["--max-wait-ms", "10000", "--max-batch", "64"]);
    // Sequential requests: each is alone in the server, and a 10 s wait for a second image
    // would only delay it.
    for image in &images {
        let started = Instant::now();
        let a = server.post_image("/v1/predict", image);
        assert_eq!(a.status, 200, "{a:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a lone request took {:?} with --max-wait-ms 10000",
            started.elapsed()
        );
    }
}

#[test]
fn sixty_four_concurrent_requests_are_all_answered() {
    let weights = shared(MOBILENET);
    let images = test_images(2);
    let expected = predict_jsonl(mobilenet_head(), &weights, &images, &[]);
    let server = mobilenet_server(&["--max-wait-ms", "20", "--max-batch", "16"]);
    let url = server.url("/v1/predict");
    let bodies: Vec<Vec<u8>> = images.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let answers: Vec<(usize, Answer)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|i| {
                let (url, body) = (&url, &bodies[i % bodies.len()]);
                s.spawn(move || (i, post(url, "image/jpeg", body)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, a) in &answers {
        assert_eq!(a.status, 200, "request {i}: {a:?}");
        assert_eq!(
            a.json,
            without_path(&expected[i % expected.len()]),
            "request {i}"
        );
    }
    // Batching happened: fewer network batches than images.
    let batches = server.metric("dltool_batch_size_count");
    let images_run = server.metric("dltool_images_total");
    assert_eq!(images_run, 64.0);
    assert!(batches < 64.0, "{batches} batches for 64 concurrent images");
    assert_eq!(
        server.metric("dltool_requests_total{endpoint=\"/v1/predict\",code=\"200\"}"),
        64.0
    );
}

/// Sends the headers of a POST of `len` bytes and a first 1000 of them; returns the answer.
fn oversized_request(server: &Server, len: usize) -> (u16, Value) {
    let addr = server.base.strip_prefix("http://").unwrap();
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let head = format!(
        "POST /v1/predict HTTP/1.1\r\nHost: {addr}\r\nContent-Type: image/jpeg\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&vec![0xffu8; 1000]).unwrap();
    let mut answer = Vec::new();
    // Until the server closes; a reset after the answer arrived is fine.
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}")),
    )
}

/// A request that must be refused: its status, error kind and words the message must hold.
struct Bad {
    what: &'static str,
    path: &'static str,
    content_type: String,
    body: Vec<u8>,
    status: u16,
    kind: &'static str,
    words: &'static str,
}

#[test]
fn bad_bodies_get_4xx_naming_the_problem_while_good_ones_succeed() {
    let images = test_images(1);
    let good = std::fs::read(&images[0]).unwrap();
    let truncated = good[..good.len() / 2].to_vec();
    let mut server = mobilenet_server(&["--max-body", "1000000", "--max-pixels", "50000000"]);
    let (mixed_ct, mixed) =
        multipart(&[("good.jpg", good.clone()), ("junk.bin", b"hello".to_vec())]);
    let (bad_ct, bad_multipart) = multipart(&[("a.jpg", good.clone())]);
    let bad_ct = bad_ct.replace(BOUNDARY, "another-boundary");
    let bomb = png_claiming(40_000, 40_000);

    let cases = vec![
        Bad {
            what: "garbage",
            path: "/v1/predict",
            content_type: "image/jpeg".into(),
            body: b"not an image at all".to_vec(),
            status: 422,
            kind: "bad_image",
            words: "unrecognised format",
        },
        Bad {
            what: "truncated",
            path: "/v1/predict",
            content_type: "image/jpeg".into(),
            body: truncated,
            status: 422,
            kind: "bad_image",
            words: "truncated or corrupt jpeg",
        },
        Bad {
            what: "empty",
            path: "/v1/predict",
            content_type: "image/jpeg".into(),
            body: Vec::new(),
            status: 400,
            kind: "bad_request",
            words: "empty body",
        },
        Bad {
            what: "bomb",
            path: "/v1/featurize",
            content_type: "image/png".into(),
            body: bomb,
            status: 422,
            kind: "bad_image",
            words: "over the 50000000-pixel limit",
        },
        Bad {
            what: "bad multipart",
            path: "/v1/predict",
            content_type: bad_ct,
            body: bad_multipart,
            status: 400,
            kind: "bad_request",
            words: "",
        },
        Bad {
            what: "bad top_k",
            path: "/v1/predict?top_k=0",
            content_type: "image/jpeg".into(),
            body: good.clone(),
            status: 400,
            kind: "bad_request",
            words: "top_k",
        },
        Bad {
            what: "unknown route",
            path: "/v1/nothing",
            content_type: "image/jpeg".into(),
            body: good.clone(),
            status: 404,
            kind: "not_found",
            words: "/v1/predict",
        },
    ];
    std::thread::scope(|s| {
        // Good requests all along, beside the bad ones.
        let goods: Vec<_> = (0..8)
            .map(|_| s.spawn(|| server.post("/v1/predict", "image/jpeg", &good)))
            .collect();
        for c in &cases {
            let a = server.post(c.path, &c.content_type, &c.body);
            assert_eq!(a.status, c.status, "{}: {a:?}", c.what);
            assert_eq!(a.json["error"]["kind"], c.kind, "{}: {a:?}", c.what);
            let message = a.json["error"]["message"].as_str().unwrap();
            assert!(
                message.to_lowercase().contains(c.words),
                "{}: '{}' not in {message}",
                c.what,
                c.words
            );
        }
        for g in goods {
            let a = g.join().unwrap();
            assert_eq!(a.status, 200, "{a:?}");
        }
    });
    // Over --max-body: 413 as soon as the headers say so. The body is not read, and the server
    // closes the connection after answering, so this client sends the headers and a first
    // slice only, and reads the answer before sending more (as curl does).
    let (status, json) = oversized_request(&server, 1_500_000);
    assert_eq!(status, 413, "{json}");
    assert_eq!(json["error"]["kind"], "too_large");
    assert!(
        json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-body (1000000 bytes)")
    );

    // In one multipart request, a bad part fails alone and is named.
    let a = server.post("/v1/predict", &mixed_ct, &mixed);
    assert_eq!(a.status, 200, "{a:?}");
    let results = a.json["results"].as_array().unwrap();
    assert!(results[0]["prediction"].is_string(), "{a:?}");
    assert_eq!(results[1]["error"]["kind"], "bad_image");
    assert!(
        results[1]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("junk.bin: ")
    );

    assert_eq!(
        server.metric("dltool_errors_total{kind=\"bad_image\"}"),
        4.0
    );
    assert_eq!(
        server.metric("dltool_errors_total{kind=\"too_large\"}"),
        1.0
    );
    // Still serving.
    assert_eq!(server.post("/v1/predict", "image/jpeg", &good).status, 200);
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the server stopped"
    );
    let log = server.log();
    assert!(!log.contains("panicked"), "{log}");
    // Structured logs: every line is one JSON object with ts, level and event.
    for line in log.lines() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["ts"].is_string() && v["level"].is_string() && v["event"].is_string());
    }
}

#[test]
fn a_full_queue_answers_503_with_retry_after_and_slow_requests_time_out() {
    let images = test_images(1);
    let good = std::fs::read(&images[0]).unwrap();
    // Two images in the server are company: their batch waits up to 3 s for more, and they
    // fill the queue meanwhile.
    let server = mobilenet_server(&["--queue", "2", "--max-wait-ms", "3000", "--max-batch", "64"]);
    let (ct, two) = multipart(&[("a.jpg", good.clone()), ("b.jpg", good.clone())]);
    std::thread::scope(|s| {
        let first = s.spawn(|| server.post("/v1/predict", &ct, &two));
        server.wait_for_queue_depth(2);
        let a = server.post("/v1/predict", "image/jpeg", &good);
        assert_eq!(a.status, 503, "{a:?}");
        assert_eq!(a.json["error"]["kind"], "queue_full");
        assert_eq!(a.retry_after.as_deref(), Some("1"));
        let first = first.join().unwrap();
        assert_eq!(first.status, 200, "{first:?}");
    });
    // The queue is free again; a request of more images than the queue ever admits is refused.
    server.wait_for_queue_depth(0);
    let (ct3, three) = multipart(&[
        ("a", good.clone()),
        ("b", good.clone()),
        ("c", good.clone()),
    ]);
    let a = server.post("/v1/predict", &ct3, &three);
    assert_eq!(
        (a.status, a.json["error"]["kind"].as_str()),
        (413, Some("too_many_images"))
    );
    assert_eq!(
        server.metric("dltool_errors_total{kind=\"queue_full\"}"),
        1.0
    );
    drop(server);

    // A request that outlives --timeout-ms is answered 503 (its two images wait 3 s for
    // more, the request may take 300 ms).
    let server = mobilenet_server(&[
        "--timeout-ms",
        "300",
        "--max-wait-ms",
        "3000",
        "--max-batch",
        "64",
    ]);
    let started = Instant::now();
    let a = server.post("/v1/predict", &ct, &two);
    assert_eq!(
        (a.status, a.json["error"]["kind"].as_str()),
        (503, Some("timeout")),
        "{a:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn sigterm_stops_accepting_drains_in_flight_requests_and_exits_0() {
    let weights = shared(MOBILENET);
    let images = test_images(2);
    let expected = predict_jsonl(mobilenet_head(), &weights, &images, &[]);
    let mut server = mobilenet_server(&["--max-wait-ms", "5000", "--max-batch", "64"]);
    let url = server.url("/v1/predict");
    // Two images in one request are company: their batch waits up to 5 s for more, and the
    // requests sent meanwhile join it (a lone request would run at once).
    let (ct, two) = multipart(&[
        ("a.jpg", std::fs::read(&images[0]).unwrap()),
        ("b.jpg", std::fs::read(&images[1]).unwrap()),
    ]);
    let (answers, pair) = std::thread::scope(|s| {
        let pair = s.spawn(|| post(&url, &ct, &two));
        server.wait_for_queue_depth(2);
        let handles: Vec<_> = images
            .iter()
            .map(|p| {
                let url = &url;
                s.spawn(move || post(url, "image/jpeg", &std::fs::read(p).unwrap()))
            })
            .collect();
        // All of them wait in the batch when the signal comes.
        server.wait_for_queue_depth(2 + images.len());
        let pid = server.child.id() as libc::pid_t;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let answers = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>();
        (answers, pair.join().unwrap())
    });
    assert_eq!(pair.status, 200, "{pair:?}");
    for (a, want) in answers.iter().zip(&expected) {
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.json, without_path(want));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 30 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", server.log());
    // No longer accepting.
    assert!(agent().get(&server.url("/healthz")).call().is_err());
    let log = server.log();
    let events: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let shutdown = events
        .iter()
        .find(|e| e["event"] == "shutdown")
        .expect("a shutdown line");
    assert_eq!(shutdown["reason"], "SIGTERM");
    assert_eq!(shutdown["in_flight_images"], 2 + images.len());
    assert_eq!(events.last().unwrap()["event"], "stopped", "{log}");
}

#[test]
fn a_network_without_head_features_and_classes_equal_featurize_and_classify() {
    let weights = shared(MOBILENET);
    let images = test_images(1);
    let server = Server::start(&[
        "--weights",
        &weights.display().to_string(),
        "--labels",
        &shared(LABELS).display().to_string(),
    ]);
    let csv = ok(dltool()
        .args(["featurize", "-q", "--no-header", "--weights"])
        .arg(&weights)
        .args(&images));
    let jsonl = ok(dltool()
        .args([
            "classify",
            "-q",
            "--format",
            "jsonl",
            "--top-k",
            "3",
            "--weights",
        ])
        .arg(&weights)
        .arg("--labels")
        .arg(shared(LABELS))
        .args(&images));
    for ((image, row), classified) in images.iter().zip(csv.lines()).zip(jsonl.lines()) {
        let want: Vec<f32> = row.split(',').skip(2).map(|v| v.parse().unwrap()).collect();
        let a = server.post_image("/v1/featurize", image);
        assert_eq!(a.status, 200, "{a:?}");
        let got: Vec<f32> = a.json["features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(a.json["dim"], 256);
        assert_eq!(got, want, "{}", image.display());

        let a = server.post_image("/v1/classify?top_k=3", image);
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(
            a.json,
            without_path(&serde_json::from_str(classified).unwrap())
        );
    }
    let a = server.post_image("/v1/predict", &images[0]);
    assert_eq!(
        (a.status, a.json["error"]["kind"].as_str()),
        (404, Some("no_head"))
    );
}

#[test]
fn an_inception_head_predicts_as_dltool_predict() {
    let dir = tempfile::tempdir().unwrap();
    let weights = shared(INCEPTION);
    let head = train_head(dir.path(), &weights, 3);
    let images = test_images(1);
    let expected = predict_jsonl(&head, &weights, &images, &[]);
    let server = Server::start(&[
        &head.display().to_string(),
        "--weights",
        &weights.display().to_string(),
    ]);
    for (image, want) in images.iter().zip(&expected) {
        let a = server.post_image("/v1/predict", image);
        assert_eq!(a.status, 200, "{a:?}");
        assert_eq!(a.json, without_path(want), "{}", image.display());
    }
    // The shared InceptionV3 weights end at the pool: no classifier to classify with.
    let a = server.post_image("/v1/classify", &images[0]);
    assert_eq!(
        (a.status, a.json["error"]["kind"].as_str()),
        (404, Some("no_classifier"))
    );
}

#[test]
fn predict_answers_paths_on_stdin_as_they_come() {
    let images = test_images(1);
    let mut child = dltool()
        .args(["predict", "-q", "--format", "jsonl", "--weights"])
        .arg(shared(MOBILENET))
        .arg(mobilenet_head())
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let rx = line_reader(child.stdout.take().unwrap());
    // Each row comes back while stdin is still open: one long-lived process can serve a
    // stream of paths (a Spark partition).
    for image in &images {
        writeln!(stdin, "{}", image.display()).unwrap();
        stdin.flush().unwrap();
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a row before stdin is closed");
        let row: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(row["path"], image.display().to_string());
        assert!(CLASSES.contains(&row["prediction"].as_str().unwrap()));
    }
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success());
}

#[test]
fn bad_starts_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let out = dltool()
        .arg("serve")
        .arg(&missing)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.safetensors"), "{err}");

    // A port already taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = dltool()
        .args(["serve", "--weights"])
        .arg(shared(MOBILENET))
        .args(["--listen", &addr])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot listen on") && err.contains(&addr),
        "{err}"
    );
}
