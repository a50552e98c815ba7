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

/// Serves `router` on `listener` until `stop`; then accepts no more connections,
/// closes idle ones and returns once the requests in flight are answered.
pub async fn serve(listener: UnixListener, router: Router, stop: CancellationToken) {
    serve_with(listener, router, stop, IDLE_TIMEOUT).await
}

async fn serve_with(
    listener: UnixListener,
    router: Router,
    stop: CancellationToken,
    idle: Duration,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(idle);
    let graceful = GracefulShutdown::new();
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
        let server = tokio::spawn(serve_with(listener, router, stop.clone(), idle));
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
