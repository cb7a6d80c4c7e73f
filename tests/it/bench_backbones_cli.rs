//! `dltool bench --backbone X` for networks other than InceptionV3, dltool alone on two images:
//! the worker checks the network against its golden file, the FLOP count is the network's, the
//! end-to-end child runs the same network, and a network without weights is one line.

use crate::common;

use common::{dltool, fails_with, ok, run, shared_dir};

fn bench(backbone: &str, mode: &str) -> serde_json::Value {
    // Without $DLTOOL_WEIGHTS (the shared InceptionV3, which any network would find first),
    // bench falls back to the network's file in ../shared.
    let out = ok(dltool()
        .env_remove("DLTOOL_WEIGHTS")
        .args([
            "bench",
            "--images=2",
            "--repeat=1",
            "--batch=2",
            "--threads=1",
        ])
        .arg(format!("--mode={mode}"))
        .arg(format!("--backbone={backbone}"))
        .args(["--no-peers", "--json", "--dir"])
        .arg(shared_dir().join("flowers")));
    serde_json::from_str(&out).expect("stdout is one JSON object")
}

#[test]
fn bench_measures_the_network_it_is_given() {
    // Multiply-adds x 2 up to the default layer (tools/flop_counts.py).
    for (backbone, gflop) in [
        ("efficientnet_lite0", 0.767815104),
        ("mobilenet_v1", 0.081548544),
    ] {
        let v = bench(backbone, "network");
        assert_eq!(v["backbone"], backbone, "{v}");
        assert_eq!(v["flop_per_image"].as_f64(), Some(gflop * 1e9), "{v}");
        let row = &v["rows"][0];
        assert_eq!(row["tool"], "dltool");
        let rate = row["img_per_s_median"].as_f64().unwrap();
        let gflops = row["gflops"].as_f64().unwrap();
        assert!(
            rate > 0.0 && (gflops - rate * gflop).abs() < 1e-6 * gflops,
            "{row}"
        );
        // The worker found the network's golden file in ../shared and matched it first.
        let diff = v["golden_max_abs_diff"]["dltool"].as_f64().unwrap();
        assert!(diff < 1e-3, "{v}");
    }
    // End to end: the featurize child runs the same network (its summary counts the images).
    let v = bench("efficientnet_lite0", "e2e");
    let row = &v["rows"][0];
    assert_eq!(row["mode"], "e2e");
    assert!(row["img_per_s_median"].as_f64().unwrap() > 0.0, "{row}");
}

#[test]
fn bench_of_a_network_without_weights_is_one_line() {
    let home = tempfile::tempdir().unwrap();
    fails_with(
        dltool()
            .env_remove("DLTOOL_WEIGHTS")
            .env("DLTOOL_HOME", home.path())
            .env("XDG_CACHE_HOME", home.path())
            .args(["bench", "--backbone", "resnet50", "--no-peers", "--dir"])
            .arg(shared_dir().join("flowers")),
        "resnet50",
    );
}

#[test]
fn bench_looks_for_the_peers_of_every_network_they_build() {
    // No venv here: for EfficientNet-Lite0 bench looks for the peers' Python (the peers build
    // it), for MobileNet v1 it says the peers have no such network.
    let peers_of = |backbone: &str| {
        let out = run(dltool()
            .env_remove("DLTOOL_WEIGHTS")
            .args([
                "bench",
                "--images=1",
                "--repeat=1",
                "--batch=1",
                "--threads=1",
                "--mode=network",
                "--python=/nonexistent/bench-venv/bin/python",
                "--json",
            ])
            .arg(format!("--backbone={backbone}"))
            .arg("--dir")
            .arg(shared_dir().join("flowers")));
        assert!(out.status.success(), "bench --backbone {backbone} failed");
        String::from_utf8(out.stderr).unwrap()
    };
    let lite = peers_of("efficientnet_lite0");
    assert!(lite.contains("no Python for the peers"), "{lite}");
    assert!(!lite.contains("the peers have no"), "{lite}");
    let mobilenet = peers_of("mobilenet_v1");
    assert!(
        mobilenet.contains("the peers have no MobileNet v1"),
        "{mobilenet}"
    );
}
