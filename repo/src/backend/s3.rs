//! S3-compatible object storage (Ceph RGW, Garage, MinIO, AWS S3) through the
//! `object_store` crate.
//!
//! A repository is a prefix in a bucket: `s3:https://host:port/bucket/prefix`. Objects
//! live under `prefix/<type dir>/<name>` (packs flat under `prefix/data/`: object
//! stores have no directories to keep small), the config at `prefix/config`.
//!
//! How the backend keeps the contracts of [`Backend`]:
//! - `write_once` is a PUT with `If-None-Match: *` (conditional create), which the
//!   server refuses if the name exists. Where a server ignores the header, a HEAD just
//!   before the PUT still refuses a name that was there.
//! - A pack (16 MiB) is streamed to a local temporary file as it is written and sent
//!   at `finish`: as one conditional PUT up to [`SINGLE_PUT_MAX`], in parts of
//!   [`PART_SIZE`] (a multipart upload after a HEAD) above. Only packs go up in parts:
//!   their names are the hash of their bytes, so two writers that race to one name
//!   write the same bytes.
//! - `delete` and `move_aside` look first, so a missing object is `NotFound` (S3
//!   deletes of missing keys succeed).
//! - Transient errors (5xx, timeouts, dropped connections) are retried with
//!   exponential backoff by `object_store`; at most [`CONCURRENCY`] requests are in
//!   flight per backend.
//!
//! The engine is synchronous; each call runs its request on the backend's own tokio
//! runtime and waits for the answer, so it may be called from any thread, a runtime's
//! worker included.

use std::fmt;
use std::io::{self, Read, Seek, Write};
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::limit::LimitStore;
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig, WriteMultipart,
};

use super::{check_name, Backend, FileType, ObjectWriter};
use crate::error::{Error, Result};

/// Requests in flight at once, per backend.
pub const CONCURRENCY: usize = 16;
/// Objects up to this size go up in one PUT.
pub const SINGLE_PUT_MAX: u64 = 8 << 20;
/// The part size of larger uploads.
pub const PART_SIZE: usize = 8 << 20;
/// Ranged reads of packs fetch this much around what is asked (aligned), and the last
/// [`WINDOWS`] such windows are kept: a restore reads a pack's blobs in order, and one
/// request per blob would spend its time in round trips.
pub const WINDOW: u64 = 4 << 20;
pub const WINDOWS: usize = 12;

/// Where an S3 repository is: `s3:http(s)://host[:port]/bucket[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct S3Location {
    /// `http(s)://host[:port]`.
    pub endpoint: String,
    pub bucket: String,
    /// The repository's prefix in the bucket, without leading or trailing `/` (may be
    /// empty: the whole bucket).
    pub prefix: String,
}

impl S3Location {
    /// Parses `s3:http(s)://host[:port]/bucket[/prefix]`; `None` for anything that
    /// does not start with `s3:` (a local path).
    pub fn parse(s: &str) -> Option<Result<S3Location>> {
        let rest = s.strip_prefix("s3:")?;
        Some(Self::parse_url(rest).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{s:?} is not an object-storage location: write s3:https://HOST[:PORT]/BUCKET[/PREFIX]"
            ))
        }))
    }

    fn parse_url(url: &str) -> Option<S3Location> {
        let (scheme, rest) = url.split_once("://")?;
        if scheme != "http" && scheme != "https" {
            return None;
        }
        let (host, path) = rest.split_once('/')?;
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        let prefix = prefix.trim_matches('/');
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        let valid_prefix = prefix
            .split('/')
            .all(|p| !p.is_empty() && p != "." && p != "..")
            || prefix.is_empty();
        if host.is_empty() || !valid_bucket || !valid_prefix {
            return None;
        }
        Some(S3Location {
            endpoint: format!("{scheme}://{host}"),
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// A repository inside this one's prefix: `prefix/name`.
    pub fn join(&self, name: &str) -> S3Location {
        S3Location {
            prefix: if self.prefix.is_empty() {
                name.to_string()
            } else {
                format!("{}/{name}", self.prefix)
            },
            ..self.clone()
        }
    }
}

impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3:{}/{}", self.endpoint, self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        Ok(())
    }
}

/// An access key. Never taken from the command line: from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION` or
/// `AWS_REGION`) or from a file of such `NAME=value` lines.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub region: String,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

