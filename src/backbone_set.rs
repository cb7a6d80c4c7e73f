//! Several networks as one feature extractor (`featurize --backbone inception_v3,efficientnet_lite2`):
//! each image is decoded once, each network gets its own preprocessing of it, and a row is the
//! networks' features concatenated in the order given.
//!
//! Provenance stays one [`FeatureMeta`]: each field holds the parts' values joined with `+` in
//! the same order (`inception_v3/tf2015+efficientnet_lite2/260`, `mixed_7c+head`, ...), so
//! feature files, journals and heads keep their format, and a set of one network is exactly the
//! provenance that network always had.

use crate::backbone::{Backbone, BackboneOptions};
use crate::features::FeatureMeta;
use crate::image_io::Preprocess;
use burn::prelude::Device;

/// Joins the parts of a set's provenance fields.
pub const SEPARATOR: char = '+';

/// Why a set of networks could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("no network named")]
    Empty,
    #[error(
        "{first} and {second} are the same network ({backbone}, weights sha256 {sha}): name \
         each network once"
    )]
    Twice {
        first: String,
        second: String,
        backbone: String,
        sha: String,
    },
    #[error(
        "{weights}: its {field} `{value}` contains `+`, which separates the networks of a set \
         in provenance: use it alone"
    )]
    Separator {
        weights: String,
        field: &'static str,
        value: String,
    },
}

/// Networks run together; a row is their features side by side, in order.
pub struct BackboneSet {
    pub parts: Vec<Backbone>,
    /// Every part's provenance, joined field by field (see the module doc).
    pub meta: FeatureMeta,
}

