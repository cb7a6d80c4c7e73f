//! EfficientNet-Lite's blocks above a stage end and its head convolution, as burn modules for
//! fine-tuning: the same folded weights the CPU engine packs ([`FoldedLite`]), BatchNorm held
//! in inference mode (folded), ReLU6, TensorFlow "SAME" padding (the odd row and column at the
//! bottom and right). The depthwise convolutions run the engine's kernels through
//! [`super::depthwise`] on the CPU, and burn's grouped convolution elsewhere.

use crate::backbones::efficientnet_lite::{
    BlockLayout, FoldedBlock, FoldedConv, FoldedLite, HEAD, LiteSpec,
};
use crate::burn_ops::{self, depthwise};
use crate::engine::cpu_conv::same_padding;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::ops::ConvOptions;

/// A convolution with its folded bias, optionally followed by ReLU6.
#[derive(Module, Debug)]
pub struct LiteConv {
    pub weight: Param<Tensor<4>>,
    pub bias: Param<Tensor<1>>,
    stride: usize,
    groups: usize,
    relu6: bool,
}

impl LiteConv {
    fn new(f: &FoldedConv, stride: usize, groups: usize, relu6: bool, device: &Device) -> Self {
        let [cout, _, _, _] = f.shape;
        Self {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(f.weight.clone(), f.shape),
                device,
            )),
            bias: Param::from_tensor(Tensor::from_data(
                TensorData::new(f.bias.clone(), [cout]),
                device,
            )),
            stride,
            groups,
            relu6,
        }
    }

    /// Padding is worked out from the input's size, as TensorFlow's "SAME" does, so the same
    /// module runs on the cut layer's maps and on the tiny ones of the gradient test.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let [_, _, kh, kw] = self.weight.dims();
        let pad = |size: usize, k: usize| {
            let (out, before) = same_padding(size, k, self.stride);
            let total = ((out - 1) * self.stride + k).saturating_sub(size);
            (before, total - before)
        };
        let pads = [pad(h, kh), pad(w, kw)];
        let [cout, _, _, _] = self.weight.dims();
        let y = if self.groups > 1 && burn_ops::supported(&x.device()) {
            depthwise::depthwise_conv2d(x, self.weight.val(), self.stride, pads)
                + self.bias.val().reshape([1, cout, 1, 1])
        } else {
            let options =
                ConvOptions::new_with_padding([self.stride; 2], pads, [1, 1], self.groups);
            burn_ops::conv::conv2d(x, self.weight.val(), self.bias.val(), options)
        };
        if self.relu6 { y.clamp(0.0, 6.0) } else { y }
    }
}

/// Expansion (absent when the ratio is 1), depthwise, projection, and the residual join when
/// the block keeps its size.
#[derive(Module, Debug)]
pub struct LiteBlock {
    pub expand: Option<LiteConv>,
    pub depthwise: LiteConv,
    pub project: LiteConv,
    residual: bool,
}

impl LiteBlock {
    pub fn new(f: &FoldedBlock, device: &Device) -> Self {
        let b = &f.layout;
        Self {
            expand: f
                .expand
                .as_ref()
                .map(|e| LiteConv::new(e, 1, 1, true, device)),
            depthwise: LiteConv::new(&f.depthwise, b.stride, b.mid, true, device),
            project: LiteConv::new(&f.project, 1, 1, false, device),
            residual: b.residual(),
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let h = match &self.expand {
            Some(e) => e.forward(x.clone()),
            None => x.clone(),
        };
        let y = self.project.forward(self.depthwise.forward(h));
        if self.residual { y + x } else { y }
    }
}

/// The trainable part of a fine-tuned EfficientNet-Lite: the blocks after the cut and the head
/// convolution (1280 channels, ReLU6).
#[derive(Module, Debug)]
pub struct LiteTop {
    pub blocks: Vec<LiteBlock>,
    pub head: LiteConv,
}

impl LiteTop {
    /// The pretrained blocks after block `cut_block` and the head of `weights`.
    pub fn from_folded(weights: &FoldedLite, cut_block: usize, device: &Device) -> Self {
        Self::new(&weights.blocks[cut_block + 1..], &weights.head, device)
    }

    pub fn new(blocks: &[FoldedBlock], head: &FoldedConv, device: &Device) -> Self {
        Self {
            blocks: blocks.iter().map(|b| LiteBlock::new(b, device)).collect(),
            head: LiteConv::new(head, 1, 1, true, device),
        }
    }

    /// The architecture alone, zero weights (to be loaded from a model file).
    pub fn architecture(spec: &LiteSpec, cut_block: usize, device: &Device) -> Self {
        let zeros = |shape: [usize; 4]| FoldedConv {
            weight: vec![0.0; shape.iter().product()],
            bias: vec![0.0; shape[0]],
            shape,
        };
        let layout = spec.blocks();
        let blocks: Vec<FoldedBlock> = layout[cut_block + 1..]
            .iter()
            .map(|b: &BlockLayout| FoldedBlock {
                layout: *b,
                expand: (b.mid != b.cin).then(|| zeros([b.mid, b.cin, 1, 1])),
                depthwise: zeros([b.mid, 1, b.kernel, b.kernel]),
                project: zeros([b.cout, b.mid, 1, 1]),
            })
            .collect();
        let last = layout.last().expect("blocks").cout;
        Self::new(&blocks, &zeros([HEAD, last, 1, 1]), device)
    }

    /// `[N, C, H, W]` at the cut -> the head's `[N, 1280, h, w]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.blocks.iter().fold(x, |x, b| b.forward(x));
        self.head.forward(x)
    }
}
