//! The client side of the socket API (hyper + hyperlocal), used by the CLI and the
//! integration tests.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{HeaderMap, Method, Request};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use hyperlocal::UnixConnector;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon on {socket}: {message}")]
    Connect { socket: PathBuf, message: String },
    /// The request was sent (or being sent) and the connection closed before the whole
    /// answer came: the daemon stopped or died meanwhile, so a write may have been done.
    #[error("the connection to the daemon on {socket} closed before it answered: {message}")]
    Lost { socket: PathBuf, message: String },
    #[error("invalid request: {0}")]
    Request(String),
}

/// An answer from the daemon.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    /// The body as JSON (`Value::Null` when empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A keep-alive client for one daemon socket. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: HttpClient<UnixConnector, Full<Bytes>>,
    socket: PathBuf,
    token: Option<String>,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>, token: Option<String>) -> Self {
        Self {
            http: HttpClient::builder(TokioExecutor::new()).build(UnixConnector),
            socket: socket.as_ref().to_path_buf(),
            token,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; `path` includes the query string.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let uri: hyper::Uri = hyperlocal::Uri::new(&self.socket, path).into();
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        let lost = |message: String| ClientError::Lost {
            socket: self.socket.clone(),
            message,
        };
        let resp = self.http.request(req).await.map_err(|e| {
            let message = crate::error_chain(&e);
            if e.is_connect() {
                ClientError::Connect {
                    socket: self.socket.clone(),
                    message,
                }
            } else {
                lost(message)
            }
        })?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| lost(e.to_string()))?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn get(&self, path: &str) -> Result<Reply, ClientError> {
        self.request(Method::GET, path, None).await
    }

    pub async fn delete(&self, path: &str) -> Result<Reply, ClientError> {
        self.request(Method::DELETE, path, None).await
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> Result<Reply, ClientError> {
        self.request(Method::PUT, path, Some(body.to_string().into_bytes()))
            .await
    }

    pub async fn patch_json(&self, path: &str, body: &Value) -> Result<Reply, ClientError> {
        self.request(Method::PATCH, path, Some(body.to_string().into_bytes()))
            .await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Reply, ClientError> {
        self.request(Method::POST, path, Some(body.to_string().into_bytes()))
            .await
    }
}

/// Percent-encodes a key (or any path segment) for a URL path.
pub fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Percent-encodes a query parameter value.
pub fn encode_query(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}
