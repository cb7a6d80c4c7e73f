//! `dltool fine-tune` as a user runs it: bad input, a small run end to end, the cache reused,
//! and the model through `predict` and `evaluate`.

use crate::common;

use common::{dltool, fails_with, ok, run, shared};
use dltool::head::{Head, HeadModel};
use std::path::{Path, PathBuf};

/// `per_class` photos of each class from ../shared/flowers, skipping the first `skip`, linked
/// into `dir/<class>/`.
fn flowers(dir: &Path, classes: &[&str], skip: usize, per_class: usize) -> PathBuf {
    for class in classes {
        let src = shared("flowers").join(class);
        let mut names: Vec<_> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for name in names.iter().skip(skip).take(per_class) {
            std::os::unix::fs::symlink(src.join(name), dir.join(class).join(name)).unwrap();
        }
    }
    dir.to_path_buf()
}

/// EfficientNet-Lite0: the smallest network dltool fine-tunes, so the end-to-end runs stay
/// a few seconds on 2 cores.
fn lite0() -> PathBuf {
    shared("weights/efficientnet_lite0/efficientnet-lite0-57934424.pth")
}

fn fine_tune(images: &Path, model: &Path, cache: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = dltool();
    cmd.arg("fine-tune")
        .arg(images)
        .arg("-o")
        .arg(model)
        .arg("--cache-dir")
        .arg(cache)
        .args(extra);
    cmd
}

#[test]
fn one_class_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let images = flowers(&dir.path().join("img"), &["daisy"], 0, 3);
    let model = dir.path().join("m.safetensors");
    fails_with(
        &mut fine_tune(&images, &model, &dir.path().join("cache"), &[]),
        "only one class (daisy)",
    );
    assert!(!model.exists());
}

#[test]
fn a_class_too_small_for_the_validation_split_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("img");
    flowers(&images, &["daisy"], 0, 3);
    flowers(&images, &["roses"], 0, 1);
    fails_with(
        &mut fine_tune(&images, &dir.path().join("m"), &dir.path().join("c"), &[]),
        "class 'roses' has 1 image(s); the validation split needs at least 2",
    );
}

#[test]
fn a_layer_that_is_not_a_cut_point_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let images = flowers(&dir.path().join("img"), &["daisy", "roses"], 0, 2);
    let lite0 = lite0();
    let lite0 = lite0.to_str().unwrap();
    for (layer, extra, points) in [
        (
            "mixed_7c",
            None,
            "inception_v3 (cut points: mixed_6e, mixed_7a)",
        ),
        (
            "mixed_5d",
            None,
            "inception_v3 (cut points: mixed_6e, mixed_7a)",
        ),
        (
            "head",
            Some(lite0),
            "efficientnet_lite0 (cut points: block0, block2, block4, block7, block10, block14, block15)",
        ),
        (
            "block3",
            Some(lite0),
            "efficientnet_lite0 (cut points: block0, block2",
        ),
    ] {
        let mut args = vec!["--from-layer", layer];
        if let Some(w) = extra {
            args.extend(["--weights", w]);
        }
        fails_with(
            &mut fine_tune(&images, &dir.path().join("m"), &dir.path().join("c"), &args),
            &format!("--from-layer {layer}: not a fine-tuning cut point of {points}"),
        );
    }
}

#[test]
fn a_network_that_cannot_be_fine_tuned_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let images = flowers(&dir.path().join("img"), &["daisy", "roses"], 0, 2);
    fails_with(
        fine_tune(&images, &dir.path().join("m"), &dir.path().join("c"), &[])
            .arg("--weights")
            .arg(shared("weights/mobilenet_v1_0.25_224/model.json")),
        "--backbone mobilenet_v1: fine-tuning supports inception_v3, efficientnet_lite0 and efficientnet_lite2",
    );
}

