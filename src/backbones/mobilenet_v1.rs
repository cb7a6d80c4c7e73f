//! MobileNet v1 (Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile
//! Vision Applications", 2017) as a burn module, loaded from a TensorFlow.js *layers* export
//! (`model.json` plus binary weight shards) of Keras' `MobileNet`.
//!
//! The network is built from the Keras topology in `model.json` rather than from a fixed table,
//! so every published width (alpha 0.25 ... 1.0) and resolution loads through the same code, and
//! both Keras generations work: 2.1 exports use `'same'` padding on the stride-2 convolutions,
//! later ones an explicit `ZeroPadding2D(((0, 1), (0, 1)))` followed by a `'valid'` convolution.
//! Both pad one pixel at the bottom and right only, which a symmetric padding would get wrong.
//!
//! As in [`crate::inception_v3`], every BatchNorm is folded into the convolution before it at
//! load, so inference runs one convolution (with bias) and a ReLU6 per layer.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Input sides a model.json may declare: five stride-2 layers need at least 32 pixels, and
/// beyond 2048 (12 MB of floats per image) a typo is likelier than a real model.
const INPUT_SIZES: std::ops::RangeInclusive<usize> = 32..=2048;

/// Architecture of one MobileNet v1 export, as read from its `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MobileNetV1Config {
    /// Width multiplier: `conv1` has `32 * alpha` filters, the last block `1024 * alpha`.
    pub alpha: f64,
    /// Side of the square input the model declares (128, 160, 192 or 224 for the published
    /// weights). `'same'` padding adapts to other sizes, but accuracy is only known here.
    pub input_size: usize,
    /// Classes of `conv_preds`; `None` when the export stops at the pooled features
    /// (`include_top=False`).
    pub num_classes: Option<usize>,
    /// BatchNorm epsilon from the layer configs (Keras' MobileNet uses 1e-3).
    pub bn_eps: f64,
    /// Width of [`MobileNetV1::forward_features`]'s output (`1024 * alpha`).
    pub feature_dim: usize,
    /// Side of the last feature map, `conv_pw_13_relu` (7 at 224x224).
    pub map_size: usize,
}

impl MobileNetV1Config {
    /// The input Keras' MobileNet expects: RGB at the declared size, scaled to [-1, 1]
    /// (`x / 127.5 - 1`, `keras.applications.mobilenet.preprocess_input`).
    pub fn preprocess(&self) -> crate::image_io::Preprocess {
        crate::image_io::Preprocess {
            width: self.input_size as u32,
            height: self.input_size as u32,
            mean: [127.5; 3],
            std: [127.5; 3],
            resize: crate::image_io::Resize::Stretch,
            channels: crate::image_io::ChannelOrder::Rgb,
        }
    }
}

/// One convolution (standard or depthwise) with its BatchNorm folded in, then ReLU6.
#[derive(Module, Debug)]
pub struct ConvBlock {
    pub conv: Conv2d,
}

impl ConvBlock {
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(x).clamp(0.0, 6.0)
    }
}

/// MobileNet v1: 27 convolution blocks (`conv1`, then `conv_dw_N` / `conv_pw_N` pairs), global
/// average pooling and the `conv_preds` classifier.
#[derive(Module, Debug)]
pub struct MobileNetV1 {
    pub blocks: Vec<ConvBlock>,
    /// `conv_preds`: a 1x1 convolution on the pooled 1x1 map, i.e. a linear layer.
    pub classifier: Option<Linear>,
}

impl MobileNetV1 {
    /// Preprocessed `[N, 3, H, W]` batch -> `[N, 1024 * alpha]`: the global average of
    /// `conv_pw_13_relu`.
    pub fn forward_features(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.forward_map(x);
        let [n, c, _, _] = x.dims();
        x.mean_dim(3).mean_dim(2).reshape([n, c])
    }

    /// Preprocessed `[N, 3, H, W]` batch -> `conv_pw_13_relu`, the last feature map before the
    /// global pool: `[N, 1024 * alpha, map_size, map_size]`.
    pub fn forward_map(&self, x: Tensor<4>) -> Tensor<4> {
        self.blocks.iter().fold(x, |x, b| b.forward(x))
    }

