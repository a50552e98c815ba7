//! Lingering on an unread request body (the server calls [`serve`] for requests that
//! [`wanted`] picks), as nginx's lingering close does. A request
//! refused on its URL, query or token is answered before its body is read; hyper then
//! closes the connection, and a client still writing the body (one that sends headers
//! and body in separate writes) gets a broken pipe instead of the JSON error. So when
//! the handler did not touch a small body (at most [`LINGER_BYTES`], announced with
//! `Content-Length`), it is read and dropped before the answer goes out, for at most
//! [`LINGER_TIME`]: the client reads its error, and the connection stays usable.
//! Bodies the client sends only after `100 Continue` are left alone (the client
//! waits for the answer instead), and so are large ones (a 413 closes at once). An
//! answer after which the body is still unread says `Connection: close`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::header;
use axum::response::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Largest unread body read before an answer.
const LINGER_BYTES: u64 = 64 * 1024;
/// Longest wait for it.
const LINGER_TIME: Duration = Duration::from_secs(2);

/// Whether the request has a body: [`serve`] must see how much of it is read.
pub fn wanted<B>(req: &axum::http::Request<B>) -> bool {
    super::declared_length(req.headers()).is_some_and(|n| n > 0)
        || req.headers().contains_key(header::TRANSFER_ENCODING)
}

/// Whether an unread body is read before the answer: a small one, announced with
/// `Content-Length`, and not held back for `100 Continue`.
fn lingers<B>(req: &axum::http::Request<B>) -> bool {
    let small =
        super::declared_length(req.headers()).is_some_and(|n| (1..=LINGER_BYTES).contains(&n));
    small && !req.headers().contains_key(header::EXPECT)
}

/// Answers `req` with `router`, reading what the handler left of a small body first
/// (see the module's documentation). An answer after which the body is still not read
/// to its end says `Connection: close`: hyper closes the connection after it, and a
/// keep-alive client must not send its next request there. Only for requests that
/// [`wanted`] picked: the others go to the router as they are, at no cost.
pub async fn serve(router: Router, req: Request) -> Response {
    let linger = lingers(&req);
    let (parts, body) = req.into_parts();
    let shared = Arc::new(Mutex::new(Shared {
        body: Some(body),
        touched: false,
        ended: false,
    }));
    let tracked = Body::new(Tracked(shared.clone()));
    let mut response = match router.oneshot(Request::from_parts(parts, tracked)).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    let (unread, mut ended) = {
        let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
        let ended = s.ended || s.body.as_ref().is_none_or(HttpBody::is_end_stream);
        let unread = if s.touched || !linger {
            None
        } else {
            s.body.take()
        };
        (unread, ended)
    };
    if let Some(body) = unread {
        ended = matches!(
            tokio::time::timeout(LINGER_TIME, body.collect()).await,
            Ok(Ok(_))
        );
    }
    if !ended {
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    response
}

struct Shared {
    body: Option<Body>,
    /// The handler polled the body (it read it, or part of it, itself).
    touched: bool,
    /// The body was read to its end.
    ended: bool,
}

/// The body the handler gets: the request's own, which [`serve`] keeps a hold on.
struct Tracked(Arc<Mutex<Shared>>);

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.touched = true;
        let Some(body) = s.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => body.is_end_stream(),
            _ => false,
        };
        s.ended |= ended;
        polled
    }

    fn is_end_stream(&self) -> bool {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}
