//! The io_uring backend: `O_DIRECT` reads into registered fixed buffers, reaped on the storage
//! thread.
//!
//! The ring, its registrations and every request from submission to completion live only on the
//! storage thread. A request is held in the in-flight table (which owns its [`DmaBuf`]) from the
//! moment its SQE is pushed until its last CQE is reaped, so the kernel never writes into a buffer
//! the engine can see. Buffers of the arenas given at open are read with `READ_FIXED` (no page
//! pinning per read); buffers of other arenas with a plain `READ`.
//!
//! Errors: a short read continues at the advanced offset (in whole blocks for `O_DIRECT` files);
//! end of file before the requested length is [`StorageError::ShortFile`] with the file's length
//! at that moment; `EINTR`/`EAGAIN` resubmit; any other errno (`EIO` from a failing device, say:
//! not reproducible without faulty hardware, handled by the same path) is [`StorageError::Read`]
//! for that request only.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use io_uring::{opcode, squeue, types, IoUring, Probe};

use crate::aligned::DMA_ALIGN;
use crate::dma::DmaArena;
use crate::queue::{Command, Priority, QueueFile, ReadCompletion, ReadRequest};
use crate::source::StorageError;

/// The kernel's limit on one registered buffer; arenas are registered in pieces of this size.
const MAX_IOVEC: usize = 1 << 30;
/// Bytes one SQE reads at most (its length is a `u32`); longer requests continue like short reads.
const MAX_SQE_LEN: usize = 1 << 30;
/// How long the SQPOLL kernel thread spins without work before it sleeps.
const SQPOLL_IDLE_MS: u32 = 1000;

/// Sets up a ring of `depth` entries (SQPOLL when asked), registers `arenas` as fixed buffers
/// and starts the storage thread.
pub(crate) fn spawn(
    files: Arc<Vec<QueueFile>>,
    depth: u32,
    sqpoll: bool,
    arenas: &[DmaArena],
    rx: Receiver<Command>,
    done: Sender<ReadCompletion>,
) -> Result<JoinHandle<()>, StorageError> {
    let setup = |source: io::Error| StorageError::Setup {
        backend: "io_uring",
        source,
    };
    let depth = depth.clamp(1, crate::queue::MAX_QUEUE_DEPTH);
    let ring = build_ring(depth, sqpoll).map_err(setup)?;
    check_opcodes(&ring).map_err(setup)?;
    let fixed_files = register_files(&ring, &files);
    let regs = register_arenas(&ring, arenas);
    let depth = depth as usize;
    let storage = Storage {
        ring,
        regs,
        files,
        fixed_files,
        ops: (0..depth).map(|_| None).collect(),
        free: (0..depth).rev().collect(),
        demand: VecDeque::new(),
        prefetch: VecDeque::new(),
        retry: VecDeque::new(),
        in_ring: 0,
        prefetch_started: 0,
        max_prefetch: (depth / 2).max(1),
        done,
        reaped: Vec::with_capacity(2 * depth),
    };
    std::thread::Builder::new()
        .name("tileflow-uring".into())
        .spawn(move || storage.run(&rx))
        .map_err(setup)
}

/// A ring with SQPOLL when asked and allowed, else a plain one.
fn build_ring(depth: u32, sqpoll: bool) -> io::Result<IoUring> {
    if sqpoll {
        match IoUring::builder().setup_sqpoll(SQPOLL_IDLE_MS).build(depth) {
            Ok(ring) => return Ok(ring),
            Err(e) => tracing::warn!(
                error = %e,
                "io_uring SQPOLL setup failed; using a ring without a polling thread"
            ),
        }
    }
    IoUring::new(depth)
}

/// Fails when the kernel's ring lacks the read opcodes (kernels before 5.6), so `Auto` falls back.
fn check_opcodes(ring: &IoUring) -> io::Result<()> {
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    if probe.is_supported(opcode::Read::CODE) && probe.is_supported(opcode::ReadFixed::CODE) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "the kernel's io_uring has no READ / READ_FIXED",
        ))
    }
}

/// Registers the queue's files; reads use plain descriptors when that fails.
fn register_files(ring: &IoUring, files: &[QueueFile]) -> bool {
    let fds: Vec<_> = files.iter().map(|f| f.file.as_raw_fd()).collect();
    if fds.is_empty() {
        return false;
    }
    match ring.submitter().register_files(&fds) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "cannot register files with io_uring; using descriptors");
            false
        }
    }
}

/// One arena registered as fixed buffers `base_index..`, one per [`MAX_IOVEC`] piece.
struct Registration {
    /// Keeps the memory alive for the ring's life (buffers may be dropped by the engine).
    arena: DmaArena,
    base_index: u16,
    base: usize,
    len: usize,
}

