//! Which workspace paths are mirrored: `.gitignore` semantics (via the `ignore` crate's
//! matcher) for `.gitignore` and `.sandkeepignore` files at every level, whether or not
//! the workspace is a git repository, plus the configured `sync.exclude` patterns.
//! `.git` directories are never mirrored file by file (the git bundle carries them);
//! snapshots use [`Rules::keeping_git`], which keeps them.
//!
//! One matcher serves the tree walk and single paths from watcher events, so both
//! always agree. Per-directory matchers are cached and dropped when an ignore file
//! changes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// Anchored patterns for the daemon's own directories (state dir, socket dir, a `dir`
/// remote) when they lie inside `root`: the mirror, snapshots and restore leave them
/// out.
pub fn own_excludes(config: &crate::config::Config, root: &Path) -> Vec<String> {
    let root = std::fs::canonicalize(root)
        .or_else(|_| std::path::absolute(root))
        .unwrap_or_else(|_| root.to_path_buf());
    let mut own = vec![config.state_dir.clone()];
    if let Some(dir) = config.socket.parent() {
        own.push(dir.to_path_buf());
    }
    if config.remote.kind == crate::config::RemoteKind::Dir {
        own.push(config.remote.path.clone());
    }
    inner_excludes(&root, &own)
}

/// What the mirror leaves out of `root` by configuration: `sync.exclude`, then the
/// daemon's own directories inside it ([`own_excludes`]).
pub fn mirror_excludes(config: &crate::config::Config, root: &Path) -> Vec<String> {
    let mut excludes = config.sync.exclude.clone();
    excludes.extend(own_excludes(config, root));
    excludes
}

/// Anchored exclude patterns (`/rel/`) for those of `dirs` that lie inside `root`.
pub fn inner_excludes(root: &Path, dirs: &[PathBuf]) -> Vec<String> {
    dirs.iter()
        .filter_map(|d| {
            let abs = std::fs::canonicalize(d)
                .or_else(|_| std::path::absolute(d))
                .ok()?;
            let rel = abs.strip_prefix(root).ok()?.to_str()?;
            (!rel.is_empty()).then(|| format!("/{}/", glob_literal(rel)))
        })
        .collect()
}

/// `path` as a gitignore pattern that matches it literally: glob characters and
/// spaces (a trailing one would be trimmed) escaped.
fn glob_literal(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '\\' | '*' | '?' | '[' | ']' | '{' | '}' | ' ') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Names of the per-directory ignore files, lowest precedence first.
pub const IGNORE_FILES: [&str; 2] = [".gitignore", ".sandkeepignore"];

/// Whether the workspace path `rel` (`/`-separated) is an ignore file.
pub fn is_ignore_file(rel: &str) -> bool {
    IGNORE_FILES.contains(&rel.rsplit('/').next().unwrap_or_default())
}

pub struct Rules {
    root: PathBuf,
    excludes: Gitignore,
    /// Whether `.git` directories are kept (snapshots) instead of skipped (the mirror).
    keep_git: bool,
    /// The per-directory ignore files read.
    files: &'static [&'static str],
    /// Matchers of directories (relative path → matcher of its ignore files).
    cache: Mutex<HashMap<PathBuf, Arc<Gitignore>>>,
}

