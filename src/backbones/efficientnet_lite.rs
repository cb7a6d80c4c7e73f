//! EfficientNet-Lite0 and Lite2 (Tan & Le; Google's variant for fast CPU inference) on the NHWC
//! CPU engine: stem, MBConv blocks, head, average pool and the 1000-class ImageNet classifier.
//!
//! Lite differs from EfficientNet-B0..B7 in what makes mobile CPUs slow: ReLU6 instead of
//! swish, no squeeze-and-excitation, and stem (32) and head (1280) not scaled with the width.
//! Every convolution pads like TensorFlow's "SAME" (the extra row/column of a stride-2 layer
//! at the bottom/right), and BatchNorm (eps 1e-3) is folded into the convolutions at load.
//!
//! The block layout is not read from the file: it follows from EfficientNet-B0's stage table
//! and the variant's width and depth coefficients, as in Google's code, and every tensor of the
//! file is then checked against it (by name and shape).
//!
//! Per block: the 1x1 expansion is a GEMM with a ReLU6 epilogue, the depthwise convolution is
//! [`crate::engine::depthwise`], the 1x1 projection is a GEMM whose epilogue adds the bias and, when
//! the block keeps its size, the block's input.

use crate::engine::batch_split;
use crate::engine::cpu_conv::{Act, Conv, Epilogue};
use crate::engine::cpu_ops::Linear;
use crate::engine::depthwise::DepthwiseConv;
use crate::engine::inverted_residual::InvertedResidual;
use crate::image_io::Preprocess;
use std::collections::BTreeMap;
use std::path::Path;

/// One EfficientNet-Lite size: its coefficients and input resolution.
#[derive(Debug, PartialEq)]
pub struct LiteSpec {
    /// `efficientnet_lite0`, as on the command line.
    pub name: &'static str,
    pub width: f64,
    pub depth: f64,
    /// Input height and width.
    pub size: usize,
}

pub const LITE0: LiteSpec = LiteSpec {
    name: "efficientnet_lite0",
    width: 1.0,
    depth: 1.0,
    size: 224,
};

pub const LITE2: LiteSpec = LiteSpec {
    name: "efficientnet_lite2",
    width: 1.1,
    depth: 1.2,
    size: 260,
};

/// The sizes dltool knows, smallest first.
pub const SPECS: [&LiteSpec; 2] = [&LITE0, &LITE2];

/// EfficientNet-B0's stages: repeats, kernel, stride, expand ratio, input and output widths.
const B0_STAGES: [(usize, usize, usize, usize, usize, usize); 7] = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
];

/// Stem and head widths, fixed in the Lite variants.
pub const STEM: usize = 32;
pub const HEAD: usize = 1280;
const BN_EPS: f64 = 1e-3;

/// One MBConv block's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    pub cin: usize,
    pub cout: usize,
    /// Channels after the 1x1 expansion (`cin` when the ratio is 1 and there is none).
    pub mid: usize,
    pub kernel: usize,
    pub stride: usize,
}

impl BlockLayout {
    pub fn residual(&self) -> bool {
        self.stride == 1 && self.cin == self.cout
    }
}

impl LiteSpec {
    /// Google's `round_filters`: the scaled width to a multiple of 8, never 10% below.
    pub fn round_filters(&self, filters: usize) -> usize {
        let f = filters as f64 * self.width;
        let mut new = (8.0f64).max(((f + 4.0) as usize / 8 * 8) as f64);
        if new < 0.9 * f {
            new += 8.0;
        }
        new as usize
    }

    /// Blocks in stage `i` (0..7): `ceil(depth * repeats)`, but Lite keeps the first and the
    /// last stage at one block.
    pub fn repeats(&self, i: usize) -> usize {
        let r = B0_STAGES[i].0;
        if i == 0 || i == B0_STAGES.len() - 1 {
            r
        } else {
            (self.depth * r as f64).ceil() as usize
        }
    }

