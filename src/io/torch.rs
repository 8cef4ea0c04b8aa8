//! PyTorch `torch.save` files (the zip format of PyTorch ≥ 1.6): `pytorch_model.bin` checkpoints, read by
//! the runtime ([`crate::runtime::weights`]) and by the pruned-checkpoint writer, and `.pt` / `.pth` /
//! `.bin` activation files, read by [`super::shards`].
//!
//! Such a file is a zip archive of uncompressed entries: `<root>/data.pkl`, a pickle of the saved object
//! in which each tensor refers to a storage by key, and `<root>/data/<key>`, each storage's raw
//! little-endian bytes. The pickle is *interpreted*, never executed: a small stack machine knows the
//! opcodes and the few callables `torch.save` writes for tensors and dicts (`_rebuild_tensor_v2`,
//! `_rebuild_parameter`, `collections.OrderedDict`, …); any other callable gives an opaque value, so no
//! code in a file ever runs (unlike `torch.load(weights_only=False)`). Tensors are located, not read: each
//! is a byte offset into the file, memory-mapped later like safetensors data.

use super::{DType, StoredTensor};
use crate::error::{Error, Result};
use regex::Regex;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Element type of a stored tensor, from its storage's class (`torch.FloatStorage`, …).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TorchDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
}

impl TorchDtype {
    fn from_storage(class: &str) -> Option<Self> {
        Some(match class {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            "Float8_e4m3fnStorage" => Self::F8E4M3,
            "Float8_e5m2Storage" => Self::F8E5M2,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool | Self::F8E4M3 | Self::F8E5M2 => 1,
        }
    }

    /// The same element type as safetensors names it.
    pub fn safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as D;
        match self {
            Self::F64 => D::F64,
            Self::F32 => D::F32,
            Self::F16 => D::F16,
            Self::BF16 => D::BF16,
            Self::I64 => D::I64,
            Self::I32 => D::I32,
            Self::I16 => D::I16,
            Self::I8 => D::I8,
            Self::U8 => D::U8,
            Self::Bool => D::BOOL,
            Self::F8E4M3 => D::F8_E4M3,
            Self::F8E5M2 => D::F8_E5M2,
        }
    }
}

/// One tensor of a `torch.save` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TorchTensor {
    /// Its key path in the saved object: a dict's keys joined by `.`; the elements of a list or tuple
    /// saved at the top level are `layer0`, `layer1`, … (as in the Python API), nested ones `<path>.<i>`.
    pub name: String,
    pub dtype: TorchDtype,
    pub shape: Vec<usize>,
    /// Byte offset of element 0 in the file.
    pub offset: u64,
    /// Whether the elements are contiguous and row-major from `offset`. A view saved as it is (a slice
    /// across the last axes, a transpose) is not: `torch.save` keeps its whole storage and its strides.
    pub contiguous: bool,
}

/// Whether a file starting with `head` is a zip archive (`torch.save`'s format since PyTorch 1.6).
pub fn is_torch_zip(head: &[u8]) -> bool {
    head.starts_with(b"PK\x03\x04")
}

/// What is said of a file in the legacy format.
const LEGACY_FORMAT: &str =
    "saved in torch.save's legacy format (PyTorch < 1.6); load it and save \
     it again with a recent PyTorch, or as safetensors";

/// The legacy `torch.save` format (PyTorch < 1.6, or `_use_new_zipfile_serialization=False`) starts with
/// a protocol-2 pickle of its magic number 0x1950a86a20f9469cfc6c.
pub fn is_legacy_torch(head: &[u8]) -> bool {
    head.starts_with(&[
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
    ])
}

