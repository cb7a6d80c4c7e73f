//! `dltool predict`: the whole model (backbone + head) on new images, or the head on features.

use super::{Sink, Status};
use crate::backbone_set::BackboneSet;
use crate::features;
use crate::featurize::{self, Outcome};
use crate::head::Head;
use crate::inputs::{self, Found};
use crate::model;
use anyhow::bail;
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Csv,
    Jsonl,
}

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Rows: path,prediction,probability,p_<class>... (one probability column per class, in the head's \
order); with --top-k K the class columns become top1,p1,...,topK,pK. JSON lines carry the same \
fields. Rows are written as soon as they are ready, in input order.

Images go through the head's own backbone (layer, pooling, test-time augmentation, \
preprocessing recorded in the head); weights whose SHA-256 differs from the head's are refused. \
For a head trained on an ONNX model's features, the model is --weights MODEL.onnx or, without \
it, the model imported (`dltool weights import`) whose SHA-256 is the head's. \
With --features, features made with another backbone, layer, pooling or --tta than the head's \
are refused.")]
pub struct Args {
    /// Head file written by train-head.
    #[arg(value_name = "HEAD")]
    pub head: PathBuf,

    /// Image files, directories (recursive) or - for paths on stdin.
    #[arg(value_name = "PATH", required_unless_present = "features")]
    pub paths: Vec<String>,

    /// Apply the head to features already computed instead of images.
    #[arg(long, value_name = "FILE", conflicts_with = "paths")]
    pub features: Option<PathBuf>,

    /// Output file; - or none writes to stdout.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,

    /// Output format.
    #[arg(long, value_enum, default_value = "csv")]
    pub format: OutputFormat,

    /// Only the K most probable classes per row.
    #[arg(long, value_name = "K")]
    pub top_k: Option<usize>,

    /// Weight file of the backbone [default: as featurize finds it]; must be the head's. For a
    /// head on several networks' features, one per network, comma-separated, in its order.
    #[arg(long, value_name = "FILE[,FILE...]", value_parser = super::WeightListParser)]
    pub weights: Option<super::WeightList>,

    #[command(flatten)]
    pub run: super::NetworkArgs,

    #[command(flatten)]
    pub onnx_limits: super::OnnxLimitArgs,

    /// No progress bar and no summary.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Formats prediction rows.
struct Rows<'a> {
    classes: &'a [String],
    top_k: Option<usize>,
    format: OutputFormat,
    line: Vec<u8>,
}

impl Rows<'_> {
    /// The CSV header, written once the head and its inputs are accepted: a refused run prints
    /// nothing on stdout, so a caller that reads the output never sees a header without rows.
    fn write_header(&self, sink: &mut Sink) -> anyhow::Result<()> {
        if let Some(h) = self.header() {
            let mut w = csv::Writer::from_writer(sink);
            w.write_record(&h)?;
            w.flush()?;
        }
        Ok(())
    }

    fn header(&self) -> Option<Vec<String>> {
        if self.format != OutputFormat::Csv {
            return None;
        }
        let mut h = vec![
            "path".to_string(),
            "prediction".into(),
            "probability".into(),
        ];
        match self.top_k {
            Some(k) => {
                for i in 1..=k.min(self.classes.len()) {
                    h.push(format!("top{i}"));
                    h.push(format!("p{i}"));
                }
            }
            None => h.extend(self.classes.iter().map(|c| format!("p_{c}"))),
        }
        Some(h)
    }

    fn format(&mut self, path: &str, probs: &[f64]) -> anyhow::Result<&[u8]> {
        // Most probable first; ties keep the head's class order.
        let order = model::ranked(probs);
        let best = order[0];
        self.line.clear();
        match self.format {
            OutputFormat::Csv => {
                let mut fields = vec![
                    path.to_string(),
                    self.classes[best].clone(),
                    probs[best].to_string(),
                ];
                match self.top_k {
                    Some(k) => {
                        for &c in order.iter().take(k) {
                            fields.push(self.classes[c].clone());
                            fields.push(probs[c].to_string());
                        }
                    }
                    None => fields.extend(probs.iter().map(|p| p.to_string())),
                }
                let mut w = csv::Writer::from_writer(&mut self.line);
                w.write_record(&fields)?;
                w.flush()?;
            }
            OutputFormat::Jsonl => {
                let mut v = serde_json::Map::new();
                v.insert("path".into(), path.into());
                v.extend(model::prediction_json(self.classes, probs, self.top_k));
                serde_json::to_writer(&mut self.line, &v)?;
                self.line.push(b'\n');
            }
        }
        Ok(&self.line)
    }
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    super::set_threads(args.run.threads);
    if args.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    let head = Head::load(&args.head).map_err(anyhow::Error::msg)?;
    if let Some(k) = args.top_k.filter(|&k| k > head.classes.len()) {
        crate::note!(
            "dltool: --top-k {k} is more than the head's {} classes: every class is listed",
            head.classes.len()
        );
    }
    if let (Some(output), Some(file)) = (&args.output, &args.features) {
        features::refuse_output_over_input(output, [file])?;
    }
    let mut sink = Sink::open(args.output.as_deref())?;
    let mut rows = Rows {
        classes: &head.classes,
        top_k: args.top_k,
        format: args.format,
        line: Vec::new(),
    };

    let status = match &args.features {
        Some(file) => {
            let table = features::read_features(file)?;
            super::check_head_features(&head, &table, file)?;
            rows.write_header(&mut sink)?;
            let probs = head.predict_proba(&table.data, table.len());
            let k = head.classes.len();
            for i in 0..table.len() {
                sink.write_all(rows.format(&table.paths[i], &probs[i * k..(i + 1) * k])?)?;
            }
            Status::Ok
        }
        None => predict_images(&args, &head, &mut rows, &mut sink)?,
    };
    sink.finish()?;
    Ok(status)
}

