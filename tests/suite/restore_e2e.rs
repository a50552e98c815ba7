//! Restore, offline and at start: `sandkeep restore --to` from the file mirror and from
//! a snapshot (empty-target check, `--force`, unknown snapshot, nothing to restore),
//! bad entries (corrupt object, missing object, an entry that cannot be written, a
//! path escaping the workspace) reported while the rest comes back and their remote
//! copies are kept, `restore = auto` never clobbering a non-empty workspace, `force`
//! replacing it, and a cut-short restore resumed by the next start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::s3_server::S3Server;
use crate::util::fs::{Entry, chmod, git, git_state, tree, write};
use crate::util::{Daemon, ok};

const CONV: &str = "conversations/u1/c1";
/// No background work: only explicit syncs and the final sync write the remote.
const CONFIG: &str = "[sync]\ndebounce_min = \"20s\"\ndebounce_max = \"30s\"\n\n[snapshot]\ninterval = \"0s\"\n\n[git]\ninterval = \"0s\"\n";

fn not_git(rel: &str) -> bool {
    rel == ".git" || rel.starts_with(".git/") || rel.contains("/.git")
}

/// Files, an executable, a symlink, an empty dir and (`with_git`) a repository with a
/// commit and uncommitted work; then a synced, stopped daemon.
async fn synced_workspace(s3: Option<&S3Server>, with_git: bool) -> Daemon {
    let mut d = Daemon::prepare(CONFIG);
    if let Some(s) = s3 {
        s.configure(&d);
    }
    let ws = d.workspace.clone();
    write(&ws, "a.txt", "alpha\n");
    write(&ws, "src/lib/mod.rs", "pub fn f() {}\n");
    write(&ws, "bin/tool", "#!/bin/sh\n");
    chmod(&ws.join("bin/tool"), 0o750);
    if with_git {
        git(&ws, &["init", "-q"]);
        git(&ws, &["add", "-A"]);
        git(&ws, &["commit", "-q", "-m", "one"]);
    }
    write(&ws, "a.txt", "alpha, edited\n");
    write(&ws, "untracked/new.md", "new\n");
    write(&ws, "corrupt.txt", "will be corrupted\n");
    write(&ws, "missing.txt", "will go missing\n");
    // Above the size restore keeps in memory: streamed to disk, hashed from there.
    write(&ws, "data/big.bin", crate::util::pattern(5 << 20, 3));
    std::fs::create_dir_all(ws.join("empty/dir")).unwrap();
    std::os::unix::fs::symlink("src/lib/mod.rs", ws.join("link")).unwrap();
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert_eq!(status["workspace"]["files"], 7, "{status}");
    ok(&d.api().post("/v1/snapshots", &json!({})).await, 201);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    d
}