/// The tensors of the `torch.save` file whose bytes are `bytes` (`path` names it in errors), in the order
/// the saved object holds them (a dict's insertion order). Objects that are not tensors (numbers,
/// strings, optimizer states' scalars) are skipped.
pub fn read_tensors(bytes: &[u8], path: &Path) -> Result<Vec<TorchTensor>> {
    let err = |msg: String| Error::format(path, msg);
    if !is_torch_zip(bytes) {
        return Err(err(if is_legacy_torch(bytes) {
            LEGACY_FORMAT.into()
        } else {
            "not a PyTorch file (torch.save's zip format)".into()
        }));
    }
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| err(format!("corrupt zip archive: {e}")))?;
    // torch.save names every entry `<root>/…`, the root being the file's stem when it was saved.
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(|n| n.into_owned())
        .ok_or_else(|| {
            err("a zip archive without a <root>/data.pkl: not a torch.save file".into())
        })?;
    let root = &pkl_name[..pkl_name.len() - "data.pkl".len()];
    let read_entry = |zip: &mut zip::ZipArchive<_>, name: &str| -> Result<Option<Vec<u8>>> {
        let Some(i) = zip.index_for_name(name) else {
            return Ok(None);
        };
        let mut f = zip
            .by_index(i)
            .map_err(|e| err(format!("zip entry '{name}': {e}")))?;
        if f.size() > bytes.len() as u64 {
            return Err(err(format!("zip entry '{name}' is larger than the file")));
        }
        let mut v = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut v)
            .map_err(|e| err(format!("zip entry '{name}': {e}")))?;
        Ok(Some(v))
    };
    if let Some(order) = read_entry(&mut zip, &format!("{root}byteorder"))? {
        if order.trim_ascii() != b"little" {
            return Err(err(format!(
                "saved on a {} machine; only little-endian files are read",
                String::from_utf8_lossy(order.trim_ascii())
            )));
        }
    }
    let pickle = read_entry(&mut zip, &pkl_name)?.expect("the entry was listed");
    let mut vm = Unpickler::new(&pickle);
    let top = vm.run().map_err(|e| err(format!("{pkl_name}: {e}")))?;
    let mut found = Vec::new();
    vm.flatten(top, String::new(), 0, &mut found)
        .map_err(|e| err(format!("{pkl_name}: {e}")))?;
    if found.len() == 1 && found[0].0.is_empty() {
        return Err(err(
            "holds a single tensor; save a dict of named tensors (or a list of them)".into(),
        ));
    }

    // Where each storage's bytes are: an uncompressed entry, so they can be mapped in place.
    let mut storages: HashMap<String, (u64, u64)> = HashMap::new();
    let mut out = Vec::with_capacity(found.len());
    for (name, t) in found {
        let Node::Storage(storage) = &vm.nodes[t.storage] else {
            unreachable!("Unpickler::rebuild_tensor checks the storage")
        };
        let (class, key) = &**storage;
        let dtype = TorchDtype::from_storage(class).ok_or_else(|| {
            Error::layer(
                path,
                &name,
                format!("unsupported storage type torch.{class}"),
            )
        })?;
        let (start, len) = match storages.get(key) {
            Some(&s) => s,
            None => {
                let entry = format!("{root}data/{key}");
                let i = zip.index_for_name(&entry).ok_or_else(|| {
                    Error::layer(path, &name, format!("its storage '{entry}' is missing"))
                })?;
                let f = zip
                    .by_index_raw(i)
                    .map_err(|e| err(format!("zip entry '{entry}': {e}")))?;
                if f.compression() != zip::CompressionMethod::Stored {
                    return Err(err(format!(
                        "zip entry '{entry}' is compressed ({}); torch.save stores tensors uncompressed",
                        f.compression()
                    )));
                }
                let start = f
                    .data_start()
                    .ok_or_else(|| err(format!("zip entry '{entry}': no data offset")))?;
                let s = (start, f.size());
                if start
                    .checked_add(f.size())
                    .is_none_or(|e| e > bytes.len() as u64)
                {
                    return Err(err(format!(
                        "zip entry '{entry}' runs past the end of the file"
                    )));
                }
                storages.insert(key.clone(), s);
                s
            }
        };
        let elem = dtype.size() as u64;
        // The furthest element the view reads, in elements from the storage's start (checked: the sizes
        // come from the file).
        let mut numel = Some(1u64);
        let mut last = Some(t.offset as u64);
        for (&s, &st) in t.size.iter().zip(&t.stride) {
            numel = numel.and_then(|n| n.checked_mul(s as u64));
            let reach = (s as u64).saturating_sub(1).checked_mul(st as u64);
            last = last.zip(reach).and_then(|(a, b)| a.checked_add(b));
        }
        let extent = last.and_then(|l| l.checked_add(1)?.checked_mul(elem));
        let fits = match (numel, extent) {
            (Some(0), _) => true,
            (Some(_), Some(e)) => e <= len,
            _ => false,
        };
        if !fits {
            return Err(Error::layer(
                path,
                &name,
                format!(
                    "shape {:?} with strides {:?} from element {} runs past its storage of {} bytes",
                    t.size, t.stride, t.offset, len
                ),
            ));
        }
        let mut expected = 1usize;
        let mut contiguous = true;
        for (&s, &st) in t.size.iter().zip(&t.stride).rev() {
            if s > 1 && st != expected {
                contiguous = false;
            }
            expected = expected.saturating_mul(s);
        }
        out.push(TorchTensor {
            name,
            dtype,
            shape: t.size,
            // An empty tensor's offset is never read (and not checked above): its storage's start.
            offset: match numel {
                Some(0) => start,
                _ => start + t.offset as u64 * elem,
            },
            contiguous,
        });
    }
    Ok(out)
}