const DEFAULT_REGION: &str = "us-east-1";

impl S3Credentials {
    /// From the file if one is named, else from the environment.
    pub fn load(file: Option<&FsPath>) -> Result<S3Credentials> {
        match file {
            Some(f) => Self::from_file(f),
            None => Self::from_env(),
        }
    }

    /// From the environment.
    pub fn from_env() -> Result<S3Credentials> {
        Self::from_lookup(|k| std::env::var(k).ok(), "the environment")
    }

    /// From a file of `NAME=value` lines (`#` comments, blank lines, an optional
    /// `export `), with the environment's names. It must not be readable by others.
    pub fn from_file(path: &FsPath) -> Result<S3Credentials> {
        use std::os::unix::fs::MetadataExt;
        let what = format!("object-storage credentials file {}", path.display());
        let text = std::fs::read_to_string(path).map_err(Error::io(what.clone()))?;
        let mode = std::fs::metadata(path)
            .map_err(Error::io(what.clone()))?
            .mode();
        if mode & 0o077 != 0 {
            return Err(Error::InvalidInput(format!(
                "{what} is readable by others (mode {:o}): chmod 600 it",
                mode & 0o777
            )));
        }
        let mut vars = std::collections::HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((k, v)) = line.split_once('=') else {
                return Err(Error::InvalidInput(format!(
                    "{what}, line {}: not NAME=value",
                    n + 1
                )));
            };
            let v = v.trim().trim_matches('"').trim_matches('\'');
            vars.insert(k.trim().to_string(), v.to_string());
        }
        Self::from_lookup(|k| vars.get(k).cloned(), &what)
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>, source: &str) -> Result<S3Credentials> {
        let need = |k: &str| {
            get(k).filter(|v| !v.is_empty()).ok_or_else(|| {
                Error::InvalidInput(format!(
                    "no {k} in {source}: object storage needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (in the environment, or in the file named by [server].s3_credentials_file)"
                ))
            })
        };
        Ok(S3Credentials {
            access_key_id: need("AWS_ACCESS_KEY_ID")?,
            secret_access_key: need("AWS_SECRET_ACCESS_KEY")?,
            region: get("AWS_DEFAULT_REGION")
                .or_else(|| get("AWS_REGION"))
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| DEFAULT_REGION.to_string()),
        })
    }
}

/// A repository in an S3 bucket.
pub struct S3Backend(Arc<Inner>);

/// What the backend and its writers share.
#[doc(hidden)]
pub struct Inner {
    location: S3Location,
    store: Arc<dyn ObjectStore>,
    /// Taken when dropped: a runtime is shut down without waiting, which is allowed
    /// on a runtime's own threads too (the last user may be async code).
    runtime: Option<tokio::runtime::Runtime>,
    /// Windows of packs recently read: (pack name, start, bytes), newest last.
    windows: std::sync::Mutex<std::collections::VecDeque<(String, u64, bytes::Bytes)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl S3Backend {
    /// Opens an existing repository: its config object must be there.
    pub fn open(location: &S3Location, credentials: &S3Credentials) -> Result<S3Backend> {
        let b = Self::connect(location, credentials)?;
        match b.0.head(&b.0.path("config")) {
            Ok(true) => Ok(b),
            Ok(false) => Err(Error::NoRepository(location.to_string().into())),
            Err(e) => Err(e),
        }
    }

    /// A new repository: nothing may be under its prefix yet. The bucket must exist
    /// (buckets, their policies and keys are the storage operator's).
    pub fn create(location: &S3Location, credentials: &S3Credentials) -> Result<S3Backend> {
        let b = Self::connect(location, credentials)?;
        let i = &b.0;
        if i.head(&i.path("config"))? {
            return Err(Error::RepositoryExists(location.to_string().into()));
        }
        let store = i.store.clone();
        let prefix = i.path("");
        let any = i.run(async move {
            use futures_util::StreamExt;
            store.list(Some(&prefix)).next().await.transpose()
        });
        match any {
            Ok(None) => Ok(b),
            Ok(Some(o)) => Err(Error::InvalidInput(format!(
                "{location} is not empty ({} is there): choose a new prefix for the repository",
                o.location
            ))),
            Err(e) => Err(i.error(format!("the bucket of {location}"), e)),
        }
    }

    fn connect(location: &S3Location, credentials: &S3Credentials) -> Result<S3Backend> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("haul-s3")
            .enable_all()
            .build()
            .map_err(Error::io("the object-storage client's threads"))?;
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(15),
                base: 2.0,
            },
            max_retries: 10,
            retry_timeout: Duration::from_secs(180),
        };
        let s3 = AmazonS3Builder::new()
            // First: the options below (allow_http) are kept in the client options.
            .with_client_options(
                // Objects written with a key other than the bucket owner's (the pulls'
                // append-only key) stay readable and deletable by the owner's (prune).
                ClientOptions::new().with_default_headers(http::HeaderMap::from_iter([(
                    http::HeaderName::from_static("x-amz-acl"),
                    http::HeaderValue::from_static("bucket-owner-full-control"),
                )])),
            )
            .with_endpoint(&location.endpoint)
            .with_allow_http(location.endpoint.starts_with("http://"))
            .with_bucket_name(&location.bucket)
            .with_region(&credentials.region)
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_retry(retry)
            .build()
            .map_err(|e| Error::InvalidInput(format!("object storage {location}: {e}")))?;
        Ok(S3Backend(Arc::new(Inner {
            location: location.clone(),
            store: Arc::new(LimitStore::new(s3, CONCURRENCY)),
            runtime: Some(runtime),
            windows: Default::default(),
        })))
    }
}