    pub fn has_classifier(&self) -> bool {
        self.classifier.is_some()
    }

    /// ImageNet class probabilities (softmax) `[N, classes]` from pooled features, when the
    /// export carries `conv_preds`. Dropout before it is the identity at inference.
    pub fn classify(&self, pooled: Tensor<2>) -> Option<Tensor<2>> {
        self.classifier
            .as_ref()
            .map(|fc| softmax(fc.forward(pooled), 1))
    }
}

/// A TF.js export could not become a [`MobileNetV1`]. Each message is one line and names the file
/// (or the tensor) at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{path}: unsupported MobileNet v1 topology: {message}")]
    Topology { path: String, message: String },
    #[error("{path}: missing tensor(s): {}", names.join(", "))]
    Missing { path: String, names: Vec<String> },
    #[error("{path}: {}", problems.join("; "))]
    Mismatch { path: String, problems: Vec<String> },
}

/// Reads `model.json`, its weight shards and builds the network with BatchNorm folded in.
pub fn load(
    model_json: &Path,
    device: &Device,
) -> Result<(MobileNetV1, MobileNetV1Config), LoadError> {
    let shown = model_json.display().to_string();
    let bytes = std::fs::read(model_json).map_err(|e| LoadError::Read {
        path: shown.clone(),
        message: e.to_string(),
    })?;
    let text = String::from_utf8(bytes).map_err(|_| LoadError::Read {
        path: shown.clone(),
        message: "not a TF.js model.json (binary data, not JSON text)".into(),
    })?;
    let json: Value = serde_json::from_str(&text).map_err(|e| LoadError::Read {
        path: shown.clone(),
        message: format!("not valid JSON: {e}"),
    })?;
    let topo = |message: String| LoadError::Topology {
        path: shown.clone(),
        message,
    };
    let layers = keras_layers(&json).map_err(topo)?;
    let plan = plan(layers).map_err(topo)?;
    let dir = model_json.parent().unwrap_or(Path::new("."));
    let tensors = read_weights(&json, dir, &shown)?;

    let mut ctx = Weights {
        tensors,
        missing: Vec::new(),
        problems: Vec::new(),
    };
    let mut cin = plan.input_channels;
    let mut blocks = Vec::new();
    for spec in &plan.convs {
        if let Some(block) = ctx.conv_block(spec, cin, device) {
            blocks.push(block);
        }
        cin = match spec.kind {
            ConvKind::Standard { filters } => filters,
            ConvKind::Depthwise { multiplier } => cin * multiplier,
        };
    }
    let classifier = plan
        .classifier
        .as_ref()
        .and_then(|c| ctx.classifier(c, cin, device));

    if !ctx.missing.is_empty() {
        return Err(LoadError::Missing {
            path: shown,
            names: ctx.missing,
        });
    }
    if !ctx.problems.is_empty() {
        return Err(LoadError::Mismatch {
            path: shown,
            problems: ctx.problems,
        });
    }
    let first_filters = match plan.convs.first().map(|c| c.kind) {
        Some(ConvKind::Standard { filters }) => filters,
        _ => return Err(topo("the first layer is not a standard convolution".into())),
    };
    let map_size = plan.convs.iter().fold(plan.input_size, |size, c| {
        let (k, s) = (c.kernel[0], c.stride[0]);
        match c.padding {
            PaddingConfig2d::Same => size.div_ceil(s),
            PaddingConfig2d::Explicit(t, _, b, _) => (size + t + b).saturating_sub(k) / s + 1,
            _ => size.saturating_sub(k) / s + 1,
        }
    });
    let config = MobileNetV1Config {
        alpha: first_filters as f64 / 32.0,
        input_size: plan.input_size,
        num_classes: plan.classifier.as_ref().map(|c| c.classes),
        bn_eps: plan.convs.iter().map(|c| c.bn.eps).fold(0.0, f64::max),
        feature_dim: cin,
        map_size,
    };
    Ok((MobileNetV1 { blocks, classifier }, config))
}

