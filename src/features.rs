//! Feature files: one row per image (path, label, `dim` floats), stored as CSV
//! for humans and spreadsheets or as safetensors for speed and for Python
//! (`safetensors.numpy.load_file`). Both writers stream row by row so a
//! million-image run never holds all features in memory; the reader detects the
//! format by content and turns every defect into a one-line error naming the file.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use crate::feature_parquet::ParquetFeatureWriter;
use safetensors::Dtype;
use safetensors::tensor::{Metadata, SafeTensors};

/// Value of the `format` metadata key that marks our safetensors files.
pub const SAFETENSORS_FORMAT: &str = "dltool-features";
/// Value of the `version` metadata key written by this module.
pub const SAFETENSORS_VERSION: &str = "1";

/// Name used in writer errors when the output has no file name (e.g. stdout).
const UNNAMED_OUTPUT: &str = "<output>";

// Metadata keys owned by the format itself; every other key belongs to `FeatureMeta`.
pub(crate) const KEY_FORMAT: &str = "format";
pub(crate) const KEY_VERSION: &str = "version";
const KEY_LABELS: &str = "labels";

// Tensor names, in file order. Alignment decreases along this order (8, 4, 4, 1)
// and the data section starts on a multiple of 8, so every tensor is naturally
// aligned in an mmap and numpy can view it without copying.
const T_PATH_OFFSETS: &str = "path_offsets";
const T_FEATURES: &str = "features";
const T_LABELS: &str = "labels";
const T_PATH_BYTES: &str = "path_bytes";

/// Every failure of this module (and of `journal`). The message is a single line
/// that starts with the file it concerns; underlying errors are folded into the
/// message rather than exposed as `source()` so `{:#}` does not repeat them.
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("{}: {error}", file.display())]
    Io { file: PathBuf, error: io::Error },
    /// Malformed content or a caller error (wrong width, unknown label, ...).
    #[error("{}: {msg}", file.display())]
    Invalid { file: PathBuf, msg: String },
    /// A writer was handed NaN or an infinity.
    #[error(
        "{}: refusing to write non-finite value {value} (row '{}', column f{column})",
        file.display(),
        row_path.escape_debug()
    )]
    NonFinite {
        file: PathBuf,
        row_path: String,
        column: usize,
        value: f32,
    },
    /// A resume journal was produced with a different dimension or `FeatureMeta`.
    #[error("{}: {msg}", file.display())]
    JournalMismatch { file: PathBuf, msg: String },
}

pub(crate) fn io_err(file: &Path, error: io::Error) -> FeatureError {
    FeatureError::Io {
        file: file.to_path_buf(),
        error,
    }
}

pub(crate) fn invalid(file: &Path, msg: impl Into<String>) -> FeatureError {
    FeatureError::Invalid {
        file: file.to_path_buf(),
        msg: msg.into(),
    }
}

/// A file name's bytes as text: UTF-8 as it is, every other byte as `\xHH`. Two names that
/// differ in their bytes stay different (`x\xff.bmp`, `x\xfe.bmp`), where a lossy conversion
/// makes both `x\u{fffd}.bmp`. A valid name holding a literal `\xff` reads the same; the
/// journal (raw paths) and safetensors' `path_bytes` (raw bytes) keep even those apart.
pub fn escape_path_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// `escape_path_bytes` of an OS string (a path, a file name).
pub fn escape_os(s: &std::ffi::OsStr) -> String {
    match s.to_str() {
        Some(text) => text.to_string(),
        None => escape_path_bytes(s.as_encoded_bytes()),
    }
}

/// Quotes user-controlled text for error messages so they stay on one line.
pub(crate) fn quoted(s: &str) -> String {
    const MAX: usize = 60;
    let mut out = String::from("'");
    for (n, c) in s.chars().enumerate() {
        if n == MAX {
            out.push_str("...");
            break;
        }
        out.extend(c.escape_debug());
    }
    out.push('\'');
    out
}

/// On-disk feature file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Safetensors,
    Parquet,
}

impl Format {
    /// `.csv`, `.safetensors` or `.parquet`/`.pq` (case-insensitive); anything else is `None`.
    pub fn from_extension(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?;
        if ext.eq_ignore_ascii_case("pq") {
            return Some(Format::Parquet);
        }
        ext.parse().ok()
    }

    /// Detects the format of an existing file from its first bytes: Parquet starts
    /// with the magic `PAR1`; safetensors with an 8-byte header length followed by
    /// `{`, which a CSV whose header begins with `path,label` can never do.
    pub fn detect(path: &Path) -> Result<Format, FeatureError> {
        let mut head = Vec::with_capacity(9);
        File::open(path)
            .and_then(|f| f.take(9).read_to_end(&mut head))
            .map_err(|e| io_err(path, e))?;
        Ok(Self::detect_bytes(&head))
    }

    fn detect_bytes(head: &[u8]) -> Format {
        if head.starts_with(b"PAR1") {
            Format::Parquet
        } else if head.len() >= 9 && head[8] == b'{' {
            Format::Safetensors
        } else {
            Format::Csv
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("csv") {
            Ok(Format::Csv)
        } else if s.eq_ignore_ascii_case("safetensors") {
            Ok(Format::Safetensors)
        } else if s.eq_ignore_ascii_case("parquet") {
            Ok(Format::Parquet)
        } else {
            Err(format!(
                "unknown feature format {} (expected csv, safetensors or parquet)",
                quoted(s)
            ))
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Csv => "csv",
            Format::Safetensors => "safetensors",
            Format::Parquet => "parquet",
        })
    }
}

/// Provenance written alongside features (safetensors metadata; ignored by CSV).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FeatureMeta {
    pub backbone: String,
    pub weights_sha256: String,
    pub layer: String,
    pub pool: String,
    /// Test-time augmentation (`none`, `flip`); files and journals written before it existed
    /// lack the key and read as `none`, which is what they were made with.
    pub tta: String,
    pub dltool_version: String,
}

impl Default for FeatureMeta {
    fn default() -> Self {
        Self {
            backbone: String::new(),
            weights_sha256: String::new(),
            layer: String::new(),
            pool: String::new(),
            tta: crate::backbone::Tta::None.name().to_string(),
            dltool_version: String::new(),
        }
    }
}

impl FeatureMeta {
    /// Flat string map, one entry per field: safetensors metadata must be
    /// string→string, and separate keys read better from Python than nested JSON.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let value = serde_json::to_value(self).unwrap_or_default();
        let mut map = BTreeMap::new();
        if let serde_json::Value::Object(obj) = value {
            for (k, v) in obj {
                let s = match v {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                map.insert(k, s);
            }
        }
        map
    }

    /// Inverse of [`FeatureMeta::to_map`]; unknown keys are ignored and missing
    /// fields stay empty (`tta`: none). `None` when the map carries none of our fields.
    pub fn from_map(map: &HashMap<String, String>) -> Option<FeatureMeta> {
        let fields = FeatureMeta::default().to_map();
        let obj: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .filter(|(k, _)| fields.contains_key(k.as_str()))
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        if obj.is_empty() {
            return None;
        }
        serde_json::from_value(serde_json::Value::Object(obj)).ok()
    }
}

/// One output row, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    pub path: &'a str,
    pub label: &'a str,
    pub features: &'a [f32],
}

/// In-memory table for train/evaluate.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureTable {
    pub paths: Vec<String>,
    pub labels: Vec<String>,
    pub dim: usize,
    /// Row-major `len() x dim`.
    pub data: Vec<f32>,
    pub meta: Option<FeatureMeta>,
}

impl FeatureTable {
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// Features of row `i`; panics if `i >= len()`, like slice indexing.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    pub fn get(&self, i: usize) -> Row<'_> {
        Row {
            path: &self.paths[i],
            label: &self.labels[i],
            features: self.row(i),
        }
    }

    /// Distinct labels, sorted, so class indices are stable across runs and formats.
    pub fn distinct_labels(&self) -> Vec<String> {
        let mut names = self.labels.clone();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// New table with the given rows in the given order (for `split`); panics on
    /// an out-of-range index.
    pub fn select(&self, indices: &[usize]) -> FeatureTable {
        let mut data = Vec::with_capacity(indices.len() * self.dim);
        for &i in indices {
            data.extend_from_slice(self.row(i));
        }
        FeatureTable {
            paths: indices.iter().map(|&i| self.paths[i].clone()).collect(),
            labels: indices.iter().map(|&i| self.labels[i].clone()).collect(),
            dim: self.dim,
            data,
            meta: self.meta.clone(),
        }
    }
}

// ---------------------------------------------------------------------------
// Atomic output
// ---------------------------------------------------------------------------

