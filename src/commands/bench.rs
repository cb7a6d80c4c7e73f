//! `dltool bench`: dltool and its PyTorch / ONNX Runtime peers (bench/peers) side by side,
//! network only and end to end, over a matrix of batch sizes and thread counts.
//!
//! Every measured run is its own child process, so each has its own peak RSS and no run
//! inherits another's warm caches or thread pools; the tools take turns run by run, so a
//! slow spell of a busy machine hits all of them alike.

use super::Status;
use crate::backbone::{Backbone, BackboneKind, BackboneOptions};
use crate::bench::{self, ChildRun, Peak};
use crate::image_io::{self, DEFAULT_MAX_PIXELS};
use crate::inputs;
use anyhow::{Context, bail};
use burn::prelude::Device;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Preprocessed batches already in memory; only the network is timed.
    Network,
    /// Decode, resize, network and writing the features, for every image.
    E2e,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Network => "network",
            Mode::E2e => "e2e",
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Runs, for every mode x batch x threads, each tool --repeat times, taking turns, each run in a \
child process: dltool network-only (a worker that preprocesses the images, then times \
Backbone::features over the batches after one warm-up batch), dltool end-to-end (`dltool \
featurize` on the images, its own timing line) and the peers found in --peers \
(torch_peer.py, ort_peer.py), run with --python. Make the peers' venv with \
`bash bench/peers/setup.sh`; without it dltool runs alone.

Prints images/s (median and range over the repeats), dltool's speed as a multiple of each \
peer's, the peak RSS of the child, and GFLOP/s (the network's FLOP per image up to its default \
layer: 11.4 G for InceptionV3, tools/flop_counts.py) against the FP32 peak this machine \
reaches with an FMA loop on the same number of threads.

--backbone picks the network (default InceptionV3); its weights default to the shared ones \
where ../shared has them, and its golden file likewise. The peers build the same network from \
the same weight file with dltool's preprocessing for it (InceptionV3, EfficientNet-Lite0/2, \
ResNet50, VGG16/19, Xception; MobileNet v1 runs dltool alone), and with an e2e mode the \
table is followed by the cosine of each peer's features against dltool's, image by image.")]
pub struct Args {
    /// Image folder, walked like `dltool featurize DIR` [default: $DLTOOL_SHARED/flowers,
    /// else ../shared/flowers].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Use the first N images of the folder's sorted list.
    #[arg(long, default_value_t = 32, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub images: u32,

    /// Modes to run, comma-separated [network, e2e].
    #[arg(long, value_delimiter = ',', default_values = ["network", "e2e"], value_name = "MODE")]
    pub mode: Vec<Mode>,

    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["1", "8", "32"], value_name = "B",
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: Vec<u32>,

    /// Thread counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_values = ["1", "2"], value_name = "T",
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Vec<u32>,

    /// Runs of each tool per configuration; the table shows their median.
    #[arg(long, default_value_t = 3, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
    pub repeat: u32,

    /// Network to measure [default: inception_v3].
    #[arg(long, value_enum, value_name = "NAME")]
    pub backbone: Option<BackboneKind>,

    /// Weight file [default: as for featurize, then $DLTOOL_SHARED/weights]; the peers read the
    /// same file (safetensors or a PyTorch .pth).
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,

    /// Golden net.safetensors (input -> pool) every tool checks its network against at
    /// startup [default: the network's in $DLTOOL_SHARED/golden, if there].
    #[arg(long, value_name = "FILE")]
    pub golden: Option<PathBuf>,

    /// Folder of the peer scripts [default: bench/peers, here or in the source tree].
    #[arg(long, value_name = "DIR")]
    pub peers: Option<PathBuf>,

    /// Python for the peers [default: PEERS/../.venv/bin/python].
    #[arg(long, value_name = "FILE")]
    pub python: Option<PathBuf>,

    /// Run dltool alone.
    #[arg(long)]
    pub no_peers: bool,

    /// Print the results as one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Internal: be the dltool network-only child (one mode, batch and thread count).
    #[arg(long, hide = true)]
    pub worker: bool,

    /// With --weights MODEL.onnx: the model's preprocessing (and limits), as for featurize.
    /// The peers are then ONNX Runtime alone, on the same file.
    #[command(flatten)]
    pub onnx: super::OnnxArgs,
}

/// What a child reports on its last stdout line (the peers print the same keys).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Report {
    tool: String,
    images: usize,
    seconds: f64,
    img_per_s: f64,
    #[serde(default)]
    golden_max_abs_diff: Option<f64>,
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    if args.worker {
        return worker(&args);
    }
    driver(&args)
}

fn shared_dir() -> PathBuf {
    std::env::var_os("DLTOOL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared"))
}

