//! The `s3` backend (aws-sdk-s3): S3, MinIO and other S3-compatible servers.
//!
//! Checksums are sent only when an operation requires them (servers other than AWS
//! reject the SDK's default CRC headers); integrity comes from `Content-MD5` on every
//! upload, which the server verifies, and from comparing the returned ETag with the MD5
//! computed while the file was hashed. Large files go up in parts read from disk one
//! at a time, a few in flight, so memory stays bounded; a failed multipart upload is
//! aborted. Streams of unknown length (snapshots, bundles) go up the same way, in parts
//! read from the stream into bounded buffers, each with its `Content-MD5`.
//!
//! Conditional writes send `If-None-Match: *` or `If-Match: <etag>` on PutObject
//! (AWS S3 since 2024, MinIO, Ceph RGW, s3s); `412 Precondition Failed` and
//! `409 ConditionalRequestConflict` (a concurrent conditional write) both become
//! [`RemoteError::PreconditionFailed`]. A server that ignores the headers writes
//! unconditionally: nothing here can tell.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ListPage, ObjectInfo, Precondition, Remote, RemoteError, content_md5};
use crate::config;

/// Longest wait for a TCP (and TLS) connection to the endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Parts uploaded at the same time for one file.
const PARTS_IN_FLIGHT: usize = 4;
/// Smallest part S3 accepts (except the last).
const MIN_PART: u64 = 8 * 1024 * 1024;
/// S3's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;

/// Size of part `number` (1-based) of a stream of unknown length: 8 MiB, doubling every
/// 2,000 parts up to 128 MiB, so 10,000 parts carry about 490 GiB while a stream of
/// usual size never holds more than [`PARTS_IN_FLIGHT`] + 1 small parts in memory.
fn stream_part_size(number: i32) -> u64 {
    MIN_PART << ((number.max(1) - 1) / 2000).min(4)
}

