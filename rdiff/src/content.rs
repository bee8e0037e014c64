//! File contents while they are rebuilt, in bounded memory: a version up to
//! [`INLINE_LIMIT`] bytes is held in memory, a larger one spills into an unnamed
//! temporary file (`$TMPDIR`, removed when dropped). librsync deltas (`.diff` increments)
//! are applied streaming: the delta is read once, front to back, and its copy commands
//! read the base by offset, so neither the base, the delta nor the result has to fit
//! in memory. `fast_rsync` applies deltas only between in-memory buffers; this applier
//! is checked against it in the tests.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;

/// Versions up to this size are rebuilt in memory.
pub const INLINE_LIMIT: usize = 16 << 20;

/// One version of a file's content.
#[derive(Debug)]
pub enum Content {
    Bytes(Vec<u8>),
    File { file: File, len: u64 },
}

impl Content {
    /// The content of `file` (`len` bytes long): read into memory when it is small.
    pub fn of_file(file: File, len: u64) -> io::Result<Content> {
        if len <= INLINE_LIMIT as u64 {
            let mut buf = Vec::with_capacity(len as usize);
            (&file).take(len + 1).read_to_end(&mut buf)?;
            return Ok(Content::Bytes(buf));
        }
        Ok(Content::File { file, len })
    }

    /// The content read from `r` to its end, spilled to a temporary file if large.
    pub fn read_from(mut r: impl Read) -> io::Result<Content> {
        let mut out = Spill::default();
        io::copy(&mut r, &mut out)?;
        out.finish()
    }

    pub fn len(&self) -> u64 {
        match self {
            Content::Bytes(b) => b.len() as u64,
            Content::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A reader of the whole content, from its start.
    pub fn reader(&self) -> ContentReader<'_> {
        ContentReader {
            content: self,
            pos: 0,
        }
    }

    /// Fills `buf` from offset `off`.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self {
            Content::Bytes(b) => {
                let start = usize::try_from(off).map_err(|_| past_end())?;
                let end = start.checked_add(buf.len()).ok_or_else(past_end)?;
                buf.copy_from_slice(b.get(start..end).ok_or_else(past_end)?);
                Ok(())
            }
            Content::File { file, .. } => file.read_exact_at(buf, off),
        }
    }
}

fn past_end() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end")
}

/// Reads a [`Content`] front to back.
pub struct ContentReader<'a> {
    content: &'a Content,
    pos: u64,
}

impl Read for ContentReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.content.len() - self.pos;
        let n = (buf.len() as u64).min(left) as usize;
        let n = match self.content {
            Content::Bytes(b) => {
                let start = self.pos as usize;
                buf[..n].copy_from_slice(&b[start..start + n]);
                n
            }
            Content::File { file, .. } => match file.read_at(&mut buf[..n], self.pos)? {
                // The file shrank under us: an error, never a short content.
                0 if n > 0 => return Err(past_end()),
                got => got,
            },
        };
        self.pos += n as u64;
        Ok(n)
    }
}

/// A writer that keeps up to [`INLINE_LIMIT`] bytes in memory, then moves everything
/// to an unnamed temporary file.
#[derive(Default)]
pub struct Spill {
    mem: Vec<u8>,
    file: Option<BufWriter<File>>,
    len: u64,
}

