//! The activation cache: the frozen network's output at the cut layer, once per image and
//! augmented view, so that every epoch (and every later run on the same images) skips the
//! expensive bottom of the network.
//!
//! One [`Journal`] per view lives in a directory named after what the activations depend on
//! (weights SHA-256, network, cut layer, preprocessing, views). A record is keyed by the
//! image's path, size and modification time, appended as soon as it is computed, and checked
//! by CRC on reopen: a run killed half-way resumes where it stopped, and a changed image is
//! computed again.
//!
//! Memory: the first rows that fit in `memory_limit` bytes are kept in RAM; the rest are read
//! back from the journal files when a batch needs them (the OS page cache then holds what it
//! can), so the process never holds more than the limit plus one batch of activations.

use super::FineTuneError;
use crate::features::{FeatureMeta, Row};
use crate::journal::{FileStamp, Journal};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// An augmented view of an image, computed by the frozen network and cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum View {
    /// The image as `predict` sees it (whole image resized to the network's input).
    Original,
    /// Its left-right mirror: flowers, animals and most objects keep their class when
    /// mirrored, and the mirror costs one more frozen pass, nothing else.
    Mirror,
}

impl View {
    pub fn name(self) -> &'static str {
        match self {
            View::Original => "original",
            View::Mirror => "mirror",
        }
    }
}

/// The views every fine-tune caches. Crops and scales are left out on purpose: each view costs
/// a full pass of the frozen network per image (most of a fine-tune's time on 2 cores), and a
/// crop of a whole-image resize changes the scale the pretrained blocks were tuned to.
pub const VIEWS: [View; 2] = [View::Original, View::Mirror];

/// Default for [`ActivationCache::open`]'s memory limit: 1 GiB, about 1,200 `mixed_6e`
/// activations (888 KB each) or 3,300 `mixed_7a` ones (328 KB).
pub const DEFAULT_MEMORY_LIMIT: u64 = 1 << 30;

/// The default cache directory: `$XDG_CACHE_HOME/dltool/finetune` (or the platform's).
pub fn default_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("dltool").join("finetune"))
}

/// One cached image: its label and where each view's record is.
#[derive(Debug, Clone)]
pub struct CachedImage {
    pub path: String,
    pub label: String,
    offsets: Vec<u64>,
}

/// An open cache for one network, cut layer and set of views.
pub struct ActivationCache {
    dir: PathBuf,
    journals: Vec<Journal>,
    indexes: Vec<crate::journal::JournalIndex>,
    dim: usize,
    /// Rows kept in memory, by (image, view), within `memory_limit`.
    resident: Vec<Vec<Option<Vec<f32>>>>,
    memory_limit: u64,
    memory_used: u64,
    images: Vec<CachedImage>,
}