fn single<T: Copy>(values: &[T], flag: &str) -> anyhow::Result<T> {
    match values {
        [v] => Ok(*v),
        _ => bail!("--worker takes exactly one {flag}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The dltool network-only child

fn worker(args: &Args) -> anyhow::Result<Status> {
    if single(&args.mode, "--mode")? != Mode::Network {
        bail!("--worker measures --mode network only (e2e runs `dltool featurize`)");
    }
    let batch = single(&args.batch, "--batch")? as usize;
    let threads = single(&args.threads, "--threads")?;
    let dir = args.dir.as_ref().context("--worker needs --dir")?;
    super::set_threads(Some(threads));

    let opts = BackboneOptions {
        kind: args.backbone,
        weights: args.weights.clone(),
        onnx: args.onnx.choice(),
        ..BackboneOptions::default()
    };
    let backbone = Backbone::load(&opts, Device::flex())?;
    let diff = match &args.golden {
        Some(g) => {
            let d = golden_max_abs_diff(&backbone, g)?;
            // A network that computes something else must not get a speed figure.
            if d.is_nan() || d > GOLDEN_TOLERANCE {
                bail!(
                    "{}: dltool's features differ from the reference by {d:.2e} (more than \
                     {GOLDEN_TOLERANCE:.0e}): not timing a wrong network",
                    g.display()
                );
            }
            Some(d)
        }
        None => None,
    };

    let list = list_images(dir, args.images as usize)?;
    let pre = backbone.preprocess;
    let pixels: Vec<Vec<f32>> = list
        .par_iter()
        .map(|input| {
            image_io::load_for_network(&input.path, &pre, DEFAULT_MAX_PIXELS)
                .map_err(|e| anyhow::anyhow!("{}: {e}", input.display))
        })
        .collect::<anyhow::Result<_>>()?;
    let batches: Vec<(Vec<f32>, usize)> = pixels
        .chunks(batch)
        .map(|c| (c.concat(), c.len()))
        .collect();

    // One untimed batch first, as the peers do: first-call costs are not throughput.
    let (first, n) = &batches[0];
    std::hint::black_box(backbone.features(first.clone(), *n));
    let started = Instant::now();
    for (px, n) in batches {
        std::hint::black_box(backbone.features(px, n));
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = Report {
        tool: "dltool".into(),
        images: list.len(),
        seconds,
        img_per_s: list.len() as f64 / seconds,
        golden_max_abs_diff: diff,
    };
    crate::outln!("{}", serde_json::to_string(&report)?)?;
    Ok(Status::Ok)
}

/// The first `n` images of `dir` in featurize's order.
fn list_images(dir: &Path, n: usize) -> anyhow::Result<Vec<inputs::Input>> {
    if !dir.is_dir() {
        bail!("{}: not a directory", dir.display());
    }
    let arg = dir.to_string_lossy().into_owned();
    let mut list = inputs::collect(&[arg], &mut std::io::empty())
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .inputs;
    if list.is_empty() {
        bail!("{}: no images", dir.display());
    }
    list.truncate(n);
    Ok(list)
}

/// The shared weight file and golden file of a network, relative to ../shared, where it has
/// them.
fn shared_files(network: &str) -> (Option<&'static str>, Option<&'static str>) {
    match network {
        "inception_v3" => (
            Some("weights/inception_v3_tf2015.safetensors"),
            Some("golden/inception_v3_tf2015/net.safetensors"),
        ),
        "mobilenet_v1" => (
            Some("weights/mobilenet_v1_0.25_224/model.json"),
            Some("golden/mobilenet_v1_0.25_224/net.safetensors"),
        ),
        "efficientnet_lite0" => (
            Some("weights/efficientnet_lite0/efficientnet-lite0-57934424.pth"),
            Some("golden/efficientnet_lite0/net.safetensors"),
        ),
        "efficientnet_lite2" => (
            Some("weights/efficientnet_lite2/efficientnet-lite2-9656183e.pth"),
            Some("golden/efficientnet_lite2/net.safetensors"),
        ),
        _ => (None, None),
    }
}

/// The built-in networks the peers (bench/peers/torch_peer.py, nets.py) can build from dltool's
/// weight file; MobileNet v1's TF.js files they cannot read.
const PEER_NETWORKS: &[&str] = &[
    "inception_v3",
    "efficientnet_lite0",
    "efficientnet_lite2",
    "resnet50",
    "vgg16",
    "vgg19",
    "xception",
];

/// The largest max |features - pool| the worker accepts before timing: the CPU engine stays
/// near 1e-5 on pooled values up to ~17 (README), so this only catches a broken network.
const GOLDEN_TOLERANCE: f64 = 1e-3;

/// max |features(input) - pool| over the golden file's images.
fn golden_max_abs_diff(backbone: &Backbone, path: &Path) -> anyhow::Result<f64> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let tensor = |name: &str| -> anyhow::Result<Vec<f32>> {
        let t = st
            .tensor(name)
            .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
        if t.dtype() != safetensors::Dtype::F32 {
            bail!("{}: tensor `{name}` is not f32", path.display());
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4-byte chunk")))
            .collect())
    };
    let (input, pool) = (tensor("input")?, tensor("pool")?);
    let n = input.len() / backbone.input_len();
    if n == 0 || n * backbone.input_len() != input.len() || pool.len() != n * backbone.dim() {
        bail!(
            "{}: `input`/`pool` do not fit the network's input and feature sizes",
            path.display()
        );
    }
    let got = backbone.features(input, n);
    Ok(got
        .iter()
        .zip(&pool)
        .map(|(a, b)| f64::from((a - b).abs()))
        .fold(0.0, f64::max))
}

// ---------------------------------------------------------------------------------------------
// The driver

/// One tool the driver runs.
#[derive(Debug, Clone)]
enum Tool {
    Dltool,
    Peer {
        name: String,
        python: PathBuf,
        script: PathBuf,
    },
}

impl Tool {
    fn name(&self) -> &str {
        match self {
            Tool::Dltool => "dltool",
            Tool::Peer { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Sample {
    img_per_s: f64,
    seconds: f64,
    wall_s: f64,
    peak_rss_mib: Option<f64>,
}

/// Scratch folder removed when dropped.
struct WorkDir(PathBuf);

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the driver needs for every child.
#[derive(Clone)]
struct Setup {
    backbone: &'static str,
    exe: PathBuf,
    images_dir: PathBuf,
    out_dir: PathBuf,
    images: usize,
    weights: PathBuf,
    golden: Option<PathBuf>,
    /// A built-in network's resolved preprocessing (`Preprocess::spec`), for the peers.
    preprocess: Option<String>,
    /// For an ONNX model: the flags that say how it is fed (to dltool's children) and the
    /// resolved preprocessing (to the peers).
    onnx: Option<OnnxSetup>,
}

#[derive(Clone)]
struct OnnxSetup {
    flags: Vec<String>,
    spec: String,
}

/// The flags and preprocessing of `--weights MODEL.onnx` for the children.
fn onnx_setup(args: &Args, weights: &Path) -> anyhow::Result<OnnxSetup> {
    let choice = args.onnx.choice();
    let model = crate::onnx_net::OnnxModel::open(weights, &choice.limits)?;
    let (h, w) = model.resolve_size(choice.size)?;
    let pre = choice
        .preprocess
        .resolve(w as u32, h as u32)
        .with_context(|| {
            format!(
                "{}: say how the model's input is preprocessed with --preprocess PRESET",
                weights.display()
            )
        })?;
    let o = &args.onnx;
    let mut flags = Vec::new();
    if let Some(p) = o.preprocess {
        flags.push(format!("--preprocess={}", p.name()));
    }
    if let Some(n) = o.size {
        flags.push(format!("--size={n}"));
    }
    if let Some(r) = o.resize {
        flags.push(format!("--resize={}", r.name()));
    }
    let triple = |v: [f32; 3]| format!("{},{},{}", v[0], v[1], v[2]);
    if let Some(m) = o.mean {
        flags.push(format!("--mean={}", triple(m)));
    }
    if let Some(s) = o.std {
        flags.push(format!("--std={}", triple(s)));
    }
    flags.push(format!("--max-model-mb={}", o.limits.max_model_mb));
    flags.push(format!(
        "--max-optimize-secs={}",
        o.limits.max_optimize_secs
    ));
    Ok(OnnxSetup {
        flags,
        spec: pre.spec(),
    })
}

fn driver(args: &Args) -> anyhow::Result<Status> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| shared_dir().join("flowers"));
    let spec = args
        .backbone
        .map_or_else(crate::backbones::default_spec, BackboneKind::spec);
    let (shared_file, shared_golden) = shared_files(spec.name);
    // The benchmark is about the shared data set: its weights are the fallback.
    let shared_weights = shared_file.map(|f| shared_dir().join(f));
    let weights =
        crate::weights::resolve_local(args.weights.as_deref(), spec.files, spec.registry_entry)
            .or_else(|e| match (&args.weights, shared_weights) {
                (None, Some(w)) if w.is_file() => Ok(w),
                _ => Err(e),
            })
            .map_err(anyhow::Error::msg)?;
    let onnx = if crate::backbones::onnx::is_onnx_path(&weights) {
        Some(onnx_setup(args, &weights)?)
    } else {
        None
    };
    let golden = match &args.golden {
        Some(g) if g.is_file() => Some(g.clone()),
        Some(g) => bail!("{}: golden file not found", g.display()),
        // The shared golden is no check of another model.
        None if onnx.is_some() => None,
        None => shared_golden
            .map(|g| shared_dir().join(g))
            .filter(|g| g.is_file()),
    };
    let list = list_images(&dir, args.images as usize)?;
    if list.len() < args.images as usize {
        crate::note!(
            "bench: {} has only {} image(s); using them all",
            dir.display(),
            list.len()
        );
    }
    // Loaded here once: a wrong file fails before any child runs, and its provenance (the
    // width of a MobileNet) says which FLOP count applies.
    // (An ONNX model's FLOP count is not known.)
    // It also gives the peers the network's resolved preprocessing.
    let (flop, preprocess) = if onnx.is_some() {
        (None, None)
    } else {
        let network = Backbone::load(
            &BackboneOptions {
                kind: Some(BackboneKind(spec)),
                weights: Some(weights.clone()),
                ..BackboneOptions::default()
            },
            Device::flex(),
        )?;
        (
            bench::flop_per_image(&network.meta.backbone),
            Some(network.preprocess.spec()),
        )
    };

    // Every tool reads the same N files: a folder of links to them, walked by all alike.
    let work = WorkDir(std::env::temp_dir().join(format!(
        "dltool-bench-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    )));
    let images_dir = work.0.join("images");
    let out_dir = work.0.join("out");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("{}: cannot create", out_dir.display()))?;
    for input in &list {
        let rel = input.path.strip_prefix(&dir).unwrap_or(&input.path);
        let link = images_dir.join(rel);
        let target = std::fs::canonicalize(&input.path)
            .with_context(|| format!("{}: cannot resolve", input.path.display()))?;
        std::fs::create_dir_all(link.parent().expect("a file has a parent"))?;
        symlink(&target, &link).with_context(|| format!("{}: cannot link", link.display()))?;
    }
    let setup = Setup {
        // An ONNX file's children run it as the onnx network, not as the default one.
        backbone: if onnx.is_some() {
            crate::backbones::onnx::SPEC.name
        } else {
            spec.name
        },
        exe: std::env::current_exe().context("cannot find the dltool executable")?,
        images_dir,
        out_dir,
        images: list.len(),
        weights,
        golden,
        preprocess,
        onnx,
    };

    let tools = if setup.onnx.is_some() || PEER_NETWORKS.contains(&spec.name) {
        find_tools(args, setup.onnx.is_some())
    } else {
        if !args.no_peers {
            crate::note!(
                "bench: the peers have no {} (they build {}); measuring it with dltool alone",
                spec.title,
                PEER_NETWORKS.join(", ")
            );
        }
        vec![Tool::Dltool]
    };
    let mut threads: Vec<u32> = args.threads.clone();
    threads.sort_unstable();
    threads.dedup();
    let peaks: BTreeMap<u32, Peak> = threads
        .iter()
        .filter_map(|&t| bench::peak_fp32(t as usize, Duration::from_millis(300)).map(|p| (t, p)))
        .collect();

    let mut configs: Vec<(Mode, u32, u32)> = Vec::new();
    for &mode in &args.mode {
        for &batch in &args.batch {
            for &t in &args.threads {
                if !configs.contains(&(mode, batch, t)) {
                    configs.push((mode, batch, t));
                }
            }
        }
    }

    // One unrecorded run of each tool on one image first: it fills the page cache with the
    // weights, the binaries and the Python libraries for all alike, and makes ort_peer's
    // one-time ONNX export, whose torch import would otherwise inflate a measured RSS.
    let warm_up = Setup {
        images: 1,
        ..setup.clone()
    };
    let mut active: Vec<bool> = vec![true; tools.len()];
    for (ti, tool) in tools.iter().enumerate() {
        crate::note!("[warm-up] {}", tool.name());
        if let Err(e) = run_once(&warm_up, tool, Mode::Network, 1, threads[0]) {
            if matches!(tool, Tool::Dltool) {
                return Err(e.context("dltool warm-up run failed"));
            }
            crate::note!(
                "bench: {} failed its warm-up run, dropping it: {e:#}",
                tool.name()
            );
            active[ti] = false;
        }
    }

    let total = configs.len() * args.repeat as usize * tools.len();
    let mut done = 0;
    let mut samples: BTreeMap<(usize, usize), Vec<Sample>> = BTreeMap::new();
    let mut golden_diffs: BTreeMap<String, f64> = BTreeMap::new();
    for (ci, &(mode, batch, t)) in configs.iter().enumerate() {
        for _ in 0..args.repeat {
            for (ti, tool) in tools.iter().enumerate() {
                done += 1;
                if !active[ti] {
                    continue;
                }
                let label = format!("{} batch {batch} threads {t} {}", mode.name(), tool.name());
                match run_once(&setup, tool, mode, batch, t) {
                    Ok((sample, diff)) => {
                        crate::note!(
                            "[{done}/{total}] {label}: {:.2} img/s, peak RSS {}",
                            sample.img_per_s,
                            fmt_mib(sample.peak_rss_mib)
                        );
                        if let Some(d) = diff {
                            golden_diffs.insert(tool.name().to_string(), d);
                        }
                        samples.entry((ci, ti)).or_default().push(sample);
                    }
                    Err(e) if matches!(tool, Tool::Dltool) => {
                        return Err(e.context(format!("{label} failed")));
                    }
                    Err(e) => {
                        crate::note!("bench: {label} failed, dropping {}: {e:#}", tool.name());
                        active[ti] = false;
                    }
                }
            }
        }
    }

    let rows = summarize(&configs, &tools, &samples, &peaks, flop);
    // The last e2e run of each tool left its features in out_dir: the same images, in the same
    // order, through the same network.
    let cosines = if args.mode.contains(&Mode::E2e) {
        feature_cosines(&setup.out_dir, &tools, &active)
    } else {
        BTreeMap::new()
    };
    if args.json {
        let out = serde_json::json!({
            "cpu": bench::cpu_model(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "images": setup.images,
            "dir": dir,
            "repeat": args.repeat,
            "backbone": setup.backbone,
            "weights": setup.weights,
            "flop_per_image": flop,
            "peak_fp32": peaks.values().collect::<Vec<_>>(),
            "golden_max_abs_diff": golden_diffs,
            "feature_cosine": cosines,
            "rows": rows,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&out)?)?;
    } else {
        print_table(
            spec.title,
            flop,
            &dir,
            setup.images,
            args.repeat,
            &peaks,
            &golden_diffs,
            &cosines,
            &rows,
        )?;
    }
    Ok(Status::Ok)
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(not(unix))]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::fs::copy(target, link).map(|_| ())
}

/// dltool, then each peer script present when a Python for it is.
fn find_tools(args: &Args, onnx: bool) -> Vec<Tool> {
    let mut tools = vec![Tool::Dltool];
    if args.no_peers {
        return tools;
    }
    let peers = args.peers.clone().unwrap_or_else(|| {
        let here = PathBuf::from("bench/peers");
        if here.is_dir() {
            here
        } else {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/peers")
        }
    });
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| peers.join("../.venv/bin/python"));
    if !python.is_file() {
        crate::note!(
            "bench: no Python for the peers at {}: make the venv with `bash {}/setup.sh` (or pass \
             --python); running dltool alone",
            python.display(),
            peers.display()
        );
        return tools;
    }
    for (name, file) in [("torch", "torch_peer.py"), ("onnxruntime", "ort_peer.py")] {
        // torch_peer builds InceptionV3; an ONNX model runs on ONNX Runtime only.
        if onnx && name == "torch" {
            continue;
        }
        let script = peers.join(file);
        if script.is_file() {
            tools.push(Tool::Peer {
                name: name.into(),
                python: python.clone(),
                script,
            });
        } else {
            crate::note!("bench: no {} in {}; skipping {name}", file, peers.display());
        }
    }
    tools
}

/// One measured run of `tool`; also the golden difference it reported, if any.
fn run_once(
    setup: &Setup,
    tool: &Tool,
    mode: Mode,
    batch: u32,
    threads: u32,
) -> anyhow::Result<(Sample, Option<f64>)> {
    let mut cmd;
    match (tool, mode) {
        (Tool::Dltool, Mode::Network) => {
            cmd = Command::new(&setup.exe);
            cmd.arg("bench").arg("--worker").arg("--mode=network");
            cmd.arg(format!("--backbone={}", setup.backbone));
            cmd.arg(format!("--batch={batch}"))
                .arg(format!("--threads={threads}"))
                .arg(format!("--images={}", setup.images))
                .arg("--dir")
                .arg(&setup.images_dir)
                .arg("--weights")
                .arg(&setup.weights);
            if let Some(g) = &setup.golden {
                cmd.arg("--golden").arg(g);
            }
            if let Some(o) = &setup.onnx {
                cmd.args(&o.flags);
            }
        }
        (Tool::Dltool, Mode::E2e) => {
            cmd = Command::new(&setup.exe);
            cmd.arg("featurize")
                .arg(format!("--backbone={}", setup.backbone))
                .arg(&setup.images_dir)
                .arg("-o")
                .arg(setup.out_dir.join("dltool.safetensors"))
                .arg(format!("--batch-size={batch}"))
                .arg(format!("--threads={threads}"))
                .arg("--weights")
                .arg(&setup.weights);
            if let Some(o) = &setup.onnx {
                cmd.args(&o.flags);
            }
        }
        (
            Tool::Peer {
                name,
                python,
                script,
            },
            _,
        ) => {
            cmd = Command::new(python);
            cmd.arg(script)
                .arg(format!("--mode={}", mode.name()))
                .arg(format!("--batch={batch}"))
                .arg(format!("--threads={threads}"))
                .arg(format!("--images={}", setup.images))
                .arg("--dir")
                .arg(&setup.images_dir)
                .arg("--weights")
                .arg(&setup.weights)
                .arg("--out")
                .arg(setup.out_dir.join(format!("{name}.npy")));
            if let Some(o) = &setup.onnx {
                cmd.arg(format!("--preprocess={}", o.spec));
            } else {
                cmd.arg(format!("--network={}", setup.backbone));
                if let Some(p) = &setup.preprocess {
                    cmd.arg(format!("--preprocess={p}"));
                }
            }
            if let Some(g) = &setup.golden {
                cmd.arg("--golden").arg(g);
            }
        }
    }
    let run = bench::run_child(&mut cmd)
        .with_context(|| format!("cannot run {}", cmd.get_program().to_string_lossy()))?;
    if !run.status.success() {
        bail!("{} ({})", run.status, last_line(&run.stderr));
    }
    let report = match (tool, mode) {
        (Tool::Dltool, Mode::E2e) => parse_featurize_summary(&run)?,
        _ => {
            let line = run.stdout.lines().rev().find(|l| !l.trim().is_empty());
            let line =
                line.with_context(|| format!("printed no result ({})", last_line(&run.stderr)))?;
            serde_json::from_str::<Report>(line)
                .with_context(|| format!("cannot read its result line `{line}`"))?
        }
    };
    if report.images != setup.images {
        bail!(
            "{} processed {} image(s), not {}",
            report.tool,
            report.images,
            setup.images
        );
    }
    if !(report.img_per_s.is_finite() && report.img_per_s > 0.0) {
        bail!("reported {} images/s", report.img_per_s);
    }
    Ok((
        Sample {
            img_per_s: report.img_per_s,
            seconds: report.seconds,
            wall_s: run.wall.as_secs_f64(),
            peak_rss_mib: run.max_rss_kib.map(|k| k as f64 / 1024.0),
        },
        report.golden_max_abs_diff,
    ))
}

/// Cosine similarity of a peer's features with dltool's, image by image.
#[derive(Debug, Clone, Serialize)]
struct Cosine {
    images: usize,
    dim: usize,
    min: f64,
    mean: f64,
    /// max |peer - dltool| over all features, and max |dltool| for its scale.
    max_abs_diff: f64,
    max_abs: f64,
}

/// For each active peer, the cosine of the features its last e2e run wrote (`NAME.npy`) with
/// those of dltool's (`dltool.safetensors`); a file that is missing or of another shape is a
/// note, not a failure (the speed figures stand without it).
fn feature_cosines(out_dir: &Path, tools: &[Tool], active: &[bool]) -> BTreeMap<String, Cosine> {
    let mut out = BTreeMap::new();
    let dltool = match crate::features::read_features(&out_dir.join("dltool.safetensors")) {
        Ok(t) => t,
        Err(e) => {
            crate::note!("bench: cannot compare features: {e}");
            return out;
        }
    };
    for (tool, &on) in tools.iter().zip(active) {
        let Tool::Peer { name, .. } = tool else {
            continue;
        };
        if !on {
            continue;
        }
        let path = out_dir.join(format!("{name}.npy"));
        let (shape, data) = match read_npy_f32(&path) {
            Ok(v) => v,
            Err(e) => {
                crate::note!("bench: cannot compare {name}'s features: {e:#}");
                continue;
            }
        };
        if shape != [dltool.len(), dltool.dim] {
            crate::note!(
                "bench: {name}'s features are {shape:?}, dltool's [{}, {}]: not the same layer",
                dltool.len(),
                dltool.dim
            );
            continue;
        }
        let cos: Vec<f64> = dltool
            .data
            .chunks_exact(dltool.dim)
            .zip(data.chunks_exact(dltool.dim))
            .map(|(a, b)| cosine(a, b))
            .collect();
        out.insert(
            name.clone(),
            Cosine {
                images: cos.len(),
                dim: dltool.dim,
                min: cos.iter().copied().fold(f64::INFINITY, f64::min),
                mean: cos.iter().sum::<f64>() / cos.len() as f64,
                max_abs_diff: dltool
                    .data
                    .iter()
                    .zip(&data)
                    .map(|(a, b)| f64::from((a - b).abs()))
                    .fold(0.0, f64::max),
                max_abs: dltool
                    .data
                    .iter()
                    .map(|a| f64::from(a.abs()))
                    .fold(0.0, f64::max),
            },
        );
    }
    out
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// A C-order little-endian float32 `.npy` file (what the peers write with `np.save`): its
/// shape and values.
fn read_npy_f32(path: &Path) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let bad = |what: &str| anyhow::anyhow!("{}: {what}", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        _ => return Err(bad("unknown .npy version")),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad("truncated header"))?;
    if !header.contains("'descr': '<f4'") || !header.contains("'fortran_order': False") {
        return Err(bad("not C-order little-endian float32"));
    }
    let shape: Vec<usize> = header
        .split_once("'shape': (")
        .and_then(|(_, rest)| rest.split_once(')'))
        .and_then(|(dims, _)| {
            dims.split(',')
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .map(|d| d.parse().ok())
                .collect::<Option<Vec<usize>>>()
        })
        .ok_or_else(|| bad("no shape in the header"))?;
    let data: Vec<f32> = bytes[start + header_len..]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4-byte chunk")))
        .collect();
    if data.len() != shape.iter().product::<usize>() {
        return Err(bad("size does not match its shape"));
    }
    Ok((shape, data))
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
}

/// Reads featurize's closing line, `featurized N image(s), skipped S, in X s (R images/s)`:
/// its clock runs from after the weights are loaded to the output written, the span the
/// peers time in e2e mode.
fn parse_featurize_summary(run: &ChildRun) -> anyhow::Result<Report> {
    let line = run
        .stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("featurized "))
        .with_context(|| format!("featurize printed no summary ({})", last_line(&run.stderr)))?;
    let bad = || anyhow::anyhow!("cannot read featurize's summary `{line}`");
    let images: usize = line["featurized ".len()..]
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(bad)?;
    let (_, rate) = line.rsplit_once(" (").ok_or_else(bad)?;
    let img_per_s: f64 = rate
        .strip_suffix(" images/s)")
        .and_then(|r| r.parse().ok())
        .ok_or_else(bad)?;
    Ok(Report {
        tool: "dltool".into(),
        images,
        seconds: images as f64 / img_per_s,
        img_per_s,
        golden_max_abs_diff: None,
    })
}

/// One line of the results.
#[derive(Debug, Serialize)]
struct Row {
    mode: Mode,
    batch: u32,
    threads: u32,
    tool: String,
    runs: Vec<Sample>,
    img_per_s_median: f64,
    img_per_s_min: f64,
    img_per_s_max: f64,
    /// dltool's median over this tool's (None on dltool's own row).
    dltool_ratio: Option<f64>,
    peak_rss_mib: Option<f64>,
    /// `None` for a network without a FLOP count (an ONNX model's is not known).
    gflops: Option<f64>,
    percent_of_peak: Option<f64>,
}

fn summarize(
    configs: &[(Mode, u32, u32)],
    tools: &[Tool],
    samples: &BTreeMap<(usize, usize), Vec<Sample>>,
    peaks: &BTreeMap<u32, Peak>,
    flop_per_image: Option<f64>,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for (ci, &(mode, batch, threads)) in configs.iter().enumerate() {
        let median_of = |ti: usize| {
            samples
                .get(&(ci, ti))
                .map(|s| bench::median(&s.iter().map(|x| x.img_per_s).collect::<Vec<_>>()))
        };
        let dltool = median_of(0);
        for (ti, tool) in tools.iter().enumerate() {
            let Some(runs) = samples.get(&(ci, ti)) else {
                continue;
            };
            let rates: Vec<f64> = runs.iter().map(|s| s.img_per_s).collect();
            let median = bench::median(&rates);
            let gflops = flop_per_image.map(|f| median * f / 1e9);
            rows.push(Row {
                mode,
                batch,
                threads,
                tool: tool.name().to_string(),
                img_per_s_median: median,
                img_per_s_min: rates.iter().copied().fold(f64::INFINITY, f64::min),
                img_per_s_max: rates.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                dltool_ratio: match tool {
                    Tool::Dltool => None,
                    Tool::Peer { .. } => dltool.map(|d| d / median),
                },
                peak_rss_mib: runs.iter().filter_map(|s| s.peak_rss_mib).reduce(f64::max),
                gflops,
                percent_of_peak: gflops
                    .zip(peaks.get(&threads))
                    .map(|(g, p)| 100.0 * g / p.gflops),
                runs: runs.clone(),
            });
        }
    }
    rows
}

fn fmt_mib(mib: Option<f64>) -> String {
    mib.map_or_else(|| "?".to_string(), |m| format!("{m:.0} MiB"))
}

#[allow(clippy::too_many_arguments)]
fn print_table(
    network: &str,
    flop_per_image: Option<f64>,
    dir: &Path,
    images: usize,
    repeat: u32,
    peaks: &BTreeMap<u32, Peak>,
    golden: &BTreeMap<String, f64>,
    cosines: &BTreeMap<String, Cosine>,
    rows: &[Row],
) -> anyhow::Result<()> {
    crate::outln!(
        "dltool bench: {network}, {images} image(s) of {}, {repeat} run(s) per tool and \
         configuration",
        dir.display()
    )?;
    match flop_per_image {
        Some(f) => crate::outln!("{network}: {:.3} GFLOP per image", f / 1e9)?,
        None => crate::outln!("{network}: no FLOP count (GFLOP/s not shown)")?,
    }
    crate::outln!(
        "CPU: {} ({} logical cores)",
        bench::cpu_model().unwrap_or_else(|| "unknown".into()),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    )?;
    if peaks.is_empty() {
        crate::outln!("FP32 peak: not measured (no AVX-512F or AVX2+FMA)")?;
    }
    for p in peaks.values() {
        crate::outln!(
            "FP32 peak, {} thread(s): {:.1} GFLOP/s ({} FMA loop)",
            p.threads,
            p.gflops,
            p.isa
        )?;
    }
    for (tool, d) in golden {
        crate::outln!("golden check, {tool}: max abs diff {d:.2e}")?;
    }
    for (tool, c) in cosines {
        crate::outln!(
            "features vs dltool's (last e2e run, {} images x {}): {tool} cosine min {:.7}, mean \
             {:.7}, max abs diff {:.2e} (max |dltool| {:.2e})",
            c.images,
            c.dim,
            c.min,
            c.mean,
            c.max_abs_diff,
            c.max_abs
        )?;
    }
    crate::outln!()?;
    crate::outln!(
        "| mode | batch | threads | tool | img/s median (min-max) | dltool / tool | peak RSS | GFLOP/s | % of peak |"
    )?;
    crate::outln!("|---|---:|---:|---|---:|---:|---:|---:|---:|")?;
    for r in rows {
        crate::outln!(
            "| {} | {} | {} | {} | {:.2} ({:.2}-{:.2}) | {} | {} | {} | {} |",
            r.mode.name(),
            r.batch,
            r.threads,
            r.tool,
            r.img_per_s_median,
            r.img_per_s_min,
            r.img_per_s_max,
            r.dltool_ratio
                .map_or_else(|| "-".to_string(), |x| format!("{x:.2}")),
            fmt_mib(r.peak_rss_mib),
            r.gflops
                .map_or_else(|| "-".to_string(), |g| format!("{g:.1}")),
            r.percent_of_peak
                .map_or_else(|| "-".to_string(), |x| format!("{x:.1}%")),
        )?;
    }
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    fn run_with_stderr(stderr: &str) -> ChildRun {
        let status = {
            use std::os::unix::process::ExitStatusExt;
            std::process::ExitStatus::from_raw(0)
        };
        ChildRun {
            status,
            stdout: String::new(),
            stderr: stderr.to_string(),
            wall: Duration::from_secs(1),
            max_rss_kib: Some(1),
        }
    }

    #[test]
    fn reads_featurize_summary() {
        let r = parse_featurize_summary(&run_with_stderr(
            "skipped x: bad\nfeaturized 32 image(s), skipped 0, in 6.4 s (5.02 images/s)\n",
        ))
        .unwrap();
        assert_eq!(r.images, 32);
        assert_eq!(r.img_per_s, 5.02);
    }

    #[test]
    fn reads_a_peers_npy_and_compares_features() {
        let dir = std::env::temp_dir().join(format!("dltool-npy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("torch.npy");
        // What np.save writes for np.float32 [[1, 2], [3, 4]] (version 1, header padded to 64).
        let mut header = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2), }".to_string();
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend((header.len() as u16).to_le_bytes());
        bytes.extend(header.as_bytes());
        for v in [1.0f32, 2.0, 3.0, 4.0] {
            bytes.extend(v.to_le_bytes());
        }
        std::fs::write(&path, &bytes).unwrap();
        let (shape, data) = read_npy_f32(&path).unwrap();
        assert_eq!(shape, [2, 2]);
        assert_eq!(data, [1.0, 2.0, 3.0, 4.0]);
        bytes.truncate(bytes.len() - 4);
        std::fs::write(&path, &bytes).unwrap();
        assert!(read_npy_f32(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
    }

    #[test]
    fn featurize_summary_missing_or_garbled_is_an_error() {
        assert!(parse_featurize_summary(&run_with_stderr("dltool: error: boom\n")).is_err());
        assert!(
            parse_featurize_summary(&run_with_stderr("featurized 3 image(s), in 1 s\n")).is_err()
        );
    }
}
