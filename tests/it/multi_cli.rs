//! Several networks in one pass (`featurize --backbone a,b`): the rows are exactly each
//! network's own features side by side, provenance records every part in order, a head trained
//! on them reloads the same networks in `predict`, and bad lists are one line each. MobileNet
//! 0.25 and EfficientNet-Lite0 on a few images keep it fast.

use crate::common;

use common::{dltool, fails_with, flower_subset, ok, run, shared};
use dltool::features::{FeatureTable, read_features};
use std::path::{Path, PathBuf};

const MOBILENET: &str = "weights/mobilenet_v1_0.25_224";
const LITE0: &str = "weights/efficientnet_lite0/efficientnet-lite0-57934424.pth";

fn featurize(images: &Path, out: &Path, args: &[&str]) -> FeatureTable {
    ok(dltool()
        .args(["featurize", "-q"])
        .arg(images)
        .args(args)
        .arg("-o")
        .arg(out));
    read_features(out).unwrap()
}

fn path(p: PathBuf) -> String {
    p.display().to_string()
}

#[test]
fn two_networks_give_each_networks_features_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let images = flower_subset(dir.path(), &["daisy", "roses"], 2);
    let (mn, l0) = (path(shared(MOBILENET)), path(shared(LITE0)));
    let d = |name: &str| dir.path().join(name);

    let a = featurize(&images, &d("mn.safetensors"), &["--weights", &mn]);
    let b = featurize(&images, &d("l0.safetensors"), &["--weights", &l0]);
    let both = featurize(
        &images,
        &d("both.safetensors"),
        &[
            "--backbone",
            "mobilenet_v1,efficientnet_lite0",
            "--weights",
            &format!("{mn},{l0}"),
        ],
    );
    assert_eq!((a.dim, b.dim), (256, 1280));
    assert_eq!((both.len(), both.dim), (4, 256 + 1280));
    assert_eq!(both.paths, a.paths);
    assert_eq!(both.labels, a.labels);
    for i in 0..4 {
        // The same decoded pixels, each network's own preprocessing: bit-identical.
        assert_eq!(&both.row(i)[..256], a.row(i), "row {i}, MobileNet part");
        assert_eq!(&both.row(i)[256..], b.row(i), "row {i}, Lite0 part");
    }
    let (ma, mb, m) = (
        a.meta.clone().unwrap(),
        b.meta.clone().unwrap(),
        both.meta.clone().unwrap(),
    );
    assert_eq!(
        m.backbone, "mobilenet_v1/0.25_224+efficientnet_lite0/224",
        "{m:?}"
    );
    assert_eq!(
        m.weights_sha256,
        format!("{}+{}", ma.weights_sha256, mb.weights_sha256)
    );
    assert_eq!(m.layer, "conv_pw_13_relu+head");
    assert_eq!((m.pool.as_str(), m.tta.as_str()), ("avg+avg", "none+none"));
    assert_eq!(
        dltool::backbone_set::parts(&m),
        vec![ma.clone(), mb.clone()]
    );

    // The networks named by their files alone, in the other order, with a layer each and a
    // pooling for both: columns and provenance follow that order.
    let other = featurize(
        &images,
        &d("other.csv"),
        &[
            "--weights",
            &format!("{l0},{mn}"),
            "--layer",
            "block15,",
            "--pool",
            "max",
        ],
    );
    assert_eq!(other.dim, 320 + 256);
    let l0_block15 = featurize(
        &images,
        &d("l0b15.safetensors"),
        &["--weights", &l0, "--layer", "block15", "--pool", "max"],
    );
    for i in 0..4 {
        assert_eq!(&other.row(i)[..320], l0_block15.row(i), "row {i}");
    }
}

