//! A heap buffer whose start is aligned for direct I/O and DMA.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: the page size, which satisfies `O_DIRECT` on any logical
/// block size up to 4 KiB and the NVMe / GPU DMA engines.
pub const DMA_ALIGN: usize = 4096;

/// Why an [`AlignedBuf`] could not be allocated.
#[derive(Debug, thiserror::Error)]
pub enum AlignedBufError {
    /// The requested length, rounded up to whole 4 KiB blocks, does not fit in the address space.
    #[error("an aligned buffer of {len} bytes is larger than the address space allows")]
    TooLarge {
        /// Requested length in bytes.
        len: usize,
    },
    /// The allocator had no memory for the buffer.
    #[error("out of memory allocating an aligned buffer of {len} bytes")]
    OutOfMemory {
        /// Requested length in bytes.
        len: usize,
    },
}

/// A zero-initialised heap buffer of `len` bytes whose first byte is [`DMA_ALIGN`]-aligned.
///
/// Storage backends read tiles into it (`O_DIRECT` and DMA need aligned memory). The allocation is
/// rounded up to whole [`DMA_ALIGN`] blocks, so a backend may read whole blocks into it (see
/// [`AlignedBuf::capacity`]); the slice it dereferences to is exactly `len` bytes. The memory is
/// freed on drop.
pub struct AlignedBuf {
    /// Start of the allocation; never null, aligned to `DMA_ALIGN`, valid for `layout.size()` bytes.
    ptr: NonNull<u8>,
    /// Bytes visible through `Deref`; `len <= layout.size()`.
    len: usize,
    /// The layout the memory was allocated with, needed to free it.
    layout: Layout,
}

// SAFETY: `AlignedBuf` is the only owner of its allocation and holds no thread-bound state, so
// moving it (and with it the duty to free the memory) to another thread is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: `&AlignedBuf` gives only `&[u8]` access; there is no interior mutability, so shared
// references on several threads only read.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates a zeroed buffer of `len` bytes starting on a [`DMA_ALIGN`] boundary.
    ///
    /// Fails instead of aborting when the size is absurd or memory is exhausted, because lengths
    /// come from model manifests on disk.
    pub fn new(len: usize) -> Result<Self, AlignedBufError> {
        let size = len
            .max(1)
            .checked_next_multiple_of(DMA_ALIGN)
            .ok_or(AlignedBufError::TooLarge { len })?;
        let layout = Layout::from_size_align(size, DMA_ALIGN)
            .map_err(|_| AlignedBufError::TooLarge { len })?;
        // SAFETY: `layout` has a non-zero size (at least DMA_ALIGN bytes) as `alloc_zeroed` requires.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(AlignedBufError::OutOfMemory { len })?;
        Ok(Self { ptr, len, layout })
    }

    /// Bytes allocated: `len` rounded up to whole [`DMA_ALIGN`] blocks (at least one block).
    pub fn capacity(&self) -> usize {
        self.layout.size()
    }

    /// The allocation's start as a raw pointer, valid for [`AlignedBuf::capacity`] bytes while
    /// the buffer lives; for DMA memory owners that hand out disjoint pieces of it.
    pub fn as_raw_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `layout.size() >= len` initialised (zeroed) bytes that live as
        // long as `self`, and the returned borrow of `self` prevents any `&mut` alias meanwhile.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed(self.layout)` and is freed only here, once.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("ptr", &self.ptr)
            .field("len", &self.len)
            .field("capacity", &self.layout.size())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_sized() {
        for len in [0, 1, 100, 4095, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::new(len).unwrap();
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % DMA_ALIGN, 0, "len {len}");
            assert!(buf.iter().all(|&b| b == 0));
            assert_eq!(buf.capacity() % DMA_ALIGN, 0);
            assert!(buf.capacity() >= len.max(1));
        }
    }

    #[test]
    fn writable_and_movable_across_threads() {
        let mut buf = AlignedBuf::new(8192).unwrap();
        buf[0] = 7;
        buf[8191] = 9;
        let sum = std::thread::spawn(move || buf.iter().map(|&b| u32::from(b)).sum::<u32>())
            .join()
            .unwrap();
        assert_eq!(sum, 16);
    }

    #[test]
    fn absurd_length_is_an_error() {
        let err = AlignedBuf::new(usize::MAX).unwrap_err();
        assert!(matches!(err, AlignedBufError::TooLarge { .. }), "{err}");
        let err = AlignedBuf::new(isize::MAX as usize).unwrap_err();
        assert!(matches!(err, AlignedBufError::TooLarge { .. }), "{err}");
    }
}