impl Rules {
    /// `root` should be canonical; `excludes` are gitignore patterns relative to it.
    pub fn new(root: &Path, excludes: &[String]) -> Result<Self, ignore::Error> {
        let mut b = GitignoreBuilder::new(root);
        // A restore's files in the making (left behind when it was killed).
        b.add_line(None, &format!("{}*", crate::restore::TMP_PREFIX))?;
        for pattern in excludes {
            b.add_line(None, pattern)?;
        }
        Ok(Self {
            root: root.to_path_buf(),
            excludes: b.build()?,
            keep_git: false,
            files: &IGNORE_FILES,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The same rules, except that `.git` directories are kept. Inside them only the
    /// configured excludes apply: git's own files are not subject to the work tree's
    /// ignore files (a `logs/` line in `.gitignore` must not drop `.git/logs`).
    pub fn keeping_git(mut self) -> Self {
        self.keep_git = true;
        self
    }

    /// The same rules, reading `.sandkeepignore` files only: what sandkeep leaves out
    /// beyond git's own rules (for a git bundle's work-tree commit, where git applies
    /// `.gitignore` itself and a tracked file stays tracked whatever it says).
    pub fn only_sandkeepignore(mut self) -> Self {
        self.files = &IGNORE_FILES[1..];
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Forgets the cached matchers (an ignore file changed).
    pub fn invalidate(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Forgets the cached matchers of `rel` and of everything under it, if `rel` was a
    /// directory they were cached for (it was moved, removed or replaced).
    pub fn forget_dir(&self, rel: &Path) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.contains_key(rel) {
            cache.retain(|dir, _| !dir.starts_with(rel));
        }
    }

    fn matcher(&self, rel_dir: &Path) -> Arc<Gitignore> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = cache.get(rel_dir) {
            return m.clone();
        }
        let abs = self.root.join(rel_dir);
        let mut b = GitignoreBuilder::new(&abs);
        for name in self.files {
            let f = abs.join(name);
            if f.is_file()
                && let Some(e) = b.add(&f)
            {
                tracing::warn!(file = %f.display(), error = %e, "ignore file has errors; using the valid lines");
            }
        }
        let m = Arc::new(b.build().unwrap_or_else(|_| Gitignore::empty()));
        cache.insert(rel_dir.to_path_buf(), m.clone());
        m
    }

    /// Whether the configured patterns alone (not ignore files, not `.git`) exclude
    /// the relative `rel`.
    pub fn excluded_by_config(&self, rel: &Path, is_dir: bool) -> bool {
        self.excludes
            .matched_path_or_any_parents(rel, is_dir)
            .is_ignore()
    }

    /// Whether the workspace-relative `rel` (a directory when `is_dir`) is excluded.
    pub fn is_ignored(&self, rel: &Path, is_dir: bool) -> bool {
        if let Some(at) = rel.components().position(|c| c.as_os_str() == ".git") {
            if !self.keep_git {
                return true;
            }
            let outer: PathBuf = rel.components().take(at).collect();
            return (!outer.as_os_str().is_empty() && self.is_ignored(&outer, true))
                || self
                    .excludes
                    .matched_path_or_any_parents(rel, is_dir)
                    .is_ignore();
        }
        if self
            .excludes
            .matched_path_or_any_parents(rel, is_dir)
            .is_ignore()
        {
            return true;
        }
        // Deeper ignore files take precedence; the first decisive match wins.
        let mut dirs: Vec<&Path> = rel.ancestors().skip(1).collect();
        dirs.reverse(); // "", "a", "a/b", ...
        for dir in dirs.iter().rev() {
            let m = self.matcher(dir);
            if m.is_empty() {
                continue;
            }
            // Also test the path's ancestors below this directory: an ignored parent
            // directory excludes everything in it.
            let below = rel.strip_prefix(dir).unwrap_or(rel);
            let mut verdict = match m.matched(below, is_dir) {
                Match::None => None,
                other => Some(other.is_ignore()),
            };
            if verdict.is_none() {
                for anc in below.ancestors().skip(1) {
                    if anc.as_os_str().is_empty() {
                        break;
                    }
                    if m.matched(anc, true).is_ignore() {
                        verdict = Some(true);
                        break;
                    }
                }
            }
            if let Some(v) = verdict {
                return v;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(files: &[(&str, &str)], excludes: &[&str]) -> (tempfile::TempDir, Rules) {
        let dir = tempfile::tempdir().unwrap();
        for (p, text) in files {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let ex: Vec<String> = excludes.iter().map(|s| s.to_string()).collect();
        let r = Rules::new(dir.path(), &ex).unwrap();
        (dir, r)
    }

    #[test]
    fn gitignore_semantics_without_git() {
        let (_d, r) = rules(
            &[
                (".gitignore", "*.log\nbuild/\n!keep.log\n"),
                ("sub/.gitignore", "secret.txt\n!*.log\n"),
                ("sub/.sandkeepignore", "cache/\n"),
            ],
            &["node_modules/", "*.tmp"],
        );
        let ig = |p: &str, d: bool| r.is_ignored(Path::new(p), d);
        assert!(ig("a.log", false));
        assert!(!ig("keep.log", false));
        assert!(ig("build", true));
        assert!(ig("build/out.o", false));
        assert!(ig("x/build/out.o", false));
        assert!(ig("sub/secret.txt", false));
        assert!(!ig("secret.txt", false));
        assert!(!ig("sub/debug.log", false), "deeper whitelist wins");
        assert!(ig("sub/cache/x", false));
        assert!(ig("node_modules/a/b.js", false));
        assert!(ig("pkg/node_modules", true));
        assert!(ig("x.tmp", false));
        assert!(ig(".git", true));
        assert!(ig(".git/config", false));
        assert!(ig("sub/.git/HEAD", false));
        assert!(!ig("src/main.rs", false));
        assert!(!ig(".gitignore", false));
        assert!(
            ig("src/.sandkeep-restore-00ff00ff00ff00ff", false),
            "a restore's"
        );
    }

    #[test]
    fn keeping_git_keeps_git_dirs_under_the_excludes_only() {
        let (_d, r) = rules(
            &[(".gitignore", "logs/\n*.pack\n"), ("build/.keep", "")],
            &["build/", "*.tmp"],
        );
        let r = r.keeping_git();
        let ig = |p: &str, d: bool| r.is_ignored(Path::new(p), d);
        assert!(!ig(".git", true));
        assert!(
            !ig(".git/logs/HEAD", false),
            "work tree ignore files do not apply"
        );
        assert!(!ig(".git/objects/pack/p.pack", false));
        assert!(!ig("sub/.git/HEAD", false));
        assert!(ig(".git/x.tmp", false), "configured excludes do");
        assert!(ig("build/.git/HEAD", false), "inside an excluded directory");
        assert!(ig("logs/x", false), "the rest is unchanged");
    }

    #[test]
    fn invalidate_picks_up_new_rules() {
        let (d, r) = rules(&[], &[]);
        assert!(!r.is_ignored(Path::new("a.txt"), false));
        std::fs::write(d.path().join(".gitignore"), "a.txt\n").unwrap();
        assert!(!r.is_ignored(Path::new("a.txt"), false), "cached");
        r.invalidate();
        assert!(r.is_ignored(Path::new("a.txt"), false));
    }

    #[test]
    fn a_moved_directory_takes_its_matchers_along() {
        let (d, r) = rules(&[("sub/.gitignore", "*.csv\n"), ("other/x", "")], &[]);
        assert!(r.is_ignored(Path::new("sub/data.csv"), false));
        assert!(!r.is_ignored(Path::new("other/a/secret.env"), false));
        // `mv sub old; mkdir sub`, and a directory with its own rules moved in.
        std::fs::rename(d.path().join("sub"), d.path().join("old")).unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::create_dir_all(d.path().join("incoming/a")).unwrap();
        std::fs::write(d.path().join("incoming/a/.gitignore"), "secret.env\n").unwrap();
        std::fs::remove_dir_all(d.path().join("other")).unwrap();
        std::fs::rename(d.path().join("incoming"), d.path().join("other")).unwrap();
        r.forget_dir(Path::new("sub"));
        r.forget_dir(Path::new("old"));
        r.forget_dir(Path::new("other"));
        assert!(!r.is_ignored(Path::new("sub/data.csv"), false));
        assert!(r.is_ignored(Path::new("old/data.csv"), false));
        assert!(r.is_ignored(Path::new("other/a/secret.env"), false));
        // A path never cached as a directory (a file's event) forgets nothing.
        std::fs::write(d.path().join("old/.gitignore"), "").unwrap();
        r.forget_dir(Path::new("old/data.csv"));
        assert!(
            r.is_ignored(Path::new("old/data.csv"), false),
            "still cached"
        );
    }

    #[test]
    fn own_directories_are_excluded_literally() {
        let d = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(d.path()).unwrap();
        let names = [
            "st[1]",
            "a*b",
            "q?",
            "{x,y}",
            "back\\slash",
            "sp ace ",
            "plain",
        ];
        let dirs: Vec<PathBuf> = names.iter().map(|n| root.join(n)).collect();
        for dir in &dirs {
            std::fs::create_dir(dir).unwrap();
        }
        for n in ["s1", "aXb", "qq", "x", "backslash", "sp ace"] {
            std::fs::create_dir(root.join(n)).unwrap();
        }
        let r = Rules::new(&root, &inner_excludes(&root, &dirs)).unwrap();
        for n in names {
            assert!(r.is_ignored(&Path::new(n).join("kv.key"), false), "{n}");
        }
        for n in ["s1", "aXb", "qq", "x", "backslash", "sp ace"] {
            assert!(!r.is_ignored(&Path::new(n).join("kv.key"), false), "{n}");
        }
    }
}
