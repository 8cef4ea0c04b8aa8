//! The bytes of one layer of a chunk ([`super::LayerBlock::data`]): a `Vec<u8>` as a rule, page-locked
//! memory a GPU backend handed out ([`super::super::similarity::Backend::page_locked_batch`]), or a range
//! of a memory-mapped input file that a reader handed out without copying ([`HostBytes::mapped`]).
//!
//! Why mapped: copying a chunk out of the map into a heap buffer costs a pass over the data plus, the
//! first time, a fault per fresh page of the buffer; on narrow batches of wide layers that was about a
//! third of a CPU CKA run's time. A mapped chunk is read in place (and is read-only: a write first moves
//! the bytes to the heap).
//!
//! Why page-locked: a reader that writes a chunk straight into page-locked memory lets the CUDA backend copy it to
//! the device asynchronously from where it lies, instead of first copying it into a staging buffer of
//! its own (issue 9: disk → pinned → device, one host copy fewer per batch). The backend then marks the
//! memory as being read by the device; every write through a [`HostBytes`] first waits until that read
//! is done ([`PageLocked::wait_unused`]), so a reader thread refilling the buffer never races the copy.

use memmap2::Mmap;
use std::sync::Arc;

/// Page-locked host memory from a GPU backend, shared with the backend only so that it can find the
/// memory by address and mark it in use by the device.
///
/// # Safety
/// `as_ptr()` must stay valid for reads and writes of `capacity()` bytes for the life of the value, and
/// `wait_unused` must return only when no device operation reads those bytes any more.
pub unsafe trait PageLocked: Send + Sync {
    /// The first byte.
    fn as_ptr(&self) -> *mut u8;
    /// How many bytes there are.
    fn capacity(&self) -> usize;
    /// Block until no device copy enqueued from this memory is still running. A device error here is
    /// not returned: the backend reports it on its next call.
    fn wait_unused(&self);
}

/// A growable byte buffer: on the heap, or in page-locked memory ([`HostBytes::page_locked`]) for as long
/// as what is written fits its capacity (beyond it, the bytes move to the heap: still correct, only
/// the backend's fast path is lost), or a read-only range of a mapped file ([`HostBytes::mapped`]; any
/// write moves it to the heap).
pub struct HostBytes(Repr);

enum Repr {
    Heap(Vec<u8>),
    Locked {
        mem: Arc<dyn PageLocked>,
        len: usize,
    },
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
}

impl HostBytes {
    /// An empty heap buffer.
    pub const fn new() -> Self {
        HostBytes(Repr::Heap(Vec::new()))
    }

    /// An empty buffer in `mem`, which must be this buffer's alone: `None` when another strong
    /// reference to `mem` exists (two buffers writing the same memory would alias).
    pub fn page_locked(mem: Arc<dyn PageLocked>) -> Option<Self> {
        // Weak references are fine (the backend keeps one, to find the memory by address): upgrading one
        // while this buffer exists gives a second strong reference, which this refuses.
        (Arc::strong_count(&mem) == 1).then_some(HostBytes(Repr::Locked { mem, len: 0 }))
    }