fn predict_images(
    args: &Args,
    head: &Head,
    rows: &mut Rows<'_>,
    sink: &mut Sink,
) -> anyhow::Result<Status> {
    // Paths on stdin are read as they come: a long-lived `predict HEAD -` (one per Spark
    // partition) answers each path while the next ones are still being written.
    let streaming = args.paths.iter().any(|p| p == "-");
    let list = if streaming {
        inputs::InputList::default()
    } else {
        inputs::collect(&args.paths, &mut std::io::stdin().lock())?
    };
    let weights: &[PathBuf] = args.weights.as_ref().map_or(&[], |w| &w.0);
    let device = super::open_device(args.run.device, args.quiet)?;
    let set =
        model::backbone_for_head(head, &args.head, weights, args.onnx_limits.limits(), device)?;
    rows.write_header(sink)?;
    if streaming {
        return predict_stream(args, head, &set, rows, sink);
    }
    let preprocesses = set.preprocesses();
    super::stream_images(
        featurize::features_of(&set, &preprocesses),
        &list,
        &args.run,
        args.quiet,
        "predicted",
        sink,
        |path, features, out| {
            out.extend_from_slice(rows.format(path, &head.predict_proba(features, 1))?);
            Ok(())
        },
    )
}

/// [`predict_images`] over paths as they arrive, each row written and flushed as soon as its
/// batch is through.
fn predict_stream(
    args: &Args,
    head: &Head,
    set: &BackboneSet,
    rows: &mut Rows<'_>,
    sink: &mut Sink,
) -> anyhow::Result<Status> {
    let (rx, read_error) =
        inputs::spawn_lister(args.paths.clone(), 2 * args.run.batch_size as usize);
    let (mut done, mut skipped) = (0usize, 0usize);
    featurize::run_stream(
        set,
        rx,
        args.run.batch_size as usize,
        args.run.max_pixels,
        |_, item, outcome| {
            let display = match item {
                Found::Input(input) => &input.display,
                Found::Skip(skip) => &skip.display,
            };
            match outcome {
                Outcome::Features(features) => {
                    sink.write_all(rows.format(display, &head.predict_proba(features, 1))?)?;
                    sink.flush()?;
                    done += 1;
                }
                Outcome::Skipped(reason) => {
                    crate::note!("skipped {display}: {reason}");
                    skipped += 1;
                }
            }
            Ok(())
        },
    )?;
    if let Some(e) = read_error.take() {
        return Err(anyhow::Error::new(e).context("cannot read paths from stdin"));
    }
    if !args.quiet {
        crate::note!("predicted {done} image(s), skipped {skipped}");
    }
    Ok(if done == 0 {
        crate::note!("dltool: no image was predicted");
        Status::Incomplete
    } else {
        Status::Ok
    })
}
