//! `dltool split`: one feature file into train/test (or more) files.

use crate::features::{self, Format};
use crate::split;
use anyhow::bail;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Example: dltool split features.csv --fractions 0.6,0.4 --seed 42 -o train.csv -o test.csv

Without --by-hash the split is stratified: each label is shuffled with the seed and cut in the \
given proportions, so every part keeps the class balance. With --by-hash a row's part depends \
only on the SHA-256 of its path, so files stay on their side as new files are added.")]
pub struct Args {
    /// Feature file (CSV or safetensors, as written by featurize).
    #[arg(value_name = "FEATURES")]
    pub input: PathBuf,

    /// Proportions of the parts, comma-separated (normalised to sum to 1).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0.6,0.4",
        value_name = "F,F,..."
    )]
    pub fractions: Vec<f64>,

    /// Seed of the stratified shuffle.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Assign rows by a hash of their path instead (stable as files are added; not stratified).
    #[arg(long)]
    pub by_hash: bool,

    /// Output file of each part, in order (one -o per fraction); format from the extension.
    #[arg(short = 'o', long = "output", value_name = "OUT", required = true)]
    pub outputs: Vec<PathBuf>,

    /// Output format for every part [default: each file's extension, else csv].
    #[arg(long, value_name = "csv|safetensors")]
    pub format: Option<Format>,

    /// No summary on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

pub fn run(args: Args) -> anyhow::Result<super::Status> {
    let fractions = split::normalise_fractions(&args.fractions).map_err(anyhow::Error::msg)?;
    if args.outputs.len() != fractions.len() {
        bail!(
            "{} fractions but {} output files: give one -o per fraction",
            fractions.len(),
            args.outputs.len()
        );
    }
    for (i, a) in args.outputs.iter().enumerate() {
        if args.outputs[..i].contains(a) || *a == args.input {
            bail!(
                "{}: output files must differ from each other and from the input",
                a.display()
            );
        }
        // The same file under another spelling (a symlink, ./x): caught by inode.
        features::refuse_output_over_input(a, [&args.input])?;
        features::refuse_output_over_input(a, &args.outputs[..i])?;
    }
    let table = features::read_features(&args.input)?;
    let parts = if args.by_hash {
        split::by_hash(&table.paths, &fractions)
    } else {
        split::stratified(&table.labels, &fractions, args.seed)
    };
    for (p, out) in args.outputs.iter().enumerate() {
        let rows: Vec<usize> = (0..table.len()).filter(|&i| parts[i] == p).collect();
        if rows.is_empty() {
            bail!(
                "{}: this part would get no rows ({} rows in {}): use fewer parts or larger fractions",
                out.display(),
                table.len(),
                args.input.display()
            );
        }
        let format = args
            .format
            .or_else(|| Format::from_extension(out))
            .unwrap_or(Format::Csv);
        features::write_features(out, format, &table.select(&rows))?;
        if !args.quiet {
            crate::note!("{}: {} rows", out.display(), rows.len());
        }
    }
    Ok(super::Status::Ok)
}
