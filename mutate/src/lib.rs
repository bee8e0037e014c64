//! Inputs for the parsers' robustness tests: random bytes, and valid encodings
//! corrupted the way a fuzzer corrupts them.
//!
//! Every parser of untrusted or on-disk bytes has a cargo-fuzz target in `fuzz/` (see
//! `docs/fuzzing.md`), which needs nightly and runs only when someone runs it. Each
//! parser's crate therefore also has a property test, built from these strategies, that
//! runs in every `cargo test` on stable: it keeps the parser's robustness checked in CI
//! and keeps the assertions the fuzz targets make compiling.
//!
//! [`corrupted`] starts from a valid encoding and applies one to four [`Edit`]s: bit
//! flips, overwritten bytes, boundary integers written over what may be a length or a
//! count (little- and big-endian, and as LEB128 varints), truncations, deletions,
//! duplications, random insertions and pieces of a second valid encoding spliced in.
//! [`corrupted_with`] also inserts tokens of a text format (`"`, `[[`, `=` ...; [`JSON`]
//! has JSON's). [`inputs`] and [`inputs_with`] mix random bytes, valid encodings and
//! corrupted ones: what each parser's test draws from.
//!
//! The default case count (256) keeps each test well under a second; set
//! `PROPTEST_CASES` to run more, e.g. `PROPTEST_CASES=20000 cargo test -p haul-repo format`.
//!
//! ```
//! use haul_mutate::inputs;
//! use proptest::prelude::*;
//!
//! /// The parser under test: exactly two bytes, a little-endian u16.
//! fn parse(b: &[u8]) -> Option<u16> {
//!     Some(u16::from_le_bytes(b.try_into().ok()?))
//! }
//!
//! let valid = any::<u16>().prop_map(|n| n.to_le_bytes().to_vec());
//! proptest::test_runner::TestRunner::default()
//!     .run(&inputs(valid, 8), |bytes| {
//!         // No panic, and what is accepted encodes back to the same bytes.
//!         if let Some(n) = parse(&bytes) {
//!             prop_assert_eq!(n.to_le_bytes().to_vec(), bytes);
//!         }
//!         Ok(())
//!     })
//!     .unwrap();
//! ```

use proptest::prelude::*;

/// JSON's syntax and values that stress a JSON document's parser (numbers out of
/// range, lone surrogates, impossible dates), for [`corrupted_with`].
pub const JSON: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"-",
    b"1e999",
    b"18446744073709551616",
    b"-9223372036854775809",
    b"\\u0000",
    b"\\ud800",
    b"\"2026-02-30T25:61:00Z\"",
    b"\"+275760-09-13T00:00:00Z\"",
];

/// Values that parsers must not trust when they find them in a length or count field.
const BOUNDARIES: [u64; 14] = [
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    i64::MAX as u64,
    u64::MAX,
];

/// One change to an encoding. Positions are taken modulo the length the encoding has
/// when the edit applies (plus one, where the end itself is a position).
#[derive(Debug, Clone)]
pub enum Edit {
    FlipBit(usize, u8),
    SetByte(usize, u8),
    /// Writes `width` bytes (1, 2, 4 or 8) of a value, little- or big-endian.
    SetInt {
        at: usize,
        width: usize,
        value: u64,
        big_endian: bool,
    },
    /// Writes a value as a LEB128 varint.
    SetVarint(usize, u64),
    Truncate(usize),
    Remove(usize, usize),
    Duplicate(usize, usize),
    Insert(usize, Vec<u8>),
    /// Inserts the part of the second valid encoding between two positions.
    Splice(usize, usize, usize),
    /// Inserts one of the format's tokens.
    Token(usize, usize),
}

fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => proptest::sample::select(&BOUNDARIES[..]),
        1 => any::<u64>(),
        1 => 0u64..512,
    ]
}

fn edit(with_tokens: bool) -> impl Strategy<Value = Edit> {
    let i = any::<usize>;
    prop_oneof![
        (i(), 0u8..8).prop_map(|(a, b)| Edit::FlipBit(a, b)),
        (i(), any::<u8>()).prop_map(|(a, b)| Edit::SetByte(a, b)),
        (
            i(),
            proptest::sample::select(&[1usize, 2, 4, 8][..]),
            value(),
            any::<bool>()
        )
            .prop_map(|(at, width, value, big_endian)| Edit::SetInt {
                at,
                width,
                value,
                big_endian
            }),
        (i(), value()).prop_map(|(a, v)| Edit::SetVarint(a, v)),
        i().prop_map(Edit::Truncate),
        (i(), 1usize..40).prop_map(|(a, n)| Edit::Remove(a, n)),
        (i(), 1usize..40).prop_map(|(a, n)| Edit::Duplicate(a, n)),
        (i(), proptest::collection::vec(any::<u8>(), 1..16)).prop_map(|(a, b)| Edit::Insert(a, b)),
        (i(), i(), i()).prop_map(|(a, f, t)| Edit::Splice(a, f, t)),
        (i(), i(), Just(with_tokens)).prop_map(|(a, t, on)| if on {
            Edit::Token(a, t)
        } else {
            Edit::Truncate(a)
        }),
    ]
}

/// Where `at` falls in a buffer of `len` bytes, from 0 to `len` inclusive.
fn pos(at: &usize, len: usize) -> usize {
    at % (len + 1)
}

