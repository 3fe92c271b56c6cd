//! The io_uring backend: `O_DIRECT` reads into registered fixed buffers, reaped on the storage
//! thread.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::dma::DmaArena;
use crate::queue::{Command, QueueFile, ReadCompletion};
use crate::source::StorageError;

/// Sets up a ring of `depth` entries (SQPOLL when asked), registers `arenas` as fixed buffers
/// and starts the storage thread.
pub(crate) fn spawn(
    _files: Arc<Vec<QueueFile>>,
    _depth: u32,
    _sqpoll: bool,
    _arenas: &[DmaArena],
    _rx: Receiver<Command>,
    _done: Sender<ReadCompletion>,
) -> Result<JoinHandle<()>, StorageError> {
    Err(StorageError::Setup {
        backend: "io_uring",
        source: std::io::Error::from(std::io::ErrorKind::Unsupported),
    })
}