/// Reads from `reader` until `buf` holds `size` bytes or the stream ends; returns
/// whether it ended.
async fn fill_part(
    reader: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    key: &str,
    buf: &mut BytesMut,
    size: u64,
) -> Result<bool, RemoteError> {
    while (buf.len() as u64) < size {
        // Never let `read_buf` grow the buffer past the part size.
        let want = (size - buf.len() as u64) as usize;
        buf.reserve(want);
        let n = (&mut *reader)
            .take(want as u64)
            .read_buf(buf)
            .await
            .map_err(|source| RemoteError::Source {
                key: key.to_string(),
                source,
            })?;
        if n == 0 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Tries to abort a multipart upload given up (1 s, then 4, 16 and 64 s apart).
const ABORT_ATTEMPTS: u32 = 5;

/// A multipart upload under way.
struct Upload {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
}

impl Upload {
    /// Aborts the upload, trying again for about a minute and a half: an upload given
    /// up in an outage would otherwise keep its parts in the bucket (billed, unseen).
    async fn abort(self) {
        let mut delay = Duration::from_secs(1);
        for attempt in 1..=ABORT_ATTEMPTS {
            let abort = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .send()
                .await;
            let e = match abort {
                Ok(_) => return,
                Err(e) => sdk_error("abort_multipart_upload", &self.key, e),
            };
            if matches!(e, RemoteError::NotFound { .. }) {
                return;
            }
            if attempt == ABORT_ATTEMPTS {
                tracing::warn!(key = %self.key, error = %e, "cannot abort a multipart upload: its parts stay in the bucket until a lifecycle rule (AbortIncompleteMultipartUpload) removes them");
                return;
            }
            tracing::debug!(key = %self.key, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot abort a multipart upload yet");
            tokio::time::sleep(delay).await;
            delay *= 4;
        }
    }
}

/// Aborts the upload it holds when dropped with it: an upload given up (its future
/// dropped, as a snapshot under way at a stop is) leaves no unfinished multipart
/// upload behind (the abort runs as a task of its own, while the runtime lives).
struct Unfinished(Option<Upload>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(upload) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(upload.abort());
        }
    }
}

pub struct S3Remote {
    client: Client,
    bucket: String,
    multipart_threshold: u64,
}

impl S3Remote {
    pub async fn new(cfg: &config::Remote, multipart_threshold: u64) -> anyhow::Result<Self> {
        // Static credentials need nothing from the environment; otherwise the standard
        // AWS chain (env, profile, web identity, IMDS) provides them.
        let base = if cfg.access_key_id.is_empty() {
            let shared = aws_config::defaults(BehaviorVersion::latest())
                .region(Region::new(cfg.region.clone()))
                .load()
                .await;
            aws_sdk_s3::config::Builder::from(&shared)
        } else {
            aws_sdk_s3::config::Builder::new()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(cfg.region.clone()))
                .credentials_provider(Credentials::new(
                    cfg.access_key_id.clone(),
                    cfg.secret_access_key.clone(),
                    None,
                    None,
                    "sandkeep-config",
                ))
        };
        let mut builder = base
            .force_path_style(cfg.force_path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(3)
                    .with_initial_backoff(Duration::from_millis(100)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .read_timeout(Duration::from_secs(60))
                    .operation_attempt_timeout(Duration::from_secs(300))
                    .build(),
            );
        if !cfg.endpoint.is_empty() {
            builder = builder.endpoint_url(&cfg.endpoint);
        }
        if cfg.allow_insecure {
            tracing::warn!(
                endpoint = %cfg.endpoint,
                "remote.allow_insecure: TLS certificates of the S3 endpoint are NOT verified"
            );
            builder = builder.http_client(super::insecure::client(CONNECT_TIMEOUT)?);
        }
        Ok(Self {
            client: Client::from_conf(builder.build()),
            bucket: cfg.bucket.clone(),
            multipart_threshold,
        })
    }

    /// Sends one part (bytes in memory, with its MD5 for the server to verify).
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        data: Bytes,
    ) -> Result<(CompletedPart, [u8; 16]), RemoteError> {
        let md5: [u8; 16] = Md5::digest(&data).into();
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(data.len() as i64)
            .content_md5(content_md5(&md5))
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| sdk_error("upload_part", key, e))?;
        Ok((
            CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .build(),
            md5,
        ))
    }
}

impl S3Remote {
    /// GetObject; `None` when the object does not exist.
    async fn get_object(&self, key: &str) -> Result<Option<GetObjectOutput>, RemoteError> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => Ok(Some(o)),
            Err(e) => match sdk_error("get", key, e) {
                RemoteError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    /// Uploads a stream of unknown length: one PutObject when it fits in one part,
    /// else a multipart upload (aborted on any failure).
    async fn put_stream_inner(
        &self,
        key: &str,
        reader: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
    ) -> Result<u64, RemoteError> {
        let first_size = stream_part_size(1);
        let mut first = BytesMut::with_capacity(first_size as usize);
        let ended = fill_part(reader, key, &mut first, first_size).await?;
        if ended {
            let len = first.len() as u64;
            self.put_bytes(key, first.freeze()).await?;
            return Ok(len);
        }
        self.multipart(key, first.freeze(), reader, None).await
    }

    /// A multipart upload whose first part is already read; the rest comes from
    /// `reader`. With `expect`, the whole content must have that MD5 (else `Changed`).
    /// Aborted on any failure, so no unfinished upload is left behind.
    async fn multipart(
        &self,
        key: &str,
        first: Bytes,
        reader: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
        expect: Option<[u8; 16]>,
    ) -> Result<u64, RemoteError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| sdk_error("create_multipart_upload", key, e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_string();
        let mut unfinished = Unfinished(Some(Upload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            upload_id: upload_id.clone(),
        }));
        let result = self
            .send_stream_parts(key, &upload_id, first, reader, expect)
            .await;
        if let Some(upload) = unfinished.0.take()
            && result.is_err()
        {
            // In the background: retried through an outage, while the caller goes on.
            tokio::spawn(upload.abort());
        }
        result
    }

