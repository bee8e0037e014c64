//! Opening a repository: backend + key, then (a second step) its index.
//!
//! [`Repository`] is an unlocked repository: config and keys, snapshots, key
//! management. [`Repository::load_index`] turns it into an [`IndexedRepository`], which
//! can read and write blobs: backups, restores and checks need it, key management and
//! snapshot listing do not (typestate: the order is in the types).

use crate::backend::{Backend, FileType};
use crate::crypto::{self, KdfParams, Key};
use crate::error::{DamagedFile, Error, Result};
use crate::format::config::RepoConfig;
use crate::format::index_file::IndexedPack;
use crate::format::key_file::KeyFile;
use crate::format::snapshot::Snapshot;
use crate::format::{ad, pack_header};
use crate::index::{BlobLocation, Index};
use haul_protocol::chunker::decode_blob as decode_encoded;
use haul_protocol::tree::TreeBlob;
use haul_protocol::{BlobKind, ChunkId, PackId, SnapshotId, TreeId};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Purposes of subkeys derived from the master key.
const DATA_KEY_CONTEXT: &str = "haul 2026-11 data key";

/// Largest tree blob accepted (a directory of a few million entries).
pub const MAX_TREE_BYTES: usize = 512 * 1024 * 1024;

/// Seals `plain` under `ad` and stores it as a new object of type `t`, named by the
/// BLAKE3 of its sealed bytes (index files, snapshots, a prune's records, locks);
/// returns the name.
pub(crate) fn write_named(
    backend: &dyn Backend,
    key: &Key,
    t: FileType,
    ad: &[u8],
    plain: &[u8],
) -> Result<String> {
    let sealed = key.seal(ad, plain);
    let name = blake3::hash(&sealed).to_hex().to_string();
    backend.write_once(t, &name, &sealed)?;
    Ok(name)
}

/// Reads object `name` of type `t` written by [`write_named`], checks its bytes
/// against its name, and opens it under `ad`; `what` names it in errors.
pub(crate) fn read_named(
    backend: &dyn Backend,
    key: &Key,
    t: FileType,
    name: &str,
    ad: &[u8],
    what: &str,
) -> Result<Vec<u8>> {
    let sealed = backend.read(t, name)?;
    if blake3::hash(&sealed).to_hex().as_str() != name {
        return Err(Error::corrupt(what, "content does not match its name"));
    }
    key.open_vec(ad, sealed, what)
}

/// An unlocked repository.
#[derive(Clone)]
pub struct Repository {
    backend: Arc<dyn Backend>,
    config: RepoConfig,
    /// The key file that opened the repository.
    key_name: String,
    master: Key,
    data_key: Key,
}

/// The snapshots of a repository, and the snapshot files that could not be read.
#[derive(Debug, Default)]
pub struct SnapshotList {
    /// Oldest first.
    pub snapshots: Vec<(SnapshotId, Snapshot)>,
    pub damaged: Vec<DamagedFile>,
}

/// A key file as `key list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub id: String,
    pub current: bool,
    /// `None` when the file is damaged.
    pub created: Option<chrono::DateTime<chrono::Utc>>,
    pub hostname: String,
    pub username: String,
    /// What is wrong with the file, when it cannot be read or parsed.
    pub damaged: Option<String>,
}

/// Reads and parses a key file (not yet opened).
fn read_key_file(backend: &dyn Backend, name: &str) -> Result<KeyFile> {
    let what = format!("key file {name}");
    let bytes = backend.read(FileType::Key, name)?;
    let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| Error::corrupt(&what, e))?;
    // Out-of-range cost parameters are damage too (and must not exhaust the pbs).
    file.kdf.check().map_err(|e| Error::corrupt(&what, e))?;
    for field in [&file.salt, &file.sealed_master] {
        hex::decode(field).map_err(|e| Error::corrupt(&what, e))?;
    }
    Ok(file)
}

/// Reports a damaged key file (a warning) and returns it.
fn warn_damaged_key(name: &str, e: &Error) -> DamagedFile {
    let damaged = DamagedFile::new(FileType::Key, name, e);
    tracing::warn!(
        "key file {damaged} is damaged and was skipped: if it is the key of this passphrase, put back a copy of it; `haul-pbs key remove {}` removes it",
        &name[..name.len().min(8)]
    );
    damaged
}

