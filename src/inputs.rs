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

/// Lists the images named by `args`: files, directories (recursive) or `-` for
/// newline-separated paths on stdin (each of which may itself be a file or a directory).
pub fn collect(args: &[String], stdin: &mut dyn BufRead) -> std::io::Result<InputList> {
    let mut list = InputList::default();
    let mut seen = HashSet::new();
    for arg in args {
        if arg == "-" {
            for line in stdin.lines() {
                let line = line?;
                let line = line.strip_suffix('\r').unwrap_or(&line);
                if !line.is_empty() {
                    add_path(line, &mut list, &mut seen);
                }
            }
        } else {
            add_path(arg, &mut list, &mut seen);
        }
    }
    Ok(list)
}

fn add_path(arg: &str, list: &mut InputList, seen: &mut HashSet<PathBuf>) {
    let path = PathBuf::from(arg);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_dir() => walk(arg, &path, list, seen),
        // A named file goes through even if it is not an image: the decoder says why it is not.
        Ok(meta) if meta.is_file() => push(list, seen, arg.to_string(), path, String::new()),
        // Opening a FIFO would block the run forever; a device is never a picture.
        Ok(_) => list.skipped.push(Skip {
            display: arg.to_string(),
            reason: NOT_REGULAR.to_string(),
        }),
        Err(e) => list.skipped.push(Skip {
            display: arg.to_string(),
            reason: io_reason(&path, &e),
        }),
    }
}

const NOT_REGULAR: &str = "not a regular file (fifo, socket or device)";

fn walk(arg: &str, root: &Path, list: &mut InputList, seen: &mut HashSet<PathBuf>) {
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
                    list.skipped.push(Skip {
                        display: join_display(arg, rel),
                        reason: NOT_REGULAR.to_string(),
                    });
                    continue;
                }
                let label = if entry.depth() >= 2 {
                    rel.components()
                        .next()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .unwrap_or_default()
                } else {
                    String::new()
                };
                let display = join_display(arg, rel);
                push(list, seen, display, entry.path().to_path_buf(), label);
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
                list.skipped.push(Skip {
                    display: join_display(arg, &rel),
                    reason,
                });
            }
        }
    }
}

/// `flowers/` + `daisy/1.jpg` shows as `flowers/daisy/1.jpg`, keeping the user's spelling.
fn join_display(arg: &str, rel: &Path) -> String {
    if rel.as_os_str().is_empty() {
        return arg.to_string();
    }
    let rel = rel.to_string_lossy();
    if arg.ends_with('/') {
        format!("{arg}{rel}")
    } else {
        format!("{arg}/{rel}")
    }
}

fn push(
    list: &mut InputList,
    seen: &mut HashSet<PathBuf>,
    display: String,
    path: PathBuf,
    label: String,
) {
    // The same file named twice (a folder and a file in it) gives one row.
    if seen.insert(path.clone()) {
        list.inputs.push(Input {
            display,
            path,
            label,
        });
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
