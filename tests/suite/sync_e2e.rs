//! The workspace mirror end to end, on both backends (a `dir` remote and the embedded
//! S3-compatible server over TCP): what is uploaded and what is not, deletes, renames,
//! bursts, storms, outages, crashes in the middle of a round, the delete guards and the
//! startup reconcile. The remote is inspected through sandkeep's own `Remote` trait
//! and, for file contents, compared byte for byte with the workspace.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sandkeep::remote::{self, Remote};
use serde_json::{Value, json};

use crate::s3_server::S3Server;
use crate::util::{Daemon, ok, pattern};

const PREFIX: &str = "conversations/u1/c1/";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Dir,
    S3,
}

/// A daemon plus a view of its remote (and the S3 server, when there is one).
struct Env {
    daemon: Daemon,
    remote: Arc<dyn Remote>,
    server: Option<S3Server>,
}

impl Env {
    /// Prepares a daemon on `backend` with `extra` TOML (e.g. `[sync]` settings) and
    /// starts it unless `start` is false.
    async fn new(backend: Backend, extra: &str, start: bool) -> Env {
        let mut daemon = Daemon::prepare(extra);
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
        if start {
            daemon.spawn_and_wait().await;
        }
        Env {
            daemon,
            remote,
            server,
        }
    }

    fn ws(&self) -> &Path {
        &self.daemon.workspace
    }

    fn write(&self, rel: &str, data: &[u8]) {
        let p = self.ws().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    async fn sync(&self) -> Value {
        let r = self
            .daemon
            .client()
            .post_json("/v1/sync", &json!({"timeout_s": 60}))
            .await
            .unwrap();
        ok(&r, 200)
    }

    async fn manifest(&self) -> Option<Value> {
        let b = self
            .remote
            .get_bytes(&format!("{PREFIX}workspace/manifest.json"))
            .await
            .unwrap()?;
        Some(serde_json::from_slice(&b).unwrap())
    }

    /// Keys under `workspace/files/`, relative.
    async fn objects(&self) -> Vec<String> {
        let base = format!("{PREFIX}workspace/files/");
        remote::list_all(self.remote.as_ref(), &base)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key[base.len()..].to_string())
            .collect()
    }

    async fn object(&self, rel: &str) -> Option<Vec<u8>> {
        self.remote
            .get_bytes(&format!("{PREFIX}workspace/files/{rel}"))
            .await
            .unwrap()
            .map(|b| b.to_vec())
    }

    /// Every file the manifest names exists as an object of the recorded size.
    async fn assert_manifest_consistent(&self) {
        let Some(m) = self.manifest().await else {
            return;
        };
        for path in m["files"].as_object().unwrap().keys() {
            let head = self
                .remote
                .head(&format!("{PREFIX}workspace/files/{path}"))
                .await
                .unwrap();
            assert!(
                head.is_some(),
                "manifest generation {} names {path}, which has no object",
                m["generation"]
            );
        }
        let _ = entry_sizes(&m);
    }

    async fn status(&self) -> Value {
        ok(&self.daemon.client().get("/v1/status").await.unwrap(), 200)
    }

