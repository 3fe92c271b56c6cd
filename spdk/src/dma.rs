//! DMA-safe memory for storage reads: arenas of page-aligned memory, registered once with a
//! storage backend, and [`DmaBuf`], the unique handle to one piece of an arena.
//!
//! A tier allocates its slots as one arena (the memory comes from the compute backend: locked
//! host memory on the CPU backend, `cuMemHostAlloc` on CUDA), splits it into [`DmaBuf`]s, and
//! moves a buffer into each read request; the completion hands it back. Because a `DmaBuf` is the
//! only way to touch its bytes and moves with the request, the engine cannot read a slot while the
//! storage thread (or the NVMe controller) writes it.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::aligned::{AlignedBuf, AlignedBufError, DMA_ALIGN};

/// Memory an arena is carved from.
///
/// # Safety
///
/// `as_ptr()` must return the same non-null, [`DMA_ALIGN`]-aligned pointer for the whole life of
/// the value, valid for reads and writes of `len()` bytes, and nothing else may access that memory
/// while the value lives (the arena hands it out only through [`DmaBuf`]s).
pub unsafe trait DmaMemory: Send + Sync + fmt::Debug {
    /// Start of the memory.
    fn as_ptr(&self) -> *mut u8;
    /// Bytes.
    fn len(&self) -> usize;
    /// Whether the memory has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether the pages are locked in RAM (page-locked / pinned), for logs and `/api/cache`.
    fn locked(&self) -> bool;
}

/// Host memory locked with `mlock(2)` where the process may lock it: the CPU backend's pinned
/// memory. When locking is refused (RLIMIT_MEMLOCK without CAP_IPC_LOCK) the memory still works,
/// only unlocked; [`DmaMemory::locked`] says which.
#[derive(Debug)]
pub struct LockedBuf {
    buf: AlignedBuf,
    locked: bool,
}

impl LockedBuf {
    /// Allocates `len` zeroed, aligned bytes and tries to lock them.
    pub fn new(len: usize) -> Result<LockedBuf, AlignedBufError> {
        let buf = AlignedBuf::new(len)?;
        let cap = buf.capacity();
        let ptr = buf.as_raw_ptr();
        // SAFETY: `ptr` is valid for `cap` bytes (the whole allocation) while `buf` lives; mlock
        // does not access the memory, it only pins the pages.
        let locked = unsafe { libc::mlock(ptr.cast(), cap) } == 0;
        Ok(LockedBuf { buf, locked })
    }
}

impl Drop for LockedBuf {
    fn drop(&mut self) {
        if self.locked {
            let cap = self.buf.capacity();
            // SAFETY: unlocks exactly the range locked in `new`, which is still allocated.
            unsafe { libc::munlock(self.buf.as_raw_ptr().cast(), cap) };
        }
    }
}

// SAFETY: the pointer is the `AlignedBuf`'s raw allocation start (not derived from a reference),
// which never moves, is DMA_ALIGN aligned and valid for `capacity()` bytes; the `LockedBuf` is
// owned by the arena, which gives out access only through disjoint `DmaBuf`s.
unsafe impl DmaMemory for LockedBuf {
    fn as_ptr(&self) -> *mut u8 {
        self.buf.as_raw_ptr()
    }
    fn len(&self) -> usize {
        self.buf.capacity()
    }
    fn locked(&self) -> bool {
        self.locked
    }
}

static NEXT_ARENA_ID: AtomicU64 = AtomicU64::new(1);

struct ArenaInner {
    id: u64,
    mem: Box<dyn DmaMemory>,
}

impl fmt::Debug for ArenaInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaArena")
            .field("id", &self.id)
            .field("mem", &self.mem)
            .finish()
    }
}

/// A shared reference to an arena's memory, for registering it with a storage backend.
/// The memory stays allocated while any `DmaArena` or `DmaBuf` of it lives.
#[derive(Debug, Clone)]
pub struct DmaArena {
    inner: Arc<ArenaInner>,
}

