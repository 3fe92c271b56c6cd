//! The read queue against real files, for both backends: data compared byte for byte with the
//! file, failures completing only their own request, and shutdown with reads in flight.
//!
//! `EIO` needs a failing device, so the error path for other errnos is not exercised here; it is
//! the same code path as any negative completion (see `uring.rs`).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use tileflow_spdk::{
    BackendChoice, DmaArena, DmaBuf, IoBackend, IoConfig, LockedBuf, Priority, ReadQueue,
    ReadRequest, StorageError, DMA_ALIGN,
};

const BACKENDS: [BackendChoice; 2] = [BackendChoice::IoUring, BackendChoice::Pread];

/// Deterministic bytes (xorshift), so failures reproduce.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A file of `len` pseudo-random bytes in `dir` (the target dir: a disk filesystem, so `O_DIRECT`
/// works where the host allows it).
fn data_file(dir: &Path, len: usize, seed: u64) -> (tempfile::NamedTempFile, Vec<u8>) {
    let data = pseudo_random(len, seed);
    let mut f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    (f, data)
}

fn target_dir() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

fn arena(piece: usize, count: usize) -> (DmaArena, Vec<DmaBuf>) {
    let mem = LockedBuf::new(piece * count).unwrap();
    DmaArena::new(Box::new(mem), piece, count).unwrap()
}

fn config(backend: BackendChoice, depth: u32) -> IoConfig {
    IoConfig {
        backend,
        queue_depth: depth,
        ..IoConfig::default()
    }
}

fn expected_backend(choice: BackendChoice) -> IoBackend {
    match choice {
        BackendChoice::Pread => IoBackend::Pread,
        _ => IoBackend::IoUring,
    }
}

/// Many reads of random extents (aligned offsets, odd lengths, some ending at end of file) with
/// mixed priorities, into buffers of a registered and an unregistered arena.
fn random_reads(backend: BackendChoice, depth: u32, sqpoll: bool) {
    const PIECE: usize = 64 * DMA_ALIGN;
    let file_len = 64 * PIECE + 1234;
    let (file, data) = data_file(target_dir(), file_len, u64::from(depth) * 7 + 1);
    let (registered, mut bufs) = arena(PIECE, 6);
    let (_unregistered, others) = arena(PIECE, 6);
    bufs.extend(others);
    let cfg = IoConfig {
        sqpoll,
        ..config(backend, depth)
    };
    let q = ReadQueue::open(&cfg, &[file.path()], &[registered]).unwrap();
    assert_eq!(q.backend(), expected_backend(backend));

    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 16) as usize
    };
    let mut asked: HashMap<u64, (u64, usize)> = HashMap::new();
    let mut checked = 0;
    let blocks = file_len.div_ceil(DMA_ALIGN);
    let mut check = |c: tileflow_spdk::ReadCompletion, asked: &mut HashMap<u64, (u64, usize)>| {
        let (off, len) = asked.remove(&c.tag).unwrap();
        c.result.unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
        let off = off as usize;
        assert_eq!(&c.buf[..len], &data[off..off + len], "read {off}+{len}");
        checked += 1;
        c.buf
    };
    for tag in 0..400u64 {
        let buf = match bufs.pop() {
            Some(b) => b,
            None => check(q.wait().unwrap(), &mut asked),
        };
        let off = (next() % blocks) * DMA_ALIGN;
        let max = (file_len - off).min(PIECE);
        // Every tenth read runs to the end of the file (or the buffer), the rest are odd lengths.
        let len = if tag % 10 == 0 {
            max
        } else {
            (next() % max).max(1) | 1
        };
        let priority = if tag % 3 == 0 {
            Priority::Prefetch
        } else {
            Priority::Demand
        };
        asked.insert(tag, (off as u64, len));
        q.submit(ReadRequest {
            tag,
            file: 0,
            offset: off as u64,
            len,
            buf,
            priority,
        });
    }
    while let Some(c) = q.wait() {
        check(c, &mut asked);
    }
    assert!(asked.is_empty());
    assert_eq!(checked, 400);
}

#[test]
fn random_extents_match_the_file_for_every_backend_and_depth() {
    for backend in BACKENDS {
        for depth in [1, 4, 32] {
            random_reads(backend, depth, false);
        }
    }
}

#[test]
fn io_uring_with_sqpoll_reads_correctly() {
    random_reads(BackendChoice::IoUring, 8, true);
}

#[test]
fn auto_chooses_io_uring_here() {
    let (file, _) = data_file(target_dir(), DMA_ALIGN, 1);
    let q = ReadQueue::open(&IoConfig::default(), &[file.path()], &[]).unwrap();
    assert_eq!(q.backend(), IoBackend::IoUring);
}

fn read_one(q: &ReadQueue, tag: u64, file: usize, offset: u64, len: usize, buf: DmaBuf) {
    q.submit(ReadRequest {
        tag,
        file,
        offset,
        len,
        buf,
        priority: Priority::Demand,
    });
}