/// The master key sealed in `file`, if `passphrase` opens it (`None`: it does not).
/// An error means the file is damaged.
fn unseal_master(name: &str, file: &KeyFile, passphrase: &[u8]) -> Result<Option<Key>> {
    let what = format!("key file {name}");
    let salt = hex::decode(&file.salt).map_err(|e| Error::corrupt(&what, e))?;
    let sealed = hex::decode(&file.sealed_master).map_err(|e| Error::corrupt(&what, e))?;
    let kek = crypto::derive_from_passphrase(passphrase, &salt, file.kdf)
        .map_err(|e| Error::corrupt(&what, e))?;
    let Ok(raw) = kek.open(ad::MASTER_KEY, &sealed, "master key") else {
        return Ok(None);
    };
    let raw: [u8; 32] = raw
        .try_into()
        .map_err(|_| Error::corrupt(&what, "master key is not 32 bytes"))?;
    Ok(Some(Key(raw)))
}

fn host_and_user() -> (String, String) {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    (host, user)
}

fn seal_master(master: &Key, passphrase: &[u8], kdf: KdfParams) -> Result<(String, Vec<u8>)> {
    let salt: [u8; 16] = crypto::random_bytes();
    let kek = crypto::derive_from_passphrase(passphrase, &salt, kdf)?;
    let (hostname, username) = host_and_user();
    let file = KeyFile {
        version: 1,
        created: chrono::Utc::now(),
        hostname,
        username,
        kdf,
        salt: hex::encode(salt),
        sealed_master: hex::encode(kek.seal(ad::MASTER_KEY, &master.0)),
    };
    let bytes = serde_json::to_vec_pretty(&file).expect("key file serializes");
    Ok((blake3::hash(&bytes).to_hex().to_string(), bytes))
}

impl Repository {
    /// Creates a repository in an empty backend, with one key for `passphrase`.
    pub fn init(
        backend: Arc<dyn Backend>,
        passphrase: &[u8],
        kdf: KdfParams,
        config: RepoConfig,
    ) -> Result<Repository> {
        if !backend.list(FileType::Config)?.is_empty() {
            return Err(Error::RepositoryExists(PathBuf::from(backend.location())));
        }
        if passphrase.is_empty() {
            return Err(Error::InvalidInput(
                "an empty passphrase is not allowed".into(),
            ));
        }
        config.validate().map_err(Error::InvalidInput)?;
        let master = Key::random();
        let data_key = master.derive(DATA_KEY_CONTEXT);
        let (key_name, key_bytes) = seal_master(&master, passphrase, kdf)?;
        backend.write_once(FileType::Key, &key_name, &key_bytes)?;
        let cfg = serde_json::to_vec(&config).expect("config serializes");
        backend.write_once(FileType::Config, "config", &data_key.seal(ad::CONFIG, &cfg))?;
        Ok(Repository {
            backend,
            config,
            key_name,
            master,
            data_key,
        })
    }

