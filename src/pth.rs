//! PyTorch `.pth` files: the zip container `torch.save` writes since PyTorch
//! 1.6 (`archive/data.pkl` + one `archive/data/KEY` entry per storage), read
//! through a *restricted* unpickler and written by a minimal pickler.
//!
//! A `.pth` is untrusted input. The unpickler here executes nothing: it
//! understands the handful of opcodes a state dict needs and only these
//! callables — `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter` and the storage classes
//! `torch.{Float,Half,BFloat16,Double}Storage` (persistent ids of storages);
//! any other global, any `REDUCE` of something else and any other opcode is
//! an [`Error::PyTorch`] that names it. Memory is bounded before allocating:
//! the pickle is at most [`MAX_PICKLE_BYTES`]; each storage entry must have
//! exactly the byte size its persistent id claims (and a deflated entry at
//! most the deflate format's 1032:1 ratio); every tensor view must lie inside
//! its storage and have no more elements than it; all tensors together have
//! at most 4× the elements of the distinct storages (tied weights).
//!
//! The zip layer is the `zip` crate (stored and deflated entries only); the
//! pickle layer is written here (see `docs/file-formats.md` for why).
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{Cursor, Read, Write};
use std::path::Path;
use std::rc::Rc;

use crate::error::{Error, Result};

/// The largest `data.pkl` accepted (a state dict's pickle holds names and
/// shapes only; an RWKV-7 7B one is well under 1 MiB).
pub const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// Kind of a tensor file, told by its first bytes (not its extension).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// safetensors: an 8-byte little-endian header length, then JSON.
    SafeTensors,
    /// A PyTorch zip checkpoint (`PK\x03\x04`).
    PyTorch,
    /// The PyTorch format before 1.6 (a bare pickle stream); not read.
    LegacyPyTorch,
}

impl FileFormat {
    /// Tells the format from the first bytes of a file.
    pub fn detect(bytes: &[u8]) -> FileFormat {
        if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            FileFormat::PyTorch
        } else if bytes.starts_with(&LEGACY_MAGIC) {
            FileFormat::LegacyPyTorch
        } else {
            FileFormat::SafeTensors
        }
    }
}

/// `PROTO 2`, then the legacy format's magic number 0x1950a86a20f9469cfc6c as
/// a `LONG1`.
const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Element type of a PyTorch storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDType {
    /// 32-bit float.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit float.
    F64,
}

impl StorageDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            StorageDType::F32 => 4,
            StorageDType::F16 | StorageDType::BF16 => 2,
            StorageDType::F64 => 8,
        }
    }

    fn class_name(self) -> &'static str {
        match self {
            StorageDType::F32 => "FloatStorage",
            StorageDType::F16 => "HalfStorage",
            StorageDType::BF16 => "BFloat16Storage",
            StorageDType::F64 => "DoubleStorage",
        }
    }
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::PyTorch {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

// ---------------------------------------------------------------- unpickler

/// A callable the unpickler may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    Storage(StorageDType),
}

