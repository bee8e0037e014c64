//! A prune's records in the repository: condemnation records (`condemned/`) and
//! epoch markers (`epochs/`). See the module doc of `crate::prune` for what they mean.

use crate::backend::FileType;
use crate::error::{DamagedFile, Error, Result};
use crate::format::ad;
use crate::format::condemned::{self, Condemnation, Header};
use crate::repository::Repository;
use haul_protocol::PackId;
use std::collections::{BTreeSet, HashSet};

/// The condemnation records in the repository (without the blobs of their packs,
/// which a sweep reads one record at a time), and those that cannot be read.
#[derive(Debug, Default)]
pub struct Condemnations {
    pub records: Vec<Record>,
    pub damaged: Vec<DamagedFile>,
}

#[derive(Debug)]
pub struct Record {
    pub name: String,
    pub header: Header,
    pub packs: Vec<PackId>,
}

impl Condemnations {
    pub fn packs(&self) -> HashSet<PackId> {
        self.records
            .iter()
            .flat_map(|r| r.packs.iter().copied())
            .collect()
    }
}

impl Repository {
    /// The epoch markers' names.
    pub(crate) fn epochs(&self) -> Result<BTreeSet<String>> {
        Ok(self
            .backend()
            .list(FileType::Epoch)?
            .into_iter()
            .map(|(n, _)| n)
            .collect())
    }

    /// Writes a new epoch marker, then removes the older ones: a process that saw any
    /// other set of markers when it loaded its index sees a name it does not know.
    pub(crate) fn write_epoch(&self) -> Result<String> {
        let old = self.epochs()?;
        let sealed = self
            .data_key()
            .seal(ad::EPOCH, chrono::Utc::now().to_rfc3339().as_bytes());
        let name = blake3::hash(&sealed).to_hex().to_string();
        self.backend().write_once(FileType::Epoch, &name, &sealed)?;
        for n in old {
            match self.backend().delete(FileType::Epoch, &n) {
                Ok(()) | Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(name)
    }

    /// Every condemnation record. One that does not verify is listed as damaged: its
    /// packs are then never deleted by a sweep (which cannot read it either).
    pub fn condemnations(&self) -> Result<Condemnations> {
        let mut out = Condemnations::default();
        for (name, _) in self.backend().list(FileType::Condemned)? {
            match self.read_condemnation_summary(&name) {
                Ok((header, packs)) => out.records.push(Record {
                    name,
                    header,
                    packs,
                }),
                Err(Error::NotFound { .. }) => {}
                Err(e @ Error::Corrupt { .. }) => {
                    out.damaged
                        .push(DamagedFile::new(FileType::Condemned, &name, &e))
                }
                Err(e) => return Err(e),
            }
        }
        out.records.sort_by_key(|r| r.header.time);
        Ok(out)
    }

    /// One condemnation record, with the blobs of its packs.
    pub(crate) fn read_condemnation(&self, name: &str) -> Result<Condemnation> {
        let (plain, what) = self.open_condemnation(name)?;
        condemned::decode(&plain).map_err(|d| Error::corrupt(what, d))
    }

    /// One condemnation record's header and packs, without their blobs.
    fn read_condemnation_summary(&self, name: &str) -> Result<(Header, Vec<PackId>)> {
        let (plain, what) = self.open_condemnation(name)?;
        condemned::decode_summary(&plain).map_err(|d| Error::corrupt(what, d))
    }

    fn open_condemnation(&self, name: &str) -> Result<(Vec<u8>, String)> {
        let what = format!("condemnation record {name}");
        let sealed = self.backend().read(FileType::Condemned, name)?;
        if blake3::hash(&sealed).to_hex().as_str() != name {
            return Err(Error::corrupt(what, "content does not match its name"));
        }
        let plain = self.data_key().open_vec(ad::CONDEMNED, sealed, &what)?;
        Ok((plain, what))
    }

    pub(crate) fn write_condemnation(&self, c: &Condemnation) -> Result<String> {
        let sealed = self.data_key().seal(ad::CONDEMNED, &condemned::encode(c));
        let name = blake3::hash(&sealed).to_hex().to_string();
        self.backend()
            .write_once(FileType::Condemned, &name, &sealed)?;
        Ok(name)
    }
}