/// Applies `edit` to `bytes`; `other` is a second valid encoding, `tokens` the format's.
pub fn apply(bytes: &mut Vec<u8>, edit: &Edit, other: &[u8], tokens: &[&[u8]]) {
    let len = bytes.len();
    match edit {
        Edit::FlipBit(at, bit) if len > 0 => bytes[at % len] ^= 1 << bit,
        Edit::SetByte(at, b) if len > 0 => bytes[at % len] = *b,
        Edit::SetInt {
            at,
            width,
            value,
            big_endian,
        } => {
            let le = value.to_le_bytes();
            let mut v = le[..*width].to_vec();
            if *big_endian {
                v.reverse();
            }
            overwrite(bytes, pos(at, len), &v);
        }
        Edit::SetVarint(at, value) => {
            let mut v = Vec::new();
            let mut x = *value;
            while x >= 0x80 {
                v.push(x as u8 | 0x80);
                x >>= 7;
            }
            v.push(x as u8);
            overwrite(bytes, pos(at, len), &v);
        }
        Edit::Truncate(at) => bytes.truncate(pos(at, len)),
        Edit::Remove(at, n) => {
            let start = pos(at, len);
            bytes.drain(start..(start + n).min(len));
        }
        Edit::Duplicate(at, n) => {
            let start = pos(at, len);
            let piece = bytes[start..(start + n).min(len)].to_vec();
            splice_in(bytes, start, &piece);
        }
        Edit::Insert(at, piece) => splice_in(bytes, pos(at, len), piece),
        Edit::Splice(at, from, to) => {
            let (a, b) = (pos(from, other.len()), pos(to, other.len()));
            splice_in(bytes, pos(at, len), &other[a.min(b)..a.max(b)]);
        }
        Edit::Token(at, which) if !tokens.is_empty() => {
            splice_in(bytes, pos(at, len), tokens[which % tokens.len()])
        }
        _ => {}
    }
}

fn overwrite(bytes: &mut Vec<u8>, at: usize, v: &[u8]) {
    let end = (at + v.len()).min(bytes.len());
    bytes.splice(at..end, v.iter().copied());
}

fn splice_in(bytes: &mut Vec<u8>, at: usize, piece: &[u8]) {
    bytes.splice(at..at, piece.iter().copied());
}

/// Up to `max_len` random bytes.
pub fn random_bytes(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..=max_len)
}

/// A valid encoding from `valid` with one to four edits applied.
pub fn corrupted<S>(valid: S) -> BoxedStrategy<Vec<u8>>
where
    S: Strategy<Value = Vec<u8>> + 'static,
{
    corrupted_with(valid, &[])
}

/// [`corrupted`], with edits that also insert `tokens` (the syntax of a text format).
pub fn corrupted_with<S>(valid: S, tokens: &'static [&'static [u8]]) -> BoxedStrategy<Vec<u8>>
where
    S: Strategy<Value = Vec<u8>> + 'static,
{
    let valid = valid.boxed();
    (
        valid.clone(),
        valid,
        proptest::collection::vec(edit(!tokens.is_empty()), 1..=4),
    )
        .prop_map(move |(mut bytes, other, edits)| {
            for e in &edits {
                apply(&mut bytes, e, &other, tokens);
            }
            bytes
        })
        .boxed()
}

/// Random bytes (a quarter of the cases), valid encodings (an eighth) and corrupted
/// ones (the rest): what a parser's robustness test feeds it.
pub fn inputs<S>(valid: S, max_random: usize) -> BoxedStrategy<Vec<u8>>
where
    S: Strategy<Value = Vec<u8>> + 'static,
{
    inputs_with(valid, max_random, &[])
}

/// [`inputs`], with a text format's tokens.
pub fn inputs_with<S>(
    valid: S,
    max_random: usize,
    tokens: &'static [&'static [u8]],
) -> BoxedStrategy<Vec<u8>>
where
    S: Strategy<Value = Vec<u8>> + 'static,
{
    let valid = valid.boxed();
    prop_oneof![
        2 => random_bytes(max_random),
        1 => valid.clone(),
        5 => corrupted_with(valid, tokens),
    ]
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    #[test]
    fn edits_change_the_input_and_stay_in_bounds() {
        let valid = Just(b"HPK1\x02\x00\x00\x00abcdefgh".to_vec());
        let mut runner = TestRunner::deterministic();
        let s = corrupted_with(valid, &[b"[[", b"\""]);
        let mut changed = 0;
        for _ in 0..500 {
            let v = s.new_tree(&mut runner).unwrap().current();
            changed += usize::from(v != b"HPK1\x02\x00\x00\x00abcdefgh");
        }
        // Some edits are no-ops (a truncation at the end, a removal at the end).
        assert!(changed > 400, "{changed} of 500 changed");
    }

    #[test]
    fn each_edit_does_what_it_says() {
        let mut v = b"abcdef".to_vec();
        apply(&mut v, &Edit::FlipBit(0, 0), b"", &[]);
        assert_eq!(v, b"`bcdef");
        let mut v = b"abcdef".to_vec();
        apply(
            &mut v,
            &Edit::SetInt {
                at: 1,
                width: 2,
                value: 0x0102,
                big_endian: true,
            },
            b"",
            &[],
        );
        assert_eq!(v, b"a\x01\x02def");
        let mut v = b"ab".to_vec();
        apply(&mut v, &Edit::SetVarint(0, 300), b"", &[]);
        assert_eq!(v, b"\xac\x02");
        let mut v = b"abcdef".to_vec();
        apply(&mut v, &Edit::Splice(0, 1, 3), b"xyzw", &[]);
        assert_eq!(v, b"yzabcdef");
        let mut v = b"abc".to_vec();
        apply(&mut v, &Edit::Token(3, 0), b"", &[b"[["]);
        assert_eq!(v, b"abc[[");
    }
}
