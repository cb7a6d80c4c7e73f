//! Cross-validated search over fine-tuning's settings (`fine-tune --grid`): the grid, the
//! stratified folds, the ranking and its table are [`crate::tune`]'s, as for heads; what
//! differs is the fit (a fine-tune on the cached activations of the training folds) and that
//! the fits run one after another, since one fine-tune already keeps every core busy.
//!
//! The activation cache of a cut layer holds every image and view, so all grid points and
//! folds that cut there share it: a fold selects its training images by index, nothing is
//! recomputed.

use super::cache::{VIEWS, View};
use super::{Cut, FineTuneError, FineTuneParams, Prepared};
use crate::tune::{FoldScore, GridParams, Key, Setting, Value};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// One point of a fine-tuning grid: the cut layer, the epochs, the rest of the parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct FineTunePoint {
    /// The cut layer's name (checked against the network by [`FineTunePoint::resolve`]).
    pub layer: String,
    /// `None`: the cut's default ([`super::default_epochs`]), set by `resolve`.
    pub epochs: Option<usize>,
    pub params: FineTuneParams,
}

impl GridParams for FineTunePoint {
    fn keys(&self) -> &'static [Key] {
        Key::fine_tune()
    }

    fn what(&self) -> String {
        "fine-tuning".into()
    }

    fn apply(&mut self, setting: &Setting) {
        let p = &mut self.params;
        match (setting.key, &setting.value) {
            (Key::Lr, Value::Number(v)) => p.lr = *v,
            (Key::HeadLr, Value::Number(v)) => p.head_lr = *v,
            (Key::WeightDecay, Value::Number(v)) => p.weight_decay = *v,
            (Key::Mixup, Value::Number(v)) => p.mixup = *v,
            (Key::LabelSmoothing, Value::Number(v)) => p.label_smoothing = *v,
            (Key::Dropout, Value::Number(v)) => p.dropout = *v,
            (Key::ValidationFraction, Value::Number(v)) => p.validation_fraction = *v,
            (Key::TrainBatch, Value::Count(v)) => p.batch_size = *v,
            (Key::Patience, Value::Count(v)) => p.patience = *v,
            (Key::Epochs, Value::Count(v)) => self.epochs = Some(*v),
            (Key::FromLayer, Value::Text(t)) => self.layer = t.clone(),
            (key, value) => unreachable!(
                "parse_grid pairs fine-tuning keys with values of their kind, not {} {value:?}",
                key.name()
            ),
        }
    }

    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.params).expect("plain numbers");
        v["from_layer"] = serde_json::json!(self.layer);
        v
    }
}

impl FineTunePoint {
    /// The point's cut of `network`, its epochs set (the cut's default unless given) and its
    /// parameters checked.
    pub fn resolve(&mut self, network: &str) -> Result<Cut, FineTuneError> {
        let cut = super::cut_of(network, &self.layer)?;
        let epochs = self.epochs.unwrap_or_else(|| super::default_epochs(cut));
        self.epochs = Some(epochs);
        self.params.epochs = epochs;
        self.params.check()?;
        Ok(cut)
    }
}

/// Held-out images scored per network call: bounds the memory of a fold's test activations.
const SCORE_CHUNK: usize = 32;

