//! `dltool bench` on two images, network only, dltool alone: the numbers it prints must be
//! there and sane. No timing is asserted.

use crate::common;

use common::{dltool, ok, run, shared, shared_dir};

fn bench_args() -> Vec<String> {
    [
        "bench",
        "--images=2",
        "--repeat=1",
        "--batch=1",
        "--threads=1",
        "--mode=network",
        "--dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        shared_dir().join("flowers").display().to_string(),
        "--golden".to_string(),
        shared("golden/inception_v3_tf2015/net.safetensors")
            .display()
            .to_string(),
    ])
    .collect()
}

#[test]
fn json_has_one_sane_dltool_row() {
    let out = ok(dltool().args(bench_args()).arg("--no-peers").arg("--json"));
    let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is one JSON object");
    assert_eq!(v["images"], 2);
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{out}");
    let row = &rows[0];
    assert_eq!(row["tool"], "dltool");
    assert_eq!(row["mode"], "network");
    assert_eq!(
        (row["batch"].as_u64(), row["threads"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(row["runs"].as_array().map(Vec::len), Some(1));
    let rate = row["img_per_s_median"].as_f64().unwrap();
    assert!(rate > 0.0 && rate.is_finite(), "{row}");
    // Loading InceptionV3's 87 MB of weights alone puts a real run far above 50 MiB.
    let rss = row["peak_rss_mib"].as_f64().unwrap();
    assert!(rss > 50.0, "{row}");
    let gflops = row["gflops"].as_f64().unwrap();
    assert!(
        (gflops - rate * 11.422336192).abs() < 1e-6 * gflops,
        "{row}"
    );
    // The worker checked its network against the reference before timing it.
    let diff = v["golden_max_abs_diff"]["dltool"].as_f64().unwrap();
    assert!(diff < 1e-3, "{v}");
    // The peak is measured wherever there is an FMA loop for it; missing only elsewhere.
    #[cfg(target_arch = "x86_64")]
    let has_fma_loop = std::arch::is_x86_feature_detected!("avx512f")
        || (std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"));
    #[cfg(not(target_arch = "x86_64"))]
    let has_fma_loop = false;
    let peak = v["peak_fp32"].as_array().and_then(|p| p.first());
    assert_eq!(peak.is_some(), has_fma_loop, "{v}");
    if let Some(peak) = peak {
        assert!(peak["gflops"].as_f64().unwrap() > 0.0, "{peak}");
        assert!(row["percent_of_peak"].as_f64().unwrap() > 0.0, "{row}");
    }
}

#[test]
fn table_without_a_peer_venv_runs_dltool_alone() {
    let out = run(dltool()
        .args(bench_args())
        .args(["--python", "/nonexistent/bench-venv/bin/python"]));
    assert!(out.status.success(), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/bench-venv/bin/python") && stderr.contains("setup.sh"),
        "{stderr}"
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("| network"))
        .collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    // | network | 1 | 1 | dltool | R (min-max) | - | M MiB | G | P% |
    let cells: Vec<&str> = rows[0].split('|').map(str::trim).collect();
    assert_eq!(&cells[1..5], ["network", "1", "1", "dltool"], "{stdout}");
    let rate: f64 = cells[5].split(' ').next().unwrap().parse().unwrap();
    assert!(rate > 0.0, "{stdout}");
    let rss: f64 = cells[7].strip_suffix(" MiB").unwrap().parse().unwrap();
    assert!(rss > 50.0, "{stdout}");
}

#[test]
fn missing_image_folder_is_a_one_line_error() {
    let out = run(dltool().args(["bench", "--no-peers", "--dir", "/nonexistent/bench-images"]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("/nonexistent/bench-images: not a directory"),
        "{stderr}"
    );
}
