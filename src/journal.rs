//! Resume journal: an append-only log of computed rows kept next to the output
//! (`<OUT>.partial`) so an interrupted featurize run, even one killed with
//! SIGKILL, loses nothing. Each record carries its own length and CRC, so a
//! torn final write is detected on reopen and cut off before appending resumes.
//!
//! Layout (all integers little-endian):
//! ```text
//! header: "DLTJRNL1" | dim u32 | meta_len u32 | FeatureMeta JSON | crc32 u32
//! record: "DLTR" | len u32 | payload | crc32(len bytes ++ payload) u32
//! payload: size u64 | mtime_secs i64 | mtime_nanos u32 |
//!          path_len u32 | path | label_len u32 | label | dim x f32
//! ```
//! The file is an ordinary file: after a successful run the caller may rename
//! it (e.g. to `<OUT>.journal`) and reopen it later to skip unchanged images.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::features::{AtomicFile, FeatureError, FeatureMeta, Row, invalid, io_err, quoted};

const MAGIC: &[u8; 8] = b"DLTJRNL1";
const RECORD_TAG: &[u8; 4] = b"DLTR";
/// Generous bound so a corrupt length field cannot make us allocate gigabytes.
const MAX_META_LEN: u32 = 1 << 20;
/// size + mtime_secs + mtime_nanos + path_len + label_len
const FIXED_PAYLOAD: usize = 8 + 8 + 4 + 4 + 4;

/// What identifies an unchanged input file: size plus modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStamp {
    pub size: u64,
    /// Seconds since the UNIX epoch (negative before it); `mtime_nanos` is
    /// always a forward offset in `0..1e9`, so the pair orders like the time.
    pub mtime_secs: i64,
    pub mtime_nanos: u32,
}

impl FileStamp {
    pub fn new(size: u64, mtime: SystemTime) -> FileStamp {
        let (mtime_secs, mtime_nanos) = match mtime.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                if d.subsec_nanos() == 0 {
                    (-(d.as_secs() as i64), 0)
                } else {
                    (-(d.as_secs() as i64) - 1, 1_000_000_000 - d.subsec_nanos())
                }
            }
        };
        FileStamp {
            size,
            mtime_secs,
            mtime_nanos,
        }
    }

    /// Stamp of a file from its metadata (fails where mtime is unsupported).
    pub fn of(metadata: &fs::Metadata) -> io::Result<FileStamp> {
        Ok(FileStamp::new(metadata.len(), metadata.modified()?))
    }

    pub fn mtime(&self) -> SystemTime {
        let secs = Duration::from_secs(self.mtime_secs.unsigned_abs());
        let base = if self.mtime_secs >= 0 {
            UNIX_EPOCH + secs
        } else {
            UNIX_EPOCH - secs
        };
        base + Duration::from_nanos(u64::from(self.mtime_nanos))
    }
}

/// Latest valid record for one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub label: String,
    pub stamp: FileStamp,
    /// Byte offset of the record, for [`Journal::read_features`].
    pub offset: u64,
}

/// What reopening a journal found.
#[derive(Debug, Clone, Default)]
pub struct JournalIndex {
    /// Last valid record per path (later records supersede earlier ones).
    pub entries: HashMap<String, JournalEntry>,
    /// Valid records read, superseded ones included.
    pub records: u64,
    /// Bytes cut off after the last valid record (a torn write or corruption).
    pub dropped_bytes: u64,
}

