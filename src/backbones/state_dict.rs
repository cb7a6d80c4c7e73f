//! A PyTorch-style state dict (safetensors or `torch.save` output) read tensor by tensor as
//! f32, for networks that are assembled straight on the CPU engine from named tensors (no burn
//! module in between): ResNet and VGG take their depth and widths from the shapes found here.
//!
//! Every problem is one line naming the file: a missing tensor, a shape that does not fit, a
//! tensor the network does not use, a NaN or infinity.

use burn::store::{ModuleStore, PytorchStore, SafetensorsStore};
use std::collections::BTreeSet;
use std::path::Path;

/// Why a state dict could not be turned into a network.
#[derive(Debug, thiserror::Error)]
pub enum StateDictError {
    #[error("{path}: cannot read weights: {message}")]
    Read { path: String, message: String },
    #[error("{path}: missing tensor {name}: not a {network} state dict (it has {sample})")]
    Missing {
        path: String,
        name: String,
        network: &'static str,
        sample: String,
    },
    #[error("{path}: {name} has shape {found:?}, expected {expected}")]
    Shape {
        path: String,
        name: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("{path}: unexpected tensor(s) that are not part of {network}: {names}")]
    Unexpected {
        path: String,
        network: &'static str,
        names: String,
    },
    #[error("{path}: tensor {name} holds {what}: refusing weights that are not finite")]
    NotFinite {
        path: String,
        name: String,
        what: &'static str,
    },
    /// The tensors are there but do not make the network (a VGG with 14 convolutions).
    #[error("{path}: {message}")]
    Layout { path: String, message: String },
}

enum Store {
    Safetensors(Box<SafetensorsStore>),
    Pytorch(Box<PytorchStore>),
}

/// One tensor: its shape and values.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The tensors of one weight file, read on demand; remembers which were used so that
/// [`StateDict::finish`] can refuse leftovers.
pub struct StateDict {
    path: String,
    network: &'static str,
    store: Store,
    names: BTreeSet<String>,
    used: BTreeSet<String>,
}

