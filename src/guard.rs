//! Guards that keep bad inputs from turning into lost files, silent wrong
//! numbers or exhausted memory (issue 11):
//!
//! - [`read_regular`]: only regular files are read as models, states,
//!   sidecars, checkpoints and kernel inputs (a FIFO would hang, `/dev/zero`
//!   would read until memory runs out).
//! - [`same_file`] / [`check_outputs`]: an output path is never an input
//!   path (compared by file identity: same device and inode, or the same
//!   canonical path for files that do not exist yet), and every output's
//!   directory exists and is writable before any work starts.
//! - [`check_finite`]: NaN / Inf in a loaded or exported tensor is an
//!   error, unless the process opted out with [`set_allow_nonfinite`]
//!   (the CLI's `--allow-nonfinite`).
//! - [`available_memory`]: what the host can still allocate, for checks
//!   of a problem's size before it is allocated.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{Error, Result};

static ALLOW_NONFINITE: AtomicBool = AtomicBool::new(false);

/// Lets NaN / Inf values through [`check_finite`] for the rest of the
/// process (the CLI's `--allow-nonfinite`; off by default).
pub fn set_allow_nonfinite(allow: bool) {
    ALLOW_NONFINITE.store(allow, Ordering::Relaxed);
}

/// Whether [`set_allow_nonfinite`] turned the check off.
pub fn allow_nonfinite() -> bool {
    ALLOW_NONFINITE.load(Ordering::Relaxed)
}

/// The first non-finite value of `data`: `(index, value)`.
pub fn first_nonfinite(data: &[f32]) -> Option<(usize, f32)> {
    data.iter()
        .position(|x| !x.is_finite())
        .map(|i| (i, data[i]))
}

/// Refuses NaN / Inf in `data` ([`Error::NonFinite`] naming `what` and the
/// first bad element), unless [`set_allow_nonfinite`] is on.
pub fn check_finite(what: &str, data: &[f32]) -> Result<()> {
    if allow_nonfinite() {
        return Ok(());
    }
    match first_nonfinite(data) {
        None => Ok(()),
        Some((index, value)) => Err(Error::NonFinite {
            what: what.to_string(),
            index,
            value,
        }),
    }
}

/// Reads a whole file, refusing anything that is not a regular file (a
/// directory, FIFO, socket or device such as `/dev/zero`) before opening it
/// for reading, and reading at most the size it had when checked.
pub fn read_regular(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !md.is_file() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("not a regular file ({})", kind_of(&md)),
            ),
        ));
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = md.len();
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(len)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

/// [`read_regular`] as UTF-8 text.
pub fn read_regular_string(path: &Path) -> Result<String> {
    let bytes = read_regular(path)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        )
    })
}

fn kind_of(md: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = md.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if md.is_dir() {
        "a directory"
    } else {
        "not a file"
    }
}

/// The canonical form of a path that may not exist yet: its parent
/// directory canonicalised, joined with its file name.
fn canonical_or_parent(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = std::fs::canonicalize(p) {
        return Some(c);
    }
    let name = p.file_name()?;
    let parent = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Some(std::fs::canonicalize(parent).ok()?.join(name))
}

