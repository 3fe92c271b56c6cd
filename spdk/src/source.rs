//! The tile read interface and its portable `pread` backend.

use std::fmt::Debug;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A failed storage operation, naming the file and the byte range involved.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The file could not be opened for reading.
    #[error("cannot open {} for reading", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The file's length could not be determined.
    #[error("cannot stat {}", path.display())]
    Stat {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The path names something other than a regular file (a directory, say).
    #[error("{} is not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// A read asked for bytes past the end of the file.
    #[error(
        "{} is shorter than expected: reading {len} bytes at offset {offset} but the file has \
         {file_len} bytes",
        path.display()
    )]
    ShortFile {
        /// The file.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// How many bytes were asked for.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A read request that no backend could run as given (a caller bug, named in `reason`).
    #[error("cannot read {len} bytes at offset {offset} of {}: {reason}", path.display())]
    BadRequest {
        /// The file (empty when the file index itself was wrong).
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// How many bytes were asked for.
        len: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The storage thread is gone (it panicked or the queue is shutting down).
    #[error("the storage thread reading {} has stopped", path.display())]
    QueueClosed {
        /// The file.
        path: PathBuf,
    },
    /// A storage backend could not be started.
    #[error("cannot start the {backend} storage backend")]
    Setup {
        /// Backend name.
        backend: &'static str,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The OS reported an I/O error during a read.
    #[error("reading {len} bytes at offset {offset} of {} failed", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Where the read started.
        offset: u64,
        /// How many bytes were asked for.
        len: u64,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

/// Random-access reads of byte extents from one storage object (a file, later a raw NVMe
/// namespace or a cuFile handle).
///
/// This is what the engine's tier cache reads expert extents through; every backend implements
/// it. Reads are positional and take `&self`, so one source serves many threads at once.
pub trait TileSource: Send + Sync + Debug {
    /// Length of the object in bytes, as it was when the source was opened.
    fn len(&self) -> u64;

    /// Whether the object has no bytes at all.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills all of `buf` with the bytes starting at `offset`.
    ///
    /// A range reaching past the end of the object is [`StorageError::ShortFile`]; on any error
    /// the contents of `buf` are unspecified.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError>;

    /// The path the object was opened from, for messages and metrics.
    fn path(&self) -> &Path;
}

/// The portable backend: a regular file opened read-only and read with `pread(2)` through the page
/// cache. Works on every filesystem; the fallback when io_uring `O_DIRECT` is unavailable.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    path: PathBuf,
    len: u64,
}

impl FileSource {
    /// Opens `path` read-only and records its length.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| StorageError::Open {
            path: path.clone(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| StorageError::Stat {
            path: path.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(StorageError::NotAFile { path });
        }
        Ok(Self {
            file,
            path,
            len: meta.len(),
        })
    }

    /// The file's current length, or `fallback` when it cannot be read: used only to word errors.
    fn current_len(&self, fallback: u64) -> u64 {
        self.file.metadata().map_or(fallback, |m| m.len())
    }
}

impl TileSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StorageError> {
        // usize always fits in u64 on the 64-bit targets we build for; saturate rather than wrap.
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        let short = |file_len| StorageError::ShortFile {
            path: self.path.clone(),
            offset,
            len,
            file_len,
        };
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => return Err(short(self.len)),
        }
        // A loop rather than `read_exact_at` so that a file that shrank since `open` is reported
        // as `ShortFile` with its new length instead of a bare `UnexpectedEof`.
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            match self.file.read_at(&mut buf[done..], pos) {
                Ok(0) => return Err(short(self.current_len(pos))),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(StorageError::Read {
                        path: self.path.clone(),
                        offset,
                        len,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AlignedBuf;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn reads_extents() {
        let data = pattern(10_000);
        let f = file_with(&data);
        let src = FileSource::open(f.path()).unwrap();
        assert_eq!(src.len(), 10_000);
        assert!(!src.is_empty());
        assert_eq!(src.path(), f.path());

        let mut buf = vec![0u8; 1234];
        src.read_at(4321, &mut buf).unwrap();
        assert_eq!(buf, data[4321..4321 + 1234]);

        let mut all = AlignedBuf::new(10_000).unwrap();
        src.read_at(0, &mut all).unwrap();
        assert_eq!(&all[..], &data[..]);

        // Reads ending exactly at the end, and empty reads anywhere up to the end, succeed.
        let mut tail = [0u8; 16];
        src.read_at(10_000 - 16, &mut tail).unwrap();
        assert_eq!(tail, data[10_000 - 16..]);
        src.read_at(10_000, &mut []).unwrap();
    }

    #[test]
    fn read_past_end_is_short_file() {
        let f = file_with(&pattern(100));
        let src = FileSource::open(f.path()).unwrap();
        let mut buf = [0u8; 10];
        let err = src.read_at(95, &mut buf).unwrap_err();
        match &err {
            StorageError::ShortFile {
                path,
                offset,
                len,
                file_len,
            } => {
                assert_eq!(path, f.path());
                assert_eq!((*offset, *len, *file_len), (95, 10, 100));
            }
            other => panic!("unexpected error {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
        assert!(
            msg.contains("reading 10 bytes at offset 95 but the file has 100 bytes"),
            "{msg}"
        );

        let err = src.read_at(u64::MAX, &mut buf).unwrap_err();
        assert!(matches!(err, StorageError::ShortFile { .. }), "{err}");
    }

    #[test]
    fn file_truncated_after_open_is_short_file() {
        let f = file_with(&pattern(8192));
        let src = FileSource::open(f.path()).unwrap();
        f.as_file().set_len(1000).unwrap();
        let mut buf = vec![0u8; 4096];
        let err = src.read_at(0, &mut buf).unwrap_err();
        match err {
            StorageError::ShortFile { file_len, len, .. } => {
                assert_eq!((file_len, len), (1000, 4096));
            }
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn open_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.tiles");
        let err = FileSource::open(&missing).unwrap_err();
        assert!(matches!(err, StorageError::Open { .. }));
        assert!(err.to_string().contains("nope.tiles"), "{err}");

        let err = FileSource::open(dir.path()).unwrap_err();
        assert!(matches!(err, StorageError::NotAFile { .. }), "{err}");
    }

    #[test]
    fn shared_across_threads() {
        let data = pattern(64 * 1024);
        let f = file_with(&data);
        let src: std::sync::Arc<dyn TileSource> =
            std::sync::Arc::new(FileSource::open(f.path()).unwrap());
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let src = src.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    src.read_at(t * 16 * 1024, &mut buf).unwrap();
                    buf
                })
            })
            .collect();
        for (t, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join().unwrap(), data[t * 16 * 1024..(t + 1) * 16 * 1024]);
        }
    }
}
