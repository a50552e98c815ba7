//! TTLs and namespaces: an expired key is invisible at once to every route (GET, list,
//! len, incr starting over, nx) and purged in the background (namespace bytes in
//! `/v1/status` shrink); the same key in two namespaces holds two values, and lists,
//! versions and deletes stay inside their namespace.

use std::time::Duration;

use serde_json::{Value, json};

use crate::util::{Api, Daemon, assert_error, now_ms, ok, poll_until, rfc3339_ms};

async fn kv_bytes(api: &Api) -> u64 {
    let s = ok(&api.get("/v1/status").await, 200);
    s["kv"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no kv.bytes in {s}"))
}

/// Sleeps until the wall clock has passed `at_ms` (plus a margin for clock rounding).
async fn sleep_past(at_ms: u64) {
    let now = now_ms();
    if at_ms + 30 > now {
        tokio::time::sleep(Duration::from_millis(at_ms + 30 - now)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_key_is_invisible_at_once_and_purged_in_the_background() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/keep", &json!(1)).await, 201);
    let long = "v".repeat(100);
    ok(&api.put("/v1/kv/t?ttl=1", &json!(long)).await, 201);
    // keep: 4 + 1 bytes; t: 1 + 102 bytes.
    assert_eq!(kv_bytes(&api).await, 5 + 103);

    // Visible before the deadline.
    let m = api.meta("t").await;
    let at = rfc3339_ms(m["expires_at"].as_str().unwrap());
    assert!(now_ms() < at, "the key expired before it could be read");
    assert_eq!(
        ok(&api.get("/v1/kv").await, 200)["keys"],
        json!(["keep", "t"])
    );

    sleep_past(at).await;
    // Invisible at once, whatever the purger has done yet.
    assert_error(&api.get("/v1/kv/t").await, 404, "not_found");
    let body = ok(&api.get("/v1/kv").await, 200);
    assert_eq!(body["keys"], json!(["keep"]));
    assert_eq!(body["count"], 1);
    assert_error(&api.get("/v1/kv/t/len").await, 404, "not_found");

    // Purged in the background: the namespace's bytes shrink within ~2 s.
    let shrunk = poll_until(Duration::from_secs(3), Duration::from_millis(50), || {
        let api = api.clone();
        async move { (kv_bytes(&api).await == 5).then_some(()) }
    })
    .await;
    assert!(
        shrunk.is_some(),
        "kv.bytes is still {} 3 s after the expiry",
        kv_bytes(&api).await
    );
    assert_error(&api.get("/v1/kv/t").await, 404, "not_found");
    assert_eq!(api.value("keep").await, Some(json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_after_expiry_start_from_nothing() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/n?ttl=0.3", &json!(41)).await, 201);
    ok(&api.put("/v1/kv/s?ttl=0.3", &json!("x")).await, 201);
    ok(&api.put("/v1/kv/l?ttl=0.3", &json!([1, 2])).await, 201);
    let at = rfc3339_ms(api.meta("l").await["expires_at"].as_str().unwrap());
    sleep_past(at).await;

    // INCR starts at 0, nx succeeds, push starts from [], pop finds nothing.
    assert_eq!(
        ok(&api.post_empty("/v1/kv/n/incr").await, 200),
        json!({"value": 1})
    );
    let r = api.put("/v1/kv/s?nx=true&get=true", &json!("y")).await;
    let b = ok(&r, 201);
    assert_eq!(b["created"], true);
    assert_eq!(b["previous"], Value::Null);
    ok(&api.put("/v1/kv/l2?ttl=0.3", &json!([1])).await, 201);
    let at2 = rfc3339_ms(api.meta("l2").await["expires_at"].as_str().unwrap());
    sleep_past(at2).await;
    assert_eq!(
        ok(&api.post_empty("/v1/kv/l2/lpop").await, 200),
        json!({"value": null})
    );
    assert_eq!(
        ok(&api.post("/v1/kv/l/rpush", &json!({"value": 3})).await, 200),
        json!({"length": 1})
    );
    // The new records have no TTL.
    for k in ["n", "s", "l"] {
        assert_eq!(api.meta(k).await["expires_at"], Value::Null, "{k}");
    }
    // An expired key cannot be patched, expired or deleted.
    assert_error(
        &api.patch("/v1/kv/l2", &json!({"a": 1})).await,
        404,
        "not_found",
    );
    assert_error(
        &api.post("/v1/kv/l2/expire", &json!({"ttl": 10})).await,
        404,
        "not_found",
    );
    assert_eq!(
        ok(&api.delete("/v1/kv/l2").await, 200),
        json!({"deleted": false})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expire_route_makes_a_key_expire() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!("v")).await, 201);
    let r = api.post("/v1/kv/k/expire", &json!({"ttl": 0.3})).await;
    let at = rfc3339_ms(ok(&r, 200)["expires_at"].as_str().unwrap());
    sleep_past(at).await;
    assert_eq!(api.value("k").await, None);
    // A watch of the expired key sees a missing key: nothing changes, 204.
    let r = api.get("/v1/kv/k/watch?timeout_s=1").await;
    assert_eq!(r.status, 204, "watch of an expired key: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespaces_are_isolated() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k?ns=app", &json!("in app")).await, 201);
    ok(
        &api.put("/v1/kv/k?ns=actor%3Au1", &json!("in actor")).await,
        201,
    );
    ok(&api.put("/v1/kv/only-app?ns=app", &json!(1)).await, 201);
    ok(&api.put("/v1/kv/k", &json!("in default")).await, 201);

    assert_eq!(api.value_in(Some("app"), "k").await, Some(json!("in app")));
    assert_eq!(
        api.value_in(Some("actor:u1"), "k").await,
        Some(json!("in actor"))
    );
    assert_eq!(api.value("k").await, Some(json!("in default")));
    assert_eq!(
        api.value_in(Some("default"), "k").await,
        Some(json!("in default")),
        "no ?ns= means `default`"
    );
    assert_eq!(api.value_in(Some("actor:u1"), "only-app").await, None);

    let l = ok(&api.get("/v1/kv?ns=app&meta=true").await, 200);
    assert_eq!(l["keys"], json!(["k", "only-app"]));
    assert_eq!(l["version"], 2);
    let l = ok(&api.get("/v1/kv?ns=actor:u1&meta=true").await, 200);
    assert_eq!(l["keys"], json!(["k"]));
    assert_eq!(l["version"], 1);
    let l = ok(&api.get("/v1/kv?meta=true").await, 200);
    assert_eq!(l["keys"], json!(["k"]));
    assert_eq!(l["version"], 1);
    assert_eq!(ok(&api.get("/v1/kv?ns=empty").await, 200)["count"], 0);

    // Versions, conditions and deletes stay in their namespace.
    let r = api.put("/v1/kv/k?ns=app&nx=true", &json!(0)).await;
    assert_error(&r, 409, "exists");
    ok(&api.put("/v1/kv/k?ns=fresh&nx=true", &json!(0)).await, 201);
    assert_eq!(
        ok(&api.delete("/v1/kv/k?ns=app").await, 200),
        json!({"deleted": true})
    );
    assert_eq!(api.value_in(Some("app"), "k").await, None);
    assert_eq!(
        api.value_in(Some("actor:u1"), "k").await,
        Some(json!("in actor"))
    );
    assert_eq!(api.value("k").await, Some(json!("in default")));
    assert_eq!(api.meta("k").await["namespace_version"], 1);

    // Batches run in one namespace.
    let r = api
        .post(
            "/v1/kv/batch?ns=app",
            &json!({"operations": [{"op": "incr", "key": "c"}, {"op": "get", "key": "only-app"}]}),
        )
        .await;
    assert_eq!(ok(&r, 200)["results"][1]["value"], 1);
    assert_eq!(api.value_in(Some("app"), "c").await, Some(json!(1)));
    assert_eq!(api.value("c").await, None);

    let s = ok(&api.get("/v1/status").await, 200);
    assert_eq!(s["kv"]["namespaces"], 4, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_that_expire_while_the_daemon_is_down_are_gone_after_restart() {
    let mut d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/keep", &json!(1)).await, 201);
    ok(&api.put("/v1/kv/t?ttl=0.5", &json!("short")).await, 201);
    ok(&api.put("/v1/kv/long?ttl=3600", &json!("long")).await, 201);
    let at = rfc3339_ms(api.meta("t").await["expires_at"].as_str().unwrap());
    let long_at = api.meta("long").await["expires_at"].clone();
    assert_eq!(d.terminate().code(), Some(0), "log:\n{}", d.log());
    sleep_past(at).await;
    d.restart().await;

    let api = d.api();
    assert_error(&api.get("/v1/kv/t").await, 404, "not_found");
    assert_eq!(
        ok(&api.get("/v1/kv").await, 200)["keys"],
        json!(["keep", "long"])
    );
    // TTLs survive a restart unchanged.
    assert_eq!(api.meta("long").await["expires_at"], long_at);
    // keep: 4 + 1, long: 4 + 6.
    let purged = poll_until(Duration::from_secs(3), Duration::from_millis(50), || {
        let api = api.clone();
        async move { (kv_bytes(&api).await == 5 + 10).then_some(()) }
    })
    .await;
    assert!(
        purged.is_some(),
        "kv.bytes is {} after the restart",
        kv_bytes(&api).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_sees_the_expiry_of_its_key_as_a_deletion() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k?ttl=0.5", &json!(1)).await, 201);
    let r = api
        .request_within(
            Duration::from_secs(20),
            hyper::Method::GET,
            "/v1/kv/k/watch?after_version=1&timeout_s=10",
            None,
        )
        .await;
    let body = ok(&r, 200);
    assert_eq!(body["key"], "k");
    assert_eq!(body["deleted"], true, "{body}");
    let v = body["version"].as_u64().unwrap();
    assert!(v >= 1, "{body}");
    assert_eq!(api.value("k").await, None);
}
