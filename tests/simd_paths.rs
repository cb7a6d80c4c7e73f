//! Every vector-unit path of the CPU engine against the golden InceptionV3 activations: the
//! portable kernels and AVX2 would otherwise never run on an AVX-512 machine (off the AVX-512
//! path the convolutions' GEMMs are the `gemm` crate's, which take its own dispatch and cannot
//! be forced; see README).
//!
//! One test in its own binary: forcing a path is process-wide.

mod common;

use burn::prelude::*;
use common::{Golden, dltool, max_abs_diff, run, shared};
use dltool::engine::cpu::{self, Simd};
use dltool::inception_fast::FastInceptionV3;
use dltool::inception_v3;

#[test]
fn every_available_path_matches_the_golden_stages() {
    let (model, _) = inception_v3::load(
        &shared("weights/inception_v3_tf2015.safetensors"),
        None,
        &Device::flex(),
    )
    .expect("shared weights load");
    let golden = Golden::open("golden/inception_v3_tf2015/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let n = shape[0];

    let paths = Simd::available_paths();
    eprintln!("paths on this CPU: {paths:?}");
    assert!(paths.contains(&Simd::Scalar));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
    {
        assert_eq!(paths, Simd::ALL, "an AVX-512 CPU runs every path");
    }
    // Every stage within 1e-4 x its largest reference value.
    let check = |label: &str, fast: &FastInceptionV3| {
        let stages = fast.forward_stages(&input, n);
        for (name, ours) in [
            ("stem", &stages.stem),
            ("mixed_5d", &stages.mixed_5d),
            ("mixed_6e", &stages.mixed_6e),
            ("mixed_7c", &stages.mixed_7c),
            ("pool", &stages.pool),
        ] {
            let (_, reference) = golden.tensor(name);
            let (diff, scale) = max_abs_diff(ours, &reference);
            eprintln!("{label} {name}: max |diff| = {diff:e}, max |ref| = {scale}");
            assert!(
                diff <= 1e-4 * scale,
                "{label} {name}: max |diff| {diff} exceeds 1e-4 x max |ref| ({scale})"
            );
        }
        stages.pool
    };
    let mut pools = Vec::new();
    for path in paths {
        cpu::force(Some(path)).unwrap();
        assert_eq!(cpu::simd(), path);
        // Built under the path too: the Winograd weight transforms run at construction.
        let fast = FastInceptionV3::from_model(&model);
        pools.push(check(&format!("{path:?}"), &fast));
    }
    // Built on the AVX-512 path (weights packed at load, the plain copies dropped), then run
    // on the portable one: the GEMMs unpack the weights for the `gemm` crate.
    if Simd::available_paths().contains(&Simd::Avx512) {
        cpu::force(Some(Simd::Avx512)).unwrap();
        let fast = FastInceptionV3::from_model(&model);
        cpu::force(Some(Simd::Scalar)).unwrap();
        check("built Avx512, run Scalar", &fast);
    }
    cpu::force(None).unwrap();
    // The paths really differ somewhere (fused vs separate multiply-add), else forcing did
    // nothing and this test would compare one path with itself.
    if pools.len() > 1 {
        assert!(
            pools.windows(2).any(|w| w[0] != w[1]),
            "every path gave bit-identical features: the switch has no effect"
        );
    }
}

#[test]
fn the_environment_switch_is_checked_at_start_up() {
    let out = run(dltool()
        .env("DLTOOL_SIMD", "sse9")
        .args(["weights", "list"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("DLTOOL_SIMD") && err.contains("scalar, avx2 or avx512"),
        "{err}"
    );
    let out = run(dltool()
        .env("DLTOOL_SIMD", "scalar")
        .args(["weights", "list"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