#[test]
fn images_that_all_fail_to_decode_are_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("img");
    for class in ["a", "b"] {
        std::fs::create_dir_all(images.join(class)).unwrap();
        for i in 0..2 {
            std::fs::write(images.join(class).join(format!("{i}.jpg")), b"not a jpeg").unwrap();
        }
    }
    let model = dir.path().join("m.safetensors");
    let out = run(&mut fine_tune(
        &images,
        &model,
        &dir.path().join("c"),
        &["--from-layer", "mixed_7a"],
    ));
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.trim_end().lines().last().unwrap();
    assert!(
        last.contains("no image could be read: all 4 failed to decode"),
        "{stderr}"
    );
    // Each bad file was named on its own line before.
    assert_eq!(stderr.matches("skipped ").count(), 4, "{stderr}");
    assert!(!model.exists());
}

#[test]
fn small_run_end_to_end_then_cache_reuse_predict_and_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let classes = ["daisy", "sunflowers"];
    let train = flowers(&dir.path().join("train"), &classes, 0, 20);
    let test = flowers(&dir.path().join("test"), &classes, 100, 10);
    let cache = dir.path().join("cache");
    let lite0 = lite0();
    let args = [
        "--weights",
        lite0.to_str().unwrap(),
        // The last stage end: block 15 and the head train (the default, block10, trains five
        // blocks: more time, no more coverage).
        "--from-layer",
        "block14",
        "--epochs",
        "2",
        "--seed",
        "7",
        "--validation-fraction",
        "0.2",
        // 32 training photos x 2 views: batches of 8 give 8 steps an epoch instead of 2.
        "--train-batch",
        "8",
        "--head-lr",
        "0.003",
    ];

    let first = dir.path().join("first.safetensors");
    let out = run(&mut fine_tune(&train, &first, &cache, &args));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("0 reused, 40 computed"), "{stderr}");
    assert!(stderr.contains("epoch 2:"), "{stderr}");

    let head = Head::load(&first).unwrap();
    assert_eq!(head.classes, vec!["daisy", "sunflowers"]);
    assert_eq!(head.provenance.backbone, "efficientnet_lite0/224");
    assert_eq!(head.provenance.layer, "block14");
    assert_eq!(head.provenance.pool, "none");
    assert_eq!(head.feature_dim, 192 * 7 * 7);
    let HeadModel::FineTuned { model, params } = &head.model else {
        panic!("not a fine-tuned model: {}", head.model.kind());
    };
    assert_eq!(params.seed, 7);
    assert_eq!(model.report.train_images + model.report.val_images, 40);
    assert_eq!(
        model.report.samples_per_epoch,
        2 * model.report.train_images
    );
    // The default keeps the validated model: trained on the training part only.
    assert!(!params.refit && model.report.refit.is_none());
    assert_eq!(head.training.rows, model.report.train_images);
    assert!(!stderr.contains("refit epoch"), "{stderr}");
    // The defaults: the classifier started from zeros, label smoothing 0.1, no mixup.
    assert!(!params.linear_probe && model.report.probe.is_none());
    assert_eq!((params.label_smoothing, params.mixup), (0.1, 0.0));
    assert!(!stderr.contains("linear probe"), "{stderr}");

    // Same images, network and views: the cache answers, and the same seed gives the same file.
    let second = dir.path().join("second.safetensors");
    let out = run(&mut fine_tune(&train, &second, &cache, &args));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("40 reused, 0 computed"), "{stderr}");
    assert_eq!(
        std::fs::read(&first).unwrap(),
        std::fs::read(&second).unwrap(),
        "same seed, images and threads: the same model"
    );

    // --refit: the same validated run (its history), then a second training on all 40 photos
    // for the epochs validation chose; that model is written.
    let refitted = dir.path().join("refitted.safetensors");
    let mut with_refit = args.to_vec();
    with_refit.push("--refit");
    let out = run(&mut fine_tune(&train, &refitted, &cache, &with_refit));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refit epoch 1:"), "{stderr}");
    assert!(
        stderr.contains("then refitted on all 40 images"),
        "{stderr}"
    );
    let refitted_head = Head::load(&refitted).unwrap();
    let HeadModel::FineTuned {
        model: refitted_model,
        params: refitted_params,
    } = &refitted_head.model
    else {
        panic!("not a fine-tuned model");
    };
    assert!(refitted_params.refit);
    let refit = refitted_model.report.refit.as_ref().expect("refitted");
    assert_eq!((refit.images, refit.samples_per_epoch), (40, 80));
    assert!(model.report.best_epoch >= 1);
    assert_eq!(refit.epochs, model.report.best_epoch);
    assert_eq!(refit.train_loss.len(), refit.epochs);
    assert!(!refit.interrupted && !refitted_model.report.interrupted);
    assert_eq!(refitted_model.report.history, model.report.history);
    assert_eq!(refitted_head.training.rows, 40);
    assert_ne!(
        std::fs::read(&first).unwrap(),
        std::fs::read(&refitted).unwrap()
    );

    // --linear-probe: the classifier starts from a logistic regression on the pretrained
    // top's pooled features, its L2 strength one of those tried; recorded in the file (as are
    // --mixup and --label-smoothing).
    let probed = dir.path().join("probed.safetensors");
    let mut with_probe = args.to_vec();
    // With mixup and label smoothing too: one more run covers all three.
    with_probe.extend([
        "--linear-probe",
        "--mixup",
        "0.4",
        "--label-smoothing",
        "0.05",
    ]);
    let out = run(&mut fine_tune(&train, &probed, &cache, &with_probe));
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("started from a linear probe"), "{stderr}");
    let probed_head = Head::load(&probed).unwrap();
    let HeadModel::FineTuned {
        model: probed_model,
        params: probed_params,
    } = &probed_head.model
    else {
        panic!("not a fine-tuned model");
    };
    assert!(probed_params.linear_probe);
    assert_eq!(
        (probed_params.mixup, probed_params.label_smoothing),
        (0.4, 0.05)
    );
    let probe = probed_model.report.probe.as_ref().expect("a linear probe");
    assert!(
        dltool::finetune::train::PROBE_REGS.contains(&probe.reg),
        "{probe:?}"
    );
    assert!(
        probe.val_loss.is_finite() && probe.val_loss > 0.0,
        "{probe:?}"
    );
    assert_ne!(
        std::fs::read(&first).unwrap(),
        std::fs::read(&probed).unwrap()
    );

    // Held-out photos through the model, with the frozen part from the shared weights.
    let stdout = ok(dltool()
        .arg("predict")
        .arg(&first)
        .arg(&test)
        .arg("--weights")
        .arg(&lite0)
        .arg("-q"));
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 20);
    let correct = rows
        .iter()
        .filter(|r| {
            let f: Vec<&str> = r.split(',').collect();
            f[0].contains(&format!("/{}/", f[1]))
        })
        .count();
    let json = ok(dltool()
        .arg("evaluate")
        .arg(&first)
        .arg(&test)
        .arg("--weights")
        .arg(&lite0)
        .arg("--json"));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let accuracy = v["accuracy"].as_f64().unwrap();
    assert_eq!(
        accuracy,
        correct as f64 / 20.0,
        "evaluate agrees with predict"
    );
    // Daisies and sunflowers are far apart for ImageNet features: even 2 short epochs on 32
    // photos must separate most of them.
    assert!(accuracy >= 0.8, "held-out accuracy {accuracy}");
}