    /// Opens a repository with a passphrase, trying every key file. A key file that
    /// cannot be read or parsed is skipped with a warning, so one damaged key does not
    /// lock out the others (issue 14); if no key opens, the error names the damaged
    /// ones too (the passphrase may be theirs).
    pub fn open(backend: Arc<dyn Backend>, passphrase: &[u8]) -> Result<Repository> {
        let sealed_config = match backend.read(FileType::Config, "config") {
            Err(Error::NotFound { .. }) => {
                return Err(Error::NoRepository(PathBuf::from(backend.location())))
            }
            other => other?,
        };
        let mut keys = backend.list(FileType::Key)?;
        // A set order, so that which key opens (and is `current`) does not vary.
        keys.sort();
        // Every key file is read first, so a damaged one is reported whichever key opens.
        let mut readable = Vec::new();
        let mut broken = Vec::new();
        for (name, _) in &keys {
            match read_key_file(backend.as_ref(), name) {
                Ok(file) => readable.push((name, file)),
                // Removed while we looked (another `key remove`): not damage.
                Err(Error::NotFound { .. }) => {}
                Err(e) => broken.push(warn_damaged_key(name, &e)),
            }
        }
        let mut tried = 0;
        for (name, file) in readable {
            let master = match unseal_master(name, &file, passphrase) {
                Ok(Some(master)) => master,
                Ok(None) => {
                    tried += 1;
                    continue;
                }
                Err(e) => {
                    broken.push(warn_damaged_key(name, &e));
                    continue;
                }
            };
            let data_key = master.derive(DATA_KEY_CONTEXT);
            let cfg = data_key.open(ad::CONFIG, &sealed_config, "config")?;
            let config: RepoConfig =
                serde_json::from_slice(&cfg).map_err(|e| Error::corrupt("config", e))?;
            config.validate().map_err(|e| Error::corrupt("config", e))?;
            return Ok(Repository {
                backend,
                config,
                key_name: name.clone(),
                master,
                data_key,
            });
        }
        Err(Error::WrongPassphrase { tried, broken })
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub(crate) fn data_key(&self) -> &Key {
        &self.data_key
    }

    /// Adds a key file for another passphrase; returns its id.
    pub fn add_key(&self, passphrase: &[u8], kdf: KdfParams) -> Result<String> {
        if passphrase.is_empty() {
            return Err(Error::InvalidInput(
                "an empty passphrase is not allowed".into(),
            ));
        }
        let (name, bytes) = seal_master(&self.master, passphrase, kdf)?;
        self.backend.write_once(FileType::Key, &name, &bytes)?;
        Ok(name)
    }

    /// Every key file, oldest first; a damaged one is listed with what is wrong with it
    /// (and no creation time), last.
    pub fn list_keys(&self) -> Result<Vec<KeyInfo>> {
        let mut out = Vec::new();
        for (name, _) in self.backend.list(FileType::Key)? {
            let info = match read_key_file(self.backend.as_ref(), &name) {
                Ok(f) => KeyInfo {
                    current: name == self.key_name,
                    id: name,
                    created: Some(f.created),
                    hostname: f.hostname,
                    username: f.username,
                    damaged: None,
                },
                Err(Error::NotFound { .. }) => continue,
                Err(e) => KeyInfo {
                    current: false,
                    damaged: Some(DamagedFile::new(FileType::Key, &name, &e).reason),
                    id: name,
                    created: None,
                    hostname: String::new(),
                    username: String::new(),
                },
            };
            out.push(info);
        }
        out.sort_by(|a, b| {
            (a.created.is_none(), a.created, &a.id).cmp(&(b.created.is_none(), b.created, &b.id))
        });
        Ok(out)
    }

    /// Removes a key file, given its id or a unique prefix of it. The last key, and the
    /// key this repository was opened with, cannot be removed.
    pub fn remove_key(&self, id_prefix: &str) -> Result<String> {
        let keys = self.backend.list(FileType::Key)?;
        let matches: Vec<&String> = keys
            .iter()
            .map(|(n, _)| n)
            .filter(|n| n.starts_with(id_prefix))
            .collect();
        let name = match matches.as_slice() {
            [] => {
                return Err(Error::NoSuch {
                    what: format!("key {id_prefix}"),
                    hint: "`haul-pbs key list` shows the keys",
                })
            }
            [one] => (*one).clone(),
            _ => {
                return Err(Error::InvalidInput(format!(
                    "key prefix {id_prefix:?} is ambiguous: give more digits"
                )))
            }
        };
        if keys.len() == 1 {
            return Err(Error::LastKey);
        }
        if name == self.key_name {
            return Err(Error::InvalidInput(
                "cannot remove the key this command was opened with: open with another key's passphrase to remove it".into(),
            ));
        }
        self.backend.delete(FileType::Key, &name)?;
        Ok(name)
    }

    /// Every readable snapshot, oldest first. A snapshot file that cannot be read is
    /// skipped with a warning (see [`Repository::read_snapshots`]).
    pub fn snapshots(&self) -> Result<Vec<(SnapshotId, Snapshot)>> {
        let list = self.read_snapshots()?;
        for d in &list.damaged {
            tracing::warn!(
                "snapshot file {d} is damaged and was skipped: `haul-pbs repair snapshots` moves it aside"
            );
        }
        Ok(list.snapshots)
    }

    /// The readable snapshots `filter` selects, oldest first.
    pub fn snapshots_matching(
        &self,
        filter: &SnapshotFilter,
    ) -> Result<Vec<(SnapshotId, Snapshot)>> {
        let mut all = self.snapshots()?;
        all.retain(|(_, s)| filter.matches(s));
        Ok(all)
    }

    /// Every snapshot, oldest first, and the snapshot files that could not be read:
    /// damaged, truncated, sealed under another key, or not named like a snapshot.
    /// One damaged snapshot must not hide the others (issue 14); a file removed while
    /// the list was read (a concurrent `forget`) is neither.
    pub fn read_snapshots(&self) -> Result<SnapshotList> {
        let mut list = SnapshotList::default();
        for (name, _) in self.backend.list(FileType::Snapshot)? {
            let loaded = name
                .parse::<SnapshotId>()
                .map_err(|e| Error::corrupt(format!("snapshot {name}"), e))
                .and_then(|id| Ok((id, self.load_snapshot(&id)?)));
            match loaded {
                Ok(s) => list.snapshots.push(s),
                Err(Error::NotFound { .. }) => {}
                Err(e @ Error::Corrupt { .. }) => {
                    list.damaged
                        .push(DamagedFile::new(FileType::Snapshot, &name, &e))
                }
                Err(e) => return Err(e),
            }
        }
        list.snapshots
            .sort_by(|a, b| a.1.time.cmp(&b.1.time).then(a.0.cmp(&b.0)));
        list.damaged.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    /// Whether snapshot `id` is (still) in the repository.
    pub fn has_snapshot(&self, id: &SnapshotId) -> Result<bool> {
        match self.backend.read(FileType::Snapshot, &id.to_hex()) {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn load_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        let what = format!("snapshot {}", id.short());
        let plain = read_named(
            self.backend.as_ref(),
            &self.data_key,
            FileType::Snapshot,
            &id.to_hex(),
            ad::SNAPSHOT,
            &what,
        )?;
        serde_json::from_slice(&plain).map_err(|e| Error::corrupt(what, e))
    }

    /// Finds a snapshot by `latest`, a full id or a unique prefix of at least 4 digits.
    pub fn find_snapshot(&self, spec: &str) -> Result<(SnapshotId, Snapshot)> {
        self.find_snapshot_of(spec, None)
    }

    /// Like [`Repository::find_snapshot`], among the snapshots of `host` only (all
    /// when `None`).
    pub fn find_snapshot_of(
        &self,
        spec: &str,
        host: Option<&str>,
    ) -> Result<(SnapshotId, Snapshot)> {
        self.find_snapshot_matching(
            spec,
            &SnapshotFilter {
                host: host.map(String::from),
                ..Default::default()
            },
        )
    }

    /// Like [`Repository::find_snapshot`], among the snapshots `filter` selects:
    /// `latest` is the newest of those, and an id outside them is not found.
    pub fn find_snapshot_matching(
        &self,
        spec: &str,
        filter: &SnapshotFilter,
    ) -> Result<(SnapshotId, Snapshot)> {
        let SnapshotList {
            snapshots: mut all,
            damaged,
        } = self.read_snapshots()?;
        all.retain(|(_, s)| filter.matches(s));
        if spec == "latest" {
            for d in &damaged {
                tracing::warn!(
                    "snapshot file {d} is damaged and was skipped: `latest` is the newest readable snapshot; `haul-pbs repair snapshots` moves it aside"
                );
            }
            return all.into_iter().last().ok_or_else(|| Error::NoSuch {
                what: match filter.is_empty() {
                    true => "any snapshot".into(),
                    false => format!("any snapshot of {filter}"),
                },
                hint: "`haul-pbs snapshots` lists them (with the same filters, those that match)",
            });
        }
        if spec.len() < 4 || !spec.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidInput(format!(
                "{spec:?} is not a snapshot id: give `latest` or at least 4 hex digits of an id from `haul-pbs snapshots`"
            )));
        }
        let spec = spec.to_ascii_lowercase();
        let mut found: Vec<(SnapshotId, Snapshot)> = all
            .into_iter()
            .filter(|(id, _)| id.to_hex().starts_with(&spec))
            .collect();
        match found.len() {
            0 => match damaged.iter().find(|d| d.name.starts_with(&spec)) {
                // Named, but unreadable: say so, rather than "not found".
                Some(d) => Err(Error::corrupt(
                    d.path(),
                    format!(
                        "{}: it cannot be read, so nothing of it can be listed or restored; `haul-pbs repair snapshots` moves it aside",
                        d.reason
                    ),
                )),
                None => Err(Error::NoSuch {
                    what: match filter.is_empty() {
                        true => format!("snapshot {spec}"),
                        false => format!("snapshot {spec} of {filter}"),
                    },
                    hint: "`haul-pbs snapshots` lists them",
                }),
            },
            1 => Ok(found.pop().expect("one")),
            _ => Err(Error::InvalidInput(format!(
                "snapshot prefix {spec} is ambiguous: give more digits"
            ))),
        }
    }

    pub(crate) fn save_snapshot(&self, snapshot: &Snapshot) -> Result<SnapshotId> {
        let json = serde_json::to_vec(snapshot).expect("snapshot serializes");
        let name = write_named(
            self.backend.as_ref(),
            &self.data_key,
            FileType::Snapshot,
            ad::SNAPSHOT,
            &json,
        )?;
        Ok(name.parse().expect("a BLAKE3 name is a snapshot id"))
    }

    /// Loads the index, using the local cache in `cache_root/<repo id>` if given.
    ///
    /// A damaged index file is skipped with a warning, and the packs that no readable
    /// index file lists are indexed from their own headers, in memory only (nothing is
    /// written: this works on a read-only or full disk). A backup then writes their
    /// index ([`IndexedRepository::index_orphan_packs`]); `haul-pbs repair index`
    /// replaces the damaged file for good.
    pub fn load_index(self, cache_root: Option<&std::path::Path>) -> Result<IndexedRepository> {
        let dir = cache_root.map(|r| r.join(&self.config.id));
        // Before the index files: see `IndexedRepository::is_current`.
        let epochs = self.epochs()?;
        let index = Index::load(self.backend.as_ref(), &self.data_key, dir.as_deref())?;
        let tree_packs = match &dir {
            Some(d) if self.backend.is_remote() => {
                let indexed = index.pack_ids();
                Some(crate::pack_cache::PackCache::open(&d.join("packs"), |p| {
                    indexed.contains(p)
                })?)
            }
            _ => None,
        };
        let repo = IndexedRepository {
            tree_packs,
            repo: self,
            index,
            recovered: Mutex::new(HashSet::new()),
            epochs,
            cache_root: cache_root.map(|p| p.to_path_buf()),
        };
        if repo.index.damaged().is_empty() {
            return Ok(repo);
        }
        let scan = repo.unindexed_packs()?;
        for p in &scan.packs {
            repo.index.add_pack(p.pack, &p.blobs);
        }
        *repo.recovered.lock().expect("recovered packs") =
            scan.packs.iter().map(|p| p.pack).collect();
        for d in repo.index.damaged() {
            tracing::warn!(
                "index file {d} is damaged and was skipped; {} pack(s) that no readable index file lists were indexed from their own headers (in memory); `haul-pbs repair index` writes a new index and moves the damaged file aside",
                scan.packs.len()
            );
        }
        scan.warn_unreadable();
        Ok(repo)
    }
}

/// Packs in `data/` that no readable index file lists, read from their own headers.
#[derive(Debug, Default)]
pub struct UnindexedPacks {
    pub packs: Vec<IndexedPack>,
    /// Packs whose header could not be read: their blobs stay unknown.
    pub unreadable: Vec<(PackId, Error)>,
    /// Packs in no index file because a prune condemned them: left alone.
    pub condemned: usize,
}

impl UnindexedPacks {
    fn warn_unreadable(&self) {
        for (id, e) in &self.unreadable {
            tracing::warn!(
                "pack {} is in no index and its header is unreadable, left as it is: {e}",
                id.short()
            );
        }
    }
}

/// A repository with its index loaded: blobs can be read and written.
pub struct IndexedRepository {
    repo: Repository,
    index: Index,
    /// Packs indexed in memory at load, from their headers, because a damaged index
    /// file hid them: in no index file yet.
    recovered: Mutex<HashSet<PackId>>,
    /// The prune epoch markers there were just before the index was loaded.
    epochs: std::collections::BTreeSet<String>,
    cache_root: Option<PathBuf>,
    /// The local copy of the tree packs of a repository on remote storage.
    tree_packs: Option<crate::pack_cache::PackCache>,
}

impl std::ops::Deref for IndexedRepository {
    type Target = Repository;
    fn deref(&self) -> &Repository {
        &self.repo
    }
}

impl IndexedRepository {
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Whether no prune has condemned packs since this index was loaded. A view that
    /// is not current may know blobs of packs a prune is deleting: a session must not
    /// answer from it (see `crate::prune`). It looks at the epoch markers only.
    pub fn is_current(&self) -> Result<bool> {
        Ok(self.repo.epochs()?.is_subset(&self.epochs))
    }