/// Fine-tunes on the selected images of `prepared`'s cache outside fold `fold` (`fold_of` per
/// image; fine-tune's own validation split and early stopping inside them) and scores the
/// model on the held-out fold through [`crate::head::Head::predict_proba`] and
/// [`FoldScore::of`], the code `evaluate` runs. `labels` is the class index per image.
///
/// A stop (Ctrl-C) during the training is `Err(Interrupted)`: a half-trained fit is not
/// scored.
pub fn fit_and_score(
    prepared: &mut Prepared,
    labels: &[usize],
    classes: &[String],
    fold_of: &[usize],
    fold: usize,
    params: &FineTuneParams,
    stop: &AtomicBool,
) -> Result<FoldScore, FineTuneError> {
    let start = Instant::now();
    let (held, train): (Vec<usize>, Vec<usize>) =
        (0..labels.len()).partition(|&i| fold_of[i] == fold);
    let (net, report) =
        prepared.train(&train, labels, classes.len(), params, stop, |_| {}, |_| {})?;
    if report.interrupted {
        return Err(FineTuneError::Interrupted);
    }
    let head = prepared.head(net, report, params.clone(), classes.to_vec());
    // As `predict` and `evaluate` see an image: unmirrored.
    let original = VIEWS
        .iter()
        .position(|v| *v == View::Original)
        .expect("the original view is cached");
    let mut probs = Vec::with_capacity(held.len() * classes.len());
    let mut x = Vec::new();
    for chunk in held.chunks(SCORE_CHUNK) {
        x.clear();
        for &image in chunk {
            prepared.cache.read_into(image, original, &mut x)?;
        }
        probs.extend(head.predict_proba(&x, chunk.len()));
    }
    let truth: Vec<usize> = held.iter().map(|&i| labels[i]).collect();
    FoldScore::of(classes, &truth, &probs, start).map_err(FineTuneError::Params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tune::{Grid, parse_grid};

    fn base() -> FineTunePoint {
        FineTunePoint {
            layer: "block14".into(),
            epochs: None,
            params: FineTuneParams::default(),
        }
    }

    fn grid(specs: &[&str]) -> Result<Grid, String> {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        parse_grid(&specs, &base())
    }

    #[test]
    fn grid_sets_fine_tuning_parameters_and_the_cut() {
        let combos = grid(&[
            "lr=1e-4,3e-4",
            "from-layer=block10,block14",
            "head-lr=0.003",
            "weight-decay=0",
            "dropout=0.2",
            "train-batch=16",
            "patience=1",
            "validation-fraction=0.25",
            "mixup=0.2",
            "label-smoothing=0.05",
        ])
        .unwrap()
        .combinations(&base());
        assert_eq!(combos.len(), 4);
        assert_eq!(
            combos[1].describe().split(' ').take(2).collect::<Vec<_>>(),
            ["lr=1e-4", "from-layer=block14"]
        );
        let mut p = combos[2].params.clone();
        assert_eq!(p.layer, "block10");
        assert_eq!(
            (p.params.lr, p.params.head_lr, p.params.weight_decay),
            (3e-4, 0.003, 0.0)
        );
        assert_eq!(
            (p.params.dropout, p.params.batch_size, p.params.patience),
            (0.2, 16, 1)
        );
        assert_eq!(p.params.validation_fraction, 0.25);
        assert_eq!((p.params.mixup, p.params.label_smoothing), (0.2, 0.05));
        // Epochs not in the grid: the cut's default once the network is known.
        assert_eq!(p.epochs, None);
        let cut = p.resolve("efficientnet_lite0").unwrap();
        assert_eq!(cut.layer(), "block10");
        assert_eq!(p.epochs, Some(super::super::default_epochs(cut)));
        assert_eq!(p.to_json()["from_layer"], "block10");
        assert_eq!(p.to_json()["epochs"], p.epochs.unwrap());

        let mut p = grid(&["epochs=2"]).unwrap().combinations(&base())[0]
            .params
            .clone();
        p.resolve("efficientnet_lite2").unwrap();
        assert_eq!((p.epochs, p.params.epochs), (Some(2), 2));
    }

    #[test]
    fn bad_fine_tuning_grids_are_one_line_errors() {
        for (specs, needle) in [
            (
                &["reg=0.1"][..],
                "'reg' is not a parameter of fine-tuning (it takes lr, head-lr, from-layer, epochs, weight-decay, dropout, train-batch, patience, validation-fraction, mixup, label-smoothing)",
            ),
            (
                &["alpha=1"][..],
                "unknown parameter 'alpha' (fine-tuning takes lr, head-lr",
            ),
            (&["head-lr=0"][..], "must be > 0"),
            (&["weight-decay=-1"][..], "must be >= 0"),
            (&["epochs=two"][..], "'two' is not a whole number"),
            (&["from-layer=block14,block14"][..], "listed twice"),
        ] {
            let err = grid(specs).unwrap_err();
            assert!(err.contains(needle), "{specs:?}: '{needle}' not in '{err}'");
            assert!(!err.contains('\n'), "{err}");
        }
        // A layer name is only checked against the network.
        let mut p = grid(&["from-layer=block13"]).unwrap().combinations(&base())[0]
            .params
            .clone();
        let err = p.resolve("efficientnet_lite0").unwrap_err().to_string();
        assert!(err.contains("not a fine-tuning cut point"), "{err}");
        // Ranges only fine-tune knows: the whole point is checked.
        let mut p = grid(&["validation-fraction=0"])
            .unwrap()
            .combinations(&base())[0]
            .params
            .clone();
        let err = p.resolve("efficientnet_lite0").unwrap_err().to_string();
        assert!(
            err.contains("--validation-fraction must be in (0, 1)"),
            "{err}"
        );
    }
}