#[derive(Debug)]
struct StorageRef {
    dtype: StorageDType,
    key: String,
    numel: usize,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// A pickled value. Containers are shared (`Rc`) so the memo never copies.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool,
    Int(i64),
    Float,
    Str(Rc<str>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

/// Drops nested containers with a work list instead of recursion, so a
/// deeply nested pickle (one byte per level) cannot overflow the stack.
impl Drop for Value {
    fn drop(&mut self) {
        fn take(v: &mut Value, work: &mut Vec<Value>) {
            match v {
                Value::Tuple(rc) => {
                    if let Some(items) = Rc::get_mut(rc) {
                        work.append(items);
                    }
                }
                Value::List(rc) => {
                    if let Some(items) = Rc::get_mut(rc) {
                        work.append(items.get_mut());
                    }
                }
                Value::Dict(rc) => {
                    if let Some(items) = Rc::get_mut(rc) {
                        for (k, x) in items.get_mut().drain(..) {
                            work.push(k);
                            work.push(x);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut work = Vec::new();
        take(self, &mut work);
        while let Some(mut v) = work.pop() {
            take(&mut v, &mut work);
        }
    }
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

/// Turns a pickle-level failure into a message (the caller adds the path).
type PResult<T> = std::result::Result<T, String>;

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| {
                format!(
                    "data.pkl is truncated: {n} bytes needed at offset {}, {} left",
                    self.pos,
                    self.data.len() - self.pos
                )
            })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> PResult<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("data.pkl is truncated inside a GLOBAL name")?;
        let s = std::str::from_utf8(&rest[..n]).map_err(|_| "a GLOBAL name is not UTF-8")?;
        self.pos += n + 1;
        Ok(s)
    }
    fn str_of(&mut self, n: u64) -> PResult<Value> {
        let n = usize::try_from(n).map_err(|_| "string length overflows")?;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "a string is not valid UTF-8")?;
        Ok(Value::Str(Rc::from(s)))
    }
    fn pop(&mut self) -> PResult<Value> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err("stack underflow (popped past a MARK)".into());
        }
        self.stack.pop().ok_or_else(|| "stack underflow".into())
    }
    fn top(&mut self) -> PResult<&mut Value> {
        self.stack
            .last_mut()
            .ok_or_else(|| "stack underflow".into())
    }
    fn pop_mark(&mut self) -> PResult<Vec<Value>> {
        let m = self.marks.pop().ok_or("no MARK to pop to")?;
        if m > self.stack.len() {
            return Err("MARK above the stack".into());
        }
        Ok(self.stack.split_off(m))
    }
    fn global(module: &str, name: &str) -> PResult<Global> {
        Ok(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", "FloatStorage") => Global::Storage(StorageDType::F32),
            ("torch", "HalfStorage") => Global::Storage(StorageDType::F16),
            ("torch", "BFloat16Storage") => Global::Storage(StorageDType::BF16),
            ("torch", "DoubleStorage") => Global::Storage(StorageDType::F64),
            _ => {
                return Err(format!(
                    "the pickle names `{module}.{name}`, which a tensor state dict does not \
                     need; refusing it (allowed: collections.OrderedDict, \
                     torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter, \
                     torch.FloatStorage / HalfStorage / BFloat16Storage / DoubleStorage; \
                     other dtypes and Python objects are not supported)"
                ))
            }
        })
    }
    fn set_items(dict: &Value, items: Vec<Value>) -> PResult<()> {
        let Value::Dict(d) = dict else {
            return Err(format!("SETITEM(S) on a {}", dict.kind()));
        };
        if items.len() % 2 != 0 {
            return Err("SETITEMS with an odd number of items".into());
        }
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            d.push((k, v));
        }
        Ok(())
    }

    fn run(mut self) -> PResult<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return Err(format!("pickle protocol {p} is not supported (2 to 5)"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'}' => self.stack.push(Value::Dict(Default::default())),
                b']' => self.stack.push(Value::List(Default::default())),
                b')' => self.stack.push(Value::Tuple(Rc::new(Vec::new()))),
                b'(' => self.marks.push(self.stack.len()),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(Rc::new(RefCell::new(items))));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Default::default());
                    Self::set_items(&d, items)?;
                    self.stack.push(d);
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![self.pop()?]
                    } else {
                        self.pop_mark()?
                    };
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        other => return Err(format!("APPEND(S) on a {}", other.kind())),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?.clone();
                    Self::set_items(&d, vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let d = self.top()?.clone();
                    Self::set_items(&d, items)?;
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool),
                0x89 => self.stack.push(Value::Bool),
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'J' => {
                    let v = self.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(format!("a {n}-byte integer does not fit in 64 bits"));
                    }
                    let b = self.take(n)?;
                    let mut a = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xffu8; 8]
                    } else {
                        [0u8; 8]
                    };
                    a[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(a)));
                }
                b'G' => {
                    self.take(8)?; // BINFLOAT: no float is used by a state dict
                    self.stack.push(Value::Float);
                }
                b'X' => {
                    let n = self.u32()? as u64;
                    let v = self.str_of(n)?;
                    self.stack.push(v);
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let v = self.str_of(n)?;
                    self.stack.push(v);
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.str_of(n)?;
                    self.stack.push(v);
                }
                b'q' | b'r' | 0x94 => {
                    let idx = match op {
                        b'q' => self.u8()? as u32,
                        b'r' => self.u32()?,
                        _ => self.memo.len() as u32,
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(idx, v);
                }
                b'h' | b'j' => {
                    let idx = if op == b'h' {
                        self.u8()? as u32
                    } else {
                        self.u32()?
                    };
                    let v =
                        self.memo.get(&idx).cloned().ok_or_else(|| {
                            format!("memo entry {idx} read before it was written")
                        })?;
                    self.stack.push(v);
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(Self::global(module, name)?));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&module, &name) {
                        (Value::Str(m), Value::Str(n)) => {
                            let g = Self::global(m, n)?;
                            self.stack.push(Value::Global(g));
                        }
                        _ => return Err("STACK_GLOBAL of non-strings".into()),
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_storage(&pid)?);
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = reduce(&f, &args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD: an OrderedDict's attributes (`_metadata`); ignored.
                    let _state = self.pop()?;
                    match self.top()? {
                        Value::Dict(_) => {}
                        other => {
                            return Err(format!("BUILD (setting attributes) on a {}", other.kind()))
                        }
                    }
                }
                _ => {
                    return Err(format!(
                        "opcode 0x{op:02x} at offset {at} is not allowed in a tensor state dict"
                    ))
                }
            }
        }
    }
}

