//! `dltool weights`: the registry of known pretrained weights and its cache.

use super::Status;
use crate::registry::{self, Check, Entry, Format};
use anyhow::{Context, anyhow, bail};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "\
Files go to $DLTOOL_HOME/weights/<NAME>/ (default: the platform cache folder, ~/.cache/dltool \
on Linux), are checked against their size and SHA-256, and are downloaded once. An interrupted \
download is resumed by the next fetch. $DLTOOL_WEIGHTS_MIRROR=URL fetches <URL>/<NAME>/<file> \
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
            println!("{}", path.display());
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
            println!("{}", path.display());
            Ok(Status::Ok)
        }
        Action::Verify { name } => verify(name.as_deref()),
        Action::Path { name } => {
            let entry = lookup(&name)?;
            let path = registry::cached_path(entry)
                .ok_or_else(|| anyhow!(registry::not_fetched_error(entry)))?;
            println!("{}", path.display());
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

/// The check a file must pass before import: it loads as the entry's network.
fn validate(entry: &Entry, path: &Path) -> Result<(), String> {
    let spec = crate::backbones::of_registry_entry(entry.name)
        .ok_or_else(|| format!("{}: no network of dltool uses this entry", entry.name))?;
    crate::backbones::check_weights_for(spec, path).map_err(|e| e.to_string())?;
    match entry.format {
        Format::Pytorch => {
            let device = burn::prelude::Device::flex();
            let opts = crate::backbones::LoadOptions {
                device: &device,
                variant: None,
            };
            (spec.load)(path, &opts)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Format::TfjsLayers => {
            let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("not JSON: {e}"))?;
            if json.get("modelTopology").is_none() || json.get("weightsManifest").is_none() {
                return Err(
                    "not a TF.js layers model.json (no modelTopology/weightsManifest)".into(),
                );
            }
            registry::manifest_paths(path).map(|_| ())
        }
    }
}

fn human(bytes: u64) -> String {
    const MB: f64 = 1024.0 * 1024.0;
    if bytes as f64 >= MB {
        format!("{:.1} MiB", bytes as f64 / MB)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

fn list() -> anyhow::Result<Status> {
    let cache = registry::cache_from_env().map_err(|e| anyhow!(e))?;
    println!("{:<26} {:<8} {:>10}  DESCRIPTION", "NAME", "CACHED", "SIZE");
    for entry in registry::entries() {
        let (cached, size) = match cache.cached_size(entry) {
            Some(n) => ("yes", human(n)),
            None => ("no", entry.known_size().map_or("?".into(), human)),
        };
        let note = if entry.hashes_known() {
            ""
        } else if entry.format == Format::TfjsLayers {
            " [hashes unknown: files are not verified]"
        } else {
            " [only a sha256 prefix is known]"
        };
        println!(
            "{:<26} {:<8} {:>10}  {}{note}",
            entry.name, cached, size, entry.description
        );
    }
    println!("cache: {}", cache.root.join("weights").display());
    Ok(Status::Ok)
}

/// The entry's main file is installed (its other files may still be missing).
fn started(cache: &registry::Cache, entry: &Entry) -> bool {
    cache
        .entry_dir(entry)
        .join(entry.main_file().name)
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
        println!("nothing cached in {}", cache.root.join("weights").display());
        return Ok(Status::Ok);
    }
    let mut failed = 0usize;
    for entry in targets {
        let checks = cache
            .verify(entry)
            .map_err(|e| anyhow!(e))
            .with_context(|| format!("verifying {}", entry.name))?;
        for c in &checks {
            let (word, why) = match &c.check {
                Check::Ok => ("ok", String::new()),
                Check::Unverifiable => ("present", " (no hash known)".to_string()),
                Check::Missing => ("MISSING", String::new()),
                Check::Bad(why) => ("BAD", format!(": {why}")),
            };
            if matches!(c.check, Check::Missing | Check::Bad(_)) {
                failed += 1;
            }
            println!("{word:<8} {}{why}", c.path.display());
        }
    }
    if failed > 0 {
        bail!(
            "{failed} cached weight file(s) missing or damaged: run `dltool weights fetch NAME` again"
        );
    }
    Ok(Status::Ok)
}
