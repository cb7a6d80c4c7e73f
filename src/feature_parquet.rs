//! Feature files as Parquet, the format of data lakes: Spark, pandas, DuckDB and polars read them
//! as they are. Columns `path` (utf8), `label` (utf8) and `features` (fixed-size list of float32,
//! one list per image); the provenance that safetensors keeps in its header goes into the file's
//! key-value metadata. The writer streams rows into row groups of bounded size; the reader also
//! takes what Spark writes for `array<float>`/`array<double>` columns (a plain list per row).

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{ArrayBuilder, StringBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type};
use arrow_array::{
    Array, ArrayRef, FixedSizeListArray, Float32Array, GenericListArray, OffsetSizeTrait,
    RecordBatch,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::features::{
    AtomicFile, FeatureError, FeatureMeta, FeatureTable, KEY_FORMAT, KEY_VERSION, Row,
    SAFETENSORS_FORMAT, SAFETENSORS_VERSION, check_row, invalid, quoted,
};

const COL_PATH: &str = "path";
const COL_LABEL: &str = "label";
const COL_FEATURES: &str = "features";
// The Parquet spec's name for list elements (arrow-rs would say "item"); Spark writes "element".
const ELEMENT: &str = "element";

/// Bytes of features held in memory before a row group is closed: bounds the writer's memory
/// whatever the dimension (4,096 rows of 2,048 floats; 64 rows with `--pool none`).
const ROW_GROUP_BYTES: usize = 32 << 20;
/// Rows gathered into one Arrow batch before it is handed to the Parquet writer.
const BATCH_ROWS: usize = 1024;

/// Streaming Parquet writer: rows are buffered into Arrow batches and written as row groups of
/// at most [`ROW_GROUP_BYTES`] of features, so memory does not grow with the number of rows.
pub struct ParquetFeatureWriter<W: Write + Send = AtomicFile> {
    writer: ArrowWriter<W>,
    schema: SchemaRef,
    name: PathBuf,
    dim: usize,
    batch_rows: usize,
    paths: StringBuilder,
    labels: StringBuilder,
    values: Vec<f32>,
    rows: usize,
}

fn parquet_err(name: &Path, e: impl std::fmt::Display) -> FeatureError {
    invalid(name, format!("Parquet: {e}"))
}

/// The Arrow schema dltool writes for `dim` features.
pub fn schema(dim: usize) -> Result<SchemaRef, String> {
    let size = i32::try_from(dim).map_err(|_| format!("dimension {dim} is too large"))?;
    Ok(Arc::new(Schema::new(vec![
        Field::new(COL_PATH, DataType::Utf8, false),
        Field::new(COL_LABEL, DataType::Utf8, false),
        Field::new(
            COL_FEATURES,
            DataType::FixedSizeList(
                Arc::new(Field::new(ELEMENT, DataType::Float32, false)),
                size,
            ),
            false,
        ),
    ])))
}

impl<W: Write + Send> ParquetFeatureWriter<W> {
    /// Starts a file for rows of `dim` features; `meta` goes into the key-value metadata.
    pub fn new(
        w: W,
        name: impl Into<PathBuf>,
        dim: usize,
        meta: Option<&FeatureMeta>,
    ) -> Result<Self, FeatureError> {
        let name = name.into();
        if dim == 0 {
            return Err(invalid(&name, "cannot write features of dimension 0"));
        }
        let schema = schema(dim).map_err(|e| invalid(&name, e))?;
        let mut kv = vec![
            KeyValue::new(KEY_FORMAT.to_string(), SAFETENSORS_FORMAT.to_string()),
            KeyValue::new(KEY_VERSION.to_string(), SAFETENSORS_VERSION.to_string()),
        ];
        if let Some(meta) = meta {
            kv.extend(meta.to_map().into_iter().map(|(k, v)| KeyValue::new(k, v)));
        }
        let group_rows = (ROW_GROUP_BYTES / (dim * 4)).max(1);
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            // Dictionaries only pay off for the few distinct labels; on float features they
            // are built and then thrown away.
            .set_dictionary_enabled(false)
            .set_column_dictionary_enabled(ColumnPath::from(COL_LABEL), true)
            .set_max_row_group_row_count(Some(group_rows))
            .set_key_value_metadata(Some(kv))
            .build();
        let writer = ArrowWriter::try_new(w, schema.clone(), Some(props))
            .map_err(|e| parquet_err(&name, e))?;
        let batch_rows = BATCH_ROWS.min(group_rows);
        Ok(ParquetFeatureWriter {
            writer,
            schema,
            name,
            dim,
            batch_rows,
            paths: StringBuilder::new(),
            labels: StringBuilder::new(),
            values: Vec::with_capacity(batch_rows * dim),
            rows: 0,
        })
    }

    pub fn rows_written(&self) -> usize {
        self.rows
    }

    pub fn write_row(&mut self, row: &Row) -> Result<(), FeatureError> {
        check_row(&self.name, self.dim, row)?;
        self.paths.append_value(row.path);
        self.labels.append_value(row.label);
        self.values.extend_from_slice(row.features);
        self.rows += 1;
        if self.paths.len() >= self.batch_rows {
            self.flush_batch()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), FeatureError> {
        if self.paths.is_empty() {
            return Ok(());
        }
        let values = Float32Array::from(std::mem::take(&mut self.values));
        let DataType::FixedSizeList(element, size) = self.schema.field(2).data_type() else {
            unreachable!("the features column is a fixed-size list");
        };
        let features = FixedSizeListArray::try_new(element.clone(), *size, Arc::new(values), None)
            .map_err(|e| parquet_err(&self.name, e))?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(self.paths.finish()),
            Arc::new(self.labels.finish()),
            Arc::new(features),
        ];
        let batch = RecordBatch::try_new(self.schema.clone(), columns)
            .map_err(|e| parquet_err(&self.name, e))?;
        self.writer
            .write(&batch)
            .map_err(|e| parquet_err(&self.name, e))?;
        self.values = Vec::with_capacity(self.batch_rows * self.dim);
        Ok(())
    }

    /// Writes the last batch and the footer; returns the underlying writer.
    pub fn finish(mut self) -> Result<W, FeatureError> {
        self.flush_batch()?;
        let name = self.name;
        self.writer.into_inner().map_err(|e| parquet_err(&name, e))
    }
}

impl ParquetFeatureWriter<AtomicFile> {
    /// Writes to a temporary next to `path`; [`Self::commit`] publishes it.
    pub fn create(
        path: &Path,
        dim: usize,
        meta: Option<&FeatureMeta>,
    ) -> Result<Self, FeatureError> {
        Self::new(AtomicFile::create(path)?, path, dim, meta)
    }

    /// Finishes, fsyncs and renames the file into place.
    pub fn commit(self) -> Result<(), FeatureError> {
        self.finish()?.commit()
    }
}

/// Reads a Parquet feature table: columns `path` and `label` (strings) and `features` (a list of
/// float32 or float64 per row, all of one length). Other columns are ignored. Zero rows is not an
/// error here (a shard can be empty); [`crate::features::read_features`] decides.
pub fn read_parquet(path: &Path, file: File) -> Result<FeatureTable, FeatureError> {
    let bad = |msg: String| invalid(path, msg);
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| bad(format!("invalid Parquet file: {e}")))?;

    let kv: HashMap<String, String> = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .filter_map(|e| Some((e.key.clone(), e.value.clone()?)))
                .collect()
        })
        .unwrap_or_default();
    // Files from Spark or pandas carry no marker; ours do, and a future version must not be
    // misread.
    let ours = kv.get(KEY_FORMAT).map(String::as_str) == Some(SAFETENSORS_FORMAT);
    if ours && kv.get(KEY_VERSION).map(String::as_str) != Some(SAFETENSORS_VERSION) {
        return Err(bad(format!(
            "unsupported feature file version {} (this dltool reads version {SAFETENSORS_VERSION})",
            kv.get(KEY_VERSION)
                .map_or("missing".to_string(), |v| quoted(v))
        )));
    }
    let meta = if ours {
        FeatureMeta::from_map(&kv)
    } else {
        None
    };

    let schema = builder.schema().clone();
    let column = |name: &str| -> Result<usize, FeatureError> {
        let i = schema.index_of(name).map_err(|_| {
            let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            bad(format!(
                "missing column '{name}' (columns: {}); dltool reads path, label and features",
                have.join(", ")
            ))
        })?;
        Ok(i)
    };
    let (pi, li, fi) = (column(COL_PATH)?, column(COL_LABEL)?, column(COL_FEATURES)?);
    for i in [pi, li] {
        let f = schema.field(i);
        if !matches!(
            f.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            return Err(bad(format!(
                "column '{}' is {}, expected strings",
                f.name(),
                f.data_type()
            )));
        }
    }
    let ftype = schema.field(fi).data_type().clone();
    let element_ok = |f: &Field| matches!(f.data_type(), DataType::Float32 | DataType::Float64);
    let fixed = match &ftype {
        DataType::FixedSizeList(e, n) if element_ok(e) => Some(*n as usize),
        DataType::List(e) | DataType::LargeList(e) if element_ok(e) => None,
        other => {
            let hint = if matches!(other, DataType::Struct(_)) {
                " (an MLlib vector? convert it with pyspark.ml.functions.vector_to_array)"
            } else {
                ""
            };
            return Err(bad(format!(
                "column 'features' is {other}, expected a list of float32 or float64{hint}"
            )));
        }
    };

    // Only the three columns are decoded; a Spark table may carry many more.
    let roots: Vec<usize> = {
        let mut r = vec![pi, li, fi];
        r.sort_unstable();
        r
    };
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| bad(format!("invalid Parquet file: {e}")))?;

    let mut table = FeatureTable {
        paths: Vec::new(),
        labels: Vec::new(),
        dim: fixed.unwrap_or(0),
        data: Vec::new(),
        meta,
    };
    for batch in reader {
        let batch = batch.map_err(|e| bad(format!("invalid Parquet file: {e}")))?;
        let first_row = table.paths.len() + 1;
        let col = |name: &str| batch.column_by_name(name).expect("projected column");
        strings(col(COL_PATH), COL_PATH, first_row, &mut table.paths).map_err(&bad)?;
        strings(col(COL_LABEL), COL_LABEL, first_row, &mut table.labels).map_err(&bad)?;
        append_features(col(COL_FEATURES), first_row, &mut table).map_err(&bad)?;
    }
    Ok(table)
}

