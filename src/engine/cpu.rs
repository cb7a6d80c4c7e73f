//! Which vector unit the hand-written kernels use: detected once, or forced with
//! `DLTOOL_SIMD=scalar|avx2|avx512` (to run the portable or AVX2 paths on an AVX-512 machine,
//! e.g. in tests that compare every path with the golden tensors).
//!
//! The `gemm` crate does its own detection (std's, uncached by us) and cannot be forced from
//! here: it always takes the best kernel the CPU has.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, Ordering};

/// A vector unit, from least to most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Simd {
    /// Portable Rust (whatever the compiler auto-vectorises for the build target).
    Scalar,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512F with FMA.
    Avx512,
}

impl Simd {
    pub const ALL: [Simd; 3] = [Simd::Scalar, Simd::Avx2, Simd::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    /// True when this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Simd::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The best path this CPU has.
    pub fn detect() -> Simd {
        Simd::ALL
            .into_iter()
            .rev()
            .find(|s| s.available())
            .unwrap_or(Simd::Scalar)
    }

    /// Every path this CPU can run, least capable first.
    pub fn available_paths() -> Vec<Simd> {
        Simd::ALL.into_iter().filter(|s| s.available()).collect()
    }
}

impl std::str::FromStr for Simd {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Simd::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| format!("unknown SIMD path '{s}' (expected scalar, avx2 or avx512)"))
    }
}

/// The environment variable that forces a path.
pub const SIMD_ENV: &str = "DLTOOL_SIMD";

/// What `DLTOOL_SIMD` asks for: `Ok(None)` when unset or empty, an error naming the variable
/// when the value is unknown or the CPU lacks the path.
pub fn from_env() -> Result<Option<Simd>, String> {
    let Some(value) = std::env::var_os(SIMD_ENV) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    if value.is_empty() {
        return Ok(None);
    }
    let simd: Simd = value.parse().map_err(|e| format!("{SIMD_ENV}: {e}"))?;
    if !simd.available() {
        return Err(format!(
            "{SIMD_ENV}={value}: this CPU cannot run the {value} path (it has {})",
            Simd::detect().name()
        ));
    }
    Ok(Some(simd))
}

static CHOSEN: OnceLock<Simd> = OnceLock::new();

/// 0: not forced; else 1 + the index of the forced path in [`Simd::ALL`].
static FORCED: AtomicU8 = AtomicU8::new(0);

/// The path every kernel uses: the one [`force`]d, else `DLTOOL_SIMD` if set and valid, else the
/// best the CPU has. The binary checks the variable at start-up ([`from_env`]) so that a bad
/// value is an error there; a library caller with a bad value gets detection.
pub fn simd() -> Simd {
    match FORCED.load(Ordering::Relaxed) {
        0 => *CHOSEN.get_or_init(|| from_env().ok().flatten().unwrap_or_else(Simd::detect)),
        i => Simd::ALL[usize::from(i) - 1],
    }
}

/// Forces every kernel of the process onto `path` (`None`: back to the environment's or the
/// detected one). For tests and measurements that compare the paths in one process; an
/// unavailable path is refused.
pub fn force(path: Option<Simd>) -> Result<(), String> {
    let code = match path {
        None => 0,
        Some(p) if p.available() => 1 + Simd::ALL.iter().position(|&q| q == p).unwrap_or(0) as u8,
        Some(p) => return Err(format!("this CPU cannot run the {} path", p.name())),
    };
    FORCED.store(code, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_is_refused() {
        for s in Simd::ALL {
            assert_eq!(s.name().parse::<Simd>(), Ok(s));
        }
        assert!(
            "sse2"
                .parse::<Simd>()
                .unwrap_err()
                .contains("scalar, avx2 or avx512")
        );
    }

    #[test]
    fn detection_is_an_available_path_and_scalar_always_is() {
        assert!(Simd::detect().available());
        assert!(Simd::Scalar.available());
        assert_eq!(Simd::available_paths().last(), Some(&Simd::detect()));
    }
}
