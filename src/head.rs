//! A trained head and its file.
//!
//! A head file is a safetensors file: the parameters as tensors, and in its metadata everything
//! needed to use it correctly later — head type and hyper-parameters, class names in order,
//! feature dimension, the backbone, the SHA-256 of its weights, layer, pooling and
//! preprocessing, and the dltool version. `evaluate` and `predict` compare these with the
//! features or weights they are given and refuse a mismatch instead of answering wrongly.

use crate::features::{AtomicFile, FeatureMeta};
use crate::image_io::{ChannelOrder, Preprocess, Resize};
use crate::logistic::{self, LogisticModel, LogisticParams};
use crate::mlp::{self, EpochReport, MlpModel, MlpParams};
use safetensors::tensor::Dtype;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

const FORMAT: &str = "dltool-head";
/// The `head` metadata of a fine-tuned model.
const FINE_TUNED: &str = "fine-tuned";
/// Bumped whenever the file layout changes.
pub const FORMAT_VERSION: &str = "1";

/// The trained parameters, by head type.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadModel {
    Logistic {
        model: LogisticModel,
        params: LogisticParams,
    },
    Mlp {
        model: MlpModel,
        params: MlpParams,
    },
    /// The top of the network itself, trained by `fine-tune`: its features are the cut layer's
    /// activations (`pool none`).
    FineTuned {
        model: Box<crate::finetune::top::FineTuned>,
        params: crate::finetune::FineTuneParams,
    },
}

impl HeadModel {
    pub fn kind(&self) -> &'static str {
        match self {
            HeadModel::Logistic { .. } => "logistic",
            HeadModel::Mlp { .. } => "mlp",
            HeadModel::FineTuned { .. } => FINE_TUNED,
        }
    }

    /// Class probabilities for `n` rows of `dim` features: `n x classes` row-major.
    pub fn predict_proba(&self, x: &[f32], n: usize, dim: usize) -> Vec<f64> {
        debug_assert_eq!(x.len(), n * dim);
        match self {
            HeadModel::Logistic { model, .. } => x
                .chunks_exact(dim)
                .flat_map(|row| model.predict_proba(row))
                .collect(),
            HeadModel::Mlp { model, .. } => model.predict_proba(x, n),
            HeadModel::FineTuned { model, .. } => model.predict_proba(x, n),
        }
    }
}

/// Hyper-parameters of either head type: what `train-head` fits once and `tune` searches over.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadParams {
    Logistic(LogisticParams),
    Mlp(MlpParams),
}

impl HeadParams {
    pub fn kind(&self) -> &'static str {
        match self {
            HeadParams::Logistic(_) => "logistic",
            HeadParams::Mlp(_) => "mlp",
        }
    }

    /// All parameters as a JSON object (the same text the head file records).
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            HeadParams::Logistic(p) => serde_json::to_value(p),
            HeadParams::Mlp(p) => serde_json::to_value(p),
        };
        value.expect("parameters are plain numbers, flags and lists")
    }
}

/// Progress of a [`fit`]: solver iterations (logistic) or epochs (MLP).
#[derive(Debug)]
pub enum FitProgress<'a> {
    Iteration { iteration: usize, objective: f64 },
    Epoch(&'a EpochReport),
}

/// How a [`fit`] ended, for the messages a command prints.
#[derive(Debug, Clone)]
pub enum FitReport {
    Logistic(logistic::FitReport),
    Mlp(mlp::MlpReport),
}

