//! A trained head with the network it was trained on: what `predict` and `serve` run on images.
//!
//! The head records its backbone's provenance (network, weights SHA-256, layer, pooling,
//! test-time augmentation); the network is rebuilt from that record and checked against it, so
//! a head never silently runs on features of another network.

use crate::backbone::{Backbone, BackboneKind, BackboneOptions, Pool, Tta};
use crate::features::FeatureMeta;
use crate::head::Head;
use anyhow::bail;
use burn::prelude::Device;
use std::path::Path;

/// Loads the backbone `head` (read from `head_path`) was trained on, from `weights` or where
/// featurize finds them, and checks that it is the very network of the head's provenance.
pub fn backbone_for_head(
    head: &Head,
    head_path: &Path,
    weights: Option<&Path>,
    device: Device,
) -> anyhow::Result<Backbone> {
    if head.provenance.backbone.is_empty() {
        return backbone_of_unknown(head, head_path, weights, device);
    }
    let p = &head.provenance;
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
    let opts = BackboneOptions {
        kind: Some(kind),
        weights: weights.map(Path::to_path_buf),
        variant: None,
        layer: Some(p.layer.clone()),
        pool,
        tta,
    };
    let backbone = Backbone::load(&opts, device)?;
    check_backbone(head, &backbone.meta, head_path, &backbone.weights_path)?;
    if backbone.dim() != head.feature_dim {
        bail!(
            "{}: the head expects {} features, the backbone gives {}",
            head_path.display(),
            head.feature_dim,
            backbone.dim()
        );
    }
    Ok(backbone)
}

/// A head trained on CSV features of unknown provenance: the network is what `weights` says
/// (its last layer; the pooling and test-time augmentation the head recorded, if any), and the
/// width is the only check there can be.
fn backbone_of_unknown(
    head: &Head,
    head_path: &Path,
    weights: Option<&Path>,
    device: Device,
) -> anyhow::Result<Backbone> {
    let Some(weights) = weights else {
        bail!(
            "{}: the head was trained on CSV features of unknown provenance, so it does not \
             know which network makes its features: pass the featurize --weights",
            head_path.display()
        );
    };
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
    let opts = BackboneOptions {
        kind: None,
        weights: Some(weights.to_path_buf()),
        variant: None,
        layer: None,
        pool,
        tta,
    };
    let backbone = Backbone::load(&opts, device)?;
    if backbone.dim() != head.feature_dim {
        bail!(
            "{}: the head expects {} features, but {} ({}, layer {}) gives {}: pass the weights \
             the head's features were made with",
            head_path.display(),
            head.feature_dim,
            weights.display(),
            backbone.meta.backbone,
            backbone.meta.layer,
            backbone.dim()
        );
    }
    Ok(backbone)
}

/// The head only makes sense on the features of the network it was trained on.
fn check_backbone(
    head: &Head,
    loaded: &FeatureMeta,
    head_path: &Path,
    weights: &Path,
) -> anyhow::Result<()> {
    let h = &head.provenance;
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
