//! Turning command-line PATH arguments into the ordered list of images to process.
//!
//! Directories are walked recursively in byte order of their entries so the list, and hence
//! the output, is the same on every run and machine. The label of an image found under a
//! directory is the name of the first-level subfolder it sits in (empty directly in it), the
//! layout of `flower_photos/daisy/*.jpg` and of Spark's image data sources.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};

/// One image to featurize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// What the output's `path` column shows: the argument joined with the walked part.
    pub display: String,
    pub path: PathBuf,
    pub label: String,
}

/// Something named on the command line (or found while walking) that is not an image input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub display: String,
    pub reason: String,
}

/// The ordered, de-duplicated inputs, and what had to be skipped while listing them.
#[derive(Debug, Default)]
pub struct InputList {
    pub inputs: Vec<Input>,
    pub skipped: Vec<Skip>,
}

/// One thing found while listing, in list order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Input(Input),
    Skip(Skip),
}

/// Lists the images named by `args`: files, directories (recursive) or `-` for
/// newline-separated paths on stdin (each of which may itself be a file or a directory).
pub fn collect(args: &[String], stdin: &mut dyn BufRead) -> std::io::Result<InputList> {
    let mut list = InputList::default();
    let mut seen = HashSet::new();
    for_each(args, stdin, &mut |found| {
        match found {
            // The same file named twice (a folder and a file in it) gives one row.
            Found::Input(input) => {
                if seen.insert(input.path.clone()) {
                    list.inputs.push(input);
                }
            }
            Found::Skip(skip) => list.skipped.push(skip),
        }
        true
    })?;
    Ok(list)
}

/// Calls `sink` with everything `args` name, in list order, as it is found: stdin lines are
/// handled as they arrive, so a caller can start on the first image before the last path is
/// written. Nothing is de-duplicated and nothing is kept. `sink` returns false to stop early.
pub fn for_each(
    args: &[String],
    stdin: &mut dyn BufRead,
    sink: &mut dyn FnMut(Found) -> bool,
) -> std::io::Result<()> {
    for arg in args {
        if arg == "-" {
            let mut line = String::new();
            loop {
                line.clear();
                if stdin.read_line(&mut line)? == 0 {
                    break;
                }
                let path = line.strip_suffix('\n').unwrap_or(&line);
                let path = path.strip_suffix('\r').unwrap_or(path);
                if !path.is_empty() && !add_path(path, sink) {
                    return Ok(());
                }
            }
        } else if !add_path(arg, sink) {
            return Ok(());
        }
    }
    Ok(())
}

fn add_path(arg: &str, sink: &mut dyn FnMut(Found) -> bool) -> bool {
    let path = PathBuf::from(arg);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => walk(arg, &path, sink),
        // A named file goes through even if it is not an image: the decoder says why it is not.
        Ok(meta) if meta.is_file() => sink(Found::Input(Input {
            display: arg.to_string(),
            path,
            label: String::new(),
        })),
        // Opening a FIFO would block the run forever; a device is never a picture.
        Ok(_) => sink(Found::Skip(Skip {
            display: arg.to_string(),
            reason: NOT_REGULAR.to_string(),
        })),
        Err(e) => sink(Found::Skip(Skip {
            display: arg.to_string(),
            reason: io_reason(&path, &e),
        })),
    }
}

const NOT_REGULAR: &str = "not a regular file (fifo, socket or device)";

