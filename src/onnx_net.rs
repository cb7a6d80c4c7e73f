//! Any ONNX image model as a feature extractor, run by tract (pure Rust, no ONNX Runtime).
//!
//! Loading checks what can be checked before the engine sees the graph, so that a bad model
//! costs one clear line instead of an engine backtrace: the file size (and its external data)
//! against a limit, that the bytes are an ONNX protobuf, that every operator is one tract
//! implements (naming the op and the node otherwise), that the one input is a float image tensor
//! (NCHW or NHWC, 3 channels) whose height and width are fixed or given, and that the chosen
//! output has the same size for every image. Optimisation runs under a time limit.
//!
//! Images come in as the rest of dltool makes them, CHW floats back to back; an NHWC model gets
//! them transposed here. The batch dimension stays symbolic when the model declares it so, and
//! a model with a fixed batch is fed batches of exactly that size (padded at the end).

use crate::backbone::Pool;
use crate::image_io::{ChannelOrder, Preprocess, Resize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tract_onnx::pb;
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::{Factoid, InferenceModelExt, ShapeFactoid};
use tract_onnx::tract_hir::internal::DimLike;

/// Default of `--max-model-mb`: the model file plus its external data.
pub const DEFAULT_MAX_MODEL_MB: u64 = 4096;
/// Default of `--max-optimize-secs`.
pub const DEFAULT_MAX_OPTIMIZE_SECS: u64 = 300;

/// What a model may cost before it is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Bytes of the model file plus the external data files it names.
    pub max_bytes: u64,
    /// Wall time of tract's optimisation (decluttering, kernel selection).
    pub optimize_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: DEFAULT_MAX_MODEL_MB << 20,
            optimize_timeout: Duration::from_secs(DEFAULT_MAX_OPTIMIZE_SECS),
        }
    }
}

/// Why an ONNX model cannot be used: one line, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path}: the model is {size_mib} MiB (file and external data), over the {limit_mib} MiB \
         limit; raise it with --max-model-mb"
    )]
    TooLarge {
        path: String,
        size_mib: u64,
        limit_mib: u64,
    },
    #[error("{path}: not an ONNX model ({reason})")]
    NotOnnx { path: String, reason: String },
    #[error("{path}: truncated or corrupt ONNX file ({reason})")]
    Corrupt { path: String, reason: String },
    #[error(
        "{path}: operator {op} (node '{node}') is not supported by the ONNX engine (tract {})",
        tract_version()
    )]
    UnsupportedOp {
        path: String,
        op: String,
        node: String,
    },
    #[error("{path}: no node or tensor named '{name}'{hint}")]
    UnknownNode {
        path: String,
        name: String,
        hint: String,
    },
    #[error("{path}: {reason}")]
    NotImageInput { path: String, reason: String },
    #[error("{path}: {reason}")]
    Unresolved { path: String, reason: String },
    #[error(
        "{path}: output '{node}' has shape {shape}: its size changes with the input, so one \
         image does not give one fixed-length feature row; pick another node with --layer"
    )]
    OutputVaries {
        path: String,
        node: String,
        shape: String,
    },
    #[error(
        "{path}: optimising the model took longer than the {secs} s limit; raise it with \
         --max-optimize-secs"
    )]
    OptimizeTimeout { path: String, secs: f64 },
    #[error("{path}: {what}: {message}")]
    Engine {
        path: String,
        what: &'static str,
        message: String,
    },
}

fn tract_version() -> &'static str {
    "0.23"
}

/// tract's errors are chains spread over lines; dltool's are one line.
fn one_line(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where the colour channels sit in the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// [N, 3, H, W]: PyTorch exports.
    Nchw,
    /// [N, H, W, 3]: Keras / TensorFlow exports.
    Nhwc,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Nchw => "NCHW",
            Layout::Nhwc => "NHWC",
        }
    }
}

/// One declared dimension of the model's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    /// A `dim_param` (its name) or an unnamed unknown (`None`).
    Symbol(Option<String>),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbol(Some(s)) => f.write_str(s),
            Dim::Symbol(None) => f.write_str("?"),
        }
    }
}

fn fmt_dims(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(","))
}

/// The model's image input as declared in the file.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub name: String,
    pub layout: Layout,
    /// batch, height, width in that order whatever the layout.
    pub batch: Dim,
    pub height: Dim,
    pub width: Dim,
}

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct OnnxOptions {
    /// Node or tensor to read; `None`: the model's first output.
    pub layer: Option<String>,
    /// Input height and width, for a model whose are symbolic (`--size`).
    pub size: Option<u32>,
    pub limits: Limits,
}

