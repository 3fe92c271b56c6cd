//! Block storage: the tile read interface and its backends.
//!
//! The engine's tier cache reads expert extents through [`TileSource`]. This first version has the
//! portable `pread` backend ([`FileSource`]); io_uring, SPDK and cuFile backends come later behind
//! the same trait. [`AlignedBuf`] is the 4 KiB-aligned buffer those backends DMA into.

mod aligned;
mod source;

pub use aligned::{AlignedBuf, AlignedBufError, DMA_ALIGN};
pub use source::{FileSource, StorageError, TileSource};