fn walk(arg: &str, root: &Path, sink: &mut dyn FnMut(Found) -> bool) -> bool {
    let walker = walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by(|a, b| a.file_name().cmp(b.file_name()))
        .into_iter()
        // Hidden entries (.git, .DS_Store, editor swap files) are never images a user meant.
        .filter_entry(|e| e.depth() == 0 || !e.file_name().as_encoded_bytes().starts_with(b"."));
    for entry in walker {
        match entry {
            Ok(entry) => {
                if entry.file_type().is_dir() {
                    continue;
                }
                let rel = entry.path().strip_prefix(root).unwrap_or(entry.path());
                if !entry.file_type().is_file() {
                    if !sink(Found::Skip(Skip {
                        display: join_display(arg, rel),
                        reason: NOT_REGULAR.to_string(),
                    })) {
                        return false;
                    }
                    continue;
                }
                let label = if entry.depth() >= 2 {
                    rel.components()
                        .next()
                        .map(|c| crate::features::escape_os(c.as_os_str()))
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                let input = Input {
                    display: join_display(arg, rel),
                    path: entry.path().to_path_buf(),
                    label,
                };
                if !sink(Found::Input(input)) {
                    return false;
                }
            }
            Err(err) => {
                let path = err.path().map(Path::to_path_buf).unwrap_or_default();
                let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                let reason = if err.loop_ancestor().is_some() {
                    "symlink loop".to_string()
                } else if let Some(io) = err.io_error() {
                    io_reason(&path, io)
                } else {
                    err.to_string()
                };
                if !sink(Found::Skip(Skip {
                    display: join_display(arg, &rel),
                    reason,
                })) {
                    return false;
                }
            }
        }
    }
    true
}

/// `flowers/` + `daisy/1.jpg` shows as `flowers/daisy/1.jpg`, keeping the user's spelling.
fn join_display(arg: &str, rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        return arg.to_string();
    }
    // Not lossy: two names that differ only in bytes that are not UTF-8 must stay two paths.
    let rel = crate::features::escape_os(rel.as_os_str());
    if arg.ends_with('/') {
        format!("{arg}{rel}")
    } else {
        format!("{arg}/{rel}")
    }
}

