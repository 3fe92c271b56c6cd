//! The pread backend: a pool of threads calling `pread(2)`, demand reads first.
//!
//! Used when io_uring is unavailable (old kernels, seccomp policies that forbid it) or chosen.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::aligned::DMA_ALIGN;
use crate::direct::read_full;
use crate::queue::{Command, Priority, QueueFile, ReadCompletion, ReadRequest};
use crate::source::StorageError;

#[derive(Default)]
struct Pending {
    demand: VecDeque<ReadRequest>,
    prefetch: VecDeque<ReadRequest>,
    prefetch_running: usize,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    ready: Condvar,
    max_prefetch: usize,
}

impl Shared {
    /// The next request a worker should run: demand first, prefetch while under its share.
    fn next(&self) -> Option<ReadRequest> {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = p.demand.pop_front() {
                return Some(r);
            }
            if p.prefetch_running < self.max_prefetch {
                if let Some(r) = p.prefetch.pop_front() {
                    p.prefetch_running += 1;
                    return Some(r);
                }
            }
            if p.closed && p.demand.is_empty() && p.prefetch.is_empty() {
                return None;
            }
            p = self.ready.wait(p).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn finished(&self, priority: Priority) {
        if priority == Priority::Prefetch {
            let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            p.prefetch_running -= 1;
            drop(p);
            self.ready.notify_all();
        }
    }
}

/// Starts the dispatcher thread, which starts `depth` workers.
pub(crate) fn spawn(
    files: Arc<Vec<QueueFile>>,
    depth: u32,
    rx: Receiver<Command>,
    done: Sender<ReadCompletion>,
) -> Result<JoinHandle<()>, StorageError> {
    let threads = depth.clamp(1, 64) as usize;
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        ready: Condvar::new(),
        max_prefetch: (threads / 2).max(1),
    });
    let mut workers = Vec::with_capacity(threads);
    for i in 0..threads {
        let (shared, files, done) = (shared.clone(), files.clone(), done.clone());
        let w = std::thread::Builder::new()
            .name(format!("tileflow-pread-{i}"))
            .spawn(move || worker(&shared, &files, &done))
            .map_err(|source| StorageError::Setup {
                backend: "pread",
                source,
            })?;
        workers.push(w);
    }
    std::thread::Builder::new()
        .name("tileflow-storage".into())
        .spawn(move || {
            for Command::Read(req) in rx.iter() {
                let mut p = shared
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match req.priority {
                    Priority::Demand => p.demand.push_back(req),
                    Priority::Prefetch => p.prefetch.push_back(req),
                }
                drop(p);
                shared.ready.notify_one();
            }
            shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .closed = true;
            shared.ready.notify_all();
            for w in workers {
                let _ = w.join();
            }
        })
        .map_err(|source| StorageError::Setup {
            backend: "pread",
            source,
        })
}

fn worker(shared: &Shared, files: &[QueueFile], done: &Sender<ReadCompletion>) {
    while let Some(mut req) = shared.next() {
        let f = &files[req.file];
        let blocks = (req.len.div_ceil(DMA_ALIGN) * DMA_ALIGN).min(req.buf.len());
        let result = read_full(
            &f.file,
            &f.path,
            req.offset,
            &mut req.buf[..blocks],
            req.len,
        );
        shared.finished(req.priority);
        let _ = done.send(ReadCompletion {
            tag: req.tag,
            buf: req.buf,
            priority: req.priority,
            result,
        });
    }
}
