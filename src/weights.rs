//! Finding the weight file when the user does not name one, and fingerprinting it.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// File names of the default InceptionV3 weights (Google's 2015 ImageNet training run), in
/// order of preference: dltool's safetensors, then pytorch-fid's published state dict.
pub const INCEPTION_FILES: &[&str] = &[
    "inception_v3_tf2015.safetensors",
    "pt_inception-2015-12-05-6726825d.pth",
];

/// `$DLTOOL_HOME`, else the platform cache directory (`~/.cache/dltool` on Linux).
pub fn home_dir() -> Option<PathBuf> {
    crate::registry::cache_root().ok()
}

/// The places searched, in order, for any of `file_names` (paths relative to a weights folder)
/// when no `--weights` is given. `entry` is the registry entry `dltool weights fetch` installs
/// for this network, in a folder of its own name.
pub fn candidates(file_names: &[&str], entry: &str) -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("assets/weights")];
    // A binary built from a checkout finds the checkout's assets wherever it is run from.
    dirs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/weights"));
    if let Some(home) = home_dir() {
        dirs.push(home.join("weights"));
        // Where `dltool weights fetch` installs a single-file entry; folder entries (TF.js
        // models) are named by their folder in `file_names` already.
        if file_names.iter().all(|f| !f.contains('/')) {
            dirs.push(home.join("weights").join(entry));
        }
    }
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("DLTOOL_WEIGHTS") {
        out.push(PathBuf::from(p));
    }
    for dir in dirs {
        for name in file_names {
            out.push(dir.join(name));
        }
    }
    out
}

/// [`resolve_local`], and when nothing is found locally (or `explicit` names a registry entry
/// that is not cached yet), the registry entry `entry` (or the one named) is downloaded into
/// the cache, announced on stderr, unless downloads are off (`--offline`, `DLTOOL_OFFLINE`).
pub fn resolve(
    explicit: Option<&Path>,
    file_names: &[&str],
    entry: &str,
) -> Result<PathBuf, String> {
    resolve_with(explicit, file_names, entry, !crate::registry::offline())
}

/// `explicit` if given, else the first existing candidate, else an error that says where it
/// looked first and the command that fills the cache. `explicit` may be a file, a folder
/// holding `model.json` (a TF.js model), or the name of a fetched registry entry
/// (`mobilenet_v1_0.25_224`). A file of the cache is checked before it is used (see
/// `registry::Cache::ready`). Never downloads.
pub fn resolve_local(
    explicit: Option<&Path>,
    file_names: &[&str],
    entry: &str,
) -> Result<PathBuf, String> {
    resolve_with(explicit, file_names, entry, false)
}

fn resolve_with(
    explicit: Option<&Path>,
    file_names: &[&str],
    entry: &str,
    download: bool,
) -> Result<PathBuf, String> {
    use crate::registry;
    if let Some(p) = explicit {
        return match std::fs::metadata(p) {
            Ok(m) if m.is_file() => checked(p),
            Ok(m) if m.is_dir() && p.join("model.json").is_file() => checked(&p.join("model.json")),
            Ok(_) => Err(format!("{}: weights path is not a file", p.display())),
            Err(e) => match p.to_str().and_then(registry::find) {
                Some(known) => from_registry(known, download, None),
                None => Err(format!("{}: cannot read weights: {e}", p.display())),
            },
        };
    }
    let looked = candidates(file_names, entry);
    if let Some(found) = looked.iter().find(|p| p.is_file()) {
        return checked(found);
    }
    let known = registry::find(entry);
    let what = known.map_or(String::new(), |k| format!("{} ", k.backbone.as_str()));
    let places = first_places(&looked);
    let fix = format!("run `dltool weights fetch {entry}` or pass --weights FILE");
    match known {
        Some(known) if download => {
            let why = format!("no {what}weights found locally (looked in {places})");
            from_registry(known, true, Some(&why))
                .map_err(|e| format!("no {what}weights found locally and the download failed: {e}"))
        }
        _ if crate::registry::offline() => Err(format!(
            "no {what}weights found (looked in {places}) and downloads are off (--offline, \
             DLTOOL_OFFLINE): {fix}"
        )),
        _ => Err(format!(
            "no {what}weights found (looked in {places}): {fix}"
        )),
    }
}

/// The first place looked in, and the cache folder, for a message: `assets/weights and
/// /home/me/.cache/dltool/weights (+3 more)`.
fn first_places(looked: &[PathBuf]) -> String {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in looked {
        // $DLTOOL_WEIGHTS names a file; every other candidate is a file in a folder.
        let place = if std::env::var_os("DLTOOL_WEIGHTS").is_some_and(|w| Path::new(&w) == p) {
            p.clone()
        } else {
            p.parent().map(Path::to_path_buf).unwrap_or_default()
        };
        if !dirs.contains(&place) {
            dirs.push(place);
        }
    }
    let cache = home_dir().map(|h| h.join("weights"));
    let second = cache
        .as_ref()
        .filter(|c| dirs.first() != Some(*c))
        .or(dirs.get(1));
    match (dirs.first(), second) {
        (Some(a), Some(b)) => format!(
            "{} and {}{}",
            a.display(),
            b.display(),
            if dirs.len() > 2 {
                format!(" (+{} more)", dirs.len() - 2)
            } else {
                String::new()
            }
        ),
        (Some(a), None) => a.display().to_string(),
        _ => "nowhere".to_string(),
    }
}

/// `path`, after the cache's checks when it is the main file of a registry entry installed
/// in the cache (`<cache>/weights/<entry>/<file>`).
fn checked(path: &Path) -> Result<PathBuf, String> {
    use crate::registry;
    let entry = path
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .and_then(registry::find);
    if let (Some(entry), Ok(cache)) = (entry, registry::cache_from_env())
        && path.file_name().and_then(|n| n.to_str()) == Some(entry.main_file().installed_name())
        && same_file(
            path,
            &cache
                .entry_dir(entry)
                .join(entry.main_file().installed_name()),
        )
        && let Some(ready) = cache.ready(entry)?
    {
        return Ok(ready);
    }
    Ok(path.to_path_buf())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// A registry entry from the cache, checked; downloaded first when it is not there and
/// `download`. `why` starts the announcement of a download nobody asked for by name.
fn from_registry(
    entry: &crate::registry::Entry,
    download: bool,
    why: Option<&str>,
) -> Result<PathBuf, String> {
    let cache = crate::registry::cache_from_env()?;
    match cache.ready(entry)? {
        Some(main) => Ok(main),
        None if download => cache.fetch(entry, true, why),
        None if crate::registry::offline() => Err(format!(
            "{} is not downloaded yet and downloads are off (--offline, DLTOOL_OFFLINE): run \
             `dltool weights fetch {}`",
            entry.name, entry.name
        )),
        None => Err(crate::registry::not_fetched_error(entry)),
    }
}

/// SHA-256 of a weight file: the one the cache recorded when `path` is an installed file whose
/// size and mtime still match the record (so a cached file is not hashed on every run; the
/// cache's checks before use re-hash it when they do not), else computed.
pub fn fingerprint(path: &Path) -> std::io::Result<String> {
    match crate::registry::recorded_sha256(path) {
        Some(sha) => Ok(sha),
        None => sha256_file(path),
    }
}

/// Lower-case hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_path_must_exist() {
        let err = resolve(Some(Path::new("/nonexistent/w.safetensors")), &["x"], "x").unwrap_err();
        assert!(
            err.starts_with("/nonexistent/w.safetensors: cannot read weights"),
            "{err}"
        );
    }

    #[test]
    fn sha256_of_known_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
