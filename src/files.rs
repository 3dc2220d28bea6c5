//! Small files the control plane owns (subnet.env, the directory registry's config, revision
//! and lease files): written whole or not at all, and read only when they are regular files.
//!
//! Writing goes through a temporary file with an unpredictable name, created exclusively, so a
//! file or symbolic link planted under the name it would have had cannot redirect the write.
//! Reading opens without blocking and checks the file type first, so a FIFO left where a file
//! was expected is reported instead of hanging the reader (which may hold the registry lock).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `contents` to `path` atomically: an exclusive temporary file next to it, fsync,
/// rename over `path`, then fsync the directory (where the filesystem supports it). The
/// temporary file is removed when anything fails.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.{:016x}.tmp",
        name.to_string_lossy(),
        rand::random::<u64>()
    ));
    // create_new is O_CREAT|O_EXCL: it follows no symbolic link and opens no existing file.
    let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let result = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Makes the rename durable; not every filesystem can fsync a directory.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    remove_stale_temporaries(dir, &name.to_string_lossy());
    Ok(())
}

/// A temporary file older than this was left by a writer that died between creating and
/// renaming it (a write takes milliseconds).
const STALE: std::time::Duration = std::time::Duration::from_secs(60);

/// Removes the temporary files of `name` that earlier writes left in `dir` when the process
/// died halfway: with unpredictable names, no later write reuses and so replaces them. Only
/// regular files of the exact pattern and older than [`STALE`]: a write in progress keeps
/// its own. Best effort.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    remove_stale_temporaries_of(dir, |n| n == name);
}

/// [`remove_stale_temporaries`] for every name: for a directory that only linen writes to
/// (the directory registry's `subnets/`), where a key written once may never be written again.
pub fn remove_all_stale_temporaries(dir: &Path) {
    remove_stale_temporaries_of(dir, |_| true);
}

fn remove_stale_temporaries_of(dir: &Path, wanted: impl Fn(&str) -> bool) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        if !file_name
            .to_str()
            .and_then(temporary_of)
            .is_some_and(&wanted)
        {
            continue;
        }
        let stale = entry.metadata().is_ok_and(|m| {
            m.is_file()
                && m.modified()
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > STALE))
        });
        if stale {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The name whose temporary file `file_name` is ([`write_atomic`]'s `.NAME.<16 hex>.tmp`).
fn temporary_of(file_name: &str) -> Option<&str> {
    let (name, hex) = file_name
        .strip_prefix('.')?
        .strip_suffix(".tmp")?
        .rsplit_once('.')?;
    (!name.is_empty() && hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then_some(name)
}

/// Largest file [`read_regular`] reads: these files hold a line or two of JSON, and a huge
/// file planted among them must not be read into memory whole.
pub const MAX_READ: u64 = 64 * 1024;

/// Reads a regular file of at most [`MAX_READ`] bytes as UTF-8 text. Anything else (a FIFO,
/// socket, device or directory; with `follow_links` false also a symbolic link; a larger file)
/// is an [`io::ErrorKind::InvalidInput`] error that says what it is, returned without waiting for
/// a writer. Not-found and permission errors come as they are.
pub fn read_regular(path: &Path, follow_links: bool) -> io::Result<String> {
    // Looked at before opening too: opening a socket fails (ENXIO, which would read as an I/O
    // error), and opening a device can have effects of its own.
    let before = if follow_links {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    };
    match before {
        Ok(m) if m.file_type().is_symlink() => return Err(not_regular("a symbolic link")),
        Ok(m) if !m.is_file() => return Err(not_regular(type_name(m.file_type()))),
        _ => {}
    }
    let mut flags = libc::O_NONBLOCK;
    if !follow_links {
        flags |= libc::O_NOFOLLOW;
    }
    let file = match OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) && !follow_links => {
            return Err(not_regular("a symbolic link"));
        }
        // Replaced by a socket or a device since it was looked at.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENODEV)) => {
            return Err(not_regular("a socket or a device"));
        }
        Err(e) => return Err(e),
    };
    let kind = file.metadata()?.file_type();
    if !kind.is_file() {
        return Err(not_regular(type_name(kind)));
    }
    let mut text = String::new();
    file.take(MAX_READ + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_READ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("larger than {MAX_READ} bytes"),
        ));
    }
    Ok(text)
}