    async fn send_stream_parts(
        &self,
        key: &str,
        upload_id: &str,
        first: Bytes,
        reader: &mut (dyn tokio::io::AsyncRead + Send + Unpin),
        expect: Option<[u8; 16]>,
    ) -> Result<u64, RemoteError> {
        // Parts are read in order, so the whole content's MD5 is computed as we go.
        let mut whole = Md5::new();
        whole.update(&first);
        let mut sent = first.len() as u64;
        let mut number = 1i32;
        let mut in_flight = futures::stream::FuturesOrdered::new();
        in_flight.push_back(self.upload_part(key, upload_id, number, first));
        let mut parts = Vec::new();
        let mut part_md5s = Vec::new();
        let mut ended = false;
        while !ended {
            if number as u64 >= MAX_PARTS {
                return Err(RemoteError::Source {
                    key: key.to_string(),
                    source: std::io::Error::other("the stream is larger than 10,000 parts"),
                });
            }
            let size = stream_part_size(number + 1);
            let mut buf = BytesMut::with_capacity(size as usize);
            ended = fill_part(reader, key, &mut buf, size).await?;
            if buf.is_empty() {
                break;
            }
            whole.update(&buf);
            sent += buf.len() as u64;
            number += 1;
            in_flight.push_back(self.upload_part(key, upload_id, number, buf.freeze()));
            if in_flight.len() >= PARTS_IN_FLIGHT
                && let Some(done) = in_flight.next().await
            {
                let (part, m) = done?;
                parts.push(part);
                part_md5s.extend_from_slice(&m);
            }
        }
        while let Some(done) = in_flight.next().await {
            let (part, m) = done?;
            parts.push(part);
            part_md5s.extend_from_slice(&m);
        }
        if expect.is_some_and(|md5| <[u8; 16]>::from(whole.finalize()) != md5) {
            return Err(RemoteError::Changed { key: key.into() });
        }
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| sdk_error("complete_multipart_upload", key, e))?;
        let expected = format!("{}-{number}", hex::encode(Md5::digest(&part_md5s)));
        verify_etag(key, out.e_tag(), out.server_side_encryption(), &expected)?;
        Ok(sent)
    }
}

/// A response body, whole, in memory.
/// The body of a GetObject answer, refused as [`RemoteError::TooLarge`] when over `max`
/// bytes: by its announced length before anything is read, or as soon as more came.
async fn collect_body(key: &str, out: GetObjectOutput, max: u64) -> Result<Bytes, RemoteError> {
    let too_large = || RemoteError::TooLarge {
        key: key.into(),
        max,
    };
    let announced = out.content_length().and_then(|n| u64::try_from(n).ok());
    if announced.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut data = BytesMut::with_capacity(announced.unwrap_or(0) as usize);
    let mut body = out.body;
    while let Some(chunk) = body.try_next().await.map_err(|e| RemoteError::Transport {
        op: "get",
        key: key.into(),
        message: e.to_string(),
    })? {
        if (data.len() + chunk.len()) as u64 > max {
            return Err(too_large());
        }
        data.extend_from_slice(&chunk);
    }
    Ok(data.freeze())
}

/// A conditional write on an object that is gone: AWS answers `If-Match` there with
/// 404 `NoSuchKey` where other servers answer 412. Either way the condition failed
/// (the caller reads what is there now, as after any lost compare-and-set).
fn if_match_missing(e: RemoteError, if_match: bool) -> RemoteError {
    match e {
        RemoteError::NotFound { key, .. } if if_match => RemoteError::PreconditionFailed { key },
        e => e,
    }
}