impl ActivationCache {
    /// Opens (or creates) the cache of `meta` (backbone, weights, cut layer) under `root`.
    /// `meta.pool` and `meta.tta` are set here; `preprocess` is part of the key.
    pub fn open(
        root: &Path,
        meta: &FeatureMeta,
        preprocess: &crate::image_io::Preprocess,
        dim: usize,
        memory_limit: u64,
    ) -> Result<ActivationCache, FineTuneError> {
        let views: Vec<&str> = VIEWS.iter().map(|v| v.name()).collect();
        let key = format!(
            "{}|{}|{}|{:?}|{}",
            meta.backbone,
            meta.weights_sha256,
            meta.layer,
            preprocess,
            views.join(",")
        );
        let digest = Sha256::digest(key.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let dir = root.join(format!(
            "{}-{}-{hex}",
            meta.backbone.replace('/', "_"),
            meta.layer
        ));
        std::fs::create_dir_all(&dir).map_err(|e| FineTuneError::Cache {
            path: dir.clone(),
            message: e.to_string(),
        })?;
        let mut journals = Vec::new();
        let mut indexes = Vec::new();
        for view in VIEWS {
            let mut m = meta.clone();
            m.pool = "none".into();
            m.tta = view.name().into();
            // The cache outlives dltool upgrades only if the activations cannot have changed;
            // the version is part of the header check, so a new dltool starts a fresh cache.
            m.dltool_version = env!("CARGO_PKG_VERSION").into();
            let path = dir.join(format!("{}.journal", view.name()));
            let (journal, index) =
                Journal::open_or_create(&path, dim, &m).map_err(|e| FineTuneError::Cache {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            journals.push(journal);
            indexes.push(index);
        }
        Ok(ActivationCache {
            dir,
            journals,
            indexes,
            dim,
            resident: Vec::new(),
            memory_limit,
            memory_used: 0,
            images: Vec::new(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Floats per cached activation.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// True when every view of `path` is cached for a file with this stamp.
    pub fn is_fresh(&self, path: &str, stamp: FileStamp) -> bool {
        self.indexes
            .iter()
            .all(|ix| ix.fresh(path, stamp).is_some())
    }

    /// Appends the activations of one image, every view's `dim` floats back to back in
    /// [`VIEWS`] order.
    pub fn append(
        &mut self,
        path: &str,
        label: &str,
        stamp: FileStamp,
        views: &[f32],
    ) -> Result<(), FineTuneError> {
        debug_assert_eq!(views.len(), self.dim * VIEWS.len());
        for ((journal, index), values) in self
            .journals
            .iter_mut()
            .zip(&mut self.indexes)
            .zip(views.chunks_exact(self.dim))
        {
            let row = Row {
                path,
                label,
                features: values,
            };
            let offset = journal
                .append(&row, stamp)
                .map_err(|e| FineTuneError::Cache {
                    path: journal.path().to_path_buf(),
                    message: e.to_string(),
                })?;
            index.entries.insert(
                path.to_string(),
                crate::journal::JournalEntry {
                    label: label.to_string(),
                    stamp,
                    offset,
                },
            );
        }
        Ok(())
    }

    /// Makes `(path, label, stamp)` the images of this run, in order; each must be fresh.
    pub fn select(&mut self, images: &[(String, String, FileStamp)]) {
        self.images = images
            .iter()
            .map(|(path, label, stamp)| CachedImage {
                path: path.clone(),
                label: label.clone(),
                offsets: self
                    .indexes
                    .iter()
                    .map(|ix| {
                        ix.fresh(path, *stamp)
                            .expect("selected images are cached")
                            .offset
                    })
                    .collect(),
            })
            .collect();
        self.resident = vec![vec![None; VIEWS.len()]; self.images.len()];
        self.memory_used = 0;
    }

    pub fn images(&self) -> &[CachedImage] {
        &self.images
    }

    /// Bytes of activations held in memory now.
    pub fn memory_used(&self) -> u64 {
        self.memory_used
    }

    /// Appends view `view` of selected image `image` to `out`.
    pub fn read_into(
        &mut self,
        image: usize,
        view: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), FineTuneError> {
        if let Some(row) = &self.resident[image][view] {
            out.extend_from_slice(row);
            return Ok(());
        }
        let journal = &mut self.journals[view];
        let mut row = Vec::with_capacity(self.dim);
        journal
            .read_features_into(self.images[image].offsets[view], &mut row)
            .map_err(|e| FineTuneError::Cache {
                path: journal.path().to_path_buf(),
                message: e.to_string(),
            })?;
        out.extend_from_slice(&row);
        let bytes = (row.len() * 4) as u64;
        if self.memory_used + bytes <= self.memory_limit {
            self.memory_used += bytes;
            self.resident[image][view] = Some(row);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_io::Preprocess;

    fn meta() -> FeatureMeta {
        FeatureMeta {
            backbone: "inception_v3/tf2015".into(),
            weights_sha256: "ab".repeat(32),
            layer: "mixed_7a".into(),
            ..FeatureMeta::default()
        }
    }

    fn pre() -> Preprocess {
        crate::backbones::efficientnet_lite::LITE2.preprocess()
    }

    #[test]
    fn rows_survive_reopening_and_a_changed_file_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let stamp = FileStamp::new(10, std::time::UNIX_EPOCH);
        {
            let mut cache = ActivationCache::open(dir.path(), &meta(), &pre(), 3, 0).unwrap();
            assert!(!cache.is_fresh("a.jpg", stamp));
            cache
                .append("a.jpg", "x", stamp, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
                .unwrap();
        }
        let mut cache = ActivationCache::open(dir.path(), &meta(), &pre(), 3, 12).unwrap();
        assert!(cache.is_fresh("a.jpg", stamp));
        assert!(!cache.is_fresh("a.jpg", FileStamp::new(11, std::time::UNIX_EPOCH)));
        cache.select(&[("a.jpg".into(), "x".into(), stamp)]);
        let mut out = Vec::new();
        cache.read_into(0, 1, &mut out).unwrap();
        cache.read_into(0, 0, &mut out).unwrap();
        assert_eq!(out, vec![4.0, 5.0, 6.0, 1.0, 2.0, 3.0]);
        // The limit (12 bytes) holds one row of 3 floats, not two.
        assert_eq!(cache.memory_used(), 12);

        // Another layer is another cache.
        let mut other = meta();
        other.layer = "mixed_6e".into();
        let cache = ActivationCache::open(dir.path(), &other, &pre(), 3, 0).unwrap();
        assert!(!cache.is_fresh("a.jpg", stamp));
    }
}