/// What a file that is not a regular file is, for an error.
fn type_name(kind: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a device"
    }
}

fn not_regular(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what}, not a regular file"),
    )
}

#[cfg(test)]
mod test {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_replace_the_file_and_leave_no_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("subnet.env");
        write_atomic(&file, b"A=1\n").unwrap();
        write_atomic(&file, b"A=2\n").unwrap();
        assert_eq!(fs::read_to_string(&file).unwrap(), "A=2\n");
        // A directory in the way: rename refuses, and the temporary file goes.
        let taken = dir.path().join("taken");
        fs::create_dir(&taken).unwrap();
        write_atomic(&taken, b"A=3\n").unwrap_err();
        assert_eq!(entries(dir.path()), ["subnet.env", "taken"]);
    }

    /// A writer that died between creating its temporary file and renaming it left the file;
    /// the next write removes it once it is old, and leaves a fresh one (a write in progress)
    /// and files that only look alike.
    #[test]
    fn temporary_files_a_dead_writer_left_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - 2 * STALE;
        let make = |name: &str, modified| {
            let f = File::create(dir.path().join(name)).unwrap();
            f.set_modified(modified).unwrap();
        };
        make(".subnet.env.0123456789abcdef.tmp", old);
        make(
            ".subnet.env.fedcba9876543210.tmp",
            std::time::SystemTime::now(),
        );
        make(".subnet.env.not-ours.tmp", old);
        make(".other.0123456789abcdef.tmp", old);
        write_atomic(&dir.path().join("subnet.env"), b"A=1\n").unwrap();
        assert_eq!(
            entries(dir.path()),
            [
                ".other.0123456789abcdef.tmp",
                ".subnet.env.fedcba9876543210.tmp",
                ".subnet.env.not-ours.tmp",
                "subnet.env"
            ]
        );
    }

    #[test]
    fn a_link_planted_at_the_old_temporary_name_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "untouched").unwrap();
        // The name a fixed-name scheme would use, and one per process id.
        for planted in [
            ".subnet.env.tmp",
            &format!(".subnet.env.tmp.{}.0", std::process::id()),
        ] {
            std::os::unix::fs::symlink(&victim, dir.path().join(planted)).unwrap();
        }
        write_atomic(&dir.path().join("subnet.env"), b"A=1\n").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "untouched");
        assert_eq!(
            fs::read_to_string(dir.path().join("subnet.env")).unwrap(),
            "A=1\n"
        );
    }

    #[test]
    fn only_regular_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        fs::write(&file, "text").unwrap();
        assert_eq!(read_regular(&file, false).unwrap(), "text");

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_regular(&link, true).unwrap(), "text");
        let e = read_regular(&link, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("symbolic link"), "{e}");

        // A FIFO with no writer: a plain read would wait for one for ever.
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let e = read_regular(&fifo, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("FIFO"), "{e}");

        // A socket (one left by a dead process): opening it fails with ENXIO, an I/O error
        // that a caller would not take for a file of the wrong kind.
        let socket = dir.path().join("socket");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        for follow in [true, false] {
            let e = read_regular(&socket, follow).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains("socket"), "{e}");
        }

        let big = dir.path().join("big");
        fs::write(&big, vec![b' '; MAX_READ as usize + 1]).unwrap();
        let e = read_regular(&big, true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("larger than"), "{e}");
        fs::write(&big, vec![b' '; MAX_READ as usize]).unwrap();
        assert_eq!(read_regular(&big, true).unwrap().len(), MAX_READ as usize);

        let e = read_regular(dir.path(), true).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        assert_eq!(
            read_regular(&dir.path().join("missing"), true)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }
}