    async fn metric(&self, name: &str) -> f64 {
        let r = self.daemon.client().get("/metrics").await.unwrap();
        let text = String::from_utf8_lossy(&r.body).to_string();
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

fn entry_sizes(m: &Value) -> BTreeMap<String, u64> {
    m["files"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["size"].as_u64().unwrap()))
        .collect()
}

/// Polls `check` every 100 ms until it is true or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const FAST: &str = "[sync]\ndebounce_min = \"300ms\"\ndebounce_max = \"3s\"\n";

async fn mirror_basics(backend: Backend) {
    let env = Env::new(backend, FAST, false).await;
    env.write("a.txt", b"alpha");
    env.write("src/deep/nested/lib.rs", b"fn main() {}");
    env.write("empty.txt", b"");
    env.write("bin/run.sh", b"#!/bin/sh\necho hi\n");
    std::fs::set_permissions(
        env.ws().join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("a.txt", env.ws().join("link")).unwrap();
    std::fs::create_dir_all(env.ws().join("empty_dir")).unwrap();
    env.write("node_modules/pkg/index.js", b"module.exports = 1");
    env.write(".gitignore", b"*.log\nbuild/\n");
    env.write("debug.log", b"noise");
    env.write("build/out.o", b"obj");
    env.write(".git/HEAD", b"ref: refs/heads/main\n");
    let big = pattern(20 * 1024 * 1024 + 17, 3);
    env.write("data/big.bin", &big);
    let mut env = env;
    env.daemon.spawn_and_wait().await;
    env.sync().await;

    let objs = env.objects().await;
    assert_eq!(
        objs,
        vec![
            ".gitignore",
            "a.txt",
            "bin/run.sh",
            "data/big.bin",
            "empty.txt",
            "src/deep/nested/lib.rs"
        ],
        "node_modules, ignored files, .git and symlinks are not uploaded as files"
    );
    assert_eq!(env.object("a.txt").await.unwrap(), b"alpha");
    assert!(
        env.object("data/big.bin").await.unwrap() == big,
        "20 MiB file differs"
    );
    let m = env.manifest().await.unwrap();
    assert_eq!(m["format"], 1);
    assert_eq!(m["files"]["bin/run.sh"]["mode"], 0o755);
    assert_eq!(m["files"]["a.txt"]["mode"], 0o644);
    assert_eq!(m["files"]["empty.txt"]["size"], 0);
    assert_eq!(
        m["files"]["a.txt"]["hash"],
        format!("blake3:{}", blake3::hash(b"alpha").to_hex())
    );
    assert_eq!(m["symlinks"]["link"], "a.txt");
    assert_eq!(m["empty_dirs"], json!(["empty_dir"]));
    let gen1 = m["generation"].as_u64().unwrap();

    // Modify, delete, rename, add a nested directory: all reach the remote.
    env.write("a.txt", b"alpha, changed");
    std::fs::remove_file(env.ws().join("empty.txt")).unwrap();
    std::fs::rename(env.ws().join("src/deep"), env.ws().join("src/moved")).unwrap();
    env.write("new/one/two/three.txt", b"3");
    std::fs::create_dir_all(env.ws().join("empty_dir/now_full")).unwrap();
    env.write("empty_dir/now_full/f", b"f");
    eventually(
        Duration::from_secs(15),
        "changes mirrored without an explicit sync",
        || async {
            env.objects().await
                == vec![
                    ".gitignore",
                    "a.txt",
                    "bin/run.sh",
                    "data/big.bin",
                    "empty_dir/now_full/f",
                    "new/one/two/three.txt",
                    "src/moved/nested/lib.rs",
                ]
        },
    )
    .await;
    env.sync().await;
    assert_eq!(env.object("a.txt").await.unwrap(), b"alpha, changed");
    let m = env.manifest().await.unwrap();
    assert!(m["generation"].as_u64().unwrap() > gen1);
    assert_eq!(m["empty_dirs"], json!([]));
    assert!(m["files"].get("empty.txt").is_none());
    env.assert_manifest_consistent().await;

    // An explicit sync right after a write includes it (API and CLI).
    env.write("cli.txt", b"cli");
    let out = env.daemon.cli().run(&["sync", "--timeout", "30"]).await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.json()["files_uploaded"].as_u64().is_some(),
        "{}",
        out.stdout
    );
    assert_eq!(env.object("cli.txt").await.unwrap(), b"cli");
    env.write("last.txt", b"last");
    let stats = env.sync().await;
    assert!(stats["files_uploaded"].as_u64().unwrap() >= 1, "{stats}");
    assert_eq!(env.object("last.txt").await.unwrap(), b"last");
    // A late event of that write (its close after the barrier's scan) may mark the file
    // pending again for one round; the daemon settles with nothing pending.
    eventually(Duration::from_secs(10), "nothing pending", || async {
        env.status().await["sync"]["pending_files"] == 0
    })
    .await;
    let status = env.status().await;
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(status["sync"]["watch_mode"], "native", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mirror_basics_dir() {
    mirror_basics(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mirror_basics_s3() {
    mirror_basics(Backend::S3).await;
}

async fn burst_uses_few_rounds(backend: Backend) {
    let env = Env::new(
        backend,
        "[sync]\ndebounce_min = \"500ms\"\ndebounce_max = \"6s\"\nburst_threshold = 10\n",
        true,
    )
    .await;
    let rounds_before = env
        .metric("sandkeep_sync_rounds_total{result=\"ok\"}")
        .await;
    // 300 files in 3 s.
    for batch in 0..30 {
        for i in 0..10 {
            env.write(
                &format!("burst/{batch:02}/f{i}.txt"),
                format!("{batch}-{i}").as_bytes(),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = env.status().await;
    assert_eq!(
        status["sync"]["burst"], true,
        "a burst is reported: {status}"
    );
    assert!(
        status["sync"]["debounce_ms"].as_u64().unwrap() > 500,
        "{status}"
    );
    eventually(
        Duration::from_secs(20),
        "all 300 files in the remote",
        || async {
            env.manifest()
                .await
                .is_some_and(|m| m["files"].as_object().unwrap().len() == 300)
        },
    )
    .await;
    let rounds = env
        .metric("sandkeep_sync_rounds_total{result=\"ok\"}")
        .await
        - rounds_before;
    assert!(rounds <= 10.0, "300 files took {rounds} rounds");
    env.assert_manifest_consistent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_uses_few_rounds_dir() {
    burst_uses_few_rounds(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_uses_few_rounds_s3() {
    burst_uses_few_rounds(Backend::S3).await;
}

async fn storm_is_not_starved(backend: Backend) {
    // debounce_max 3 s: a write every 100 ms never leaves a quiet period.
    let env = Env::new(
        backend,
        "[sync]\ndebounce_min = \"1s\"\ndebounce_max = \"3s\"\n",
        true,
    )
    .await;
    let start = Instant::now();
    let mut first_seen: Option<Duration> = None;
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(10) {
        env.write("storm/counter.txt", format!("{i}").as_bytes());
        env.write(&format!("storm/f{i:03}"), b"x");
        i += 1;
        if first_seen.is_none() && env.object("storm/f000").await.is_some() {
            first_seen = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = first_seen.expect("the first file reached the remote during the storm");
    assert!(
        seen <= Duration::from_millis(3000 + 1500),
        "the first file of the storm took {seen:?} (debounce_max 3 s)"
    );
    env.sync().await;
    assert_eq!(
        env.object("storm/counter.txt").await.unwrap(),
        format!("{}", i - 1).as_bytes()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_is_not_starved_dir() {
    storm_is_not_starved(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storm_is_not_starved_s3() {
    storm_is_not_starved(Backend::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_outage_degrades_then_converges() {
    let mut env = Env::new(Backend::S3, FAST, true).await;
    env.write("before.txt", b"1");
    env.sync().await;
    env.server.as_ref().unwrap().stop();
    for i in 0..20 {
        env.write(&format!("during/{i}.txt"), format!("{i}").as_bytes());
    }
    env.write("before.txt", b"2");
    eventually(
        Duration::from_secs(20),
        "status degraded with an error",
        || async {
            let s = env.status().await;
            s["state"] == "degraded" && s["sync"]["last_error"].is_string()
        },
    )
    .await;
    let r = env
        .daemon
        .client()
        .post_json("/v1/sync", &json!({"timeout_s": 2}))
        .await
        .unwrap();
    let body = crate::util::assert_error(&r, 504, "timeout");
    assert!(body["pending"]["files"].as_u64().unwrap() > 0, "{body}");
    env.server.as_mut().unwrap().restart().await;
    env.sync().await;
    let objs = env.objects().await;
    assert_eq!(objs.len(), 21, "{objs:?}");
    assert_eq!(env.object("before.txt").await.unwrap(), b"2");
    let s = env.status().await;
    assert_eq!(s["state"], "ready", "{s}");
    assert!(s["sync"]["last_error"].is_null(), "{s}");
    env.assert_manifest_consistent().await;
}

/// Objects of the mirror deleted (or replaced) by someone else are uploaded again once
/// `sync.verify_interval` compares the mirror with the manifest, with no change in the
/// workspace; so is everything once the whole workspace prefix is wiped.
async fn lost_objects_are_uploaded_again(backend: Backend) {
    let extra = format!("{FAST}verify_interval = \"1s\"\n");
    let env = Env::new(backend, &extra, true).await;
    env.write("a.txt", b"alpha");
    env.write("src/b.rs", b"fn b() {}");
    env.write("c.txt", b"gamma");
    env.sync().await;
    let first = env.manifest().await.unwrap()["generation"]
        .as_u64()
        .unwrap();
    let remote = env.remote.as_ref();
    let key = |rel: &str| format!("{PREFIX}workspace/files/{rel}");
    remote.delete_many(&[key("a.txt")]).await.unwrap();
    remote
        .put_bytes(&key("src/b.rs"), bytes::Bytes::from_static(b"short"))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "a.txt and src/b.rs uploaded again",
        || async {
            env.object("a.txt").await.as_deref() == Some(&b"alpha"[..])
                && env.object("src/b.rs").await.as_deref() == Some(&b"fn b() {}"[..])
                // The round that uploaded them has published its manifest too.
                && env
                    .manifest()
                    .await
                    .is_some_and(|m| m["generation"].as_u64().unwrap() > first)
        },
    )
    .await;
    assert!(
        env.daemon.log().contains("uploading them again"),
        "{}",
        env.daemon.log()
    );

    // The manifest alone deleted: published again, nothing else changed.
    let generation = env.manifest().await.unwrap()["generation"]
        .as_u64()
        .unwrap();
    remote
        .delete_many(&[format!("{PREFIX}workspace/manifest.json")])
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the manifest published again",
        || async { env.manifest().await.is_some() },
    )
    .await;
    let m = env.manifest().await.unwrap();
    assert_eq!(m["generation"].as_u64().unwrap(), generation + 1, "{m}");
    assert_eq!(entry_sizes(&m).len(), 3, "{m}");

    let all = remote::list_all(remote, &format!("{PREFIX}workspace/"))
        .await
        .unwrap();
    let keys: Vec<String> = all.into_iter().map(|o| o.key).collect();
    remote.delete_many(&keys).await.unwrap();
    eventually(
        Duration::from_secs(20),
        "the mirror written again",
        || async { env.manifest().await.is_some() && env.objects().await.len() == 3 },
    )
    .await;
    assert_eq!(env.object("c.txt").await.as_deref(), Some(&b"gamma"[..]));
    env.assert_manifest_consistent().await;
    let m = env.manifest().await.unwrap();
    assert_eq!(
        entry_sizes(&m),
        BTreeMap::from([
            ("a.txt".to_string(), 5),
            ("c.txt".to_string(), 5),
            ("src/b.rs".to_string(), 9)
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_objects_are_uploaded_again_dir() {
    lost_objects_are_uploaded_again(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_objects_are_uploaded_again_s3() {
    lost_objects_are_uploaded_again(Backend::S3).await;
}

/// KV exports, file store objects and git bundles deleted by someone else are written
/// again once `sync.verify_interval` lists them, with nothing changed in the daemon.
async fn lost_store_objects_are_written_again(backend: Backend) {
    let extra = format!("{FAST}verify_interval = \"1s\"\n[git]\ninterval = \"1s\"\n");
    let mut env = Env::new(backend, &extra, true).await;
    let client = crate::util::Api::from(env.daemon.client());
    client.set("k", json!({"a": 1})).await;
    for (path, body) in [("events/e1.json", "{\"e\":1}"), ("base_state.json", "{}")] {
        let r = client
            .raw(
                hyper::Method::PUT,
                &format!("/v1/files/{path}"),
                body.as_bytes(),
            )
            .await;
        ok(&r, 201);
    }
    env.write("repo/a.txt", b"committed");
    let repo = env.ws().join("repo");
    crate::util::fs::git(&repo, &["init", "-q"]);
    crate::util::fs::git(&repo, &["add", "."]);
    crate::util::fs::git(&repo, &["commit", "-qm", "one"]);
    env.sync().await;
    let remote = env.remote.as_ref();
    let listed = |under: &'static str| async move {
        remote::list_all(remote, &format!("{PREFIX}{under}"))
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect::<Vec<_>>()
    };
    let exports = listed("kv/").await;
    let bundles = listed("workspace/git/").await;
    assert_eq!(exports.len(), 1, "{exports:?}");
    assert_eq!(bundles.len(), 2, "{bundles:?}");
    let files = [
        format!("{PREFIX}events/e1.json"),
        format!("{PREFIX}base_state.json"),
    ];
    let mut gone: Vec<String> = files.to_vec();
    gone.extend(exports.iter().cloned());
    gone.extend(bundles.iter().cloned());
    let before: Vec<Vec<u8>> = {
        let mut v = Vec::new();
        for k in &files {
            v.push(remote.get_bytes(k).await.unwrap().unwrap().to_vec());
        }
        v
    };
    remote.delete_many(&gone).await.unwrap();
    eventually(
        Duration::from_secs(30),
        "exports, file store objects and bundles written again",
        || async {
            for k in &gone {
                if remote.head(k).await.unwrap().is_none() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for (k, b) in files.iter().zip(&before) {
        assert_eq!(
            &remote.get_bytes(k).await.unwrap().unwrap()[..],
            &b[..],
            "{k}"
        );
    }
    let log = env.daemon.log();
    for said in [
        "kv exports are missing",
        "file store objects are missing",
        "git bundles are missing",
    ] {
        assert!(log.contains(said), "{said}: {log}");
    }
    // What was written again is whole: a new sandbox gets the key, the files and the
    // repository back.
    assert!(env.daemon.terminate().success());
    env.daemon.become_new_sandbox();
    env.daemon.spawn_and_wait().await;
    let client = crate::util::Api::from(env.daemon.client());
    assert_eq!(client.value("k").await, Some(json!({"a": 1})));
    let r = client.get("/v1/files/events/e1.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], &before[0][..]);
    let repo = env.ws().join("repo");
    assert_eq!(
        crate::util::fs::git(&repo, &["log", "--format=%s"]),
        "one\n"
    );
    assert_eq!(crate::util::fs::git(&repo, &["status", "--porcelain"]), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_store_objects_are_written_again_dir() {
    lost_store_objects_are_written_again(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lost_store_objects_are_written_again_s3() {
    lost_store_objects_are_written_again(Backend::S3).await;
}

async fn sigkill_mid_round_converges(backend: Backend) {
    let mut env = Env::new(backend, FAST, false).await;
    for i in 0..1500 {
        env.write(&format!("many/{:02}/f{i}.txt", i % 30), &pattern(2000, i));
    }
    env.write("big.bin", &pattern(18 << 20, 9));
    // Start, and kill -9 while the startup round is uploading.
    let log = env.daemon.log_path.clone();
    let mut child = env.daemon.serve_command(&[], &log).spawn().unwrap();
    let checker = {
        let remote = env.remote.clone();
        tokio::spawn(async move {
            // Watch the remote manifest while the daemon works and crashes.
            for _ in 0..100 {
                if let Ok(Some(b)) = remote
                    .get_bytes(&format!("{PREFIX}workspace/manifest.json"))
                    .await
                {
                    let m: Value = serde_json::from_slice(&b).unwrap();
                    for path in m["files"].as_object().unwrap().keys() {
                        let h = remote
                            .head(&format!("{PREFIX}workspace/files/{path}"))
                            .await
                            .unwrap();
                        assert!(h.is_some(), "manifest names missing object {path}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    // Changes while the daemon is down, then a restart: everything converges.
    std::fs::remove_file(env.ws().join("many/00/f0.txt")).unwrap();
    env.write("many/01/f1.txt", b"rewritten while stopped");
    env.write("after.txt", b"new while stopped");
    env.daemon.spawn_and_wait().await;
    env.assert_manifest_consistent().await;
    let m = env
        .manifest()
        .await
        .expect("a manifest after the startup reconcile");
    let files = entry_sizes(&m);
    assert_eq!(
        files.len(),
        1500 + 1 - 1 + 1,
        "reconciled without an explicit sync"
    );
    assert_eq!(files["many/01/f1.txt"], 23);
    assert!(!files.contains_key("many/00/f0.txt"));
    assert_eq!(
        env.object("many/01/f1.txt").await.unwrap(),
        b"rewritten while stopped"
    );
    checker.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_round_converges_dir() {
    sigkill_mid_round_converges(Backend::Dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_round_converges_s3() {
    sigkill_mid_round_converges(Backend::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_guards_hold_until_confirmed() {
    let env = Env::new(
        Backend::Dir,
        "[sync]\ndebounce_min = \"200ms\"\ndebounce_max = \"2s\"\nmass_delete_hold = \"3s\"\n",
        true,
    )
    .await;
    for i in 0..150 {
        env.write(&format!("f/{i:03}.txt"), b"x");
    }
    env.sync().await;
    assert_eq!(env.objects().await.len(), 150);

    // 120 of 150 vanish: held, then deleted once the same state held for 3 s.
    for i in 0..120 {
        std::fs::remove_file(env.ws().join(format!("f/{i:03}.txt"))).unwrap();
    }
    let answer = env.sync().await;
    assert_eq!(answer["held_deletes"], 120, "{answer}");
    assert_eq!(env.objects().await.len(), 150, "mass deletion held");
    let s = env.status().await;
    assert_eq!(s["sync"]["held_deletes"], 120, "{s}");
    assert_eq!(entry_sizes(&env.manifest().await.unwrap()).len(), 150);
    eventually(
        Duration::from_secs(10),
        "held deletion carried out after the hold",
        || async { env.objects().await.len() == 30 },
    )
    .await;

    // Everything vanishes: never deleted without confirmation, however long it holds.
    for i in 120..150 {
        std::fs::remove_file(env.ws().join(format!("f/{i:03}.txt"))).unwrap();
    }
    env.sync().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    env.sync().await;
    assert_eq!(
        env.objects().await.len(),
        30,
        "an empty workspace never empties the remote"
    );
    let r = env
        .daemon
        .client()
        .post_json("/v1/sync", &json!({"confirm_deletes": true}))
        .await
        .unwrap();
    let stats = ok(&r, 200);
    assert_eq!(stats["files_deleted"], 30, "{stats}");
    assert!(env.objects().await.is_empty());
    assert!(
        env.manifest().await.unwrap()["files"]
            .as_object()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vanished_workspace_deletes_nothing() {
    let env = Env::new(Backend::Dir, FAST, true).await;
    env.write("keep/me.txt", b"precious");
    env.sync().await;
    std::fs::rename(env.ws(), env.daemon.root().join("moved-away")).unwrap();
    let r = env
        .daemon
        .client()
        .post_json("/v1/sync", &json!({"timeout_s": 10}))
        .await
        .unwrap();
    crate::util::assert_error(&r, 409, "workspace_unavailable");
    let out = env.daemon.cli().run(&["sync", "--timeout", "5"]).await;
    // A 409, but no lost compare-and-set (4): an error.
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("workspace_unavailable"),
        "{}",
        out.stderr
    );
    let s = env.status().await;
    assert_eq!(s["state"], "degraded", "{s}");
    assert_eq!(s["workspace"]["available"], false, "{s}");
    assert_eq!(env.object("keep/me.txt").await.unwrap(), b"precious");
    // It comes back: mirrored again, nothing lost.
    std::fs::rename(env.daemon.root().join("moved-away"), env.ws()).unwrap();
    env.write("keep/new.txt", b"n");
    eventually(Duration::from_secs(15), "sync resumes", || async {
        env.object("keep/new.txt").await.is_some()
    })
    .await;
    assert_eq!(env.object("keep/me.txt").await.unwrap(), b"precious");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn special_and_oversized_files_are_skipped() {
    let env = Env::new(
        Backend::Dir,
        "[sync]\ndebounce_min = \"200ms\"\nmax_file_bytes = 1000\n",
        false,
    )
    .await;
    env.write("small.txt", b"ok");
    env.write("large.bin", &[7u8; 2000]);
    let fifo = env.ws().join("pipe");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    env.write("grows.log", &[1u8; 100]);
    let mut env = env;
    env.daemon.spawn_and_wait().await;
    env.sync().await;
    assert_eq!(env.objects().await, vec!["grows.log", "small.txt"]);
    let s = env.status().await;
    assert_eq!(s["workspace"]["skipped_files"], 2, "{s}");
    // A mirrored file that grows over the limit keeps its last copy there (as
    // rclone's size filter leaves the destination's file alone).
    env.write("grows.log", &[2u8; 1500]);
    let stats = env.sync().await;
    assert_eq!(stats["files_deleted"], 0, "{stats}");
    assert_eq!(env.object("grows.log").await.unwrap(), [1u8; 100]);
    assert_eq!(env.status().await["workspace"]["skipped_files"], 3);
    // And as a metric, for alerts.
    assert_eq!(env.metric("sandkeep_workspace_skipped_files ").await, 3.0);
    env.assert_manifest_consistent().await;
}

/// With no credentials anywhere (none configured, no AWS variables or files, no
/// instance metadata), the error says so and where they go, not only what the last
/// provider of the AWS chain answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_s3_credentials_are_named() {
    let mut env = Env::new(Backend::S3, "", false).await;
    let config = std::fs::read_to_string(&env.daemon.config_path).unwrap();
    let config: String = config
        .lines()
        .filter(|l| !l.starts_with("access_key_id") && !l.starts_with("secret_access_key"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&env.daemon.config_path, config).unwrap();
    for (name, value) in [
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/nonexistent/config"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials"),
    ] {
        env.daemon.set_env(name, value);
    }
    env.daemon.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !env
        .daemon
        .log()
        .contains("no usable S3 credentials (set remote.access_key_id")
    {
        assert!(Instant::now() < deadline, "{}", env.daemon.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.daemon.kill9();
}

/// Names with control characters are skipped and counted: S3 carries keys in XML, where
/// most of them cannot be written, so one such object would make every listing of the
/// conversation (a new sandbox's restore, the verify) and every batch delete with it
/// fail. The rest is mirrored, listed and deleted as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn names_with_control_characters_are_skipped() {
    let mut env = Env::new(Backend::S3, "[sync]\ndebounce_min = \"200ms\"\n", true).await;
    env.write("ok.txt", b"ok");
    env.write("gone.txt", b"soon deleted");
    env.write("ctl\x01x.txt", b"x");
    env.write("new\nline.txt", b"x");
    env.write("dir\x02/inside.txt", b"x");
    env.sync().await;
    assert_eq!(env.objects().await, vec!["gone.txt", "ok.txt"]);
    let s = env.status().await;
    assert_eq!(s["workspace"]["skipped_files"], 3, "{s}");
    assert_eq!(s["state"], "ready", "{s}");
    std::fs::remove_file(env.ws().join("gone.txt")).unwrap();
    std::fs::remove_file(env.ws().join("ctl\x01x.txt")).unwrap();
    env.sync().await;
    assert_eq!(env.objects().await, vec!["ok.txt"]);
    // A new sandbox lists the conversation and restores what was mirrored.
    assert!(env.daemon.terminate().success());
    env.daemon.become_new_sandbox();
    env.daemon.spawn_and_wait().await;
    assert_eq!(std::fs::read(env.ws().join("ok.txt")).unwrap(), b"ok");
}

/// A directory too deep for anything in it to have a remote key (here deeper than a
/// path can even name) is skipped and counted; the rest is mirrored as ever, by the
/// watcher and by the full scan of a start.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directories_too_deep_for_a_remote_key_are_skipped() {
    let mut env = Env::new(Backend::Dir, "[sync]\ndebounce_min = \"200ms\"\n", true).await;
    env.write("before.txt", b"b");
    env.sync().await;
    // 17 levels of 250-byte names: over the 4096 bytes a path may have. Made in two
    // halves that each fit, one then moved to the bottom of the other.
    let level = "d".repeat(250);
    let half = |n: usize| (0..n).map(|_| level.as_str()).collect::<Vec<_>>().join("/");
    let upper = env.ws().join("deep").join(half(8));
    std::fs::create_dir_all(&upper).unwrap();
    let lower = env.ws().join("lower");
    std::fs::create_dir_all(lower.join(half(9))).unwrap();
    std::fs::write(lower.join(half(9)).join("f.txt"), "x").unwrap();
    std::fs::rename(&lower, upper.join("lower")).unwrap();
    env.write("after.txt", b"a");
    env.sync().await;
    assert_eq!(env.objects().await, vec!["after.txt", "before.txt"]);
    let s = env.status().await;
    assert_eq!(s["state"], "ready", "{s}");
    assert!(
        s["workspace"]["skipped_files"].as_u64().unwrap() >= 1,
        "{s}"
    );
    // A start scans the whole tree.
    assert_eq!(
        env.daemon.terminate().code(),
        Some(0),
        "log:\n{}",
        env.daemon.log()
    );
    env.write("later.txt", b"l");
    env.daemon.spawn_and_wait().await;
    env.sync().await;
    assert_eq!(
        env.objects().await,
        vec!["after.txt", "before.txt", "later.txt"]
    );
    assert_eq!(env.status().await["state"], "ready");
    env.assert_manifest_consistent().await;
    // Tidy: `remove_dir_all` cannot name the depths either.
    let _ = std::process::Command::new("rm")
        .arg("-rf")
        .arg(env.ws().join("deep"))
        .status();
}

/// What the daemon may not read is skipped and counted, and the mirror keeps what it
/// has of it: an unreadable file neither holds up deletions nor is deleted, and an
/// unreadable directory does not stop the mirror (only the workspace root does).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unreadable_entries_are_skipped_and_kept() {
    let mut env = Env::new(Backend::Dir, FAST, false).await;
    env.daemon.unprivileged();
    env.write("secret.txt", b"v1");
    env.write("priv/p.txt", b"p");
    env.write("open/o1", b"1");
    env.write("open/o2", b"2");
    env.write("listonly/l.txt", b"l");
    // Not enterable from the start: neither mirrored nor in the watcher's way.
    env.write("early/sub/e.txt", b"e");
    let early = env.ws().join("early");
    std::fs::set_permissions(&early, std::fs::Permissions::from_mode(0o644)).unwrap();
    env.daemon.spawn_and_wait().await;
    env.sync().await;
    assert_eq!(
        env.objects().await,
        [
            "listonly/l.txt",
            "open/o1",
            "open/o2",
            "priv/p.txt",
            "secret.txt"
        ]
    );
    let chmod = |rel: &str, mode: u32| {
        let p = env.ws().join(rel);
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod("secret.txt", 0o000);
    chmod("priv", 0o000);
    // Listed but not entered (no search permission).
    chmod("listonly", 0o644);
    std::fs::remove_file(env.ws().join("open/o1")).unwrap();
    env.write("open/o3", b"3");
    let stats = env.sync().await;
    assert_eq!(stats["files_deleted"], 1, "{stats}");
    assert_eq!(
        env.objects().await,
        [
            "listonly/l.txt",
            "open/o2",
            "open/o3",
            "priv/p.txt",
            "secret.txt"
        ]
    );
    let s = env.status().await;
    assert_eq!(s["state"], "ready", "{s}");
    assert_eq!(s["workspace"]["skipped_files"], 4, "{s}");
    assert_eq!(s["sync"]["watch_mode"], "native", "{s}");
    env.assert_manifest_consistent().await;

    chmod("secret.txt", 0o644);
    chmod("priv", 0o755);
    chmod("listonly", 0o755);
    chmod("early", 0o755);
    env.write("secret.txt", b"v2");
    env.sync().await;
    assert_eq!(env.object("secret.txt").await.unwrap(), b"v2");
    assert_eq!(env.object("early/sub/e.txt").await.unwrap(), b"e");
    assert_eq!(env.status().await["workspace"]["skipped_files"], 0);
}

/// A directory that the ignore rules stop ignoring is watched from then on: what is
/// written in it later goes out without a sync call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_directory_let_in_by_the_rules_is_watched() {
    let env = Env::new(Backend::Dir, FAST, true).await;
    env.write(".gitignore", b"build/\n");
    env.write("build/deep/a", b"a");
    env.sync().await;
    assert_eq!(env.objects().await, [".gitignore"]);
    env.write(".gitignore", b"");
    eventually(Duration::from_secs(15), "build/deep/a mirrored", || async {
        env.object("build/deep/a").await.is_some()
    })
    .await;
    env.write("build/deep/b", b"b");
    env.write("build/deep/new/c", b"c");
    eventually(Duration::from_secs(15), "later files mirrored", || async {
        env.object("build/deep/b").await.is_some() && env.object("build/deep/new/c").await.is_some()
    })
    .await;
}

/// Symlinks are recorded, never followed, by the watcher too: a link to a directory
/// (inside the tree or outside it) gets no watch of its own, so changes in the linked
/// directory are neither missed under their own name nor uploaded under the link's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_symlink_to_a_directory_is_not_watched_through() {
    let env = Env::new(Backend::Dir, FAST, true).await;
    let outside = env.daemon.root().join("outside");
    std::fs::create_dir(&outside).unwrap();
    env.write("src/a.txt", b"1");
    env.sync().await;
    std::os::unix::fs::symlink("src", env.ws().join("link")).unwrap();
    std::os::unix::fs::symlink(&outside, env.ws().join("out")).unwrap();
    // The links' events are handled (and, before, their watches added).
    eventually(Duration::from_secs(15), "the links mirrored", || async {
        let m = env.manifest().await.unwrap_or_default();
        m["symlinks"]["link"].is_string() && m["symlinks"]["out"].is_string()
    })
    .await;
    env.write("src/a.txt", b"2");
    std::fs::write(outside.join("o.txt"), b"outside").unwrap();
    eventually(Duration::from_secs(15), "src/a.txt updated", || async {
        env.object("src/a.txt").await.as_deref() == Some(&b"2"[..])
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.sync().await;
    let objects = env.objects().await;
    assert!(
        !objects
            .iter()
            .any(|k| k.starts_with("link/") || k.starts_with("out/")),
        "{objects:?}"
    );
}

/// The workspace directory removed and made again (`rm -rf ws && git clone ... ws`)
/// leaves no dead watch behind: what is written in the new one goes out without a
/// sync call.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workspace_removed_and_made_again_is_watched_again() {
    let env = Env::new(Backend::Dir, FAST, true).await;
    env.write("a.txt", b"a");
    env.sync().await;
    std::fs::remove_dir_all(env.ws()).unwrap();
    std::fs::create_dir(env.ws()).unwrap();
    env.write("a.txt", b"a");
    env.write("c.txt", b"c");
    eventually(Duration::from_secs(20), "c.txt mirrored", || async {
        env.object("c.txt").await.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    env.write("d/e.txt", b"e");
    eventually(Duration::from_secs(20), "d/e.txt mirrored", || async {
        env.object("d/e.txt").await.is_some()
    })
    .await;
}

fn kill(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_everything_synced_exits_0() {
    let mut env = Env::new(
        Backend::S3,
        "[sync]\ndebounce_min = \"10s\"\ndebounce_max = \"20s\"\n",
        true,
    )
    .await;
    // Written just before the signal, well inside the debounce: the final sync carries it.
    env.write("last-second.txt", b"final");
    let status = env.daemon.terminate();
    assert_eq!(status.code(), Some(0), "{}", env.daemon.log());
    assert_eq!(env.object("last-second.txt").await.unwrap(), b"final");
    assert!(!env.daemon.socket.exists(), "socket removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn final_sync_cut_short_by_the_deadline_exits_75_and_names_what_is_left() {
    let mut env = Env::new(
        Backend::S3,
        "[sync]\ndebounce_min = \"10s\"\ndebounce_max = \"20s\"\n\n[shutdown]\ndeadline = \"2s\"\n",
        true,
    )
    .await;
    env.server.as_ref().unwrap().stop();
    for i in 0..5 {
        env.write(&format!("unsent/{i}.txt"), b"x");
    }
    let started = Instant::now();
    let status = env.daemon.terminate();
    let took = started.elapsed();
    let log = env.daemon.log();
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(took < Duration::from_secs(12), "exit took {took:?}");
    assert!(
        log.contains("exiting before everything reached remote storage"),
        "{log}"
    );
    assert!(log.contains("left=workspace files ("), "{log}");
    assert!(log.contains("last error: remote storage"), "{log}");
}

/// A new entry that a delete guard holds back waits for `confirm_deletes`, which
/// nobody can send once the daemon stops: the final sync says so at once instead of
/// retrying until the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn final_sync_held_by_a_guard_exits_75_at_once() {
    let mut env = Env::new(
        Backend::Dir,
        "[sync]\ndebounce_min = \"200ms\"\ndebounce_max = \"2s\"\n\n[shutdown]\ndeadline = \"30s\"\n",
        true,
    )
    .await;
    env.write("d/x.txt", b"x");
    env.sync().await;
    // Everything vanishes (held until confirmed), and a file takes the directory's name.
    std::fs::remove_dir_all(env.ws().join("d")).unwrap();
    env.sync().await;
    env.write("d", b"a file now");
    let started = Instant::now();
    let status = env.daemon.terminate();
    let took = started.elapsed();
    let log = env.daemon.log();
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(took < Duration::from_secs(10), "exit took {took:?}: {log}");
    assert!(log.contains("left=workspace files ("), "{log}");
    assert!(log.contains("confirm_deletes"), "{log}");
    assert_eq!(env.object("d/x.txt").await.unwrap(), b"x", "still held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_signal_aborts_the_final_sync() {
    let mut env = Env::new(
        Backend::S3,
        "[sync]\ndebounce_min = \"10s\"\ndebounce_max = \"20s\"\n\n[shutdown]\ndeadline = \"60s\"\n",
        true,
    )
    .await;
    env.server.as_ref().unwrap().stop();
    env.write("stuck.txt", b"x");
    let pid = env.daemon.pid();
    let started = Instant::now();
    kill(pid, "TERM");
    // The same stop sent again at once (to the process, then its group) is one.
    kill(pid, "TERM");
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        env.daemon.is_running(),
        "the final sync keeps retrying within the deadline: {}",
        env.daemon.log()
    );
    kill(pid, "INT");
    let status = env.daemon.wait_exit(Duration::from_secs(15));
    let log = env.daemon.log();
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the 60 s deadline was not waited out"
    );
    assert!(log.contains("a second signal aborted it"), "{log}");
}
