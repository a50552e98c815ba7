//! Versions and batches: the namespace version moves by one per committed write (a
//! batch is one write, a batch of gets none), a key's version is the namespace version
//! of its last modification; batch `if_version` (namespace) and `checks` (keys),
//! all-or-nothing with the failing operation's status and `index`, the 100-operation
//! limit, and `results[i]` equal to the single-key routes' bodies.

use serde_json::{Value, json};

use crate::util::{Api, Daemon, assert_error, ok, rfc3339_ms};

async fn batch(api: &Api, body: Value) -> crate::util::Reply {
    api.post("/v1/kv/batch", &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespace_version_counts_committed_writes() {
    let d = Daemon::start().await;
    let api = d.api();
    assert_eq!(api.ns_version(None).await, 0, "a new namespace is at 0");

    ok(&api.put("/v1/kv/a", &json!({"v": 1})).await, 201);
    assert_eq!(api.ns_version(None).await, 1);
    ok(&api.put("/v1/kv/b", &json!(1)).await, 201);
    ok(&api.post_empty("/v1/kv/c/incr").await, 200);
    ok(&api.post("/v1/kv/l/rpush", &json!({"value": 1})).await, 200);
    ok(&api.patch("/v1/kv/a?path=x", &json!(1)).await, 200);
    ok(
        &api.post("/v1/kv/a/expire", &json!({"ttl": 100})).await,
        200,
    );
    ok(&api.post_empty("/v1/kv/l/lpop").await, 200);
    assert_eq!(
        ok(&api.delete("/v1/kv/b").await, 200),
        json!({"deleted": true})
    );
    assert_eq!(api.ns_version(None).await, 8);

    // Refused writes and reads change nothing.
    assert_error(&api.put("/v1/kv/a?nx=true", &json!(2)).await, 409, "exists");
    assert_error(&api.post_empty("/v1/kv/a/incr").await, 400, "wrong_type");
    assert_error(
        &api.put("/v1/kv/z", &Value::Null).await,
        422,
        "invalid_value",
    );
    ok(&api.get("/v1/kv/a").await, 200);
    ok(&api.get("/v1/kv").await, 200);
    ok(&api.get("/v1/kv/l/len").await, 200);
    assert_eq!(api.ns_version(None).await, 8);

    // Each key's version is the namespace version of its last modification.
    assert_eq!(api.meta("a").await["version"], 6);
    assert_eq!(api.meta("c").await["version"], 3);
    assert_eq!(api.meta("l").await["version"], 7);
    assert_eq!(api.meta("c").await["namespace_version"], 8);

    // A batch is one write: every key it touches gets the same version.
    let r = batch(
        &api,
        json!({"operations": [
            {"op": "set", "key": "a", "value": 10},
            {"op": "incr", "key": "c"},
            {"op": "set", "key": "new", "value": true},
        ]}),
    )
    .await;
    assert_eq!(ok(&r, 200)["version"], 9);
    assert_eq!(api.ns_version(None).await, 9);
    for k in ["a", "c", "new"] {
        assert_eq!(api.meta(k).await["version"], 9, "{k}");
    }
    assert_eq!(api.meta("l").await["version"], 7);

    // A batch of only gets changes no version and answers the current one.
    let r = batch(
        &api,
        json!({"operations": [
            {"op": "get", "key": "a"},
            {"op": "get", "key": "c", "meta": true},
        ]}),
    )
    .await;
    let body = ok(&r, 200);
    assert_eq!(body["version"], 9);
    assert_eq!(body["results"][0], json!({"key": "a", "value": 10}));
    assert_eq!(body["results"][1]["value"], 2);
    assert_eq!(body["results"][1]["version"], 9);
    assert_eq!(api.ns_version(None).await, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meta_fields_are_rfc3339() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k?ttl=60", &json!(1)).await, 201);
    let m = api.meta("k").await;
    for f in ["created_at", "updated_at", "expires_at"] {
        let s = m[f]
            .as_str()
            .unwrap_or_else(|| panic!("{f} missing in {m}"));
        rfc3339_ms(s);
    }
    let created = rfc3339_ms(m["created_at"].as_str().unwrap());
    let expires = rfc3339_ms(m["expires_at"].as_str().unwrap());
    assert!(
        (59_000..=61_000).contains(&(expires - created)),
        "ttl=60 gave {created} -> {expires}"
    );
    assert_eq!(m["version"], 1);
    assert_eq!(m["namespace_version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_results_are_the_single_key_bodies() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/old", &json!({"x": 1})).await, 201);
    ok(&api.put("/v1/kv/gone", &json!("bye")).await, 201);

    let r = batch(
        &api,
        json!({"operations": [
            {"op": "set", "key": "s", "value": {"a": 1}},
            {"op": "set", "key": "old", "value": 2, "get": true},
            {"op": "get", "key": "s"},
            {"op": "get", "key": "s", "path": "a"},
            {"op": "patch", "key": "s", "path": "b.c", "value": 3},
            {"op": "patch", "key": "s", "value": {"a": null}},
            {"op": "incr", "key": "n", "by": 5},
            {"op": "decr", "key": "n"},
            {"op": "lpush", "key": "l", "values": ["a", "b", "c"]},
            {"op": "rpush", "key": "l", "value": "z"},
            {"op": "lpop", "key": "l"},
            {"op": "rpop", "key": "l", "count": 2},
            {"op": "delete", "key": "gone", "get": true},
            {"op": "delete", "key": "never"},
            {"op": "expire", "key": "s", "ttl": 0},
            {"op": "set", "key": "s2", "value": 1, "nx": true},
            {"op": "set", "key": "s2", "value": 2, "xx": true},
            {"op": "get", "key": "s"},
        ]}),
    )
    .await;
    let body = ok(&r, 200);
    assert_eq!(body["version"], 3);
    let results = body["results"].as_array().unwrap();
    let expected = [
        json!({"key": "s", "version": 3, "created": true}),
        json!({"key": "old", "version": 3, "created": false, "previous": {"x": 1}}),
        json!({"key": "s", "value": {"a": 1}}),
        json!({"key": "s", "value": 1}),
        json!({"key": "s", "version": 3}),
        json!({"key": "s", "version": 3}),
        json!({"value": 5}),
        json!({"value": 4}),
        json!({"length": 3}),
        json!({"length": 4}),
        json!({"value": "c"}),
        json!({"values": ["z", "a"]}),
        json!({"deleted": true, "previous": "bye"}),
        json!({"deleted": false}),
        json!({"expires_at": null}),
        json!({"key": "s2", "version": 3, "created": true}),
        json!({"key": "s2", "version": 3, "created": false}),
        json!({"key": "s", "value": {"b": {"c": 3}}}),
    ];
    assert_eq!(results.len(), expected.len());
    for (i, e) in expected.iter().enumerate() {
        assert_eq!(&results[i], e, "results[{i}]");
    }
    assert_eq!(api.value("l").await, Some(json!(["b"])));
    assert_eq!(api.value("n").await, Some(json!(4)));
    assert_eq!(api.value("gone").await, None);
    assert_eq!(api.value("s2").await, Some(json!(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_if_version_compares_the_namespace_version() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/a", &json!(1)).await, 201);
    ok(&api.put("/v1/kv/b", &json!(1)).await, 201);

    let r = batch(
        &api,
        json!({"if_version": 1, "operations": [{"op": "set", "key": "a", "value": 2}]}),
    )
    .await;
    let b = assert_error(&r, 409, "version_mismatch");
    assert_eq!(b["expected_version"], 1);
    assert_eq!(b["actual_version"], 2);
    assert_eq!(api.value("a").await, Some(json!(1)));

    let r = batch(
        &api,
        json!({"if_version": 2, "operations": [{"op": "set", "key": "a", "value": 2}]}),
    )
    .await;
    assert_eq!(ok(&r, 200)["version"], 3);
    assert_eq!(api.value("a").await, Some(json!(2)));

    // A new namespace is at version 0.
    let r = api
        .post(
            "/v1/kv/batch?ns=fresh",
            &json!({"if_version": 0, "operations": [{"op": "set", "key": "a", "value": 1}]}),
        )
        .await;
    assert_eq!(ok(&r, 200)["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_checks_compare_key_versions() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/a", &json!(1)).await, 201); // a@1
    ok(&api.put("/v1/kv/b", &json!(1)).await, 201); // b@2

    let set_c = json!([{"op": "set", "key": "c", "value": 1}]);
    // Wrong version of an existing key.
    let r = batch(
        &api,
        json!({"checks": [{"key": "a", "version": 1}, {"key": "b", "version": 1}], "operations": set_c}),
    )
    .await;
    let body = assert_error(&r, 409, "version_mismatch");
    assert_eq!(body["expected_version"], 1);
    assert_eq!(body["actual_version"], 2);
    assert_eq!(body["key"], "b", "the check that failed");
    // Version 0 means "must not exist".
    let r = batch(
        &api,
        json!({"checks": [{"key": "a", "version": 0}], "operations": set_c}),
    )
    .await;
    let body = assert_error(&r, 409, "version_mismatch");
    assert_eq!(body["actual_version"], 1);
    assert_eq!(api.value("c").await, None);
    assert_eq!(api.ns_version(None).await, 2);

    let r = batch(
        &api,
        json!({"checks": [
            {"key": "a", "version": 1},
            {"key": "b", "version": 2},
            {"key": "c", "version": 0},
        ], "operations": set_c}),
    )
    .await;
    assert_eq!(ok(&r, 200)["version"], 3);
    assert_eq!(api.value("c").await, Some(json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_is_all_or_nothing() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(
        &batch(
            &api,
            json!({"operations": [
                {"op": "set", "key": "a", "value": 1},
                {"op": "set", "key": "b", "value": 2},
                {"op": "set", "key": "c", "value": "text"},
                {"op": "set", "key": "l", "value": [1]},
            ]}),
        )
        .await,
        200,
    );
    let before_version = api.ns_version(None).await;
    assert_eq!(before_version, 1);

    // The 3rd operation fails with its single-key status (400 wrong_type).
    let r = batch(
        &api,
        json!({"operations": [
            {"op": "set", "key": "a", "value": 100},
            {"op": "incr", "key": "b"},
            {"op": "incr", "key": "c"},
            {"op": "set", "key": "d", "value": 4},
            {"op": "delete", "key": "l"},
        ]}),
    )
    .await;
    let body = assert_error(&r, 400, "wrong_type");
    assert_eq!(body["index"], 2, "{body}");

    // A 409 from the 3rd operation: the same, with Retry-After.
    let r = batch(
        &api,
        json!({"operations": [
            {"op": "delete", "key": "a"},
            {"op": "rpush", "key": "l", "value": 2},
            {"op": "set", "key": "b", "value": 0, "nx": true},
        ]}),
    )
    .await;
    let body = assert_error(&r, 409, "exists");
    assert_eq!(body["index"], 2);

    // A 404 from the 2nd operation (depends on the 1st: the key it deleted).
    let r = batch(
        &api,
        json!({"operations": [
            {"op": "delete", "key": "a"},
            {"op": "patch", "key": "a", "path": "x", "value": 1},
        ]}),
    )
    .await;
    let body = assert_error(&r, 404, "not_found");
    assert_eq!(body["index"], 1);

    // A 422 from the last operation.
    let r = batch(
        &api,
        json!({"operations": [
            {"op": "set", "key": "a", "value": 5},
            {"op": "set", "key": "e", "value": null},
        ]}),
    )
    .await;
    let body = assert_error(&r, 422, "invalid_value");
    assert_eq!(body["index"], 1);

    // Nothing of any of them is visible.
    assert_eq!(api.value("a").await, Some(json!(1)));
    assert_eq!(api.value("b").await, Some(json!(2)));
    assert_eq!(api.value("c").await, Some(json!("text")));
    assert_eq!(api.value("d").await, None);
    assert_eq!(api.value("e").await, None);
    assert_eq!(api.value("l").await, Some(json!([1])));
    assert_eq!(api.ns_version(None).await, before_version);
    for k in ["a", "b", "c", "l"] {
        assert_eq!(api.meta(k).await["version"], 1, "{k}");
    }
    let r = api.get("/v1/kv").await;
    assert_eq!(ok(&r, 200)["keys"], json!(["a", "b", "c", "l"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_operations_see_the_previous_ones() {
    let d = Daemon::start().await;
    let api = d.api();
    let r = batch(
        &api,
        json!({"operations": [
            {"op": "set", "key": "k", "value": 1},
            {"op": "incr", "key": "k", "by": 41},
            {"op": "get", "key": "k"},
            {"op": "delete", "key": "k"},
            {"op": "set", "key": "k", "value": "again", "nx": true},
        ]}),
    )
    .await;
    let body = ok(&r, 200);
    assert_eq!(body["results"][1], json!({"value": 42}));
    assert_eq!(body["results"][2], json!({"key": "k", "value": 42}));
    assert_eq!(body["results"][3], json!({"deleted": true}));
    assert_eq!(body["results"][4]["created"], true);
    assert_eq!(api.value("k").await, Some(json!("again")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_holds_at_most_100_operations() {
    let d = Daemon::start().await;
    let api = d.api();
    let ops = |n: usize| -> Value {
        (0..n)
            .map(|i| json!({"op": "set", "key": format!("k{i}"), "value": i}))
            .collect()
    };
    let r = batch(&api, json!({"operations": ops(101)})).await;
    assert_error(&r, 400, "invalid_param");
    assert_eq!(api.ns_version(None).await, 0);
    assert_eq!(api.value("k0").await, None);

    let r = batch(&api, json!({"operations": ops(100)})).await;
    let body = ok(&r, 200);
    assert_eq!(body["results"].as_array().unwrap().len(), 100);
    assert_eq!(body["version"], 1);
    assert_eq!(ok(&api.get("/v1/kv?limit=1000").await, 200)["count"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_bodies_are_validated() {
    let d = Daemon::start().await;
    let api = d.api();
    let r = api
        .raw(hyper::Method::POST, "/v1/kv/batch", b"{\"operations\": [")
        .await;
    assert_error(&r, 400, "invalid_json");
    for bad in [
        json!({}),
        json!({"operations": "x"}),
        json!({"operations": [], "extra": 1}),
        json!({"operations": [{"op": "frob", "key": "a"}]}),
        json!({"operations": [{"op": "set", "key": "a"}]}),
        json!({"operations": [{"op": "set", "key": "a", "value": 1, "nx": true, "xx": true}]}),
        json!({"operations": [{"op": "incr", "key": "a", "by": 0.5}]}),
        json!({"operations": [{"op": "expire", "key": "a"}]}),
    ] {
        let r = batch(&api, bad).await;
        assert_error(&r, 400, "invalid_param");
    }
    let r = batch(
        &api,
        json!({"operations": [{"op": "get", "key": "a"}, {"op": "set", "key": "$a", "value": 1}]}),
    )
    .await;
    let body = assert_error(&r, 400, "reserved_key");
    assert_eq!(body["index"], 1);
    let r = batch(
        &api,
        json!({"operations": [{"op": "set", "key": "a\u{1}", "value": 1}]}),
    )
    .await;
    let body = assert_error(&r, 400, "invalid_key");
    assert_eq!(body["index"], 0);
    // A field that the operation does not take is refused, not ignored: a misplaced
    // condition must not turn into a blind write.
    for (i, op) in [
        json!({"op": "incr", "key": "c", "if_version": 999}),
        json!({"op": "rpush", "key": "l", "value": 1, "if_version": 3}),
        json!({"op": "expire", "key": "a", "ttl": 5, "if_version": 3}),
        json!({"op": "delete", "key": "a", "nx": true}),
        json!({"op": "delete", "key": "a", "ttl": 5}),
        json!({"op": "incr", "key": "c", "value": 5}),
        json!({"op": "get", "key": "a", "if_version": 1}),
        json!({"op": "set", "key": "a", "value": 1, "ttl": 5, "keep_ttl": true}),
    ]
    .into_iter()
    .enumerate()
    {
        let ops = vec![json!({"op": "set", "key": "ok", "value": 1}), op.clone()];
        let r = batch(&api, json!({ "operations": ops })).await;
        let body = assert_error(&r, 400, "invalid_param");
        assert_eq!(body["index"], 1, "case {i}: {op}");
    }
    assert_eq!(api.ns_version(None).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_get_with_meta_is_the_single_key_body() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/a", &json!({"x": 1})).await, 201);
    ok(&api.put("/v1/kv/b", &json!(2)).await, 201);
    // results[i] is the body the single-key route would have returned: a get with
    // meta answers what `GET /v1/kv/a?meta=true` answers, `namespace_version` included.
    let r = batch(
        &api,
        json!({"operations": [
            {"op": "get", "key": "a", "meta": true},
            {"op": "get", "key": "a", "path": "x"},
        ]}),
    )
    .await;
    let body = ok(&r, 200);
    assert_eq!(body["results"][1], json!({"key": "a", "value": 1}));
    assert_eq!(body["results"][0], api.meta("a").await);

    // After a write of the same batch, the get sees the batch's namespace version.
    let r = batch(
        &api,
        json!({"operations": [
            {"op": "set", "key": "b", "value": 3},
            {"op": "get", "key": "b", "meta": true},
        ]}),
    )
    .await;
    let body = ok(&r, 200);
    assert_eq!(body["version"], 3);
    assert_eq!(body["results"][1], api.meta("b").await);
}
