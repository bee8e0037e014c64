//! A prune's records in the repository: condemnation records (`condemned/`) and
//! epoch markers (`epochs/`). See the module doc of `crate::prune` for what they mean.

use crate::backend::FileType;
use crate::error::{DamagedFile, Error, Result};
use crate::format::ad;
use crate::format::condemned::{self, Condemnation, Header};
use crate::repository::{read_named, write_named, Repository};
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
        let now = chrono::Utc::now().to_rfc3339();
        let name = write_named(
            self.backend().as_ref(),
            self.data_key(),
            FileType::Epoch,
            ad::EPOCH,
            now.as_bytes(),
        )?;
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
        let plain = read_named(
            self.backend().as_ref(),
            self.data_key(),
            FileType::Condemned,
            name,
            ad::CONDEMNED,
            &what,
        )?;
        Ok((plain, what))
    }

    pub(crate) fn write_condemnation(&self, c: &Condemnation) -> Result<String> {
        write_named(
            self.backend().as_ref(),
            self.data_key(),
            FileType::Condemned,
            ad::CONDEMNED,
            &condemned::encode(c),
        )
    }
}