/// The Keras layer list, wherever this converter version put it.
fn keras_layers(json: &Value) -> Result<&Vec<Value>, String> {
    let topology = json
        .get("modelTopology")
        .ok_or("no 'modelTopology' (is this a TF.js layers model?)")?;
    let model = topology
        .get("model_config")
        .or_else(|| topology.get("config").map(|_| topology))
        .ok_or("no 'modelTopology.model_config'")?;
    model
        .get("config")
        .and_then(|c| c.get("layers"))
        .and_then(Value::as_array)
        .ok_or_else(|| "no layer list in the model config".to_string())
}

#[derive(Debug, Clone, Copy)]
enum ConvKind {
    Standard { filters: usize },
    Depthwise { multiplier: usize },
}

#[derive(Debug, Clone)]
struct BnSpec {
    name: String,
    eps: f64,
    center: bool,
    scale: bool,
}

#[derive(Debug)]
struct ConvSpec {
    name: String,
    kind: ConvKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: PaddingConfig2d,
    use_bias: bool,
    bn: BnSpec,
}

#[derive(Debug)]
struct ClassifierSpec {
    name: String,
    /// A `Dense` head stores `[in, classes]` where `conv_preds` stores `[1, 1, in, classes]`.
    dense: bool,
    classes: usize,
    use_bias: bool,
}

struct Plan {
    input_size: usize,
    input_channels: usize,
    convs: Vec<ConvSpec>,
    classifier: Option<ClassifierSpec>,
}

