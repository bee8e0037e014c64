//! A directory's names in sorted order, in bounded memory.
//!
//! The walker needs a directory's entries sorted by name (trees are), but `readdir`
//! returns them in no order. Up to [`RUN_BYTES`] of names are sorted in memory, which
//! is every directory of an ordinary host; past that, each full run is sorted and
//! written to an unnamed temporary file (gone when closed, whatever happens), and the
//! runs are merged as the walker reads them. A directory of five million files then
//! costs a run's bytes and a read buffer per run, not a quarter of a gigabyte.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::path::PathBuf;

/// Bytes of names (and their places) sorted in memory, at most.
const RUN_BYTES: usize = 8 << 20;
/// Bytes each spilled run is read ahead by, while merging.
const RUN_READ_BUFFER: usize = 64 << 10;

/// Collects names, then gives them back sorted ([`Listing::sorted`]).
pub(super) struct Listing {
    /// Names of the current run, one after another, and where each is.
    bytes: Vec<u8>,
    spans: Vec<(u32, u32)>,
    runs: Vec<File>,
    /// Where the runs go: the system's temporary directory unless set.
    spill_dir: Option<PathBuf>,
    run_bytes: usize,
}

impl Listing {
    pub(super) fn new(spill_dir: Option<PathBuf>) -> Self {
        Listing {
            bytes: Vec::new(),
            spans: Vec::new(),
            runs: Vec::new(),
            spill_dir,
            run_bytes: RUN_BYTES,
        }
    }

    #[cfg(test)]
    fn with_run_bytes(mut self, run_bytes: usize) -> Self {
        self.run_bytes = run_bytes;
        self
    }

    /// Adds a name. If a full run cannot be written out, the name is added all the
    /// same, the listing stays in memory from then on, and the error says why.
    pub(super) fn push(&mut self, name: &[u8]) -> io::Result<()> {
        let mut result = Ok(());
        if self.bytes.len() + self.spans.len() * 8 >= self.run_bytes {
            if let Err(e) = self.spill() {
                self.run_bytes = usize::MAX;
                result = Err(e);
            }
        }
        let start = self.bytes.len() as u32;
        self.bytes.extend_from_slice(name);
        self.spans.push((start, name.len() as u32));
        result
    }

    fn sort_run(&mut self) {
        let bytes = &self.bytes;
        let name = |&(s, l): &(u32, u32)| &bytes[s as usize..(s + l) as usize];
        self.spans.sort_unstable_by(|a, b| name(a).cmp(name(b)));
    }

    fn spill(&mut self) -> io::Result<()> {
        self.sort_run();
        // Sorted in place: if the file fails, the run stays as it is, in memory.
        let file = match &self.spill_dir {
            Some(dir) => tempfile::tempfile_in(dir)?,
            None => tempfile::tempfile()?,
        };
        let mut out = BufWriter::with_capacity(RUN_READ_BUFFER, file);
        for &(s, l) in &self.spans {
            out.write_all(&(l as u16).to_le_bytes())?;
            out.write_all(&self.bytes[s as usize..(s + l) as usize])?;
        }
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        file.rewind()?;
        self.runs.push(file);
        self.bytes.clear();
        self.spans.clear();
        Ok(())
    }

    /// The names in byte order. A run that cannot be read back ends the listing with
    /// the error.
    pub(super) fn sorted(mut self) -> Sorted {
        self.sort_run();
        let mut runs: Vec<Run> = self
            .runs
            .into_iter()
            .map(|f| Run::Spilled(BufReader::with_capacity(RUN_READ_BUFFER, f)))
            .collect();
        runs.push(Run::Memory {
            bytes: self.bytes,
            spans: self.spans.into_iter(),
        });
        let mut heap = BinaryHeap::with_capacity(runs.len());
        let mut failed = None;
        for (i, run) in runs.iter_mut().enumerate() {
            match run.next() {
                Ok(Some(name)) => heap.push(Reverse((name, i))),
                Ok(None) => {}
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        Sorted { runs, heap, failed }
    }
}

enum Run {
    Spilled(BufReader<File>),
    Memory {
        bytes: Vec<u8>,
        spans: std::vec::IntoIter<(u32, u32)>,
    },
}

impl Run {
    fn next(&mut self) -> io::Result<Option<Vec<u8>>> {
        match self {
            Run::Memory { bytes, spans } => Ok(spans
                .next()
                .map(|(s, l)| bytes[s as usize..(s + l) as usize].to_vec())),
            Run::Spilled(r) => {
                if r.fill_buf()?.is_empty() {
                    return Ok(None);
                }
                let mut len = [0u8; 2];
                r.read_exact(&mut len)?;
                let mut name = vec![0; u16::from_le_bytes(len) as usize];
                r.read_exact(&mut name)?;
                Ok(Some(name))
            }
        }
    }
}

/// The merge of a listing's sorted runs.
pub(super) struct Sorted {
    runs: Vec<Run>,
    heap: BinaryHeap<Reverse<(Vec<u8>, usize)>>,
    failed: Option<io::Error>,
}

impl Iterator for Sorted {
    type Item = io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            self.heap.clear();
            return Some(Err(e));
        }
        let Reverse((name, i)) = self.heap.pop()?;
        match self.runs[i].next() {
            Ok(Some(next)) => self.heap.push(Reverse((next, i))),
            Ok(None) => {}
            Err(e) => self.failed = Some(e),
        }
        Some(Ok(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<Vec<u8>> {
        // A scrambled order, as readdir gives.
        (0..n)
            .map(|i| format!("n{:07}", (i * 7_919) % n).into_bytes())
            .collect()
    }

    #[test]
    fn names_come_back_sorted_from_memory_and_from_spilled_runs() {
        for run_bytes in [usize::MAX, 1000, 64] {
            let dir = tempfile::tempdir().unwrap();
            let mut l = Listing::new(Some(dir.path().to_path_buf())).with_run_bytes(run_bytes);
            let mut all = names(10_000);
            all.push(vec![0xff, 0xfe]);
            for n in &all {
                l.push(n).unwrap();
            }
            let spilled = !l.runs.is_empty();
            assert_eq!(spilled, run_bytes != usize::MAX);
            let got: Vec<Vec<u8>> = l.sorted().map(Result::unwrap).collect();
            all.sort();
            assert_eq!(got, all);
            // The runs were unnamed files: nothing is left in the directory.
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn a_spill_directory_that_cannot_be_written_keeps_the_listing_in_memory() {
        let mut l = Listing::new(Some("/nonexistent/haul".into())).with_run_bytes(16);
        let errors = (0..10)
            .filter(|i| l.push(format!("{i}").as_bytes()).is_err())
            .count();
        assert_eq!(errors, 1, "reported once");
        let got: Vec<Vec<u8>> = l.sorted().map(Result::unwrap).collect();
        let want: Vec<Vec<u8>> = (0..10).map(|i| format!("{i}").into_bytes()).collect();
        assert_eq!(got, want);
    }
}
