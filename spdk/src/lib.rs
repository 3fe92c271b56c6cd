//! Block storage: the tile read interface and its backends.
//!
//! The engine's tiers read expert extents through a [`ReadQueue`]: reads of (file, offset, length)
//! into [`DmaBuf`]s carved from pre-registered [`DmaArena`]s, completed on a storage thread by the
//! io_uring backend (`O_DIRECT`, fixed buffers) or the pread thread pool. [`TileSource`] is the
//! simple synchronous interface kept for import and tools; [`AlignedBuf`] the aligned heap buffer.

mod aligned;
pub mod direct;
mod dma;
mod pread;
mod queue;
mod source;
mod uring;

pub use aligned::{AlignedBuf, AlignedBufError, DMA_ALIGN};
pub use dma::{DmaArena, DmaBuf, DmaError, DmaMemory, LockedBuf};
pub use queue::{
    BackendChoice, IoBackend, IoConfig, Priority, ReadCompletion, ReadQueue, ReadRequest,
    MAX_QUEUE_DEPTH,
};
pub use source::{FileSource, StorageError, TileSource};

/// `err` and its sources, joined by ": ": how errors are printed and logged.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}