/// Compares an upload's ETag with what its content must give. Uploads whose ETag is
/// not an MD5 are accepted on the strength of Content-MD5, which S3 checks itself:
/// servers that do not use MD5 ETags, and objects the answer says were encrypted with
/// SSE-KMS (a bucket's default encryption, say), whose ETags have the same shape.
fn verify_etag(
    key: &str,
    etag: Option<&str>,
    sse: Option<&aws_sdk_s3::types::ServerSideEncryption>,
    expected: &str,
) -> Result<(), RemoteError> {
    use aws_sdk_s3::types::ServerSideEncryption::{AwsKms, AwsKmsDsse};
    if matches!(sse, Some(AwsKms | AwsKmsDsse)) {
        return Ok(());
    }
    let Some(etag) = etag.map(|e| e.trim_matches('"').to_ascii_lowercase()) else {
        return Ok(());
    };
    let md5_shaped = etag.len() >= 32 && etag[..32].bytes().all(|b| b.is_ascii_hexdigit());
    if md5_shaped && etag != expected {
        return Err(RemoteError::Service {
            op: "verify",
            key: key.into(),
            message: format!(
                "stored object ETag {etag} does not match the uploaded content ({expected})"
            ),
        });
    }
    Ok(())
}

/// Maps an SDK error, keeping "the service said no" apart from "no answer".
/// Whether the request failed for want of credentials (no provider of the chain gave
/// any, or one is set up wrong).
fn no_credentials(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<aws_credential_types::provider::error::CredentialsError>() {
            return true;
        }
        cause = c.source();
    }
    false
}

fn sdk_error<E>(op: &'static str, key: &str, e: SdkError<E, HttpResponse>) -> RemoteError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &e {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or_default();
            let status = se.raw().status().as_u16();
            // The service's own words; the SDK's context repeats the whole response.
            let message = match se.err().message() {
                Some(m) if !m.is_empty() => format!("{code} (HTTP {status}): {m}"),
                _ => format!("{code} (HTTP {status})"),
            };
            if status == 412
                || code == "PreconditionFailed"
                || (status == 409 && code == "ConditionalRequestConflict")
            {
                RemoteError::PreconditionFailed { key: key.into() }
            } else if matches!(code, "NoSuchKey" | "NotFound" | "NoSuchUpload") {
                RemoteError::NotFound {
                    op,
                    key: key.into(),
                }
            } else if matches!(code, "BadDigest" | "InvalidDigest") {
                RemoteError::Changed { key: key.into() }
            } else if matches!(code, "InternalError" | "ServiceUnavailable" | "SlowDown") {
                RemoteError::Transport {
                    op,
                    key: key.into(),
                    message,
                }
            } else {
                RemoteError::Service {
                    op,
                    key: key.into(),
                    message,
                }
            }
        }
        // The error and its causes (the SDK's context adds a Debug dump of it).
        _ => {
            let chain = crate::error_chain(&e);
            // The chain names only the last provider it tried (often IMDS).
            let message = if no_credentials(&e) {
                format!(
                    "no usable S3 credentials (set remote.access_key_id and \
                     remote.secret_access_key, or AWS_ACCESS_KEY_ID and \
                     AWS_SECRET_ACCESS_KEY, an AWS profile, web identity or an instance \
                     role): {chain}"
                )
            } else {
                chain
            };
            RemoteError::Transport {
                op,
                key: key.into(),
                message,
            }
        }
    }
}

