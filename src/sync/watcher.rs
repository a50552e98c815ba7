//! Native (inotify) watching of the workspace, one non-recursive watch per mirrored
//! directory, so ignored directories such as `node_modules/` cost no watches at all.
//!
//! The notify callback runs on notify's thread and must never block: it only
//! `try_send`s into a bounded channel; when that is full it raises the overflow flag and
//! the engine does a full rescan instead, so no change is ever silently missed.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc};

use super::rules::Rules;

pub type RawEvent = notify::Result<notify::Event>;

/// Where the callback delivers events, and how it signals that it dropped some.
#[derive(Clone)]
pub struct EventSink {
    pub tx: mpsc::Sender<RawEvent>,
    pub overflow: Arc<AtomicBool>,
    pub wake: Arc<Notify>,
}

impl EventSink {
    fn deliver(&self, ev: RawEvent) {
        // Reads (our own scans and hashing among them) change nothing: drop them here
        // rather than fill the queue. A file closed after writing is a change.
        if let Ok(e) = &ev
            && let notify::EventKind::Access(kind) = e.kind
            && !matches!(
                kind,
                notify::event::AccessKind::Close(notify::event::AccessMode::Write)
            )
        {
            return;
        }
        if self.tx.try_send(ev).is_err() {
            self.overflow.store(true, Ordering::Release);
            self.wake.notify_one();
        }
    }
}

pub struct NativeWatcher {
    watcher: RecommendedWatcher,
    root: PathBuf,
}

impl NativeWatcher {
    /// Watches every mirrored directory under the root.
    pub fn start(rules: &Rules, sink: EventSink) -> notify::Result<Self> {
        let watcher = notify::recommended_watcher(move |ev: RawEvent| sink.deliver(ev))?;
        let mut w = Self {
            watcher,
            root: rules.root().to_path_buf(),
        };
        w.watch_tree(rules, Path::new(""))?;
        Ok(w)
    }

    /// Adds watches for `rel` and every mirrored directory below it. Directories that
    /// vanish meanwhile are skipped; running out of watches is an error.
    pub fn watch_tree(&mut self, rules: &Rules, rel: &Path) -> notify::Result<()> {
        // Symlinks are never followed: inotify would watch the directory a link points
        // to (elsewhere in the tree, or outside it) under the link's name.
        if !rel.as_os_str().is_empty()
            && !std::fs::symlink_metadata(self.root.join(rel)).is_ok_and(|m| m.is_dir())
        {
            return Ok(());
        }
        let mut stack = vec![rel.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let abs = self.root.join(&dir);
            match self.watcher.watch(&abs, RecursiveMode::NonRecursive) {
                Ok(()) => {}
                Err(e) if matches!(e.kind, notify::ErrorKind::PathNotFound) => continue,
                Err(e) if is_not_found(&e) => continue,
                // A directory the daemon may not read or enter (or whose path is
                // longer than the system takes) is skipped by the rounds too; it does
                // not cost the rest its watches.
                Err(e) if is_unreadable(&e) && !dir.as_os_str().is_empty() => continue,
                Err(e) => return Err(e),
            }
            let Ok(entries) = std::fs::read_dir(&abs) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    continue;
                }
                let child = dir.join(entry.file_name());
                if !rules.is_ignored(&child, true) {
                    stack.push(child);
                }
            }
        }
        Ok(())
    }
}

fn is_unreadable(e: &notify::Error) -> bool {
    matches!(&e.kind, notify::ErrorKind::Io(io) if matches!(
        io.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::InvalidFilename
    ))
}

fn is_not_found(e: &notify::Error) -> bool {
    matches!(&e.kind, notify::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::NotFound)
}

/// Whether an error means the system ran out of inotify watches or instances.
pub fn is_watch_limit(e: &notify::Error) -> bool {
    matches!(e.kind, notify::ErrorKind::MaxFilesWatch)
        || matches!(&e.kind, notify::ErrorKind::Io(io) if io.raw_os_error() == Some(28) || io.raw_os_error() == Some(24))
}
