//! Copies to another pbs (`copy --to pbs:NAME`): a [`CopyTarget`] that speaks the
//! receive mode of that pbs's repository server (`server::receive`) over SSH
//! ([`ReceiveChannel`]). Blobs go in upload bodies of up to [`BODY`] bytes, filled by
//! the copy's threads while the one before is on its way; the target verifies each
//! against its id, seals it with its own key, and writes the copy's snapshot only once
//! everything below its root arrived.

use crate::server::receive::{self, Have, HaveAsk, ReceiveCommit, ReceiveCommitted, ReceiveStart};
use crate::transport::ssh::receive::ReceiveChannel;
use bytes::Bytes;
use haul_protocol::wire::{self, ErrorBody, UploadDone};
use haul_protocol::{BlobKind, BlobRef, SnapshotId};
use haul_repo::copy::{CopySession, CopyTarget};
use haul_repo::format::snapshot::Snapshot;
use haul_repo::{Error, Result};
use std::sync::Mutex;

/// Upload bodies are sent once they hold this many bytes (one blob may make it more).
const BODY: usize = 8 << 20;

/// Another pbs, receiving.
pub struct RemoteTarget {
    channel: ReceiveChannel,
    name: String,
}

impl RemoteTarget {
    /// Connects to `remote` and starts its forced command.
    pub fn open(remote: &haul_config::RemotePbs) -> std::result::Result<RemoteTarget, String> {
        let channel = ReceiveChannel::open(&remote.ssh_host()).map_err(|e| e.message)?;
        Ok(RemoteTarget {
            channel,
            name: format!("{}{}", haul_config::REMOTE_PREFIX, remote.name),
        })
    }

    /// Ends the receiving command and the connection.
    pub fn close(self) {
        self.channel.close();
    }

    /// POSTs `body` to `path`; a refusal is the target's code and words.
    fn post(&self, path: &str, what: &str, body: Bytes) -> Result<Bytes> {
        let answer = self.channel.post(path, body).map_err(Error::Remote)?;
        if answer.status.is_success() {
            return Ok(answer.body);
        }
        let said = match serde_json::from_slice::<ErrorBody>(&answer.body) {
            Ok(e) => format!("{} ({})", e.error.message, e.error.code),
            Err(_) => format!(
                "HTTP {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)])
            ),
        };
        Err(Error::Remote(format!(
            "{} refused {what}: {said}",
            self.name
        )))
    }

    fn json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
        body: &impl serde::Serialize,
    ) -> Result<T> {
        let body = serde_json::to_vec(body).expect("a request serializes");
        let answer = self.post(path, what, body.into())?;
        serde_json::from_slice(&answer).map_err(|e| {
            Error::Remote(format!(
                "{} answered {what} with something else than expected: {e}",
                self.name
            ))
        })
    }
}

impl CopyTarget for RemoteTarget {
    fn copies_of(&self, snapshots: &[(SnapshotId, Snapshot)]) -> Result<Vec<Option<SnapshotId>>> {
        let mut copies = Vec::with_capacity(snapshots.len());
        for part in snapshots.chunks(receive::MAX_HAVE) {
            let have: Have = self.json(
                receive::HAVE,
                "the question which snapshots it has",
                &HaveAsk {
                    snapshots: part.to_vec(),
                },
            )?;
            if have.copies.len() != part.len() {
                return Err(Error::Remote(format!(
                    "{} answered for {} snapshots when asked about {}",
                    self.name,
                    have.copies.len(),
                    part.len()
                )));
            }
            copies.extend(have.copies);
        }
        Ok(copies)
    }

    fn start(
        &self,
        snapshot: &Snapshot,
        parent_original: Option<SnapshotId>,
    ) -> Result<Box<dyn CopySession + '_>> {
        let started: receive::ReceiveStarted = self.json(
            receive::START,
            "the session",
            &ReceiveStart {
                host: snapshot.host.clone(),
                paths: snapshot.paths.clone(),
                tags: snapshot.tags.clone(),
                parent_original,
            },
        )?;
        Ok(Box::new(RemoteSession {
            target: self,
            body: BODY.min(started.max_upload_body as usize),
            pending: Mutex::default(),
            sending: Mutex::new(()),
        }))
    }
}