/// Registers `arenas` as fixed buffers; on failure (memlock limit, say) reads of their buffers use
/// plain `READ`, which works as well, only pinning pages per read.
fn register_arenas(ring: &IoUring, arenas: &[DmaArena]) -> Vec<Registration> {
    // The kernel's IORING_MAX_REG_BUFFERS.
    const MAX_BUFFERS: usize = 1 << 14;
    let mut iovecs = Vec::new();
    let mut regs: Vec<Registration> = Vec::new();
    for arena in arenas {
        let (ptr, len) = arena.raw_parts();
        if len == 0 || regs.iter().any(|r| r.arena.id() == arena.id()) {
            continue;
        }
        let pieces = len.div_ceil(MAX_IOVEC);
        let Ok(base_index) = u16::try_from(iovecs.len()) else {
            break;
        };
        if iovecs.len() + pieces > MAX_BUFFERS {
            tracing::warn!(
                arena = arena.id(),
                "too many io_uring fixed buffers; this arena's reads are unregistered"
            );
            continue;
        }
        for i in 0..pieces {
            let start = i * MAX_IOVEC;
            iovecs.push(libc::iovec {
                iov_base: ptr.wrapping_add(start).cast(),
                iov_len: (len - start).min(MAX_IOVEC),
            });
        }
        regs.push(Registration {
            arena: arena.clone(),
            base_index,
            base: ptr as usize,
            len,
        });
    }
    if iovecs.is_empty() {
        return regs;
    }
    // SAFETY: every iovec lies inside an arena's memory (`raw_parts`), which stays allocated while
    // the `DmaArena` clone in `regs` lives; `regs` is stored beside the ring in `Storage`, declared
    // after it, so the ring (and with it the registration) is dropped first. The kernel only
    // writes into this memory for READ_FIXED requests whose buffer the in-flight table owns.
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => regs,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot register DMA arenas with io_uring; reading into them unregistered"
            );
            Vec::new()
        }
    }
}

/// A request taken by the storage thread: in the ring, or waiting in `retry` to continue.
struct Op {
    req: ReadRequest,
    /// Bytes already read into the start of the buffer.
    done: usize,
}

/// The storage thread's state. Field order matters: the ring drops before `regs` (which keep the
/// registered arenas alive) and before `ops` (which own the buffers of requests in flight; the
/// run loop returns only when none is left, so this is a second line of defence).
struct Storage {
    ring: IoUring,
    regs: Vec<Registration>,
    files: Arc<Vec<QueueFile>>,
    fixed_files: bool,
    /// The in-flight table: slot `i` is the request whose SQEs carry `user_data == i`.
    ops: Vec<Option<Op>>,
    free: Vec<usize>,
    demand: VecDeque<ReadRequest>,
    prefetch: VecDeque<ReadRequest>,
    /// Slots whose request continues (short read, `EINTR`); they go before new requests.
    retry: VecDeque<usize>,
    /// SQEs pushed and not reaped.
    in_ring: usize,
    /// Prefetch requests taken and not finished.
    prefetch_started: usize,
    max_prefetch: usize,
    done: Sender<ReadCompletion>,
    /// Scratch for (user_data, result) of reaped CQEs.
    reaped: Vec<(u64, i32)>,
}

impl Storage {
    fn run(mut self, rx: &Receiver<Command>) {
        let mut open = true;
        loop {
            if open {
                if self.in_ring == 0 && self.queued() == 0 {
                    match rx.recv() {
                        Ok(cmd) => self.enqueue(cmd),
                        Err(_) => open = false,
                    }
                }
                loop {
                    match rx.try_recv() {
                        Ok(cmd) => self.enqueue(cmd),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    }
                }
            }
            if !open {
                self.fail_queued();
            }
            self.start_ready();
            if self.in_ring == 0 {
                if open {
                    continue;
                }
                break;
            }
            let more_waiting = open && !rx.is_empty();
            self.submit(usize::from(!more_waiting));
            self.reap();
        }
    }

    /// Requests received and not yet taken.
    fn queued(&self) -> usize {
        self.demand.len() + self.prefetch.len() + self.retry.len()
    }

    fn enqueue(&mut self, Command::Read(req): Command) {
        match req.priority {
            Priority::Demand => self.demand.push_back(req),
            Priority::Prefetch => self.prefetch.push_back(req),
        }
    }

    /// The queue is closing: requests not yet taken complete with `QueueClosed`.
    fn fail_queued(&mut self) {
        for req in self.demand.drain(..).chain(self.prefetch.drain(..)) {
            let path = self.files.get(req.file).map(|f| f.path.clone());
            let _ = self.done.send(ReadCompletion {
                tag: req.tag,
                buf: req.buf,
                priority: req.priority,
                result: Err(StorageError::QueueClosed {
                    path: path.unwrap_or_default(),
                }),
            });
        }
    }

