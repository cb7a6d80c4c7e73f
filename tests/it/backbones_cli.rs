//! MobileNet v1 as a second backbone through the whole chain, and `dltool classify` with the
//! pretrained classifiers.

use crate::common;

use burn::prelude::*;
use common::{Golden, dltool, flower_subset, make_pth, ok, run, shared};
use std::path::Path;

const MODEL_DIR: &str = "weights/mobilenet_v1_0.25_224";
const LABELS: &str = "imagenet/imagenet_class_index.json";

#[test]
fn classify_names_the_daisy_of_the_golden() {
    let golden = Golden::open("golden/mobilenet_v1_0.25_224/net.safetensors");
    let images = golden.metadata("images");
    let daisy = images.split(',').next().unwrap();
    assert!(daisy.starts_with("daisy/"), "{images}");
    let text = ok(dltool()
        .arg("classify")
        .arg("--backbone")
        .arg("mobilenet_v1")
        .arg("--weights")
        .arg(shared(MODEL_DIR))
        .arg("--labels")
        .arg(shared(LABELS))
        .arg("--top-k")
        .arg("5")
        .arg(shared(&format!("flowers/{daisy}"))));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("path,rank,synset,name,probability"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 5, "{text}");
    assert_eq!(&rows[0][1..4], ["1", "n11939491", "daisy"], "{text}");
    let probs: Vec<f32> = rows.iter().map(|r| r[4].parse().unwrap()).collect();
    assert!(probs.windows(2).all(|w| w[0] >= w[1]), "sorted: {probs:?}");
    // Every class listed: the same top 5 first, and a distribution that sums to 1.
    let all = ok(dltool()
        .arg("classify")
        .arg("--weights")
        .arg(shared(MODEL_DIR))
        .arg("--labels")
        .arg(shared(LABELS))
        .args(["--top-k", "1000"])
        .arg(shared(&format!("flowers/{daisy}"))));
    let all: Vec<f32> = all
        .lines()
        .skip(1)
        .map(|l| l.rsplit(',').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(all.len(), 1000, "this MobileNet v1 export has 1000 classes");
    assert_eq!(&all[..5], &probs[..], "the same top 5");
    let total: f32 = all.iter().sum();
    assert!((total - 1.0).abs() < 1e-4, "probabilities sum to {total}");
    assert!(probs[0] > 0.2, "a daisy is a confident daisy: {probs:?}");

    // JSON lines: one object per image with the same top class.
    let text = ok(dltool()
        .args(["classify", "--format", "jsonl", "--top-k", "2"])
        .arg("--weights")
        .arg(shared(&format!("{MODEL_DIR}/model.json")))
        .arg("--labels")
        .arg(shared(LABELS))
        .arg(shared(&format!("flowers/{daisy}"))));
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["top"][0]["synset"], "n11939491");
    assert_eq!(v["top"].as_array().unwrap().len(), 2);
}

#[test]
fn classify_explains_what_is_missing() {
    let daisy = shared("flowers/daisy");
    // The shared InceptionV3 ends at the pool: no classifier.
    let out = run(dltool().arg("classify").arg(&daisy));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no classifier"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    // No labels next to the shared model (and none in an empty DLTOOL_HOME).
    let home = tempfile::tempdir().unwrap();
    let out = run(dltool()
        .env("DLTOOL_HOME", home.path())
        .arg("classify")
        .arg("--weights")
        .arg(shared(MODEL_DIR))
        .arg(&daisy));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no class labels found"), "{err}");
    assert!(err.contains("--labels"), "{err}");

    // Labels that do not fit the classifier.
    let short = home.path().join("labels.txt");
    std::fs::write(&short, "daisy\ntulip\n").unwrap();
    let out = run(dltool()
        .arg("classify")
        .arg("--weights")
        .arg(shared(MODEL_DIR))
        .arg("--labels")
        .arg(&short)
        .arg(&daisy));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("2 labels, but the classifier"), "{err}");

    // A layer MobileNet does not have.
    let out = run(dltool()
        .args(["featurize", "--layer", "mixed_6e", "--weights"])
        .arg(shared(MODEL_DIR))
        .arg(&daisy));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("conv_pw_13_relu"), "{err}");
}

