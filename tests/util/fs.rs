//! Workspace fixtures: writing files, running the real `git` CLI with a fixed identity,
//! and reading a whole tree back (bytes, modes, mtimes, symlink targets, directories)
//! to compare a restore with its original.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes `data` at `dir/rel`, creating parent directories.
pub fn write(dir: &Path, rel: &str, data: impl AsRef<[u8]>) {
    let p = dir.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, data).unwrap();
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `git` in `dir` with a clean, fixed identity and configuration.
pub fn git_raw(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .current_dir(dir)
        .args(["-c", "init.defaultBranch=main", "-c", "core.autocrlf=false"])
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .output()
        .expect("run git")
}

/// [`git_raw`] that panics with git's output on failure and returns its stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = git_raw(dir, args);
    assert!(
        out.status.success(),
        "git {args:?} in {} failed: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What `git` says about a repository, for comparing a restore with its original:
/// `status --porcelain`, `log --all` (ids and subjects), branches, HEAD and tags.
pub fn git_state(dir: &Path) -> Vec<String> {
    [
        &["status", "--porcelain=v1", "--untracked-files=all"][..],
        &["log", "--all", "--format=%H %P %s"],
        &["branch", "--list", "--format=%(refname) %(objectname)"],
        &["rev-parse", "--symbolic-full-name", "HEAD"],
        &["rev-parse", "HEAD"],
        &["tag", "--list"],
    ]
    .iter()
    .map(|args| git(dir, args))
    .collect()
}

/// One entry of a tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    File {
        data: Vec<u8>,
        mode: u32,
        mtime: i64,
    },
    Dir {
        mode: u32,
    },
    Link(PathBuf),
}

/// Every entry below `root` (relative path → entry), except those for which `skip`
/// is true (not descended into).
pub fn tree(root: &Path, skip: &dyn Fn(&str) -> bool) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let r = rel.join(e.file_name());
            let key = r.to_str().unwrap().to_string();
            if skip(&key) {
                continue;
            }
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            if m.file_type().is_symlink() {
                out.insert(key, Entry::Link(std::fs::read_link(e.path()).unwrap()));
            } else if m.is_dir() {
                out.insert(key, Entry::Dir { mode });
                stack.push(r);
            } else if m.is_file() {
                out.insert(
                    key,
                    Entry::File {
                        data: std::fs::read(e.path()).unwrap(),
                        mode,
                        mtime: m.mtime(),
                    },
                );
            }
        }
    }
    out
}
