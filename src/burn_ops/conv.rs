//! A dense convolution (one group) whose weight gradient is the engine's one-GEMM kernel
//! ([`crate::engine::conv_grad`]), as a burn backend extension.
//!
//! Why: burn differentiates the weight of a convolution as another convolution with the batch
//! and the channels swapped, which on burn-flex is one matrix-vector product per input channel;
//! in an InceptionV3 fine-tune those were about half of an epoch (perf). The forward pass and
//! the input's and bias's gradients stay burn's own (its GEMMs there are full-sized).

use crate::engine::conv_grad::{self, ConvGeometry};
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::ops::ModuleOps;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, Backend, DType, Dispatch, Flex, backend_extension};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

use super::supported;
use burn::tensor::module;
use burn::tensor::ops::ConvOptions;

/// The weight gradient the engine computes; the forward pass is burn's convolution.
#[backend_extension(Flex, Autodiff)]
pub trait DenseConvOps: Backend {
    /// `x` `[n, cin, h, w]`, `weight` `[cout, cin, kh, kw]`, `bias` `[cout]` ->
    /// `[n, cout, out_h, out_w]`.
    fn dense_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        geometry: ConvGeometry,
    ) -> FloatTensor<Self>;

    /// The input and the output's gradient -> the weight's, summed over the batch.
    fn dense_conv_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        geometry: ConvGeometry,
    ) -> FloatTensor<Self>;
}

fn options(g: &ConvGeometry) -> ConvOptions<2> {
    ConvOptions::new_with_padding(g.stride, g.pads(), [1, 1], 1)
}

impl DenseConvOps for Flex {
    fn dense_conv(
        x: FlexTensor,
        weight: FlexTensor,
        bias: FlexTensor,
        g: ConvGeometry,
    ) -> FlexTensor {
        Flex::conv2d(x, weight, Some(bias), options(&g))
    }

    fn dense_conv_weight_grad(x: FlexTensor, grad: FlexTensor, g: ConvGeometry) -> FlexTensor {
        let shape = [g.cout, g.cin, g.kh, g.kw];
        let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
        // Read in place (autodiff still holds both tensors, so `into_data` would copy them);
        // `to_contiguous` leaves a buffer holding exactly the elements, from offset 0.
        let data = match (x.dtype(), grad.dtype()) {
            (DType::F32, DType::F32) => TensorData::new(
                conv_grad::weight_grad(x.storage::<f32>(), grad.storage::<f32>(), &g),
                shape,
            ),
            // The gradient checks run in f64.
            (DType::F64, DType::F64) => TensorData::new(
                conv_grad::weight_grad(x.storage::<f64>(), grad.storage::<f64>(), &g),
                shape,
            ),
            (a, b) => panic!("dense_conv_weight_grad: {a:?} input with a {b:?} gradient"),
        };
        FlexTensor::from_data(data)
    }
}

#[derive(Debug)]
struct DenseConvBackward;

impl<B: DenseConvOps> Backward<B, 3> for DenseConvBackward {
    type State = (NodeId, NodeId, NodeId, ConvGeometry);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_state, weight_state, bias_state, g) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_state);
        let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(weight_state);
        let bias = checkpointer.retrieve_node_output::<FloatTensor<B>>(bias_state);
        if let Some(node) = node_bias {
            let gb = B::conv2d_bias_backward(x.clone(), bias, grad.clone());
            grads.register::<B>(node.id, gb);
        }
        if let Some(node) = node_x {
            let gx = B::conv2d_x_backward(x.clone(), weight, grad.clone(), options(&g));
            grads.register::<B>(node.id, gx);
        }
        if let Some(node) = node_weight {
            grads.register::<B>(node.id, B::dense_conv_weight_grad(x, grad, g));
        }
    }
}

impl<B: DenseConvOps, C: CheckpointStrategy> DenseConvOps for Autodiff<B, C> {
    fn dense_conv(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        g: ConvGeometry,
    ) -> FloatTensor<Self> {
        match DenseConvBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                let bias_state = prep.checkpoint(&bias);
                let out = B::dense_conv(
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                    g,
                );
                prep.finish((x_state, weight_state, bias_state, g), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dense_conv(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                g,
            )),
        }
    }

    // The gradient itself is not differentiated again (no second-order training).
    fn dense_conv_weight_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        g: ConvGeometry,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::dense_conv_weight_grad(
            Self::inner(x),
            Self::inner(grad),
            g,
        ))
    }
}

