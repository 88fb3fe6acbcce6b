//! GGUF (versions 2 and 3): header, metadata, tensor directory and tensor data, read from
//! bytes in memory. Every length and offset is checked against the bytes before use, so a
//! truncated or malformed file is an error naming the file (and tensor), never a panic.
use std::path::Path;

use crate::error::ModelFileError;
use crate::quant::GgmlType;

/// Reading a model file fails only with a problem of the file.
type Result<T, E = ModelFileError> = std::result::Result<T, E>;

const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a GGML tensor has.
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetadataValue {
    /// An unsigned integer value of any width (negative or non-integer values are `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v as u64),
            MetadataValue::U16(v) => Some(v as u64),
            MetadataValue::U32(v) => Some(v as u64),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A numeric value as f64 (integers too).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v as f64),
            MetadataValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGML order: `dims[0]` varies fastest (the row length).
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Start of the tensor's bytes in the file.
    pub offset: u64,
    pub bytes: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file and its bytes.
pub struct GgufFile {
    pub name: String,
    pub version: u32,
    pub metadata: Vec<(String, MetadataValue)>,
    pub tensors: Vec<TensorInfo>,
    data: Vec<u8>,
}

impl GgufFile {
    /// Reads and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let data = std::fs::read(path).map_err(|e| ModelFileError {
            file: name.clone(),
            tensor: None,
            reason: format!("cannot be read: {e}"),
        })?;
        Self::parse(name, data)
    }

    /// Parses `data`; `name` names the file in errors.
    pub fn parse(name: String, data: Vec<u8>) -> Result<Self> {
        let mut reader = Reader {
            data: &data,
            at: 0,
            file: &name,
        };
        if reader.take(4)? != MAGIC {
            return Err(reader.error(0, "does not start with the GGUF magic".into()));
        }
        let version = reader.u32()?;
        if !(2..=3).contains(&version) {
            return Err(reader.error(
                4,
                format!("has GGUF version {version}; versions 2 and 3 are read"),
            ));
        }
        let tensor_count = reader.count("tensor count")?;
        let metadata_count = reader.count("metadata count")?;
        let mut metadata = Vec::with_capacity(metadata_count);
        let mut metadata_keys = std::collections::HashSet::new();
        let mut tensor_names = std::collections::HashSet::new();
        for _ in 0..metadata_count {
            let key = reader.string()?;
            if !metadata_keys.insert(key.clone()) {
                return Err(reader.error(
                    reader.at as u64,
                    format!("repeats the metadata key `{key}`"),
                ));
            }
            let value_type = reader.u32()?;
            let value = reader.value(value_type, 0)?;
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, value)) => match value.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(reader.error(
                        reader.at as u64,
                        format!("general.alignment {value:?} is not a power of two"),
                    ))
                }
            },
        };
        let mut directory = Vec::with_capacity(tensor_count);
        for _ in 0..tensor_count {
            let tensor = reader.string()?;
            let dim_count = reader.u32()?;
            if dim_count == 0 || dim_count > MAX_DIMS {
                return Err(tensor_error(
                    &name,
                    &tensor,
                    format!("has {dim_count} dimensions; 1 to {MAX_DIMS} are valid"),
                ));
            }
            let dims = (0..dim_count)
                .map(|_| reader.u64())
                .collect::<Result<Vec<_>>>()?;
            let type_id = reader.u32()?;
            let offset = reader.u64()?;
            // llama.cpp rejects a repeated name; a lookup here would silently take the first.
            if !tensor_names.insert(tensor.clone()) {
                return Err(tensor_error(
                    &name,
                    &tensor,
                    "appears twice in the tensor directory".into(),
                ));
            }
            directory.push((tensor, dims, type_id, offset));
        }
        let data_start = (reader.at as u64).next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(tensor_count);
        for (tensor, dims, type_id, offset) in directory {
            let fail = |reason: String| tensor_error(&name, &tensor, reason);
            let Some(ggml_type) = GgmlType::from_id(type_id) else {
                let supported: Vec<&str> = GgmlType::SUPPORTED.iter().map(|t| t.name()).collect();
                return Err(fail(format!(
                    "has type {} (id {type_id}), which this reader does not dequantise ({})",
                    GgmlType::id_name(type_id),
                    supported.join(", ")
                )));
            };
            let elements = dims
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .ok_or_else(|| fail(format!("dimensions {dims:?} overflow")))?;
            let bytes = ggml_type.bytes_for(elements).map_err(fail)?;
            if offset % alignment != 0 {
                return Err(fail(format!(
                    "offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= data.len() as u64 => tensors.push(TensorInfo {
                    name: tensor,
                    dims,
                    ggml_type,
                    offset: start,
                    bytes,
                }),
                _ => {
                    return Err(fail(format!(
                        "its {bytes} bytes at data offset {offset} run past the end of the file ({} bytes): truncated?",
                        data.len()
                    )))
                }
            }
        }
        Ok(GgufFile {
            name,
            version,
            metadata,
            tensors,
            data,
        })
    }

    /// The metadata value under `key`.
    pub fn metadata(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor (checked against the file when parsed).
    pub fn tensor_bytes(&self, tensor: &TensorInfo) -> &[u8] {
        &self.data[tensor.offset as usize..(tensor.offset + tensor.bytes) as usize]
    }

    /// The tensor `name` dequantised to f32, in GGML order.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let tensor = self
            .tensor(name)
            .ok_or_else(|| tensor_error(&self.name, name, "is not in the file".into()))?;
        let mut out = Vec::with_capacity(tensor.elements() as usize);
        tensor
            .ggml_type
            .dequantize(self.tensor_bytes(tensor), &mut out);
        Ok(out)
    }
}

