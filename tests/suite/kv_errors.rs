//! API.md's error table for the KV routes: every 4xx code with its status and body
//! shape (`error`, `message`, extra fields), value and namespace quotas (413 with
//! `limit_bytes` / `current_size_bytes`), bodies over the limit refused without being
//! read whole, and the 422 rules (top-level null, nesting deeper than 32, non-finite
//! numbers). A refused request never changes the stored state.

use serde_json::{Value, json};

use crate::util::{Daemon, assert_error, enc, ok, raw_request};

const LIMITS: &str = "[kv]\nmax_value_bytes = 1024\nmax_namespace_bytes = 4096\n";
/// The request body limit of single-key routes with LIMITS: 2 × value limit + 4096.
const BODY_LIMIT: u64 = 2 * 1024 + 4096;

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_json() {
    let d = Daemon::start().await;
    let api = d.api();
    for body in [&b"{\"a\":"[..], b"nope", b"{'a': 1}", b"[1,]", b"", b"NaN"] {
        let r = api.raw(hyper::Method::PUT, "/v1/kv/k", body).await;
        assert_error(&r, 400, "invalid_json");
        let r = api.raw(hyper::Method::PATCH, "/v1/kv/k", body).await;
        assert!(
            r.status == 400 || r.status == 404,
            "PATCH with a bad body: {r:?}"
        );
    }
    ok(&api.put("/v1/kv/k", &json!({"a": 1})).await, 201);
    let r = api.raw(hyper::Method::PATCH, "/v1/kv/k", b"{\"a\":").await;
    assert_error(&r, 400, "invalid_json");
    let r = api
        .raw(hyper::Method::POST, "/v1/kv/n/incr", b"{by: 1}")
        .await;
    assert_error(&r, 400, "invalid_json");
    let r = api.raw(hyper::Method::POST, "/v1/kv/batch", b"[").await;
    assert_error(&r, 400, "invalid_json");
    assert_eq!(api.value("k").await, Some(json!({"a": 1})));
    assert_eq!(api.value("n").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_key() {
    let d = Daemon::start().await;
    let api = d.api();
    let long = "k".repeat(256);
    for key in [long.as_str(), "a\u{1}b", "\u{7f}", "tab\there", "nl\n"] {
        let path = format!("/v1/kv/{}", enc(key));
        assert_error(&api.put(&path, &json!(1)).await, 400, "invalid_key");
        assert_error(&api.get(&path).await, 400, "invalid_key");
        assert_error(&api.delete(&path).await, 400, "invalid_key");
        assert_error(
            &api.post_empty(&format!("{path}/incr")).await,
            400,
            "invalid_key",
        );
        assert_error(&api.get(&format!("{path}/len")).await, 400, "invalid_key");
    }
    // Not UTF-8 once decoded.
    assert_error(&api.get("/v1/kv/%FF%FE").await, 400, "invalid_key");
    assert_error(&api.put("/v1/kv/a%C3", &json!(1)).await, 400, "invalid_key");
    // Written by hand: a control character as %01.
    assert_error(&api.put("/v1/kv/a%01", &json!(1)).await, 400, "invalid_key");
    // A `%` that starts no escape is refused, not taken as itself (`%zz` and `%25zz`
    // would name one key).
    for path in ["/v1/kv/%zz", "/v1/kv/100%", "/v1/kv/a%2", "/v1/kv/%zz/incr"] {
        assert_error(&api.put(path, &json!(1)).await, 400, "invalid_key");
    }
    assert_error(&api.post_empty("/v1/kv/%zz/incr").await, 400, "invalid_key");
    assert_error(
        &api.raw(hyper::Method::PUT, "/v1/files/a%zz", b"x").await,
        400,
        "invalid_path",
    );
    // 255 bytes (multi-byte characters count in bytes) is the longest key.
    let k255 = format!("{}{}", "é".repeat(127), "k"); // 254 + 1
    assert_eq!(k255.len(), 255);
    ok(
        &api.put(&format!("/v1/kv/{}", enc(&k255)), &json!(1)).await,
        201,
    );
    let k256 = format!("{}kk", "é".repeat(127));
    assert_error(
        &api.put(&format!("/v1/kv/{}", enc(&k256)), &json!(1)).await,
        400,
        "invalid_key",
    );
    // An empty key is an invalid key.
    assert_error(&api.put("/v1/kv/", &json!(1)).await, 400, "invalid_key");
    assert_eq!(ok(&api.get("/v1/kv").await, 200)["count"], 1);
    ok(&api.put("/v1/kv/100%25", &json!(1)).await, 201);
    assert_eq!(api.value("100%").await, Some(json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reserved_key() {
    let d = Daemon::start().await;
    let api = d.api();
    assert_error(
        &api.put("/v1/kv/%24x", &json!(1)).await,
        400,
        "reserved_key",
    );
    assert_error(&api.get("/v1/kv/%24x").await, 400, "reserved_key");
    assert_error(&api.delete("/v1/kv/%24meta").await, 400, "reserved_key");
    assert_error(
        &api.post_empty("/v1/kv/%24n/incr").await,
        400,
        "reserved_key",
    );
    assert_error(
        &api.get("/v1/kv/%24n/watch?timeout_s=1").await,
        400,
        "reserved_key",
    );
    // `$` elsewhere in a key is fine.
    ok(&api.put("/v1/kv/a%24", &json!(1)).await, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_param() {
    let d = Daemon::start().await;
    let api = d.api();
    let long_ns = "n".repeat(129);
    for ns in ["a%20b", "a%2Fb", "", "%C3%A9", long_ns.as_str()] {
        let r = api.put(&format!("/v1/kv/k?ns={ns}"), &json!(1)).await;
        assert_error(&r, 400, "invalid_param");
        let r = api.get(&format!("/v1/kv?ns={ns}")).await;
        assert_error(&r, 400, "invalid_param");
    }
    ok(
        &api.put(&format!("/v1/kv/k?ns={}", "n".repeat(128)), &json!(1))
            .await,
        201,
    );
    // A TTL under a millisecond would expire at once: refused, like Redis `PX 0`.
    for ttl in ["0", "0.0001", "-1"] {
        let r = api.put(&format!("/v1/kv/t?ttl={ttl}"), &json!(1)).await;
        assert_error(&r, 400, "invalid_param");
    }
    let r = api.post("/v1/kv/k/expire", &json!({"ttl": 1e-9})).await;
    assert_error(&r, 400, "invalid_param");
    ok(&api.put("/v1/kv/t?ttl=0.001", &json!(1)).await, 201);
    ok(&api.put("/v1/kv/k?ns=a-Z_0.9%3A%40", &json!(1)).await, 201);
    // An unknown query parameter is refused, so a typo cannot make a blind write.
    let r = api.put("/v1/kv/k?if_verison=3", &json!(2)).await;
    assert_error(&r, 400, "invalid_param");
    let r = api.get("/v1/kv/k?metaa=true").await;
    assert_error(&r, 400, "invalid_param");
    let r = api.get("/v1/kv?pre=a").await;
    assert_error(&r, 400, "invalid_param");
    let r = api.delete("/v1/kv/k?nx=true").await;
    assert_error(&r, 400, "invalid_param");
    // nx and xx exclude each other; flags are booleans; numbers are numbers.
    let r = api.put("/v1/kv/k?nx=true&xx=true", &json!(2)).await;
    assert_error(&r, 400, "invalid_param");
    let r = api.put("/v1/kv/k?nx=maybe", &json!(2)).await;
    let body = assert_error(&r, 400, "invalid_param");
    // The message names every form a flag takes.
    assert!(
        body["message"].as_str().unwrap().contains("or 1, 0"),
        "{body}"
    );
    let r = api.put("/v1/kv/k?if_version=-1", &json!(2)).await;
    assert_error(&r, 400, "invalid_param");
    let r = api.get("/v1/kv?limit=ten").await;
    assert_error(&r, 400, "invalid_param");
    let r = api.get("/v1/kv?cursor=%21%21%21").await;
    assert_error(&r, 400, "invalid_param");
    // Action bodies must be objects with known fields.
    let r = api.post("/v1/kv/n/incr", &json!([1])).await;
    assert_error(&r, 400, "invalid_param");
    assert_eq!(api.value("k").await, None, "default namespace untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_path() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!({"a": {"b": 1}})).await, 201);
    for p in [
        "a..b",
        ".a",
        "a%5Bx%5D",
        "a%5B1",
        "a%5B%22x",
        "a.",
        "a%5B-1%5D",
    ] {
        let r = api.get(&format!("/v1/kv/k?path={p}")).await;
        assert_error(&r, 400, "invalid_path");
        let r = api.patch(&format!("/v1/kv/k?path={p}"), &json!(1)).await;
        assert_error(&r, 400, "invalid_path");
    }
    let deep_path = vec!["a"; 33].join(".");
    let r = api.get(&format!("/v1/kv/k?path={deep_path}")).await;
    assert_error(&r, 400, "invalid_path");
    assert_eq!(api.value("k").await, Some(json!({"a": {"b": 1}})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_type() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/s", &json!("text")).await, 201);
    ok(&api.put("/v1/kv/o", &json!({"a": 1})).await, 201);
    ok(&api.put("/v1/kv/f", &json!(1.5)).await, 201);
    ok(&api.put("/v1/kv/b", &json!(true)).await, 201);
    ok(&api.put("/v1/kv/num", &json!("5")).await, 201);

    for k in ["s", "o", "f", "b", "num"] {
        let r = api.post_empty(&format!("/v1/kv/{k}/incr")).await;
        assert_error(&r, 400, "wrong_type");
        let r = api.post_empty(&format!("/v1/kv/{k}/decr")).await;
        assert_error(&r, 400, "wrong_type");
    }
    for k in ["s", "o", "f"] {
        let r = api
            .post(&format!("/v1/kv/{k}/rpush"), &json!({"value": 1}))
            .await;
        assert_error(&r, 400, "wrong_type");
        let r = api
            .post(&format!("/v1/kv/{k}/lpush"), &json!({"values": [1]}))
            .await;
        assert_error(&r, 400, "wrong_type");
        let r = api.post_empty(&format!("/v1/kv/{k}/rpop")).await;
        assert_error(&r, 400, "wrong_type");
    }
    assert_eq!(api.value("s").await, Some(json!("text")));
    assert_eq!(api.value("o").await, Some(json!({"a": 1})));
    assert_eq!(api.value("f").await, Some(json!(1.5)));
    assert_eq!(api.ns_version(None).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overflow() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/max", &json!(i64::MAX)).await, 201);
    let r = api.post_empty("/v1/kv/max/incr").await;
    assert_error(&r, 400, "overflow");
    assert_eq!(api.value("max").await, Some(json!(i64::MAX)));
    let r = api.post("/v1/kv/max/decr", &json!({"by": -1})).await;
    assert_error(&r, 400, "overflow");

    ok(&api.put("/v1/kv/min", &json!(i64::MIN)).await, 201);
    let r = api.post_empty("/v1/kv/min/decr").await;
    assert_error(&r, 400, "overflow");
    let r = api.post("/v1/kv/min/incr", &json!({"by": -1})).await;
    assert_error(&r, 400, "overflow");
    assert_eq!(api.value("min").await, Some(json!(i64::MIN)));

    ok(&api.put("/v1/kv/one", &json!(1)).await, 201);
    let r = api.post("/v1/kv/one/incr", &json!({"by": i64::MAX})).await;
    assert_error(&r, 400, "overflow");
    assert_eq!(api.value("one").await, Some(json!(1)));
    // 1 - i64::MIN does not fit; -1 - i64::MIN is i64::MAX.
    let r = api.post("/v1/kv/one/decr", &json!({"by": i64::MIN})).await;
    assert_error(&r, 400, "overflow");
    ok(&api.put("/v1/kv/neg", &json!(-1)).await, 201);
    let r = api.post("/v1/kv/neg/decr", &json!({"by": i64::MIN})).await;
    assert_eq!(ok(&r, 200), json!({"value": i64::MAX}));
    // Reaching the bounds exactly is fine.
    let r = api
        .post("/v1/kv/one/incr", &json!({"by": i64::MAX - 1}))
        .await;
    assert_eq!(ok(&r, 200), json!({"value": i64::MAX}));
    // A stored integer beyond i64 cannot be incremented.
    ok(&api.put("/v1/kv/big", &json!(u64::MAX)).await, 201);
    let r = api.post_empty("/v1/kv/big/incr").await;
    let b = r.json();
    assert!(
        r.status == 400 && (b["error"] == "overflow" || b["error"] == "wrong_type"),
        "INCR on {} must be refused: {r:?}",
        u64::MAX
    );
    assert_eq!(api.value("big").await, Some(json!(u64::MAX)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_found_and_path_not_found() {
    let d = Daemon::start().await;
    let api = d.api();
    assert_error(&api.get("/v1/kv/missing").await, 404, "not_found");
    assert_error(&api.get("/v1/kv/missing?meta=true").await, 404, "not_found");
    ok(&api.put("/v1/kv/k", &json!({"a": [1]})).await, 201);
    assert_error(&api.get("/v1/kv/k?path=b").await, 404, "path_not_found");
    assert_error(
        &api.get("/v1/kv/k?path=a%5B1%5D").await,
        404,
        "path_not_found",
    );
    assert_error(&api.get("/v1/kv/k?path=a.x").await, 404, "path_not_found");
    // Unknown routes and actions are 404 with the same body shape; wrong methods 405.
    assert_error(&api.get("/v1/nothing").await, 404, "not_found");
    assert_error(&api.post_empty("/v1/kv/k/frob").await, 404, "not_found");
    assert_error(&api.get("/v1/kv/k/frob").await, 404, "not_found");
    let r = api.delete("/v1/kv").await;
    assert_error(&r, 405, "method_not_allowed");
    // A known action with the other method is 405 too, naming the one it takes.
    let r = api.post_empty("/v1/kv/k/len").await;
    assert_error(&r, 405, "method_not_allowed");
    assert_eq!(r.headers.get("allow").unwrap(), "GET");
    let r = api.get("/v1/kv/k/incr").await;
    assert_error(&r, 405, "method_not_allowed");
    assert_eq!(r.headers.get("allow").unwrap(), "POST");
    // An empty key is an invalid key, not an unknown route.
    assert_error(&api.put("/v1/kv/", &json!(1)).await, 400, "invalid_key");
    assert_error(&api.get("/v1/kv/").await, 400, "invalid_key");
    // Path parameters that are not UTF-8 get a JSON error like any other.
    assert_error(&api.get("/v1/kv/a%FFb").await, 400, "invalid_key");
    assert_error(&api.get("/v1/kv/k/%FF").await, 400, "invalid_param");
    assert_error(&api.get("/v1/files/a%FFb").await, 400, "invalid_path");
    assert_error(&api.delete("/v1/files/a%FFb").await, 400, "invalid_path");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn value_over_max_value_bytes_is_413() {
    let d = Daemon::start_with(LIMITS).await;
    let api = d.api();
    // The serialized value counts: 1022 characters + 2 quotes = 1024 bytes fits.
    ok(&api.put("/v1/kv/fits", &json!("x".repeat(1022))).await, 201);
    let r = api.put("/v1/kv/big", &json!("x".repeat(1100))).await;
    let b = assert_error(&r, 413, "too_large");
    assert_eq!(b["limit_bytes"], 1024);
    assert_eq!(b["current_size_bytes"], 1102);
    assert_eq!(api.value("big").await, None);

    // Growing a value past the limit by PATCH, push or batch: the same.
    ok(
        &api.put("/v1/kv/doc", &json!({"a": "y".repeat(1000)})).await,
        201,
    );
    let r = api
        .patch("/v1/kv/doc?path=b", &json!("z".repeat(100)))
        .await;
    let b = assert_error(&r, 413, "too_large");
    assert_eq!(b["limit_bytes"], 1024);
    assert!(b["current_size_bytes"].as_u64().unwrap() > 1024);
    ok(&api.put("/v1/kv/l", &json!(["a".repeat(1000)])).await, 201);
    let r = api
        .post("/v1/kv/l/rpush", &json!({"value": "b".repeat(100)}))
        .await;
    assert_error(&r, 413, "too_large");
    let r = api
        .post(
            "/v1/kv/batch",
            &json!({"operations": [
                {"op": "set", "key": "ok", "value": 1},
                {"op": "set", "key": "big", "value": "x".repeat(1100)},
            ]}),
        )
        .await;
    let b = assert_error(&r, 413, "too_large");
    assert_eq!(b["index"], 1);
    assert_eq!(b["current_size_bytes"], 1102);
    assert_eq!(api.value("ok").await, None);
    assert_eq!(api.value("doc").await, Some(json!({"a": "y".repeat(1000)})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespace_over_max_namespace_bytes_is_413() {
    let d = Daemon::start_with(LIMITS).await;
    let api = d.api();
    // Each record counts key + serialized value: 2 + 900 = 902 bytes.
    let v = json!("v".repeat(898));
    for i in 1..=4 {
        ok(&api.put(&format!("/v1/kv/k{i}"), &v).await, 201);
    }
    let r = api.put("/v1/kv/k5", &v).await;
    let b = assert_error(&r, 413, "too_large");
    assert_eq!(b["limit_bytes"], 4096);
    assert_eq!(b["current_size_bytes"], 5 * 902);
    assert_eq!(api.value("k5").await, None);
    // The namespace size in status matches the accounting.
    let s = ok(&api.get("/v1/status").await, 200);
    assert_eq!(s["kv"]["bytes"], 4 * 902, "{s}");
    // Another namespace has its own quota.
    ok(&api.put("/v1/kv/k5?ns=other", &v).await, 201);
    // Shrinking or deleting is always allowed; then there is room again.
    ok(&api.put("/v1/kv/k1", &json!(1)).await, 200);
    ok(&api.put("/v1/kv/k5", &v).await, 201);
    assert_eq!(ok(&api.get("/v1/kv").await, 200)["count"], 5);

    // A full batch is judged on what it leaves behind, whatever its order: replacing
    // a key by another fits both ways round.
    let swap = |first: Value, second: Value| json!({"operations": [first, second]});
    let set = |k: &str| json!({"op": "set", "key": k, "value": v});
    let del = |k: &str| json!({"op": "delete", "key": k});
    let r = api.post("/v1/kv/batch", &swap(set("k6"), del("k2"))).await;
    ok(&r, 200);
    let r = api.post("/v1/kv/batch", &swap(del("k3"), set("k7"))).await;
    ok(&r, 200);
    let s = ok(&api.get("/v1/status").await, 200);
    assert_eq!(s["kv"]["bytes"], 4 * 902 + 3 + 902, "{s}"); // and `other`
    // One that ends over the quota names the operation since which it was over.
    let r = api
        .post(
            "/v1/kv/batch",
            &json!({"operations": [set("k8"), del("k4"), set("k9"), set("k10")]}),
        )
        .await;
    let b = assert_error(&r, 413, "too_large");
    assert_eq!(b["index"], 2, "{b}");
    assert_eq!(b["current_size_bytes"], 5 * 902 + 903 + 3, "{b}");
    assert_eq!(api.value("k8").await, None);
    assert_eq!(api.value("k4").await, Some(v.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn body_over_the_limit_is_refused() {
    let d = Daemon::start_with(LIMITS).await;
    let api = d.api();
    // Through the client: a body far over the request limit.
    let body = format!("\"{}\"", "x".repeat(BODY_LIMIT as usize * 3));
    let r = api
        .raw(hyper::Method::PUT, "/v1/kv/k", body.as_bytes())
        .await;
    let b = assert_error(&r, 413, "too_large");
    assert!(b["limit_bytes"].as_u64().is_some(), "{b}");
    assert!(
        b["current_size_bytes"].as_u64().unwrap() > b["limit_bytes"].as_u64().unwrap(),
        "{b}"
    );
    assert_eq!(api.value("k").await, None);
    // The daemon still serves.
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_content_length_is_refused_before_the_body_is_read() {
    let d = Daemon::start_with(LIMITS).await;
    // Announce 10 GB but send only a few KiB: the answer must come without the rest.
    let declared: u64 = 10_000_000_000;
    let head = format!(
        "PUT /v1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    let r = raw_request(&d.socket, head, 4096, false).await;
    assert_eq!(r.status, 413, "{r:?}");
    let b = r.json();
    assert_eq!(b["error"], "too_large", "{b}");
    assert!(b["message"].is_string());
    assert_eq!(b["limit_bytes"], BODY_LIMIT);
    assert_eq!(b["current_size_bytes"], declared);
    // The connection is closed after it (the body is not read): the answer says so.
    assert!(closes(&r.head), "{}", r.head);
    let api = d.api();
    assert_eq!(api.value("k").await, None);
    // A request whose body is read keeps the connection.
    let body = "1";
    let head = format!(
        "PUT /v1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = raw_request(&d.socket, head, 0, false).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert!(!closes(&r.head), "{}", r.head);
}

/// Whether an answer's head says `Connection: close`.
fn closes(head: &str) -> bool {
    head.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("connection") && v.trim().eq_ignore_ascii_case("close")
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endless_chunked_body_is_cut_off() {
    let d = Daemon::start_with(LIMITS).await;
    // No Content-Length: up to 64 MiB streamed in chunks; the daemon must stop reading
    // at its limit and answer 413.
    let head = "PUT /v1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
    let r = raw_request(&d.socket, head, 64 << 20, true).await;
    assert_eq!(r.status, 413, "{r:?}");
    let b = r.json();
    assert_eq!(b["error"], "too_large", "{b}");
    assert_eq!(b["limit_bytes"], BODY_LIMIT);
    assert!(
        b["current_size_bytes"].as_u64().unwrap() > BODY_LIMIT,
        "{b}"
    );
    assert!(closes(&r.head), "{}", r.head);
    assert_eq!(d.api().value("k").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unstorable_values_are_422() {
    let d = Daemon::start().await;
    let api = d.api();
    let r = api.put("/v1/kv/k", &Value::Null).await;
    assert_error(&r, 422, "invalid_value");

    let r = api
        .raw(hyper::Method::PUT, "/v1/kv/k", nested(33).as_bytes())
        .await;
    assert_error(&r, 422, "invalid_value");
    let deep_obj = format!("{}1{}", "{\"a\":".repeat(33), "}".repeat(33));
    let r = api
        .raw(hyper::Method::PUT, "/v1/kv/k", deep_obj.as_bytes())
        .await;
    assert_error(&r, 422, "invalid_value");
    // A hostile body of 100,000 brackets is refused the same way, not a crash.
    let r = api
        .raw(
            hyper::Method::PUT,
            "/v1/kv/k",
            "[".repeat(50_000).as_bytes(),
        )
        .await;
    assert_error(&r, 422, "invalid_value");
    // Numbers must be finite.
    let r = api.raw(hyper::Method::PUT, "/v1/kv/k", b"1e400").await;
    assert_error(&r, 422, "invalid_value");
    assert_eq!(api.value("k").await, None);

    // 32 levels is the deepest value.
    let r = api
        .raw(hyper::Method::PUT, "/v1/kv/k", nested(32).as_bytes())
        .await;
    ok(&r, 201);
    // Brackets inside strings are not nesting.
    let tricky = json!({"s": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[{{{{"});
    ok(&api.put("/v1/kv/t", &tricky).await, 201);
    assert_eq!(api.value("t").await, Some(tricky));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_that_would_nest_deeper_than_32_is_422() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!({"x": 1})).await, 201);
    let deep: Value = serde_json::from_str(&nested(32)).unwrap();

    // At a path: {"x": <32 levels>} is 33 deep.
    let r = api.patch("/v1/kv/k?path=x", &deep).await;
    assert_error(&r, 422, "invalid_value");
    // As a merge patch.
    let r = api.patch("/v1/kv/k", &json!({"x": deep})).await;
    assert_error(&r, 422, "invalid_value");
    // A merge patch of null would leave a top-level null.
    let r = api.patch("/v1/kv/k", &Value::Null).await;
    assert_error(&r, 422, "invalid_value");
    // Pushing a 32-deep value into a list makes it 33 deep.
    ok(&api.put("/v1/kv/l", &json!([])).await, 201);
    let r = api.post("/v1/kv/l/rpush", &json!({"value": deep})).await;
    assert_error(&r, 422, "invalid_value");
    assert_eq!(api.value("k").await, Some(json!({"x": 1})));
    assert_eq!(api.value("l").await, Some(json!([])));
    assert_eq!(api.ns_version(None).await, 2);

    // One level less fits.
    let d31: Value = serde_json::from_str(&nested(31)).unwrap();
    ok(&api.patch("/v1/kv/k?path=x", &d31).await, 200);
    ok(
        &api.post("/v1/kv/l/rpush", &json!({"value": d31})).await,
        200,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunked_bodies_within_the_limit_are_read() {
    let d = Daemon::start_with(LIMITS).await;
    let head = "PUT /v1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n8\r\n{\"a\": [1\r\n3\r\n, 2\r\n2\r\n]}\r\n0\r\n\r\n".to_string();
    let r = raw_request(&d.socket, head, 0, false).await;
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(d.api().value("k").await, Some(json!({"a": [1, 2]})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn query_and_depth_edges() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/a", &json!(1)).await, 201);
    // A limit of any size is clamped; zero and non-numbers are refused.
    let r = api.get("/v1/kv?limit=100000000000000000000").await;
    assert_eq!(ok(&r, 200)["count"], 1);
    assert_error(&api.get("/v1/kv?limit=0").await, 400, "invalid_param");
    assert_error(&api.get("/v1/kv?limit=-1").await, 400, "invalid_param");
    // A query value that is not UTF-8 is refused, not read as U+FFFD.
    ok(&api.put("/v1/kv/%EF%BF%BDx", &json!(1)).await, 201);
    assert_error(&api.get("/v1/kv?prefix=%FF").await, 400, "invalid_param");
    let e = assert_error(&api.get("/v1/kv?prefix=%FF").await, 400, "invalid_param");
    assert!(e["message"].as_str().unwrap().contains("`prefix`"), "{e}");
    // Unknown actions are 404 whatever the method; bodies that must be objects are.
    assert_error(&api.put("/v1/kv/a/b", &json!(1)).await, 404, "not_found");
    assert_error(&api.delete("/v1/kv/a/b").await, 404, "not_found");
    assert_error(
        &api.delete("/v1/kv/a/incr").await,
        405,
        "method_not_allowed",
    );
    let positional = json!([null, [], [{"op": "set", "key": "arr", "value": 7}]]);
    assert_error(
        &api.post("/v1/kv/batch", &positional).await,
        400,
        "invalid_param",
    );
    assert_eq!(api.value("arr").await, None);
    for body in [json!([]), json!({"timeout": 5}), json!({"timeout_s": "5"})] {
        assert_error(&api.post("/v1/sync", &body).await, 400, "invalid_param");
    }
    assert_error(&api.get("/v1/status?x=1").await, 400, "invalid_param");
    assert_error(
        &api.raw(hyper::Method::PUT, "/v1/files/", b"x").await,
        400,
        "invalid_path",
    );
    // A parameter given twice is refused, not read either way.
    let r = api.put("/v1/kv/a?nx=true&nx=false", &json!(2)).await;
    assert_error(&r, 400, "invalid_param");
    // Too deep is 422 in a batch as on the single-key route.
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let body = format!(r#"{{"operations": [{{"op": "set", "key": "d", "value": {deep}}}]}}"#);
    let r = api
        .raw(hyper::Method::POST, "/v1/kv/batch", body.as_bytes())
        .await;
    assert_error(&r, 422, "invalid_value");
    let r = api
        .raw(hyper::Method::PUT, "/v1/kv/d", deep.as_bytes())
        .await;
    assert_error(&r, 422, "invalid_value");
    // Clearing a TTL the key does not have changes nothing.
    let before = api.ns_version(None).await;
    let r = api.post("/v1/kv/a/expire", &json!({"ttl": 0})).await;
    assert_eq!(ok(&r, 200), json!({"expires_at": null}));
    assert_eq!(api.ns_version(None).await, before);
}

/// A request refused on its URL, query or token before its body was read: a client
/// that sends the body after the headers still gets to send it, reads the JSON error,
/// and may use the connection again (the daemon reads a small body it did not need).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_error_before_the_body_still_lets_the_client_send_it() {
    use std::io::{BufRead, BufReader, Read, Write};
    let d = Daemon::start_with(LIMITS).await;
    let socket = d.socket.clone();
    tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        let mut reader = BufReader::new(s.try_clone().unwrap());
        // Reads one answer: its status line and its JSON body.
        let mut answer = || {
            let (mut status, mut len) = (String::new(), 0usize);
            reader.read_line(&mut status).unwrap();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            (status, String::from_utf8(body).unwrap())
        };
        for (path, code) in [
            ("/v1/kv/%24reserved", "reserved_key"),
            ("/v1/kv/k?if_verison=1", "invalid_param"),
            ("/v1/kv/k?ns=bad%20ns", "invalid_param"),
        ] {
            let head = format!("PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\n\r\n");
            s.write_all(head.as_bytes()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(200));
            s.write_all(b"\"value\"")
                .unwrap_or_else(|e| panic!("{path}: the body could not be sent: {e}"));
            let (status, body) = answer();
            assert!(status.starts_with("HTTP/1.1 400"), "{path}: {status}");
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"], code, "{path}: {body}");
        }
        // The same connection still serves.
        s.write_all(b"PUT /v1/kv/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1")
            .unwrap();
        let (status, _) = answer();
        assert!(status.starts_with("HTTP/1.1 201"), "{status}");
    })
    .await
    .unwrap();
}
