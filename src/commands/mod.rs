//! One module per subcommand: argument parsing and output, over the library.

pub mod bench;
pub mod classify;
pub mod completions;
pub mod evaluate;
pub mod featurize;
pub mod fine_tune;
pub mod info;
pub mod inspect;
pub mod man;
pub mod predict;
pub mod serve;
pub mod split;
pub mod train_head;
pub mod tune;
pub mod weights;

use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufWriter, IsTerminal, Write};

/// How images go through a network: shared by the commands that run one on images.
#[derive(clap::Args, Debug, Clone)]
pub struct NetworkArgs {
    /// Images per network batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch_size: u32,

    /// Worker threads for decoding and the network [default: all cores].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: Option<u32>,

    /// Refuse images with more pixels than this (decompression-bomb guard).
    #[arg(long, default_value_t = crate::image_io::DEFAULT_MAX_PIXELS, value_name = "N")]
    pub max_pixels: u64,

    /// Where the network runs: cpu, wgpu (a GPU; needs a build with --features wgpu) or auto
    /// (the GPU if there is one, else the CPU with a warning).
    #[arg(long, default_value = "cpu", value_name = "cpu|wgpu|auto")]
    pub device: crate::device::DeviceChoice,
}

/// A cross-validated grid search: shared by `tune` (over a head's parameters) and `fine-tune`
/// (over its own).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SearchFlags {
    /// A parameter and the values to try: KEY=V1,V2,... (repeat for more parameters).
    #[arg(long = "grid", value_name = "KEY=VALUES")]
    pub grid: Vec<String>,

    /// Cross-validation folds (stratified); every class needs at least this many rows
    /// [default: 5].
    #[arg(long, value_name = "K")]
    pub folds: Option<usize>,

    /// What ranks the combinations: weighted F1 (MLlib's default), accuracy, or log loss
    /// [default: f1].
    #[arg(long, value_enum)]
    pub metric: Option<crate::tune::Metric>,

    /// Print the results as one JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
}

impl SearchFlags {
    pub const DEFAULT_FOLDS: usize = 5;

    /// True when a search was asked for (a grid or a fold count).
    pub fn given(&self) -> bool {
        !self.grid.is_empty() || self.folds.is_some()
    }

    /// The fold count, refusing fewer than 2.
    pub fn folds(&self) -> anyhow::Result<usize> {
        let folds = self.folds.unwrap_or(Self::DEFAULT_FOLDS);
        if folds < 2 {
            anyhow::bail!("--folds {folds}: cross-validation needs at least 2 folds");
        }
        Ok(folds)
    }

    pub fn metric(&self) -> crate::tune::Metric {
        self.metric.unwrap_or(crate::tune::Metric::F1)
    }
}

/// Which network and weights: shared by the commands that load one.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NetworkChoice {
    /// Weights: a file (InceptionV3 safetensors or PyTorch state dict; MobileNet v1 TF.js
    /// model.json; EfficientNet/ResNet/VGG .pth), a TF.js model folder, or a fetched registry
    /// name [default: $DLTOOL_WEIGHTS, then assets/weights/, then the user cache]. For several
    /// networks (featurize), one per network, comma-separated, in --backbone's order.
    #[arg(long, value_name = "FILE[,FILE...]", value_parser = WeightListParser)]
    pub weights: Option<WeightList>,

    /// Network to run [default: what --weights holds, else inception_v3]. featurize takes
    /// several, comma-separated (inception_v3,efficientnet_lite2): each image is decoded once
    /// and the networks' features are written side by side, in this order.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "NAME[,NAME...]")]
    pub backbone: Vec<crate::backbone::BackboneKind>,

    /// InceptionV3 block layout, when the weight file does not say [tf2015|torchvision].
    #[arg(long, value_name = "VARIANT")]
    pub variant: Option<crate::inception_v3::BlockVariant>,

    #[command(flatten)]
    pub onnx: OnnxArgs,
}