    pub fn blocks(&self) -> Vec<BlockLayout> {
        let mut out = Vec::new();
        for (i, &(_, kernel, stride, expand, cin, cout)) in B0_STAGES.iter().enumerate() {
            // The first stage reads the unscaled stem.
            let cin = if i == 0 {
                STEM
            } else {
                self.round_filters(cin)
            };
            let cout = self.round_filters(cout);
            for r in 0..self.repeats(i) {
                let cin = if r == 0 { cin } else { cout };
                out.push(BlockLayout {
                    cin,
                    cout,
                    mid: cin * expand,
                    kernel,
                    stride: if r == 0 { stride } else { 1 },
                });
            }
        }
        out
    }

    /// Index of the last block of each stage (the golden's `blockN` keys).
    pub fn stage_ends(&self) -> Vec<usize> {
        let mut end = 0;
        (0..B0_STAGES.len())
            .map(|i| {
                end += self.repeats(i);
                end - 1
            })
            .collect()
    }

    /// The layers features can be read from, first to last: `block{N}` for each stage end,
    /// then `head`.
    pub fn layer_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .stage_ends()
            .iter()
            .map(|b| format!("block{b}"))
            .collect();
        names.push("head".to_string());
        names
    }

    /// `layer` by name, or an error listing the valid ones.
    pub fn layer(&self, name: &str) -> Result<LiteLayer, String> {
        let names = self.layer_names();
        match names.iter().position(|n| n == name) {
            Some(i) if i + 1 == names.len() => Ok(LiteLayer::Head),
            Some(i) => Ok(LiteLayer::Stage(i)),
            None => Err(format!(
                "{} has no layer '{name}' (layers: {})",
                self.name,
                names.join(", ")
            )),
        }
    }

    /// `[C, H, W]` of a layer's output.
    pub fn layer_shape(&self, layer: LiteLayer) -> [usize; 3] {
        let mut size = self.size.div_ceil(2);
        let blocks = self.blocks();
        let last = match layer {
            LiteLayer::Stage(i) => self.stage_ends()[i],
            LiteLayer::Head => blocks.len() - 1,
        };
        for b in &blocks[..=last] {
            size = size.div_ceil(b.stride);
        }
        match layer {
            LiteLayer::Stage(_) => [blocks[last].cout, size, size],
            LiteLayer::Head => [HEAD, size, size],
        }
    }

    /// RGB at `size` x `size`, `(x - 127) / 128`.
    pub fn preprocess(&self) -> Preprocess {
        Preprocess {
            width: self.size as u32,
            height: self.size as u32,
            mean: [127.0; 3],
            std: [128.0; 3],
            resize: crate::image_io::Resize::Stretch,
            channels: crate::image_io::ChannelOrder::Rgb,
        }
    }
}

/// Where features are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiteLayer {
    /// The end of stage `i` (0..7).
    Stage(usize),
    /// After the 1x1 head convolution (1280 channels).
    Head,
}

/// A weight file that is not (or not this) EfficientNet-Lite. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: expected {expected} weights, but the file holds {found}")]
    WrongNetwork {
        path: String,
        expected: String,
        found: String,
    },
    #[error("{path}: tensor {name}: {problem}")]
    Tensor {
        path: String,
        name: String,
        problem: String,
    },
    #[error("{path}: unexpected tensor(s) that are not part of {network}: {}", names.join(", "))]
    Unexpected {
        path: String,
        network: &'static str,
        names: Vec<String>,
    },
}