    /// The same repository with its index loaded again (no key derivation).
    pub fn reloaded(&self) -> Result<IndexedRepository> {
        self.repo.clone().load_index(self.cache_root.as_deref())
    }

    /// The index cache root it was loaded with.
    pub fn cache_root(&self) -> Option<&std::path::Path> {
        self.cache_root.as_deref()
    }

    /// The repository without its index (whose memory is freed), and the index
    /// cache root it was loaded with.
    pub fn unload(self) -> (Repository, Option<PathBuf>) {
        (self.repo, self.cache_root)
    }

    /// Reads, opens, decodes and verifies a blob.
    pub fn load_blob(&self, kind: BlobKind, id: &[u8; 32]) -> Result<Vec<u8>> {
        self.load_blob_at(kind, id, &self.located(kind, id)?)
    }

    /// Where the index puts a blob; not found if it has none.
    fn located(&self, kind: BlobKind, id: &[u8; 32]) -> Result<BlobLocation> {
        self.index.get(kind, id)?.ok_or_else(|| Error::NotFound {
            what: format!("{kind} blob {}", hex::encode(id)),
        })
    }

    pub(crate) fn load_blob_at(
        &self,
        kind: BlobKind,
        id: &[u8; 32],
        loc: &BlobLocation,
    ) -> Result<Vec<u8>> {
        let (sealed, what) = self.read_sealed(kind, id, loc)?;
        decode_blob(
            &self.repo.data_key,
            kind,
            id,
            sealed,
            self.limit(kind),
            &what,
        )
    }