/// A preprocessing family (`--preprocess`): how the common exporters' models expect their
/// input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Keras/TF-slim Inception, MobileNet: stretch, `(x - 127.5) / 127.5`.
    Inception,
    /// torchvision and timm: shorter side to size/0.875, centre crop, `x / 255` then ImageNet's
    /// mean and std.
    Torchvision,
    /// Caffe (and Keras' ResNet50/VGG): BGR, stretch, minus ImageNet's BGR means.
    Caffe,
    /// EfficientNet(-Lite) reference code: stretch, `(x - 127) / 128`.
    Efficientnet,
    /// Stretch, 0..255 floats as they are.
    None,
}

pub const PRESETS: &str = "inception, torchvision, caffe, efficientnet or none";

impl Preset {
    pub fn name(self) -> &'static str {
        match self {
            Preset::Inception => "inception",
            Preset::Torchvision => "torchvision",
            Preset::Caffe => "caffe",
            Preset::Efficientnet => "efficientnet",
            Preset::None => "none",
        }
    }

    /// The preset's resize, channel order, mean and std (0..255 units).
    pub fn parts(self) -> (Resize, ChannelOrder, [f32; 3], [f32; 3]) {
        match self {
            Preset::Inception => (Resize::Stretch, ChannelOrder::Rgb, [127.5; 3], [127.5; 3]),
            Preset::Torchvision => (
                Resize::Crop,
                ChannelOrder::Rgb,
                // 255 x (0.485, 0.456, 0.406) and 255 x (0.229, 0.224, 0.225).
                [123.675, 116.28, 103.53],
                [58.395, 57.12, 57.375],
            ),
            Preset::Caffe => (
                Resize::Stretch,
                ChannelOrder::Bgr,
                [103.939, 116.779, 123.68],
                [1.0; 3],
            ),
            Preset::Efficientnet => (Resize::Stretch, ChannelOrder::Rgb, [127.0; 3], [128.0; 3]),
            Preset::None => (Resize::Stretch, ChannelOrder::Rgb, [0.0; 3], [1.0; 3]),
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "inception" => Ok(Preset::Inception),
            "torchvision" => Ok(Preset::Torchvision),
            "caffe" => Ok(Preset::Caffe),
            "efficientnet" => Ok(Preset::Efficientnet),
            "none" => Ok(Preset::None),
            other => Err(format!(
                "unknown preprocessing '{other}' (expected {PRESETS})"
            )),
        }
    }
}

/// How an ONNX model is fed and what it may cost (`--preprocess`, `--size`, the limits).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OnnxChoice {
    pub preprocess: PreprocessChoice,
    pub size: Option<u32>,
    pub limits: Limits,
}

impl OnnxChoice {
    /// Exactly `pre` (a head's recorded preprocessing), at its size.
    pub fn exactly(pre: &Preprocess, limits: Limits) -> OnnxChoice {
        OnnxChoice {
            preprocess: PreprocessChoice {
                preset: None,
                resize: Some(pre.resize),
                mean: Some(pre.mean),
                std: Some(pre.std),
                channels: Some(pre.channels),
            },
            // A non-square input can only be a model's fixed size, which needs no --size.
            size: (pre.width == pre.height).then_some(pre.width),
            limits,
        }
    }
}

/// `--preprocess` and its overrides.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PreprocessChoice {
    pub preset: Option<Preset>,
    pub resize: Option<Resize>,
    /// Not a flag: set when the preprocessing comes whole from a head.
    pub channels: Option<ChannelOrder>,
    /// In the model's channel order, 0..255 units.
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

impl PreprocessChoice {
    /// The preprocessing for a `width`×`height` input; `None` when neither a preset nor both
    /// mean and std are given (dltool cannot tell an ONNX model's normalisation from the file).
    pub fn resolve(&self, width: u32, height: u32) -> Option<Preprocess> {
        let (resize, channels, mean, std) = match self.preset {
            Some(p) => p.parts(),
            None => (Resize::Stretch, ChannelOrder::Rgb, self.mean?, self.std?),
        };
        Some(Preprocess {
            width,
            height,
            mean: self.mean.unwrap_or(mean),
            std: self.std.unwrap_or(std),
            resize: self.resize.unwrap_or(resize),
            channels: self.channels.unwrap_or(channels),
        })
    }
}

/// Parses `a,b,c` (`--mean`, `--std`).
pub fn parse_triple(s: &str) -> Result<[f32; 3], String> {
    let values: Vec<f32> = s
        .split(',')
        .map(|v| v.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("'{s}' is not three numbers a,b,c"))?;
    match values.as_slice() {
        [a, b, c] if values.iter().all(|v| v.is_finite()) => Ok([*a, *b, *c]),
        _ => Err(format!("'{s}' is not three numbers a,b,c")),
    }
}

