//! Opening files for direct reads, and the blocking read loop the pread backend and benchmarks
//! share.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::source::StorageError;

/// Opens `path` read-only, with `O_DIRECT` when `direct` is set and the filesystem accepts it.
/// Returns the file and whether it is direct.
pub fn open_read(path: &Path, direct: bool) -> Result<(File, bool), StorageError> {
    let open = |flags: i32| OpenOptions::new().read(true).custom_flags(flags).open(path);
    if direct {
        match open(libc::O_DIRECT) {
            Ok(f) => return Ok((f, true)),
            // tmpfs and some FUSE filesystems refuse O_DIRECT at open.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(source) => {
                return Err(StorageError::Open {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
    let f = open(0).map_err(|source| StorageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((f, false))
}

/// Reads `want` bytes at `offset` into the start of `buf`, reading whole blocks (`buf.len()` is
/// the block-rounded length; fewer bytes may exist past `want` at the end of the file). Short
/// reads continue where they stopped, `EINTR`/`EAGAIN` retry, end of file before `want` bytes is
/// [`StorageError::ShortFile`] with the file's current length.
pub fn read_full(
    file: &File,
    path: &Path,
    offset: u64,
    buf: &mut [u8],
    want: usize,
) -> Result<(), StorageError> {
    let mut done = 0usize;
    while done < want {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                let file_len = file.metadata().map_or(offset + done as u64, |m| m.len());
                return Err(StorageError::ShortFile {
                    path: path.to_path_buf(),
                    offset,
                    len: want as u64,
                    file_len,
                });
            }
            Ok(n) => {
                done += n;
                // A read that stops inside a block under O_DIRECT met the end of the file; the
                // next read would start unaligned and fail with EINVAL, so say so now.
                if done < want && !done.is_multiple_of(crate::aligned::DMA_ALIGN) {
                    let file_len = file.metadata().map_or(offset + done as u64, |m| m.len());
                    if file_len <= offset + done as u64 {
                        return Err(StorageError::ShortFile {
                            path: path.to_path_buf(),
                            offset,
                            len: want as u64,
                            file_len,
                        });
                    }
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(source) => {
                return Err(StorageError::Read {
                    path: path.to_path_buf(),
                    offset,
                    len: want as u64,
                    source,
                })
            }
        }
    }
    Ok(())
}
