//! The `dir` backend: a local directory laid out exactly like the bucket. Writes go to a
//! temporary file that is fsynced, renamed into place, and the directory fsynced, so a
//! crash leaves either the old object or the new one. Temporary files live in
//! `<root>/.sandkeep-tmp/`, apart from the objects: any object name is a valid file name
//! in a workspace, so no name pattern beside the objects could tell them apart.
//!
//! Conditional writes ([`Remote::put_bytes_if`]) compare and write under an exclusive
//! `flock` on `<root>/.sandkeep-lock`, so they are atomic between every process that
//! shares the directory (on a local file system; network file systems only as far as
//! their `flock` is). The ETag of an object is the hex MD5 of its content.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use md5::{Digest, Md5};

use super::{ListPage, ObjectInfo, Precondition, Remote, RemoteError};

/// The directory of temporary files, at the root; never listed.
const TMP_DIR: &str = ".sandkeep-tmp";
/// The lock file of conditional writes, at the root; never listed.
const LOCK_FILE: &str = ".sandkeep-lock";
/// The names at the root that are this remote's own, never keys.
pub const RESERVED: [&str; 2] = [TMP_DIR, LOCK_FILE];
const PAGE: usize = 1000;

/// A streamed upload's temporary file, removed unless the upload finished: also when
/// the upload is given up (its future dropped, as a snapshot is at a stop), which
/// would otherwise leave it in [`TMP_DIR`] for good.
struct TmpFile(Option<PathBuf>);

impl Drop for TmpFile {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub struct DirRemote {
    root: PathBuf,
}

impl DirRemote {
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The file of `key`; keys with `..`, `.` or empty segments are refused, and so
    /// are the remote's own files at the root (the lock and the temporary files).
    fn path_of(&self, op: &'static str, key: &str) -> Result<PathBuf, RemoteError> {
        let rel = Path::new(key);
        let first = key.split('/').next().unwrap_or_default();
        let ok = !key.is_empty()
            && !key.contains("//")
            && !key.ends_with('/')
            && !RESERVED.contains(&first)
            && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !ok {
            return Err(RemoteError::Service {
                op,
                key: key.into(),
                message: "invalid key for a dir remote".into(),
            });
        }
        Ok(self.root.join(rel))
    }

    /// What an I/O error reading the remote side means: `None` for a missing object;
    /// else the remote failing. A root that vanished (an unmounted volume) or an I/O
    /// error (a network filesystem gone) is an outage, as a 5xx is on S3: callers try
    /// again. A refused permission is the service refusing.
    fn read_failure(&self, op: &'static str, key: &str, e: std::io::Error) -> Option<RemoteError> {
        let key = key.to_string();
        if matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
        ) {
            if self.root.is_dir() {
                return None;
            }
            let message = format!(
                "the dir remote's root {} is missing (an unmounted volume?)",
                self.root.display()
            );
            return Some(RemoteError::Transport { op, key, message });
        }
        let message = e.to_string();
        Some(if e.kind() == std::io::ErrorKind::PermissionDenied {
            RemoteError::Service { op, key, message }
        } else {
            RemoteError::Transport { op, key, message }
        })
    }

    /// Creates the directory `parent` of an object, below a root that must exist: a
    /// root that vanished (an unmounted volume) is an outage, not something to build
    /// again with only the objects written from now on.
    fn make_parent(&self, key: &str, parent: &Path) -> Result<(), RemoteError> {
        if !self.root.is_dir() {
            return Err(RemoteError::Transport {
                op: "put",
                key: key.into(),
                message: format!(
                    "the dir remote's root {} is missing (an unmounted volume?)",
                    self.root.display()
                ),
            });
        }
        std::fs::create_dir_all(parent).map_err(|e| RemoteError::local("put", parent, e))
    }