/// `--shard K/N`: the K-th of N contiguous blocks of the input list, K counted from 0 (as
/// Kubernetes' `JOB_COMPLETION_INDEX` and Spark's partition ids are). Block K holds the items
/// `floor(K*len/N) .. floor((K+1)*len/N)`, so the blocks are disjoint, cover the list, differ in
/// size by at most one, and the outputs of shards 0..N-1 concatenated in order are the output
/// of one run over the whole list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// The positions of this shard's items in a list of `len`.
    pub fn range(&self, len: usize) -> std::ops::Range<usize> {
        // u128: `len * count` must not overflow for any list that fits in memory.
        let at = |k: usize| (len as u128 * k as u128 / self.count as u128) as usize;
        at(self.index)..at(self.index + 1)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected K/N with 0 <= K < N, shards numbered from 0 (e.g. 0/4 ... 3/4)";
        let (k, n) = s.split_once('/').ok_or_else(|| format!("'{s}': {usage}"))?;
        let num = |t: &str| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| format!("'{s}': {usage}"))
        };
        let (index, count) = (num(k)?, num(n)?);
        if count == 0 {
            return Err(format!("'{s}': the number of shards N must be at least 1"));
        }
        if index >= count {
            return Err(format!(
                "'{s}': shard {index} does not exist, shards are numbered 0 to {} (from 0)",
                count - 1
            ));
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// One short reason for a file-system error, in the words a user would search for.
pub fn io_reason(path: &Path, err: &std::io::Error) -> String {
    use std::io::ErrorKind;
    if err.raw_os_error() == Some(40) {
        // ELOOP: a symlink that leads back to itself.
        return "symlink loop".to_string();
    }
    match err.kind() {
        ErrorKind::NotFound => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                "broken symlink".to_string()
            } else {
                "no such file or directory".to_string()
            }
        }
        ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"x").unwrap();
    }

    #[test]
    fn labels_come_from_the_first_level_folder_and_order_is_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("b/2.jpg"));
        touch(&root.join("b/1.jpg"));
        touch(&root.join("a/deep/3.jpg"));
        touch(&root.join("top.jpg"));
        touch(&root.join(".hidden/4.jpg"));
        touch(&root.join("a/.DS_Store"));
        let arg = format!("{}/", root.display());
        let list = collect(std::slice::from_ref(&arg), &mut std::io::empty()).unwrap();
        let got: Vec<(String, String)> = list
            .inputs
            .iter()
            .map(|i| {
                (
                    i.display.strip_prefix(&arg).unwrap().to_string(),
                    i.label.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a/deep/3.jpg".into(), "a".into()),
                ("b/1.jpg".into(), "b".into()),
                ("b/2.jpg".into(), "b".into()),
                ("top.jpg".into(), "".into()),
            ]
        );
        assert!(list.skipped.is_empty());
    }

    #[test]
    fn stdin_paths_duplicates_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.png");
        touch(&f);
        let text = format!(
            "{}\n\n{}\r\n{}/nope.png\n",
            f.display(),
            f.display(),
            dir.path().display()
        );
        let args = vec!["-".to_string()];
        let list = collect(&args, &mut text.as_bytes()).unwrap();
        assert_eq!(list.inputs.len(), 1);
        assert_eq!(list.inputs[0].label, "");
        assert_eq!(list.skipped.len(), 1);
        assert_eq!(list.skipped[0].reason, "no such file or directory");
    }

    #[test]
    fn shards_partition_the_list_into_contiguous_blocks() {
        for len in [0usize, 1, 2, 7, 10, 1000, 1001] {
            for count in [1usize, 2, 3, 4, 7, 16] {
                let mut next = 0;
                for index in 0..count {
                    let r = Shard { index, count }.range(len);
                    assert_eq!(r.start, next, "len {len}, shard {index}/{count}");
                    assert!(r.len() == len / count || r.len() == len / count + 1);
                    next = r.end;
                }
                assert_eq!(next, len, "len {len} with {count} shards");
            }
        }
        assert_eq!("2/4".parse::<Shard>().unwrap().range(10), 5..7);
        assert_eq!("0/1".parse::<Shard>().unwrap().range(3), 0..3);
    }

    #[test]
    fn bad_shards_are_refused_with_the_rule() {
        for (text, want) in [
            ("4/4", "numbered 0 to 3"),
            ("1/0", "at least 1"),
            ("-1/4", "0 <= K < N"),
            ("2", "0 <= K < N"),
            ("a/b", "0 <= K < N"),
            ("1/2/3", "0 <= K < N"),
        ] {
            let e = text.parse::<Shard>().unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains(text), "{text}: {e}");
        }
    }

    #[test]
    fn for_each_hands_over_stdin_lines_as_they_come_without_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.png");
        touch(&f);
        let text = format!(
            "{0}\n{0}\r\n\n{1}/nope.png",
            f.display(),
            dir.path().display()
        );
        let mut got = Vec::new();
        for_each(&["-".to_string()], &mut text.as_bytes(), &mut |found| {
            got.push(found);
            true
        })
        .unwrap();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(matches!(&got[0], Found::Input(i) if i.path == f));
        assert_eq!(got[0], got[1]);
        assert!(matches!(&got[2], Found::Skip(s) if s.reason == "no such file or directory"));

        // The sink can stop the listing.
        let mut n = 0;
        for_each(&["-".to_string()], &mut text.as_bytes(), &mut |_| {
            n += 1;
            false
        })
        .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn broken_symlinks_and_loops_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("ok/1.jpg"));
        std::os::unix::fs::symlink(root.join("missing.jpg"), root.join("ok/broken.jpg")).unwrap();
        std::os::unix::fs::symlink(root, root.join("ok/loop")).unwrap();
        std::os::unix::fs::symlink(root.join("self"), root.join("self")).unwrap();
        let args = vec![root.display().to_string()];
        let list = collect(&args, &mut std::io::empty()).unwrap();
        assert_eq!(list.inputs.len(), 1, "{list:?}");
        let mut reasons: Vec<&str> = list.skipped.iter().map(|s| s.reason.as_str()).collect();
        reasons.sort();
        assert_eq!(
            reasons,
            vec!["broken symlink", "symlink loop", "symlink loop"]
        );
    }
}