/// A tensor as f32, whatever float type the file stores.
struct Tensor {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Every tensor of a `.pth` (zip or legacy pickle) or safetensors file; f16, bf16 and f64
/// become f32, integer tensors (BatchNorm's `num_batches_tracked`) are kept by shape only.
fn read_tensors(path: &Path) -> Result<BTreeMap<String, Tensor>, LoadError> {
    use crate::backbones::inception_v3::{WeightFormat, detect_format};
    let err = |message: String| LoadError::Read {
        path: path.display().to_string(),
        message,
    };
    let mut out = BTreeMap::new();
    match detect_format(path).map_err(err)? {
        WeightFormat::Pytorch => {
            use burn::store::{ModuleStore, PytorchStore};
            let mut store = PytorchStore::from_file(path);
            let all = store.get_all_tensors().map_err(|e| err(e.to_string()))?;
            for (name, t) in all {
                let bytes = t
                    .to_bytes()
                    .map_err(|e| err(format!("{name}: unreadable data: {e:?}")))?;
                let shape = t.shape.to_vec();
                let values = floats(&bytes, t.dtype, shape.iter().product())
                    .map_err(|m| err(format!("{name}: {m}")))?;
                out.insert(name.clone(), Tensor { shape, values });
            }
        }
        WeightFormat::Safetensors => {
            use burn::tensor::DType;
            use safetensors::Dtype;
            let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| err(format!("bad safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                let dtype = match view.dtype() {
                    Dtype::F32 => DType::F32,
                    Dtype::F16 => DType::F16,
                    Dtype::BF16 => DType::BF16,
                    Dtype::F64 => DType::F64,
                    Dtype::I64 => DType::I64,
                    other => return Err(err(format!("{name}: unsupported dtype {other:?}"))),
                };
                let shape = view.shape().to_vec();
                let values = floats(view.data(), dtype, shape.iter().product())
                    .map_err(|m| err(format!("{name}: {m}")))?;
                out.insert(name, Tensor { shape, values });
            }
        }
    }
    Ok(out)
}

/// Little-endian `bytes` of `len` values of `dtype` as f32 (empty for integer tensors).
fn floats(bytes: &[u8], dtype: burn::tensor::DType, len: usize) -> Result<Vec<f32>, String> {
    use burn::tensor::DType;
    let size = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        DType::F64 => 8,
        DType::I64 | DType::I32 | DType::U64 | DType::U32 => return Ok(Vec::new()),
        other => return Err(format!("unsupported dtype {other:?}")),
    };
    if bytes.len() != len * size {
        return Err(format!(
            "{} bytes of data for {len} values of {dtype:?}",
            bytes.len()
        ));
    }
    let b = bytes.chunks_exact(size);
    Ok(match dtype {
        DType::F32 => b
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => b
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => b
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => b
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
    })
}

/// Which Lite size a file's tensor names and shapes describe, or what it holds instead.
fn identify(tensors: &BTreeMap<String, Tensor>) -> Result<&'static LiteSpec, String> {
    if !tensors.contains_key("_conv_stem.weight") {
        let sample: Vec<&str> = tensors.keys().take(3).map(String::as_str).collect();
        let what = if tensors.contains_key("Conv2d_1a_3x3.conv.weight") {
            "InceptionV3 weights".to_string()
        } else {
            format!(
                "{} tensors such as {} (no _conv_stem.weight)",
                tensors.len(),
                sample.join(", ")
            )
        };
        return Err(what);
    }
    if tensors.keys().any(|k| k.contains("._se_reduce.")) {
        return Err(
            "EfficientNet weights with squeeze-and-excitation (B0..B7), not EfficientNet-Lite"
                .to_string(),
        );
    }
    let blocks = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("_blocks.")?.split('.').next()?.parse().ok())
        .map(|i: usize| i + 1)
        .max()
        .unwrap_or(0);
    let last = tensors
        .get("_conv_head.weight")
        .and_then(|t| t.shape.get(1).copied())
        .unwrap_or(0);
    SPECS
        .into_iter()
        .find(|s| {
            let layout = s.blocks();
            layout.len() == blocks && layout.last().map(|b| b.cout) == Some(last)
        })
        .ok_or_else(|| {
            let known: Vec<String> = SPECS
                .iter()
                .map(|s| {
                    format!(
                        "{} has {} blocks and {} head inputs",
                        s.name,
                        s.blocks().len(),
                        s.blocks().last().map_or(0, |b| b.cout)
                    )
                })
                .collect();
            format!(
                "an EfficientNet-Lite layout dltool does not know ({blocks} blocks, {last} head \
                 inputs; {})",
                known.join(", ")
            )
        })
}

/// Takes tensors out of the file's map by name, checking shapes, and folds BatchNorm.
struct Tensors {
    path: String,
    map: BTreeMap<String, Tensor>,
}