    /// Reads and opens a blob, and returns it in its transfer encoding (format byte
    /// last, see `haul_protocol::chunker::decode_blob`) without decompressing it: what
    /// a read-only server sends, and the receiver decodes and hashes it. The seal
    /// (kind and id are its associated data) already proves the bytes are the ones
    /// stored under this id.
    pub fn load_encoded(&self, kind: BlobKind, id: &[u8; 32]) -> Result<Vec<u8>> {
        self.load_encoded_at(kind, id, &self.located(kind, id)?)
    }

    /// [`IndexedRepository::load_encoded`] of a blob the caller has located.
    pub fn load_encoded_at(
        &self,
        kind: BlobKind,
        id: &[u8; 32],
        loc: &BlobLocation,
    ) -> Result<Vec<u8>> {
        let (sealed, what) = self.read_sealed(kind, id, loc)?;
        self.repo
            .data_key
            .open_vec(&ad::blob(kind, id), sealed, &what)
    }

    fn limit(&self, kind: BlobKind) -> usize {
        match kind {
            BlobKind::Data => self.repo.config.chunker.max_size as usize,
            BlobKind::Tree => MAX_TREE_BYTES,
        }
    }

    /// The sealed bytes of a blob at `loc`, and how to name it in errors.
    pub(crate) fn read_sealed(
        &self,
        kind: BlobKind,
        id: &[u8; 32],
        loc: &BlobLocation,
    ) -> Result<(Vec<u8>, String)> {
        let what = format!(
            "{kind} blob {} in pack {}",
            hex::encode(&id[..8]),
            loc.pack.short()
        );
        if loc.length as usize > self.limit(kind) + crypto::OVERHEAD + 1 + 64 * 1024 {
            return Err(Error::corrupt(
                what,
                format!("indexed length {} is larger than any blob", loc.length),
            ));
        }
        let sealed = match &self.tree_packs {
            Some(cache) if kind == BlobKind::Tree => cache.read_range(
                self.repo.backend.as_ref(),
                &loc.pack,
                loc.offset as u64,
                loc.length,
            )?,
            _ => self.repo.backend.read_range(
                FileType::Data,
                &loc.pack.to_hex(),
                loc.offset as u64,
                loc.length,
            )?,
        };
        Ok((sealed, what))
    }

