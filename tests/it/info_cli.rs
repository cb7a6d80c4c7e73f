//! `dltool info`, `dltool completions` and `dltool man`.

use crate::common;

use std::process::Command;

fn dltool() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dltool"));
    cmd.stdin(std::process::Stdio::null())
        .env_remove("DLTOOL_WEIGHTS_MIRROR")
        .env_remove("DLTOOL_OFFLINE");
    cmd
}

#[test]
fn info_json_reports_build_machine_and_cache() {
    let home = tempfile::tempdir().unwrap();
    // One entry installed by hand, and a stray file: both show.
    let entry = home.path().join("weights/mobilenet_v1_0.25_224");
    std::fs::create_dir_all(&entry).unwrap();
    let shared = common::shared("weights/mobilenet_v1_0.25_224");
    let mut total = 0;
    for e in std::fs::read_dir(&shared).unwrap() {
        let e = e.unwrap();
        total += std::fs::copy(e.path(), entry.join(e.file_name())).unwrap();
    }
    std::fs::write(home.path().join("weights/mine.safetensors"), b"x").unwrap();

    let out = common::run(
        dltool()
            .env("DLTOOL_HOME", home.path())
            .env("RAYON_NUM_THREADS", "3")
            .args(["info", "--json"]),
    );
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let features: Vec<&str> = info["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(features.contains(&"wgpu"), cfg!(feature = "wgpu"));
    assert_eq!(info["gpu"]["built"], cfg!(feature = "wgpu"));
    if !cfg!(feature = "wgpu") {
        assert!(info["gpu"]["adapters"].as_array().unwrap().is_empty());
        assert!(
            info["gpu"]["note"]
                .as_str()
                .unwrap()
                .contains("--features wgpu")
        );
    }

    // The CPU paths agree with what this test process detects.
    let kernels = info["cpu"]["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), 4);
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        let expected = if avx512 {
            "avx512f"
        } else if avx2 {
            "avx2"
        } else {
            "scalar"
        };
        for k in kernels {
            let path = k["path"].as_str().unwrap();
            assert!(path.starts_with(expected), "{k} on a CPU with {expected}");
        }
        let detected = info["cpu"]["detected"].as_array().unwrap();
        assert!(detected.contains(&serde_json::json!(["avx512f", avx512])));
    }
    assert_eq!(info["threads"]["pool"], 3);
    assert!(info["threads"]["available"].as_u64().unwrap() >= 1);

    let weights = &info["weights"];
    assert_eq!(
        weights["cache"].as_str().unwrap(),
        home.path().join("weights").to_str().unwrap()
    );
    assert_eq!(weights["offline"], false);
    let entries = weights["entries"].as_array().unwrap();
    let find = |name: &str| entries.iter().find(|e| e["name"] == name).unwrap();
    let mn = find("mobilenet_v1_0.25_224");
    assert_eq!(mn["cached"], true);
    assert_eq!(mn["bytes"], total);
    assert_eq!(mn["checks"], "size + sha256");
    assert_eq!(mn["hashed"], false);
    assert_eq!(find("efficientnet_lite2")["cached"], false);
    assert_eq!(find("inception_v3_tf2015")["checks"], "sha256 prefix");
    assert_eq!(weights["other"], serde_json::json!(["mine.safetensors"]));

    // The text form says the same things.
    let out = common::run(
        dltool()
            .env("DLTOOL_HOME", home.path())
            .env("DLTOOL_OFFLINE", "1")
            .arg("info"),
    );
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("dltool {}\n", env!("CARGO_PKG_VERSION"))));
    for needle in [
        "build features:",
        "winograd convolutions:",
        "threads:",
        "weights cache:",
        "downloads off",
        "mine.safetensors",
    ] {
        assert!(text.contains(needle), "'{needle}' not in:\n{text}");
    }
}

#[test]
fn completions_generate_for_every_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef dltool"),
        ("fish", "complete -c dltool"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = common::run(dltool().args(["completions", shell]));
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: no {marker}");
        // Every subcommand and a nested flag are in it.
        let offline = if shell == "fish" {
            "-l offline"
        } else {
            "--offline"
        };
        for word in ["featurize", "train-head", "weights", "info", offline] {
            assert!(script.contains(word), "{shell}: no {word}");
        }
    }
    let out = common::run(dltool().args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn man_pages_generate() {
    let out = common::run(dltool().arg("man"));
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.starts_with(".ie") || page.contains(".TH dltool 1"),
        "{page}"
    );
    assert!(page.contains(".TH dltool 1"));
    assert!(page.contains("featurize"));

    let dir = tempfile::tempdir().unwrap();
    let out = common::run(dltool().args(["man", "--out-dir"]).arg(dir.path()));
    assert!(out.status.success());
    for name in [
        "dltool.1",
        "dltool-featurize.1",
        "dltool-weights.1",
        "dltool-info.1",
    ] {
        let page = std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(page.contains(".TH"), "{name}");
    }
}