impl Inner {
    /// Runs a request on the backend's runtime and waits for it.
    fn run<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = T> + Send + 'static,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime
            .as_ref()
            .expect("a runtime until dropped")
            .spawn(async move {
                let _ = tx.send(f.await);
            });
        rx.recv()
            .expect("the object-storage runtime answers every request")
    }

    fn path(&self, rel: &str) -> Path {
        match (self.location.prefix.is_empty(), rel.is_empty()) {
            (true, _) => Path::from(rel),
            (false, true) => Path::from(self.location.prefix.as_str()),
            (false, false) => Path::from(format!("{}/{rel}", self.location.prefix)),
        }
    }

    fn object_path(&self, t: FileType, name: &str) -> Result<Path> {
        check_name(t, name)?;
        Ok(match t {
            FileType::Config => self.path("config"),
            _ => self.path(&format!("{}/{name}", t.dir())),
        })
    }

    /// Drops the kept windows of an object that goes away.
    fn forget_windows(&self, name: &str) {
        self.windows
            .lock()
            .expect("windows")
            .retain(|(n, _, _)| n != name);
    }

    /// Whether an object exists.
    fn head(&self, path: &Path) -> Result<bool> {
        let (store, p) = (self.store.clone(), path.clone());
        match self.run(async move { store.head(&p).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error(path.to_string(), e)),
        }
    }

    fn error(&self, what: String, e: object_store::Error) -> Error {
        match e {
            object_store::Error::NotFound { .. } => Error::NotFound { what },
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => Error::AlreadyExists { what },
            e => Error::Io {
                what: format!("{what} in {}", self.location),
                source: io::Error::other(e),
            },
        }
    }

    fn put_create(&self, t: FileType, name: &str, payload: PutPayload) -> Result<()> {
        let what = format!("{t} {name}");
        let path = self.object_path(t, name)?;
        // Where the server ignores If-None-Match, this HEAD still refuses a name that
        // was there.
        if self.head(&path)? {
            return Err(Error::AlreadyExists { what });
        }
        let store = self.store.clone();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        self.run(async move { store.put_opts(&path, payload, opts).await })
            .map(|_| ())
            .map_err(|e| self.error(what, e))
    }

    /// Uploads a spooled pack in parts.
    fn put_parts(&self, t: FileType, name: &str, mut file: std::fs::File) -> Result<()> {
        let what = format!("{t} {name}");
        let path = self.object_path(t, name)?;
        if self.head(&path)? {
            return Err(Error::AlreadyExists { what });
        }
        file.rewind().map_err(Error::io(what.clone()))?;
        let store = self.store.clone();
        let w = what.clone();
        let result = self.run(async move {
            let upload = store.put_multipart(&path).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
            let mut buf = vec![0u8; PART_SIZE];
            loop {
                // Two parts in flight: the memory of an upload stays bounded.
                writer.wait_for_capacity(2).await?;
                let n =
                    read_full(&mut file, &mut buf).map_err(|e| object_store::Error::Generic {
                        store: "local spool",
                        source: Box::new(io::Error::new(e.kind(), format!("{w}: {e}"))),
                    })?;
                if n == 0 {
                    break;
                }
                writer.write(&buf[..n]);
            }
            writer.finish().await
        });
        result.map(|_| ()).map_err(|e| self.error(what, e))
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

impl std::ops::Deref for S3Backend {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Backend for S3Backend {
    fn location(&self) -> String {
        self.location.to_string()
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn list(&self, t: FileType) -> Result<Vec<(String, u64)>> {
        let prefix = match t {
            FileType::Config => {
                let p = self.path("config");
                let (store, q) = (self.store.clone(), p.clone());
                return match self.run(async move { store.head(&q).await }) {
                    Ok(m) => Ok(vec![("config".to_string(), m.size)]),
                    Err(object_store::Error::NotFound { .. }) => Ok(Vec::new()),
                    Err(e) => Err(self.error(p.to_string(), e)),
                };
            }
            _ => self.path(t.dir()),
        };
        let store = self.store.clone();
        let p = prefix.clone();
        let listed = self.run(async move {
            use futures_util::TryStreamExt;
            store.list(Some(&p)).try_collect::<Vec<_>>().await
        });
        let listed = listed.map_err(|e| self.error(format!("the {t}s under {prefix}"), e))?;
        Ok(listed
            .into_iter()
            .filter_map(|m| {
                let mut parts = m.location.prefix_match(&prefix)?;
                let name = parts.next()?.as_ref().to_string();
                (parts.next().is_none() && check_name(t, &name).is_ok()).then_some((name, m.size))
            })
            .collect())
    }

    fn read(&self, t: FileType, name: &str) -> Result<Vec<u8>> {
        let path = self.object_path(t, name)?;
        let store = self.store.clone();
        self.run(async move { store.get(&path).await?.bytes().await })
            .map(|b| b.to_vec())
            .map_err(|e| self.error(format!("{t} {name}"), e))
    }

    fn read_range(&self, t: FileType, name: &str, offset: u64, length: u32) -> Result<Vec<u8>> {
        let path = self.object_path(t, name)?;
        let end = offset + length as u64;
        let failed = |e: object_store::Error| match e {
            // A range starting past the end: the server says 416, `object_store` an
            // invalid range.
            object_store::Error::NotFound { .. } => Error::NotFound {
                what: format!("{t} {name}"),
            },
            e if is_range_error(&e) => Error::corrupt(
                format!("{t} {name}"),
                format!("range {offset}+{length} past its end"),
            ),
            e => self.error(format!("{t} {name}"), e),
        };
        let past_end = |read: usize| {
            Error::corrupt(
                format!("{t} {name}"),
                format!("range {offset}+{length} past its end ({read} bytes read)"),
            )
        };
        if t != FileType::Data {
            let store = self.store.clone();
            return match self.run(async move { store.get_range(&path, offset..end).await }) {
                Ok(b) if b.len() == length as usize => Ok(b.to_vec()),
                Ok(b) => Err(past_end(b.len())),
                Err(e) => Err(failed(e)),
            };
        }
        // A pack's bytes: taken from the windows kept, piece by piece (a blob may
        // straddle two), and what they lack fetched in aligned windows from there on,
        // so no byte is fetched twice while its window is kept.
        let mut out = Vec::with_capacity(length as usize);
        let mut at = offset;
        while at < end {
            let kept = self
                .windows
                .lock()
                .expect("windows")
                .iter()
                .rev()
                .find(|(n, ws, b)| n == name && *ws <= at && at < *ws + b.len() as u64)
                .map(|(_, ws, b)| (*ws, b.clone()));
            if let Some((ws, b)) = kept {
                let upto = end.min(ws + b.len() as u64);
                out.extend_from_slice(&b[(at - ws) as usize..(upto - ws) as usize]);
                at = upto;
                continue;
            }
            let (from, to) = (at / WINDOW * WINDOW, end.div_ceil(WINDOW) * WINDOW);
            let store = self.store.clone();
            let p = path.clone();
            let b = self
                .run(async move { store.get_range(&p, from..to).await })
                .map_err(failed)?;
            if b.len() as u64 <= at - from {
                // The object ends before `at`.
                return Err(past_end(out.len()));
            }
            let mut windows = self.windows.lock().expect("windows");
            if windows.len() >= WINDOWS {
                windows.pop_front();
            }
            windows.push_back((name.to_string(), from, b));
        }
        Ok(out)
    }

    fn write_once(&self, t: FileType, name: &str, data: &[u8]) -> Result<()> {
        self.put_create(t, name, PutPayload::from(data.to_vec()))
    }

    fn delete(&self, t: FileType, name: &str) -> Result<()> {
        let path = self.object_path(t, name)?;
        self.forget_windows(name);
        let what = format!("{t} {name}");
        if !self.head(&path)? {
            return Err(Error::NotFound { what });
        }
        let store = self.store.clone();
        self.run(async move { store.delete(&path).await })
            .map_err(|e| self.error(what, e))
    }

    /// Copies the object to `damaged/<type dir>/<name>[.N]` (the first free name),
    /// then deletes it.
    fn move_aside(&self, t: FileType, name: &str) -> Result<String> {
        let from = self.object_path(t, name)?;
        self.forget_windows(name);
        let what = format!("{t} {name}");
        if !self.head(&from)? {
            return Err(Error::NotFound { what });
        }
        let dir = match t.dir() {
            "" => "config",
            d => d,
        };
        for n in 0..1000u32 {
            let to = self.path(&match n {
                0 => format!("damaged/{dir}/{name}"),
                n => format!("damaged/{dir}/{name}.{n}"),
            });
            let (store, f, d) = (self.store.clone(), from.clone(), to.clone());
            match self.run(async move { store.copy_if_not_exists(&f, &d).await }) {
                Ok(()) => {}
                Err(object_store::Error::AlreadyExists { .. }) => continue,
                // A server without conditional copy: look, then copy.
                Err(
                    object_store::Error::NotImplemented { .. }
                    | object_store::Error::NotSupported { .. },
                ) => {
                    if self.head(&to)? {
                        continue;
                    }
                    let (store, f, d) = (self.store.clone(), from.clone(), to.clone());
                    self.run(async move { store.copy(&f, &d).await })
                        .map_err(|e| self.error(what.clone(), e))?;
                }
                Err(e) => return Err(self.error(what, e)),
            }
            let store = self.store.clone();
            let f = from.clone();
            self.run(async move { store.delete(&f).await })
                .map_err(|e| self.error(what.clone(), e))?;
            return Ok(format!("{}/{to}", self.location));
        }
        Err(Error::InvalidInput(format!(
            "{what} was moved aside 1000 times: clean up damaged/{dir}/ in {}",
            self.location
        )))
    }

    fn writer(&self, t: FileType) -> Result<Box<dyn ObjectWriter>> {
        let spool = tempfile::tempfile().map_err(Error::io(format!(
            "a temporary file for a new {t} (in {})",
            std::env::temp_dir().display()
        )))?;
        Ok(Box::new(S3Writer {
            inner: self.0.clone(),
            t,
            spool: io::BufWriter::with_capacity(1 << 20, spool),
            len: 0,
        }))
    }
}

fn is_range_error(e: &object_store::Error) -> bool {
    let s = e.to_string();
    s.contains("416") || s.contains("InvalidRange")
}

/// A new object spooled to an unnamed local file, sent at `finish`.
struct S3Writer {
    inner: Arc<Inner>,
    t: FileType,
    spool: io::BufWriter<std::fs::File>,
    len: u64,
}

impl Write for S3Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.spool.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn finish(self: Box<Self>, name: &str) -> Result<()> {
        let what = format!("{} {name}", self.t);
        let mut file = self
            .spool
            .into_inner()
            .map_err(|e| Error::io(what.clone())(e.into_error()))?;
        if self.len > SINGLE_PUT_MAX && self.t == FileType::Data {
            self.inner.put_parts(self.t, name, file)
        } else {
            file.rewind().map_err(Error::io(what.clone()))?;
            let mut data = Vec::with_capacity(self.len as usize);
            file.read_to_end(&mut data).map_err(Error::io(what))?;
            self.inner.put_create(self.t, name, PutPayload::from(data))
        }
    }
}