/// Fits a head on `y.len()` rows of `x` (row-major, `dim` wide) with class indices in
/// `0..num_classes`. Errors are one line, without a file name.
pub fn fit(
    params: &HeadParams,
    x: &[f32],
    dim: usize,
    y: &[usize],
    num_classes: usize,
    mut on_progress: impl FnMut(FitProgress),
) -> Result<(HeadModel, TrainingSummary, FitReport), String> {
    let n = y.len();
    match params {
        HeadParams::Logistic(params) => {
            let (model, report) = logistic::fit(x, dim, y, num_classes, params, |it, obj| {
                on_progress(FitProgress::Iteration {
                    iteration: it,
                    objective: obj,
                })
            })?;
            let correct = x
                .chunks_exact(dim)
                .zip(y)
                .filter(|&(row, &label)| model.predict(row) == label)
                .count();
            let summary = TrainingSummary {
                rows: n,
                train_accuracy: correct as f64 / n as f64,
                iterations: report.iterations,
                converged: report.converged,
            };
            let model = HeadModel::Logistic {
                model,
                params: params.clone(),
            };
            Ok((model, summary, FitReport::Logistic(report)))
        }
        HeadParams::Mlp(params) => {
            let (model, report) = mlp::fit(x, dim, y, num_classes, params, |e| {
                on_progress(FitProgress::Epoch(e))
            })?;
            let summary = TrainingSummary {
                rows: n,
                train_accuracy: report.train_accuracy,
                iterations: report.epochs_run,
                converged: true,
            };
            let model = HeadModel::Mlp {
                model,
                params: params.clone(),
            };
            Ok((model, summary, FitReport::Mlp(report)))
        }
    }
}

/// What the head was trained on, recorded for the user (`dltool evaluate` shows it).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainingSummary {
    pub rows: usize,
    /// NaN where not measured (a fine-tune): JSON writes it as null, which must read back.
    #[serde(deserialize_with = "nan_if_null")]
    pub train_accuracy: f64,
    /// Iterations (logistic) or epochs (mlp) run.
    pub iterations: usize,
    pub converged: bool,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    pub model: HeadModel,
    /// Class names; output `k` of the model is `classes[k]`.
    pub classes: Vec<String>,
    pub feature_dim: usize,
    /// Backbone, weights SHA-256, layer and pooling of the features it was trained on.
    pub provenance: FeatureMeta,
    pub preprocess: Option<Preprocess>,
    /// The dltool that trained it.
    pub dltool_version: String,
    pub training: TrainingSummary,
}

impl Head {
    /// Class probabilities for `n` rows of `feature_dim` features: `n x classes` row-major.
    pub fn predict_proba(&self, x: &[f32], n: usize) -> Vec<f64> {
        self.model.predict_proba(x, n, self.feature_dim)
    }

    /// Writes the head atomically (temporary file renamed into place).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let err = |e: String| format!("{}: {e}", path.display());
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        let params_json = match &self.model {
            HeadModel::Logistic { model, params } => {
                let k = model.num_classes;
                tensors.push((
                    "coefficients".into(),
                    Dtype::F64,
                    vec![k, model.dim],
                    f64_bytes(&model.coefficients),
                ));
                tensors.push((
                    "intercepts".into(),
                    Dtype::F64,
                    vec![k],
                    f64_bytes(&model.intercepts),
                ));
                serde_json::to_string(params).map_err(|e| err(e.to_string()))?
            }
            HeadModel::Mlp { model, params } => {
                tensors.push((
                    "mean".into(),
                    Dtype::F32,
                    vec![model.dim],
                    f32_bytes(&model.mean),
                ));
                tensors.push((
                    "std".into(),
                    Dtype::F32,
                    vec![model.dim],
                    f32_bytes(&model.std),
                ));
                for (i, (w, b)) in model.layers.iter().enumerate() {
                    let out = b.len();
                    let inp = w.len().checked_div(out).unwrap_or(0);
                    tensors.push((
                        format!("layer{i}.weight"),
                        Dtype::F32,
                        vec![inp, out],
                        f32_bytes(w),
                    ));
                    tensors.push((
                        format!("layer{i}.bias"),
                        Dtype::F32,
                        vec![out],
                        f32_bytes(b),
                    ));
                }
                serde_json::to_string(params).map_err(|e| err(e.to_string()))?
            }
            HeadModel::FineTuned { model, params } => {
                for (name, shape, values) in model.net.tensors() {
                    tensors.push((name, Dtype::F32, shape, f32_bytes(&values)));
                }
                serde_json::to_string(params).map_err(|e| err(e.to_string()))?
            }
        };

