//! `dltool classify`: the pretrained network's own ImageNet classifier, top-K classes per image
//! (what Spark's `DeepImagePredictor(decodePredictions=True, topK=5)` gave).

use super::predict::OutputFormat;
use super::{Sink, Status};
use crate::backbone::{Backbone, BackboneOptions, Tta};
use crate::inputs;
use crate::labels::{self, Label};
use anyhow::{Context, bail};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
CSV rows, K per image, most probable first: path,rank,synset,name,probability. JSON lines: one \
object per image, {\"path\", \"top\": [{\"synset\", \"name\", \"probability\"}, ...]}. Rows are \
written as soon as they are ready, in input order.

Labels: --labels FILE (Keras' imagenet_class_index.json, a JSON array, or one class per line, \
optionally preceded by its synset id), else imagenet_class_index.json or labels.txt next to the \
weights, else in $DLTOOL_HOME. The file must have one entry per output of the classifier.

Needs weights that carry a classifier: MobileNet v1 (TF.js), pytorch-fid's \
pt_inception-2015-12-05 (1008 outputs) or torchvision's InceptionV3 (1000).")]
pub struct Args {
    /// Image files, directories (recursive) or - for paths on stdin.
    #[arg(value_name = "PATH", required = true)]
    pub paths: Vec<String>,

    #[command(flatten)]
    pub net: super::NetworkChoice,

    /// Class names, one per classifier output [default: next to the weights].
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,

    /// Test-time augmentation: flip also runs each image mirrored left-right and averages the
    /// two probability vectors.
    #[arg(long, default_value = "none", value_name = "none|flip")]
    pub tta: Tta,

    /// Classes per image.
    #[arg(long, default_value_t = 5, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    pub top_k: u32,

    /// Output file; - or none writes to stdout.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,

    /// Output format.
    #[arg(long, value_enum, default_value = "csv")]
    pub format: OutputFormat,

    #[command(flatten)]
    pub run: super::NetworkArgs,

    /// No progress bar and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Indices of the `k` largest probabilities, largest first; ties keep class order.
pub fn top_k(probs: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

fn format_row(
    format: OutputFormat,
    path: &str,
    probs: &[f32],
    labels: &[Label],
    k: usize,
    out: &mut Vec<u8>,
) -> anyhow::Result<()> {
    let best = top_k(probs, k);
    match format {
        OutputFormat::Csv => {
            let mut w = csv::Writer::from_writer(&mut *out);
            for (rank, &c) in best.iter().enumerate() {
                let l = &labels[c];
                w.write_record([
                    path,
                    &(rank + 1).to_string(),
                    l.synset.as_deref().unwrap_or(""),
                    &l.name,
                    &probs[c].to_string(),
                ])?;
            }
            w.flush()?;
        }
        OutputFormat::Jsonl => {
            let top: Vec<serde_json::Value> = best
                .iter()
                .map(|&c| {
                    serde_json::json!({
                        "synset": labels[c].synset,
                        "name": labels[c].name,
                        "probability": probs[c],
                    })
                })
                .collect();
            serde_json::to_writer(&mut *out, &serde_json::json!({"path": path, "top": top}))?;
            out.push(b'\n');
        }
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    super::set_threads(args.run.threads);
    let opts = BackboneOptions {
        tta: args.tta,
        ..args.net.options()?
    };
    let device = super::open_device(args.run.device, args.quiet)?;
    let no_classifier = |weights: &str, kind: &str| {
        anyhow::anyhow!(
            "{weights}: these {kind} weights have no classifier (they end at the pooled \
             features), so they cannot classify; use weights that carry one (`dltool weights \
             fetch inception_v3_tf2015` gets pytorch-fid's file with its 1008-class fc) or \
             --backbone mobilenet_v1"
        )
    };
    let backbone = Backbone::load(&opts, device).map_err(|e| {
        // The loader's advice for a file of unknown layout is --variant; but such a file has
        // no fc layer, and that is what stops classify whatever the variant.
        use crate::backbones::LoadError as E;
        use crate::inception_v3::LoadError as Inception;
        match e.downcast_ref::<E>() {
            Some(E::InceptionV3(Inception::UnknownVariant { path })) => {
                no_classifier(path, "InceptionV3")
            }
            _ => e,
        }
    })?;
    let weights = backbone.weights_path.display().to_string();
    let Some(classes) = backbone.num_classes() else {
        return Err(no_classifier(&weights, backbone.kind.name()));
    };
    if args.top_k as usize > classes {
        crate::note!(
            "dltool: --top-k {} is more than the {classes} classes of {weights}: every class is \
             listed",
            args.top_k
        );
    }
    let labels_path = labels::resolve(args.labels.as_deref(), &backbone.weights_path)
        .map_err(anyhow::Error::msg)?;
    let labels = labels::read(&labels_path).map_err(anyhow::Error::msg)?;
    if labels.len() != classes {
        bail!(
            "{}: {} labels, but the classifier of {weights} has {classes} outputs: pass the \
             --labels file made for these weights",
            labels_path.display(),
            labels.len()
        );
    }

    let list = inputs::collect(&args.paths, &mut std::io::stdin().lock())
        .context("cannot read paths from stdin")?;
    let mut sink = Sink::open(args.output.as_deref())?;
    if args.format == OutputFormat::Csv {
        sink.write_all(b"path,rank,synset,name,probability\n")?;
    }
    let k = args.top_k as usize;
    let network = crate::featurize::Network {
        preprocesses: &[backbone.preprocess],
        run: |pixels: crate::featurize::Pixels, n| {
            let pixels = pixels.into_iter().next().expect("one network, one batch");
            backbone
                .classify(pixels, n)
                .expect("num_classes() said there is a classifier")
        },
        dim: classes,
        on_cpu: backbone.is_cpu(),
    };
    let status = super::stream_images(
        network,
        &list,
        &args.run,
        args.quiet,
        "classified",
        &mut sink,
        |path, probs, out| format_row(args.format, path, probs, &labels, k, out),
    )?;
    sink.finish()?;
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_probability_then_class() {
        assert_eq!(top_k(&[0.1, 0.5, 0.1, 0.3], 3), vec![1, 3, 0]);
        assert_eq!(top_k(&[0.2, 0.8], 5), vec![1, 0]);
    }
}