/// The tensors of the `torch.save` file at `path` that `keep` accepts, as activation layers (in the
/// order the file holds them): f32, f64, f16 or bf16, contiguous.
pub(crate) fn activation_tensors(path: &Path, keep: Option<&Regex>) -> Result<Vec<StoredTensor>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    // SAFETY: read-only map, dropped before returning; see `shards::map_file` for truncation.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    read_tensors(&map, path)?
        .into_iter()
        .filter(|t| keep.is_none_or(|re| re.is_match(&t.name)))
        .map(|t| {
            let dtype = match t.dtype {
                TorchDtype::F32 => DType::F32,
                TorchDtype::F64 => DType::F64,
                TorchDtype::F16 => DType::F16,
                TorchDtype::BF16 => DType::BF16,
                other => {
                    return Err(Error::layer(
                        path,
                        &t.name,
                        format!("unsupported dtype {other:?} (expected F32, F64, F16 or BF16)"),
                    ))
                }
            };
            if !t.contiguous {
                return Err(Error::layer(
                    path,
                    &t.name,
                    "a view that is not contiguous was saved (a slice or a transpose keeps its whole \
                     storage); save tensor.contiguous() instead",
                ));
            }
            Ok(StoredTensor {
                name: t.name,
                dtype,
                shape: t.shape,
                file: path.to_path_buf(),
                offset: t.offset,
                file_len,
            })
        })
        .collect()
}

/// The tensors a bare pickle (a `data.pkl`) describes, counted: the pickle interpreter alone, for the
/// fuzz target and the tests.
pub(crate) fn pickle_tensor_count(pickle: &[u8]) -> std::result::Result<usize, String> {
    let mut vm = Unpickler::new(pickle);
    let top = vm.run()?;
    let mut found = Vec::new();
    vm.flatten(top, String::new(), 0, &mut found)?;
    Ok(found.len())
}

/// Index of a value in the unpickler's arena.
type Id = usize;

/// A tensor as `_rebuild_tensor_v2` describes it: a view of a storage.
#[derive(Clone, Debug)]
struct TensorView {
    storage: Id,
    /// In elements.
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// A value of the pickle. Containers refer to other values by [`Id`], so the memo shares objects as
/// pickle means it to (a dict filled after it was memoized is the same dict), and nothing recurses on
/// drop however deep the nesting.
#[derive(Clone, Debug)]
enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    /// `module.name`, boxed (as the other large variants) to keep a node at 32 bytes: the arena may
    /// hold a node per byte of the pickle.
    Global(Box<(String, String)>),
    /// A storage's class name (`FloatStorage`) and key.
    Storage(Box<(String, String)>),
    Tensor(Box<TensorView>),
    /// The result of a callable the unpickler does not know (or of a class instantiation).
    Object,
}