impl DmaArena {
    /// Takes ownership of `mem` and splits it into `count` buffers of `piece` bytes each
    /// (`piece` a positive multiple of [`DMA_ALIGN`], `count * piece <= mem.len()`).
    pub fn new(
        mem: Box<dyn DmaMemory>,
        piece: usize,
        count: usize,
    ) -> Result<(DmaArena, Vec<DmaBuf>), DmaError> {
        let total = piece.checked_mul(count);
        if piece == 0 || !piece.is_multiple_of(DMA_ALIGN) || total.is_none_or(|t| t > mem.len()) {
            return Err(DmaError::Layout {
                piece,
                count,
                len: mem.len(),
            });
        }
        if !(mem.as_ptr() as usize).is_multiple_of(DMA_ALIGN) {
            return Err(DmaError::Misaligned);
        }
        let inner = Arc::new(ArenaInner {
            id: NEXT_ARENA_ID.fetch_add(1, Ordering::Relaxed),
            mem,
        });
        let bufs = (0..count)
            .map(|i| DmaBuf {
                arena: inner.clone(),
                offset: i * piece,
                len: piece,
            })
            .collect();
        Ok((DmaArena { inner }, bufs))
    }

    /// A process-unique id, which backends use to find the registration of a buffer's arena.
    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// Start and length of the whole arena (what io_uring or SPDK register).
    pub fn raw_parts(&self) -> (*mut u8, usize) {
        (self.inner.mem.as_ptr(), self.inner.mem.len())
    }

    /// Bytes in the arena.
    pub fn len(&self) -> usize {
        self.inner.mem.len()
    }

    /// Whether the arena has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether its pages are locked.
    pub fn locked(&self) -> bool {
        self.inner.mem.locked()
    }
}

/// Why an arena or buffer operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The pieces do not fit the memory, or are not whole 4 KiB blocks.
    #[error(
        "cannot split {len} bytes into {count} buffers of {piece} bytes (pieces must be positive \
         multiples of 4096 bytes and fit)"
    )]
    Layout {
        /// Bytes per piece.
        piece: usize,
        /// Pieces.
        count: usize,
        /// Bytes of memory.
        len: usize,
    },
    /// The memory does not start on a 4 KiB boundary.
    #[error("DMA memory does not start on a 4096-byte boundary")]
    Misaligned,
    /// Allocation failed.
    #[error(transparent)]
    Alloc(#[from] AlignedBufError),
}

/// The unique handle to `len` bytes at `offset` of an arena: the only way to reach them.
///
/// Offsets are [`DMA_ALIGN`]-aligned, so a `DmaBuf` is a valid `O_DIRECT` / DMA target. Split a
/// slot into tiles with [`DmaBuf::split_at`] and put it back with [`DmaBuf::join`].
pub struct DmaBuf {
    arena: Arc<ArenaInner>,
    offset: usize,
    len: usize,
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaBuf")
            .field("arena", &self.arena.id)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl DmaBuf {
    /// The arena this buffer belongs to (see [`DmaArena::id`]).
    pub fn arena_id(&self) -> u64 {
        self.arena.id
    }

    /// Byte offset of this buffer inside its arena.
    pub fn arena_offset(&self) -> usize {
        self.offset
    }

    /// Splits into `[0, at)` and `[at, len)`; `at` must be a multiple of [`DMA_ALIGN`] inside the
    /// buffer, otherwise the buffer comes back unchanged as the error.
    pub fn split_at(self, at: usize) -> Result<(DmaBuf, DmaBuf), DmaBuf> {
        if at == 0 || at >= self.len || !at.is_multiple_of(DMA_ALIGN) {
            return Err(self);
        }
        let tail = DmaBuf {
            arena: self.arena.clone(),
            offset: self.offset + at,
            len: self.len - at,
        };
        let head = DmaBuf {
            arena: self.arena,
            offset: self.offset,
            len: at,
        };
        Ok((head, tail))
    }

    /// Joins two adjacent buffers of one arena (`self` directly before `next`); otherwise both
    /// come back unchanged.
    pub fn join(self, next: DmaBuf) -> Result<DmaBuf, (DmaBuf, DmaBuf)> {
        if !Arc::ptr_eq(&self.arena, &next.arena) || self.offset + self.len != next.offset {
            return Err((self, next));
        }
        Ok(DmaBuf {
            arena: self.arena,
            offset: self.offset,
            len: self.len + next.len,
        })
    }

    /// One slice over buffers that lie back to back in one arena (`bufs[i + 1]` directly after
    /// `bufs[i]`), borrowed as long as they are: a slot split into tiles read as a whole.
    /// `None` for no buffers or buffers that are not adjacent.
    pub fn span<'a>(bufs: &[&'a DmaBuf]) -> Option<&'a [u8]> {
        let first = bufs.first()?;
        let mut end = first.offset;
        for b in bufs {
            if !Arc::ptr_eq(&b.arena, &first.arena) || b.offset != end {
                return None;
            }
            end += b.len;
        }
        // SAFETY: [first.offset, end) is the union of the listed buffers' ranges (each starts
        // where the one before ends, all in the same arena, inside its memory, which lives as
        // long as `first.arena`, so while the borrows do). Each buffer is the unique handle to
        // its range and is borrowed shared for 'a, so no `&mut` to any part of the span can
        // exist while the returned slice lives.
        Some(unsafe {
            std::slice::from_raw_parts(
                first.arena.mem.as_ptr().add(first.offset),
                end - first.offset,
            )
        })
    }

    /// Raw start pointer, for backends that hand the buffer to the kernel or a device.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        // SAFETY: `offset + len <= mem.len()` (checked at split time), so the result stays inside
        // the arena's allocation.
        unsafe { self.arena.mem.as_ptr().add(self.offset) }
    }
}

