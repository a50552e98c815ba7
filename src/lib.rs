//! sandkeep: a sidecar daemon that keeps an AI agent sandbox's state alive beyond the
//! sandbox.
//!
//! Processes inside the sandbox talk to the daemon over HTTP on a Unix socket. It keeps
//! their key-value state in an embedded, encrypted redb database and (in later parts)
//! mirrors the workspace to S3/MinIO so a new sandbox can be restored exactly.
//!
//! # Layout
//! - [`config`]: the TOML schema, environment overrides, validation.
//! - [`kv`]: the KV store (validation, crypto, staged operations, redb writer).
//! - [`auth`]: HS256 tokens, namespace grants and scopes.
//! - [`api`]: the HTTP router, handlers and the error shape of every answer.
//! - [`remote`]: object storage (S3 and a local directory) behind one trait, and the
//!   write fence.
//! - [`owner`]: single writer: the claim on a conversation (`.sandkeep/owner.json`),
//!   its lease and takeover.
//! - [`sync`]: the continuous workspace sync (watcher, debounce, rounds, manifest).
//! - [`snapshot`]: tar.gz snapshots of the workspace, streamed into remote storage.
//! - [`gitbundle`]: git bundles (with uncommitted work) of the workspace's repositories.
//! - [`metrics`]: Prometheus metrics.
//! - [`lifecycle`]: state-dir lock, socket binding, signals, startup and shutdown order.
//! - [`client`]: the hyper + hyperlocal client used by the CLI and the tests.
//! - [`cli`]: the `sandkeep` subcommands.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod files;
pub mod gitbundle;
pub mod kv;
pub mod lifecycle;
pub mod metrics;
pub mod owner;
pub mod remote;
pub mod replicate;
pub mod restore;
pub mod restore_cli;
pub mod snapshot;
pub mod sync;

/// The result of a background task when there is one; never ready when there is none
/// (for a `select!` branch guarded by `task.is_some()`).
pub(crate) async fn when_done<T>(
    task: &mut Option<tokio_util::task::AbortOnDropHandle<T>>,
) -> Result<T, tokio::task::JoinError> {
    match task.as_mut() {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// An error and its causes in their own words, `: `-separated (some errors' own message
/// says little, such as hyper's "client error (Connect)"; some `Debug`s dump whole
/// responses).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Opens `rel` (a relative path of plain components) below the directory `root` to
/// read it, only if it is a regular file reached through real directories: each
/// directory is opened from the one before with `O_NOFOLLOW`, so a directory of the
/// path swapped for a symlink to elsewhere since it was looked at is refused (ELOOP or
/// ENOTDIR), never followed out of the tree.
pub fn open_beneath(root: &std::path::Path, rel: &str) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags, openat};
    let mut dir = std::os::fd::OwnedFd::from(std::fs::File::open(root)?);
    let mut parts = rel.split('/').peekable();
    while let Some(part) = parts.next() {
        if part.is_empty() || part == "." || part == ".." {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{rel} is not a plain relative path"),
            ));
        }
        let last = parts.peek().is_none();
        let flags = OFlags::RDONLY
            | OFlags::NOFOLLOW
            | OFlags::CLOEXEC
            | if last {
                OFlags::NONBLOCK
            } else {
                OFlags::DIRECTORY
            };
        dir = openat(&dir, part, flags, Mode::empty())?;
    }
    let file = std::fs::File::from(dir);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{rel} is not a regular file"),
        ));
    }
    Ok(file)
}

/// Opens a workspace file to read it, only if it is (still) a regular file: a path
/// replaced by a symlink (to `/dev/zero`, or a file outside) or by a FIFO since it was
/// looked at is refused instead of followed, or blocked on.
pub fn open_regular(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is no longer a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Replaces the file at `path` with `bytes` whole: written beside it (`<name>.tmp`),
/// then renamed over it, so that a crash leaves the old file or the new one.
pub fn replace_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
