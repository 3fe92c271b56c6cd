//! Page-locked host memory from the CUDA driver: the host tier the storage backend reads into
//! and the copy engine reads from, with no CPU copy between.

use std::fmt;
use std::sync::Arc;

use cudarc::driver::{result, CudaContext};
use tileflow_spdk::{DmaMemory, DMA_ALIGN};

/// `cuMemHostAlloc`'d memory, aligned to [`DMA_ALIGN`] for O_DIRECT reads.
pub(crate) struct PinnedHost {
    /// What `cuMemHostAlloc` returned (freed on drop).
    base: *mut u8,
    /// The first [`DMA_ALIGN`]-aligned byte at or after `base`.
    start: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the memory is owned by this value alone (handed out only through `DmaBuf`s of one
// arena, which give each byte to one holder); the raw pointers are plain addresses, valid
// from any thread of the process, and the driver allows freeing from any thread.
unsafe impl Send for PinnedHost {}
// SAFETY: `&PinnedHost` only reads the addresses and the length.
unsafe impl Sync for PinnedHost {}

impl fmt::Debug for PinnedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinnedHost({} bytes)", self.len)
    }
}

impl PinnedHost {
    /// `len` page-locked bytes, zeroed, mapped for the context's copy engine.
    pub(crate) fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedHost, String> {
        let len = len.max(1);
        let total = len.checked_add(DMA_ALIGN).ok_or("size overflows")?;
        ctx.bind_to_thread().map_err(|e| e.to_string())?;
        // SAFETY: a plain allocation call; the result is checked before use.
        let base = unsafe { result::malloc_host(total, 0) }.map_err(|e| e.to_string())?;
        let base = base.cast::<u8>();
        let pad = base.align_offset(DMA_ALIGN);
        // SAFETY: `pad < DMA_ALIGN`, so `start..start + len` stays inside the `total` bytes.
        let start = unsafe { base.add(pad) };
        // SAFETY: the `len` bytes from `start` are ours and writable.
        unsafe { std::ptr::write_bytes(start, 0, len) };
        Ok(PinnedHost {
            base,
            start,
            len,
            ctx: ctx.clone(),
        })
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `base` came from `malloc_host` and is freed once; the tiers drop their
        // buffers only after the copies reading them completed.
        if let Err(e) = unsafe { result::free_host(self.base.cast()) } {
            tracing::warn!(error = %e, "cuMemFreeHost failed");
        }
    }
}

// SAFETY: `start` is fixed for the life of the value, non-null, DMA_ALIGN-aligned and valid for
// `len` bytes of reads and writes; only the arena's `DmaBuf`s touch it.
unsafe impl DmaMemory for PinnedHost {
    fn as_ptr(&self) -> *mut u8 {
        self.start
    }

    fn len(&self) -> usize {
        self.len
    }

    fn locked(&self) -> bool {
        true
    }
}