impl Deref for DmaBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: the range `[offset, offset + len)` lies inside the arena's memory, which lives
        // as long as `self.arena`; `DmaBuf`s of one arena never overlap (they come from
        // disjoint splits) and each is unique (not Clone), so no `&mut` alias exists while the
        // returned borrow of `self` lives.
        unsafe { std::slice::from_raw_parts(self.arena.mem.as_ptr().add(self.offset), self.len) }
    }
}

impl DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the exclusive borrow of the unique handle makes this the only
        // reference to the range.
        unsafe {
            std::slice::from_raw_parts_mut(self.arena.mem.as_ptr().add(self.offset), self.len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_covers_adjacent_tiles_only() {
        let mem = LockedBuf::new(4 * DMA_ALIGN).unwrap();
        let (_arena, mut bufs) = DmaArena::new(Box::new(mem), 2 * DMA_ALIGN, 2).unwrap();
        let second = bufs.pop().unwrap();
        let (mut a, mut b) = bufs.pop().unwrap().split_at(DMA_ALIGN).unwrap();
        a[0] = 1;
        b[0] = 2;
        let whole = DmaBuf::span(&[&a, &b]).unwrap();
        assert_eq!(
            (whole.len(), whole[0], whole[DMA_ALIGN]),
            (2 * DMA_ALIGN, 1, 2)
        );
        assert!(DmaBuf::span(&[&b, &a]).is_none());
        assert!(DmaBuf::span(&[&a, &second]).is_none());
        assert!(DmaBuf::span(&[&a, &b, &second]).is_some());
        assert!(DmaBuf::span(&[]).is_none());
    }

    fn arena(pieces: usize) -> (DmaArena, Vec<DmaBuf>) {
        let mem = LockedBuf::new(pieces * 2 * DMA_ALIGN).unwrap();
        DmaArena::new(Box::new(mem), 2 * DMA_ALIGN, pieces).unwrap()
    }

    #[test]
    fn pieces_are_disjoint_aligned_and_writable() {
        let (arena, mut bufs) = arena(3);
        assert_eq!(bufs.len(), 3);
        for (i, b) in bufs.iter_mut().enumerate() {
            assert_eq!(b.len(), 2 * DMA_ALIGN);
            assert_eq!(b.as_mut_ptr() as usize % DMA_ALIGN, 0);
            b.fill(i as u8 + 1);
            assert_eq!(b.arena_id(), arena.id());
        }
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8 + 1));
        }
        drop(arena);
        // The buffers keep the memory alive.
        assert_eq!(bufs[2][0], 3);
    }

    #[test]
    fn split_and_join_round_trip() {
        let (_arena, mut bufs) = arena(2);
        let b = bufs.remove(0);
        let (head, tail) = b.split_at(DMA_ALIGN).unwrap();
        assert_eq!((head.len(), tail.len()), (DMA_ALIGN, DMA_ALIGN));
        assert_eq!(tail.arena_offset(), DMA_ALIGN);
        let other = bufs.remove(0);
        // Not adjacent in the right order: both come back.
        let (tail, head) = tail.join(head).unwrap_err();
        let whole = head.join(tail).unwrap();
        assert_eq!(whole.len(), 2 * DMA_ALIGN);
        let whole = whole.split_at(100).unwrap_err();
        let joined = whole.join(other).unwrap();
        assert_eq!(joined.len(), 4 * DMA_ALIGN);
    }

    #[test]
    fn bad_layouts_are_errors() {
        let mem = || Box::new(LockedBuf::new(8192).unwrap());
        assert!(DmaArena::new(mem(), 100, 1).is_err());
        assert!(DmaArena::new(mem(), 4096, 3).is_err());
        assert!(DmaArena::new(mem(), 0, 1).is_err());
        assert!(DmaArena::new(mem(), 4096, 2).is_ok());
    }
}
