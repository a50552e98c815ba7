//! A loopback S3-compatible server (s3s-fs) for the benchmarks, so that sandkeep and its
//! peers (rclone) talk to the same server in one run without installing anything.
//! Accepted sockets get TCP_NODELAY (the s3s-fs binary does not set it, which costs a
//! delayed-ACK stall per request on keep-alive connections).
//!
//! usage: s3serve --port P --root DIR [--access-key AK] [--secret-key SK]
//! Buckets are the first-level directories of DIR. Stops on SIGINT/SIGTERM.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(root)) = (arg(&args, "--port"), arg(&args, "--root")) else {
        println!("usage: s3serve --port P --root DIR [--access-key AK] [--secret-key SK]");
        return;
    };
    let ak = arg(&args, "--access-key").unwrap_or_else(|| "AKBENCH".into());
    let sk = arg(&args, "--secret-key").unwrap_or_else(|| "SKBENCH12345678".into());
    let root = PathBuf::from(root);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        let fs = s3s_fs::FileSystem::new(&root).expect("s3s-fs root");
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(ak, sk));
        let service = b.build();
        let listener = TcpListener::bind(("127.0.0.1", port.parse::<u16>().expect("port")))
            .await
            .expect("bind");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal");
        loop {
            let (socket, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(_) => continue,
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            };
            let _ = socket.set_nodelay(true);
            let service = service.clone();
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
}
