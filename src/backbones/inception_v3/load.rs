//! Reading InceptionV3 weight files (safetensors, PyTorch state dicts) into [`InceptionV3`].

use super::{BlockVariant, InceptionV3, InceptionV3Config};
use burn::prelude::*;
use std::path::Path;

/// Tensor names an error message lists before it gives a count.
const SHOWN: usize = 5;

/// A weight file's tensors could not become an [`InceptionV3`]. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error(
        "{path}: cannot tell which InceptionV3 variant this file holds (no 'variant' metadata, \
         no known file name, no fc layer): pass --variant tf2015 or --variant torchvision"
    )]
    UnknownVariant { path: String },
    #[error(
        "{path}: missing tensor(s): {}",
        crate::backbones::list_names(names, SHOWN)
    )]
    Missing { path: String, names: Vec<String> },
    #[error(
        "{path}: unexpected tensor(s) that are not part of InceptionV3: {}",
        crate::backbones::list_names(names, SHOWN)
    )]
    Unexpected { path: String, names: Vec<String> },
    #[error("{path}: {}", problems.join("; "))]
    Mismatch { path: String, problems: Vec<String> },
}

/// Which reader a weight file needs, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Safetensors,
    /// `torch.save` output: a zip archive, or a legacy raw pickle.
    Pytorch,
}

/// Tensors a state dict may carry beyond the feature extractor; they are ignored.
fn ignorable(name: &str) -> bool {
    name.starts_with("AuxLogits.") || name.ends_with(".num_batches_tracked")
}

/// Reads the safetensors header's `__metadata__` map without mapping the whole file.
pub fn safetensors_metadata(
    path: &Path,
) -> Result<std::collections::HashMap<String, String>, String> {
    let value = crate::backbones::weight_file::safetensors_header(path)?;
    Ok(value
        .get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default())
}

pub fn detect_format(path: &Path) -> Result<WeightFormat, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut head = [0u8; 9];
    let n = f.read(&mut head).map_err(|e| e.to_string())?;
    // Safetensors first: its 8-byte header length can start with bytes that look like a pickle.
    if n == 9 && head[8] == b'{' {
        return Ok(WeightFormat::Safetensors);
    }
    if n >= 2 && head[0] == b'P' && head[1] == b'K' {
        return Ok(WeightFormat::Pytorch);
    }
    // A raw pickle starts with the PROTO opcode.
    if n >= 2 && head[0] == 0x80 && head[1] <= 5 {
        return Ok(WeightFormat::Pytorch);
    }
    Err("not a safetensors or PyTorch weight file".to_string())
}

/// What the loader found out about a weight file besides its tensors.
#[derive(Debug, Clone)]
pub struct LoadedWeights {
    pub config: InceptionV3Config,
    pub format: WeightFormat,
}

