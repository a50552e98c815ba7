//! The HTTP/1.1 server on the Unix socket: hyper's connection driver with a timer, so
//! that a connection that sends no complete request head within [`IDLE_TIMEOUT`] (a
//! half-sent request, or a keep-alive connection left idle after its last answer) is
//! closed. Without it a leaking or hostile client could hold connections until the
//! daemon ran out of file descriptors, and health checks, hooks and the sync with it.
//! A request in flight (a watch long poll) is never cut by it.

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long a connection may take to send a request head, counted from its opening or
/// from the end of its previous answer.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long to wait after an `accept` error (out of file descriptors) before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// File descriptors kept from the socket's clients for the daemon's own work (the
/// mirror's reads and uploads, the store, remote storage, git): at least this many, or
/// a quarter of the limit when that is more.
const FD_RESERVE: u64 = 512;

/// The body of the answer to a connection over [`max_connections`] (503 `busy`), sent
/// before it is closed.
const BUSY_BODY: &str =
    r#"{"error":"busy","message":"too many connections to the daemon; try again"}"#;

fn busy_answer() -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BUSY_BODY}",
        BUSY_BODY.len()
    )
    .into_bytes()
}

/// How many connections are served at once: the file descriptor limit (raised to its
/// hard limit first) minus a reserve, as Redis fits `maxclients` to it. Thousands of
/// long polls would otherwise take every descriptor, and with them the sync, the
/// owner's lease renewals and the final sync.
pub fn max_connections() -> usize {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.maximum.is_some() && limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    let fds = limit.current.unwrap_or(1 << 20).min(1 << 20);
    let reserve = FD_RESERVE.max(fds / 4);
    fds.saturating_sub(reserve).max(16) as usize
}

/// Serves `router` on `listener` until `stop`; then accepts no more connections,
/// closes idle ones and returns once the requests in flight are answered.
pub async fn serve(listener: UnixListener, router: Router, stop: CancellationToken) {
    serve_with(listener, router, stop, IDLE_TIMEOUT, max_connections()).await
}

async fn serve_with(
    listener: UnixListener,
    router: Router,
    stop: CancellationToken,
    idle: Duration,
    max_connections: usize,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(idle);
    let graceful = GracefulShutdown::new();
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut warned = false;
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::error!(error = %e, "cannot accept a connection on the socket");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        () = stop.cancelled() => break,
                    }
                }
            },
            () = stop.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if !warned {
                warned = true;
                tracing::warn!(
                    max_connections,
                    "too many connections to the daemon: new ones are answered 503 busy"
                );
            }
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let mut stream = stream;
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = stream.write_all(&busy_answer()).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            });
            continue;
        };
        warned = false;
        let router = router.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let req = req.map(Body::new);
            let router = router.clone();
            async move {
                if super::linger::wanted(&req) {
                    Ok::<_, Infallible>(super::linger::serve(router, req).await)
                } else {
                    router.oneshot(req).await
                }
            }
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::UnixStream;

    /// What the server sent until it closed the connection (at most 5 s).
    async fn read_all(s: &mut UnixStream) -> std::io::Result<String> {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the server closes the connection")?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Past the connection limit a new connection is answered 503 `busy` and closed,
    /// without waiting for its request; once a connection ends, the next is served.
    #[tokio::test]
    async fn connections_past_the_limit_are_answered_busy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let router = Router::new().route("/", get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve_with(
            listener,
            router,
            stop.clone(),
            Duration::from_secs(30),
            2,
        ));
        // Two kept-alive connections, each answered once: both served, both held.
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = UnixStream::connect(&path).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = vec![0u8; 1024];
            let mut got = String::new();
            while !got.ends_with("ok") {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(n > 0, "closed: {got}");
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            held.push(s);
        }
        let mut third = UnixStream::connect(&path).await.unwrap();
        let answer = read_all(&mut third).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(answer.ends_with(BUSY_BODY), "{answer}");
        let body: serde_json::Value = serde_json::from_str(BUSY_BODY).unwrap();
        assert_eq!(body["error"], "busy");
        drop(held.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut next = UnixStream::connect(&path).await.unwrap();
            next.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let answer = read_all(&mut next).await.unwrap_or_default();
            if answer.starts_with("HTTP/1.1 200 ") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{answer}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        drop(held);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn idle_and_half_sent_connections_are_closed_and_requests_in_flight_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let router = Router::new().route("/", get(|| async { "ok" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                "slow"
            }),
        );
        let stop = CancellationToken::new();
        let idle = Duration::from_millis(300);
        let server = tokio::spawn(serve_with(listener, router, stop.clone(), idle, 64));
        let started = std::time::Instant::now();

        // Never sends anything; sends half a head; answered, then left idle.
        let mut silent = UnixStream::connect(&path).await.unwrap();
        let mut half = UnixStream::connect(&path).await.unwrap();
        half.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut kept = UnixStream::connect(&path).await.unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // A request that takes longer than the timeout to answer.
        let mut slow = UnixStream::connect(&path).await.unwrap();
        slow.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();

        assert_eq!(read_all(&mut silent).await.unwrap(), "");
        assert_eq!(read_all(&mut half).await.unwrap(), "");
        let answered = read_all(&mut kept).await.unwrap();
        assert!(
            answered.starts_with("HTTP/1.1 200") && answered.ends_with("ok"),
            "{answered}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= idle && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        let slow = read_all(&mut slow).await.unwrap();
        assert!(
            slow.starts_with("HTTP/1.1 200") && slow.ends_with("slow"),
            "{slow}"
        );

        // A stop closes the listener and returns once connections are done.
        let mut open = UnixStream::connect(&path).await.unwrap();
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        // Closed unanswered: at once, or reset if it was still waiting to be accepted.
        match read_all(&mut open).await {
            Ok(got) => assert_eq!(got, ""),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
        // The listener is closed. (A child another test forks in this process holds a
        // copy of the descriptor until its exec: such a connect may still get through
        // for a moment.)
        let mut refused = false;
        for _ in 0..200 {
            if UnixStream::connect(&path).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "the socket still takes connections");
    }
}
