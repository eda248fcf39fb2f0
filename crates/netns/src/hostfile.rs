//! Opening files whose path a pod or a configuration names. The plugin runs as root on
//! the host, so such a path may be anything: a FIFO or a tty (an open or a read that
//! never returns), `/dev/zero` (a read that never ends), a huge file. Every open here
//! is non-blocking, the file type is checked on the descriptor (no race with a rename),
//! and reads stop one byte past a bound.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

fn kind(file_type: std::fs::FileType) -> &'static str {
    match () {
        _ if file_type.is_fifo() => "FIFO",
        _ if file_type.is_char_device() => "character device",
        _ if file_type.is_block_device() => "block device",
        _ if file_type.is_socket() => "socket",
        _ if file_type.is_dir() => "directory",
        _ => "special file",
    }
}

/// Opens `path` with `options` plus `O_NONBLOCK | O_NOCTTY` (a FIFO without a peer
/// fails or returns at once instead of waiting) and checks that it is a regular file.
pub fn open_regular(path: &Path, options: &mut OpenOptions) -> Result<File, HostFileError> {
    let file = options
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| HostFileError::Open { path: path.to_owned(), source })?;
    let file_type =
        file.metadata().map_err(|source| HostFileError::Open { path: path.to_owned(), source })?.file_type();
    if !file_type.is_file() {
        return Err(HostFileError::NotRegular { path: path.to_owned(), kind: kind(file_type) });
    }
    Ok(file)
}

/// The content of the regular file at `path`, refused past `max` bytes.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, HostFileError> {
    let file = open_regular(path, OpenOptions::new().read(true))?;
    let mut bytes = Vec::new();
    // Read rather than trust the size: /proc and sysfs files report 0 or 4096.
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| HostFileError::Read { path: path.to_owned(), source })?;
    if bytes.len() as u64 > max {
        return Err(HostFileError::TooLarge { path: path.to_owned(), max });
    }
    Ok(bytes)
}

/// [`read_regular`], as UTF-8 text.
pub fn read_regular_text(path: &Path, max: u64) -> Result<String, HostFileError> {
    String::from_utf8(read_regular(path, max)?).map_err(|_| HostFileError::Read {
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_files_and_oversized_files_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a plain mkfifo on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_regular(&fifo, 10).unwrap_err();
        assert!(matches!(err, HostFileError::NotRegular { kind: "FIFO", .. }), "{err}");
        let err = read_regular(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(err.to_string().contains("/dev/zero is a character device"), "{err}");
        assert!(matches!(read_regular(dir.path(), 10), Err(HostFileError::NotRegular { kind: "directory", .. })));
        let big = dir.path().join("big");
        std::fs::write(&big, [b'x'; 11]).unwrap();
        assert!(matches!(read_regular(&big, 10), Err(HostFileError::TooLarge { max: 10, .. })));
        assert_eq!(read_regular(&big, 11).unwrap().len(), 11);
        // A write-only open of a FIFO nobody reads fails at once instead of waiting.
        let err = open_regular(&fifo, OpenOptions::new().append(true)).unwrap_err();
        assert!(matches!(err, HostFileError::Open { .. }), "{err}");
    }
}
