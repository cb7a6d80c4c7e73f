//! Benchmark plumbing for `dltool bench`: the machine's FP32 peak, child processes measured
//! one by one (wall time and peak RSS), and the summary statistics.

use std::io::{self, Read};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Floating-point operations of one InceptionV3 image at 299x299: about 5.7 G multiply-adds,
/// counted as two operations each.
pub const FLOP_PER_IMAGE: f64 = 11.4e9;

/// Floating-point operations of one image through the network a provenance string names
/// (`inception_v3/tf2015`), at its input size and up to its default feature layer: two per
/// multiply-add of every convolution and fully-connected layer, as `tools/flop_counts.py`
/// counts them with torch's FlopCounterMode on the same layer shapes. `None` for a network not
/// counted (MobileNet v1 is counted at the shared file's width 0.25 and 224x224 only).
pub fn flop_per_image(provenance: &str) -> Option<f64> {
    let family = provenance.split('/').next().unwrap_or("");
    Some(match family {
        "inception_v3" => 11_422_336_192.0,
        "mobilenet_v1" if provenance == "mobilenet_v1/0.25_224" => 81_548_544.0,
        "efficientnet_lite0" => 767_815_104.0,
        "efficientnet_lite2" => 1_716_912_544.0,
        "resnet50" => 8_174_272_512.0,
        "vgg16" => 30_932_336_640.0,
        "vgg19" => 39_255_932_928.0,
        "xception" => 16_710_710_992.0,
        _ => return None,
    })
}

/// A measured FP32 peak.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Peak {
    pub threads: usize,
    pub gflops: f64,
    /// The instructions the loop used: "avx512f" or "avx2+fma".
    pub isa: &'static str,
}

/// The FP32 rate `threads` threads reach with back-to-back independent FMAs, the best of a few
/// tries of about `duration` each; `None` where the CPU has neither AVX-512F nor AVX2+FMA.
pub fn peak_fp32(threads: usize, duration: Duration) -> Option<Peak> {
    let (isa, kernel) = fma_kernel()?;
    let threads = threads.max(1);
    // Calibrate one thread's iteration count to the wanted duration.
    let probe = 1u64 << 20;
    let t = Instant::now();
    std::hint::black_box(kernel(probe));
    let per_iter = t.elapsed().as_secs_f64() / probe as f64;
    let iters = ((duration.as_secs_f64() / per_iter.max(1e-12)) as u64).max(probe);
    let best = (0..3)
        .map(|_| {
            let barrier = Barrier::new(threads + 1);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| {
                        barrier.wait();
                        std::hint::black_box(kernel(iters));
                    });
                }
                barrier.wait();
                let t = Instant::now();
                // The scope joins every thread before it returns; the clock stops after that.
                t
            })
            .elapsed()
            .as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    let flops = (threads as u64 * iters) as f64 * FMA_FLOPS_PER_ITER[isa_index(isa)];
    Some(Peak {
        threads,
        gflops: flops / best / 1e9,
        isa,
    })
}

/// Flops per loop iteration: 12 FMAs of 16 (AVX-512) or 8 (AVX2) lanes, two operations each.
const FMA_FLOPS_PER_ITER: [f64; 2] = [12.0 * 16.0 * 2.0, 12.0 * 8.0 * 2.0];

fn isa_index(isa: &str) -> usize {
    usize::from(isa != "avx512f")
}

type Kernel = fn(u64) -> f32;

