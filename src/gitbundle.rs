//! Git bundles of the workspace's repositories, made with libgit2 (git2) only, and the
//! way back from a bundle to a repository.
//!
//! The repository at the workspace root goes to `workspace/git/workspace.bundle`, one in
//! a subdirectory `sub/` to `workspace/git/sub.bundle` (`a/b/` to
//! `workspace/git/a/b.bundle`, down to [`MAX_REPO_DEPTH`]); beside each, a
//! `.json` records what HEAD names (a bundle cannot say which branch HEAD is on). A
//! bundle is a v2 bundle (`# v2 git bundle`, one `<oid> <refname>` line per ref, HEAD
//! included, a blank line, then a pack of everything the refs reach) that `git bundle
//! verify` and `git clone` accept. It also carries two commits on top of HEAD so that
//! uncommitted work survives: `refs/sandkeep/wip-index` (the staged tree) and
//! `refs/sandkeep/wip` (the work tree, untracked files included, ignored files not,
//! deletions too).
//!
//! Those commits are made without touching the user's repository: the repository is
//! opened on a handle of our own whose object database gets an in-memory (mempack)
//! backend of the highest priority, so every blob, tree and commit we create lives in
//! memory only; the handle's index is changed in memory and never written. Nothing in
//! `.git/` changes (index, refs, objects). The pack is streamed into remote storage
//! through the same bounded pipe as snapshots.
//!
//! Like `git bundle create`, the pack reuses what is already compressed: the
//! repository's pack files are copied as they are (offset deltas stay valid inside a
//! copied pack), followed by a pack of the loose objects and of our in-memory WIP
//! objects, under one header and one SHA-1 trailer. A cloned repository of any size
//! is thus streamed at disk speed instead of being recompressed. Repositories where
//! that is not sound (alternates, shallow or partial clones, an object in two packs,
//! unknown index versions) get a pack built object by object with libgit2's
//! packbuilder instead.
//!
//! Bundles are written when refs or the work tree changed (a digest of refs, HEAD and
//! both trees), at most every `git.interval`, and on `POST /v1/git/bundle`.
//! [`restore_bundle`] turns a bundle back into a `.git` with the same refs and HEAD,
//! the index equal to `wip-index` and the work tree equal to `wip`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Display;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use git2::{ObjectType, Oid, Repository};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::remote::{self, Remote, RemoteError};

/// Where bundles live, below the conversation prefix.
pub const GIT_DIR: &str = "workspace/git/";
/// The staged tree, as a commit on top of HEAD.
pub const WIP_INDEX_REF: &str = "refs/sandkeep/wip-index";
/// The work tree (untracked, non-ignored files included), as a commit on top of HEAD.
pub const WIP_REF: &str = "refs/sandkeep/wip";
/// The first line of every bundle we write.
pub const SIGNATURE: &str = "# v2 git bundle";
/// Untracked or modified files larger than this are left out of the `wip` commit: its
/// objects are held in memory while the bundle is built (four 150 MB files took the
/// daemon to 2 GB), and the mirror carries such files anyway.
pub const MAX_WIP_FILE: u64 = 32 * 1024 * 1024;
/// Name of the root repository's bundle.
pub const ROOT_STEM: &str = "workspace";

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{what}: {source}")]
    Git {
        what: String,
        #[source]
        source: git2::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: {message}")]
    Bundle { what: String, message: String },
    #[error("remote storage: {0}")]
    Remote(#[from] RemoteError),
    #[error("the bundle task failed: {0}")]
    Task(String),
}

/// Adds context to git2 and I/O errors.
trait Context<T> {
    fn ctx(self, what: impl Display) -> Result<T, GitError>;
}

impl<T> Context<T> for Result<T, git2::Error> {
    fn ctx(self, what: impl Display) -> Result<T, GitError> {
        self.map_err(|source| GitError::Git {
            what: what.to_string(),
            source,
        })
    }
}

impl<T> Context<T> for Result<T, io::Error> {
    fn ctx(self, what: impl Display) -> Result<T, GitError> {
        self.map_err(|source| GitError::Io {
            what: what.to_string(),
            source,
        })
    }
}

/// `<name>.json`: what HEAD names, and the parts of `.git` that a bundle cannot carry.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeadMeta {
    /// The repository's directory: `"."` for the workspace root, else the
    /// subdirectory's name. A subdirectory named `workspace` shares the root's object
    /// name when the root is no repository; this tells a restore which it is (a json
    /// without it is the root's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// The branch HEAD is on (`refs/heads/main`), also when it is unborn; `null` when
    /// detached.
    pub head: Option<String>,
    /// The commit HEAD points to; `null` on an unborn branch.
    pub head_oid: Option<String>,
    pub detached: bool,
    /// `.git/config` (remotes, upstream branches, user settings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// `.git/config.worktree` (settings of this work tree alone, such as a sparse
    /// checkout's, with `extensions.worktreeConfig`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_worktree: Option<String>,
    /// `.git/info/exclude`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_exclude: Option<String>,
    /// `.git/info/attributes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_attributes: Option<String>,
    /// `.git/shallow`: the commits of a shallow clone (`git clone --depth`) whose
    /// parents it lacks. Without it the restored repository would name commits it
    /// does not have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shallow: Option<String>,
    /// `.git/info/sparse-checkout` (the patterns of a sparse checkout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info_sparse_checkout: Option<String>,
    /// `.git/hooks/*` (not the `.sample`s), by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hooks: BTreeMap<String, Hook>,
    /// The stash, newest first as `git stash list` shows it; the bundle carries each
    /// entry's commit as `refs/sandkeep/stash/<i>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stash: Vec<StashEntry>,
    /// Index entries added with `git add -N` (intent to add). A tree cannot say so:
    /// the staged commit holds them as empty files, and a restore marks them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intent_to_add: Vec<String>,
    /// Index entries marked skip-worktree (a sparse checkout, `git update-index
    /// --skip-worktree`), marked again by a restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip_worktree: Vec<String>,
    /// Index entries marked assume-unchanged (`git update-index --assume-unchanged`),
    /// marked again by a restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assume_unchanged: Vec<String>,
    /// A merge, cherry-pick, revert or rebase in progress: `.git/MERGE_HEAD`,
    /// `MERGE_MSG`, `MERGE_MODE`, `CHERRY_PICK_HEAD`, `REVERT_HEAD`, `REBASE_HEAD`,
    /// `ORIG_HEAD`, and the files of `rebase-merge/` or `rebase-apply/`, by name. The
    /// bundle carries the commits they name as `refs/sandkeep/in-progress/<i>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub in_progress: BTreeMap<String, String>,
    /// The reflogs of HEAD, the branches, the remote-tracking branches and the tags
    /// (`git reflog`), newest entry first, at
    /// most [`REFLOG_MAX`] each. The bundle carries the commits they name that no ref
    /// has as `refs/sandkeep/reflog/<i>` (never created as refs by a restore).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reflogs: BTreeMap<String, Vec<ReflogEntry>>,
    /// Symbolic refs other than HEAD, by name, with the ref each names (a clone's
    /// `refs/remotes/origin/HEAD` → `refs/remotes/origin/main`): a bundle carries only
    /// refs to objects.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub symrefs: BTreeMap<String, String>,
    /// The index's conflicts (its stages 1 to 3), which the staged commit cannot hold
    /// (it has the work tree's file there, as `git add` would): put back by a restore.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<Conflict>,
    /// When the work tree was read (Unix milliseconds): a restore compares it with the
    /// manifest's `updated_at` to know which of the two is newer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_at_ms: Option<u64>,
    /// Size and modification time (ns) of each work-tree file the work-tree commit
    /// was made from, by path in the repository. Its commit is not always the file's
    /// bytes (git's line-ending conversion, files marked assume-unchanged or
    /// skip-worktree): where the mirror's entry has the same size and time, the file
    /// did not change between the two, and a restore takes the mirror's exact copy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub work_tree: BTreeMap<String, (u64, i64)>,
    /// Set when the repository is a linked worktree (`git worktree add`) of a
    /// repository of the same workspace: a restore links it to that repository again
    /// (once that one is restored) instead of making it a repository of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktree_of: Option<WorktreeOf>,
}

/// Where a linked worktree belongs: see [`HeadMeta::worktree_of`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorktreeOf {
    /// The main repository's directory in the workspace (`"."` for the root).
    pub repo: String,
    /// The worktree's name: its git directory is the main one's `worktrees/<name>`.
    pub name: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hook {
    pub content: String,
    pub executable: bool,
}

/// One conflicted path of the index: each side as (mode, blob), absent when that side
/// has no file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Conflict {
    pub path: String,
    pub ancestor: Option<(u32, String)>,
    pub ours: Option<(u32, String)>,
    pub theirs: Option<(u32, String)>,
}

/// One reflog entry: the commit the ref moved to, who moved it when, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReflogEntry {
    pub oid: String,
    pub name: String,
    pub email: String,
    /// Seconds since the epoch, and the offset from UTC in minutes.
    pub time: i64,
    pub offset: i32,
    pub message: String,
}

/// The newest entries of each reflog that a bundle's json keeps.
pub const REFLOG_MAX: usize = 200;
/// The commits reflogs name, in a bundle (never created as refs by a restore).
const REFLOG_REF_PREFIX: &str = "refs/sandkeep/reflog/";

/// The files of `.git` that say a merge, cherry-pick, revert or rebase is in progress
/// (and `ORIG_HEAD`, where such an operation started).
const IN_PROGRESS_FILES: [&str; 7] = [
    "MERGE_HEAD",
    "MERGE_MSG",
    "MERGE_MODE",
    "CHERRY_PICK_HEAD",
    "REVERT_HEAD",
    "REBASE_HEAD",
    "ORIG_HEAD",
];
/// The directories of `.git` a rebase (or `git am`) in progress keeps its state in:
/// their files are kept as `<dir>/<name>`.
const IN_PROGRESS_DIRS: [&str; 2] = ["rebase-merge", "rebase-apply"];

/// Whether `name` is one of the in-progress files a json may hold (a restore writes
/// nothing else of it).
fn is_in_progress_file(name: &str) -> bool {
    IN_PROGRESS_FILES.contains(&name)
        || name.split_once('/').is_some_and(|(dir, file)| {
            IN_PROGRESS_DIRS.contains(&dir)
                && !file.is_empty()
                && !file.contains('/')
                && file != ".."
                && file != "."
        })
}
/// The stage bits of an index entry's flags (0: no conflict, 1 to 3: its sides).
const STAGE_MASK: u16 = 0x3000;
/// The commits those files name, in a bundle (never created as refs by a restore).
const IN_PROGRESS_REF_PREFIX: &str = "refs/sandkeep/in-progress/";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StashEntry {
    pub oid: String,
    pub message: String,
}

/// Files of `.git` kept in the json are at most this large (larger ones are left out).
const META_FILE_MAX: u64 = 256 * 1024;
/// In the state directory: the repositories whose bundles it wrote.
const BUNDLED_FILE: &str = "git-bundled.json";

#[derive(Serialize, Deserialize)]
struct BundledRecord {
    /// The conversation's bundle prefix: a state directory reused for another
    /// conversation starts afresh.
    prefix: String,
    repos: BTreeSet<String>,
}

/// The repositories recorded as bundled under `prefix` (none when the file is
/// missing, unreadable or of another conversation).
fn load_bundled(path: &Path, prefix: &str) -> BTreeSet<String> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<BundledRecord>(&b).ok())
        .filter(|r| r.prefix == prefix)
        .map(|r| r.repos)
        .unwrap_or_default()
}
/// The stash entries' refs in a bundle (never created in a restored repository).
const STASH_REF_PREFIX: &str = "refs/sandkeep/stash/";

/// A small UTF-8 file of `.git` (`rel` below `base`, the git or common directory), or
/// None (with a warning when it exists but cannot be kept: a restore will lack it).
/// Never read through a symlink, at its end or on its way (`hooks/post-checkout` made a
/// link to `/proc/self/environ`, `info` to `/etc`): the daemon's rights would read
/// what the sandbox cannot, into the bundle's json.
fn small_text(base: &Path, rel: &str) -> Option<String> {
    use std::io::Read;
    let path = base.join(rel);
    let file = match crate::open_beneath(base, rel) {
        Ok(f) => f,
        Err(e) => {
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.file_type().is_symlink() => {
                    tracing::warn!(file = %path.display(), "a symlink in .git is not followed: not kept with the git bundle");
                }
                Ok(m) if m.is_file() => {
                    tracing::warn!(file = %path.display(), error = %e, "not kept with the git bundle (unreadable): a restore will lack it");
                }
                _ => {}
            }
            return None;
        }
    };
    let meta = file.metadata().ok()?;
    let kept = (meta.len() <= META_FILE_MAX)
        .then(|| {
            let mut text = String::new();
            file.take(META_FILE_MAX + 1)
                .read_to_string(&mut text)
                .ok()?;
            (text.len() as u64 <= META_FILE_MAX).then_some(text)
        })
        .flatten();
    if kept.is_none() {
        tracing::warn!(
            file = %path.display(),
            bytes = meta.len(),
            "not kept with the git bundle (over 256 KiB, unreadable or not UTF-8): a restore will lack it"
        );
    }
    kept
}

/// The `.git` parts of [`HeadMeta`] that are not HEAD. A linked worktree's own git
/// directory (`.git/worktrees/<name>`) holds what is its own (HEAD, its reflog, the
/// index, `config.worktree`, a sparse checkout, an operation in progress); the rest
/// (config, `info/exclude`, hooks, the branches' reflogs, the stash) is the main
/// repository's, in the common directory.
fn git_dir_meta(repo: &Repository, meta: &mut HeadMeta) {
    use std::os::unix::fs::PermissionsExt;
    let git_dir = repo.path();
    let common = repo.commondir();
    meta.config = small_text(common, "config");
    meta.config_worktree = small_text(git_dir, "config.worktree");
    meta.info_exclude = small_text(common, "info/exclude");
    meta.info_attributes = small_text(common, "info/attributes");
    meta.shallow = small_text(common, "shallow");
    meta.info_sparse_checkout = small_text(git_dir, "info/sparse-checkout");
    for name in IN_PROGRESS_FILES {
        if let Some(text) = small_text(git_dir, name) {
            meta.in_progress.insert(name.to_string(), text);
        }
    }
    for dir in IN_PROGRESS_DIRS {
        let Ok(entries) = std::fs::read_dir(git_dir.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(file) = e.file_name().into_string() else {
                continue;
            };
            let rel = format!("{dir}/{file}");
            if let Some(text) = small_text(git_dir, &rel) {
                meta.in_progress.insert(rel, text);
            }
        }
    }
    meta.reflogs = reflogs(repo);
    if let Ok(entries) = std::fs::read_dir(common.join("hooks")) {
        for e in entries.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if name.ends_with(".sample") {
                continue;
            }
            if let Some(content) = small_text(common, &format!("hooks/{name}")) {
                let executable = e
                    .metadata()
                    .is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
                meta.hooks.insert(
                    name,
                    Hook {
                        content,
                        executable,
                    },
                );
            }
        }
    }
    // Only with a stash: reading a reflog that does not exist creates its file, and the
    // user's `.git` is never written to.
    if repo.find_reference("refs/stash").is_ok()
        && common.join("logs/refs/stash").is_file()
        && let Ok(log) = repo.reflog("refs/stash")
    {
        meta.stash = log
            .iter()
            .map(|e| StashEntry {
                oid: e.id_new().to_string(),
                message: e.message().ok().flatten().unwrap_or("").to_string(),
            })
            .collect();
    }
}

/// The reflogs of HEAD, the branches, the remote-tracking branches and the tags that
/// have one, newest entries first.
fn reflogs(repo: &Repository) -> BTreeMap<String, Vec<ReflogEntry>> {
    let mut names = vec!["HEAD".to_string()];
    for glob in ["refs/heads/*", "refs/remotes/*", "refs/tags/*"] {
        if let Ok(refs) = repo.references_glob(glob) {
            names.extend(
                refs.flatten()
                    .filter_map(|r| r.name().ok().map(str::to_string)),
            );
        }
    }
    let mut out = BTreeMap::new();
    for name in names {
        // Only where a log exists: reading one that does not creates its file, and
        // the user's `.git` is never written to. HEAD's is a linked worktree's own.
        let dir = if name == "HEAD" {
            repo.path()
        } else {
            repo.commondir()
        };
        if !dir.join("logs").join(&name).is_file() {
            continue;
        }
        let Ok(log) = repo.reflog(&name) else {
            continue;
        };
        let entries: Vec<ReflogEntry> = log
            .iter()
            .take(REFLOG_MAX)
            .map(|e| {
                let who = e.committer();
                ReflogEntry {
                    oid: e.id_new().to_string(),
                    name: String::from_utf8_lossy(who.name_bytes()).into_owned(),
                    email: String::from_utf8_lossy(who.email_bytes()).into_owned(),
                    time: who.when().seconds(),
                    offset: who.when().offset_minutes(),
                    message: e.message().ok().flatten().unwrap_or("").to_string(),
                }
            })
            .collect();
        if !entries.is_empty() {
            out.insert(name, entries);
        }
    }
    out
}

/// Rebuilds the reflogs `meta` kept, of the refs the restored repository has (the
/// restore's own entries go).
fn restore_reflogs(repo: &Repository, meta: &HeadMeta) -> Result<(), GitError> {
    for (name, entries) in &meta.reflogs {
        if repo.find_reference(name).is_err() {
            continue;
        }
        let entries = entries.iter().rev().filter_map(|e| {
            let when = git2::Time::new(e.time, e.offset);
            let who = git2::Signature::new(&e.name, &e.email, &when).ok()?;
            Some((Oid::from_str(&e.oid).ok()?, who, e.message.as_str()))
        });
        rewrite_reflog(repo, name, entries)?;
    }
    Ok(())
}

