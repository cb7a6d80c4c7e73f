//! The burn port of InceptionV3 against activations of the original TorchScript network.

use crate::common;

use burn::prelude::*;
use common::{Golden, max_abs_diff, shared};
use dltool::inception_v3::{self, BlockVariant};

#[test]
fn every_stage_matches_the_reference_network() {
    let device = common::test_device();
    let (model, loaded) = inception_v3::load(
        &shared("weights/inception_v3_tf2015.safetensors"),
        None,
        &device,
    )
    .expect("shared weights load");
    assert_eq!(loaded.config.variant, BlockVariant::Tf2015);
    assert_eq!(loaded.config.num_classes, None);

    let golden = Golden::open("golden/inception_v3_tf2015/net.safetensors");
    let (shape, input) = golden.tensor("input");
    let x = Tensor::<4>::from_data(TensorData::new(input, shape.clone()), &device);
    let stages = model.forward_stages(x);

    let got: [(&str, Vec<f32>, Vec<usize>); 5] = [
        (
            "stem",
            to_vec(stages.stem.to_data()),
            stages.stem.dims().to_vec(),
        ),
        (
            "mixed_5d",
            to_vec(stages.mixed_5d.to_data()),
            stages.mixed_5d.dims().to_vec(),
        ),
        (
            "mixed_6e",
            to_vec(stages.mixed_6e.to_data()),
            stages.mixed_6e.dims().to_vec(),
        ),
        (
            "mixed_7c",
            to_vec(stages.mixed_7c.to_data()),
            stages.mixed_7c.dims().to_vec(),
        ),
        (
            "pool",
            to_vec(stages.pool.to_data()),
            stages.pool.dims().to_vec(),
        ),
    ];
    for (name, ours, dims) in got {
        let (ref_shape, reference) = golden.tensor(name);
        assert_eq!(dims, ref_shape, "{name}: shape");
        let (diff, scale) = max_abs_diff(&ours, &reference);
        eprintln!("{name}: max |diff| = {diff:e}, max |ref| = {scale}");
        assert!(
            diff <= 1e-4 * scale,
            "{name}: max |diff| {diff} exceeds 1e-4 x max |ref| ({scale})"
        );
    }
}

fn to_vec(d: TensorData) -> Vec<f32> {
    d.try_into_vec::<f32>().unwrap()
}