impl Tensors {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let problem = |problem: String| LoadError::Tensor {
            path: self.path.clone(),
            name: name.to_string(),
            problem,
        };
        let t = self
            .map
            .remove(name)
            .ok_or_else(|| problem("missing".to_string()))?;
        if t.shape != shape {
            return Err(problem(format!("shape {:?}, expected {shape:?}", t.shape)));
        }
        if t.values.len() != shape.iter().product::<usize>() {
            return Err(problem("not a floating-point tensor".to_string()));
        }
        if let Some(v) = t.values.iter().find(|v| !v.is_finite()) {
            return Err(problem(format!(
                "holds {}: refusing weights that are not finite",
                if v.is_nan() { "NaN" } else { "an infinity" }
            )));
        }
        Ok(t.values)
    }

    /// Convolution `conv` (`[cout, cin/groups, k, k]`) followed by BatchNorm `bn`, folded:
    /// the scaled weight and the bias.
    fn conv_bn(
        &mut self,
        conv: &str,
        bn: &str,
        shape: [usize; 4],
    ) -> Result<(Vec<f32>, Vec<f32>), LoadError> {
        let mut w = self.take(&format!("{conv}.weight"), &shape)?;
        let c = [shape[0]];
        let gamma = self.take(&format!("{bn}.weight"), &c)?;
        let beta = self.take(&format!("{bn}.bias"), &c)?;
        let mean = self.take(&format!("{bn}.running_mean"), &c)?;
        let var = self.take(&format!("{bn}.running_var"), &c)?;
        self.map.remove(&format!("{bn}.num_batches_tracked"));
        let per = w.len() / shape[0];
        let mut bias = vec![0.0; shape[0]];
        for co in 0..shape[0] {
            let scale = gamma[co] as f64 / (var[co] as f64 + BN_EPS).sqrt();
            for v in &mut w[co * per..(co + 1) * per] {
                *v = (*v as f64 * scale) as f32;
            }
            bias[co] = (beta[co] as f64 - mean[co] as f64 * scale) as f32;
        }
        Ok((w, bias))
    }

    /// A 1x1 convolution with folded BatchNorm.
    fn pointwise(
        &mut self,
        conv: &str,
        bn: &str,
        cin: usize,
        cout: usize,
    ) -> Result<FoldedConv, LoadError> {
        self.folded(conv, bn, [cout, cin, 1, 1])
    }

    fn folded(&mut self, conv: &str, bn: &str, shape: [usize; 4]) -> Result<FoldedConv, LoadError> {
        let (weight, bias) = self.conv_bn(conv, bn, shape)?;
        Ok(FoldedConv {
            weight,
            bias,
            shape,
        })
    }
}

/// A convolution with BatchNorm folded in, in PyTorch's layout: `weight` is
/// `[cout][cin / groups][k][k]`.
#[derive(Debug, Clone)]
pub struct FoldedConv {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub shape: [usize; 4],
}

impl FoldedConv {
    /// The engine's 1x1 convolution.
    fn pointwise(&self, e: Epilogue) -> Conv {
        Conv::new(&self.weight, &self.bias, self.shape, [1, 1], [0, 0]).with_epilogue(e)
    }
}

/// One MBConv block's folded weights: what the engine packs and what fine-tuning trains.
#[derive(Debug, Clone)]
pub struct FoldedBlock {
    pub layout: BlockLayout,
    /// Absent when the expand ratio is 1.
    pub expand: Option<FoldedConv>,
    pub depthwise: FoldedConv,
    pub project: FoldedConv,
}

impl FoldedBlock {
    fn load(t: &mut Tensors, i: usize, b: &BlockLayout) -> Result<Self, LoadError> {
        let p = format!("_blocks.{i}");
        let expand = if b.mid != b.cin {
            Some(t.pointwise(
                &format!("{p}._expand_conv"),
                &format!("{p}._bn0"),
                b.cin,
                b.mid,
            )?)
        } else {
            None
        };
        let depthwise = t.folded(
            &format!("{p}._depthwise_conv"),
            &format!("{p}._bn1"),
            [b.mid, 1, b.kernel, b.kernel],
        )?;
        let project = t.pointwise(
            &format!("{p}._project_conv"),
            &format!("{p}._bn2"),
            b.mid,
            b.cout,
        )?;
        Ok(Self {
            layout: *b,
            expand,
            depthwise,
            project,
        })
    }
}