    /// Bytes `range` of `map`, read in place (the map stays alive while these bytes do).
    ///
    /// # Panics
    /// If `range` runs past the end of the map.
    pub fn mapped(map: Arc<Mmap>, range: std::ops::Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= map.len(),
            "mapped range {range:?} of a {}-byte map",
            map.len()
        );
        HostBytes(Repr::Mapped {
            map,
            start: range.start,
            len: range.len(),
        })
    }

    /// The page-locked memory holding these bytes, if they are in one.
    pub fn locked(&self) -> Option<&Arc<dyn PageLocked>> {
        match &self.0 {
            Repr::Locked { mem, .. } => Some(mem),
            Repr::Heap(_) | Repr::Mapped { .. } => None,
        }
    }

    /// Whether these bytes are a range of a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped { .. })
    }

    /// Forget the contents, keeping the capacity (a mapped range lets go of its map).
    pub fn clear(&mut self) {
        match &mut self.0 {
            Repr::Heap(v) => v.clear(),
            Repr::Locked { len, .. } => *len = 0,
            Repr::Mapped { .. } => self.0 = Repr::Heap(Vec::new()),
        }
    }

    /// The bytes of a mapped range moved to the heap (before a write); a no-op otherwise.
    fn unmap(&mut self) {
        if let Repr::Mapped { .. } = self.0 {
            self.0 = Repr::Heap(self.to_vec());
        }
    }

    /// Append `src`.
    pub fn extend_from_slice(&mut self, src: &[u8]) {
        self.unmap();
        match &mut self.0 {
            Repr::Heap(v) => v.extend_from_slice(src),
            Repr::Locked { mem, len } if *len + src.len() <= mem.capacity() => {
                mem.wait_unused();
                // SAFETY: `len + src.len()` bytes fit the allocation (checked), this buffer is the only
                // writer (`page_locked`), and no device copy reads it any more (waited for).
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), mem.as_ptr().add(*len), src.len())
                };
                *len += src.len();
            }
            Repr::Locked { .. } => {
                let mut v = Vec::with_capacity(self.len() + src.len());
                v.extend_from_slice(self);
                v.extend_from_slice(src);
                self.0 = Repr::Heap(v);
            }
            Repr::Mapped { .. } => unreachable!("unmapped above"),
        }
    }

    /// The bytes as a `Vec` (a copy when they are page-locked or mapped).
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Repr::Heap(v) => v,
            Repr::Locked { .. } | Repr::Mapped { .. } => self.to_vec(),
        }
    }
}

impl Default for HostBytes {
    fn default() -> Self {
        HostBytes::new()
    }
}

impl From<Vec<u8>> for HostBytes {
    fn from(v: Vec<u8>) -> Self {
        HostBytes(Repr::Heap(v))
    }
}

impl FromIterator<u8> for HostBytes {
    fn from_iter<I: IntoIterator<Item = u8>>(iter: I) -> Self {
        HostBytes(Repr::Heap(iter.into_iter().collect()))
    }
}

impl std::ops::Deref for HostBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Heap(v) => v,
            // SAFETY: `len ≤ capacity` bytes, written by `extend_from_slice`; a device copy may read them
            // concurrently, which a shared borrow allows.
            Repr::Locked { mem, len } => unsafe { std::slice::from_raw_parts(mem.as_ptr(), *len) },
            Repr::Mapped { map, start, len } => &map[*start..*start + *len],
        }
    }
}

impl std::ops::DerefMut for HostBytes {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.unmap();
        match &mut self.0 {
            Repr::Heap(v) => v,
            Repr::Locked { mem, len } => {
                mem.wait_unused();
                // SAFETY: as `deref`; the only writer, with no device copy reading any more.
                unsafe { std::slice::from_raw_parts_mut(mem.as_ptr(), *len) }
            }
            Repr::Mapped { .. } => unreachable!("unmapped above"),
        }
    }
}

/// A copy of page-locked bytes is a heap buffer (the page-locked memory stays its one buffer's); a copy
/// of a mapped range is the same range (read-only, so sharing the map is safe).
impl Clone for HostBytes {
    fn clone(&self) -> Self {
        match &self.0 {
            Repr::Mapped { map, start, len } => HostBytes(Repr::Mapped {
                map: map.clone(),
                start: *start,
                len: *len,
            }),
            _ => HostBytes(Repr::Heap(self.to_vec())),
        }
    }
}

impl std::fmt::Debug for HostBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.0 {
            Repr::Heap(_) => "heap",
            Repr::Locked { .. } => "page-locked",
            Repr::Mapped { .. } => "mapped",
        };
        write!(f, "HostBytes({} bytes, {kind})", self.len())
    }
}

impl PartialEq for HostBytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

/// Heap memory standing in for a backend's page-locked memory in tests (no GPU here); counts the waits.
#[cfg(test)]
pub(crate) struct HeapLocked {
    bytes: Box<[std::cell::UnsafeCell<u8>]>,
    pub waits: std::sync::atomic::AtomicUsize,
}