/// A parsed model, before a node is chosen: what `inspect` reads and what [`OnnxNet`] is built
/// from.
pub struct OnnxModel {
    pub path: PathBuf,
    proto: pb::ModelProto,
    pub input: InputSpec,
    /// Model's graph outputs, in order.
    pub outputs: Vec<String>,
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

impl OnnxModel {
    /// Reads and checks `path`; no engine work yet beyond decoding the protobuf.
    pub fn open(path: &Path, limits: &Limits) -> Result<OnnxModel, OnnxError> {
        let p = display(path);
        let io = |source| OnnxError::Io {
            path: p.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.is_dir() {
            return Err(OnnxError::NotOnnx {
                path: p,
                reason: "a directory".into(),
            });
        }
        let too_large = |size: u64| OnnxError::TooLarge {
            path: p.clone(),
            size_mib: size.div_ceil(1 << 20),
            limit_mib: limits.max_bytes >> 20,
        };
        if meta.len() > limits.max_bytes {
            return Err(too_large(meta.len()));
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let proto = decode(&bytes).map_err(|(corrupt, reason)| {
            if corrupt {
                OnnxError::Corrupt {
                    path: p.clone(),
                    reason,
                }
            } else {
                OnnxError::NotOnnx {
                    path: p.clone(),
                    reason,
                }
            }
        })?;
        drop(bytes);
        let graph = proto.graph.as_ref().expect("decode checked the graph");

        let external = external_data_bytes(path, graph);
        if meta.len().saturating_add(external) > limits.max_bytes {
            return Err(too_large(meta.len().saturating_add(external)));
        }

        let registry = tract_onnx::onnx().op_register;
        if let Some(node) = graph
            .node
            .iter()
            .find(|n| !registry.0.contains_key(&n.op_type))
        {
            let op = if node.domain.is_empty() || node.domain == "ai.onnx" {
                node.op_type.clone()
            } else {
                format!("{}.{}", node.domain, node.op_type)
            };
            return Err(OnnxError::UnsupportedOp {
                path: p,
                op,
                node: node_display_name(node),
            });
        }

        let input = input_spec(graph).map_err(|reason| OnnxError::NotImageInput {
            path: p.clone(),
            reason,
        })?;
        let outputs = graph.output.iter().map(|o| o.name.clone()).collect();
        Ok(OnnxModel {
            path: path.to_path_buf(),
            proto,
            input,
            outputs,
        })
    }

    fn err_path(&self) -> String {
        display(&self.path)
    }

    /// Input height and width once `--size` is applied.
    pub fn resolve_size(&self, size: Option<u32>) -> Result<(usize, usize), OnnxError> {
        let resolve = |dim: &Dim, what: &str| -> Result<usize, OnnxError> {
            match (dim, size) {
                (Dim::Fixed(n), None) => Ok(*n),
                (Dim::Fixed(n), Some(s)) if *n == s as usize => Ok(*n),
                (Dim::Fixed(_), Some(s)) => Err(OnnxError::Unresolved {
                    path: self.err_path(),
                    reason: format!(
                        "input '{}' is fixed at {}x{} (height x width); --size {s} does not fit \
                         it (leave --size out)",
                        self.input.name, self.input.height, self.input.width
                    ),
                }),
                (Dim::Symbol(_), Some(s)) => Ok(s as usize),
                (Dim::Symbol(name), None) => Err(OnnxError::Unresolved {
                    path: self.err_path(),
                    reason: format!(
                        "input '{}' has a symbolic {what} ({}) that cannot be resolved: give the \
                         input size with --size N",
                        self.input.name,
                        name.as_deref().unwrap_or("unnamed")
                    ),
                }),
            }
        };
        let h = resolve(&self.input.height, "height")?;
        let w = resolve(&self.input.width, "width")?;
        Ok((h, w))
    }

    /// The tract model with the input fact set: batch symbolic (or fixed), H and W concrete.
    fn inference_model(&self, h: usize, w: usize) -> Result<(InferenceModel, TDim), OnnxError> {
        let engine = |what, e: anyhow::Error| OnnxError::Engine {
            path: self.err_path(),
            what,
            message: one_line(&e),
        };
        let onnx = tract_onnx::onnx();
        let dir = self.path.parent().and_then(|d| d.to_str());
        let parsed = onnx
            .parse(&self.proto, dir)
            .map_err(|e| engine("cannot load the graph", e))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(OnnxError::Corrupt {
                path: self.err_path(),
                reason: format!(
                    "nodes read tensors nothing produces: {}",
                    parsed.unresolved_inputs.join(", ")
                ),
            });
        }
        let mut model = parsed.model;
        let batch = match &self.input.batch {
            Dim::Fixed(n) => n.to_dim(),
            // One symbol per model, named as the file names it so that other shapes declared
            // with the same name agree with it.
            Dim::Symbol(name) => {
                let name = name
                    .as_deref()
                    .filter(|n| n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or("N");
                model.symbols.sym(name).to_dim()
            }
        };
        let shape: TVec<TDim> = match self.input.layout {
            Layout::Nchw => tvec![batch.clone(), 3usize.to_dim(), h.to_dim(), w.to_dim()],
            Layout::Nhwc => tvec![batch.clone(), h.to_dim(), w.to_dim(), 3usize.to_dim()],
        };
        model
            .set_input_fact(0, InferenceFact::dt_shape(f32::datum_type(), shape))
            .map_err(|e| engine("cannot set the input shape", e))?;
        Ok((model, batch))
    }

    /// Every node and tensor name a user can pass to `--layer`, with its per-image shape where
    /// shape inference finds one.
    pub fn nodes(&self, size: Option<u32>) -> Result<Vec<NodeInfo>, OnnxError> {
        let (h, w) = self.resolve_size(size)?;
        let (mut model, batch) = self.inference_model(h, w)?;
        // Obstinate: a node whose shape cannot be inferred still lists the others.
        let _ = model.analyse(true);
        let graph = self.proto.graph.as_ref().expect("decode checked the graph");
        let mut out = Vec::new();
        for node in &graph.node {
            if node.op_type == "Constant" {
                continue;
            }
            for tensor in node.output.iter().filter(|t| !t.is_empty()) {
                let Some(outlet) = model.find_outlet_label(tensor) else {
                    continue;
                };
                let fact = model.outlet_fact(outlet).ok();
                let shape = fact.and_then(|f| per_image_shape(&f.shape, &batch));
                let is_float = fact.is_some_and(|f| {
                    f.datum_type
                        .concretize()
                        .is_some_and(|dt| dt == f32::datum_type())
                });
                // Shape plumbing (int64 Shape/Gather/Concat chains) is nothing to read
                // features from.
                if fact.is_some_and(|f| f.datum_type.concretize().is_some()) && !is_float {
                    continue;
                }
                out.push(NodeInfo {
                    node: node_display_name(node),
                    op: node.op_type.clone(),
                    tensor: tensor.clone(),
                    shape,
                });
            }
        }
        Ok(out)
    }

    /// Every name `--layer` accepts: node names and tensor names.
    fn candidate_names(&self) -> Vec<String> {
        let graph = self.proto.graph.as_ref().expect("decode checked the graph");
        let mut names: Vec<String> = Vec::new();
        for node in &graph.node {
            if !node.name.is_empty() {
                names.push(node.name.clone());
            }
            names.extend(node.output.iter().filter(|t| !t.is_empty()).cloned());
        }
        names.sort();
        names.dedup();
        names
    }

    /// The tensor `layer` names: a tensor name as is, or a node name for its first output.
    fn tensor_of(&self, layer: &str) -> Result<String, OnnxError> {
        let graph = self.proto.graph.as_ref().expect("decode checked the graph");
        if graph
            .node
            .iter()
            .any(|n| n.output.iter().any(|t| t == layer))
            || graph.input.iter().any(|i| i.name == layer)
        {
            return Ok(layer.to_string());
        }
        if let Some(node) = graph.node.iter().find(|n| n.name == layer)
            && let Some(first) = node.output.iter().find(|t| !t.is_empty())
        {
            return Ok(first.clone());
        }
        let closest = closest_names(layer, &self.candidate_names(), 3);
        let hint = if closest.is_empty() {
            String::new()
        } else {
            format!(
                "; closest: {} (`dltool inspect {}` lists them all)",
                closest.join(", "),
                self.path.display()
            )
        };
        Err(OnnxError::UnknownNode {
            path: self.err_path(),
            name: layer.to_string(),
            hint,
        })
    }
}

/// One row of `inspect`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    pub node: String,
    pub op: String,
    pub tensor: String,
    /// Shape of one image's tensor (the batch axis left out), when inference knows it.
    pub shape: Option<Vec<usize>>,
}

fn node_display_name(node: &pb::NodeProto) -> String {
    if !node.name.is_empty() {
        node.name.clone()
    } else {
        node.output.first().cloned().unwrap_or_default()
    }
}

/// The shape after the batch axis, when the first axis is the batch and the rest are known.
fn per_image_shape(shape: &ShapeFactoid, batch: &TDim) -> Option<Vec<usize>> {
    let dims: Vec<TDim> = shape
        .dims()
        .map(|d| d.concretize())
        .collect::<Option<Vec<_>>>()?;
    if shape.is_open() || dims.first() != Some(batch) {
        return None;
    }
    dims[1..].iter().map(|d| d.to_usize().ok()).collect()
}

/// Decodes an ONNX protobuf; the error says whether the bytes looked like ONNX at all.
fn decode(bytes: &[u8]) -> Result<pb::ModelProto, (bool, String)> {
    if bytes.is_empty() {
        return Err((false, "empty file".into()));
    }
    // Every ONNX writer starts with field 1 (ir_version, a varint): tag byte 0x08.
    let looks_onnx = bytes[0] == 0x08;
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| {
            let reason = one_line(&e);
            if looks_onnx {
                (true, reason)
            } else {
                (false, format!("not a protobuf model: {reason}"))
            }
        })?;
    let graph_ok = proto
        .graph
        .as_ref()
        .is_some_and(|g| !g.node.is_empty() && !g.output.is_empty());
    if proto.ir_version <= 0 || !graph_ok {
        let reason = "no graph with nodes and outputs".to_string();
        return Err((looks_onnx, reason));
    }
    Ok(proto)
}

/// Total size of the distinct external data files the initializers name, as far as they exist.
fn external_data_bytes(path: &Path, graph: &pb::GraphProto) -> u64 {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files: Vec<&str> = graph
        .initializer
        .iter()
        .flat_map(|t| t.external_data.iter())
        .filter(|e| e.key == "location")
        .map(|e| e.value.as_str())
        .collect();
    files.sort_unstable();
    files.dedup();
    files
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

fn elem_type_name(t: i32) -> String {
    match t {
        1 => "float32".into(),
        2 => "uint8".into(),
        3 => "int8".into(),
        6 => "int32".into(),
        7 => "int64".into(),
        9 => "bool".into(),
        10 => "float16".into(),
        11 => "float64".into(),
        16 => "bfloat16".into(),
        other => format!("ONNX type {other}"),
    }
}

/// The single image input: float32, rank 4, 3 channels at axis 1 or 3.
fn input_spec(graph: &pb::GraphProto) -> Result<InputSpec, String> {
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let inputs: Vec<&pb::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|i| !initializers.contains(i.name.as_str()))
        .collect();
    let input = match inputs.as_slice() {
        [one] => *one,
        [] => return Err("the model has no input".into()),
        many => {
            let names: Vec<&str> = many.iter().map(|i| i.name.as_str()).collect();
            return Err(format!(
                "the model has {} inputs ({}); dltool feeds one image tensor",
                many.len(),
                names.join(", ")
            ));
        }
    };
    let name = input.name.clone();
    let Some(pb::type_proto::Value::TensorType(tensor)) =
        input.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Err(format!("input '{name}' is not a tensor"));
    };
    if tensor.elem_type != 1 {
        return Err(format!(
            "input '{name}' is {}, not a float32 image tensor",
            elem_type_name(tensor.elem_type)
        ));
    }
    let dims: Vec<Dim> = tensor
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match &d.value {
                    Some(pb::tensor_shape_proto::dimension::Value::DimValue(v)) if *v >= 0 => {
                        Dim::Fixed(*v as usize)
                    }
                    Some(pb::tensor_shape_proto::dimension::Value::DimParam(s)) => {
                        Dim::Symbol(Some(s.clone()))
                    }
                    _ => Dim::Symbol(None),
                })
                .collect()
        })
        .unwrap_or_default();
    if dims.len() != 4 {
        return Err(format!(
            "input '{name}' has shape {}, not an image tensor [N,3,H,W] or [N,H,W,3]",
            fmt_dims(&dims)
        ));
    }
    let three = Dim::Fixed(3);
    let layout = if dims[1] == three {
        Layout::Nchw
    } else if dims[3] == three {
        Layout::Nhwc
    } else {
        return Err(format!(
            "input '{name}' has shape {}: no axis of 3 colour channels at position 1 (NCHW) or \
             3 (NHWC), so it is not an RGB image tensor",
            fmt_dims(&dims)
        ));
    };
    let (height, width) = match layout {
        Layout::Nchw => (dims[2].clone(), dims[3].clone()),
        Layout::Nhwc => (dims[1].clone(), dims[2].clone()),
    };
    Ok(InputSpec {
        name,
        layout,
        batch: dims[0].clone(),
        height,
        width,
    })
}

