//! Looking at the workspace: walking (part of) the tree under the ignore rules, and
//! hashing files. Blocking code: callers run it on the blocking pool.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use md5::{Digest, Md5};

use super::rules::Rules;

/// What a round compares with the manifest: size, mtime (ns) and permission bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub size: u64,
    pub mtime: i64,
    pub mode: u32,
}

impl Stat {
    pub fn of(m: &std::fs::Metadata) -> Self {
        Self {
            size: m.len(),
            // Nanoseconds in an i64 reach from 1677 to 2262: a time beyond is kept as
            // the nearest end (not wrapped round to the other one).
            mtime: m
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            mode: m.permissions().mode() & 0o7777,
        }
    }
}

#[cfg(test)]
mod stat_tests {
    use super::*;

    #[test]
    fn times_beyond_what_nanoseconds_hold_are_kept_at_the_nearest_end() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        // (ext4 keeps times from 1901 to 2446: the far past cannot be set here.)
        let year = |y: i64| (y - 1970) * 365 * 86_400;
        for (secs, expected) in [
            (year(2300), i64::MAX),
            (-1, -1_000_000_000 + 5),
            (year(2200), year(2200) * 1_000_000_000 + 5),
        ] {
            let t = if secs >= 0 {
                std::time::UNIX_EPOCH + std::time::Duration::new(secs as u64, 5)
            } else {
                std::time::UNIX_EPOCH - std::time::Duration::new(secs.unsigned_abs(), 0)
                    + std::time::Duration::from_nanos(5)
            };
            let file = std::fs::File::options().write(true).open(&f).unwrap();
            file.set_modified(t).unwrap();
            let meta = std::fs::metadata(&f).unwrap();
            if meta.mtime() != secs && secs > year(2038) {
                eprintln!("this file system cannot keep {secs}: not checked");
                continue;
            }
            assert_eq!(Stat::of(&meta).mtime, expected, "{secs}");
        }
    }
}

/// Why entries were left out of the mirror.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Sockets, FIFOs, devices.
    pub special: u64,
    /// Larger than `sync.max_file_bytes`.
    pub too_large: u64,
    /// Names that are not UTF-8 or whose remote key would not fit.
    pub bad_name: u64,
    /// Directories the daemon may not read (what the mirror holds of them is kept).
    pub unreadable: u64,
}

impl Skipped {
    pub fn total(&self) -> u64 {
        self.special + self.too_large + self.bad_name + self.unreadable
    }
}

/// What was seen under the `covered` paths ("" = the whole tree).
#[derive(Debug, Default)]
pub struct Observation {
    pub files: BTreeMap<String, Stat>,
    pub symlinks: BTreeMap<String, String>,
    pub empty_dirs: BTreeSet<String>,
    /// Directories known to hold mirrored entries now (so not empty).
    pub non_empty_dirs: BTreeSet<String>,
    pub covered: Vec<String>,
    /// Paths under `covered` whose content is not looked at (directories that
    /// could not be read, files over the size limit): what the mirror holds of them
    /// stays as it is, nothing under them counts as gone.
    pub kept: Vec<String>,
    pub skipped: Skipped,
}