#[async_trait]
impl Remote for S3Remote {
    async fn put_file(&self, key: &str, path: &Path, md5: [u8; 16]) -> Result<u64, RemoteError> {
        let opened = {
            let path = path.to_path_buf();
            tokio::task::spawn_blocking(move || crate::open_regular(&path))
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .and_then(|f| Ok((f.metadata()?.len(), tokio::fs::File::from_std(f))))
        };
        let (size, file) = opened.map_err(|e| RemoteError::local("put", path, e))?;
        if size > self.multipart_threshold {
            let mut file = file;
            let first_size = stream_part_size(1);
            let mut first = BytesMut::with_capacity(first_size as usize);
            let local = |e: RemoteError| match e {
                RemoteError::Source { source, .. } => RemoteError::local("put", path, source),
                other => other,
            };
            fill_part(&mut file, key, &mut first, first_size)
                .await
                .map_err(local)?;
            return self
                .multipart(key, first.freeze(), &mut file, Some(md5))
                .await
                .map_err(local);
        }
        // By path, so that the SDK can read it again for a retry (the length bounds
        // the read, whatever is there by then).
        drop(file);
        let body = ByteStream::read_from()
            .path(path)
            .length(aws_sdk_s3::primitives::Length::Exact(size))
            .build()
            .await
            .map_err(|e| RemoteError::Local {
                op: "put",
                path: path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(size as i64)
            .content_md5(content_md5(&md5))
            .body(body)
            .send()
            .await
            .map_err(|e| sdk_error("put", key, e))?;
        verify_etag(
            key,
            out.e_tag(),
            out.server_side_encryption(),
            &hex::encode(md5),
        )
        .map_err(|_| RemoteError::Changed { key: key.into() })?;
        Ok(size)
    }

    async fn put_stream(
        &self,
        key: &str,
        mut reader: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) -> Result<u64, RemoteError> {
        self.put_stream_inner(key, reader.as_mut()).await
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<(), RemoteError> {
        let md5: [u8; 16] = Md5::digest(&data).into();
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(data.len() as i64)
            .content_md5(content_md5(&md5))
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| sdk_error("put", key, e))?;
        verify_etag(
            key,
            out.e_tag(),
            out.server_side_encryption(),
            &hex::encode(md5),
        )
    }

    async fn put_bytes_if(
        &self,
        key: &str,
        data: Bytes,
        cond: Precondition,
    ) -> Result<String, RemoteError> {
        let md5: [u8; 16] = Md5::digest(&data).into();
        let put = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(data.len() as i64)
            .content_md5(content_md5(&md5))
            .body(ByteStream::from(data));
        let matching = matches!(cond, Precondition::Matches(_));
        let put = match cond {
            Precondition::Absent => put.if_none_match("*"),
            Precondition::Matches(etag) => put.if_match(etag),
        };
        let out = put
            .send()
            .await
            .map_err(|e| if_match_missing(sdk_error("put", key, e), matching))?;
        verify_etag(
            key,
            out.e_tag(),
            out.server_side_encryption(),
            &hex::encode(md5),
        )?;
        // Without an ETag in the answer, the one S3 gives a single-part upload.
        Ok(out
            .e_tag()
            .map_or_else(|| format!("\"{}\"", hex::encode(md5)), str::to_string))
    }

    async fn get_to_file(&self, key: &str, dest: &Path) -> Result<u64, RemoteError> {
        let Some(out) = self.get_object(key).await? else {
            return Err(RemoteError::NotFound {
                op: "get",
                key: key.into(),
            });
        };
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| RemoteError::local("get", dest, e))?;
        let mut body = out.body;
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| RemoteError::Transport {
                op: "get",
                key: key.into(),
                message: e.to_string(),
            })?;
            n += chunk.len() as u64;
            file.write_all(&chunk)
                .await
                .map_err(|e| RemoteError::local("get", dest, e))?;
        }
        file.flush()
            .await
            .map_err(|e| RemoteError::local("get", dest, e))?;
        Ok(n)
    }

    async fn get_bytes_within(&self, key: &str, max: u64) -> Result<Option<Bytes>, RemoteError> {
        match self.get_object(key).await? {
            Some(out) => Ok(Some(collect_body(key, out, max).await?)),
            None => Ok(None),
        }
    }

    async fn get_bytes_tagged(
        &self,
        key: &str,
        max: u64,
    ) -> Result<Option<(Bytes, String)>, RemoteError> {
        let Some(out) = self.get_object(key).await? else {
            return Ok(None);
        };
        let Some(etag) = out.e_tag().map(str::to_string) else {
            return Err(RemoteError::Service {
                op: "get",
                key: key.into(),
                message: "the server returned no ETag".into(),
            });
        };
        Ok(Some((collect_body(key, out, max).await?, etag)))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, RemoteError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(o) => Ok(Some(ObjectInfo {
                key: key.into(),
                size: o.content_length().unwrap_or(0).max(0) as u64,
                last_modified: o
                    .last_modified()
                    .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                etag: o.e_tag().map(|e| e.trim_matches('"').to_string()),
            })),
            Err(SdkError::ServiceError(se)) if se.raw().status().as_u16() == 404 => Ok(None),
            Err(e) => match sdk_error("head", key, e) {
                RemoteError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str, token: Option<String>) -> Result<ListPage, RemoteError> {
        // Never send an empty delimiter: some servers treat it as a real one.
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| sdk_error("list", prefix, e))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectInfo {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    last_modified: o
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                    etag: o.e_tag().map(|e| e.trim_matches('"').to_string()),
                })
            })
            .collect();
        let next = if out.is_truncated() == Some(true) {
            out.next_continuation_token().map(str::to_string)
        } else {
            None
        };
        Ok(ListPage { objects, next })
    }

    async fn delete_many(&self, keys: &[String]) -> Result<(), RemoteError> {
        for chunk in keys.chunks(1000) {
            let ids = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| RemoteError::Service {
                    op: "delete",
                    key: chunk[0].clone(),
                    message: e.to_string(),
                })?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| RemoteError::Service {
                    op: "delete",
                    key: chunk[0].clone(),
                    message: e.to_string(),
                })?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| sdk_error("delete", &chunk[0], e))?;
            if let Some(err) = out.errors().first() {
                return Err(RemoteError::Service {
                    op: "delete",
                    key: err.key().unwrap_or_default().into(),
                    message: err.message().unwrap_or("delete failed").into(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_parts_grow_and_stay_within_limits() {
        assert_eq!(stream_part_size(1), 8 << 20);
        assert_eq!(stream_part_size(2000), 8 << 20);
        assert_eq!(stream_part_size(2001), 16 << 20);
        assert_eq!(stream_part_size(10_000), 128 << 20);
        let total: u64 = (1..=MAX_PARTS as i32).map(stream_part_size).sum();
        assert!(total > 400 << 30, "{total}");
    }

    #[test]
    fn etag_checks() {
        let md5 = "0123456789abcdef0123456789abcdef";
        assert!(verify_etag("k", Some(&format!("\"{md5}\"")), None, md5).is_ok());
        assert!(verify_etag("k", Some("\"ffffffffffffffffffffffffffffffff\""), None, md5).is_err());
        assert!(verify_etag("k", None, None, md5).is_ok());
        assert!(verify_etag("k", Some("opaque-etag"), None, md5).is_ok());
        use aws_sdk_s3::types::ServerSideEncryption as Sse;
        let kms_etag = Some("\"9c1185a5c5e9fc54612808977ee8f548\"");
        for sse in [Sse::AwsKms, Sse::AwsKmsDsse] {
            assert!(
                verify_etag("k", kms_etag, Some(&sse), md5).is_ok(),
                "{sse:?}"
            );
        }
        for sse in [None, Some(&Sse::Aes256)] {
            assert!(verify_etag("k", kms_etag, sse, md5).is_err(), "{sse:?}");
        }
        let gone = || RemoteError::NotFound {
            op: "put",
            key: "k".into(),
        };
        assert!(matches!(
            if_match_missing(gone(), true),
            RemoteError::PreconditionFailed { .. }
        ));
        assert!(matches!(
            if_match_missing(gone(), false),
            RemoteError::NotFound { .. }
        ));
    }
}
