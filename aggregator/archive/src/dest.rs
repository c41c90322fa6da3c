//! Where finished files go: a local directory (rename into place) or an S3-compatible
//! bucket (`object_store`: one PUT, or a multipart upload for large files). Either way a
//! file appears whole under its final name or not at all, and publishing the same name
//! again replaces it with the same bytes (the redo after a crash, see `archiver`).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use crate::ArchiveError;
use crate::config::{ArchiveConfig, S3Config};

/// Files up to this size are one PUT; larger ones a multipart upload of parts this size.
const PART_BYTES: usize = 8 << 20;

/// A destination for finished files.
#[derive(Debug)]
pub enum Destination {
    /// A local directory.
    Local {
        /// The archive's root.
        dir: PathBuf,
    },
    /// A local directory shared with other writers: files are built in
    /// `<dir>/_tmp/<writer_id>` (what [`Destination::open`] returns for a local `dir`).
    LocalFor {
        /// The archive's root.
        dir: PathBuf,
        /// This writer's build directory.
        tmp: PathBuf,
    },
    /// An object store (S3-compatible).
    Object {
        /// The store.
        store: Arc<dyn ObjectStore>,
        /// Key prefix ("" or without slashes at either end).
        prefix: String,
        /// Where files are built before their upload.
        staging: PathBuf,
        /// Runs the store's async calls.
        rt: tokio::runtime::Runtime,
        /// `s3://bucket/prefix`, for logs.
        url: String,
    },
}