/// How an ONNX model (`--weights MODEL.onnx`) is fed and what it may cost: part of
/// [`NetworkChoice`].
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "ONNX models (--weights MODEL.onnx)")]
pub struct OnnxArgs {
    /// Input preprocessing of the model's family: inception (stretch, (x-127.5)/127.5),
    /// torchvision (shorter side to size/0.875, centre crop, ImageNet mean/std), caffe (BGR,
    /// stretch, minus ImageNet's BGR means), efficientnet (stretch, (x-127)/128) or none
    /// (stretch, 0..255). Required for an ONNX model unless --mean and --std are given.
    #[arg(long, value_name = "PRESET")]
    pub preprocess: Option<crate::onnx_net::Preset>,

    /// Input height and width, for a model whose input size is symbolic.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16384))]
    pub size: Option<u32>,

    /// Override the preset's resize: stretch (straight to the input size) or crop (shorter
    /// side to size/0.875, centre crop).
    #[arg(long, value_name = "stretch|crop")]
    pub resize: Option<crate::image_io::Resize>,

    /// Override the preset's per-channel mean, in 0..255 units and the model's channel order.
    #[arg(long, value_name = "A,B,C", value_parser = crate::onnx_net::parse_triple)]
    pub mean: Option<[f32; 3]>,

    /// Override the preset's per-channel std, in 0..255 units and the model's channel order.
    #[arg(long, value_name = "A,B,C", value_parser = crate::onnx_net::parse_triple)]
    pub std: Option<[f32; 3]>,

    #[command(flatten)]
    pub limits: OnnxLimitArgs,
}

impl OnnxArgs {
    pub fn choice(&self) -> crate::onnx_net::OnnxChoice {
        crate::onnx_net::OnnxChoice {
            preprocess: crate::onnx_net::PreprocessChoice {
                preset: self.preprocess,
                resize: self.resize,
                channels: None,
                mean: self.mean,
                std: self.std,
            },
            size: self.size,
            limits: self.limits.limits(),
        }
    }
}

/// `--weights`: one file, or several comma-separated. A name that exists as it is (a file
/// whose name holds a comma) is one file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightList(pub Vec<std::path::PathBuf>);

impl WeightList {
    /// Reads `--weights`' value; a name that is not UTF-8 is one file.
    pub fn parse(value: &std::ffi::OsStr) -> Result<WeightList, String> {
        let whole = || Ok(WeightList(vec![value.into()]));
        let Some(text) = value.to_str() else {
            return whole();
        };
        if !text.contains(',') || std::path::Path::new(text).exists() {
            return whole();
        }
        let parts: Vec<&str> = text.split(',').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("'{text}': an empty name in the list"));
        }
        Ok(WeightList(parts.into_iter().map(Into::into).collect()))
    }
}

/// clap's side of [`WeightList::parse`]: paths need not be UTF-8.
#[derive(Clone, Copy, Debug)]
pub struct WeightListParser;

impl clap::builder::TypedValueParser for WeightListParser {
    type Value = WeightList;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<WeightList, clap::Error> {
        WeightList::parse(value).map_err(|e| {
            clap::Error::raw(
                clap::error::ErrorKind::InvalidValue,
                format!("--weights {e}\n"),
            )
        })
    }
}

/// The network and what features to read from it: shared by every command that runs a network
/// for features (featurize) or records where features came from (train-head, tune).
#[derive(clap::Args, Debug, Clone)]
pub struct BackboneArgs {
    #[command(flatten)]
    pub choice: NetworkChoice,

    /// Layer to read features from: mixed_5d, mixed_6e or mixed_7c for InceptionV3
    /// [default: mixed_7c]; conv_pw_13_relu for MobileNet v1. With several networks, one per
    /// network, comma-separated (an empty one: that network's default).
    #[arg(long, value_name = "LAYER")]
    pub layer: Option<String>,

    /// Spatial pooling of the layer: avg, max, or none (flatten C*H*W, channel-major).
    #[arg(long, default_value = "avg", value_name = "avg|max|none")]
    pub pool: crate::backbone::Pool,