/// Every weight of an EfficientNet-Lite file, BatchNorm folded, checked against its layout:
/// the engine packs it ([`EfficientNetLite::from_folded`]), fine-tuning trains part of it.
#[derive(Debug, Clone)]
pub struct FoldedLite {
    pub spec: &'static LiteSpec,
    pub stem: FoldedConv,
    pub blocks: Vec<FoldedBlock>,
    /// The 1x1 head convolution (ReLU6 after it).
    pub head: FoldedConv,
    /// The ImageNet classifier (`[1000][1280]` weights, 1000 biases), when the file has one.
    pub fc: Option<(Vec<f32>, Vec<f32>)>,
}

impl FoldedLite {
    /// Reads a `.pth` state dict (zip or legacy pickle) or a safetensors file with the
    /// lukemelas-style names (`_conv_stem.weight`, `_blocks.N._depthwise_conv.weight`, ...).
    /// The size is recognised from the file; `expected` (a [`LiteSpec::name`]) makes any
    /// other size an error.
    pub fn load(path: &Path, expected: Option<&str>) -> Result<Self, LoadError> {
        let shown = path.display().to_string();
        let map = read_tensors(path)?;
        let spec = identify(&map).map_err(|found| LoadError::WrongNetwork {
            path: shown.clone(),
            expected: expected
                .unwrap_or("EfficientNet-Lite0 or -Lite2")
                .to_string(),
            found,
        })?;
        if let Some(want) = expected.filter(|w| *w != spec.name) {
            return Err(LoadError::WrongNetwork {
                path: shown,
                expected: want.to_string(),
                found: format!("{} weights", spec.name),
            });
        }
        let mut t = Tensors { path: shown, map };
        let stem = t.folded("_conv_stem", "_bn0", [STEM, 3, 3, 3])?;
        let layout = spec.blocks();
        let blocks = layout
            .iter()
            .enumerate()
            .map(|(i, b)| FoldedBlock::load(&mut t, i, b))
            .collect::<Result<Vec<_>, _>>()?;
        let last = layout.last().expect("blocks").cout;
        let head = t.pointwise("_conv_head", "_bn1", last, HEAD)?;
        let fc = if t.map.contains_key("_fc.weight") {
            let w = t.take("_fc.weight", &[1000, HEAD])?;
            let b = t.take("_fc.bias", &[1000])?;
            Some((w, b))
        } else {
            None
        };
        let mut unexpected: Vec<String> = t
            .map
            .into_keys()
            .filter(|n| !n.ends_with(".num_batches_tracked"))
            .collect();
        if !unexpected.is_empty() {
            unexpected.truncate(10);
            return Err(LoadError::Unexpected {
                path: t.path,
                network: spec.name,
                names: unexpected,
            });
        }
        Ok(Self {
            spec,
            stem,
            blocks,
            head,
            fc,
        })
    }
}

/// An MBConv block (no squeeze-and-excitation in the Lite variants) on the engine.
fn mbconv(f: &FoldedBlock) -> InvertedResidual {
    let b = &f.layout;
    let d = &f.depthwise;
    InvertedResidual::new(
        f.expand.as_ref().map(|e| e.pointwise(Epilogue::BiasRelu6)),
        DepthwiseConv::new(
            &d.weight,
            &d.bias,
            b.mid,
            b.kernel,
            b.stride,
            Epilogue::BiasRelu6,
        ),
        f.project.pointwise(Epilogue::Bias),
        b.residual(),
    )
}

/// Images run through the whole network together: a batch is cut into passes of this many so
/// that activations stay small (and in cache) whatever the batch size; several images still
/// give the 7x7 (9x9) layers' GEMMs enough rows.
const IMAGES_PER_PASS: usize = 4;

/// EfficientNet-Lite with BatchNorm folded, NHWC on the CPU.
pub struct EfficientNetLite {
    pub spec: &'static LiteSpec,
    stem: Conv,
    blocks: Vec<InvertedResidual>,
    head: Conv,
    /// The ImageNet classifier over the pooled head, one image at a time (as a GEMM over
    /// several rows an image's logits would depend on its batch).
    fc: Option<Linear>,
}