impl StateDict {
    /// Opens `path` (format from its first bytes) for `network` (named in messages).
    pub fn open(path: &Path, network: &'static str) -> Result<Self, StateDictError> {
        let shown = path.display().to_string();
        let read_err = |message: String| StateDictError::Read {
            path: shown.clone(),
            message,
        };
        let format = crate::backbones::inception_v3::detect_format(path).map_err(read_err)?;
        let mut store = match format {
            crate::backbones::inception_v3::WeightFormat::Safetensors => {
                Store::Safetensors(Box::new(SafetensorsStore::from_file(path)))
            }
            crate::backbones::inception_v3::WeightFormat::Pytorch => {
                Store::Pytorch(Box::new(PytorchStore::from_file(path)))
            }
        };
        let names = match &mut store {
            Store::Safetensors(s) => s.keys().map_err(|e| e.to_string()),
            Store::Pytorch(s) => s.keys().map_err(|e| e.to_string()),
        }
        .map_err(read_err)?;
        Ok(Self {
            path: shown,
            network,
            store,
            names: names.into_iter().collect(),
            used: BTreeSet::new(),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The shape of `name` without reading its values.
    pub fn shape(&mut self, name: &str) -> Result<Vec<usize>, StateDictError> {
        if !self.has(name) {
            return Err(self.missing(name));
        }
        let path = self.path.clone();
        let t = match &mut self.store {
            Store::Safetensors(s) => s.get_tensor(name).map_err(|e| e.to_string()),
            Store::Pytorch(s) => s.get_tensor(name).map_err(|e| e.to_string()),
        }
        .map_err(|message| StateDictError::Read { path, message })?;
        Ok(t.map(|t| t.shape.to_vec()).unwrap_or_default())
    }

    fn missing(&self, name: &str) -> StateDictError {
        let names: Vec<String> = self.names.iter().take(3).cloned().collect();
        let sample = if self.names.is_empty() {
            "no tensors".to_string()
        } else if self.names.len() > 3 {
            format!("{}, ... ({} in all)", names.join(", "), self.names.len())
        } else {
            names.join(", ")
        };
        StateDictError::Missing {
            path: self.path.clone(),
            name: name.to_string(),
            network: self.network,
            sample,
        }
    }

    /// Reads `name` as f32 (f16, bf16 and f64 files are converted), refusing NaN and
    /// infinities, and marks it used.
    pub fn take(&mut self, name: &str) -> Result<Tensor, StateDictError> {
        if !self.has(name) {
            return Err(self.missing(name));
        }
        let path = self.path.clone();
        let read_err = |message: String| StateDictError::Read {
            path: path.clone(),
            message: format!("{name}: {message}"),
        };
        let pack = match &mut self.store {
            Store::Safetensors(s) => s.get_tensor(name).map_err(|e| e.to_string()),
            Store::Pytorch(s) => s.get_tensor(name).map_err(|e| e.to_string()),
        }
        .map_err(read_err)?
        .ok_or_else(|| read_err("listed but not readable".into()))?;
        let shape = pack.shape.to_vec();
        let data = burn::store::bridge::to_data(pack)
            .map_err(|e| read_err(e.to_string()))?
            .convert::<f32>()
            .try_into_vec::<f32>()
            .map_err(|e| read_err(format!("{e:?}")))?;
        if let Some(v) = data.iter().find(|v| !v.is_finite()) {
            return Err(StateDictError::NotFinite {
                path,
                name: name.to_string(),
                what: if v.is_nan() { "NaN" } else { "an infinity" },
            });
        }
        self.used.insert(name.to_string());
        Ok(Tensor { shape, data })
    }

    /// [`Self::take`], checking the shape: `expected[i] == None` accepts any size there.
    pub fn take_shaped(
        &mut self,
        name: &str,
        expected: &[Option<usize>],
    ) -> Result<Tensor, StateDictError> {
        let t = self.take(name)?;
        let fits = t.shape.len() == expected.len()
            && t.shape
                .iter()
                .zip(expected)
                .all(|(s, e)| e.is_none_or(|e| e == *s));
        if !fits {
            let want: Vec<String> = expected
                .iter()
                .map(|e| e.map_or("_".to_string(), |e| e.to_string()))
                .collect();
            return Err(StateDictError::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                found: t.shape,
                expected: format!("[{}]", want.join(", ")),
            });
        }
        Ok(t)
    }

    /// A layout problem in this file's words.
    pub fn layout_error(&self, message: impl Into<String>) -> StateDictError {
        StateDictError::Layout {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// Refuses tensors no layer took (BatchNorm's `num_batches_tracked` counters aside): a
    /// file with more in it than the network is another network.
    pub fn finish(self) -> Result<(), StateDictError> {
        let left: Vec<&String> = self
            .names
            .iter()
            .filter(|n| !self.used.contains(*n) && !n.ends_with(".num_batches_tracked"))
            .collect();
        if left.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = left.iter().take(5).map(|s| s.as_str()).collect();
        let names = if left.len() > 5 {
            format!("{}, ... ({} in all)", shown.join(", "), left.len())
        } else {
            shown.join(", ")
        };
        Err(StateDictError::Unexpected {
            path: self.path,
            network: self.network,
            names,
        })
    }
}

/// A convolution followed by BatchNorm (`eps`), folded into one weight and bias: the weight
/// `[cout][cin][kh][kw]` scaled per output channel by `gamma / sqrt(var + eps)`, the bias
/// `beta - mean * gamma / sqrt(var + eps)`.
pub fn fold_batchnorm(
    weight: &mut [f32],
    cout: usize,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f32,
) -> Vec<f32> {
    let per = weight.len() / cout;
    let mut bias = Vec::with_capacity(cout);
    for co in 0..cout {
        // In f64: var + eps for tiny variances loses digits in f32.
        let scale = gamma[co] as f64 / (var[co] as f64 + eps as f64).sqrt();
        for w in &mut weight[co * per..(co + 1) * per] {
            *w = (*w as f64 * scale) as f32;
        }
        bias.push((beta[co] as f64 - mean[co] as f64 * scale) as f32);
    }
    bias
}
