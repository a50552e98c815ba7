//! Concurrency: many clients incrementing one key lose no update and every INCR sees a
//! distinct value; optimistic read-modify-write with `if_version` and retries on 409
//! loses no update either; concurrent batches stay atomic.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::json;

use crate::util::{Api, Daemon, ok};

/// Bound on every concurrency test's work.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_incr_loses_nothing() {
    let d = Daemon::start().await;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        // One client (one connection pool) per task.
        let api = Api::from(d.client());
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(50);
            for _ in 0..50 {
                let r = api.post_empty("/v1/kv/counter/incr").await;
                seen.push(ok(&r, 200)["value"].as_i64().unwrap());
            }
            seen
        }));
    }
    let all = tokio::time::timeout(TEST_TIMEOUT, futures_join(tasks))
        .await
        .expect("the INCRs did not finish in time");
    let values: BTreeSet<i64> = all.iter().flatten().copied().collect();
    assert_eq!(all.iter().map(Vec::len).sum::<usize>(), 1000);
    assert_eq!(
        values,
        (1..=1000).collect::<BTreeSet<i64>>(),
        "every INCR must see its own value"
    );
    let api = d.api();
    assert_eq!(api.value("counter").await, Some(json!(1000)));
    assert_eq!(api.ns_version(None).await, 1000);
    assert_eq!(api.meta("counter").await["version"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn optimistic_read_modify_write_loses_nothing() {
    let d = Daemon::start().await;
    const CLIENTS: usize = 10;
    const EACH: u64 = 20;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let api = Api::from(d.client());
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0u64;
            let mut done = 0;
            while done < EACH {
                assert!(conflicts < 100_000, "no progress");
                let r = api.get("/v1/kv/doc?meta=true").await;
                let (count, version) = match r.status {
                    404 => (0, 0),
                    200 => {
                        let b = r.json();
                        (
                            b["value"]["count"].as_u64().unwrap(),
                            b["version"].as_u64().unwrap(),
                        )
                    }
                    s => panic!("GET: {s} {:?}", r.body),
                };
                let r = api
                    .put(
                        &format!("/v1/kv/doc?if_version={version}"),
                        &json!({"count": count + 1}),
                    )
                    .await;
                match r.status {
                    200 | 201 => done += 1,
                    409 => {
                        let b = r.json();
                        assert_eq!(b["error"], "version_mismatch", "{b}");
                        assert_eq!(b["expected_version"], version);
                        conflicts += 1;
                    }
                    s => panic!("PUT: {s} {:?}", r.body),
                }
            }
            conflicts
        }));
    }
    let conflicts = tokio::time::timeout(TEST_TIMEOUT, futures_join(tasks))
        .await
        .expect("the read-modify-write loops did not finish in time");
    let api = d.api();
    let total = CLIENTS as u64 * EACH;
    assert_eq!(
        api.value("doc").await,
        Some(json!({"count": total})),
        "lost updates ({} conflicts retried)",
        conflicts.iter().sum::<u64>()
    );
    // Exactly one successful write per increment: the namespace version says so.
    assert_eq!(api.ns_version(None).await, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_are_atomic() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/a", &json!(0)).await, 201);
    ok(&api.put("/v1/kv/b", &json!(0)).await, 201);
    // Each batch moves one unit from a to b; a reader must always see a + b == 0.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let api = Api::from(d.client());
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                let r = api
                    .post(
                        "/v1/kv/batch",
                        &json!({"operations": [
                            {"op": "decr", "key": "a"},
                            {"op": "incr", "key": "b"},
                        ]}),
                    )
                    .await;
                ok(&r, 200);
            }
        }));
    }
    let reader = {
        let api = Api::from(d.client());
        tokio::spawn(async move {
            let mut checks = 0;
            for _ in 0..200 {
                let r = api
                    .post(
                        "/v1/kv/batch",
                        &json!({"operations": [
                            {"op": "get", "key": "a"},
                            {"op": "get", "key": "b"},
                        ]}),
                    )
                    .await;
                let b = ok(&r, 200);
                let (x, y) = (
                    b["results"][0]["value"].as_i64().unwrap(),
                    b["results"][1]["value"].as_i64().unwrap(),
                );
                assert_eq!(x + y, 0, "a batch was seen half applied: {b}");
                checks += 1;
            }
            checks
        })
    };
    tokio::time::timeout(TEST_TIMEOUT, futures_join(tasks))
        .await
        .expect("batches did not finish in time");
    let checks = tokio::time::timeout(TEST_TIMEOUT, reader)
        .await
        .expect("reader did not finish")
        .unwrap();
    assert_eq!(checks, 200);
    assert_eq!(api.value("a").await, Some(json!(-200)));
    assert_eq!(api.value("b").await, Some(json!(200)));
    assert_eq!(api.ns_version(None).await, 2 + 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_in_many_namespaces() {
    let d = Daemon::start().await;
    let mut tasks = Vec::new();
    for n in 0..5 {
        for _ in 0..4 {
            let api = Api::from(d.client());
            tasks.push(tokio::spawn(async move {
                for _ in 0..25 {
                    ok(
                        &api.post_empty(&format!("/v1/kv/c/incr?ns=ns{n}")).await,
                        200,
                    );
                }
            }));
        }
    }
    tokio::time::timeout(TEST_TIMEOUT, futures_join(tasks))
        .await
        .expect("the INCRs did not finish in time");
    let api = d.api();
    for n in 0..5 {
        let ns = format!("ns{n}");
        assert_eq!(api.value_in(Some(&ns), "c").await, Some(json!(100)), "{ns}");
        assert_eq!(api.ns_version(Some(&ns)).await, 100, "{ns}");
    }
    assert_eq!(api.ns_version(None).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_write_wakes_every_watcher() {
    let d = Daemon::start().await;
    let api = d.api();
    ok(&api.put("/v1/kv/k", &json!(1)).await, 201);
    let mut watchers = Vec::new();
    for _ in 0..30 {
        let api = Api::from(d.client());
        watchers.push(tokio::spawn(async move {
            api.request_within(
                Duration::from_secs(30),
                hyper::Method::GET,
                "/v1/kv/k/watch?after_version=1&timeout_s=20",
                None,
            )
            .await
        }));
    }
    ok(&api.put("/v1/kv/k", &json!(2)).await, 200);
    let replies = tokio::time::timeout(Duration::from_secs(15), futures_join(watchers))
        .await
        .expect("not every watcher woke up");
    for r in replies {
        let b = ok(&r, 200);
        assert_eq!(b["value"], 2);
        assert_eq!(b["version"], 2);
    }
}

/// Awaits every task, propagating panics.
async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("task panicked"));
    }
    out
}
