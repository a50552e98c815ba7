//! Snapshots through the daemon and the socket, on both backends (a `dir` remote and
//! the embedded S3 server): the archive extracted with GNU `tar -xzf` equals the
//! workspace minus the excludes, `.git/` included (bytes, modes, mtimes, symlink
//! targets, empty directories); retention keeps exactly `snapshot.keep`; listing is
//! newest first; the CLI, status and metrics; the periodic snapshot only after a
//! change; and the daemon's peak memory stays bounded while it snapshots a workspace
//! of incompressible files larger than that bound.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use sandkeep::remote::{self, Remote};
use serde_json::Value;

use crate::s3_server::S3Server;
use crate::util::fs::{Entry, git, tree, write};
use crate::util::{Daemon, ok};

const SNAP_PREFIX: &str = "conversations/u1/c1/workspace/compressed/";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Dir,
    S3,
}

struct Env {
    daemon: Daemon,
    remote: Arc<dyn Remote>,
    _server: Option<S3Server>,
}

impl Env {
    /// A daemon on `backend` with `extra` TOML, not started.
    async fn prepare(backend: Backend, extra: &str) -> Env {
        let daemon = Daemon::prepare(extra);
        let (remote, server): (Arc<dyn Remote>, Option<S3Server>) = match backend {
            Backend::Dir => (
                Arc::new(remote::dir::DirRemote::new(&daemon.remote).unwrap()),
                None,
            ),
            Backend::S3 => {
                let server = S3Server::start().await;
                server.configure(&daemon);
                let r = server.client().await;
                (Arc::new(r), Some(server))
            }
        };
        Env {
            daemon,
            remote,
            _server: server,
        }
    }

    async fn snapshot(&self) -> Value {
        let r = self
            .daemon
            .api()
            .request_within(
                Duration::from_secs(300),
                hyper::Method::POST,
                "/v1/snapshots",
                None,
            )
            .await;
        ok(&r, 201)
    }

    async fn list(&self) -> Vec<Value> {
        let r = self.daemon.api().get("/v1/snapshots").await;
        ok(&r, 200)["snapshots"].as_array().unwrap().clone()
    }

    async fn stored_keys(&self) -> Vec<String> {
        remote::list_all(self.remote.as_ref(), SNAP_PREFIX)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect()
    }

    /// Downloads `key` and extracts it with GNU tar into a new directory.
    async fn extract(&self, key: &str, into: &Path) -> PathBuf {
        let archive = into.join("snapshot.tar.gz");
        self.remote.get_to_file(key, &archive).await.unwrap();
        let out = into.join("extracted");
        std::fs::create_dir_all(&out).unwrap();
        let st = Command::new("tar")
            .arg("-xzf")
            .arg(&archive)
            .arg("-C")
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success(), "GNU tar could not extract the snapshot");
        out
    }
}

