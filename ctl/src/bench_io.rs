//! `tilectl bench io`: storage -> host -> device bandwidth against tile size and queue depth, for
//! each storage backend, beside plain sequential `O_DIRECT` pread. Its points are the input of
//! the tuner that picks the tile size and queue depth.
//!
//! Each point reads the range in tiles through a [`ReadQueue`] into a ring of `depth` tile buffers
//! of one locked arena (registered with io_uring), twice: once reads only (storage -> host), once
//! copying every finished tile to the device before its buffer goes back to the ring (the
//! pipeline: the copy of tile k overlaps the reads of the next tiles). GB/s are 10^9 bytes/s.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tileflow_engine::backend::cpu::CpuTierMemory;
use tileflow_engine::pack::manifest::EXPERTS_FILE;
use tileflow_engine::store::Store;
use tileflow_engine::tier::TierMemory;
use tileflow_spdk::direct::{open_read, read_full};
use tileflow_spdk::{
    AlignedBuf, BackendChoice, DmaArena, DmaBuf, IoConfig, Priority, ReadQueue, ReadRequest,
    DMA_ALIGN,
};

use crate::cli::{BenchBackend, BenchIoArgs};
use crate::output::{human_bytes, print_json, table};

/// Default cap on the bytes read per point.
const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// The baseline's fixed chunk.
const BASELINE_CHUNK: u64 = 1 << 20;
/// Device memory the copies cycle through: larger than any CPU cache, so copies are not cache hits.
const DEVICE_BYTES: u64 = 64 << 20;

/// The device side of the pipeline: slots allocated and filled through the compute backend's
/// [`TierMemory`], the very copy the expert tiers use (a memcpy into host memory on the CPU
/// backend, an asynchronous copy into VRAM on CUDA). Tile `index` lands in slot
/// `index % slots`.
struct DeviceSlots<M: TierMemory> {
    memory: M,
    slots: Vec<M::DeviceSlot>,
}

impl DeviceSlots<CpuTierMemory> {
    /// What the device is, for the report.
    const NAME: &'static str = "host memory (CPU backend)";

    fn new(tile: usize) -> anyhow::Result<DeviceSlots<CpuTierMemory>> {
        let memory = CpuTierMemory;
        let slots = (0..(DEVICE_BYTES as usize / tile).max(1))
            .map(|_| memory.alloc_device_slot(tile))
            .collect::<Result<Vec<_>, _>>()
            .context("cannot allocate the device slots the tiles are copied into")?;
        Ok(DeviceSlots { memory, slots })
    }
}

impl<M: TierMemory> DeviceSlots<M> {
    /// Copies the first `len` bytes of `buf` (tile `index`) to the device and waits for it.
    fn copy(&mut self, index: u64, buf: &DmaBuf, len: usize) -> anyhow::Result<()> {
        let n = self.slots.len() as u64;
        let slot = &mut self.slots[(index % n) as usize];
        let done = self.memory.copy_to_device(buf, 0..len, slot, 0)?;
        self.memory.wait(done)?;
        Ok(())
    }
}

/// One measured (backend, tile size, queue depth).
#[derive(Debug, Serialize)]
struct Point {
    backend: &'static str,
    tile_bytes: u64,
    queue_depth: u32,
    /// Bytes read in the reads-only pass.
    bytes_read: u64,
    /// Bytes read and copied in the pipelined pass.
    bytes_copied: u64,
    /// Storage -> host, reads only.
    read_gbps: f64,
    /// Host -> device: bytes over the time spent in copies.
    copy_gbps: f64,
    /// Storage -> host -> device, pipelined.
    end_to_end_gbps: f64,
    /// `read_gbps` over the 1 MiB pread baseline.
    read_vs_pread_1mib: f64,
    /// `read_gbps` over the pread baseline at this tile size.
    read_vs_pread_tile: f64,
    /// `end_to_end_gbps` over the 1 MiB pread baseline.
    end_to_end_vs_pread_1mib: f64,
}

/// Plain sequential single-threaded `O_DIRECT` pread of `chunk_bytes` at a time.
#[derive(Debug, Serialize)]
struct Baseline {
    chunk_bytes: u64,
    bytes: u64,
    gbps: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    file: PathBuf,
    /// Whether the file was read with `O_DIRECT` (else the numbers include the page cache).
    direct: bool,
    /// Bytes asked for per point.
    bytes: u64,
    device: &'static str,
    baselines: Vec<Baseline>,
    points: Vec<Point>,
    notes: Vec<String>,
}

