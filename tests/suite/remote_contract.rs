//! One contract test body for every remote backend: the `dir` backend and the `s3`
//! backend against a real S3-compatible server over TCP.

use std::sync::Arc;

use bytes::Bytes;
use md5::{Digest, Md5};
use sandkeep::remote::{self, Precondition, Remote, RemoteError};

use crate::s3_server::S3Server;
use crate::util::pattern;

fn md5_of(data: &[u8]) -> [u8; 16] {
    Md5::digest(data).into()
}

/// A stream that fails on its first read.
struct FailingReader;

impl tokio::io::AsyncRead for FailingReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Err(std::io::Error::other("the source broke")))
    }
}

/// A stream that never yields anything (an upload that has to be given up).
struct StalledReader;

impl tokio::io::AsyncRead for StalledReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        _: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Pending
    }
}

async fn contract(remote: Arc<dyn Remote>, tmp: &std::path::Path) {
    let p = "conversations/u1/c1/";
    // Small objects.
    assert_eq!(remote.get_bytes(&format!("{p}nope")).await.unwrap(), None);
    assert_eq!(remote.head(&format!("{p}nope")).await.unwrap(), None);
    remote
        .put_bytes(&format!("{p}m.json"), Bytes::from_static(b"{\"a\":1}"))
        .await
        .unwrap();
    assert_eq!(
        remote
            .get_bytes(&format!("{p}m.json"))
            .await
            .unwrap()
            .unwrap(),
        Bytes::from_static(b"{\"a\":1}")
    );
    let head = remote.head(&format!("{p}m.json")).await.unwrap().unwrap();
    assert_eq!(head.size, 7);
    // A read that caps the size takes an object up to the cap and refuses a larger
    // one (by its size: the content is not read).
    let small = format!("{p}m.json");
    let within = |max| remote.get_bytes_within(&small, max);
    assert_eq!(within(7).await.unwrap().unwrap(), &b"{\"a\":1}"[..]);
    match within(6).await {
        Err(RemoteError::TooLarge { key, max: 6 }) => assert_eq!(key, format!("{p}m.json")),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let big = pattern(3 << 20, 7);
    remote
        .put_bytes(&format!("{p}big"), Bytes::from(big.clone()))
        .await
        .unwrap();
    assert!(matches!(
        remote.get_bytes_within(&format!("{p}big"), 1 << 20).await,
        Err(RemoteError::TooLarge { .. })
    ));
    assert_eq!(
        remote
            .get_bytes_within(&format!("{p}big"), 3 << 20)
            .await
            .unwrap()
            .unwrap(),
        big
    );
    assert_eq!(
        remote
            .get_bytes_within(&format!("{p}nope"), 0)
            .await
            .unwrap(),
        None
    );
    remote.delete_many(&[format!("{p}big")]).await.unwrap();

    // Conditional writes (the owner object's compare-and-swap): create only when
    // absent, replace only the version read; a failed condition writes nothing.
    let key = format!("{p}.sandkeep/owner.json");
    let pre_failed = |r: Result<String, RemoteError>| match r {
        Err(RemoteError::PreconditionFailed { key: k }) => assert_eq!(k, key),
        other => panic!("expected PreconditionFailed, got {other:?}"),
    };
    assert_eq!(remote.get_bytes_tagged(&key, u64::MAX).await.unwrap(), None);
    pre_failed(
        remote
            .put_bytes_if(
                &key,
                Bytes::from_static(b"v0"),
                Precondition::Matches("\"x\"".into()),
            )
            .await,
    );
    assert_eq!(remote.get_bytes(&key).await.unwrap(), None);
    let v1 = remote
        .put_bytes_if(&key, Bytes::from_static(b"v1"), Precondition::Absent)
        .await
        .unwrap();
    let (data, tag) = remote
        .get_bytes_tagged(&key, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((data.as_ref(), &tag), (&b"v1"[..], &v1));
    assert!(matches!(
        remote.get_bytes_tagged(&key, 1).await,
        Err(RemoteError::TooLarge { max: 1, .. })
    ));
    pre_failed(
        remote
            .put_bytes_if(&key, Bytes::from_static(b"v2"), Precondition::Absent)
            .await,
    );
    let other = remote
        .put_bytes_if(
            &format!("{key}.other"),
            Bytes::from_static(b"v2"),
            Precondition::Absent,
        )
        .await
        .unwrap();
    pre_failed(
        remote
            .put_bytes_if(
                &key,
                Bytes::from_static(b"v2"),
                Precondition::Matches(other),
            )
            .await,
    );
    let v2 = remote
        .put_bytes_if(
            &key,
            Bytes::from_static(b"v2"),
            Precondition::Matches(v1.clone()),
        )
        .await
        .unwrap();
    assert_ne!(v2, v1);
    pre_failed(
        remote
            .put_bytes_if(&key, Bytes::from_static(b"v3"), Precondition::Matches(v1))
            .await,
    );
    let (data, tag) = remote
        .get_bytes_tagged(&key, u64::MAX)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((data.as_ref(), tag), (&b"v2"[..], v2));
    remote
        .delete_many(&[key.clone(), format!("{key}.other")])
        .await
        .unwrap();

    // A file, verified by its MD5; an empty file; a wrong MD5 is `Changed`.
    let f = tmp.join("small.bin");
    let data = pattern(100_000, 1);
    std::fs::write(&f, &data).unwrap();
    let n = remote
        .put_file(&format!("{p}files/a/small.bin"), &f, md5_of(&data))
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    let back = tmp.join("back.bin");
    remote
        .get_to_file(&format!("{p}files/a/small.bin"), &back)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let empty = tmp.join("empty");
    std::fs::write(&empty, b"").unwrap();
    remote
        .put_file(&format!("{p}files/empty"), &empty, md5_of(b""))
        .await
        .unwrap();
    assert_eq!(
        remote
            .get_bytes(&format!("{p}files/empty"))
            .await
            .unwrap()
            .unwrap()
            .len(),
        0
    );
    let err = remote
        .put_file(&format!("{p}files/a/wrong"), &f, md5_of(b"other content"))
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Changed { .. }), "{err:?}");
    let err = remote
        .get_to_file(&format!("{p}files/missing"), &back)
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::NotFound { .. }), "{err:?}");

    // A 20 MiB file goes up in parts (threshold 16 MiB) and comes back equal.
    let big = tmp.join("big.bin");
    let data = pattern(20 * 1024 * 1024 + 123, 7);
    std::fs::write(&big, &data).unwrap();
    remote
        .put_file(&format!("{p}files/big.bin"), &big, md5_of(&data))
        .await
        .unwrap();
    remote
        .get_to_file(&format!("{p}files/big.bin"), &back)
        .await
        .unwrap();
    assert!(
        std::fs::read(&back).unwrap() == data,
        "multipart content differs"
    );
    // A multipart upload of changed content is refused as `Changed`.
    let err = remote
        .put_file(&format!("{p}files/big2.bin"), &big, md5_of(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Changed { .. }), "{err:?}");

    // Streams of unknown length: empty, small (one PutObject), larger than one part
    // (multipart on S3), and a stream that fails half-way stores nothing.
    for (name, len) in [
        ("empty", 0usize),
        ("small", 300_000),
        ("big", 17 * 1024 * 1024 + 5),
    ] {
        let data = pattern(len, 11);
        let key = format!("{p}stream/{name}");
        let n = remote
            .put_stream(&key, Box::new(std::io::Cursor::new(data.clone())))
            .await
            .unwrap();
        assert_eq!(n, len as u64, "{name}");
        remote.get_to_file(&key, &back).await.unwrap();
        assert!(
            std::fs::read(&back).unwrap() == data,
            "{name}: content differs"
        );
    }
    for len in [1000usize, 9 * 1024 * 1024] {
        let key = format!("{p}stream/broken-{len}");
        let reader =
            tokio::io::AsyncReadExt::chain(std::io::Cursor::new(pattern(len, 3)), FailingReader);
        let err = remote.put_stream(&key, Box::new(reader)).await.unwrap_err();
        assert!(matches!(err, RemoteError::Source { .. }), "{err:?}");
        assert_eq!(remote.head(&key).await.unwrap(), None, "nothing stored");
    }
    // A stream given up half-way (its future dropped, as a snapshot is at a stop),
    // small or past the first part (multipart on S3), stores nothing; what it leaves
    // elsewhere is checked per backend.
    for len in [1000usize, 17 * 1024 * 1024] {
        let key = format!("{p}stream/given-up-{len}");
        let reader =
            tokio::io::AsyncReadExt::chain(std::io::Cursor::new(pattern(len, 5)), StalledReader);
        let upload = remote.put_stream(&key, Box::new(reader));
        let given_up = tokio::time::timeout(std::time::Duration::from_secs(3), upload).await;
        assert!(given_up.is_err(), "a stalled stream cannot be stored");
        assert_eq!(remote.head(&key).await.unwrap(), None, "nothing stored");
    }
    // Replacing an object with a stream.
    let key = format!("{p}stream/small");
    remote
        .put_stream(&key, Box::new(std::io::Cursor::new(b"again".to_vec())))
        .await
        .unwrap();
    assert_eq!(
        remote.get_bytes(&key).await.unwrap().unwrap(),
        Bytes::from_static(b"again")
    );

    // Listing: sorted, paginated, prefix-bounded.
    for i in 0..1005 {
        remote
            .put_bytes(&format!("{p}list/k{i:05}"), Bytes::from(vec![b'x'; i % 7]))
            .await
            .unwrap();
    }
    remote
        .put_bytes("conversations/u1/c10/list/other", Bytes::from_static(b"o"))
        .await
        .unwrap();
    let first = remote.list(&format!("{p}list/"), None).await.unwrap();
    assert_eq!(first.objects.len(), 1000);
    assert!(first.next.is_some());
    let all = remote::list_all(remote.as_ref(), &format!("{p}list/"))
        .await
        .unwrap();
    assert_eq!(all.len(), 1005);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key), "sorted");
    assert_eq!(all[3].size, 3);
    let partial = remote::list_all(remote.as_ref(), &format!("{p}list/k0100"))
        .await
        .unwrap();
    assert_eq!(partial.len(), 5, "k01000..k01004");

    // Batch delete, missing keys included.
    let mut doomed: Vec<String> = all.iter().map(|o| o.key.clone()).collect();
    doomed.push(format!("{p}list/never-existed"));
    remote.delete_many(&doomed).await.unwrap();
    assert!(
        remote::list_all(remote.as_ref(), &format!("{p}list/"))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        remote::list_all(remote.as_ref(), "conversations/u1/c10/")
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dir_backend_contract() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Arc::new(remote::dir::DirRemote::new(&dir.path().join("bucket")).unwrap());
    contract(remote, dir.path()).await;
    // No temporary files are left behind (the contract did write: the directory of
    // temporary files exists).
    let tmp = dir.path().join("bucket/.sandkeep-tmp");
    assert!(tmp.is_dir());
    assert_eq!(walk(&tmp), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_backend_contract() {
    let server = S3Server::start().await;
    let dir = tempfile::tempdir().unwrap();
    contract(Arc::new(server.client().await), dir.path()).await;
    // No unfinished multipart upload is left behind (the server keeps each one's
    // parts and description as `.upload*` files at its root until aborted); the abort
    // of one given up runs as a task of its own.
    let root = server.bucket_dir().parent().unwrap().to_path_buf();
    let uploads = || {
        std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload"))
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !uploads().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(uploads(), Vec::<String>::new());
}

/// A multipart upload given up while the server is down is aborted once it is back:
/// its parts do not stay in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_an_upload_given_up_in_an_outage_is_aborted_after_it() {
    let mut server = S3Server::start().await;
    let remote = server.client().await;
    let root = server.bucket_dir().parent().unwrap().to_path_buf();
    let uploads = move || {
        std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".upload"))
            .count()
    };
    let reader = tokio::io::AsyncReadExt::chain(
        std::io::Cursor::new(pattern(17 * 1024 * 1024, 5)),
        StalledReader,
    );
    let upload = tokio::spawn(async move {
        remote
            .put_stream("conversations/u/c/big", Box::new(reader))
            .await
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while uploads() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no multipart upload began"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Down, then the upload given up (as a snapshot at a stop): its abort fails.
    server.stop();
    upload.abort();
    let _ = upload.await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(uploads(), 1, "aborted while the server was down?");
    server.restart().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while uploads() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upload was never aborted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_wrong_secret_is_refused() {
    let server = S3Server::start().await;
    let cfg = sandkeep::config::Remote {
        secret_access_key: "wrong-secret-key".into(),
        ..server.remote_config()
    };
    let remote = remote::s3::S3Remote::new(&cfg, 16 * 1024 * 1024)
        .await
        .unwrap();
    let err = remote
        .put_bytes("k", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Service { .. }), "{err:?}");
    // The message is the service's code and status, not the SDK's dump of the response.
    let text = err.to_string();
    assert!(text.contains("SignatureDoesNotMatch (HTTP 403)"), "{text}");
    assert!(text.len() < 200, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_outage_is_a_transport_error_and_recovers() {
    let mut server = S3Server::start().await;
    let remote = server.client().await;
    remote
        .put_bytes("k", Bytes::from_static(b"1"))
        .await
        .unwrap();
    server.stop();
    let err = remote
        .put_bytes("k", Bytes::from_static(b"2"))
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Transport { .. }), "{err:?}");
    server.restart().await;
    remote
        .put_bytes("k", Bytes::from_static(b"3"))
        .await
        .unwrap();
    assert_eq!(server.object("k").unwrap(), b"3");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_allow_insecure_accepts_a_self_signed_certificate_and_only_then() {
    let server = S3Server::start_tls().await;
    let mut cfg = server.remote_config();
    assert!(cfg.endpoint.starts_with("https://"));
    // Verification on (the default): the self-signed certificate is refused.
    let strict = remote::s3::S3Remote::new(&cfg, 16 * 1024 * 1024)
        .await
        .unwrap();
    let err = strict
        .put_bytes("k", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, RemoteError::Transport { .. }), "{err:?}");
    assert!(server.object("k").is_none());
    // allow_insecure: the same server works, uploads included.
    cfg.allow_insecure = true;
    let lax = remote::s3::S3Remote::new(&cfg, 16 * 1024 * 1024)
        .await
        .unwrap();
    lax.put_bytes("k", Bytes::from_static(b"over tls"))
        .await
        .unwrap();
    assert_eq!(server.object("k").unwrap(), b"over tls");
    assert_eq!(
        lax.get_bytes("k").await.unwrap().unwrap(),
        Bytes::from_static(b"over tls")
    );
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("f");
    let data = pattern(6 << 20, 5);
    std::fs::write(&f, &data).unwrap();
    lax.put_file("big", &f, md5_of(&data)).await.unwrap();
    assert!(server.object("big").unwrap() == data);
}
