//! The daemon's life around the KV store: acknowledged writes survive SIGKILL, a
//! SIGTERM exits 0 and removes the socket, values are encrypted at rest and a wrong
//! key refuses to start, one daemon per state dir (lock) and per live socket, a stale
//! socket file is replaced, and the system routes (`/healthz`, `/readyz`, `/metrics`,
//! `/v1/status`, `POST /v1/shutdown`).

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use serde_json::json;

use crate::util::{Daemon, EXIT_TIMEOUT, OTHER_KV_KEY, assert_error, ok};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill() {
    let mut d = Daemon::start().await;
    const N: usize = 200;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let api = d.api();
        tasks.push(tokio::spawn(async move {
            for i in (t..N).step_by(4) {
                let r = api
                    .put(
                        &format!("/v1/kv/k{i:03}"),
                        &json!({"i": i, "pad": "p".repeat(i)}),
                    )
                    .await;
                ok(&r, 201);
            }
        }));
    }
    // Some batch and list state too.
    let api = d.api();
    for _ in 0..10 {
        ok(&api.post_empty("/v1/kv/counter/incr").await, 200);
    }
    ok(
        &api.post("/v1/kv/list/rpush", &json!({"values": [1, 2, 3]}))
            .await,
        200,
    );
    for t in tasks {
        t.await.unwrap();
    }
    // Every write above was acknowledged; kill the daemon without warning.
    d.kill9();
    d.restart().await;

    let api = d.api();
    for i in 0..N {
        assert_eq!(
            api.value(&format!("k{i:03}")).await,
            Some(json!({"i": i, "pad": "p".repeat(i)})),
            "k{i:03} lost after SIGKILL"
        );
    }
    assert_eq!(api.value("counter").await, Some(json!(10)));
    assert_eq!(api.value("list").await, Some(json!([1, 2, 3])));
    assert_eq!(api.ns_version(None).await, (N + 11) as u64);
    let l = ok(&api.get("/v1/kv?limit=1000").await, 200);
    assert_eq!(l["count"], N + 2);
}

