//! Git bundles through the daemon, checked with the real `git` CLI: `git bundle
//! verify`, `git clone`, the WIP refs (`git fetch ... 'refs/sandkeep/*:refs/sandkeep/*'`),
//! the user's index and status untouched, and the way back with
//! [`sandkeep::gitbundle::restore_bundle`] (same status, log and work tree). Also
//! unborn and empty repositories, a detached HEAD, first-level subdirectory repos,
//! packed repositories (pack reuse and its fallback), the periodic writer, `POST
//! /v1/sync`, `GET /v1/status`, and a round trip through the S3 backend.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sandkeep::gitbundle::{self, HeadMeta};
use serde_json::{Value, json};

use crate::util::fs::{git, git_raw, write};
use crate::util::{Daemon, ok};

const GIT_PREFIX: &str = "conversations/u1/c1/workspace/git/";
/// Periodic bundles off unless a test wants them.
const NO_PERIODIC: &str = "[git]\ninterval = \"0s\"\n[snapshot]\ninterval = \"0s\"\n";

/// A repository with history, a branch, tags, and every kind of uncommitted change.
fn rich_repo(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    git(dir, &["init", "-q"]);
    write(dir, ".gitignore", "*.log\nbuild/\n");
    write(dir, "a.txt", "a1\n");
    write(dir, "b.txt", "b1\n");
    write(dir, "c.txt", "c1\n");
    write(dir, "src/lib.rs", "pub fn x() {}\n");
    write(dir, "run.sh", "#!/bin/sh\necho hi\n");
    std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "first"]);
    write(dir, "a.txt", "a2\n");
    git(dir, &["commit", "-q", "-am", "second"]);
    git(dir, &["tag", "-a", "v1", "-m", "release one"]);
    git(dir, &["checkout", "-q", "-b", "feature"]);
    write(dir, "feature.txt", "f\n");
    git(dir, &["add", "feature.txt"]);
    git(dir, &["commit", "-q", "-m", "feature work"]);
    git(dir, &["tag", "light"]);
    git(dir, &["checkout", "-q", "main"]);
    write(dir, "src/lib.rs", "pub fn x() -> u8 { 3 }\n");
    git(dir, &["commit", "-q", "-am", "third"]);
    // Uncommitted work of every kind.
    write(dir, "a.txt", "a-staged\n");
    write(dir, "s.txt", "staged new file\n");
    git(dir, &["add", "a.txt", "s.txt"]);
    write(dir, "b.txt", "b-unstaged\n");
    std::fs::remove_file(dir.join("c.txt")).unwrap();
    write(dir, "new.txt", "untracked\n");
    write(dir, "untracked/deep/n.txt", "deep untracked\n");
    write(dir, "debug.log", "ignored\n");
    write(dir, "build/out.o", "ignored too\n");
    // A FIFO in the work tree is neither read nor committed.
    let st = Command::new("mkfifo")
        .arg(dir.join("pipe"))
        .status()
        .unwrap();
    assert!(st.success());
}

/// Files of a work tree (not `.git`, not ignored by `git`), relative path → bytes + mode.
fn work_tree(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    let listed = git(
        dir,
        &[
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ],
    );
    listed
        .split('\0')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let abs = dir.join(p);
            let meta = std::fs::symlink_metadata(&abs).ok()?;
            Some((
                p.to_string(),
                (
                    std::fs::read(&abs).unwrap(),
                    meta.permissions().mode() & 0o777,
                ),
            ))
        })
        .collect()
}

fn bundle_path(d: &Daemon, stem: &str) -> PathBuf {
    d.remote.join(format!("{GIT_PREFIX}{stem}.bundle"))
}

fn head_meta(d: &Daemon, stem: &str) -> HeadMeta {
    let text = std::fs::read(d.remote.join(format!("{GIT_PREFIX}{stem}.json"))).unwrap();
    serde_json::from_slice(&text).unwrap()
}

/// Fetches the WIP refs (`refs/sandkeep/*`) of `bundle` into the clone `clone`.
fn fetch_wip_refs(clone: &Path, bundle: &Path) {
    git(
        clone,
        &[
            "fetch",
            "-q",
            bundle.to_str().unwrap(),
            "refs/sandkeep/*:refs/sandkeep/*",
        ],
    );
}

