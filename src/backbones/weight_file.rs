//! What a weight file holds, read cheaply (the safetensors header, the `.pth` pickle's index,
//! a TF.js manifest) without loading a tensor: enough to tell which network it is for.

use std::path::Path;

/// The JSON header of a safetensors file (tensor name -> dtype, shape, offsets, and
/// `__metadata__`), read without mapping the file.
pub fn safetensors_header(
    path: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| "file too short for a safetensors header".to_string())?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(format!("safetensors header claims {len} bytes"));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| "truncated safetensors header".to_string())?;
    serde_json::from_slice(&header).map_err(|e| format!("bad safetensors header: {e}"))
}

/// The container a weight file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Safetensors,
    /// `torch.save` output (zip or legacy pickle).
    Pytorch,
    /// A TF.js Layers `model.json` (weights in shards beside it).
    TfjsModel,
}

/// A weight file's container and tensor names (in the file's order where it has one).
#[derive(Debug, Clone)]
pub struct WeightIndex {
    pub container: Container,
    pub names: Vec<String>,
}

impl WeightIndex {
    /// Reads the names of `path` (a file, a TF.js `model.json` or the folder holding one).
    pub fn read(path: &Path) -> Result<Self, String> {
        if path.file_name().is_some_and(|n| n == "model.json") {
            return Self::tfjs(path);
        }
        if path.is_dir() {
            return Self::tfjs(&path.join("model.json"));
        }
        match super::inception_v3::detect_format(path)? {
            super::inception_v3::WeightFormat::Safetensors => Self::safetensors(path),
            super::inception_v3::WeightFormat::Pytorch => Self::pytorch(path),
        }
    }

    fn safetensors(path: &Path) -> Result<Self, String> {
        // serde_json keeps the header's order only with a feature dltool does not enable: the
        // names are sorted, which is all recognition needs.
        let names = safetensors_header(path)?
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        Ok(Self {
            container: Container::Safetensors,
            names,
        })
    }

    fn pytorch(path: &Path) -> Result<Self, String> {
        use burn::store::{ModuleStore, PytorchStore};
        // Reads the pickle (names, shapes, offsets), not the tensors' data.
        let mut store = PytorchStore::from_file(path);
        let mut names = store.keys().map_err(|e| e.to_string())?;
        names.sort();
        Ok(Self {
            container: Container::Pytorch,
            names,
        })
    }

    fn tfjs(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("not valid JSON: {e}"))?;
        let names = json["weightsManifest"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|group| group["weights"].as_array().into_iter().flatten())
            .filter_map(|w| w["name"].as_str().map(str::to_string))
            .collect();
        Ok(Self {
            container: Container::TfjsModel,
            names,
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// True when some name contains `part`.
    pub fn any_contains(&self, part: &str) -> bool {
        self.names.iter().any(|n| n.contains(part))
    }

    /// The first `n` names, for a message (`_conv_stem.weight, ...`).
    pub fn sample(&self, n: usize) -> String {
        let shown: Vec<&str> = self.names.iter().take(n).map(String::as_str).collect();
        if self.names.len() > n {
            format!("{}, ...", shown.join(", "))
        } else {
            shown.join(", ")
        }
    }
}
