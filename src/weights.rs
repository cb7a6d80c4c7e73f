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
    std::env::var_os("DLTOOL_HOME")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("dltool")))
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

/// `explicit` if given, else the first existing candidate, else an error that lists every
/// place looked at and how to fill one. `explicit` may be a file, a folder holding `model.json`
/// (a TF.js model), or the name of a fetched registry entry (`mobilenet_v1_0.25_224`).
pub fn resolve(
    explicit: Option<&Path>,
    file_names: &[&str],
    entry: &str,
) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return match std::fs::metadata(p) {
            Ok(m) if m.is_file() => Ok(p.to_path_buf()),
            Ok(m) if m.is_dir() && p.join("model.json").is_file() => Ok(p.join("model.json")),
            Ok(_) => Err(format!("{}: weights path is not a file", p.display())),
            Err(e) => match p.to_str().and_then(crate::registry::find) {
                Some(known) => crate::registry::cached_path(known)
                    .ok_or_else(|| crate::registry::not_fetched_error(known)),
                None => Err(format!("{}: cannot read weights: {e}", p.display())),
            },
        };
    }
    let looked = candidates(file_names, entry);
    if let Some(found) = looked.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let list: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "no weights found (looked for {}); run `dltool weights fetch {entry}`, pass --weights \
         FILE, or set DLTOOL_WEIGHTS",
        list.join(", ")
    ))
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