impl JournalIndex {
    /// The entry for `path` if it was computed from a file with this stamp.
    pub fn fresh(&self, path: &str, stamp: FileStamp) -> Option<&JournalEntry> {
        self.entries.get(path).filter(|e| e.stamp == stamp)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A record read back in full.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalRecord {
    pub path: String,
    pub label: String,
    pub stamp: FileStamp,
    pub features: Vec<f32>,
}

/// An open journal, positioned for appending.
#[derive(Debug)]
pub struct Journal {
    // Opened in append mode: every write lands at the end whatever the seek
    // position left by `read_features`.
    file: File,
    path: PathBuf,
    dim: usize,
    meta: FeatureMeta,
    end: u64,
    // Set when a failed append could not be rolled back; appending after a torn
    // record would hide every later record from the next reopen.
    poisoned: bool,
    buf: Vec<u8>,
    read_buf: Vec<u8>,
}

impl Journal {
    /// Opens `path`, or creates it (atomically, so the header is never torn).
    /// An existing journal must have the same `dim` and `meta`, otherwise a
    /// [`FeatureError::JournalMismatch`] names the differences. A torn or
    /// corrupt tail is truncated away and reported in `JournalIndex::dropped_bytes`.
    pub fn open_or_create(
        path: &Path,
        dim: usize,
        meta: &FeatureMeta,
    ) -> Result<(Journal, JournalIndex), FeatureError> {
        if dim == 0 || dim > u32::MAX as usize {
            return Err(invalid(
                path,
                format!("unsupported feature dimension {dim}"),
            ));
        }
        match fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => create(path, dim, meta)?,
            Err(e) => return Err(io_err(path, e)),
        }
        let io = |e| io_err(path, e);

        let reader = File::open(path).map_err(io)?;
        let file_len = reader.metadata().map_err(io)?.len();
        let mut reader = BufReader::with_capacity(1 << 20, reader);
        let (header_len, stored_dim, stored_meta) = read_header(&mut reader, path, file_len)?;
        check_compatible(path, stored_dim, &stored_meta, dim, meta)?;

        let mut index = JournalIndex::default();
        let mut pos = header_len;
        let mut payload = Vec::new();
        loop {
            match read_record(&mut reader, pos, file_len, dim, &mut payload).map_err(io)? {
                None => break,
                Some((len, record)) => {
                    index.records += 1;
                    index.entries.insert(
                        record.path.to_string(),
                        JournalEntry {
                            label: record.label.to_string(),
                            stamp: record.stamp,
                            offset: pos,
                        },
                    );
                    pos += len;
                }
            }
        }
        drop(reader);

        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if pos < file_len {
            index.dropped_bytes = file_len - pos;
            file.set_len(pos).map_err(io)?;
        }
        let journal = Journal {
            file,
            path: path.to_path_buf(),
            dim,
            meta: stored_meta,
            end: pos,
            poisoned: false,
            buf: Vec::new(),
            read_buf: Vec::new(),
        };
        Ok((journal, index))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The metadata stored in the journal header.
    pub fn meta(&self) -> &FeatureMeta {
        &self.meta
    }

    /// Current length of the file in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.end
    }

    /// Appends one record with a single `write_all`; returns its offset.
    pub fn append(&mut self, row: &Row, stamp: FileStamp) -> Result<u64, FeatureError> {
        let offset = self.end;
        self.append_batch(std::slice::from_ref(&(*row, stamp)))?;
        Ok(offset)
    }

    /// Appends several records with a single `write_all`; returns their offsets.
    pub fn append_batch(&mut self, rows: &[(Row, FileStamp)]) -> Result<Vec<u64>, FeatureError> {
        if self.poisoned {
            return Err(invalid(
                &self.path,
                "journal is unusable after an earlier failed write",
            ));
        }
        self.buf.clear();
        let mut offsets = Vec::with_capacity(rows.len());
        for (row, stamp) in rows {
            offsets.push(self.end + self.buf.len() as u64);
            encode_record(&mut self.buf, row, *stamp, self.dim, &self.path)?;
        }
        if let Err(e) = self.file.write_all(&self.buf) {
            // Roll back a partial write so later appends stay reachable.
            if self.file.set_len(self.end).is_err() {
                self.poisoned = true;
            }
            return Err(io_err(&self.path, e));
        }
        self.end += self.buf.len() as u64;
        Ok(offsets)
    }

    /// Makes appended records durable across power loss. Not needed to survive
    /// a killed process: written data is already in the OS page cache.
    pub fn sync(&self) -> Result<(), FeatureError> {
        self.file.sync_data().map_err(|e| io_err(&self.path, e))
    }

    /// Features of the record at `offset` (from the index or `append`),
    /// re-verified against its CRC.
    pub fn read_features(&mut self, offset: u64) -> Result<Vec<f32>, FeatureError> {
        let mut out = Vec::with_capacity(self.dim);
        self.read_features_into(offset, &mut out)?;
        Ok(out)
    }

    /// Like [`Self::read_features`], reusing `out` to avoid an allocation per row.
    pub fn read_features_into(
        &mut self,
        offset: u64,
        out: &mut Vec<f32>,
    ) -> Result<(), FeatureError> {
        let r = self.fetch(offset)?;
        out.clear();
        out.extend(
            r.features
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        );
        Ok(())
    }

    pub fn read_record(&mut self, offset: u64) -> Result<JournalRecord, FeatureError> {
        let r = self.fetch(offset)?;
        Ok(JournalRecord {
            path: r.path.to_string(),
            label: r.label.to_string(),
            stamp: r.stamp,
            features: r.features(),
        })
    }

    fn fetch(&mut self, offset: u64) -> Result<DecodedRecord<'_>, FeatureError> {
        let path = &self.path;
        let bad_offset = || invalid(path, format!("no valid record at offset {offset}"));
        if offset >= self.end {
            return Err(bad_offset());
        }
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| io_err(path, e))?;
        let found = read_record(
            &mut self.file,
            offset,
            self.end,
            self.dim,
            &mut self.read_buf,
        )
        .map_err(|e| io_err(path, e))?;
        Ok(found.ok_or_else(bad_offset)?.1)
    }

    /// Syncs and closes; the file can then be renamed or deleted freely.
    pub fn close(self) -> Result<(), FeatureError> {
        self.file.sync_all().map_err(|e| io_err(&self.path, e))
    }
}

