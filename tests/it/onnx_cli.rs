//! `dltool inspect` and `--weights MODEL.onnx` from the command line: listings, and every bad
//! model the issue names refused with one line and exit 1.

use crate::common;

use common::{ok, run, shared};
use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/onnx")
        .join(name)
}

fn dltool() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dltool"));
    cmd.stdin(std::process::Stdio::null());
    cmd
}

/// Runs a command that must fail with exit 1 and one line on stderr; returns the line.
fn refused(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert_eq!(out.status.code(), Some(1), "expected exit 1");
    let stderr = String::from_utf8(out.stderr).unwrap();
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    lines[0].to_string()
}

#[test]
fn inspect_lists_input_outputs_and_nodes_with_shapes() {
    let out = ok(dltool()
        .arg("inspect")
        .arg(shared("models/efficientnet_lite0_pool.onnx")));
    assert!(
        out.contains("input: input [batch,3,224,224] (NCHW)"),
        "{out}"
    );
    assert!(out.contains("outputs: pool"), "{out}");
    // The head's ReLU6 (a Clip node) at 1280x7x7, and the pooled output.
    assert!(
        out.lines()
            .any(|l| l.contains("Clip") && l.ends_with("1280x7x7")),
        "{out}"
    );
    assert!(out.lines().any(|l| l.ends_with(" 1280")), "{out}");
    // Constants and int64 shape plumbing are not offered.
    assert!(!out.contains("Constant "), "{out}");
    assert!(!out.contains("ConstantOfShape"), "{out}");

    let json = ok(dltool()
        .args(["inspect", "--json"])
        .arg(fixture("vit_block.onnx")));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["input"]["layout"], "NCHW");
    assert_eq!(v["outputs"], serde_json::json!(["embedding", "tokens"]));
    let softmax = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["op"] == "Softmax")
        .expect("the attention softmax is listed");
    // Two heads over 17 tokens.
    assert_eq!(softmax["shape"], serde_json::json!([2, 17, 17]));
}

#[test]
fn inspect_of_a_symbolic_model_needs_size_and_lists_built_ins() {
    let line = refused(dltool().arg("inspect").arg(fixture("symbolic_hw.onnx")));
    assert!(
        line.contains("symbolic height (H)") && line.contains("--size"),
        "{line}"
    );
    let out = ok(dltool()
        .args(["inspect", "--size", "64"])
        .arg(fixture("symbolic_hw.onnx")));
    assert!(
        out.contains("features") && out.contains("16x32x32"),
        "{out}"
    );

    let out = ok(dltool().args(["inspect", "inception_v3"]));
    assert!(out.contains("mixed_7c  2048x8x8"), "{out}");
    let out = ok(dltool().args(["inspect", "efficientnet_lite0"]));
    assert!(out.contains("input: 224x224"), "{out}");
    assert!(out.contains("default head"), "{out}");
    assert!(out.contains("head  1280x7x7"), "{out}");
    let line = refused(dltool().args(["inspect", "resnet9"]));
    assert!(line.contains("not a built-in network"), "{line}");
}

#[test]
fn not_an_onnx_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.onnx");
    std::fs::write(&path, "this is not a model\n").unwrap();
    let line = refused(dltool().arg("inspect").arg(&path));
    assert!(line.contains("model.onnx: not an ONNX model"), "{line}");
}

#[test]
fn truncated_onnx_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.onnx");
    let bytes = std::fs::read(shared("models/efficientnet_lite0_pool.onnx")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let line = refused(dltool().arg("inspect").arg(&path));
    assert!(
        line.contains("cut.onnx: truncated or corrupt ONNX file"),
        "{line}"
    );
}

#[test]
fn an_op_the_engine_lacks_is_named_with_its_node() {
    let line = refused(dltool().arg("inspect").arg(fixture("bad_op.onnx")));
    assert!(
        line.contains("operator CenterCropPad (node 'crop_center') is not supported"),
        "{line}"
    );
}

#[test]
fn an_input_that_is_not_an_image_is_refused() {
    let line = refused(dltool().arg("inspect").arg(fixture("bad_grey.onnx")));
    assert!(
        line.contains("input 'input' has shape [N,1,32,32]") && line.contains("not an RGB image"),
        "{line}"
    );
}

#[test]
fn a_model_over_the_size_limit_is_refused() {
    let line = refused(
        dltool()
            .args(["inspect", "--max-model-mb", "1"])
            .arg(shared("models/efficientnet_lite0_pool.onnx")),
    );
    assert!(
        line.contains("over the 1 MiB limit") && line.contains("--max-model-mb"),
        "{line}"
    );
}