/// An output file. Every command that writes one goes through here, so `-o` means the same
/// everywhere:
/// - a regular file (or a new one) is written under a temporary name beside it and renamed
///   over it by [`AtomicFile::commit`], so readers never see a half-written output; dropping it
///   uncommitted deletes the temporary;
/// - a symlink is followed: its target is the file replaced (the link stays a link);
/// - a FIFO, a device or another non-regular file is written in place (a rename would replace
///   the node itself: `-o /dev/null` would become a regular file, a FIFO's reader would get
///   nothing). Outputs that need to seek ([`AtomicFile::create_seekable`]) are spooled to an
///   unnamed temporary file and copied there at commit.
#[derive(Debug)]
pub struct AtomicFile {
    /// What writes go to: the temporary, the destination itself, or the spool.
    file: Option<File>,
    /// The path as the user gave it, for messages.
    dest: PathBuf,
    how: Placement,
}

#[derive(Debug)]
enum Placement {
    Replace { tmp: PathBuf, target: PathBuf },
    Direct,
    Spooled { out: File },
}

/// `path` with its symlinks followed (even a dangling one: its target is where a new file
/// goes), and what is there now.
fn resolve_output(path: &Path) -> io::Result<(PathBuf, Option<fs::Metadata>)> {
    let mut target = path.to_path_buf();
    for _ in 0..40 {
        match fs::symlink_metadata(&target) {
            Ok(m) if m.file_type().is_symlink() => {
                let link = fs::read_link(&target)?;
                target = match target.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            Ok(m) => return Ok((target, Some(m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((target, None)),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("too many levels of symbolic links"))
}

/// True when `path` (symlinks followed) exists and is not a regular file or folder: a FIFO, a
/// device, a socket. Such an output is written in place, and nothing is put beside it.
pub fn is_special_output(path: &Path) -> bool {
    matches!(resolve_output(path), Ok((_, Some(m))) if !m.is_file() && !m.is_dir())
}

/// Refuses an output that is one of the inputs (the same file, by device and inode, whatever
/// the spelling): writing it would destroy what is being read.
pub fn refuse_output_over_input<P: AsRef<Path>>(
    output: &Path,
    inputs: impl IntoIterator<Item = P>,
) -> Result<(), FeatureError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(out) = fs::metadata(output) else {
        return Ok(());
    };
    if !out.is_file() {
        return Ok(());
    }
    for input in inputs {
        let input = input.as_ref();
        if fs::metadata(input).is_ok_and(|m| m.dev() == out.dev() && m.ino() == out.ino()) {
            return Err(invalid(
                output,
                format!(
                    "is also an input ({}): refusing to overwrite it, write the output elsewhere",
                    input.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses an output whose folder (symlinks followed) does not exist, naming the path as given.
pub fn check_output_folder(dest: &Path) -> Result<(), FeatureError> {
    let (target, _) = resolve_output(dest).map_err(|e| io_err(dest, e))?;
    let dir = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if dir.is_dir() {
        Ok(())
    } else {
        Err(missing_folder(dest, dir))
    }
}

fn missing_folder(dest: &Path, dir: &Path) -> FeatureError {
    invalid(
        dest,
        format!("cannot create it: folder {} does not exist", dir.display()),
    )
}

impl AtomicFile {
    /// An output written front to back.
    pub fn create(dest: &Path) -> Result<AtomicFile, FeatureError> {
        Self::open(dest, false)
    }

    /// An output that its writer seeks in (safetensors).
    pub fn create_seekable(dest: &Path) -> Result<AtomicFile, FeatureError> {
        Self::open(dest, true)
    }

    fn open(dest: &Path, seekable: bool) -> Result<AtomicFile, FeatureError> {
        let (target, existing) = resolve_output(dest).map_err(|e| io_err(dest, e))?;
        match existing {
            Some(m) if m.is_dir() => return Err(invalid(dest, "is a folder, not a file")),
            Some(m) if !m.is_file() => {
                // No truncate: a FIFO or a device has nothing to cut, and opening must not fail.
                let out = OpenOptions::new()
                    .write(true)
                    .open(&target)
                    .map_err(|e| io_err(dest, e))?;
                let (file, how) = if seekable {
                    (
                        spool_file().map_err(|e| io_err(dest, e))?,
                        Placement::Spooled { out },
                    )
                } else {
                    (out, Placement::Direct)
                };
                return Ok(AtomicFile {
                    file: Some(file),
                    dest: dest.to_path_buf(),
                    how,
                });
            }
            _ => {}
        }
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = target
            .file_name()
            .ok_or_else(|| invalid(dest, "output path has no file name"))?
            .to_string_lossy()
            .into_owned();
        let pid = std::process::id();
        let mut attempt = 0u32;
        loop {
            // Same directory as the destination: rename is only atomic within a filesystem.
            let tmp = dir.join(format!(".{name}.{pid}.{attempt}.tmp"));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
            {
                Ok(file) => {
                    return Ok(AtomicFile {
                        file: Some(file),
                        dest: dest.to_path_buf(),
                        how: Placement::Replace { tmp, target },
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
                // The temporary is ours, not the user's: name their path and its folder.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(missing_folder(dest, dir));
                }
                Err(e) => {
                    return Err(invalid(
                        dest,
                        format!("cannot create a file in {}: {e}", dir.display()),
                    ));
                }
            }
        }
    }

    /// Final destination, as given.
    pub fn path(&self) -> &Path {
        &self.dest
    }

    fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("AtomicFile used after commit")
    }

    /// Replace: fsync, rename over the destination, then fsync the directory so the rename
    /// itself survives a power loss. In place: flush (a spool is copied out first).
    pub fn commit(mut self) -> Result<(), FeatureError> {
        let mut file = self.file.take().expect("AtomicFile committed twice");
        let dest = self.dest.clone();
        match std::mem::replace(&mut self.how, Placement::Direct) {
            Placement::Replace { tmp, target } => {
                let synced = file.sync_all();
                drop(file);
                if let Err(e) = synced {
                    let _ = fs::remove_file(&tmp);
                    return Err(io_err(&dest, e));
                }
                if let Err(e) = fs::rename(&tmp, &target) {
                    let _ = fs::remove_file(&tmp);
                    return Err(io_err(&dest, e));
                }
                #[cfg(unix)]
                {
                    let dir = match target.parent() {
                        Some(p) if !p.as_os_str().is_empty() => p,
                        _ => Path::new("."),
                    };
                    File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| io_err(dir, e))?;
                }
                Ok(())
            }
            Placement::Direct => file.flush().map_err(|e| io_err(&dest, e)),
            Placement::Spooled { mut out } => file
                .seek(SeekFrom::Start(0))
                .and_then(|_| io::copy(&mut file, &mut out))
                .and_then(|_| out.flush())
                .map(|_| ())
                .map_err(|e| io_err(&dest, e)),
        }
    }
}

/// An unnamed temporary file (created, then unlinked at once) in the system's temp folder.
fn spool_file() -> io::Result<File> {
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    for attempt in 0..100u32 {
        let path = dir.join(format!(".dltool-spool.{pid}.{attempt}"));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => {
                let _ = fs::remove_file(&path);
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(
        "cannot create a spool file in the temp folder",
    ))
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file().write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.file().write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file().flush()
    }
}

impl Seek for AtomicFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.file().seek(pos)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some()
            && let Placement::Replace { tmp, .. } = &self.how
        {
            let _ = fs::remove_file(tmp);
        }
    }
}

// ---------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------

/// A writer's checks on each row: `dim` features, all finite.
pub(crate) fn check_row(file: &Path, dim: usize, row: &Row) -> Result<(), FeatureError> {
    if row.features.len() != dim {
        return Err(invalid(
            file,
            format!(
                "row {} has {} features, expected {dim}",
                quoted(row.path),
                row.features.len(),
            ),
        ));
    }
    check_finite(file, row)
}

fn check_finite(file: &Path, row: &Row) -> Result<(), FeatureError> {
    match row.features.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(column) => Err(FeatureError::NonFinite {
            file: file.to_path_buf(),
            row_path: row.path.to_string(),
            column,
            value: row.features[column],
        }),
    }
}

fn push_csv_field(out: &mut Vec<u8>, field: &str) {
    // RFC 4180 quoting; also quote edge whitespace, which some readers trim.
    let needs_quotes = field
        .bytes()
        .any(|b| matches!(b, b',' | b'"' | b'\r' | b'\n'))
        || field.starts_with([' ', '\t'])
        || field.ends_with([' ', '\t']);
    if !needs_quotes {
        out.extend_from_slice(field.as_bytes());
        return;
    }
    out.push(b'"');
    for part in field.split_inclusive('"') {
        out.extend_from_slice(part.as_bytes());
        if part.ends_with('"') {
            out.push(b'"');
        }
    }
    out.push(b'"');
}

/// Appends one CSV line (with trailing `\n`) for `row` to `out`, so callers can
/// format batches in parallel and write each with a single `write_all`. Floats
/// use the shortest text that parses back to the identical `f32`. Fails (leaving
/// `out` unchanged) on NaN/inf; the width is checked by the writer, not here.
pub fn format_csv_row(row: &Row, out: &mut Vec<u8>) -> Result<(), FeatureError> {
    check_finite(Path::new(UNNAMED_OUTPUT), row)?;
    push_csv_field(out, row.path);
    out.push(b',');
    push_csv_field(out, row.label);
    let mut buf = ryu::Buffer::new();
    for &v in row.features {
        out.push(b',');
        // Never needs quoting: digits, '.', '-', 'e' only.
        out.extend_from_slice(buf.format_finite(v).as_bytes());
    }
    out.push(b'\n');
    Ok(())
}

/// Header line `path,label,f0,...,f{dim-1}\n`.
pub fn csv_header(dim: usize) -> Vec<u8> {
    let mut out = b"path,label".to_vec();
    for i in 0..dim {
        write!(out, ",f{i}").expect("writing to a Vec cannot fail");
    }
    out.push(b'\n');
    out
}

/// Row-by-row CSV writer over any `io::Write` (a file, stdout in a pipe).
pub struct CsvFeatureWriter<W: Write> {
    out: BufWriter<W>,
    name: PathBuf,
    dim: usize,
    line: Vec<u8>,
    rows: usize,
}

impl<W: Write> CsvFeatureWriter<W> {
    /// Writes the header. Errors name the output `<output>`; see [`Self::with_name`].
    pub fn new(w: W, dim: usize) -> Result<Self, FeatureError> {
        Self::with_name(w, dim, UNNAMED_OUTPUT)
    }

    /// Like [`Self::new`], naming the output `name` in errors.
    pub fn with_name(w: W, dim: usize, name: impl Into<PathBuf>) -> Result<Self, FeatureError> {
        Self::with_header(w, dim, name, true)
    }

    /// Like [`Self::with_name`]; without the header line when `header` is false, for the
    /// parts of a sharded run that are appended to a first part that has it.
    pub fn with_header(
        w: W,
        dim: usize,
        name: impl Into<PathBuf>,
        header: bool,
    ) -> Result<Self, FeatureError> {
        let name = name.into();
        if dim == 0 {
            return Err(invalid(&name, "cannot write features of dimension 0"));
        }
        let mut out = BufWriter::with_capacity(1 << 20, w);
        if header {
            out.write_all(&csv_header(dim))
                .map_err(|e| io_err(&name, e))?;
        }
        Ok(CsvFeatureWriter {
            out,
            name,
            dim,
            line: Vec::new(),
            rows: 0,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows_written(&self) -> usize {
        self.rows
    }

    pub fn write_row(&mut self, row: &Row) -> Result<(), FeatureError> {
        // Finiteness is checked here too so the error names this output, not `<output>`.
        check_row(&self.name, self.dim, row)?;
        self.line.clear();
        format_csv_row(row, &mut self.line)?;
        self.out
            .write_all(&self.line)
            .map_err(|e| io_err(&self.name, e))?;
        self.rows += 1;
        Ok(())
    }

    /// Writes lines produced by [`format_csv_row`] for rows of this writer's
    /// dimension; `rows` is how many lines `bytes` holds (for `rows_written`).
    pub fn write_formatted(&mut self, bytes: &[u8], rows: usize) -> Result<(), FeatureError> {
        self.out
            .write_all(bytes)
            .map_err(|e| io_err(&self.name, e))?;
        self.rows += rows;
        Ok(())
    }

    /// Pushes buffered rows to the underlying writer and flushes it, e.g. so
    /// each row reaches a pipe as soon as it exists.
    pub fn flush(&mut self) -> Result<(), FeatureError> {
        self.out.flush().map_err(|e| io_err(&self.name, e))
    }

    /// Flushes and returns the underlying writer.
    pub fn finish(self) -> Result<W, FeatureError> {
        let name = self.name;
        self.out
            .into_inner()
            .map_err(|e| io_err(&name, e.into_error()))
    }
}

impl CsvFeatureWriter<AtomicFile> {
    /// Writes to a temporary next to `path`; [`Self::commit`] publishes it.
    pub fn create(path: &Path, dim: usize) -> Result<Self, FeatureError> {
        Self::with_name(AtomicFile::create(path)?, dim, path)
    }

    /// [`Self::create`] with or without the header line.
    pub fn create_with_header(path: &Path, dim: usize, header: bool) -> Result<Self, FeatureError> {
        Self::with_header(AtomicFile::create(path)?, dim, path, header)
    }

    /// Flushes, fsyncs and renames the file into place.
    pub fn commit(self) -> Result<(), FeatureError> {
        self.finish()?.commit()
    }
}

/// Reads a CSV feature table from any reader; `name` is used in error messages.
pub fn read_csv<R: Read>(r: R, name: &Path) -> Result<FeatureTable, FeatureError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        // Width is checked here so the error can say which row and by how much.
        .flexible(true)
        .buffer_capacity(1 << 20)
        .from_reader(r);
    let csv_err = |e: csv::Error| invalid(name, format!("CSV error: {e}"));

    let mut record = csv::ByteRecord::new();
    if !rdr.read_byte_record(&mut record).map_err(csv_err)? {
        return Err(invalid(name, "empty file"));
    }
    let dim = check_csv_header(&record, name)?;

    let mut table = FeatureTable {
        paths: Vec::new(),
        labels: Vec::new(),
        dim,
        data: Vec::new(),
        meta: None,
    };
    let mut row_no = 0usize;
    while rdr.read_byte_record(&mut record).map_err(csv_err)? {
        row_no += 1;
        if record.len() != dim + 2 {
            let msg = if record.len() < 2 {
                format!(
                    "row {row_no} has {} columns, expected path,label,f0..",
                    record.len()
                )
            } else {
                format!(
                    "row {row_no} has {} features, header says {dim}",
                    record.len() - 2
                )
            };
            return Err(invalid(name, msg));
        }
        let text = |i: usize, what: &str| {
            std::str::from_utf8(&record[i])
                .map_err(|_| invalid(name, format!("row {row_no}: {what} is not valid UTF-8")))
        };
        table.paths.push(text(0, "path")?.to_string());
        table.labels.push(text(1, "label")?.to_string());
        for (col, field) in record.iter().skip(2).enumerate() {
            table.data.push(parse_feature(field, name, row_no, col)?);
        }
    }
    // Header only: an empty table (an empty shard's part); `read_features` refuses it alone.
    Ok(table)
}

fn check_csv_header(record: &csv::ByteRecord, name: &Path) -> Result<usize, FeatureError> {
    let field = |i: usize| -> &[u8] {
        let f = &record[i];
        // Spreadsheet exports often start with a UTF-8 byte order mark.
        if i == 0 {
            f.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(f)
        } else {
            f
        }
    };
    let bad = |msg: String| invalid(name, format!("bad header: {msg}"));
    if record.len() < 2 || field(0) != b"path" || field(1) != b"label" {
        // The fields as the line had them: `as_slice` would run them together.
        let shown = record
            .iter()
            .map(String::from_utf8_lossy)
            .collect::<Vec<_>>()
            .join(",");
        let hint = if record.len() < 2 && (shown.contains(';') || shown.contains('\t')) {
            " (columns must be separated by commas)"
        } else {
            ""
        };
        return Err(bad(format!(
            "expected 'path,label,f0,...', found {}{hint}",
            quoted(&shown)
        )));
    }
    let dim = record.len() - 2;
    if dim == 0 {
        return Err(bad("no feature columns".into()));
    }
    for i in 0..dim {
        let got = field(i + 2);
        if got != format!("f{i}").as_bytes() {
            return Err(bad(format!(
                "column {} is {}, expected 'f{i}'",
                i + 3,
                quoted(&String::from_utf8_lossy(got))
            )));
        }
    }
    Ok(dim)
}

fn parse_feature(
    field: &[u8],
    name: &Path,
    row_no: usize,
    col: usize,
) -> Result<f32, FeatureError> {
    let text = std::str::from_utf8(field).unwrap_or("");
    let trimmed = text.trim();
    match trimmed.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        parsed => {
            let shown = quoted(&String::from_utf8_lossy(field));
            let why = if parsed.is_ok() {
                "is not a finite number"
            } else {
                "is not a number"
            };
            Err(invalid(
                name,
                format!("row {row_no}, column f{col}: {shown} {why}"),
            ))
        }
    }
}

// ---------------------------------------------------------------------------
// safetensors
// ---------------------------------------------------------------------------

/// Staging buffer for one tensor's byte range: rows arrive interleaved across
/// the four tensors, so each keeps its own cursor and is flushed with a seek.
struct Region {
    pos: u64,
    end: u64,
    buf: Vec<u8>,
    cap: usize,
}

impl Region {
    fn new(start: u64, len: u64, cap: usize) -> Region {
        Region {
            pos: start,
            end: start + len,
            buf: Vec::with_capacity(cap),
            cap,
        }
    }

    /// Returns a slot of `n` bytes to fill, flushing first if it would not fit.
    fn reserve<W: Write + Seek>(&mut self, w: &mut W, n: usize) -> io::Result<&mut [u8]> {
        if self.buf.len() + n > self.cap {
            self.flush(w)?;
        }
        let start = self.buf.len();
        self.buf.resize(start + n, 0);
        Ok(&mut self.buf[start..])
    }

    fn flush<W: Write + Seek>(&mut self, w: &mut W) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        w.seek(SeekFrom::Start(self.pos))?;
        w.write_all(&self.buf)?;
        self.pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

/// Streaming safetensors writer. Everything that sizes the file (rows, dim,
/// total path bytes, label names) is declared up front so the header can be
/// written first and each row's pieces go straight to their final offsets.
pub struct SafetensorsFeatureWriter<W: Write + Seek = AtomicFile> {
    w: W,
    name: PathBuf,
    rows: usize,
    dim: usize,
    total_path_bytes: u64,
    label_index: HashMap<String, i32>,
    rows_written: usize,
    path_bytes_written: u64,
    offsets: Region,
    features: Region,
    labels: Region,
    path_bytes: Region,
}

fn size_of(name: &Path, parts: &[u64]) -> Result<u64, FeatureError> {
    parts
        .iter()
        .try_fold(1u64, |acc, &p| acc.checked_mul(p))
        .ok_or_else(|| invalid(name, "declared size overflows"))
}

impl<W: Write + Seek> SafetensorsFeatureWriter<W> {
    /// Writes the header into `w` (which must be empty) and prepares to receive
    /// exactly `rows` rows whose paths total `total_path_bytes` UTF-8 bytes and
    /// whose labels are all in `label_names`.
    pub fn new(
        w: W,
        rows: usize,
        dim: usize,
        total_path_bytes: u64,
        label_names: &[String],
        meta: Option<&FeatureMeta>,
    ) -> Result<Self, FeatureError> {
        Self::with_name(
            w,
            UNNAMED_OUTPUT,
            rows,
            dim,
            total_path_bytes,
            label_names,
            meta,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn with_name(
        mut w: W,
        name: impl Into<PathBuf>,
        rows: usize,
        dim: usize,
        total_path_bytes: u64,
        label_names: &[String],
        meta: Option<&FeatureMeta>,
    ) -> Result<Self, FeatureError> {
        let name = name.into();
        if dim == 0 {
            return Err(invalid(&name, "cannot write features of dimension 0"));
        }
        if label_names.len() > i32::MAX as usize {
            return Err(invalid(&name, "too many label names"));
        }
        let mut label_index = HashMap::with_capacity(label_names.len());
        for (i, l) in label_names.iter().enumerate() {
            if label_index.insert(l.clone(), i as i32).is_some() {
                return Err(invalid(
                    &name,
                    format!("duplicate label name {}", quoted(l)),
                ));
            }
        }

        let n = rows as u64;
        let sizes = [
            size_of(&name, &[n + 1, 8])?,
            size_of(&name, &[n, dim as u64, 4])?,
            size_of(&name, &[n, 4])?,
            total_path_bytes,
        ];
        let mut starts = [0u64; 4];
        for i in 1..4 {
            starts[i] = starts[i - 1]
                .checked_add(sizes[i - 1])
                .ok_or_else(|| invalid(&name, "declared size overflows"))?;
        }

        let mut md = BTreeMap::new();
        md.insert(KEY_FORMAT.to_string(), SAFETENSORS_FORMAT.to_string());
        md.insert(KEY_VERSION.to_string(), SAFETENSORS_VERSION.to_string());
        md.insert(
            KEY_LABELS.to_string(),
            serde_json::to_string(label_names).expect("strings serialize"),
        );
        if let Some(meta) = meta {
            md.extend(meta.to_map());
        }
        let tensor = |dtype: &str, shape: Vec<u64>, i: usize| {
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [starts[i], starts[i] + sizes[i]],
            })
        };
        let header = serde_json::json!({
            "__metadata__": md,
            T_PATH_OFFSETS: tensor("I64", vec![n + 1], 0),
            T_FEATURES: tensor("F32", vec![n, dim as u64], 1),
            T_LABELS: tensor("I32", vec![n], 2),
            T_PATH_BYTES: tensor("U8", vec![total_path_bytes], 3),
        });
        let mut header = serde_json::to_vec(&header).expect("JSON values serialize");
        // The spec allows trailing spaces; padding keeps the data section 8-aligned.
        header.resize(header.len().next_multiple_of(8), b' ');
        let data_start = 8 + header.len() as u64;

        w.write_all(&(header.len() as u64).to_le_bytes())
            .and_then(|_| w.write_all(&header))
            .map_err(|e| io_err(&name, e))?;

        let region = |i: usize, cap: usize| Region::new(data_start + starts[i], sizes[i], cap);
        let mut writer = SafetensorsFeatureWriter {
            w,
            name,
            rows,
            dim,
            total_path_bytes,
            label_index,
            rows_written: 0,
            path_bytes_written: 0,
            offsets: region(0, 64 << 10),
            features: region(1, (4 << 20).max(dim * 4)),
            labels: region(2, 64 << 10),
            path_bytes: region(3, 64 << 10),
        };
        // path_offsets has N+1 entries; the leading 0 is not tied to any row.
        writer
            .offsets
            .reserve(&mut writer.w, 8)
            .map_err(|e| io_err(&writer.name, e))?
            .copy_from_slice(&0i64.to_le_bytes());
        Ok(writer)
    }

    pub fn write_row(&mut self, row: &Row) -> Result<(), FeatureError> {
        self.write_row_raw(row, row.path.as_bytes())
    }

    /// [`Self::write_row`] with the path stored as `raw_path` (a file name's own bytes, which
    /// need not be UTF-8; `row.path` is its escaped form, for messages).
    pub fn write_row_raw(&mut self, row: &Row, raw_path: &[u8]) -> Result<(), FeatureError> {
        check_row(&self.name, self.dim, row)?;
        let Some(&label) = self.label_index.get(row.label) else {
            return Err(invalid(
                &self.name,
                format!(
                    "row {} has label {} which is not among the declared label names",
                    quoted(row.path),
                    quoted(row.label)
                ),
            ));
        };
        if self.rows_written == self.rows {
            return Err(invalid(
                &self.name,
                format!("more rows than the {} declared", self.rows),
            ));
        }
        let path_end = self.path_bytes_written + raw_path.len() as u64;
        if path_end > self.total_path_bytes {
            return Err(invalid(
                &self.name,
                format!(
                    "paths exceed the {} bytes declared (at row {})",
                    self.total_path_bytes,
                    quoted(row.path)
                ),
            ));
        }

        let w = &mut self.w;
        let io = |e| io_err(&self.name, e);
        self.offsets
            .reserve(w, 8)
            .map_err(io)?
            .copy_from_slice(&(path_end as i64).to_le_bytes());
        let slot = self.features.reserve(w, self.dim * 4).map_err(io)?;
        for (dst, v) in slot.chunks_exact_mut(4).zip(row.features) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        self.labels
            .reserve(w, 4)
            .map_err(io)?
            .copy_from_slice(&label.to_le_bytes());
        self.path_bytes
            .reserve(w, raw_path.len())
            .map_err(io)?
            .copy_from_slice(raw_path);
        debug_assert!(self.features.pos + self.features.buf.len() as u64 <= self.features.end);

        self.rows_written += 1;
        self.path_bytes_written = path_end;
        Ok(())
    }

    /// Checks that exactly the declared rows and path bytes were written,
    /// flushes, and returns the underlying writer.
    pub fn finish(mut self) -> Result<W, FeatureError> {
        if self.rows_written != self.rows {
            return Err(invalid(
                &self.name,
                format!(
                    "{} rows declared but {} written",
                    self.rows, self.rows_written
                ),
            ));
        }
        if self.path_bytes_written != self.total_path_bytes {
            return Err(invalid(
                &self.name,
                format!(
                    "{} path bytes declared but {} written",
                    self.total_path_bytes, self.path_bytes_written
                ),
            ));
        }
        for region in [
            &mut self.offsets,
            &mut self.features,
            &mut self.labels,
            &mut self.path_bytes,
        ] {
            region
                .flush(&mut self.w)
                .map_err(|e| io_err(&self.name, e))?;
            debug_assert_eq!(region.pos, region.end);
        }
        self.w.flush().map_err(|e| io_err(&self.name, e))?;
        Ok(self.w)
    }
}

impl SafetensorsFeatureWriter<AtomicFile> {
    /// Writes to a temporary next to `path`; [`Self::commit`] publishes it.
    pub fn create(
        path: &Path,
        rows: usize,
        dim: usize,
        total_path_bytes: u64,
        label_names: &[String],
        meta: Option<&FeatureMeta>,
    ) -> Result<Self, FeatureError> {
        let file = AtomicFile::create_seekable(path)?;
        Self::with_name(file, path, rows, dim, total_path_bytes, label_names, meta)
    }

    /// Finishes, fsyncs and renames the file into place.
    pub fn commit(self) -> Result<(), FeatureError> {
        self.finish()?.commit()
    }
}

fn read_safetensors(path: &Path, file: &File) -> Result<FeatureTable, FeatureError> {
    // SAFETY: the map is read-only and dropped before returning; as with any
    // mmap, another process truncating the file meanwhile could fault us, which
    // is the accepted trade for not copying multi-GB files through read().
    let mmap = unsafe { memmap2::Mmap::map(file) }.map_err(|e| io_err(path, e))?;
    let buf: &[u8] = &mmap;
    let bad = |msg: String| invalid(path, msg);

    let (header_len, metadata) =
        SafeTensors::read_metadata(buf).map_err(|e| match safetensors_truncation(buf) {
            Some(msg) => bad(msg),
            None => bad(format!("invalid safetensors file: {e:?}")),
        })?;
    let data = &buf[8 + header_len..];

    let md = metadata.metadata().as_ref().ok_or_else(|| {
        bad("safetensors file has no __metadata__; not a dltool feature file".into())
    })?;
    match md.get(KEY_FORMAT) {
        Some(f) if f == SAFETENSORS_FORMAT => {}
        other => {
            return Err(bad(format!(
                "not a dltool feature file (metadata format is {}, expected '{SAFETENSORS_FORMAT}')",
                other.map_or("missing".to_string(), |f| quoted(f))
            )));
        }
    }
    match md.get(KEY_VERSION) {
        Some(v) if v == SAFETENSORS_VERSION => {}
        other => {
            return Err(bad(format!(
                "unsupported feature file version {} (this dltool reads version {SAFETENSORS_VERSION})",
                other.map_or("missing".to_string(), |v| quoted(v))
            )));
        }
    }
    let label_names: Vec<String> = md
        .get(KEY_LABELS)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("metadata 'labels' is missing or not a JSON array of strings".into()))?;
    let meta = FeatureMeta::from_map(md);

    let tensor = |name: &str, dtype: Dtype| -> Result<(&[usize], &[u8]), FeatureError> {
        let info = metadata
            .info(name)
            .ok_or_else(|| bad(format!("missing tensor '{name}'")))?;
        if info.dtype != dtype {
            return Err(bad(format!(
                "tensor '{name}' is {:?}, expected {dtype:?}",
                info.dtype
            )));
        }
        let (s, e) = info.data_offsets;
        Ok((&info.shape, &data[s..e]))
    };
    let (fshape, fbytes) = tensor(T_FEATURES, Dtype::F32)?;
    let (oshape, obytes) = tensor(T_PATH_OFFSETS, Dtype::I64)?;
    let (lshape, lbytes) = tensor(T_LABELS, Dtype::I32)?;
    let (pshape, pbytes) = tensor(T_PATH_BYTES, Dtype::U8)?;

    let &[n, dim] = fshape else {
        return Err(bad(format!(
            "features tensor is {fshape:?}, expected [rows, dim]"
        )));
    };
    if dim == 0 {
        return Err(bad(format!(
            "features tensor is {fshape:?}: no feature columns"
        )));
    }
    if oshape != [n + 1] {
        return Err(bad(format!(
            "features tensor is {fshape:?} but path_offsets is {oshape:?} (expected [{}] for {n} rows)",
            n + 1
        )));
    }
    if lshape != [n] {
        return Err(bad(format!(
            "features tensor is {fshape:?} but labels is {lshape:?} (expected [{n}])"
        )));
    }
    if pshape.len() != 1 {
        return Err(bad(format!(
            "path_bytes is {pshape:?}, expected one dimension"
        )));
    }

    let offsets: Vec<i64> = obytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunk")))
        .collect();
    let mut paths = Vec::with_capacity(n);
    for (i, w) in offsets.windows(2).enumerate() {
        let (s, e) = (w[0], w[1]);
        if offsets[0] != 0 || s > e || e as u64 > pbytes.len() as u64 {
            return Err(bad(format!(
                "path_offsets[{i}..{}] = {s}..{e} is out of order or beyond path_bytes ({} bytes)",
                i + 1,
                pbytes.len()
            )));
        }
        // Raw bytes of a file name that is not UTF-8 read as its escaped form, as in CSV.
        paths.push(escape_path_bytes(&pbytes[s as usize..e as usize]));
    }
    if offsets[n] as u64 != pbytes.len() as u64 {
        return Err(bad(format!(
            "path_offsets ends at {} but path_bytes holds {} bytes",
            offsets[n],
            pbytes.len()
        )));
    }

    let mut labels = Vec::with_capacity(n);
    for (i, b) in lbytes.chunks_exact(4).enumerate() {
        let idx = i32::from_le_bytes(b.try_into().expect("4-byte chunk"));
        let name = usize::try_from(idx)
            .ok()
            .and_then(|k| label_names.get(k))
            .ok_or_else(|| {
                bad(format!(
                    "row {}: label index {idx} is outside the {} label names",
                    i + 1,
                    label_names.len()
                ))
            })?;
        labels.push(name.clone());
    }

    let data: Vec<f32> = fbytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4-byte chunk")))
        .collect();
    if let Some(k) = data.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "row {}, column f{}: {} is not a finite number",
            k / dim + 1,
            k % dim,
            data[k]
        )));
    }

    Ok(FeatureTable {
        paths,
        labels,
        dim,
        data,
        meta,
    })
}

/// Explains a safetensors file whose data section is shorter (or longer) than
/// its header promises; `None` when the header itself is unreadable.
fn safetensors_truncation(buf: &[u8]) -> Option<String> {
    if buf.len() < 8 {
        return Some(format!("truncated safetensors file ({} bytes)", buf.len()));
    }
    let n = u64::from_le_bytes(buf[..8].try_into().ok()?);
    let available = buf.len() as u64 - 8;
    if n > available {
        return Some(format!(
            "truncated safetensors file: header is {n} bytes but only {available} follow"
        ));
    }
    let header: Metadata = serde_json::from_slice(&buf[8..8 + n as usize]).ok()?;
    let needed = header
        .tensors()
        .values()
        .map(|t| t.data_offsets.1 as u64)
        .max()
        .unwrap_or(0);
    let have = available - n;
    if needed > have {
        Some(format!(
            "truncated safetensors file: tensor data needs {needed} bytes but only {have} are present"
        ))
    } else if needed < have {
        Some(format!(
            "safetensors file has {} unexpected bytes after the tensor data",
            have - needed
        ))
    } else {
        None
    }
}

/// Reads a feature file of any format (detected by content), or a directory of
/// them. Errors name the file and the problem in one line.
pub fn read_features(path: &Path) -> Result<FeatureTable, FeatureError> {
    let table = if path.is_dir() {
        read_feature_dir(path)?
    } else {
        read_feature_file(path)?
    };
    // Each reader accepts an empty table, so the empty part of a sharded run reads in a
    // folder; alone, there is nothing to train or evaluate on.
    if table.is_empty() {
        let what = if !path.is_dir() && Format::detect(path).is_ok_and(|f| f == Format::Csv) {
            "no rows (header only)"
        } else {
            "no rows"
        };
        return Err(invalid(path, what));
    }
    Ok(table)
}

/// Whether a directory entry is a feature file: hidden files and Spark's/Hadoop's
/// `_SUCCESS`, `_metadata` and `.crc` companions are not.
fn is_feature_file(name: &str) -> bool {
    !name.starts_with(['.', '_']) && Format::from_extension(Path::new(name)).is_some()
}

/// Concatenates the feature files directly in `dir` (`.csv`, `.safetensors`,
/// `.parquet`), in byte order of their names: the parts of a sharded run
/// (`features-0.parquet`, ...) or a Parquet table written by Spark
/// (`part-00000-....snappy.parquet`). All must have the same dimension and
/// provenance.
fn read_feature_dir(dir: &Path) -> Result<FeatureTable, FeatureError> {
    let mut names: Vec<PathBuf> = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name();
        if is_feature_file(&name.to_string_lossy()) && entry.path().is_file() {
            names.push(entry.path());
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(invalid(
            dir,
            "directory holds no feature files (.csv, .safetensors or .parquet)",
        ));
    }
    // `base` is the file the table's dimension and provenance came from, for errors.
    let mut table: Option<(FeatureTable, &Path)> = None;
    for part in &names {
        let next = read_feature_file(part)?;
        let Some((table, base)) = table.as_mut().filter(|(t, _)| !t.is_empty()) else {
            table = Some((next, part));
            continue;
        };
        if next.is_empty() {
            continue;
        }
        if next.dim != table.dim {
            return Err(invalid(
                part,
                format!(
                    "{} features per row, but {} has {}",
                    next.dim,
                    base.display(),
                    table.dim
                ),
            ));
        }
        if next.meta != table.meta {
            return Err(invalid(
                part,
                format!(
                    "made with other weights, layer or pooling than {}",
                    base.display()
                ),
            ));
        }
        table.paths.extend(next.paths);
        table.labels.extend(next.labels);
        table.data.extend(next.data);
    }
    Ok(table.expect("at least one file").0)
}

fn read_feature_file(path: &Path) -> Result<FeatureTable, FeatureError> {
    let mut file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut head = Vec::with_capacity(9);
    (&mut file)
        .take(9)
        .read_to_end(&mut head)
        .and_then(|_| file.seek(SeekFrom::Start(0)))
        .map_err(|e| io_err(path, e))?;
    match Format::detect_bytes(&head) {
        Format::Safetensors => read_safetensors(path, &file),
        Format::Csv => read_csv(file, path),
        Format::Parquet => crate::feature_parquet::read_parquet(path, file),
    }
}

/// Writes a whole table atomically (temp file + fsync + rename), e.g. for
/// `split`. Safetensors label names are the sorted distinct labels.
pub fn write_features(
    path: &Path,
    format: Format,
    table: &FeatureTable,
) -> Result<(), FeatureError> {
    match format {
        Format::Csv => {
            let mut w = CsvFeatureWriter::create(path, table.dim)?;
            for i in 0..table.len() {
                w.write_row(&table.get(i))?;
            }
            w.commit()
        }
        Format::Safetensors => {
            let total: u64 = table.paths.iter().map(|p| p.len() as u64).sum();
            let mut w = SafetensorsFeatureWriter::create(
                path,
                table.len(),
                table.dim,
                total,
                &table.distinct_labels(),
                table.meta.as_ref(),
            )?;
            for i in 0..table.len() {
                w.write_row(&table.get(i))?;
            }
            w.commit()
        }
        Format::Parquet => {
            let mut w = ParquetFeatureWriter::create(path, table.dim, table.meta.as_ref())?;
            for i in 0..table.len() {
                w.write_row(&table.get(i))?;
            }
            w.commit()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    const TRICKY_PATHS: &[&str] = &[
        "plain/a.jpg",
        "with,comma/b.jpg",
        "with \"quote\"/c.jpg",
        "multi\nline/d.jpg",
        "crlf\r\nline/e.jpg",
        " leading and trailing space ",
        "ünïcödé/画像/🌸.png",
        "\"",
    ];

    fn tricky_table(dim: usize) -> FeatureTable {
        let n = TRICKY_PATHS.len();
        FeatureTable {
            paths: TRICKY_PATHS.iter().map(|s| s.to_string()).collect(),
            labels: (0..n)
                .map(|i| ["roses", "daisy, white", "\"tulip\""][i % 3].to_string())
                .collect(),
            dim,
            data: (0..n * dim).map(|i| i as f32 * 0.37 - 5.0).collect(),
            meta: None,
        }
    }

    fn special_floats() -> Vec<f32> {
        let mut v = vec![
            0.0,
            -0.0,
            1e-45,
            f32::from_bits(1),
            f32::from_bits(0x007f_ffff), // largest subnormal
            f32::MIN_POSITIVE,
            f32::MAX,
            f32::MIN,
            f32::EPSILON,
            0.1,
            1.0 / 3.0,
            16_777_217.0,
            -123_456.79,
        ];
        // Pseudo-random bit patterns cover every exponent range.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        while v.len() < 4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f32::from_bits((x >> 32) as u32);
            if f.is_finite() {
                v.push(f);
            }
        }
        v
    }

    fn assert_bits_eq(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "value {i}: {x:e} became {y:e}");
        }
    }

    fn write_csv(path: &Path, t: &FeatureTable) {
        write_features(path, Format::Csv, t).unwrap();
    }

    fn write_st(path: &Path, t: &FeatureTable) {
        write_features(path, Format::Safetensors, t).unwrap();
    }

    fn err_of(path: &Path) -> String {
        read_features(path).unwrap_err().to_string()
    }

    fn assert_one_line_naming(msg: &str, path: &Path) {
        assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
        assert!(
            msg.starts_with(&path.display().to_string()),
            "error does not name the file: {msg}"
        );
    }

    #[test]
    fn csv_round_trip_tricky_paths_and_labels() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("f.csv");
        let t = tricky_table(3);
        write_csv(&p, &t);
        let back = read_features(&p).unwrap();
        assert_eq!(back, t);
        // Also parseable by a stock csv reader with the same field values.
        let mut rdr = csv::Reader::from_path(&p).unwrap();
        let rows: Vec<csv::StringRecord> = rdr.records().map(Result::unwrap).collect();
        assert_eq!(&rows[3][0], "multi\nline/d.jpg");
        assert_eq!(&rows[2][0], "with \"quote\"/c.jpg");
    }

    #[test]
    fn csv_exact_f32_round_trip() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("f.csv");
        let values = special_floats();
        let t = FeatureTable {
            paths: vec!["a".into(), "b".into()],
            labels: vec!["x".into(), "y".into()],
            dim: values.len() / 2,
            data: values,
            meta: None,
        };
        write_csv(&p, &t);
        let back = read_features(&p).unwrap();
        assert_bits_eq(&back.data, &t.data);
        let text = fs::read_to_string(&p).unwrap();
        assert!(text.contains(",-0.0,"), "negative zero keeps its sign");
        assert!(
            text.contains(",1e-45,"),
            "shortest form of the smallest subnormal"
        );
    }

    #[test]
    fn format_csv_row_matches_writer_output() {
        let t = tricky_table(4);
        let mut batch = csv_header(4);
        for i in 0..t.len() {
            format_csv_row(&t.get(i), &mut batch).unwrap();
        }
        let mut w = CsvFeatureWriter::new(Vec::new(), 4).unwrap();
        for i in 0..t.len() {
            w.write_row(&t.get(i)).unwrap();
            w.flush().unwrap();
        }
        assert_eq!(w.rows_written(), t.len());
        assert_eq!(w.finish().unwrap(), batch);

        let mut w = CsvFeatureWriter::new(Vec::new(), 4).unwrap();
        w.write_formatted(&batch[csv_header(4).len()..], t.len())
            .unwrap();
        assert_eq!(w.finish().unwrap(), batch);
        assert_eq!(read_csv(&batch[..], Path::new("mem")).unwrap(), t);
    }

    #[test]
    fn writers_refuse_non_finite_and_wrong_width() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let feats = [1.0, bad, 2.0];
            let row = Row {
                path: "x.jpg",
                label: "a",
                features: &feats,
            };
            let mut out = Vec::new();
            let e = format_csv_row(&row, &mut out).unwrap_err();
            assert!(out.is_empty());
            assert!(
                matches!(e, FeatureError::NonFinite { column: 1, .. }),
                "{e}"
            );

            let mut w = CsvFeatureWriter::with_name(Vec::new(), 3, "out.csv").unwrap();
            let e = w.write_row(&row).unwrap_err().to_string();
            assert!(
                e.starts_with("out.csv: refusing to write non-finite"),
                "{e}"
            );
            assert!(e.contains("f1") && e.contains("'x.jpg'"), "{e}");

            let mut w = SafetensorsFeatureWriter::new(
                io::Cursor::new(Vec::new()),
                1,
                3,
                5,
                &["a".to_string()],
                None,
            )
            .unwrap();
            assert!(matches!(
                w.write_row(&row),
                Err(FeatureError::NonFinite { .. })
            ));
        }
        let mut w = CsvFeatureWriter::new(Vec::new(), 3).unwrap();
        let e = w
            .write_row(&Row {
                path: "p",
                label: "a",
                features: &[1.0, 2.0],
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("has 2 features, expected 3"), "{e}");
    }

    #[test]
    fn csv_reader_rejects_bad_input() {
        let dir = TempDir::new().unwrap();
        let cases: &[(&str, &str)] = &[
            ("", "empty file"),
            ("path,label,f0,f1\n", "no rows (header only)"),
            ("path,label\na,b\n", "bad header: no feature columns"),
            (
                "file,label,f0\na,b,1\n",
                "bad header: expected 'path,label,f0,...'",
            ),
            (
                "path,label,f0,f2\na,b,1,2\n",
                "bad header: column 4 is 'f2', expected 'f1'",
            ),
            (
                "path,label,f0,f1\na,b,1,2\nc,d,1\n",
                "row 2 has 1 features, header says 2",
            ),
            (
                "path,label,f0,f1\na,b,1,2,3\n",
                "row 1 has 3 features, header says 2",
            ),
            ("path,label,f0\nlonely\n", "row 1 has 1 columns"),
            (
                "path,label,f0,f1\na,b,1,2\nc,d,1,2\ne,f,0,abc\n",
                "row 3, column f1: 'abc' is not a number",
            ),
            (
                "path,label,f0\na,b,NaN\n",
                "row 1, column f0: 'NaN' is not a finite number",
            ),
            (
                "path,label,f0\na,b,inf\n",
                "row 1, column f0: 'inf' is not a finite number",
            ),
            ("path,label,f0\na,b,1e39\n", "'1e39' is not a finite number"),
            (
                "path,label,f0\na,b,\n",
                "row 1, column f0: '' is not a number",
            ),
        ];
        for (i, (content, want)) in cases.iter().enumerate() {
            let p = dir.path().join(format!("case{i}.csv"));
            fs::write(&p, content).unwrap();
            let msg = err_of(&p);
            assert_one_line_naming(&msg, &p);
            assert!(msg.contains(want), "case {i}: got {msg:?}, want {want:?}");
        }
    }

    #[test]
    fn csv_reader_accepts_bom_crlf_and_padding() {
        let t = read_csv(
            &b"\xEF\xBB\xBFpath,label,f0,f1\r\na.jpg,x, 1.5 ,-2\r\n"[..],
            Path::new("mem"),
        )
        .unwrap();
        assert_eq!(t.paths, ["a.jpg"]);
        assert_eq!(t.data, [1.5, -2.0]);
    }

    #[test]
    fn meta_without_tta_reads_as_none() {
        let old: HashMap<String, String> = [("backbone", "inception_v3/tf2015"), ("pool", "avg")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let meta = FeatureMeta::from_map(&old).unwrap();
        assert_eq!(meta.tta, "none");
        assert_eq!(meta.pool, "avg");
        let flip = FeatureMeta {
            tta: "flip".into(),
            ..meta
        };
        let back: HashMap<String, String> = flip.to_map().into_iter().collect();
        assert_eq!(FeatureMeta::from_map(&back).unwrap(), flip);
    }

    #[test]
    fn safetensors_round_trip_with_meta() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("f.safetensors");
        let mut t = tricky_table(5);
        t.meta = Some(FeatureMeta {
            backbone: "inception_v3".into(),
            weights_sha256: "ab".repeat(32),
            layer: "avgpool".into(),
            pool: "mean".into(),
            tta: "flip".into(),
            dltool_version: "0.1.0".into(),
        });
        write_st(&p, &t);
        assert_eq!(read_features(&p).unwrap(), t);

        let values = special_floats();
        let t = FeatureTable {
            paths: vec!["a".into()],
            labels: vec!["".into()],
            dim: values.len(),
            data: values,
            meta: None,
        };
        write_st(&p, &t);
        let back = read_features(&p).unwrap();
        assert_bits_eq(&back.data, &t.data);
        assert_eq!(back.meta, None);
        assert_eq!(back.labels, [""]);
    }

    #[test]
    fn safetensors_layout_is_valid_for_the_reference_crate() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("f.safetensors");
        let t = tricky_table(3);
        let meta = FeatureMeta {
            layer: "mixed10".into(),
            ..Default::default()
        };
        let names = t.distinct_labels();
        let total: u64 = t.paths.iter().map(|p| p.len() as u64).sum();
        let mut w =
            SafetensorsFeatureWriter::create(&p, t.len(), 3, total, &names, Some(&meta)).unwrap();
        for i in 0..t.len() {
            w.write_row(&t.get(i)).unwrap();
        }
        w.commit().unwrap();

        let bytes = fs::read(&p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "header padded so data starts 8-aligned");
        assert_eq!(bytes[8], b'{');
        assert!(bytes[8..8 + n].ends_with(b"}") || bytes[8..8 + n].ends_with(b" "));

        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, md) = SafeTensors::read_metadata(&bytes).unwrap();
        let md = md.metadata().clone().unwrap();
        assert_eq!(md["format"], "dltool-features");
        assert_eq!(md["version"], "1");
        assert_eq!(md["layer"], "mixed10");
        assert_eq!(md["backbone"], "");
        let label_names: Vec<String> = serde_json::from_str(&md["labels"]).unwrap();
        assert_eq!(label_names, names);

        let rows = t.len();
        let f = st.tensor("features").unwrap();
        assert_eq!((f.dtype(), f.shape()), (Dtype::F32, &[rows, 3][..]));
        assert_eq!(f32::from_le_bytes(f.data()[..4].try_into().unwrap()), -5.0);
        let o = st.tensor("path_offsets").unwrap();
        assert_eq!((o.dtype(), o.shape()), (Dtype::I64, &[rows + 1][..]));
        let l = st.tensor("labels").unwrap();
        assert_eq!((l.dtype(), l.shape()), (Dtype::I32, &[rows][..]));
        let b = st.tensor("path_bytes").unwrap();
        assert_eq!((b.dtype(), b.shape()), (Dtype::U8, &[total as usize][..]));

        let offs: Vec<i64> = o
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        for i in 0..rows {
            let s = &b.data()[offs[i] as usize..offs[i + 1] as usize];
            assert_eq!(std::str::from_utf8(s).unwrap(), t.paths[i]);
            let li = i32::from_le_bytes(l.data()[4 * i..4 * i + 4].try_into().unwrap());
            assert_eq!(names[li as usize], t.labels[i]);
        }

        // Back to back, in decreasing alignment, every tensor naturally aligned.
        let data_start = 8 + n;
        let mut spans: Vec<(usize, usize, &str)> =
            ["path_offsets", "features", "labels", "path_bytes"]
                .iter()
                .map(|name| {
                    let v = st.tensor(name).unwrap();
                    let s = v.data().as_ptr() as usize - bytes.as_ptr() as usize - data_start;
                    (s, s + v.data().len(), *name)
                })
                .collect();
        spans.sort();
        assert_eq!(spans[0].0, 0);
        for w in spans.windows(2) {
            assert_eq!(w[0].1, w[1].0);
        }
        assert_eq!(spans[3].1 + data_start, bytes.len());
        assert_eq!(spans[1].0 % 4, 0);
        assert_eq!(spans[2].0 % 4, 0);
    }

    /// Serializes arbitrary tensors with the reference crate, to build files our
    /// writer would never produce.
    fn craft(
        p: &Path,
        tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>,
        md: Option<HashMap<String, String>>,
    ) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, &md, p).unwrap();
    }

    fn good_md() -> HashMap<String, String> {
        HashMap::from([
            ("format".to_string(), "dltool-features".to_string()),
            ("version".to_string(), "1".to_string()),
            ("labels".to_string(), "[\"a\"]".to_string()),
        ])
    }

    fn le<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|&x| f(x)).collect()
    }

    #[test]
    fn safetensors_reader_rejects_inconsistent_files() {
        let dir = TempDir::new().unwrap();
        let feats = |rows: usize, dim: usize| {
            (
                "features",
                Dtype::F32,
                vec![rows, dim],
                le(&vec![0.5f32; rows * dim], f32::to_le_bytes),
            )
        };
        let offsets = |v: &[i64]| {
            (
                "path_offsets",
                Dtype::I64,
                vec![v.len()],
                le(v, i64::to_le_bytes),
            )
        };
        let labels = |v: &[i32]| ("labels", Dtype::I32, vec![v.len()], le(v, i32::to_le_bytes));
        let pbytes = |s: &[u8]| ("path_bytes", Dtype::U8, vec![s.len()], s.to_vec());

        let mut nan = feats(2, 2);
        nan.3[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
        let mut md_v2 = good_md();
        md_v2.insert("version".into(), "2".into());
        let mut md_foreign = good_md();
        md_foreign.insert("format".into(), "pytorch".into());

        type Case<'a> = (
            Vec<(&'a str, Dtype, Vec<usize>, Vec<u8>)>,
            Option<HashMap<String, String>>,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                vec![
                    feats(2, 3),
                    offsets(&[0, 1, 2, 3]),
                    labels(&[0, 0]),
                    pbytes(b"abc"),
                ],
                Some(good_md()),
                "features tensor is [2, 3] but path_offsets is [4] (expected [3] for 2 rows)",
            ),
            (
                vec![
                    feats(2, 3),
                    offsets(&[0, 1, 2]),
                    labels(&[0]),
                    pbytes(b"ab"),
                ],
                Some(good_md()),
                "features tensor is [2, 3] but labels is [1] (expected [2])",
            ),
            (
                vec![feats(2, 3), offsets(&[0, 1, 2]), labels(&[0, 0])],
                Some(good_md()),
                "missing tensor 'path_bytes'",
            ),
            (
                vec![
                    feats(2, 3),
                    offsets(&[0, 1, 2]),
                    ("labels", Dtype::F32, vec![2], vec![0; 8]),
                    pbytes(b"ab"),
                ],
                Some(good_md()),
                "tensor 'labels' is F32, expected I32",
            ),
            (
                vec![
                    feats(2, 3),
                    offsets(&[0, 2, 1]),
                    labels(&[0, 0]),
                    pbytes(b"ab"),
                ],
                Some(good_md()),
                "out of order",
            ),
            (
                vec![
                    feats(2, 3),
                    offsets(&[0, 1, 2]),
                    labels(&[0, 0]),
                    pbytes(b"abc"),
                ],
                Some(good_md()),
                "path_offsets ends at 2 but path_bytes holds 3 bytes",
            ),
            (
                vec![
                    feats(2, 3),
                    offsets(&[0, 1, 2]),
                    labels(&[0, 1]),
                    pbytes(b"ab"),
                ],
                Some(good_md()),
                "row 2: label index 1 is outside the 1 label names",
            ),
            (
                vec![nan, offsets(&[0, 1, 2]), labels(&[0, 0]), pbytes(b"ab")],
                Some(good_md()),
                "row 2, column f1: NaN is not a finite number",
            ),
            (
                vec![feats(0, 3), offsets(&[0]), labels(&[]), pbytes(b"")],
                Some(good_md()),
                "no rows",
            ),
            (vec![feats(1, 1)], None, "no __metadata__"),
            (
                vec![feats(1, 1)],
                Some(md_foreign),
                "not a dltool feature file",
            ),
            (
                vec![feats(1, 1)],
                Some(md_v2),
                "unsupported feature file version '2'",
            ),
        ];
        for (i, (tensors, md, want)) in cases.into_iter().enumerate() {
            let p = dir.path().join(format!("case{i}.safetensors"));
            craft(&p, tensors, md);
            let msg = err_of(&p);
            assert_one_line_naming(&msg, &p);
            assert!(msg.contains(want), "case {i}: got {msg:?}, want {want:?}");
        }
    }

    #[test]
    fn truncated_safetensors_is_reported() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("f.safetensors");
        write_st(&p, &tricky_table(16));
        let full = fs::read(&p).unwrap();
        let header_end = 8 + u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
        for cut in [1, 7, 200, full.len() - header_end + 3] {
            fs::write(&p, &full[..full.len() - cut]).unwrap();
            let msg = err_of(&p);
            assert_one_line_naming(&msg, &p);
            assert!(
                msg.contains("truncated safetensors file"),
                "cut {cut}: {msg}"
            );
        }
        let mut longer = full.clone();
        longer.extend_from_slice(b"junk");
        fs::write(&p, &longer).unwrap();
        assert!(err_of(&p).contains("4 unexpected bytes"));
    }

    #[test]
    fn safetensors_writer_checks_declared_sizes() {
        let labels = ["a".to_string(), "b".to_string()];
        let new = |rows, total| {
            SafetensorsFeatureWriter::new(
                io::Cursor::new(Vec::new()),
                rows,
                2,
                total,
                &labels,
                None,
            )
            .unwrap()
        };
        let row = |path, label| Row {
            path,
            label,
            features: &[1.0, 2.0],
        };

        let mut w = new(2, 2);
        w.write_row(&row("x", "a")).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("2 rows declared but 1 written"), "{e}");

        let mut w = new(1, 1);
        w.write_row(&row("x", "b")).unwrap();
        let e = w.write_row(&row("y", "b")).unwrap_err().to_string();
        assert!(e.contains("more rows than the 1 declared"), "{e}");

        let mut w = new(2, 3);
        let e = w.write_row(&row("long", "a")).unwrap_err().to_string();
        assert!(e.contains("paths exceed the 3 bytes declared"), "{e}");

        let mut w = new(1, 1);
        let e = w.write_row(&row("x", "zebra")).unwrap_err().to_string();
        assert!(e.contains("label 'zebra' which is not among"), "{e}");

        let mut w = new(1, 5);
        w.write_row(&row("x", "a")).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("5 path bytes declared but 1 written"), "{e}");

        let dup = ["a".to_string(), "a".to_string()];
        let r = SafetensorsFeatureWriter::new(io::Cursor::new(Vec::new()), 1, 2, 1, &dup, None);
        assert!(r.is_err());
    }

    #[test]
    fn streaming_writer_handles_buffer_flushes() {
        // Enough rows that every region flushes several times mid-stream.
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("big.safetensors");
        let (rows, dim) = (3000, 700);
        let t = FeatureTable {
            paths: (0..rows)
                .map(|i| format!("dir{}/img_{i:06}.jpg", i % 7))
                .collect(),
            labels: (0..rows).map(|i| format!("class{}", i % 5)).collect(),
            dim,
            data: (0..rows * dim).map(|i| (i as f32).sin()).collect(),
            meta: None,
        };
        write_st(&p, &t);
        assert_eq!(read_features(&p).unwrap(), t);
    }

    #[test]
    fn uncommitted_output_leaves_nothing_behind() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("out.csv");
        {
            let mut w = CsvFeatureWriter::create(&p, 2).unwrap();
            w.write_row(&Row {
                path: "a",
                label: "b",
                features: &[1.0, 2.0],
            })
            .unwrap();
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let t = tricky_table(2);
        write_csv(&p, &t);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn formats_and_detection() {
        assert_eq!(
            Format::from_extension(Path::new("a/b.CSV")),
            Some(Format::Csv)
        );
        assert_eq!(
            Format::from_extension(Path::new("x.safetensors")),
            Some(Format::Safetensors)
        );
        assert_eq!(Format::from_extension(Path::new("x.txt")), None);
        assert_eq!(Format::from_extension(Path::new("csv")), None);
        assert_eq!("safetensors".parse::<Format>(), Ok(Format::Safetensors));
        assert_eq!("csv".parse::<Format>(), Ok(Format::Csv));
        assert_eq!("Parquet".parse::<Format>(), Ok(Format::Parquet));
        assert!(
            "arrow"
                .parse::<Format>()
                .unwrap_err()
                .contains("csv, safetensors or parquet")
        );
        assert_eq!(
            Format::from_extension(Path::new("x.pq")),
            Some(Format::Parquet)
        );

        // Detection ignores the extension.
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("features.csv");
        let t = tricky_table(2);
        write_st(&p, &t);
        assert_eq!(Format::detect(&p).unwrap(), Format::Safetensors);
        assert_eq!(read_features(&p).unwrap().paths, t.paths);
        let q = dir.path().join("features.bin");
        write_csv(&q, &t);
        assert_eq!(Format::detect(&q).unwrap(), Format::Csv);

        let missing = dir.path().join("nope.csv");
        assert_one_line_naming(&err_of(&missing), &missing);
    }

    #[test]
    fn table_helpers() {
        let t = tricky_table(2);
        assert_eq!(t.distinct_labels(), ["\"tulip\"", "daisy, white", "roses"]);
        let s = t.select(&[3, 0]);
        assert_eq!(s.len(), 2);
        assert_eq!(s.paths, [t.paths[3].clone(), t.paths[0].clone()]);
        assert_eq!(s.row(0), t.row(3));
        assert_eq!(s.row(1), t.row(0));
    }
}
