//! A trained head with the networks it was trained on: what `predict` and `serve` run on images.
//!
//! The head records each network's provenance (network, weights SHA-256, layer, pooling,
//! test-time augmentation, an ONNX model's preprocessing); the networks are rebuilt from that
//! record and checked against it, so a head never silently runs on features of another network.

use crate::backbone::{Backbone, BackboneKind, BackboneOptions, Pool, Tta};
use crate::backbone_set::BackboneSet;
use crate::features::FeatureMeta;
use crate::head::Head;
use crate::onnx_net::Limits;
use anyhow::bail;
use burn::prelude::Device;
use std::path::{Path, PathBuf};

/// Loads the networks `head` (read from `head_path`) was trained on, from `weights` (one per
/// network, in order, or none: where featurize finds them) and checks each against the head's
/// record. A head of unknown provenance (CSV features) runs on `weights` with only its width
/// checked.
pub fn backbone_for_head(
    head: &Head,
    head_path: &Path,
    weights: &[PathBuf],
    onnx_limits: Limits,
    device: Device,
) -> anyhow::Result<BackboneSet> {
    if head.provenance.backbone.is_empty() {
        backbone_of_unknown(head, head_path, weights, device)
    } else {
        backbone_of_provenance(head, head_path, weights, onnx_limits, device)
    }
}

/// The networks a head's provenance names, loaded as they were (each checked against its part
/// of the head's provenance), in the head's order.
fn backbone_of_provenance(
    head: &Head,
    head_path: &Path,
    weights: &[PathBuf],
    onnx_limits: Limits,
    device: Device,
) -> anyhow::Result<BackboneSet> {
    let parts = crate::backbone_set::parts(&head.provenance);
    if !weights.is_empty() && weights.len() != parts.len() {
        bail!(
            "{}: the head was trained on features of {} network(s) ({}), but --weights names {} \
             file(s): give one per network, in that order, or none",
            head_path.display(),
            parts.len(),
            head.provenance.backbone,
            weights.len()
        );
    }
    let mut loaded = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        let given = weights.get(i);
        let backbone = load_part(head_path, onnx_limits, p, given, device.clone())?;
        check_backbone(p, &backbone.meta, head_path, &backbone.weights_path)?;
        loaded.push(backbone);
    }
    let set = BackboneSet::new(loaded)?;
    if set.dim() != head.feature_dim {
        bail!(
            "{}: the head expects {} features, the backbone gives {}",
            head_path.display(),
            head.feature_dim,
            set.dim()
        );
    }
    Ok(set)
}

/// One network of a head's provenance, with the weights given for it if any.
fn load_part(
    head_path: &Path,
    onnx_limits: Limits,
    p: &FeatureMeta,
    weights: Option<&PathBuf>,
    device: Device,
) -> anyhow::Result<Backbone> {
    let kind = BackboneKind::of_provenance(&p.backbone).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: made for backbone '{}', which this dltool does not have",
            head_path.display(),
            p.backbone
        )
    })?;
    let pool: Pool = p
        .pool
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", head_path.display()))?;
    let tta: Tta = p
        .tta
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", head_path.display()))?;
    if let Some(w) = weights.filter(|w| w.exists()) {
        let given = BackboneKind::of_weights(w);
        if given != kind {
            bail!(
                "{}: the head was trained on {} features, but {} holds {} weights",
                head_path.display(),
                p.backbone,
                w.display(),
                given.name()
            );
        }
    }
    let is_onnx = std::ptr::eq(kind.spec(), &crate::backbones::onnx::SPEC);
    let (weights, onnx) = if is_onnx {
        // The model the head was trained on: --weights, else the imported model with its hash.
        let weights = match weights {
            Some(w) => w.clone(),
            None => crate::backbones::onnx::find_by_sha256(&p.weights_sha256).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: the head was trained on features of an ONNX model (SHA-256 {}): pass \
                     that model with --weights MODEL.onnx, or import it once with `dltool \
                     weights import MODEL.onnx --name NAME`",
                    head_path.display(),
                    p.weights_sha256
                )
            })?,
        };
        // Another model is refused by its hash before it is loaded: loading it with the head's
        // preprocessing could fail first on something that hides the real mismatch (its size).
        let file = if weights.exists() {
            Some(weights.clone())
        } else {
            weights
                .to_str()
                .and_then(crate::backbones::onnx::find_by_name)
        };
        if let Some(file) = file.filter(|_| !p.weights_sha256.is_empty()) {
            let sha = crate::weights::sha256_file(&file)
                .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", file.display()))?;
            if sha != p.weights_sha256 {
                bail!(
                    "{}: the head was trained on features of an ONNX model with SHA-256 {}, but \
                     {} has {sha}: pass the same model with --weights",
                    head_path.display(),
                    p.weights_sha256,
                    file.display()
                );
            }
        }
        let pre = crate::backbone::preprocess_of(&p.backbone).ok_or_else(|| {
            anyhow::anyhow!(
                "{}: unreadable ONNX preprocessing in its provenance '{}'",
                head_path.display(),
                p.backbone
            )
        })?;
        let choice = crate::onnx_net::OnnxChoice::exactly(&pre, onnx_limits);
        (Some(weights), choice)
    } else {
        (weights.cloned(), crate::onnx_net::OnnxChoice::default())
    };
    let opts = BackboneOptions {
        kind: Some(kind),
        weights,
        variant: None,
        layer: Some(p.layer.clone()),
        pool,
        tta,
        onnx,
    };
    Backbone::load(&opts, device)
}