/// Whether two paths name the same file: the same device and inode when
/// both exist (hard links and symlinks included), else the same canonical
/// path.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(x), Ok(y)) = (std::fs::metadata(a), std::fs::metadata(b)) {
            return x.dev() == y.dev() && x.ino() == y.ino();
        }
    }
    match (canonical_or_parent(a), canonical_or_parent(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// Checks a run's outputs against its inputs before any work starts:
/// no output is the same file as an input or as another output, and each
/// output's directory exists and accepts a new file (a probe file is
/// created and removed). `inputs` and `outputs` are `(flag, path)` pairs;
/// the flags name the paths in the messages ([`Error::Options`]).
pub fn check_outputs(inputs: &[(&str, &Path)], outputs: &[(&str, &Path)]) -> Result<()> {
    for (i, (of, op)) in outputs.iter().enumerate() {
        for (inf, ip) in inputs {
            if same_file(op, ip) {
                return Err(Error::Options(format!(
                    "{of} {} is the same file as {inf} {}: refusing to overwrite an input",
                    op.display(),
                    ip.display()
                )));
            }
        }
        for (of2, op2) in &outputs[..i] {
            if same_file(op, op2) {
                return Err(Error::Options(format!(
                    "{of} {} and {of2} {} are the same file: each output needs its own path",
                    op.display(),
                    op2.display()
                )));
            }
        }
        if op.is_dir() {
            return Err(Error::Options(format!(
                "{of} {} is a directory; give a file path",
                op.display()
            )));
        }
        probe_dir(of, op)?;
    }
    Ok(())
}

/// Creates and removes a probe file next to `path`, so a missing or
/// read-only directory fails now rather than after the work.
fn probe_dir(flag: &str, path: &Path) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::Options(format!(
            "{flag} {}: the directory {} does not exist",
            path.display(),
            dir.display()
        )));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let probe = dir.join(format!(".{name}.probe{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(f) => {
            drop(f);
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(Error::Options(format!(
            "{flag} {}: cannot create a file in {}: {e}",
            path.display(),
            dir.display()
        ))),
    }
}

/// Bytes free for an unprivileged user on the file system that holds
/// `path`'s directory (`statvfs`), or `None` where that is unknown.
pub fn free_space(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        // SAFETY: an all-zero `statvfs` is a valid value of this plain C
        // struct (integers only).
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a NUL-terminated path that outlives the call and
        // `st` is a valid, writable `statvfs`.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        #[allow(clippy::unnecessary_cast)] // the field types differ by platform
        let free = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64);
        Some(free)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Refuses to start when the file system of `path` has less free space
/// than `bytes` (what the output will take, estimated); `flag` names the
/// output in the message.
pub fn check_free_space(flag: &str, path: &Path, bytes: u64) -> Result<()> {
    if let Some(free) = free_space(path) {
        if bytes > free {
            return Err(Error::Options(format!(
                "{flag} {}: about {} bytes will be written but only {free} bytes are free there",
                path.display(),
                bytes
            )));
        }
    }
    Ok(())
}

/// Bytes the host can still allocate (`MemAvailable` of `/proc/meminfo`),
/// or `None` where that is unknown.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Refuses a plan that needs more than the host has available
/// ([`available_memory`]); `what` names the plan in the message.
pub fn check_host_memory(what: &str, bytes: u64) -> Result<()> {
    if let Some(avail) = available_memory() {
        if bytes > avail {
            return Err(Error::Invalid(format!(
                "{what} needs {:.1} GiB of memory but only {:.1} GiB is available",
                bytes as f64 / (1u64 << 30) as f64,
                avail as f64 / (1u64 << 30) as f64
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_regular_files() {
        let dir = std::env::temp_dir().join(format!("rwkv-tune-guard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = dir.join("a.bin");
        std::fs::write(&a, b"x").unwrap();
        let b = dir.join("sub/../a.bin");
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        assert!(same_file(&a, &b));
        assert!(!same_file(&a, &dir.join("new.bin")));
        assert!(same_file(&dir.join("new.bin"), &dir.join("sub/../new.bin")));
        #[cfg(unix)]
        {
            let l = dir.join("link.bin");
            std::os::unix::fs::symlink(&a, &l).unwrap();
            assert!(same_file(&a, &l));
            assert!(read_regular(Path::new("/dev/zero")).is_err());
        }
        assert!(read_regular(&dir).is_err());
        assert_eq!(read_regular(&a).unwrap(), b"x");
        let e = check_outputs(&[("--model", &a)], &[("--out", &b)]).unwrap_err();
        assert!(e.to_string().contains("same file"), "{e}");
        let e = check_outputs(&[], &[("--out", &dir.join("nope/x.bin"))]).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(check_outputs(&[("--model", &a)], &[("--out", &dir.join("o.bin"))]).is_ok());
        #[cfg(unix)]
        {
            assert!(free_space(&dir.join("o.bin")).is_some_and(|f| f > 0));
            assert!(check_free_space("--out", &dir.join("o.bin"), u64::MAX).is_err());
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn finite_check() {
        assert!(check_finite("x", &[1.0, 2.0]).is_ok());
        let e = check_finite("x", &[1.0, f32::NAN]).unwrap_err();
        assert!(e.to_string().contains("x"), "{e}");
    }
}