impl BackboneSet {
    /// Loads one network per options, in order, on `device`.
    pub fn load(opts: &[BackboneOptions], device: Device) -> anyhow::Result<BackboneSet> {
        let parts = opts
            .iter()
            .map(|o| Backbone::load(o, device.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(BackboneSet::new(parts)?)
    }

    /// A set of networks already loaded; refuses the same weights twice.
    pub fn new(parts: Vec<Backbone>) -> Result<BackboneSet, SetError> {
        if parts.is_empty() {
            return Err(SetError::Empty);
        }
        for (i, a) in parts.iter().enumerate() {
            if let Some(b) = parts[i + 1..].iter().find(|b| {
                a.meta.backbone == b.meta.backbone && a.meta.weights_sha256 == b.meta.weights_sha256
            }) {
                return Err(SetError::Twice {
                    first: a.weights_path.display().to_string(),
                    second: b.weights_path.display().to_string(),
                    backbone: a.meta.backbone.clone(),
                    sha: a.meta.weights_sha256.clone(),
                });
            }
        }
        if parts.len() > 1 {
            for p in &parts {
                check_no_separator(p)?;
            }
        }
        let meta = combine(&parts.iter().map(|p| p.meta.clone()).collect::<Vec<_>>());
        Ok(BackboneSet { parts, meta })
    }

    /// Length of one row: the parts' lengths added.
    pub fn dim(&self) -> usize {
        self.parts.iter().map(Backbone::dim).sum()
    }

    /// What each part wants of a decoded image, in order.
    pub fn preprocesses(&self) -> Vec<Preprocess> {
        self.parts.iter().map(|p| p.preprocess).collect()
    }

    /// Features of `n` images: `pixels[k]` holds the images preprocessed for part `k`
    /// (`n * parts[k].input_len()` floats); returns `n * dim()` floats, each row the parts'
    /// features in order.
    pub fn features(&self, pixels: Vec<Vec<f32>>, n: usize) -> Vec<f32> {
        debug_assert_eq!(pixels.len(), self.parts.len());
        if self.parts.len() == 1 {
            let px = pixels.into_iter().next().expect("one part, one batch");
            return self.parts[0].features(px, n);
        }
        let outputs: Vec<Vec<f32>> = self
            .parts
            .iter()
            .zip(pixels)
            .map(|(part, px)| part.features(px, n))
            .collect();
        interleave(
            &outputs,
            &self.parts.iter().map(Backbone::dim).collect::<Vec<_>>(),
            n,
        )
    }
}

/// One network as a set (for callers that load one `Backbone` and run the featurizing loop).
impl From<Backbone> for BackboneSet {
    fn from(part: Backbone) -> BackboneSet {
        BackboneSet {
            meta: part.meta.clone(),
            parts: vec![part],
        }
    }
}

/// Rows of `n` images from per-part row blocks: row `r` is `outputs[0][r]`, `outputs[1][r]`, ...
fn interleave(outputs: &[Vec<f32>], dims: &[usize], n: usize) -> Vec<f32> {
    let dim: usize = dims.iter().sum();
    let mut rows = Vec::with_capacity(n * dim);
    for r in 0..n {
        for (out, &d) in outputs.iter().zip(dims) {
            rows.extend_from_slice(&out[r * d..(r + 1) * d]);
        }
    }
    rows
}

/// A part whose own provenance holds the separator would be read back as two networks.
fn check_no_separator(part: &Backbone) -> Result<(), SetError> {
    let m = &part.meta;
    for (field, value) in [
        ("backbone", &m.backbone),
        ("layer", &m.layer),
        ("pool", &m.pool),
        ("test-time augmentation", &m.tta),
    ] {
        if value.contains(SEPARATOR) {
            return Err(SetError::Separator {
                weights: part.weights_path.display().to_string(),
                field,
                value: value.clone(),
            });
        }
    }
    Ok(())
}

/// The provenance of a set: each field the parts' values joined by [`SEPARATOR`]; one part's
/// provenance unchanged.
pub fn combine(parts: &[FeatureMeta]) -> FeatureMeta {
    let separator = SEPARATOR.to_string();
    let join = |f: fn(&FeatureMeta) -> &String| {
        parts
            .iter()
            .map(|p| f(p).as_str())
            .collect::<Vec<_>>()
            .join(separator.as_str())
    };
    FeatureMeta {
        backbone: join(|m| &m.backbone),
        weights_sha256: join(|m| &m.weights_sha256),
        layer: join(|m| &m.layer),
        pool: join(|m| &m.pool),
        tta: join(|m| &m.tta),
        dltool_version: parts
            .first()
            .map(|p| p.dltool_version.clone())
            .unwrap_or_default(),
    }
}

/// The parts of a set's provenance, in order (the inverse of [`combine`]); provenance whose
/// fields do not all split into the same number of parts is one network's, returned whole.
pub fn parts(meta: &FeatureMeta) -> Vec<FeatureMeta> {
    let split = |s: &str| -> Vec<String> { s.split(SEPARATOR).map(str::to_string).collect() };
    let backbone = split(&meta.backbone);
    let n = backbone.len();
    let fields = [
        split(&meta.weights_sha256),
        split(&meta.layer),
        split(&meta.pool),
        split(&meta.tta),
    ];
    if n == 1 || fields.iter().any(|f| f.len() != n) {
        return vec![meta.clone()];
    }
    let [sha, layer, pool, tta] = fields;
    (0..n)
        .map(|i| FeatureMeta {
            backbone: backbone[i].clone(),
            weights_sha256: sha[i].clone(),
            layer: layer[i].clone(),
            pool: pool[i].clone(),
            tta: tta[i].clone(),
            dltool_version: meta.dltool_version.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(backbone: &str, sha: &str, layer: &str) -> FeatureMeta {
        FeatureMeta {
            backbone: backbone.into(),
            weights_sha256: sha.into(),
            layer: layer.into(),
            pool: "avg".into(),
            tta: "none".into(),
            dltool_version: "0.1.0".into(),
        }
    }

    #[test]
    fn provenance_of_a_set_splits_back_into_its_parts() {
        let a = meta("inception_v3/tf2015", "aa", "mixed_7c");
        let b = meta("efficientnet_lite2/260", "bb", "head");
        let set = combine(&[a.clone(), b.clone()]);
        assert_eq!(set.backbone, "inception_v3/tf2015+efficientnet_lite2/260");
        assert_eq!(set.weights_sha256, "aa+bb");
        assert_eq!(set.pool, "avg+avg");
        assert_eq!(parts(&set), vec![a.clone(), b]);
        // One network: the provenance it always had, and it reads back whole.
        assert_eq!(combine(std::slice::from_ref(&a)), a);
        assert_eq!(parts(&a), vec![a]);
    }

    #[test]
    fn fields_that_disagree_on_the_count_read_as_one_network() {
        let odd = meta("onnx/a+b", "cc", "x");
        assert_eq!(parts(&odd), vec![odd]);
    }

    #[test]
    fn rows_are_the_parts_side_by_side() {
        let a = vec![1.0, 2.0, 3.0, 4.0]; // 2 rows of 2
        let b = vec![10.0, 20.0]; // 2 rows of 1
        assert_eq!(
            interleave(&[a, b], &[2, 1], 2),
            vec![1.0, 2.0, 10.0, 3.0, 4.0, 20.0]
        );
    }
}