        let mut meta: BTreeMap<String, String> = self.provenance.to_map();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("format_version".into(), FORMAT_VERSION.into());
        // The head's own version wins over the features' one carried in the provenance.
        meta.insert(
            "features_dltool_version".into(),
            self.provenance.dltool_version.clone(),
        );
        meta.insert("dltool_version".into(), self.dltool_version.clone());
        meta.insert("head".into(), self.model.kind().into());
        meta.insert("params".into(), params_json);
        meta.insert(
            "classes".into(),
            serde_json::to_string(&self.classes).map_err(|e| err(e.to_string()))?,
        );
        meta.insert("feature_dim".into(), self.feature_dim.to_string());
        meta.insert(
            "training".into(),
            serde_json::to_string(&self.training).map_err(|e| err(e.to_string()))?,
        );
        if let Some(p) = &self.preprocess {
            meta.insert("preprocess".into(), preprocess_json(p));
        }
        if let HeadModel::FineTuned { model, .. } = &self.model {
            meta.insert(
                "fine_tune".into(),
                serde_json::to_string(&model.report).map_err(|e| err(e.to_string()))?,
            );
        }

        let bytes = serialize_sorted(&tensors, &meta);
        let mut file = AtomicFile::create(path).map_err(|e| e.to_string())?;
        file.write_all(&bytes).map_err(|e| err(e.to_string()))?;
        file.commit().map_err(|e| e.to_string())
    }

    /// Reads and checks a head file. Every problem is one line naming the file.
    pub fn load(path: &Path) -> Result<Head, String> {
        let err = |e: &str| format!("{}: {e}", path.display());
        let bytes = std::fs::read(path).map_err(|e| err(&e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| err(&not_a_head(&e)))?;
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| err(&not_a_head(&e)))?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| -> Result<&String, String> {
            meta.get(k)
                .ok_or_else(|| err(&format!("head metadata has no '{k}'")))
        };
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(err(
                "not a dltool head file (no 'format: dltool-head' metadata)",
            ));
        }
        let version = get("format_version")?;
        if version != FORMAT_VERSION {
            return Err(err(&format!(
                "head file format version {version}, this dltool reads version {FORMAT_VERSION}"
            )));
        }
        let made_by = get("dltool_version")?.clone();
        check_version_compatible(&made_by).map_err(|e| err(&e))?;

        let classes: Vec<String> = serde_json::from_str(get("classes")?)
            .map_err(|e| err(&format!("bad 'classes' metadata: {e}")))?;
        if classes.len() < 2 {
            return Err(err("a head needs at least two classes"));
        }
        let feature_dim: usize = get("feature_dim")?
            .parse()
            .map_err(|_| err("bad 'feature_dim' metadata"))?;
        let mut provenance = FeatureMeta::from_map(&meta).unwrap_or_default();
        provenance.dltool_version = meta
            .get("features_dltool_version")
            .cloned()
            .unwrap_or_default();
        let training: TrainingSummary = meta
            .get("training")
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default();
        let preprocess = match meta.get("preprocess") {
            Some(p) => Some(parse_preprocess(p).map_err(|e| err(&e))?),
            None => None,
        };

        let tensor = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>, String> {
            let t = st
                .tensor(name)
                .map_err(|_| err(&format!("missing tensor '{name}'")))?;
            if t.dtype() != dtype || t.shape() != shape {
                return Err(err(&format!(
                    "tensor '{name}' is {:?} {:?}, expected {dtype:?} {shape:?}",
                    t.dtype(),
                    t.shape()
                )));
            }
            Ok(t.data().to_vec())
        };
        let k = classes.len();
        let params = get("params")?;
        let model = match get("head")?.as_str() {
            "logistic" => {
                let params: LogisticParams = serde_json::from_str(params)
                    .map_err(|e| err(&format!("bad 'params' metadata: {e}")))?;
                let model = LogisticModel {
                    num_classes: k,
                    dim: feature_dim,
                    coefficients: bytes_f64(&tensor(
                        "coefficients",
                        Dtype::F64,
                        &[k, feature_dim],
                    )?),
                    intercepts: bytes_f64(&tensor("intercepts", Dtype::F64, &[k])?),
                };
                if model
                    .coefficients
                    .iter()
                    .chain(&model.intercepts)
                    .any(|v| !v.is_finite())
                {
                    return Err(err("head parameters contain NaN or infinity"));
                }
                HeadModel::Logistic { model, params }
            }
            "mlp" => {
                let params: MlpParams = serde_json::from_str(params)
                    .map_err(|e| err(&format!("bad 'params' metadata: {e}")))?;
                let mut layers = Vec::new();
                let mut inp = feature_dim;
                let sizes: Vec<usize> = params.hidden.iter().copied().chain([k]).collect();
                for (i, &out) in sizes.iter().enumerate() {
                    let w = tensor(&format!("layer{i}.weight"), Dtype::F32, &[inp, out])?;
                    let b = tensor(&format!("layer{i}.bias"), Dtype::F32, &[out])?;
                    layers.push((bytes_f32(&w), bytes_f32(&b)));
                    inp = out;
                }
                let model = MlpModel {
                    dim: feature_dim,
                    num_classes: k,
                    activation: params.activation,
                    mean: bytes_f32(&tensor("mean", Dtype::F32, &[feature_dim])?),
                    std: bytes_f32(&tensor("std", Dtype::F32, &[feature_dim])?),
                    layers,
                };
                model.validate().map_err(|e| err(&e))?;
                HeadModel::Mlp { model, params }
            }
            FINE_TUNED => {
                let params: crate::finetune::FineTuneParams = serde_json::from_str(params)
                    .map_err(|e| err(&format!("bad 'params' metadata: {e}")))?;
                let model = load_fine_tuned(&provenance, feature_dim, k, &meta, bytes.clone())
                    .map_err(|e| err(&e))?;
                HeadModel::FineTuned {
                    model: Box::new(model),
                    params,
                }
            }
            other => return Err(err(&format!("unknown head type '{other}'"))),
        };
        Ok(Head {
            model,
            classes,
            feature_dim,
            provenance,
            preprocess,
            dltool_version: made_by,
            training,
        })
    }

    /// Refuses features that came from another network, layer, pooling or test-time
    /// augmentation than the head's.
    /// `features` is `None` for files without provenance (CSV): only the width is checked.
    pub fn check_features(&self, dim: usize, features: Option<&FeatureMeta>) -> Result<(), String> {
        if dim != self.feature_dim {
            return Err(format!(
                "features have {dim} columns, the head was trained on {}",
                self.feature_dim
            ));
        }
        if let Some(f) = features {
            let h = &self.provenance;
            let pairs = [
                ("backbone", &f.backbone, &h.backbone),
                ("weights sha256", &f.weights_sha256, &h.weights_sha256),
                ("layer", &f.layer, &h.layer),
                ("pool", &f.pool, &h.pool),
                ("test-time augmentation", &f.tta, &h.tta),
            ];
            for (what, theirs, ours) in pairs {
                if !theirs.is_empty() && !ours.is_empty() && theirs != ours {
                    return Err(format!(
                        "features were made with {what} {theirs}, the head with {ours}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Heads are refused across minor versions (0.x) or major versions: the features they expect
/// may be computed differently.
pub fn check_version_compatible(made_by: &str) -> Result<(), String> {
    let ours = env!("CARGO_PKG_VERSION");
    let key = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some((major, minor))
    };
    let (Some(theirs), Some(mine)) = (key(made_by), key(ours)) else {
        return Err(format!(
            "head was made by dltool '{made_by}', which is not a version"
        ));
    };
    let compatible = if mine.0 == 0 {
        theirs == mine
    } else {
        theirs.0 == mine.0
    };
    if compatible {
        Ok(())
    } else {
        Err(format!(
            "head was made by dltool {made_by}, this is dltool {ours}: train it again with this \
             version"
        ))
    }
}

/// The trained top of a `fine-tuned` head file, built for the network and cut layer its
/// provenance names (so a file for another network is refused here, by name).
fn load_fine_tuned(
    provenance: &FeatureMeta,
    feature_dim: usize,
    classes: usize,
    meta: &std::collections::HashMap<String, String>,
    bytes: Vec<u8>,
) -> Result<crate::finetune::top::FineTuned, String> {
    use crate::inception_v3::BlockVariant;
    let (network, variant) = provenance
        .backbone
        .split_once('/')
        .unwrap_or((provenance.backbone.as_str(), ""));
    let cut = crate::finetune::cut_of(network, &provenance.layer).map_err(|e| match e {
        crate::finetune::FineTuneError::Backbone(_) => format!(
            "fine-tuned for backbone '{}', which this dltool cannot fine-tune",
            provenance.backbone
        ),
        other => other.to_string(),
    })?;
    let variant: Option<BlockVariant> = match cut {
        crate::finetune::Cut::Inception(_) => Some(variant.parse()?),
        crate::finetune::Cut::Lite { .. } => None,
    };
    if provenance.pool != "none" || feature_dim != cut.shape().iter().product::<usize>() {
        return Err(format!(
            "a fine-tuned model reads whole {} activations, not {feature_dim} '{}'-pooled features",
            cut.layer(),
            provenance.pool
        ));
    }
    let report = meta
        .get("fine_tune")
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default();
    let device = burn::prelude::Device::flex();
    let mut net = crate::finetune::FineTunedNet::architecture(cut, variant, classes, &device)
        .map_err(|e| e.to_string())?;
    net.load_bytes(bytes)?;
    Ok(crate::finetune::top::FineTuned {
        net,
        cut,
        variant,
        report,
    })
}

fn preprocess_json(p: &Preprocess) -> String {
    let mut json = serde_json::json!({
        "width": p.width,
        "height": p.height,
        "channels": p.channels.name(),
        "mean": p.mean,
        "std": p.std,
    });
    // Only a crop is written: heads of stretched input stay what they were before crops existed.
    if p.resize != Resize::Stretch {
        json["resize"] = p.resize.name().into();
    }
    json.to_string()
}

fn parse_preprocess(s: &str) -> Result<Preprocess, String> {
    #[derive(serde::Deserialize)]
    struct P {
        width: u32,
        height: u32,
        mean: [f32; 3],
        std: [f32; 3],
        #[serde(default)]
        channels: Option<String>,
        #[serde(default)]
        resize: Option<String>,
    }
    let p: P = serde_json::from_str(s).map_err(|e| format!("bad 'preprocess' metadata: {e}"))?;
    let channels = match p.channels.as_deref() {
        None | Some("RGB") => ChannelOrder::Rgb,
        Some("BGR") => ChannelOrder::Bgr,
        Some(other) => return Err(format!("bad 'preprocess' metadata: channels '{other}'")),
    };
    let resize = match p.resize.as_deref() {
        None => Resize::Stretch,
        Some(r) => r
            .parse()
            .map_err(|e| format!("bad 'preprocess' metadata: {e}"))?,
    };
    Ok(Preprocess {
        width: p.width,
        height: p.height,
        mean: p.mean,
        std: p.std,
        resize,
        channels,
    })
}

/// safetensors bytes with the header keys in sorted order. The safetensors crate writes its
/// metadata from a `HashMap`, whose order changes from run to run; a head trained twice with the
/// same seed should be the same file, byte for byte.
fn serialize_sorted(
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut sorted: Vec<&(String, Dtype, Vec<usize>, Vec<u8>)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in &sorted {
        header.insert(
            name.clone(),
            serde_json::json!({
                "dtype": format!("{dtype:?}"),
                "shape": shape,
                "data_offsets": [offset, offset + bytes.len()],
            }),
        );
        offset += bytes.len();
    }
    // serde_json's map is ordered by key (no preserve_order feature), so the text is stable.
    let mut json = serde_json::Value::Object(header).to_string().into_bytes();
    // The format allows space padding; 8-byte alignment keeps f64 data aligned when mapped.
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for (_, _, _, bytes) in sorted {
        out.extend_from_slice(bytes);
    }
    out
}

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn bytes_f64(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect()
}

/// Why bytes are not a head file, in a user's words: safetensors' own names for a cut or
/// foreign file (`HeaderTooLarge`, `MetadataIncompleteBuffer`) say nothing to them.
fn not_a_head(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooLarge
        | E::HeaderTooSmall
        | E::InvalidHeaderLength
        | E::InvalidHeader
        | E::InvalidHeaderStart
        | E::InvalidHeaderDeserialization
        | E::MetadataIncompleteBuffer
        | E::InvalidOffset(_)
        | E::TensorInvalidInfo
        | E::ValidationOverflow => "truncated or not a dltool head file".to_string(),
        other => format!("not a dltool head file ({other})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logistic_head() -> Head {
        Head {
            model: HeadModel::Logistic {
                model: LogisticModel {
                    num_classes: 2,
                    dim: 3,
                    coefficients: vec![0.5, -1.0, 0.25, -0.5, 1.0, -0.25],
                    intercepts: vec![0.1, -0.1],
                },
                params: LogisticParams::default(),
            },
            classes: vec!["daisy".into(), "tulips".into()],
            feature_dim: 3,
            provenance: FeatureMeta {
                backbone: "inception_v3/tf2015".into(),
                weights_sha256: "ab".repeat(32),
                layer: "mixed_7c".into(),
                pool: "avg".into(),
                tta: "none".into(),
                dltool_version: env!("CARGO_PKG_VERSION").into(),
            },
            preprocess: Some(Preprocess {
                width: 299,
                height: 299,
                mean: [128.0; 3],
                std: [128.0; 3],
                resize: Resize::Stretch,
                channels: ChannelOrder::Rgb,
            }),
            dltool_version: env!("CARGO_PKG_VERSION").into(),
            training: TrainingSummary {
                rows: 10,
                train_accuracy: 0.9,
                iterations: 12,
                converged: true,
            },
        }
    }

    #[test]
    fn a_summary_without_training_accuracy_reads_back() {
        let summary = TrainingSummary {
            rows: 600,
            train_accuracy: f64::NAN,
            iterations: 3,
            converged: true,
        };
        let json = serde_json::to_string(&summary).unwrap();
        let back: TrainingSummary = serde_json::from_str(&json).unwrap();
        assert_eq!((back.rows, back.iterations, back.converged), (600, 3, true));
        assert!(back.train_accuracy.is_nan());
    }

    #[test]
    fn logistic_head_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.safetensors");
        let head = logistic_head();
        head.save(&p).unwrap();
        let back = Head::load(&p).unwrap();
        assert_eq!(back, head);
        let probs = back.predict_proba(&[1.0, 2.0, 3.0], 1);
        assert!((probs.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn foreign_versions_and_damage_are_refused() {
        assert!(check_version_compatible(env!("CARGO_PKG_VERSION")).is_ok());
        let err = check_version_compatible("99.0.0").unwrap_err();
        assert!(err.contains("train it again"), "{err}");
        assert!(check_version_compatible("banana").is_err());

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.safetensors");
        logistic_head().save(&p).unwrap();
        let mut bytes = std::fs::read(&p).unwrap();
        bytes.truncate(bytes.len() - 5);
        std::fs::write(&p, &bytes).unwrap();
        let err = Head::load(&p).unwrap_err();
        assert!(err.starts_with(&p.display().to_string()), "{err}");
        std::fs::write(&p, b"hello").unwrap();
        assert!(Head::load(&p).unwrap_err().contains("not a dltool head"));
    }

    #[test]
    fn features_from_elsewhere_are_refused() {
        let head = logistic_head();
        assert!(head.check_features(3, None).is_ok());
        assert!(
            head.check_features(4, None)
                .unwrap_err()
                .contains("4 columns")
        );
        let mut other = head.provenance.clone();
        other.layer = "mixed_6e".into();
        let err = head.check_features(3, Some(&other)).unwrap_err();
        assert!(err.contains("layer mixed_6e"), "{err}");
        let mut flipped = head.provenance.clone();
        flipped.tta = "flip".into();
        let err = head.check_features(3, Some(&flipped)).unwrap_err();
        assert!(
            err.contains("test-time augmentation flip, the head with none"),
            "{err}"
        );
    }
}