#[test]
fn a_model_file_is_refused_with_weights_of_another_network() {
    let dir = tempfile::tempdir().unwrap();
    let images = flowers(&dir.path().join("img"), &["daisy", "roses"], 0, 3);
    let model = dir.path().join("m.safetensors");
    let out = run(&mut fine_tune(
        &images,
        &model,
        &dir.path().join("c"),
        &["--from-layer", "mixed_7a", "--epochs", "1"],
    ));
    assert!(out.status.success());
    let mobilenet = shared("weights/mobilenet_v1_0.25_224/model.json");
    fails_with(
        dltool()
            .arg("evaluate")
            .arg(&model)
            .arg(&images)
            .arg("--weights")
            .arg(&mobilenet),
        "holds mobilenet_v1 weights",
    );
}

/// `fine-tune --grid` on 6 photos per class of 2 classes, cut at Lite0's last stage ends, one
/// epoch, 2 folds: every fit takes a fraction of a second. Batches of 2 give each fit a few
/// steps, enough for the grid's learning rates to score differently.
fn search(images: &Path, cache: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = dltool();
    cmd.arg("fine-tune")
        .arg(images)
        .arg("--weights")
        .arg(lite0())
        .arg("--cache-dir")
        .arg(cache)
        .args([
            "--from-layer",
            "block14",
            "--epochs",
            "1",
            "--folds",
            "2",
            "--train-batch",
            "2",
            "--seed",
            "3",
        ])
        .args(extra);
    cmd
}