fn as_usize(v: &Value, what: &str) -> PResult<usize> {
    match v {
        Value::Int(i) if *i >= 0 => usize::try_from(*i).map_err(|_| format!("{what} too large")),
        Value::Int(i) => Err(format!("{what} should be non-negative, got {i}")),
        other => Err(format!("{what} should be an int, got a {}", other.kind())),
    }
}

fn usize_tuple(v: &Value, what: &str) -> PResult<Vec<usize>> {
    match v {
        Value::Tuple(t) => t.iter().map(|x| as_usize(x, what)).collect(),
        other => Err(format!("{what} should be a tuple, got a {}", other.kind())),
    }
}

/// `('storage', torch.XStorage, key, location, numel)`.
fn persistent_storage(pid: &Value) -> PResult<Value> {
    let Value::Tuple(t) = pid else {
        return Err(format!("persistent id is a {}, not a tuple", pid.kind()));
    };
    match t.as_slice() {
        [Value::Str(tag), Value::Global(Global::Storage(dtype)), Value::Str(key), _loc, n]
            if &**tag == "storage" =>
        {
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("storage key `{key}` is not a plain name"));
            }
            Ok(Value::Storage(Rc::new(StorageRef {
                dtype: *dtype,
                key: key.to_string(),
                numel: as_usize(n, "storage size")?,
            })))
        }
        _ => Err(format!(
            "persistent id ({}) is not ('storage', torch.<dtype>Storage, key, location, numel) \
             of a supported dtype",
            t.iter().map(Value::kind).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn reduce(f: &Value, args: &Value) -> PResult<Value> {
    let Value::Tuple(a) = args else {
        return Err(format!("REDUCE with {} arguments", args.kind()));
    };
    match f {
        Value::Global(Global::OrderedDict) if a.is_empty() => Ok(Value::Dict(Default::default())),
        Value::Global(Global::RebuildTensorV2) if (6..=7).contains(&a.len()) => {
            let Value::Storage(s) = &a[0] else {
                return Err(format!(
                    "_rebuild_tensor_v2 of a {}, not a storage",
                    a[0].kind()
                ));
            };
            let offset = as_usize(&a[1], "storage offset")?;
            let shape = usize_tuple(&a[2], "tensor size")?;
            let stride = usize_tuple(&a[3], "tensor stride")?;
            if shape.len() != stride.len() {
                return Err(format!(
                    "tensor size {shape:?} and stride {stride:?} differ in rank"
                ));
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: s.clone(),
                offset,
                shape,
                stride,
            })))
        }
        Value::Global(Global::RebuildParameter) if a.len() == 3 => match &a[0] {
            t @ Value::Tensor(_) => Ok(t.clone()),
            other => Err(format!("_rebuild_parameter of a {}", other.kind())),
        },
        Value::Global(g) => Err(format!(
            "REDUCE of {g:?} with {} arguments is not a state-dict pattern; refusing it",
            a.len()
        )),
        other => Err(format!(
            "REDUCE of a {}: only whitelisted classes may be called",
            other.kind()
        )),
    }
}