async fn post_bundle(d: &Daemon) -> Value {
    let r = d.api().post_empty("/v1/git/bundle").await;
    ok(&r, 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_keeps_uncommitted_work_and_restores_it() {
    let d = Daemon::start_with(NO_PERIODIC).await;
    let repo = d.workspace.clone();
    rich_repo(&repo);
    let status_before = git(&repo, &["status", "--porcelain"]);
    let refs_before = git(
        &repo,
        &["for-each-ref", "--format=%(objectname) %(refname)"],
    );
    let log_before = git(&repo, &["log", "--all", "--format=%H %P %s"]);
    // Let git settle the index's racy entries first, so that it is stable.
    std::thread::sleep(Duration::from_millis(1100));
    git(&repo, &["status", "--porcelain"]);
    let objects_before = files_under(&repo.join(".git"));
    let index_before = std::fs::read(repo.join(".git/index")).unwrap();
    assert!(status_before.contains("M  a.txt"), "{status_before}");

    let body = post_bundle(&d).await;
    let bundles = body["bundles"].as_array().unwrap();
    assert_eq!(bundles.len(), 1, "{body}");
    assert_eq!(bundles[0]["repo"], ".");
    assert_eq!(
        bundles[0]["key"],
        format!("{GIT_PREFIX}workspace.bundle"),
        "{body}"
    );
    // HEAD, main, feature, v1, light, the two WIP refs, and the two commits only
    // the reflogs name (first and second: main moved on, and v1 is a tag object).
    assert_eq!(bundles[0]["refs"], 9, "{body}");
    let bundle = bundle_path(&d, "workspace");
    assert_eq!(
        bundles[0]["bytes"].as_u64().unwrap(),
        std::fs::metadata(&bundle).unwrap().len()
    );

    // The user's repository is untouched (looked at before `git status`, which may
    // refresh the index itself).
    assert_eq!(
        files_under(&repo.join(".git")),
        objects_before,
        "nothing in .git changed (objects, refs, index, logs)"
    );
    assert_eq!(
        std::fs::read(repo.join(".git/index")).unwrap(),
        index_before
    );
    assert_eq!(git(&repo, &["status", "--porcelain"]), status_before);
    assert_eq!(
        git(
            &repo,
            &["for-each-ref", "--format=%(objectname) %(refname)"]
        ),
        refs_before
    );

    let meta = head_meta(&d, "workspace");
    assert_eq!(meta.head.as_deref(), Some("refs/heads/main"));
    assert!(!meta.detached);
    assert_eq!(
        meta.head_oid.as_deref(),
        Some(git(&repo, &["rev-parse", "HEAD"]).trim())
    );

    // git accepts it.
    let scratch = tempfile::tempdir().unwrap();
    git(scratch.path(), &["init", "-q", "verify"]);
    let verify = git_raw(
        &scratch.path().join("verify"),
        &["bundle", "verify", bundle.to_str().unwrap()],
    );
    assert!(
        verify.status.success(),
        "git bundle verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let clone = scratch.path().join("clone");
    git(
        scratch.path(),
        &[
            "clone",
            "-q",
            bundle.to_str().unwrap(),
            clone.to_str().unwrap(),
        ],
    );
    let branches = git(&clone, &["branch", "-r", "--format=%(refname)"]);
    let mut branches: Vec<&str> = branches.lines().filter(|b| !b.ends_with("/HEAD")).collect();
    branches.sort();
    assert_eq!(
        branches,
        vec!["refs/remotes/origin/feature", "refs/remotes/origin/main"]
    );
    assert_eq!(git(&clone, &["tag"]), "light\nv1\n");
    assert_eq!(
        git(&clone, &["cat-file", "-t", "v1"]).trim(),
        "tag",
        "annotated"
    );
    assert_eq!(
        git(&clone, &["log", "--format=%H %s", "main"]),
        git(&repo, &["log", "--format=%H %s", "main"])
    );
    assert_eq!(
        git(&clone, &["log", "--format=%H %s", "origin/feature"]),
        git(&repo, &["log", "--format=%H %s", "feature"])
    );

    // The WIP refs hold the uncommitted work.
    fetch_wip_refs(&clone, &bundle);
    let show = |rev: &str| git_raw(&clone, &["show", rev]);
    let text = |rev: &str| String::from_utf8(show(rev).stdout).unwrap();
    assert_eq!(text("refs/sandkeep/wip:b.txt"), "b-unstaged\n");
    assert_eq!(text("refs/sandkeep/wip:new.txt"), "untracked\n");
    assert_eq!(
        text("refs/sandkeep/wip:untracked/deep/n.txt"),
        "deep untracked\n"
    );
    assert_eq!(text("refs/sandkeep/wip:a.txt"), "a-staged\n");
    assert!(
        !show("refs/sandkeep/wip:debug.log").status.success(),
        "ignored"
    );
    assert!(
        !show("refs/sandkeep/wip:build/out.o").status.success(),
        "ignored"
    );
    assert!(!show("refs/sandkeep/wip:c.txt").status.success(), "deleted");
    assert_eq!(text("refs/sandkeep/wip-index:a.txt"), "a-staged\n");
    assert_eq!(text("refs/sandkeep/wip-index:s.txt"), "staged new file\n");
    assert_eq!(text("refs/sandkeep/wip-index:b.txt"), "b1\n");
    assert_eq!(text("refs/sandkeep/wip-index:c.txt"), "c1\n");
    assert!(!show("refs/sandkeep/wip-index:new.txt").status.success());
    let head = git(&repo, &["rev-parse", "HEAD"]);
    for r in ["refs/sandkeep/wip", "refs/sandkeep/wip-index"] {
        assert_eq!(
            git(&clone, &["rev-parse", &format!("{r}^")]),
            head,
            "{r} sits on HEAD"
        );
    }
    assert_eq!(
        git(&clone, &["ls-tree", "refs/sandkeep/wip", "run.sh"])
            .split_whitespace()
            .next(),
        Some("100755")
    );

    // Back from the bundle with the library: same status, log, refs and work tree.
    let restored = scratch.path().join("restored");
    let r = gitbundle::restore_bundle(&bundle, &meta, &restored).unwrap();
    assert!(r.had_wip);
    assert_eq!(git(&restored, &["status", "--porcelain"]), status_before);
    assert_eq!(
        git(&restored, &["log", "--all", "--format=%H %P %s"]),
        log_before
    );
    assert_eq!(
        git(
            &restored,
            &["for-each-ref", "--format=%(objectname) %(refname)"]
        ),
        refs_before
    );
    assert_eq!(
        git(&restored, &["symbolic-ref", "HEAD"]),
        "refs/heads/main\n"
    );
    assert_eq!(work_tree(&restored), work_tree(&repo));
    git(&restored, &["fsck", "--no-progress"]);

    // Status reports the repository.
    let status = ok(&d.api().get("/v1/status").await, 200);
    let repos = status["git"].as_array().unwrap();
    assert_eq!(repos.len(), 1, "{status}");
    let s = &repos[0];
    assert_eq!(s["repo"], ".");
    assert_eq!(s["branch"], "main");
    assert_eq!(s["head"], head.trim());
    assert_eq!(s["dirty"], 4, "a, s staged; b modified; c deleted: {s}");
    assert_eq!(s["untracked"], 2, "{s}");
    assert_eq!(s["unpushed"], Value::Null, "no upstream");
    // The status did not touch the index either.
    assert_eq!(
        std::fs::read(repo.join(".git/index")).unwrap(),
        index_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unborn_empty_and_detached_repos_in_subdirectories() {
    let d = Daemon::start_with(NO_PERIODIC).await;
    let ws = d.workspace.clone();
    // An empty repository.
    std::fs::create_dir_all(ws.join("empty")).unwrap();
    git(&ws.join("empty"), &["init", "-q"]);
    // No commit yet, but staged and untracked files.
    let unborn = ws.join("unborn");
    std::fs::create_dir_all(&unborn).unwrap();
    git(&unborn, &["init", "-q", "-b", "trunk"]);
    write(&unborn, "staged.txt", "staged\n");
    git(&unborn, &["add", "staged.txt"]);
    write(&unborn, "loose.txt", "untracked\n");
    // A detached HEAD with an upstream-less branch and a dirty file.
    let det = ws.join("detached");
    std::fs::create_dir_all(&det).unwrap();
    git(&det, &["init", "-q"]);
    for i in 0..3 {
        write(&det, "f.txt", format!("v{i}\n"));
        git(&det, &["add", "f.txt"]);
        git(&det, &["commit", "-q", "-m", &format!("c{i}")]);
    }
    git(&det, &["checkout", "-q", "--detach", "HEAD~1"]);
    write(&det, "f.txt", "dirty\n");
    // A directory that is not a repository, and a file at the top.
    write(&ws, "plain/x.txt", "x");
    write(&ws, "top.txt", "t");

    let before: Vec<(String, Vec<u8>)> = ["empty", "unborn", "detached"]
        .iter()
        .map(|n| {
            let dir = ws.join(n);
            (
                git(&dir, &["status", "--porcelain"]),
                std::fs::read(dir.join(".git/index")).unwrap_or_default(),
            )
        })
        .collect();

    let body = post_bundle(&d).await;
    assert_eq!(body["errors"], serde_json::json!([]), "{body}");
    let repos: Vec<&str> = body["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["repo"].as_str().unwrap())
        .collect();
    assert_eq!(repos, vec!["detached", "empty", "unborn"], "{body}");

    for (i, n) in ["empty", "unborn", "detached"].iter().enumerate() {
        let dir = ws.join(n);
        assert_eq!(git(&dir, &["status", "--porcelain"]), before[i].0, "{n}");
        assert_eq!(
            std::fs::read(dir.join(".git/index")).unwrap_or_default(),
            before[i].1,
            "{n}: index bytes"
        );
        let bundle = bundle_path(&d, n);
        let scratch = tempfile::tempdir().unwrap();
        git(scratch.path(), &["init", "-q", "v"]);
        let verify = git_raw(
            &scratch.path().join("v"),
            &["bundle", "verify", bundle.to_str().unwrap()],
        );
        assert!(
            verify.status.success(),
            "{n}: git bundle verify: {}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let meta = head_meta(&d, n);
        let target = scratch.path().join("restored");
        gitbundle::restore_bundle(&bundle, &meta, &target).unwrap();
        assert_eq!(
            git(&target, &["status", "--porcelain"]),
            before[i].0,
            "{n}: restored status"
        );
        match *n {
            "empty" => {
                assert_eq!(meta.head.as_deref(), Some("refs/heads/main"));
                assert_eq!(meta.head_oid, None);
                assert!(!meta.detached);
            }
            "unborn" => {
                assert_eq!(meta.head.as_deref(), Some("refs/heads/trunk"));
                assert_eq!(meta.head_oid, None);
                assert_eq!(
                    git(&target, &["symbolic-ref", "HEAD"]),
                    "refs/heads/trunk\n"
                );
                assert_eq!(
                    std::fs::read_to_string(target.join("loose.txt")).unwrap(),
                    "untracked\n"
                );
            }
            _ => {
                assert!(meta.detached);
                assert_eq!(meta.head, None);
                let head = git(&dir, &["rev-parse", "HEAD"]);
                assert_eq!(meta.head_oid.as_deref(), Some(head.trim()));
                assert_eq!(git(&target, &["rev-parse", "HEAD"]), head);
                assert!(
                    !git_raw(&target, &["symbolic-ref", "-q", "HEAD"])
                        .status
                        .success()
                );
                assert_eq!(
                    git(&target, &["log", "--all", "--format=%H %s"]),
                    git(&dir, &["log", "--all", "--format=%H %s"])
                );
                assert_eq!(
                    std::fs::read_to_string(target.join("f.txt")).unwrap(),
                    "dirty\n"
                );
            }
        }
    }

    let status = ok(&d.api().get("/v1/status").await, 200);
    let git_status = status["git"].as_array().unwrap();
    assert_eq!(git_status.len(), 3, "{status}");
    let det_status = git_status.iter().find(|r| r["repo"] == "detached").unwrap();
    assert_eq!(det_status["branch"], Value::Null, "{det_status}");
    assert_eq!(det_status["dirty"], 1);
    let unborn_status = git_status.iter().find(|r| r["repo"] == "unborn").unwrap();
    assert_eq!(unborn_status["branch"], "trunk");
    assert_eq!(unborn_status["head"], Value::Null);
    assert_eq!(unborn_status["dirty"], 1);
    assert_eq!(unborn_status["untracked"], 1);

    // A repository that disappears loses its bundle at the next pass once the mirror
    // has seen it go (a sync makes sure of that).
    std::fs::remove_dir_all(ws.join("empty")).unwrap();
    assert!(pruned_after_sync(&d, "empty").await);
    let body = post_bundle(&d).await;
    assert_eq!(body["bundles"].as_array().unwrap().len(), 2, "{body}");
    assert!(bundle_path(&d, "unborn").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_bundles_follow_changes_only() {
    let mut d = Daemon::prepare("[git]\ninterval = \"1s\"\n[snapshot]\ninterval = \"0s\"\n");
    let repo = d.workspace.clone();
    git(&repo, &["init", "-q"]);
    write(&repo, "a.txt", "1\n");
    git(&repo, &["add", "a.txt"]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    upstream_for(&repo);
    d.spawn_and_wait().await;
    let bundle = bundle_path(&d, "workspace");
    let mtime = |p: &Path| std::fs::metadata(p).ok().and_then(|m| m.modified().ok());
    let first =
        crate::util::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
            let m = mtime(&bundle);
            async move { m }
        })
        .await
        .expect("the first periodic bundle");
    // Nothing changed: the bundle is not rewritten.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(mtime(&bundle), Some(first), "rewritten without a change");
    // An untracked file is a change of the work tree.
    write(&repo, "b.txt", "2\n");
    crate::util::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let m = mtime(&bundle);
        async move { (m != Some(first)).then_some(()) }
    })
    .await
    .expect("a new bundle after a change");

    // Unpushed commits are counted against the upstream.
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert_eq!(status["git"][0]["unpushed"], 0, "{status}");
    write(&repo, "a.txt", "3\n");
    git(&repo, &["commit", "-q", "-am", "two"]);
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert_eq!(status["git"][0]["unpushed"], 1, "{status}");
}

/// Syncs and bundles until the bundle of `stem` is gone (a repository deleted from the
/// workspace); false when it stays within 20 s.
async fn pruned_after_sync(d: &Daemon, stem: &str) -> bool {
    crate::util::poll_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async {
            ok(
                &d.api().post("/v1/sync", &json!({"timeout_s": 30})).await,
                200,
            );
            post_bundle(d).await;
            (!bundle_path(d, stem).exists()).then_some(())
        },
    )
    .await
    .is_some()
}

/// Empties `dir` (its `.git` too), leaving the directory itself.
fn empty_dir(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p).unwrap();
        } else {
            std::fs::remove_file(&p).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_are_deleted_only_as_the_mirror_deletes_files() {
    let mut d = Daemon::prepare(NO_PERIODIC);
    let ws = d.workspace.clone();
    for repo in [ws.clone(), ws.join("sub")] {
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q"]);
        write(&repo, "a.txt", "1\n");
        git(&repo, &["add", "a.txt"]);
        git(&repo, &["commit", "-q", "-m", "one"]);
    }
    write(&ws, "b.txt", "2\n");
    d.spawn_and_wait().await;
    let api = d.api();
    ok(&api.post("/v1/sync", &json!({"timeout_s": 30})).await, 200);
    assert!(bundle_path(&d, "workspace").exists() && bundle_path(&d, "sub").exists());

    // A repository deleted as any directory is: its bundle goes with its files.
    std::fs::remove_dir_all(ws.join("sub")).unwrap();
    assert!(
        pruned_after_sync(&d, "sub").await,
        "the bundle of a deleted repo stays"
    );
    assert!(bundle_path(&d, "workspace").exists());

    // An emptied workspace (and a first new file in it): the mirror holds the
    // deletion, and so does the bundler.
    empty_dir(&ws);
    ok(&api.post("/v1/sync", &json!({"timeout_s": 30})).await, 200);
    write(&ws, "fresh.txt", "new\n");
    ok(&api.post("/v1/sync", &json!({"timeout_s": 30})).await, 200);
    let files = d.remote.join("conversations/u1/c1/workspace/files");
    assert!(files.join("b.txt").exists() && files.join("fresh.txt").exists());
    let status = ok(&api.get("/v1/status").await, 200);
    assert!(
        status["sync"]["held_deletes"].as_u64() > Some(0),
        "{status}"
    );
    post_bundle(&d).await;
    assert!(
        bundle_path(&d, "workspace").exists(),
        "an emptied workspace deleted the bundle; log:\n{}",
        d.log()
    );
    // Everything is in remote storage (exit 0), and the stop says what it holds more.
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    assert!(
        d.log()
            .contains("deletions held by the delete guard stay undone"),
        "log:\n{}",
        d.log()
    );

    // A new sandbox whose workspace is not empty (a template file): nothing is
    // restored, and nothing of the conversation is deleted either.
    d.become_new_sandbox();
    write(&d.workspace, "README.md", "template\n");
    d.spawn_and_wait().await;
    let api = d.api();
    ok(&api.post("/v1/sync", &json!({"timeout_s": 30})).await, 200);
    post_bundle(&d).await;
    assert!(bundle_path(&d, "workspace").exists(), "log:\n{}", d.log());
    let status = ok(&api.get("/v1/status").await, 200);
    assert_eq!(status["sync"]["held_deletes"], 3, "{status}");
    let files = d.remote.join("conversations/u1/c1/workspace/files");
    for f in ["a.txt", "b.txt", "README.md"] {
        assert!(files.join(f).exists(), "{f} is not in the remote");
    }
    // A confirming sync lets the deletions through.
    ok(
        &api.post(
            "/v1/sync",
            &json!({"timeout_s": 30, "confirm_deletes": true}),
        )
        .await,
        200,
    );
    assert!(!files.join("a.txt").exists() && files.join("README.md").exists());
}

/// The state directory remembers which repositories it bundled: one deleted while the
/// daemon was down loses its bundle after the restart, as it would have while running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_deleted_while_the_daemon_was_down_loses_its_bundle() {
    let mut d = Daemon::prepare(NO_PERIODIC);
    let ws = d.workspace.clone();
    for repo in [ws.join("keep"), ws.join("sub")] {
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q"]);
        write(&repo, "a.txt", "1\n");
        git(&repo, &["add", "a.txt"]);
        git(&repo, &["commit", "-q", "-m", "one"]);
    }
    d.spawn_and_wait().await;
    ok(
        &d.api().post("/v1/sync", &json!({"timeout_s": 30})).await,
        200,
    );
    assert!(bundle_path(&d, "keep").exists() && bundle_path(&d, "sub").exists());
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    std::fs::remove_dir_all(ws.join("sub")).unwrap();
    d.spawn_and_wait().await;
    assert!(
        pruned_after_sync(&d, "sub").await,
        "the bundle of a repository deleted while the daemon was down stays; log:\n{}",
        d.log()
    );
    assert!(bundle_path(&d, "keep").exists());
}

/// Every file below `dir` with its size and mtime.
fn files_under(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.insert(e.path(), (m.len(), m.modified().unwrap()));
            }
        }
    }
    out
}

/// Gives `main` an upstream (`origin/main`) at the current commit.
fn upstream_for(repo: &Path) {
    let origin = repo.parent().unwrap().join("origin.git");
    git(
        repo.parent().unwrap(),
        &["init", "-q", "--bare", origin.to_str().unwrap()],
    );
    git(repo, &["remote", "add", "origin", origin.to_str().unwrap()]);
    git(repo, &["push", "-q", "-u", "origin", "main"]);
}

/// Bundles `repo` through the daemon and checks it with git and the library: verify,
/// clone (same branches, tags, log), fsck of the restored copy, same status.
async fn check_round_trip(d: &Daemon, repo: &Path) {
    let status_before = git(repo, &["status", "--porcelain"]);
    let body = post_bundle(d).await;
    assert_eq!(body["errors"], serde_json::json!([]), "{body}");
    let bundle = bundle_path(d, "workspace");
    let scratch = tempfile::tempdir().unwrap();
    git(scratch.path(), &["init", "-q", "v"]);
    let verify = git_raw(
        &scratch.path().join("v"),
        &["bundle", "verify", bundle.to_str().unwrap()],
    );
    assert!(
        verify.status.success(),
        "git bundle verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let clone = scratch.path().join("clone");
    git(
        scratch.path(),
        &[
            "clone",
            "-q",
            bundle.to_str().unwrap(),
            clone.to_str().unwrap(),
        ],
    );
    git(&clone, &["fsck", "--no-progress", "--strict"]);
    assert_eq!(
        git(&clone, &["log", "--format=%H", "origin/feature"]),
        git(repo, &["log", "--format=%H", "feature"])
    );
    let restored = scratch.path().join("restored");
    gitbundle::restore_bundle(&bundle, &head_meta(d, "workspace"), &restored).unwrap();
    git(&restored, &["fsck", "--no-progress"]);
    assert_eq!(git(&restored, &["status", "--porcelain"]), status_before);
    assert_eq!(
        git(&restored, &["log", "--all", "--format=%H %s"]),
        git(repo, &["log", "--all", "--format=%H %s"])
    );
    assert_eq!(work_tree(&restored), work_tree(repo));
    // The same, straight from the remote.
    let remote = sandkeep::remote::dir::DirRemote::new(&d.remote).unwrap();
    let fetched = scratch.path().join("fetched");
    let r = gitbundle::fetch_and_restore(
        &remote,
        "conversations/u1/c1/",
        "workspace",
        &fetched,
        scratch.path(),
    )
    .await
    .unwrap()
    .expect("a bundle");
    assert!(r.had_wip);
    assert_eq!(git(&fetched, &["status", "--porcelain"]), status_before);
    assert!(
        gitbundle::fetch_and_restore(
            &remote,
            "conversations/u1/c1/",
            "nope",
            &fetched,
            scratch.path()
        )
        .await
        .unwrap()
        .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_repositories_reuse_their_packs() {
    let d = Daemon::start_with(NO_PERIODIC).await;
    let repo = d.workspace.clone();
    rich_repo(&repo);
    // Everything packed, as in a fresh clone.
    git(&repo, &["gc", "-q"]);
    check_round_trip(&d, &repo).await;
    // A second pack of newer objects, and loose objects on top.
    git(&repo, &["commit", "-q", "-m", "staged work"]);
    git(&repo, &["repack", "-q"]);
    write(&repo, "later.txt", "later\n");
    git(&repo, &["add", "later.txt"]);
    git(&repo, &["commit", "-q", "-m", "later"]);
    write(&repo, "b.txt", "unstaged again\n");
    check_round_trip(&d, &repo).await;
    // An object in two packs (a full repack that kept the old packs): the bundle is
    // then packed object by object, still complete and without duplicates.
    git(&repo, &["repack", "-a", "-q"]);
    let packs = std::fs::read_dir(repo.join(".git/objects/pack"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".pack")
        })
        .count();
    assert!(packs >= 2, "{packs} packs");
    check_round_trip(&d, &repo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_writes_bundles_of_changed_repositories() {
    let d = Daemon::start_with(NO_PERIODIC).await;
    let repo = d.workspace.clone();
    git(&repo, &["init", "-q"]);
    write(&repo, "a.txt", "1\n");
    git(&repo, &["add", "a.txt"]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    let sync = || async {
        let r = d
            .api()
            .post("/v1/sync", &serde_json::json!({"timeout_s": 60}))
            .await;
        ok(&r, 200)
    };
    let bundle = bundle_path(&d, "workspace");
    let stats = sync().await;
    assert!(bundle.exists(), "the sync wrote the bundle: {stats}");
    let bundle_bytes = std::fs::metadata(&bundle).unwrap().len();
    assert!(
        stats["bytes_uploaded"].as_u64().unwrap() >= bundle_bytes,
        "{stats}"
    );
    let first = std::fs::metadata(&bundle).unwrap().modified().unwrap();
    sync().await;
    assert_eq!(
        std::fs::metadata(&bundle).unwrap().modified().unwrap(),
        first,
        "unchanged repository, same bundle"
    );
    write(&repo, "a.txt", "2\n");
    sync().await;
    assert_ne!(
        std::fs::metadata(&bundle).unwrap().modified().unwrap(),
        first
    );
}

/// A repository in a directory `sync.exclude` leaves out is not bundled (a restore
/// would not touch it either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_the_excludes_leave_out_are_not_bundled() {
    let d = Daemon::start_with(&format!("{NO_PERIODIC}[sync]\nexclude = [\"vendor/\"]\n")).await;
    for name in ["lib", "vendor"] {
        let repo = d.workspace.join(name);
        std::fs::create_dir(&repo).unwrap();
        git(&repo, &["init", "-q"]);
        write(&repo, "a.txt", "a\n");
        git(&repo, &["add", "a.txt"]);
        git(&repo, &["commit", "-q", "-m", "one"]);
    }
    let r = post_bundle(&d).await;
    assert!(bundle_path(&d, "lib").exists(), "{r}");
    assert!(!bundle_path(&d, "vendor").exists(), "{r}");
}

/// A repository libgit2 cannot read (here: a corrupt object) gets no bundle, which
/// trying again does not mend: neither a sync nor the stop waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_that_cannot_be_read_holds_up_neither_sync_nor_stop() {
    let mut d = Daemon::start_with(NO_PERIODIC).await;
    for name in ["good", "bad"] {
        let repo = d.workspace.join(name);
        std::fs::create_dir(&repo).unwrap();
        git(&repo, &["init", "-q"]);
        write(&repo, "a.txt", format!("{name}\n"));
        git(&repo, &["add", "a.txt"]);
        git(&repo, &["commit", "-q", "-m", "one"]);
    }
    let bad = d.workspace.join("bad");
    let blob = git(&bad, &["rev-parse", "HEAD:a.txt"]);
    let blob = blob.trim();
    let object = bad.join(".git/objects").join(&blob[..2]).join(&blob[2..]);
    std::fs::set_permissions(&object, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&object, b"not a zlib stream").unwrap();
    let r = d.api().post("/v1/sync", &json!({"timeout_s": 30})).await;
    ok(&r, 200);
    assert!(bundle_path(&d, "good").exists());
    assert!(!bundle_path(&d, "bad").exists());
    // The status says why (git status itself reads that repository well enough).
    let s = d.api().get("/v1/status").await.json();
    let git_of = |name: &str| {
        s["git"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["repo"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{s}"))
    };
    assert_eq!(git_of("good")["error"], Value::Null, "{s}");
    let error = git_of("bad")["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(error.contains("git bundle"), "{s}");
    let started = std::time::Instant::now();
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        d.log().contains("no git bundle for this repository"),
        "{}",
        d.log()
    );
}

/// A file the daemon may not read (mode 000; another user's) is left out of the
/// work-tree commit, as the mirror leaves it out: the repository still gets its bundle,
/// with the rest of its uncommitted work, and a tracked one keeps its committed version.
/// Run as root, the daemon runs as `nobody`: a repository owned by root is bundled too
/// (libgit2 refuses another user's repository unless told not to), and the `HOME` it
/// inherits (`/root`, closed to it) does not stop libgit2 from opening repositories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_the_daemon_cannot_read_leave_the_rest_of_the_bundle() {
    let mut d = Daemon::prepare(NO_PERIODIC);
    let theirs = d.workspace.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    git(&theirs, &["init", "-q", "-b", "main"]);
    write(&theirs, "t.txt", "t\n");
    git(&theirs, &["add", "."]);
    git(&theirs, &["commit", "-q", "-m", "theirs"]);
    let repo = d.workspace.join("r");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    write(&repo, "a.txt", "a\n");
    write(&repo, "tracked.env", "committed\n");
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    write(&repo, "a.txt", "changed\n");
    write(&repo, "new.txt", "new\n");
    write(&repo, "secret.env", "secret\n");
    write(&repo, "tracked.env", "changed secret\n");
    // Runs as `nobody` when the tests run as root, whom no mode stops.
    d.unprivileged();
    let status = Command::new("chown")
        .args(["-R", &unsafe { libc::geteuid() }.to_string()])
        .arg(&theirs)
        .status()
        .unwrap();
    assert!(status.success());
    for name in ["secret.env", "tracked.env"] {
        std::fs::set_permissions(repo.join(name), std::fs::Permissions::from_mode(0o000)).unwrap();
    }
    d.spawn_and_wait().await;
    let r = post_bundle(&d).await;
    assert_eq!(r["errors"], json!([]), "{r}");
    let bundle = bundle_path(&d, "r");
    assert!(bundle.exists(), "{r}");
    assert!(bundle_path(&d, "theirs").exists(), "{r}");

    let clone = d.root().join("clone");
    git(
        d.root(),
        &[
            "clone",
            "-q",
            bundle.to_str().unwrap(),
            clone.to_str().unwrap(),
        ],
    );
    fetch_wip_refs(&clone, &bundle);
    let show = |rev: &str| git_raw(&clone, &["show", rev]);
    let text = |rev: &str| String::from_utf8(show(rev).stdout).unwrap();
    assert_eq!(text("refs/sandkeep/wip:a.txt"), "changed\n");
    assert_eq!(text("refs/sandkeep/wip:new.txt"), "new\n");
    assert_eq!(text("refs/sandkeep/wip:tracked.env"), "committed\n");
    assert!(!show("refs/sandkeep/wip:secret.env").status.success());
    // The json's sizes and times are those of the files the commit took: not the
    // unreadable file's (its commit content is older than its time).
    let meta = head_meta(&d, "r");
    assert!(meta.work_tree.contains_key("a.txt"), "{:?}", meta.work_tree);
    assert!(
        !meta.work_tree.contains_key("tracked.env"),
        "{:?}",
        meta.work_tree
    );
    let s = d.api().get("/v1/status").await.json();
    for g in s["git"].as_array().unwrap() {
        assert_eq!(g["error"], Value::Null, "{s}");
    }
    assert_eq!(s["git"].as_array().unwrap().len(), 2, "{s}");
}

/// A shallow clone (`git clone --depth`) comes back shallow (`.git/shallow`): a sound
/// repository, not one naming parents it lacks. `.git/info/attributes` comes back too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shallow_clone_comes_back_shallow() {
    let d = Daemon::start_with(NO_PERIODIC).await;
    let origin = d.root().join("origin");
    std::fs::create_dir(&origin).unwrap();
    git(&origin, &["init", "-q", "-b", "main"]);
    for i in 0..4 {
        write(&origin, "a.txt", format!("{i}\n"));
        git(&origin, &["add", "a.txt"]);
        git(&origin, &["commit", "-q", "-m", &format!("c{i}")]);
    }
    let repo = d.workspace.join("shallow");
    let url = format!("file://{}", origin.display());
    git(
        d.root(),
        &["clone", "-q", "--depth", "2", &url, repo.to_str().unwrap()],
    );
    std::fs::write(repo.join(".git/info/attributes"), "*.bin binary\n").unwrap();
    write(&repo, "wip.txt", "uncommitted\n");
    let body = post_bundle(&d).await;
    assert_eq!(body["errors"], json!([]), "{body}");

    let scratch = tempfile::tempdir().unwrap();
    let restored = scratch.path().join("restored");
    gitbundle::restore_bundle(
        &bundle_path(&d, "shallow"),
        &head_meta(&d, "shallow"),
        &restored,
    )
    .unwrap();
    assert_eq!(
        git(&restored, &["rev-parse", "--is-shallow-repository"]).trim(),
        "true"
    );
    git(&restored, &["fsck", "--no-progress"]);
    assert_eq!(
        git(&restored, &["log", "--format=%H %s"]),
        git(&repo, &["log", "--format=%H %s"])
    );
    assert_eq!(
        git(&restored, &["status", "--porcelain"]),
        git(&repo, &["status", "--porcelain"])
    );
    assert_eq!(
        git(&restored, &["check-attr", "binary", "--", "x.bin"]),
        "x.bin: binary: set\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_bundle_round_trip() {
    use crate::s3_server::S3Server;
    let server = S3Server::start().await;
    let mut d = Daemon::prepare(NO_PERIODIC);
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    let start = text.find("[remote]").unwrap();
    let end = text[start..].find("\n\n").map_or(text.len(), |e| start + e);
    let text = format!("{}{}{}", &text[..start], server.remote_toml(), &text[end..]);
    std::fs::write(&d.config_path, text).unwrap();
    let repo = d.workspace.clone();
    rich_repo(&repo);
    git(&repo, &["gc", "-q"]);
    write(&repo, "after-gc.txt", "loose\n");
    git(&repo, &["add", "after-gc.txt"]);
    let status_before = git(&repo, &["status", "--porcelain"]);
    d.spawn_and_wait().await;
    let body = post_bundle(&d).await;
    assert_eq!(body["bundles"][0]["refs"], 9, "{body}");
    let remote = server.client().await;
    let scratch = tempfile::tempdir().unwrap();
    let target = scratch.path().join("restored");
    gitbundle::fetch_and_restore(
        &remote,
        "conversations/u1/c1/",
        "workspace",
        &target,
        scratch.path(),
    )
    .await
    .unwrap()
    .expect("a bundle in S3");
    git(&target, &["fsck", "--no-progress"]);
    assert_eq!(git(&target, &["status", "--porcelain"]), status_before);
    assert_eq!(
        git(&target, &["log", "--all", "--format=%H %s"]),
        git(&repo, &["log", "--all", "--format=%H %s"])
    );
    assert_eq!(work_tree(&target), work_tree(&repo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_hooks_exclude_and_every_stash_entry_come_back() {
    let mut d = Daemon::prepare(NO_PERIODIC);
    let ws = d.workspace.clone();
    git(&ws, &["init", "-q", "-b", "main"]);
    write(&ws, "a.txt", "1\n");
    git(&ws, &["add", "a.txt"]);
    git(&ws, &["commit", "-q", "-m", "one"]);
    git(
        &ws,
        &[
            "remote",
            "add",
            "origin",
            "https://example.invalid/repo.git",
        ],
    );
    git(&ws, &["config", "branch.main.remote", "origin"]);
    git(&ws, &["config", "branch.main.merge", "refs/heads/main"]);
    git(&ws, &["config", "user.email", "agent@example.invalid"]);
    write(&ws, ".git/hooks/pre-commit", "#!/bin/sh\nexit 0\n");
    std::fs::set_permissions(
        ws.join(".git/hooks/pre-commit"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    write(&ws, ".git/info/exclude", "# local\nscratch/\n");
    for i in 1..=3 {
        write(&ws, "a.txt", format!("stash {i}\n"));
        git(&ws, &["stash", "push", "-q", "-m", &format!("change {i}")]);
    }
    let stashes = git(&ws, &["stash", "list", "--format=%H %gs"]);
    assert_eq!(stashes.lines().count(), 3, "{stashes}");
    d.spawn_and_wait().await;
    post_bundle(&d).await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let ws = d.workspace.clone();
    assert_eq!(git(&ws, &["stash", "list", "--format=%H %gs"]), stashes);
    let oldest = git(&ws, &["stash", "show", "-p", "stash@{2}"]);
    assert!(oldest.contains("+stash 1"), "{oldest}");
    assert_eq!(
        git(&ws, &["config", "--get", "remote.origin.url"]).trim(),
        "https://example.invalid/repo.git"
    );
    assert_eq!(
        git(&ws, &["config", "--get", "branch.main.merge"]).trim(),
        "refs/heads/main"
    );
    assert_eq!(
        git(&ws, &["config", "--get", "user.email"]).trim(),
        "agent@example.invalid"
    );
    let hook = ws.join(".git/hooks/pre-commit");
    assert_eq!(
        std::fs::read_to_string(&hook).unwrap(),
        "#!/bin/sh\nexit 0\n"
    );
    assert_eq!(
        std::fs::metadata(&hook).unwrap().permissions().mode() & 0o111,
        0o111
    );
    assert!(
        std::fs::read_to_string(ws.join(".git/info/exclude"))
            .unwrap()
            .contains("scratch/")
    );
    // The stash's helper refs stay inside the bundle.
    assert!(!git(&ws, &["for-each-ref"]).contains("refs/sandkeep/"));
}

/// When remote storage fails for every repository, nothing was written: 502, with the
/// failures listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_request_that_remote_storage_fails_entirely_is_a_502() {
    let d = Daemon::start_with(NO_PERIODIC).await;
    let ws = d.workspace.clone();
    git(&ws, &["init", "-q"]);
    write(&ws, "a.txt", "a\n");
    // The remote's volume goes away.
    let away = d.root().join("remote-away");
    std::fs::rename(&d.remote, &away).unwrap();
    let r = d.api().post_empty("/v1/git/bundle").await;
    let body = crate::util::assert_error(&r, 502, "remote_error");
    assert_eq!(body["errors"][0]["repo"], ".", "{body}");
    std::fs::rename(&away, &d.remote).unwrap();
    let body = post_bundle(&d).await;
    assert_eq!(body["bundles"][0]["repo"], ".", "{body}");
}