fn collect(q: &ReadQueue) -> HashMap<u64, tileflow_spdk::ReadCompletion> {
    let mut out = HashMap::new();
    while let Some(c) = q.wait() {
        out.insert(c.tag, c);
    }
    out
}

#[test]
fn a_file_truncated_after_open_fails_only_the_reads_past_its_new_end() {
    for backend in BACKENDS {
        let (file, data) = data_file(target_dir(), 64 * DMA_ALIGN, 5);
        let (registered, mut bufs) = arena(4 * DMA_ALIGN, 4);
        let q = ReadQueue::open(&config(backend, 4), &[file.path()], &[registered]).unwrap();
        let new_len = 8 * DMA_ALIGN as u64 + 100;
        file.as_file().set_len(new_len).unwrap();
        let ok_len = 3 * DMA_ALIGN + 5;
        read_one(&q, 0, 0, 0, ok_len, bufs.pop().unwrap());
        // Entirely past the new end.
        read_one(&q, 1, 0, 32 * DMA_ALIGN as u64, 5000, bufs.pop().unwrap());
        // Starting before the new end, ending after it.
        read_one(&q, 2, 0, 8 * DMA_ALIGN as u64, 3000, bufs.pop().unwrap());
        let done = collect(&q);
        assert_eq!(done.len(), 3);
        done[&0].result.as_ref().unwrap();
        assert_eq!(&done[&0].buf[..ok_len], &data[..ok_len]);
        for (tag, offset, len) in [(1, 32 * DMA_ALIGN as u64, 5000u64), (2, 32768, 3000)] {
            match &done[&tag].result {
                Err(
                    e @ StorageError::ShortFile {
                        path,
                        offset: o,
                        len: l,
                        file_len,
                    },
                ) => {
                    assert_eq!((path.as_path(), *o, *l), (file.path(), offset, len));
                    assert_eq!(*file_len, new_len, "{backend:?}");
                    let msg = e.to_string();
                    assert!(msg.contains(&file.path().display().to_string()), "{msg}");
                    assert!(msg.contains(&offset.to_string()), "{msg}");
                    assert!(msg.contains(&new_len.to_string()), "{msg}");
                }
                other => panic!("{backend:?} tag {tag}: {other:?}"),
            }
        }
    }
}

#[test]
fn bad_requests_come_back_as_error_completions() {
    for backend in BACKENDS {
        let (file, data) = data_file(target_dir(), 16 * DMA_ALIGN, 6);
        let (registered, mut bufs) = arena(2 * DMA_ALIGN, 5);
        let q = ReadQueue::open(&config(backend, 4), &[file.path()], &[registered]).unwrap();
        read_one(&q, 0, 0, 100, 10, bufs.pop().unwrap());
        read_one(&q, 1, 0, 0, 2 * DMA_ALIGN + 1, bufs.pop().unwrap());
        read_one(&q, 2, 3, 0, 10, bufs.pop().unwrap());
        read_one(
            &q,
            3,
            0,
            15 * DMA_ALIGN as u64,
            DMA_ALIGN + 1,
            bufs.pop().unwrap(),
        );
        read_one(&q, 4, 0, DMA_ALIGN as u64, 77, bufs.pop().unwrap());
        let done = collect(&q);
        assert_eq!(done.len(), 5);
        for tag in 0..3 {
            assert!(
                matches!(done[&tag].result, Err(StorageError::BadRequest { .. })),
                "{backend:?} tag {tag}: {:?}",
                done[&tag].result
            );
        }
        assert!(matches!(
            done[&3].result,
            Err(StorageError::ShortFile { file_len, .. }) if file_len == 16 * DMA_ALIGN as u64
        ));
        done[&4].result.as_ref().unwrap();
        assert_eq!(&done[&4].buf[..77], &data[DMA_ALIGN..DMA_ALIGN + 77]);
    }
}

