//! The CUDA backend's tier memory: the host tier in `cuMemHostAlloc`'d memory, device slots in
//! VRAM, and copies on the copy stream, each ending in an event.

use std::sync::Arc;

use cudarc::driver::{sys, CudaEvent, CudaSlice, DevicePtr};
use tileflow_engine::backend::{DeviceExtent, ExpertBytes};
use tileflow_engine::tier::{TierMemory, TierMemoryError};
use tileflow_spdk::{DmaBuf, DmaMemory};

use super::pinned::PinnedHost;
use super::CudaDevice;

/// [`TierMemory`] on a GPU.
#[derive(Debug, Clone)]
pub struct CudaTierMemory {
    dev: Arc<CudaDevice>,
}

impl CudaTierMemory {
    /// Tier memory on `dev`.
    pub fn new(dev: Arc<CudaDevice>) -> CudaTierMemory {
        CudaTierMemory { dev }
    }
}

/// One expert slot in VRAM.
#[derive(Debug)]
pub struct CudaSlot {
    buf: CudaSlice<u8>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

/// A host → device copy in flight: complete when the copy stream passes it.
#[derive(Debug)]
pub struct CudaCopy {
    done: CudaEvent,
}

fn copy_err(e: cudarc::driver::DriverError) -> TierMemoryError {
    TierMemoryError::Copy {
        reason: e.to_string(),
    }
}

impl TierMemory for CudaTierMemory {
    type DeviceSlot = CudaSlot;
    type Event = CudaCopy;

    fn alloc_host(&self, bytes: usize) -> Result<Box<dyn DmaMemory>, TierMemoryError> {
        let mem = PinnedHost::new(&self.dev.ctx, bytes).map_err(|reason| {
            tracing::warn!(bytes, %reason, "cuMemHostAlloc failed");
            TierMemoryError::Host { bytes }
        })?;
        Ok(Box::new(mem))
    }

    fn alloc_device_slot(&self, bytes: usize) -> Result<CudaSlot, TierMemoryError> {
        let stream = &self.dev.compute;
        let buf = stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|_| TierMemoryError::Device { bytes })?;
        stream
            .synchronize()
            .map_err(|_| TierMemoryError::Device { bytes })?;
        let ptr = buf.device_ptr(stream).0;
        Ok(CudaSlot {
            buf,
            ptr,
            len: bytes,
        })
    }

    fn copy_to_device(
        &self,
        src: &DmaBuf,
        range: std::ops::Range<usize>,
        dst: &mut CudaSlot,
        dst_offset: usize,
    ) -> Result<CudaCopy, TierMemoryError> {
        let copy = self.copy_all_to_device(&[(src, range)], dst, dst_offset)?;
        copy.ok_or(TierMemoryError::Copy {
            reason: "nothing to copy".into(),
        })
    }

    /// One `cuMemcpyHtoDAsync` per run of pieces adjacent in host memory (a host slot's tiles
    /// are one run), after one wait on the compute stream, ending in one event.
    fn copy_all_to_device(
        &self,
        srcs: &[(&DmaBuf, std::ops::Range<usize>)],
        dst: &mut CudaSlot,
        dst_offset: usize,
    ) -> Result<Option<CudaCopy>, TierMemoryError> {
        // Checked pieces merged into runs of (host address, bytes, offset in the slot).
        let mut runs: Vec<(*const u8, usize, usize)> = Vec::new();
        let mut at = dst_offset;
        for (src, range) in srcs {
            let len = range.len();
            let bad = || TierMemoryError::CopyRange {
                src_start: range.start,
                len,
                src_len: src.len(),
                dst_offset: at,
                dst_len: dst.len,
            };
            let from = src.get(range.clone()).ok_or_else(bad)?;
            if at.checked_add(len).is_none_or(|end| end > dst.len) {
                return Err(bad());
            }
            match runs.last_mut() {
                Some((ptr, n, _)) if ptr.wrapping_add(*n) == from.as_ptr() => *n += len,
                _ => runs.push((from.as_ptr(), len, at)),
            }
            at += len;
        }
        if runs.is_empty() {
            return Ok(None);
        }
        let dev = &self.dev;
        // The slot may still be read by expert kernels queued on the compute stream (it held
        // another expert until the cache evicted it): the copies wait for them.
        let flags = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let computed = dev.compute.record_event(flags).map_err(copy_err)?;
        dev.copy.wait(&computed).map_err(copy_err)?;
        for (ptr, len, offset) in runs {
            // SAFETY: `dst.ptr + offset .. + len` is inside the slot (checked above), which the
            // cache does not free or reuse before this copy's event completes; the `len` host
            // bytes at `ptr` are the checked pieces of page-locked host-tier or staging memory
            // that lie end to end (each byte in one of them), borrowed for this call and kept
            // untouched by the cache until the event completes.
            unsafe {
                sys::cuMemcpyHtoDAsync_v2(
                    dst.ptr + offset as u64,
                    ptr.cast(),
                    len,
                    dev.copy.cu_stream(),
                )
            }
            .result()
            .map_err(|e| {
                // Earlier runs may still be reading host memory the cache reuses once this
                // fails: let them finish first.
                let _ = dev.copy.synchronize();
                copy_err(e)
            })?;
        }
        let done = dev.copy.record_event(flags).map_err(copy_err)?;
        Ok(Some(CudaCopy { done }))
    }

    fn poll(&self, event: &CudaCopy) -> Result<bool, TierMemoryError> {
        event.done.try_is_complete().map_err(copy_err)
    }

    fn wait(&self, event: CudaCopy) -> Result<(), TierMemoryError> {
        event.done.synchronize().map_err(copy_err)
    }

    fn device_bytes<'a>(&self, slot: &'a CudaSlot, len: usize) -> Option<ExpertBytes<'a>> {
        (len <= slot.len).then(|| ExpertBytes::Device(DeviceExtent::new(&slot.buf, slot.ptr, len)))
    }

    fn device_slot_len(&self, slot: &CudaSlot) -> usize {
        slot.len
    }
}