    /// A directory's tree: its nodes, or the pages of a large one.
    pub fn load_tree(&self, id: &TreeId) -> Result<TreeBlob> {
        let bytes = self.load_blob(BlobKind::Tree, &id.0)?;
        TreeBlob::decode(&bytes).map_err(|e| Error::corrupt(format!("tree {}", id.short()), e))
    }

    pub fn load_chunk(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.load_blob(BlobKind::Data, &id.0)
    }

    /// The plaintext of chunk `id` from its transfer encoding (what
    /// [`IndexedRepository::load_encoded`] gave), checked against its id.
    pub fn decode_chunk(&self, id: &ChunkId, encoded: Vec<u8>) -> Result<Vec<u8>> {
        let what = format!("chunk {}", id.short());
        decode_verified(&id.0, encoded, self.limit(BlobKind::Data), &what)
    }

    /// Seals and writes one index file for `packs`; returns its name.
    pub fn write_index_file(&self, packs: &[IndexedPack]) -> Result<String> {
        write_named(
            self.repo.backend.as_ref(),
            &self.repo.data_key,
            FileType::Index,
            ad::INDEX,
            &crate::format::index_file::encode(packs),
        )
    }

    /// The packs in `data/` that no readable index file lists, with their blobs read
    /// from their headers: those a backup killed between writing packs and writing
    /// their index left, and those of a damaged index file. A pack appears in `data/`
    /// only complete (see the backend's contract), so its header tells its blobs.
    ///
    /// Packs a prune condemned are not among them: they are in no index file on
    /// purpose, and indexing them again would hand their blobs to sessions while a
    /// sweep deletes them (see `crate::prune`).
    pub fn unindexed_packs(&self) -> Result<UnindexedPacks> {
        let mut known = self.index.pack_ids();
        for p in self.recovered.lock().expect("recovered packs").iter() {
            known.remove(p);
        }
        let mut out = UnindexedPacks::default();
        let candidates: Vec<(PackId, u64)> = self
            .repo
            .backend
            .list(FileType::Data)?
            .into_iter()
            .filter_map(|(name, size)| Some((name.parse::<PackId>().ok()?, size)))
            .filter(|(id, _)| !known.contains(id))
            .collect();
        if candidates.is_empty() {
            return Ok(out);
        }
        // Listed after the packs: a pack condemned before it went missing from the
        // index files is in a record written before that (see `crate::prune`).
        let condemned = self.repo.condemnations()?.packs();
        for (id, size) in candidates {
            if condemned.contains(&id) {
                out.condemned += 1;
                continue;
            }
            match self.read_pack_header(&id, size) {
                Ok(blobs) => out.packs.push(IndexedPack { pack: id, blobs }),
                Err(e) => out.unreadable.push((id, e)),
            }
        }
        out.packs.sort_by_key(|p| p.pack);
        Ok(out)
    }

