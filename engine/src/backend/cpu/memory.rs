//! Tier memory of the CPU backend: the host tier is locked host memory, and so is the "device"
//! tier, since the CPU computes from host memory. A copy is a `memcpy` whose event is complete
//! when it returns.

use tileflow_spdk::{AlignedBuf, DmaBuf, DmaMemory, LockedBuf};

use crate::backend::ExpertBytes;
use crate::tier::{TierMemory, TierMemoryError};

/// The CPU backend's [`TierMemory`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTierMemory;

/// A copy that finished before `copy_to_device` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuCopyDone;

impl TierMemory for CpuTierMemory {
    type DeviceSlot = AlignedBuf;
    type Event = CpuCopyDone;

    fn alloc_host(&self, bytes: usize) -> Result<Box<dyn DmaMemory>, TierMemoryError> {
        let mem = LockedBuf::new(bytes).map_err(|_| TierMemoryError::Host { bytes })?;
        Ok(Box::new(mem))
    }

    fn alloc_device_slot(&self, bytes: usize) -> Result<AlignedBuf, TierMemoryError> {
        AlignedBuf::new(bytes).map_err(|_| TierMemoryError::Device { bytes })
    }

    fn copy_to_device(
        &self,
        src: &DmaBuf,
        range: std::ops::Range<usize>,
        dst: &mut AlignedBuf,
        dst_offset: usize,
    ) -> Result<CpuCopyDone, TierMemoryError> {
        let len = range.len();
        let dst_len = dst.len();
        let bad = || TierMemoryError::CopyRange {
            src_start: range.start,
            len,
            src_len: src.len(),
            dst_offset,
            dst_len,
        };
        let from = src.get(range.clone()).ok_or_else(bad)?;
        let to = dst_offset
            .checked_add(len)
            .and_then(|end| dst.get_mut(dst_offset..end))
            .ok_or_else(bad)?;
        to.copy_from_slice(from);
        Ok(CpuCopyDone)
    }

    fn poll(&self, _event: &CpuCopyDone) -> Result<bool, TierMemoryError> {
        Ok(true)
    }

    fn wait(&self, _event: CpuCopyDone) -> Result<(), TierMemoryError> {
        Ok(())
    }

    fn device_bytes<'a>(&self, slot: &'a AlignedBuf, len: usize) -> Option<ExpertBytes<'a>> {
        slot.get(..len).map(ExpertBytes::Host)
    }

    fn device_slot_len(&self, slot: &AlignedBuf) -> usize {
        slot.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tileflow_spdk::DmaArena;

    #[test]
    fn copies_land_at_the_offset_and_bad_ranges_are_errors() {
        let m = CpuTierMemory;
        let (_arena, mut bufs) = DmaArena::new(m.alloc_host(8192).unwrap(), 4096, 2).unwrap();
        let mut src = bufs.remove(0);
        src[..4].copy_from_slice(&[1, 2, 3, 4]);
        let mut slot = m.alloc_device_slot(8192).unwrap();
        let ev = m.copy_to_device(&src, 0..4, &mut slot, 4096).unwrap();
        assert!(m.poll(&ev).unwrap());
        m.wait(ev).unwrap();
        assert_eq!(
            m.device_bytes(&slot, 4100).unwrap().host().unwrap()[4096..],
            [1, 2, 3, 4]
        );
        assert!(m.copy_to_device(&src, 0..4, &mut slot, 8190).is_err());
        assert!(m.copy_to_device(&src, 4000..5000, &mut slot, 0).is_err());
        assert!(m.device_bytes(&slot, 10_000).is_none());
    }
}