    /// A new temporary file's path, in [`TMP_DIR`] (made if missing). Its name does
    /// not repeat the object's: a name of 255 bytes (the most a file system allows)
    /// must still get a temporary file.
    fn new_tmp(&self) -> Result<PathBuf, RemoteError> {
        let dir = self.root.join(TMP_DIR);
        // Not `create_dir_all`: a root that vanished is not built again (`make_parent`).
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(RemoteError::local("put", &dir, e));
            }
            _ => {}
        }
        Ok(dir.join(format!("{:016x}", rand::random::<u64>())))
    }

    /// Renames the finished temporary file into place. Its directory may have been
    /// removed meanwhile (a delete of its last other object): made again, once.
    fn rename_into(
        &self,
        key: &str,
        tmp: &Path,
        dest: &Path,
        parent: &Path,
    ) -> Result<(), RemoteError> {
        match std::fs::rename(tmp, dest) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && tmp.exists() => {
                self.make_parent(key, parent)?;
                std::fs::rename(tmp, dest)
            }
            other => other,
        }
        .map_err(|e| RemoteError::local("put", dest, e))
    }

    fn write_atomic(
        &self,
        key: &str,
        fill: impl FnOnce(&mut std::fs::File) -> Result<(), RemoteError>,
    ) -> Result<(), RemoteError> {
        let dest = self.path_of("put", key)?;
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        self.make_parent(key, &parent)?;
        let tmp = self.new_tmp()?;
        let result = (|| {
            let mut f =
                std::fs::File::create(&tmp).map_err(|e| RemoteError::local("put", &tmp, e))?;
            fill(&mut f)?;
            f.sync_all()
                .map_err(|e| RemoteError::local("put", &tmp, e))?;
            self.rename_into(key, &tmp, &dest, &parent)?;
            std::fs::File::open(&parent)
                .and_then(|d| d.sync_all())
                .map_err(|e| RemoteError::local("put", &parent, e))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn list_sync(&self, prefix: &str, token: Option<String>) -> Result<ListPage, RemoteError> {
        // Start at the deepest directory the prefix names.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_part.is_empty() {
            self.root.clone()
        } else {
            self.path_of("list", dir_part)?
        };
        // Each page walks the tree again: what comes at or before the token (the last
        // key of the previous page) is passed over unread, and only the page's own
        // objects are looked at (their size and time).
        let after = |key: &str| token.as_deref().is_none_or(|t| key > t);
        // Objects deleted while listing are simply not listed.
        let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
        let mut found: Vec<(String, PathBuf)> = Vec::new();
        let mut stack = vec![start];
        while let Some(dir) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) => match self.read_failure("list", prefix, e) {
                    None => continue,
                    Some(failure) => return Err(failure),
                },
            };
            for entry in entries {
                let entry = entry.map_err(|e| RemoteError::local("list", &dir, e))?;
                let path = entry.path();
                let ft = match entry.file_type() {
                    Ok(ft) => ft,
                    Err(e) if gone(&e) => continue,
                    Err(e) => return Err(RemoteError::local("list", &path, e)),
                };
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let Some(key) = rel.to_str().map(str::to_string) else {
                    continue;
                };
                if ft.is_dir() {
                    let as_dir = format!("{key}/");
                    // Every key below `d/` sorts before a token past `d/` that does
                    // not start with it.
                    let passed = token
                        .as_deref()
                        .is_some_and(|t| t > as_dir.as_str() && !t.starts_with(&as_dir));
                    if key != TMP_DIR
                        && !passed
                        && (as_dir.starts_with(prefix) || prefix.starts_with(&as_dir))
                    {
                        stack.push(path);
                    }
                } else if ft.is_file() && key.starts_with(prefix) && key != LOCK_FILE && after(&key)
                {
                    found.push((key, path));
                }
            }
        }
        found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let more = found.len() > PAGE;
        found.truncate(PAGE);
        // The next page starts after the last key of this one, listed or not.
        let next = more.then(|| found.last().map(|(k, _)| k.clone())).flatten();
        let mut objects = Vec::with_capacity(found.len());
        for (key, path) in found {
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => m,
                // Deleted (or replaced) since it was seen: not listed.
                Ok(_) => continue,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(RemoteError::local("list", &path, e)),
            };
            objects.push(ObjectInfo {
                key,
                size: meta.len(),
                last_modified: meta.modified().ok(),
                etag: None,
            });
        }
        Ok(ListPage { objects, next })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, RemoteError> + Send + 'static,
) -> Result<T, RemoteError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RemoteError::Transport {
            op: "blocking",
            key: String::new(),
            message: e.to_string(),
        })?
}

impl DirRemote {
    fn clone_root(&self) -> Self {
        Self {
            root: self.root.clone(),
        }
    }

