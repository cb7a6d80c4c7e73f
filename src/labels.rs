//! Names of a pretrained classifier's outputs: ImageNet synset ids and human names.

use std::path::{Path, PathBuf};

/// One output class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// WordNet synset id (`n11939491`), when the file gives one.
    pub synset: Option<String>,
    pub name: String,
}

/// File names looked for next to the weights, in order.
pub const LABEL_FILES: &[&str] = &["imagenet_class_index.json", "labels.txt"];

/// Where Keras publishes the 1000 ImageNet classes in the order MobileNet and torchvision use.
pub const KERAS_LABELS_URL: &str =
    "https://storage.googleapis.com/download.tensorflow.org/data/imagenet_class_index.json";

/// Reads a label file:
/// - Keras' `imagenet_class_index.json`: `{"0": ["n01440764", "tench"], ...}`;
/// - a JSON array of names, or of `[synset, name]` pairs;
/// - text, one class per line: `name`, or `n01440764 tench` / `n01440764,tench`.
///
/// Every error is one line naming the file.
pub fn read(path: &Path) -> Result<Vec<Label>, String> {
    let err = |m: String| format!("{}: {m}", path.display());
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read labels: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|_| err("labels are not UTF-8 text".into()))?;
    let labels = if text.trim_start().starts_with(['{', '[']) {
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
        from_json(&json).map_err(err)?
    } else {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(from_line)
            .collect()
    };
    if labels.is_empty() {
        return Err(err("no labels in the file".into()));
    }
    Ok(labels)
}

fn is_synset(s: &str) -> bool {
    s.len() == 9 && s.starts_with('n') && s[1..].bytes().all(|b| b.is_ascii_digit())
}

fn from_line(line: &str) -> Label {
    if let Some((first, rest)) = line.split_once([' ', '\t', ','])
        && is_synset(first)
    {
        return Label {
            synset: Some(first.to_string()),
            name: rest.trim().to_string(),
        };
    }
    Label {
        synset: None,
        name: line.to_string(),
    }
}

fn from_entry(v: &serde_json::Value, at: &str) -> Result<Label, String> {
    match v {
        serde_json::Value::String(name) => Ok(Label {
            synset: None,
            name: name.clone(),
        }),
        serde_json::Value::Array(pair) => match pair.as_slice() {
            [
                serde_json::Value::String(id),
                serde_json::Value::String(name),
            ] => Ok(Label {
                synset: Some(id.clone()),
                name: name.clone(),
            }),
            _ => Err(format!("class {at}: expected [synset, name]")),
        },
        _ => Err(format!("class {at}: expected a name or [synset, name]")),
    }
}

fn from_json(json: &serde_json::Value) -> Result<Vec<Label>, String> {
    match json {
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, v)| from_entry(v, &i.to_string()))
            .collect(),
        serde_json::Value::Object(map) => {
            let mut slots: Vec<Option<Label>> = vec![None; map.len()];
            for (key, v) in map {
                let i: usize = key.parse().ok().filter(|&i| i < map.len()).ok_or_else(|| {
                    format!(
                        "key '{key}' is not a class index in 0..{} (Keras' \
                             imagenet_class_index.json layout)",
                        map.len()
                    )
                })?;
                slots[i] = Some(from_entry(v, key)?);
            }
            // Keys are distinct and all below len, so every slot is filled.
            Ok(slots.into_iter().flatten().collect())
        }
        _ => Err("expected a JSON object or array of classes".into()),
    }
}

/// The label file for a classifier whose weights are at `weights`: `explicit` if given, else
/// one of [`LABEL_FILES`] in the weights' folder, then `$DLTOOL_HOME/`. The error says where it
/// looked and where to get Keras' file.
pub fn resolve(explicit: Option<&Path>, weights: &Path) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let mut dirs: Vec<PathBuf> = weights
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    if let Some(home) = crate::weights::home_dir() {
        dirs.push(home);
    }
    let looked: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| LABEL_FILES.iter().map(move |f| d.join(f)))
        .collect();
    if let Some(found) = looked.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let list: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
    Err(format!(
        "no class labels found (looked for {}); pass --labels FILE, e.g. Keras' \
         imagenet_class_index.json from {KERAS_LABELS_URL}",
        list.join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn keras_json_in_index_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "l.json",
            r#"{"1": ["n01443537", "goldfish"], "0": ["n01440764", "tench"]}"#,
        );
        let labels = read(&p).unwrap();
        assert_eq!(labels[0].synset.as_deref(), Some("n01440764"));
        assert_eq!(labels[1].name, "goldfish");
    }

    #[test]
    fn text_lines_with_and_without_synsets() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            &dir,
            "l.txt",
            "n01440764 tench, Tinca tinca\nbackground\n\n",
        );
        let labels = read(&p).unwrap();
        assert_eq!(labels.len(), 2);
        assert_eq!(labels[0].name, "tench, Tinca tinca");
        assert_eq!(labels[1].synset, None);
    }

    #[test]
    fn bad_files_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let gap = write(&dir, "gap.json", r#"{"0": ["n1", "a"], "2": ["n2", "b"]}"#);
        assert!(read(&gap).unwrap_err().contains("key '2'"));
        let empty = write(&dir, "empty.txt", "\n\n");
        assert!(read(&empty).unwrap_err().ends_with("no labels in the file"));
        let broken = write(&dir, "broken.json", "{\"0\": ");
        assert!(read(&broken).unwrap_err().contains("not valid JSON"));
    }
}