pub struct Limits {
    pub max_file_bytes: u64,
    /// Length of the key prefix before a workspace path (`.../workspace/files/`).
    pub key_prefix_len: usize,
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Whether `rel` can be a remote key of the mirror: short enough, without control
/// characters. What cannot is skipped (and a restore leaves it alone).
pub(crate) fn key_fits(limits: &Limits, rel: &str) -> bool {
    limits.key_prefix_len + rel.len() <= crate::remote::MAX_KEY_BYTES
        && crate::remote::key_fits(rel)
}

/// Whether `rel` has a control character (a newline, `\x01`...): S3 carries object
/// keys in XML, where most of them cannot be written (a listing naming one fails to
/// parse, a batch delete of one is refused) and a carriage return reads back as a newline.
fn has_control(rel: &str) -> bool {
    rel.chars().any(char::is_control)
}

const CONTROL_SKIPPED: &str =
    "its name has a control character, which S3 listings and deletes cannot carry in a key";

/// Whether anything in the directory `rel` could have a remote key: a directory whose
/// path is that long is not even read (one deeper than the system's path limit could
/// not be, and would stop the round).
fn dir_fits(limits: &Limits, rel: &str) -> bool {
    limits.key_prefix_len + rel.len() + "/x".len() <= crate::remote::MAX_KEY_BYTES
}

/// Whether reading a directory failed in a way that is that directory's alone: no
/// permission, or a path longer than the system takes (a workspace root with a long
/// path of its own). Not so for the root, whose failure stops the mirror.
fn unreadable_here(e: &std::io::Error, rel: &str) -> bool {
    !rel.is_empty()
        && matches!(
            e.kind(),
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidFilename
        )
}

/// Skips the directory `rel`, which the daemon may not read or enter: counted, and
/// what the mirror holds of it kept. Returns that it counts as mirrored.
fn skip_unreadable(obs: &mut Observation, rel: &str, e: &std::io::Error) -> bool {
    tracing::warn!(path = rel, error = %e, "skipped: cannot read this directory; what the mirror holds of it is kept");
    obs.skipped.unreadable += 1;
    obs.kept.push(rel.to_string());
    obs.non_empty_dirs.insert(rel.to_string());
    true
}

/// Records one entry; recurses into directories. Returns whether the entry is
/// mirrored (so its parent is not empty).
fn visit(
    rules: &Rules,
    limits: &Limits,
    rel: &str,
    meta: &std::fs::Metadata,
    obs: &mut Observation,
) -> std::io::Result<bool> {
    let ft = meta.file_type();
    let abs = rules.root().join(rel);
    if ft.is_dir() {
        if !rel.is_empty() && rules.is_ignored(Path::new(rel), true) {
            return Ok(false);
        }
        if has_control(rel) {
            obs.skipped.bad_name += 1;
            tracing::warn!(path = rel, "skipped: {CONTROL_SKIPPED}");
            return Ok(false);
        }
        if !dir_fits(limits, rel) {
            obs.skipped.bad_name += 1;
            tracing::warn!(
                path = rel,
                "skipped: a directory so deep that nothing in it could have a remote key of at most 1024 bytes"
            );
            return Ok(false);
        }
        let mut any = false;
        let entries = match std::fs::read_dir(&abs) {
            Ok(e) => e,
            // Removed while walking: nothing there. Replaced by a file since it was
            // listed: the directory is gone just the same, and what took its place
            // is looked at next round (its event is pending).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory && !rel.is_empty() => {
                return Ok(false);
            }
            // One directory the daemon may not read does not stop the mirror (the
            // root does: see `observe`).
            Err(e) if unreadable_here(&e, rel) => return Ok(skip_unreadable(obs, rel, &e)),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                obs.skipped.bad_name += 1;
                continue;
            };
            let child = join(rel, &name);
            let m = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // Listed but not entered (no search permission): as unreadable.
                Err(e) if unreadable_here(&e, rel) => return Ok(skip_unreadable(obs, rel, &e)),
                Err(e) => return Err(e),
            };
            any |= visit(rules, limits, &child, &m, obs)?;
        }
        if !rel.is_empty() {
            if any {
                obs.non_empty_dirs.insert(rel.to_string());
            } else {
                obs.empty_dirs.insert(rel.to_string());
            }
        }
        // An empty directory is itself mirrored (as an entry of empty_dirs).
        return Ok(true);
    }
    if rules.is_ignored(Path::new(rel), false) {
        return Ok(false);
    }
    if has_control(rel) {
        obs.skipped.bad_name += 1;
        tracing::warn!(path = rel, "skipped: {CONTROL_SKIPPED}");
        return Ok(false);
    }
    if !key_fits(limits, rel) {
        obs.skipped.bad_name += 1;
        tracing::warn!(
            path = rel,
            "skipped: its remote key would exceed 1024 bytes or a segment 255"
        );
        return Ok(false);
    }
    if ft.is_symlink() {
        match std::fs::read_link(&abs) {
            Ok(target) => match target.to_str() {
                Some(t) => {
                    obs.symlinks.insert(rel.to_string(), t.to_string());
                    return Ok(true);
                }
                None => obs.skipped.bad_name += 1,
            },
            // Gone, or no longer a symlink (EINVAL): as a directory replaced above.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidInput
                ) => {}
            Err(e) => return Err(e),
        }
        return Ok(false);
    }
    if ft.is_file() {
        if meta.len() > limits.max_file_bytes {
            obs.skipped.too_large += 1;
            obs.kept.push(rel.to_string());
            tracing::warn!(
                path = rel,
                size = meta.len(),
                limit = limits.max_file_bytes,
                "skipped: larger than sync.max_file_bytes (what the mirror holds of it is kept)"
            );
            return Ok(false);
        }
        obs.files.insert(rel.to_string(), Stat::of(meta));
        return Ok(true);
    }
    obs.skipped.special += 1;
    Ok(false)
}