    /// Writes an index file for the packs that are in no index file (see
    /// [`IndexedRepository::unindexed_packs`]), so a backup neither uploads their data
    /// again nor leaves them unindexed. Returns how many packs were indexed.
    pub fn index_orphan_packs(&self) -> Result<usize> {
        let scan = self.unindexed_packs()?;
        scan.warn_unreadable();
        if scan.packs.is_empty() {
            return Ok(0);
        }
        self.write_index_file(&scan.packs)?;
        for p in &scan.packs {
            self.index.add_pack(p.pack, &p.blobs);
        }
        self.recovered.lock().expect("recovered packs").clear();
        Ok(scan.packs.len())
    }

    /// Reads a pack's header.
    pub fn read_pack_header(
        &self,
        pack: &PackId,
        size: u64,
    ) -> Result<Vec<pack_header::PackEntry>> {
        let what = format!("pack {}", pack.short());
        if size < 4 {
            return Err(Error::corrupt(what, "shorter than its header length field"));
        }
        let tail = self
            .repo
            .backend
            .read_range(FileType::Data, &pack.to_hex(), size - 4, 4)?;
        let hlen = u32::from_le_bytes(tail.try_into().expect("4 bytes")) as u64;
        if hlen + 4 > size {
            return Err(Error::corrupt(what, "header length larger than the pack"));
        }
        let sealed = self.repo.backend.read_range(
            FileType::Data,
            &pack.to_hex(),
            size - 4 - hlen,
            hlen as u32,
        )?;
        let plain = self.repo.data_key.open(ad::PACK_HEADER, &sealed, &what)?;
        pack_header::decode(&plain, size - 4 - hlen).map_err(|d| Error::corrupt(what, d))
    }
}

/// Opens a sealed blob, decodes its format byte and checks that it hashes to `id`.
pub(crate) fn decode_blob(
    key: &Key,
    kind: BlobKind,
    id: &[u8; 32],
    sealed: Vec<u8>,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>> {
    let encoded = key.open_vec(&ad::blob(kind, id), sealed, what)?;
    decode_verified(id, encoded, limit, what)
}

/// Decodes a blob's transfer encoding (at most `limit` bytes) and checks it hashes to
/// `id`.
fn decode_verified(id: &[u8; 32], encoded: Vec<u8>, limit: usize, what: &str) -> Result<Vec<u8>> {
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<zstd::bulk::Decompressor<'static>> =
            std::cell::RefCell::new(zstd::bulk::Decompressor::new().expect("zstd context"));
    }
    let plain = DECOMPRESSOR
        .with(|d| decode_encoded(&mut d.borrow_mut(), encoded, limit))
        .map_err(|e| Error::corrupt(what, e))?;
    if blake3::hash(&plain).as_bytes() != id {
        return Err(Error::corrupt(what, "content does not hash to its id"));
    }
    Ok(plain)
}

/// Lets the restorer read from the repository in-process. A blob that is not indexed,
/// or whose pack is missing, short or damaged, concerns that blob only: the restorer
/// skips what needs it and restores the rest. An I/O error of the disk ends the restore
/// rather than leave it hollow.
impl haul_protocol::restore::BlobSource for IndexedRepository {
    fn load_tree(&self, id: &TreeId) -> Result<TreeBlob, haul_protocol::restore::SourceError> {
        IndexedRepository::load_tree(self, id).map_err(source_error)
    }
    fn load_chunk(&self, id: &ChunkId) -> Result<Vec<u8>, haul_protocol::restore::SourceError> {
        IndexedRepository::load_chunk(self, id).map_err(source_error)
    }
}

fn source_error(e: Error) -> haul_protocol::restore::SourceError {
    match e {
        Error::Io { .. } => haul_protocol::restore::SourceError::new(e),
        e => haul_protocol::restore::SourceError::blob(e),
    }
}

/// Which snapshots a lookup or a listing considers (restic's `--host`, `--path`,
/// `--tag`): all that match every condition given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    pub host: Option<String>,
    /// Paths the snapshot must include (all of them).
    pub paths: Vec<String>,
    /// Tags the snapshot must carry (all of them).
    pub tags: Vec<String>,
}