/// Up to `k` of `names` closest to `wanted`: those containing it first, then by edit distance.
pub fn closest_names(wanted: &str, names: &[String], k: usize) -> Vec<String> {
    let lower = wanted.to_lowercase();
    let mut scored: Vec<(usize, &String)> = names
        .iter()
        .map(|n| {
            let d = if n.to_lowercase().contains(&lower) {
                0
            } else {
                levenshtein(&lower, &n.to_lowercase())
            };
            (d, n)
        })
        .collect();
    scored.sort_by(|a, b| {
        a.0.cmp(&b.0)
            .then(a.1.len().cmp(&b.1.len()))
            .then(a.1.cmp(b.1))
    });
    scored.into_iter().take(k).map(|(_, n)| n.clone()).collect()
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A model ready to run, reading one node.
pub struct OnnxNet {
    plan: Arc<TypedSimplePlan>,
    pub path: PathBuf,
    pub input: InputSpec,
    pub height: usize,
    pub width: usize,
    /// The batch every engine call has: 1, or the model's fixed batch (the last call of a
    /// run padded with zeros).
    plan_batch: usize,
    /// The tensor read (a graph output or the `--layer` node's output).
    pub node: String,
    /// Shape of one image's output, the batch axis left out.
    pub output_shape: Vec<usize>,
}

impl std::fmt::Debug for OnnxNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxNet")
            .field("path", &self.path)
            .field("node", &self.node)
            .field("output_shape", &self.output_shape)
            .finish()
    }
}