/// `tilectl bench io`.
pub fn run(state_dir: &Path, args: BenchIoArgs) -> anyhow::Result<()> {
    for &tile in &args.tile_sizes {
        if tile == 0 || tile % DMA_ALIGN as u64 != 0 {
            bail!("tile size {tile} is not a positive multiple of {DMA_ALIGN} bytes");
        }
    }
    if args.tile_sizes.is_empty() || args.queue_depths.is_empty() || args.backends.is_empty() {
        bail!("--tile-sizes, --queue-depths and --backends each need at least one value");
    }
    // Held until the end: a temporary file is removed on drop.
    let (path, _temp) = match (&args.model, &args.file) {
        (Some(model), _) => {
            let stored = Store::new(state_dir).get(model)?;
            (stored.dir.join(EXPERTS_FILE), None)
        }
        (None, Some(file)) => (file.clone(), None),
        (None, None) => {
            let dir = match &args.dir {
                Some(d) => d.clone(),
                None if state_dir.is_dir() => state_dir.to_path_buf(),
                None => std::env::temp_dir(),
            };
            let temp = write_random_file(&dir, args.size)?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let file_len = std::fs::metadata(&path)
        .with_context(|| format!("cannot stat {}", path.display()))?
        .len();
    let bytes = args.bytes.unwrap_or(file_len.min(DEFAULT_MAX_BYTES));
    if bytes == 0 || bytes > file_len {
        bail!(
            "cannot read {bytes} bytes of {}, which has {file_len}",
            path.display()
        );
    }

    let mut direct = true;
    let mut baselines = Vec::new();
    let mut chunks = vec![BASELINE_CHUNK];
    chunks.extend(args.tile_sizes.iter().filter(|&&t| t != BASELINE_CHUNK));
    for chunk in chunks {
        let (gbps, d) = baseline(&path, bytes, chunk)?;
        direct &= d;
        baselines.push(Baseline {
            chunk_bytes: chunk,
            bytes,
            gbps,
        });
    }
    let base = |chunk: u64| {
        baselines
            .iter()
            .find(|b| b.chunk_bytes == chunk)
            .map_or(0.0, |b| b.gbps)
    };
    let mut points = Vec::new();
    let mut device_name = "";
    for &backend in &args.backends {
        for &tile in &args.tile_sizes {
            let mut device = DeviceSlots::new(usize::try_from(tile)?)?;
            device_name = DeviceSlots::NAME;
            for &depth in &args.queue_depths {
                let setup = Setup {
                    path: &path,
                    backend,
                    tile,
                    depth,
                    bytes,
                };
                let reads = setup.pass(None)?;
                let piped = setup.pass(Some(&mut device))?;
                direct &= reads.direct && piped.direct;
                let read_gbps = gbps(reads.bytes, reads.wall);
                let end_to_end_gbps = gbps(piped.bytes, piped.wall);
                points.push(Point {
                    backend: backend_name(backend),
                    tile_bytes: tile,
                    queue_depth: depth,
                    bytes_read: reads.bytes,
                    bytes_copied: piped.bytes,
                    read_gbps,
                    copy_gbps: gbps(piped.bytes, piped.copying),
                    end_to_end_gbps,
                    read_vs_pread_1mib: ratio(read_gbps, base(BASELINE_CHUNK)),
                    read_vs_pread_tile: ratio(read_gbps, base(tile)),
                    end_to_end_vs_pread_1mib: ratio(end_to_end_gbps, base(BASELINE_CHUNK)),
                });
            }
        }
    }
    let mut notes = Vec::new();
    if !direct {
        notes.push(format!(
            "the filesystem of {} refused O_DIRECT: reads went through the page cache, so the \
             numbers measure it, not the device",
            path.display()
        ));
    }
    let report = Report {
        file: path,
        direct,
        bytes,
        device: device_name,
        baselines,
        points,
        notes,
    };
    if args.json {
        print_json(&report)
    } else {
        print_table(&report);
        Ok(())
    }
}

fn backend_name(b: BenchBackend) -> &'static str {
    match b {
        BenchBackend::IoUring => "io_uring",
        BenchBackend::Pread => "pread",
    }
}

fn gbps(bytes: u64, time: Duration) -> f64 {
    let secs = time.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

fn ratio(x: f64, base: f64) -> f64 {
    if base > 0.0 {
        x / base
    } else {
        0.0
    }
}

/// Writes `size` random bytes (rounded up to whole 4 KiB blocks) to a new temporary file in
/// `dir`, with `O_DIRECT` where the filesystem allows it, so the page cache stays cold.
fn write_random_file(dir: &Path, size: u64) -> anyhow::Result<tempfile::NamedTempFile> {
    const CHUNK: usize = 4 << 20;
    if size == 0 {
        bail!("--size must be at least one byte");
    }
    let temp = tempfile::Builder::new()
        .prefix(".tilectl-bench-io-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let path = temp.path();
    let open = |flags| {
        OpenOptions::new()
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    let mut out = match open(libc::O_DIRECT) {
        Ok(f) => Ok(f),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0),
        Err(e) => Err(e),
    }
    .with_context(|| format!("cannot open {} for writing", path.display()))?;
    let total = size.div_ceil(DMA_ALIGN as u64) * DMA_ALIGN as u64;
    let mut buf = AlignedBuf::new(CHUNK)?;
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ size;
    let mut written = 0u64;
    while written < total {
        for word in buf.chunks_exact_mut(8) {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            word.copy_from_slice(&rng.to_le_bytes());
        }
        let n = (total - written).min(CHUNK as u64) as usize;
        out.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", path.display()))?;
        written += n as u64;
    }
    out.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(temp)
}

/// Reads `bytes` of `path` sequentially, `chunk` bytes per pread, on this thread; GB/s and
/// whether the file was direct.
fn baseline(path: &Path, bytes: u64, chunk: u64) -> anyhow::Result<(f64, bool)> {
    let (file, direct) = open_read(path, true)?;
    let chunk = usize::try_from(chunk)?;
    let mut buf = AlignedBuf::new(chunk)?;
    let started = Instant::now();
    let mut offset = 0u64;
    while offset < bytes {
        let len = (bytes - offset).min(chunk as u64) as usize;
        let blocks = len.div_ceil(DMA_ALIGN) * DMA_ALIGN;
        read_full(&file, path, offset, &mut buf[..blocks], len)?;
        offset += len as u64;
    }
    Ok((gbps(bytes, started.elapsed()), direct))
}

/// One point's parameters.
struct Setup<'a> {
    path: &'a Path,
    backend: BenchBackend,
    tile: u64,
    depth: u32,
    bytes: u64,
}

/// What one pass measured.
struct Pass {
    /// Bytes completed (and copied, when copying).
    bytes: u64,
    wall: Duration,
    copying: Duration,
    direct: bool,
}

impl Setup<'_> {
    /// Reads the range in tiles through a ring of `depth` tile buffers, copying each finished
    /// tile to `device` when given before its buffer is read into again.
    fn pass(&self, mut device: Option<&mut DeviceSlots<CpuTierMemory>>) -> anyhow::Result<Pass> {
        let tile = usize::try_from(self.tile)?;
        let depth = self.depth as usize;
        // Host memory as the tiers get it: page-locked, from the compute backend.
        let mem = CpuTierMemory.alloc_host(tile * depth)?;
        let (arena, bufs) = DmaArena::new(mem, tile, depth)?;
        let choice = match self.backend {
            BenchBackend::IoUring => BackendChoice::IoUring,
            BenchBackend::Pread => BackendChoice::Pread,
        };
        let config = IoConfig {
            backend: choice,
            queue_depth: self.depth,
            sqpoll: false,
            direct: true,
        };
        let queue = ReadQueue::open(&config, &[self.path], &[arena])?;
        let tiles = self.bytes.div_ceil(self.tile);
        let tile_len = |index: u64| (self.bytes - index * self.tile).min(self.tile) as usize;
        let submit = |index: u64, buf| {
            queue.submit(ReadRequest {
                tag: index,
                file: 0,
                offset: index * self.tile,
                len: tile_len(index),
                buf,
                priority: Priority::Demand,
            });
        };
        let started = Instant::now();
        let mut next = 0u64;
        for buf in bufs {
            if next < tiles {
                submit(next, buf);
                next += 1;
            }
        }
        let mut done = 0u64;
        let mut copying = Duration::ZERO;
        while let Some(c) = queue.wait() {
            c.result.with_context(|| {
                format!(
                    "{} read of tile {} ({} bytes)",
                    backend_name(self.backend),
                    c.tag,
                    self.tile
                )
            })?;
            let len = tile_len(c.tag);
            if let Some(device) = device.as_deref_mut() {
                let t = Instant::now();
                device.copy(c.tag, &c.buf, len)?;
                copying += t.elapsed();
            }
            done += len as u64;
            if next < tiles {
                submit(next, c.buf);
                next += 1;
            }
        }
        Ok(Pass {
            bytes: done,
            wall: started.elapsed(),
            copying,
            direct: queue.direct(),
        })
    }
}

fn print_table(report: &Report) {
    println!(
        "{}: {} per point, {}; device: {}",
        report.file.display(),
        human_bytes(report.bytes),
        if report.direct {
            "O_DIRECT"
        } else {
            "page cache"
        },
        report.device
    );
    let base: Vec<String> = report
        .baselines
        .iter()
        .map(|b| format!("{} {:.2} GB/s", human_bytes(b.chunk_bytes), b.gbps))
        .collect();
    println!("baseline (sequential O_DIRECT pread): {}", base.join(", "));
    println!();
    let rows: Vec<Vec<String>> = report
        .points
        .iter()
        .map(|p| {
            vec![
                p.backend.to_string(),
                human_bytes(p.tile_bytes),
                p.queue_depth.to_string(),
                format!("{:.2}", p.read_gbps),
                format!("{:.2}", p.copy_gbps),
                format!("{:.2}", p.end_to_end_gbps),
                format!("{:.2}x", p.read_vs_pread_1mib),
                format!("{:.2}x", p.read_vs_pread_tile),
            ]
        })
        .collect();
    table(
        &[
            "BACKEND",
            "TILE",
            "DEPTH",
            "READ GB/s",
            "COPY GB/s",
            "END-TO-END GB/s",
            "READ/PREAD 1MiB",
            "READ/PREAD TILE",
        ],
        &rows,
    );
    for note in &report.notes {
        println!("note: {note}");
    }
}