/// Creates the symbolic refs of `meta`. One that cannot be (its name taken by a ref of
/// the bundle, or not a ref name) is left out with a warning: it only names another.
fn restore_symrefs(repo: &Repository, meta: &HeadMeta) {
    for (name, to) in &meta.symrefs {
        let valid = name.starts_with("refs/") && !name.starts_with("refs/sandkeep/");
        let made = if valid {
            repo.reference_symbolic(name, to, false, "sandkeep: restored")
                .map(|_| ())
        } else {
            Err(git2::Error::from_str("not a ref this daemon records"))
        };
        if let Err(e) = made {
            tracing::warn!(r#ref = %name, target = %to, error = %e, "git restore: a symbolic ref is left out");
        }
    }
}

/// Writes back what [`git_dir_meta`] kept, and the stash's reflog from `stash`
/// (the entries' commits, newest first, already in the object database). Of a
/// `linked` worktree, only what is its own (the rest is the main repository's).
fn restore_git_dir_meta(repo: &Repository, meta: &HeadMeta, linked: bool) -> Result<(), GitError> {
    use std::os::unix::fs::PermissionsExt;
    let git_dir = repo.path().to_path_buf();
    if linked {
        let own = HeadMeta {
            config_worktree: meta.config_worktree.clone(),
            info_sparse_checkout: meta.info_sparse_checkout.clone(),
            in_progress: meta.in_progress.clone(),
            reflogs: meta
                .reflogs
                .iter()
                .filter(|(name, _)| name.as_str() == "HEAD")
                .map(|(name, log)| (name.clone(), log.clone()))
                .collect(),
            ..HeadMeta::default()
        };
        return restore_git_dir_meta(repo, &own, false);
    }
    if let Some(config) = &meta.config {
        std::fs::write(git_dir.join("config"), config).ctx("writing .git/config")?;
        // A submodule's (or a separate git dir's) config names where its work tree
        // was seen from its git dir; the restored `.git` sits in the work tree itself.
        let mut local = repo
            .config()
            .and_then(|c| c.open_level(git2::ConfigLevel::Local))
            .ctx("opening .git/config")?;
        if local.get_entry("core.worktree").is_ok() {
            local
                .remove("core.worktree")
                .ctx("dropping core.worktree")?;
        }
    }
    // The small files the json keeps, each where it was.
    let kept = [
        ("config.worktree", &meta.config_worktree),
        ("info/exclude", &meta.info_exclude),
        ("info/attributes", &meta.info_attributes),
        ("shallow", &meta.shallow),
        ("info/sparse-checkout", &meta.info_sparse_checkout),
    ]
    .into_iter()
    .filter_map(|(name, content)| Some((name, content.as_ref()?)))
    .chain(
        meta.in_progress
            .iter()
            .filter(|(name, _)| is_in_progress_file(name))
            .map(|(name, content)| (name.as_str(), content)),
    );
    for (name, content) in kept {
        if let Some((dir, _)) = name.rsplit_once('/') {
            std::fs::create_dir_all(git_dir.join(dir)).ctx(format_args!("creating .git/{dir}"))?;
        }
        std::fs::write(git_dir.join(name), content).ctx(format_args!("writing .git/{name}"))?;
    }
    for (name, hook) in &meta.hooks {
        if name.contains('/') || name.starts_with('.') {
            continue;
        }
        let path = git_dir.join("hooks").join(name);
        std::fs::create_dir_all(git_dir.join("hooks")).ctx("creating .git/hooks")?;
        std::fs::write(&path, &hook.content).ctx(format_args!("writing .git/hooks/{name}"))?;
        let mode = if hook.executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .ctx(format_args!("setting the mode of .git/hooks/{name}"))?;
    }
    if !meta.stash.is_empty() {
        // Each entry as its commit's committer made it.
        let entries = meta.stash.iter().rev().filter_map(|e| {
            let oid = Oid::from_str(&e.oid).ok()?;
            let who = repo.find_commit(oid).ok()?.committer().to_owned();
            Some((oid, who, e.message.as_str()))
        });
        rewrite_reflog(repo, "refs/stash", entries)?;
    }
    restore_reflogs(repo, meta)
}

/// Replaces the reflog of `name` with `entries`, oldest first.
fn rewrite_reflog<'a>(
    repo: &Repository,
    name: &str,
    entries: impl Iterator<Item = (Oid, git2::Signature<'static>, &'a str)>,
) -> Result<(), GitError> {
    let mut log = repo
        .reflog(name)
        .ctx(format_args!("reading the reflog of {name}"))?;
    while !log.is_empty() {
        log.remove(0, false)
            .ctx(format_args!("clearing the reflog of {name}"))?;
    }
    for (oid, who, message) in entries {
        log.append(oid, &who, Some(message))
            .ctx(format_args!("rebuilding the reflog of {name}"))?;
    }
    log.write()
        .ctx(format_args!("writing the reflog of {name}"))
}

/// A repository of the workspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoDir {
    /// `"."` for the workspace root, else the subdirectory's path (`a/b`).
    pub repo: String,
    /// The object name: `workspace` for the root, else the subdirectory's path.
    pub stem: String,
    pub dir: PathBuf,
}

/// How deep below the workspace root repositories are looked for: `a/b/c/d/.git` is.
pub const MAX_REPO_DEPTH: usize = 4;
/// Most directories one look for repositories reads: a huge tree is not walked whole
/// at every bundle check.
const MAX_DIRS_LOOKED_AT: usize = 20_000;

/// What [`discover`] found.
#[derive(Debug)]
pub struct Discovered {
    pub repos: Vec<RepoDir>,
    /// Every directory was looked at (no more than the limit, none unreadable): a
    /// repository not found is not there, and its bundle may go.
    pub whole: bool,
}

/// The repositories of a workspace: the root, if it is one, and every subdirectory
/// holding a `.git`, down to [`MAX_REPO_DEPTH`], of the directories the walk looks
/// into: the root, and below it those `descend` lets in, at most `max_dirs` of them.
/// Symlinks are not followed. A repository's `repo` and `stem` are its path (`a/b`).
pub fn discover(
    root: &Path,
    descend: &dyn Fn(&Path) -> bool,
    max_dirs: usize,
) -> io::Result<Discovered> {
    let mut out = Vec::new();
    let root_is_repo = root.join(".git").exists();
    if root_is_repo {
        out.push(RepoDir {
            repo: ".".into(),
            stem: ROOT_STEM.into(),
            dir: root.to_path_buf(),
        });
    }
    let mut found = Vec::new();
    let mut looked_at = 0;
    // Cut short by the limit, or something could not be read: a repository not found
    // may be there.
    let (mut cut, mut unsure) = (false, false);
    let mut queue = std::collections::VecDeque::from([(String::new(), 0)]);
    // Cut short, the directory at hand is still looked at whole (the first level is).
    while let Some((dir, depth)) = queue.pop_front().filter(|_| !cut) {
        let entries = match std::fs::read_dir(root.join(&dir)) {
            Ok(entries) => entries,
            Err(e) if depth == 0 => return Err(e),
            // Gone since: nothing there. Unreadable: left out, as the mirror leaves it.
            Err(e) => {
                unsure |= e.kind() != io::ErrorKind::NotFound;
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if depth == 0 => return Err(e),
                Err(_) => {
                    unsure = true;
                    break;
                }
            };
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name == ".git" {
                continue;
            }
            let rel = if dir.is_empty() {
                name
            } else {
                format!("{dir}/{name}")
            };
            // Any subdirectory of a directory looked into may be a repository, one the
            // rules ignore too (a clone listed in `.gitignore`); the walk only goes on
            // through those `descend` lets in.
            let is_repo = entry.path().join(".git").try_exists().unwrap_or_else(|_| {
                unsure = true;
                false
            });
            if is_repo {
                if root_is_repo && rel == ROOT_STEM {
                    tracing::warn!(
                        "the subdirectory `workspace` holds a repository whose bundle name would be the \
                         root repository's: it is not bundled"
                    );
                } else {
                    found.push(rel.clone());
                }
            }
            if depth + 1 < MAX_REPO_DEPTH && !cut && descend(Path::new(&rel)) {
                looked_at += 1;
                if looked_at > max_dirs {
                    tracing::warn!(
                        limit = max_dirs,
                        "too many directories to look for git repositories in: those below the first level may be missed (and no bundle is deleted as gone)"
                    );
                    cut = true;
                    continue;
                }
                queue.push_back((rel, depth + 1));
            }
        }
    }
    found.sort();
    out.extend(found.into_iter().map(|rel| RepoDir {
        dir: root.join(&rel),
        stem: rel.clone(),
        repo: rel,
    }));
    Ok(Discovered {
        repos: out,
        whole: !cut && !unsure,
    })
}

/// Where the repository at `dir` belongs when it is a linked worktree whose main
/// repository's work tree is in the workspace at `root` (`None` for any other).
fn worktree_of(dir: &Path, root: &Path) -> Option<WorktreeOf> {
    let repo = Repository::open(dir).ok()?;
    if !repo.is_worktree() {
        return None;
    }
    // Its git directory is `<common>/worktrees/<name>`.
    let name = repo
        .path()
        .file_name()?
        .to_str()
        .filter(|n| is_worktree_name(n))?
        .to_string();
    let common = std::fs::canonicalize(repo.commondir()).ok()?;
    // A bare main repository has no work tree to restore it into.
    if common.file_name()? != ".git" {
        return None;
    }
    let rel = common.parent()?.strip_prefix(root).ok()?;
    let repo = if rel.as_os_str().is_empty() {
        ".".to_string()
    } else {
        rel.to_str()?.to_string()
    };
    Some(WorktreeOf { repo, name })
}

/// The repositories of the workspace at `root` that the mirror's configuration does not
/// leave out ([`discover`], deeper ones only in directories the mirror carries).
fn find_repos(root: &Path, excludes: &[String]) -> io::Result<Discovered> {
    let rules = crate::sync::rules::Rules::new(root, excludes).map_err(io::Error::other)?;
    let descend = |rel: &Path| !rules.is_ignored(rel, true);
    let mut found = discover(root, &descend, MAX_DIRS_LOOKED_AT)?;
    found
        .repos
        .retain(|r| r.repo == "." || !rules.excluded_by_config(Path::new(&r.repo), true));
    found.repos.retain(|r| match contained(root, &r.dir) {
        Ok(()) => true,
        Err(why) => {
            tracing::warn!(repo = %r.repo, why = %why, "not bundled: the repository reaches outside the workspace");
            false
        }
    });
    Ok(found)
}

/// Whether the repository at `dir` lies wholly in the workspace at `root`: its `.git`
/// no symlink, its git and common directories inside the workspace, its work tree
/// `dir` itself. A `.git` linked (or a `gitdir:` file pointing) to a repository
/// elsewhere, or a `core.worktree` naming another directory, would have the daemon
/// read with its rights what the sandbox may not, into a bundle.
fn contained(root: &Path, dir: &Path) -> Result<(), String> {
    let dot_git = std::fs::symlink_metadata(dir.join(".git")).map_err(|e| e.to_string())?;
    if dot_git.file_type().is_symlink() {
        return Err("its .git is a symlink".into());
    }
    let canonical =
        |p: &Path| std::fs::canonicalize(p).map_err(|e| format!("{}: {e}", p.display()));
    let root = canonical(root)?;
    let repo = Repository::open_ext(
        dir,
        git2::RepositoryOpenFlags::NO_SEARCH,
        std::iter::empty::<&std::ffi::OsStr>(),
    )
    .map_err(|e| e.message().to_string())?;
    for git_dir in [repo.path(), repo.commondir()] {
        if !canonical(git_dir)?.starts_with(&root) {
            return Err(format!(
                "its git directory {} is outside",
                git_dir.display()
            ));
        }
    }
    match repo.workdir() {
        Some(w) if canonical(w)? == canonical(dir)? => Ok(()),
        Some(w) => Err(format!("its work tree (core.worktree) is {}", w.display())),
        None => Err("it is bare".into()),
    }
}

/// Sets libgit2 up for a daemon that reads other users' repositories: called once at
/// start, before any thread uses libgit2.
/// - No ownership check: the sandbox's processes often run as another user than the
///   daemon, and libgit2 refused every repository not owned by the daemon's user.
///   The check guards against running what a repository's config names (hooks,
///   filter drivers, fsmonitor), which libgit2 never runs.
/// - A git config file of the daemon's user that cannot be read (a `HOME` not open to
///   it) is skipped, as git skips it with a warning: libgit2 would refuse to open
///   any repository.
pub fn set_up_libgit2() {
    use git2::ConfigLevel;
    // SAFETY: called at start, before any other thread uses libgit2.
    if let Err(e) = unsafe { git2::opts::set_verify_owner_validation(false) } {
        tracing::warn!(error = %e, "cannot turn libgit2's ownership check off");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| home.as_ref().map(|h| h.join(".config")));
    let levels = [
        (ConfigLevel::Global, home.map(|h| h.join(".gitconfig"))),
        (ConfigLevel::XDG, xdg.map(|x| x.join("git").join("config"))),
        (ConfigLevel::System, Some(PathBuf::from("/etc/gitconfig"))),
    ];
    for (level, file) in levels {
        let Some(file) = file else {
            continue;
        };
        match std::fs::File::open(&file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(file = %file.display(), error = %e, "cannot read this git config file: repositories are read without it");
                // SAFETY: as above.
                if let Err(e) = unsafe { git2::opts::set_search_path(level, "") } {
                    tracing::warn!(error = %e, "cannot tell libgit2 to skip that file");
                }
            }
            _ => {}
        }
    }
}

/// The bundle header: the signature, one `<oid> <refname>` line per ref, a blank line.
pub fn bundle_header(refs: &[(Oid, String)]) -> Vec<u8> {
    let mut out = format!("{SIGNATURE}\n").into_bytes();
    for (oid, name) in refs {
        out.extend_from_slice(format!("{oid} {name}\n").as_bytes());
    }
    out.push(b'\n');
    out
}

/// Reads a bundle header up to and including its blank line; the reader is left at
/// the start of the pack. Bundles with prerequisites (thin bundles) are refused.
pub fn read_bundle_header<R: BufRead>(r: &mut R) -> Result<Vec<(Oid, String)>, GitError> {
    const MAX_LINE: usize = 64 * 1024;
    let bad = |message: String| GitError::Bundle {
        what: "reading the bundle header".into(),
        message,
    };
    let mut line = Vec::new();
    let mut refs = Vec::new();
    let mut first = true;
    loop {
        line.clear();
        let n = <&mut R as io::Read>::take(&mut *r, MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .ctx("reading the bundle header")?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(bad("the header ends early (or a line is too long)".into()));
        }
        line.pop();
        let text = std::str::from_utf8(&line).map_err(|_| bad("a line is not UTF-8".into()))?;
        if first {
            if text != SIGNATURE {
                return Err(bad(format!("not a v2 git bundle (first line `{text}`)")));
            }
            first = false;
            continue;
        }
        if text.is_empty() {
            return Ok(refs);
        }
        if text.starts_with('-') {
            return Err(bad(
                "the bundle has prerequisites (it needs another repository)".into(),
            ));
        }
        let (oid, name) = text
            .split_once(' ')
            .ok_or_else(|| bad(format!("malformed ref line `{text}`")))?;
        let oid = Oid::from_str(oid).map_err(|e| bad(format!("bad object id `{oid}`: {e}")))?;
        refs.push((oid, name.to_string()));
    }
}

fn head_meta(repo: &Repository) -> Result<HeadMeta, GitError> {
    let head = repo.find_reference("HEAD").ctx("reading HEAD")?;
    Ok(match head.symbolic_target().ctx("reading HEAD")? {
        Some(target) => HeadMeta {
            head: Some(target.to_string()),
            head_oid: repo.refname_to_id(target).ok().map(|o| o.to_string()),
            detached: false,
            ..HeadMeta::default()
        },
        None => HeadMeta {
            head: None,
            head_oid: head.target().map(|o| o.to_string()),
            detached: true,
            ..HeadMeta::default()
        },
    })
}

/// The refs and HEAD to bundle, and the two WIP commits.
struct Prepared {
    refs: Vec<(Oid, String)>,
    head: HeadMeta,
    digest: [u8; 32],
    /// The paths the work-tree commit was made from.
    work_tree: Vec<String>,
}