/// Conv (+ optional preceding zero padding), BatchNorm, ReLU6, repeated up to the global pool;
/// then an optional 1x1-conv (or dense) classifier with softmax. Anything else is refused rather
/// than silently skipped, so a different network cannot load as a wrong MobileNet.
fn plan(layers: &[Value]) -> Result<Plan, String> {
    // Conv layers before their BatchNorm arrives: (name, kind, kernel, stride, padding, bias).
    struct Pending {
        name: String,
        kind: ConvKind,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: PaddingConfig2d,
        use_bias: bool,
        bn: Option<BnSpec>,
        relu6: bool,
    }
    let mut input: Option<(usize, usize)> = None;
    let mut pad: Option<[usize; 4]> = None;
    let mut pending: Vec<Pending> = Vec::new();
    let mut pooled = false;
    let mut classifier: Option<ClassifierSpec> = None;
    let mut softmax_seen = false;

    for layer in layers {
        let class = layer["class_name"].as_str().unwrap_or("");
        let cfg = &layer["config"];
        let name = cfg["name"]
            .as_str()
            .or_else(|| layer["name"].as_str())
            .unwrap_or("")
            .to_string();
        let at = |m: &str| format!("layer '{name}' ({class}): {m}");
        match class {
            "InputLayer" => {
                let shape = cfg["batch_input_shape"]
                    .as_array()
                    .or_else(|| cfg["batch_shape"].as_array())
                    .ok_or_else(|| at("no batch_input_shape"))?;
                let dim = |i: usize| shape.get(i).and_then(Value::as_u64).map(|v| v as usize);
                // Exports with a free spatial size run at the size the weights were trained for.
                let size = dim(1).unwrap_or(224);
                if let Some(w) = dim(2).filter(|&w| w != size) {
                    return Err(at(&format!(
                        "input is {size}x{w}: only square inputs are supported"
                    )));
                }
                if !INPUT_SIZES.contains(&size) {
                    return Err(at(&format!(
                        "input size {size} is outside {}..={} pixels",
                        INPUT_SIZES.start(),
                        INPUT_SIZES.end()
                    )));
                }
                let channels = dim(3).ok_or_else(|| at("input channels are not channels-last"))?;
                if channels != 3 {
                    return Err(at(&format!("{channels} input channels, expected 3 (RGB)")));
                }
                input = Some((size, channels));
            }
            "ZeroPadding2D" => {
                let [t, b, l, r] = zero_padding(&cfg["padding"]).ok_or_else(|| at("padding"))?;
                let prev = pad.unwrap_or([0; 4]);
                pad = Some([prev[0] + t, prev[1] + b, prev[2] + l, prev[3] + r]);
            }
            "Conv2D" | "DepthwiseConv2D" if !pooled => {
                if cfg["data_format"]
                    .as_str()
                    .is_some_and(|f| f != "channels_last")
                {
                    return Err(at("only channels_last is supported"));
                }
                if pairs(&cfg["dilation_rate"]).is_some_and(|d| d != [1, 1]) {
                    return Err(at("dilated convolutions are not supported"));
                }
                if cfg["activation"].as_str().is_some_and(|a| a != "linear") {
                    return Err(at("a fused activation other than linear"));
                }
                let kernel = pairs(&cfg["kernel_size"]).ok_or_else(|| at("kernel_size"))?;
                let stride = pairs(&cfg["strides"]).unwrap_or([1, 1]);
                let padding = match (cfg["padding"].as_str(), pad.take()) {
                    // burn's `Same` is TF's: the odd pixel of padding goes bottom/right.
                    (Some("same"), None) => PaddingConfig2d::Same,
                    (Some("valid"), None) => PaddingConfig2d::Valid,
                    (Some("valid"), Some([t, b, l, r])) => PaddingConfig2d::Explicit(t, l, b, r),
                    _ => return Err(at("unsupported padding")),
                };
                let kind = if class == "Conv2D" {
                    ConvKind::Standard {
                        filters: cfg["filters"].as_u64().ok_or_else(|| at("no filters"))? as usize,
                    }
                } else {
                    ConvKind::Depthwise {
                        multiplier: cfg["depth_multiplier"].as_u64().unwrap_or(1) as usize,
                    }
                };
                pending.push(Pending {
                    name,
                    kind,
                    kernel,
                    stride,
                    padding,
                    use_bias: cfg["use_bias"].as_bool().unwrap_or(true),
                    bn: None,
                    relu6: false,
                });
            }
            "BatchNormalization" => {
                let last = pending
                    .last_mut()
                    .filter(|p| p.bn.is_none() && !p.relu6)
                    .ok_or_else(|| at("does not follow a convolution"))?;
                last.bn = Some(BnSpec {
                    name,
                    eps: cfg["epsilon"].as_f64().unwrap_or(1e-3),
                    center: cfg["center"].as_bool().unwrap_or(true),
                    scale: cfg["scale"].as_bool().unwrap_or(true),
                });
            }
            // Keras 2.1 writes `Activation('relu6')`, later versions `ReLU(6.)`.
            "Activation" | "ReLU" if !pooled => {
                let relu6 = match class {
                    "Activation" => cfg["activation"].as_str() == Some("relu6"),
                    _ => cfg["max_value"].as_f64() == Some(6.0),
                };
                let last = pending
                    .last_mut()
                    .filter(|p| relu6 && p.bn.is_some() && !p.relu6)
                    .ok_or_else(|| at("expected ReLU6 right after a BatchNorm"))?;
                last.relu6 = true;
            }
            "GlobalAveragePooling2D" => pooled = true,
            // Shape bookkeeping and an inference no-op.
            "Reshape" | "Dropout" | "Flatten" if pooled => {}
            "Conv2D" | "Dense" if pooled && classifier.is_none() => {
                if class == "Conv2D" && pairs(&cfg["kernel_size"]) != Some([1, 1]) {
                    return Err(at("the classifier must be a 1x1 convolution"));
                }
                let classes = cfg["filters"]
                    .as_u64()
                    .or_else(|| cfg["units"].as_u64())
                    .ok_or_else(|| at("no filters"))?;
                let activation = cfg["activation"].as_str().unwrap_or("linear");
                softmax_seen = activation == "softmax";
                if !softmax_seen && activation != "linear" {
                    return Err(at("classifier activation must be linear or softmax"));
                }
                classifier = Some(ClassifierSpec {
                    name,
                    dense: class == "Dense",
                    classes: classes as usize,
                    use_bias: cfg["use_bias"].as_bool().unwrap_or(true),
                });
            }
            "Activation" | "Softmax" if classifier.is_some() && !softmax_seen => {
                if class == "Activation" && cfg["activation"].as_str() != Some("softmax") {
                    return Err(at("expected softmax after the classifier"));
                }
                softmax_seen = true;
            }
            _ => return Err(at("unexpected layer")),
        }
    }

    let (input_size, input_channels) = input.ok_or("no InputLayer")?;
    if !pooled {
        return Err("no GlobalAveragePooling2D".into());
    }
    if classifier.is_some() && !softmax_seen {
        // `classify` promises probabilities; a logits-only head would need a different API.
        return Err("the classifier is not followed by a softmax".into());
    }
    let mut convs = Vec::new();
    for p in pending {
        let (Some(bn), true) = (p.bn, p.relu6) else {
            return Err(format!("layer '{}' lacks its BatchNorm + ReLU6", p.name));
        };
        convs.push(ConvSpec {
            name: p.name,
            kind: p.kind,
            kernel: p.kernel,
            stride: p.stride,
            padding: p.padding,
            use_bias: p.use_bias,
            bn,
        });
    }
    Ok(Plan {
        input_size,
        input_channels,
        convs,
        classifier,
    })
}