/// The 20 flowers of the EfficientNet-Lite0 pipeline golden, as absolute paths.
fn golden_flowers() -> (Vec<PathBuf>, Vec<f32>) {
    let golden = common::Golden::open("golden/efficientnet_lite0/pipeline.safetensors");
    let flowers = common::shared_dir().join("flowers");
    let images: Vec<PathBuf> = golden
        .metadata("images")
        .split(',')
        .map(|rel| flowers.join(rel))
        .collect();
    assert_eq!(images.len(), 20);
    let (shape, features) = golden.tensor("features");
    assert_eq!(shape, vec![20, 1280]);
    (images, features)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn lite0() -> PathBuf {
    shared("models/efficientnet_lite0_pool.onnx")
}

/// The ONNX export of EfficientNet-Lite0 through `featurize` on the 20 pipeline images: its
/// provenance, agreement with the PyTorch pipeline (PIL's resize), and agreement with the
/// built-in EfficientNet-Lite0 on the same weights (same decode and resize, two engines). One
/// featurize of each, shared by the three checks.
#[test]
fn featurize_with_the_lite0_onnx_matches_the_pipeline_and_the_built_in_lite0() {
    let (images, reference) = golden_flowers();
    let dir = tempfile::tempdir().unwrap();
    let featurize = |name: &str, args: &[&std::ffi::OsStr]| {
        let out = dir.path().join(name);
        ok(dltool()
            .args(["featurize", "--quiet", "-o"])
            .arg(&out)
            .args(args)
            .args(&images));
        dltool::features::read_features(&out).unwrap()
    };
    let onnx = featurize(
        "onnx.safetensors",
        &[
            "--preprocess".as_ref(),
            "efficientnet".as_ref(),
            "--weights".as_ref(),
            lite0().as_os_str(),
        ],
    );
    assert_eq!((onnx.len(), onnx.dim), (20, 1280));
    let meta = onnx.meta.as_ref().expect("provenance");
    assert_eq!(
        meta.backbone,
        "onnx/224x224_stretch_RGB_mean127,127,127_std128,128,128"
    );
    assert_eq!(
        meta.weights_sha256,
        "0268237358415e1a8e3dc7fd25e8cefd9fedeb093d8ffc48582b1e84958438a3"
    );
    assert_eq!(meta.layer, "pool");
    // PIL's resize and dltool's differ by a few levels on some pixels: cosine, not equality.
    let worst = (0..20)
        .map(|i| cosine(onnx.row(i), &reference[i * 1280..(i + 1) * 1280]))
        .fold(1.0f64, f64::min);
    eprintln!("worst cosine, ONNX vs the PyTorch pipeline: {worst:.6}");
    assert!(worst >= 0.999, "worst cosine {worst}");

    let weights = shared("weights/efficientnet_lite0/efficientnet-lite0-57934424.pth");
    let builtin = featurize(
        "builtin.safetensors",
        &[
            "--backbone".as_ref(),
            "efficientnet_lite0".as_ref(),
            "--weights".as_ref(),
            weights.as_os_str(),
        ],
    );
    assert_eq!((builtin.len(), builtin.dim), (20, 1280));
    let worst = (0..20)
        .map(|i| cosine(onnx.row(i), builtin.row(i)))
        .fold(1.0f64, f64::min);
    eprintln!("worst cosine, ONNX vs built-in: {worst:.7}");
    assert!(worst >= 0.9999, "worst cosine {worst}");
}

/// Ten flowers of two classes in a folder of their own (the label is the subfolder).
fn two_class_folder(root: &std::path::Path) -> PathBuf {
    let flowers = common::shared_dir().join("flowers");
    let dir = root.join("imgs");
    for class in ["daisy", "tulips"] {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(flowers.join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(5) {
            std::fs::copy(f, dir.join(class).join(f.file_name().unwrap())).unwrap();
        }
    }
    dir
}

#[test]
fn the_chain_records_the_model_and_predict_refuses_another() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = two_class_folder(tmp.path());
    let vit = fixture("vit_block.onnx");
    let feats = tmp.path().join("f.safetensors");
    ok(dltool()
        .args([
            "featurize",
            "--quiet",
            "--preprocess",
            "torchvision",
            "--layer",
            "tokens",
        ])
        .arg("--weights")
        .arg(&vit)
        .arg(&imgs)
        .arg("-o")
        .arg(&feats));
    let table = dltool::features::read_features(&feats).unwrap();
    // 17 tokens of 32 averaged: 32 features.
    assert_eq!((table.len(), table.dim), (10, 32));
    let meta = table.meta.unwrap();
    assert!(
        meta.backbone.starts_with("onnx/32x32_crop_RGB_mean123.675"),
        "{}",
        meta.backbone
    );
    assert_eq!(meta.layer, "tokens");

    let head = tmp.path().join("head.safetensors");
    ok(dltool()
        .args(["train-head", "--quiet"])
        .arg(&feats)
        .arg("-o")
        .arg(&head));
    // The head records the model file's SHA-256, the node and the whole preprocessing.
    let trained = dltool::head::Head::load(&head).unwrap();
    let vit_sha = dltool::weights::sha256_file(&vit).unwrap();
    assert_eq!(trained.provenance.weights_sha256, vit_sha);
    assert_eq!(trained.provenance.layer, "tokens");
    assert_eq!(trained.provenance.backbone, meta.backbone);
    let pre = trained
        .preprocess
        .expect("the head records its preprocessing");
    assert_eq!((pre.width, pre.height), (32, 32));
    assert_eq!(pre.resize, dltool::image_io::Resize::Crop);
    assert_eq!(pre.mean, [123.675, 116.28, 103.53]);

    // The same model: predictions for every image.
    let csv = ok(dltool()
        .args(["predict", "--quiet"])
        .arg(&head)
        .arg(&imgs)
        .arg("--weights")
        .arg(&vit));
    assert_eq!(csv.lines().count(), 11, "{csv}");

    // The same graph in different bytes (an unknown protobuf field appended): another model.
    let other = tmp.path().join("other.onnx");
    let mut bytes = std::fs::read(&vit).unwrap();
    bytes.extend_from_slice(&[0xA0, 0x06, 0x01]);
    std::fs::write(&other, &bytes).unwrap();
    let line = refused(
        dltool()
            .args(["predict", "--quiet"])
            .arg(&head)
            .arg(&imgs)
            .arg("--weights")
            .arg(&other),
    );
    assert!(line.contains("SHA-256"), "{line}");
    // A model of another input size: still refused for being another model, before loading.
    let line = refused(
        dltool()
            .args(["predict", "--quiet"])
            .arg(&head)
            .arg(&imgs)
            .arg("--weights")
            .arg(lite0()),
    );
    assert!(line.contains("SHA-256"), "{line}");

    // Without --weights: refused until the model is imported, then found by its hash.
    let home = tmp.path().join("home");
    let line = refused(
        dltool()
            .env("DLTOOL_HOME", &home)
            .args(["predict", "--quiet"])
            .arg(&head)
            .arg(&imgs),
    );
    assert!(line.contains("weights import"), "{line}");
    let imported = ok(dltool()
        .env("DLTOOL_HOME", &home)
        .args(["weights", "import", "--name", "vit"])
        .arg(&vit));
    assert!(
        imported.trim().ends_with("weights/onnx/vit.onnx"),
        "{imported}"
    );
    let again = ok(dltool()
        .env("DLTOOL_HOME", &home)
        .args(["predict", "--quiet"])
        .arg(&head)
        .arg(&imgs));
    assert_eq!(again, csv);
    // By the name it was imported as.
    let by_cache_name = ok(dltool()
        .env("DLTOOL_HOME", &home)
        .args(["predict", "--quiet"])
        .arg(&head)
        .arg(&imgs)
        .args(["--weights", "vit"]));
    assert_eq!(by_cache_name, csv);
    // Another model imported under another name is refused by name too.
    ok(dltool()
        .env("DLTOOL_HOME", &home)
        .args(["weights", "import", "--name", "other"])
        .arg(&other));
    let line = refused(
        dltool()
            .env("DLTOOL_HOME", &home)
            .args(["predict", "--quiet"])
            .arg(&head)
            .arg(&imgs)
            .args(["--weights", "other"]),
    );
    assert!(line.contains("SHA-256"), "{line}");
    // A different model under a name already taken is refused, not overwritten.
    let line = refused(
        dltool()
            .env("DLTOOL_HOME", &home)
            .args(["weights", "import", "--name", "vit"])
            .arg(&other),
    );
    assert!(line.contains("already imported as 'vit'"), "{line}");
    // And by name, for featurize.
    let by_name = ok(dltool()
        .env("DLTOOL_HOME", &home)
        .args([
            "featurize",
            "--quiet",
            "--preprocess",
            "torchvision",
            "--layer",
            "tokens",
        ])
        .args(["--weights", "vit"])
        .arg(&imgs));
    assert_eq!(by_name.lines().count(), 11);
}

#[test]
fn classify_applies_softmax_to_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let imgs = two_class_folder(tmp.path());
    let labels = tmp.path().join("labels.txt");
    let names: String = (0..32).map(|i| format!("class{i}\n")).collect();
    std::fs::write(&labels, names).unwrap();
    let out = ok(dltool()
        .args([
            "classify",
            "--quiet",
            "--preprocess",
            "inception",
            "--top-k",
            "32",
        ])
        .arg("--weights")
        .arg(fixture("vit_block.onnx"))
        .arg("--labels")
        .arg(&labels)
        .arg(&imgs));
    let mut rows = csv::Reader::from_reader(out.as_bytes());
    let mut sums = std::collections::BTreeMap::<String, f64>::new();
    for r in rows.records() {
        let r = r.unwrap();
        let p: f64 = r[4].parse().unwrap();
        assert!((0.0..=1.0).contains(&p));
        *sums.entry(r[0].to_string()).or_default() += p;
    }
    assert_eq!(sums.len(), 10);
    // The fixture's embedding is not a distribution: a softmax made it one.
    assert!(sums.values().all(|s| (s - 1.0).abs() < 1e-4), "{sums:?}");
}