// ------------------------------------------------------------------ reading

/// One tensor of a state dict, widened to f32, with the dtype it was stored in.
#[derive(Clone, Debug)]
pub struct PthTensor {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub data: Vec<f32>,
    /// Element type it was stored in.
    pub dtype: StorageDType,
}

/// Reads a PyTorch zip checkpoint into named f32 tensors with the dtype each
/// was stored in, in the state dict's order. `path` is for messages.
pub fn read(bytes: &[u8], path: &Path) -> Result<Vec<PthTensor>> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
        err(
            path,
            format!(
                "this is a PyTorch file (zip archive), but the zip cannot be read \
                 (truncated or corrupt?): {e}"
            ),
        )
    })?;
    let pkls: Vec<String> = zip
        .file_names()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(String::from)
        .collect();
    let pkl_name = match pkls.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(err(
                path,
                "a zip archive without `<name>/data.pkl`: not a PyTorch checkpoint",
            ))
        }
        _ => return Err(err(path, format!("several data.pkl entries: {pkls:?}"))),
    };
    let prefix = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let read_entry = |zip: &mut zip::ZipArchive<Cursor<&[u8]>>,
                      name: &str,
                      want: Option<u64>,
                      max: u64|
     -> Result<Vec<u8>> {
        let f = zip
            .by_name(name)
            .map_err(|e| err(path, format!("entry `{name}`: {e}")))?;
        let size = f.size();
        let stored = f.compression() == zip::CompressionMethod::Stored;
        if f.compressed_size() > bytes.len() as u64 || (stored && f.compressed_size() != size) {
            return Err(err(
                path,
                format!(
                    "entry `{name}` claims {size} bytes ({} compressed) in a file of {} bytes",
                    f.compressed_size(),
                    bytes.len()
                ),
            ));
        }
        if let Some(w) = want {
            if size != w {
                return Err(err(
                    path,
                    format!(
                        "entry `{name}` holds {size} bytes but the pickle says {w} \
                         (storage smaller or larger than claimed)"
                    ),
                ));
            }
        }
        if size > max {
            return Err(err(
                path,
                format!("entry `{name}` claims {size} bytes, more than the {max} allowed"),
            ));
        }
        match f.compression() {
            zip::CompressionMethod::Stored => {}
            zip::CompressionMethod::Deflated => {
                // Deflate cannot expand more than 1032:1.
                if size
                    > f.compressed_size()
                        .saturating_mul(1100)
                        .saturating_add(4096)
                {
                    return Err(err(
                        path,
                        format!(
                            "entry `{name}` claims {size} bytes from {} compressed: more than \
                             deflate can produce",
                            f.compressed_size()
                        ),
                    ));
                }
            }
            m => {
                return Err(err(
                    path,
                    format!("entry `{name}` uses compression {m:?} (only stored and deflate)"),
                ))
            }
        }
        let mut out = Vec::with_capacity(size as usize);
        f.take(size + 1)
            .read_to_end(&mut out)
            .map_err(|e| err(path, format!("entry `{name}`: {e}")))?;
        if out.len() as u64 != size {
            return Err(err(
                path,
                format!(
                    "entry `{name}` has {} bytes, its header says {size}",
                    out.len()
                ),
            ));
        }
        Ok(out)
    };
    if zip.index_for_name(&format!("{prefix}byteorder")).is_some() {
        let b = read_entry(&mut zip, &format!("{prefix}byteorder"), None, 16)?;
        if b != b"little" {
            return Err(err(
                path,
                format!(
                    "byte order `{}` is not supported (little-endian only)",
                    String::from_utf8_lossy(&b)
                ),
            ));
        }
    }
    let pkl = read_entry(&mut zip, &pkl_name, None, MAX_PICKLE_BYTES)?;
    let root = Unpickler {
        data: &pkl,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    }
    .run()
    .map_err(|m| err(path, format!("{pkl_name}: {m}")))?;
    let items = state_dict_items(&root).map_err(|m| err(path, m))?;

    let mut storages: HashMap<String, (Rc<StorageRef>, Vec<u8>)> = HashMap::new();
    let mut out = Vec::with_capacity(items.len());
    let mut total_elems: u128 = 0;
    for (name, t) in items {
        let s = &t.storage;
        if !storages.contains_key(&s.key) {
            let want = (s.numel as u64)
                .checked_mul(s.dtype.size() as u64)
                .ok_or_else(|| err(path, format!("storage `{}` size overflows", s.key)))?;
            let b = read_entry(
                &mut zip,
                &format!("{prefix}data/{}", s.key),
                Some(want),
                u64::MAX,
            )?;
            storages.insert(s.key.clone(), (s.clone(), b));
        }
        let (first, raw) = &storages[&s.key];
        if first.dtype != s.dtype || first.numel != s.numel {
            return Err(err(
                path,
                format!("storage `{}` is described two different ways", s.key),
            ));
        }
        let numel = t
            .shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                err(
                    path,
                    format!("tensor `{name}`: size {:?} overflows", t.shape),
                )
            })?;
        if numel > s.numel {
            return Err(err(
                path,
                format!(
                    "tensor `{name}` of size {:?} ({numel} elements) views a storage of {} \
                     elements",
                    t.shape, s.numel
                ),
            ));
        }
        total_elems += numel as u128;
        let distinct: u128 = storages.values().map(|(s, _)| s.numel as u128).sum();
        if total_elems > 4 * distinct.max(1) {
            return Err(err(
                path,
                "the tensors view the same storages too many times (more than 4× their size)",
            ));
        }
        let data =
            gather(raw, s.dtype, t.offset, &t.shape, &t.stride, s.numel).ok_or_else(|| {
                err(
                    path,
                    format!(
                        "tensor `{name}` (offset {}, size {:?}, stride {:?}) reaches past its \
                     storage of {} elements",
                        t.offset, t.shape, t.stride, s.numel
                    ),
                )
            })?;
        out.push(PthTensor {
            name,
            shape: t.shape.clone(),
            data,
            dtype: s.dtype,
        });
    }
    Ok(out)
}