/// `[a, b]` or a single `a` (Keras accepts both for sizes and strides).
fn pairs(v: &Value) -> Option<[usize; 2]> {
    if let Some(n) = v.as_u64() {
        return Some([n as usize; 2]);
    }
    let a = v.as_array()?;
    match a.as_slice() {
        [h, w] => Some([h.as_u64()? as usize, w.as_u64()? as usize]),
        _ => None,
    }
}

/// Keras `ZeroPadding2D.padding` -> `[top, bottom, left, right]`: `p`, `[h, w]` or
/// `[[top, bottom], [left, right]]`.
fn zero_padding(v: &Value) -> Option<[usize; 4]> {
    if let Some([h, w]) = pairs(v) {
        return Some([h, h, w, w]);
    }
    let a = v.as_array()?;
    match a.as_slice() {
        [hw, lr] => {
            let [t, b] = pairs(hw)?;
            let [l, r] = pairs(lr)?;
            Some([t, b, l, r])
        }
        _ => None,
    }
}

type Tensors = HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Decodes every tensor of the `weightsManifest`. Each group's shards are one byte stream cut
/// into files, so they are concatenated before slicing out the tensors in manifest order.
fn read_weights(json: &Value, dir: &Path, shown: &str) -> Result<Tensors, LoadError> {
    let bad = |message: String| LoadError::Read {
        path: shown.to_string(),
        message,
    };
    let groups = json["weightsManifest"]
        .as_array()
        .ok_or_else(|| bad("no 'weightsManifest'".into()))?;
    let mut tensors = Tensors::new();
    for (gi, group) in groups.iter().enumerate() {
        let paths: Vec<PathBuf> = group["paths"]
            .as_array()
            .ok_or_else(|| bad(format!("weightsManifest[{gi}] has no 'paths'")))?
            .iter()
            .map(|p| p.as_str().map(|p| dir.join(p)))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("weightsManifest[{gi}].paths holds a non-string")))?;
        let mut bytes = Vec::new();
        for p in &paths {
            let mut data = std::fs::read(p).map_err(|e| LoadError::Read {
                path: p.display().to_string(),
                message: format!("cannot read weight shard listed in {shown}: {e}"),
            })?;
            bytes.append(&mut data);
        }
        let mut offset = 0usize;
        for entry in group["weights"].as_array().into_iter().flatten() {
            let name = entry["name"].as_str().unwrap_or("").to_string();
            let (shape, len) = entry_shape(entry)
                .ok_or_else(|| bad(format!("weight '{name}' has no valid shape")))?;
            let size = element_size(entry).map_err(|m| bad(format!("weight '{name}': {m}")))?;
            if offset + len * size > bytes.len() {
                let files: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                return Err(LoadError::Read {
                    path: files.join(", "),
                    message: format!(
                        "weight shard too short: {} bytes, but the tensors listed in {shown} \
                         need at least {} (through '{name}')",
                        bytes.len(),
                        offset + len * size
                    ),
                });
            }
            let (values, used) = decode(entry, len, size, &bytes[offset..])
                .map_err(|m| bad(format!("weight '{name}': {m}")))?;
            offset += used;
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "tensor {name} holds {}: refusing weights that are not finite",
                    if v.is_nan() { "NaN" } else { "an infinity" }
                )));
            }
            tensors.insert(name, (shape, values));
        }
    }
    Ok(tensors)
}

fn entry_shape(entry: &Value) -> Option<(Vec<usize>, usize)> {
    let shape: Vec<usize> = entry["shape"]
        .as_array()?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect::<Option<_>>()?;
    let len = shape.iter().product();
    Some((shape, len))
}

