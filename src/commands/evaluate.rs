//! `dltool evaluate`: how good a head is on labelled features.

use super::Status;
use crate::features;
use crate::head::Head;
use crate::metrics;
use anyhow::bail;
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Prints accuracy, weighted F1 (MLlib's default metric), weighted precision and recall, log loss, \
per-class precision/recall/F1/support and the confusion matrix (rows: true class).")]
pub struct Args {
    /// Head file written by train-head.
    #[arg(value_name = "HEAD")]
    pub head: PathBuf,

    /// Labelled features (CSV or safetensors) made like the head's training features, or a
    /// folder of labelled images (one subfolder per class) to run through the head's network.
    #[arg(value_name = "FEATURES|DIR")]
    pub features: PathBuf,

    /// With a folder of images: the backbone's weight file [default: as featurize finds it];
    /// must be the head's. For a head on several networks' features, one per network,
    /// comma-separated, in its order.
    #[arg(long, value_name = "FILE[,FILE...]", value_parser = super::WeightListParser)]
    pub weights: Option<super::WeightList>,

    #[command(flatten)]
    pub run: super::NetworkArgs,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// Also list the N most confidently wrong rows (path, truth, predicted, probability).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub errors: usize,
}

/// Paths, labels and the head's class probabilities (row-major) of a folder of images.
fn predict_folder(
    args: &Args,
    head: &Head,
) -> anyhow::Result<(Vec<String>, Vec<String>, Vec<f64>)> {
    super::set_threads(args.run.threads);
    let list = crate::inputs::collect(
        &[args.features.display().to_string()],
        &mut std::io::empty(),
    )?;
    for skip in &list.skipped {
        crate::note!("skipped {}: {}", skip.display, skip.reason);
    }
    let device = super::open_device(args.run.device, true)?;
    let weights: &[PathBuf] = args.weights.as_ref().map_or(&[], |w| &w.0);
    let set = crate::model::backbone_for_head(
        head,
        &args.head,
        weights,
        crate::onnx_net::Limits::default(),
        device,
    )?;
    let (mut paths, mut labels, mut probs) = (Vec::new(), Vec::new(), Vec::new());
    crate::featurize::run(
        &set,
        &list.inputs,
        args.run.batch_size as usize,
        args.run.max_pixels,
        |i, outcome| {
            match outcome {
                crate::featurize::Outcome::Features(x) => {
                    paths.push(list.inputs[i].display.clone());
                    labels.push(list.inputs[i].label.clone());
                    probs.extend(head.predict_proba(x, 1));
                }
                crate::featurize::Outcome::Skipped(reason) => {
                    crate::note!("skipped {}: {reason}", list.inputs[i].display)
                }
            }
            Ok(())
        },
    )?;
    if paths.is_empty() {
        bail!("{}: no image could be read", args.features.display());
    }
    Ok((paths, labels, probs))
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    let head = Head::load(&args.head).map_err(anyhow::Error::msg)?;
    let (paths, labels, probs) = if args.features.is_dir() {
        predict_folder(&args, &head)?
    } else {
        let table = features::read_features(&args.features)?;
        super::check_head_features(&head, &table, &args.features)?;
        let probs = head.predict_proba(&table.data, table.len());
        (table.paths, table.labels, probs)
    };

    let index: HashMap<&str, usize> = head
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut unknown: std::collections::BTreeMap<&str, usize> = Default::default();
    let truth: Vec<usize> = labels
        .iter()
        .map(|l| match index.get(l.as_str()) {
            Some(&i) => i,
            None => {
                *unknown.entry(l.as_str()).or_default() += 1;
                usize::MAX
            }
        })
        .collect();
    if !unknown.is_empty() {
        let list: Vec<String> = unknown
            .iter()
            .map(|(l, n)| format!("'{l}' ({n} rows)"))
            .collect();
        bail!(
            "{}: labels the head was not trained on: {}; the head knows {}",
            args.features.display(),
            list.join(", "),
            head.classes.join(", ")
        );
    }

    let eval = metrics::evaluate(&head.classes, &truth, &probs)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.features.display()))?;
    let k = head.classes.len();
    let mistakes = metrics::most_confident_mistakes(&truth, &probs, k, args.errors);

    if args.json {
        let errors: Vec<serde_json::Value> = mistakes
            .iter()
            .map(|m| {
                serde_json::json!({
                    "path": paths[m.row],
                    "truth": head.classes[m.truth],
                    "predicted": head.classes[m.predicted],
                    "probability": m.probability,
                })
            })
            .collect();
        let mut value = serde_json::to_value(&eval)?;
        value["head"] = serde_json::json!(head.model.kind());
        value["errors"] = serde_json::json!(errors);
        crate::outln!("{}", serde_json::to_string_pretty(&value)?)?;
    } else {
        crate::outln!(
            "{} head on {} ({} rows)\n",
            head.model.kind(),
            args.features.display(),
            paths.len()
        )?;
        crate::out!("{}", eval.to_table())?;
        if !mistakes.is_empty() {
            crate::outln!("\nmost confident mistakes:")?;
            // Into memory first: csv's errors would hide a closed pipe from `main`.
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(["path", "truth", "predicted", "probability"])?;
            for m in &mistakes {
                w.write_record([
                    paths[m.row].as_str(),
                    &head.classes[m.truth],
                    &head.classes[m.predicted],
                    &format!("{:.4}", m.probability),
                ])?;
            }
            let text = w
                .into_inner()
                .map_err(|e| anyhow::anyhow!("{}", e.error()))?;
            crate::out!("{}", String::from_utf8_lossy(&text))?;
        }
    }
    Ok(Status::Ok)
}