/// A head trained on CSV features of unknown provenance: the network is what --weights says
/// (its last layer; the pooling and test-time augmentation the head recorded, if any), and the
/// width is the only check there can be.
fn backbone_of_unknown(
    head: &Head,
    head_path: &Path,
    weights: &[PathBuf],
    device: Device,
) -> anyhow::Result<BackboneSet> {
    if weights.is_empty() {
        bail!(
            "{}: the head was trained on CSV features of unknown provenance, so it does not \
             know which network makes its features: pass the featurize --weights",
            head_path.display()
        );
    }
    if let Some(onnx) = weights
        .iter()
        .find(|w| crate::backbones::onnx::is_onnx_path(w))
    {
        bail!(
            "{}: the head was trained on CSV features of unknown provenance, so the \
             preprocessing {} was fed with is unknown: featurize to safetensors or Parquet \
             (which record it) and train the head on those",
            head_path.display(),
            onnx.display()
        );
    }
    let p = &head.provenance;
    let bad = |e: String| anyhow::anyhow!("{}: {e}", head_path.display());
    let pool: Pool = if p.pool.is_empty() {
        Pool::Avg
    } else {
        p.pool.parse().map_err(bad)?
    };
    let tta: Tta = if p.tta.is_empty() {
        Tta::None
    } else {
        p.tta.parse().map_err(bad)?
    };
    let opts: Vec<BackboneOptions> = weights
        .iter()
        .map(|w| BackboneOptions {
            kind: None,
            weights: Some(w.clone()),
            variant: None,
            layer: None,
            pool,
            tta,
            onnx: crate::onnx_net::OnnxChoice::default(),
        })
        .collect();
    let set = BackboneSet::load(&opts, device)?;
    let files = weights
        .iter()
        .map(|w| w.display().to_string())
        .collect::<Vec<_>>()
        .join(",");
    if set.dim() != head.feature_dim {
        bail!(
            "{}: the head expects {} features, but {files} ({}, layer {}) gives {}: pass the \
             weights the head's features were made with",
            head_path.display(),
            head.feature_dim,
            set.meta.backbone,
            set.meta.layer,
            set.dim()
        );
    }
    crate::note!(
        "{}: the head's provenance is unknown (CSV features): featurizing with {files} ({}, \
         layer {}); only the width was checked",
        head_path.display(),
        set.meta.backbone,
        set.meta.layer
    );
    Ok(set)
}

/// The head only makes sense on the features of the network it was trained on: `part` is the
/// head's provenance for this network.
fn check_backbone(
    part: &FeatureMeta,
    loaded: &FeatureMeta,
    head_path: &Path,
    weights: &Path,
) -> anyhow::Result<()> {
    let h = part;
    if !h.backbone.is_empty() && h.backbone != loaded.backbone {
        bail!(
            "{}: the head was trained on {} features, but {} is {}",
            head_path.display(),
            h.backbone,
            weights.display(),
            loaded.backbone
        );
    }
    if !h.weights_sha256.is_empty() && h.weights_sha256 != loaded.weights_sha256 {
        bail!(
            "{}: the head was trained on features of weights with SHA-256 {}, but {} has {}: \
             pass the same weights with --weights",
            head_path.display(),
            h.weights_sha256,
            weights.display(),
            loaded.weights_sha256
        );
    }
    Ok(())
}

/// Class indices by decreasing probability; ties keep the class order.
pub fn ranked<T: Copy + Into<f64>>(probs: &[T]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].into().total_cmp(&probs[a].into()).then(a.cmp(&b)));
    order
}

/// One image's prediction as JSON, the object `predict --format jsonl` writes (without its
/// `path`): `prediction`, `probability`, and `probabilities` by class or, with `top_k`, `top`
/// (the K most probable classes, most probable first).
pub fn prediction_json(
    classes: &[String],
    probs: &[f64],
    top_k: Option<usize>,
) -> serde_json::Map<String, serde_json::Value> {
    let order = ranked(probs);
    let best = order[0];
    let mut v = serde_json::Map::new();
    v.insert("prediction".into(), classes[best].clone().into());
    v.insert("probability".into(), probs[best].into());
    match top_k {
        Some(k) => {
            let top = order
                .iter()
                .take(k)
                .map(|&c| serde_json::json!({"class": classes[c], "probability": probs[c]}))
                .collect();
            v.insert("top".into(), serde_json::Value::Array(top));
        }
        None => {
            let map = classes
                .iter()
                .zip(probs)
                .map(|(c, p)| (c.clone(), serde_json::json!(p)))
                .collect();
            v.insert("probabilities".into(), serde_json::Value::Object(map));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranked_orders_by_probability_then_class() {
        assert_eq!(ranked(&[0.1f32, 0.5, 0.1, 0.3]), vec![1, 3, 0, 2]);
        assert_eq!(ranked(&[0.2f64, 0.8]), vec![1, 0]);
    }

    #[test]
    fn prediction_json_has_all_classes_or_the_top_k() {
        let classes = vec!["a".to_string(), "b".into(), "c".into()];
        let all = prediction_json(&classes, &[0.2, 0.5, 0.3], None);
        assert_eq!(all["prediction"], "b");
        assert_eq!(all["probability"], 0.5);
        assert_eq!(all["probabilities"]["c"], 0.3);
        assert!(!all.contains_key("top"));
        let top = prediction_json(&classes, &[0.2, 0.5, 0.3], Some(2));
        assert_eq!(
            top["top"],
            serde_json::json!([{"class": "b", "probability": 0.5}, {"class": "c", "probability": 0.3}])
        );
        assert!(!top.contains_key("probabilities"));
    }
}