/// Looks at the whole tree (`full`) or at the given paths and what lies under them.
pub fn observe(
    rules: &Rules,
    limits: &Limits,
    paths: &BTreeSet<String>,
    full: bool,
) -> std::io::Result<Observation> {
    let mut obs = Observation::default();
    if full {
        let meta = std::fs::metadata(rules.root())?;
        visit(rules, limits, "", &meta, &mut obs)?;
        obs.covered.push(String::new());
        return Ok(obs);
    }
    let mut parents = BTreeSet::new();
    for rel in paths {
        if rel.is_empty() {
            continue;
        }
        if let Some((parent, _)) = rel.rsplit_once('/') {
            parents.insert(parent.to_string());
        }
        obs.covered.push(rel.clone());
        match std::fs::symlink_metadata(rules.root().join(rel)) {
            Ok(m) => {
                visit(rules, limits, rel, &m, &mut obs)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {}
            // Deeper than the system's path limit: nothing there has a remote key.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidFilename => {
                obs.skipped.bad_name += 1;
            }
            Err(e) => return Err(e),
        }
    }
    // A change inside a directory can make it empty or not empty.
    for parent in parents {
        if obs.empty_dirs.contains(&parent) || obs.non_empty_dirs.contains(&parent) {
            continue;
        }
        let abs = rules.root().join(&parent);
        match std::fs::read_dir(&abs) {
            Ok(entries) => {
                let mut any = false;
                for entry in entries.flatten() {
                    let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                        continue;
                    };
                    let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                    if !rules.is_ignored(Path::new(&join(&parent, &name)), is_dir) {
                        any = true;
                        break;
                    }
                }
                if any {
                    obs.non_empty_dirs.insert(parent);
                } else if !rules.is_ignored(Path::new(&parent), true) {
                    obs.empty_dirs.insert(parent);
                }
            }
            Err(_) => {
                obs.non_empty_dirs.insert(parent);
            }
        }
    }
    Ok(obs)
}

/// A file's content hash (`blake3:<hex>`), its MD5 (for upload verification), and
/// whether it stayed the same while being read.
#[derive(Debug)]
pub struct Hashed {
    pub hash: String,
    pub md5: [u8; 16],
    pub stat: Stat,
    /// The file did not change while it was read (a copy holds one version either way).
    pub stable: bool,
}

/// Hashes `path`, reading at most `limit` bytes: a file that grew past the size
/// limit since the scan is an error of kind `FileTooLarge` (the next scan skips it).
pub fn hash_file(root: &Path, rel: &str, limit: u64) -> std::io::Result<Hashed> {
    read_hashed(root, rel, None, limit)
}