    /// Test-time augmentation: flip also runs each image mirrored left-right and averages the
    /// two feature vectors (twice the network time; recorded in the output's provenance).
    #[arg(long, default_value = "none", value_name = "none|flip")]
    pub tta: crate::backbone::Tta,
}

impl NetworkChoice {
    /// True when neither a network nor weights were named.
    pub fn is_empty(&self) -> bool {
        self.weights.is_none() && self.backbone.is_empty() && self.variant.is_none()
    }

    /// The options of each network named, in order: one per `--backbone` name (paired with
    /// `--weights` in order when both are given), else one per weight file, else the default
    /// network; the defaults for the rest. Bad combinations are one line each.
    pub fn options_list(&self) -> anyhow::Result<Vec<crate::backbone::BackboneOptions>> {
        let kinds = &self.backbone;
        let weights: &[std::path::PathBuf] = self.weights.as_ref().map_or(&[], |w| &w.0);
        for (i, k) in kinds.iter().enumerate() {
            if kinds[..i].contains(k) {
                anyhow::bail!(
                    "--backbone names {} twice: name each network once",
                    k.name()
                );
            }
        }
        if !kinds.is_empty() && !weights.is_empty() && kinds.len() != weights.len() {
            anyhow::bail!(
                "--weights names {} file(s) for {} networks (--backbone {}): give one per \
                 network, in the same order, or none",
                weights.len(),
                kinds.len(),
                kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(",")
            );
        }
        let n = kinds.len().max(weights.len()).max(1);
        let variant = self.variant.map(|v| v.name().to_string());
        Ok((0..n)
            .map(|i| {
                let kind = kinds.get(i).copied();
                crate::backbone::BackboneOptions {
                    kind,
                    weights: weights.get(i).cloned(),
                    // With several networks the variant is for those that have variants (or
                    // may: a file not yet read); alone, the network's loader judges it.
                    variant: variant
                        .clone()
                        .filter(|_| n == 1 || kind.is_none_or(|k| !k.spec().variants.is_empty())),
                    onnx: self.onnx.choice(),
                    ..Default::default()
                }
            })
            .collect())
    }

    /// The options of the one network named; several are refused in one line.
    pub fn options(&self) -> anyhow::Result<crate::backbone::BackboneOptions> {
        let mut list = self.options_list()?;
        if list.len() > 1 {
            anyhow::bail!(
                "{} networks named (--backbone/--weights): this command runs one (featurize \
                 runs several)",
                list.len()
            );
        }
        Ok(list.remove(0))
    }
}

impl BackboneArgs {
    /// The options of each network named (see [`NetworkChoice::options_list`]) with the layer,
    /// pooling and test-time augmentation asked for.
    pub fn options_list(&self) -> anyhow::Result<Vec<crate::backbone::BackboneOptions>> {
        let mut list = self.choice.options_list()?;
        let layers: Vec<Option<String>> = match &self.layer {
            None => vec![None; list.len()],
            // One network: the name as given, commas and all.
            Some(l) if list.len() == 1 => vec![Some(l.clone())],
            Some(l) => {
                let names: Vec<Option<String>> = l
                    .split(',')
                    .map(|s| (!s.is_empty()).then(|| s.to_string()))
                    .collect();
                if names.len() != list.len() {
                    anyhow::bail!(
                        "--layer names {} layer(s) for {} networks: give one per network, \
                         comma-separated (an empty one for a network's default), or none",
                        names.len(),
                        list.len()
                    );
                }
                names
            }
        };
        for (opts, layer) in list.iter_mut().zip(layers) {
            opts.layer = layer;
            opts.pool = self.pool;
            opts.tta = self.tta;
        }
        Ok(list)
    }
}

/// Limits on an ONNX model (`--weights MODEL.onnx`): shared by the commands that load one.
#[derive(clap::Args, Debug, Clone)]
pub struct OnnxLimitArgs {
    /// Refuse an ONNX model larger than this many MiB (the file and its external data).
    #[arg(long, default_value_t = crate::onnx_net::DEFAULT_MAX_MODEL_MB, value_name = "MB")]
    pub max_model_mb: u64,