/// Builds the staged and work-tree commits on top of `parent` in the repository's
/// object database (which the caller has backed with a mempack). The handle's index
/// is changed in memory and never written. `work_tree` gets the paths of the files
/// the work-tree commit was made from.
fn wip_commits(
    repo: &Repository,
    parent: Option<Oid>,
    work_tree: &mut Vec<String>,
    leave_out: LeaveOut<'_>,
) -> Result<(Oid, Oid, Oid, Oid), GitError> {
    let mut index = repo.index().ctx("reading the index")?;
    if index.has_conflicts() {
        // A tree cannot hold a conflict: take the work tree's version, as `git add`.
        let mut paths = Vec::new();
        for c in index.conflicts().ctx("reading conflicts")? {
            let c = c.ctx("reading conflicts")?;
            if let Some(e) = c.our.or(c.their).or(c.ancestor) {
                paths.push(String::from_utf8_lossy(&e.path).into_owned());
            }
        }
        for p in paths {
            let _ = index.conflict_remove(Path::new(&p));
            let _ = index.add_path(Path::new(&p));
        }
    }
    let index_tree = index.write_tree().ctx("writing the staged tree")?;
    let workdir = repo.workdir().map(Path::to_path_buf).unwrap_or_default();
    // The paths whose work-tree version the commit does not take: their size and time
    // are not the commit's, so `work_tree` does not name them.
    let mut left_out: HashSet<String> = HashSet::new();
    let mut filter = |path: &Path, _spec: &[u8]| -> i32 {
        let skip = wip_filter(path, &workdir, &leave_out);
        if skip != 0 {
            left_out.insert(path.to_string_lossy().into_owned());
        }
        skip
    };
    let mut unreadable = Vec::new();
    let added = index.add_all(["*"], git2::IndexAddOption::DEFAULT, Some(&mut filter));
    if let Err(e) = added {
        // libgit2 reads a changed tracked file to compare it before the filter is
        // asked, so one this daemon may not read fails the whole add: such files keep
        // their staged version (marked unchanged in this in-memory index), then once
        // more.
        unreadable = mark_unreadable_unchanged(&mut index, &workdir);
        if unreadable.is_empty() {
            return Err(e).ctx("adding the work tree");
        }
        index
            .add_all(["*"], git2::IndexAddOption::DEFAULT, Some(&mut filter))
            .ctx("adding the work tree")?;
    }
    // The same filter: without one, libgit2 adds every changed tracked file, over the
    // size cap or left out by the mirror's rules alike.
    index
        .update_all(["*"], Some(&mut filter))
        .ctx("recording deletions")?;
    left_out.extend(unreadable);
    let wip_tree = index.write_tree().ctx("writing the work tree")?;
    work_tree.extend(
        index
            .iter()
            .filter_map(|e| String::from_utf8(e.path).ok())
            .filter(|p| !left_out.contains(p)),
    );

    let sig = git2::Signature::now("sandkeep", "sandkeep@localhost").ctx("signature")?;
    let parent = match parent {
        Some(oid) => repo.find_commit(oid).ok(),
        None => None,
    };
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let t = repo.find_tree(index_tree).ctx("staged tree")?;
    let index_commit = repo
        .commit(
            None,
            &sig,
            &sig,
            "sandkeep: staged changes (the index)",
            &t,
            &parents,
        )
        .ctx("committing the staged tree")?;
    let t = repo.find_tree(wip_tree).ctx("work tree")?;
    let wip_commit = repo
        .commit(
            None,
            &sig,
            &sig,
            "sandkeep: work tree (untracked files included)",
            &t,
            &parents,
        )
        .ctx("committing the work tree")?;
    Ok((index_commit, wip_commit, index_tree, wip_tree))
}

/// Whether the work-tree commit leaves `path` (relative to `workdir`) out, as
/// [`git2::Index::add_all`]'s filter answers: 1 to leave it out, 0 to take it.
fn wip_filter(path: &Path, workdir: &Path, leave_out: LeaveOut<'_>) -> i32 {
    let abs = workdir.join(path);
    let meta = std::fs::symlink_metadata(&abs);
    // What the mirror leaves out is stored nowhere: not in the work-tree commit
    // either (untracked, or changed or deleted while tracked).
    if leave_out(path, meta.as_ref().is_ok_and(|m| m.is_dir())) {
        return 1;
    }
    match meta {
        // A nested repository is its own bundle, not a gitlink here.
        Ok(m) if m.is_dir() && abs.join(".git").exists() => 1,
        // Sockets, FIFOs, devices: nothing to commit (and a FIFO would block).
        Ok(m) if !(m.is_file() || m.is_dir() || m.file_type().is_symlink()) => 1,
        Ok(m) if m.is_file() && m.len() > MAX_WIP_FILE => {
            tracing::debug!(path = %abs.display(), size = m.len(), "git bundle: file too large for the work-tree commit; left out (the mirror carries it)");
            1
        }
        // One this daemon may not read (another user's, mode 000) is left out, as
        // the mirror leaves it out: libgit2 would fail the whole bundle on it. A
        // tracked one keeps its staged version in the commit.
        Ok(m) if m.is_file() && std::fs::File::open(&abs).is_err() => {
            tracing::debug!(path = %abs.display(), "git bundle: file not readable; left out of the work-tree commit");
            1
        }
        _ => 0,
    }
}

/// Marks the tracked files under `workdir` that cannot be opened for reading as
/// unchanged ("assume valid") in `index`, which libgit2's diff then does not read.
/// Returns the paths marked.
fn mark_unreadable_unchanged(index: &mut git2::Index, workdir: &Path) -> Vec<String> {
    const VALID: u16 = git2::IndexEntryFlag::VALID.bits();
    let unreadable: Vec<git2::IndexEntry> = index
        .iter()
        .filter(|e| e.flags & (VALID | STAGE_MASK) == 0)
        .filter(|e| {
            let Ok(path) = std::str::from_utf8(&e.path) else {
                return false;
            };
            let abs = workdir.join(path);
            std::fs::symlink_metadata(&abs).is_ok_and(|m| m.is_file())
                && std::fs::File::open(&abs).is_err()
        })
        .collect();
    let mut marked = Vec::new();
    for mut e in unreadable {
        e.flags |= VALID;
        if index.add(&e).is_ok() {
            marked.push(String::from_utf8_lossy(&e.path).into_owned());
        }
    }
    marked
}

/// What of the index a tree cannot hold, into `meta`: its conflicts, and the entries
/// marked intent-to-add, skip-worktree or assume-unchanged.
fn index_state(repo: &Repository, meta: &mut HeadMeta) {
    use git2::{IndexEntryExtendedFlag as Ext, IndexEntryFlag};
    // A bare repository has no index: nothing to mark.
    let Ok(index) = repo.index() else {
        return;
    };
    if let Ok(conflicts) = index.conflicts() {
        let side = |e: Option<git2::IndexEntry>| e.map(|e| (e.mode, e.id.to_string()));
        for c in conflicts.flatten() {
            let Some(path) = [&c.ancestor, &c.our, &c.their]
                .into_iter()
                .flatten()
                .find_map(|e| String::from_utf8(e.path.clone()).ok())
            else {
                continue;
            };
            meta.conflicts.push(Conflict {
                path,
                ancestor: side(c.ancestor),
                ours: side(c.our),
                theirs: side(c.their),
            });
        }
    }
    for e in index.iter() {
        if e.flags & STAGE_MASK != 0 {
            continue; // a conflict's side, above
        }
        let ext = Ext::from_bits_truncate(e.flags_extended);
        let valid = IndexEntryFlag::from_bits_truncate(e.flags).contains(IndexEntryFlag::VALID);
        if !valid && !ext.intersects(Ext::INTENT_TO_ADD | Ext::SKIP_WORKTREE) {
            continue;
        }
        let Ok(path) = String::from_utf8(e.path) else {
            continue;
        };
        for (marked, list) in [
            (ext.contains(Ext::INTENT_TO_ADD), &mut meta.intent_to_add),
            (ext.contains(Ext::SKIP_WORKTREE), &mut meta.skip_worktree),
            (valid, &mut meta.assume_unchanged),
        ] {
            if marked {
                list.push(path.clone());
            }
        }
    }
}

/// Marks the entries of `index` that [`index_state`] listed in `meta` again (those it
/// holds at stage 0).
fn mark_entries(index: &mut git2::Index, meta: &HeadMeta) -> Result<(), GitError> {
    use git2::{IndexEntryExtendedFlag as Ext, IndexEntryFlag};
    let marks = [
        (
            &meta.intent_to_add,
            IndexEntryFlag::EXTENDED,
            Ext::INTENT_TO_ADD,
        ),
        (
            &meta.skip_worktree,
            IndexEntryFlag::EXTENDED,
            Ext::SKIP_WORKTREE,
        ),
        (&meta.assume_unchanged, IndexEntryFlag::VALID, Ext::empty()),
    ];
    for (paths, flag, ext) in marks {
        for path in paths {
            if let Some(mut e) = index.get_path(Path::new(path), 0) {
                e.flags |= flag.bits();
                e.flags_extended |= ext.bits();
                index.add(&e).ctx("marking an index entry")?;
            }
        }
    }
    Ok(())
}

/// Replaces the staged file of each conflicted path with the conflict's sides (stages
/// 1 to 3), as the merge left them. A conflict whose blobs the bundle did not bring
/// stays staged as the work tree's file.
fn put_back_conflicts(
    repo: &Repository,
    index: &mut git2::Index,
    conflicts: &[Conflict],
) -> Result<(), GitError> {
    let odb = repo.odb().ctx("object database")?;
    for c in conflicts {
        let sides = [(1u16, &c.ancestor), (2, &c.ours), (3, &c.theirs)];
        let mut entries = Vec::new();
        for (stage, side) in sides {
            let Some((mode, oid)) = side else {
                continue;
            };
            let Some(id) = Oid::from_str(oid).ok().filter(|o| odb.exists(*o)) else {
                entries.clear();
                break;
            };
            entries.push(git2::IndexEntry {
                ctime: git2::IndexTime::new(0, 0),
                mtime: git2::IndexTime::new(0, 0),
                dev: 0,
                ino: 0,
                mode: *mode,
                uid: 0,
                gid: 0,
                file_size: 0,
                id,
                flags: (stage << 12) & STAGE_MASK,
                flags_extended: 0,
                path: c.path.clone().into_bytes(),
            });
        }
        if entries.is_empty() {
            tracing::warn!(path = %c.path, "git restore: a conflict's blobs are not in the bundle; the path stays staged as its work-tree file");
            continue;
        }
        let _ = index.remove(Path::new(&c.path), 0);
        for e in &entries {
            index.add(e).ctx("putting a conflict back")?;
        }
    }
    Ok(())
}

fn prepare(repo: &Repository, leave_out: LeaveOut<'_>) -> Result<Prepared, GitError> {
    let read_at = crate::kv::now_ms();
    let mut head = head_meta(repo)?;
    git_dir_meta(repo, &mut head);
    index_state(repo, &mut head);
    let odb = repo.odb().ctx("object database")?;
    let mut refs: Vec<(Oid, String)> = Vec::new();
    for r in repo.references().ctx("listing refs")? {
        let r = r.ctx("reading a ref")?;
        let Ok(name) = r.name() else {
            continue; // not UTF-8
        };
        if name.starts_with("refs/sandkeep/") {
            continue;
        }
        let Some(oid) = r.target() else {
            // Symbolic (refs/remotes/origin/HEAD): recorded in the json.
            if let Some(Ok(to)) = r.symbolic_target_bytes().map(std::str::from_utf8) {
                head.symrefs.insert(name.to_string(), to.to_string());
            }
            continue;
        };
        if !odb.exists(oid) {
            tracing::warn!(r#ref = name, %oid, "git bundle: ref points to a missing object; left out");
            continue;
        }
        refs.push((oid, name.to_string()));
    }
    // Older stash entries: only the newest is refs/stash, the rest live in its reflog.
    for (i, entry) in head.stash.iter().enumerate().skip(1) {
        if let Ok(oid) = Oid::from_str(&entry.oid)
            && odb.exists(oid)
        {
            refs.push((oid, format!("{STASH_REF_PREFIX}{i}")));
        }
    }
    // The commits no ref names that the json does: what an operation in progress
    // merges in, picks or started from (every full object id its files name: a
    // rebase's todo list names each commit), and what the reflogs name (a branch
    // reset or amended away).
    let mut seen: std::collections::HashSet<Oid> = refs.iter().map(|(oid, _)| *oid).collect();
    let in_progress = head
        .in_progress
        .values()
        .flat_map(|text| text.split_whitespace())
        .filter(|word| word.len() == 40)
        .filter_map(|word| Oid::from_str(word).ok());
    let logged = head
        .reflogs
        .values()
        .flatten()
        .filter_map(|e| Oid::from_str(&e.oid).ok());
    for (prefix, oids) in [
        (IN_PROGRESS_REF_PREFIX, in_progress.collect::<Vec<_>>()),
        (REFLOG_REF_PREFIX, logged.collect()),
    ] {
        let mut i = 0;
        for oid in oids {
            if !oid.is_zero() && seen.insert(oid) && odb.exists(oid) {
                refs.push((oid, format!("{prefix}{i}")));
                i += 1;
            }
        }
    }
    refs.sort_by(|a, b| a.1.cmp(&b.1));
    let head_oid = head.head_oid.as_deref().and_then(|o| Oid::from_str(o).ok());
    if let Some(oid) = head_oid.filter(|o| odb.exists(*o)) {
        refs.insert(0, (oid, "HEAD".into()));
    }
    let mut digest = blake3::Hasher::new();
    digest.update(format!("{head:?}\n").as_bytes());
    for (oid, name) in &refs {
        digest.update(format!("{oid} {name}\n").as_bytes());
    }
    let mut work_tree = Vec::new();
    if !repo.is_bare() {
        let (index_commit, wip_commit, index_tree, wip_tree) =
            wip_commits(repo, head_oid, &mut work_tree, leave_out)?;
        digest.update(format!("{index_tree} {wip_tree}\n").as_bytes());
        refs.push((index_commit, WIP_INDEX_REF.into()));
        refs.push((wip_commit, WIP_REF.into()));
    }
    // After the digest: times alone are no change.
    head.read_at_ms = Some(read_at);
    Ok(Prepared {
        refs,
        head,
        digest: digest.finalize().into(),
        work_tree,
    })
}

/// Size and modification time of the files at `paths` in the work tree (for
/// [`HeadMeta::work_tree`]): looked at only for a bundle that is written, not at
/// every check for changes.
fn work_tree_stats(repo: &Repository, paths: &[String]) -> BTreeMap<String, (u64, i64)> {
    let Some(workdir) = repo.workdir() else {
        return BTreeMap::new();
    };
    paths
        .iter()
        .filter_map(|path| {
            let m = std::fs::symlink_metadata(workdir.join(path)).ok()?;
            let stat = crate::sync::scan::Stat::of(&m);
            m.is_file().then(|| (path.clone(), (stat.size, stat.mtime)))
        })
        .collect()
}

/// Streams a pack of everything `refs` reach into `out`.
fn write_pack(
    repo: &Repository,
    refs: &[(Oid, String)],
    out: &mut dyn Write,
) -> Result<(), GitError> {
    let mut pb = repo.packbuilder().ctx("packbuilder")?;
    pb.set_threads(0);
    let mut walk = repo.revwalk().ctx("revwalk")?;
    let mut pushed = false;
    for (oid, name) in refs {
        let mut obj = repo
            .find_object(*oid, None)
            .ctx(format_args!("reading {name}"))?;
        loop {
            match obj.kind() {
                Some(ObjectType::Commit) => {
                    walk.push(obj.id()).ctx("revwalk")?;
                    pushed = true;
                    break;
                }
                Some(ObjectType::Tag) => {
                    pb.insert_object(obj.id(), None).ctx("packing a tag")?;
                    let target = match obj.as_tag() {
                        Some(tag) => tag.target().ctx("reading a tag's target")?,
                        None => break,
                    };
                    obj = target;
                }
                _ => {
                    pb.insert_recursive(obj.id(), None)
                        .ctx("packing an object")?;
                    break;
                }
            }
        }
    }
    if pushed {
        pb.insert_walk(&mut walk).ctx("packing history")?;
    }
    let mut failed: Option<io::Error> = None;
    let result = pb.foreach(|chunk| match out.write_all(chunk) {
        Ok(()) => true,
        Err(e) => {
            failed = Some(e);
            false
        }
    });
    if let Some(e) = failed {
        return Err(GitError::Io {
            what: "writing the pack".into(),
            source: e,
        });
    }
    result.ctx("writing the pack")
}

/// One of the repository's pack files, opened (a concurrent `git gc` deleting it does
/// not disturb a copy in progress).
struct PackFile {
    path: PathBuf,
    file: std::fs::File,
    len: u64,
    count: u32,
    /// The object ids of its index, sorted.
    oids: Vec<[u8; 20]>,
}

/// Reads the sorted object ids of a version 2 pack index; `None` for anything else.
fn read_idx_v2(path: &Path) -> io::Result<Option<Vec<[u8; 20]>>> {
    let data = std::fs::read(path)?;
    if data.len() < 8 + 256 * 4
        || data[..4] != [0xff, b't', b'O', b'c']
        || data[4..8] != [0, 0, 0, 2]
    {
        return Ok(None);
    }
    let fan = 8 + 255 * 4;
    let n = u32::from_be_bytes([data[fan], data[fan + 1], data[fan + 2], data[fan + 3]]) as usize;
    let start = 8 + 256 * 4;
    let Some(table) = data.get(start..start + n * 20) else {
        return Ok(None);
    };
    let oids: Vec<[u8; 20]> = table
        .chunks_exact(20)
        .filter_map(|c| <[u8; 20]>::try_from(c).ok())
        .collect();
    Ok(Some(oids))
}

/// The repository's pack files when the pack of a bundle can be made of them, else
/// `None` (the caller packs object by object).
fn reusable_packs(repo: &Repository) -> Result<Option<Vec<PackFile>>, GitError> {
    let objects = repo.commondir().join("objects");
    if repo.is_shallow() || objects.join("info/alternates").exists() {
        return Ok(None);
    }
    let pack_dir = objects.join("pack");
    let mut packs = Vec::new();
    let entries = match std::fs::read_dir(&pack_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(packs)),
        Err(e) => return Err(e).ctx(format_args!("listing {}", pack_dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.ctx("listing packs")?.file_name();
        let name = name.to_string_lossy().into_owned();
        if name.ends_with(".promisor") {
            return Ok(None); // a partial clone: objects are missing by design
        }
        if let Some(stem) = name.strip_suffix(".pack") {
            names.push(stem.to_string());
        }
    }
    names.sort();
    for stem in names {
        let idx = pack_dir.join(format!("{stem}.idx"));
        let path = pack_dir.join(format!("{stem}.pack"));
        // A pack without its index is still being written: not ours to read.
        let Ok(Some(oids)) = read_idx_v2(&idx) else {
            if idx.exists() {
                return Ok(None);
            }
            continue;
        };
        let mut file =
            std::fs::File::open(&path).ctx(format_args!("opening {}", path.display()))?;
        let len = file.metadata().ctx("reading a pack")?.len();
        let mut header = [0u8; 12];
        io::Read::read_exact(&mut file, &mut header)
            .ctx(format_args!("reading {}", path.display()))?;
        let count = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        if &header[..4] != b"PACK"
            || header[4..8] != [0, 0, 0, 2]
            || count as usize != oids.len()
            || len < 32
        {
            return Ok(None);
        }
        packs.push(PackFile {
            path,
            file,
            len,
            count,
            oids,
        });
    }
    // An object in two packs would appear twice in the bundle's pack.
    let mut all: Vec<&[u8; 20]> = packs.iter().flat_map(|p| p.oids.iter()).collect();
    all.sort_unstable();
    if all.windows(2).any(|w| w[0] == w[1]) {
        return Ok(None);
    }
    Ok(Some(packs))
}

/// Loose objects (`objects/xx/yyyy...`) that no pack holds.
fn loose_objects(repo: &Repository, packs: &[PackFile]) -> Result<Vec<Oid>, GitError> {
    let objects = repo.commondir().join("objects");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&objects).ctx("listing objects")? {
        let entry = entry.ctx("listing objects")?;
        let dir = entry.file_name().to_string_lossy().into_owned();
        if dir.len() != 2 || !dir.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let files = match std::fs::read_dir(entry.path()) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx("listing objects"),
        };
        for f in files {
            let name = f
                .ctx("listing objects")?
                .file_name()
                .to_string_lossy()
                .into_owned();
            let Ok(oid) = Oid::from_str(&format!("{dir}{name}")) else {
                continue;
            };
            if name.len() != 38 {
                continue;
            }
            let raw: &[u8] = oid.as_bytes();
            if packs
                .iter()
                .any(|p| p.oids.binary_search_by(|o| o[..].cmp(raw)).is_ok())
            {
                continue;
            }
            out.push(oid);
        }
    }
    out.sort();
    Ok(out)
}

