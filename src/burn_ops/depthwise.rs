//! A depthwise convolution with its own backward pass, as a burn backend extension.
//!
//! Why: burn differentiates a grouped convolution one group at a time (a slice, a convolution
//! with one output channel and a `slice_assign` per channel), which for the 720-1248 channels of
//! an EfficientNet-Lite block was about half of a fine-tuning epoch. The engine's NCHW kernels
//! ([`crate::engine::depthwise_grad`]) compute each gradient in one pass over the maps. burn-flex
//! runs them on the CPU; autodiff records the operation and calls them back for the gradients.
//! Other backends (wgpu) keep burn's grouped convolution: [`super::supported`] says which.

use crate::engine::depthwise_grad::{self, DwGeometry};
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, DType, Dispatch, Flex, TensorMetadata, backend_extension,
};
use burn::prelude::*;

/// The depthwise convolution and its two gradients; the geometry is checked by the caller.
#[backend_extension(Flex, Autodiff)]
pub trait DepthwiseOps: Backend {
    /// `x` `[n, c, h, w]`, `weight` `[c, 1, k, k]` -> `[n, c, out_h, out_w]`, no bias.
    fn depthwise_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        geometry: DwGeometry,
    ) -> FloatTensor<Self>;

    /// The output's gradient -> the input's.
    fn depthwise_conv_input_grad(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        geometry: DwGeometry,
    ) -> FloatTensor<Self>;

    /// The input and the output's gradient -> the weight's, summed over the batch.
    fn depthwise_conv_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: DwGeometry,
    ) -> FloatTensor<Self>;
}

/// Which of the engine's kernels to run.
#[derive(Clone, Copy)]
enum Kernel {
    Forward,
    InputGrad,
    WeightGrad,
}

impl Kernel {
    fn apply<T: depthwise_grad::Real>(self, a: &[T], b: &[T], g: &DwGeometry) -> Vec<T> {
        match self {
            Kernel::Forward => depthwise_grad::forward(a, b, g),
            Kernel::InputGrad => depthwise_grad::input_grad(a, b, g),
            Kernel::WeightGrad => depthwise_grad::weight_grad(a, b, g),
        }
    }

    /// Runs on the values of two burn-flex tensors, in the first one's float type (f64 for the
    /// gradient checks, f32 otherwise; the second is converted to it), shaped `shape`.
    fn run(self, a: FlexTensor, b: FlexTensor, g: DwGeometry, shape: [usize; 4]) -> FlexTensor {
        let (a, b) = (a.into_data(), b.into_data());
        let out = if a.dtype() == DType::F64 {
            let values = |d: TensorData| d.convert::<f64>().try_into_vec::<f64>().expect("f64");
            TensorData::new(self.apply(&values(a), &values(b), &g), shape)
        } else {
            let values = |d: TensorData| d.convert::<f32>().try_into_vec::<f32>().expect("f32");
            TensorData::new(self.apply(&values(a), &values(b), &g), shape)
        };
        FlexTensor::from_data(out)
    }
}

impl DepthwiseOps for Flex {
    fn depthwise_conv(x: FlexTensor, weight: FlexTensor, g: DwGeometry) -> FlexTensor {
        let shape = [x.shape()[0], g.channels, g.out_h, g.out_w];
        Kernel::Forward.run(x, weight, g, shape)
    }

    fn depthwise_conv_input_grad(
        grad: FlexTensor,
        weight: FlexTensor,
        g: DwGeometry,
    ) -> FlexTensor {
        let shape = [grad.shape()[0], g.channels, g.in_h, g.in_w];
        Kernel::InputGrad.run(grad, weight, g, shape)
    }

    fn depthwise_conv_weight_grad(x: FlexTensor, grad: FlexTensor, g: DwGeometry) -> FlexTensor {
        let shape = [g.channels, 1, g.kernel, g.kernel];
        Kernel::WeightGrad.run(x, grad, g, shape)
    }
}

#[derive(Debug)]
struct DepthwiseBackward;