    /// The compare and the write of [`Remote::put_bytes_if`], under the lock.
    fn put_if_sync(
        &self,
        key: &str,
        data: &[u8],
        cond: &Precondition,
    ) -> Result<String, RemoteError> {
        let dest = self.path_of("put", key)?;
        let lock_path = self.root.join(LOCK_FILE);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| RemoteError::local("lock", &lock_path, e))?;
        // Held until `lock` is dropped at the end of this function.
        lock.lock()
            .map_err(|e| RemoteError::local("lock", &lock_path, e))?;
        // The object there is hashed as it is read, never held whole: it may be large.
        let current = match std::fs::File::open(&dest) {
            Ok(f) => Some(f),
            Err(e) => match self.read_failure("put", key, e) {
                None => None,
                Some(failure) => return Err(failure),
            },
        };
        let holds = match (cond, current) {
            (Precondition::Absent, None) => true,
            (Precondition::Matches(etag), Some(mut f)) => {
                let md5 = super::md5_of(&mut f).map_err(|e| RemoteError::Transport {
                    op: "put",
                    key: key.into(),
                    message: e.to_string(),
                })?;
                hex::encode(md5) == *etag
            }
            _ => false,
        };
        if !holds {
            return Err(RemoteError::PreconditionFailed { key: key.into() });
        }
        self.write_atomic(key, |f| {
            f.write_all(data)
                .map_err(|e| RemoteError::local("put", &dest, e))
        })?;
        Ok(super::md5_etag(data))
    }
}