/// The `(name, tensor)` pairs of the unpickled root: a dict (or
/// OrderedDict) of tensors, or one wrapped as `{"state_dict": …}`,
/// `{"model": …}` or `{"module": …}`.
fn state_dict_items(root: &Value) -> PResult<Vec<(String, Rc<TensorRef>)>> {
    let Value::Dict(d) = root else {
        return Err(format!(
            "the pickle holds a {}, not a state dict (a dict of tensors)",
            root.kind()
        ));
    };
    let mut d = d.borrow().clone();
    // one wrapper level: {"state_dict": {...}} (not recursive: untrusted depth)
    if let [(Value::Str(k), Value::Dict(inner))] = d.as_slice() {
        if ["state_dict", "model", "module"].contains(&&**k) {
            let inner = inner.borrow().clone();
            d = inner;
        }
    }
    let mut out = Vec::with_capacity(d.len());
    for (k, v) in d.iter() {
        let Value::Str(k) = k else {
            return Err(format!("a state-dict key is a {}, not a str", k.kind()));
        };
        match v {
            Value::Tensor(t) => out.push((k.to_string(), t.clone())),
            other => {
                return Err(format!(
                    "entry `{k}` is a {}, not a tensor (only dicts of tensors are read)",
                    other.kind()
                ))
            }
        }
    }
    Ok(out)
}

/// Decodes the strided view `(offset, shape, stride)` of a little-endian
/// storage to f32; `None` if the view reaches outside the storage.
fn gather(
    raw: &[u8],
    dtype: StorageDType,
    offset: usize,
    shape: &[usize],
    stride: &[usize],
    numel_storage: usize,
) -> Option<Vec<f32>> {
    let numel: usize = shape.iter().product();
    if numel == 0 {
        return Some(Vec::new());
    }
    let mut last = offset;
    for (&d, &s) in shape.iter().zip(stride) {
        last = last.checked_add((d - 1).checked_mul(s)?)?;
    }
    if last >= numel_storage {
        return None;
    }
    let es = dtype.size();
    let at = |i: usize| -> f32 {
        let b = &raw[i * es..(i + 1) * es];
        match dtype {
            StorageDType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageDType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDType::F64 => {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                f64::from_le_bytes(a) as f32
            }
        }
    };
    // Row-major contiguous: one run.
    let mut contiguous = true;
    let mut want = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != want {
            contiguous = false;
        }
        want *= d;
    }
    if contiguous {
        return Some((offset..offset + numel).map(at).collect());
    }
    let mut out = Vec::with_capacity(numel);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..numel {
        let i = offset + idx.iter().zip(stride).map(|(a, s)| a * s).sum::<usize>();
        out.push(at(i));
        for k in (0..shape.len()).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    Some(out)
}