/// Frames not sent yet, and what their blobs decompress to.
#[derive(Default)]
struct Pending {
    frames: Vec<u8>,
    plain: u64,
}

struct RemoteSession<'t> {
    target: &'t RemoteTarget,
    body: usize,
    pending: Mutex<Pending>,
    /// Held by the thread sending a body (one request at a time on the channel).
    sending: Mutex<()>,
}

impl RemoteSession<'_> {
    /// Sends what is pending, if `due` says so once this thread may send.
    fn send_if(&self, due: impl Fn(&Pending) -> bool) -> Result<()> {
        let _sending = self.sending.lock().expect("sending");
        let frames = {
            let mut p = self.pending.lock().expect("pending");
            if p.frames.is_empty() || !due(&p) {
                return Ok(());
            }
            std::mem::take(&mut *p).frames
        };
        let answer = self
            .target
            .post("/v1/backup/upload", "an upload", frames.into())?;
        let _: UploadDone = serde_json::from_slice(&answer).map_err(|e| {
            Error::Remote(format!(
                "{} answered an upload oddly: {e}",
                self.target.name
            ))
        })?;
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.send_if(|_| true)
    }
}

impl CopySession for RemoteSession<'_> {
    fn missing(&self, refs: &[BlobRef]) -> Result<Vec<BlobRef>> {
        // What is pending must be there before the target is asked what it lacks.
        self.flush()?;
        let mut missing = Vec::new();
        for part in refs.chunks(wire::MAX_REFS_PER_REQUEST) {
            let mut body = Vec::with_capacity(part.len() * wire::REF_LEN);
            for r in part {
                wire::encode_ref(&mut body, r);
            }
            let answer = self.target.post(
                "/v1/backup/missing",
                "the question which blobs it lacks",
                body.into(),
            )?;
            missing.extend(wire::decode_refs(&answer).map_err(|e| {
                Error::Remote(format!(
                    "{} answered which blobs it lacks: {e}",
                    self.target.name
                ))
            })?);
        }
        Ok(missing)
    }

    fn add(&self, kind: BlobKind, id: &[u8; 32], encoded: Vec<u8>) -> Result<bool> {
        let plain = haul_protocol::chunker::declared_plain_len(&encoded)
            .unwrap_or(haul_protocol::chunker::ChunkerParams::with_seed(0).max_size as u64);
        let fits = |p: &Pending| {
            p.frames.is_empty()
                || (p.frames.len() + wire::FRAME_HEADER_LEN + encoded.len() <= self.body
                    && p.plain + plain <= wire::MAX_UPLOAD_PLAIN)
        };
        loop {
            {
                let mut p = self.pending.lock().expect("pending");
                if fits(&p) {
                    let r = BlobRef { kind, id: *id };
                    wire::encode_frame_header(&mut p.frames, &r, encoded.len() as u32);
                    p.frames.extend_from_slice(&encoded);
                    p.plain += plain;
                    return Ok(true);
                }
            }
            // Full: this thread sends it (or waits while another does), then adds.
            self.send_if(|p| !fits(p))?;
        }
    }

    fn commit(self: Box<Self>, copy: Snapshot) -> Result<(SnapshotId, u64)> {
        self.flush()?;
        let committed: ReceiveCommitted = self.target.json(
            receive::COMMIT,
            "the snapshot",
            &ReceiveCommit {
                time: copy.time,
                tree: copy.tree,
                source: copy.source,
                summary: copy.summary,
                original: copy.original.expect("a copy names its original"),
            },
        )?;
        Ok((committed.snapshot, committed.bytes_stored))
    }

    fn abandon(self: Box<Self>) {
        if let Err(e) =
            self.target
                .post("/v1/backup/abandon", "the end of the session", Bytes::new())
        {
            tracing::debug!("ending the copy's session: {e}");
        }
    }
}
