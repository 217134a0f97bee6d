//! The GGUF container (llama.cpp's model file, versions 2 and 3): the header, the typed
//! metadata, the tensor directory and the aligned data section. Every count and offset is
//! checked against the file's length before it is used, so a truncated or corrupt file is an
//! error that says where, never a panic or a huge allocation.
//!
//! Layout (little-endian): `"GGUF"`, `u32` version, `u64` tensor count, `u64` metadata count;
//! the metadata as `(string key, u32 type, value)`; per tensor `(string name, u32 n_dims,
//! u64 dims[n_dims], u32 ggml type, u64 offset)`; then, at the next multiple of
//! `general.alignment` (default 32), the data, each tensor at its offset. Strings are a `u64`
//! length and UTF-8 bytes. `dims[0]` varies fastest: a PyTorch `[out, in]` weight has dims
//! `[in, out]`.

use std::collections::BTreeMap;

use super::quant::GgmlType;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    /// Any of the integer types, widened.
    Int(i128),
    /// `FLOAT32` or `FLOAT64`, widened.
    Float(f64),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`.
    Str(String),
    /// `ARRAY` (of one element type).
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            MetaValue::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    /// The value as a float (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            MetaValue::Float(v) => Some(*v),
            MetaValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, if it is an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensor {
    /// llama.cpp's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// ggml dims, fastest-varying first.
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Byte range in the file.
    pub start: usize,
    /// Byte length (whole blocks of `ty`).
    pub len: usize,
}

impl GgufTensor {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The PyTorch shape: the dims reversed.
    pub fn torch_shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file; the tensor bytes stay in `bytes`.
#[derive(Debug)]
pub struct Gguf {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// The tensor directory, in file order.
    pub tensors: Vec<GgufTensor>,
    bytes: Vec<u8>,
}

const MAGIC: &[u8; 4] = b"GGUF";
/// Nesting of arrays in metadata; llama.cpp writes at most one level.
const MAX_ARRAY_DEPTH: usize = 4;
/// Dimensions of one tensor (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {} but the file has {}",
                self.pos,
                self.b.len()
            ));
        };
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    /// A count of items of at least `min_item` bytes each: more than the rest of the file could
    /// hold is corruption, refused before anything is allocated for it.
    fn count(&mut self, what: &str, min_item: usize) -> Result<usize, String> {
        let n = self.u64(what)?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_item as u64) > left {
            return Err(format!(
                "{what} = {n} at offset {} exceeds what the file's remaining {left} bytes can \
                 hold: the file is truncated or corrupt",
                self.pos - 8
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.count(what, 1)?;
        let at = self.pos;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| format!("{what} at offset {at} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<MetaValue, String> {
        let mut int = |n: usize, signed: bool| -> Result<MetaValue, String> {
            let s = self.take(n, key)?;
            let mut buf = [0u8; 8];
            buf[..n].copy_from_slice(s);
            let u = u64::from_le_bytes(buf);
            let v = if signed {
                let shift = 64 - 8 * n as u32;
                (((u << shift) as i64) >> shift) as i128
            } else {
                u as i128
            };
            Ok(MetaValue::Int(v))
        };
        Ok(match ty {
            0 => int(1, false)?,
            1 => int(1, true)?,
            2 => int(2, false)?,
            3 => int(2, true)?,
            4 => int(4, false)?,
            5 => int(4, true)?,
            10 => int(8, false)?,
            11 => int(8, true)?,
            6 => {
                MetaValue::Float(f32::from_le_bytes(self.take(4, key)?.try_into().unwrap()) as f64)
            }
            12 => MetaValue::Float(f64::from_le_bytes(self.take(8, key)?.try_into().unwrap())),
            7 => match self.take(1, key)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(format!("metadata {key}: bool byte {b} is neither 0 nor 1")),
            },
            8 => MetaValue::Str(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("metadata {key}: arrays nested deeper than {depth}"));
                }
                let elem = self.u32(key)?;
                let n = self.count(key, 1)?;
                // The count is bounded by the bytes left, not by memory: grow as elements parse.
                let mut v = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    v.push(self.value(elem, key, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            t => return Err(format!("metadata {key}: unknown value type {t}")),
        })
    }
}

impl Gguf {
    /// Reads and parses the file at `path`; the error names the file.
    pub fn open(path: &std::path::Path) -> Result<Gguf, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
        Gguf::parse(bytes)
    }

    /// Parses a whole GGUF file held in `bytes`.
    pub fn parse(bytes: Vec<u8>) -> Result<Gguf, String> {
        let mut r = Reader { b: &bytes, pos: 0 };
        if r.take(4, "the magic")? != MAGIC {
            return Err("not a GGUF file (the first 4 bytes are not \"GGUF\")".into());
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            ));
        }
        // A tensor entry is at least 8 (name) + 4 + 4 + 8 bytes; a metadata entry 8 + 4 + 1.
        let n_tensors = r.count("the tensor count", 24)?;
        let n_meta = r.count("the metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_meta {
            let key = r.string("a metadata key")?;
            let ty = r.u32(&key)?;
            let v = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), v).is_some() {
                return Err(format!("metadata key {key} appears twice"));
            }
        }
        let mut raw = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string("a tensor name")?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format!(
                    "tensor {name}: {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                ));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64(&name))
                .collect::<Result<Vec<u64>, String>>()?;
            let ty = r.u32(&name)?;
            let offset = r.u64(&name)?;
            raw.push((name, dims, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => return Err(format!("general.alignment = {v:?} is not a power of two")),
            },
        };
        let data = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::new();
        for (name, dims, ty, offset) in raw {
            let ty = GgmlType::from_id(ty).map_err(|e| format!("tensor {name}: {e}"))?;
            let elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("tensor {name}: dims {dims:?} are empty or overflow"))?;
            let len = ty
                .bytes_for(elements)
                .map_err(|e| format!("tensor {name}: {e}"))?;
            let start = (data as u64).checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= bytes.len() as u64 => tensors.push(GgufTensor {
                    name,
                    dims,
                    ty,
                    start: s as usize,
                    len: len as usize,
                }),
                _ => {
                    return Err(format!(
                        "tensor {name}: its {len} bytes at data offset {offset} run past the end \
                         of the file ({} bytes): the file is truncated",
                        bytes.len()
                    ))
                }
            }
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
            bytes,
        })
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The stored bytes of `t`.
    pub fn data(&self, t: &GgufTensor) -> &[u8] {
        &self.bytes[t.start..t.start + t.len]
    }

    /// Metadata `key`, or an error naming it.
    pub fn get(&self, key: &str) -> Result<&MetaValue, String> {
        self.metadata
            .get(key)
            .ok_or_else(|| format!("metadata {key} is missing"))
    }

    /// Metadata `key` as an unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64, String> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| format!("metadata {key} = {v:?} is not a non-negative integer"))
    }

    /// Metadata `key` as a float.
    pub fn get_f64(&self, key: &str) -> Result<f64, String> {
        let v = self.get(key)?;
        v.as_f64()
            .ok_or_else(|| format!("metadata {key} = {v:?} is not a number"))
    }

    /// Metadata `key` as a string.
    pub fn get_str(&self, key: &str) -> Result<&str, String> {
        let v = self.get(key)?;
        v.as_str()
            .ok_or_else(|| format!("metadata {key} is not a string"))
    }

    /// Metadata `key` as an array of strings.
    pub fn get_strings(&self, key: &str) -> Result<Vec<&str>, String> {
        let v = self.get(key)?;
        v.as_array()
            .and_then(|a| a.iter().map(MetaValue::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| format!("metadata {key} is not an array of strings"))
    }
}

/// Writes a GGUF v3 file from metadata and `(name, dims, type, bytes)` tensors: what tests use
/// to make small files, and the inverse of [`Gguf::parse`].
pub fn write(
    metadata: &[(&str, MetaValue)],
    tensors: &[(&str, Vec<u64>, GgmlType, Vec<u8>)],
) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    fn type_of(v: &MetaValue) -> u32 {
        match v {
            MetaValue::Int(_) => 11,
            MetaValue::Float(_) => 12,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
        }
    }
    fn value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::Int(i) => out.extend_from_slice(&(*i as i64).to_le_bytes()),
            MetaValue::Float(f) => out.extend_from_slice(&f.to_le_bytes()),
            MetaValue::Bool(b) => out.push(*b as u8),
            MetaValue::Str(s) => string(out, s),
            MetaValue::Array(a) => {
                out.extend_from_slice(&a.first().map_or(8, type_of).to_le_bytes());
                out.extend_from_slice(&(a.len() as u64).to_le_bytes());
                for x in a {
                    value(out, x);
                }
            }
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        out.extend_from_slice(&type_of(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, bytes) in tensors {
        string(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += (bytes.len() as u64).div_ceil(32) * 32;
    }
    for (_, _, _, bytes) in tensors {
        out.resize(out.len().div_ceil(32) * 32, 0);
        out.extend_from_slice(bytes);
    }
    out
}
