//! The `sandkeep` CLI against a running daemon: every `kv` subcommand prints the
//! route's JSON on stdout, and the exit codes are 0 ok, 1 error (bad value, daemon not
//! running, refused request), 2 usage, 3 not found, 4 conflict. Also `status` and
//! `shutdown`.

use std::time::Duration;

use serde_json::{Value, json};

use sandkeep::auth::{Scope, mint};

use crate::util::{Cli, Daemon, SECRET, ok, run_bounded, sandkeep_command};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_get_del() {
    let d = Daemon::start().await;
    let cli = d.cli();

    let out = cli.run(&["kv", "set", "k", r#"{"a": [1, "x"]}"#]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json(),
        json!({"key": "k", "version": 1, "created": true})
    );
    let out = cli.run(&["kv", "get", "k"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), json!({"key": "k", "value": {"a": [1, "x"]}}));
    let out = cli.run(&["kv", "get", "k", "--path", "a[1]"]).await;
    assert_eq!(out.json(), json!({"key": "k", "value": "x"}));
    let out = cli.run(&["kv", "get", "k", "--meta"]).await;
    let m = out.json();
    assert_eq!(m["version"], 1);
    assert_eq!(m["namespace_version"], 1);
    assert!(m["created_at"].is_string());

    // --string stores the text; `-` reads the value from stdin.
    let out = cli.run(&["kv", "set", "s", "plain text", "--string"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(d.api().value("s").await, Some(json!("plain text")));
    let out = cli
        .run_stdin(&["kv", "set", "in", "-"], Some("{\"from\": \"stdin\"}"))
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(d.api().value("in").await, Some(json!({"from": "stdin"})));

    // Replace with --get, flags.
    let out = cli.run(&["kv", "set", "k", "2", "--get"]).await;
    assert_eq!(
        out.json(),
        json!({"key": "k", "version": 4, "created": false, "previous": {"a": [1, "x"]}})
    );
    let out = cli.run(&["kv", "set", "k", "3", "--if-version", "4"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = cli.run(&["kv", "set", "k", "4", "--if-version", "4"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("version_mismatch"), "{out:?}");
    let out = cli.run(&["kv", "set", "t", "1", "--ttl", "100"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(d.api().meta("t").await["expires_at"].is_string());

    let out = cli.run(&["kv", "del", "k"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), json!({"deleted": true}));
    let out = cli.run(&["kv", "del", "k"]).await;
    assert_eq!(
        out.code, 0,
        "deleting a missing key is not an error: {out:?}"
    );
    assert_eq!(out.json(), json!({"deleted": false}));
    assert_eq!(d.api().value("k").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_whose_daemon_dies_says_the_connection_closed() {
    let mut d = Daemon::start().await;
    let cli = d.cli();
    assert_eq!(cli.run(&["kv", "set", "k", "1"]).await.code, 0);
    let mut run = cli.spawn(&[
        "kv",
        "watch",
        "k",
        "--after-version",
        "1",
        "--timeout",
        "20",
    ]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!run.finished(), "watch ended before the daemon died");
    d.kill9();
    let out = run.wait(Duration::from_secs(15)).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("closed before it answered"),
        "the daemon was reached, then lost: {out:?}"
    );
    assert!(!out.stderr.contains("cannot reach"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exit_codes() {
    let d = Daemon::start().await;
    let cli = d.cli();
    ok(&d.api().put("/v1/kv/k", &json!("v")).await, 201);

    // 3: not found.
    let out = cli.run(&["kv", "get", "missing"]).await;
    assert_eq!(out.code, 3, "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err: Value = serde_json::from_str(out.stderr.trim()).expect("error JSON on stderr");
    assert_eq!(err["error"], "not_found");
    let out = cli.run(&["kv", "len", "missing"]).await;
    assert_eq!(out.code, 3, "{out:?}");

    // 4: conflict.
    let out = cli.run(&["kv", "set", "k", "\"v2\"", "--nx"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert!(out.stderr.contains("exists"), "{out:?}");
    let out = cli.run(&["kv", "set", "new", "1", "--xx"]).await;
    assert_eq!(out.code, 4, "{out:?}");
    assert_eq!(d.api().value("k").await, Some(json!("v")));

    // 1: errors.
    let out = cli.run(&["kv", "set", "k", "{not json"]).await;
    assert_eq!(
        out.code, 2,
        "a value that is not JSON is a bad argument: {out:?}"
    );
    assert!(!out.stderr.is_empty());
    let out = cli.run(&["kv", "incr", "k"]).await;
    assert_eq!(out.code, 1, "wrong_type: {out:?}");
    assert!(out.stderr.contains("wrong_type"), "{out:?}");
    // Bad arguments found before anything is sent: 2.
    for args in [
        &["kv", "get", "k", "--ns", "bad ns"][..],
        &["kv", "set", "k", "1", "--nx", "--xx"],
        &["kv", "list", "--limit", "0"],
        &["sync", "--timeout", "0"],
        &["sync", "--timeout", "99999"],
        &["kv", "watch", "k", "--timeout", "301"],
        &["kv", "set", "k", "1", "--ttl", "10", "--keep-ttl"],
        &["kv", "set", "k", "1", "--ttl", "0"],
        &["kv", "set", "k", "1", "--ttl", "nan"],
        &["kv", "expire", "k", "0.0001"],
        &["kv", "expire", "k", "-1"],
    ] {
        let out = cli.run(args).await;
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
    }
    let out = cli.run_stdin(&["kv", "batch", "-"], Some("not json")).await;
    assert_eq!(out.code, 2, "a batch that is not JSON: {out:?}");
    // Too deep to store is a bad argument at any depth, not "not JSON" past the
    // parser's 128 levels; a batch holding one is the daemon's to refuse.
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    for n in [33, 200] {
        let out = cli.run(&["kv", "set", "deep", &nested(n)]).await;
        assert_eq!(out.code, 2, "{n}: {out:?}");
        assert!(out.stderr.contains("deeper than 32 levels"), "{n}: {out:?}");
    }
    let batch = format!(
        r#"{{"operations": [{{"op": "set", "key": "deep", "value": {}}}]}}"#,
        nested(200)
    );
    let out = cli.run_stdin(&["kv", "batch", "-"], Some(&batch)).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("invalid_value"), "{out:?}");
    assert_eq!(d.api().value("deep").await, None);
    // Negative numbers are values, not options.
    assert_eq!(cli.run(&["kv", "set", "neg", "-5"]).await.code, 0);
    assert_eq!(
        cli.run(&["kv", "get", "neg"]).await.stdout.trim(),
        r#"{"key":"neg","value":-5}"#
    );
    let out = cli.run(&["kv", "rpush", "negl", "-1", "-2.5"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let nobody = Cli::new(&d.root().join("nobody.sock"));
    let out = nobody.run(&["kv", "get", "k"]).await;
    assert_eq!(out.code, 1, "daemon not running: {out:?}");
    assert!(out.stderr.contains("No such file or directory"), "{out:?}");
    assert!(out.stderr.contains("cannot reach the daemon"), "{out:?}");
    // A probe says nothing, whatever happens.
    let out = nobody.run(&["status", "--ready"]).await;
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (1, "", ""),
        "{out:?}"
    );
    let out = cli.run(&["status", "--ready"]).await;
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (0, "", ""),
        "{out:?}"
    );

    // 2: usage.
    let out = cli.run(&["kv", "frobnicate", "k"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = cli.run(&["nothing"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = cli.run(&["kv", "set", "k"]).await;
    assert_eq!(out.code, 2, "missing argument: {out:?}");
    let out = cli.run(&["kv", "incr", "k", "--by", "x"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    // --help and --version are not errors.
    let out = cli.run(&["--help"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("kv"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incr_decr() {
    let d = Daemon::start().await;
    let cli = d.cli();
    let out = cli.run(&["kv", "incr", "n"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), json!({"value": 1}));
    let out = cli.run(&["kv", "incr", "n", "--by", "10"]).await;
    assert_eq!(out.json(), json!({"value": 11}));
    let out = cli.run(&["kv", "decr", "n", "--by", "20"]).await;
    assert_eq!(out.json(), json!({"value": -9}));
    let out = cli.run(&["kv", "incr", "n", "--by", "-1"]).await;
    assert_eq!(out.json(), json!({"value": -10}));
    let out = cli.run(&["kv", "decr", "m"]).await;
    assert_eq!(out.json(), json!({"value": -1}));
    assert_eq!(d.api().value("n").await, Some(json!(-10)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lists() {
    let d = Daemon::start().await;
    let cli = d.cli();
    let out = cli
        .run(&["kv", "lpush", "l", "\"a\"", "\"b\"", "\"c\""])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), json!({"length": 3}));
    assert_eq!(d.api().value("l").await, Some(json!(["c", "b", "a"])));
    let out = cli.run(&["kv", "rpush", "l", "1", "{\"o\": true}"]).await;
    assert_eq!(out.json(), json!({"length": 5}));
    let out = cli.run(&["kv", "len", "l"]).await;
    assert_eq!(out.json(), json!({"length": 5}));
    let out = cli.run(&["kv", "lpop", "l"]).await;
    assert_eq!(out.json(), json!({"value": "c"}));
    let out = cli.run(&["kv", "rpop", "l"]).await;
    assert_eq!(out.json(), json!({"value": {"o": true}}));
    let out = cli.run(&["kv", "rpop", "l", "--count", "2"]).await;
    assert_eq!(out.json(), json!({"values": [1, "a"]}));
    let out = cli.run(&["kv", "lpop", "l", "--count", "5"]).await;
    assert_eq!(out.json(), json!({"values": ["b"]}));
    let out = cli.run(&["kv", "lpop", "l"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), json!({"value": null}));
    let out = cli.run(&["kv", "len", "l"]).await;
    assert_eq!(out.json(), json!({"length": 0}));
    let out = cli.run(&["kv", "rpush", "l", "not-json"]).await;
    assert_eq!(out.code, 2, "{out:?}");
    let out = cli.run(&["kv", "lpush", "l"]).await;
    assert_eq!(out.code, 2, "values are required: {out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_keys() {
    let d = Daemon::start().await;
    let cli = d.cli();
    for k in ["a:1", "a:2", "a:3", "b:1"] {
        assert_eq!(cli.run(&["kv", "set", k, "0"]).await.code, 0);
    }
    let out = cli.run(&["kv", "list"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json(),
        json!({"keys": ["a:1", "a:2", "a:3", "b:1"], "count": 4, "next_cursor": null})
    );
    let out = cli
        .run(&["kv", "list", "--prefix", "a:", "--limit", "2"])
        .await;
    let page = out.json();
    assert_eq!(page["keys"], json!(["a:1", "a:2"]));
    let cursor = page["next_cursor"].as_str().expect("a cursor").to_string();
    let out = cli
        .run(&[
            "kv", "list", "--prefix", "a:", "--limit", "2", "--cursor", &cursor,
        ])
        .await;
    assert_eq!(
        out.json(),
        json!({"keys": ["a:3"], "count": 1, "next_cursor": null})
    );
    let out = cli
        .run(&["kv", "list", "--prefix", "a:", "--limit", "1", "--all"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json(),
        json!({"keys": ["a:1", "a:2", "a:3"], "count": 3})
    );
    // --ns selects the namespace.
    assert_eq!(
        cli.run(&["kv", "set", "x", "1", "--ns", "other"])
            .await
            .code,
        0
    );
    let out = cli.run(&["kv", "list", "--ns", "other"]).await;
    assert_eq!(out.json()["keys"], json!(["x"]));
    let out = cli.run(&["kv", "--ns", "other", "get", "x"]).await;
    assert_eq!(out.json(), json!({"key": "x", "value": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expire() {
    let d = Daemon::start().await;
    let cli = d.cli();
    assert_eq!(cli.run(&["kv", "set", "k", "1"]).await.code, 0);
    let out = cli.run(&["kv", "expire", "k", "100"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let at = out.json()["expires_at"]
        .as_str()
        .expect("expires_at")
        .to_string();
    assert_eq!(d.api().meta("k").await["expires_at"], json!(at));
    let out = cli.run(&["kv", "expire", "k", "0"]).await;
    assert_eq!(out.json(), json!({"expires_at": null}));
    assert_eq!(d.api().meta("k").await["expires_at"], Value::Null);
    let out = cli.run(&["kv", "expire", "missing", "10"]).await;
    assert_eq!(out.code, 3, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_from_file_and_stdin() {
    let d = Daemon::start().await;
    let cli = d.cli();
    let file = d.root().join("batch.json");
    std::fs::write(
        &file,
        json!({"operations": [
            {"op": "set", "key": "a", "value": 1},
            {"op": "incr", "key": "a", "by": 2},
        ]})
        .to_string(),
    )
    .unwrap();
    let out = cli.run(&["kv", "batch", file.to_str().unwrap()]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.json(),
        json!({"version": 1, "results": [
            {"key": "a", "version": 1, "created": true},
            {"value": 3},
        ]})
    );
    let body = json!({"if_version": 1, "operations": [{"op": "get", "key": "a"}]}).to_string();
    let out = cli.run_stdin(&["kv", "batch", "-"], Some(&body)).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["results"][0], json!({"key": "a", "value": 3}));
    let out = cli.run_stdin(&["kv", "batch"], Some(&body)).await;
    assert_eq!(out.code, 0, "stdin is the default: {out:?}");
    // A failing batch: its status decides the exit code.
    let body = json!({"if_version": 0, "operations": [{"op": "get", "key": "a"}]}).to_string();
    let out = cli.run_stdin(&["kv", "batch"], Some(&body)).await;
    assert_eq!(out.code, 4, "{out:?}");
    let out = cli
        .run(&["kv", "batch", d.root().join("nope.json").to_str().unwrap()])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch() {
    let d = Daemon::start().await;
    let cli = d.cli();
    assert_eq!(cli.run(&["kv", "set", "k", "1"]).await.code, 0);

    // Nothing changes: exit 3 after the timeout.
    let out = cli.run(&["kv", "watch", "k", "--timeout", "1"]).await;
    assert_eq!(out.code, 3, "{out:?}");

    // A change wakes it with the meta body.
    let mut run = cli.spawn(&[
        "kv",
        "watch",
        "k",
        "--after-version",
        "1",
        "--timeout",
        "20",
    ]);
    // Still waiting a moment later (the key is at version 1); then a write wakes it,
    // whichever reaches the daemon first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!run.finished(), "watch ended before anything changed");
    ok(&d.api().put("/v1/kv/k", &json!("changed")).await, 200);
    let out = run.wait(Duration::from_secs(15)).await;
    assert_eq!(out.code, 0, "{out:?}");
    let body = out.json();
    assert_eq!(body["key"], "k");
    assert_eq!(body["value"], "changed");
    assert_eq!(body["version"], 2);

    // --after-version older than the key's: at once.
    let out = cli
        .run(&[
            "kv",
            "watch",
            "k",
            "--after-version",
            "1",
            "--timeout",
            "10",
        ])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["value"], "changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_and_shutdown() {
    let mut d = Daemon::start().await;
    let cli = d.cli();
    let out = cli.run(&["status"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["state"], "ready");
    ok(&d.api().put("/v1/kv/k", &json!(1)).await, 201);
    let out = cli.run(&["shutdown"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["exit_code"], 0, "{out:?}");
    // It returned once the daemon was gone: the final sync is done, the socket removed.
    assert!(
        !d.socket.exists(),
        "shutdown returned before the daemon exited"
    );
    assert!(d.log().contains("final sync done"), "log:\n{}", d.log());
    let st = d.wait_exit(crate::util::EXIT_TIMEOUT);
    assert_eq!(st.code(), Some(0));
    let out = cli.run(&["status"]).await;
    assert_eq!(out.code, 1, "daemon gone: {out:?}");
    // A wait out of its range is a usage error, before anything is sent.
    let out = cli
        .run(&["shutdown", "--wait", "18446744073709551615"])
        .await;
    assert_eq!(out.code, 2, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn socket_and_token_from_environment_and_config() {
    let d = Daemon::start_token().await;
    let hour = Duration::from_secs(3600);
    let t = mint(SECRET, &["app".into()], &Scope::DEFAULT, hour, hour, None).unwrap();
    let run = |cmd| run_bounded(cmd, None, Duration::from_secs(30));

    // SANDKEEP_SOCKET and SANDKEEP_TOKEN.
    let mut cmd = sandkeep_command();
    cmd.env("SANDKEEP_SOCKET", &d.socket)
        .env("SANDKEEP_TOKEN", &t)
        .args(["kv", "set", "k", "1"]);
    let out = run(cmd);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json()["created"], true);

    // The socket from --config, the token from --token.
    let mut cmd = sandkeep_command();
    cmd.arg("--config")
        .arg(&d.config_path)
        .args(["--token", &t, "kv", "get", "k"]);
    let out = run(cmd);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), json!({"key": "k", "value": 1}));

    // SANDKEEP_CONFIG.
    let mut cmd = sandkeep_command();
    cmd.env("SANDKEEP_CONFIG", &d.config_path)
        .env("SANDKEEP_TOKEN", &t)
        .args(["kv", "incr", "k"]);
    let out = run(cmd);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), json!({"value": 2}));

    // A variable that is not UTF-8 is none of sandkeep's business unless it is one of
    // its own, which is then refused by name (not a panic).
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = std::ffi::OsStr::from_bytes(b"\xff");
    let mut cmd = sandkeep_command();
    cmd.env("SANDKEEP_CONFIG", &d.config_path)
        .env("SANDKEEP_TOKEN", &t)
        .env("SOMETHING_ELSE", not_utf8)
        .args(["kv", "get", "k"]);
    let out = run(cmd);
    assert_eq!(out.code, 0, "{out:?}");
    let mut cmd = sandkeep_command();
    cmd.env("SANDKEEP_CONFIG", &d.config_path)
        .env("SANDKEEP_WORKSPACE", not_utf8)
        .args(["kv", "get", "k"]);
    let out = run(cmd);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr.contains("SANDKEEP_WORKSPACE") && out.stderr.contains("UTF-8"),
        "{out:?}"
    );

    // Without a token: refused (401 is an error, exit 1), the error on stderr.
    let out = d.cli().run(&["kv", "get", "k"]).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("unauthorized"), "{out:?}");
    // A token for another namespace: 403, exit 1.
    let out = d
        .cli()
        .with_token(&t)
        .run(&["kv", "get", "k", "--ns", "other"])
        .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("forbidden"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_binds_the_socket_given_on_the_command_line() {
    let d = crate::util::Daemon::prepare("");
    let other = d.root().join("other.sock");
    let log = d.log_path.clone();
    let mut child = d
        .serve_command(&[], &log)
        .arg("--socket")
        .arg(&other)
        .spawn()
        .unwrap();
    let api = crate::util::Api::from(sandkeep::client::Client::new(&other, None));
    let ready =
        crate::util::poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
            let client = api.client.clone();
            async move {
                match client.request(hyper::Method::GET, "/readyz", None).await {
                    Ok(r) if r.status == 200 => Some(()),
                    _ => None,
                }
            }
        })
        .await;
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let status = child.wait().unwrap();
    assert!(
        ready.is_some(),
        "not ready on --socket; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(!d.socket.exists(), "the config's socket was bound");
    assert_eq!(status.code(), Some(0));
}
