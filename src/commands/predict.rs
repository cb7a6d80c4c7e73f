//! `dltool predict`: the whole model (backbone + head) on new images, or the head on features.

use super::{Sink, Status};
use crate::backbone::{Backbone, BackboneKind, BackboneOptions, Pool, Tta};
use crate::features::{self, FeatureMeta};
use crate::head::Head;
use crate::inputs;
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

    /// Weight file of the backbone [default: as featurize finds it]; must be the head's.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,

    #[command(flatten)]
    pub run: super::NetworkArgs,

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
        let mut order: Vec<usize> = (0..probs.len()).collect();
        // Most probable first; ties keep the head's class order.
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
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
                let mut v = serde_json::json!({
                    "path": path,
                    "prediction": self.classes[best],
                    "probability": probs[best],
                });
                match self.top_k {
                    Some(k) => {
                        v["top"] = order
                            .iter()
                            .take(k)
                            .map(|&c| serde_json::json!({"class": self.classes[c], "probability": probs[c]}))
                            .collect();
                    }
                    None => {
                        let map: serde_json::Map<String, serde_json::Value> = self
                            .classes
                            .iter()
                            .zip(probs)
                            .map(|(c, p)| (c.clone(), serde_json::json!(p)))
                            .collect();
                        v["probabilities"] = serde_json::Value::Object(map);
                    }
                }
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
    if let Some(h) = rows.header() {
        let mut w = csv::Writer::from_writer(&mut sink);
        w.write_record(&h)?;
        w.flush()?;
    }

    let status = match &args.features {
        Some(file) => {
            let table = features::read_features(file)?;
            super::check_head_features(&head, &table, file)?;
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
    let list = inputs::collect(&args.paths, &mut std::io::stdin().lock())?;
    let backbone = if head.provenance.backbone.is_empty() {
        backbone_of_unknown(args, head)?
    } else {
        backbone_of_provenance(args, head)?
    };
    super::stream_images(
        &backbone,
        &list,
        &args.run,
        args.quiet,
        "predicted",
        backbone.dim(),
        |pixels, n| backbone.features(pixels, n),
        sink,
        |path, features, out| {
            out.extend_from_slice(rows.format(path, &head.predict_proba(features, 1))?);
            Ok(())
        },
    )
}

/// The network a head's provenance names, loaded as it was (checked against the head).
fn backbone_of_provenance(args: &Args, head: &Head) -> anyhow::Result<Backbone> {
    let p = &head.provenance;
    let kind = BackboneKind::of_provenance(&p.backbone).ok_or_else(|| {
        anyhow::anyhow!(
            "{}: made for backbone '{}', which this dltool does not have",
            args.head.display(),
            p.backbone
        )
    })?;
    let pool: Pool = p
        .pool
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.head.display()))?;
    let tta: Tta = p
        .tta
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.head.display()))?;
    if let Some(w) = args.weights.as_deref().filter(|w| w.exists()) {
        let given = BackboneKind::of_weights(w);
        if given != kind {
            bail!(
                "{}: the head was trained on {} features, but {} holds {} weights",
                args.head.display(),
                p.backbone,
                w.display(),
                given.name()
            );
        }
    }
    let opts = BackboneOptions {
        kind: Some(kind),
        weights: args.weights.clone(),
        variant: None,
        layer: Some(p.layer.clone()),
        pool,
        tta,
    };
    let device = super::open_device(args.run.device, args.quiet)?;
    let backbone = Backbone::load(&opts, device)?;
    check_backbone(head, &backbone.meta, &args.head, &backbone.weights_path)?;
    if backbone.dim() != head.feature_dim {
        bail!(
            "{}: the head expects {} features, the backbone gives {}",
            args.head.display(),
            head.feature_dim,
            backbone.dim()
        );
    }
    Ok(backbone)
}

/// A head trained on CSV features of unknown provenance: the network is what --weights says
/// (its last layer; the pooling and test-time augmentation the head recorded, if any), and the
/// width is the only check there can be.
fn backbone_of_unknown(args: &Args, head: &Head) -> anyhow::Result<Backbone> {
    let Some(weights) = &args.weights else {
        bail!(
            "{}: the head was trained on CSV features of unknown provenance, so it does not \
             know which network makes its features: pass the featurize --weights",
            args.head.display()
        );
    };
    let p = &head.provenance;
    let bad = |e: String| anyhow::anyhow!("{}: {e}", args.head.display());
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
        weights: Some(weights.clone()),
        variant: None,
        layer: None,
        pool,
        tta,
    };
    let device = super::open_device(args.run.device, args.quiet)?;
    let backbone = Backbone::load(&opts, device)?;
    if backbone.dim() != head.feature_dim {
        bail!(
            "{}: the head expects {} features, but {} ({}, layer {}) gives {}: pass the weights \
             the head's features were made with",
            args.head.display(),
            head.feature_dim,
            weights.display(),
            backbone.meta.backbone,
            backbone.meta.layer,
            backbone.dim()
        );
    }
    crate::note!(
        "{}: the head's provenance is unknown (CSV features): featurizing with {} ({}, layer {}); \
         only the width was checked",
        args.head.display(),
        weights.display(),
        backbone.meta.backbone,
        backbone.meta.layer
    );
    Ok(backbone)
}

/// The head only makes sense on the features of the network it was trained on.
fn check_backbone(
    head: &Head,
    loaded: &FeatureMeta,
    head_path: &std::path::Path,
    weights: &std::path::Path,
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