/// Starts the daemon, writes the bundles and syncs, stops it, and restores into
/// `<root>/restored` with the CLI (exit 0): the bundles' answer, the target and the
/// restore's report.
async fn bundle_stop_and_restore(d: &mut Daemon) -> (Value, PathBuf, Value) {
    d.spawn_and_wait().await;
    let bundled = ok(&d.api().post("/v1/git/bundle", &json!({})).await, 200);
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    let target = d.root().join("restored");
    let out = d.restore_cli(&["--to", target.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    (bundled, target, out.json())
}

fn remote_file(d: &Daemon, rel: &str) -> PathBuf {
    d.remote.join(CONV).join("workspace/files").join(rel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_restore_from_the_mirror_and_from_snapshots() {
    let d = synced_workspace(None, true).await;
    let original = tree(&d.workspace, &not_git);
    let original_git = git_state(&d.workspace);

    // Into a non-empty directory only with --force.
    let busy = d.root().join("busy");
    write(&busy, "keep.txt", "x");
    let out = d.restore_cli(&["--to", busy.to_str().unwrap()], &[]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("not empty"), "{out:?}");
    assert_eq!(std::fs::read(busy.join("keep.txt")).unwrap(), b"x");

    // From the mirror: the same tree, the same repository.
    let target = d.root().join("restored");
    let out = d.restore_cli(&["--to", target.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    let s = out.json();
    assert_eq!(s["restored"], true, "{s}");
    assert_eq!(s["bad"], json!([]), "{s}");
    assert_eq!(s["symlinks"], 1, "{s}");
    assert_eq!(s["repos"], json!([{"repo": ".", "refs": 1}]), "{s}");
    // The index's stat data was refreshed once the files and their times were in
    // place: git's plumbing sees no phantom change (before any porcelain refreshes it).
    let git_out = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&target)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plumbing = git_out(&["diff-files", "--name-only"]);
    assert_eq!(plumbing, git_out(&["diff", "--name-only"]));
    assert_eq!(plumbing, "a.txt\n", "only the real change");
    assert_eq!(tree(&target, &not_git), original);
    assert_eq!(git_state(&target), original_git);

    // Into a fresh volume (its `lost+found`) with a `node_modules/` baked into the
    // image: nothing the mirror would carry, so no --force needed; both stay.
    let volume = d.root().join("volume");
    std::fs::create_dir_all(volume.join("lost+found")).unwrap();
    write(&volume, "node_modules/pkg/index.js", "baked");
    let out = d.restore_cli(&["--to", volume.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["restored"], true, "{out:?}");
    assert!(volume.join("lost+found").is_dir());
    assert!(volume.join("node_modules/pkg/index.js").exists());
    let mut t = tree(&volume, &not_git);
    t.retain(|k, _| !k.starts_with("node_modules") && !k.starts_with("lost+found"));
    assert_eq!(t, original);
    // A regular file is no directory to restore into: an error that names it.
    let file = d.root().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let out = d.restore_cli(&["--to", file.to_str().unwrap()], &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("a-file"), "{out:?}");

    // From the latest snapshot: the same tree (times to the second, as tar keeps them)
    // with `.git` as archived.
    let from_snapshot = d.root().join("from-snapshot");
    let out = d.restore_cli(
        &[
            "--to",
            from_snapshot.to_str().unwrap(),
            "--snapshot",
            "latest",
        ],
        &[],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let s = out.json();
    let name = s["snapshot"].as_str().unwrap().to_string();
    assert!(
        name.starts_with("backup-") && name.ends_with(".tar.gz"),
        "{s}"
    );
    assert_eq!(s["bad"], json!([]), "{s}");
    assert_eq!(tree(&from_snapshot, &not_git), original);
    assert_eq!(git_state(&from_snapshot), original_git);
    // ... also named by its timestamp part.
    let stamp = &name["backup-".len()..name.len() - ".tar.gz".len()];
    let by_name = d.root().join("by-name");
    let out = d.restore_cli(
        &["--to", by_name.to_str().unwrap(), "--snapshot", stamp],
        &[],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(tree(&by_name, &not_git), original);
    // ... and by its object key, as `GET /v1/snapshots` lists it.
    let key = format!("{CONV}/workspace/compressed/{name}");
    let by_key = d.root().join("by-key");
    let out = d.restore_cli(&["--to", by_key.to_str().unwrap(), "--snapshot", &key], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(tree(&by_key, &not_git), original);

    // An unknown snapshot: exit 3, nothing written.
    let none = d.root().join("none");
    let out = d.restore_cli(
        &[
            "--to",
            none.to_str().unwrap(),
            "--snapshot",
            "20000101T000000000Z",
        ],
        &[],
    );
    assert_eq!(out.code, 3, "{out:?}");

    // A conversation never synced: nothing to restore, not an error.
    let fresh = d.root().join("fresh");
    let out = d.restore_cli(
        &["--to", fresh.to_str().unwrap()],
        &[("SANDKEEP_IDENTITY_CONVERSATION", "never-synced")],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["restored"], false, "{out:?}");

    // A dir remote whose root is missing (a mistyped path, a volume not mounted):
    // an error, and the root is not created.
    let missing = d.root().join("no-such-remote");
    let out = d.restore_cli(
        &["--to", fresh.to_str().unwrap()],
        &[("SANDKEEP_REMOTE_PATH", missing.to_str().unwrap())],
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("not a directory"), "{out:?}");
    assert!(!missing.exists());

    // --force: brought back to the remote state; an extra file goes, an edited one is
    // replaced, an unchanged one is not downloaded, an ignored directory stays.
    write(&target, "extra.txt", "not in the remote");
    write(&target, "a.txt", "local edit\n");
    write(&target, "node_modules/pkg/index.js", "ignored");
    // A state directory inside the target (the daemon's own, as for a daemon whose
    // state lives in its workspace) is not the workspace's: it stays.
    write(&target, ".sk-state/kv.key", "key");
    let state = target.join(".sk-state");
    let out = d.restore_cli(
        &["--to", target.to_str().unwrap(), "--force"],
        &[("SANDKEEP_STATE_DIR", state.to_str().unwrap())],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let s = out.json();
    assert_eq!(s["removed"], 1, "{s}");
    assert!(s["unchanged"].as_u64().unwrap() >= 6, "{s}");
    assert!(!target.join("extra.txt").exists());
    assert!(target.join("node_modules/pkg/index.js").exists());
    assert!(
        state.join("kv.key").exists(),
        "the state directory was emptied"
    );
    std::fs::remove_dir_all(&state).unwrap();
    let mut t = tree(&target, &not_git);
    t.retain(|k, _| !k.starts_with("node_modules"));
    assert_eq!(t, original);
}

/// Breaks entries of the remote workspace: two corrupt objects (small and large), a
/// missing object, an empty directory below a file (cannot be written), and paths that
/// leave the workspace or are not plain (a file, a symlink and an empty directory).
fn break_remote(d: &Daemon) {
    std::fs::write(remote_file(d, "corrupt.txt"), "tampered").unwrap();
    // The same for a file restore streams to disk.
    std::fs::write(
        remote_file(d, "data/big.bin"),
        crate::util::pattern(5 << 20, 4),
    )
    .unwrap();
    // Damage in place keeps the object's time (unlike a newer upload, see
    // `an_object_newer_than_the_manifest_is_restored_with_its_content`).
    for damaged in ["corrupt.txt", "data/big.bin"] {
        let f = std::fs::File::options()
            .write(true)
            .open(remote_file(d, damaged))
            .unwrap();
        f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_000_000))
            .unwrap();
    }
    std::fs::remove_file(remote_file(d, "missing.txt")).unwrap();
    let mpath = d.remote.join(CONV).join("workspace/manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["empty_dirs"]
        .as_array_mut()
        .unwrap()
        .push(json!("a.txt/below-a-file"));
    m["empty_dirs"].as_array_mut().unwrap().push(json!("/"));
    let entry = m["files"]["a.txt"].clone();
    m["files"]["../escape.txt"] = entry.clone();
    m["files"]["/abs.txt"] = entry.clone();
    m["files"]["a/."] = entry;
    m["symlinks"]["/abs-link"] = json!("a.txt");
    std::fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();
}

fn bad_paths(report: &Value) -> Vec<String> {
    report["bad"]
        .as_array()
        .unwrap_or_else(|| panic!("no bad list: {report}"))
        .iter()
        .map(|b| b["path"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_entries_are_reported_the_rest_restored_and_their_remote_copies_kept() {
    // No repository: its work-tree commit would bring the broken files back.
    let mut d = synced_workspace(None, false).await;
    let mut expected = tree(&d.workspace, &not_git);
    break_remote(&d);
    let want_bad = [
        "../escape.txt",
        "/",
        "/abs-link",
        "/abs.txt",
        "a.txt/below-a-file",
        "a/.",
        "corrupt.txt",
        "data/big.bin",
        "missing.txt",
    ];
    let error_of = |report: &Value, path: &str| {
        let bad = report["bad"].as_array().unwrap().iter();
        bad.filter(|b| b["path"] == path)
            .map(|b| b["error"].as_str().unwrap().to_string())
            .next()
            .unwrap()
    };

    // Offline.
    let target = d.root().join("offline");
    let out = d.restore_cli(&["--to", target.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    let s = out.json();
    assert_eq!(bad_paths(&s), want_bad, "{s}");
    for corrupt in ["corrupt.txt", "data/big.bin"] {
        assert!(error_of(&s, corrupt).contains("hash"), "{s}");
    }
    assert!(error_of(&s, "missing.txt").contains("missing"), "{s}");
    for not_plain in ["/", "/abs-link", "/abs.txt", "a/."] {
        assert!(error_of(&s, not_plain).contains("plain"), "{s}");
    }
    assert!(!d.root().join("escape.txt").exists());
    expected.remove("corrupt.txt");
    expected.remove("missing.txt");
    expected.remove("data/big.bin");
    assert_eq!(tree(&target, &not_git), expected);
    assert!(target.join("a.txt").is_file());

    // At start: the same report in the status, ready all the same.
    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let status = ok(&d.api().get("/v1/status").await, 200);
    let report = &status["restore"]["workspace"];
    assert_eq!(bad_paths(report), want_bad, "{status}");
    assert_eq!(tree(&d.workspace, &not_git), expected);

    // What could not be restored is not deleted from the remote by the next round.
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(
        std::fs::read(remote_file(&d, "corrupt.txt")).unwrap(),
        b"tampered"
    );
    let m: Value = serde_json::from_slice(
        &std::fs::read(d.remote.join(CONV).join("workspace/manifest.json")).unwrap(),
    )
    .unwrap();
    assert!(m["files"].get("corrupt.txt").is_some(), "{m}");
    assert!(m["files"].get("missing.txt").is_some(), "{m}");
    // Once the file is written here again, it syncs as usual.
    write(&d.workspace, "corrupt.txt", "fixed by hand\n");
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(
        std::fs::read(remote_file(&d, "corrupt.txt")).unwrap(),
        b"fixed by hand\n"
    );
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
}

async fn auto_never_clobbers_force_replaces(s3: Option<&S3Server>) {
    let mut d = synced_workspace(s3, true).await;
    let remote_state = tree(&d.workspace, &not_git);

    // auto + a workspace with content: nothing restored over it; it is reconciled.
    write(&d.workspace, "a.txt", "edited while the daemon was down\n");
    write(&d.workspace, "local-only.txt", "local\n");
    d.set_env("SANDKEEP_RESTORE", "auto");
    d.spawn_and_wait().await;
    assert_eq!(
        std::fs::read_to_string(d.workspace.join("a.txt")).unwrap(),
        "edited while the daemon was down\n"
    );
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert!(status["restore"].get("workspace").is_none(), "{status}");
    let r = ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(
        r["files_uploaded"], 0,
        "the startup round uploaded them: {r}"
    );
    let reconciled = tree(&d.workspace, &not_git);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    assert_ne!(reconciled, remote_state);

    // force: the workspace becomes the remote state again.
    write(&d.workspace, "a.txt", "clobbered by force\n");
    write(&d.workspace, "extra.txt", "goes away\n");
    d.set_env("SANDKEEP_RESTORE", "force");
    d.spawn_and_wait().await;
    let status = ok(&d.api().get("/v1/status").await, 200);
    let report = &status["restore"]["workspace"];
    assert_eq!(report["removed"], 1, "{status}");
    assert_eq!(report["bad"], json!([]), "{status}");
    assert_eq!(tree(&d.workspace, &not_git), reconciled);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_never_clobbers_and_force_replaces_dir_remote() {
    auto_never_clobbers_force_replaces(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_never_clobbers_and_force_replaces_s3_remote() {
    let s3 = S3Server::start().await;
    auto_never_clobbers_force_replaces(Some(&s3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_cut_short_is_resumed_not_mirrored() {
    let mut d = synced_workspace(None, true).await;
    let original = tree(&d.workspace, &not_git);
    let original_git = git_state(&d.workspace);
    let key = d.generated_key();
    std::fs::remove_dir_all(&d.state_dir).unwrap();

    // What a restore killed half-way leaves: some files, the marker in the state dir.
    std::fs::remove_dir_all(&d.workspace).unwrap();
    write(&d.workspace, "a.txt", "alpha, edited\n");
    write(&d.workspace, ".sandkeep-restore-0123456789abcdef", "half");
    write(
        &d.workspace,
        "src/.sandkeep-restore-00ff00ff00ff00ff",
        "half",
    );
    std::fs::create_dir_all(&d.state_dir).unwrap();
    std::fs::write(d.state_dir.join("workspace-restore.pending"), "").unwrap();
    d.set_env("SANDKEEP_KV_KEY", &key);
    d.set_env("SANDKEEP_RESTORE", "auto");
    d.spawn_and_wait().await;
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert_eq!(status["restore"]["workspace"]["bad"], json!([]), "{status}");
    assert_eq!(tree(&d.workspace, &not_git), original);
    assert_eq!(git_state(&d.workspace), original_git);
    assert!(!d.state_dir.join("workspace-restore.pending").exists());
    // Nothing was deleted from the remote, nor the half-written files sent there.
    assert!(remote_file(&d, "src/lib/mod.rs").exists());
    write(
        &d.workspace,
        "src/.sandkeep-restore-1111111111111111",
        "half",
    );
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    let m = manifest(&d.remote);
    assert!(
        m["files"]
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.contains(".sandkeep-restore-")),
        "{m}"
    );
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
}

/// The own directories of a daemon inside its workspace count as empty and are never
/// restored over or mirrored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_dir_inside_the_workspace_is_neither_mirrored_nor_in_the_way() {
    let mut d = Daemon::prepare(CONFIG);
    let inner_state: PathBuf = d.workspace.join(".state");
    let text = std::fs::read_to_string(&d.config_path).unwrap();
    let text = text.replace(
        &format!("state_dir = {:?}", d.state_dir.display().to_string()),
        &format!("state_dir = {:?}", inner_state.display().to_string()),
    );
    std::fs::write(&d.config_path, text).unwrap();
    write(&d.workspace, "f.txt", "f\n");
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    let m = manifest(&d.remote);
    assert_eq!(
        m["files"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["f.txt"],
        "{m}"
    );
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    // A new sandbox whose workspace holds only the (new) state dir: restored.
    let key = std::fs::read_to_string(inner_state.join("kv.key")).unwrap();
    std::fs::remove_dir_all(&d.workspace).unwrap();
    std::fs::create_dir_all(&inner_state).unwrap();
    d.set_env("SANDKEEP_KV_KEY", key.trim());
    d.set_env("SANDKEEP_RESTORE", "auto");
    d.spawn_and_wait().await;
    assert_eq!(
        std::fs::read_to_string(d.workspace.join("f.txt")).unwrap(),
        "f\n"
    );
    let t = tree(&d.workspace, &|r: &str| r.starts_with(".state"));
    assert!(matches!(t.get("f.txt"), Some(Entry::File { .. })), "{t:?}");
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
}

/// Polls the remote manifest's text (empty while there is none) until `ok` accepts it;
/// false when 20 s pass first.
async fn manifest_until(d: &Daemon, ok: impl Fn(&str) -> bool) -> bool {
    let path = d.remote.join(CONV).join("workspace/manifest.json");
    crate::util::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let m = std::fs::read_to_string(&path).unwrap_or_default();
        let done = ok(&m);
        async move { done.then_some(()) }
    })
    .await
    .is_some()
}

fn manifest(remote: &Path) -> Value {
    serde_json::from_slice(
        &std::fs::read(remote.join(CONV).join("workspace/manifest.json")).unwrap(),
    )
    .unwrap()
}

/// A new sandbox whose remote does not answer: not ready and nothing restored
/// while it retries; a stop meanwhile exits 75 at once; once the remote is back, the
/// next start restores everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_waits_for_the_remote_and_a_stop_meanwhile_exits_75() {
    let mut s3 = S3Server::start().await;
    let mut d = synced_workspace(Some(&s3), true).await;
    let original = tree(&d.workspace, &not_git);
    let original_git = git_state(&d.workspace);
    d.become_new_sandbox();

    s3.stop();
    d.spawn();
    // Past the 10 s after which a silent remote no longer holds up the start: the
    // daemon now retries the restore itself.
    let retrying =
        crate::util::poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
            let log = d.log();
            async move {
                log.contains("cannot restore the workspace yet")
                    .then_some(())
            }
        })
        .await;
    assert!(retrying.is_some(), "log:\n{}", d.log());
    assert_eq!(d.api().get("/readyz").await.status, 503);
    assert_eq!(d.api().get("/v1/kv/x").await.status, 503);
    // Nothing but the mark of a restore under way.
    let left = tree(&d.workspace, &not_git);
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        [".sandkeep-restore-incomplete"],
        "{left:?}"
    );
    // The owner's claim and the restore's reads count as remote errors too.
    let metrics = d.api().get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    let get_errors: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("sandkeep_remote_errors_total{op=\"get\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(get_errors >= 1.0, "{text}");
    let status = d.terminate();
    assert_eq!(status.code(), Some(75), "log:\n{}", d.log());
    assert!(d.log().contains("stopped during start-up"), "{}", d.log());
    // The workspace itself says its restore did not finish: a start on another state
    // directory (a persistent workspace, an ephemeral state volume) resumes it rather
    // than taking what a restore cut short left for the truth.
    let marker = d.workspace.join(".sandkeep-restore-incomplete");
    assert!(marker.exists());
    write(&d.workspace, "a.txt", "half");
    std::fs::remove_dir_all(&d.state_dir).unwrap();

    s3.restart().await;
    d.spawn_and_wait().await;
    assert_eq!(tree(&d.workspace, &not_git), original);
    assert_eq!(git_state(&d.workspace), original_git);
    assert!(!marker.exists());
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_deleted_after_the_last_bundle_stay_deleted() {
    let mut d = Daemon::prepare(
        "[sync]\ndebounce_min = \"200ms\"\ndebounce_max = \"1s\"\n\n[snapshot]\ninterval = \"0s\"\n\n[git]\ninterval = \"0s\"\n",
    );
    let ws = d.workspace.clone();
    git(&ws, &["init", "-q"]);
    write(&ws, "keep.txt", "keep\n");
    write(&ws, "old/deleteme.txt", "old\n");
    write(&ws, "local.cfg", "tracked but ignored\n");
    git(&ws, &["add", "."]);
    git(&ws, &["commit", "-q", "-m", "one"]);
    write(&ws, ".gitignore", "local.cfg\n");
    // A short lease: the new sandbox need not wait long for the killed daemon's claim.
    d.set_env("SANDKEEP_REMOTE_LEASE", "2s");
    d.spawn_and_wait().await;
    // The bundle (and the manifest) of this state.
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    // Then a deletion the debounced mirror carries, but no bundle (git.interval off).
    std::fs::remove_file(ws.join("old/deleteme.txt")).unwrap();
    std::fs::remove_dir(ws.join("old")).unwrap();
    let gone = manifest_until(&d, |m| !m.is_empty() && !m.contains("deleteme.txt")).await;
    assert!(gone, "the mirror never carried the deletion");
    d.kill9();

    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let ws = d.workspace.clone();
    assert!(
        !ws.join("old").exists(),
        "the stale bundle brought a deleted file (or its directory) back"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("keep.txt")).unwrap(),
        "keep\n"
    );
    // Ignored by the manifest's rules, so only the bundle has it: kept.
    assert_eq!(
        std::fs::read_to_string(ws.join("local.cfg")).unwrap(),
        "tracked but ignored\n"
    );
    let status = git(&ws, &["status", "--porcelain"]);
    assert!(status.contains(" D old/deleteme.txt"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_restores_over_content_the_mirror_would_never_carry() {
    let mut d = synced_workspace(None, false).await;
    d.become_new_sandbox();
    // An image that bakes dependencies into the workspace (sync.exclude has them).
    write(
        &d.workspace,
        "node_modules/p/index.js",
        "module.exports = 1;\n",
    );
    d.spawn_and_wait().await;
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert!(
        status["restore"]["workspace"].is_object(),
        "not restored: {status}"
    );
    assert_eq!(
        std::fs::read_to_string(d.workspace.join("a.txt")).unwrap(),
        "alpha, edited\n"
    );
    assert!(d.workspace.join("node_modules/p/index.js").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_bundle_gives_way_to_the_manifest_and_keeps_what_only_it_holds() {
    let mut d = Daemon::prepare(
        "[sync]\ndebounce_min = \"200ms\"\ndebounce_max = \"1s\"\nmax_file_bytes = 1000\n\n[snapshot]\ninterval = \"0s\"\n\n[git]\ninterval = \"0s\"\n",
    );
    let ws = d.workspace.clone();
    git(&ws, &["init", "-q"]);
    write(&ws, "x", "x is a file\n");
    write(&ws, "d/a", "d is a directory\n");
    // (Not every file goes: that would be held as everything gone.)
    write(&ws, "keep.txt", "stays\n");
    write(&ws, "big.bin", crate::util::pattern(5000, 1));
    // A name the mirror cannot carry as a key: only the bundle has it too.
    write(&ws, "ctl\u{1}.txt", "only git has me\n");
    let big_time = std::time::UNIX_EPOCH + Duration::from_nanos(978_307_200_123_456_789);
    std::fs::File::options()
        .write(true)
        .open(ws.join("big.bin"))
        .unwrap()
        .set_modified(big_time)
        .unwrap();
    git(&ws, &["add", "."]);
    git(&ws, &["commit", "-q", "-m", "one"]);
    d.set_env("SANDKEEP_REMOTE_LEASE", "2s");
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    // Swapped after the bundle; the debounced mirror carries it (no new bundle).
    std::fs::remove_file(ws.join("x")).unwrap();
    write(&ws, "x/y", "new work\n");
    std::fs::remove_dir_all(ws.join("d")).unwrap();
    write(&ws, "d", "d is a file now\n");
    let carried = manifest_until(&d, |m| m.contains("\"x/y\"")).await;
    assert!(carried, "the mirror never carried the swap");
    d.kill9();

    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let ws = d.workspace.clone();
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert_eq!(status["restore"]["workspace"]["bad"], json!([]), "{status}");
    assert_eq!(
        std::fs::read_to_string(ws.join("x/y")).unwrap(),
        "new work\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("d")).unwrap(),
        "d is a file now\n"
    );
    // Over sync.max_file_bytes: never mirrored, so only the bundle has it: kept, with
    // the time it had when the bundle was read (not the restore's).
    assert_eq!(
        std::fs::read(ws.join("big.bin")).unwrap(),
        crate::util::pattern(5000, 1)
    );
    let got = std::fs::metadata(ws.join("big.bin"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(got, big_time);
    assert_eq!(
        std::fs::read_to_string(ws.join("ctl\u{1}.txt")).unwrap(),
        "only git has me\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_restores_onto_a_fresh_volume_with_lost_and_found() {
    let mut d = synced_workspace(None, false).await;
    d.become_new_sandbox();
    std::fs::create_dir_all(d.workspace.join("lost+found")).unwrap();
    d.spawn_and_wait().await;
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert!(
        status["restore"]["workspace"].is_object(),
        "not restored: {status}"
    );
    assert!(d.workspace.join("a.txt").exists());
}

/// A bundle's work-tree commit is not always the files' bytes: git converts line
/// endings (`text=auto`) and keeps the index's version of an assume-unchanged file.
/// Where the bundle (newer than the manifest) was made from the very file the
/// manifest has, the restore takes the manifest's exact copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_bundle_does_not_replace_exact_copies_with_converted_ones() {
    let mut d = Daemon::prepare(CONFIG);
    let ws = d.workspace.clone();
    git(&ws, &["init", "-q"]);
    write(&ws, ".gitattributes", "* text=auto\n");
    write(&ws, "crlf.txt", "one\r\ntwo\r\n");
    write(&ws, "flagged.txt", "committed\n");
    git(&ws, &["add", "."]);
    git(&ws, &["commit", "-q", "-m", "one"]);
    git(&ws, &["update-index", "--assume-unchanged", "flagged.txt"]);
    write(&ws, "flagged.txt", "edited, git does not look\n");
    write(&ws, "untracked_crlf.txt", "three\r\n");
    d.set_env("SANDKEEP_REMOTE_LEASE", "2s");
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    // The bundle comes after the manifest, as at every final sync.
    ok(&d.api().post("/v1/git/bundle", &json!({})).await, 200);
    let original = tree(&d.workspace, &not_git);
    d.kill9();

    d.become_new_sandbox();
    d.spawn_and_wait().await;
    assert_eq!(tree(&d.workspace, &not_git), original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_newer_than_the_manifest_keeps_its_work() {
    // CONFIG: a debounce of 20 s and no periodic bundles, so only the calls below write.
    let mut d = Daemon::prepare(CONFIG);
    let ws = d.workspace.clone();
    git(&ws, &["init", "-q"]);
    write(&ws, "a.txt", "a\n");
    write(&ws, "old.txt", "old\n");
    write(&ws, "was_file", "a file\n");
    write(&ws, "was_dir/keep", "in a directory\n");
    git(&ws, &["add", "."]);
    git(&ws, &["commit", "-q", "-m", "one"]);
    d.set_env("SANDKEEP_REMOTE_LEASE", "2s");
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    // Work after the manifest, carried by a bundle only; then a crash before the
    // mirror's debounced round.
    write(&ws, "new_feature.py", "two hours of work\n");
    write(&ws, "a.txt", "a, edited\n");
    let edited_at = std::time::UNIX_EPOCH + Duration::from_nanos(978_307_200_123_456_789);
    std::fs::File::options()
        .write(true)
        .open(ws.join("a.txt"))
        .unwrap()
        .set_modified(edited_at)
        .unwrap();
    std::fs::remove_file(ws.join("was_file")).unwrap();
    write(&ws, "was_file/inside.txt", "now a directory\n");
    std::fs::remove_dir_all(ws.join("was_dir")).unwrap();
    write(&ws, "was_dir", "now a file\n");
    ok(&d.api().post("/v1/git/bundle", &json!({})).await, 200);
    d.kill9();

    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let ws = d.workspace.clone();
    assert_eq!(
        std::fs::read_to_string(ws.join("new_feature.py")).unwrap(),
        "two hours of work\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("a.txt")).unwrap(),
        "a, edited\n"
    );
    // With the time it had when the bundle was read, not the restore's: the bundle's
    // file keeps the place of the manifest's older entry, and its time too.
    let got = std::fs::metadata(ws.join("a.txt"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(got, edited_at);
    assert_eq!(
        std::fs::read_to_string(ws.join("old.txt")).unwrap(),
        "old\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("was_file/inside.txt")).unwrap(),
        "now a directory\n"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("was_dir")).unwrap(),
        "now a file\n"
    );
    // And the mirror catches up with it.
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    let remote = d.remote.join(CONV).join("workspace/files/new_feature.py");
    assert_eq!(
        std::fs::read_to_string(remote).unwrap(),
        "two hours of work\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_a_guard_kept_from_the_mirror_comes_back_from_its_bundle() {
    let mut d = Daemon::prepare(
        "[sync]\ndebounce_min = \"200ms\"\ndebounce_max = \"1s\"\n\n[snapshot]\ninterval = \"0s\"\n\n[git]\ninterval = \"0s\"\n",
    );
    let repo = d.workspace.join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    git(&repo, &["init", "-q"]);
    for i in 0..3 {
        write(&repo, &format!("big/f{i}"), "old\n");
    }
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    d.set_env("SANDKEEP_REMOTE_LEASE", "2s");
    d.spawn_and_wait().await;
    let api = d.api();
    ok(&api.post("/v1/sync", &json!({})).await, 200);
    // Every file gone (held), and a file takes their directory's name: it waits for
    // the guard, so only its bundle carries it.
    std::fs::remove_dir_all(repo.join("big")).unwrap();
    write(&repo, "big", "BIGFILE\n");
    let held = crate::util::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let api = &api;
        async move {
            let s = ok(&api.get("/v1/status").await, 200);
            (s["sync"]["held_deletes"] == 3).then_some(())
        }
    })
    .await;
    assert!(held.is_some(), "never held");
    ok(&api.post("/v1/git/bundle", &json!({})).await, 200);
    // A later change publishes a manifest newer than that bundle, still naming big/*.
    write(&d.workspace, "other.txt", "later\n");
    let later = manifest_until(&d, |m| m.contains("other.txt")).await;
    assert!(later, "the later change never reached the manifest");
    d.kill9();

    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let big = d.workspace.join("repo/big");
    assert_eq!(
        std::fs::read_to_string(&big).unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log())),
        "BIGFILE\n"
    );
}

/// A `git checkout` of a branch with far fewer files, or a `git stash -u` of many
/// untracked ones, just before the stop: the mirror's guard holds these deletions like
/// an accident, but the restore leaves the files where git keeps them (the other
/// branch, the stash), so the work tree comes back as git left it and the stash pops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_a_checkout_or_a_stash_took_away_are_not_brought_back() {
    let mut d = Daemon::prepare(CONFIG);
    let ws = d.workspace.clone();
    let stashed = ws.join("stashed");
    std::fs::create_dir_all(&stashed).unwrap();
    for dir in [&ws, &stashed] {
        git(dir, &["init", "-q", "-b", "main"]);
        write(dir, "README.md", "base\n");
        git(dir, &["add", "."]);
        git(dir, &["commit", "-q", "-m", "base"]);
    }
    git(&ws, &["checkout", "-q", "-b", "big"]);
    for i in 0..150 {
        write(&ws, &format!("gen/f{i}.txt"), format!("{i}\n"));
        write(
            &stashed,
            &format!("out/o{i}.json"),
            format!("{{\"n\": {i}}}\n"),
        );
    }
    git(&ws, &["add", "gen"]);
    git(&ws, &["commit", "-q", "-m", "big"]);
    // An accident's file the guard must still bring back: untracked, in no commit.
    write(&ws, "gen/only-here.txt", "not in git\n");
    d.set_env("SANDKEEP_REMOTE_LEASE", "2s");
    d.spawn_and_wait().await;
    let api = d.api();
    ok(&api.post("/v1/sync", &json!({})).await, 200);

    git(&ws, &["checkout", "-q", "main"]);
    std::fs::remove_file(ws.join("gen/only-here.txt")).unwrap();
    // Another file where branch `big` has one: git's copy is older, so no copy.
    write(&ws, "gen/f1.txt", "rewritten after the checkout\n");
    git(&stashed, &["stash", "push", "-q", "-u", "-m", "park"]);
    let answer = ok(&api.post("/v1/sync", &json!({})).await, 200);
    assert_eq!(answer["held_deletes"], 300, "{answer}");
    std::fs::remove_file(ws.join("gen/f1.txt")).unwrap();
    let answer = ok(&api.post("/v1/sync", &json!({})).await, 200);
    assert_eq!(answer["held_deletes"], 301, "{answer}");
    let before = git(&ws, &["status", "--porcelain", "--untracked-files=all"]);
    assert!(!before.contains("gen/"), "{before}");
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let ws = d.workspace.clone();
    assert!(!ws.join("gen/f0.txt").exists(), "log:\n{}", d.log());
    // As the stop left it, but for the files only the guard had.
    let now = git(&ws, &["status", "--porcelain", "--untracked-files=all"]);
    let now: Vec<&str> = now
        .lines()
        .filter(|l| !l.starts_with("?? stashed/"))
        .collect();
    assert_eq!(
        now,
        ["?? gen/f1.txt", "?? gen/only-here.txt"],
        "before: {before}"
    );
    assert_eq!(
        std::fs::read_to_string(ws.join("gen/f1.txt")).unwrap(),
        "rewritten after the checkout\n"
    );
    assert_eq!(git(&ws, &["branch", "--show-current"]).trim(), "main");
    // Git has no copy of this one: the guard's copy comes back.
    assert_eq!(
        std::fs::read_to_string(ws.join("gen/only-here.txt")).unwrap(),
        "not in git\n"
    );
    let stashed = ws.join("stashed");
    assert!(!stashed.join("out/o0.json").exists());
    git(&stashed, &["stash", "pop", "-q"]);
    assert_eq!(
        std::fs::read_to_string(stashed.join("out/o149.json")).unwrap(),
        "{\"n\": 149}\n"
    );
    assert!(
        d.log()
            .contains("held entries that git keeps exact copies of"),
        "log:\n{}",
        d.log()
    );
}

/// `workspace.bundle` is the root repository's object and also that of a subdirectory
/// named `workspace` when the root is no repository: the restore puts it back where
/// it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subdirectory_repository_named_workspace_comes_back_in_its_directory() {
    let mut d = Daemon::prepare(CONFIG);
    let ws = d.workspace.clone();
    let sub = ws.join("workspace");
    write(&ws, "top.txt", "top\n");
    write(&sub, "inner.txt", "inner\n");
    git(&sub, &["init", "-q"]);
    git(&sub, &["add", "-A"]);
    git(&sub, &["commit", "-q", "-m", "inner"]);
    write(&sub, "staged.txt", "staged\n");
    git(&sub, &["add", "staged.txt"]);
    let status_before = git(&sub, &["status", "--porcelain"]);
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    let target = d.root().join("restored");
    let out = d.restore_cli(&["--to", target.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    let s = out.json();
    assert_eq!(s["repos"], json!([{"repo": "workspace", "refs": 1}]), "{s}");
    assert!(!target.join(".git").exists());
    assert!(!target.join("inner.txt").exists());
    assert!(target.join("workspace/.git").is_dir());
    assert_eq!(
        git(&target.join("workspace"), &["status", "--porcelain"]),
        status_before
    );
    assert_eq!(
        git(&target.join("workspace"), &["rev-parse", "--show-toplevel"]).trim(),
        std::fs::canonicalize(target.join("workspace"))
            .unwrap()
            .to_str()
            .unwrap()
    );
}

/// Repositories below the first level (`projects/app`, one nested in another) are
/// bundled and come back with their commits, branch, staged and unstaged work; one in
/// an ignored directory is not looked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repositories_below_the_first_level_come_back() {
    let mut d = Daemon::prepare(CONFIG);
    let ws = d.workspace.clone();
    write(&ws, ".gitignore", "cache/\n");
    let repos = ["projects/app", "projects/app/vendor/lib"];
    for rel in repos {
        let repo = ws.join(rel);
        write(&repo, "committed.txt", "one\n");
        git(&repo, &["init", "-q", "-b", "trunk"]);
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "one"]);
        write(&repo, "committed.txt", "changed\n");
        write(&repo, "staged.txt", "staged\n");
        git(&repo, &["add", "staged.txt"]);
    }
    let before: Vec<String> = repos
        .iter()
        .map(|rel| git(&ws.join(rel), &["status", "--porcelain"]))
        .collect();
    write(&ws, "cache/clone/f.txt", "f\n");
    git(&ws.join("cache/clone"), &["init", "-q"]);
    let (bundled, target, s) = bundle_stop_and_restore(&mut d).await;
    assert_eq!(
        s["repos"],
        json!([
            {"repo": "projects/app", "refs": 1},
            {"repo": "projects/app/vendor/lib", "refs": 1}
        ]),
        "{s}; bundled: {bundled}"
    );
    for (rel, status) in repos.iter().zip(&before) {
        let repo = target.join(rel);
        assert_eq!(&git(&repo, &["status", "--porcelain"]), status, "{rel}");
        assert_eq!(
            git(&repo, &["branch", "--show-current"]),
            "trunk\n",
            "{rel}"
        );
        assert_eq!(
            std::fs::read_to_string(repo.join("committed.txt")).unwrap(),
            "changed\n"
        );
    }
    assert!(!target.join("cache").exists());
}

/// A linked worktree (`git worktree add`) of a repository of the workspace comes back
/// linked to it, also when its directory sorts before the repository's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_worktree_comes_back_linked() {
    let mut d = Daemon::prepare(CONFIG);
    let ws = d.workspace.clone();
    let main = ws.join("main");
    write(&main, "committed.txt", "one\n");
    git(&main, &["init", "-q", "-b", "trunk"]);
    git(&main, &["add", "-A"]);
    git(&main, &["commit", "-q", "-m", "one"]);
    git(&main, &["worktree", "add", "-q", "-b", "feat", "../a-wt"]);
    let wt = ws.join("a-wt");
    write(&wt, "committed.txt", "changed\n");
    write(&wt, "staged.txt", "staged\n");
    git(&wt, &["add", "staged.txt"]);
    let status = git(&wt, &["status", "--porcelain"]);
    let (bundled, target, s) = bundle_stop_and_restore(&mut d).await;
    let restored: Vec<&str> = s["repos"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["repo"].as_str())
        .collect();
    assert_eq!(restored, ["main", "a-wt"], "{s}; bundled: {bundled}");
    let (main, wt) = (target.join("main"), target.join("a-wt"));
    assert!(wt.join(".git").is_file());
    assert_eq!(
        git(&wt, &["rev-parse", "--git-common-dir"]),
        format!("{}\n", main.join(".git").display())
    );
    let list = git(&main, &["worktree", "list", "--porcelain"]);
    assert!(
        list.contains(&format!("worktree {}\n", wt.display())),
        "{list}"
    );
    assert_eq!(git(&wt, &["status", "--porcelain"]), status);
    assert_eq!(git(&wt, &["branch", "--show-current"]), "feat\n");
    assert_eq!(git(&main, &["status", "--porcelain"]), "");
    assert_eq!(
        std::fs::read_to_string(wt.join("committed.txt")).unwrap(),
        "changed\n"
    );
}

/// `--force` removes what the restored tree would mirror and the remote lacks, judged
/// by the ignore files being restored, not by those the target had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_judges_what_to_remove_by_the_restored_ignore_files() {
    let mut d = Daemon::prepare(CONFIG);
    let ws = d.workspace.clone();
    write(&ws, ".gitignore", "dist/\n");
    write(&ws, "sub/.gitignore", "*.cache\n");
    write(&ws, "a.txt", "a\n");
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    let target = d.root().join("target");
    // The target ignores `build/` (the remote does not) and nothing else.
    write(&target, ".gitignore", "build/\n");
    write(
        &target,
        "build/out.bin",
        "not in the remote, mirrored once restored",
    );
    write(&target, "dist/bundle.js", "ignored by the restored rules");
    write(&target, "sub/x.cache", "ignored by the restored rules");
    write(&target, "sub/x.txt", "not in the remote");
    // An ignore file only the target has goes, and so does what only it ignored.
    write(&target, "sub/.sandkeepignore", "y.txt\n");
    write(&target, "sub/y.txt", "ignored by nothing once restored");
    let out = d.restore_cli(&["--to", target.to_str().unwrap(), "--force"], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["removed"], 4, "{out:?}");
    assert!(!target.join("build/out.bin").exists());
    assert!(!target.join("sub/x.txt").exists());
    assert!(!target.join("sub/.sandkeepignore").exists());
    assert!(!target.join("sub/y.txt").exists());
    assert!(target.join("dist/bundle.js").exists());
    assert!(target.join("sub/x.cache").exists());
    assert_eq!(
        std::fs::read_to_string(target.join(".gitignore")).unwrap(),
        "dist/\n"
    );
    assert_eq!(
        std::fs::read_to_string(target.join("a.txt")).unwrap(),
        "a\n"
    );
}

/// A bundle that cannot be unpacked (truncated) is reported; no empty or half-made
/// `.git` is left behind, so the new daemon has no repository to bundle over the
/// remote copy, which stays as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_that_cannot_be_unpacked_leaves_no_repository_and_is_kept() {
    let mut d = synced_workspace(None, true).await;
    let bundle = d.remote.join(CONV).join("workspace/git/workspace.bundle");
    let whole = std::fs::read(&bundle).unwrap();
    let cut = whole[..whole.len() / 2].to_vec();
    std::fs::write(&bundle, &cut).unwrap();

    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let status = ok(&d.api().get("/v1/status").await, 200);
    let bad = &status["restore"]["workspace"]["bad"];
    assert!(
        bad.as_array().unwrap().iter().any(|b| b["path"] == ".git"),
        "{status}"
    );
    assert!(!d.workspace.join(".git").exists());
    assert!(
        d.workspace.join("a.txt").exists(),
        "the mirror's files came back"
    );
    ok(&d.api().post("/v1/git/bundle", &json!({})).await, 200);
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(
        std::fs::read(&bundle).unwrap(),
        cut,
        "the remote bundle was replaced"
    );
}

/// A `sandkeep restore` that fails leaves a marker in its target: the next run resumes
/// there (the target is not empty, but what is in it is its own), and so does a daemon
/// started on it with `restore = auto`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_offline_restore_is_resumed_by_the_next_run_and_by_a_daemon() {
    let mut d = synced_workspace(None, true).await;
    let original = tree(&d.workspace, &not_git);
    let snapshots = d.remote.join(CONV).join("workspace/compressed");
    let archive = std::fs::read_dir(&snapshots)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".tar.gz"))
        .unwrap();
    let whole = std::fs::read(&archive).unwrap();
    std::fs::write(&archive, &whole[..whole.len() * 9 / 10]).unwrap();
    let marker = sandkeep::restore::INCOMPLETE_MARKER;
    let from_snapshot = ["--snapshot", "latest"];

    // Fails part way: the marker stays beside what it wrote.
    let target = d.root().join("target");
    let args = |to: &Path| {
        let mut a = vec!["--to".to_string(), to.to_str().unwrap().to_string()];
        a.extend(from_snapshot.iter().map(|s| s.to_string()));
        a
    };
    let run = |d: &Daemon, to: &Path| {
        let a = args(to);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        d.restore_cli(&a, &[])
    };
    let out = run(&d, &target);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(target.join(marker).is_file());
    let written = std::fs::read_dir(&target).unwrap().count();
    assert!(
        written > 1,
        "the failed restore wrote nothing besides its marker"
    );

    // A restore from elsewhere (another conversation) does not take it for its own.
    let a = args(&target);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = d.restore_cli(&a, &[("SANDKEEP_IDENTITY_CONVERSATION", "other")]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("not empty"), "{out:?}");

    // The next run resumes (no "not empty") and finishes; the marker goes.
    std::fs::write(&archive, &whole).unwrap();
    let out = run(&d, &target);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!target.join(marker).exists());
    assert_eq!(tree(&target, &not_git), original);

    // A daemon resumes what an init container's restore left.
    std::fs::write(&archive, &whole[..whole.len() * 9 / 10]).unwrap();
    d.become_new_sandbox();
    let ws = d.workspace.clone();
    assert_eq!(run(&d, &ws).code, 1);
    assert!(ws.join(marker).is_file());
    d.spawn_and_wait().await;
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert!(
        status["restore"]["workspace"].is_object(),
        "not restored: {status}"
    );
    assert!(!ws.join(marker).exists());
    assert_eq!(tree(&ws, &not_git), original);
}

/// A remote manifest that cannot be read: a new sandbox restores the latest snapshot
/// instead, and the manifest is kept aside before the first round replaces it (the
/// objects it named stay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_manifest_is_kept_aside_and_the_latest_snapshot_restored() {
    let mut d = synced_workspace(None, false).await;
    let original = tree(&d.workspace, &not_git);
    let manifest = d.remote.join(CONV).join("workspace/manifest.json");
    let garbage = b"{\"format\": 1, \"files\": tru".to_vec();
    std::fs::write(&manifest, &garbage).unwrap();

    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert!(
        status["restore"]["workspace"]["snapshot"].is_string(),
        "{status}"
    );
    // As a snapshot keeps them: times to the second.
    let mut restored = tree(&d.workspace, &not_git);
    let mut want = original.clone();
    for t in [&mut restored, &mut want] {
        for e in t.values_mut() {
            if let Entry::File { mtime, .. } = e {
                *mtime = 0;
            }
        }
    }
    assert_eq!(restored, want);
    write(&d.workspace, "new.txt", "new\n");
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    let kept: Vec<PathBuf> = std::fs::read_dir(manifest.parent().unwrap())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("manifest.json.unreadable-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(std::fs::read(&kept[0]).unwrap(), garbage);
    assert!(
        std::fs::read_to_string(&manifest)
            .unwrap()
            .contains("new.txt")
    );
    assert!(
        remote_file(&d, "a.txt").exists(),
        "an object the old manifest named"
    );
}

/// A remote manifest that cannot be read and no snapshot: the files come back from
/// their objects alone (contents, the restore's time, the mode a bundle checked out or
/// else 0644; the empty directory the manifest named is lost, the symlink comes back
/// with the bundle's work tree) with the repository from its bundle, and the first
/// round publishes a manifest of them. `sandkeep restore` names `--objects`, which does
/// the same offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_manifest_without_a_snapshot_restores_the_objects() {
    let mut d = synced_workspace(None, true).await;
    write(&d.workspace, "plain.sh", "#!/bin/sh\n");
    chmod(&d.workspace.join("plain.sh"), 0o755);
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    let original = tree(&d.workspace, &not_git);
    let original_git = git_state(&d.workspace);
    let conv = d.remote.join(CONV);
    std::fs::write(
        conv.join("workspace/manifest.json"),
        b"{\"format\": 1, \"fi",
    )
    .unwrap();
    std::fs::remove_dir_all(conv.join("workspace/compressed")).unwrap();
    // Every file's content; the executables get their modes from the bundle's work
    // tree (untracked files included; as git keeps them: 0755), the rest 0644; the
    // empty directory is gone.
    let files = |root: &Path| -> Vec<(String, String, u32)> {
        tree(root, &not_git)
            .into_iter()
            .filter_map(|(rel, e)| match e {
                Entry::File { data, mode, .. } => {
                    Some((rel, blake3::hash(&data).to_hex().to_string(), mode & 0o777))
                }
                _ => None,
            })
            .collect()
    };
    let mut want = files(&d.workspace);
    for (_, _, mode) in &mut want {
        if *mode == 0o750 {
            *mode = 0o755;
        }
    }
    let check = |root: &Path| {
        assert_eq!(files(root), want);
        assert!(!root.join("empty").exists());
        assert_eq!(git_state(root), original_git);
        // The uncommitted symlink came back with the bundle's work tree.
        assert_eq!(
            original.get("link"),
            tree(root, &not_git).get("link"),
            "the bundle's symlink"
        );
    };

    let target = d.root().join("offline");
    let out = d.restore_cli(&["--to", target.to_str().unwrap()], &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("`--objects`"), "{out:?}");
    let out = d.restore_cli(&["--to", target.to_str().unwrap(), "--objects"], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    let s = out.json();
    assert_eq!(s["objects_only"], true, "{s}");
    assert_eq!(s["bad"], json!([]), "{s}");
    check(&target);
    // With --force over a workspace of its own: files the objects name are replaced,
    // nothing else is removed (the remote no longer says what else it had).
    let busy = d.root().join("busy");
    write(&busy, "a.txt", "stale\n");
    write(&busy, "mine.txt", "mine\n");
    std::os::unix::fs::symlink("mine.txt", busy.join("my-link")).unwrap();
    let out = d.restore_cli(
        &["--to", busy.to_str().unwrap(), "--objects", "--force"],
        &[],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["removed"], 0, "{out:?}");
    assert_eq!(
        std::fs::read_to_string(busy.join("a.txt")).unwrap(),
        "alpha, edited\n"
    );
    assert_eq!(
        std::fs::read_to_string(busy.join("mine.txt")).unwrap(),
        "mine\n"
    );
    assert_eq!(
        std::fs::read_link(busy.join("my-link")).unwrap(),
        Path::new("mine.txt")
    );
    let nothing = d.root().join("nothing");
    let out = d.restore_cli(
        &["--to", nothing.to_str().unwrap(), "--objects"],
        &[("SANDKEEP_IDENTITY_CONVERSATION", "other")],
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["restored"], false, "{out:?}");

    // A new sandbox does the same by itself, and its first round publishes what came back.
    d.become_new_sandbox();
    d.spawn_and_wait().await;
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert_eq!(
        status["restore"]["workspace"]["objects_only"], true,
        "{status}"
    );
    check(&d.workspace);
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(conv.join("workspace/manifest.json")).unwrap())
            .unwrap();
    for (rel, _, _) in &want {
        assert!(manifest["files"][rel].is_object(), "{rel}: {manifest}");
    }
}

/// A bundle whose description (`.json`) is missing (its first upload cut short
/// between the two) cannot be placed: the restore says so among the entries not
/// restored instead of skipping it without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_without_its_description_is_reported() {
    let d = synced_workspace(None, true).await;
    let git_dir = d.remote.join(CONV).join("workspace/git");
    let jsons: Vec<PathBuf> = std::fs::read_dir(&git_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(jsons.len(), 1, "{jsons:?}");
    std::fs::remove_file(&jsons[0]).unwrap();

    let target = d.root().join("offline");
    let out = d.restore_cli(&["--to", target.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("entry not restored"), "{out:?}");
    let s = out.json();
    assert_eq!(s["bad"].as_array().map(Vec::len), Some(1), "{s}");
    assert_eq!(s["bad"][0]["path"], ".git", "{s}");
    let error = s["bad"][0]["error"].as_str().unwrap();
    assert!(error.contains("no description"), "{error}");
    // The files are restored all the same.
    assert_eq!(
        std::fs::read_to_string(target.join("a.txt")).unwrap(),
        "alpha, edited\n"
    );
    assert!(!target.join(".git").exists());
}

/// An object replaced since the manifest by one far larger than the manifest's entry
/// says (over the size read into memory) is streamed to disk, not read whole into
/// memory on the strength of the manifest's size, and restored with its content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_larger_than_its_manifest_entry_is_streamed() {
    let d = synced_workspace(None, false).await;
    std::thread::sleep(Duration::from_millis(20));
    let big = crate::util::pattern(6 << 20, 11);
    std::fs::write(remote_file(&d, "a.txt"), &big).unwrap();

    let target = restore_with_a_newer(&d);
    assert!(std::fs::read(target.join("a.txt")).unwrap() == big);
}

/// `sandkeep restore --to <root>/offline`, which must restore everything, `a.txt` with
/// an object newer than the manifest: where it restored to.
fn restore_with_a_newer(d: &Daemon) -> PathBuf {
    let target = d.root().join("offline");
    let out = d.restore_cli(&["--to", target.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    let s = out.json();
    assert_eq!(s["bad"], json!([]), "{s}");
    assert_eq!(s["newer"], json!(["a.txt"]), "{s}");
    target
}

/// A round that uploaded a file and was cut short before it published its manifest
/// (SIGKILL, or a final sync past its deadline) leaves an object newer than the
/// manifest's entry: it is restored with its content (the newer state of the file),
/// not reported as damaged, and the next round publishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_newer_than_the_manifest_is_restored_with_its_content() {
    let mut d = synced_workspace(None, false).await;
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(
        remote_file(&d, "a.txt"),
        "written by a round never published\n",
    )
    .unwrap();

    let target = restore_with_a_newer(&d);
    assert_eq!(
        std::fs::read_to_string(target.join("a.txt")).unwrap(),
        "written by a round never published\n"
    );

    // A new sandbox restores it the same way, and its first round publishes it.
    d.become_new_sandbox();
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    let again = d.root().join("again");
    let out = d.restore_cli(&["--to", again.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    let s = out.json();
    assert!(s.get("newer").is_none(), "{s}");
    assert_eq!(
        std::fs::read_to_string(again.join("a.txt")).unwrap(),
        "written by a round never published\n"
    );
}

/// Set-uid and set-gid bits never come back, from the mirror or from a snapshot: the
/// restoring user (root in many sidecars) owns what it restores, so a sandbox process
/// that made its copy of a shell set-uid would get a set-uid shell of that user. A
/// directory's sticky bit stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_id_bits_are_not_restored() {
    use std::os::unix::fs::PermissionsExt;
    let mut d = Daemon::prepare(CONFIG);
    let ws = d.workspace.clone();
    write(&ws, "agent/sh", "#!/bin/sh\n");
    chmod(&ws.join("agent/sh"), 0o4755);
    write(&ws, "agent/g", "x");
    chmod(&ws.join("agent/g"), 0o2750);
    write(&ws, "shared/f", "x");
    chmod(&ws.join("shared"), 0o3777);
    d.spawn_and_wait().await;
    ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    ok(&d.api().post("/v1/snapshots", &json!({})).await, 201);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    for (name, extra) in [("mirror", None), ("snapshot", Some("latest"))] {
        let target = d.root().join(name);
        let mut args = vec!["--to", target.to_str().unwrap()];
        if let Some(s) = extra {
            args.extend(["--snapshot", s]);
        }
        let out = d.restore_cli(&args, &[]);
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(mode(target.join("agent/sh")), 0o755, "{name}");
        assert_eq!(mode(target.join("agent/g")), 0o750, "{name}");
        assert_eq!(mode(target.join("shared")) & 0o6000, 0, "{name}");
        if extra.is_some() {
            assert_eq!(mode(target.join("shared")), 0o1777, "{name}");
        }
    }
}