/// SIGKILL in the middle of a write load, after it ran past a checkpoint: most writes
/// since the last checkpoint exist only in the write-ahead log when the process dies.
/// Every write that was answered is there after the restart, and a write cut off
/// mid-request is either whole or absent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_sigkill_under_load() {
    let mut d = Daemon::start().await;
    const WRITERS: u64 = 8;
    let mut tasks = Vec::new();
    for t in 0..WRITERS {
        let client = d.client();
        tasks.push(tokio::spawn(async move {
            let mut acked = 0u64;
            loop {
                let body = json!({"t": t, "i": acked}).to_string().into_bytes();
                let path = format!("/v1/kv/w{t}-{acked:06}");
                match client.request(hyper::Method::PUT, &path, Some(body)).await {
                    Ok(r) if r.status == 201 => acked += 1,
                    Ok(r) => panic!(
                        "PUT {path}: {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    ),
                    // The daemon died with this request in flight.
                    Err(_) => return acked,
                }
            }
        }));
    }
    // The writer checkpoints the log at least every second under load.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    d.kill9();
    let mut acked = Vec::new();
    for t in tasks {
        acked.push(t.await.unwrap());
    }
    let total: u64 = acked.iter().sum();
    assert!(total >= 50 * WRITERS, "the load hardly ran: {acked:?}");
    d.restart().await;

    let api = d.api();
    let mut checks = Vec::new();
    for (t, &n) in acked.iter().enumerate() {
        let api = d.api();
        checks.push(tokio::spawn(async move {
            for i in 0..n {
                assert_eq!(
                    api.value(&format!("w{t}-{i:06}")).await,
                    Some(json!({"t": t, "i": i})),
                    "w{t}-{i:06} was acknowledged and is lost after SIGKILL"
                );
            }
            // The request in flight at the kill: whole or absent.
            let cut = api.value(&format!("w{t}-{n:06}")).await;
            assert!(
                cut.is_none() || cut == Some(json!({"t": t, "i": n})),
                "{cut:?}"
            );
        }));
    }
    for c in checks {
        c.await.unwrap();
    }
    let version = api.ns_version(None).await;
    assert!(
        (total..=total + WRITERS).contains(&version),
        "version {version} after {total} acknowledged writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_exits_zero_and_removes_the_socket() {
    let mut d = Daemon::start().await;
    ok(&d.api().put("/v1/kv/k", &json!("before term")).await, 201);
    assert!(d.socket.exists());
    // An operator opening the socket up is no reason to leave it behind.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(!d.socket.exists(), "the socket file is still there");
    // And the data is there after a clean stop too.
    d.restart().await;
    assert_eq!(d.api().value("k").await, Some(json!("before term")));
    // SIGINT stops it the same way.
    let status = d.signal_and_wait("INT");
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(
        !d.socket.exists(),
        "the socket file is still there after SIGINT"
    );
    // And SIGHUP (a closed terminal) too: the final sync runs, nothing is lost.
    d.restart().await;
    ok(&d.api().put("/v1/kv/k", &json!("before hup")).await, 200);
    // SIGUSR1 and SIGUSR2 (log rotation, reload tools) are ignored, not a kill.
    for sig in ["-USR1", "-USR2"] {
        let st = std::process::Command::new("kill")
            .args([sig, &d.pid().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(d.is_running(), "log:\n{}", d.log());
    assert_eq!(d.api().value("k").await, Some(json!("before hup")));
    let status = d.signal_and_wait("HUP");
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(d.log().contains("final sync done"), "log:\n{}", d.log());
    d.restart().await;
    assert_eq!(d.api().value("k").await, Some(json!("before hup")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_configuration_refuses_to_start() {
    let d = Daemon::prepare("[kv]\nmax_value_bytez = 5\n");
    let (status, out) = d.run_other_serve(&[], Duration::from_secs(15));
    let status = status.unwrap_or_else(|| panic!("started with an unknown key:\n{out}"));
    assert!(!status.success());
    assert!(
        out.contains("max_value_bytez"),
        "the error must name the key:\n{out}"
    );
    assert!(!d.socket.exists());

    // A dir remote's path that is a file: the error names the key and the path.
    let d = Daemon::prepare("");
    std::fs::remove_dir(&d.remote).unwrap();
    std::fs::write(&d.remote, b"not a directory").unwrap();
    let (status, out) = d.run_other_serve(&[], Duration::from_secs(15));
    let status = status.unwrap_or_else(|| panic!("started on a file as remote:\n{out}"));
    assert!(!status.success());
    assert!(
        out.contains("remote.path") && out.contains(&d.remote.display().to_string()),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_are_encrypted_at_rest_and_a_wrong_key_refuses_to_start() {
    let mut d = Daemon::start().await;
    let marker = "PLAINTEXT-CANARY-7f3a9c-sandkeep";
    let api = d.api();
    ok(
        &api.put("/v1/kv/secret", &json!({"note": marker})).await,
        201,
    );
    ok(&api.put("/v1/kv/plain", &json!(marker)).await, 201);
    ok(
        &api.post("/v1/kv/l/rpush", &json!({"value": marker})).await,
        200,
    );
    assert_eq!(d.terminate().code(), Some(0));

    let db = d.state_dir.join("sandkeep.redb");
    let raw = std::fs::read(&db).unwrap_or_else(|e| panic!("{}: {e}", db.display()));
    assert!(!raw.is_empty());
    let found = raw.windows(marker.len()).any(|w| w == marker.as_bytes());
    assert!(!found, "the redb file holds the value in plaintext");
    // Not in any other file of the state dir either (the generated key file aside).
    for entry in std::fs::read_dir(&d.state_dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            let bytes = std::fs::read(&p).unwrap();
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker.as_bytes()),
                "{} holds the value in plaintext",
                p.display()
            );
        }
    }

    // Another key: the daemon refuses to start.
    let (status, out) = d.run_other_serve(
        &[("SANDKEEP_KV_KEY".into(), OTHER_KV_KEY.into())],
        Duration::from_secs(15),
    );
    let status = status.unwrap_or_else(|| panic!("the daemon started with a wrong key:\n{out}"));
    assert!(!status.success(), "exit {status} with a wrong key:\n{out}");
    assert!(!d.socket.exists() || std::os::unix::net::UnixStream::connect(&d.socket).is_err());

    // A key that is not base64 of 32 bytes: refused as well.
    for bad in ["not base64!", "AAAA"] {
        let (status, out) = d.run_other_serve(
            &[("SANDKEEP_KV_KEY".into(), bad.into())],
            Duration::from_secs(15),
        );
        let status = status.unwrap_or_else(|| panic!("started with key {bad:?}:\n{out}"));
        assert!(!status.success(), "{bad:?}: {out}");
    }

    // The right key still opens it.
    d.restart().await;
    assert_eq!(d.api().value("secret").await, Some(json!({"note": marker})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_daemon_on_the_same_state_dir_exits_and_the_first_keeps_serving() {
    let d = Daemon::start().await;
    ok(&d.api().put("/v1/kv/k", &json!(1)).await, 201);
    // Same config: same state dir, same socket.
    let (status, out) = d.run_other_serve(&[], Duration::from_secs(15));
    let status = status.unwrap_or_else(|| panic!("a second daemon kept running:\n{out}"));
    assert!(!status.success(), "second daemon exited with {status}");
    assert!(
        out.to_lowercase().contains("lock") || out.contains("another sandkeep daemon"),
        "the error does not mention the lock:\n{out}"
    );
    // The first one still answers on its socket.
    let api = d.api();
    assert_eq!(api.value("k").await, Some(json!(1)));
    ok(&api.put("/v1/kv/k", &json!(2)).await, 200);
    assert_eq!(ok(&api.get("/readyz").await, 200)["status"], "ready");
}

/// A state directory holds one conversation's state: a daemon configured for another
/// conversation refuses it (its KV and mirror cache would go out under the wrong name).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_state_dir_of_another_conversation_is_refused() {
    let mut d = Daemon::start().await;
    ok(&d.api().put("/v1/kv/k", &json!(1)).await, 201);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    let (status, out) = d.run_other_serve(
        &[("SANDKEEP_IDENTITY_CONVERSATION".into(), "c2".into())],
        Duration::from_secs(15),
    );
    let status =
        status.unwrap_or_else(|| panic!("started on another conversation's state:\n{out}"));
    assert!(!status.success(), "exit {status}:\n{out}");
    assert!(out.contains("u1/c1") && out.contains("u1/c2"), "{out}");
    // Its own conversation still opens it, with its data (a record edited by hand
    // without its newline included).
    std::fs::write(d.state_dir.join("identity"), "u1/c1").unwrap();
    d.spawn_and_wait().await;
    assert_eq!(d.api().value("k").await, Some(json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn second_daemon_on_a_live_socket_is_refused() {
    let first = Daemon::start().await;
    // Another state dir, but the first daemon's socket.
    let second = Daemon::prepare("");
    let text = std::fs::read_to_string(&second.config_path).unwrap();
    let text = text.replace(
        &format!("{:?}", second.socket.display().to_string()),
        &format!("{:?}", first.socket.display().to_string()),
    );
    std::fs::write(&second.config_path, text).unwrap();
    let (status, out) = second.run_other_serve(&[], Duration::from_secs(15));
    let status = status.unwrap_or_else(|| panic!("the second daemon kept running:\n{out}"));
    assert!(!status.success());
    assert!(out.contains("socket"), "{out}");
    assert_eq!(ok(&first.api().get("/healthz").await, 200)["status"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_socket_file_is_replaced_at_start() {
    let mut d = Daemon::prepare("");
    {
        let l = std::os::unix::net::UnixListener::bind(&d.socket).unwrap();
        drop(l);
    }
    assert!(
        std::fs::symlink_metadata(&d.socket)
            .unwrap()
            .file_type()
            .is_socket(),
        "the stale socket file must exist before the start"
    );
    d.spawn_and_wait().await;
    ok(&d.api().put("/v1/kv/k", &json!(1)).await, 201);
    assert!(d.log().contains("stale"), "log:\n{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_regular_file_at_the_socket_path_is_left_alone() {
    let d = Daemon::prepare("");
    std::fs::write(&d.socket, "not a socket").unwrap();
    let (status, out) = d.run_other_serve(&[], Duration::from_secs(15));
    let status = status.unwrap_or_else(|| panic!("the daemon replaced a regular file:\n{out}"));
    assert!(!status.success());
    assert_eq!(std::fs::read_to_string(&d.socket).unwrap(), "not a socket");
    // Nothing was created that a corrected start would trip on (a generated key that
    // does not match the one configured next).
    for made in ["kv.key", "sandkeep.redb", "identity"] {
        assert!(!d.state_dir.join(made).exists(), "{made} created:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_readiness_status_and_metrics() {
    let d = Daemon::start().await;
    let api = d.api();
    assert_eq!(ok(&api.get("/healthz").await, 200), json!({"status": "ok"}));
    assert_eq!(
        ok(&api.get("/readyz").await, 200),
        json!({"status": "ready"})
    );
    // The socket has the default mode 0660; the generated KV key is 0600, base64 of
    // 32 bytes.
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");
    let key_file = d.state_dir.join("kv.key");
    let kmode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(kmode, 0o600, "kv.key mode {kmode:o}");
    let key_text = std::fs::read_to_string(&key_file).unwrap();
    assert_eq!(
        key_text.trim().len(),
        44,
        "not base64 of 32 bytes: {key_text:?}"
    );
    // JSON answers say so, errors included.
    for r in [
        api.get("/readyz").await,
        api.get("/v1/kv/missing").await,
        api.put("/v1/kv/%24x", &json!(1)).await,
    ] {
        assert_eq!(
            r.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{r:?}"
        );
    }
    // Any Host header is accepted (curl --unix-socket sends `localhost`).
    let r = crate::util::raw_request(
        &d.socket,
        "GET /healthz HTTP/1.1\r\nHost: whatever.example:1234\r\nConnection: close\r\n\r\n"
            .to_string(),
        0,
        false,
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");

    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    assert_error(&api.put("/v1/kv/k?nx=true", &json!(1)).await, 409, "exists");
    // Requests refused for their key count too (the operation is known from the route).
    assert_error(
        &api.put("/v1/kv/%24r", &json!(1)).await,
        400,
        "reserved_key",
    );
    assert_error(&api.get("/v1/kv/a%00b").await, 400, "invalid_key");
    assert_error(
        &api.post("/v1/kv/%24r/incr", &json!({})).await,
        400,
        "reserved_key",
    );
    let s = ok(&api.get("/v1/status").await, 200);
    assert_eq!(s["state"], "ready");
    assert_eq!(s["user"], "u1");
    assert_eq!(s["conversation"], "c1");
    assert_eq!(s["kv"]["namespaces"], 1);
    assert_eq!(s["kv"]["bytes"], 2, "{s}");

    let r = api.get("/metrics").await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body).to_string();
    assert!(text.contains("sandkeep_kv_ops_total"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("sandkeep_kv_ops_total{")
            && l.contains("op=\"set\"")
            && l.contains("status=\"201\"")),
        "no set/201 sample:\n{text}"
    );
    for sample in [
        "sandkeep_kv_ops_total{op=\"set\",status=\"400\"} ",
        "sandkeep_kv_ops_total{op=\"get\",status=\"400\"} ",
        "sandkeep_kv_ops_total{op=\"incr\",status=\"400\"} ",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(sample)),
            "no {sample}:\n{text}"
        );
    }
    assert!(text.contains("sandkeep_kv_conflicts_total"), "{text}");
    assert!(text.contains("sandkeep_kv_op_duration_seconds"), "{text}");
    // The writer's counts: one successful write so far, in at least one commit group.
    let counter = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name}:\n{text}"))
    };
    assert_eq!(counter("sandkeep_kv_committed_writes_total"), 1, "{text}");
    assert!(counter("sandkeep_kv_commits_total") >= 1, "{text}");
    assert!(counter("sandkeep_kv_checkpoints_total") >= 1, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn post_shutdown_answers_202_and_exits_zero() {
    let mut d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!("kept")).await, 201);
    let r = api.post_empty("/v1/shutdown").await;
    assert_eq!(r.status, 202, "{r:?}");
    let status = d.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(!d.socket.exists(), "the socket file is still there");
    d.restart().await;
    assert_eq!(d.api().value("k").await, Some(json!("kept")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_ends_when_the_daemon_shuts_down() {
    let mut d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    let w = api.clone();
    let mut watch = tokio::spawn(async move {
        w.request_within(
            Duration::from_secs(30),
            hyper::Method::GET,
            "/v1/kv/k/watch?timeout_s=120",
            None,
        )
        .await
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), &mut watch)
            .await
            .is_err()
    );
    let started = std::time::Instant::now();
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a pending watch held the shutdown for {:?}",
        started.elapsed()
    );
    let r = tokio::time::timeout(Duration::from_secs(5), watch)
        .await
        .expect("the watch did not end with the daemon")
        .unwrap();
    assert_error(&r, 503, "shutting_down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_racing_a_sigterm_are_either_kept_or_refused() {
    let mut d = Daemon::start().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..4 {
        let client = d.client();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut refused = Vec::new();
            for i in 0..100_000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let key = format!("t{t}-{i:06}");
                let body = json!({"t": t, "i": i}).to_string().into_bytes();
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.request(hyper::Method::PUT, &format!("/v1/kv/{key}"), Some(body)),
                )
                .await;
                match r {
                    Ok(Ok(r)) if r.status == 201 => acked.push(key),
                    Ok(Ok(r)) => refused.push((r.status, r.json())),
                    // The daemon closed the connection or is gone.
                    Ok(Err(_)) => break,
                    Err(_) => panic!("a PUT hung during shutdown"),
                }
            }
            (acked, refused)
        }));
    }
    // Let the writers get going, then stop the daemon under them.
    let api = d.api();
    let started =
        crate::util::poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
            let api = api.clone();
            async move {
                let n = ok(&api.get("/v1/kv?limit=1000").await, 200)["count"]
                    .as_u64()
                    .unwrap();
                (n >= 100).then_some(())
            }
        })
        .await;
    assert!(started.is_some(), "the writers made no progress");
    let status = d.terminate();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
    let mut acked = Vec::new();
    for t in tasks {
        let (a, refused) = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("writers did not stop")
            .unwrap();
        for (status, body) in refused {
            assert_eq!(status, 503, "a write during shutdown got {status} {body}");
            assert_eq!(body["error"], "shutting_down", "{body}");
        }
        acked.extend(a);
    }
    assert!(!acked.is_empty());

    d.restart().await;
    let api = d.api();
    let mut present = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/kv?limit=1000&cursor={c}"),
            None => "/v1/kv?limit=1000".to_string(),
        };
        let body = ok(&api.get(&path).await, 200);
        for k in body["keys"].as_array().unwrap() {
            present.insert(k.as_str().unwrap().to_string());
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let lost: Vec<&String> = acked.iter().filter(|k| !present.contains(*k)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost over a SIGTERM, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
}