    /// Give up on an ONNX model whose optimisation takes longer than this many seconds.
    #[arg(long, default_value_t = crate::onnx_net::DEFAULT_MAX_OPTIMIZE_SECS as f64,
          value_name = "S", value_parser = positive_secs)]
    pub max_optimize_secs: f64,
}

impl Default for OnnxLimitArgs {
    fn default() -> Self {
        OnnxLimitArgs {
            max_model_mb: crate::onnx_net::DEFAULT_MAX_MODEL_MB,
            max_optimize_secs: crate::onnx_net::DEFAULT_MAX_OPTIMIZE_SECS as f64,
        }
    }
}

impl OnnxLimitArgs {
    pub fn limits(&self) -> crate::onnx_net::Limits {
        crate::onnx_net::Limits {
            max_bytes: self.max_model_mb.saturating_mul(1 << 20),
            optimize_timeout: std::time::Duration::from_secs_f64(self.max_optimize_secs),
        }
    }
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x > 0.0 && x <= 1e6 => Ok(x),
        _ => Err(format!("'{s}' is not a number of seconds above 0")),
    }
}

/// Opens the device `--device` names; unless `quiet`, says which GPU the network runs on (the
/// CPU, the default, goes unsaid).
pub fn open_device(
    choice: crate::device::DeviceChoice,
    quiet: bool,
) -> anyhow::Result<burn::prelude::Device> {
    let (device, description) = crate::device::open(choice).map_err(anyhow::Error::msg)?;
    if !quiet && !crate::device::is_cpu(&device) {
        crate::note!("running on {description}");
    }
    Ok(device)
}

/// How a command ended, for the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The command ran but its result is not complete (nothing featurized, or `--strict` and
    /// something skipped): exit code 2.
    Incomplete,
    /// Ctrl-C stopped the command before it finished: exit code 130, as a shell reports a
    /// process killed by SIGINT.
    Interrupted,
}

/// True when `err` is a closed stdout (`dltool featurize x | head`): not worth a message.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            || e.downcast_ref::<crate::features::FeatureError>()
                .is_some_and(|fe| matches!(fe, crate::features::FeatureError::Io { error, .. } if error.kind() == std::io::ErrorKind::BrokenPipe))
    })
}

/// A failed write to stdout, named as such (a closed pipe is recognised by [`is_broken_pipe`]).
pub fn stdout_error(e: std::io::Error) -> anyhow::Error {
    anyhow::Error::new(e).context("cannot write to stdout")
}

/// Refuses `table` (read from `file`) if its features are not the head's kind; when they carry
/// no provenance (CSV) but the head does, says that only their width could be checked: 768
/// columns of MobileNet 0.75 and of InceptionV3's mixed_6e look alike.
pub fn check_head_features(
    head: &crate::head::Head,
    table: &crate::features::FeatureTable,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    head.check_features(table.dim, table.meta.as_ref())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let h = &head.provenance;
    if table.meta.is_none() && !h.backbone.is_empty() {
        crate::note!(
            "{}: these features carry no provenance: only their width ({}) was checked against \
             the head's ({}, layer {})",
            file.display(),
            table.dim,
            h.backbone,
            h.layer
        );
    }
    Ok(())
}

/// A progress bar on stderr, or a hidden one when stderr is not a terminal or `quiet`.
pub fn progress_bar(len: u64, quiet: bool, template: &str) -> ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

/// Sets the size of rayon's global pool (decoding, the network, training).
pub fn set_threads(threads: Option<u32>) {
    if let Some(n) = threads {
        // Fails only if a pool already exists (a second command in one process): keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(n as usize)
            .build_global();
    }
}

/// stdout, or a temporary file renamed into place when everything is written.
pub enum Sink {
    Stdout(std::io::StdoutLock<'static>),
    File(BufWriter<crate::features::AtomicFile>),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stdout(s) => s.write(buf).map_err(named_stdout),
            Sink::File(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout(s) => s.flush().map_err(named_stdout),
            Sink::File(f) => f.flush(),
        }
    }
}

