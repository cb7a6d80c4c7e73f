//! Load generator for `dltool serve`: throughput and p50/p99 latency at 1, 4, 16 and 64
//! concurrent clients on 127.0.0.1, beside `featurize`'s throughput on the same images and
//! network (what batching should approach) and one image's time at batch 1. The server's own
//! `/metrics` give the mean batch and the network's time per batch over the same requests, so
//! a lone client's latency is set against the network time of its own images, not against a
//! run minutes apart on a machine whose speed drifts.
//!
//! ```sh
//! cargo bench --bench serve_load -- [--weights W] [--head HEAD] [--images N] [--seconds S]
//!     [--clients 1,4,16,64] [-- SERVE ARGS...]
//! ```
//! Defaults: InceptionV3 tf2015 weights from ../shared (or $DLTOOL_SHARED), no head (the
//! `/v1/featurize` endpoint; with --head, `/v1/predict`), the first N=64 flowers, 10 s per
//! client count. Arguments after a second `--` go to `dltool serve` (`--max-batch 16`...).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Options {
    weights: PathBuf,
    head: Option<PathBuf>,
    images: usize,
    seconds: f64,
    clients: Vec<usize>,
    serve_args: Vec<String>,
}

fn shared() -> PathBuf {
    std::env::var_os("DLTOOL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

fn parse_args() -> Options {
    let mut o = Options {
        weights: shared().join("weights/inception_v3_tf2015.safetensors"),
        head: None,
        images: 64,
        seconds: 10.0,
        clients: vec![1, 4, 16, 64],
        serve_args: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--weights" => o.weights = value().into(),
            "--head" => o.head = Some(value().into()),
            "--images" => o.images = value().parse().expect("--images N"),
            "--seconds" => o.seconds = value().parse().expect("--seconds S"),
            "--clients" => {
                o.clients = value()
                    .split(',')
                    .map(|c| c.parse().expect("--clients 1,4,16"))
                    .collect()
            }
            "--bench" => {} // cargo bench passes it
            "--" => {
                // cargo bench appends --bench after everything, the serve arguments included.
                o.serve_args = args.by_ref().filter(|a| a != "--bench").collect();
            }
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

fn images(n: usize) -> Vec<PathBuf> {
    let mut all = Vec::new();
    for class in ["daisy", "dandelion", "roses", "sunflowers", "tulips"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(shared().join("flowers").join(class))
            .expect("../shared/flowers (set DLTOOL_SHARED)")
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        all.push(files);
    }
    // Round-robin over the classes, so any prefix is a mix of sizes and contents.
    (0..n).map(|i| all[i % 5][i / 5].clone()).collect()
}

struct Server(Child, String);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(o: &Options) -> Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dltool"));
    cmd.arg("serve");
    if let Some(h) = &o.head {
        cmd.arg(h);
    }
    let mut child = cmd
        .arg("--weights")
        .arg(&o.weights)
        .args(["--listen", "127.0.0.1:0"])
        .args(&o.serve_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dltool serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("dltool serve {:?} exited without its address", o.serve_args))
        .to_string();
    let server = Server(child, base);
    let deadline = Instant::now() + Duration::from_secs(120);
    while ureq::get(&format!("{}/readyz", server.1)).call().is_err() {
        assert!(Instant::now() < deadline, "server not ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

/// The server's totals so far: (images through the network, batches, network seconds).
fn totals(base: &str) -> (f64, f64, f64) {
    let text = ureq::get(&format!("{base}/metrics"))
        .call()
        .expect("GET /metrics")
        .into_string()
        .unwrap();
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("/metrics has no {name}"))
    };
    (
        value("dltool_batch_size_sum"),
        value("dltool_batch_size_count"),
        value("dltool_network_duration_seconds_sum"),
    )
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `clients` threads posting images back to back for `seconds`:
/// (images/s, p50 ms, p99 ms, mean ms).
fn load(
    url: &str,
    bodies: &Arc<Vec<Vec<u8>>>,
    clients: usize,
    seconds: f64,
) -> (f64, f64, f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|_| {
            let (stop, next, bodies, url) =
                (stop.clone(), next.clone(), bodies.clone(), url.to_string());
            std::thread::spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(300))
                    .build();
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let body = &bodies[next.fetch_add(1, Ordering::Relaxed) % bodies.len()];
                    let t = Instant::now();
                    let resp = agent
                        .post(&url)
                        .set("Content-Type", "image/jpeg")
                        .send_bytes(body);
                    match resp {
                        Ok(r) => {
                            let _ = r.into_string();
                            latencies.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                        Err(e) => panic!("{url}: {e}"),
                    }
                }
                latencies
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<f64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    (
        all.len() as f64 / elapsed,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.iter().sum::<f64>() / all.len() as f64,
    )
}

/// Seconds `dltool featurize` takes over `images` with `args`.
fn featurize_seconds(o: &Options, images: &[PathBuf], args: &[&str]) -> f64 {
    let out = std::env::temp_dir().join(format!("serve_load_{}.csv", std::process::id()));
    let t = Instant::now();
    let status = Command::new(env!("CARGO_BIN_EXE_dltool"))
        .args(["featurize", "-q", "--weights"])
        .arg(&o.weights)
        .args(args)
        .args(images)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let _ = std::fs::remove_file(&out);
    t.elapsed().as_secs_f64()
}

/// featurize's images/s with `batch`, load time taken out (a run over 1 image is subtracted).
fn featurize_rate(o: &Options, images: &[PathBuf], batch: &str) -> f64 {
    let args = ["--batch-size", batch];
    let one = featurize_seconds(o, &images[..1], &args);
    let all = featurize_seconds(o, images, &args);
    (images.len() - 1) as f64 / (all - one).max(1e-9)
}

fn main() {
    let o = parse_args();
    let images = images(o.images);
    let bodies: Arc<Vec<Vec<u8>>> =
        Arc::new(images.iter().map(|p| std::fs::read(p).unwrap()).collect());
    let endpoint = if o.head.is_some() {
        "/v1/predict"
    } else {
        "/v1/featurize"
    };
    let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    println!(
        "dltool serve {}{} on {} images, {} s per client count, serve args {:?}",
        o.head
            .as_deref()
            .map(|h| format!("{} ", name(h)))
            .unwrap_or_default(),
        name(&o.weights),
        images.len(),
        o.seconds,
        o.serve_args
    );
    let server = start_server(&o);
    let url = format!("{}{endpoint}", server.1);
    // Warm-up: every image once.
    for b in bodies.iter() {
        ureq::post(&url)
            .set("Content-Type", "image/jpeg")
            .send_bytes(b)
            .unwrap();
    }
    println!("| clients | images/s | p50 ms | p99 ms | images/batch | network ms/batch |");
    println!("|---|---|---|---|---|---|");
    let mut lone = None;
    for &c in &o.clients {
        let before = totals(&server.1);
        let (rate, p50, p99, mean) = load(&url, &bodies, c, o.seconds);
        let after = totals(&server.1);
        let batches = (after.1 - before.1).max(1.0);
        let (per_batch, network_ms) = (
            (after.0 - before.0) / batches,
            (after.2 - before.2) * 1e3 / batches,
        );
        println!("| {c} | {rate:.2} | {p50:.1} | {p99:.1} | {per_batch:.2} | {network_ms:.1} |");
        if c == 1 {
            lone = Some((p50, mean, network_ms));
        }
    }
    if let Some((p50, mean, network_ms)) = lone {
        println!(
            "a lone client: mean {mean:.1} ms = {:.3}x the network's mean {network_ms:.1} ms a \
             batch over the same requests (p50 {p50:.1} ms)",
            mean / network_ms
        );
    }
    drop(server);
    let batch = o
        .serve_args
        .iter()
        .position(|a| a == "--max-batch")
        .and_then(|i| o.serve_args.get(i + 1))
        .map_or("16", String::as_str)
        .to_string();
    let featurize = featurize_rate(&o, &images, &batch);
    let single = featurize_rate(&o, &images[..images.len().min(16)], "1");
    println!(
        "featurize on the same images: {featurize:.2} images/s at batch {batch}; \
         {:.1} ms per image at batch 1",
        1e3 / single
    );
}