/// Copies `path` to `to` (a new file), hashing what it copies: a file that keeps
/// changing while it is read is uploaded from such a copy, which is one version of it
/// (the `stat` returned has the copy's size and the original's mtime and mode).
/// Like [`hash_file`], the copy stops at `limit` bytes.
pub fn copy_hashed(root: &Path, rel: &str, to: &Path, limit: u64) -> std::io::Result<Hashed> {
    use std::os::unix::fs::OpenOptionsExt;
    // Readable by the daemon only, whatever the original's mode.
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    read_hashed(root, rel, Some(out), limit)
}

/// Reads `rel` below `root` through real directories only ([`crate::open_beneath`]):
/// what a sandbox process swaps for a symlink during a round is not read through.
fn read_hashed(
    root: &Path,
    rel: &str,
    mut copy: Option<std::fs::File>,
    limit: u64,
) -> std::io::Result<Hashed> {
    use std::io::Write;
    let path = root.join(rel);
    let path = path.as_path();
    let mut f = crate::open_beneath(root, rel)?;
    let before = Stat::of(&f.metadata()?);
    let mut b3 = blake3::Hasher::new();
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if size + n as u64 > limit {
            return Err(std::io::Error::new(
                std::io::ErrorKind::FileTooLarge,
                format!(
                    "{} grew over the size limit ({limit} bytes)",
                    path.display()
                ),
            ));
        }
        b3.update(&buf[..n]);
        md5.update(&buf[..n]);
        if let Some(out) = copy.as_mut() {
            out.write_all(&buf[..n])?;
        }
        size += n as u64;
    }
    let hash = format!("blake3:{}", b3.finalize().to_hex());
    let md5 = md5.finalize().into();
    let after = std::fs::symlink_metadata(path).map(|m| Stat::of(&m)).ok();
    let stable = after == Some(before);
    // A copy's size is what it holds; the time and mode are the original's from
    // before, so that a change during the copy is seen as one by the next scan.
    let stat = match copy {
        Some(_) => Stat { size, ..before },
        None => before,
    };
    Ok(Hashed {
        hash,
        md5,
        stat,
        stable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn full_and_partial_observation() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let w = |p: &str, s: &str| {
            let f = root.join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, s).unwrap();
        };
        w("a.txt", "a");
        w("src/lib.rs", "x");
        w("node_modules/m/i.js", "y");
        w(".gitignore", "*.log\n");
        w("debug.log", "z");
        w(".git/HEAD", "ref");
        std::fs::create_dir_all(root.join("empty/inner")).unwrap();
        symlink("a.txt", root.join("link")).unwrap();
        nix_mkfifo(&root.join("fifo"));
        let rules = Rules::new(&root, &["node_modules/".to_string()]).unwrap();
        let limits = Limits {
            max_file_bytes: 1 << 20,
            key_prefix_len: 40,
        };
        let obs = observe(&rules, &limits, &BTreeSet::new(), true).unwrap();
        let files: Vec<&str> = obs.files.keys().map(String::as_str).collect();
        assert_eq!(files, vec![".gitignore", "a.txt", "src/lib.rs"]);
        assert_eq!(obs.symlinks.get("link").map(String::as_str), Some("a.txt"));
        assert!(obs.empty_dirs.contains("empty/inner"));
        assert!(!obs.empty_dirs.contains("empty"), "holds an empty dir");
        assert_eq!(obs.skipped.special, 1);

        std::fs::remove_file(root.join("src/lib.rs")).unwrap();
        let paths: BTreeSet<String> = ["src/lib.rs".to_string()].into();
        let obs = observe(&rules, &limits, &paths, false).unwrap();
        assert!(obs.files.is_empty());
        assert_eq!(obs.covered, vec!["src/lib.rs"]);
        assert!(obs.empty_dirs.contains("src"), "src became empty");
    }

    fn nix_mkfifo(path: &Path) {
        let status = std::process::Command::new("mkfifo")
            .arg(path)
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn hash_is_stable_and_correct() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        let h = hash_file(dir.path(), "f", u64::MAX).unwrap();
        assert!(h.stable);
        assert_eq!(
            h.hash,
            format!("blake3:{}", blake3::hash(b"hello").to_hex())
        );
        assert_eq!(hex::encode(h.md5), "5d41402abc4b2a76b9719d911017c592");
        assert_eq!(h.stat.size, 5);
        // Grown past the limit since the scan: neither read nor copied whole.
        let err = hash_file(dir.path(), "f", 4).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge, "{err}");
        let err = copy_hashed(dir.path(), "f", &dir.path().join("copy"), 4).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::FileTooLarge, "{err}");
        assert!(
            hash_file(dir.path(), "f", 5).is_ok(),
            "the limit itself is allowed"
        );
    }

    /// A directory replaced by a file, or a symlink by a file, between its listing and
    /// its reading is gone for this walk, not an error that would fail the whole round
    /// (and call the workspace unavailable).
    #[test]
    fn an_entry_that_changes_type_mid_walk_does_not_fail_the_walk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        symlink("d", root.join("l")).unwrap();
        let dir_meta = std::fs::symlink_metadata(root.join("d")).unwrap();
        let link_meta = std::fs::symlink_metadata(root.join("l")).unwrap();
        std::fs::remove_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d"), "now a file").unwrap();
        std::fs::remove_file(root.join("l")).unwrap();
        std::fs::write(root.join("l"), "now a file").unwrap();
        let rules = Rules::new(&root, &[]).unwrap();
        let limits = Limits {
            max_file_bytes: 1 << 20,
            key_prefix_len: 40,
        };
        let mut obs = Observation::default();
        assert!(!visit(&rules, &limits, "d", &dir_meta, &mut obs).unwrap());
        assert!(!visit(&rules, &limits, "l", &link_meta, &mut obs).unwrap());
        assert!(obs.files.is_empty() && obs.symlinks.is_empty() && obs.kept.is_empty());
    }

    /// A file replaced by a FIFO or a symlink after the scan saw it is refused at once:
    /// not blocked on (a FIFO nobody writes), not followed (to `/dev/zero`, read
    /// forever, or to a file outside the workspace); so is a file below a directory
    /// swapped for a symlink to a directory outside.
    #[test]
    fn a_path_that_is_no_longer_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("f"), "secret").unwrap();
        symlink(&elsewhere, dir.path().join("swapped")).unwrap();
        assert!(hash_file(dir.path(), "swapped/f", u64::MAX).is_err());
        assert!(copy_hashed(dir.path(), "swapped/f", &dir.path().join("c"), u64::MAX).is_err());
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/f"), "ok").unwrap();
        assert_eq!(
            hash_file(dir.path(), "real/f", u64::MAX).unwrap().stat.size,
            2
        );
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let zero = dir.path().join("zero");
        symlink("/dev/zero", &zero).unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, "secret").unwrap();
        let link = dir.path().join("link");
        symlink(&outside, &link).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let paths = [fifo, zero, link];
        let copies = dir.path().to_path_buf();
        std::thread::spawn(move || {
            for (i, p) in paths.iter().enumerate() {
                let (root, name) = (
                    p.parent().unwrap(),
                    p.file_name().unwrap().to_str().unwrap(),
                );
                let hashed = hash_file(root, name, u64::MAX).map(|_| ());
                let copied =
                    copy_hashed(root, name, &copies.join(format!("copy{i}")), u64::MAX).map(|_| ());
                tx.send((p.clone(), hashed, copied)).unwrap();
            }
        });
        for _ in 0..3 {
            let (p, hashed, copied) = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("hashing blocked");
            assert!(hashed.is_err() && copied.is_err(), "{}", p.display());
        }
    }
}
