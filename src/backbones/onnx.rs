//! The row of the network table for the user's own ONNX model (`--weights MODEL.onnx` or
//! `--backbone onnx`): [`crate::onnx_net`] runs it; this module fits it to [`Network`].
//!
//! What differs from the built-in networks: the layers are the model's nodes (the one read is
//! cut out when loading), the preprocessing is the user's (`--preprocess` and overrides) and
//! is recorded whole in the provenance (`onnx/224x224_crop_RGB_mean..._std...`), and a model
//! imported with `dltool weights import MODEL.onnx --name NAME` lives in
//! `$DLTOOL_HOME/weights/onnx/NAME.onnx`, where `--weights NAME` and `predict` (by SHA-256)
//! find it.

use super::{LayerShape, LoadError, LoadOptions, Network, Pool, Spec};
use crate::image_io::Preprocess;
use crate::onnx_net::{Layout, OnnxChoice, OnnxModel, OnnxNet, OnnxOptions};
use std::path::{Path, PathBuf};

pub static SPEC: Spec = Spec {
    name: "onnx",
    title: "ONNX model",
    help: "your own ONNX image model (--weights MODEL.onnx, with --preprocess)",
    input: [224, 224],
    preprocess: Preprocess::from_spec,
    // The model's nodes: `dltool inspect MODEL.onnx` lists them.
    layers: &[],
    // Empty: the model's first output.
    default_layer: "",
    variants: &[],
    // Recognised by the `.onnx` extension (see `is_onnx_path`), never by tensor names.
    recognise: |_| false,
    files: &[],
    registry_entry: "",
    gpu: false,
    load: load_network,
};

/// An ONNX file by its name: `.onnx`, any case.
pub fn is_onnx_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("onnx"))
}

/// Where imported models live: `$DLTOOL_HOME/weights/onnx/`.
pub fn models_dir() -> Option<PathBuf> {
    crate::weights::home_dir().map(|h| h.join("weights").join("onnx"))
}

/// An imported model by the name it was imported as.
pub fn find_by_name(name: &str) -> Option<PathBuf> {
    if !valid_name(name) {
        return None;
    }
    let p = models_dir()?.join(format!("{name}.onnx"));
    p.is_file().then_some(p)
}

/// An imported model whose SHA-256 is `sha` (what a head records), if one is.
pub fn find_by_sha256(sha: &str) -> Option<PathBuf> {
    let dir = models_dir()?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_onnx_path(p))
        .collect();
    files.sort();
    files
        .into_iter()
        .find(|p| crate::weights::sha256_file(p).is_ok_and(|s| s == sha))
}

/// Letters, digits, `_`, `-` and `.`, not starting with a dot: a file name in the cache.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// `weights import MODEL.onnx --name NAME`: checks that the model opens (a valid ONNX graph with
/// an image input and ops the engine has), then copies it into the cache atomically. Refuses
/// to replace a different model of the same name.
pub fn import(file: &Path, name: &str, choice: &OnnxChoice) -> Result<PathBuf, String> {
    if !valid_name(name) {
        return Err(format!(
            "--name {name}: use letters, digits, '_', '-' and '.' (the name of a file in the cache)"
        ));
    }
    OnnxModel::open(file, &choice.limits).map_err(|e| e.to_string())?;
    let dir = models_dir().ok_or(
        "no cache directory on this system: set DLTOOL_HOME to a folder for dltool's weights",
    )?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: cannot create: {e}", dir.display()))?;
    let dest = dir.join(format!("{name}.onnx"));
    let sha = |p: &Path| {
        crate::weights::sha256_file(p).map_err(|e| format!("{}: cannot read: {e}", p.display()))
    };
    let new_sha = sha(file)?;
    if dest.exists() {
        if sha(&dest)? == new_sha {
            return Ok(dest);
        }
        return Err(format!(
            "{}: another model is already imported as '{name}'; pick another --name or remove it",
            dest.display()
        ));
    }
    let tmp = dir.join(format!(".{name}.onnx.tmp-{}", std::process::id()));
    std::fs::copy(file, &tmp).map_err(|e| format!("{}: cannot copy: {e}", file.display()))?;
    if sha(&tmp)? != new_sha {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("{}: changed while being copied", file.display()));
    }
    std::fs::rename(&tmp, &dest).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("{}: cannot install: {e}", dest.display())
    })?;
    Ok(dest)
}

fn load_network(path: &Path, opts: &LoadOptions) -> Result<Box<dyn Network>, LoadError> {
    opts.refuse_variant(path, SPEC.title)?;
    let default = OnnxChoice::default();
    let choice = opts.onnx.unwrap_or(&default);
    let requested = opts.layer.filter(|l| !l.is_empty());
    let onnx_err = |e: crate::onnx_net::OnnxError| LoadError::Other(e.to_string());
    let model = OnnxModel::open(path, &choice.limits).map_err(onnx_err)?;
    // The preprocessing is checked before the (slow) optimisation.
    let (height, width) = model.resolve_size(choice.size).map_err(onnx_err)?;
    let preprocess = choice
        .preprocess
        .resolve(width as u32, height as u32)
        .ok_or_else(|| {
            LoadError::Other(format!(
                "{}: say how the model's input is preprocessed with --preprocess PRESET ({}), or \
                 give --mean and --std; an ONNX file does not record it",
                path.display(),
                crate::onnx_net::PRESETS
            ))
        })?;
    let net = OnnxNet::from_model(
        model,
        &OnnxOptions {
            layer: requested.map(str::to_string),
            size: choice.size,
            limits: choice.limits,
        },
    )
    .map_err(onnx_err)?;
    let network = OnnxNetwork {
        requested: requested.map(str::to_string),
        net,
        preprocess,
    };
    // One image through the plan now, so that an engine failure is a load error (one line)
    // rather than a failure in the middle of a run.
    let zeros = vec![0f32; network.net.input_len()];
    network
        .net
        .run(&zeros, 1)
        .map_err(|e| LoadError::Other(e.to_string()))?;
    Ok(Box::new(network))
}