/// Bytes per stored element: the quantized type when present, else the tensor's dtype.
fn element_size(entry: &Value) -> Result<usize, String> {
    let q = &entry["quantization"];
    let dtype = q["dtype"].as_str().or_else(|| entry["dtype"].as_str());
    match dtype {
        Some("float32" | "int32") => Ok(4),
        Some("uint16" | "float16") => Ok(2),
        Some("uint8") => Ok(1),
        other => Err(format!("unsupported dtype {other:?}")),
    }
}

/// `len` values from the front of `bytes` (little endian, as TF.js writes them), and how many
/// bytes they took.
fn decode(
    entry: &Value,
    len: usize,
    size: usize,
    bytes: &[u8],
) -> Result<(Vec<f32>, usize), String> {
    let need = len * size;
    let raw = &bytes[..need];
    let q = &entry["quantization"];
    let scale = q["scale"].as_f64().unwrap_or(1.0) as f32;
    let min = q["min"].as_f64().unwrap_or(0.0) as f32;
    let values = match (q["dtype"].as_str(), entry["dtype"].as_str()) {
        (Some("uint8"), _) => raw.iter().map(|&b| b as f32 * scale + min).collect(),
        (Some("uint16"), _) => raw
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as f32 * scale + min)
            .collect(),
        (Some("float16"), _) => raw
            .chunks_exact(2)
            .map(|b| f16_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        (None, Some("int32")) => raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
            .collect(),
        (None, _) => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        (Some(other), _) => return Err(format!("unsupported quantization dtype '{other}'")),
    };
    Ok((values, need))
}

/// IEEE half -> single; the crate has no `half` dependency and this is the only use.
fn f16_to_f32(h: u16) -> f32 {
    let negative = h & 0x8000 != 0;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let magnitude = match exp {
        // Zero and subnormals: frac * 2^-24, exact in f32.
        0 => frac as f32 * 2f32.powi(-24),
        0x1f => f32::from_bits(0x7f80_0000 | (frac << 13)),
        _ => f32::from_bits(((exp + 127 - 15) << 23) | (frac << 13)),
    };
    if negative { -magnitude } else { magnitude }
}

/// The decoded tensors, with every missing or mis-shaped one recorded instead of stopping at
/// the first, so one error lists everything wrong with a file.
struct Weights {
    tensors: Tensors,
    missing: Vec<String>,
    problems: Vec<String>,
}

impl Weights {
    fn take(&mut self, name: &str, expected: &[usize]) -> Option<Vec<f32>> {
        match self.tensors.remove(name) {
            None => {
                self.missing.push(name.to_string());
                None
            }
            Some((shape, _)) if shape != expected => {
                self.problems.push(format!(
                    "tensor '{name}' has shape {shape:?}, expected {expected:?}"
                ));
                None
            }
            Some((_, values)) => Some(values),
        }
    }