/// Hashes everything written through it (the pack trailer is the SHA-1 of the pack).
struct Sha1Writer<'a> {
    out: &'a mut dyn Write,
    hash: sha1::Sha1,
}

impl Write for Sha1Writer<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        sha1::Digest::update(&mut self.hash, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Passes a pack stream's objects through, without its 12-byte header and 20-byte
/// trailer.
struct PackBody {
    skip: usize,
    tail: Vec<u8>,
}

impl PackBody {
    fn new() -> Self {
        Self {
            skip: 12,
            tail: Vec::new(),
        }
    }

    fn push(&mut self, mut chunk: &[u8], out: &mut dyn Write) -> io::Result<()> {
        let skipped = self.skip.min(chunk.len());
        chunk = &chunk[skipped..];
        self.skip -= skipped;
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 20 {
            let keep = self.tail.len() - 20;
            out.write_all(&self.tail[..keep])?;
            self.tail.drain(..keep);
        }
        Ok(())
    }
}

/// The objects reachable from `roots` (our WIP commits) that are not on disk: the
/// commits themselves and the trees and blobs we wrote into the mempack. A tree on
/// disk has all its children on disk, so the walk stops there.
fn in_memory_objects(
    repo: &Repository,
    roots: &[Oid],
    on_disk: &dyn Fn(&Oid) -> bool,
) -> Result<Vec<Oid>, GitError> {
    let mut seen = std::collections::HashSet::new();
    let mut trees = Vec::new();
    for root in roots {
        if on_disk(root) || !seen.insert(*root) {
            continue;
        }
        let commit = repo.find_commit(*root).ctx("reading a WIP commit")?;
        trees.push(commit.tree_id());
    }
    while let Some(id) = trees.pop() {
        if on_disk(&id) || !seen.insert(id) {
            continue;
        }
        let tree = repo.find_tree(id).ctx("reading a WIP tree")?;
        for entry in tree.iter() {
            match entry.kind() {
                Some(ObjectType::Tree) => trees.push(entry.id()),
                Some(ObjectType::Blob) if !on_disk(&entry.id()) => {
                    seen.insert(entry.id());
                }
                _ => {}
            }
        }
    }
    let mut out: Vec<Oid> = seen.into_iter().collect();
    out.sort();
    Ok(out)
}

/// The pack of a bundle made of the repository's own packs plus the loose and the
/// in-memory objects (see the module doc). Returns `false`, having written nothing,
/// when the repository does not allow it.
fn write_reused_pack(
    repo: &Repository,
    refs: &[(Oid, String)],
    out: &mut dyn Write,
) -> Result<bool, GitError> {
    let Some(mut packs) = reusable_packs(repo)? else {
        return Ok(false);
    };
    let loose = loose_objects(repo, &packs)?;
    let loose_set: std::collections::HashSet<Oid> = loose.iter().copied().collect();
    let on_disk = |oid: &Oid| {
        let raw: &[u8] = oid.as_bytes();
        loose_set.contains(oid)
            || packs
                .iter()
                .any(|p| p.oids.binary_search_by(|o| o[..].cmp(raw)).is_ok())
    };
    let wip_roots: Vec<Oid> = refs
        .iter()
        .filter(|(_, name)| name.starts_with("refs/sandkeep/"))
        .map(|(oid, _)| *oid)
        .collect();
    let wip = in_memory_objects(repo, &wip_roots, &on_disk)?;
    let mut pb = repo.packbuilder().ctx("packbuilder")?;
    pb.set_threads(0);
    for oid in loose.iter().chain(wip.iter()) {
        pb.insert_object(*oid, None).ctx("packing loose objects")?;
    }
    let extra_count = pb.object_count() as u64;
    let total: u64 = packs.iter().map(|p| u64::from(p.count)).sum::<u64>() + extra_count;
    let total = u32::try_from(total).map_err(|_| GitError::Bundle {
        what: "writing the pack".into(),
        message: "more than 2^32 objects".into(),
    })?;
    let mut w = Sha1Writer {
        out,
        hash: <sha1::Sha1 as sha1::Digest>::new(),
    };
    let mut header = *b"PACK\0\0\0\x02\0\0\0\0";
    header[8..].copy_from_slice(&total.to_be_bytes());
    w.write_all(&header).ctx("writing the pack")?;
    let mut buf = vec![0u8; 256 * 1024];
    for p in &mut packs {
        let mut left = p.len - 32;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            io::Read::read_exact(&mut p.file, &mut buf[..want])
                .ctx(format_args!("reading {}", p.path.display()))?;
            w.write_all(&buf[..want]).ctx("writing the pack")?;
            left -= want as u64;
        }
    }
    if extra_count > 0 {
        let mut body = PackBody::new();
        let mut failed = None;
        let result = pb.foreach(|chunk| match body.push(chunk, &mut w) {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        });
        if let Some(e) = failed {
            return Err(e).ctx("writing the pack");
        }
        result.ctx("packing loose objects")?;
    }
    let digest = sha1::Digest::finalize(w.hash);
    w.out.write_all(&digest).ctx("writing the pack")?;
    Ok(true)
}

/// What a bundle holds.
#[derive(Clone, Debug)]
pub struct BundleSummary {
    /// Ref lines in the bundle, HEAD and the WIP refs included.
    pub refs: usize,
    pub head: HeadMeta,
    /// Digest of refs, HEAD and both WIP trees (equal digests: nothing to write).
    pub digest: [u8; 32],
}

/// Whether the work-tree commit leaves a path out: (path relative to the work tree,
/// is a directory).
pub type LeaveOut<'a> = &'a dyn Fn(&Path, bool) -> bool;

/// Writes the bundle of the repository at `dir` into `out`. When `skip_if` equals the
/// repository's digest, nothing is written and `None` is returned; otherwise
/// `on_start` is called just before the first byte is written.
pub fn write_bundle<W: Write>(
    dir: &Path,
    skip_if: Option<[u8; 32]>,
    on_start: impl FnOnce(),
    out: &mut W,
) -> Result<Option<BundleSummary>, GitError> {
    write_bundle_leaving_out(dir, &|_, _| false, skip_if, on_start, out)
}

/// [`write_bundle`], with the work-tree commit leaving out what `leave_out` says.
pub fn write_bundle_leaving_out<W: Write>(
    dir: &Path,
    leave_out: LeaveOut<'_>,
    skip_if: Option<[u8; 32]>,
    on_start: impl FnOnce(),
    out: &mut W,
) -> Result<Option<BundleSummary>, GitError> {
    let repo = Repository::open(dir).ctx(format_args!("opening {}", dir.display()))?;
    let odb = repo.odb().ctx("object database")?;
    // Every object we create goes to memory, never into the user's .git/objects.
    let _mempack = odb
        .add_new_mempack_backend(1000)
        .ctx("adding an in-memory object store")?;
    let mut prep = prepare(&repo, leave_out)?;
    if skip_if == Some(prep.digest) {
        return Ok(None);
    }
    prep.head.work_tree = work_tree_stats(&repo, &prep.work_tree);
    on_start();
    out.write_all(&bundle_header(&prep.refs))
        .ctx("writing the bundle header")?;
    if !write_reused_pack(&repo, &prep.refs, out)? {
        tracing::debug!(repo = %dir.display(), "git bundle: packing object by object");
        write_pack(&repo, &prep.refs, out)?;
    }
    out.flush().ctx("writing the bundle")?;
    Ok(Some(BundleSummary {
        refs: prep.refs.len(),
        head: prep.head,
        digest: prep.digest,
    }))
}

/// Brings the stat data of the index of the repository at `dir` up to date with its
/// work tree, as `git update-index --refresh` does: for a restore, once every file
/// and its time are in place. The index was written before they were, so git's
/// plumbing (`git diff-files`) saw every file as changed until a porcelain command
/// refreshed it, and the first `git status` read every file.
pub fn refresh_index(dir: &Path) -> Result<(), GitError> {
    let repo = Repository::open(dir).ctx(format_args!("opening {}", dir.display()))?;
    if repo.is_bare() {
        return Ok(());
    }
    let mut opts = git2::StatusOptions::new();
    opts.update_index(true)
        .include_untracked(false)
        .exclude_submodules(true);
    repo.statuses(Some(&mut opts)).ctx("refreshing the index")?;
    Ok(())
}

/// What a held entry of the mirror was, to be found in git: a file's size and
/// `blake3:<hex>` hash, or a symlink's target.
#[derive(Clone, Copy, Debug)]
pub enum HeldEntry<'a> {
    File { size: u64, hash: &'a str },
    Symlink { target: &'a str },
}

/// Of `entries` (paths relative to the repository at `dir`), those git keeps an exact
/// copy of while the work tree need not hold them: not in the index, but in the tree of
/// HEAD, of a ref (a branch checked out before, a tag) or of a stash (its index and
/// untracked files commits too), with the same content (a file) or target (a
/// symlink): what a `git checkout` of another branch or a `git stash -u` took out of
/// the work tree. An older version at the same path is no copy.
pub fn kept_by_git(
    dir: &Path,
    entries: &[(&str, HeldEntry<'_>)],
) -> Result<HashSet<String>, GitError> {
    let repo = Repository::open(dir).ctx(format_args!("opening {}", dir.display()))?;
    let index = repo.index().ctx("reading the index")?;
    let mut tree_ids: HashSet<Oid> = HashSet::new();
    let mut add = |commit: &git2::Commit<'_>, stash: bool| {
        tree_ids.insert(commit.tree_id());
        if stash {
            // A stash: also its index (parent 1) and untracked files (parent 2).
            tree_ids.extend(commit.parents().skip(1).map(|p| p.tree_id()));
        }
    };
    if let Ok(head) = repo.head().and_then(|h| h.peel_to_commit()) {
        add(&head, false);
    }
    for r in repo.references().ctx("listing refs")?.flatten() {
        let name = r.name().unwrap_or_default();
        if name.starts_with("refs/sandkeep/") {
            continue;
        }
        if let Ok(c) = r.peel_to_commit() {
            add(&c, name == "refs/stash");
        }
    }
    // Older stash entries live in the stash's reflog (read only when there is one:
    // reading a missing reflog creates its file).
    if repo.find_reference("refs/stash").is_ok()
        && repo.commondir().join("logs/refs/stash").is_file()
        && let Ok(log) = repo.reflog("refs/stash")
    {
        for entry in log.iter() {
            if let Ok(c) = repo.find_commit(entry.id_new()) {
                add(&c, true);
            }
        }
    }
    let trees: Vec<git2::Tree<'_>> = tree_ids
        .into_iter()
        .filter_map(|id| repo.find_tree(id).ok())
        .collect();
    // Each blob's size and hash, once: the same file is in many trees.
    let mut digests: HashMap<Oid, Option<(u64, String)>> = HashMap::new();
    let mut kept = HashSet::new();
    for (path, held) in entries {
        let p = Path::new(path);
        if index.get_path(p, 0).is_some() {
            continue;
        }
        let found = trees.iter().any(|t| {
            let Ok(e) = t.get_path(p) else { return false };
            let link = e.filemode() == 0o120000;
            if e.kind() != Some(ObjectType::Blob) {
                return false;
            }
            match held {
                HeldEntry::File { size, hash } if !link => {
                    let digest = digests.entry(e.id()).or_insert_with(|| {
                        repo.find_blob(e.id()).ok().map(|b| {
                            let h = blake3::hash(b.content()).to_hex();
                            (b.size() as u64, format!("blake3:{h}"))
                        })
                    });
                    digest.as_ref().is_some_and(|(s, h)| s == size && h == hash)
                }
                HeldEntry::Symlink { target } if link => repo
                    .find_blob(e.id())
                    .is_ok_and(|b| b.content() == target.as_bytes()),
                _ => false,
            }
        });
        if found {
            kept.insert(path.to_string());
        }
    }
    Ok(kept)
}

/// What [`restore_bundle`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// Refs created (HEAD and the WIP refs not counted).
    pub refs: usize,
    pub had_wip: bool,
    /// When the bundled work tree was read (from the json), if it says.
    pub read_at_ms: Option<u64>,
    /// See [`HeadMeta::work_tree`].
    pub work_tree: BTreeMap<String, (u64, i64)>,
}

/// Turns the bundle at `bundle` into a repository at `target` (created if needed):
/// the pack goes into `.git/objects`, every ref is created (except the WIP refs), HEAD
/// is set from `meta`, the work tree is checked out from `refs/sandkeep/wip` and the
/// index set to `refs/sandkeep/wip-index`. Files in `target` that the WIP tree does
/// not name are left alone.
///
/// A restore that fails leaves no `.git` it created: an empty or half-made repository
/// would be bundled by the daemon over the good bundle it came from.
pub fn restore_bundle(bundle: &Path, meta: &HeadMeta, target: &Path) -> Result<Restored, GitError> {
    restore_bundle_linked(bundle, meta, target, None)
}

/// The main repository a linked worktree is restored into (see
/// [`restore_bundle_linked`]).
#[derive(Clone, Debug)]
pub struct MainRepo {
    pub dir: PathBuf,
    /// When the main repository's bundle was read (its json's `read_at_ms`).
    pub read_at_ms: Option<u64>,
}

/// [`restore_bundle`], and for a linked worktree (`meta.worktree_of`) whose main
/// repository is restored at `main`: the worktree is linked to it again as `git
/// worktree add` does (`<main>/.git/worktrees/<name>`, numbered as git does when that
/// name is another worktree's, and a `.git` file), its objects go into the main
/// repository's, and of its refs only those the main repository lacks are created, and
/// its own branch (checked out there, so committed to there) where that moves the
/// branch forward or the worktree's bundle is the newer. The main repository's json
/// keeps what the two share (config, hooks, the branches' reflogs, the stash); the
/// worktree gets its own HEAD, index, reflog of HEAD, `config.worktree`, sparse
/// checkout and operation in progress. Where it cannot be linked (a `.git` already in
/// its place, a failure), it comes back as a repository of its own, with a warning.
pub fn restore_bundle_linked(
    bundle: &Path,
    meta: &HeadMeta,
    target: &Path,
    main: Option<&MainRepo>,
) -> Result<Restored, GitError> {
    let git_dir = target.join(".git");
    if std::fs::symlink_metadata(&git_dir).is_ok_and(|m| m.file_type().is_symlink()) {
        // Never restored through: a link to a directory elsewhere would get the
        // repository, and that directory's parent the work tree.
        std::fs::remove_file(&git_dir).ctx(format_args!(
            "removing the symlink {} in the repository's place",
            git_dir.display()
        ))?;
        tracing::warn!(path = %git_dir.display(), "a symlink named .git was in the way of the restored repository: removed");
    }
    let had_git = std::fs::symlink_metadata(&git_dir).is_ok();
    if let Some(main) = main {
        let why = if had_git {
            "a .git is in its place".to_string()
        } else {
            let mut made = None;
            match unpack_bundle(bundle, meta, target, Some(main), &mut made) {
                Ok(restored) => return Ok(restored),
                Err(e) => {
                    // Nothing of the link stays: a worktree admin directory left
                    // behind would keep its branch from being checked out elsewhere.
                    let removed = [
                        Some(std::fs::remove_file(&git_dir)),
                        made.map(std::fs::remove_dir_all),
                    ];
                    for e in removed.into_iter().flatten().filter_map(Result::err) {
                        if e.kind() != io::ErrorKind::NotFound {
                            tracing::warn!(dir = %git_dir.display(), error = %e, "cannot remove the link a failed restore began");
                        }
                    }
                    e.to_string()
                }
            }
        };
        tracing::warn!(worktree = %target.display(), main = %main.dir.display(), why = %why, "git restore: the worktree is not linked to its repository; it comes back as a repository of its own");
    }
    let result = unpack_bundle(bundle, meta, target, None, &mut None);
    if result.is_err()
        && !had_git
        && let Err(e) = std::fs::remove_dir_all(&git_dir)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(dir = %git_dir.display(), error = %e, "cannot remove the repository a failed restore began");
    }
    result
}

/// Whether a restore links a worktree of this name (one directory of
/// `.git/worktrees`); one of another name comes back as a repository of its own.
fn is_worktree_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/')
}

/// Most numbered names tried for a worktree whose name is taken.
const WORKTREE_NAMES_TRIED: usize = 1000;

