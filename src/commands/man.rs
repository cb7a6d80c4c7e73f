//! `dltool man`: man pages generated from the command-line definition.

use super::Status;
use anyhow::Context;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Write dltool.1 and one page per subcommand (dltool-featurize.1, ...) into this folder
    /// instead of printing dltool.1 on stdout.
    #[arg(short, long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
}

/// Renders the pages of `cli` (the whole `dltool` command).
pub fn run(args: Args, cli: clap::Command) -> anyhow::Result<Status> {
    match args.out_dir {
        None => {
            clap_mangen::Man::new(cli).render(&mut std::io::stdout().lock())?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(cli, &dir)
                .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
        }
    }
    Ok(Status::Ok)
}