    /// Reads a conv and its BatchNorm, Keras HWIO -> burn OIHW, and folds the BatchNorm:
    /// `w' = w * s`, `b' = beta + (b - mean) * s`, `s = gamma / sqrt(var + eps)`.
    fn conv_block(&mut self, spec: &ConvSpec, cin: usize, device: &Device) -> Option<ConvBlock> {
        let [kh, kw] = spec.kernel;
        let (key, hwio, cout, groups) = match spec.kind {
            ConvKind::Standard { filters } => ("kernel", [kh, kw, cin, filters], filters, 1),
            ConvKind::Depthwise { multiplier } => (
                "depthwise_kernel",
                [kh, kw, cin, multiplier],
                cin * multiplier,
                cin,
            ),
        };
        let kernel = self.take(&format!("{}/{key}", spec.name), &hwio);
        let bias = spec
            .use_bias
            .then(|| self.take(&format!("{}/bias", spec.name), &[cout]));
        let bn = &spec.bn;
        let mut bn_param = |p: &str, wanted: bool, default: f32| {
            if wanted {
                self.take(&format!("{}/{p}", bn.name), &[cout])
            } else {
                Some(vec![default; cout])
            }
        };
        let gamma = bn_param("gamma", bn.scale, 1.0);
        let beta = bn_param("beta", bn.center, 0.0);
        let mean = bn_param("moving_mean", true, 0.0);
        let var = bn_param("moving_variance", true, 1.0);
        let (kernel, gamma, beta, mean, var) = (kernel?, gamma?, beta?, mean?, var?);
        let bias = match bias {
            Some(b) => b?,
            None => vec![0.0; cout],
        };

        let scale: Vec<f32> = (0..cout)
            .map(|o| (gamma[o] as f64 / (var[o] as f64 + bn.eps).sqrt()) as f32)
            .collect();
        let folded_bias: Vec<f32> = (0..cout)
            .map(|o| beta[o] + (bias[o] - mean[o]) * scale[o])
            .collect();
        let cin_g = cin / groups;
        let mut weight = vec![0.0f32; cout * cin_g * kh * kw];
        for h in 0..kh {
            for w in 0..kw {
                for i in 0..cin {
                    for j in 0..hwio[3] {
                        let src = kernel[((h * kw + w) * cin + i) * hwio[3] + j];
                        // Depthwise output channel `i * multiplier + j` reads input `i` alone.
                        let (o, ig) = match spec.kind {
                            ConvKind::Standard { .. } => (j, i),
                            ConvKind::Depthwise { multiplier } => (i * multiplier + j, 0),
                        };
                        weight[((o * cin_g + ig) * kh + h) * kw + w] = src * scale[o];
                    }
                }
            }
        }

        let mut conv = Conv2dConfig::new([cin, cout], spec.kernel)
            .with_stride(spec.stride)
            .with_groups(groups)
            .with_padding(spec.padding.clone())
            .with_bias(true)
            // Every parameter is overwritten below: skip the random init.
            .with_initializer(Initializer::Zeros)
            .init(device);
        conv.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(weight, [cout, cin_g, kh, kw]),
            device,
        ));
        conv.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(folded_bias, [cout]),
            device,
        )));
        Some(ConvBlock { conv })
    }

    /// Either kernel layout, flattened, is already burn's `[in, out]` Linear weight.
    fn classifier(&mut self, spec: &ClassifierSpec, cin: usize, device: &Device) -> Option<Linear> {
        let n = spec.classes;
        let shape: &[usize] = if spec.dense {
            &[cin, n]
        } else {
            &[1, 1, cin, n]
        };
        let kernel = self.take(&format!("{}/kernel", spec.name), shape);
        let bias = if spec.use_bias {
            self.take(&format!("{}/bias", spec.name), &[n])
        } else {
            Some(vec![0.0; n])
        };
        let (kernel, bias) = (kernel?, bias?);
        let mut linear = LinearConfig::new(cin, n)
            .with_initializer(Initializer::Zeros)
            .init(device);
        linear.weight =
            Param::from_tensor(Tensor::from_data(TensorData::new(kernel, [cin, n]), device));
        linear.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(bias, [n]),
            device,
        )));
        Some(linear)
    }
}

/// The one layer MobileNet v1 exposes: the last feature map before its global pool.
pub const LAYER: &str = "conv_pw_13_relu";

pub static SPEC: crate::backbones::Spec = crate::backbones::Spec {
    name: "mobilenet_v1",
    title: "MobileNet v1",
    help: "MobileNet v1 (Keras' ImageNet weights as a TF.js model.json), any width and input size",
    input: [224, 224],
    // Provenance `mobilenet_v1/0.25_224`: alpha, then the input side.
    preprocess: |variant| {
        let size: u32 = variant.rsplit_once('_')?.1.parse().ok()?;
        Some(crate::image_io::Preprocess {
            width: size,
            height: size,
            mean: [127.5; 3],
            std: [127.5; 3],
            resize: crate::image_io::Resize::Stretch,
            channels: crate::image_io::ChannelOrder::Rgb,
        })
    },
    layers: &[crate::backbones::LayerSpec {
        name: LAYER,
        shape: None,
    }],
    default_layer: LAYER,
    variants: &[],
    // A TF.js Layers model: its loader reads the topology and says if it is not a MobileNet.
    recognise: |index| index.container == crate::backbones::weight_file::Container::TfjsModel,
    files: &[
        "mobilenet_v1_1.0_224/model.json",
        "mobilenet_v1_0.75_224/model.json",
        "mobilenet_v1_0.50_224/model.json",
        "mobilenet_v1_0.25_224/model.json",
    ],
    registry_entry: "mobilenet_v1_1.0_224",
    gpu: true,
    load: load_network,
};