fn tensor_error(file: &str, tensor: &str, reason: String) -> ModelFileError {
    ModelFileError {
        file: file.to_owned(),
        tensor: Some(tensor.to_owned()),
        reason,
    }
}

/// Nesting limit of metadata arrays (arrays of arrays), so a hostile file cannot recurse deeply.
const MAX_ARRAY_DEPTH: u32 = 4;

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    file: &'a str,
}

impl<'a> Reader<'a> {
    fn error(&self, at: u64, reason: String) -> ModelFileError {
        ModelFileError {
            file: self.file.to_owned(),
            tensor: None,
            reason: format!("at byte {at}: {reason}"),
        }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.data.len());
        let Some(end) = end else {
            return Err(self.error(
                self.at as u64,
                format!(
                    "needs {len} more bytes but the file ends at {}: truncated?",
                    self.data.len()
                ),
            ));
        };
        let bytes = &self.data[self.at..end];
        self.at = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items that each take at least one byte: no more than the bytes left.
    fn count(&mut self, what: &str) -> Result<usize> {
        let at = self.at as u64;
        let count = self.u64()?;
        if count > (self.data.len() - self.at) as u64 {
            return Err(self.error(
                at,
                format!("{what} {count} exceeds the bytes left in the file"),
            ));
        }
        Ok(count as usize)
    }

    fn string(&mut self) -> Result<String> {
        let at = self.at as u64;
        let len = self.count("string length")?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.error(at, "a string is not UTF-8".into()))
    }

    fn value(&mut self, value_type: u32, depth: u32) -> Result<MetadataValue> {
        use MetadataValue as V;
        Ok(match value_type {
            0 => V::U8(self.array::<1>()?[0]),
            1 => V::I8(self.array::<1>()?[0] as i8),
            2 => V::U16(u16::from_le_bytes(self.array()?)),
            3 => V::I16(i16::from_le_bytes(self.array()?)),
            4 => V::U32(self.u32()?),
            5 => V::I32(i32::from_le_bytes(self.array()?)),
            6 => V::F32(f32::from_le_bytes(self.array()?)),
            7 => V::Bool(self.array::<1>()?[0] != 0),
            8 => V::String(self.string()?),
            9 => {
                let at = self.at as u64;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.error(
                        at,
                        format!("metadata arrays nest deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let element_type = self.u32()?;
                let count = self.count("array length")?;
                let mut items = Vec::with_capacity(count.min(1 << 20));
                for _ in 0..count {
                    items.push(self.value(element_type, depth + 1)?);
                }
                V::Array(items)
            }
            10 => V::U64(self.u64()?),
            11 => V::I64(i64::from_le_bytes(self.array()?)),
            12 => V::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(self.error(
                    self.at as u64 - 4,
                    format!("unknown metadata value type {other}"),
                ))
            }
        })
    }
}