/// Loads InceptionV3 weights from safetensors or a PyTorch state dict with torchvision names,
/// then folds BatchNorm. `variant` overrides what the file says about its block layout.
///
/// Every missing tensor, every unknown extra tensor and every shape mismatch is reported by
/// name; `AuxLogits.*` and `num_batches_tracked` are ignored, `fc.*` becomes the classifier.
pub fn load(
    path: &Path,
    variant: Option<BlockVariant>,
    device: &Device,
) -> Result<(InceptionV3, LoadedWeights), LoadError> {
    use burn::store::SafetensorsStore;
    use burn::store::{ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter, PytorchStore};

    let shown = path.display().to_string();
    let read_err = |message: String| LoadError::Read {
        path: shown.clone(),
        message,
    };
    let format = detect_format(path).map_err(read_err)?;

    enum Store {
        St(SafetensorsStore),
        Pt(PytorchStore),
    }
    let (mut store, metadata) = match format {
        WeightFormat::Safetensors => {
            let metadata = safetensors_metadata(path).map_err(read_err)?;
            let store = SafetensorsStore::from_file(path)
                .with_from_adapter(PyTorchToBurnAdapter)
                .allow_partial(true)
                .validate(false);
            (Store::St(store), metadata)
        }
        WeightFormat::Pytorch => {
            let store = PytorchStore::from_file(path)
                .allow_partial(true)
                .validate(false);
            (Store::Pt(store), Default::default())
        }
    };

    // Shape of `fc.weight`, if any, tells both the class count and (for unlabelled files)
    // which training run this is.
    let fc_rows = {
        let tensor = match &mut store {
            Store::St(s) => s.get_tensor("fc.weight").map_err(|e| e.to_string()),
            Store::Pt(s) => s.get_tensor("fc.weight").map_err(|e| e.to_string()),
        }
        .map_err(read_err)?;
        // `Shape::dims::<2>()` panics below rank 2: a malformed fc must be an error instead.
        match tensor.map(|t| t.shape.to_vec()) {
            None => None,
            Some(dims) if dims.len() == 2 => Some(dims[0]),
            Some(dims) => {
                return Err(LoadError::Mismatch {
                    path: shown,
                    problems: vec![format!(
                        "fc.weight has shape {dims:?}, expected [classes, 2048]"
                    )],
                });
            }
        }
    };

    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let from_metadata = match metadata.get("variant") {
        Some(v) => Some(v.parse::<BlockVariant>().map_err(|e| LoadError::Read {
            path: shown.clone(),
            message: format!("metadata 'variant': {e}"),
        })?),
        None => None,
    };
    let variant = variant
        .or(from_metadata)
        .or_else(|| {
            if file_name.contains("inception-2015-12-05") {
                Some(BlockVariant::Tf2015)
            } else if file_name.contains("inception_v3_google") {
                Some(BlockVariant::Torchvision)
            } else {
                None
            }
        })
        .or(match fc_rows {
            Some(1008) => Some(BlockVariant::Tf2015),
            Some(1000) => Some(BlockVariant::Torchvision),
            _ => None,
        })
        .ok_or_else(|| LoadError::UnknownVariant {
            path: shown.clone(),
        })?;

    let mut config = InceptionV3Config::new(variant).with_num_classes(fc_rows);
    if let Some(eps) = metadata.get("bn_eps").and_then(|e| e.parse().ok()) {
        config.bn_eps = eps;
    }
    let mut model = config.init(device);
    let result = match &mut store {
        Store::St(s) => model.load_from(s).map_err(|e| e.to_string()),
        Store::Pt(s) => model.load_from(s).map_err(|e| e.to_string()),
    }
    .map_err(read_err)?;

    if !result.missing.is_empty() {
        let mut names: Vec<String> = result
            .missing
            .iter()
            .map(|(p, _)| burn_to_torch_name(p))
            .collect();
        names.sort();
        return Err(LoadError::Missing { path: shown, names });
    }
    if !result.errors.is_empty() {
        let mut problems: Vec<String> = result.errors.iter().map(describe).collect();
        let more = problems.len().saturating_sub(SHOWN);
        problems.truncate(SHOWN);
        if more > 0 {
            problems.push(format!("{more} more"));
        }
        return Err(LoadError::Mismatch {
            path: shown,
            problems,
        });
    }
    let mut unexpected: Vec<String> = result
        .unused
        .iter()
        .filter(|n| !ignorable(n))
        .cloned()
        .collect();
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(LoadError::Unexpected {
            path: shown,
            names: unexpected,
        });
    }
    // Published checkpoints come in f16, bf16 or f64 too: every kernel here computes in f32.
    let mut model = model.map(&mut ToF32);
    check_finite(&model, path)?;
    model.fold_batchnorm();
    Ok((model, LoadedWeights { config, format }))
}

/// Error messages speak the file's language (`bn.weight`), not burn's (`bn.gamma`).
fn burn_to_torch_name(name: &str) -> String {
    if let Some(prefix) = name.strip_suffix(".gamma") {
        format!("{prefix}.weight")
    } else if let Some(prefix) = name.strip_suffix(".beta") {
        format!("{prefix}.bias")
    } else {
        name.to_string()
    }
}

/// A loader problem in the file's words: its tensor names, plain shapes.
fn describe(e: &burn::store::ApplyError) -> String {
    use burn::store::ApplyError;
    match e {
        ApplyError::ShapeMismatch {
            path,
            expected,
            found,
        } => format!(
            "{} has shape {:?}, expected {:?}",
            burn_to_torch_name(path),
            found.as_slice(),
            expected.as_slice()
        ),
        ApplyError::DTypeMismatch {
            path,
            expected,
            found,
        } => format!(
            "{} is {found:?}, expected {expected:?}",
            burn_to_torch_name(path)
        ),
        ApplyError::AdapterError { path, message } | ApplyError::LoadError { path, message } => {
            format!("{}: {message}", burn_to_torch_name(path))
        }
    }
}

/// Casts every float parameter to f32.
struct ToF32;

impl burn::module::ModuleMapper for ToF32 {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<D>>,
    ) -> burn::module::Param<Tensor<D>> {
        param.map(|t| {
            if t.dtype() == burn::tensor::DType::F32 {
                t
            } else {
                t.cast(burn::tensor::DType::F32)
            }
        })
    }
}

/// Refuses NaN and infinities, naming the tensor as the file does.
fn check_finite(model: &InceptionV3, path: &Path) -> Result<(), LoadError> {
    use burn::store::ModuleSnapshot;
    for t in model.collect(None, None, true) {
        if t.dtype != burn::tensor::DType::F32 {
            continue;
        }
        let Ok(bytes) = t.to_bytes() else { continue };
        let bad = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .find(|v| !v.is_finite());
        if let Some(v) = bad {
            let name = burn_to_torch_name(&t.name);
            return Err(LoadError::Mismatch {
                path: path.display().to_string(),
                problems: vec![format!(
                    "tensor {name} holds {}: refusing weights that are not finite",
                    if v.is_nan() { "NaN" } else { "an infinity" }
                )],
            });
        }
    }
    Ok(())
}