/// A directory on a filesystem that refuses `O_DIRECT`: tmpfs before Linux 6.6, else a ramfs
/// mounted for the test (root only), unmounted on drop.
struct NoDirectDir {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl NoDirectDir {
    fn find() -> Option<NoDirectDir> {
        let refuses = |dir: &Path| {
            let probe = dir.join("probe");
            std::fs::write(&probe, [0u8; DMA_ALIGN]).ok()?;
            let (_, direct) = tileflow_spdk::direct::open_read(&probe, true).ok()?;
            std::fs::remove_file(&probe).ok()?;
            Some(!direct)
        };
        if let Ok(dir) = tempfile::tempdir_in("/dev/shm") {
            if refuses(dir.path()) == Some(true) {
                return Some(NoDirectDir {
                    dir,
                    mounted: false,
                });
            }
        }
        let dir = tempfile::tempdir_in(target_dir()).ok()?;
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "ramfs",
                "tileflow-test",
                &dir.path().display().to_string(),
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        let found = NoDirectDir {
            dir,
            mounted: status.success(),
        };
        (found.mounted && refuses(found.dir.path()) == Some(true)).then_some(found)
    }
}

impl Drop for NoDirectDir {
    fn drop(&mut self) {
        if self.mounted {
            // Lazy: a closed io_uring releases its registered files asynchronously, so a plain
            // umount can still find the mount busy for a moment.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

#[test]
fn a_filesystem_refusing_o_direct_reads_through_the_page_cache() {
    // tmpfs accepts O_DIRECT since Linux 6.6; ramfs never does but needs root to mount.
    let Some(no_direct) = NoDirectDir::find() else {
        eprintln!("no filesystem refusing O_DIRECT available (needs root for ramfs); skipping");
        return;
    };
    for backend in BACKENDS {
        let (file, data) = data_file(no_direct.dir.path(), 10 * DMA_ALIGN + 3, 8);
        let (registered, mut bufs) = arena(4 * DMA_ALIGN, 3);
        let q = ReadQueue::open(&config(backend, 2), &[file.path()], &[registered]).unwrap();
        assert!(!q.direct());
        assert_eq!(q.backend(), expected_backend(backend));
        read_one(&q, 0, 0, 0, 4 * DMA_ALIGN, bufs.pop().unwrap());
        read_one(
            &q,
            1,
            0,
            8 * DMA_ALIGN as u64,
            2 * DMA_ALIGN + 3,
            bufs.pop().unwrap(),
        );
        let done = collect(&q);
        done[&0].result.as_ref().unwrap();
        done[&1].result.as_ref().unwrap();
        assert_eq!(&done[&0].buf[..4 * DMA_ALIGN], &data[..4 * DMA_ALIGN]);
        assert_eq!(&done[&1].buf[..2 * DMA_ALIGN + 3], &data[8 * DMA_ALIGN..]);
    }
}

#[test]
fn tmpfs_files_read_correctly() {
    let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("no /dev/shm here; skipping");
        return;
    };
    for backend in BACKENDS {
        let (file, data) = data_file(dir.path(), 6 * DMA_ALIGN + 17, 11);
        let (registered, mut bufs) = arena(8 * DMA_ALIGN, 1);
        let q = ReadQueue::open(&config(backend, 2), &[file.path()], &[registered]).unwrap();
        read_one(
            &q,
            0,
            0,
            DMA_ALIGN as u64,
            5 * DMA_ALIGN + 17,
            bufs.pop().unwrap(),
        );
        let done = collect(&q);
        done[&0].result.as_ref().unwrap();
        assert_eq!(&done[&0].buf[..5 * DMA_ALIGN + 17], &data[DMA_ALIGN..]);
    }
}

#[test]
fn dropping_the_queue_with_reads_in_flight_returns() {
    for backend in BACKENDS {
        let (file, _) = data_file(target_dir(), 256 * DMA_ALIGN, 9);
        let (registered, bufs) = arena(16 * DMA_ALIGN, 16);
        let (_other, more) = arena(16 * DMA_ALIGN, 16);
        let q = ReadQueue::open(&config(backend, 4), &[file.path()], &[registered]).unwrap();
        for (tag, buf) in bufs.into_iter().chain(more).enumerate() {
            let priority = if tag % 2 == 0 {
                Priority::Demand
            } else {
                Priority::Prefetch
            };
            q.submit(ReadRequest {
                tag: tag as u64,
                file: 0,
                offset: (tag % 16 * 16 * DMA_ALIGN) as u64,
                len: 16 * DMA_ALIGN,
                buf,
                priority,
            });
        }
        assert!(q.in_flight() > 0);
        drop(q);
    }
}

#[test]
fn demand_reads_complete_with_prefetch_queued_ahead() {
    for backend in BACKENDS {
        let (file, data) = data_file(target_dir(), 64 * DMA_ALIGN, 10);
        let (registered, mut bufs) = arena(DMA_ALIGN, 33);
        let q = ReadQueue::open(&config(backend, 2), &[file.path()], &[registered]).unwrap();
        for tag in 0..32u64 {
            q.submit(ReadRequest {
                tag,
                file: 0,
                offset: tag * DMA_ALIGN as u64,
                len: 100,
                buf: bufs.pop().unwrap(),
                priority: Priority::Prefetch,
            });
        }
        read_one(&q, 99, 0, 40 * DMA_ALIGN as u64, 100, bufs.pop().unwrap());
        let done = collect(&q);
        assert_eq!(done.len(), 33);
        for (tag, c) in &done {
            c.result.as_ref().unwrap();
            let off = if *tag == 99 { 40 } else { *tag as usize } * DMA_ALIGN;
            assert_eq!(&c.buf[..100], &data[off..off + 100]);
        }
    }
}