fn io(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ArchiveError {
    move |e| ArchiveError(format!("{what}: {e}"))
}

impl Destination {
    /// The destination `cfg` names; `staging` holds files being built for an object store.
    pub fn open(cfg: &ArchiveConfig, staging: &Path) -> Result<Destination, ArchiveError> {
        let dest = match &cfg.s3 {
            None => Destination::LocalFor {
                dir: cfg.dir.clone(),
                tmp: cfg.dir.join("_tmp").join(&cfg.writer_id),
            },
            Some(s3) => Destination::Object {
                store: Arc::new(s3_store(s3)?),
                prefix: s3.prefix.clone(),
                staging: staging.to_path_buf(),
                rt: tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(io("archive runtime"))?,
                url: format!("s3://{}/{}", s3.bucket, s3.prefix),
            },
        };
        let tmp = dest.tmp_dir();
        std::fs::create_dir_all(&tmp).map_err(io(format!("cannot create {}", tmp.display())))?;
        // Files this writer was building when it stopped: the redo writes them again
        // (another writer's are in their own directory).
        if let Ok(rd) = std::fs::read_dir(&tmp) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(dest)
    }

    /// Where files are built: `<dir>/_tmp` (same file system, so the rename is atomic; a
    /// leading `_` keeps Hive-style readers out of it) or the staging directory.
    pub fn tmp_dir(&self) -> PathBuf {
        match self {
            Destination::Local { dir } => dir.join("_tmp"),
            Destination::LocalFor { tmp, .. } => tmp.clone(),
            Destination::Object { staging, .. } => staging.clone(),
        }
    }

    /// For logs.
    pub fn describe(&self) -> String {
        match self {
            Destination::Local { dir } | Destination::LocalFor { dir, .. } => {
                dir.display().to_string()
            }
            Destination::Object { url, .. } => url.clone(),
        }
    }

    /// Publishes the finished file `tmp` (fsynced by the caller) as `rel`
    /// (`dt=.../hour=.../<name>.parquet`).
    pub fn publish(&self, tmp: &Path, rel: &str) -> Result<(), ArchiveError> {
        match self {
            Destination::Local { dir } | Destination::LocalFor { dir, .. } => {
                let to = dir.join(rel);
                let parent = to.parent().unwrap_or(dir);
                std::fs::create_dir_all(parent)
                    .map_err(io(format!("cannot create {}", parent.display())))?;
                std::fs::rename(tmp, &to).map_err(io(format!(
                    "cannot rename {} to {}",
                    tmp.display(),
                    to.display()
                )))?;
                // The rename is durable once the directory is.
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(io(format!("cannot sync {}", parent.display())))?;
                Ok(())
            }
            Destination::Object {
                store,
                prefix,
                rt,
                url,
                ..
            } => {
                let key = if prefix.is_empty() {
                    ObjectPath::from(rel)
                } else {
                    ObjectPath::from(format!("{prefix}/{rel}"))
                };
                let mut f =
                    File::open(tmp).map_err(io(format!("cannot open {}", tmp.display())))?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let failed = |e: object_store::Error| {
                    ArchiveError(format!("upload of {url}/{rel} failed: {e}"))
                };
                rt.block_on(async {
                    if len <= PART_BYTES as u64 {
                        let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
                        f.read_to_end(&mut buf)
                            .map_err(io(format!("cannot read {}", tmp.display())))?;
                        store
                            .put(&key, PutPayload::from(buf))
                            .await
                            .map_err(failed)?;
                        return Ok(());
                    }
                    let upload = store.put_multipart(&key).await.map_err(failed)?;
                    let mut w = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
                    let mut buf = vec![0u8; PART_BYTES];
                    loop {
                        let n = f
                            .read(&mut buf)
                            .map_err(io(format!("cannot read {}", tmp.display())))?;
                        if n == 0 {
                            break;
                        }
                        w.wait_for_capacity(4).await.map_err(failed)?;
                        w.write(&buf[..n]);
                    }
                    w.finish().await.map_err(failed)?;
                    Ok::<(), ArchiveError>(())
                })?;
                let _ = std::fs::remove_file(tmp);
                Ok(())
            }
        }
    }

    /// The bytes of the file `rel` (tools: `adclick reconcile`).
    pub fn get(&self, rel: &str) -> Result<bytes::Bytes, ArchiveError> {
        match self {
            Destination::Local { dir } | Destination::LocalFor { dir, .. } => {
                std::fs::read(dir.join(rel))
                    .map(bytes::Bytes::from)
                    .map_err(io(format!("cannot read {}", dir.join(rel).display())))
            }
            Destination::Object {
                store,
                prefix,
                rt,
                url,
                ..
            } => {
                let key = if prefix.is_empty() {
                    ObjectPath::from(rel)
                } else {
                    ObjectPath::from(format!("{prefix}/{rel}"))
                };
                rt.block_on(async {
                    let r = store.get(&key).await?;
                    r.bytes().await
                })
                .map_err(|e| ArchiveError(format!("cannot read {url}/{rel}: {e}")))
            }
        }
    }

    /// Names of the files under `rel_dir` (tests and tools), sorted.
    pub fn list(&self, rel_dir: &str) -> Result<Vec<String>, ArchiveError> {
        match self {
            Destination::Local { dir } | Destination::LocalFor { dir, .. } => {
                let mut out = Vec::new();
                walk(&dir.join(rel_dir), dir, &mut out)?;
                out.sort();
                Ok(out)
            }
            Destination::Object {
                store, prefix, rt, ..
            } => {
                use futures_util::StreamExt;
                let p = [prefix.as_str(), rel_dir]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .copied()
                    .collect::<Vec<_>>()
                    .join("/");
                let p = ObjectPath::from(p);
                let mut out = rt.block_on(async {
                    let mut s = store.list(Some(&p));
                    let mut out = Vec::new();
                    while let Some(m) = s.next().await {
                        let m = m.map_err(|e| ArchiveError(format!("list: {e}")))?;
                        let k = m.location.to_string();
                        let k = k
                            .strip_prefix(prefix.as_str())
                            .map(|k| k.trim_start_matches('/').to_string())
                            .unwrap_or(k);
                        out.push(k);
                    }
                    Ok::<_, ArchiveError>(out)
                })?;
                out.sort();
                Ok(out)
            }
        }
    }
}

fn walk(d: &Path, root: &Path, out: &mut Vec<String>) -> Result<(), ArchiveError> {
    let rd = match std::fs::read_dir(d) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ArchiveError(format!("{}: {e}", d.display()))),
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            if p.file_name().is_some_and(|n| n == "_tmp") {
                continue;
            }
            walk(&p, root, out)?;
        } else if let Ok(rel) = p.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// The object store for `[archive.s3]`, credentials from the environment.
fn s3_store(s3: &S3Config) -> Result<object_store::aws::AmazonS3, ArchiveError> {
    // reqwest is built without a crypto provider of its own (workspace: ring only).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(&s3.bucket)
        .with_virtual_hosted_style_request(!s3.path_style)
        .with_allow_http(s3.allow_http);
    if let Some(r) = &s3.region {
        b = b.with_region(r);
    } else if std::env::var_os("AWS_REGION").is_none()
        && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        b = b.with_region("us-east-1");
    }
    if let Some(e) = &s3.endpoint {
        b = b.with_endpoint(e);
    }
    b.build()
        .map_err(|e| ArchiveError(format!("archive.s3: {e}")))
}

/// Writes all of `bytes` to a new file at `path` and syncs it (tests).
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
