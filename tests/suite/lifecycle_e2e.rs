//! The whole life of a sandbox, on the `dir` remote and on the embedded S3 server: a
//! workspace (nested files, an executable, a symlink, an empty directory, a 1 MiB file,
//! a git repository with history, branches, a tag, staged, unstaged and untracked
//! changes), KV keys in two namespaces (one with a TTL) and file store files; SIGTERM
//! with no sync before it exits 0; a new daemon with an empty workspace and an empty
//! state directory, the same remote and key, comes back ready with everything equal;
//! and `sandkeep restore --to` rebuilds the same tree offline.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};

use crate::s3_server::S3Server;
use crate::util::fs::{Entry, chmod, git, git_state, tree, write};
use crate::util::{Daemon, ok};

const CONV: &str = "conversations/u1/c1";
const CANARY: &str = "kv-canary-7d3f1a";
/// Nothing periodic, and no round or export before the final sync unless asked.
const CONFIG: &str = "[sync]\ndebounce_min = \"20s\"\ndebounce_max = \"30s\"\n\n[kv]\nreplicate_delay = \"1h\"\n\n[snapshot]\ninterval = \"0s\"\n\n[git]\ninterval = \"0s\"\n";

fn not_git(rel: &str) -> bool {
    rel == ".git" || rel.starts_with(".git/")
}

/// A workspace with every kind of entry and a repository with every kind of change.
fn fill(ws: &Path) {
    git(ws, &["init", "-q"]);
    write(ws, "a.txt", "a1\n");
    write(ws, "b.txt", "b1\n");
    write(ws, "c.txt", "c1\n");
    write(ws, "docs/guide/deep/page.md", "# deep\n");
    write(ws, "bin/run.sh", "#!/bin/sh\necho run\n");
    chmod(&ws.join("bin/run.sh"), 0o755);
    git(ws, &["add", "-A"]);
    git(ws, &["commit", "-q", "-m", "first"]);
    write(ws, "a.txt", "a2\n");
    git(ws, &["commit", "-q", "-am", "second"]);
    git(ws, &["tag", "-a", "v1", "-m", "one"]);
    git(ws, &["checkout", "-q", "-b", "feature"]);
    write(ws, "feature.txt", "f\n");
    git(ws, &["add", "feature.txt"]);
    git(ws, &["commit", "-q", "-m", "feature work"]);
    git(ws, &["checkout", "-q", "main"]);
    // Uncommitted work of every kind.
    write(ws, "a.txt", "a-staged\n");
    write(ws, "staged-new.txt", "new and staged\n");
    git(ws, &["add", "a.txt", "staged-new.txt"]);
    write(ws, "b.txt", "b-unstaged\n");
    std::fs::remove_file(ws.join("c.txt")).unwrap();
    write(ws, "notes/untracked.md", "untracked\n");
    write(ws, "data/blob.bin", crate::util::pattern(1 << 20, 11));
    std::fs::create_dir_all(ws.join("empty/inner")).unwrap();
    std::os::unix::fs::symlink("docs/guide/deep/page.md", ws.join("link-to-page")).unwrap();
    chmod(&ws.join("notes/untracked.md"), 0o600);
}

/// Everything `GET` shows of the keys the test wrote.
async fn kv_state(d: &Daemon) -> Vec<Value> {
    let api = d.api();
    let mut out = Vec::new();
    for (ns, key) in [
        ("conversation", "agent"),
        ("conversation", "steps"),
        ("conversation", "lease"),
        ("automation:42", "last_run"),
    ] {
        out.push(ok(
            &api.get(&format!("/v1/kv/{key}?ns={ns}&meta=true")).await,
            200,
        ));
    }
    for ns in ["conversation", "automation:42"] {
        out.push(json!(api.ns_version(Some(ns)).await));
    }
    out
}

async fn file_state(d: &Daemon) -> BTreeMap<String, Vec<u8>> {
    let api = d.api();
    let l = ok(&api.get("/v1/files").await, 200);
    let mut out = BTreeMap::new();
    for p in l["paths"].as_array().unwrap() {
        let p = p.as_str().unwrap();
        let r = api.get(&format!("/v1/files/{p}")).await;
        assert_eq!(r.status, 200);
        out.insert(p.to_string(), r.body.to_vec());
    }
    out
}

