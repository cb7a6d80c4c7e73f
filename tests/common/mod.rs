//! Shared test helpers: where ../shared lives and how to read golden tensors.
#![allow(dead_code)]

use dltool::features::{FeatureMeta, FeatureTable, Format, write_features};
use std::path::{Path, PathBuf};

/// `$DLTOOL_SHARED`, else `../shared` beside the crate. Tests that need it fail loudly without it.
pub fn shared_dir() -> PathBuf {
    let dir = std::env::var_os("DLTOOL_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(
        dir.join("README.md").is_file(),
        "the shared data folder is missing: expected it at {} (set DLTOOL_SHARED to its path)",
        dir.display()
    );
    dir
}

pub fn shared(rel: &str) -> PathBuf {
    let p = shared_dir().join(rel);
    assert!(p.exists(), "missing shared file {}", p.display());
    p
}

/// The device parity tests run the network on: `$DLTOOL_TEST_DEVICE` (cpu, wgpu or auto; cpu
/// when unset), so that on a GPU machine `DLTOOL_TEST_DEVICE=wgpu cargo test --release
/// --features wgpu --test it inception_parity` checks the same tolerances there.
pub fn test_device() -> burn::prelude::Device {
    let choice: dltool::device::DeviceChoice = match std::env::var("DLTOOL_TEST_DEVICE") {
        Ok(name) => name
            .parse()
            .unwrap_or_else(|e| panic!("DLTOOL_TEST_DEVICE: {e}")),
        Err(_) => dltool::device::DeviceChoice::Cpu,
    };
    let (device, description) =
        dltool::device::open(choice).unwrap_or_else(|e| panic!("DLTOOL_TEST_DEVICE: {e}"));
    eprintln!("test device: {description}");
    device
}

/// A golden safetensors file: tensors by name and the header metadata.
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn open(rel: &str) -> Golden {
        Golden::read(&shared(rel))
    }

    /// A safetensors file of reference tensors anywhere (a fixture of the repository).
    pub fn read(path: &Path) -> Golden {
        Golden {
            bytes: std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    pub fn tensor(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).expect("golden file parses");
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden tensor {name} missing"));
        let data = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        (t.shape().to_vec(), data)
    }

    pub fn metadata(&self, key: &str) -> String {
        let (_, meta) = safetensors::SafeTensors::read_metadata(&self.bytes).expect("header");
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get(key).cloned())
            .unwrap_or_else(|| panic!("golden metadata {key} missing"))
    }
}

/// max |a - b| and max |b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    let scale = b.iter().map(|y| y.abs()).fold(0.0f32, f32::max);
    (diff, scale)
}

/// The dltool binary with the shared weights as its default and no stdin.
pub fn dltool() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_dltool"));
    cmd.env(
        "DLTOOL_WEIGHTS",
        shared("weights/inception_v3_tf2015.safetensors"),
    );
    // No test reaches the internet: a network without local weights is an error, not a
    // download (the download tests use a loopback mirror and lift this).
    cmd.env("DLTOOL_OFFLINE", "1");
    cmd.stdin(std::process::Stdio::null());
    cmd
}

/// Runs a command, echoing its stderr into the test log.
pub fn run(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().expect("dltool runs");
    eprintln!("stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(cmd: &mut std::process::Command) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "command failed: {:?}", out.status);
    String::from_utf8(out.stdout).unwrap()
}

/// Writes a PyTorch state dict made from the shared InceptionV3 safetensors with
/// tests/fixtures/make_pth.py (`--add-fc N`, `--add-aux`, `--drop NAME`, ...).
pub fn make_pth(out: &std::path::Path, args: &[&str]) {
    pth_from(
        &shared("weights/inception_v3_tf2015.safetensors"),
        out,
        args,
    );
}

/// Writes `src` (safetensors) as torch.save writes a state dict, with make_pth.py.
pub fn pth_from(src: &Path, out: &Path, args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_pth.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = std::process::Command::new(&python)
        .arg(&script)
        .arg(src)
        .arg(out)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {python} (set PYTHON to a Python 3): {e}"));
    assert!(status.success(), "make_pth.py {args:?} failed: {status}");
}

/// One line on stderr, exit 1, mentioning `needle`; returns that line.
pub fn fails_with(cmd: &mut std::process::Command, needle: &str) -> String {
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(1), "expected a failure");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(stderr.contains(needle), "'{needle}' not in: {stderr}");
    assert!(!stderr.contains("panicked"));
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    stderr
}

/// SHA-256 of the shared InceptionV3 weights.
pub const SHARED_SHA: &str = "0e2b313a6e50d4a03c228570ed7aa34da66ebb9b58bf649e0947949a5f57de7e";

