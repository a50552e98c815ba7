//! `auth.mode = "token"`: 401 for a missing, malformed, badly signed, expired or
//! too-long-lived token; 403 for a namespace or scope the token does not grant; prefix
//! grants; the single-namespace default; open health routes; `admin` for `/metrics`,
//! `/v1/status` and `/v1/shutdown`; and `sandkeep token mint` producing usable tokens.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sandkeep::auth::{Claims, Scope, mint};
use serde_json::json;

use crate::util::{Daemon, SECRET, assert_error, ok, raw_request, run_bounded, sandkeep_command};

const HOUR: Duration = Duration::from_secs(3600);

fn token(ns: &[&str], scopes: &[Scope]) -> String {
    let ns: Vec<String> = ns.iter().map(|s| s.to_string()).collect();
    mint(SECRET, &ns, scopes, HOUR, HOUR, Some("tester".into())).unwrap()
}

fn kv_rw(ns: &[&str]) -> String {
    token(ns, &[Scope::KvRead, Scope::KvWrite])
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signed(claims: &Claims, secret: &str) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_without_a_usable_token_are_401() {
    let d = Daemon::start_token().await;
    let path = "/v1/kv/k?ns=app";

    // Missing.
    assert_error(&d.api().get(path).await, 401, "unauthorized");
    assert_error(&d.api().put(path, &json!(1)).await, 401, "unauthorized");
    assert_error(&d.api().get("/v1/kv?ns=app").await, 401, "unauthorized");
    // Before anything about the request is judged: an empty key or file path, a
    // malformed query.
    for bad in [
        "/v1/kv/?ns=app",
        "/v1/files/",
        "/v1/kv/k?ns=%FF",
        "/v1/kv/k?ns=a&ns=b",
    ] {
        assert_error(&d.api().get(bad).await, 401, "unauthorized");
    }
    // Garbage.
    for t in ["garbage", "a.b.c", ""] {
        assert_error(&d.api_with_token(t).get(path).await, 401, "unauthorized");
    }
    // Signed with another secret.
    let other = mint(
        "another-secret-that-is-long-enough",
        &["app".into()],
        &Scope::ALL,
        HOUR,
        HOUR,
        None,
    )
    .unwrap();
    assert_error(
        &d.api_with_token(&other).get(path).await,
        401,
        "unauthorized",
    );
    // Tampered payload with the original signature.
    let good = kv_rw(&["app"]);
    let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
    let evil = signed(
        &Claims {
            ns: vec!["*".into()],
            scope: vec!["admin".into()],
            exp: now_s() + 60,
            iat: now_s(),
            sub: None,
        },
        "x-secret-x-secret-x",
    );
    parts[1] = evil.split('.').nth(1).unwrap().to_string();
    assert_error(
        &d.api_with_token(&parts.join(".")).get(path).await,
        401,
        "unauthorized",
    );
    // Expired.
    let expired = signed(
        &Claims {
            ns: vec!["app".into()],
            scope: vec!["kv:read".into(), "kv:write".into()],
            iat: now_s() - 120,
            exp: now_s() - 60,
            sub: None,
        },
        SECRET,
    );
    assert_error(
        &d.api_with_token(&expired).get(path).await,
        401,
        "unauthorized",
    );
    // Lifetime (exp - iat) over auth.max_ttl (1h), although not expired.
    let long = mint(
        SECRET,
        &["app".into()],
        &[Scope::KvRead],
        2 * HOUR,
        2 * HOUR,
        None,
    )
    .unwrap();
    assert_error(
        &d.api_with_token(&long).get(path).await,
        401,
        "unauthorized",
    );
    // Another algorithm (HS512) with the right secret.
    let hs512 = jsonwebtoken::encode(
        &Header::new(Algorithm::HS512),
        &Claims {
            ns: vec!["app".into()],
            scope: vec!["kv:read".into()],
            iat: now_s(),
            exp: now_s() + 60,
            sub: None,
        },
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_error(
        &d.api_with_token(&hs512).get(path).await,
        401,
        "unauthorized",
    );
    // Not a Bearer header.
    let r = raw_request(
        &d.socket,
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {good}\r\nConnection: close\r\n\r\n"
        ),
        0,
        false,
    )
    .await;
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(r.json()["error"], "unauthorized");

    // The same request with a good token works.
    let r = d.api_with_token(&good).get(path).await;
    assert_error(&r, 404, "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_that_expires_while_in_use_stops_working() {
    let d = Daemon::start_token().await;
    let t = mint(
        SECRET,
        &["app".into()],
        &[Scope::KvRead, Scope::KvWrite],
        Duration::from_secs(1),
        HOUR,
        None,
    )
    .unwrap();
    let api = d.api_with_token(&t);
    let r = api.put("/v1/kv/k?ns=app", &json!(1)).await;
    if r.status == 401 {
        // The second turned over between minting and the request; nothing to check.
        return;
    }
    ok(&r, 201);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_error(&api.get("/v1/kv/k?ns=app").await, 401, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespace_and_scope_not_granted_are_403() {
    let d = Daemon::start_token().await;
    let rw = d.api_with_token(&kv_rw(&["app", "shared"]));
    ok(&rw.put("/v1/kv/k?ns=app", &json!(1)).await, 201);
    ok(&rw.put("/v1/kv/k?ns=shared", &json!(1)).await, 201);

    // Another namespace.
    assert_error(&rw.get("/v1/kv/k?ns=other").await, 403, "forbidden");
    assert_error(
        &rw.put("/v1/kv/k?ns=other", &json!(1)).await,
        403,
        "forbidden",
    );
    assert_error(&rw.get("/v1/kv?ns=apple").await, 403, "forbidden");
    assert_error(
        &rw.post("/v1/kv/batch?ns=other", &json!({"operations": []}))
            .await,
        403,
        "forbidden",
    );
    // Even a malformed batch: who may not touch the namespace learns no more.
    assert_error(
        &rw.post("/v1/kv/batch?ns=other", &json!({"operations": "garbage"}))
            .await,
        403,
        "forbidden",
    );
    let admin_only = d.api_with_token(&token(&["app"], &[Scope::Admin]));
    assert_error(
        &admin_only
            .post("/v1/kv/batch?ns=app", &json!({"operations": "garbage"}))
            .await,
        403,
        "forbidden",
    );
    // Two namespaces granted: no ?ns= means `default`, which is not granted.
    assert_error(&rw.get("/v1/kv/k").await, 403, "forbidden");

    // Read-only scope: reads work, every kind of write is 403.
    let ro = d.api_with_token(&token(&["app"], &[Scope::KvRead]));
    assert_eq!(ro.value_in(Some("app"), "k").await, Some(json!(1)));
    ok(&ro.get("/v1/kv?ns=app").await, 200);
    ok(&ro.get("/v1/kv/k/watch?ns=app&timeout_s=0").await, 204);
    assert_error(
        &ro.put("/v1/kv/k?ns=app", &json!(2)).await,
        403,
        "forbidden",
    );
    assert_error(
        &ro.patch("/v1/kv/k?ns=app", &json!({"a": 1})).await,
        403,
        "forbidden",
    );
    assert_error(&ro.delete("/v1/kv/k?ns=app").await, 403, "forbidden");
    assert_error(
        &ro.post_empty("/v1/kv/k/incr?ns=app").await,
        403,
        "forbidden",
    );
    assert_error(
        &ro.post(
            "/v1/kv/batch?ns=app",
            &json!({"operations": [{"op": "set", "key": "k", "value": 3}]}),
        )
        .await,
        403,
        "forbidden",
    );
    // A batch of gets is a read.
    let r = ro
        .post(
            "/v1/kv/batch?ns=app",
            &json!({"operations": [{"op": "get", "key": "k"}]}),
        )
        .await;
    assert_eq!(ok(&r, 200)["results"][0]["value"], 1);

    // Write-only scope cannot read, nor read back through get=true or pops.
    let wo = d.api_with_token(&token(&["app"], &[Scope::KvWrite]));
    assert_error(&wo.get("/v1/kv/k?ns=app").await, 403, "forbidden");
    assert_error(
        &wo.put("/v1/kv/k?ns=app&get=true", &json!(5)).await,
        403,
        "forbidden",
    );
    assert_error(
        &wo.post_empty("/v1/kv/k/lpop?ns=app").await,
        403,
        "forbidden",
    );
    ok(&wo.put("/v1/kv/k?ns=app", &json!(5)).await, 200);

    // Files or admin scopes alone give no KV access.
    let files = d.api_with_token(&token(&["app"], &[Scope::FilesRead, Scope::Admin]));
    assert_error(&files.get("/v1/kv/k?ns=app").await, 403, "forbidden");

    assert_eq!(ro.value_in(Some("app"), "k").await, Some(json!(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefix_grants_and_single_namespace_default() {
    let d = Daemon::start_token().await;
    let actors = d.api_with_token(&kv_rw(&["actor:*"]));
    ok(
        &actors.put("/v1/kv/k?ns=actor%3Au1", &json!("u1")).await,
        201,
    );
    ok(&actors.put("/v1/kv/k?ns=actor:u2", &json!("u2")).await, 201);
    assert_eq!(
        actors.value_in(Some("actor:u1"), "k").await,
        Some(json!("u1"))
    );
    assert_error(&actors.get("/v1/kv/k?ns=actor").await, 403, "forbidden");
    assert_error(&actors.get("/v1/kv/k?ns=actors").await, 403, "forbidden");
    assert_error(&actors.get("/v1/kv/k?ns=app").await, 403, "forbidden");
    // A prefix grant is not a single namespace: no ?ns= means `default`.
    assert_error(&actors.get("/v1/kv/k").await, 403, "forbidden");

    // A token for one namespace may omit ?ns=.
    let one = d.api_with_token(&kv_rw(&["conversation"]));
    ok(&one.put("/v1/kv/k", &json!("implicit")).await, 201);
    assert_eq!(one.value("k").await, Some(json!("implicit")));
    assert_eq!(
        one.value_in(Some("conversation"), "k").await,
        Some(json!("implicit")),
        "the write went to the token's namespace"
    );
    let l = ok(&one.get("/v1/kv").await, 200);
    assert_eq!(l["keys"], json!(["k"]));
    let r = one
        .post(
            "/v1/kv/batch",
            &json!({"operations": [{"op": "incr", "key": "n"}]}),
        )
        .await;
    ok(&r, 200);
    assert_eq!(
        one.value_in(Some("conversation"), "n").await,
        Some(json!(1))
    );
    assert_error(&one.get("/v1/kv/k?ns=default").await, 403, "forbidden");

    // Everything (`*`) grants every namespace.
    let all = d.api_with_token(&kv_rw(&["*"]));
    assert_eq!(
        all.value_in(Some("conversation"), "k").await,
        Some(json!("implicit"))
    );
    ok(&all.put("/v1/kv/k", &json!("default ns")).await, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_is_open_and_admin_routes_need_admin() {
    let d = Daemon::start_token().await;
    let anon = d.api();
    assert_eq!(ok(&anon.get("/healthz").await, 200)["status"], "ok");
    assert_eq!(ok(&anon.get("/readyz").await, 200)["status"], "ready");

    let kv = d.api_with_token(&token(&["app"], &Scope::DEFAULT));
    let admin = d.api_with_token(&token(&["app"], &[Scope::Admin]));
    ok(&kv.put("/v1/kv/k?ns=app", &json!(1)).await, 201);
    for path in ["/metrics", "/v1/status"] {
        assert_error(&anon.get(path).await, 401, "unauthorized");
        assert_error(&kv.get(path).await, 403, "forbidden");
        assert_eq!(admin.get(path).await.status, 200, "{path}");
    }
    let r = admin.get("/metrics").await;
    assert!(String::from_utf8_lossy(&r.body).contains("sandkeep_kv_ops_total"));
    assert_eq!(ok(&admin.get("/v1/status").await, 200)["state"], "ready");

    for path in ["/v1/shutdown", "/v1/sync"] {
        assert_error(&anon.post_empty(path).await, 401, "unauthorized");
        assert_error(&kv.post_empty(path).await, 403, "forbidden");
    }
    assert_eq!(ok(&anon.get("/readyz").await, 200)["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_can_shut_the_daemon_down() {
    let mut d = Daemon::start_token().await;
    let admin = d.api_with_token(&token(&["app"], &[Scope::Admin]));
    assert_eq!(admin.post_empty("/v1/shutdown").await.status, 202);
    let st = d.wait_exit(crate::util::EXIT_TIMEOUT);
    assert_eq!(st.code(), Some(0));
}

fn mint_cli(d: &Daemon, args: &[&str]) -> crate::util::CliOutput {
    let mut cmd = sandkeep_command();
    cmd.arg("token")
        .arg("mint")
        .arg("--config")
        .arg(&d.config_path)
        .args(args);
    run_bounded(cmd, None, Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn token_mint_prints_a_working_token() {
    let d = Daemon::start_token().await;
    let out = mint_cli(&d, &["--ns", "app"]);
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "the token alone on stdout: {out:?}");
    let t = lines[0].trim();
    assert_eq!(t.split('.').count(), 3, "not a JWT: {t}");

    let api = d.api_with_token(t);
    ok(&api.put("/v1/kv/k?ns=app", &json!("minted")).await, 201);
    assert_eq!(
        api.value("k").await,
        Some(json!("minted")),
        "single ns default"
    );
    assert_error(&api.get("/v1/kv/k?ns=other").await, 403, "forbidden");
    // The default scopes do not include admin.
    assert_error(&api.get("/v1/status").await, 403, "forbidden");
    // And the CLI uses it with --token.
    let out = d
        .cli()
        .with_token(t)
        .run(&["kv", "get", "k", "--ns", "app"])
        .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), json!({"key": "k", "value": "minted"}));
    let out = d.cli().run(&["kv", "get", "k", "--ns", "app"]).await;
    assert_eq!(out.code, 1, "401 without a token: {out:?}");

    // Several namespaces, explicit scopes, a ttl.
    let out = mint_cli(
        &d,
        &[
            "--ns", "a1", "--ns", "actor:*", "--scope", "kv:read", "--scope", "admin", "--ttl",
            "10m",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let api = d.api_with_token(out.stdout.trim());
    assert_error(&api.get("/v1/kv/k?ns=a1").await, 404, "not_found");
    assert_error(&api.get("/v1/kv/k?ns=actor:x").await, 404, "not_found");
    assert_error(
        &api.put("/v1/kv/k?ns=a1", &json!(1)).await,
        403,
        "forbidden",
    );
    assert_eq!(api.get("/v1/status").await.status, 200);

    // --ttl over max_ttl (1h) is capped, so the token still works.
    let out = mint_cli(&d, &["--ns", "app", "--ttl", "48h"]);
    assert_eq!(out.code, 0, "{out:?}");
    let api = d.api_with_token(out.stdout.trim());
    assert_eq!(api.value_in(Some("app"), "k").await, Some(json!("minted")));

    // Bad arguments are usage errors (2).
    for args in [
        &["--ns", "app", "--scope", "root"][..],
        &["--ns", "bad ns"],
        &["--ns", "app", "--ttl", "0s"],
        &[],
    ] {
        let out = mint_cli(&d, args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
    }
    // A secret the daemon would refuse is refused here too.
    let mut cmd = sandkeep_command();
    cmd.env("SANDKEEP_AUTH_SECRET", "short")
        .args(["token", "mint", "--ns", "app"]);
    let out = run_bounded(cmd, None, Duration::from_secs(30));
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("at least 16 bytes"), "{out:?}");
    // The secret may come from SANDKEEP_AUTH_SECRET instead of the config (here the
    // embedded config, whose max_ttl is 24 h: --ttl keeps it under the daemon's 1 h).
    let mut cmd = sandkeep_command();
    cmd.env("SANDKEEP_AUTH_SECRET", SECRET)
        .args(["token", "mint", "--ns", "app", "--ttl", "30m"]);
    let out = run_bounded(cmd, None, Duration::from_secs(30));
    assert_eq!(out.code, 0, "{out:?}");
    let api = d.api_with_token(out.stdout.trim());
    assert_eq!(api.value("k").await, Some(json!("minted")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_with_mode_none_is_a_warning_not_a_switch() {
    let d = Daemon::start_with(&format!("[auth]\nmode = \"none\"\nsecret = \"{SECRET}\"\n")).await;
    let api = d.api();
    // No token needed, every namespace open, admin routes open.
    ok(&api.put("/v1/kv/k?ns=anything", &json!(1)).await, 201);
    assert_eq!(api.get("/v1/status").await.status, 200);
    // A token is simply not looked at.
    let garbage = d.api_with_token("garbage");
    assert_eq!(
        garbage.value_in(Some("anything"), "k").await,
        Some(json!(1))
    );
    let log = d.log();
    assert!(
        log.contains("WARN") && log.contains("auth.secret"),
        "no startup warning about the ignored secret:\n{log}"
    );
}

/// `sandkeep --config F [--token T] ARGS` with a clean environment: the socket comes
/// from the configuration file.
fn cli_by_config(d: &Daemon, token: &str, args: &[&str]) -> crate::util::CliOutput {
    let mut cmd = sandkeep_command();
    cmd.arg("--config")
        .arg(&d.config_path)
        .arg("--token")
        .arg(token)
        .args(args);
    run_bounded(cmd, None, Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_daemon_needs_the_secret() {
    // The secret is in the daemon's environment, not in the file the clients read.
    let mut d = Daemon::prepare("[auth]\nmode = \"token\"\nmax_ttl = \"1h\"\n");
    d.set_env("SANDKEEP_AUTH_SECRET", SECRET);
    d.spawn_and_wait().await;

    let rw = kv_rw(&["app"]);
    let out = cli_by_config(&d, &rw, &["kv", "set", "k", "\"v\"", "--ns", "app"]);
    assert_eq!(out.code, 0, "{out:?}");
    let out = cli_by_config(&d, &rw, &["kv", "get", "k", "--ns", "app"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.json(), json!({"key": "k", "value": "v"}));
    let out = cli_by_config(&d, &token(&["app"], &[Scope::Admin]), &["status"]);
    assert_eq!(out.code, 0, "{out:?}");
    // The daemon still checks tokens.
    let out = cli_by_config(&d, "garbage", &["kv", "get", "k", "--ns", "app"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("unauthorized"), "{out:?}");
    drop(d);

    // Without the secret anywhere, the daemon does not start, and says why.
    let mut d = Daemon::prepare("[auth]\nmode = \"token\"\n");
    d.spawn();
    let st = d.wait_exit(Duration::from_secs(30));
    assert!(!st.success(), "{st:?}");
    assert!(d.log().contains("auth.secret"), "{}", d.log());
    assert!(!d.socket.exists(), "no socket was bound");
}