/// The same error, its message saying stdout; the kind stays, so a closed pipe is still one.
fn named_stdout(e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("cannot write to stdout: {e}"))
}

impl Sink {
    /// `path`, or stdout for `None` and `-`.
    pub fn open(path: Option<&std::path::Path>) -> anyhow::Result<Sink> {
        Ok(match path {
            Some(p) if p.as_os_str() != "-" => {
                Sink::File(BufWriter::new(crate::features::AtomicFile::create(p)?))
            }
            _ => Sink::Stdout(std::io::stdout().lock()),
        })
    }

    /// Flushes, and for a file renames it into place.
    pub fn finish(self) -> anyhow::Result<()> {
        match self {
            Sink::Stdout(mut s) => Ok(s.flush().map_err(named_stdout)?),
            Sink::File(f) => {
                let file = f.into_inner().map_err(|e| e.into_error())?;
                Ok(file.commit()?)
            }
        }
    }
}

/// Runs `network` over the images of `list` and writes what `format` makes of each result to
/// `sink` as soon as it is ready, in input order; reports skipped inputs on stderr and, unless
/// `quiet`, a summary (`{verb} N image(s)`). `Incomplete` when no image got through.
pub fn stream_images<N, F>(
    network: crate::featurize::Network<'_, N>,
    list: &crate::inputs::InputList,
    run: &NetworkArgs,
    quiet: bool,
    verb: &str,
    sink: &mut Sink,
    mut format: F,
) -> anyhow::Result<Status>
where
    N: Fn(crate::featurize::Pixels, usize) -> Vec<f32> + Sync,
    F: FnMut(&str, &[f32], &mut Vec<u8>) -> anyhow::Result<()>,
{
    use crate::featurize::Outcome;
    if let Sink::File(file) = sink {
        crate::features::refuse_output_over_input(
            file.get_ref().path(),
            list.inputs.iter().map(|i| &i.path),
        )?;
    }
    for skip in &list.skipped {
        crate::note!("skipped {}: {}", skip.display, skip.reason);
    }
    let progress = progress_bar(
        list.inputs.len() as u64,
        quiet,
        "{elapsed_precise} [{bar:30}] {pos}/{len} images  {per_sec}  ETA {eta}",
    );
    let (mut done, mut skipped) = (0usize, list.skipped.len());
    let mut line = Vec::new();
    crate::featurize::run_network(
        network,
        &list.inputs,
        run.batch_size as usize,
        run.max_pixels,
        |i, outcome| {
            let input = &list.inputs[i];
            match outcome {
                Outcome::Features(values) => {
                    line.clear();
                    format(&input.display, values, &mut line)?;
                    sink.write_all(&line)?;
                    // Each row reaches a pipe as soon as it exists.
                    sink.flush()?;
                    done += 1;
                }
                Outcome::Skipped(reason) => {
                    progress.suspend(|| crate::note!("skipped {}: {reason}", input.display));
                    skipped += 1;
                }
            }
            progress.inc(1);
            Ok(())
        },
    )?;
    progress.finish_and_clear();
    if !quiet {
        crate::note!("{verb} {done} image(s), skipped {skipped}");
    }
    Ok(if done == 0 {
        crate::note!("dltool: no image was {verb}");
        Status::Incomplete
    } else {
        Status::Ok
    })
}

#[cfg(test)]
mod tests {
    use super::WeightList;
    use std::ffi::OsStr;

    #[test]
    fn weight_lists_split_on_commas_unless_the_name_exists() {
        let list = |s: &str| WeightList::parse(OsStr::new(s)).map(|w| w.0.len());
        assert_eq!(list("a.pth"), Ok(1));
        assert_eq!(list("a.pth,b.pth"), Ok(2));
        assert!(list("a.pth,,b.pth").unwrap_err().contains("empty name"));
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join("x,y.pth");
        std::fs::write(&odd, b"").unwrap();
        assert_eq!(list(odd.to_str().unwrap()), Ok(1));
    }
}