/// Deeper nesting than this in the saved object is refused (and ends the walk over a cycle).
const MAX_DEPTH: usize = 64;

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            nodes: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("truncated pickle at byte {}", self.pos))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn uint(&mut self, n: usize) -> std::result::Result<u64, String> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |acc, &x| (acc << 8) | x as u64))
    }

    fn line(&mut self) -> std::result::Result<String, String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| format!("truncated pickle at byte {}", self.pos))?;
        self.pos += n + 1;
        Ok(String::from_utf8_lossy(&rest[..n]).into_owned())
    }

    fn push(&mut self, n: Node) {
        self.nodes.push(n);
        self.stack.push(self.nodes.len() - 1);
    }

    fn pop(&mut self) -> std::result::Result<Id, String> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(format!("pickle pops past a mark at byte {}", self.pos));
        }
        self.stack
            .pop()
            .ok_or_else(|| format!("pickle stack underflow at byte {}", self.pos))
    }

    fn top(&self) -> std::result::Result<Id, String> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| format!("pickle stack underflow at byte {}", self.pos))
    }

    /// Everything pushed since the last MARK, and the mark removed.
    fn pop_mark(&mut self) -> std::result::Result<Vec<Id>, String> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| format!("pickle has no mark to pop at byte {}", self.pos))?;
        Ok(self.stack.split_off(m))
    }

    fn string(&mut self, n: usize) -> std::result::Result<(), String> {
        let s = String::from_utf8_lossy(self.take(n)?).into_owned();
        self.push(Node::Str(s));
        Ok(())
    }

    fn int(&self, id: Id) -> Option<i64> {
        match self.nodes[id] {
            Node::Int(v) => Some(v),
            Node::Bool(b) => Some(b as i64),
            _ => None,
        }
    }

    fn ints(&self, id: Id) -> Option<Vec<usize>> {
        match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => v
                .iter()
                .map(|&i| self.int(i).and_then(|x| usize::try_from(x).ok()))
                .collect(),
            _ => None,
        }
    }

    fn items(&self, id: Id) -> &[Id] {
        match &self.nodes[id] {
            Node::Tuple(v) | Node::List(v) => v,
            _ => &[],
        }
    }

    /// Run the pickle to its STOP; the object it built.
    fn run(&mut self) -> std::result::Result<Id, String> {
        loop {
            let at = self.pos;
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    self.take(1)?; // PROTO
                }
                0x95 => {
                    self.take(8)?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b')' => self.push(Node::Tuple(Vec::new())),
                b']' => self.push(Node::List(Vec::new())),
                b'}' => self.push(Node::Dict(Vec::new())),
                b'N' => self.push(Node::None),
                0x88 => self.push(Node::Bool(true)),
                0x89 => self.push(Node::Bool(false)),
                b'J' => {
                    let v = self.uint(4)? as u32 as i32 as i64;
                    self.push(Node::Int(v));
                }
                b'K' => {
                    let v = self.uint(1)? as i64;
                    self.push(Node::Int(v));
                }
                b'M' => {
                    let v = self.uint(2)? as i64;
                    self.push(Node::Int(v));
                }
                0x8a => {
                    // LONG1: n little-endian two's-complement bytes.
                    let n = self.uint(1)? as usize;
                    if n > 8 {
                        return Err(format!("integer of {n} bytes at byte {at}"));
                    }
                    let raw = self.uint(n)?;
                    let v = if n == 0 {
                        0
                    } else {
                        let shift = 64 - 8 * n as u32;
                        ((raw << shift) as i64) >> shift
                    };
                    self.push(Node::Int(v));
                }
                b'G' => {
                    self.take(8)?; // BINFLOAT: no float is needed to find tensors
                    self.push(Node::Float);
                }
                // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, and the protocol-1 byte strings read as text.
                b'X' | 0x8c | 0x8d | b'U' | b'T' => {
                    let width = match op {
                        0x8c | b'U' => 1,
                        0x8d => 8,
                        _ => 4,
                    };
                    let n = self.uint(width)? as usize;
                    self.string(n)?;
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'C' => self.uint(1)?,
                        b'B' => self.uint(4)?,
                        _ => self.uint(8)?,
                    };
                    self.take(n as usize)?;
                    self.push(Node::Bytes);
                }
                b't' => {
                    let v = self.pop_mark()?;
                    self.push(Node::Tuple(v));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut v = Vec::with_capacity(n);
                    for _ in 0..n {
                        v.push(self.pop()?);
                    }
                    v.reverse();
                    self.push(Node::Tuple(v));
                }
                b'l' => {
                    let v = self.pop_mark()?;
                    self.push(Node::List(v));
                }
                b'd' => {
                    let v = self.pop_mark()?;
                    let pairs = v.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    self.push(Node::Dict(pairs));
                }
                b'a' => {
                    let v = self.pop()?;
                    let list = self.top()?;
                    self.append(list, &[v], at)?;
                }
                b'e' => {
                    let v = self.pop_mark()?;
                    let list = self.top()?;
                    self.append(list, &v, at)?;
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let dict = self.top()?;
                    self.set_items(dict, &[k, v], at)?;
                }
                b'u' => {
                    let v = self.pop_mark()?;
                    let dict = self.top()?;
                    self.set_items(dict, &v, at)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Node::Global(Box::new((module, name))));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Node::Str(module), Node::Str(name)) =
                        (self.nodes[module].clone(), self.nodes[name].clone())
                    else {
                        return Err(format!("STACK_GLOBAL of non-strings at byte {at}"));
                    };
                    self.push(Node::Global(Box::new((module, name))));
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = self.call(f, args, 0)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args); no class is known.
                    self.pop()?;
                    self.pop()?;
                    self.push(Node::Object);
                }
                b'b' => {
                    // BUILD: an object's state (an OrderedDict's `_metadata`, …); nothing to keep.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent(pid, at)?;
                    self.push(v);
                }
                b'q' | b'r' | 0x94 => {
                    let key = match op {
                        b'q' => self.uint(1)?,
                        b'r' => self.uint(4)?,
                        _ => self.memo.len() as u64,
                    };
                    let v = self.top()?;
                    self.memo.insert(key, v);
                }
                b'h' | b'j' => {
                    let key = if op == b'h' {
                        self.uint(1)?
                    } else {
                        self.uint(4)?
                    };
                    let v = *self
                        .memo
                        .get(&key)
                        .ok_or_else(|| format!("memo key {key} unset at byte {at}"))?;
                    self.stack.push(v);
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?;
                    self.stack.push(v);
                }
                _ => return Err(format!("unsupported pickle opcode 0x{op:02x} at byte {at}")),
            }
        }
    }

    fn append(&mut self, list: Id, v: &[Id], at: usize) -> std::result::Result<(), String> {
        match &mut self.nodes[list] {
            Node::List(l) => l.extend_from_slice(v),
            Node::Object => {} // a list subclass, or anything appended to; not ours
            _ => return Err(format!("APPEND to a non-list at byte {at}")),
        }
        Ok(())
    }

    fn set_items(&mut self, dict: Id, kv: &[Id], at: usize) -> std::result::Result<(), String> {
        match &mut self.nodes[dict] {
            Node::Dict(d) => d.extend(kv.chunks_exact(2).map(|p| (p[0], p[1]))),
            Node::Object => {}
            _ => return Err(format!("SETITEM on a non-dict at byte {at}")),
        }
        Ok(())
    }

    /// BINPERSID: `torch.save` refers to a storage as `('storage', torch.<Type>Storage, key, location,
    /// numel)`.
    fn persistent(&self, pid: Id, at: usize) -> std::result::Result<Node, String> {
        let items = self.items(pid);
        let parts = (
            items.first().map(|&i| &self.nodes[i]),
            items.get(1).map(|&i| &self.nodes[i]),
            items.get(2).map(|&i| &self.nodes[i]),
        );
        match parts {
            (Some(Node::Str(tag)), Some(Node::Global(global)), Some(Node::Str(key)))
                if tag == "storage" =>
            {
                Ok(Node::Storage(Box::new((global.1.clone(), key.clone()))))
            }
            _ => Err(format!(
                "a persistent reference that is not a torch storage at byte {at}"
            )),
        }
    }

    /// REDUCE: `f(*args)` for the callables `torch.save` writes; anything else is an opaque object.
    fn call(&mut self, f: Id, args: Id, depth: usize) -> std::result::Result<Id, String> {
        let Node::Global(global) = &self.nodes[f] else {
            return Ok(self.new_node(Node::Object));
        };
        let a = self.items(args).to_vec();
        let node = match (global.0.as_str(), global.1.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2" | "_rebuild_tensor") => {
                Node::Tensor(Box::new(self.rebuild_tensor(&a)?))
            }
            ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                return a
                    .first()
                    .copied()
                    .ok_or_else(|| "_rebuild_parameter without arguments".to_string());
            }
            // A tensor subclass: (func, type, func's args, state).
            ("torch._tensor", "_rebuild_from_type_v2") if depth < MAX_DEPTH => {
                let (Some(&func), Some(&inner)) = (a.first(), a.get(2)) else {
                    return Err("_rebuild_from_type_v2 without its arguments".into());
                };
                return self.call(func, inner, depth + 1);
            }
            ("collections", "OrderedDict") | ("builtins", "dict") => Node::Dict(Vec::new()),
            _ => Node::Object,
        };
        Ok(self.new_node(node))
    }

    fn new_node(&mut self, n: Node) -> Id {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, …)`.
    fn rebuild_tensor(&self, a: &[Id]) -> std::result::Result<TensorView, String> {
        let bad = || "a tensor whose storage, offset, size or stride is malformed".to_string();
        let storage = *a.first().ok_or_else(bad)?;
        if !matches!(self.nodes[storage], Node::Storage(_)) {
            return Err(bad());
        }
        let offset = a
            .get(1)
            .and_then(|&i| self.int(i))
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(bad)?;
        let size = a.get(2).and_then(|&i| self.ints(i)).ok_or_else(bad)?;
        let stride = a.get(3).and_then(|&i| self.ints(i)).ok_or_else(bad)?;
        if size.len() != stride.len() {
            return Err(bad());
        }
        Ok(TensorView {
            storage,
            offset,
            size,
            stride,
        })
    }

    /// Every tensor under `id`, with its key path (see [`TorchTensor::name`]).
    fn flatten(
        &self,
        id: Id,
        path: String,
        depth: usize,
        out: &mut Vec<(String, TensorView)>,
    ) -> std::result::Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("objects nested deeper than {MAX_DEPTH} levels"));
        }
        let join = |key: &str| {
            if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            }
        };
        match &self.nodes[id] {
            Node::Tensor(t) => out.push((path, (**t).clone())),
            Node::Dict(items) => {
                for &(k, v) in items {
                    let key = match &self.nodes[k] {
                        Node::Str(s) => s.clone(),
                        Node::Int(i) => i.to_string(),
                        _ => continue,
                    };
                    self.flatten(v, join(&key), depth + 1, out)?;
                }
            }
            Node::List(items) | Node::Tuple(items) => {
                for (i, &v) in items.iter().enumerate() {
                    let key = if path.is_empty() {
                        format!("layer{i}")
                    } else {
                        join(&i.to_string())
                    };
                    self.flatten(v, key, depth + 1, out)?;
                }
            }
            Node::None
            | Node::Bool(_)
            | Node::Int(_)
            | Node::Float
            | Node::Str(_)
            | Node::Bytes
            | Node::Global(_)
            | Node::Storage(_)
            | Node::Object => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/torch_save")
            .join(name);
        std::fs::read(p).unwrap()
    }

    /// The `data.pkl` of a torch.save file's bytes.
    fn pickle_of(bytes: &[u8]) -> Vec<u8> {
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        let name = zip
            .file_names()
            .find(|n| n.as_ref().unwrap().ends_with("/data.pkl"))
            .unwrap()
            .unwrap()
            .into_owned();
        let mut v = Vec::new();
        zip.by_name(&name).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn a_node_is_at_most_32_bytes() {
        // The arena can hold a node per pickle byte; the fuzz targets' allocation cap counts on this.
        assert!(std::mem::size_of::<Node>() <= 32);
    }

    /// The checkpoint fixture (made by scripts/make_fixtures.py with torch.save): every tensor located,
    /// the tied lm_head on the embedding's bytes, in the state dict's order.
    #[test]
    fn a_state_dict_is_located() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/llama_torch_bin/pytorch_model.bin");
        let bytes = std::fs::read(&path).unwrap();
        let ts = read_tensors(&bytes, &path).unwrap();
        assert_eq!(ts[0].name, "model.embed_tokens.weight");
        assert_eq!(ts[0].shape, [100, 48]);
        assert_eq!(ts[0].dtype, TorchDtype::BF16);
        let head = ts.iter().find(|t| t.name == "lm_head.weight").unwrap();
        assert_eq!(head.offset, ts[0].offset, "tied: one storage");
        let inv_freq = ts
            .iter()
            .filter(|t| t.name.ends_with("rotary_emb.inv_freq"))
            .count();
        assert_eq!(inv_freq, 2);
        assert!(ts.iter().all(|t| t.contiguous && t.offset % 64 == 0));
    }

    /// Random corruption of a pickle (byte changes, truncation) gives an error or a result, never a
    /// panic; the CRC of the zip entry would hide most of these from `read_tensors`.
    #[test]
    fn corrupt_pickles_are_errors() {
        use rand::{Rng, SeedableRng};
        let good = pickle_of(&fixture("acts.pt"));
        assert_eq!(pickle_tensor_count(&good), Ok(4));
        let good4 = pickle_of(&fixture("acts_proto4.pt"));
        assert_eq!(pickle_tensor_count(&good4), Ok(4));
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut errors = 0;
        for trial in 0..4000 {
            let mut p = if trial % 2 == 0 {
                good.clone()
            } else {
                good4.clone()
            };
            if trial % 5 == 0 {
                p.truncate(rng.random_range(0..p.len()));
            } else {
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..p.len());
                    p[i] = rng.random();
                }
            }
            errors += pickle_tensor_count(&p).is_err() as usize;
        }
        assert!(errors > 1000, "{errors}");
    }

    #[test]
    fn self_referencing_and_deep_objects_end() {
        // A list appended to itself (through the memo), then walked: the depth limit ends it.
        let cyclic = b"\x80\x02]q\x00h\x00a.";
        assert!(pickle_tensor_count(cyclic)
            .unwrap_err()
            .contains("nested deeper"));
        // 100 000 nested lists: built and dropped without recursion.
        let mut deep = vec![0x80, 0x02];
        deep.extend(std::iter::repeat_n(b'(', 100_000));
        deep.extend(std::iter::repeat_n(b'l', 100_000));
        deep.push(b'.');
        assert!(pickle_tensor_count(&deep)
            .unwrap_err()
            .contains("nested deeper"));
        // An unknown callable gives an opaque object, not an error: nothing runs.
        let call = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R}X\x01\x00\x00\x00aN\x86.";
        assert_eq!(pickle_tensor_count(call), Ok(0));
    }
}
