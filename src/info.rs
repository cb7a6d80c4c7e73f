//! What `dltool info` reports about this build and this machine: version, build features, the
//! CPU features the engine's kernels use and which path each picked, threads, GPU adapters,
//! and the weights cache.

use serde::Serialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize)]
pub struct Info {
    pub version: String,
    /// Cargo features this binary was built with (`wgpu`).
    pub features: Vec<String>,
    pub cpu: Cpu,
    pub threads: Threads,
    pub gpu: Gpu,
    pub weights: Weights,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    pub arch: String,
    /// The instruction-set extensions the kernels look for, and whether this CPU has them.
    pub detected: Vec<(String, bool)>,
    /// Each kernel family and the path it runs on here.
    pub kernels: Vec<Kernel>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Kernel {
    pub name: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Threads {
    /// Logical CPUs the process may use.
    pub available: usize,
    /// Size of the pool decoding and the network run on (`--threads`, else `RAYON_NUM_THREADS`,
    /// else every logical CPU).
    pub pool: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Gpu {
    /// False when built without the `wgpu` feature: no adapters are looked for.
    pub built: bool,
    pub adapters: Vec<Adapter>,
    /// Why the list is empty or partial, when it is.
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Adapter {
    pub name: String,
    pub backend: String,
    pub device_type: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Weights {
    /// `<cache>/weights`, or `None` when the system has no cache folder and `DLTOOL_HOME` is
    /// unset.
    pub cache: Option<PathBuf>,
    pub offline: bool,
    pub mirror: Option<String>,
    pub entries: Vec<CachedEntry>,
    /// Other files and folders in the cache's weights folder (weights put there by hand).
    pub other: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CachedEntry {
    pub name: String,
    pub backbone: String,
    pub cached: bool,
    pub bytes: Option<u64>,
    /// What the registry can check of it: `size + sha256`, `sha256 prefix`, `none known`.
    pub checks: String,
    /// The installed files have been hashed and recorded (so later uses check size and mtime).
    pub hashed: bool,
}

/// The CPU's extensions and the path each kernel family takes, from the engine's one dispatch
/// (`engine::cpu`, which `DLTOOL_SIMD` can force) and, for the `gemm` crate's GEMMs (dense
/// layers, and convolutions off the AVX-512 path), the crate's own detection (it cannot be
/// forced).
pub fn cpu() -> Cpu {
    use crate::engine::cpu::{Simd, simd};
    #[cfg(target_arch = "x86_64")]
    let detected: Vec<(String, bool)> = vec![
        (
            "avx512f".into(),
            std::arch::is_x86_feature_detected!("avx512f"),
        ),
        ("avx2".into(), std::arch::is_x86_feature_detected!("avx2")),
        ("fma".into(), std::arch::is_x86_feature_detected!("fma")),
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let detected: Vec<(String, bool)> = Vec::new();
    let engine = match simd() {
        Simd::Avx512 => "avx512f+fma",
        Simd::Avx2 => "avx2+fma",
        Simd::Scalar => "scalar",
    };
    let forced = std::env::var(crate::engine::cpu::SIMD_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map_or(String::new(), |v| {
            format!(" ({}={v})", crate::engine::cpu::SIMD_ENV)
        });
    let gemm = match Simd::detect() {
        Simd::Avx512 => "avx512f (gemm x86-v4)",
        Simd::Avx2 => "avx2+fma (gemm x86-v3)",
        Simd::Scalar => "scalar",
    };
    // On the engine's AVX-512 path the convolutions multiply by dltool's own kernel over
    // weights packed at load; on the others, and for dense layers, by the `gemm` crate.
    let conv_gemm = match simd() {
        Simd::Avx512 => format!("avx512f+fma (weights packed at load){forced}"),
        _ => gemm.to_string(),
    };
    let kernels = [
        ("winograd convolutions", format!("{engine}{forced}")),
        ("convolution gemm", conv_gemm),
        ("logistic regression", format!("{engine}{forced}")),
        ("gemm (dense layers)", gemm.to_string()),
    ]
    .into_iter()
    .map(|(name, path)| Kernel {
        name: name.into(),
        path,
    })
    .collect();
    Cpu {
        arch: std::env::consts::ARCH.into(),
        detected,
        kernels,
    }
}

/// The GPU adapters wgpu finds (software renderers included, marked by their type).
#[cfg(feature = "wgpu")]
pub fn gpu() -> Gpu {
    use burn::tensor::wgpu::wgpu;
    let found = std::panic::catch_unwind(|| {
        let instance = wgpu::Instance::default();
        block_on(instance.enumerate_adapters(wgpu::Backends::all()))
    });
    match found {
        Ok(Some(adapters)) => {
            let adapters: Vec<Adapter> = adapters
                .iter()
                .map(|a| {
                    let info = a.get_info();
                    Adapter {
                        name: info.name,
                        backend: format!("{:?}", info.backend),
                        device_type: format!("{:?}", info.device_type),
                    }
                })
                .collect();
            let note = adapters
                .is_empty()
                .then(|| "wgpu found no adapter (no GPU driver, or none it can use)".to_string());
            Gpu {
                built: true,
                adapters,
                note,
            }
        }
        Ok(None) => Gpu {
            built: true,
            adapters: Vec::new(),
            note: Some("wgpu did not answer within 10 s".into()),
        },
        Err(_) => Gpu {
            built: true,
            adapters: Vec::new(),
            note: Some("the wgpu runtime failed while listing adapters".into()),
        },
    }
}

#[cfg(not(feature = "wgpu"))]
pub fn gpu() -> Gpu {
    Gpu {
        built: false,
        adapters: Vec::new(),
        note: Some(crate::device::NO_GPU_SUPPORT.to_string()),
    }
}

/// Polls `f` until it is ready, for at most 10 s; on native platforms wgpu's adapter list is
/// ready at once.
#[cfg(feature = "wgpu")]
fn block_on<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The cache's location and what is in it. Reads sizes and records only: nothing is hashed.
pub fn weights() -> Weights {
    use crate::registry;
    let cache = registry::cache_from_env().ok();
    let mut entries = Vec::new();
    let mut other = Vec::new();
    if let Some(cache) = &cache {
        for e in registry::entries() {
            let bytes = cache.cached_size(e);
            let hashed = bytes.is_some()
                && std::fs::metadata(cache.entry_dir(e).join(registry::RECORD)).is_ok();
            entries.push(CachedEntry {
                name: e.name.into(),
                backbone: e.backbone.as_str().into(),
                cached: bytes.is_some(),
                bytes,
                checks: e.checks().into(),
                hashed,
            });
        }
        if let Ok(dir) = std::fs::read_dir(cache.weights_dir()) {
            let mut names: Vec<String> = dir
                .flatten()
                .map(|d| d.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.') && registry::find(n).is_none())
                .collect();
            names.sort();
            other = names;
        }
    }
    Weights {
        cache: cache.as_ref().map(|c| c.weights_dir()),
        offline: registry::offline(),
        mirror: cache.and_then(|c| c.mirror),
        entries,
        other,
    }
}

pub fn gather() -> Info {
    let mut features = Vec::new();
    if cfg!(feature = "wgpu") {
        features.push("wgpu".to_string());
    }
    Info {
        version: env!("CARGO_PKG_VERSION").into(),
        features,
        cpu: cpu(),
        threads: Threads {
            available: std::thread::available_parallelism().map_or(1, |n| n.get()),
            pool: rayon::current_num_threads(),
        },
        gpu: gpu(),
        weights: weights(),
    }
}
