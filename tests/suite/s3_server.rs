//! A real S3-compatible server (s3s-fs) embedded in the test process, served over TCP
//! on loopback with TCP_NODELAY on every accepted socket. Tests stop and restart it on
//! the same port to simulate outages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

pub const ACCESS_KEY: &str = "AKTEST";
pub const SECRET_KEY: &str = "SKTEST12345678";
pub const BUCKET: &str = "sandboxes";

pub struct S3Server {
    pub addr: SocketAddr,
    root: PathBuf,
    /// Serve HTTPS with this (self-signed) configuration.
    tls: Option<Arc<rustls::ServerConfig>>,
    _dir: Option<tempfile::TempDir>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl S3Server {
    /// Starts a server with the bucket `sandboxes` on a free port.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join(BUCKET)).expect("bucket dir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut server = Self {
            addr: listener.local_addr().expect("addr"),
            root,
            tls: None,
            _dir: Some(dir),
            tasks: Arc::new(Mutex::new(Vec::new())),
        };
        server.serve(listener);
        server
    }

    /// Starts a server that speaks HTTPS with a freshly made self-signed certificate.
    pub async fn start_tls() -> Self {
        let mut server = Self::start().await;
        server.stop();
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
            .expect("self-signed certificate");
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
        );
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .expect("server certificate");
        server.tls = Some(Arc::new(config));
        server.restart().await;
        server
    }

    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The directory holding the bucket's objects (bucket = first-level directory).
    pub fn bucket_dir(&self) -> PathBuf {
        self.root.join(BUCKET)
    }

    /// A remote configuration for this server (sandkeep's own client, in the tests).
    pub fn remote_config(&self) -> sandkeep::config::Remote {
        sandkeep::config::Remote {
            kind: sandkeep::config::RemoteKind::S3,
            bucket: BUCKET.into(),
            endpoint: self.endpoint(),
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            ..Default::default()
        }
    }

    /// sandkeep's S3 backend pointed at this server (multipart above 16 MiB).
    pub async fn client(&self) -> sandkeep::remote::s3::S3Remote {
        sandkeep::remote::s3::S3Remote::new(&self.remote_config(), 16 << 20)
            .await
            .expect("S3 client")
    }

    /// Points a prepared daemon's configuration at this server (replaces the
    /// fixture's `[remote]` section).
    pub fn configure(&self, daemon: &crate::util::Daemon) {
        let text = std::fs::read_to_string(&daemon.config_path).expect("config");
        let start = text.find("[remote]").expect("a [remote] section");
        let end = text[start..].find("\n\n").map_or(text.len(), |e| start + e);
        let text = format!("{}{}{}", &text[..start], self.remote_toml(), &text[end..]);
        std::fs::write(&daemon.config_path, text).expect("config");
    }

    /// The TOML `[remote]` section pointing at this server.
    pub fn remote_toml(&self) -> String {
        format!(
            "[remote]\nkind = \"s3\"\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\nforce_path_style = true\naccess_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n",
            self.endpoint()
        )
    }

    fn serve(&mut self, listener: TcpListener) {
        let fs = s3s_fs::FileSystem::new(&self.root).expect("s3s-fs");
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = b.build();
        let tasks = self.tasks.clone();
        let tls = self.tls.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let service = service.clone();
                let tls = tls.clone();
                let conn = tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            if let Ok(stream) = acceptor.accept(socket).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(socket), service).await;
                        }
                    }
                });
                tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Stops accepting and drops every open connection: clients see refused or reset
    /// connections, as with a crashed server.
    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Stops serving and, on the same port, accepts connections and never answers: a
    /// server that hangs rather than refuses.
    pub async fn hang(&mut self) {
        self.stop();
        let listener = self.rebind().await;
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        self.tasks.lock().unwrap().push(accept.abort_handle());
    }

    async fn rebind(&self) -> TcpListener {
        let mut last = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => return l,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("cannot bind {} again: {last:?}", self.addr);
    }

    /// Serves again on the same port, with the same data.
    pub async fn restart(&mut self) {
        self.stop();
        let listener = self.rebind().await;
        self.serve(listener);
    }

    /// Reads an object straight from the server's storage.
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.bucket_dir().join(Path::new(key))).ok()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
