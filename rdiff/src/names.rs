//! Names in an rdiff-backup repository: session timestamps, increment file names and
//! the `chars_to_quote` quoting of every on-disk name (`docs/reference/
//! rdiff-backup-format.md` §2.2, §2.3, §2.8).

use crate::Error;

/// A session time: the raw timestring (unquoted) and its epoch, computed as
/// rdiff-backup computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Time {
    pub epoch: i64,
    pub raw: String,
}

/// Parses a timestring the way rdiff-backup's `stringtotime` does: the first 19
/// characters split on `T`, `:` and `-` into six fields, read as UTC, plus
/// `-60 * (60 * HH + MM)` for an offset `±HH:MM` (or `±HH-MM`), where `HH` keeps its
/// sign and `MM` does not. That reproduces rdiff-backup ≤ 2.2, which writes −03:30 as
/// `-04:30` and reads it back right.
pub fn parse_time(s: &str) -> Option<Time> {
    if s.len() < 20 || !s.is_char_boundary(19) {
        return None;
    }
    let (date, zone) = s.split_at(19);
    let f: Vec<i64> = date
        .split(['T', ':', '-'])
        .map(|p| p.parse::<i64>().ok())
        .collect::<Option<_>>()?;
    let [y, mo, d, h, mi, se] = f[..] else {
        return None;
    };
    let valid = 1900 < y
        && y < 2100
        && (1..=12).contains(&mo)
        && (1..=31).contains(&d)
        && (0..=23).contains(&h)
        && (0..=59).contains(&mi)
        && (0..=61).contains(&se);
    if !valid {
        return None;
    }
    let offset = if zone == "Z" {
        0
    } else {
        let b = zone.as_bytes();
        if b.len() != 6 || !matches!(b[0], b'+' | b'-') || !matches!(b[3], b':' | b'-') {
            return None;
        }
        let hh: i64 = zone[..3].parse().ok()?;
        let mm: i64 = zone[4..].parse().ok()?;
        -60 * (60 * hh + mm)
    };
    Some(Time {
        epoch: days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se + offset,
        raw: s.to_string(),
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What an increment (or a bookkeeping file) records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncKind {
    Snapshot,
    Diff,
    Missing,
    Dir,
    Data,
}

/// A parsed increment name: `<base>.<timestring>.<kind>[.gz]`, base and time unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncName {
    pub base: Vec<u8>,
    pub time: Time,
    pub kind: IncKind,
    pub gz: bool,
}

/// Parses an (unquoted) increment name from the right, as rdiff-backup does, so that a
/// name which itself looks like an increment keeps its whole base.
pub fn parse_inc(name: &[u8]) -> Option<IncName> {
    let parts: Vec<&[u8]> = name.split(|b| *b == b'.').collect();
    let gz = parts.last() == Some(&&b"gz"[..]);
    let need = if gz { 4 } else { 3 };
    if parts.len() < need {
        return None;
    }
    let end = parts.len() - usize::from(gz);
    let kind = match parts[end - 1] {
        b"snapshot" => IncKind::Snapshot,
        b"diff" => IncKind::Diff,
        b"missing" => IncKind::Missing,
        b"dir" => IncKind::Dir,
        b"data" => IncKind::Data,
        _ => return None,
    };
    let time = parse_time(std::str::from_utf8(parts[end - 2]).ok()?)?;
    Some(IncName {
        base: parts[..end - 2].join(&b'.'),
        time,
        kind,
        gz,
    })
}

/// Whether `name` is a DOS device name, perhaps with an extension: rdiff-backup's
/// `^(aux|prn|con|nul|com[0-9]|lpt[1-9])(\..*)*$`, case-insensitive (`.` does not
/// match a newline).
fn is_dos_device(name: &[u8]) -> bool {
    let lower = name.to_ascii_lowercase();
    let stem = match lower.get(..3) {
        Some(b"aux" | b"prn" | b"con" | b"nul") => 3,
        Some(b"com") if lower.get(3).is_some_and(u8::is_ascii_digit) => 4,
        Some(b"lpt") if lower.get(3).is_some_and(|b| (b'1'..=b'9').contains(b)) => 4,
        _ => return false,
    };
    // Python's `$` also matches before one final newline.
    let rest = &lower[stem..];
    let rest = rest.strip_suffix(b"\n").unwrap_or(rest);
    rest.is_empty() || (rest[0] == b'.' && !rest.contains(&b'\n'))
}

/// The repository's `chars_to_quote`: which bytes of on-disk names are written `;NNN`.
#[derive(Debug, Clone)]
pub struct Quoting {
    quoted: [bool; 256],
    active: bool,
    /// `special_escapes` (§2.8): a trailing space or `.` is quoted too.
    trailing: bool,
    /// `special_escapes`: the first byte of a DOS device name (`aux`, `prn`, `con`,
    /// `nul`, `com0`-`com9`, `lpt1`-`lpt9`, with any extension) is quoted.
    dos_devices: bool,
}

impl Quoting {
    pub fn none() -> Quoting {
        Quoting {
            quoted: [false; 256],
            active: false,
            trailing: false,
            dos_devices: false,
        }
    }

    /// Adds the escapes named in `special_escapes` (one per line). They apply only
    /// when quoting is active, as in rdiff-backup. Unknown lines are refused.
    pub fn with_special_escapes(mut self, text: &[u8]) -> Result<Quoting, Error> {
        for line in text.split(|&b| b == b'\n').map(|l| l.trim_ascii()) {
            match line {
                b"" => {}
                b"escape_trailing_spaces" => self.trailing = true,
                b"escape_dos_devices" => self.dos_devices = true,
                other => {
                    return Err(Error::Format(format!(
                        "special_escapes: unknown escape {:?}",
                        String::from_utf8_lossy(other)
                    )))
                }
            }
        }
        Ok(self)
    }

    /// From the contents of `chars_to_quote`: a regex character class (ranges `a-z`,
    /// escapes `\\x` and octal `\NNN`). `;` is quoted whenever anything is.
    pub fn parse(class: &[u8]) -> Result<Quoting, Error> {
        let class = class.strip_suffix(b"\n").unwrap_or(class);
        let mut q = Quoting::none();
        if class.is_empty() {
            return Ok(q);
        }
        let mut chars = Vec::new();
        let mut i = 0;
        while i < class.len() {
            if class[i] == b'\\' && i + 1 < class.len() {
                let octal = class[i + 1..]
                    .iter()
                    .take(3)
                    .take_while(|b| (b'0'..=b'7').contains(b))
                    .count();
                if octal == 3 {
                    let v = u32::from_str_radix(
                        std::str::from_utf8(&class[i + 1..i + 4]).expect("digits"),
                        8,
                    )
                    .map_err(|_| {
                        Error::Format(format!(
                            "chars_to_quote: bad escape in {:?}",
                            String::from_utf8_lossy(class)
                        ))
                    })?;
                    chars.push((v & 0xff) as u8);
                    i += 4;
                } else {
                    chars.push(class[i + 1]);
                    i += 2;
                }
            } else {
                chars.push(class[i]);
                i += 1;
            }
        }
        // Ranges: `a-z` (a `-` first or last is literal).
        let mut j = 0;
        while j < chars.len() {
            if j + 2 < chars.len() && chars[j + 1] == b'-' {
                for b in chars[j]..=chars[j + 2] {
                    q.quoted[b as usize] = true;
                }
                j += 3;
            } else {
                q.quoted[chars[j] as usize] = true;
                j += 1;
            }
        }
        q.quoted[b';' as usize] = true;
        q.active = true;
        Ok(q)
    }

    /// A name as it is stored on disk.
    pub fn quote(&self, name: &[u8]) -> Vec<u8> {
        if !self.active {
            return name.to_vec();
        }
        let mut out = Vec::with_capacity(name.len());
        for &b in name {
            if self.quoted[b as usize] {
                out.extend_from_slice(format!(";{b:03}").as_bytes());
            } else {
                out.push(b);
            }
        }
        if self.trailing {
            if let Some(&last @ (b' ' | b'.')) = out.last() {
                out.pop();
                out.extend_from_slice(format!(";{last:03}").as_bytes());
            }
        }
        if self.dos_devices && is_dos_device(&out) {
            let first = out[0];
            out.splice(0..1, format!(";{first:03}").into_bytes());
        }
        out
    }

    /// A name as it was on the source: `;NNN` back to one byte.
    pub fn unquote(&self, name: &[u8]) -> Vec<u8> {
        if !self.active {
            return name.to_vec();
        }
        let mut out = Vec::with_capacity(name.len());
        let mut i = 0;
        while i < name.len() {
            if name[i] == b';'
                && i + 3 < name.len()
                && name[i + 1..i + 4].iter().all(u8::is_ascii_digit)
            {
                let v: u32 = std::str::from_utf8(&name[i + 1..i + 4])
                    .expect("digits")
                    .parse()
                    .expect("digits");
                out.push((v & 0xff) as u8);
                i += 4;
            } else {
                out.push(name[i]);
                i += 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_word(kind: IncKind) -> &'static str {
        match kind {
            IncKind::Snapshot => "snapshot",
            IncKind::Diff => "diff",
            IncKind::Missing => "missing",
            IncKind::Dir => "dir",
            IncKind::Data => "data",
        }
    }

    /// Increment names, timestrings and `chars_to_quote` classes.
    fn arb_name() -> impl Strategy<Value = Vec<u8>> {
        (
            "[a-z.;]{0,6}",
            (
                1901i64..2100,
                1i64..13,
                1i64..32,
                0i64..24,
                0i64..60,
                0i64..62,
            ),
            proptest::sample::select(&["Z", "+01:00", "-04:30", "+02-00"][..]),
            proptest::sample::select(&["snapshot", "diff", "missing", "dir", "data"][..]),
            any::<bool>(),
        )
            .prop_map(|(base, (y, mo, d, h, mi, s), zone, kind, gz)| {
                let gz = if gz { ".gz" } else { "" };
                format!("{base}.{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{zone}.{kind}{gz}")
                    .into_bytes()
            })
    }

    const TOKENS: &[&[u8]] = &[
        b".",
        b"-",
        b":",
        b"T",
        b"+",
        b"Z",
        b".gz",
        b".diff",
        b";",
        b";059",
        b"\\",
        b"\\073",
        b"\xc3\xa9",
    ];

    proptest! {
        /// The stable counterpart of the `rdiff_names` fuzz target (docs/fuzzing.md): a
        /// parsed increment name is its parts joined again.
        #[test]
        fn hostile_increment_names_are_refused_or_their_parts(
            name in haul_mutate::inputs_with(arb_name(), 60, TOKENS),
        ) {
            if let Some(t) = std::str::from_utf8(&name).ok().and_then(parse_time) {
                prop_assert_eq!(t.raw.as_bytes(), &name[..]);
            }
            if let Some(n) = parse_inc(&name) {
                let mut again = n.base.clone();
                again.extend_from_slice(format!(".{}.{}", n.time.raw, kind_word(n.kind)).as_bytes());
                if n.gz {
                    again.extend_from_slice(b".gz");
                }
                prop_assert_eq!(again, name);
                prop_assert!((-2_200_000_000..4_200_000_000).contains(&n.time.epoch));
            }
        }

        /// Whatever `chars_to_quote` and `special_escapes` say, a quoted name unquotes
        /// to itself.
        #[test]
        fn quoted_names_unquote_to_themselves(
            class in haul_mutate::inputs_with(Just(b"A-Z:\\\\\\073".to_vec()), 12, TOKENS),
            dos in any::<bool>(),
            trailing in any::<bool>(),
            name in haul_mutate::inputs_with(Just(b"Con.TXT ;0a ".to_vec()), 16, TOKENS),
        ) {
            let escapes = [
                if dos { &b"escape_dos_devices\n"[..] } else { b"" },
                if trailing { b"escape_trailing_spaces\n" } else { b"" },
            ]
            .concat();
            if let Ok(q) = Quoting::parse(&class).and_then(|q| q.with_special_escapes(&escapes)) {
                let _ = q.unquote(&name);
                prop_assert_eq!(q.unquote(&q.quote(&name)), name);
            }
        }
    }

    #[test]
    fn timestrings_parse_as_rdiff_backup_parses_them() {
        assert_eq!(
            parse_time("2024-03-29T12:00:00+01:00").unwrap().epoch,
            1_711_710_000
        );
        assert_eq!(
            parse_time("2024-03-31T12:00:00+02:00").unwrap().epoch,
            1_711_879_200
        );
        assert_eq!(
            parse_time("2024-01-02T13-00-00+01-00").unwrap().epoch,
            1_704_196_800
        );
        assert_eq!(
            parse_time("2024-01-01T00:00:00Z").unwrap().epoch,
            1_704_067_200
        );
        // rdiff-backup 2.2 writes -03:30 as -04:30 and reads it back right.
        assert_eq!(
            parse_time("2024-01-01T10:30:00-04:30").unwrap().epoch,
            1_704_117_600
        );
        assert!(parse_time("2024-13-01T00:00:00Z").is_none());
        assert!(parse_time("yesterday").is_none());
    }

    #[test]
    fn increment_names_are_read_from_the_right() {
        let n = parse_inc(b"big.bin.2024-03-29T12:00:00+01:00.diff.gz").unwrap();
        assert_eq!(
            (n.base.as_slice(), n.kind, n.gz),
            (&b"big.bin"[..], IncKind::Diff, true)
        );
        let n =
            parse_inc(b"looks.2024-01-01T00:00:00+01:00.missing.2024-03-29T12:00:00+01:00.diff.gz")
                .unwrap();
        assert_eq!(n.base, b"looks.2024-01-01T00:00:00+01:00.missing");
        let n = parse_inc(b"new.txt.2024-03-29T12:00:00+01:00.missing").unwrap();
        assert_eq!((n.kind, n.gz), (IncKind::Missing, false));
        assert!(parse_inc(b"plain.txt").is_none());
        assert!(parse_inc(b"x.notatime.diff").is_none());
    }

    #[test]
    fn quoting_round_trips() {
        let q = Quoting::parse(b"A-Z:").unwrap();
        assert_eq!(
            q.quote(b"Mixed;Case:Name.txt"),
            b";077ixed;059;067ase;058;078ame.txt"
        );
        assert_eq!(
            q.unquote(b";077ixed;059;067ase;058;078ame.txt"),
            b"Mixed;Case:Name.txt"
        );
        assert_eq!(
            q.unquote(b"2024-01-01;08413-00-00+01-00"),
            b"2024-01-01T13-00-00+01-00"
        );
        let none = Quoting::parse(b"").unwrap();
        assert_eq!(none.quote(b"A;b"), b"A;b");
    }

    #[test]
    fn special_escapes_quote_trailing_dots_and_dos_devices_as_rdiff_backup_does() {
        let q = Quoting::parse(b"A-Z")
            .unwrap()
            .with_special_escapes(b"escape_dos_devices\nescape_trailing_spaces\n")
            .unwrap();
        let cases: [(&[u8], &[u8]); 14] = [
            (b"name ", b"name;032"),
            (b"name.", b"name;046"),
            (b"aux", b";097ux"),
            // Quoting comes first: `;067on.txt` is no device name.
            (b"Con.txt", b";067on.txt"),
            (b"con.TXT", b";099on.;084;088;084"),
            (b"nul.tar.gz", b";110ul.tar.gz"),
            (b"com7", b";099om7"),
            (b"lpt0", b"lpt0"),
            (b"auxiliary", b"auxiliary"),
            // The trailing dot is escaped first, so `aux.` is no device any more.
            (b"aux.", b"aux;046"),
            // Python's `$` matches before a final newline, so these are devices too.
            (b"prn.\n", b";112rn.\n"),
            (b"aux\n", b";097ux\n"),
            (b"aux\n\n", b"aux\n\n"),
            (b"con.a\nb", b"con.a\nb"),
        ];
        for (name, stored) in cases {
            assert_eq!(q.quote(name), stored, "{:?}", String::from_utf8_lossy(name));
            assert_eq!(q.unquote(stored), name);
        }
        // Without chars_to_quote nothing is escaped, as in rdiff-backup.
        let off = Quoting::none()
            .with_special_escapes(b"escape_trailing_spaces")
            .unwrap();
        assert_eq!(off.quote(b"name "), b"name ");
        assert!(Quoting::none().with_special_escapes(b"escape_all").is_err());
    }
}