#[cfg(test)]
impl HeapLocked {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(HeapLocked {
            bytes: (0..capacity)
                .map(|_| std::cell::UnsafeCell::new(0xAB))
                .collect(),
            waits: Default::default(),
        })
    }
}

// SAFETY: test-only; the memory is written through its one HostBytes.
#[cfg(test)]
unsafe impl Sync for HeapLocked {}

// SAFETY: the box lives as long as the value; there is no device, so nothing to wait for.
#[cfg(test)]
unsafe impl PageLocked for HeapLocked {
    fn as_ptr(&self) -> *mut u8 {
        self.bytes.as_ptr() as *mut u8
    }
    fn capacity(&self) -> usize {
        self.bytes.len()
    }
    fn wait_unused(&self) {
        self.waits
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn page_locked_bytes_behave_as_a_vec_and_wait_before_every_write() {
        let mem = HeapLocked::new(10);
        let weak = Arc::downgrade(&mem);
        let mut b = HostBytes::page_locked(mem).expect("sole owner");
        b.extend_from_slice(&[1, 2, 3]);
        b.extend_from_slice(&[4, 5]);
        assert_eq!(&*b, &[1, 2, 3, 4, 5]);
        assert!(b.locked().is_some());
        let waits = || weak.upgrade().unwrap().waits.load(Ordering::Relaxed);
        assert_eq!(waits(), 2, "one wait per write");
        b[0] = 9;
        assert_eq!(waits(), 3, "a mutable borrow waits too");
        // Reading does not wait; clearing keeps the memory.
        assert_eq!(b.iter().map(|&x| x as u32).sum::<u32>(), 9 + 2 + 3 + 4 + 5);
        b.clear();
        assert_eq!(waits(), 3);
        assert!(b.is_empty() && b.locked().is_some());
        b.extend_from_slice(&[7; 10]);
        assert!(b.locked().is_some(), "exactly the capacity still fits");
        // Past the capacity the bytes move to the heap, intact.
        b.extend_from_slice(&[8]);
        assert!(b.locked().is_none());
        let mut want = vec![7u8; 10];
        want.push(8);
        assert_eq!(&*b, want.as_slice());
        // The heap move released the page-locked memory.
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn mapped_bytes_are_read_in_place_and_move_to_the_heap_on_a_write() {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        // SAFETY: a private temporary file nothing else writes.
        let map = Arc::new(unsafe { Mmap::map(f.as_file()) }.unwrap());
        let at = map[2..].as_ptr();
        let weak = Arc::downgrade(&map);
        let mut b = HostBytes::mapped(map, 2..6);
        assert!(b.is_mapped() && b.locked().is_none());
        assert_eq!(&*b, &[3, 4, 5, 6]);
        assert_eq!(b.as_ptr(), at, "read in place");
        // A clone shares the range; a write to it moves it to the heap, leaving the map as it was.
        let mut c = b.clone();
        assert!(c.is_mapped() && c.as_ptr() == at);
        c[0] = 9;
        assert!(!c.is_mapped());
        assert_eq!((&*c, &*b), (&[9, 4, 5, 6][..], &[3, 4, 5, 6][..]));
        let mut e = b.clone();
        e.extend_from_slice(&[7]);
        assert_eq!((&*e, e.is_mapped()), (&[3, 4, 5, 6, 7][..], false));
        assert_eq!(b.clone().into_vec(), vec![3, 4, 5, 6]);
        // Clearing lets go of the map: the last holder gone, it is unmapped.
        b.clear();
        assert!(b.is_empty() && !b.is_mapped());
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn page_locked_memory_belongs_to_one_buffer() {
        let mem: Arc<dyn PageLocked> = HeapLocked::new(4);
        let other = mem.clone();
        assert!(HostBytes::page_locked(mem).is_none());
        let mut b = HostBytes::page_locked(other).expect("sole owner now");
        b.extend_from_slice(&[1, 2]);
        // A clone is a heap copy, not a second writer of the memory.
        let c = b.clone();
        assert!(c.locked().is_none() && b.locked().is_some());
        assert_eq!(c, b);
        assert_eq!(c.into_vec(), vec![1, 2]);
        assert_eq!(b.into_vec(), vec![1, 2]);
    }
}