/// An object's ETag here is the hex MD5 of its content ([`super::md5_etag`]), as S3
/// has it for single-part uploads.
#[async_trait]
impl Remote for DirRemote {
    async fn put_file(&self, key: &str, path: &Path, md5: [u8; 16]) -> Result<u64, RemoteError> {
        let this = self.clone_root();
        let (key, path) = (key.to_string(), path.to_path_buf());
        blocking(move || {
            let mut src =
                crate::open_regular(&path).map_err(|e| RemoteError::local("put", &path, e))?;
            let mut size = 0u64;
            this.write_atomic(&key, |dst| {
                let mut hasher = Md5::new();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = src
                        .read(&mut buf)
                        .map_err(|e| RemoteError::local("put", &path, e))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    dst.write_all(&buf[..n])
                        .map_err(|e| RemoteError::local("put", &this.root.join(&key), e))?;
                    size += n as u64;
                }
                if <[u8; 16]>::from(hasher.finalize()) != md5 {
                    return Err(RemoteError::Changed { key: key.clone() });
                }
                Ok(())
            })?;
            Ok(size)
        })
        .await
    }

    async fn put_stream(
        &self,
        key: &str,
        mut reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<u64, RemoteError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dest = self.path_of("put", key)?;
        let parent = dest.parent().unwrap_or(&self.root).to_path_buf();
        self.make_parent(key, &parent)?;
        let tmp = self.new_tmp()?;
        let mut guard = TmpFile(Some(tmp.clone()));
        let result = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| RemoteError::local("put", &tmp, e))?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut size = 0u64;
            loop {
                let n = reader
                    .read(&mut buf)
                    .await
                    .map_err(|source| RemoteError::Source {
                        key: key.to_string(),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                f.write_all(&buf[..n])
                    .await
                    .map_err(|e| RemoteError::local("put", &tmp, e))?;
                size += n as u64;
            }
            f.sync_all()
                .await
                .map_err(|e| RemoteError::local("put", &tmp, e))?;
            drop(f);
            let (this, key_owned) = (self.clone_root(), key.to_string());
            let (t, d, p) = (tmp.clone(), dest.clone(), parent.clone());
            blocking(move || this.rename_into(&key_owned, &t, &d, &p)).await?;
            let dir = parent.clone();
            blocking(move || {
                std::fs::File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| RemoteError::local("put", &dir, e))
            })
            .await?;
            Ok(size)
        }
        .await;
        if result.is_ok() {
            guard.0 = None;
        }
        result
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), RemoteError> {
        let this = self.clone_root();
        let key = key.to_string();
        blocking(move || {
            this.write_atomic(&key, |f| {
                f.write_all(&data)
                    .map_err(|e| RemoteError::local("put", Path::new(&key), e))
            })
        })
        .await
    }

    async fn put_bytes_if(
        &self,
        key: &str,
        data: Bytes,
        cond: Precondition,
    ) -> Result<String, RemoteError> {
        let this = self.clone_root();
        let key = key.to_string();
        blocking(move || this.put_if_sync(&key, &data, &cond)).await
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<u64, RemoteError> {
        let src = self.path_of("get", key)?;
        let this = self.clone_root();
        let (key, dest) = (key.to_string(), dest.to_path_buf());
        blocking(move || {
            let mut f = match std::fs::File::open(&src) {
                Ok(f) => f,
                Err(e) => {
                    return Err(this
                        .read_failure("get", &key, e)
                        .unwrap_or(RemoteError::NotFound { op: "get", key }));
                }
            };
            let mut out =
                std::fs::File::create(&dest).map_err(|e| RemoteError::local("get", &dest, e))?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut n = 0u64;
            loop {
                use std::io::{Read, Write};
                let got = match f.read(&mut buf) {
                    Ok(0) => return Ok(n),
                    Ok(got) => got,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let key = key.clone();
                        let message = e.to_string();
                        return Err(RemoteError::Transport {
                            op: "get",
                            key,
                            message,
                        });
                    }
                };
                out.write_all(&buf[..got])
                    .map_err(|e| RemoteError::local("get", &dest, e))?;
                n += got as u64;
            }
        })
        .await
    }

    async fn get_bytes_within(&self, key: &str, max: u64) -> Result<Option<Bytes>, RemoteError> {
        let src = self.path_of("get", key)?;
        let this = self.clone_root();
        let key = key.to_string();
        blocking(move || {
            // `None`: over `max` (by its size, or by what was read if it grew since).
            let read = std::fs::File::open(&src).and_then(|f| {
                let size = f.metadata()?.len();
                if size > max {
                    return Ok(None);
                }
                let mut data = Vec::with_capacity(size as usize);
                f.take(max.saturating_add(1)).read_to_end(&mut data)?;
                Ok((data.len() as u64 <= max).then_some(data))
            });
            match read {
                Ok(Some(data)) => Ok(Some(Bytes::from(data))),
                Ok(None) => Err(RemoteError::TooLarge { key, max }),
                Err(e) => match this.read_failure("get", &key, e) {
                    None => Ok(None),
                    Some(failure) => Err(failure),
                },
            }
        })
        .await
    }

    async fn get_bytes_tagged(
        &self,
        key: &str,
        max: u64,
    ) -> Result<Option<(Bytes, String)>, RemoteError> {
        Ok(self.get_bytes_within(key, max).await?.map(|b| {
            let etag = super::md5_etag(&b);
            (b, etag)
        }))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, RemoteError> {
        let src = self.path_of("head", key)?;
        let this = self.clone_root();
        let key = key.to_string();
        blocking(move || match std::fs::metadata(&src) {
            Ok(m) if m.is_file() => Ok(Some(ObjectInfo {
                key,
                size: m.len(),
                last_modified: m.modified().ok(),
                etag: None,
            })),
            Ok(_) => Ok(None),
            Err(e) => match this.read_failure("head", &key, e) {
                None => Ok(None),
                Some(failure) => Err(failure),
            },
        })
        .await
    }

    async fn list(&self, prefix: &str, token: Option<String>) -> Result<ListPage, RemoteError> {
        let this = self.clone_root();
        let prefix = prefix.to_string();
        blocking(move || this.list_sync(&prefix, token)).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), RemoteError> {
        let paths = keys
            .iter()
            .map(|k| self.path_of("delete", k))
            .collect::<Result<Vec<_>, _>>()?;
        let root = self.root.clone();
        blocking(move || {
            for p in paths {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    // No object there: nothing, a directory of other objects (`a` when
                    // `a/b` was stored since), or a file where a parent would be.
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::NotFound
                                | std::io::ErrorKind::IsADirectory
                                | std::io::ErrorKind::NotADirectory
                        ) =>
                    {
                        continue;
                    }
                    Err(e) => return Err(RemoteError::local("delete", &p, e)),
                }
                // Remove directories left empty, like a bucket has no directories.
                let mut dir = p.parent().map(Path::to_path_buf);
                while let Some(d) = dir {
                    if d == root || std::fs::remove_dir(&d).is_err() {
                        break;
                    }
                    dir = d.parent().map(Path::to_path_buf);
                }
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_root_that_vanished_is_an_outage_not_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("mnt");
        let remote = DirRemote::new(&root).unwrap();
        remote
            .put_bytes("a/b", Bytes::from_static(b"1"))
            .await
            .unwrap();
        std::fs::rename(&root, dir.path().join("away")).unwrap();
        let err = remote
            .put_bytes("a/c", Bytes::from_static(b"2"))
            .await
            .unwrap_err();
        assert!(matches!(err, RemoteError::Transport { .. }), "{err}");
        let reader = Box::new(std::io::Cursor::new(b"3".to_vec()));
        assert!(remote.put_stream("a/d", reader).await.is_err());
        assert!(!root.exists(), "the root was built again");
        // Reads too: a missing root is no missing object (a restore, or the mirror
        // reading the manifest, would take it for an empty remote).
        let down = |r: Result<(), RemoteError>| matches!(r, Err(RemoteError::Transport { .. }));
        assert!(down(remote.get_bytes("a/b").await.map(|_| ())));
        assert!(down(remote.head("a/b").await.map(|_| ())));
        assert!(down(remote.list("a/", None).await.map(|_| ())));
        let dest = dir.path().join("dest");
        assert!(down(remote.get_to_file("a/b", &dest).await.map(|_| ())));
        std::fs::rename(dir.path().join("away"), &root).unwrap();
        assert_eq!(remote.get_bytes("a/missing").await.unwrap(), None);
        assert!(matches!(
            remote.get_to_file("a/missing", &dest).await,
            Err(RemoteError::NotFound { .. })
        ));
        remote
            .put_bytes("a/c", Bytes::from_static(b"2"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn names_of_255_bytes_are_stored_by_every_kind_of_put() {
        let dir = tempfile::tempdir().unwrap();
        let remote = DirRemote::new(dir.path()).unwrap();
        let name = "n".repeat(255);
        let bytes_key = format!("a/{name}");
        remote
            .put_bytes(&bytes_key, Bytes::from_static(b"one"))
            .await
            .unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"two").unwrap();
        let file_key = format!("b/{name}");
        let md5 = <[u8; 16]>::from(Md5::digest(b"two"));
        remote.put_file(&file_key, &src, md5).await.unwrap();
        let stream_key = format!("c/{name}");
        let reader = Box::new(std::io::Cursor::new(b"three".to_vec()));
        remote.put_stream(&stream_key, reader).await.unwrap();
        let got = |k: String| {
            let remote = &remote;
            async move { remote.get_bytes(&k).await.unwrap().unwrap() }
        };
        assert_eq!(got(bytes_key).await, "one");
        assert_eq!(got(file_key).await, "two");
        assert_eq!(got(stream_key).await, "three");
    }

    /// A streamed upload given up half-way (its future dropped) leaves no temporary
    /// file and no object.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upload_given_up_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let remote = DirRemote::new(dir.path()).unwrap();
        let (mut tx, rx) = tokio::io::duplex(1024);
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // Some bytes, then a stream that never ends.
            tx.write_all(b"half of it").await.unwrap();
            std::future::pending::<()>().await;
        });
        let upload = remote.put_stream("c/snap.tar.gz", Box::new(rx));
        let given_up = tokio::time::timeout(std::time::Duration::from_millis(300), upload).await;
        assert!(given_up.is_err(), "the upload cannot finish");
        feed.abort();
        let left: Vec<_> = std::fs::read_dir(dir.path().join(TMP_DIR))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(remote.get_bytes("c/snap.tar.gz").await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conditional_writes_racing_on_one_version_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let remote = std::sync::Arc::new(DirRemote::new(dir.path()).unwrap());
        let key = "c/.sandkeep/owner.json";
        let v1 = remote
            .put_bytes_if(key, Bytes::from_static(b"v1"), Precondition::Absent)
            .await
            .unwrap();
        assert_eq!(v1, hex::encode(Md5::digest(b"v1")));
        let racers: Vec<_> = (0..8)
            .map(|i| {
                let (remote, v1) = (remote.clone(), v1.clone());
                tokio::spawn(async move {
                    let data = Bytes::from(format!("racer {i}"));
                    remote
                        .put_bytes_if(key, data, Precondition::Matches(v1))
                        .await
                })
            })
            .collect();
        let mut won = Vec::new();
        for r in racers {
            match r.await.unwrap() {
                Ok(etag) => won.push(etag),
                Err(RemoteError::PreconditionFailed { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(won.len(), 1, "{won:?}");
        let (_, etag) = remote
            .get_bytes_tagged(key, u64::MAX)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(etag, won[0]);
        // The lock file is no object.
        assert!(dir.path().join(LOCK_FILE).exists());
        let all = crate::remote::list_all(remote.as_ref(), "").await.unwrap();
        let keys: Vec<_> = all.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, [key]);
    }

    #[test]
    fn a_directory_removed_before_the_rename_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let remote = DirRemote::new(dir.path()).unwrap();
        let parent = dir.path().join("c/r");
        std::fs::create_dir_all(&parent).unwrap();
        let tmp = remote.new_tmp().unwrap();
        std::fs::write(&tmp, b"b").unwrap();
        // A delete of the directory's last object removed it meanwhile.
        std::fs::remove_dir_all(dir.path().join("c")).unwrap();
        remote
            .rename_into("c/r/b", &tmp, &parent.join("b"), &parent)
            .unwrap();
        assert_eq!(std::fs::read(parent.join("b")).unwrap(), b"b");
    }

    #[tokio::test]
    async fn deleting_a_key_that_names_a_directory_or_lies_under_a_file_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let remote = DirRemote::new(dir.path()).unwrap();
        remote
            .put_bytes("c/a/b", Bytes::from_static(b"1"))
            .await
            .unwrap();
        remote
            .put_bytes("c/f", Bytes::from_static(b"2"))
            .await
            .unwrap();
        remote
            .delete_many(&["c/a".into(), "c/f/g".into()])
            .await
            .unwrap();
        assert_eq!(remote.get_bytes("c/a/b").await.unwrap().unwrap(), "1");
        assert_eq!(remote.get_bytes("c/f").await.unwrap().unwrap(), "2");
    }

    #[tokio::test]
    async fn any_object_name_is_listed_and_the_remotes_own_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let remote = DirRemote::new(dir.path()).unwrap();
        // Names a workspace, a namespace or a file store may well have.
        let keys = [
            "c/kv/.sandkeep-tmp-x.kv",
            "c/files/.sandkeep-tmp-0123456789abcdef",
            "c/files/.sandkeep-lock",
            "c/files/.sandkeep-tmp/a",
        ];
        for k in keys {
            remote.put_bytes(k, Bytes::from_static(b"v")).await.unwrap();
        }
        let reader = Box::new(std::io::Cursor::new(b"s".to_vec()));
        remote.put_stream("c/s", reader).await.unwrap();
        // A temporary file left by a put that was cut short.
        std::fs::write(dir.path().join(TMP_DIR).join("0000000000000001"), b"x").unwrap();

        let all = crate::remote::list_all(&remote, "").await.unwrap();
        let mut listed: Vec<_> = all.iter().map(|o| o.key.as_str()).collect();
        listed.sort();
        let mut expected = keys.to_vec();
        expected.push("c/s");
        expected.sort();
        assert_eq!(listed, expected);
        for k in keys {
            assert_eq!(remote.get_bytes(k).await.unwrap().unwrap(), "v", "{k}");
        }
        // The remote's own files are no keys.
        for k in [".sandkeep-tmp/0000000000000001", ".sandkeep-lock"] {
            assert!(remote.get_bytes(k).await.is_err(), "{k}");
            let err = remote.put_bytes(k, Bytes::from_static(b"v")).await;
            assert!(matches!(err, Err(RemoteError::Service { .. })), "{k}");
        }
    }

    /// Pages over nested directories come out whole and in key order, directories whose
    /// keys all came on earlier pages passed over: names that sort around `/` (`a.b`,
    /// `a-b` before `a/`, `a0` after it) included.
    #[tokio::test]
    async fn pages_over_nested_directories_are_whole_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let remote = DirRemote::new(dir.path()).unwrap();
        let mut keys = Vec::new();
        for top in ["a", "a.b", "a-b", "a0", "b"] {
            for sub in ["x", "x.y", "x0"] {
                for i in 0..170 {
                    keys.push(format!("p/{top}/{sub}/f{i}"));
                }
            }
            keys.push(format!("p/{top}/top"));
        }
        for (n, k) in keys.iter().enumerate() {
            let data = Bytes::from(vec![b'x'; n % 5]);
            remote.put_bytes(k, data).await.unwrap();
        }
        keys.sort();
        let all = crate::remote::list_all(&remote, "p/").await.unwrap();
        let listed: Vec<&str> = all.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(listed, keys);
        assert!(all.iter().all(|o| o.size < 5));
        let page = remote.list("p/", None).await.unwrap();
        assert_eq!(page.objects.len(), PAGE);
        assert_eq!(page.next.as_deref(), Some(keys[PAGE - 1].as_str()));
    }
}