#[test]
fn a_head_on_two_networks_predicts_from_images_with_both() {
    let dir = tempfile::tempdir().unwrap();
    let images = flower_subset(dir.path(), &["daisy", "tulips"], 6);
    let (mn, l0) = (path(shared(MOBILENET)), path(shared(LITE0)));
    let d = |name: &str| path(dir.path().join(name));
    let both = format!("{mn},{l0}");

    let table = featurize(
        &images,
        Path::new(&d("f.safetensors")),
        &[
            "--backbone",
            "mobilenet_v1,efficientnet_lite0",
            "--weights",
            &both,
        ],
    );
    ok(dltool().args([
        "train-head",
        "-q",
        &d("f.safetensors"),
        "-o",
        &d("head.safetensors"),
    ]));
    let head = dltool::head::Head::load(Path::new(&d("head.safetensors"))).unwrap();
    assert_eq!(
        head.provenance.backbone,
        table.meta.as_ref().unwrap().backbone
    );
    assert_eq!(
        head.provenance.weights_sha256,
        table.meta.as_ref().unwrap().weights_sha256
    );
    assert_eq!(head.feature_dim, 256 + 1280);

    // From images (the head reloads both networks) and from the features: the same rows.
    let from_images = ok(dltool()
        .args(["predict", "-q", &d("head.safetensors"), "--weights", &both])
        .arg(&images));
    let from_features = ok(dltool().args([
        "predict",
        &d("head.safetensors"),
        "--features",
        &d("f.safetensors"),
    ]));
    assert_eq!(from_images.lines().count(), 1 + 12, "{from_images}");
    assert_eq!(from_images, from_features);

    // Each network's weights in the wrong place, or one file for two networks: one line.
    let err = fails_with(
        dltool()
            .args([
                "predict",
                &d("head.safetensors"),
                "--weights",
                &format!("{l0},{mn}"),
            ])
            .arg(&images),
        "mobilenet_v1/0.25_224",
    );
    assert!(err.contains("efficientnet_lite0"), "{err}");
    fails_with(
        dltool()
            .args(["predict", &d("head.safetensors"), "--weights", &mn])
            .arg(&images),
        "2 network(s)",
    );
    // Features of one of the two networks are not the head's.
    featurize(
        &images,
        Path::new(&d("mn.safetensors")),
        &["--weights", &mn],
    );
    fails_with(
        dltool().args([
            "predict",
            &d("head.safetensors"),
            "--features",
            &d("mn.safetensors"),
        ]),
        "256 columns",
    );
}

#[test]
fn bad_network_lists_are_one_line() {
    let daisy = shared("flowers/daisy/14551098743_2842e7a004_n.jpg");
    let (mn, l0) = (path(shared(MOBILENET)), path(shared(LITE0)));

    // Unknown name: clap's usage error (exit 2) names it and the networks there are.
    let out = run(dltool()
        .args(["featurize", "--backbone", "mobilenet_v1,resnet9"])
        .arg(&daisy));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().next().unwrap_or("");
    assert!(first.contains("resnet9"), "{err}");
    assert!(
        err.contains("efficientnet_lite0") && err.contains("inception_v3"),
        "{err}"
    );

    fails_with(
        dltool()
            .args(["featurize", "--backbone", "mobilenet_v1,mobilenet_v1"])
            .arg(&daisy),
        "names mobilenet_v1 twice",
    );
    fails_with(
        dltool()
            .args(["featurize", "--weights", &format!("{mn},{mn}")])
            .arg(&daisy),
        "same network",
    );
    fails_with(
        dltool()
            .args(["featurize", "--backbone", "mobilenet_v1,efficientnet_lite0"])
            .args(["--weights", &mn])
            .arg(&daisy),
        "1 file(s) for 2 networks",
    );
    fails_with(
        dltool()
            .args(["featurize", "--weights", &format!("{mn},{l0}")])
            .args(["--layer", "head"])
            .arg(&daisy),
        "1 layer(s) for 2 networks",
    );
    // A file of another network in a list: the part's own one-line refusal.
    fails_with(
        dltool()
            .args(["featurize", "--backbone", "mobilenet_v1,efficientnet_lite2"])
            .args(["--weights", &format!("{mn},{l0}")])
            .arg(&daisy),
        "EfficientNet-Lite0",
    );
    // Commands that run one network say so.
    fails_with(
        dltool()
            .args(["classify", "--weights", &format!("{mn},{l0}")])
            .arg(&daisy),
        "this command runs one",
    );
}