/// burn's `conv2d` with one group, no dilation and a bias; on burn-flex the weight's gradient
/// is the engine's.
pub fn conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    options: ConvOptions<2>,
) -> Tensor<4> {
    let [_, cin, h, w] = x.dims();
    let [cout, wcin, kh, kw] = weight.dims();
    if !supported(&x.device()) || options.groups != 1 || options.dilation != [1, 1] || wcin != cin {
        return module::conv2d(x, weight, Some(bias), options);
    }
    let g = ConvGeometry::new(
        [cin, cout],
        [kh, kw],
        options.stride,
        [h, w],
        options.padding,
    );
    Tensor::from_dispatch(Dispatch::dense_conv(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        g,
    ))
}

/// `conv.forward(x)` for burn's `Conv2d` module, through [`conv2d`] where it has a bias and
/// explicit padding (InceptionV3's convolutions, BatchNorm folded).
pub fn forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    match (&conv.bias, &conv.padding) {
        (Some(bias), &PaddingConfig2d::Explicit(top, left, bottom, right)) => {
            let pads = [(top, bottom), (left, right)];
            let options =
                ConvOptions::new_with_padding(conv.stride, pads, conv.dilation, conv.groups);
            conv2d(x, conv.weight.val(), bias.val(), options)
        }
        _ => conv.forward(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
        let mut rng = crate::split::SplitMix64::new(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
        Tensor::from_data(TensorData::new(v, shape), device)
    }

    fn close<const D: usize>(what: &str, a: Tensor<D>, b: Tensor<D>) {
        let (a, b) = (a.into_data(), b.into_data());
        assert_eq!(a.shape(), b.shape(), "{what}: shapes");
        let (a, b) = (
            a.try_to_vec::<f32>().unwrap(),
            b.try_to_vec::<f32>().unwrap(),
        );
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(
            worst <= 1e-5 * scale,
            "{what}: max difference {worst} (scale {scale})"
        );
    }

    /// The extension, recorded by autodiff, against burn's own convolution: the output and the
    /// gradients of the input, weight and bias, for InceptionV3's kinds of convolution.
    #[test]
    fn matches_burns_convolution_forward_and_backward() {
        let device = Device::flex().autodiff();
        assert!(supported(&device));
        for (k, stride, pads) in [
            ([1, 1], 1, [(0, 0), (0, 0)]),
            ([1, 3], 1, [(0, 0), (1, 1)]),
            ([3, 3], 2, [(0, 0), (0, 0)]),
            ([3, 3], 2, [(0, 1), (0, 1)]),
            ([7, 1], 1, [(3, 3), (0, 0)]),
        ] {
            let x = noise([3, 5, 9, 8], 1, &device).require_grad();
            let w = noise([6, 5, k[0], k[1]], 2, &device).require_grad();
            let b = noise([6], 3, &device).require_grad();
            let options = ConvOptions::new_with_padding([stride; 2], pads, [1, 1], 1);
            let ours = conv2d(x.clone(), w.clone(), b.clone(), options.clone());
            let burns = module::conv2d(x.clone(), w.clone(), Some(b.clone()), options);
            let r = noise(burns.dims(), 4, &device);
            let grads_ours = (ours.clone() * r.clone()).sum().backward();
            let grads_burn = (burns.clone() * r).sum().backward();
            close("output", ours.inner(), burns.inner());
            close(
                "input gradient",
                x.grad(&grads_ours).unwrap(),
                x.grad(&grads_burn).unwrap(),
            );
            close(
                "weight gradient",
                w.grad(&grads_ours).unwrap(),
                w.grad(&grads_burn).unwrap(),
            );
            close(
                "bias gradient",
                b.grad(&grads_ours).unwrap(),
                b.grad(&grads_burn).unwrap(),
            );
        }
    }
}
