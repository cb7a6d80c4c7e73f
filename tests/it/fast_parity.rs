//! The NHWC CPU engine against the reference network's activations, and against the burn model
//! for the block layout the golden file does not cover.

use crate::common;

use burn::prelude::*;
use common::{Golden, max_abs_diff, shared};
use dltool::inception_fast::FastInceptionV3;
use dltool::inception_v3::{self, BlockVariant, Layer};

fn assert_close(name: &str, ours: &[f32], reference: &[f32]) {
    let (diff, scale) = max_abs_diff(ours, reference);
    eprintln!("{name}: max |diff| = {diff:e}, max |ref| = {scale}");
    assert!(
        diff <= 1e-4 * scale,
        "{name}: max |diff| {diff} exceeds 1e-4 x max |ref| ({scale})"
    );
}

#[test]
fn every_stage_matches_the_reference_network() {
    let (model, _) = inception_v3::load(
        &shared("weights/inception_v3_tf2015.safetensors"),
        None,
        &Device::flex(),
    )
    .expect("shared weights load");
    let fast = FastInceptionV3::from_model(&model);

    let golden = Golden::open("golden/inception_v3_tf2015/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let n = shape[0];
    let stages = fast.forward_stages(&input, n);
    for (name, ours) in [
        ("stem", &stages.stem),
        ("mixed_5d", &stages.mixed_5d),
        ("mixed_6e", &stages.mixed_6e),
        ("mixed_7c", &stages.mixed_7c),
        ("pool", &stages.pool),
    ] {
        let (_, reference) = golden.tensor(name);
        assert_eq!(ours.len(), reference.len(), "{name}: length");
        assert_close(name, ours, &reference);
    }

    // Stopping early gives the same layers, and the pooled forms agree with pooling the layer.
    assert_eq!(fast.forward_to(&input, n, Layer::Mixed5d), stages.mixed_5d);
    let act = fast.forward_act(&input, n, Layer::Mixed6e);
    assert_eq!(act.to_nchw(), stages.mixed_6e);
    let (c, plane) = (768, 17 * 17);
    let max = act.global_max();
    for i in 0..n {
        for ch in 0..c {
            let start = (i * c + ch) * plane;
            let want = stages.mixed_6e[start..start + plane]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max[i * c + ch], want, "global max, image {i} channel {ch}");
        }
    }
}

/// torchvision's block layout (padding counted in the average pools, an average pool in
/// Mixed_7c) has no reference activations: the burn model, whose pools are burn's own, is the
/// reference here. The tf2015 weights loaded as this layout make a different but valid network.
#[test]
fn torchvision_layout_matches_the_burn_model() {
    let device = Device::flex();
    let (model, _) = inception_v3::load(
        &shared("weights/inception_v3_tf2015.safetensors"),
        Some(BlockVariant::Torchvision),
        &device,
    )
    .expect("shared weights load");
    assert_eq!(model.variant(), BlockVariant::Torchvision);
    let fast = FastInceptionV3::from_model(&model);

    let golden = Golden::open("golden/inception_v3_tf2015/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let x = Tensor::<4>::from_data(TensorData::new(input.clone(), shape.clone()), &device);
    let burn = model
        .forward_to(x, Layer::Mixed7c)
        .into_data()
        .try_into_vec::<f32>()
        .unwrap();
    let ours = fast.forward_to(&input, shape[0], Layer::Mixed7c);
    assert_close("mixed_7c (torchvision layout)", &ours, &burn);
}