/// The provenance `featurize` records with the shared weights and its defaults.
pub fn feature_meta() -> FeatureMeta {
    FeatureMeta {
        backbone: "inception_v3/tf2015".into(),
        weights_sha256: SHARED_SHA.into(),
        layer: "mixed_7c".into(),
        pool: "avg".into(),
        tta: "none".into(),
        dltool_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// `per_class` rows of each class around well-separated centres, in `dim` dimensions.
pub fn blobs(classes: &[&str], per_class: usize, dim: usize, seed: u64) -> FeatureTable {
    blobs_with(classes, per_class, dim, seed, 2.0, 1.0)
}

/// `per_class` rows of each class: class `c` has `centre` in the dimensions `d` with
/// `d % classes == c`, plus uniform noise of width `spread` everywhere.
pub fn blobs_with(
    classes: &[&str],
    per_class: usize,
    dim: usize,
    seed: u64,
    centre: f32,
    spread: f32,
) -> FeatureTable {
    let mut rng = dltool::split::SplitMix64::new(seed);
    let mut uniform = move || (rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
    let mut t = FeatureTable {
        paths: vec![],
        labels: vec![],
        dim,
        data: vec![],
        meta: Some(feature_meta()),
    };
    for (c, name) in classes.iter().enumerate() {
        for i in 0..per_class {
            t.paths.push(format!("photos/{name}/{i}.jpg"));
            t.labels.push(name.to_string());
            for d in 0..dim {
                let at = if d % classes.len() == c { centre } else { 0.0 };
                t.data.push(at + spread * uniform());
            }
        }
    }
    t
}

/// Writes `table` to `dir/name` in the format its extension names.
pub fn write_table(dir: &Path, name: &str, table: &FeatureTable) -> PathBuf {
    let p = dir.join(name);
    let format = Format::from_extension(&p).unwrap();
    write_features(&p, format, table).unwrap();
    p
}

/// The first `n` photos of a class, sorted by name.
pub fn flowers(class: &str, n: usize) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(shared_dir().join("flowers").join(class))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files.truncate(n);
    files
}

/// A folder of `class/photo.jpg` symlinks into ../shared (nothing is copied into the repo).
pub fn photo_dir(root: &Path, per_class: usize) -> Vec<String> {
    let mut names = Vec::new();
    for class in ["daisy", "tulips"] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for f in flowers(class, per_class) {
            let name = f.file_name().unwrap();
            std::os::unix::fs::symlink(&f, root.join(class).join(name)).unwrap();
            names.push(format!("{class}/{}", name.to_string_lossy()));
        }
    }
    names.sort();
    names
}

/// A folder with `per_class` images of each class in `classes`, symlinked from ../shared/flowers,
/// so featurize labels them by subfolder.
pub fn flower_subset(dir: &Path, classes: &[&str], per_class: usize) -> PathBuf {
    let root = dir.join("imgs");
    for class in classes {
        std::fs::create_dir_all(root.join(class)).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(shared(&format!("flowers/{class}")))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(per_class) {
            std::os::unix::fs::symlink(f, root.join(class).join(f.file_name().unwrap())).unwrap();
        }
    }
    root
}

/// A PNG whose header claims `w` x `h` pixels, followed by a tiny bogus IDAT (the PNG decoder
/// reports the size once it reaches the first IDAT): a decompression bomb in a few bytes.
pub fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&body);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

/// The lines a child writes on `stdout`, read on a thread of their own so that a test can wait
/// for each with a timeout while the child's stdin stays open.
pub fn line_reader(
    stdout: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    rx
}

// ---- random state dicts with a network's real names and shapes ----

/// The names, shapes and dtypes listed for `net` in `list`.
pub fn names_in(list: &Path, net: &str) -> Vec<(String, Vec<usize>, String)> {
    let text = std::fs::read_to_string(list).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json[net]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            let shape = row[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (
                row[0].as_str().unwrap().to_string(),
                shape,
                row[2].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A small deterministic generator (xorshift): values in -1..1.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Writes a state dict of `names` with random values scaled to keep activations finite
/// (He-like weights, BatchNorm variances around 1), optionally dropping or renaming one.
pub fn write_random(names: &[(String, Vec<usize>, String)], path: &Path) {
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let mut buffers: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
    for (name, shape, dtype) in names {
        let count: usize = shape.iter().product();
        if dtype == "int64" {
            buffers.push((
                name.clone(),
                shape.clone(),
                safetensors::Dtype::I64,
                vec![0; 8 * count],
            ));
            continue;
        }
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let values: Vec<f32> = (0..count)
            .map(|_| {
                let u = rng.next();
                if name.ends_with("running_var") {
                    1.0 + 0.5 * u.abs()
                } else if name.ends_with("running_mean") || name.ends_with("bias") {
                    0.1 * u
                } else if shape.len() == 1 {
                    1.0 + 0.2 * u
                } else {
                    u * (3.0 / fan_in as f32).sqrt()
                }
            })
            .collect();
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), shape.clone(), safetensors::Dtype::F32, bytes));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = buffers
        .iter()
        .map(|(n, s, d, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}