fn create(path: &Path, dim: usize, meta: &FeatureMeta) -> Result<(), FeatureError> {
    let json = serde_json::to_vec(meta).expect("FeatureMeta serializes");
    let mut header = Vec::with_capacity(20 + json.len());
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&(dim as u32).to_le_bytes());
    header.extend_from_slice(&(json.len() as u32).to_le_bytes());
    header.extend_from_slice(&json);
    let crc = crc32fast::hash(&header);
    header.extend_from_slice(&crc.to_le_bytes());
    let mut file = AtomicFile::create(path)?;
    file.write_all(&header).map_err(|e| io_err(path, e))?;
    file.commit()
}

/// Returns (header length, dim, meta).
fn read_header(
    r: &mut impl Read,
    path: &Path,
    file_len: u64,
) -> Result<(u64, usize, FeatureMeta), FeatureError> {
    let corrupt = |what: &str| {
        invalid(
            path,
            format!("not a dltool journal or corrupt header ({what})"),
        )
    };
    let mut fixed = [0u8; 16];
    if file_len < 20 {
        return Err(corrupt("file too short"));
    }
    r.read_exact(&mut fixed).map_err(|e| io_err(path, e))?;
    if &fixed[..8] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    let dim = u32::from_le_bytes(fixed[8..12].try_into().expect("4 bytes"));
    let meta_len = u32::from_le_bytes(fixed[12..16].try_into().expect("4 bytes"));
    if meta_len > MAX_META_LEN || 20 + u64::from(meta_len) > file_len {
        return Err(corrupt("bad metadata length"));
    }
    let mut rest = vec![0u8; meta_len as usize + 4];
    r.read_exact(&mut rest).map_err(|e| io_err(path, e))?;
    let (json, crc) = rest.split_at(meta_len as usize);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&fixed);
    hasher.update(json);
    if hasher.finalize().to_le_bytes() != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let meta: FeatureMeta =
        serde_json::from_slice(json).map_err(|_| corrupt("metadata is not valid JSON"))?;
    Ok((20 + u64::from(meta_len), dim as usize, meta))
}

fn check_compatible(
    path: &Path,
    stored_dim: usize,
    stored: &FeatureMeta,
    dim: usize,
    meta: &FeatureMeta,
) -> Result<(), FeatureError> {
    let mut diffs = Vec::new();
    if stored_dim != dim {
        diffs.push(format!("dim {stored_dim} vs {dim}"));
    }
    let (old, new) = (stored.to_map(), meta.to_map());
    for (key, was) in &old {
        let now = new.get(key).map(String::as_str).unwrap_or("");
        if was != now {
            diffs.push(format!("{key} {} vs {}", quoted(was), quoted(now)));
        }
    }
    if diffs.is_empty() {
        return Ok(());
    }
    Err(FeatureError::JournalMismatch {
        file: path.to_path_buf(),
        msg: format!(
            "journal was made with different settings (journal vs this run: {}); delete it to start over",
            diffs.join(", ")
        ),
    })
}