/// Makes `target` a linked worktree named `name` of `main` (the files `git worktree
/// add` writes, HEAD on `head`) and opens it; `made` gets the worktree's git
/// directory when this made it. A name another worktree has (one restored before, or
/// left over) is numbered (`name1`, `name2`, ...) as git does; one that already names
/// `target` is used again.
fn link_worktree(
    main: &Repository,
    name: &str,
    head: &str,
    target: &Path,
    made: &mut Option<PathBuf>,
) -> Result<Repository, GitError> {
    if !is_worktree_name(name) {
        return Err(GitError::Bundle {
            what: "linking the worktree".into(),
            message: format!("{name:?} is not a worktree name"),
        });
    }
    let target = std::path::absolute(target).ctx("resolving the worktree's path")?;
    let common = std::path::absolute(main.commondir()).ctx("resolving the main repository")?;
    let gitdir = format!("{}\n", target.join(".git").display());
    let git_dir = (0..WORKTREE_NAMES_TRIED)
        .map(|i| match i {
            0 => common.join("worktrees").join(name),
            i => common.join("worktrees").join(format!("{name}{i}")),
        })
        .find(|d| match std::fs::read_to_string(d.join("gitdir")) {
            Ok(theirs) => theirs == gitdir,
            Err(_) => std::fs::symlink_metadata(d).is_err(),
        })
        .ok_or_else(|| GitError::Bundle {
            what: "linking the worktree".into(),
            message: format!("every name from {name:?} to {name}{WORKTREE_NAMES_TRIED} is taken"),
        })?;
    if std::fs::symlink_metadata(&git_dir).is_err() {
        std::fs::create_dir_all(&git_dir).ctx(format_args!("creating {}", git_dir.display()))?;
        *made = Some(git_dir.clone());
    }
    let files = [
        ("commondir", "../..\n".to_string()),
        ("gitdir", gitdir),
        ("HEAD", format!("ref: {head}\n")),
    ];
    for (file, content) in files {
        std::fs::write(git_dir.join(file), content)
            .ctx(format_args!("writing {}", git_dir.join(file).display()))?;
    }
    std::fs::create_dir_all(&target).ctx(format_args!("creating {}", target.display()))?;
    std::fs::write(
        target.join(".git"),
        format!("gitdir: {}\n", git_dir.display()),
    )
    .ctx("writing the worktree's .git")?;
    Repository::open(&target).ctx(format_args!("opening the worktree {}", target.display()))
}

fn unpack_bundle(
    bundle: &Path,
    meta: &HeadMeta,
    target: &Path,
    main: Option<&MainRepo>,
    linked_dir: &mut Option<PathBuf>,
) -> Result<Restored, GitError> {
    let file = std::fs::File::open(bundle).ctx(format_args!("opening {}", bundle.display()))?;
    let mut reader = io::BufReader::with_capacity(256 * 1024, file);
    let refs = read_bundle_header(&mut reader)?;
    let linked = match (main, &meta.worktree_of) {
        (Some(main), Some(w)) => Some((main.dir.as_path(), w.name.as_str())),
        (Some(_), None) => {
            return Err(GitError::Bundle {
                what: "linking the worktree".into(),
                message: "the bundle's json names no main repository".into(),
            });
        }
        (None, _) => None,
    };
    // The pack goes into the repository the objects live in: the main one's for a
    // linked worktree.
    let repo = match linked {
        Some((main, _)) => Repository::open(main).ctx(format_args!(
            "opening the main repository {}",
            main.display()
        ))?,
        None => {
            std::fs::create_dir_all(target).ctx(format_args!("creating {}", target.display()))?;
            Repository::init(target).ctx(format_args!(
                "creating a repository in {}",
                target.display()
            ))?
        }
    };
    {
        let odb = repo.odb().ctx("object database")?;
        let mut pw = odb.packwriter().ctx("packwriter")?;
        if let Err(e) = io::copy(&mut reader, &mut pw) {
            // The packwriter's own error says only "Write error": libgit2 knows why.
            let why = git2::Error::last_error(-1);
            return Err(GitError::Bundle {
                what: "unpacking the bundle".into(),
                message: format!("{e}: {}", why.message()),
            });
        }
        pw.commit().ctx("indexing the pack")?;
    }
    // A linked worktree's HEAD branch: the one ref of the bundle that is its own.
    let own_branch = meta.head.as_deref().filter(|_| linked.is_some());
    // Whether the worktree's bundle was read after the main repository's.
    let newer = main
        .and_then(|m| Some(meta.read_at_ms? > m.read_at_ms?))
        .unwrap_or(false);
    let repo = match linked {
        Some((_, name)) => {
            let head = own_branch
                .filter(|b| git2::Reference::is_valid_name(b))
                .unwrap_or("refs/heads/main");
            link_worktree(&repo, name, head, target, linked_dir)?
        }
        None => repo,
    };
    let mut created = 0;
    let (mut wip, mut wip_index, mut bundle_head) = (None, None, None);
    for (oid, name) in &refs {
        match name.as_str() {
            "HEAD" => bundle_head = Some(*oid),
            WIP_REF => wip = Some(*oid),
            WIP_INDEX_REF => wip_index = Some(*oid),
            n if [STASH_REF_PREFIX, IN_PROGRESS_REF_PREFIX, REFLOG_REF_PREFIX]
                .iter()
                .any(|p| n.starts_with(p)) => {}
            _ => {
                // A linked worktree shares its refs with the main repository, whose
                // bundle set them: only what it lacks, or its branch moved forward.
                let take = linked.is_none()
                    || match repo.refname_to_id(name) {
                        Err(_) => true,
                        Ok(cur) => {
                            cur != *oid
                                && own_branch == Some(name.as_str())
                                && (newer || repo.graph_descendant_of(*oid, cur).unwrap_or(false))
                        }
                    };
                if take {
                    repo.reference(name, *oid, true, "sandkeep: restored from a bundle")
                        .ctx(format_args!("creating {name}"))?;
                    created += 1;
                }
            }
        }
    }
    let meta_oid = meta.head_oid.as_deref().and_then(|o| Oid::from_str(o).ok());
    if let Some(head) = bundle_head.filter(|h| meta_oid != Some(*h)) {
        // The json is not the bundle's (written separately, one upload may have
        // been cut short): the bundle's own HEAD commit is the truth. On the branch
        // the json names if that branch is there, else on the one branch there, else
        // detached.
        let on = |name: &str| refs.iter().any(|(oid, n)| n == name && *oid == head);
        let branches: Vec<&str> = refs
            .iter()
            .filter(|(oid, n)| n.starts_with("refs/heads/") && *oid == head)
            .map(|(_, n)| n.as_str())
            .collect();
        let branch = match &meta.head {
            Some(name) if on(name) => Some(name.as_str()),
            _ if branches.len() == 1 => Some(branches[0]),
            _ => None,
        };
        tracing::warn!(json = ?meta.head_oid, bundle = %head, "git bundle: its json names another HEAD; going by the bundle");
        match branch {
            Some(name) => repo
                .set_head(name)
                .ctx(format_args!("pointing HEAD at {name}"))?,
            None => repo
                .set_head_detached(head)
                .ctx("setting a detached HEAD")?,
        }
    } else if meta.detached {
        let oid = meta_oid.or(bundle_head).ok_or_else(|| GitError::Bundle {
            what: "restoring HEAD".into(),
            message: "HEAD is detached but no commit is named".into(),
        })?;
        repo.set_head_detached(oid).ctx("setting a detached HEAD")?;
    } else if let Some(name) = &meta.head {
        repo.set_head(name)
            .ctx(format_args!("pointing HEAD at {name}"))?;
    }
    let mut checkout = git2::build::CheckoutBuilder::new();
    checkout.force().recreate_missing(true);
    match wip {
        Some(oid) => {
            let tree = repo
                .find_commit(oid)
                .and_then(|c| c.tree())
                .ctx("reading the work-tree commit")?;
            checkout.update_index(false);
            repo.checkout_tree(tree.as_object(), Some(&mut checkout))
                .ctx("checking out the work tree")?;
        }
        None if bundle_head.is_some() => {
            repo.checkout_head(Some(&mut checkout))
                .ctx("checking out HEAD")?;
        }
        None => {}
    }
    if let Some(oid) = wip_index {
        let tree = repo
            .find_commit(oid)
            .and_then(|c| c.tree())
            .ctx("reading the staged commit")?;
        let mut index = repo.index().ctx("opening the index")?;
        index.read_tree(&tree).ctx("setting the index")?;
        mark_entries(&mut index, meta)?;
        put_back_conflicts(&repo, &mut index, &meta.conflicts)?;
        index.write().ctx("writing the index")?;
    }
    if linked.is_none() {
        restore_symrefs(&repo, meta);
    }
    restore_git_dir_meta(&repo, meta, linked.is_some())?;
    Ok(Restored {
        refs: created,
        had_wip: wip.is_some(),
        read_at_ms: meta.read_at_ms,
        work_tree: meta.work_tree.clone(),
    })
}

/// Downloads `<prefix>workspace/git/<stem>.bundle` and its `.json` from `remote` and
/// restores them into `target` with [`restore_bundle`] (the bundle goes through a
/// temporary file in `tmp_dir`). `None` when the remote holds no such bundle.
pub async fn fetch_and_restore(
    remote: &dyn Remote,
    conversation_prefix: &str,
    stem: &str,
    target: &Path,
    tmp_dir: &Path,
) -> Result<Option<Restored>, GitError> {
    match fetch_meta(remote, conversation_prefix, stem).await? {
        Some(meta) => {
            restore_fetched(
                remote,
                conversation_prefix,
                stem,
                meta,
                target,
                None,
                tmp_dir,
            )
            .await
        }
        None => Ok(None),
    }
}

/// The `.json` of `<prefix>workspace/git/<stem>`; `None` when there is none.
pub async fn fetch_meta(
    remote: &dyn Remote,
    conversation_prefix: &str,
    stem: &str,
) -> Result<Option<HeadMeta>, GitError> {
    let key = format!("{conversation_prefix}{GIT_DIR}{stem}.json");
    let Some(json) = remote
        .get_bytes_within(&key, crate::remote::DOCUMENT_MAX)
        .await?
    else {
        return Ok(None);
    };
    serde_json::from_slice(&json)
        .map(Some)
        .map_err(|e| GitError::Bundle {
            what: key,
            message: e.to_string(),
        })
}

/// [`fetch_and_restore`] once the `.json` is read ([`fetch_meta`]).
pub async fn restore_fetched(
    remote: &dyn Remote,
    conversation_prefix: &str,
    stem: &str,
    meta: HeadMeta,
    target: &Path,
    main: Option<MainRepo>,
    tmp_dir: &Path,
) -> Result<Option<Restored>, GitError> {
    let base = format!("{conversation_prefix}{GIT_DIR}{stem}");
    // Named like a restore's files in the making: the mirror and snapshots leave it
    // out, and the next restore removes it if this one is killed.
    let tmp = tmp_dir.join(format!(
        "{}bundle-{:016x}",
        crate::restore::TMP_PREFIX,
        rand::random::<u64>()
    ));
    match remote.get_to_file(&format!("{base}.bundle"), &tmp).await {
        Ok(_) => {}
        Err(RemoteError::NotFound { .. }) => return Ok(None),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e.into());
        }
    }
    let (bundle, target_dir) = (tmp.clone(), target.to_path_buf());
    let result = tokio::task::spawn_blocking(move || {
        restore_bundle_linked(&bundle, &meta, &target_dir, main.as_ref())
    })
    .await
    .map_err(|e| GitError::Task(e.to_string()));
    let _ = std::fs::remove_file(&tmp);
    Ok(Some(result??))
}

/// One repository in `GET /v1/status`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct RepoStatus {
    pub repo: String,
    /// The branch HEAD is on (short name); `null` when detached.
    pub branch: Option<String>,
    /// HEAD's commit; `null` on an unborn branch.
    pub head: Option<String>,
    /// Tracked paths with staged or unstaged changes.
    pub dirty: u64,
    /// Untracked, non-ignored paths.
    pub untracked: u64,
    /// Commits on the branch that its upstream lacks; `null` without an upstream.
    pub unpushed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The state of one repository (read only: the index is not refreshed on disk).
pub fn repo_status(r: &RepoDir) -> Result<RepoStatus, GitError> {
    let repo = Repository::open(&r.dir).ctx(format_args!("opening {}", r.dir.display()))?;
    let head = head_meta(&repo)?;
    let branch = if head.detached {
        None
    } else {
        head.head
            .as_deref()
            .map(|h| h.strip_prefix("refs/heads/").unwrap_or(h).to_string())
    };
    let (mut dirty, mut untracked) = (0, 0);
    if !repo.is_bare() {
        let mut opts = git2::StatusOptions::new();
        opts.include_untracked(true)
            .recurse_untracked_dirs(true)
            .exclude_submodules(true)
            .include_ignored(false);
        let statuses = repo.statuses(Some(&mut opts)).ctx("reading the status")?;
        for s in statuses.iter() {
            let st = s.status();
            if st == git2::Status::WT_NEW {
                untracked += 1;
            } else if !st.is_empty() && !st.contains(git2::Status::IGNORED) {
                dirty += 1;
            }
        }
    }
    let mut unpushed = None;
    if let (Some(b), Some(oid)) = (&branch, head.head_oid.as_deref()) {
        let local = repo.find_branch(b, git2::BranchType::Local);
        if let Ok(local) = local
            && let Ok(up) = local.upstream()
            && let (Some(up_oid), Ok(oid)) = (up.get().target(), Oid::from_str(oid))
            && let Ok((ahead, _)) = repo.graph_ahead_behind(oid, up_oid)
        {
            unpushed = Some(ahead as u64);
        }
    }
    Ok(RepoStatus {
        repo: r.repo.clone(),
        branch,
        head: head.head_oid,
        dirty,
        untracked,
        unpushed,
        error: None,
    })
}

/// One bundle written, as `POST /v1/git/bundle` reports it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BundleInfo {
    pub repo: String,
    pub key: String,
    pub refs: usize,
    pub bytes: u64,
}

/// A repository whose bundle could not be written.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct BundleFailure {
    pub repo: String,
    pub error: String,
    /// Remote storage failed (worth trying again); else the repository itself could
    /// not be read, which trying again does not mend.
    #[serde(skip)]
    pub remote: bool,
}

impl BundleRound {
    /// The failures that trying again may mend (remote storage's).
    pub fn remote_errors(&self) -> impl Iterator<Item = &BundleFailure> {
        self.errors.iter().filter(|f| f.remote)
    }
}

/// What one pass over the repositories did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BundleRound {
    pub bundles: Vec<BundleInfo>,
    /// Repositories unchanged since their last bundle.
    pub unchanged: Vec<String>,
    pub errors: Vec<BundleFailure>,
}

/// The object name [`discover`] gives the repository at `repo`.
fn stem_of(repo: &str) -> &str {
    if repo == "." { ROOT_STEM } else { repo }
}

/// Writes the bundles of one workspace.
pub struct GitBundler {
    /// `sync.exclude` and the daemon's own directories: repositories there are not
    /// bundled.
    excludes: Vec<String>,
    remote: Arc<dyn Remote>,
    metrics: Arc<Metrics>,
    root: PathBuf,
    /// `<conversation prefix>workspace/git/`.
    prefix: String,
    interval: Duration,
    /// How often the bundles are listed to find those deleted behind the daemon's back
    /// (`sync.verify_interval`; zero: never).
    verify_every: Duration,
    /// Digest of each repository's last bundle (by `repo`).
    last: Mutex<HashMap<String, [u8; 32]>>,
    /// The repositories whose bundles this state directory wrote, kept in
    /// [`BUNDLED_FILE`] so that one deleted while the daemon was down is pruned too.
    bundled: Mutex<BTreeSet<String>>,
    bundled_file: PathBuf,
    /// One pass at a time.
    running: tokio::sync::Mutex<()>,
    /// The workspace mirror, whose delete guards bundle pruning follows.
    mirror: Option<crate::sync::SyncHandle>,
    /// What remote storage answered the last bundle a sync is waiting for (cleared
    /// once they are stored): a sync's timeout says it.
    waiting_on: Mutex<Option<String>>,
    /// Why each repository's last bundle failed (by `repo`; gone once one is written
    /// or found unchanged): `git[].error` in the status.
    failed: Mutex<HashMap<String, String>>,
}