    /// Pushes SQEs while slots are free: continuations, then demand, then prefetch within its share.
    fn start_ready(&mut self) {
        while let Some(slot) = self.retry.pop_front() {
            self.push(slot);
        }
        while !self.free.is_empty() {
            let req = if let Some(r) = self.demand.pop_front() {
                r
            } else if self.prefetch_started < self.max_prefetch {
                match self.prefetch.pop_front() {
                    Some(r) => {
                        self.prefetch_started += 1;
                        r
                    }
                    None => break,
                }
            } else {
                break;
            };
            let Some(slot) = self.free.pop() else { break };
            self.ops[slot] = Some(Op { req, done: 0 });
            self.push(slot);
        }
    }

    /// Pushes the next SQE of the request in `slot`.
    fn push(&mut self, slot: usize) {
        let Some(op) = self.ops.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(f) = self.files.get(op.req.file) else {
            return self.finish(slot, Err(io::ErrorKind::NotFound.into()));
        };
        // `ReadQueue::submit` checked that the buffer holds `len` rounded up to whole blocks.
        let blocks = (op.req.len.div_ceil(DMA_ALIGN) * DMA_ALIGN).min(op.req.buf.len());
        let mut n = (blocks - op.done).min(MAX_SQE_LEN);
        let arena = op.req.buf.arena_id();
        let ptr = op.req.buf.as_mut_ptr().wrapping_add(op.done);
        let offset = op.req.offset + op.done as u64;
        let fixed_buf = fixed_index(&self.regs, arena, ptr, &mut n);
        let len = u32::try_from(n).unwrap_or(u32::MAX);
        let fd = f.file.as_raw_fd();
        let file_index = u32::try_from(op.req.file).unwrap_or(u32::MAX);
        let entry: squeue::Entry = match (self.fixed_files, fixed_buf) {
            (true, Some(index)) => {
                opcode::ReadFixed::new(types::Fixed(file_index), ptr, len, index)
                    .offset(offset)
                    .build()
            }
            (false, Some(index)) => opcode::ReadFixed::new(types::Fd(fd), ptr, len, index)
                .offset(offset)
                .build(),
            (true, None) => opcode::Read::new(types::Fixed(file_index), ptr, len)
                .offset(offset)
                .build(),
            (false, None) => opcode::Read::new(types::Fd(fd), ptr, len)
                .offset(offset)
                .build(),
        };
        let entry = entry.user_data(slot as u64);
        for attempt in 0..2 {
            // SAFETY: the SQE points at `len` bytes starting `done` bytes into the request's
            // buffer; `len <= blocks - done <= buf.len() - done`, so the range is inside the
            // buffer. The buffer (a `DmaBuf`, which holds an Arc on its arena's memory) stays in
            // `self.ops[slot]` until this SQE's CQE is reaped (`finish` is only called from
            // `on_cqe` for a pushed slot, or below when the push failed), and the run loop does
            // not return while `in_ring > 0`, so the memory outlives the kernel's write. For a
            // READ_FIXED entry `index` names the registered piece containing the whole range
            // (`fixed_index` capped `n` at the piece's end).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_ring += 1;
                return;
            }
            if attempt == 0 {
                // The queue holds at most one SQE per slot, so this is only the SQPOLL thread
                // lagging; submitting makes room.
                let _ = self.ring.submit();
            }
        }
        self.finish(
            slot,
            Err(io::Error::other("the io_uring submission queue is full")),
        );
    }

    /// Submits pushed SQEs and waits for `wait` completions.
    fn submit(&mut self, wait: usize) {
        loop {
            match self.ring.submit_and_wait(wait) {
                Ok(_) => return,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY)) => {
                    // Completions are backed up: reaping them makes room.
                    if !self.ring.completion().is_empty() {
                        return;
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; retrying");
                    std::thread::sleep(Duration::from_millis(1));
                    return;
                }
            }
        }
    }

    fn reap(&mut self) {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(user_data, res) in &reaped {
            self.on_cqe(user_data, res);
        }
        reaped.clear();
        self.reaped = reaped;
    }

    fn on_cqe(&mut self, user_data: u64, res: i32) {
        let slot = usize::try_from(user_data).unwrap_or(usize::MAX);
        let Some(op) = self.ops.get(slot).and_then(Option::as_ref) else {
            tracing::error!(user_data, "io_uring completion for no request");
            return;
        };
        let (done, len, file) = (op.done, op.req.len, op.req.file);
        self.in_ring -= 1;
        if res < 0 {
            let errno = -res;
            if errno == libc::EINTR || errno == libc::EAGAIN {
                self.retry.push_back(slot);
                return;
            }
            return self.finish(slot, Err(io::Error::from_raw_os_error(errno)));
        }
        let n = res.unsigned_abs() as usize;
        if done + n >= len {
            return self.finish(slot, Ok(()));
        }
        // Short: continue after what arrived. O_DIRECT needs whole blocks; a read that ends
        // inside a block ended at end of file, which the next read confirms with 0 bytes.
        let direct = self.files.get(file).is_some_and(|f| f.direct);
        let advance = if direct { n / DMA_ALIGN * DMA_ALIGN } else { n };
        if advance == 0 {
            return self.short_file(slot);
        }
        if let Some(op) = self.ops.get_mut(slot).and_then(Option::as_mut) {
            op.done += advance;
        }
        self.retry.push_back(slot);
    }

    /// Completes the request in `slot` with `ShortFile`, naming the file's current length.
    fn short_file(&mut self, slot: usize) {
        let Some(op) = self.ops.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let req = &op.req;
        let err = match self.files.get(req.file) {
            Some(f) => StorageError::ShortFile {
                path: f.path.clone(),
                offset: req.offset,
                len: req.len as u64,
                file_len: f
                    .file
                    .metadata()
                    .map_or(req.offset + op.done as u64, |m| m.len()),
            },
            None => StorageError::QueueClosed {
                path: Default::default(),
            },
        };
        self.complete(slot, op, Err(err));
    }

    /// Completes the request in `slot`: success, or the OS error of its read.
    fn finish(&mut self, slot: usize, result: io::Result<()>) {
        let Some(op) = self.ops.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let result = result.map_err(|source| StorageError::Read {
            path: self
                .files
                .get(op.req.file)
                .map(|f| f.path.clone())
                .unwrap_or_default(),
            offset: op.req.offset,
            len: op.req.len as u64,
            source,
        });
        self.complete(slot, op, result);
    }

    fn complete(&mut self, slot: usize, op: Op, result: Result<(), StorageError>) {
        self.free.push(slot);
        if op.req.priority == Priority::Prefetch {
            self.prefetch_started -= 1;
        }
        let _ = self.done.send(ReadCompletion {
            tag: op.req.tag,
            buf: op.req.buf,
            priority: op.req.priority,
            result,
        });
    }
}