fn encode_record(
    out: &mut Vec<u8>,
    row: &Row,
    stamp: FileStamp,
    dim: usize,
    path: &Path,
) -> Result<(), FeatureError> {
    if row.features.len() != dim {
        return Err(invalid(
            path,
            format!(
                "row {} has {} features, journal expects {dim}",
                quoted(row.path),
                row.features.len()
            ),
        ));
    }
    if let Some(column) = row.features.iter().position(|v| !v.is_finite()) {
        return Err(FeatureError::NonFinite {
            file: path.to_path_buf(),
            row_path: row.path.to_string(),
            column,
            value: row.features[column],
        });
    }
    let len = FIXED_PAYLOAD + row.path.len() + row.label.len() + 4 * dim;
    let len = u32::try_from(len).map_err(|_| invalid(path, "record too large"))?;
    let start = out.len();
    out.extend_from_slice(RECORD_TAG);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&stamp.size.to_le_bytes());
    out.extend_from_slice(&stamp.mtime_secs.to_le_bytes());
    out.extend_from_slice(&stamp.mtime_nanos.to_le_bytes());
    for text in [row.path, row.label] {
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    let fstart = out.len();
    out.resize(fstart + 4 * dim, 0);
    for (dst, v) in out[fstart..].chunks_exact_mut(4).zip(row.features) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    // The CRC covers the length too, so a corrupt length cannot pass as valid.
    let crc = crc32fast::hash(&out[start + 4..]);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(())
}

struct DecodedRecord<'a> {
    path: &'a str,
    label: &'a str,
    stamp: FileStamp,
    /// Little-endian f32s, decoded only when asked for: the reopen scan needs
    /// just the path and stamp.
    features: &'a [u8],
}

impl DecodedRecord<'_> {
    fn features(&self) -> Vec<f32> {
        self.features
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect()
    }
}

/// Reads the record at `pos` (the reader must be positioned there). Returns its
/// total length and contents, or `None` if it is torn or corrupt; only I/O
/// failures are errors.
fn read_record<'a>(
    r: &mut impl Read,
    pos: u64,
    end: u64,
    dim: usize,
    payload: &'a mut Vec<u8>,
) -> io::Result<Option<(u64, DecodedRecord<'a>)>> {
    let mut head = [0u8; 8];
    if end - pos < 8 || !read_full(r, &mut head)? || &head[..4] != RECORD_TAG {
        return Ok(None);
    }
    let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let total = 8 + u64::from(len) + 4;
    if total > end - pos || (len as usize) < FIXED_PAYLOAD + 4 * dim {
        return Ok(None);
    }
    payload.resize(len as usize + 4, 0);
    if !read_full(r, payload)? {
        return Ok(None);
    }
    let (body, crc) = payload.split_at(len as usize);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[4..8]);
    hasher.update(body);
    if hasher.finalize().to_le_bytes() != crc {
        return Ok(None);
    }
    Ok(decode_payload(body, dim).map(|rec| (total, rec)))
}