impl OnnxNet {
    /// Opens, checks and optimises `path`, cut at `opts.layer`.
    pub fn load(path: &Path, opts: &OnnxOptions) -> Result<OnnxNet, OnnxError> {
        let model = OnnxModel::open(path, &opts.limits)?;
        Self::from_model(model, opts)
    }

    pub fn from_model(model: OnnxModel, opts: &OnnxOptions) -> Result<OnnxNet, OnnxError> {
        let p = model.err_path();
        let (h, w) = model.resolve_size(opts.size)?;
        let tensor = match &opts.layer {
            Some(layer) => model.tensor_of(layer)?,
            None => model.outputs[0].clone(),
        };
        let (mut inference, batch) = model.inference_model(h, w)?;
        let engine = |what, e: anyhow::Error| OnnxError::Engine {
            path: p.clone(),
            what,
            message: one_line(&e),
        };
        let outlet =
            inference
                .find_outlet_label(&tensor)
                .ok_or_else(|| OnnxError::UnknownNode {
                    path: p.clone(),
                    name: tensor.clone(),
                    hint: String::new(),
                })?;
        inference
            .select_output_outlets(&[outlet])
            .map_err(|e| engine("cannot select the output", e))?;
        let typed = inference
            .into_typed()
            .map_err(|e| engine("shape inference failed", e))?;
        let fact = typed
            .output_fact(0)
            .map_err(|e| engine("no output", e))?
            .clone();
        let dims: Vec<TDim> = fact.shape.iter().cloned().collect();
        let varies = || OnnxError::OutputVaries {
            path: p.clone(),
            node: tensor.clone(),
            shape: format!(
                "[{}]",
                dims.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        };
        if dims.first() != Some(&batch) {
            return Err(varies());
        }
        let output_shape: Vec<usize> = dims[1..]
            .iter()
            .map(|d| d.to_usize().ok())
            .collect::<Option<_>>()
            .ok_or_else(varies)?;
        if fact.datum_type != f32::datum_type() {
            return Err(OnnxError::Engine {
                path: p.clone(),
                what: "unsupported output",
                message: format!("'{tensor}' is {:?}, not float32", fact.datum_type),
            });
        }

        // The plan is made for one concrete batch (one image, or the model's fixed batch):
        // tract's optimiser picks its convolution and matrix-product kernels for concrete
        // shapes, and a plan left with a symbolic batch ran EfficientNet-Lite0 5x slower (2.3
        // against 12.5 img/s on one thread, on the loaded 2-core machine).
        // The symbolic pass above is what proves each image gives one fixed-size row.
        let plan_batch = match model.input.batch {
            Dim::Fixed(n) => n,
            Dim::Symbol(_) => 1,
        };
        let typed = match &batch {
            TDim::Sym(symbol) => typed
                .set_symbols(&std::collections::HashMap::from([(
                    symbol.clone(),
                    TDim::Val(plan_batch as i64),
                )]))
                .map_err(|e| engine("cannot fix the batch size", e))?,
            _ => typed,
        };
        let optimized =
            optimize_with_timeout(typed, opts.limits.optimize_timeout).map_err(|e| match e {
                None => OnnxError::OptimizeTimeout {
                    path: p.clone(),
                    secs: opts.limits.optimize_timeout.as_secs_f64(),
                },
                Some(e) => engine("optimisation failed", e),
            })?;
        let plan = TypedSimplePlan::new(optimized).map_err(|e| engine("cannot plan", e))?;
        Ok(OnnxNet {
            plan,
            path: model.path,
            plan_batch,
            input: model.input,
            height: h,
            width: w,
            node: tensor,
            output_shape,
        })
    }

    /// Floats of one preprocessed image (3·H·W).
    pub fn input_len(&self) -> usize {
        3 * self.height * self.width
    }

    /// Floats of one image's raw output.
    pub fn output_len(&self) -> usize {
        self.output_shape.iter().product()
    }

    /// Raw output of `n` images given as CHW floats back to back: `n * output_len()` floats.
    ///
    /// The engine calls (one image each, or the model's fixed batch) are spread over the
    /// rayon pool, each call on one thread: tract spreads only its matrix products over
    /// threads, and a CNN's depthwise convolutions and element-wise ops would leave the other
    /// cores idle. A lone call (one image, or one thread) gets the whole pool for its products
    /// instead.
    pub fn run(&self, chw: &[f32], n: usize) -> Result<Vec<f32>, OnnxError> {
        use rayon::prelude::*;
        use tract_linalg::multithread::{Executor, multithread_tract_scope};
        assert_eq!(chw.len(), n * self.input_len(), "one CHW image per row");
        let step = self.plan_batch;
        let parts: Vec<(usize, usize)> = (0..n)
            .step_by(step)
            .map(|start| (start, step.min(n - start)))
            .collect();
        let part = |&(start, count): &(usize, usize)| -> Result<Vec<f32>, OnnxError> {
            let slice = &chw[start * self.input_len()..(start + count) * self.input_len()];
            let mut rows = self.run_exact(slice, count, step)?;
            rows.truncate(count * self.output_len());
            Ok(rows)
        };
        let results: Vec<Result<Vec<f32>, OnnxError>> =
            if parts.len() == 1 || rayon::current_num_threads() == 1 {
                multithread_tract_scope(Executor::RayonGlobal, || parts.iter().map(part).collect())
            } else {
                parts.par_iter().map(part).collect()
            };
        let mut out = Vec::with_capacity(n * self.output_len());
        for rows in results {
            out.extend_from_slice(&rows?);
        }
        Ok(out)
    }

    /// One engine call on `count` images padded with zeros to `batch`.
    fn run_exact(&self, chw: &[f32], count: usize, batch: usize) -> Result<Vec<f32>, OnnxError> {
        let (h, w) = (self.height, self.width);
        let mut data = match self.input.layout {
            Layout::Nchw => chw.to_vec(),
            Layout::Nhwc => chw_to_hwc(chw, count, h, w),
        };
        data.resize(batch * self.input_len(), 0.0);
        let shape: [usize; 4] = match self.input.layout {
            Layout::Nchw => [batch, 3, h, w],
            Layout::Nhwc => [batch, h, w, 3],
        };
        let engine = |e: anyhow::Error| OnnxError::Engine {
            path: display(&self.path),
            what: "the network failed",
            message: one_line(&e),
        };
        let tensor = Tensor::from_shape(&shape, &data).map_err(engine)?;
        let outputs = self.plan.run(tvec![tensor.into_tvalue()]).map_err(engine)?;
        let view = outputs[0].try_as_plain_ram().map_err(engine)?;
        let out = view.as_slice::<f32>().map_err(engine)?;
        if out.len() != batch * self.output_len() {
            return Err(OnnxError::Engine {
                path: display(&self.path),
                what: "the network failed",
                message: format!(
                    "'{}' gave {} floats for {batch} image(s), expected {}",
                    self.node,
                    out.len(),
                    batch * self.output_len()
                ),
            });
        }
        Ok(out.to_vec())
    }

    /// Length of one feature vector under `pool`.
    pub fn feature_dim(&self, pool: Pool) -> usize {
        match (self.map_axes(), pool) {
            (Some(MapAxes { channels, .. }), Pool::Avg | Pool::Max) => channels,
            _ => self.output_len(),
        }
    }

    /// How a 4-D (or token) output is laid out, for pooling; `None` for vectors.
    fn map_axes(&self) -> Option<MapAxes> {
        match self.output_shape.as_slice() {
            // A 4-D map is laid out as the input is.
            [a, b, c] => Some(match self.input.layout {
                Layout::Nchw => MapAxes {
                    channels: *a,
                    positions: b * c,
                    channels_last: false,
                },
                Layout::Nhwc => MapAxes {
                    channels: *c,
                    positions: a * b,
                    channels_last: true,
                },
            }),
            // [tokens, dim]: a transformer's sequence, pooled over the tokens.
            [t, d] => Some(MapAxes {
                channels: *d,
                positions: *t,
                channels_last: true,
            }),
            _ => None,
        }
    }

    /// Width of the output map (for mirroring pooled-none maps back under flip TTA): the last
    /// spatial axis, or 1 when the output has none.
    pub fn map_width(&self) -> usize {
        match (self.output_shape.as_slice(), self.input.layout) {
            ([_, _, w], Layout::Nchw) => *w,
            ([_, w, _], Layout::Nhwc) => *w,
            _ => 1,
        }
    }

    /// Features of `n` images: the output pooled as `pool` says (4-D maps over H and W, token
    /// sequences over the tokens; vectors as they are).
    pub fn features(&self, chw: &[f32], n: usize, pool: Pool) -> Result<Vec<f32>, OnnxError> {
        let raw = self.run(chw, n)?;
        Ok(match (self.map_axes(), pool) {
            (Some(axes), Pool::Avg | Pool::Max) => pool_rows(&raw, n, axes, pool == Pool::Max),
            _ => raw,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct MapAxes {
    channels: usize,
    positions: usize,
    /// [positions, channels] per image rather than [channels, positions].
    channels_last: bool,
}

/// Mean or max over positions of each image's map.
fn pool_rows(raw: &[f32], n: usize, axes: MapAxes, max: bool) -> Vec<f32> {
    let MapAxes {
        channels,
        positions,
        channels_last,
    } = axes;
    let per_image = channels * positions;
    let mut out = Vec::with_capacity(n * channels);
    for img in raw.chunks_exact(per_image).take(n) {
        for c in 0..channels {
            let values = (0..positions).map(|p| {
                if channels_last {
                    img[p * channels + c]
                } else {
                    img[c * positions + p]
                }
            });
            out.push(if max {
                values.fold(f32::NEG_INFINITY, f32::max)
            } else {
                // Summed in f64: a 7x7 map or 197 tokens lose nothing to the order.
                (values.map(f64::from).sum::<f64>() / positions as f64) as f32
            });
        }
    }
    out
}

/// CHW images back to back → HWC images back to back.
fn chw_to_hwc(chw: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
    let plane = h * w;
    let mut out = vec![0f32; n * 3 * plane];
    for (src, dst) in chw
        .chunks_exact(3 * plane)
        .zip(out.chunks_exact_mut(3 * plane))
    {
        for p in 0..plane {
            for c in 0..3 {
                dst[p * 3 + c] = src[c * plane + p];
            }
        }
    }
    out
}

/// `typed.into_optimized()` on its own thread, given up on after `timeout`: `Err(None)` then
/// (the thread is left to finish; the command exits with the error).
fn optimize_with_timeout(
    typed: TypedModel,
    timeout: Duration,
) -> Result<TypedModel, Option<anyhow::Error>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("onnx-optimize".into())
        .spawn(move || {
            let _ = tx.send(typed.into_optimized());
        })
        .map_err(|e| Some(anyhow::Error::from(e)))?;
    match rx.recv_timeout(timeout) {
        Ok(result) => result.map_err(Some),
        Err(_) => Err(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_names_prefer_substrings_then_edit_distance() {
        let names: Vec<String> = ["/blocks.0/conv", "/blocks.1/conv", "/head/conv", "pool"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(closest_names("pol", &names, 1), vec!["pool".to_string()]);
        assert_eq!(
            closest_names("head", &names, 2)[0],
            "/head/conv".to_string()
        );
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }

    #[test]
    fn pooling_reads_channels_first_and_last() {
        // Two channels over three positions: [[1,2,3],[4,5,6]] channel-major.
        let first = MapAxes {
            channels: 2,
            positions: 3,
            channels_last: false,
        };
        assert_eq!(
            pool_rows(&[1., 2., 3., 4., 5., 6.], 1, first, false),
            [2., 5.]
        );
        assert_eq!(
            pool_rows(&[1., 2., 3., 4., 5., 6.], 1, first, true),
            [3., 6.]
        );
        // The same map position-major.
        let last = MapAxes {
            channels_last: true,
            ..first
        };
        assert_eq!(
            pool_rows(&[1., 4., 2., 5., 3., 6.], 1, last, false),
            [2., 5.]
        );
    }

    #[test]
    fn chw_to_hwc_interleaves_planes() {
        // One 1x2 image: R=[1,2], G=[3,4], B=[5,6].
        assert_eq!(
            chw_to_hwc(&[1., 2., 3., 4., 5., 6.], 1, 1, 2),
            [1., 3., 5., 2., 4., 6.]
        );
    }

    #[test]
    fn bytes_that_are_not_onnx_are_told_apart_from_truncated_ones() {
        let (corrupt, reason) = decode(b"hello, world").unwrap_err();
        assert!(!corrupt, "{reason}");
        let (corrupt, _) = decode(&[]).unwrap_err();
        assert!(!corrupt);
        // ir_version 8, then a graph field (2) claiming 100 bytes that are not there.
        let (corrupt, reason) = decode(&[0x08, 0x08, 0x3a, 100, 1, 2]).unwrap_err();
        assert!(corrupt, "{reason}");
    }
}
