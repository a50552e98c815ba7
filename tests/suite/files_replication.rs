//! The file store routes and the replication of the KV store and the file store:
//! `/v1/files` status codes, the mirror at `conversations/<u>/<c>/<path>`, encrypted
//! `kv/<namespace>.kv` exports after writes settle and in the final sync, and a new
//! state directory that brings both back exactly (values, versions, timestamps, TTLs).

use std::path::PathBuf;
use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};

use crate::s3_server::S3Server;
use sandkeep::auth::{Scope, mint};

use crate::util::{Daemon, EXIT_TIMEOUT, SECRET, assert_error, ok, poll_until};

const CONV: &str = "conversations/u1/c1";

fn object(d: &Daemon, rel: &str) -> PathBuf {
    d.remote.join(CONV).join(rel)
}

/// Removes the state directory (database, manifest cache, key) as a new sandbox has it.
fn wipe_state(d: &Daemon) {
    std::fs::remove_dir_all(&d.state_dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_routes_answer_as_the_api_says() {
    let d = Daemon::start_with("[files]\nmax_file_bytes = 1024\n").await;
    let api = d.api();
    let r = api
        .raw(Method::PUT, "/v1/files/events/e2.json", b"two")
        .await;
    assert_eq!(ok(&r, 201)["created"], true);
    ok(
        &api.raw(Method::PUT, "/v1/files/base_state.json", b"{}")
            .await,
        201,
    );
    ok(
        &api.raw(Method::PUT, "/v1/files/events/e1.json", b"one")
            .await,
        201,
    );
    let r = api
        .raw(Method::PUT, "/v1/files/events/e1.json", b"ONE")
        .await;
    assert_eq!(ok(&r, 200)["created"], false);

    let r = api.get("/v1/files/events/e1.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], b"ONE");
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/octet-stream"
    );
    let head = api
        .request_within(
            Duration::from_secs(10),
            Method::HEAD,
            "/v1/files/events/e1.json",
            None,
        )
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let head = api
        .request_within(
            Duration::from_secs(10),
            Method::HEAD,
            "/v1/files/nope",
            None,
        )
        .await;
    assert_eq!(head.status, 404);
    assert_error(&api.get("/v1/files/nope.json").await, 404, "not_found");

    let l = ok(&api.get("/v1/files").await, 200);
    assert_eq!(
        l["paths"],
        json!(["base_state.json", "events/e1.json", "events/e2.json"])
    );
    let l = ok(&api.get("/v1/files?prefix=events/").await, 200);
    assert_eq!(l["paths"], json!(["events/e1.json", "events/e2.json"]));

    // if_absent: an existing file is 412 and stays as it was.
    let r = api
        .raw(Method::PUT, "/v1/files/events/e1.json?if_absent=true", b"x")
        .await;
    assert_error(&r, 412, "exists");
    assert_eq!(&api.get("/v1/files/events/e1.json").await.body[..], b"ONE");
    let r = api
        .raw(Method::PUT, "/v1/files/events/e3.json?if_absent=true", b"3")
        .await;
    ok(&r, 201);

    // Too large: 413 with the limit and the size.
    let big = vec![b'x'; 1025];
    let e = assert_error(
        &api.raw(Method::PUT, "/v1/files/big.bin", &big).await,
        413,
        "too_large",
    );
    assert_eq!(e["limit_bytes"], 1024);
    assert_eq!(e["current_size_bytes"], 1025);
    ok(
        &api.raw(Method::PUT, "/v1/files/fits.bin", &big[..1024])
            .await,
        201,
    );

    // Paths: reserved top-level names, dot segments, control characters.
    for bad in [
        "/v1/files/workspace/x",
        "/v1/files/kv/default.kv",
        "/v1/files/.sandkeep/owner.json",
        "/v1/files/a/%2E%2E/b",
        "/v1/files/a/./b",
        "/v1/files/a%07b",
        "/v1/files/a%2F%2Fb",
    ] {
        assert_error(&api.raw(Method::PUT, bad, b"x").await, 400, "invalid_path");
        assert_error(&api.get(bad).await, 400, "invalid_path");
    }
    let long = format!("/v1/files/{}", "s".repeat(256));
    assert_error(
        &api.raw(Method::PUT, &long, b"x").await,
        400,
        "invalid_path",
    );
    assert_error(
        &api.raw(Method::PUT, "/v1/files/x?bogus=1", b"x").await,
        400,
        "invalid_param",
    );

    let r = api.delete("/v1/files/events/e2.json").await;
    assert_eq!(ok(&r, 200)["deleted"], true);
    let r = api.delete("/v1/files/events/e2.json").await;
    assert_eq!(ok(&r, 200)["deleted"], false);
    assert_error(&api.get("/v1/files/events/e2.json").await, 404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_mirrored_path_for_path_and_sync_true_waits_for_it() {
    // A replicate delay long enough that only sync=true or /v1/sync can explain an upload.
    let d = Daemon::start_with("[kv]\nreplicate_delay = \"1h\"\n").await;
    let api = d.api();
    let r = api
        .raw(
            Method::PUT,
            "/v1/files/events/e1.json?sync=true",
            b"{\"a\":1}",
        )
        .await;
    ok(&r, 201);
    assert_eq!(
        std::fs::read(object(&d, "events/e1.json")).unwrap(),
        b"{\"a\":1}",
        "sync=true answered before the file was in remote storage"
    );
    // Without sync=true, POST /v1/sync is the barrier for files and deletions too.
    ok(
        &api.raw(Method::PUT, "/v1/files/base_state.json", b"state")
            .await,
        201,
    );
    ok(&api.delete("/v1/files/events/e1.json").await, 200);
    ok(&api.post("/v1/sync", &json!({})).await, 200);
    assert_eq!(
        std::fs::read(object(&d, "base_state.json")).unwrap(),
        b"state"
    );
    assert!(!object(&d, "events/e1.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_the_store_takes_reaches_the_dir_remote() {
    let d = Daemon::start().await;
    let api = d.api();
    // A segment of 255 bytes, the most a path may have (and a file system allows).
    let long = "s".repeat(255);
    let r = api
        .raw(Method::PUT, &format!("/v1/files/{long}?sync=true"), b"L")
        .await;
    ok(&r, 201);
    assert_eq!(std::fs::read(object(&d, &long)).unwrap(), b"L");
    // A file and a directory cannot share a name: refused both ways, before anything
    // is stored that could never be mirrored.
    ok(&api.raw(Method::PUT, "/v1/files/x1", b"f").await, 201);
    let e = assert_error(
        &api.raw(Method::PUT, "/v1/files/x1/y", b"g").await,
        400,
        "invalid_path",
    );
    assert!(
        e["message"].as_str().unwrap().contains("`x1` is a file"),
        "{e}"
    );
    ok(&api.raw(Method::PUT, "/v1/files/d/e/f", b"h").await, 201);
    for clash in ["/v1/files/d", "/v1/files/d/e"] {
        assert_error(
            &api.raw(Method::PUT, clash, b"i").await,
            400,
            "invalid_path",
        );
    }
    // Replacing the file itself is fine; once `x1` is gone, `x1/y` may be stored.
    ok(&api.raw(Method::PUT, "/v1/files/x1", b"F").await, 200);
    ok(&api.delete("/v1/files/x1").await, 200);
    ok(
        &api.raw(Method::PUT, "/v1/files/x1/y?sync=true", b"g").await,
        201,
    );
    assert_eq!(std::fs::read(object(&d, "x1/y")).unwrap(), b"g");
    assert_eq!(std::fs::read(object(&d, "d/e/f")).unwrap(), b"h");
    // Nothing is stuck: a sync answers at once.
    ok(&api.post("/v1/sync", &json!({"timeout_s": 10})).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_exports_follow_writes_after_the_replicate_delay_and_hold_no_plaintext() {
    let d = Daemon::start_with("[kv]\nreplicate_delay = \"300ms\"\n").await;
    let api = d.api();
    let secret = "plaintext-canary-5f1e2d";
    ok(&api.put("/v1/kv/k", &json!({"s": secret})).await, 201);
    ok(&api.put("/v1/kv/k2?ns=other", &json!(secret)).await, 201);
    // Both namespaces get exported (one pass or two: a slow machine may let the
    // replicate delay pass between the two writes).
    let (export, other) = (object(&d, "kv/default.kv"), object(&d, "kv/other.kv"));
    let found = poll_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async { (export.exists() && other.exists()).then_some(()) },
    )
    .await;
    assert!(found.is_some(), "no export without an explicit sync");
    for f in ["kv/default.kv", "kv/other.kv"] {
        let bytes = std::fs::read(object(&d, f)).unwrap();
        assert!(bytes.starts_with(b"SANDKEEP-KV-EXPORT 1\n"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(secret), "{f} holds plaintext");
        assert!(
            !text.contains("\"s\""),
            "{f} holds plaintext keys of values"
        );
    }
    // A later write is exported again.
    ok(&api.put("/v1/kv/k", &json!(2)).await, 200);
    let key = sandkeep::kv::crypto::Cipher::from_base64(&d.generated_key()).unwrap();
    let version = poll_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            let bytes = std::fs::read(object(&d, "kv/default.kv")).ok()?;
            let (v, _) = sandkeep::kv::export::inspect(&key, "default", &bytes).ok()?;
            (v == 2).then_some(v)
        },
    )
    .await;
    assert_eq!(version, Some(2));
    // Another key cannot read it, and an export cannot pass for another namespace.
    let bytes = std::fs::read(object(&d, "kv/default.kv")).unwrap();
    let other = sandkeep::kv::crypto::Cipher::new(&[7; 32]);
    assert!(sandkeep::kv::export::inspect(&other, "default", &bytes).is_err());
    assert!(sandkeep::kv::export::inspect(&key, "other", &bytes).is_err());
}

/// Everything `GET` shows of a key, metadata included.
async fn full(api: &crate::util::Api, ns: &str, key: &str) -> Value {
    ok(
        &api.get(&format!("/v1/kv/{key}?ns={ns}&meta=true")).await,
        200,
    )
}

async fn stores_survive_a_new_state_dir(d: &mut Daemon) {
    let api = d.api();
    ok(
        &api.put("/v1/kv/a?ns=conversation", &json!({"n": 1})).await,
        201,
    );
    ok(
        &api.put("/v1/kv/a?ns=conversation", &json!({"n": 2})).await,
        200,
    );
    ok(
        &api.post_empty("/v1/kv/count/incr?ns=conversation").await,
        200,
    );
    ok(
        &api.put("/v1/kv/t?ns=conversation&ttl=3600", &json!("ttl"))
            .await,
        201,
    );
    ok(
        &api.put("/v1/kv/gone?ns=conversation", &json!(1)).await,
        201,
    );
    ok(&api.delete("/v1/kv/gone?ns=conversation").await, 200);
    ok(
        &api.put("/v1/kv/x?ns=automation:42", &json!([1, 2])).await,
        201,
    );
    ok(
        &api.raw(
            Method::PUT,
            "/v1/files/events/event-00001-a.json",
            b"{\"e\":1}",
        )
        .await,
        201,
    );
    ok(
        &api.raw(Method::PUT, "/v1/files/base_state.json", &[0u8, 1, 2, 255])
            .await,
        201,
    );
    let mut before = Vec::new();
    for (ns, key) in [
        ("conversation", "a"),
        ("conversation", "count"),
        ("conversation", "t"),
        ("automation:42", "x"),
    ] {
        before.push(full(&api, ns, key).await);
    }
    let versions = (
        api.ns_version(Some("conversation")).await,
        api.ns_version(Some("automation:42")).await,
    );
    // No explicit sync: the final sync must carry everything.
    let status = d.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());

    let key = d.generated_key();
    wipe_state(d);
    // What a first start that died before recording anything (a full disk) leaves: a
    // database that holds nothing. Still a new state directory.
    std::fs::create_dir_all(&d.state_dir).unwrap();
    drop(redb::Database::create(sandkeep::kv::store::db_path(&d.state_dir)).unwrap());
    d.set_env("SANDKEEP_KV_KEY", &key);
    d.spawn_and_wait().await;
    let api = d.api();
    let mut after = Vec::new();
    for (ns, k) in [
        ("conversation", "a"),
        ("conversation", "count"),
        ("conversation", "t"),
        ("automation:42", "x"),
    ] {
        after.push(full(&api, ns, k).await);
    }
    assert_eq!(before, after);
    assert_eq!(
        (
            api.ns_version(Some("conversation")).await,
            api.ns_version(Some("automation:42")).await
        ),
        versions
    );
    assert_error(
        &api.get("/v1/kv/gone?ns=conversation").await,
        404,
        "not_found",
    );
    let l = ok(&api.get("/v1/files").await, 200);
    assert_eq!(
        l["paths"],
        json!(["base_state.json", "events/event-00001-a.json"])
    );
    assert_eq!(
        &api.get("/v1/files/base_state.json").await.body[..],
        &[0u8, 1, 2, 255]
    );
    // The restored stores go on: a write bumps the restored version.
    let r = ok(&api.put("/v1/kv/a?ns=conversation", &json!(3)).await, 200);
    assert_eq!(r["version"], versions.0 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_files_come_back_in_a_new_state_dir_dir_remote() {
    let mut d = Daemon::start_with("[kv]\nreplicate_delay = \"1h\"\n").await;
    stores_survive_a_new_state_dir(&mut d).await;
}

/// A new sandbox started without the KV key cannot read the exports: it starts, says
/// so in its log and status, and keeps each export under another name, so that its own
/// exports of the namespace do not destroy the only copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_sealed_with_another_key_is_kept_not_overwritten() {
    let mut d = Daemon::start_with("[kv]\nreplicate_delay = \"1h\"\n").await;
    ok(
        &d.api()
            .put("/v1/kv/a?ns=conversation", &json!("precious"))
            .await,
        201,
    );
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    let export = object(&d, "kv/conversation.kv");
    let original = std::fs::read(&export).unwrap();

    wipe_state(&d); // and with it the generated key: the new daemon makes another
    d.spawn_and_wait().await;
    let api = d.api();
    assert_error(&api.get("/v1/kv/a?ns=conversation").await, 404, "not_found");
    let status = ok(&api.get("/v1/status").await, 200);
    let bad = &status["restore"]["stores"]["bad"];
    assert_eq!(bad.as_array().map(Vec::len), Some(1), "{status}");
    assert!(
        bad[0]["error"]
            .as_str()
            .unwrap()
            .contains("cannot be decrypted"),
        "{bad}"
    );
    let kept = bad[0]["kept_as"].as_str().unwrap().to_string();
    let kept_path = d.remote.join(&kept);
    assert_eq!(std::fs::read(&kept_path).unwrap(), original);
    assert!(d.log().contains("kv namespace not restored"), "{}", d.log());

    // The namespace goes on empty here; its next export replaces `conversation.kv`
    // and leaves the kept copy as it was.
    ok(&api.put("/v1/kv/b?ns=conversation", &json!(1)).await, 201);
    ok(&api.post("/v1/sync", &json!({})).await, 200);
    assert_ne!(std::fs::read(&export).unwrap(), original);
    assert_eq!(std::fs::read(&kept_path).unwrap(), original);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_files_come_back_in_a_new_state_dir_s3_remote() {
    let s3 = S3Server::start().await;
    let mut d = Daemon::prepare("[kv]\nreplicate_delay = \"1h\"\n");
    s3.configure(&d);
    d.spawn_and_wait().await;
    stores_survive_a_new_state_dir(&mut d).await;
    // The objects are where the layout says, and plain for the file store.
    assert_eq!(
        s3.object(&format!("{CONV}/events/event-00001-a.json"))
            .as_deref(),
        Some(&b"{\"e\":1}"[..])
    );
    assert!(s3.object(&format!("{CONV}/kv/conversation.kv")).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_file_changes_survive_sigkill() {
    let mut d = Daemon::start_with("[kv]\nreplicate_delay = \"1h\"\n").await;
    ok(
        &d.api().raw(Method::PUT, "/v1/files/a.json", b"a").await,
        201,
    );
    ok(&d.api().put("/v1/kv/k", &json!(1)).await, 201);
    assert!(!object(&d, "a.json").exists());
    d.kill9();
    // The restart owes both changes to the remote and delivers them at once.
    d.spawn_and_wait().await;
    let up = poll_until(
        Duration::from_secs(10),
        Duration::from_millis(100),
        || async {
            (object(&d, "a.json").exists() && object(&d, "kv/default.kv").exists()).then_some(())
        },
    )
    .await;
    assert!(
        up.is_some(),
        "pending changes not uploaded after the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_the_final_sync_get_shutting_down() {
    let mut s3 = S3Server::start().await;
    let mut d = Daemon::prepare("[shutdown]\ndeadline = \"4s\"\n");
    s3.configure(&d);
    d.spawn_and_wait().await;
    ok(&d.api().put("/v1/kv/k", &json!(1)).await, 201);
    // Remote storage is gone: the final sync retries until the deadline.
    s3.stop();
    ok(&d.api().post_empty("/v1/shutdown").await, 202);
    let api = d.api();
    assert_error(&api.put("/v1/kv/k", &json!(2)).await, 503, "shutting_down");
    assert_error(
        &api.raw(Method::PUT, "/v1/files/f", b"x").await,
        503,
        "shutting_down",
    );
    assert_eq!(api.get("/readyz").await.status, 503);
    // Nor are snapshots or bundles begun (their writes would keep the conversation).
    assert_error(&api.post_empty("/v1/snapshots").await, 503, "shutting_down");
    assert_error(
        &api.post_empty("/v1/git/bundle").await,
        503,
        "shutting_down",
    );
    // Reads still answer.
    assert_eq!(api.value("k").await, Some(json!(1)));
    let status = d.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(75), "log:\n{}", d.log());
    let log = d.log();
    assert!(log.contains("kv and file store exports"), "{log}");
    s3.restart().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_scopes_are_enforced_with_tokens() {
    let d = Daemon::start_token().await;
    let mint = |scopes: &[Scope]| {
        let hour = Duration::from_secs(3600);
        mint(SECRET, &["default".to_string()], scopes, hour, hour, None).unwrap()
    };
    let reader = d.api_with_token(&mint(&[Scope::FilesRead]));
    let writer = d.api_with_token(&mint(&[Scope::FilesWrite, Scope::FilesRead]));
    let kv_only = d.api_with_token(&mint(&[Scope::KvRead, Scope::KvWrite]));
    assert_error(
        &reader.raw(Method::PUT, "/v1/files/f", b"x").await,
        403,
        "forbidden",
    );
    ok(&writer.raw(Method::PUT, "/v1/files/f", b"x").await, 201);
    assert_eq!(&reader.get("/v1/files/f").await.body[..], b"x");
    assert_error(&kv_only.get("/v1/files/f").await, 403, "forbidden");
    assert_error(&d.api().get("/v1/files/f").await, 401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_timeout_says_which_part_is_behind() {
    let d = Daemon::start().await;
    let api = d.api();
    // A file where the KV exports' directory should be: exports fail, the workspace
    // mirror does not.
    std::fs::create_dir_all(d.remote.join(CONV)).unwrap();
    std::fs::write(object(&d, "kv"), "in the way").unwrap();
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    std::fs::write(d.workspace.join("w.txt"), "w").unwrap();
    let r = api.post("/v1/sync", &json!({"timeout_s": 3})).await;
    let e = assert_error(&r, 504, "timeout");
    assert_eq!(e["pending"]["workspace"], false, "{e}");
    assert_eq!(e["pending"]["stores"], true, "{e}");
    assert!(e["message"].as_str().unwrap().contains("last error"), "{e}");
    assert!(object(&d, "workspace/files/w.txt").exists());
    // The exports failing is a degraded state, whatever the workspace mirror says.
    let status = ok(&api.get("/v1/status").await, 200);
    assert_eq!(status["state"], "degraded", "{status}");
    std::fs::remove_file(object(&d, "kv")).unwrap();
    ok(&api.post("/v1/sync", &json!({"timeout_s": 60})).await, 200);
    assert!(object(&d, "kv/default.kv").exists());
    assert_eq!(ok(&api.get("/v1/status").await, 200)["state"], "ready");

    // Only the git bundles behind: the message says why too.
    crate::util::fs::git(&d.workspace, &["init", "-q"]);
    std::fs::write(object(&d, "workspace/git"), "in the way").unwrap();
    let r = api.post("/v1/sync", &json!({"timeout_s": 3})).await;
    let e = assert_error(&r, 504, "timeout");
    assert_eq!(e["pending"]["git"], true, "{e}");
    assert_eq!(e["pending"]["workspace"], false, "{e}");
    assert_eq!(e["pending"]["stores"], false, "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(message.contains("git bundle of ."), "{e}");
    std::fs::remove_file(object(&d, "workspace/git")).unwrap();
    ok(&api.post("/v1/sync", &json!({"timeout_s": 60})).await, 200);
    assert!(object(&d, "workspace/git/workspace.bundle").exists());
}

/// A sandbox that comes back (its state directory kept) after another daemon owned the
/// conversation takes in what that daemon exported before it serves anything: its own
/// stale namespace must not be exported over the newer one. Its file store takes in the
/// files the other daemon changed, added and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_sandbox_takes_in_what_the_other_owner_exported() {
    let mut d = Daemon::start_with("[kv]\nreplicate_delay = \"1h\"\n").await;
    let api = d.api();
    ok(&api.put("/v1/kv/shared?ns=c", &json!("a")).await, 201);
    ok(&api.put("/v1/kv/other?ns=d", &json!("a-only")).await, 201);
    for (path, body) in [
        ("state.json", "a"),
        ("events/1.json", "a"),
        ("gone.json", "a"),
        ("dir", "a file that becomes a directory"),
    ] {
        let url = format!("/v1/files/{path}");
        ok(&api.raw(Method::PUT, &url, body.as_bytes()).await, 201);
    }
    // Another sandbox (a new state directory) owns the conversation and writes.
    let kept = hand_over(&mut d).await;
    let api = d.api();
    assert_eq!(api.value_in(Some("c"), "shared").await, Some(json!("a")));
    ok(&api.put("/v1/kv/shared?ns=c", &json!("b")).await, 200);
    ok(&api.put("/v1/kv/b_only?ns=c", &json!(1)).await, 201);
    ok(
        &api.raw(Method::PUT, "/v1/files/state.json", b"b").await,
        200,
    );
    ok(
        &api.raw(Method::PUT, "/v1/files/events/2.json", b"b").await,
        201,
    );
    ok(&api.delete("/v1/files/gone.json").await, 200);
    ok(&api.delete("/v1/files/dir").await, 200);
    ok(
        &api.raw(Method::PUT, "/v1/files/dir/inside", b"b").await,
        201,
    );
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    // The first one comes back on its old state directory.
    wipe_state(&d);
    std::fs::rename(&kept, &d.state_dir).unwrap();
    d.spawn_and_wait().await;
    let api = d.api();
    assert_eq!(api.value_in(Some("c"), "shared").await, Some(json!("b")));
    assert_eq!(api.value_in(Some("c"), "b_only").await, Some(json!(1)));
    assert_eq!(
        api.value_in(Some("d"), "other").await,
        Some(json!("a-only"))
    );
    let file = |path: &'static str| {
        let api = d.api();
        async move {
            let r = api.get(&format!("/v1/files/{path}")).await;
            (r.status == 200).then(|| String::from_utf8(r.body.to_vec()).unwrap())
        }
    };
    assert_eq!(file("state.json").await.as_deref(), Some("b"));
    assert_eq!(file("events/1.json").await.as_deref(), Some("a"));
    assert_eq!(file("events/2.json").await.as_deref(), Some("b"));
    assert_eq!(file("gone.json").await, None);
    assert_eq!(file("dir").await, None);
    assert_eq!(file("dir/inside").await.as_deref(), Some("b"));
    let status = ok(&api.get("/v1/status").await, 200);
    let stores = &status["restore"]["stores"];
    assert_eq!(
        stores["replaced_files"],
        json!(["dir/inside", "events/2.json", "state.json"]),
        "{status}"
    );
    assert_eq!(
        stores["removed_files"],
        json!(["dir", "gone.json"]),
        "{status}"
    );
    assert_eq!(stores["replaced_namespaces"], json!(["c"]), "{status}");
    ok(&api.put("/v1/kv/shared?ns=c", &json!("c")).await, 200);
    ok(
        &api.raw(Method::PUT, "/v1/files/state.json", b"c").await,
        200,
    );
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    // What the remote holds now: every owner's work, the last write last.
    wipe_state(&d);
    d.spawn_and_wait().await;
    let api = d.api();
    assert_eq!(api.value_in(Some("c"), "shared").await, Some(json!("c")));
    assert_eq!(api.value_in(Some("c"), "b_only").await, Some(json!(1)));
    assert_eq!(
        api.value_in(Some("d"), "other").await,
        Some(json!("a-only"))
    );
    let r = api.get("/v1/files/state.json").await;
    assert_eq!((r.status, &r.body[..]), (200, &b"c"[..]));
    assert_eq!(api.get("/v1/files/gone.json").await.status, 404);
}

/// Stops the running sandbox, keeps its state directory aside (returned), and starts
/// another one on a new state directory with the same KV key.
async fn hand_over(d: &mut Daemon) -> PathBuf {
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    let key = d.generated_key();
    let kept = d.root().join("first-state");
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(&d.state_dir)
        .arg(&kept)
        .status()
        .unwrap();
    assert!(st.success());
    wipe_state(d);
    d.set_env("SANDKEEP_KV_KEY", &key);
    d.spawn_and_wait().await;
    kept
}

/// Two sandboxes of one conversation, one after the other: the running first one
/// writes `shared` = "a" in namespace `c` and stops, and its state directory is kept
/// aside (returned); a second one (a new state directory, the same KV key) writes
/// `shared` = "b" and `b_only` = 1 there and stops.
async fn first_then_second_owner(d: &mut Daemon) -> PathBuf {
    ok(&d.api().put("/v1/kv/shared?ns=c", &json!("a")).await, 201);
    let kept = hand_over(d).await;
    ok(&d.api().put("/v1/kv/shared?ns=c", &json!("b")).await, 200);
    ok(&d.api().put("/v1/kv/b_only?ns=c", &json!(1)).await, 201);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    kept
}

/// A sandbox that took the conversation over and was killed before it took in what the
/// other owner exported finds its own record in `owner.json` at the next start: it
/// still takes in first (the state directory remembers that it owes it), so its first
/// write does not export its stale namespace over the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_in_cut_short_is_done_at_the_next_start() {
    let mut d = Daemon::start_with("[kv]\nreplicate_delay = \"1h\"\n").await;
    let kept = first_then_second_owner(&mut d).await;

    // The first one came back, claimed (owner.json names it now, and it noted the
    // take-in it owes before sending the claim) and was killed before the take-in.
    let owner = d.remote.join("conversations/u1/c1/.sandkeep/owner.json");
    let mut record: Value = serde_json::from_slice(&std::fs::read(&owner).unwrap()).unwrap();
    let first = std::fs::read_to_string(kept.join("owner-id")).unwrap();
    record["instance"] = json!(first.trim());
    std::fs::write(&owner, serde_json::to_vec(&record).unwrap()).unwrap();
    std::fs::write(kept.join("take-in-owed"), "").unwrap();
    wipe_state(&d);
    std::fs::rename(&kept, &d.state_dir).unwrap();
    d.spawn_and_wait().await;
    let api = d.api();
    assert_eq!(api.value_in(Some("c"), "shared").await, Some(json!("b")));
    let status = ok(&api.get("/v1/status").await, 200);
    assert_eq!(
        status["restore"]["stores"]["replaced_namespaces"],
        json!(["c"]),
        "{status}"
    );
    assert!(!d.state_dir.join("take-in-owed").exists());
}

/// A sandbox that comes back while remote storage does not answer starts without
/// owning the conversation and claims it in the background once storage is back. If
/// another daemon owned it meanwhile, what that one exported is taken in then, before
/// this daemon writes anything: its stale namespace must not go over the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_won_in_the_background_takes_in_what_the_other_owner_exported() {
    let mut s3 = S3Server::start().await;
    let mut d = Daemon::prepare("[kv]\nreplicate_delay = \"1h\"\n");
    s3.configure(&d);
    d.spawn_and_wait().await;
    let kept = first_then_second_owner(&mut d).await;

    // The first one comes back while remote storage is down (a workspace that holds
    // something: reconciled, not restored) and serves what it has.
    s3.stop();
    wipe_state(&d);
    std::fs::rename(&kept, &d.state_dir).unwrap();
    std::fs::write(d.workspace.join("notes.md"), "kept").unwrap();
    d.spawn_and_wait().await;
    let api = d.api();
    let status = ok(&api.get("/v1/status").await, 200);
    assert_eq!(status["owner"]["state"], "waiting", "{status}");
    assert_eq!(api.value_in(Some("c"), "shared").await, Some(json!("a")));

    // Storage is back: the claim succeeds and the other daemon's namespace comes in
    // (the status records the take-in once it is whole, KV and file store).
    s3.restart().await;
    let marker = d.state_dir.join("take-in-owed");
    let taken = poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let (api, marker) = (d.api(), marker.clone());
        async move {
            let status = api.get("/v1/status").await;
            let status: Value = serde_json::from_slice(&status.body).ok()?;
            let replaced = &status["restore"]["stores"]["replaced_namespaces"];
            (*replaced == json!(["c"]) && !marker.exists()).then_some(status)
        }
    })
    .await;
    let status = taken.unwrap_or_else(|| panic!("not taken in; log:\n{}", d.log()));
    assert_eq!(status["owner"]["state"], "claimed", "{status}");
    assert_eq!(api.value_in(Some("c"), "shared").await, Some(json!("b")));
    assert_eq!(api.value_in(Some("c"), "b_only").await, Some(json!(1)));
    ok(&api.put("/v1/kv/shared?ns=c", &json!("c")).await, 200);
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());

    // Every owner's work is in remote storage, the last write last.
    wipe_state(&d);
    d.spawn_and_wait().await;
    let api = d.api();
    assert_eq!(api.value_in(Some("c"), "shared").await, Some(json!("c")));
    assert_eq!(api.value_in(Some("c"), "b_only").await, Some(json!(1)));
}