impl Write for Spill {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.file.is_none() && self.mem.len() + data.len() > INLINE_LIMIT {
            let mut f = BufWriter::with_capacity(1 << 20, tempfile::tempfile()?);
            f.write_all(&self.mem)?;
            self.mem = Vec::new();
            self.file = Some(f);
        }
        match &mut self.file {
            Some(f) => f.write_all(data)?,
            None => self.mem.extend_from_slice(data),
        }
        self.len += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.file {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Spill {
    pub fn finish(self) -> io::Result<Content> {
        match self.file {
            None => Ok(Content::Bytes(self.mem)),
            Some(f) => Ok(Content::File {
                file: f.into_inner().map_err(|e| e.into_error())?,
                len: self.len,
            }),
        }
    }
}

const DELTA_MAGIC: u32 = 0x7273_0236;
const WIDTHS: [usize; 4] = [1, 2, 4, 8];

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn read_be(delta: &mut impl Read, width: usize, what: &str) -> io::Result<u64> {
    let mut b = [0u8; 8];
    delta
        .read_exact(&mut b[8 - width..])
        .map_err(|_| bad(format!("the delta ends inside {what}")))?;
    Ok(u64::from_be_bytes(b))
}

/// Applies the librsync delta read from `delta` to `base` and returns the result.
/// Errors say what in the delta is wrong (bad magic, truncated, a copy outside the
/// base, an unknown command, data after the end).
pub fn apply(base: &Content, mut delta: impl Read) -> io::Result<Content> {
    let magic = read_be(&mut delta, 4, "the magic number")? as u32;
    if magic != DELTA_MAGIC {
        return Err(bad(format!(
            "not a librsync delta (magic {magic:#010x}, expected {DELTA_MAGIC:#010x})"
        )));
    }
    let mut out = Spill::default();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let op = read_be(&mut delta, 1, "a command")? as u8;
        match op {
            0 => {
                let mut rest = [0u8; 1];
                if delta.read(&mut rest)? != 0 {
                    return Err(bad("data after the delta's end command".into()));
                }
                out.flush()?;
                return out.finish();
            }
            0x01..=0x44 => {
                let len = if op <= 0x40 {
                    u64::from(op)
                } else {
                    read_be(
                        &mut delta,
                        WIDTHS[usize::from(op - 0x41)],
                        "a literal length",
                    )?
                };
                let copied = io::copy(&mut (&mut delta).take(len), &mut out)?;
                if copied != len {
                    return Err(bad(format!(
                        "the delta ends inside a literal of {len} bytes"
                    )));
                }
            }
            0x45..=0x54 => {
                let i = usize::from(op - 0x45);
                let off = read_be(&mut delta, WIDTHS[i / 4], "a copy offset")?;
                let len = read_be(&mut delta, WIDTHS[i % 4], "a copy length")?;
                if len == 0 || off.checked_add(len).is_none_or(|end| end > base.len()) {
                    return Err(bad(format!(
                        "a copy of {len} bytes at {off} from a base of {} bytes",
                        base.len()
                    )));
                }
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(buf.len() as u64) as usize;
                    base.read_exact_at(&mut buf[..n], off + done)?;
                    out.write_all(&buf[..n])?;
                    done += n as u64;
                }
            }
            _ => return Err(bad(format!("unknown delta command {op:#04x}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes_of(c: &Content) -> Vec<u8> {
        let mut v = Vec::new();
        c.reader().read_to_end(&mut v).unwrap();
        v
    }

    fn delta_of(base: &[u8], new: &[u8], block: u32) -> Vec<u8> {
        let sig = fast_rsync::Signature::calculate(
            base,
            fast_rsync::SignatureOptions {
                block_size: block,
                crypto_hash_size: 8,
            },
        );
        let mut delta = Vec::new();
        fast_rsync::diff(&sig.index(), new, &mut delta).unwrap();
        delta
    }

    proptest! {
        #[test]
        fn applies_like_fast_rsync(
            base in proptest::collection::vec(0u8..4, 0..5000),
            edits in proptest::collection::vec((0usize..5000, 0usize..300, proptest::collection::vec(any::<u8>(), 0..200)), 0..6),
            block in 16u32..256,
        ) {
            let mut new = base.clone();
            for (at, cut, ins) in edits {
                let at = at.min(new.len());
                let end = (at + cut).min(new.len());
                new.splice(at..end, ins);
            }
            let delta = delta_of(&base, &new, block);
            let mut want = Vec::new();
            fast_rsync::apply(&base, &delta, &mut want).unwrap();
            prop_assert_eq!(&want, &new);
            let got = apply(&Content::Bytes(base), &delta[..]).unwrap();
            prop_assert_eq!(bytes_of(&got), new);
        }
    }

    /// Deltas fast_rsync makes between small related buffers, with their base.
    fn arb_delta() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            proptest::collection::vec(0u8..4, 0..300),
            proptest::collection::vec(any::<u8>(), 0..40),
            any::<proptest::sample::Index>(),
        )
            .prop_map(|(base, ins, at)| {
                let mut new = base.clone();
                let at = at.index(new.len() + 1);
                new.splice(at..at, ins);
                let delta = delta_of(&base, &new, 16);
                (base, delta)
            })
    }

    proptest! {
        /// The stable counterpart of the `rdiff_delta` fuzz target (docs/fuzzing.md):
        /// a delta we apply, fast_rsync applies to the same result.
        #[test]
        fn hostile_deltas_are_refused_or_applied_as_fast_rsync_applies_them(
            (base, delta) in arb_delta().prop_flat_map(|(base, delta)| {
                (Just(base), haul_mutate::inputs(Just(delta), 60))
            }),
        ) {
            if let Ok(out) = apply(&Content::Bytes(base.clone()), &delta[..]) {
                let mut theirs = Vec::new();
                prop_assert!(fast_rsync::apply(&base, &delta, &mut theirs).is_ok());
                prop_assert_eq!(bytes_of(&out), theirs);
            }
        }
    }

    #[test]
    fn a_large_version_spills_to_a_file_and_reads_back() {
        let base: Vec<u8> = (0..INLINE_LIMIT as u32 / 2 + 1000)
            .flat_map(|i| i.to_le_bytes())
            .collect();
        let mut new = base.clone();
        new.splice(1000..1000, b"inserted".iter().copied());
        new.extend_from_slice(&base[..4096]);
        let delta = delta_of(&base, &new, 2048);
        let based = Content::read_from(&base[..]).unwrap();
        assert!(matches!(based, Content::File { .. }), "a large base spills");
        let got = apply(&based, &delta[..]).unwrap();
        assert!(matches!(got, Content::File { .. }));
        assert_eq!(got.len(), new.len() as u64);
        assert!(bytes_of(&got) == new);
    }

    #[test]
    fn a_file_that_shrinks_while_read_is_an_error_not_a_short_content() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; INLINE_LIMIT + 4096]).unwrap();
        let c = Content::of_file(f.try_clone().unwrap(), INLINE_LIMIT as u64 + 4096).unwrap();
        assert!(matches!(c, Content::File { .. }));
        f.set_len(100).unwrap();
        let e = c.reader().read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn bad_deltas_are_refused_with_what_is_wrong() {
        let base = Content::Bytes(b"0123456789".to_vec());
        let cases: [(&[u8], &str); 6] = [
            (b"\x72\x73\x01\x36\x00", "not a librsync delta"),
            (b"\x72\x73\x02\x36", "ends inside a command"),
            (
                b"\x72\x73\x02\x36\x05ab",
                "ends inside a literal of 5 bytes",
            ),
            (
                b"\x72\x73\x02\x36\x45\x08\x05\x00",
                "a copy of 5 bytes at 8 from a base of 10 bytes",
            ),
            (b"\x72\x73\x02\x36\x60\x00", "unknown delta command 0x60"),
            (
                b"\x72\x73\x02\x36\x00x",
                "data after the delta's end command",
            ),
        ];
        for (delta, want) in cases {
            let e = apply(&base, delta).unwrap_err();
            assert!(e.to_string().contains(want), "{delta:?}: {e}");
        }
        let ok = apply(&base, &b"\x72\x73\x02\x36\x02hi\x45\x02\x03\x00"[..]).unwrap();
        assert_eq!(bytes_of(&ok), b"hi234");
    }
}
