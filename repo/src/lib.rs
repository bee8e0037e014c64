//! The haul repository engine.
//!
//! A repository stores file content as **chunks** (content-defined, BLAKE3-named,
//! zstd-compressed, sealed with XChaCha20-Poly1305), directories as **trees**, and each
//! backup as a **snapshot** pointing at a root tree. Blobs are gathered into **packs**
//! of about 16 MiB; **index** files say which pack holds which blob. Every object is
//! written once and named by the BLAKE3 of its stored bytes.
//!
//! The main types:
//! - [`backend::Backend`]: where objects live (local directory, memory; decorators like
//!   [`backend::AppendOnly`]).
//! - [`Repository`]: opened with a passphrase; keys and snapshots.
//! - [`IndexedRepository`]: with the index loaded; reads blobs, hands out
//!   [`ingest::IngestSession`]s, serves restores, runs [`check`].
//! - [`repair`]: a new index for packs a damaged index file hid, damaged snapshot files
//!   moved aside. Until then a damaged index or snapshot file is skipped with a warning
//!   ([`error::DamagedFile`]), so it never blocks the rest of the repository.
//!
//! ```
//! use std::sync::Arc;
//! use haul_repo::{backend::MemoryBackend, crypto::KdfParams, format::config::RepoConfig, Repository};
//! use haul_repo::ingest::{IngestSession, SessionInfo, ParentChoice};
//! use haul_repo::format::snapshot::{SourceKind, Summary};
//! use haul_protocol::{tree::{Tree, Node, NodeKind}, ChunkId, BlobKind};
//!
//! let kdf = KdfParams { m_cost: 64, t_cost: 1, p_cost: 1 }; // tiny, for the example
//! let repo = Repository::init(Arc::new(MemoryBackend::default()), b"secret", kdf, RepoConfig::new(3))?;
//! let repo = repo.load_index(None)?;
//! let info = SessionInfo { host: "web-1".into(), paths: vec!["/srv".into()], tags: vec![],
//!                          source: SourceKind::Local, parent: ParentChoice::Latest,
//!                          scope: Default::default() };
//! let session = IngestSession::start(&repo, info)?;
//! let content = b"hello".to_vec();
//! let chunk = ChunkId::of(&content);
//! session.add_plain(BlobKind::Data, &chunk.0, content)?;
//! let tree = Tree { nodes: vec![Node { name: b"greeting".to_vec(), kind: NodeKind::File, size: 5,
//!                                      content: vec![chunk], ..Default::default() }] };
//! let (root, bytes) = tree.encode_with_id();
//! session.add_plain(BlobKind::Tree, &root.0, bytes)?;
//! let (id, _) = session.commit(root, Summary::default())?;
//! assert_eq!(repo.load_chunk(&chunk)?, b"hello");
//! assert_eq!(repo.snapshots()?[0].0, id);
//! # Ok::<(), haul_repo::Error>(())
//! ```

pub mod backend;
pub mod check;
pub mod copy;
pub mod crypto;
pub mod error;
pub mod forget;
pub mod format;
pub mod index;
pub mod ingest;
pub mod lock;
pub mod pack_cache;
pub mod prune;
pub mod repair;
pub mod repository;
pub mod usage;

pub use error::{DamagedFile, Error, Result};
pub use repository::{IndexedRepository, KeyInfo, Repository, SnapshotFilter, SnapshotList};