impl SnapshotFilter {
    pub fn is_empty(&self) -> bool {
        self.host.is_none() && self.paths.is_empty() && self.tags.is_empty()
    }

    pub fn matches(&self, s: &Snapshot) -> bool {
        self.host.as_ref().is_none_or(|h| &s.host == h)
            && self.paths.iter().all(|p| s.paths.contains(p))
            && self.tags.iter().all(|t| s.tags.contains(t))
    }
}

impl std::fmt::Display for SnapshotFilter {
    /// `host web-1, path /etc, tag daily`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(h) = &self.host {
            parts.push(format!("host {h}"));
        }
        parts.extend(self.paths.iter().map(|p| format!("path {p}")));
        parts.extend(self.tags.iter().map(|t| format!("tag {t}")));
        f.write_str(&parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;

    #[test]
    fn a_damaged_key_file_does_not_lock_out_the_others() {
        let backend: Arc<dyn Backend> = Arc::new(MemoryBackend::default());
        let repo = Repository::init(
            backend.clone(),
            b"one",
            KdfParams::TESTS,
            RepoConfig::new(3),
        )
        .unwrap();
        let two = repo.add_key(b"two", KdfParams::TESTS).unwrap();
        // Damage whichever key is tried first, and open with the other's passphrase.
        let mut names: Vec<String> = backend
            .list(FileType::Key)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        names.sort();
        let first = names[0].clone();
        let pass: &[u8] = if first == two { b"one" } else { b"two" };
        backend.delete(FileType::Key, &first).unwrap();
        backend
            .write_once(FileType::Key, &first, b"{\"version\": 1, \"crea")
            .unwrap();
        let repo = Repository::open(backend.clone(), pass).unwrap();
        assert_ne!(repo.key_name, first);
        let keys = repo.list_keys().unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys[0].current && keys[0].damaged.is_none());
        assert_eq!(keys[1].id, first);
        assert!(keys[1].damaged.is_some() && keys[1].created.is_none());

        // A passphrase no key opens names the damaged key too.
        let err = Repository::open(backend, b"three").err().unwrap();
        match &err {
            Error::WrongPassphrase { tried: 1, broken } => assert_eq!(broken[0].name, first),
            other => panic!("{other}"),
        }
        assert!(
            err.to_string()
                .contains(&format!("could not be tried: keys/{first} (")),
            "{err}"
        );
    }
}
