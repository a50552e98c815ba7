//! Every single-key KV route of API.md against a real daemon: GET (with `path` and
//! `meta`), PUT and its flags (`nx`, `xx`, `if_version`, `ttl`, `keep_ttl`, `get`),
//! PATCH (at a path and as an RFC 7396 merge patch), DELETE, list with prefix, limit
//! and cursor pagination, incr/decr, push/pop, len, expire and the watch long poll.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::{Api, Daemon, assert_error, enc, now_ms, ok, rfc3339_ms};

fn keys_of(body: &Value) -> Vec<String> {
    body["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys in {body}"))
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_creates_then_replaces_and_get_returns_the_value() {
    let d = Daemon::start().await;
    let api = d.api();

    let r = api.put("/v1/kv/a", &json!({"x": [1, 2]})).await;
    assert_eq!(
        ok(&r, 201),
        json!({"key": "a", "version": 1, "created": true})
    );
    let r = api.get("/v1/kv/a").await;
    assert_eq!(ok(&r, 200), json!({"key": "a", "value": {"x": [1, 2]}}));

    let r = api.put("/v1/kv/a", &json!("second")).await;
    assert_eq!(
        ok(&r, 200),
        json!({"key": "a", "version": 2, "created": false})
    );
    assert_eq!(
        ok(&api.get("/v1/kv/a").await, 200),
        json!({"key": "a", "value": "second"})
    );

    // Any JSON value but a top-level null can be stored.
    for (i, v) in [json!(0), json!(-1.25), json!(false), json!([]), json!({})]
        .into_iter()
        .enumerate()
    {
        let k = format!("scalar{i}");
        ok(&api.put(&format!("/v1/kv/{k}"), &v).await, 201);
        assert_eq!(api.value(&k).await, Some(v));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_percent_encoded_and_may_hold_odd_characters() {
    let d = Daemon::start().await;
    let api = d.api();
    for key in [
        "user:1/profile é",
        "a b?c&d=e#f",
        "100%",
        "a$",
        "batch",
        "x.y[0]",
        &"k".repeat(255),
    ] {
        let r = api.put(&format!("/v1/kv/{}", enc(key)), &json!(key)).await;
        let body = ok(&r, 201);
        assert_eq!(body["key"], key);
        let r = api.get(&format!("/v1/kv/{}", enc(key))).await;
        assert_eq!(ok(&r, 200), json!({"key": key, "value": key}), "{key}");
    }
    let r = api.get("/v1/kv?limit=1000").await;
    assert_eq!(ok(&r, 200)["count"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_with_path_and_meta() {
    let d = Daemon::start().await;
    let api = d.api();
    let doc = json!({"a": {"b": [1, {"c": "deep"}]}, "odd.key": 5});
    ok(&api.put("/v1/kv/doc", &doc).await, 201);

    let r = api.get("/v1/kv/doc?path=a.b%5B1%5D.c").await;
    assert_eq!(ok(&r, 200), json!({"key": "doc", "value": "deep"}));
    let r = api.get("/v1/kv/doc?path=a.b%5B0%5D").await;
    assert_eq!(ok(&r, 200), json!({"key": "doc", "value": 1}));
    let r = api
        .get(&format!(
            "/v1/kv/doc?path={}",
            sandkeep::client::encode_query("[\"odd.key\"]")
        ))
        .await;
    assert_eq!(ok(&r, 200), json!({"key": "doc", "value": 5}));
    let r = api.get("/v1/kv/doc?path=a.b%5B7%5D").await;
    assert_error(&r, 404, "path_not_found");
    let r = api.get("/v1/kv/doc?path=a.nope").await;
    assert_error(&r, 404, "path_not_found");
    let r = api.get("/v1/kv/missing?path=a").await;
    assert_error(&r, 404, "not_found");

    let before = now_ms();
    let m = api.meta("doc").await;
    let fields: BTreeSet<&str> = m.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        fields,
        BTreeSet::from([
            "key",
            "value",
            "version",
            "created_at",
            "updated_at",
            "expires_at",
            "namespace_version"
        ]),
        "{m}"
    );
    assert_eq!(m["key"], "doc");
    assert_eq!(m["value"], doc);
    assert_eq!(m["version"], 1);
    assert_eq!(m["namespace_version"], 1);
    assert_eq!(m["expires_at"], Value::Null);
    let created = rfc3339_ms(m["created_at"].as_str().unwrap());
    let updated = rfc3339_ms(m["updated_at"].as_str().unwrap());
    assert_eq!(created, updated);
    assert!(
        created <= before && created + 60_000 > before,
        "created_at {created} is not about now ({before})"
    );

    // A replace keeps created_at, moves updated_at and the version.
    ok(&api.put("/v1/kv/other", &json!(1)).await, 201);
    tokio::time::sleep(Duration::from_millis(5)).await;
    ok(&api.put("/v1/kv/doc", &json!(2)).await, 200);
    let m2 = api.meta("doc").await;
    assert_eq!(m2["created_at"], m["created_at"]);
    assert!(rfc3339_ms(m2["updated_at"].as_str().unwrap()) > updated);
    assert_eq!(m2["version"], 3);
    assert_eq!(m2["namespace_version"], 3);
    // `other` was last modified at version 2; the namespace moved on.
    let o = api.meta("other").await;
    assert_eq!(o["version"], 2);
    assert_eq!(o["namespace_version"], 3);
    // meta and path together.
    ok(&api.put("/v1/kv/doc", &doc).await, 200);
    let r = api.get("/v1/kv/doc?path=a.b%5B1%5D&meta=true").await;
    let body = ok(&r, 200);
    assert_eq!(body["value"], json!({"c": "deep"}));
    assert_eq!(body["version"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_nx_and_xx() {
    let d = Daemon::start().await;
    let api = d.api();

    let r = api.put("/v1/kv/k?xx=true", &json!(1)).await;
    assert_error(&r, 409, "not_exists");
    assert_eq!(api.value("k").await, None);

    let r = api.put("/v1/kv/k?nx=true", &json!(1)).await;
    assert_eq!(
        ok(&r, 201),
        json!({"key": "k", "version": 1, "created": true})
    );
    let r = api.put("/v1/kv/k?nx=true", &json!(2)).await;
    assert_error(&r, 409, "exists");
    assert_eq!(api.value("k").await, Some(json!(1)));

    let r = api.put("/v1/kv/k?xx=true", &json!(3)).await;
    assert_eq!(
        ok(&r, 200),
        json!({"key": "k", "version": 2, "created": false})
    );
    assert_eq!(api.value("k").await, Some(json!(3)));
    // Failed conditions are not writes.
    assert_eq!(api.ns_version(None).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_if_version() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/other", &json!(0)).await, 201); // namespace version 1

    // An absent key has version 0.
    let r = api.put("/v1/kv/k?if_version=3", &json!(1)).await;
    let b = assert_error(&r, 409, "version_mismatch");
    assert_eq!(b["expected_version"], 3);
    assert_eq!(b["actual_version"], 0);
    let r = api.put("/v1/kv/k?if_version=0", &json!(1)).await;
    assert_eq!(
        ok(&r, 201),
        json!({"key": "k", "version": 2, "created": true})
    );

    let r = api.put("/v1/kv/k?if_version=0", &json!(2)).await;
    let b = assert_error(&r, 409, "version_mismatch");
    assert_eq!(b["expected_version"], 0);
    assert_eq!(b["actual_version"], 2);
    // The key's version, not the namespace's.
    ok(&api.put("/v1/kv/other", &json!(1)).await, 200); // namespace version 3
    let r = api.put("/v1/kv/k?if_version=3", &json!(2)).await;
    let b = assert_error(&r, 409, "version_mismatch");
    assert_eq!(b["expected_version"], 3);
    assert_eq!(b["actual_version"], 2);
    let r = api.put("/v1/kv/k?if_version=2", &json!(2)).await;
    assert_eq!(
        ok(&r, 200),
        json!({"key": "k", "version": 4, "created": false})
    );
    assert_eq!(api.value("k").await, Some(json!(2)));

    // DELETE and PATCH take if_version too.
    let r = api.delete("/v1/kv/k?if_version=1").await;
    let b = assert_error(&r, 409, "version_mismatch");
    assert_eq!(b["actual_version"], 4);
    let r = api.patch("/v1/kv/k?if_version=1&path=a", &json!(1)).await;
    assert_error(&r, 409, "version_mismatch");
    assert_eq!(api.value("k").await, Some(json!(2)));
    let r = api.delete("/v1/kv/k?if_version=4").await;
    assert_eq!(ok(&r, 200), json!({"deleted": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_ttl_keep_ttl_and_plain_put_clears_ttl() {
    let d = Daemon::start().await;
    let api = d.api();

    let before = now_ms();
    ok(&api.put("/v1/kv/k?ttl=100", &json!(1)).await, 201);
    let m = api.meta("k").await;
    let exp = rfc3339_ms(m["expires_at"].as_str().expect("expires_at set"));
    assert!(
        exp >= before + 99_000 && exp <= now_ms() + 101_000,
        "expires_at {exp} is not about now + 100 s ({before})"
    );

    // keep_ttl keeps the deadline.
    ok(&api.put("/v1/kv/k?keep_ttl=true", &json!(2)).await, 200);
    let m2 = api.meta("k").await;
    assert_eq!(m2["expires_at"], m["expires_at"]);
    assert_eq!(m2["value"], 2);

    // A plain PUT clears it (Redis SET).
    ok(&api.put("/v1/kv/k", &json!(3)).await, 200);
    assert_eq!(api.meta("k").await["expires_at"], Value::Null);

    // keep_ttl on a key without TTL keeps none; a fractional ttl is accepted.
    ok(&api.put("/v1/kv/k?keep_ttl=true", &json!(4)).await, 200);
    assert_eq!(api.meta("k").await["expires_at"], Value::Null);
    ok(&api.put("/v1/kv/k?ttl=2.5", &json!(5)).await, 200);
    assert!(api.meta("k").await["expires_at"].is_string());

    // ttl and keep_ttl together, or a ttl that is not a positive number: invalid_param.
    let r = api.put("/v1/kv/k?ttl=5&keep_ttl=true", &json!(6)).await;
    assert_error(&r, 400, "invalid_param");
    for bad in ["0", "-1", "abc"] {
        let r = api.put(&format!("/v1/kv/k?ttl={bad}"), &json!(6)).await;
        assert_error(&r, 400, "invalid_param");
    }
    assert_eq!(api.value("k").await, Some(json!(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_and_delete_with_get_return_previous() {
    let d = Daemon::start().await;
    let api = d.api();

    let r = api.put("/v1/kv/k?get=true", &json!({"v": 1})).await;
    assert_eq!(
        ok(&r, 201),
        json!({"key": "k", "version": 1, "created": true, "previous": null})
    );
    let r = api.put("/v1/kv/k?get=true", &json!({"v": 2})).await;
    assert_eq!(
        ok(&r, 200),
        json!({"key": "k", "version": 2, "created": false, "previous": {"v": 1}})
    );
    let r = api.delete("/v1/kv/k?get=true").await;
    assert_eq!(ok(&r, 200), json!({"deleted": true, "previous": {"v": 2}}));
    let r = api.delete("/v1/kv/k?get=true").await;
    assert_eq!(ok(&r, 200), json!({"deleted": false, "previous": null}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_existing_and_missing() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    let r = api.delete("/v1/kv/k").await;
    assert_eq!(ok(&r, 200), json!({"deleted": true}));
    assert_error(&api.get("/v1/kv/k").await, 404, "not_found");
    let r = api.delete("/v1/kv/k").await;
    assert_eq!(ok(&r, 200), json!({"deleted": false}));
    let r = api.get("/v1/kv").await;
    assert_eq!(
        ok(&r, 200),
        json!({"keys": [], "count": 0, "next_cursor": null})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_at_path_creates_intermediate_objects() {
    let d = Daemon::start().await;
    let api = d.api();

    let r = api.patch("/v1/kv/k?path=a", &json!(1)).await;
    assert_error(&r, 404, "not_found");
    assert_eq!(api.value("k").await, None);

    ok(
        &api.put("/v1/kv/k", &json!({"a": 1, "l": [1, 2]})).await,
        201,
    );
    let r = api.patch("/v1/kv/k?path=x.y.z", &json!(5)).await;
    assert_eq!(ok(&r, 200), json!({"key": "k", "version": 2}));
    assert_eq!(
        api.value("k").await,
        Some(json!({"a": 1, "l": [1, 2], "x": {"y": {"z": 5}}}))
    );
    // Replace a nested value, an array element, and through bracket notation.
    ok(&api.patch("/v1/kv/k?path=x.y", &json!([true])).await, 200);
    ok(
        &api.patch("/v1/kv/k?path=l%5B1%5D", &json!("two")).await,
        200,
    );
    let r = api
        .patch(
            &format!(
                "/v1/kv/k?path={}",
                sandkeep::client::encode_query("[\"odd.key\"].n")
            ),
            &json!(null),
        )
        .await;
    assert_eq!(ok(&r, 200), json!({"key": "k", "version": 5}));
    assert_eq!(
        api.value("k").await,
        Some(json!({"a": 1, "l": [1, "two"], "x": {"y": [true]}, "odd.key": {"n": null}}))
    );
    assert_eq!(api.meta("k").await["version"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patch_without_path_is_an_rfc7396_merge_patch() {
    let d = Daemon::start().await;
    let api = d.api();
    let r = api.patch("/v1/kv/k", &json!({"a": 1})).await;
    assert_error(&r, 404, "not_found");

    let doc = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1, 2], "keep": "yes"});
    ok(&api.put("/v1/kv/k", &doc).await, 201);
    let r = api
        .patch(
            "/v1/kv/k",
            &json!({"a": null, "b": {"c": null, "f": 4}, "e": [9], "new": {"n": null, "m": 1}}),
        )
        .await;
    assert_eq!(ok(&r, 200), json!({"key": "k", "version": 2}));
    assert_eq!(
        api.value("k").await,
        Some(json!({"b": {"d": 3, "f": 4}, "e": [9], "keep": "yes", "new": {"m": 1}}))
    );
    // Removing a field that is not there changes nothing but is still a write.
    let r = api.patch("/v1/kv/k", &json!({"zzz": null})).await;
    assert_eq!(ok(&r, 200), json!({"key": "k", "version": 3}));
    assert_eq!(
        api.value("k").await,
        Some(json!({"b": {"d": 3, "f": 4}, "e": [9], "keep": "yes", "new": {"m": 1}}))
    );
    // A patch that is not an object replaces the whole value.
    ok(&api.patch("/v1/kv/k", &json!([1])).await, 200);
    assert_eq!(api.value("k").await, Some(json!([1])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_prefix_limit_and_cursor_pagination() {
    let d = Daemon::start().await;
    let api = d.api();

    let mut ops = Vec::new();
    for i in 0..25 {
        ops.push(json!({"op": "set", "key": format!("p:{i:02}"), "value": i}));
    }
    for k in ["q:1", "o", "p", "pz"] {
        ops.push(json!({"op": "set", "key": k, "value": 0}));
    }
    ok(
        &api.post("/v1/kv/batch", &json!({"operations": ops})).await,
        200,
    );

    // Default page: everything, sorted, no cursor.
    let body = ok(&api.get("/v1/kv").await, 200);
    let all = keys_of(&body);
    assert_eq!(all.len(), 29);
    assert_eq!(body["count"], 29);
    assert_eq!(body["next_cursor"], Value::Null);
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted, "keys must be sorted");
    assert!(body.get("version").is_none(), "version only with meta=true");

    // Walk `p:` in pages of 10.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = Vec::new();
    for _ in 0..10 {
        let path = match &cursor {
            Some(c) => format!("/v1/kv?prefix=p%3A&limit=10&cursor={c}"),
            None => "/v1/kv?prefix=p%3A&limit=10".to_string(),
        };
        let body = ok(&api.get(&path).await, 200);
        let page = keys_of(&body);
        assert_eq!(body["count"], page.len(), "{body}");
        pages.push(page.len());
        seen.extend(page);
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => {
                cursor = None;
                break;
            }
        }
    }
    assert!(cursor.is_none(), "pagination did not end");
    assert_eq!(pages, vec![10, 10, 5]);
    let expected: Vec<String> = (0..25).map(|i| format!("p:{i:02}")).collect();
    assert_eq!(seen, expected);

    // When the last page is exactly full there is no cursor after it.
    let body = ok(&api.get("/v1/kv?prefix=p%3A0&limit=5").await, 200);
    assert_eq!(body["count"], 5);
    let c = body["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_string();
    let body = ok(
        &api.get(&format!("/v1/kv?prefix=p%3A0&limit=5&cursor={c}"))
            .await,
        200,
    );
    assert_eq!(keys_of(&body), ["p:05", "p:06", "p:07", "p:08", "p:09"]);
    assert_eq!(body["next_cursor"], Value::Null);

    // A prefix without a separator matches by bytes.
    let body = ok(&api.get("/v1/kv?prefix=p").await, 200);
    assert_eq!(body["count"], 27);
    assert_eq!(keys_of(&body)[0], "p");
    assert_eq!(keys_of(&body)[26], "pz");
    let body = ok(&api.get("/v1/kv?prefix=nothing").await, 200);
    assert_eq!(body, json!({"keys": [], "count": 0, "next_cursor": null}));

    // limit=1 pages one by one across the whole namespace.
    let mut n = 0;
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/kv?limit=1&cursor={c}"),
            None => "/v1/kv?limit=1".to_string(),
        };
        let body = ok(&api.get(&path).await, 200);
        let page = keys_of(&body);
        if page.is_empty() {
            break;
        }
        assert_eq!(page[0], all[n]);
        n += 1;
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(n <= 29, "pagination did not end");
    }
    assert_eq!(n, 29);

    // meta=true adds the namespace version.
    let body = ok(&api.get("/v1/kv?meta=true&prefix=q").await, 200);
    assert_eq!(
        body,
        json!({"keys": ["q:1"], "count": 1, "next_cursor": null, "version": 1})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_limit_defaults_to_100_and_is_clamped_to_1000() {
    let d = Daemon::start().await;
    let api = d.api();
    for b in 0..11 {
        let ops: Vec<Value> = (0..100)
            .map(|i| json!({"op": "set", "key": format!("k{:05}", b * 100 + i), "value": 1}))
            .collect();
        ok(
            &api.post("/v1/kv/batch", &json!({"operations": ops})).await,
            200,
        );
    }
    let body = ok(&api.get("/v1/kv").await, 200);
    assert_eq!(body["count"], 100);
    assert!(body["next_cursor"].is_string());

    let body = ok(&api.get("/v1/kv?limit=5000").await, 200);
    assert_eq!(body["count"], 1000);
    let first = keys_of(&body);
    assert_eq!(first.len(), 1000);
    assert_eq!(first[999], "k00999");
    let c = body["next_cursor"]
        .as_str()
        .expect("more pages")
        .to_string();
    let body = ok(
        &api.get(&format!("/v1/kv?limit=5000&cursor={c}")).await,
        200,
    );
    assert_eq!(body["count"], 100);
    assert_eq!(keys_of(&body)[0], "k01000");
    assert_eq!(body["next_cursor"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incr_and_decr() {
    let d = Daemon::start().await;
    let api = d.api();
    let r = api.post_empty("/v1/kv/n/incr").await;
    assert_eq!(ok(&r, 200), json!({"value": 1}));
    let r = api.post("/v1/kv/n/incr", &json!({"by": 10})).await;
    assert_eq!(ok(&r, 200), json!({"value": 11}));
    let r = api.post("/v1/kv/n/decr", &json!({})).await;
    assert_eq!(ok(&r, 200), json!({"value": 10}));
    let r = api.post("/v1/kv/n/decr", &json!({"by": 25})).await;
    assert_eq!(ok(&r, 200), json!({"value": -15}));
    let r = api.post("/v1/kv/n/incr", &json!({"by": -5})).await;
    assert_eq!(ok(&r, 200), json!({"value": -20}));
    assert_eq!(api.value("n").await, Some(json!(-20)));

    // A missing key starts at 0.
    let r = api.post_empty("/v1/kv/m/decr").await;
    assert_eq!(ok(&r, 200), json!({"value": -1}));
    let r = api.post("/v1/kv/z/incr", &json!({"by": 0})).await;
    assert_eq!(ok(&r, 200), json!({"value": 0}));
    assert_eq!(api.value("z").await, Some(json!(0)));

    // INCR keeps the TTL of the key.
    ok(&api.put("/v1/kv/t?ttl=100", &json!(5)).await, 201);
    ok(&api.post_empty("/v1/kv/t/incr").await, 200);
    let m = api.meta("t").await;
    assert_eq!(m["value"], 6);
    assert!(m["expires_at"].is_string(), "{m}");

    for bad in [json!({"by": 1.5}), json!({"by": "2"}), json!({"step": 1})] {
        let r = api.post("/v1/kv/n/incr", &bad).await;
        assert_error(&r, 400, "invalid_param");
    }
    assert_eq!(api.value("n").await, Some(json!(-20)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lpush_rpush_like_redis() {
    let d = Daemon::start().await;
    let api = d.api();
    let r = api
        .post("/v1/kv/l/lpush", &json!({"values": ["a", "b", "c"]}))
        .await;
    assert_eq!(ok(&r, 200), json!({"length": 3}));
    assert_eq!(api.value("l").await, Some(json!(["c", "b", "a"])));
    let r = api.post("/v1/kv/l/rpush", &json!({"value": "d"})).await;
    assert_eq!(ok(&r, 200), json!({"length": 4}));
    let r = api
        .post("/v1/kv/l/lpush", &json!({"value": {"o": 1}}))
        .await;
    assert_eq!(ok(&r, 200), json!({"length": 5}));
    let r = api
        .post("/v1/kv/l/rpush", &json!({"values": [1, [2]]}))
        .await;
    assert_eq!(ok(&r, 200), json!({"length": 7}));
    assert_eq!(
        api.value("l").await,
        Some(json!([{"o": 1}, "c", "b", "a", "d", 1, [2]]))
    );
    let r = api
        .post("/v1/kv/r/rpush", &json!({"values": [1, 2, 3]}))
        .await;
    assert_eq!(ok(&r, 200), json!({"length": 3}));
    assert_eq!(api.value("r").await, Some(json!([1, 2, 3])));
    // `null` is a value that may be pushed.
    let r = api.post("/v1/kv/r/rpush", &json!({"value": null})).await;
    assert_eq!(ok(&r, 200), json!({"length": 4}));

    for bad in [
        json!({}),
        json!({"value": 1, "values": [2]}),
        json!({"values": []}),
        json!({"values": 3}),
        json!({"vals": [1]}),
    ] {
        let r = api.post("/v1/kv/r/rpush", &bad).await;
        assert_error(&r, 400, "invalid_param");
    }
    assert_eq!(api.value("r").await, Some(json!([1, 2, 3, null])));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lpop_rpop_with_and_without_count() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/l", &json!([1, 2, 3, 4, 5])).await, 201);

    assert_eq!(
        ok(&api.post_empty("/v1/kv/l/lpop").await, 200),
        json!({"value": 1})
    );
    assert_eq!(
        ok(&api.post("/v1/kv/l/rpop", &json!({})).await, 200),
        json!({"value": 5})
    );
    assert_eq!(
        ok(&api.post("/v1/kv/l/rpop", &json!({"count": 2})).await, 200),
        json!({"values": [4, 3]}),
        "values come in pop order"
    );
    assert_eq!(api.value("l").await, Some(json!([2])));
    assert_eq!(
        ok(&api.post("/v1/kv/l/lpop", &json!({"count": 10})).await, 200),
        json!({"values": [2]})
    );
    // A list emptied by pops stays as [].
    assert_eq!(api.value("l").await, Some(json!([])));
    assert_eq!(
        ok(&api.get("/v1/kv/l/len").await, 200),
        json!({"length": 0})
    );
    // Empty and missing: null / [].
    for key in ["l", "missing"] {
        assert_eq!(
            ok(&api.post_empty(&format!("/v1/kv/{key}/lpop")).await, 200),
            json!({"value": null})
        );
        assert_eq!(
            ok(&api.post_empty(&format!("/v1/kv/{key}/rpop")).await, 200),
            json!({"value": null})
        );
        assert_eq!(
            ok(
                &api.post(&format!("/v1/kv/{key}/lpop"), &json!({"count": 3}))
                    .await,
                200
            ),
            json!({"values": []})
        );
        assert_eq!(
            ok(
                &api.post(&format!("/v1/kv/{key}/rpop"), &json!({"count": 3}))
                    .await,
                200
            ),
            json!({"values": []})
        );
    }
    assert_eq!(api.value("missing").await, None, "popping creates nothing");
    // count 0 pops nothing.
    ok(&api.put("/v1/kv/l", &json!(["x"])).await, 200);
    assert_eq!(
        ok(&api.post("/v1/kv/l/lpop", &json!({"count": 0})).await, 200),
        json!({"values": []})
    );
    assert_eq!(api.value("l").await, Some(json!(["x"])));
    let r = api.post("/v1/kv/l/lpop", &json!({"count": -1})).await;
    assert_error(&r, 400, "invalid_param");
    let r = api.post_empty("/v1/kv/obj/lpop").await;
    assert_eq!(r.status, 200, "missing key");
    ok(&api.put("/v1/kv/obj", &json!({"a": 1})).await, 201);
    assert_error(&api.post_empty("/v1/kv/obj/lpop").await, 400, "wrong_type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn len_of_lists_missing_and_non_lists() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/l", &json!([1, [2, 3], {}])).await, 201);
    assert_eq!(
        ok(&api.get("/v1/kv/l/len").await, 200),
        json!({"length": 3})
    );
    assert_error(&api.get("/v1/kv/missing/len").await, 404, "not_found");
    ok(&api.put("/v1/kv/s", &json!("abc")).await, 201);
    assert_error(&api.get("/v1/kv/s/len").await, 400, "wrong_type");
    ok(&api.put("/v1/kv/o", &json!({"a": [1]})).await, 201);
    assert_error(&api.get("/v1/kv/o/len").await, 400, "wrong_type");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expire_sets_and_clears_ttl() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!("v")).await, 201);

    let before = now_ms();
    let r = api.post("/v1/kv/k/expire", &json!({"ttl": 100})).await;
    let body = ok(&r, 200);
    let at = body["expires_at"].as_str().expect("expires_at").to_string();
    let at_ms = rfc3339_ms(&at);
    assert!(at_ms >= before + 99_000 && at_ms <= now_ms() + 101_000);
    assert_eq!(body, json!({"expires_at": at}));
    assert_eq!(api.meta("k").await["expires_at"], json!(at));
    assert_eq!(api.meta("k").await["value"], "v", "expire keeps the value");

    let r = api.post("/v1/kv/k/expire", &json!({"ttl": 0})).await;
    assert_eq!(ok(&r, 200), json!({"expires_at": null}));
    assert_eq!(api.meta("k").await["expires_at"], Value::Null);

    ok(&api.post("/v1/kv/k/expire", &json!({"ttl": 50})).await, 200);
    let r = api.post("/v1/kv/k/expire", &json!({"ttl": null})).await;
    assert_eq!(ok(&r, 200), json!({"expires_at": null}));
    assert_eq!(api.meta("k").await["expires_at"], Value::Null);

    let r = api.post("/v1/kv/missing/expire", &json!({"ttl": 10})).await;
    assert_error(&r, 404, "not_found");
    for bad in [json!({}), json!({"ttl": -1}), json!({"ttl": "10"})] {
        let r = api.post("/v1/kv/k/expire", &bad).await;
        assert_error(&r, 400, "invalid_param");
    }
}

async fn watch(api: &Api, path: &str) -> crate::util::Reply {
    api.request_within(Duration::from_secs(20), hyper::Method::GET, path, None)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_wakes_on_a_write_from_another_task() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    ok(&api.put("/v1/kv/other", &json!(1)).await, 201);

    let w = api.clone();
    let started = Instant::now();
    let mut handle =
        tokio::spawn(async move { watch(&w, "/v1/kv/k/watch?after_version=1&timeout_s=15").await });
    // It is a long poll: nothing has changed, so no answer yet, not even when another
    // key of the namespace changes.
    assert!(
        tokio::time::timeout(Duration::from_millis(400), &mut handle)
            .await
            .is_err(),
        "watch answered before anything changed"
    );
    ok(&api.put("/v1/kv/other", &json!(2)).await, 200);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut handle)
            .await
            .is_err(),
        "watch answered for another key"
    );

    ok(&api.put("/v1/kv/k", &json!({"new": true})).await, 200);
    let r = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("watch did not wake within 5 s of the write")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let body = ok(&r, 200);
    assert_eq!(body, api.meta("k").await, "the watch answers the meta body");
    assert_eq!(body["value"], json!({"new": true}));
    assert_eq!(body["version"], 4);
    assert_eq!(body["namespace_version"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_after_version_answers_at_once_when_already_newer() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    ok(&api.put("/v1/kv/k", &json!(2)).await, 200);
    let started = Instant::now();
    let r = watch(&api, "/v1/kv/k/watch?after_version=1&timeout_s=10").await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let body = ok(&r, 200);
    assert_eq!(body["value"], 2);
    assert_eq!(body["version"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_of_a_missing_key_wakes_on_creation() {
    let d = Daemon::start().await;
    let api = d.api();
    let w = api.clone();
    let mut handle =
        tokio::spawn(
            async move { watch(&w, "/v1/kv/new/watch?after_version=0&timeout_s=15").await },
        );
    assert!(
        tokio::time::timeout(Duration::from_millis(400), &mut handle)
            .await
            .is_err(),
        "watch of a missing key answered before it was created"
    );
    ok(&api.put("/v1/kv/new", &json!("hello")).await, 201);
    let r = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("watch did not wake")
        .unwrap();
    let body = ok(&r, 200);
    assert_eq!(body["key"], "new");
    assert_eq!(body["value"], "hello");
    assert_eq!(body["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_times_out_with_204() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    let started = Instant::now();
    let r = watch(&api, "/v1/kv/k/watch?timeout_s=1").await;
    let took = started.elapsed();
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.body.is_empty());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "timeout_s=1 took {took:?}"
    );
    // A missing key times out the same way.
    let r = watch(&api, "/v1/kv/nothing/watch?timeout_s=1").await;
    assert_eq!(r.status, 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_answers_a_deletion() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    let w = api.clone();
    let mut handle =
        tokio::spawn(async move { watch(&w, "/v1/kv/k/watch?after_version=1&timeout_s=15").await });
    assert!(
        tokio::time::timeout(Duration::from_millis(400), &mut handle)
            .await
            .is_err()
    );
    assert_eq!(
        ok(&api.delete("/v1/kv/k").await, 200),
        json!({"deleted": true})
    );
    let r = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("watch did not wake on the deletion")
        .unwrap();
    assert_eq!(
        ok(&r, 200),
        json!({"key": "k", "deleted": true, "version": 2})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_of_a_missing_key_reports_a_deletion_only_when_the_namespace_moved_on() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    ok(&api.delete("/v1/kv/k").await, 200);
    ok(&api.put("/v1/kv/other", &json!(1)).await, 201);
    // The caller last saw `k` at version 1; it was deleted since: answered at once.
    let r = watch(&api, "/v1/kv/k/watch?after_version=1&timeout_s=10").await;
    let body = ok(&r, 200);
    assert_eq!(body, json!({"key": "k", "deleted": true, "version": 3}));
    // Resumed from that answer, the watch waits (no loop answering `deleted` at once)...
    let r = watch(&api, "/v1/kv/k/watch?after_version=3&timeout_s=1").await;
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    // ...and so does a key that never existed, with a version beyond the namespace's.
    let r = watch(&api, "/v1/kv/never/watch?after_version=100&timeout_s=1").await;
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    // A resumed watch still sees the key come back.
    let w = api.clone();
    let handle =
        tokio::spawn(async move { watch(&w, "/v1/kv/k/watch?after_version=3&timeout_s=15").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    ok(&api.put("/v1/kv/k", &json!("again")).await, 201);
    let r = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("the resumed watch did not wake on the new key")
        .unwrap();
    assert_eq!(ok(&r, 200)["value"], "again");
}

/// A key created and deleted between two reads of a watch is missing at both: the
/// watch still answers its deletion (here both in one commit, which no timing can let
/// the watch read between).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_sees_a_key_created_and_deleted_between_its_reads() {
    let d = Daemon::start().await;
    let api = d.api();
    let w = api.clone();
    let mut handle =
        tokio::spawn(async move { watch(&w, "/v1/kv/k/watch?after_version=0&timeout_s=15").await });
    assert!(
        tokio::time::timeout(Duration::from_millis(400), &mut handle)
            .await
            .is_err()
    );
    // Another key's deletion is no change of `k`.
    ok(&api.put("/v1/kv/other", &json!(1)).await, 201);
    ok(&api.delete("/v1/kv/other").await, 200);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut handle)
            .await
            .is_err(),
        "watch answered for another key"
    );
    let body = json!({"operations": [
        {"op": "set", "key": "k", "value": 1},
        {"op": "delete", "key": "k"},
    ]});
    ok(&api.post("/v1/kv/batch", &body).await, 200);
    let r = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("the watch missed the key's creation and deletion")
        .unwrap();
    assert_eq!(
        ok(&r, 200),
        json!({"key": "k", "deleted": true, "version": 3})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_timeout_is_at_most_300() {
    let d = Daemon::start().await;
    let api = d.api();
    let r = api.get("/v1/kv/k/watch?timeout_s=301").await;
    assert_error(&r, 400, "invalid_param");
    let r = api.get("/v1/kv/k/watch?timeout_s=-1").await;
    assert_error(&r, 400, "invalid_param");
    let r = api.get("/v1/kv/k/watch?after_version=x&timeout_s=1").await;
    assert_error(&r, 400, "invalid_param");
}
