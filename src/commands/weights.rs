//! `dltool weights`: the registry of known pretrained weights and its cache.

use super::Status;
use crate::registry::{self, Check, Entry};
use anyhow::{Context, anyhow, bail};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Files go to $DLTOOL_HOME/weights/<NAME>/ (default: the platform cache folder, ~/.cache/dltool \
on Linux), are checked against their published size and SHA-256 (where the home publishes them: \
see `dltool weights list`), and are downloaded once; an entry is installed only when all of its \
files are verified. An interrupted download is resumed by the next fetch. $DLTOOL_WEIGHTS_MIRROR=URL fetches <URL>/<NAME>/<file> \
instead of the original locations (plain http only for 127.0.0.1, localhost or [::1]).")]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Action {
    /// Known weights: name, whether cached, size, description.
    List,
    /// Download weights into the cache (resuming, verifying) and print the main file's path.
    Fetch {
        /// Registry name (see `dltool weights list`).
        name: String,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Copy a local weight file (a .pth, or a TF.js model.json with its shards beside it) into
    /// the cache, after checking that it loads and matches the registry's hashes.
    Import {
        /// The file to import.
        file: PathBuf,
        /// Registry name to import it as (default: guessed from the file name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Re-hash cached files against the registry (all cached entries, or NAME).
    Verify {
        /// Registry name.
        name: Option<String>,
    },
    /// Print the path of a fetched entry's main file.
    Path {
        /// Registry name.
        name: String,
    },
}

pub fn run(args: Args) -> anyhow::Result<Status> {
    match args.action {
        Action::List => list(),
        Action::Fetch { name, quiet } => {
            let entry = lookup(&name)?;
            let path = registry::fetch(entry, !quiet).map_err(|e| anyhow!(e))?;
            crate::outln!("{}", path.display())?;
            Ok(Status::Ok)
        }
        Action::Import { file, name } => {
            let entry = match &name {
                Some(n) => lookup(n)?,
                None => registry::infer_entry(&file).ok_or_else(|| {
                    anyhow!(
                        "cannot tell which weights {} are: pass --name NAME (one of: {})",
                        file.display(),
                        names()
                    )
                })?,
            };
            let validate = |p: &Path| validate(entry, p);
            let path = registry::import(entry, &file, &validate).map_err(|e| anyhow!(e))?;
            crate::outln!("{}", path.display())?;
            Ok(Status::Ok)
        }
        Action::Verify { name } => verify(name.as_deref()),
        Action::Path { name } => {
            let entry = lookup(&name)?;
            let path = registry::cached_path(entry)
                .ok_or_else(|| anyhow!(registry::not_fetched_error(entry)))?;
            crate::outln!("{}", path.display())?;
            Ok(Status::Ok)
        }
    }
}

fn names() -> String {
    registry::entries()
        .iter()
        .map(|e| e.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn lookup(name: &str) -> anyhow::Result<&'static Entry> {
    registry::find(name).ok_or_else(|| anyhow!("unknown weights {name:?}: known are {}", names()))
}

/// The check a file must pass before import: it loads as the entry's network (for a TF.js
/// model that reads every shard, so a missing or short one is refused too).
fn validate(entry: &Entry, path: &Path) -> Result<(), String> {
    let spec = crate::backbones::of_registry_entry(entry.name)
        .ok_or_else(|| format!("{}: no network of this dltool uses this entry", entry.name))?;
    crate::backbones::check_weights_for(spec, path).map_err(|e| e.to_string())?;
    let device = burn::prelude::Device::flex();
    let opts = crate::backbones::LoadOptions {
        device: &device,
        variant: None,
    };
    (spec.load)(path, &opts)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn list() -> anyhow::Result<Status> {
    let cache = registry::cache_from_env().map_err(|e| anyhow!(e))?;
    crate::outln!(
        "{:<26} {:<8} {:>10}  {:<15} DESCRIPTION",
        "NAME",
        "CACHED",
        "SIZE",
        "KNOWN HASH"
    )?;
    for entry in registry::entries() {
        let (cached, size) = match cache.cached_size(entry) {
            Some(n) => ("yes", registry::human_bytes(n)),
            None => (
                "no",
                entry.known_size().map_or("?".into(), registry::human_bytes),
            ),
        };
        crate::outln!(
            "{:<26} {:<8} {:>10}  {:<15} {}",
            entry.name,
            cached,
            size,
            entry.checks(),
            entry.description
        )?;
    }
    crate::outln!("cache: {}", cache.root.join("weights").display())?;
    Ok(Status::Ok)
}

/// The entry's main file is installed (its other files may still be missing).
fn started(cache: &registry::Cache, entry: &Entry) -> bool {
    cache
        .entry_dir(entry)
        .join(entry.main_file().installed_name())
        .is_file()
}

fn verify(name: Option<&str>) -> anyhow::Result<Status> {
    let cache = registry::cache_from_env().map_err(|e| anyhow!(e))?;
    let targets: Vec<&'static Entry> = match name {
        Some(n) => {
            let entry = lookup(n)?;
            if !started(&cache, entry) {
                bail!(registry::not_fetched_error(entry));
            }
            vec![entry]
        }
        None => registry::entries()
            .iter()
            .filter(|e| started(&cache, e))
            .collect(),
    };
    if targets.is_empty() {
        crate::outln!("nothing cached in {}", cache.root.join("weights").display())?;
        return Ok(Status::Ok);
    }
    let mut failed = 0usize;
    let mut damaged: Vec<&str> = Vec::new();
    for entry in targets {
        let checks = cache
            .verify(entry)
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("verifying {}", entry.name))?;
        for c in &checks {
            let (word, why) = match &c.check {
                Check::Ok => ("ok", String::new()),
                Check::MatchesRecord => (
                    "ok",
                    " (no hash published: matches the one recorded at download)".to_string(),
                ),
                Check::Unverifiable => ("present", " (no hash known)".to_string()),
                Check::Missing => ("MISSING", String::new()),
                Check::Bad(why) => ("BAD", format!(": {why}")),
            };
            if matches!(c.check, Check::Missing | Check::Bad(_)) {
                failed += 1;
                if !damaged.contains(&entry.name) {
                    damaged.push(entry.name);
                }
            }
            crate::outln!("{word:<8} {}{why}", c.path.display())?;
        }
    }
    if failed > 0 {
        let commands: Vec<String> = damaged
            .iter()
            .map(|n| format!("`dltool weights fetch {n}`"))
            .collect();
        bail!(
            "{failed} cached weight file(s) missing or damaged: run {} to replace them",
            commands.join(" and ")
        );
    }
    Ok(Status::Ok)
}