fn load_network(
    path: &Path,
    opts: &crate::backbones::LoadOptions,
) -> Result<Box<dyn crate::backbones::Network>, crate::backbones::LoadError> {
    opts.refuse_variant(path, SPEC.title)?;
    let (model, config) = load(path, opts.device)?;
    Ok(Box::new(MobileNetNet {
        model,
        config,
        device: opts.device.clone(),
    }))
}

/// A loaded MobileNet v1.
pub struct MobileNetNet {
    model: MobileNetV1,
    config: MobileNetV1Config,
    device: Device,
}

impl MobileNetNet {
    fn input(&self, pixels: &[f32], n: usize) -> Tensor<4> {
        let s = self.config.input_size;
        Tensor::<4>::from_data(TensorData::new(pixels.to_vec(), [n, 3, s, s]), &self.device)
    }
}

impl crate::backbones::Network for MobileNetNet {
    fn spec(&self) -> &'static crate::backbones::Spec {
        &SPEC
    }

    fn provenance(&self) -> String {
        format!(
            "{}/{:.2}_{}",
            SPEC.name, self.config.alpha, self.config.input_size
        )
    }

    fn preprocess(&self) -> crate::image_io::Preprocess {
        self.config.preprocess()
    }

    fn layers(&self) -> Vec<String> {
        vec![LAYER.to_string()]
    }

    fn layer_shape(&self, layer: &str) -> Option<crate::backbones::LayerShape> {
        let c = &self.config;
        (layer == LAYER).then_some(crate::backbones::LayerShape::Map([
            c.feature_dim,
            c.map_size,
            c.map_size,
        ]))
    }

    fn features(
        &self,
        pixels: &[f32],
        n: usize,
        _layer: &str,
        pool: crate::backbones::Pool,
    ) -> Vec<f32> {
        let act = self.model.forward_map(self.input(pixels, n));
        crate::backbones::burn_pool(act, pool, n)
    }

    fn num_classes(&self) -> Option<usize> {
        self.model.classifier.as_ref().map(|fc| fc.weight.dims()[1])
    }

    fn classify(&self, pixels: &[f32], n: usize) -> Option<Vec<f32>> {
        self.model.classifier.as_ref()?;
        let probs = self
            .model
            .classify(self.model.forward_features(self.input(pixels, n)))?;
        Some(
            probs
                .into_data()
                .try_into_vec::<f32>()
                .expect("the network returns f32"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quantized_weights_dequantize_as_q_times_scale_plus_min() {
        let entry = json!({"name": "w", "shape": [3], "dtype": "float32",
            "quantization": {"dtype": "uint8", "scale": 0.5, "min": -1.0}});
        let size = element_size(&entry).unwrap();
        assert_eq!(
            decode(&entry, 3, size, &[0, 2, 255]).unwrap(),
            (vec![-1.0, 0.0, 126.5], 3)
        );
        let entry = json!({"name": "w", "shape": [1], "dtype": "float32",
            "quantization": {"dtype": "uint16", "min": 1.0, "scale": 2.0}});
        assert_eq!(
            decode(&entry, 1, 2, &300u16.to_le_bytes()).unwrap().0,
            vec![601.0]
        );
    }

    #[test]
    fn float16_converts_exactly() {
        for (bits, want) in [
            (0x3c00, 1.0f32),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x0001, 5.960_464_5e-8),
            (0x7bff, 65504.0),
        ] {
            assert_eq!(f16_to_f32(bits), want, "{bits:#06x}");
        }
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    #[test]
    fn zero_padding_accepts_every_keras_form() {
        assert_eq!(zero_padding(&json!(1)), Some([1, 1, 1, 1]));
        assert_eq!(zero_padding(&json!([1, 2])), Some([1, 1, 2, 2]));
        assert_eq!(zero_padding(&json!([[0, 1], [0, 1]])), Some([0, 1, 0, 1]));
    }
}
