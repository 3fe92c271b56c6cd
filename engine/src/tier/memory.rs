//! What a compute backend lends the expert tiers: page-locked host memory for the host tier and
//! the staging ring, device slots, and an asynchronous host → device copy with a completion event.
//!
//! The tier cache never touches device memory except through this trait, so the CUDA backend is
//! a second implementation: `alloc_host` with `cuMemHostAlloc` (or registered memory),
//! `alloc_device_slot` from its VRAM arena, `copy_to_device` as `cuMemcpyHtoDAsync` on a copy
//! stream followed by an event record. There, [`TierMemory::device_bytes`] gives a device address
//! ([`ExpertBytes::Device`]) that the CUDA backend's kernels read.

use std::fmt;

use tileflow_spdk::{DmaBuf, DmaMemory};

use crate::backend::ExpertBytes;

/// Why the backend could not provide tier memory or copy into it.
#[derive(Debug, thiserror::Error)]
pub enum TierMemoryError {
    /// Host (page-locked) memory could not be allocated.
    #[error("cannot allocate {bytes} bytes of page-locked host memory")]
    Host {
        /// Bytes asked for.
        bytes: usize,
    },
    /// A device slot could not be allocated.
    #[error("cannot allocate a {bytes}-byte device slot")]
    Device {
        /// Bytes asked for.
        bytes: usize,
    },
    /// A copy does not fit its source or destination.
    #[error(
        "cannot copy {len} bytes from {src_start} of a {src_len}-byte host buffer to offset \
         {dst_offset} of a {dst_len}-byte device slot"
    )]
    CopyRange {
        /// First source byte.
        src_start: usize,
        /// Bytes to copy.
        len: usize,
        /// Bytes of the source buffer.
        src_len: usize,
        /// Destination offset.
        dst_offset: usize,
        /// Bytes of the destination slot.
        dst_len: usize,
    },
    /// The copy engine reported a failure.
    #[error("host to device copy failed: {reason}")]
    Copy {
        /// What the backend said.
        reason: String,
    },
}

/// Memory and copies a backend provides to the tiers.
///
/// The cache keeps the source [`DmaBuf`] of a copy untouched (and alive) until its event has
/// completed, and never reads a device slot while a copy into it is outstanding.
pub trait TierMemory: fmt::Debug + Send {
    /// One device-tier slot.
    type DeviceSlot: fmt::Debug + Send;
    /// The completion of one asynchronous copy.
    type Event: fmt::Debug + Send;

    /// Page-locked host memory of at least `bytes` bytes for the host tier or the staging ring
    /// (registered with the storage backend by the caller).
    fn alloc_host(&self, bytes: usize) -> Result<Box<dyn DmaMemory>, TierMemoryError>;

    /// A device slot of at least `bytes` bytes.
    fn alloc_device_slot(&self, bytes: usize) -> Result<Self::DeviceSlot, TierMemoryError>;

    /// Starts copying `src[range]` into `dst` at `dst_offset`; the returned event completes when
    /// the bytes have landed.
    fn copy_to_device(
        &self,
        src: &DmaBuf,
        range: std::ops::Range<usize>,
        dst: &mut Self::DeviceSlot,
        dst_offset: usize,
    ) -> Result<Self::Event, TierMemoryError>;

    /// Starts copying the pieces `srcs` (each a buffer and a range of it), one after another,
    /// into `dst` from `dst_offset`; the returned event (`None` when there is nothing to copy)
    /// completes when all of them have landed. A backend merges pieces adjacent in host memory
    /// (a host slot's tiles) into one transfer; the default copies piece by piece, which relies
    /// on one memory's copies completing in the order they started.
    fn copy_all_to_device(
        &self,
        srcs: &[(&DmaBuf, std::ops::Range<usize>)],
        dst: &mut Self::DeviceSlot,
        dst_offset: usize,
    ) -> Result<Option<Self::Event>, TierMemoryError> {
        let mut last = None;
        let mut at = dst_offset;
        for (src, range) in srcs {
            match self.copy_to_device(src, range.clone(), dst, at) {
                Ok(ev) => last = Some(ev),
                Err(e) => {
                    // The copies started may still read host memory the cache reuses once
                    // this fails: let them finish first.
                    if let Some(ev) = last {
                        let _ = self.wait(ev);
                    }
                    return Err(e);
                }
            }
            at += range.len();
        }
        Ok(last)
    }

    /// Whether the copy behind `event` has finished, without blocking.
    fn poll(&self, event: &Self::Event) -> Result<bool, TierMemoryError>;

    /// Blocks until the copy behind `event` has finished.
    fn wait(&self, event: Self::Event) -> Result<(), TierMemoryError>;

    /// The first `len` bytes of a device slot as the backend's compute reads them (host memory on
    /// the CPU backend, a device address on the CUDA backend). `None` if the slot is smaller.
    fn device_bytes<'a>(&self, slot: &'a Self::DeviceSlot, len: usize) -> Option<ExpertBytes<'a>>;

    /// Bytes of a device slot.
    fn device_slot_len(&self, slot: &Self::DeviceSlot) -> usize;
}