/// Every golden stage, NCHW (or `[n][c]`), in the reference's names.
pub struct LiteStages {
    /// (`block{N}`, output of the stage ending at block N), first stage first.
    pub blocks: Vec<(String, Vec<f32>)>,
    pub head: Vec<f32>,
    pub pool: Vec<f32>,
    pub logits: Option<Vec<f32>>,
    pub probs: Option<Vec<f32>>,
}

impl EfficientNetLite {
    /// Loads a `.pth` state dict (zip or legacy pickle) or a safetensors file with the
    /// lukemelas-style names (`_conv_stem.weight`, `_blocks.N._depthwise_conv.weight`, ...).
    /// The size is recognised from the file; `expected` (a [`LiteSpec::name`]) makes any
    /// other size an error.
    pub fn load(path: &Path, expected: Option<&str>) -> Result<Self, LoadError> {
        Ok(Self::from_folded(&FoldedLite::load(path, expected)?))
    }

    /// The engine's network from folded weights.
    pub fn from_folded(f: &FoldedLite) -> Self {
        let stem = Conv::new(&f.stem.weight, &f.stem.bias, f.stem.shape, [2, 2], [0, 0])
            .with_tf_same()
            .with_epilogue(Epilogue::BiasRelu6);
        let fc =
            f.fc.as_ref()
                .map(|(w, b)| Linear::new(w.clone(), b.clone(), 1000, HEAD, false));
        Self {
            spec: f.spec,
            stem,
            blocks: f.blocks.iter().map(mbconv).collect(),
            head: f.head.pointwise(Epilogue::BiasRelu6),
            fc,
        }
    }

    /// Whether the file carried the 1000-class ImageNet classifier (`_fc`).
    pub fn has_classifier(&self) -> bool {
        self.fc.is_some()
    }

    /// Runs `n` preprocessed images (`pixels`: NCHW, `3 x size x size` each) up to `layer`;
    /// the result is NHWC.
    pub fn forward_act(&self, pixels: &[f32], n: usize, layer: LiteLayer) -> Act {
        let s = self.spec.size;
        let image = 3 * s * s;
        assert_eq!(pixels.len(), n * image, "expected {n} images of 3x{s}x{s}");
        let last = match layer {
            LiteLayer::Stage(i) => self.spec.stage_ends()[i],
            LiteLayer::Head => self.blocks.len() - 1,
        };
        let mut out: Option<Act> = None;
        let mut done = 0;
        for part in pixels.chunks(IMAGES_PER_PASS * image) {
            let k = part.len() / image;
            let mut x = self.stem.forward(&Act::from_nchw(part, k, 3, s, s), 0);
            for b in &self.blocks[..=last] {
                x = b.forward(&x);
            }
            if layer == LiteLayer::Head {
                x = self.head.forward(&x, 0);
            }
            let out = out.get_or_insert_with(|| Act::new(n, x.h, x.w, x.c));
            let per_image = x.data.len() / k;
            out.data[done * per_image..(done + k) * per_image].copy_from_slice(&x.data);
            done += k;
        }
        out.expect("at least one image")
    }

    /// Logits of the ImageNet classifier for `n` pooled head vectors (`[n][1280]`), or `None`
    /// without one.
    pub fn logits(&self, pooled: &[f32], n: usize) -> Option<Vec<f32>> {
        Some(self.fc.as_ref()?.forward(pooled, n))
    }

    /// Class probabilities (softmax of [`Self::logits`]) for `n` preprocessed images.
    pub fn classify(&self, pixels: &[f32], n: usize) -> Option<Vec<f32>> {
        self.fc.as_ref()?;
        let pooled = batch_split::run_images(pixels, n, |part, k| {
            self.forward_act(part, k, LiteLayer::Head).global_avg()
        });
        let mut logits = self.logits(&pooled, n)?;
        softmax_rows(&mut logits, 1000);
        Some(logits)
    }