// ------------------------------------------------------------------ writing

fn put_int(out: &mut Vec<u8>, v: usize) {
    if v < 256 {
        out.extend([b'K', v as u8]);
    } else if v < 65536 {
        out.push(b'M');
        out.extend((v as u16).to_le_bytes());
    } else if v < (1 << 31) {
        out.push(b'J');
        out.extend((v as u32).to_le_bytes());
    } else {
        // LONG1: little-endian two's complement, shortest form.
        let b = (v as u64).to_le_bytes();
        let mut n = 8;
        while n > 1 && b[n - 1] == 0 && b[n - 2] & 0x80 == 0 {
            n -= 1;
        }
        let mut bytes = b[..n].to_vec();
        if bytes[n - 1] & 0x80 != 0 {
            bytes.push(0);
        }
        out.extend([0x8a, bytes.len() as u8]);
        out.extend(bytes);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_tuple(out: &mut Vec<u8>, xs: &[usize]) {
    out.push(b'(');
    for &x in xs {
        put_int(out, x);
    }
    out.push(b't');
}

/// Serialises named tensors as a PyTorch zip checkpoint (an `OrderedDict`
/// state dict of contiguous tensors, one storage each, all in `dtype`) that
/// `torch.load(..., weights_only=True)` and [`read`] read. Each tensor is
/// `(name, shape, data)`.
pub fn write(tensors: &[(&str, &[usize], &[f32])], dtype: StorageDType) -> Result<Vec<u8>> {
    let sd = dtype;
    let mut pkl = vec![0x80, 2];
    pkl.extend(b"ccollections\nOrderedDict\n)R");
    pkl.push(b'(');
    for (i, &(name, shape, data)) in tensors.iter().enumerate() {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Shape {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: vec![data.len()],
            });
        }
        put_str(&mut pkl, name);
        pkl.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.push(b'(');
        put_str(&mut pkl, "storage");
        pkl.extend(format!("ctorch\n{}\n", sd.class_name()).as_bytes());
        put_str(&mut pkl, &i.to_string());
        put_str(&mut pkl, "cpu");
        put_int(&mut pkl, n);
        pkl.extend(b"tQ");
        put_int(&mut pkl, 0);
        put_tuple(&mut pkl, shape);
        let mut stride = vec![1usize; shape.len()];
        for k in (0..shape.len().saturating_sub(1)).rev() {
            stride[k] = stride[k + 1] * shape[k + 1];
        }
        put_tuple(&mut pkl, &stride);
        pkl.push(0x89);
        pkl.extend(b"ccollections\nOrderedDict\n)R");
        pkl.extend(b"tR");
    }
    pkl.extend(b"u.");

    let zerr = |e: zip::result::ZipError| Error::Invalid(format!("writing a .pth: {e}"));
    let mut zw = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = |len: usize| {
        zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .with_alignment(64)
            .large_file(len as u64 >= u32::MAX as u64)
    };
    let mut put = |name: &str, data: &[u8]| -> Result<()> {
        zw.start_file(format!("archive/{name}"), opts(data.len()))
            .map_err(zerr)?;
        zw.write_all(data)
            .map_err(|e| Error::Invalid(format!("writing a .pth: {e}")))
    };
    put("data.pkl", &pkl)?;
    put("byteorder", b"little")?;
    for (i, &(_, _, data)) in tensors.iter().enumerate() {
        let bytes: Vec<u8> = match dtype {
            StorageDType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            StorageDType::F16 => data
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            StorageDType::BF16 => data
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
            StorageDType::F64 => data
                .iter()
                .flat_map(|&x| (x as f64).to_le_bytes())
                .collect(),
        };
        put(&format!("data/{i}"), &bytes)?;
    }
    put("version", b"3\n")?;
    Ok(zw.finish().map_err(zerr)?.into_inner())
}
