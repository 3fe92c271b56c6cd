//! The read queue: reads of (file, offset, length) into caller-owned [`DmaBuf`]s, submitted from
//! the engine thread and completed by a storage thread that owns the backend.
//!
//! Every backend has the same shape: requests go in over a channel, the storage thread keeps the
//! device busy (demand reads first, prefetch reads only with spare queue depth), and completions
//! come back over a channel with the buffer. io_uring reaps a completion queue, the pread backend
//! runs a small thread pool; an SPDK backend would poll a queue pair on the same thread, and a
//! cuFile backend would take a `DmaBuf` over VRAM.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::aligned::DMA_ALIGN;
use crate::dma::{DmaArena, DmaBuf};
use crate::source::StorageError;

/// Whether a read is needed now or guessed ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Priority {
    /// The forward pass waits for it.
    Demand,
    /// A prefetch: submitted only when demand reads leave queue depth spare.
    Prefetch,
}

/// One read: `len` bytes at `offset` of file `file` into the start of `buf`.
///
/// `offset` must be a multiple of [`DMA_ALIGN`] and `buf` at least `len` rounded up to a whole
/// [`DMA_ALIGN`] block (backends read whole blocks, as `O_DIRECT` requires).
#[derive(Debug)]
pub struct ReadRequest {
    /// Caller's tag, returned in the completion.
    pub tag: u64,
    /// Index of the file in the list given to [`ReadQueue::open`].
    pub file: usize,
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes wanted.
    pub len: usize,
    /// Where they go; handed back in the completion.
    pub buf: DmaBuf,
    /// Demand or prefetch.
    pub priority: Priority,
}

/// The end of one read.
#[derive(Debug)]
pub struct ReadCompletion {
    /// The request's tag.
    pub tag: u64,
    /// The request's buffer: on success its first `len` bytes hold the data.
    pub buf: DmaBuf,
    /// The request's priority.
    pub priority: Priority,
    /// Success, or what failed (naming the file, offset and length).
    pub result: Result<(), StorageError>,
}

/// The storage backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoBackend {
    /// io_uring with `O_DIRECT` and registered fixed buffers.
    IoUring,
    /// A thread pool calling `pread(2)`.
    Pread,
}

impl IoBackend {
    /// The name used in config, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            IoBackend::IoUring => "io_uring",
            IoBackend::Pread => "pread",
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring when the kernel allows it, else pread.
    #[default]
    Auto,
    /// io_uring or fail.
    IoUring,
    /// pread.
    Pread,
}

/// Most reads a queue keeps in flight (io_uring's ring is sized by the queue depth); deeper
/// settings are refused by the config and clamped by the backends.
pub const MAX_QUEUE_DEPTH: u32 = 4096;

/// How to open a [`ReadQueue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoConfig {
    /// Backend.
    pub backend: BackendChoice,
    /// Reads in flight at most (io_uring's ring size; the pread pool's thread count).
    pub queue_depth: u32,
    /// io_uring: let a kernel thread poll the submission queue (`IORING_SETUP_SQPOLL`).
    pub sqpoll: bool,
    /// Open files with `O_DIRECT` (bypassing the page cache); falls back to buffered reads on
    /// filesystems that refuse it (tmpfs), which [`ReadQueue::direct`] reports.
    pub direct: bool,
}

impl Default for IoConfig {
    fn default() -> IoConfig {
        IoConfig {
            backend: BackendChoice::Auto,
            queue_depth: 32,
            sqpoll: false,
            direct: true,
        }
    }
}

/// A file the queue reads: opened once, with its length at open time.
#[derive(Debug)]
pub(crate) struct QueueFile {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    pub(crate) len: u64,
    /// Opened with `O_DIRECT`: reads must stay in whole blocks.
    pub(crate) direct: bool,
}

/// What a storage thread receives.
pub(crate) enum Command {
    Read(ReadRequest),
}