impl GitBundler {
    /// `mirror`: the workspace mirror; without one, bundles are never pruned.
    pub fn new(
        config: &Config,
        remote: Arc<dyn Remote>,
        metrics: Arc<Metrics>,
        mirror: Option<crate::sync::SyncHandle>,
    ) -> Self {
        let root = std::fs::canonicalize(&config.workspace)
            .or_else(|_| std::path::absolute(&config.workspace))
            .unwrap_or_else(|_| config.workspace.clone());
        let prefix = format!("{}{GIT_DIR}", config.conversation_prefix());
        let bundled_file = config.state_dir.join(BUNDLED_FILE);
        let bundled = load_bundled(&bundled_file, &prefix);
        // What the mirror leaves out (and a restore never touches) is not bundled.
        Self {
            excludes: crate::sync::rules::mirror_excludes(config, &root),
            remote,
            metrics,
            root,
            prefix,
            interval: config.git.interval.0,
            verify_every: config.sync.verify_interval.0,
            last: Mutex::new(HashMap::new()),
            bundled: Mutex::new(bundled),
            bundled_file,
            running: tokio::sync::Mutex::new(()),
            mirror,
            waiting_on: Mutex::new(None),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// The workspace whose repositories are bundled.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The object keys of a repository's bundle and json.
    pub fn keys(&self, r: &RepoDir) -> (String, String) {
        self.keys_of_stem(&r.stem)
    }

    fn keys_of_stem(&self, stem: &str) -> (String, String) {
        (
            format!("{}{stem}.bundle", self.prefix),
            format!("{}{stem}.json", self.prefix),
        )
    }

    async fn repos(&self) -> Result<Discovered, GitError> {
        let (root, excludes) = (self.root.clone(), self.excludes.clone());
        tokio::task::spawn_blocking(move || find_repos(&root, &excludes))
            .await
            .map_err(|e| GitError::Task(e.to_string()))?
            .ctx(format_args!(
                "reading the workspace {}",
                self.root.display()
            ))
    }

    /// [`GitBundler::write_all`] of the repositories that changed, again (with
    /// backoff) while remote storage fails a bundle: for a sync, which waits until the
    /// bundles are stored. A repository that cannot be read stays in `errors` (trying
    /// again does not mend that). `bundles` has what every attempt wrote.
    pub async fn write_changed_until_stored(&self) -> Result<BundleRound, GitError> {
        let mut backoff = crate::remote::Backoff::default();
        let mut written = Vec::new();
        loop {
            let mut round = self.write_all(false).await?;
            written.append(&mut round.bundles);
            let failed = round
                .remote_errors()
                .next()
                .map(|f| format!("git bundle of {}: {}", f.repo, f.error));
            *self.waiting_on.lock().unwrap_or_else(|e| e.into_inner()) = failed.clone();
            if failed.is_none() {
                round.bundles = written;
                return Ok(round);
            }
            // Someone waits: every 2 s at most, as the workspace mirror's rounds.
            tokio::time::sleep(backoff.next_delay_for(true)).await;
        }
    }

    /// Why the bundles a sync waits for are not stored yet (remote storage's last
    /// answer), if they are not.
    pub fn waiting_on(&self) -> Option<String> {
        self.waiting_on
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Writes the bundle of every repository (only those that changed unless `force`).
    /// A repository that fails is reported in `errors`; the others go on.
    pub async fn write_all(&self, force: bool) -> Result<BundleRound, GitError> {
        let _one = self.running.lock().await;
        let found = self.repos().await?;
        let mut round = BundleRound::default();
        for r in &found.repos {
            let started = Instant::now();
            let result = self.write_one(r, force).await;
            {
                let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
                match &result {
                    Err(e) => failed.insert(r.repo.clone(), e.to_string()),
                    Ok(_) => failed.remove(&r.repo),
                };
            }
            match result {
                Ok(Some(info)) => {
                    self.metrics.git_bundle("ok", started.elapsed());
                    tracing::info!(repo = %info.repo, key = %info.key, refs = info.refs, bytes = info.bytes, "git bundle stored");
                    round.bundles.push(info);
                }
                Ok(None) => round.unchanged.push(r.repo.clone()),
                Err(e) => {
                    self.metrics.git_bundle("error", started.elapsed());
                    tracing::warn!(repo = %r.repo, error = %e, "git bundle failed");
                    round.errors.push(BundleFailure {
                        repo: r.repo.clone(),
                        error: e.to_string(),
                        remote: matches!(e, GitError::Remote(_)),
                    });
                }
            }
        }
        self.remember(&round.bundles);
        if found.whole {
            self.prune(&found.repos).await;
        }
        Ok(round)
    }

    /// Adds the repositories just bundled to the ones this state directory wrote.
    fn remember(&self, bundles: &[BundleInfo]) {
        let mut bundled = self.bundled.lock().unwrap_or_else(|e| e.into_inner());
        let before = bundled.len();
        bundled.extend(bundles.iter().map(|b| b.repo.clone()));
        if bundled.len() != before {
            self.save_bundled(&bundled);
        }
    }

    fn save_bundled(&self, bundled: &BTreeSet<String>) {
        let record = BundledRecord {
            prefix: self.prefix.clone(),
            repos: bundled.clone(),
        };
        let written = serde_json::to_vec(&record)
            .map_err(io::Error::other)
            .and_then(|json| crate::replace_file(&self.bundled_file, &json));
        if let Err(e) = written {
            // Only pruning after a restart depends on it.
            tracing::warn!(file = %self.bundled_file.display(), error = %e, "cannot record which repositories were bundled");
        }
    }

    /// Deletes the bundles of repositories that this state directory bundled (in this
    /// run or an earlier one) and that are gone from the workspace, under the mirror's
    /// delete guards: after a round of the
    /// mirror, and not while the workspace is unavailable or the mirror holds deletions
    /// back (an emptied workspace, a mass deletion, files of a new state directory
    /// missing here). A bundle is often the only copy of commits and of ignored tracked
    /// files, so one that this daemon never wrote (a repository missing from a new
    /// sandbox's workspace) is never deleted.
    async fn prune(&self, repos: &[RepoDir]) {
        let Some(mirror) = &self.mirror else {
            return;
        };
        let gone: Vec<String> = {
            let bundled = self.bundled.lock().unwrap_or_else(|e| e.into_inner());
            bundled
                .iter()
                .filter(|repo| !repos.iter().any(|r| &r.repo == *repo))
                .cloned()
                .collect()
        };
        if gone.is_empty() {
            return;
        }
        // The mirror must have looked at the tree as it is now (polling, it looks only
        // every poll_interval): a round first, then its verdict.
        if let Err(e) = mirror.sync(false).await {
            tracing::debug!(error = %e, "bundles of repositories that are gone are kept: the mirror's round failed");
            return;
        }
        let s = mirror.status();
        if !s.workspace_available || s.held_deletes > 0 {
            tracing::debug!(
                repos = ?gone,
                "bundles of repositories that are gone are kept while the workspace mirror holds deletions back"
            );
            return;
        }
        let stale: Vec<String> = gone
            .iter()
            .map(|repo| stem_of(repo))
            // A subdirectory named like the root's object may be a repository now.
            .filter(|stem| !repos.iter().any(|r| r.stem == *stem))
            .flat_map(|stem| {
                let (bundle, json) = self.keys_of_stem(stem);
                [bundle, json]
            })
            .collect();
        match self.remote.delete_many(&stale).await {
            Ok(()) => {
                tracing::info!(
                    deleted = stale.len(),
                    "bundles of repositories that are gone deleted"
                );
                let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
                last.retain(|repo, _| repos.iter().any(|r| &r.repo == repo));
                let mut bundled = self.bundled.lock().unwrap_or_else(|e| e.into_inner());
                bundled.retain(|repo| !gone.contains(repo));
                self.save_bundled(&bundled);
            }
            Err(e) => tracing::warn!(error = %e, "cannot delete stale git bundles"),
        }
    }

    async fn write_one(&self, r: &RepoDir, force: bool) -> Result<Option<BundleInfo>, GitError> {
        let (bundle_key, json_key) = self.keys(r);
        if !remote::key_fits(&bundle_key) || !remote::key_fits(&json_key) {
            return Err(GitError::Bundle {
                what: r.repo.clone(),
                message: "the bundle's object key would be too long".into(),
            });
        }
        let skip_if = if force {
            None
        } else {
            self.last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&r.repo)
                .copied()
        };
        let (writer, reader) = crate::snapshot::pipe();
        let (start_tx, start_rx) = oneshot::channel::<()>();
        let dir = r.dir.clone();
        // The mirror's own rules (its excludes, the daemon's directories and
        // `.sandkeepignore` files; git applies `.gitignore` itself), from the workspace
        // root, whose relative path leads to the repository.
        let rules = crate::sync::rules::Rules::new(&self.root, &self.excludes)
            .map(crate::sync::rules::Rules::only_sandkeepignore)
            .map_err(|e| GitError::Bundle {
                what: r.repo.clone(),
                message: format!("exclude patterns: {e}"),
            })?;
        let in_root = dir
            .strip_prefix(&self.root)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let root = self.root.clone();
        let job = tokio::task::spawn_blocking(move || {
            let mut writer = writer;
            let start = move || {
                let _ = start_tx.send(());
            };
            let leave_out = |p: &Path, is_dir: bool| rules.is_ignored(&in_root.join(p), is_dir);
            match write_bundle_leaving_out(&dir, &leave_out, skip_if, start, &mut writer) {
                Ok(s) => Ok(s.map(|mut s| {
                    s.head.worktree_of = worktree_of(&dir, &root);
                    s
                })),
                Err(e) => {
                    writer.fail(&io::Error::other(e.to_string()));
                    Err(e)
                }
            }
        });
        let uploaded = match start_rx.await {
            Ok(()) => Some(self.remote.put_stream(&bundle_key, Box::new(reader)).await),
            Err(_) => None,
        };
        let built = job.await.map_err(|e| GitError::Task(e.to_string()))?;
        let (bytes, summary) = match (uploaded, built) {
            (None, Ok(None)) => return Ok(None),
            (Some(Ok(bytes)), Ok(Some(summary))) => (bytes, summary),
            (Some(Err(RemoteError::Source { .. })) | None, Err(e)) => return Err(e),
            (Some(Err(e)), _) => return Err(e.into()),
            (Some(Ok(_)), Err(e)) => return Err(e),
            (None, Ok(Some(_))) | (Some(Ok(_)), Ok(None)) => {
                return Err(GitError::Task("the bundle and its upload disagree".into()));
            }
        };
        let head = HeadMeta {
            repo: Some(r.repo.clone()),
            ..summary.head
        };
        let json = serde_json::to_vec_pretty(&head).map_err(|e| GitError::Task(e.to_string()))?;
        if json.len() as u64 > remote::DOCUMENT_MAX {
            // Its bundle went up, but without this json no restore takes it.
            return Err(GitError::Bundle {
                what: json_key,
                message: format!(
                    "the repository's metadata would take {} bytes, more than the {} a restore reads",
                    json.len(),
                    remote::DOCUMENT_MAX
                ),
            });
        }
        self.remote
            .put_bytes(&json_key, bytes::Bytes::from(json))
            .await?;
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(r.repo.clone(), summary.digest);
        Ok(Some(BundleInfo {
            repo: r.repo.clone(),
            key: bundle_key,
            refs: summary.refs,
            bytes,
        }))
    }

    /// Forgets the last bundle of each repository whose bundle or json object is gone
    /// from remote storage (deleted behind the daemon's back): the next pass writes it
    /// again. Repositories bundled while the listing ran are left alone.
    async fn forget_missing(&self) -> Result<(), RemoteError> {
        let before = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if before.is_empty() {
            return Ok(());
        }
        let present: HashSet<String> = remote::list_all(self.remote.as_ref(), &self.prefix)
            .await?
            .into_iter()
            .map(|o| o.key)
            .collect();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let mut forgotten = Vec::new();
        for (repo, digest) in before {
            let (bundle, json) = self.keys_of_stem(stem_of(&repo));
            if (!present.contains(&bundle) || !present.contains(&json))
                && last.get(&repo) == Some(&digest)
            {
                last.remove(&repo);
                forgotten.push(repo);
            }
        }
        if !forgotten.is_empty() {
            tracing::warn!(repos = ?forgotten, "git bundles are missing in remote storage (deleted by someone?): writing them again");
        }
        Ok(())
    }

    /// The state of every repository, for `GET /v1/status`.
    pub async fn status(&self) -> Vec<RepoStatus> {
        let (root, excludes) = (self.root.clone(), self.excludes.clone());
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let result = tokio::task::spawn_blocking(move || {
            let repos = find_repos(&root, &excludes).map_or_else(|_| Vec::new(), |f| f.repos);
            repos
                .iter()
                .map(|r| {
                    let mut status = repo_status(r).unwrap_or_else(|e| RepoStatus {
                        repo: r.repo.clone(),
                        branch: None,
                        head: None,
                        dirty: 0,
                        untracked: 0,
                        unpushed: None,
                        error: Some(e.to_string()),
                    });
                    if status.error.is_none() {
                        status.error = failed.get(&r.repo).map(|e| format!("git bundle: {e}"));
                    }
                    status
                })
                .collect::<Vec<_>>()
        })
        .await;
        result.unwrap_or_default()
    }

    /// Writes changed bundles every `git.interval` (the first pass at once) until
    /// `stop` fires.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        if self.interval.is_zero() {
            return;
        }
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut verify = crate::sync::VerifySchedule::new(self.verify_every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if verify.take_due() {
                let listed = tokio::select! {
                    _ = stop.cancelled() => return,
                    listed = self.forget_missing() => listed,
                };
                if let Err(e) = listed {
                    tracing::warn!(error = %e, "cannot list the git bundles to find missing ones; trying again later");
                    verify.retry();
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                r = self.write_all(false) => if let Err(e) = r {
                    tracing::warn!(error = %e, "git bundles skipped");
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An object at a repository's `.json` key too large to be one (a sparse file
    /// here) is refused before it is read.
    #[tokio::test]
    async fn metadata_too_large_to_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let remote = crate::remote::dir::DirRemote::new(dir.path()).unwrap();
        let prefix = "conversations/u/c/";
        let json = dir.path().join(format!("{prefix}{GIT_DIR}root.json"));
        std::fs::create_dir_all(json.parent().unwrap()).unwrap();
        let f = std::fs::File::create(&json).unwrap();
        f.set_len(remote::DOCUMENT_MAX + 1).unwrap();
        match fetch_meta(&remote, prefix, "root").await {
            Err(GitError::Remote(RemoteError::TooLarge { .. })) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn header_is_written_and_read_back() {
        let a = Oid::from_str("0123456789abcdef0123456789abcdef01234567").unwrap();
        let b = Oid::from_str("89abcdef0123456789abcdef0123456789abcdef").unwrap();
        let refs = vec![(a, "HEAD".to_string()), (b, "refs/heads/main".to_string())];
        let header = bundle_header(&refs);
        assert_eq!(
            String::from_utf8(header.clone()).unwrap(),
            "# v2 git bundle\n\
             0123456789abcdef0123456789abcdef01234567 HEAD\n\
             89abcdef0123456789abcdef0123456789abcdef refs/heads/main\n\n"
        );
        let mut data = header;
        data.extend_from_slice(b"PACK...");
        let mut cursor = io::Cursor::new(data);
        assert_eq!(read_bundle_header(&mut cursor).unwrap(), refs);
        let mut rest = Vec::new();
        io::Read::read_to_end(&mut cursor, &mut rest).unwrap();
        assert_eq!(rest, b"PACK...");
    }

    #[test]
    fn bad_headers_are_refused() {
        for bad in [
            &b"# v3 git bundle\n\n"[..],
            b"# v2 git bundle\n-0123456789abcdef0123456789abcdef01234567\n\n",
            b"# v2 git bundle\nnot-an-oid refs/heads/x\n\n",
            b"# v2 git bundle\n0123456789abcdef0123456789abcdef01234567 HEAD\n",
        ] {
            assert!(
                read_bundle_header(&mut io::Cursor::new(bad)).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn discovery_finds_repositories_down_to_the_depth_limit() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        Repository::init(root).unwrap();
        for repo in [
            "lib",
            "lib/vendored",
            "lib/ignored",
            "lib/ignored/inner",
            "a/deep",
            "a/b/c/d",
            "a/b/c/d2/e",
            "skipped",
            "skipped/inner",
            "plain/x/y/z/too-deep",
        ] {
            Repository::init(root.join(repo)).unwrap();
        }
        std::fs::create_dir_all(root.join("empty/dir")).unwrap();
        std::os::unix::fs::symlink(root.join("lib"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("plain/alink")).unwrap();
        // `skipped` and `lib/ignored` are not walked into (as ignored directories), yet
        // repositories all the same.
        let descend = |rel: &Path| !rel.starts_with("skipped") && !rel.starts_with("lib/ignored");
        let found = discover(root, &descend, 100).unwrap();
        assert!(found.whole);
        let repos = found.repos;
        let names: Vec<(&str, &str)> = repos
            .iter()
            .map(|r| (r.repo.as_str(), r.stem.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![
                (".", "workspace"),
                ("a/b/c/d", "a/b/c/d"),
                ("a/deep", "a/deep"),
                ("lib", "lib"),
                ("lib/ignored", "lib/ignored"),
                ("lib/vendored", "lib/vendored"),
                ("skipped", "skipped"),
            ]
        );
        assert_eq!(repos[1].dir, root.join("a/b/c/d"));

        // Cut short by the limit: what it found, and that it is not the whole.
        let found = discover(root, &descend, 3).unwrap();
        assert!(!found.whole);
        let names: Vec<&str> = found.repos.iter().map(|r| r.repo.as_str()).collect();
        assert!(
            names.contains(&"lib") && names.contains(&"skipped"),
            "{names:?}"
        );
        assert!(!names.contains(&"a/b/c/d"), "{names:?}");
    }

    #[test]
    fn empty_repo_bundles_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        Repository::init(&src).unwrap();
        let mut out = Vec::new();
        let s = write_bundle(&src, None, || {}, &mut out).unwrap().unwrap();
        assert_eq!(s.refs, 2, "only the WIP refs");
        assert!(!s.head.detached);
        assert_eq!(s.head.head_oid, None);
        // Unchanged: nothing written.
        let mut again = Vec::new();
        assert!(
            write_bundle(&src, Some(s.digest), || {}, &mut again)
                .unwrap()
                .is_none()
        );
        assert!(again.is_empty());
        let path = dir.path().join("b.bundle");
        std::fs::write(&path, &out).unwrap();
        let dst = dir.path().join("dst");
        let r = restore_bundle(&path, &s.head, &dst).unwrap();
        assert_eq!(r.refs, 0);
        let repo = Repository::open(&dst).unwrap();
        assert!(repo.head().is_err(), "still unborn");
        assert_eq!(
            repo.find_reference("HEAD")
                .unwrap()
                .symbolic_target()
                .unwrap(),
            s.head.head.as_deref()
        );
    }

    /// A json left from an earlier bundle (the upload of the new one cut short): the
    /// bundle's own HEAD is the truth, on the branch that points there.
    #[test]
    fn a_stale_json_gives_way_to_the_bundles_head() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let git = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(&src)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        git(&["init", "-q", "-b", "main"]);
        std::fs::write(src.join("a.txt"), "1").unwrap();
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "one"]);
        git(&["checkout", "-q", "--detach"]);
        let mut out = Vec::new();
        let old = write_bundle(&src, None, || {}, &mut out).unwrap().unwrap();
        assert!(old.head.detached);
        git(&["checkout", "-q", "main"]);
        std::fs::write(src.join("a.txt"), "2").unwrap();
        git(&["commit", "-q", "-am", "two"]);
        let tip = git(&["rev-parse", "HEAD"]);
        let mut out = Vec::new();
        write_bundle(&src, None, || {}, &mut out).unwrap().unwrap();
        let path = dir.path().join("b.bundle");
        std::fs::write(&path, &out).unwrap();
        let dst = dir.path().join("dst");
        restore_bundle(&path, &old.head, &dst).unwrap();
        let repo = Repository::open(&dst).unwrap();
        let head = repo.head().unwrap();
        assert_eq!(head.name().unwrap(), "refs/heads/main");
        assert_eq!(head.target().unwrap().to_string(), tip.trim());
    }

    /// A submodule's git dir lives in the superproject's `.git/modules/` and its config
    /// says where its work tree is from there; restored, `.git` is in the work tree.
    #[test]
    fn a_submodule_comes_back_without_its_worktree_setting() {
        let dir = tempfile::tempdir().unwrap();
        let git = |cwd: &Path, args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t", "-c"])
                .arg("protocol.file.allow=always")
                .args(args)
                .current_dir(cwd)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
        };
        let (lib, sup) = (dir.path().join("lib"), dir.path().join("super"));
        for d in [&lib, &sup] {
            std::fs::create_dir(d).unwrap();
            git(d, &["init", "-q"]);
        }
        std::fs::write(lib.join("l.txt"), "l").unwrap();
        git(&lib, &["add", "."]);
        git(&lib, &["commit", "-q", "-m", "lib"]);
        git(
            &sup,
            &["submodule", "add", "-q", lib.to_str().unwrap(), "mod"],
        );
        let src = sup.join("mod");
        let mut out = Vec::new();
        let s = write_bundle(&src, None, || {}, &mut out).unwrap().unwrap();
        assert!(s.head.config.as_deref().unwrap().contains("worktree"));
        let path = dir.path().join("b.bundle");
        std::fs::write(&path, &out).unwrap();
        let dst = dir.path().join("dst");
        restore_bundle(&path, &s.head, &dst).unwrap();
        let status = std::process::Command::new("git")
            .arg("-C")
            .arg(&dst)
            .arg("status")
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
        let config = std::fs::read_to_string(dst.join(".git/config")).unwrap();
        assert!(!config.contains("worktree"), "{config}");
    }

    /// The work-tree commit stores what the mirror stores: nothing a `.sandkeepignore`
    /// or `sync.exclude` leaves out, and no file over the cap, tracked or not.
    #[test]
    fn the_work_tree_commit_leaves_out_what_the_mirror_does() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
        std::fs::create_dir(&src).unwrap();
        let git = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .args(["-c", "user.name=t", "-c", "user.email=t@t"])
                .args(args)
                .current_dir(&src)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {out:?}");
        };
        git(&["init", "-q"]);
        std::fs::write(src.join("tracked.txt"), "v1").unwrap();
        std::fs::write(src.join("big.bin"), "small").unwrap();
        git(&["add", "."]);
        git(&["commit", "-q", "-m", "one"]);
        std::fs::write(src.join(".sandkeepignore"), "secret.env\n").unwrap();
        std::fs::write(src.join("secret.env"), "TOKEN=1").unwrap();
        std::fs::create_dir(src.join("node_modules")).unwrap();
        std::fs::write(src.join("node_modules/x.js"), "x").unwrap();
        std::fs::write(src.join("keep.txt"), "keep").unwrap();
        std::fs::write(src.join("tracked.txt"), "v2").unwrap();
        let big = std::fs::File::create(src.join("big.bin")).unwrap();
        big.set_len(MAX_WIP_FILE + 1).unwrap();
        let rules = crate::sync::rules::Rules::new(&src, &["node_modules/".into()])
            .unwrap()
            .only_sandkeepignore();
        let leave_out = |p: &Path, is_dir: bool| rules.is_ignored(p, is_dir);
        let mut out = Vec::new();
        let s = write_bundle_leaving_out(&src, &leave_out, None, || {}, &mut out)
            .unwrap()
            .unwrap();
        let path = dir.path().join("b.bundle");
        std::fs::write(&path, &out).unwrap();
        let dst = dir.path().join("dst");
        restore_bundle(&path, &s.head, &dst).unwrap();
        let read = |p: &str| std::fs::read_to_string(dst.join(p)).ok();
        assert_eq!(read("tracked.txt").as_deref(), Some("v2"));
        assert_eq!(read("keep.txt").as_deref(), Some("keep"));
        assert_eq!(read(".sandkeepignore").as_deref(), Some("secret.env\n"));
        assert_eq!(read("secret.env"), None, "left out by .sandkeepignore");
        assert!(
            !dst.join("node_modules").exists(),
            "left out by sync.exclude"
        );
        let big = std::fs::metadata(dst.join("big.bin")).unwrap().len();
        assert_eq!(big, 5, "over the cap: the committed version");
    }

    /// Bundles `src` and restores the bundle into `<scratch>/dst`, which it returns.
    fn round_trip(src: &Path, scratch: &Path) -> PathBuf {
        let mut out = Vec::new();
        let s = write_bundle(src, None, || {}, &mut out).unwrap().unwrap();
        let path = scratch.join("b.bundle");
        std::fs::write(&path, &out).unwrap();
        let dst = scratch.join("dst");
        restore_bundle(&path, &s.head, &dst).unwrap();
        dst
    }

    fn git_in(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@t"])
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    /// `git add -N` and `git update-index --skip-worktree` / `--assume-unchanged` come
    /// back as they were: an intent-to-add entry is not a staged empty file, a
    /// skip-worktree file missing from the work tree is not a deletion, and an
    /// assume-unchanged file's change stays unseen.
    #[test]
    fn intent_to_add_and_skip_worktree_entries_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
        std::fs::create_dir(&src).unwrap();
        git_in(&src, &["init", "-q"]);
        std::fs::write(src.join("a.txt"), "a").unwrap();
        std::fs::write(src.join("sparse.txt"), "s").unwrap();
        git_in(&src, &["add", "."]);
        git_in(&src, &["commit", "-q", "-m", "one"]);
        std::fs::write(src.join("new.txt"), "not staged yet").unwrap();
        git_in(&src, &["add", "-N", "new.txt"]);
        git_in(&src, &["update-index", "--skip-worktree", "sparse.txt"]);
        std::fs::remove_file(src.join("sparse.txt")).unwrap();
        git_in(&src, &["update-index", "--assume-unchanged", "a.txt"]);
        std::fs::write(src.join("a.txt"), "changed, not to be seen").unwrap();
        let before = git_in(&src, &["status", "--porcelain"]);
        assert_eq!(before, " A new.txt\n");

        let dst = round_trip(&src, dir.path());
        assert_eq!(git_in(&dst, &["status", "--porcelain"]), before);
        assert_eq!(
            std::fs::read_to_string(dst.join("new.txt")).unwrap(),
            "not staged yet"
        );
        assert_eq!(
            git_in(&dst, &["ls-files", "-v", "sparse.txt"]),
            "S sparse.txt\n"
        );
        assert_eq!(git_in(&dst, &["ls-files", "-v", "a.txt"]), "h a.txt\n");
    }

    /// A merge stopped on a conflict comes back stopped there: MERGE_HEAD and its
    /// message, the conflict's three sides in the index, the file with its markers.
    /// Finishing it makes a merge commit, as it would have where it started.
    #[test]
    fn a_merge_in_progress_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
        std::fs::create_dir(&src).unwrap();
        git_in(&src, &["init", "-q", "-b", "main"]);
        std::fs::write(src.join("a.txt"), "base\n").unwrap();
        std::fs::write(src.join("b.txt"), "b\n").unwrap();
        git_in(&src, &["add", "."]);
        git_in(&src, &["commit", "-q", "-m", "base"]);
        git_in(&src, &["checkout", "-q", "-b", "topic"]);
        std::fs::write(src.join("a.txt"), "theirs\n").unwrap();
        std::fs::write(src.join("c.txt"), "new on topic\n").unwrap();
        git_in(&src, &["add", "."]);
        git_in(&src, &["commit", "-q", "-m", "topic"]);
        let topic = git_in(&src, &["rev-parse", "HEAD"]);
        git_in(&src, &["checkout", "-q", "main"]);
        std::fs::write(src.join("a.txt"), "ours\n").unwrap();
        git_in(&src, &["commit", "-q", "-am", "main"]);
        // The topic branch goes: only MERGE_HEAD names its commit.
        let merge = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "merge",
                "topic",
            ])
            .current_dir(&src)
            .output()
            .unwrap();
        assert!(!merge.status.success(), "a conflict: {merge:?}");
        git_in(&src, &["update-ref", "-d", "refs/heads/topic"]);
        let status = git_in(&src, &["status", "--porcelain"]);
        assert_eq!(status, "UU a.txt\nA  c.txt\n");
        let stages = git_in(&src, &["ls-files", "-s", "a.txt"]);
        let marked = std::fs::read_to_string(src.join("a.txt")).unwrap();

        let dst = round_trip(&src, dir.path());
        assert_eq!(git_in(&dst, &["status", "--porcelain"]), status);
        assert_eq!(git_in(&dst, &["ls-files", "-s", "a.txt"]), stages);
        assert_eq!(std::fs::read_to_string(dst.join("a.txt")).unwrap(), marked);
        assert_eq!(git_in(&dst, &["rev-parse", "MERGE_HEAD"]), topic);
        assert!(
            git_in(&dst, &["for-each-ref"])
                .lines()
                .all(|l| !l.contains("sandkeep"))
        );

        std::fs::write(dst.join("a.txt"), "both\n").unwrap();
        git_in(&dst, &["add", "a.txt"]);
        git_in(&dst, &["commit", "-q", "--no-edit"]);
        let parents = git_in(&dst, &["rev-list", "--parents", "-n", "1", "HEAD"]);
        assert_eq!(
            parents.split_whitespace().count(),
            3,
            "a merge commit: {parents}"
        );
        assert!(parents.contains(topic.trim()));
        assert_eq!(
            std::fs::read_to_string(dst.join("c.txt")).unwrap(),
            "new on topic\n"
        );
    }

