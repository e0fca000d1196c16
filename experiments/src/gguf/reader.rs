//! The GGUF container (llama.cpp's format, versions 2 and 3): header, metadata key/values,
//! tensor infos, then the aligned tensor data.
//!
//! Every read is bounds-checked against the file, so a truncated or corrupt file is an
//! [`Error::Input`] naming the file and the key or tensor being read, never a panic or a read
//! past the end. The file is memory-mapped; tensor data is borrowed from the map.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Bounds on what a header may claim, so a corrupt count cannot make us allocate terabytes.
const MAX_COUNT: u64 = 1 << 24;
const MAX_DIMS: u32 = 8;

/// A metadata value (GGUF's value types 0–12).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, when it is an integer type holding one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
            Value::Array(_) => "array",
        }
    }
}

/// One tensor's entry: name, dimensions in GGUF's order (`ne[0]` is the fastest-varying, i.e.
/// the reverse of PyTorch's shape), GGML type id, and where its bytes are in the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    /// Absolute byte offset of the tensor's data in the file.
    pub offset: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// PyTorch order (`[out, in]` for a linear weight).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
pub struct Gguf {
    path: PathBuf,
    map: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(Error::input(
                self.path,
                format!(
                    "truncated GGUF: {} needs {n} bytes at offset {} but the file has {} bytes",
                    what(),
                    self.pos,
                    self.buf.len()
                ),
            )),
        }
    }
    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &dyn Fn() -> String) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        if len > self.buf.len() as u64 {
            return Err(Error::input(
                self.path,
                format!("corrupt GGUF: {} claims a string of {len} bytes", what()),
            ));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::input(self.path, format!("corrupt GGUF: {} is not UTF-8", what())))
    }

    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.u8(what)?),
            1 => Value::I8(self.u8(what)? as i8),
            2 => Value::U16(self.u16(what)?),
            3 => Value::I16(self.u16(what)? as i16),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(self.u32(what)? as i32),
            6 => Value::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.u8(what)? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(Error::input(
                        self.path,
                        format!("corrupt GGUF: {} is a bool of value {b}", what()),
                    ))
                }
            },
            8 => Value::Str(self.string(what)?),
            9 if depth == 0 => {
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Each element takes at least one byte: a count beyond the file is corrupt.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(Error::input(
                        self.path,
                        format!("corrupt GGUF: {} claims an array of {n} elements", what()),
                    ));
                }
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            other => {
                return Err(Error::input(
                    self.path,
                    format!("corrupt GGUF: {} has unknown value type {other}", what()),
                ))
            }
        })
    }
}

impl Gguf {
    /// Opens and parses the header, metadata and tensor infos; checks that every tensor's data
    /// lies inside the file.
    pub fn open(path: &Path) -> Result<Gguf> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; ablate does not write GGUF
        // files while reading them (a file changed underneath by another program could show
        // torn data, which the bounds checks below keep from becoming a read outside the map).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor {
            buf: &map,
            pos: 0,
            path,
        };
        let magic = c.take(4, &|| "the magic number".into())?;
        if magic != MAGIC {
            return Err(Error::input(
                path,
                format!("not a GGUF file (starts with {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32(&|| "the version".into())?;
        if !(2..=3).contains(&version) {
            return Err(Error::input(
                path,
                format!("GGUF version {version} is not supported (2 and 3 are)"),
            ));
        }
        let n_tensors = c.u64(&|| "the tensor count".into())?;
        let n_kv = c.u64(&|| "the metadata count".into())?;
        if n_tensors > MAX_COUNT || n_kv > MAX_COUNT {
            return Err(Error::input(
                path,
                format!("corrupt GGUF: header claims {n_tensors} tensors and {n_kv} metadata keys"),
            ));
        }
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let what = || format!("metadata key `{key}`");
            let ty = c.u32(&what)?;
            let v = c.value(ty, &what, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor info #{i}"))?;
            let what = || format!("tensor info of `{name}`");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::input(
                    path,
                    format!("corrupt GGUF: tensor `{name}` has {n_dims} dimensions"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let ggml_type = c.u32(&what)?;
            let offset = c.u64(&what)?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::input(
                        path,
                        format!("metadata key `general.alignment` = {v:?} is not a power of two"),
                    ))
                }
            },
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &mut tensors {
            let elems = t
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .unwrap_or(u64::MAX);
            let size = super::dequant::byte_size(t.ggml_type, elems);
            let start = data_start.checked_add(t.offset);
            let end = match (start, size) {
                (Some(s), Some(n)) => s.checked_add(n),
                _ => None,
            };
            match end {
                Some(end) if end <= map.len() as u64 => t.offset = start.expect("checked"),
                // Unknown types are reported when the tensor is read, naming the type.
                _ if size.is_none() && start.is_some() => t.offset = start.expect("checked"),
                _ => {
                    return Err(Error::input(
                        path,
                        format!(
                            "truncated GGUF: tensor `{}` ({} {:?}) ends at byte {} but the file has {} bytes",
                            t.name,
                            super::dequant::type_name(t.ggml_type),
                            t.dims,
                            end.map_or("?".to_string(), |e| e.to_string()),
                            map.len()
                        ),
                    ))
                }
            }
        }
        Ok(Gguf {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata value under `key`, or an error naming the key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| Error::input(&self.path, format!("metadata key `{key}` is missing")))
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, v, "an unsigned integer"))
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64()
            .ok_or_else(|| self.wrong_type(key, v, "a number"))
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str()
            .ok_or_else(|| self.wrong_type(key, v, "a string"))
    }

    pub fn wrong_type(&self, key: &str, v: &Value, want: &str) -> Error {
        Error::input(
            &self.path,
            format!("metadata key `{key}` is {}, expected {want}", v.type_name()),
        )
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Dequantizes a tensor to f32, in GGUF's element order (row-major over PyTorch's shape).
    pub fn read_f32(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let n = t.n_elements();
        let size = super::dequant::byte_size(t.ggml_type, n).ok_or_else(|| {
            Error::input(
                &self.path,
                format!(
                    "tensor `{}` has GGML type {} ({}), which ablate cannot dequantize (supported: {})",
                    t.name,
                    t.ggml_type,
                    super::dequant::type_name(t.ggml_type),
                    super::dequant::SUPPORTED.join(", ")
                ),
            )
        })?;
        let start = t.offset as usize;
        let bytes = &self.map[start..start + size as usize];
        super::dequant::dequantize(t.ggml_type, bytes, n as usize)
            .map_err(|msg| Error::input(&self.path, format!("tensor `{}`: {msg}", t.name)))
    }
}