fn remote_object(d: &Daemon, s3: Option<&S3Server>, rel: &str) -> Option<Vec<u8>> {
    match s3 {
        Some(s) => s.object(&format!("{CONV}/{rel}")),
        None => std::fs::read(d.remote.join(CONV).join(rel)).ok(),
    }
}

async fn whole_life(s3: Option<&S3Server>) {
    let mut d = Daemon::prepare(CONFIG);
    if let Some(s) = s3 {
        s.configure(&d);
    }
    fill(&d.workspace);
    d.spawn_and_wait().await;
    let api = d.api();
    // Work done while the daemon runs, well inside the debounce: only the final sync
    // can carry it.
    write(&d.workspace, "late.txt", "written just before the stop\n");
    write(&d.workspace, "docs/guide/deep/page.md", "# deep, edited\n");
    ok(
        &api.put(
            "/v1/kv/agent?ns=conversation",
            &json!({"step": 3, "secret": CANARY}),
        )
        .await,
        201,
    );
    for _ in 0..3 {
        ok(
            &api.post_empty("/v1/kv/steps/incr?ns=conversation").await,
            200,
        );
    }
    ok(
        &api.put("/v1/kv/lease?ns=conversation&ttl=3600", &json!("held"))
            .await,
        201,
    );
    ok(
        &api.put("/v1/kv/last_run?ns=automation:42", &json!({"ok": true}))
            .await,
        201,
    );
    ok(
        &api.raw(
            Method::PUT,
            "/v1/files/events/event-00001-a1.json",
            b"{\"kind\":\"message\"}",
        )
        .await,
        201,
    );
    ok(
        &api.raw(Method::PUT, "/v1/files/base_state.json", b"{\"v\":1}")
            .await,
        201,
    );

    let ws_before = tree(&d.workspace, &not_git);
    let git_before = git_state(&d.workspace);
    let kv_before = kv_state(&d).await;
    let files_before = file_state(&d).await;

    let started = std::time::Instant::now();
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(started.elapsed() < Duration::from_secs(25));

    // The remote KV exports hold no plaintext.
    for ns in ["conversation", "automation:42"] {
        let bytes = remote_object(&d, s3, &format!("kv/{ns}.kv"))
            .unwrap_or_else(|| panic!("no export of {ns}"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(CANARY), "kv/{ns}.kv holds plaintext");
        assert!(!text.contains("\"step\""), "kv/{ns}.kv holds plaintext");
    }

    // A new sandbox: empty workspace, empty state directory, same remote and key.
    d.become_new_sandbox();
    d.spawn_and_wait().await;

    assert_eq!(tree(&d.workspace, &not_git), ws_before);
    assert_eq!(git_state(&d.workspace), git_before);
    assert_eq!(kv_state(&d).await, kv_before);
    assert_eq!(file_state(&d).await, files_before);
    let status = ok(&d.api().get("/v1/status").await, 200);
    assert_eq!(status["state"], "ready", "{status}");
    // Nothing restored is uploaded again: modes and times came back exactly.
    let after = ok(&d.api().post("/v1/sync", &json!({})).await, 200);
    assert_eq!(after["files_uploaded"], 0, "{after}");
    assert_eq!(after["files_deleted"], 0, "{after}");
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    // The same offline, as an init container does it.
    let target = d.root().join("offline");
    let out = d.restore_cli(&["--to", target.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{out:?}");
    let summary = out.json();
    assert_eq!(summary["restored"], true, "{summary}");
    assert_eq!(summary["bad"], json!([]), "{summary}");
    let offline = tree(&target, &not_git);
    let expected: BTreeMap<String, Entry> = ws_before;
    assert_eq!(offline, expected);
    assert_eq!(git_state(&target), git_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sandbox_comes_back_exactly_dir_remote() {
    whole_life(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sandbox_comes_back_exactly_s3_remote() {
    let s3 = S3Server::start().await;
    whole_life(Some(&s3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_hangs_does_not_hold_the_stop_past_the_deadline() {
    let mut s3 = S3Server::start().await;
    let mut d = Daemon::prepare("[shutdown]\ndeadline = \"6s\"\n[git]\ninterval = \"0s\"\n");
    s3.configure(&d);
    d.spawn_and_wait().await;
    std::fs::write(d.workspace.join("first.txt"), "1").unwrap();
    ok(
        &d.api().post("/v1/sync", &json!({"timeout_s": 30})).await,
        200,
    );
    s3.hang().await;
    std::fs::write(d.workspace.join("late.txt"), "2").unwrap();
    ok(&d.api().put("/v1/kv/k", &json!(1)).await, 201);
    let started = std::time::Instant::now();
    let status = d.terminate();
    let took = started.elapsed();
    assert_eq!(status.code(), Some(75), "log:\n{}", d.log());
    assert!(
        took < Duration::from_secs(8),
        "a 6 s deadline took {took:?}; log:\n{}",
        d.log()
    );
    assert!(!d.socket.exists(), "the socket was left behind");
    assert!(
        d.log()
            .contains("exiting before everything reached remote storage")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_workspace_ends_the_final_sync_without_waiting_for_the_deadline() {
    let mut d = Daemon::prepare("[shutdown]\ndeadline = \"20s\"\n");
    d.spawn_and_wait().await;
    std::fs::remove_dir_all(&d.workspace).unwrap();
    let started = std::time::Instant::now();
    let status = d.terminate();
    assert_eq!(status.code(), Some(75), "log:\n{}", d.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}; log:\n{}",
        started.elapsed(),
        d.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_that_refuses_the_daemon_shows_as_degraded() {
    let s3 = S3Server::start().await;
    let mut d = Daemon::prepare("");
    s3.configure(&d);
    d.spawn_and_wait().await;
    assert_eq!(ok(&d.api().get("/v1/status").await, 200)["state"], "ready");
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    // Restarted with a secret the server refuses: ready once the claim stops holding
    // up the start (10 s), with writes held.
    d.set_env("SANDKEEP_REMOTE_SECRET_ACCESS_KEY", "not-the-secret-key");
    d.spawn_and_wait().await;
    let s = ok(&d.api().get("/v1/status").await, 200);
    assert_eq!(s["owner"]["writes_allowed"], false, "{s}");
    assert_eq!(s["state"], "degraded", "{s}");
    assert!(s["owner"]["last_error"].is_string(), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_over_the_cli_answers_waiting_syncs_and_reports_what_was_left() {
    let mut s3 = S3Server::start().await;
    let mut d = Daemon::prepare("[shutdown]\ndeadline = \"6s\"\n[git]\ninterval = \"0s\"\n");
    s3.configure(&d);
    d.spawn_and_wait().await;
    ok(
        &d.api().post("/v1/sync", &json!({"timeout_s": 30})).await,
        200,
    );
    s3.hang().await;
    std::fs::write(d.workspace.join("late.txt"), "2").unwrap();
    // A sync that waits on the hanging remote when the stop comes.
    let api = d.api();
    let waiting = tokio::spawn(async move {
        api.request_within(
            Duration::from_secs(30),
            Method::POST,
            "/v1/sync",
            Some(br#"{"timeout_s": 600}"#.to_vec()),
        )
        .await
    });
    // And a snapshot the hanging remote holds up: given up at the stop.
    let api = d.api();
    let snapshot = tokio::spawn(async move {
        api.request_within(Duration::from_secs(30), Method::POST, "/v1/snapshots", None)
            .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let out = d.cli().run(&["shutdown"]).await;
    let took = started.elapsed();
    assert_eq!(out.code, 75, "{out:?}\nlog:\n{}", d.log());
    let body = out.json();
    assert_eq!(body["exit_code"], 75, "{body}");
    assert!(!body["left"].as_array().unwrap().is_empty(), "{body}");
    assert!(
        took < Duration::from_secs(8),
        "a 6 s deadline took {took:?}"
    );
    assert!(!d.socket.exists());
    let r = waiting.await.unwrap();
    let e = crate::util::assert_error(&r, 503, "shutting_down");
    assert!(e["message"].as_str().unwrap().contains("final sync"), "{e}");
    let r = snapshot.await.unwrap();
    crate::util::assert_error(&r, 503, "shutting_down");
    assert_eq!(d.wait_exit(crate::util::EXIT_TIMEOUT).code(), Some(75));
}