/// The fixed-buffer index for a read of `*n` bytes at `ptr` into arena `arena`, capping `*n` at
/// the end of the registered piece holding `ptr`; `None` when the arena is not registered.
fn fixed_index(regs: &[Registration], arena: u64, ptr: *mut u8, n: &mut usize) -> Option<u16> {
    let reg = regs.iter().find(|r| r.arena.id() == arena)?;
    let rel = (ptr as usize).checked_sub(reg.base)?;
    if rel >= reg.len {
        return None;
    }
    let piece = rel / MAX_IOVEC;
    let piece_end = ((piece + 1) * MAX_IOVEC).min(reg.len);
    *n = (*n).min(piece_end - rel);
    reg.base_index.checked_add(u16::try_from(piece).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma::LockedBuf;

    #[test]
    fn fixed_index_finds_the_piece_and_caps_the_length_at_its_end() {
        let (arena, _bufs) =
            DmaArena::new(Box::new(LockedBuf::new(DMA_ALIGN).unwrap()), DMA_ALIGN, 1).unwrap();
        let id = arena.id();
        // A pretend 2.5 GiB registration at a made-up address: only the arithmetic is tested.
        let base = 1usize << 40;
        let regs = [Registration {
            arena,
            base_index: 3,
            base,
            len: 5 * (MAX_IOVEC / 2),
        }];
        let at = |rel: usize| (base + rel) as *mut u8;
        let mut n = 8192;
        assert_eq!(fixed_index(&regs, id, at(0), &mut n), Some(3));
        assert_eq!(n, 8192);
        let mut n = 1 << 20;
        assert_eq!(
            fixed_index(&regs, id, at(MAX_IOVEC - 4096), &mut n),
            Some(3)
        );
        assert_eq!(n, 4096);
        let mut n = MAX_IOVEC;
        assert_eq!(
            fixed_index(&regs, id, at(2 * MAX_IOVEC + 4096), &mut n),
            Some(5)
        );
        assert_eq!(n, MAX_IOVEC / 2 - 4096);
        let mut n = 4096;
        assert_eq!(
            fixed_index(&regs, id, at(5 * (MAX_IOVEC / 2)), &mut n),
            None
        );
        assert_eq!(fixed_index(&regs, id + 1000, at(0), &mut n), None);
        assert_eq!(
            fixed_index(&regs, id, (base - 4096) as *mut u8, &mut n),
            None
        );
    }
}