    /// A rebase stopped on a conflict comes back stopped there (`.git/rebase-merge`,
    /// REBASE_HEAD, ORIG_HEAD, the conflict's stages): `git rebase --continue` finishes
    /// it onto the new base, and the branch moves as it would have.
    #[test]
    fn a_rebase_in_progress_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
        std::fs::create_dir(&src).unwrap();
        git_in(&src, &["init", "-q", "-b", "main"]);
        std::fs::write(src.join("a.txt"), "base\n").unwrap();
        git_in(&src, &["add", "."]);
        git_in(&src, &["commit", "-q", "-m", "base"]);
        git_in(&src, &["checkout", "-q", "-b", "topic"]);
        std::fs::write(src.join("a.txt"), "theirs\n").unwrap();
        git_in(&src, &["commit", "-q", "-am", "topic one"]);
        std::fs::write(src.join("t.txt"), "two\n").unwrap();
        git_in(&src, &["add", "t.txt"]);
        git_in(&src, &["commit", "-q", "-m", "topic two"]);
        git_in(&src, &["checkout", "-q", "main"]);
        std::fs::write(src.join("a.txt"), "ours\n").unwrap();
        git_in(&src, &["commit", "-q", "-am", "main"]);
        let main = git_in(&src, &["rev-parse", "main"]);
        git_in(&src, &["checkout", "-q", "topic"]);
        let rebase = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "rebase",
                "main",
            ])
            .current_dir(&src)
            .output()
            .unwrap();
        assert!(!rebase.status.success(), "a conflict: {rebase:?}");
        let status = git_in(&src, &["status", "--porcelain"]);
        assert_eq!(status, "UU a.txt\n");

        let dst = round_trip(&src, dir.path());
        assert_eq!(git_in(&dst, &["status", "--porcelain"]), status);
        assert!(dst.join(".git/rebase-merge/git-rebase-todo").is_file());
        assert_eq!(
            git_in(&dst, &["rev-parse", "REBASE_HEAD", "ORIG_HEAD"]),
            git_in(&src, &["rev-parse", "REBASE_HEAD", "ORIG_HEAD"])
        );

        std::fs::write(dst.join("a.txt"), "both\n").unwrap();
        git_in(&dst, &["add", "a.txt"]);
        let done = std::process::Command::new("git")
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "core.editor=true",
            ])
            .args(["rebase", "--continue"])
            .current_dir(&dst)
            .output()
            .unwrap();
        assert!(done.status.success(), "{done:?}");
        assert_eq!(
            git_in(&dst, &["symbolic-ref", "HEAD"]),
            "refs/heads/topic\n"
        );
        let log = git_in(&dst, &["log", "--format=%s", "topic"]);
        assert_eq!(log, "topic two\ntopic one\nmain\nbase\n");
        assert_eq!(git_in(&dst, &["rev-parse", "topic~2"]), main);
        assert_eq!(std::fs::read_to_string(dst.join("t.txt")).unwrap(), "two\n");
    }

    /// The reflogs of HEAD and the branches come back, with the commits only they
    /// still name: a commit reset away can be found and recovered after a restore as
    /// before it.
    #[test]
    fn reflogs_come_back_with_the_commits_they_name() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
        std::fs::create_dir(&src).unwrap();
        git_in(&src, &["init", "-q", "-b", "main"]);
        for n in 1..=3 {
            std::fs::write(src.join("a.txt"), format!("{n}\n")).unwrap();
            git_in(&src, &["add", "."]);
            git_in(&src, &["commit", "-q", "-m", &format!("c{n}")]);
        }
        let lost = git_in(&src, &["rev-parse", "HEAD"]);
        git_in(&src, &["reset", "-q", "--hard", "HEAD~2"]);
        git_in(&src, &["checkout", "-q", "-b", "side"]);
        let format = ["reflog", "--format=%H %gn <%ge> %gd %gs"];
        let head_log = git_in(&src, &format);
        let main_log = git_in(&src, &[&format[..], &["main"]].concat());
        assert!(head_log.contains("reset: moving to HEAD~2"), "{head_log}");

        let dst = round_trip(&src, dir.path());
        assert_eq!(git_in(&dst, &format), head_log);
        assert_eq!(git_in(&dst, &[&format[..], &["main"]].concat()), main_log);
        assert!(
            git_in(&dst, &["for-each-ref"])
                .lines()
                .all(|l| !l.contains("sandkeep"))
        );
        git_in(&dst, &["reset", "-q", "--hard", "main@{1}"]);
        assert_eq!(git_in(&dst, &["rev-parse", "HEAD"]), lost);
        assert_eq!(std::fs::read_to_string(dst.join("a.txt")).unwrap(), "3\n");
        git_in(&dst, &["fsck", "--no-progress"]);
    }

    /// Symbolic refs come back: a clone's `origin/HEAD` (so `origin` names the remote's
    /// default branch) and one a user made.
    #[test]
    fn symbolic_refs_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let up = base.join("up");
        std::fs::create_dir(&up).unwrap();
        git_in(&up, &["init", "-q", "-b", "trunk"]);
        std::fs::write(up.join("a.txt"), "a").unwrap();
        git_in(&up, &["add", "."]);
        git_in(&up, &["commit", "-q", "-m", "one"]);
        git_in(&base, &["clone", "-q", "up", "src"]);
        let src = base.join("src");
        git_in(
            &src,
            &["symbolic-ref", "refs/heads/alias", "refs/heads/trunk"],
        );
        let origin_head = git_in(&src, &["symbolic-ref", "refs/remotes/origin/HEAD"]);
        assert_eq!(origin_head, "refs/remotes/origin/trunk\n");

        let scratch = base.join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let dst = round_trip(&src, &scratch);
        assert_eq!(
            git_in(&dst, &["symbolic-ref", "refs/remotes/origin/HEAD"]),
            origin_head
        );
        assert_eq!(
            git_in(&dst, &["symbolic-ref", "refs/heads/alias"]),
            "refs/heads/trunk\n"
        );
        assert_eq!(
            git_in(&dst, &["rev-parse", "origin"]),
            git_in(&src, &["rev-parse", "origin"])
        );
        assert_eq!(git_in(&dst, &["status", "--porcelain"]), "");
    }

    /// The reflogs of remote-tracking branches (a clone, then a fetch) come back too.
    #[test]
    fn remote_tracking_reflogs_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let up = base.join("up");
        std::fs::create_dir(&up).unwrap();
        git_in(&up, &["init", "-q", "-b", "trunk"]);
        for n in 1..=2 {
            if n == 2 {
                git_in(&base, &["clone", "-q", "up", "src"]);
            }
            std::fs::write(up.join("a.txt"), format!("{n}")).unwrap();
            git_in(&up, &["add", "."]);
            git_in(&up, &["commit", "-q", "-m", &format!("c{n}")]);
        }
        let src = base.join("src");
        git_in(&src, &["fetch", "-q"]);
        let format = ["reflog", "--format=%H %gs", "refs/remotes/origin/trunk"];
        let log = git_in(&src, &format);
        assert!(log.contains("fetch"), "{log}");

        let scratch = base.join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let dst = round_trip(&src, &scratch);
        assert_eq!(git_in(&dst, &format), log);
    }

    /// Repositories that reach outside the workspace are not bundled: a `.git` linked to
    /// a repository elsewhere, a `gitdir:` file pointing to one, a `core.worktree`
    /// naming another directory. A repository wholly inside and its linked worktree
    /// are.
    #[test]
    fn repositories_reaching_outside_the_workspace_are_not_bundled() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let outside = base.join("outside");
        std::fs::create_dir(&outside).unwrap();
        git_in(&outside, &["init", "-q", "-b", "main"]);
        git_in(&outside, &["commit", "-q", "--allow-empty", "-m", "secret"]);
        let ws = base.join("ws");
        for d in ["a", "b", "c", "ok"] {
            std::fs::create_dir_all(ws.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(outside.join(".git"), ws.join("a/.git")).unwrap();
        std::fs::write(
            ws.join("b/.git"),
            format!("gitdir: {}\n", outside.join(".git").display()),
        )
        .unwrap();
        git_in(&ws.join("c"), &["init", "-q", "-b", "main"]);
        git_in(
            &ws.join("c"),
            &["config", "core.worktree", outside.to_str().unwrap()],
        );
        git_in(&ws.join("ok"), &["init", "-q", "-b", "main"]);
        git_in(
            &ws.join("ok"),
            &["commit", "-q", "--allow-empty", "-m", "one"],
        );
        git_in(
            &ws.join("ok"),
            &["worktree", "add", "-q", "-b", "feat", "../wt"],
        );
        let repos: Vec<String> = find_repos(&ws, &[])
            .unwrap()
            .repos
            .into_iter()
            .map(|r| r.repo)
            .collect();
        assert_eq!(repos, ["ok", "wt"]);
    }

    /// A `.git` symlink in the place of a repository a restore brings back is removed,
    /// never restored through (the directory it leads to would get the repository,
    /// and its parent the work tree).
    #[test]
    fn a_restore_is_never_made_through_a_git_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let src = base.join("src");
        std::fs::create_dir(&src).unwrap();
        git_in(&src, &["init", "-q", "-b", "main"]);
        std::fs::write(src.join("payload.conf"), "p").unwrap();
        git_in(&src, &["add", "."]);
        git_in(&src, &["commit", "-q", "-m", "one"]);
        let mut out = Vec::new();
        let s = write_bundle(&src, None, || {}, &mut out).unwrap().unwrap();
        let bundle = base.join("b.bundle");
        std::fs::write(&bundle, &out).unwrap();
        let victim = base.join("victim/existing");
        std::fs::create_dir_all(&victim).unwrap();
        let dst = base.join("dst");
        std::fs::create_dir(&dst).unwrap();
        std::os::unix::fs::symlink(&victim, dst.join(".git")).unwrap();
        restore_bundle(&bundle, &s.head, &dst).unwrap();
        assert_eq!(std::fs::read_dir(&victim).unwrap().count(), 0);
        assert!(!base.join("victim/payload.conf").exists());
        assert!(
            std::fs::symlink_metadata(dst.join(".git"))
                .unwrap()
                .is_dir()
        );
        assert_eq!(
            std::fs::read_to_string(dst.join("payload.conf")).unwrap(),
            "p"
        );
    }

    /// Files of `.git` that are symlinks, or below one, are not read into the bundle's
    /// json: a hook linked to a file the sandbox cannot read (here a secret outside the
    /// repository) would put its content in remote storage, and a restore would hand
    /// it back. Real files next to them are kept.
    #[test]
    fn symlinks_in_git_are_not_followed_into_the_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let outside = base.join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "SECRET").unwrap();
        std::fs::write(outside.join("exclude"), "SECRET").unwrap();
        let src = base.join("src");
        std::fs::create_dir(&src).unwrap();
        git_in(&src, &["init", "-q", "-b", "main"]);
        std::fs::write(src.join("a.txt"), "a").unwrap();
        git_in(&src, &["add", "."]);
        git_in(&src, &["commit", "-q", "-m", "one"]);
        let hooks = src.join(".git/hooks");
        std::os::unix::fs::symlink(outside.join("secret"), hooks.join("post-checkout")).unwrap();
        std::fs::write(hooks.join("pre-commit"), "#!/bin/sh\n").unwrap();
        std::fs::remove_dir_all(src.join(".git/info")).unwrap();
        std::os::unix::fs::symlink(&outside, src.join(".git/info")).unwrap();
        let mut out = Vec::new();
        let s = write_bundle(&src, None, || {}, &mut out).unwrap().unwrap();
        let json = serde_json::to_string(&s.head).unwrap();
        assert!(!json.contains("SECRET"), "{json}");
        assert!(s.head.hooks.contains_key("pre-commit"), "{json}");
        assert!(!s.head.hooks.contains_key("post-checkout"), "{json}");
        assert_eq!(s.head.info_exclude, None);
    }

    /// A linked worktree (`git worktree add`) comes back as a repository of its own with
    /// the main repository's config, hooks and branch reflogs, which live in the common
    /// directory, and its own HEAD and staged work.
    #[test]
    fn a_linked_worktree_comes_back_with_what_it_shares() {
        let dir = tempfile::tempdir().unwrap();
        let base = std::fs::canonicalize(dir.path()).unwrap();
        let main = base.join("main");
        std::fs::create_dir(&main).unwrap();
        git_in(&main, &["init", "-q", "-b", "trunk"]);
        git_in(
            &main,
            &["remote", "add", "origin", "https://example.invalid/r.git"],
        );
        std::fs::write(main.join(".git/info/exclude"), "*.tmp\n").unwrap();
        std::fs::write(main.join(".git/hooks/pre-commit"), "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::write(main.join("a.txt"), "a").unwrap();
        git_in(&main, &["add", "."]);
        git_in(&main, &["commit", "-q", "-m", "one"]);
        git_in(&main, &["worktree", "add", "-q", "-b", "feat", "../wt"]);
        let wt = base.join("wt");
        std::fs::write(wt.join("b.txt"), "b").unwrap();
        git_in(&wt, &["add", "b.txt"]);
        git_in(&wt, &["commit", "-q", "-m", "two"]);
        std::fs::write(wt.join("c.txt"), "c").unwrap();
        git_in(&wt, &["add", "c.txt"]);
        let feat_log = git_in(&wt, &["reflog", "--format=%H %gs", "feat"]);
        let status = git_in(&wt, &["status", "--porcelain"]);

        let scratch = base.join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let dst = round_trip(&wt, &scratch);
        assert!(dst.join(".git").is_dir());
        assert_eq!(
            git_in(&dst, &["config", "--get", "remote.origin.url"]),
            "https://example.invalid/r.git\n"
        );
        assert_eq!(
            std::fs::read_to_string(dst.join(".git/info/exclude")).unwrap(),
            "*.tmp\n"
        );
        assert!(dst.join(".git/hooks/pre-commit").is_file());
        assert_eq!(git_in(&dst, &["branch", "--show-current"]), "feat\n");
        assert_eq!(
            git_in(&dst, &["reflog", "--format=%H %gs", "feat"]),
            feat_log
        );
        assert_eq!(git_in(&dst, &["status", "--porcelain"]), status);
    }

    /// A workspace `ws` (in the temporary directory returned) with a repository `main`
    /// on `trunk`, one commit, and its linked worktree `wt` on `feat`.
    fn repository_with_a_worktree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let ws = std::fs::canonicalize(dir.path()).unwrap().join("ws");
        let main = ws.join("main");
        std::fs::create_dir_all(&main).unwrap();
        git_in(&main, &["init", "-q", "-b", "trunk"]);
        std::fs::write(main.join("a.txt"), "a").unwrap();
        git_in(&main, &["add", "."]);
        git_in(&main, &["commit", "-q", "-m", "one"]);
        git_in(&main, &["worktree", "add", "-q", "-b", "feat", "../wt"]);
        (dir, ws)
    }

    /// The bundle of `repo` at `path` and its json, `worktree_of` included.
    fn bundle_as_the_daemon_does(repo: &Path, ws: &Path, path: &Path) -> (PathBuf, HeadMeta) {
        let mut out = Vec::new();
        let mut s = write_bundle(repo, None, || {}, &mut out).unwrap().unwrap();
        s.head.worktree_of = worktree_of(repo, ws);
        std::fs::write(path, &out).unwrap();
        (path.to_path_buf(), s.head)
    }

    /// A linked worktree whose main repository is in the workspace comes back linked to
    /// it (as `git worktree add` makes one): the main repository lists it, the two
    /// share objects and refs, the worktree keeps its own HEAD, index and HEAD reflog,
    /// and of its bundle's refs only its own branch moves, forward.
    #[test]
    fn a_linked_worktree_comes_back_linked_to_its_repository() {
        let (dir, ws) = repository_with_a_worktree();
        let base = dir.path().canonicalize().unwrap();
        let (main, wt) = (ws.join("main"), ws.join("wt"));
        assert_eq!(worktree_of(&main, &ws), None);
        assert_eq!(
            worktree_of(&wt, &ws),
            Some(WorktreeOf {
                repo: "main".into(),
                name: "wt".into()
            })
        );
        // Its main repository outside the workspace: nothing to link to.
        assert_eq!(worktree_of(&wt, &wt), None);

        let scratch = base.join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let bundle =
            |repo: &Path, name: &str| bundle_as_the_daemon_does(repo, &ws, &scratch.join(name));
        // The worktree's bundle is taken first: trunk moves on after it.
        std::fs::write(wt.join("b.txt"), "b").unwrap();
        git_in(&wt, &["add", "b.txt"]);
        git_in(&wt, &["commit", "-q", "-m", "two"]);
        let (main_bundle, main_meta) = bundle(&main, "main.bundle");
        std::fs::write(wt.join("c.txt"), "c").unwrap();
        git_in(&wt, &["add", "c.txt"]);
        git_in(&wt, &["commit", "-q", "-m", "three"]);
        std::fs::write(wt.join("d.txt"), "d").unwrap();
        git_in(&wt, &["add", "d.txt"]);
        std::fs::write(wt.join("a.txt"), "changed").unwrap();
        let (wt_bundle, wt_meta) = bundle(&wt, "wt.bundle");
        std::fs::write(main.join("e.txt"), "e").unwrap();
        git_in(&main, &["add", "e.txt"]);
        git_in(&main, &["commit", "-q", "-m", "four"]);
        let (main_bundle2, main_meta2) = bundle(&main, "main2.bundle");
        let _ = (main_bundle, main_meta);
        let feat = git_in(&wt, &["rev-parse", "feat"]);
        let trunk = git_in(&main, &["rev-parse", "trunk"]);
        let status = git_in(&wt, &["status", "--porcelain"]);
        let head_log = git_in(&wt, &["reflog", "--format=%H %gs", "HEAD"]);

        let dst = base.join("dst");
        let (dst_main, dst_wt) = (dst.join("main"), dst.join("wt"));
        restore_bundle(&main_bundle2, &main_meta2, &dst_main).unwrap();
        let main_repo = MainRepo {
            dir: dst_main.clone(),
            read_at_ms: main_meta2.read_at_ms,
        };
        restore_bundle_linked(&wt_bundle, &wt_meta, &dst_wt, Some(&main_repo)).unwrap();
        assert!(dst_wt.join(".git").is_file());
        assert_eq!(
            git_in(&dst_wt, &["rev-parse", "--git-common-dir"]),
            format!("{}\n", dst_main.join(".git").display())
        );
        let list = git_in(&dst_main, &["worktree", "list", "--porcelain"]);
        assert!(
            list.contains(&format!("worktree {}\n", dst_wt.display())),
            "{list}"
        );
        assert_eq!(git_in(&dst_wt, &["branch", "--show-current"]), "feat\n");
        assert_eq!(git_in(&dst_main, &["branch", "--show-current"]), "trunk\n");
        // Its branch moved forward to the worktree's commit; trunk kept the newer one.
        assert_eq!(git_in(&dst_main, &["rev-parse", "feat"]), feat);
        assert_eq!(git_in(&dst_main, &["rev-parse", "trunk"]), trunk);
        assert_eq!(git_in(&dst_wt, &["status", "--porcelain"]), status);
        assert_eq!(git_in(&dst_main, &["status", "--porcelain"]), "");
        assert_eq!(
            git_in(&dst_wt, &["reflog", "--format=%H %gs", "HEAD"]),
            head_log
        );
        git_in(&dst_main, &["fsck", "--no-progress"]);
        // A worktree whose repository is missing stays a repository of its own.
        let alone = dst.join("alone");
        restore_bundle(&wt_bundle, &wt_meta, &alone).unwrap();
        assert!(alone.join(".git").is_dir());
        assert_eq!(git_in(&alone, &["status", "--porcelain"]), status);
    }

    /// A linked worktree's branch comes back from its bundle when that is the newer,
    /// also when it moved other than forward (an amend); a worktree whose name another
    /// has gets a numbered one, as git gives; one with a `.git` in its place comes back
    /// as a repository of its own, leaving the main repository as it was.
    #[test]
    fn linked_worktrees_amended_named_alike_or_in_the_way() {
        let (dir, ws) = repository_with_a_worktree();
        let base = dir.path().canonicalize().unwrap();
        let (main, wt) = (ws.join("main"), ws.join("wt"));
        std::fs::write(wt.join("b.txt"), "b").unwrap();
        git_in(&wt, &["add", "b.txt"]);
        git_in(&wt, &["commit", "-q", "-m", "two"]);
        let scratch = base.join("scratch");
        std::fs::create_dir(&scratch).unwrap();
        let bundle =
            |repo: &Path, name: &str| bundle_as_the_daemon_does(repo, &ws, &scratch.join(name));
        let (main_bundle, main_meta) = bundle(&main, "main.bundle");
        std::thread::sleep(Duration::from_millis(5));
        git_in(&wt, &["commit", "-q", "--amend", "-m", "two, amended"]);
        let (wt_bundle, wt_meta) = bundle(&wt, "wt.bundle");
        let amended = git_in(&wt, &["rev-parse", "feat"]);
        let status = git_in(&wt, &["status", "--porcelain"]);

        let dst = base.join("dst");
        let dst_main = dst.join("main");
        restore_bundle(&main_bundle, &main_meta, &dst_main).unwrap();
        let main_repo = MainRepo {
            dir: dst_main.clone(),
            read_at_ms: main_meta.read_at_ms,
        };
        let dst_wt = dst.join("wt");
        restore_bundle_linked(&wt_bundle, &wt_meta, &dst_wt, Some(&main_repo)).unwrap();
        assert_eq!(git_in(&dst_main, &["rev-parse", "feat"]), amended);
        assert_eq!(git_in(&dst_wt, &["status", "--porcelain"]), status);
        // Older than the main repository's bundle, a move other than forward is not
        // taken.
        let older = MainRepo {
            dir: dst_main.clone(),
            read_at_ms: wt_meta.read_at_ms.map(|t| t + 1),
        };
        let dst_old = dst.join("old");
        let trunk = git_in(&dst_main, &["rev-parse", "trunk"]);
        git_in(&dst_main, &["update-ref", "refs/heads/feat", trunk.trim()]);
        restore_bundle_linked(&wt_bundle, &wt_meta, &dst_old, Some(&older)).unwrap();
        // (Forward from trunk: taken.)
        assert_eq!(git_in(&dst_main, &["rev-parse", "feat"]), amended);
        git_in(
            &dst_main,
            &["commit", "-q", "--allow-empty", "-m", "sideways"],
        );
        let sideways = git_in(&dst_main, &["rev-parse", "HEAD"]);
        git_in(
            &dst_main,
            &["update-ref", "refs/heads/feat", sideways.trim()],
        );
        let dst_side = dst.join("side");
        restore_bundle_linked(&wt_bundle, &wt_meta, &dst_side, Some(&older)).unwrap();
        assert_eq!(git_in(&dst_main, &["rev-parse", "feat"]), sideways);
        assert_ne!(sideways, trunk);
        // The same name three times: wt, wt1, wt2, each its own worktree.
        let git_dirs: Vec<String> = [&dst_wt, &dst_old, &dst_side]
            .iter()
            .map(|d| git_in(d, &["rev-parse", "--git-dir"]))
            .collect();
        assert_eq!(
            git_dirs,
            ["wt", "wt1", "wt2"]
                .map(|n| format!("{}\n", dst_main.join(".git/worktrees").join(n).display()))
        );
        for d in [&dst_wt, &dst_old, &dst_side] {
            assert_eq!(git_in(d, &["branch", "--show-current"]), "feat\n");
        }
        // A .git in its place: a repository of its own; no worktree added.
        let in_the_way = dst.join("in-the-way");
        std::fs::create_dir_all(&in_the_way).unwrap();
        git_in(&in_the_way, &["init", "-q"]);
        let list = git_in(&dst_main, &["worktree", "list", "--porcelain"]);
        restore_bundle_linked(&wt_bundle, &wt_meta, &in_the_way, Some(&older)).unwrap();
        assert!(in_the_way.join(".git").is_dir());
        assert_eq!(
            git_in(&dst_main, &["worktree", "list", "--porcelain"]),
            list
        );
        assert_eq!(git_in(&in_the_way, &["branch", "--show-current"]), "feat\n");
    }

    /// A sparse checkout (`git sparse-checkout set`) comes back with its patterns and
    /// the files it leaves out still out, not as deletions.
    #[test]
    fn a_sparse_checkout_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let src = std::fs::canonicalize(dir.path()).unwrap().join("src");
        std::fs::create_dir_all(src.join("docs")).unwrap();
        std::fs::create_dir_all(src.join("code")).unwrap();
        git_in(&src, &["init", "-q"]);
        std::fs::write(src.join("docs/d.md"), "d").unwrap();
        std::fs::write(src.join("code/c.rs"), "c").unwrap();
        git_in(&src, &["add", "."]);
        git_in(&src, &["commit", "-q", "-m", "one"]);
        git_in(&src, &["sparse-checkout", "set", "code"]);
        assert!(!src.join("docs/d.md").exists());
        let list = git_in(&src, &["sparse-checkout", "list"]);

        let dst = round_trip(&src, dir.path());
        assert_eq!(git_in(&dst, &["status", "--porcelain"]), "");
        assert_eq!(git_in(&dst, &["sparse-checkout", "list"]), list);
        assert!(!dst.join("docs/d.md").exists());
        assert_eq!(std::fs::read_to_string(dst.join("code/c.rs")).unwrap(), "c");
        // Leaving the sparse checkout brings the file back from the commit.
        git_in(&dst, &["sparse-checkout", "disable"]);
        assert_eq!(std::fs::read_to_string(dst.join("docs/d.md")).unwrap(), "d");
    }
}