#[test]
fn featurize_refuses_bad_models_and_choices_in_one_line() {
    let featurize = |model: PathBuf, extra: &[&str]| {
        let mut cmd = dltool();
        cmd.args(["featurize", "--quiet"])
            .arg("--weights")
            .arg(model)
            .args(extra)
            .arg(shared("flowers/daisy"));
        refused(&mut cmd)
    };
    // A node that does not exist: the closest names.
    let line = featurize(
        fixture("vit_block.onnx"),
        &["--preprocess", "inception", "--layer", "residul2"],
    );
    assert!(
        line.contains("no node or tensor named 'residul2'"),
        "{line}"
    );
    assert!(line.contains("closest: residual2"), "{line}");
    // An output whose size follows the batch.
    let line = featurize(fixture("bad_batch_flat.onnx"), &["--preprocess", "none"]);
    assert!(line.contains("its size changes with the input"), "{line}");
    // Symbolic height and width without --size.
    let line = featurize(fixture("symbolic_hw.onnx"), &["--preprocess", "none"]);
    assert!(line.contains("--size"), "{line}");
    // A fixed input and another --size.
    let line = featurize(lite0(), &["--preprocess", "efficientnet", "--size", "256"]);
    assert!(line.contains("fixed at 224x224"), "{line}");
    // No preprocessing named.
    let line = featurize(lite0(), &[]);
    assert!(line.contains("--preprocess PRESET"), "{line}");
    // An op tract lacks, through featurize too.
    let line = featurize(fixture("bad_op.onnx"), &["--preprocess", "none"]);
    assert!(line.contains("CenterCropPad"), "{line}");
    // Optimisation over its time limit.
    let line = featurize(
        lite0(),
        &[
            "--preprocess",
            "efficientnet",
            "--max-optimize-secs",
            "0.001",
        ],
    );
    assert!(line.contains("--max-optimize-secs"), "{line}");
    // An ONNX file for another network.
    let line = featurize(lite0(), &["--backbone", "mobilenet_v1"]);
    assert!(line.contains("an ONNX model, not MobileNet v1"), "{line}");
}

#[test]
fn bench_runs_an_onnx_model_checked_against_its_golden() {
    let out = ok(dltool()
        .args([
            "bench",
            "--images=2",
            "--repeat=1",
            "--batch=2",
            "--threads=1",
            "--mode=network,e2e",
            "--no-peers",
            "--json",
            "--preprocess=efficientnet",
            "--dir",
        ])
        .arg(common::shared_dir().join("flowers"))
        .arg("--weights")
        .arg(lite0())
        .arg("--golden")
        .arg(shared("golden/efficientnet_lite0/net.safetensors")));
    let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is one JSON object");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2, "{out}");
    for row in rows {
        assert_eq!(row["tool"], "dltool");
        assert!(row["img_per_s_median"].as_f64().unwrap() > 0.0, "{row}");
        // InceptionV3's FLOP count is not this model's.
        assert!(row["gflops"].is_null(), "{row}");
    }
    // The worker ran the ONNX model on the golden input and matched its `pool`.
    let diff = v["golden_max_abs_diff"]["dltool"].as_f64().unwrap();
    assert!(diff < 1e-3, "{v}");
}