impl<B: DepthwiseOps> Backward<B, 2> for DepthwiseBackward {
    type State = (NodeId, NodeId, DwGeometry);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, weight_state, g) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_state);
        let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(weight_state);
        if let Some(node) = node_x {
            let gx = B::depthwise_conv_input_grad(grad.clone(), weight, g);
            grads.register::<B>(node.id, gx);
        }
        if let Some(node) = node_weight {
            grads.register::<B>(node.id, B::depthwise_conv_weight_grad(x, grad, g));
        }
    }
}

impl<B: DepthwiseOps, C: CheckpointStrategy> DepthwiseOps for Autodiff<B, C> {
    fn depthwise_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        g: DwGeometry,
    ) -> FloatTensor<Self> {
        match DepthwiseBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                let out = B::depthwise_conv(x.into_primitive(), weight.into_primitive(), g);
                prep.finish((x_state, weight_state, g), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::depthwise_conv(
                x.into_primitive(),
                weight.into_primitive(),
                g,
            )),
        }
    }

    // The gradients themselves are not differentiated again (no second-order training).
    fn depthwise_conv_input_grad(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        g: DwGeometry,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::depthwise_conv_input_grad(
            Self::inner(grad),
            Self::inner(weight),
            g,
        ))
    }

    fn depthwise_conv_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        g: DwGeometry,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::depthwise_conv_weight_grad(
            Self::inner(x),
            Self::inner(grad),
            g,
        ))
    }
}

/// `x` `[n, c, h, w]` through the depthwise `weight` `[c, 1, k, k]` with per-side padding
/// `[(top, bottom), (left, right)]`; differentiable where `x` or `weight` is tracked.
pub fn depthwise_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    stride: usize,
    pads: [(usize, usize); 2],
) -> Tensor<4> {
    let [_, c, h, w] = x.dims();
    let [wc, one, kh, kw] = weight.dims();
    assert!(
        wc == c && one == 1 && kh == kw,
        "a depthwise weight [c, 1, k, k]"
    );
    let g = DwGeometry::new(c, kh, stride, [h, w], pads);
    Tensor::from_dispatch(Dispatch::depthwise_conv(
        x.into_dispatch(),
        weight.into_dispatch(),
        g,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;

    fn noise(shape: [usize; 4], seed: u64, device: &Device) -> Tensor<4> {
        let mut rng = crate::split::SplitMix64::new(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    fn close(what: &str, a: Tensor<4>, b: Tensor<4>) {
        let (a, b) = (a.into_data(), b.into_data());
        assert_eq!(a.shape(), b.shape(), "{what}: shapes");
        let (a, b) = (
            a.try_to_vec::<f32>().unwrap(),
            b.try_to_vec::<f32>().unwrap(),
        );
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst <= 1e-5, "{what}: max difference {worst}");
    }

    /// The extension, recorded by autodiff, against burn's grouped convolution: the output and
    /// the gradients of both inputs, stride 2 with TensorFlow's uneven "SAME" padding and
    /// stride 1 with even padding.
    #[test]
    fn matches_burns_grouped_convolution_forward_and_backward() {
        let device = Device::flex().autodiff();
        assert!(crate::burn_ops::supported(&device));
        for (stride, k, pads) in [(2, 5, [(1, 2), (2, 2)]), (1, 3, [(1, 1), (1, 1)])] {
            let x = noise([2, 6, 7, 6], 1, &device).require_grad();
            let w = noise([6, 1, k, k], 2, &device).require_grad();
            let ours = depthwise_conv2d(x.clone(), w.clone(), stride, pads);
            let options = ConvOptions::new_with_padding([stride; 2], pads, [1, 1], 6);
            let burns = conv2d(x.clone(), w.clone(), None, options);
            let r = noise(burns.dims(), 3, &device);
            let grads_ours = (ours.clone() * r.clone()).sum().backward();
            let grads_burn = (burns.clone() * r).sum().backward();
            close("output", ours.inner(), burns.inner());
            let grad = |t: &Tensor<4>, g| t.grad(g).expect("a gradient");
            close(
                "input gradient",
                grad(&x, &grads_ours),
                grad(&x, &grads_burn),
            );
            close(
                "weight gradient",
                grad(&w, &grads_ours),
                grad(&w, &grads_burn),
            );
        }
    }
}