/// Like `read_exact`, but end of file is `Ok(false)` rather than an error.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn decode_payload(body: &[u8], dim: usize) -> Option<DecodedRecord<'_>> {
    let mut rest = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        if rest.len() < n {
            return None;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    };
    let size = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let mtime_secs = i64::from_le_bytes(take(8)?.try_into().ok()?);
    let mtime_nanos = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let path_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let path = std::str::from_utf8(take(path_len)?).ok()?;
    let label_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    let label = std::str::from_utf8(take(label_len)?).ok()?;
    let fbytes = take(4 * dim)?;
    if !rest.is_empty() || mtime_nanos >= 1_000_000_000 {
        return None;
    }
    Some(DecodedRecord {
        path,
        label,
        stamp: FileStamp {
            size,
            mtime_secs,
            mtime_nanos,
        },
        features: fbytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    fn meta() -> FeatureMeta {
        FeatureMeta {
            backbone: "inception_v3".into(),
            weights_sha256: "00ff".into(),
            layer: "avgpool".into(),
            pool: "mean".into(),
            tta: "none".into(),
            dltool_version: "0.1.0".into(),
        }
    }

    fn stamp(size: u64, secs: i64) -> FileStamp {
        FileStamp {
            size,
            mtime_secs: secs,
            mtime_nanos: 123_456_789,
        }
    }

    fn feats(seed: u32, dim: usize) -> Vec<f32> {
        (0..dim).map(|i| seed as f32 + i as f32 / 8.0).collect()
    }

    /// Journal with rows "img0".."img{n-1}"; returns their offsets.
    fn filled(path: &Path, n: u32, dim: usize) -> Vec<u64> {
        let (mut j, index) = Journal::open_or_create(path, dim, &meta()).unwrap();
        assert!(index.is_empty());
        (0..n)
            .map(|i| {
                let f = feats(i, dim);
                let p = format!("img{i}");
                let row = Row {
                    path: &p,
                    label: "cls",
                    features: &f,
                };
                j.append(&row, stamp(i as u64, 1_700_000_000 + i as i64))
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn append_reopen_keeps_last_record_per_path() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("out.csv.partial");
        let offs = filled(&p, 3, 4);
        {
            let (mut j, index) = Journal::open_or_create(&p, 4, &meta()).unwrap();
            assert_eq!((index.len(), index.records, index.dropped_bytes), (3, 3, 0));
            assert_eq!(index.entries["img1"].offset, offs[1]);
            assert_eq!(j.read_features(offs[2]).unwrap(), feats(2, 4));
            // The file changed on disk: a newer record supersedes the old one.
            let f = feats(42, 4);
            let row = Row {
                path: "img1",
                label: "other",
                features: &f,
            };
            let off = j.append(&row, stamp(99, 5)).unwrap();
            assert_eq!(j.read_features(off).unwrap(), f);
            // Reads in between do not disturb where appends go.
            assert_eq!(j.read_features(offs[0]).unwrap(), feats(0, 4));
            j.close().unwrap();
        }
        let (mut j, index) = Journal::open_or_create(&p, 4, &meta()).unwrap();
        assert_eq!((index.len(), index.records), (3, 4));
        let e = &index.entries["img1"];
        assert_eq!((e.label.as_str(), e.stamp), ("other", stamp(99, 5)));
        assert!(index.fresh("img1", stamp(99, 5)).is_some());
        assert!(index.fresh("img1", stamp(1, 1_700_000_001)).is_none());
        let mut reused = vec![7.0; 99];
        j.read_features_into(offs[2], &mut reused).unwrap();
        assert_eq!(reused, feats(2, 4));
        let rec = j.read_record(e.offset).unwrap();
        assert_eq!(rec.features, feats(42, 4));
        assert_eq!(rec.path, "img1");
        assert_eq!(j.meta(), &meta());
    }

    #[test]
    fn batch_append_is_one_contiguous_write() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("j");
        let (mut j, _) = Journal::open_or_create(&p, 2, &meta()).unwrap();
        let before = j.len_bytes();
        let (a, b) = (vec![1.0, 2.0], vec![3.0, -0.0]);
        let batch = [
            (
                Row {
                    path: "ä,\n\"x\"",
                    label: "",
                    features: &a,
                },
                stamp(1, -1),
            ),
            (
                Row {
                    path: "b",
                    label: "l",
                    features: &b,
                },
                stamp(2, 2),
            ),
        ];
        let offs = j.append_batch(&batch).unwrap();
        assert_eq!(offs[0], before);
        assert_eq!(j.len_bytes(), fs::metadata(&p).unwrap().len());
        assert_eq!(j.read_record(offs[0]).unwrap().path, "ä,\n\"x\"");
        let back = j.read_features(offs[1]).unwrap();
        assert_eq!(back[1].to_bits(), (-0.0f32).to_bits());
        // A bad row rejects the whole batch and writes nothing.
        let nan = [f32::NAN, 0.0];
        let bad = [
            (batch[1].0, stamp(3, 3)),
            (
                Row {
                    features: &nan,
                    ..batch[1].0
                },
                stamp(3, 3),
            ),
        ];
        assert!(matches!(
            j.append_batch(&bad),
            Err(FeatureError::NonFinite { .. })
        ));
        let short = Row {
            features: &a[..1],
            ..batch[1].0
        };
        assert!(
            j.append(&short, stamp(0, 0))
                .unwrap_err()
                .to_string()
                .contains("journal expects 2")
        );
        assert_eq!(j.len_bytes(), fs::metadata(&p).unwrap().len());
        j.sync().unwrap();
    }

    #[test]
    fn torn_last_record_is_dropped_and_appending_resumes() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("j");
        let offs = filled(&p, 5, 16);
        let full = fs::metadata(&p).unwrap().len();
        for cut in [1u64, 3, 7, 30] {
            let f = OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(full - cut).unwrap();
            drop(f);
            let (mut j, index) = Journal::open_or_create(&p, 16, &meta()).unwrap();
            assert_eq!(index.len(), 4, "cut {cut}");
            assert!(!index.entries.contains_key("img4"));
            assert_eq!(index.dropped_bytes, full - cut - offs[4]);
            assert_eq!(fs::metadata(&p).unwrap().len(), offs[4], "tail truncated");
            // Re-append the lost row; it must be readable after reopening.
            let f = feats(4, 16);
            let row = Row {
                path: "img4",
                label: "cls",
                features: &f,
            };
            assert_eq!(j.append(&row, stamp(4, 1_700_000_004)).unwrap(), offs[4]);
            drop(j);
            let (_, index) = Journal::open_or_create(&p, 16, &meta()).unwrap();
            assert_eq!((index.len(), index.dropped_bytes), (5, 0));
        }
    }

    #[test]
    fn crc_corruption_stops_reading_at_the_bad_record() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("j");
        let offs = filled(&p, 4, 8);
        let mut bytes = fs::read(&p).unwrap();
        // Flip one bit inside the features of record 2 (0-based): the record
        // still parses, only its CRC can tell.
        let at = offs[2] as usize + 40;
        bytes[at] ^= 0x01;
        fs::write(&p, &bytes).unwrap();
        let (mut j, index) = Journal::open_or_create(&p, 8, &meta()).unwrap();
        assert_eq!(index.len(), 2);
        assert!(index.entries.contains_key("img1") && !index.entries.contains_key("img3"));
        assert_eq!(index.dropped_bytes, bytes.len() as u64 - offs[2]);
        assert!(
            j.read_features(offs[2]).is_err(),
            "offset past the truncation"
        );
        assert!(
            j.read_features(offs[1] + 1).is_err(),
            "not a record boundary"
        );
        assert!(j.read_features(u64::MAX).is_err());
    }

    #[test]
    fn corrupt_length_field_is_not_trusted() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("j");
        let offs = filled(&p, 3, 8);
        let mut bytes = fs::read(&p).unwrap();
        let at = offs[1] as usize + 4;
        bytes[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(&p, &bytes).unwrap();
        let (_, index) = Journal::open_or_create(&p, 8, &meta()).unwrap();
        assert_eq!(index.len(), 1);
    }

    #[test]
    fn mismatched_settings_are_refused() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("j");
        filled(&p, 1, 8);
        let other = FeatureMeta {
            layer: "mixed7".into(),
            weights_sha256: "beef".into(),
            ..meta()
        };
        let e = Journal::open_or_create(&p, 8, &other).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, FeatureError::JournalMismatch { .. }));
        assert!(msg.starts_with(&p.display().to_string()), "{msg}");
        assert!(msg.contains("layer 'avgpool' vs 'mixed7'"), "{msg}");
        assert!(msg.contains("weights_sha256 '00ff' vs 'beef'"), "{msg}");
        assert!(
            !msg.contains("pool 'mean'"),
            "unchanged fields are not listed: {msg}"
        );

        let msg = Journal::open_or_create(&p, 4, &meta())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("dim 8 vs 4"), "{msg}");
        // Refusal leaves the journal intact.
        assert_eq!(Journal::open_or_create(&p, 8, &meta()).unwrap().1.len(), 1);
    }

    #[test]
    fn foreign_or_damaged_header_is_an_error() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("j");
        fs::write(&p, b"path,label,f0\na,b,1\n").unwrap();
        let msg = Journal::open_or_create(&p, 1, &meta())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a dltool journal"), "{msg}");
        assert!(!msg.contains('\n'));

        filled(&p.with_extension("ok"), 1, 2);
        let mut bytes = fs::read(p.with_extension("ok")).unwrap();
        bytes[22] ^= 0x20; // inside the metadata JSON
        fs::write(&p, &bytes).unwrap();
        let msg = Journal::open_or_create(&p, 2, &meta())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("checksum mismatch"), "{msg}");
    }

    #[test]
    fn journal_survives_rename() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("out.csv.partial");
        filled(&p, 2, 3);
        let kept = dir.path().join("out.csv.journal");
        fs::rename(&p, &kept).unwrap();
        let (_, index) = Journal::open_or_create(&kept, 3, &meta()).unwrap();
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn file_stamp_round_trips_times_before_and_after_epoch() {
        for t in [
            UNIX_EPOCH,
            UNIX_EPOCH + Duration::new(1_700_000_000, 5),
            UNIX_EPOCH - Duration::new(3, 0),
            UNIX_EPOCH - Duration::new(3, 250_000_000),
        ] {
            let s = FileStamp::new(7, t);
            assert!(s.mtime_nanos < 1_000_000_000);
            assert_eq!(s.mtime(), t);
        }
        let s = FileStamp::new(0, UNIX_EPOCH - Duration::new(3, 250_000_000));
        assert_eq!((s.mtime_secs, s.mtime_nanos), (-4, 750_000_000));
        let md = fs::metadata(file!()).unwrap_or_else(|_| fs::metadata(".").unwrap());
        assert_eq!(FileStamp::of(&md).unwrap().size, md.len());
    }
}