    /// Every stage at once (for comparing against reference activations), NCHW.
    pub fn forward_stages(&self, pixels: &[f32], n: usize) -> LiteStages {
        let s = self.spec.size;
        let mut x = self.stem.forward(&Act::from_nchw(pixels, n, 3, s, s), 0);
        let ends = self.spec.stage_ends();
        let mut blocks = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(&x);
            if ends.contains(&i) {
                blocks.push((format!("block{i}"), x.to_nchw()));
            }
        }
        let head = self.head.forward(&x, 0);
        let pool = head.global_avg();
        let logits = self.logits(&pool, n);
        let probs = logits.clone().map(|mut l| {
            softmax_rows(&mut l, 1000);
            l
        });
        LiteStages {
            blocks,
            head: head.to_nchw(),
            pool,
            logits,
            probs,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The seam: one row of `crate::backbones::NETWORKS` per size.

use crate::backbones::{LayerShape, LayerSpec, Network, Pool, Spec, weight_file::WeightIndex};

/// True when `index` holds this size's tensors: the lukemelas names, no squeeze-and-excitation,
/// and this size's block count (Lite0 16, Lite2 21).
fn recognises(index: &WeightIndex, spec: &LiteSpec) -> bool {
    if !index.has("_conv_stem.weight") || index.any_contains("._se_reduce.") {
        return false;
    }
    let blocks = spec.blocks().len();
    index.has(&format!("_blocks.{}._project_conv.weight", blocks - 1))
        && !index.has(&format!("_blocks.{blocks}._project_conv.weight"))
}

const fn layer(name: &'static str, shape: [usize; 3]) -> LayerSpec {
    LayerSpec {
        name,
        shape: Some(shape),
    }
}

pub static LITE0_SPEC: Spec = Spec {
    name: "efficientnet_lite0",
    title: "EfficientNet-Lite0",
    help: "EfficientNet-Lite0 (ImageNet, 224x224, 4.7M parameters; CPU engine only)",
    input: [224, 224],
    preprocess: |variant| (variant == "224").then(|| LITE0.preprocess()),
    layers: &[
        layer("block0", [16, 112, 112]),
        layer("block2", [24, 56, 56]),
        layer("block4", [40, 28, 28]),
        layer("block7", [80, 14, 14]),
        layer("block10", [112, 14, 14]),
        layer("block14", [192, 7, 7]),
        layer("block15", [320, 7, 7]),
        layer("head", [1280, 7, 7]),
    ],
    default_layer: "head",
    variants: &[],
    recognise: |index| recognises(index, &LITE0),
    files: &["efficientnet-lite0-57934424.pth"],
    registry_entry: "efficientnet_lite0",
    gpu: false,
    load: |path, opts| load_network(path, opts, &LITE0),
};

pub static LITE2_SPEC: Spec = Spec {
    name: "efficientnet_lite2",
    title: "EfficientNet-Lite2",
    help: "EfficientNet-Lite2 (ImageNet, 260x260, 6.1M parameters; CPU engine only)",
    input: [260, 260],
    preprocess: |variant| (variant == "260").then(|| LITE2.preprocess()),
    layers: &[
        layer("block0", [16, 130, 130]),
        layer("block3", [24, 65, 65]),
        layer("block6", [48, 33, 33]),
        layer("block10", [88, 17, 17]),
        layer("block14", [120, 17, 17]),
        layer("block19", [208, 9, 9]),
        layer("block20", [352, 9, 9]),
        layer("head", [1280, 9, 9]),
    ],
    default_layer: "head",
    variants: &[],
    recognise: |index| recognises(index, &LITE2),
    files: &["efficientnet-lite2-9656183e.pth"],
    registry_entry: "efficientnet_lite2",
    gpu: false,
    load: |path, opts| load_network(path, opts, &LITE2),
};

fn load_network(
    path: &Path,
    opts: &crate::backbones::LoadOptions,
    spec: &'static LiteSpec,
) -> Result<Box<dyn Network>, crate::backbones::LoadError> {
    let table = table_row(spec);
    opts.refuse_variant(path, table.title)?;
    Ok(Box::new(EfficientNetLite::load(path, Some(spec.name))?))
}

fn table_row(spec: &LiteSpec) -> &'static Spec {
    if spec == &LITE0 {
        &LITE0_SPEC
    } else {
        &LITE2_SPEC
    }
}

impl Network for EfficientNetLite {
    fn spec(&self) -> &'static Spec {
        table_row(self.spec)
    }