#[test]
fn mobilenet_runs_the_whole_chain() {
    let dir = tempfile::tempdir().unwrap();
    let images = flower_subset(dir.path(), &["daisy", "tulips"], 30);
    let d = |name: &str| dir.path().join(name).display().to_string();
    let weights = shared(MODEL_DIR);

    ok(dltool()
        .args(["featurize", "-q", "--backbone", "mobilenet_v1", "--weights"])
        .arg(&weights)
        .arg(&images)
        .args(["-o", &d("f.safetensors")]));
    let table = dltool::features::read_features(Path::new(&d("f.safetensors"))).unwrap();
    assert_eq!((table.len(), table.dim), (60, 256));
    let meta = table.meta.clone().unwrap();
    assert_eq!(meta.backbone, "mobilenet_v1/0.25_224");
    assert_eq!(meta.layer, "conv_pw_13_relu");

    // The pooled features equal the network's own global pool (what the parity test checks
    // against TF.js), so --pool none has 7x7 times as many values whose mean is that pool.
    let flat = d("flat.csv");
    ok(dltool()
        .args(["featurize", "-q", "--pool", "none", "--weights"])
        .arg(&weights)
        .arg(images.join("daisy"))
        .args(["-o", &flat]));
    let flat = dltool::features::read_features(Path::new(&flat)).unwrap();
    assert_eq!(flat.dim, 256 * 7 * 7);
    for c in [0usize, 17, 255] {
        let mean: f32 = flat.row(0)[c * 49..(c + 1) * 49].iter().sum::<f32>() / 49.0;
        let pooled = table.row(0)[c];
        assert!(
            (mean - pooled).abs() <= 1e-4 * pooled.abs().max(1.0),
            "{mean} vs {pooled}"
        );
    }

    ok(dltool()
        .args([
            "split",
            &d("f.safetensors"),
            "--fractions",
            "0.5,0.5",
            "--seed",
            "3",
        ])
        .args(["-o", &d("train.safetensors"), "-o", &d("test.safetensors")]));
    ok(dltool()
        .args([
            "train-head",
            "-q",
            &d("train.safetensors"),
            "-o",
            &d("head.safetensors"),
        ])
        .args(["--reg", "0.05"]));
    let json = ok(dltool().args([
        "evaluate",
        "--json",
        &d("head.safetensors"),
        &d("test.safetensors"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let accuracy = v["accuracy"].as_f64().unwrap();
    // Daisies and tulips are easy for any ImageNet network: far above the 0.5 of chance.
    assert!(accuracy >= 0.8, "accuracy {accuracy}");

    // predict runs images through the head's own backbone (found from the head) ...
    let text = ok(dltool()
        .args(["predict", "-q", &d("head.safetensors"), "--weights"])
        .arg(&weights)
        .arg(images.join("tulips")));
    assert_eq!(text.lines().count(), 31, "{text}");
    let tulips = text
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(1) == Some("tulips"));
    assert!(tulips.count() >= 24, "{text}");

    // ... and refuses InceptionV3 weights for a MobileNet head.
    let out = run(dltool()
        .args(["predict", &d("head.safetensors"), "--weights"])
        .arg(shared("weights/inception_v3_tf2015.safetensors"))
        .arg(images.join("tulips")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("mobilenet_v1/0.25_224"), "{err}");
}

#[test]
fn inception_classifies_with_the_fc_of_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    // pytorch-fid's file layout: the shared network plus a 1008-class fc (pseudo-random here).
    let pth = dir.path().join("pt_inception-2015-12-05-6726825d.pth");
    make_pth(&pth, &["--add-fc", "1008"]);
    // Labels next to the weights are found without --labels.
    let labels: String = (0..1008).map(|i| format!("n{i:08} class {i}\n")).collect();
    std::fs::write(dir.path().join("labels.txt"), labels).unwrap();
    let images = [
        shared("flowers/daisy/10140303196_b88d3d6cec.jpg"),
        shared("flowers/roses/12240577184_b0de0e53ea_n.jpg"),
    ];

    let text = ok(dltool()
        .args(["classify", "--format", "jsonl", "--top-k", "3", "--weights"])
        .arg(&pth)
        .args(&images));
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2, "{text}");

    // The same numbers by hand: featurize's pooled features through the loaded fc and a softmax.
    let features = dir.path().join("f.csv");
    ok(dltool()
        .args(["featurize", "-q", "--weights"])
        .arg(&pth)
        .args(&images)
        .arg("-o")
        .arg(&features));
    let table = dltool::features::read_features(&features).unwrap();
    let device = Device::flex();
    let (model, _) = dltool::inception_v3::load(&pth, None, &device).unwrap();
    let pooled = Tensor::<2>::from_data(TensorData::new(table.data.clone(), [2, 2048]), &device);
    let logits = model.classify(pooled).unwrap();
    let probs = burn::tensor::activation::softmax(logits, 1)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    for (i, row) in rows.iter().enumerate() {
        let p = &probs[i * 1008..(i + 1) * 1008];
        let want = dltool::commands::classify::top_k(p, 3);
        for (rank, &c) in want.iter().enumerate() {
            let got = &row["top"][rank];
            assert_eq!(got["synset"], format!("n{c:08}"), "{row}");
            assert_eq!(got["name"], format!("class {c}"), "{row}");
            let prob = got["probability"].as_f64().unwrap() as f32;
            assert!((prob - p[c]).abs() <= 1e-5, "{prob} vs {}", p[c]);
        }
    }
}