#[cfg(target_arch = "x86_64")]
fn fma_kernel() -> Option<(&'static str, Kernel)> {
    use crate::engine::cpu::{Simd, simd};
    match simd() {
        Simd::Avx512 => Some(("avx512f", |n| {
            // SAFETY: `simd()` names AVX-512 only when the CPU has AVX-512F.
            unsafe { x86::fma_avx512(n) }
        })),
        Simd::Avx2 => Some(("avx2+fma", |n| {
            // SAFETY: as above, for AVX2 and FMA.
            unsafe { x86::fma_avx2(n) }
        })),
        Simd::Scalar => None,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn fma_kernel() -> Option<(&'static str, Kernel)> {
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Twelve independent accumulator chains: enough to cover the FMA latency (4 cycles) on
    /// two FMA ports, so the loop runs at the issue rate.
    macro_rules! fma_loop {
        ($n:expr, $set1:ident, $fma:ident, $add:ident) => {{
            let a = $set1(std::hint::black_box(0.999_999f32));
            let b = $set1(std::hint::black_box(1e-7f32));
            // A fixed-size array of locals: LLVM unrolls the inner loop and keeps each
            // accumulator in its own register.
            let mut acc = [$set1(1.0); 12];
            for _ in 0..$n {
                for r in acc.iter_mut() {
                    *r = $fma(*r, a, b);
                }
            }
            acc.into_iter()
                .reduce(|x, y| $add(x, y))
                .expect("12 accumulators")
        }};
    }

    #[target_feature(enable = "avx512f")]
    pub fn fma_avx512(n: u64) -> f32 {
        let s = fma_loop!(n, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps);
        _mm512_reduce_add_ps(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn fma_avx2(n: u64) -> f32 {
        let s = fma_loop!(n, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps);
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds exactly the 8 floats an unaligned store writes.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
        lanes.iter().sum()
    }
}

/// One finished child process.
#[derive(Debug)]
pub struct ChildRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub wall: Duration,
    /// Peak resident set size of the child alone, in KiB (`ru_maxrss` from `wait4`); `None`
    /// where the platform has no `wait4`.
    pub max_rss_kib: Option<u64>,
}

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured, and measures it.
///
/// The child is reaped with `wait4`, which returns that child's own resource usage: the
/// `RUSAGE_CHILDREN` of `getrusage` would give the maximum over every child so far.
pub fn run_child(cmd: &mut Command) -> io::Result<ChildRun> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    std::thread::scope(|s| {
        // Both pipes are drained while the child runs, or a full pipe would stall it.
        let out_reader = s.spawn(move || {
            let mut buf = Vec::new();
            out.read_to_end(&mut buf).map(|_| buf)
        });
        let err_reader = s.spawn(move || {
            let mut buf = Vec::new();
            err.read_to_end(&mut buf).map(|_| buf)
        });
        let (status, max_rss_kib) = reap(child)?;
        let wall = started.elapsed();
        let stdout = out_reader.join().expect("reader thread")?;
        let stderr = err_reader.join().expect("reader thread")?;
        Ok(ChildRun {
            status,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            wall,
            max_rss_kib,
        })
    })
}

#[cfg(unix)]
fn reap(child: std::process::Child) -> io::Result<(ExitStatus, Option<u64>)> {
    use std::os::unix::process::ExitStatusExt;
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; `pid` is our own unreaped child (std's `Child` is
        // never waited on after this, and dropping it does not wait).
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // Linux reports ru_maxrss in KiB (macOS in bytes; dltool targets Linux).
    Ok((
        ExitStatus::from_raw(status),
        Some(u64::try_from(usage.ru_maxrss).unwrap_or(0)),
    ))
}

#[cfg(not(unix))]
fn reap(mut child: std::process::Child) -> io::Result<(ExitStatus, Option<u64>)> {
    Ok((child.wait()?, None))
}

/// Median of `xs` (the mean of the middle two for an even count); NaN for none.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The CPU's model name from /proc/cpuinfo, if there is one.
pub fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn child_exit_status_output_and_rss() {
        let run = run_child(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]))
            .expect("sh runs");
        assert_eq!(run.status.code(), Some(3));
        assert_eq!(run.stdout, "out\n");
        assert_eq!(run.stderr, "err\n");
        #[cfg(unix)]
        assert!(run.max_rss_kib.unwrap() > 0);
    }

    #[test]
    fn peak_is_positive_where_measured() {
        if let Some(p) = peak_fp32(1, Duration::from_millis(20)) {
            assert!(p.gflops > 0.1, "{p:?}");
        }
    }
}