fn strings(
    array: &ArrayRef,
    name: &str,
    first_row: usize,
    out: &mut Vec<String>,
) -> Result<(), String> {
    let value = |i: usize| -> &str {
        match array.data_type() {
            DataType::LargeUtf8 => array.as_string::<i64>().value(i),
            DataType::Utf8View => array.as_string_view().value(i),
            _ => array.as_string::<i32>().value(i),
        }
    };
    for i in 0..array.len() {
        if array.is_null(i) {
            return Err(format!("row {}: '{name}' is null", first_row + i));
        }
        out.push(value(i).to_string());
    }
    Ok(())
}

/// A list column's values and each row's (start, length) in them.
fn list_spans<O: OffsetSizeTrait>(list: &GenericListArray<O>) -> (&ArrayRef, Vec<(usize, usize)>) {
    let spans = list
        .value_offsets()
        .windows(2)
        .map(|w| (w[0].as_usize(), (w[1] - w[0]).as_usize()))
        .collect();
    (list.values(), spans)
}

/// Appends each row's list to `table.data`, fixing `table.dim` from the first row when the
/// column does not declare it, and refusing rows of another length, nulls and non-finite values.
fn append_features(
    array: &ArrayRef,
    first_row: usize,
    table: &mut FeatureTable,
) -> Result<(), String> {
    let rows = array.len();
    // (values, start of each row's slice in `values`, its length)
    let (values, spans): (&ArrayRef, Vec<(usize, usize)>) = match array.data_type() {
        DataType::FixedSizeList(_, n) => {
            let l = array.as_fixed_size_list();
            let n = *n as usize;
            let spans = (0..rows).map(|r| (l.value_offset_at(r), n)).collect();
            (l.values(), spans)
        }
        DataType::LargeList(_) => list_spans(array.as_list::<i64>()),
        _ => list_spans(array.as_list::<i32>()),
    };
    let get: Box<dyn Fn(usize) -> f32> = match values.data_type() {
        DataType::Float64 => {
            let v = values.as_primitive::<Float64Type>();
            Box::new(move |i| v.value(i) as f32)
        }
        _ => {
            let v = values.as_primitive::<Float32Type>();
            Box::new(move |i| v.value(i))
        }
    };
    for (r, &(start, len)) in spans.iter().enumerate() {
        let row_no = first_row + r;
        if array.is_null(r) {
            return Err(format!("row {row_no}: 'features' is null"));
        }
        if table.dim == 0 {
            if len == 0 {
                return Err(format!("row {row_no}: 'features' is an empty list"));
            }
            table.dim = len;
        }
        if len != table.dim {
            return Err(format!(
                "row {row_no}: 'features' has {len} values but earlier rows have {} \
                 (every row needs the same number)",
                table.dim
            ));
        }
        for (col, i) in (start..start + len).enumerate() {
            if values.is_null(i) {
                return Err(format!("row {row_no}, column f{col}: null"));
            }
            let v = get(i);
            if !v.is_finite() {
                return Err(format!(
                    "row {row_no}, column f{col}: {v} is not a finite number"
                ));
            }
            table.data.push(v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::features::{Format, read_features, write_features};
    use arrow_array::builder::{Float32Builder, Float64Builder, ListBuilder};
    use arrow_array::{StringArray, StructArray};
    use tempfile::TempDir;

    fn table(rows: usize, dim: usize) -> FeatureTable {
        FeatureTable {
            paths: (0..rows)
                .map(|i| format!("dir,{i}/\"ü\"\n{i}.jpg"))
                .collect(),
            labels: (0..rows)
                .map(|i| ["a", "b, c", ""][i % 3].to_string())
                .collect(),
            dim,
            data: (0..rows * dim)
                .map(|i| {
                    f32::from_bits(0x3f80_0000 ^ ((i as u32).wrapping_mul(2_654_435_761) >> 9))
                })
                .collect(),
            meta: Some(FeatureMeta {
                backbone: "inception_v3".into(),
                layer: "mixed_7c".into(),
                ..Default::default()
            }),
        }
    }

    /// Writes a Parquet file with arbitrary columns, as Spark or pandas would.
    fn craft(path: &Path, columns: Vec<(&str, ArrayRef)>) {
        let batch = RecordBatch::try_from_iter(columns).unwrap();
        let file = File::create(path).unwrap();
        let mut w = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    fn strings(v: &[&str]) -> ArrayRef {
        Arc::new(StringArray::from(v.to_vec()))
    }

    fn err_of(path: &Path) -> String {
        let msg = read_features(path).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        msg
    }

    #[test]
    fn round_trip_is_exact_across_row_groups_and_batches() {
        let dir = TempDir::new().unwrap();
        let p = dir.path().join("f.parquet");
        // 3,000 rows of 4,000 floats: two row groups (of at most 32 MiB) and several batches.
        let t = table(3000, 4000);
        write_features(&p, Format::Parquet, &t).unwrap();
        assert_eq!(Format::detect(&p).unwrap(), Format::Parquet);
        let back = read_features(&p).unwrap();
        assert_eq!(back.paths, t.paths);
        assert_eq!(back.labels, t.labels);
        assert_eq!(back.meta, t.meta);
        assert!(
            back.data
                .iter()
                .zip(&t.data)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );

        let file = File::open(&p).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 2, "32 MiB row groups");
        let kv: HashMap<_, _> = reader
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .iter()
            .map(|e| (e.key.as_str(), e.value.clone().unwrap_or_default()))
            .collect();
        assert_eq!(kv["format"], "dltool-features");
        assert_eq!(kv["layer"], "mixed_7c");
        assert_eq!(
            reader.schema().field(2).data_type(),
            schema(4000).unwrap().field(2).data_type()
        );
    }

    #[test]
    fn reads_plain_lists_of_float32_and_float64_as_spark_writes_them() {
        let dir = TempDir::new().unwrap();
        let mut f32s = ListBuilder::new(Float32Builder::new());
        let mut f64s = ListBuilder::new(Float64Builder::new());
        for row in [[1.5, -2.0], [0.25, 3.0]] {
            f32s.values().append_slice(&row.map(|v| v as f32));
            f32s.append(true);
            f64s.values().append_slice(&row);
            f64s.append(true);
        }
        for (name, features) in [
            ("f32.parquet", Arc::new(f32s.finish()) as ArrayRef),
            ("f64.parquet", Arc::new(f64s.finish()) as ArrayRef),
        ] {
            let p = dir.path().join(name);
            craft(
                &p,
                vec![
                    ("extra", strings(&["x", "y"])),
                    ("label", strings(&["a", "b"])),
                    ("path", strings(&["p1", "p2"])),
                    ("features", features),
                ],
            );
            let t = read_features(&p).unwrap();
            assert_eq!(t.paths, ["p1", "p2"]);
            assert_eq!(t.labels, ["a", "b"]);
            assert_eq!((t.dim, t.data.clone()), (2, vec![1.5, -2.0, 0.25, 3.0]));
            assert_eq!(t.meta, None);
        }
    }

    #[test]
    fn bad_tables_are_refused_in_one_line() {
        let dir = TempDir::new().unwrap();
        let list = |rows: &[&[f32]]| -> ArrayRef {
            let mut b = ListBuilder::new(Float32Builder::new());
            for r in rows {
                b.values().append_slice(r);
                b.append(true);
            }
            Arc::new(b.finish())
        };
        let with_null = {
            let mut b = ListBuilder::new(Float32Builder::new());
            b.values().append_slice(&[1.0]);
            b.append(true);
            b.values().append_null();
            b.append(true);
            Arc::new(b.finish()) as ArrayRef
        };
        let vector = Arc::new(StructArray::from(vec![(
            Arc::new(Field::new("values", DataType::Float32, false)),
            Arc::new(Float32Array::from(vec![1.0, 2.0])) as ArrayRef,
        )])) as ArrayRef;
        let cases: Vec<(Vec<(&str, ArrayRef)>, &str)> = vec![
            (
                vec![
                    ("path", strings(&["a", "b"])),
                    ("label", strings(&["x", "y"])),
                    ("features", list(&[&[1.0, 2.0], &[1.0]])),
                ],
                "row 2: 'features' has 1 values but earlier rows have 2",
            ),
            (
                vec![
                    ("path", strings(&["a", "b"])),
                    ("features", list(&[&[1.0], &[1.0]])),
                ],
                "missing column 'label' (columns: path, features)",
            ),
            (
                vec![
                    ("path", strings(&["a", "b"])),
                    ("label", strings(&["x", "y"])),
                    ("features", vector),
                ],
                "vector_to_array",
            ),
            (
                vec![
                    ("path", strings(&["a", "b"])),
                    ("label", strings(&["x", "y"])),
                    ("features", with_null),
                ],
                "row 2, column f0: null",
            ),
            (
                vec![
                    ("path", strings(&["a", "b"])),
                    ("label", strings(&["x", "y"])),
                    ("features", list(&[&[1.0], &[f32::INFINITY]])),
                ],
                "row 2, column f0: inf is not a finite number",
            ),
            (
                vec![
                    ("path", strings(&[])),
                    ("label", strings(&[])),
                    ("features", list(&[])),
                ],
                "no rows",
            ),
        ];
        for (i, (columns, want)) in cases.into_iter().enumerate() {
            let p = dir.path().join(format!("case{i}.parquet"));
            craft(&p, columns);
            let msg = err_of(&p);
            assert!(msg.contains(want), "case {i}: got {msg:?}, want {want:?}");
        }

        let p = dir.path().join("trunc.parquet");
        write_features(&p, Format::Parquet, &table(3, 4)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 10]).unwrap();
        assert!(err_of(&p).contains("invalid Parquet file"));
    }

    #[test]
    fn a_directory_of_parts_reads_as_one_table() {
        let dir = TempDir::new().unwrap();
        let t = table(7, 3);
        write_features(
            &dir.path().join("part-1.parquet"),
            Format::Parquet,
            &t.select(&[3, 4, 5, 6]),
        )
        .unwrap();
        write_features(
            &dir.path().join("part-0.parquet"),
            Format::Parquet,
            &t.select(&[0, 1, 2]),
        )
        .unwrap();
        // What Spark leaves beside its parts is not read.
        std::fs::write(dir.path().join("_SUCCESS"), b"").unwrap();
        std::fs::write(dir.path().join(".part-0.parquet.crc"), b"junk").unwrap();
        assert_eq!(read_features(dir.path()).unwrap(), t);

        let mut other = t.select(&[0]);
        other.meta.as_mut().unwrap().layer = "mixed_6e".into();
        let odd = dir.path().join("part-2.parquet");
        write_features(&odd, Format::Parquet, &other).unwrap();
        let msg = read_features(dir.path()).unwrap_err().to_string();
        assert!(msg.starts_with(&odd.display().to_string()), "{msg}");
        assert!(
            msg.contains("other weights, layer or pooling than"),
            "{msg}"
        );
        std::fs::remove_file(&odd).unwrap();

        write_features(&dir.path().join("part-3.csv"), Format::Csv, &table(1, 5)).unwrap();
        let msg = read_features(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("5 features per row") && msg.contains("part-0.parquet has 3"),
            "{msg}"
        );

        let empty = TempDir::new().unwrap();
        let msg = read_features(empty.path()).unwrap_err().to_string();
        assert!(msg.contains("no feature files"), "{msg}");
    }
}