/// The table's data rows: (marked best, grid cells, mean).
fn ranked_rows(stdout: &str) -> Vec<(bool, Vec<String>, f64)> {
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header").split_whitespace().collect();
    assert_eq!(header[0], "rank", "{stdout}");
    lines
        .map(|l| {
            let best = l.trim_start().starts_with('*');
            let cells: Vec<String> = l
                .trim_start_matches([' ', '*'])
                .split_whitespace()
                .map(String::from)
                .collect();
            let mean = cells[cells.len() - 3].parse().expect("a mean");
            (best, cells[1..cells.len() - 3].to_vec(), mean)
        })
        .collect()
}

#[test]
fn grid_search_ranks_points_over_folds_shares_the_cache_and_writes_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let images = flowers(&dir.path().join("img"), &["daisy", "sunflowers"], 0, 6);
    let cache = dir.path().join("cache");
    let best = dir.path().join("best.safetensors");
    let out = run(search(&images, &cache, &["--grid", "head-lr=0.001,0.03", "-o"]).arg(&best));
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let header = stdout.lines().next().unwrap();
    assert!(
        header.contains("head-lr") && header.contains("f1 mean"),
        "{stdout}"
    );
    let rows = ranked_rows(&stdout);
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0].0 && !rows[1].0, "the best first, marked: {stdout}");
    assert!(
        rows[0].2 > rows[1].2,
        "sorted by mean, and the grid matters: {stdout}"
    );
    let mut points: Vec<&str> = rows.iter().map(|r| r.1[0].as_str()).collect();
    points.sort();
    assert_eq!(points, ["0.001", "0.03"], "{stdout}");
    // One progress line per (point, fold), and the cut's activations computed once for
    // both points, both folds and the final fit.
    for n in 1..=4 {
        assert!(stderr.contains(&format!("[{n}/4] head-lr=")), "{stderr}");
    }
    assert!(!stderr.contains("[5/4]"), "{stderr}");
    assert_eq!(
        stderr.matches("activations at block14").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("0 reused, 12 computed"), "{stderr}");
    assert!(
        stderr.contains("best of 2 combinations by 2-fold f1"),
        "{stderr}"
    );

    // The best point, refit on all 12 photos: a model like `fine-tune -o` writes.
    let head = Head::load(&best).unwrap();
    let HeadModel::FineTuned { model, params } = &head.model else {
        panic!("not a fine-tuned model: {}", head.model.kind());
    };
    assert_eq!(model.report.train_images + model.report.val_images, 12);
    assert_eq!(params.head_lr.to_string(), rows[0].1[0], "the best point's");
    let predictions = ok(dltool()
        .arg("predict")
        .arg(&best)
        .arg(&images)
        .arg("--weights")
        .arg(lite0())
        .arg("-q"));
    assert_eq!(predictions.lines().skip(1).count(), 12, "{predictions}");

    // Two cut layers: each cached once (block14 from the first run), the same JSON shape as
    // `tune`'s.
    let out = run(&mut search(
        &images,
        &cache,
        &["--grid", "from-layer=block14,block15", "--json"],
    ));
    assert!(out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("12 reused, 0 computed"), "{stderr}");
    assert_eq!(
        stderr.matches("activations at block15").count(),
        1,
        "{stderr}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["head"], "fine-tuned");
    assert_eq!(v["network"], "efficientnet_lite0");
    assert_eq!(
        (v["folds"].as_u64(), v["images"].as_u64()),
        (Some(2), Some(12))
    );
    assert_eq!(v["classes"], serde_json::json!(["daisy", "sunflowers"]));
    assert_eq!(
        (v["combinations"].as_u64(), v["finished"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(v["interrupted"], false);
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    let mut layers = Vec::new();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r["rank"], i + 1);
        let scores: Vec<f64> = r["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect();
        assert_eq!(scores.len(), 2, "{r}");
        let mean = r["mean"].as_f64().unwrap();
        assert!((mean - (scores[0] + scores[1]) / 2.0).abs() < 1e-12, "{r}");
        assert!(r["std"].as_f64().unwrap() >= 0.0);
        assert_eq!(r["folds"].as_array().unwrap().len(), 2);
        assert_eq!(r["params"]["from_layer"], r["grid"]["from-layer"]);
        assert_eq!(r["params"]["epochs"], 1);
        layers.push(r["grid"]["from-layer"].as_str().unwrap().to_string());
    }
    layers.sort();
    assert_eq!(layers, ["block14", "block15"]);
    assert_eq!(v["best"], results[0]["grid"]);
}

#[test]
fn bad_grid_searches_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let images = flowers(&dir.path().join("img"), &["daisy", "roses"], 0, 3);
    let cache = dir.path().join("cache");
    fails_with(
        &mut search(&images, &cache, &["--grid", "reg=0.1"]),
        "--grid reg=0.1: 'reg' is not a parameter of fine-tuning (it takes lr, head-lr, \
         from-layer, epochs, weight-decay, dropout, train-batch, patience, validation-fraction, \
         mixup, label-smoothing)",
    );
    fails_with(
        &mut search(&images, &cache, &["--grid", "lr=1e-4,fast"]),
        "--grid lr=1e-4,fast: 'fast' is not a number",
    );
    fails_with(
        &mut search(&images, &cache, &["--grid", "from-layer=block14,block13"]),
        "--grid from-layer: 'block13' is not a fine-tuning cut point of efficientnet_lite0 \
         (cut points: block0,",
    );
    fails_with(
        &mut search(&images, &cache, &["--grid", "validation-fraction=0,0.2"]),
        "--validation-fraction must be in (0, 1), not 0",
    );
    // 3 photos a class cannot fill 4 folds.
    let lite0 = lite0();
    fails_with(
        &mut fine_tune(
            &images,
            &dir.path().join("m"),
            &cache,
            &[
                "--weights",
                lite0.to_str().unwrap(),
                "--grid",
                "lr=1e-4",
                "--folds",
                "4",
            ],
        ),
        "--folds 4: class 'daisy' has only 3 image(s); every class needs at least one image per fold",
    );
    let features = dir.path().join("train.safetensors");
    std::fs::write(&features, b"features, not photos").unwrap();
    fails_with(
        &mut search(&features, &cache, &["--grid", "lr=1e-4"]),
        "train.safetensors: a features file; fine-tune trains on images",
    );
    fails_with(
        &mut fine_tune(&images, &dir.path().join("m"), &cache, &["--json"]),
        "--json and --metric report a search: give --grid (or --folds) with them",
    );
    // Without a search there is nothing to rank: -o is required.
    let out = run(dltool().arg("fine-tune").arg(&images));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--output <MODEL>"),
        "clap names the missing -o"
    );
    assert!(!cache.exists(), "nothing ran");
}