    /// `efficientnet_lite0/224`: the size's name, then its input side.
    fn provenance(&self) -> String {
        format!("{}/{}", self.spec.name, self.spec.size)
    }

    fn preprocess(&self) -> crate::image_io::Preprocess {
        self.spec.preprocess()
    }

    fn layers(&self) -> Vec<String> {
        self.spec.layer_names()
    }

    fn layer_shape(&self, layer: &str) -> Option<LayerShape> {
        let layer = self.spec.layer(layer).ok()?;
        Some(LayerShape::Map(self.spec.layer_shape(layer)))
    }

    fn features(&self, pixels: &[f32], n: usize, layer: &str, pool: Pool) -> Vec<f32> {
        let layer = self
            .spec
            .layer(layer)
            .unwrap_or_else(|e| panic!("features of an unchecked layer: {e}"));
        batch_split::run_images(pixels, n, |part, k| {
            crate::backbones::engine_pool(&self.forward_act(part, k, layer), pool)
        })
    }

    fn num_classes(&self) -> Option<usize> {
        self.has_classifier().then_some(1000)
    }

    fn classify(&self, pixels: &[f32], n: usize) -> Option<Vec<f32>> {
        EfficientNetLite::classify(self, pixels, n)
    }
}

/// Softmax of each row of `cols` values, in place (max subtracted first).
fn softmax_rows(x: &mut [f32], cols: usize) {
    for row in x.chunks_mut(cols) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        let mut sum = 0.0f64;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v as f64;
        }
        for v in row.iter_mut() {
            *v = (*v as f64 / sum) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layouts Google's code derives (checked against the shared weight files' shapes by
    /// the parity test): block count, stage ends, widths.
    #[test]
    fn layouts_follow_from_b0_and_the_coefficients() {
        assert_eq!(LITE0.blocks().len(), 16);
        assert_eq!(LITE0.stage_ends(), vec![0, 2, 4, 7, 10, 14, 15]);
        assert_eq!(LITE2.blocks().len(), 21);
        assert_eq!(LITE2.stage_ends(), vec![0, 3, 6, 10, 14, 19, 20]);
        let widths = |s: &LiteSpec| -> Vec<usize> {
            s.stage_ends().iter().map(|&i| s.blocks()[i].cout).collect()
        };
        assert_eq!(widths(&LITE0), vec![16, 24, 40, 80, 112, 192, 320]);
        assert_eq!(widths(&LITE2), vec![16, 24, 48, 88, 120, 208, 352]);
        // Lite2's first block reads the unscaled 32-channel stem, without expansion.
        let b0 = LITE2.blocks()[0];
        assert_eq!((b0.cin, b0.mid, b0.cout), (32, 32, 16));
        // The second stage's first block: 16 in, expanded 6x, stride 2, no residual.
        let b1 = LITE2.blocks()[1];
        assert_eq!(
            (b1.cin, b1.mid, b1.stride, b1.residual()),
            (16, 96, 2, false)
        );
        assert!(LITE2.blocks()[2].residual());
        assert_eq!(LITE2.layer_shape(LiteLayer::Stage(2)), [48, 33, 33]);
        assert_eq!(LITE2.layer_shape(LiteLayer::Head), [1280, 9, 9]);
        assert_eq!(LITE0.layer_shape(LiteLayer::Stage(0)), [16, 112, 112]);
    }

    #[test]
    fn unknown_layer_lists_the_valid_ones() {
        let err = LITE0.layer("mixed_7c").unwrap_err();
        assert!(
            err.contains("block0, block2, block4, block7, block10, block14, block15, head"),
            "{err}"
        );
        assert_eq!(LITE2.layer("block19"), Ok(LiteLayer::Stage(5)));
        assert_eq!(LITE2.layer("head"), Ok(LiteLayer::Head));
    }

    #[test]
    fn half_precision_values_convert() {
        use burn::tensor::DType;
        let f16: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(floats(&f16, DType::F16, 2).unwrap(), vec![1.5, -2.0]);
        let bf16: Vec<u8> = [0.25f32, 3.0]
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(floats(&bf16, DType::BF16, 2).unwrap(), vec![0.25, 3.0]);
        assert!(floats(&bf16, DType::F16, 3).is_err(), "length is checked");
    }
}