/// The handle the engine thread owns: submit reads, collect completions.
pub struct ReadQueue {
    backend: IoBackend,
    direct: bool,
    files: Arc<Vec<QueueFile>>,
    tx: Option<Sender<Command>>,
    done: Receiver<ReadCompletion>,
    failed_tx: Sender<ReadCompletion>,
    in_flight: AtomicUsize,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for ReadQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadQueue")
            .field("backend", &self.backend)
            .field("direct", &self.direct)
            .field("files", &self.files.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl ReadQueue {
    /// Opens `files` read-only and starts a storage thread for the chosen backend. `arenas` are
    /// registered with the backend where it supports that (io_uring fixed buffers); buffers of
    /// other arenas still work, through unregistered reads.
    pub fn open(
        config: &IoConfig,
        files: &[&Path],
        arenas: &[DmaArena],
    ) -> Result<ReadQueue, StorageError> {
        let (opened, direct) = open_files(files, config.direct)?;
        let files = Arc::new(opened);
        let (tx, rx) = crossbeam_channel::unbounded();
        let (done_tx, done) = crossbeam_channel::unbounded();
        let failed_tx = done_tx.clone();
        let depth = config.queue_depth.max(1);
        let (backend, thread) = match config.backend {
            BackendChoice::Pread => (
                IoBackend::Pread,
                crate::pread::spawn(files.clone(), depth, rx, done_tx)?,
            ),
            BackendChoice::IoUring => (
                IoBackend::IoUring,
                crate::uring::spawn(files.clone(), depth, config.sqpoll, arenas, rx, done_tx)?,
            ),
            BackendChoice::Auto => {
                match crate::uring::spawn(
                    files.clone(),
                    depth,
                    config.sqpoll,
                    arenas,
                    rx.clone(),
                    done_tx.clone(),
                ) {
                    Ok(t) => (IoBackend::IoUring, t),
                    Err(e) => {
                        // Falling back is what Auto means, so this is not a warning: one-shot
                        // commands (`tilectl run`) keep their stderr for their own errors.
                        tracing::info!(
                            error = %crate::error_chain(&e),
                            "io_uring is unavailable; reading tiles with the pread thread pool"
                        );
                        (
                            IoBackend::Pread,
                            crate::pread::spawn(files.clone(), depth, rx, done_tx)?,
                        )
                    }
                }
            }
        };
        Ok(ReadQueue {
            backend,
            direct,
            files,
            tx: Some(tx),
            done,
            failed_tx,
            in_flight: AtomicUsize::new(0),
            thread: Some(thread),
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> IoBackend {
        self.backend
    }

    /// Whether the files were opened with `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Length of file `file` when it was opened (0 for an unknown index).
    pub fn file_len(&self, file: usize) -> u64 {
        self.files.get(file).map_or(0, |f| f.len)
    }

    /// Path of file `file`.
    pub fn path(&self, file: usize) -> Option<&Path> {
        self.files.get(file).map(|f| f.path.as_path())
    }

    /// Reads submitted and not yet collected.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Queues a read. A request that cannot be started (bad file index, misaligned offset, buffer
    /// too small, range past the end of the file, storage thread gone) comes back at once as a
    /// failed completion through [`ReadQueue::wait`], so the caller has one path for failures.
    pub fn submit(&self, req: ReadRequest) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let req = match check(&self.files, req) {
            Ok(req) => req,
            Err(failed) => {
                self.fail_now(failed);
                return;
            }
        };
        let Some(tx) = &self.tx else { return };
        if let Err(e) = tx.send(Command::Read(req)) {
            let Command::Read(req) = e.0;
            let path = self.path(req.file).unwrap_or(Path::new("")).to_path_buf();
            let err = StorageError::QueueClosed { path };
            self.fail_now(ReadCompletion {
                tag: req.tag,
                buf: req.buf,
                priority: req.priority,
                result: Err(err),
            });
        }
    }

    /// Delivers a completion for a request that never reached the storage thread.
    fn fail_now(&self, failed: ReadCompletion) {
        // `done` is ours and still open, so this cannot fail.
        let _ = self.failed_tx.send(failed);
    }

    /// A finished read if one is ready, without blocking.
    pub fn try_complete(&self) -> Option<ReadCompletion> {
        let c = self.done.try_recv().ok()?;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        Some(c)
    }

    /// The next finished read, blocking until one arrives; `None` when nothing is in flight.
    pub fn wait(&self) -> Option<ReadCompletion> {
        if self.in_flight() == 0 {
            return None;
        }
        let c = self.done.recv().ok()?;
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        Some(c)
    }
}

impl Drop for ReadQueue {
    fn drop(&mut self) {
        // Closing the channel tells the storage thread to finish what it holds and exit.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Opens every file read-only, with `O_DIRECT` when asked and the filesystem allows it.
fn open_files(paths: &[&Path], direct: bool) -> Result<(Vec<QueueFile>, bool), StorageError> {
    let mut use_direct = direct;
    let mut out = Vec::with_capacity(paths.len());
    for &path in paths {
        let (file, d) = crate::direct::open_read(path, use_direct)?;
        if use_direct && !d {
            tracing::warn!(
                path = %path.display(),
                "the filesystem refuses O_DIRECT; reading tiles through the page cache"
            );
        }
        use_direct &= d;
        let meta = file.metadata().map_err(|source| StorageError::Stat {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(StorageError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        out.push(QueueFile {
            file,
            path: path.to_path_buf(),
            len: meta.len(),
            direct: d,
        });
    }
    Ok((out, use_direct))
}

/// Validates a request before it reaches a backend.
fn check(files: &[QueueFile], req: ReadRequest) -> Result<ReadRequest, ReadCompletion> {
    let fail = |req: ReadRequest, err: StorageError| ReadCompletion {
        tag: req.tag,
        buf: req.buf,
        priority: req.priority,
        result: Err(err),
    };
    let Some(f) = files.get(req.file) else {
        let err = StorageError::BadRequest {
            path: PathBuf::new(),
            offset: req.offset,
            len: req.len as u64,
            reason: format!("no file {} in the queue", req.file),
        };
        return Err(fail(req, err));
    };
    let blocks = req.len.div_ceil(DMA_ALIGN) * DMA_ALIGN;
    let reason = if !req.offset.is_multiple_of(DMA_ALIGN as u64) {
        Some(format!("the offset is not a multiple of {DMA_ALIGN}"))
    } else if req.buf.len() < blocks {
        Some(format!(
            "the buffer has {} bytes, fewer than the {blocks} whole blocks needed",
            req.buf.len()
        ))
    } else {
        None
    };
    if let Some(reason) = reason {
        let err = StorageError::BadRequest {
            path: f.path.clone(),
            offset: req.offset,
            len: req.len as u64,
            reason,
        };
        return Err(fail(req, err));
    }
    match req.offset.checked_add(req.len as u64) {
        Some(end) if end <= f.len => Ok(req),
        _ => {
            let err = StorageError::ShortFile {
                path: f.path.clone(),
                offset: req.offset,
                len: req.len as u64,
                file_len: f.len,
            };
            Err(fail(req, err))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::LockedBuf;
    use std::io::Write;

    #[test]
    fn pread_queue_reads_into_arena_buffers() {
        let data: Vec<u8> = (0..5 * DMA_ALIGN).map(|i| (i * 13 % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        let (arena, bufs) = DmaArena::new(
            Box::new(LockedBuf::new(4 * DMA_ALIGN).unwrap()),
            2 * DMA_ALIGN,
            2,
        )
        .unwrap();
        let config = IoConfig {
            backend: BackendChoice::Pread,
            ..IoConfig::default()
        };
        let q = ReadQueue::open(&config, &[f.path()], &[arena]).unwrap();
        assert_eq!(q.backend(), IoBackend::Pread);
        for (i, buf) in bufs.into_iter().enumerate() {
            q.submit(ReadRequest {
                tag: i as u64,
                file: 0,
                offset: (i * 3 * DMA_ALIGN) as u64,
                len: 2 * DMA_ALIGN - 7,
                buf,
                priority: Priority::Demand,
            });
        }
        let mut got = Vec::new();
        while let Some(c) = q.wait() {
            c.result.as_ref().unwrap();
            got.push(c);
        }
        assert_eq!(got.len(), 2);
        for c in got {
            let off = c.tag as usize * 3 * DMA_ALIGN;
            assert_eq!(
                &c.buf[..2 * DMA_ALIGN - 7],
                &data[off..off + 2 * DMA_ALIGN - 7]
            );
        }
    }
}