/// A loaded ONNX model reading one node.
pub struct OnnxNetwork {
    net: OnnxNet,
    /// What `--layer` said (a node or tensor name), if anything.
    requested: Option<String>,
    preprocess: Preprocess,
}

impl OnnxNetwork {
    fn is_layer(&self, layer: &str) -> bool {
        layer.is_empty() || layer == self.net.node || self.requested.as_deref() == Some(layer)
    }

    /// The output as `[C, H, W]` (channel-major) or a vector.
    fn shape(&self) -> LayerShape {
        match (self.net.output_shape.as_slice(), self.net.input.layout) {
            ([c, h, w], Layout::Nchw) => LayerShape::Map([*c, *h, *w]),
            ([h, w, c], Layout::Nhwc) => LayerShape::Map([*c, *h, *w]),
            // Tokens [T, D]: D "channels" over T positions, one row of width 1.
            ([t, d], _) => LayerShape::Map([*d, *t, 1]),
            (dims, _) => LayerShape::Flat(dims.iter().product()),
        }
    }

    /// True when the output's features are already probabilities: every row non-negative and
    /// summing to 1 (within 1e-3). Otherwise `classify` applies a softmax.
    fn are_probabilities(rows: &[f32], k: usize) -> bool {
        rows.chunks_exact(k).all(|r| {
            r.iter().all(|&p| p >= 0.0)
                && (r.iter().map(|&p| f64::from(p)).sum::<f64>() - 1.0).abs() <= 1e-3
        })
    }
}

impl Network for OnnxNetwork {
    fn spec(&self) -> &'static Spec {
        &SPEC
    }

    fn provenance(&self) -> String {
        format!("{}/{}", SPEC.name, self.preprocess.spec())
    }

    fn preprocess(&self) -> Preprocess {
        self.preprocess
    }

    fn layers(&self) -> Vec<String> {
        vec![self.net.node.clone()]
    }

    fn default_layer(&self) -> String {
        self.net.node.clone()
    }

    fn layer_shape(&self, layer: &str) -> Option<LayerShape> {
        self.is_layer(layer).then(|| self.shape())
    }

    fn features(&self, pixels: &[f32], n: usize, _layer: &str, pool: Pool) -> Vec<f32> {
        let out = self
            .net
            .features(pixels, n, pool)
            .unwrap_or_else(|e| panic!("{e}"));
        if pool != Pool::None {
            return out;
        }
        // Unpooled maps channel-major, as the built-in networks give them.
        match self.shape() {
            LayerShape::Map([c, h, w])
                if !matches!(
                    (self.net.output_shape.len(), self.net.input.layout),
                    (3, Layout::Nchw)
                ) =>
            {
                positions_to_channel_major(&out, n, c, h * w)
            }
            _ => out,
        }
    }

    fn num_classes(&self) -> Option<usize> {
        match self.shape() {
            LayerShape::Flat(k) if k > 1 => Some(k),
            _ => None,
        }
    }

    fn classify(&self, pixels: &[f32], n: usize) -> Option<Vec<f32>> {
        let k = self.num_classes()?;
        let mut out = self.net.run(pixels, n).unwrap_or_else(|e| panic!("{e}"));
        if !Self::are_probabilities(&out, k) {
            for row in out.chunks_exact_mut(k) {
                softmax_in_place(row);
            }
        }
        Some(out)
    }
}

/// `[positions, channels]` per image → `[channels, positions]`.
fn positions_to_channel_major(x: &[f32], n: usize, c: usize, positions: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (src, dst) in x
        .chunks_exact(c * positions)
        .zip(out.chunks_exact_mut(c * positions))
        .take(n)
    {
        for p in 0..positions {
            for ch in 0..c {
                dst[ch * positions + p] = src[p * c + ch];
            }
        }
    }
    out
}

fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    for v in row.iter_mut() {
        *v = (f64::from(*v) / sum) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probabilities_are_told_from_logits() {
        assert!(OnnxNetwork::are_probabilities(&[0.25, 0.75, 1.0, 0.0], 2));
        assert!(!OnnxNetwork::are_probabilities(&[2.0, -1.0], 2));
        assert!(!OnnxNetwork::are_probabilities(&[0.5, 0.4], 2));
        let mut row = [1.0f32, 1.0, 1.0, 1.0];
        softmax_in_place(&mut row);
        assert!(row.iter().all(|&p| (p - 0.25).abs() < 1e-7));
    }

    #[test]
    fn token_rows_become_channel_major() {
        // Two positions of three channels.
        assert_eq!(
            positions_to_channel_major(&[1., 2., 3., 4., 5., 6.], 1, 3, 2),
            [1., 4., 2., 5., 3., 6.]
        );
    }

    #[test]
    fn import_names_are_file_names() {
        assert!(valid_name("my_convnext-v2.1"));
        assert!(!valid_name("../x"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name(""));
    }
}