/// A workspace with every kind of entry, some excluded by each rule.
fn fill_workspace(ws: &Path) {
    write(ws, "README.md", b"# project\n");
    write(ws, "src/main.rs", b"fn main() {}\n");
    write(ws, "src/deep/er/mod.rs", vec![b'x'; 300_000]);
    write(ws, "bin/run.sh", b"#!/bin/sh\n");
    std::fs::set_permissions(
        ws.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    write(ws, "private.key", b"secret");
    std::fs::set_permissions(
        ws.join("private.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    write(ws, "empty.txt", b"");
    std::fs::create_dir_all(ws.join("empty/nested")).unwrap();
    std::fs::create_dir_all(ws.join("shared")).unwrap();
    std::fs::set_permissions(ws.join("shared"), std::fs::Permissions::from_mode(0o750)).unwrap();
    symlink("src/main.rs", ws.join("link-to-main")).unwrap();
    symlink("../nowhere", ws.join("src/dangling")).unwrap();
    // A FIFO is skipped (never opened: that would block).
    let st = Command::new("mkfifo")
        .arg(ws.join("src/pipe"))
        .status()
        .unwrap();
    assert!(st.success());
    let long = format!("{}/{}.txt", "d".repeat(120), "n".repeat(150));
    write(ws, &long, b"a long path");
    // Times before 1970 (octal tar headers have no sign).
    for (name, before_epoch) in [("old/1960.txt", 315_532_800), ("old/just-before.txt", 2)] {
        write(ws, name, b"old");
        let t = std::time::UNIX_EPOCH - std::time::Duration::from_secs(before_epoch);
        let f = std::fs::File::options()
            .write(true)
            .open(ws.join(name))
            .unwrap();
        f.set_modified(t).unwrap();
    }
    // Excluded: ignore files, sync.exclude, snapshot.exclude.
    write(ws, ".gitignore", b"*.log\ntarget/\n");
    write(ws, "debug.log", b"ignored");
    write(ws, "target/out.bin", b"ignored");
    write(ws, "node_modules/pkg/index.js", b"excluded");
    write(ws, "src/__pycache__/m.pyc", b"excluded");
    write(ws, "cache/blob", b"excluded by snapshot.exclude");
    write(ws, "notes.swp", b"excluded by sync.exclude");
    // A real repository: its .git/ is in the snapshot.
    git(ws, &["init", "-q"]);
    git(ws, &["add", "README.md", "src/main.rs"]);
    git(ws, &["commit", "-q", "-m", "init"]);
}

fn excluded(rel: &str) -> bool {
    let first = rel.split('/').next().unwrap_or("");
    rel.ends_with(".log")
        || rel.ends_with(".swp")
        || ["target", "node_modules", "cache"].contains(&first)
        || rel.split('/').any(|s| s == "__pycache__")
}

const SNAPSHOT_CONFIG: &str = "[snapshot]\ninterval = \"0s\"\nkeep = 2\nexclude = [\"node_modules/\", \"__pycache__/\", \"cache/\"]\n[git]\ninterval = \"0s\"\n";

async fn snapshot_matches_workspace_and_keeps_the_newest(backend: Backend) {
    let mut env = Env::prepare(backend, SNAPSHOT_CONFIG).await;
    let ws = env.daemon.workspace.clone();
    fill_workspace(&ws);
    env.daemon.spawn_and_wait().await;

    let taken = env.snapshot().await;
    let key = taken["key"].as_str().unwrap().to_string();
    let name = key.strip_prefix(SNAP_PREFIX).unwrap();
    assert!(
        sandkeep::snapshot::parse_backup_name(name).is_some(),
        "{name} is not backup-<YYYYMMDDTHHMMSSmmm>Z.tar.gz"
    );
    let expected_files = tree(&ws, &excluded)
        .values()
        .filter(|e| matches!(e, Entry::File { .. }))
        .count();
    assert_eq!(taken["files"], expected_files as u64, "{taken}");
    let info = env.remote.head(&key).await.unwrap().unwrap();
    assert_eq!(taken["bytes"], info.size, "{taken}");
    assert!(taken["duration_ms"].is_u64());

    let scratch = tempfile::tempdir().unwrap();
    let out = env.extract(&key, scratch.path()).await;
    let want = tree(&ws, &excluded);
    let got = tree(&out, &|_| false);
    assert!(want.contains_key(".git/HEAD") && want.contains_key("empty/nested"));
    assert!(want.contains_key(".gitignore"));
    for (path, entry) in &want {
        assert_eq!(got.get(path), Some(entry), "{path} differs");
    }
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    assert!(
        extra.is_empty(),
        "not in the workspace or excluded: {extra:?}"
    );
    // `sandkeep restore --snapshot` reads the times back as GNU tar does.
    let restored = scratch.path().join("restored");
    let out = env.daemon.restore_cli(
        &["--to", restored.to_str().unwrap(), "--snapshot", "latest"],
        &[],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let got = tree(&restored, &|_| false);
    for path in ["old/1960.txt", "old/just-before.txt", "src/main.rs"] {
        assert_eq!(got.get(path), want.get(path), "{path} differs");
    }

    // Retention: after three more, exactly the newest two remain, listed newest first.
    let mut keys = vec![key];
    for _ in 0..3 {
        keys.push(env.snapshot().await["key"].as_str().unwrap().to_string());
    }
    let listed = env.list().await;
    let listed_keys: Vec<&str> = listed.iter().map(|s| s["key"].as_str().unwrap()).collect();
    assert_eq!(listed_keys, vec![keys[3].as_str(), keys[2].as_str()]);
    let t0 = crate::util::rfc3339_ms(listed[0]["created_at"].as_str().unwrap());
    let t1 = crate::util::rfc3339_ms(listed[1]["created_at"].as_str().unwrap());
    assert!(t0 > t1, "newest first");
    assert!(listed[0]["bytes"].as_u64().unwrap() > 0);
    let mut stored = env.stored_keys().await;
    stored.sort();
    assert_eq!(stored, vec![keys[2].clone(), keys[3].clone()]);

    // The CLI, the status and the metrics.
    let out = env.daemon.cli().run(&["snapshot"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let cli_key = out.json()["key"].as_str().unwrap().to_string();
    assert!(cli_key.starts_with(SNAP_PREFIX), "{out:?}");
    let out = env.daemon.cli().run(&["snapshot", "--list"]).await;
    assert_eq!(out.json()["snapshots"][0]["key"], cli_key.as_str());
    let status = ok(&env.daemon.api().get("/v1/status").await, 200);
    assert_eq!(status["snapshots"]["count"], 2, "{status}");
    assert_eq!(status["snapshots"]["last"]["key"], cli_key.as_str());
    let metrics = env.daemon.api().get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("sandkeep_snapshot_duration_seconds_count 5"),
        "{text}"
    );
    assert!(text.contains("sandkeep_snapshot_bytes "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_snapshot_matches_workspace_and_keeps_the_newest() {
    snapshot_matches_workspace_and_keeps_the_newest(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_snapshot_matches_workspace_and_keeps_the_newest() {
    snapshot_matches_workspace_and_keeps_the_newest(Backend::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_snapshots_only_after_a_change() {
    let mut env = Env::prepare(
        Backend::Dir,
        "[snapshot]\ninterval = \"1s\"\nkeep = 10\n[git]\ninterval = \"0s\"\n",
    )
    .await;
    write(&env.daemon.workspace, "a.txt", b"1");
    env.daemon.spawn_and_wait().await;
    let first =
        crate::util::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
            let env = &env;
            async move {
                let keys = env.stored_keys().await;
                (!keys.is_empty()).then_some(keys)
            }
        })
        .await
        .expect("a periodic snapshot");
    assert_eq!(first.len(), 1);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(env.stored_keys().await, first, "no change, no snapshot");
    write(&env.daemon.workspace, "a.txt", b"22");
    crate::util::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let env = &env;
        async move { (env.stored_keys().await.len() == 2).then_some(()) }
    })
    .await
    .expect("a snapshot after the change");
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

/// 300 MB of incompressible files through a daemon whose peak memory must stay under
/// 150 MB: the archive is streamed, never held.
async fn memory_stays_bounded(backend: Backend) {
    const FILES: usize = 30;
    const FILE_BYTES: u64 = 10 << 20;
    const LIMIT: u64 = 150 << 20;
    // In `.git/`, which the mirror never carries file by file and snapshots keep
    // whatever their size (a pack file is the repository): only the snapshot reads
    // them. (No bundle is made: git.interval is 0 and nothing asks for one.)
    let mut env = Env::prepare(
        backend,
        "[sync]\nmax_file_bytes = 1048576\n[snapshot]\ninterval = \"0s\"\n[git]\ninterval = \"0s\"\n",
    )
    .await;
    let ws = env.daemon.workspace.join(".git/objects/pack");
    std::fs::create_dir_all(&ws).unwrap();
    for i in 0..FILES {
        let mut src = std::fs::File::open("/dev/urandom").unwrap();
        let mut dst = std::fs::File::create(ws.join(format!("blob-{i:02}.pack"))).unwrap();
        std::io::copy(&mut std::io::Read::take(&mut src, FILE_BYTES), &mut dst).unwrap();
    }
    env.daemon.spawn_and_wait().await;
    let taken = env.snapshot().await;
    let total = FILES as u64 * FILE_BYTES;
    let bytes = taken["bytes"].as_u64().unwrap();
    assert!(bytes > total, "incompressible: {bytes} bytes for {total}");
    assert_eq!(taken["files"], FILES as u64);
    let peak = peak_rss(env.daemon.pid());
    eprintln!(
        "{backend:?}: {} MiB snapshot in {} ms, daemon peak RSS {} MiB",
        bytes >> 20,
        taken["duration_ms"],
        peak >> 20
    );
    assert!(
        peak < LIMIT,
        "the daemon's peak RSS was {} MiB for a {} MiB snapshot (limit {} MiB)",
        peak >> 20,
        total >> 20,
        LIMIT >> 20
    );
    // The stored archive is whole: GNU tar lists every file with its size.
    let scratch = tempfile::tempdir().unwrap();
    let archive = scratch.path().join("s.tar.gz");
    env.remote
        .get_to_file(taken["key"].as_str().unwrap(), &archive)
        .await
        .unwrap();
    let listing = Command::new("tar")
        .arg("-tvzf")
        .arg(&archive)
        .output()
        .unwrap();
    assert!(listing.status.success());
    let text = String::from_utf8_lossy(&listing.stdout);
    let sized = text
        .lines()
        .filter(|l| l.contains(&FILE_BYTES.to_string()))
        .count();
    assert_eq!(sized, FILES, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dir_snapshot_memory_stays_bounded() {
    memory_stays_bounded(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_snapshot_memory_stays_bounded() {
    memory_stays_bounded(Backend::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_routes_need_admin_and_report_a_missing_workspace() {
    let mut d = Daemon::prepare(&format!(
        "[auth]\nmode = \"token\"\nsecret = \"{}\"\nmax_ttl = \"1h\"\n[snapshot]\ninterval = \"0s\"\n[git]\ninterval = \"0s\"\n",
        crate::util::SECRET
    ));
    d.spawn_and_wait().await;
    let mint = |scopes: &[&str]| {
        let mut args = vec!["token", "mint", "--ns", "default"];
        for s in scopes {
            args.push("--scope");
            args.push(s);
        }
        let out = crate::util::sandkeep_command()
            .args(["--config", d.config_path.to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let user = d.api_with_token(&mint(&["kv:read", "kv:write"]));
    for (method, path) in [
        (hyper::Method::POST, "/v1/snapshots"),
        (hyper::Method::GET, "/v1/snapshots"),
        (hyper::Method::POST, "/v1/git/bundle"),
    ] {
        let r = user
            .request_within(Duration::from_secs(30), method.clone(), path, None)
            .await;
        crate::util::assert_error(&r, 403, "forbidden");
        let r = d
            .api()
            .request_within(Duration::from_secs(30), method, path, None)
            .await;
        crate::util::assert_error(&r, 401, "unauthorized");
    }
    let admin = d.api_with_token(&mint(&["admin"]));
    let r = admin.post_empty("/v1/snapshots").await;
    ok(&r, 201);
    assert_eq!(
        ok(&admin.get("/v1/snapshots").await, 200)["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let r = admin.post_empty("/v1/git/bundle").await;
    assert_eq!(ok(&r, 200)["bundles"], serde_json::json!([]));
    // Without a workspace there is nothing to snapshot: 409, nothing stored.
    std::fs::remove_dir_all(&d.workspace).unwrap();
    let r = admin.post_empty("/v1/snapshots").await;
    crate::util::assert_error(&r, 409, "workspace_unavailable");
    assert_eq!(
        ok(&admin.get("/v1/snapshots").await, 200)["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

/// A periodic snapshot in flight when the daemon is told to stop is given up as the
/// final sync starts: it neither competes with the final sync nor keeps remote writes
/// going past it, which would leave the conversation unreleased (the next daemon then
/// waits a whole lease).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_periodic_snapshot_in_flight_stops_when_the_final_sync_starts() {
    let mut d = Daemon::prepare(
        "[snapshot]\ninterval = \"1s\"\n[git]\ninterval = \"0s\"\n[shutdown]\ndeadline = \"30s\"\n",
    );
    // Incompressible: its snapshot takes seconds.
    let mut random = std::fs::File::open("/dev/urandom").unwrap();
    let mut big = std::fs::File::create(d.workspace.join("big.bin")).unwrap();
    std::io::copy(&mut std::io::Read::take(&mut random, 96 << 20), &mut big).unwrap();
    drop(big);
    d.spawn_and_wait().await;
    let api = d.api();
    ok(
        &api.post("/v1/sync", &serde_json::json!({"timeout_s": 120}))
            .await,
        200,
    );
    // The first snapshot (begun while the mirror uploaded) is stored; then a change
    // for the next one, mirrored at once.
    let stored =
        crate::util::poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
            let log = d.log();
            async move { log.contains("snapshot stored").then_some(()) }
        })
        .await;
    assert!(stored.is_some(), "no snapshot stored; log:\n{}", d.log());
    std::fs::write(d.workspace.join("x.txt"), "x").unwrap();
    ok(
        &api.post("/v1/sync", &serde_json::json!({"timeout_s": 60}))
            .await,
        200,
    );
    // The next snapshot early on its way (the only remote write under way now).
    let tmp = d.remote.join(".sandkeep-tmp");
    let in_flight =
        crate::util::poll_until(Duration::from_secs(30), Duration::from_millis(10), || {
            let tmp = tmp.clone();
            async move {
                let early = std::fs::read_dir(&tmp)
                    .ok()?
                    .flatten()
                    .any(|e| e.metadata().is_ok_and(|m| m.len() < 24 << 20));
                early.then_some(())
            }
        })
        .await;
    assert!(
        in_flight.is_some(),
        "no snapshot started; log:\n{}",
        d.log()
    );
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    let log = d.log();
    assert!(
        log.contains("periodic snapshot interrupted by shutdown"),
        "log:\n{log}"
    );
    assert!(
        !log.contains("remote writes are still under way"),
        "log:\n{log}"
    );
}
