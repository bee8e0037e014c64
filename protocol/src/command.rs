//! The agent's command line as it travels in an SSH exec request: the pbs quotes it
//! with [`join`], the forced command on the source host splits it with [`split`].
//!
//! The grammar is a strict subset of the POSIX shell's words, without any expansion:
//! words separated by spaces, each made of plain characters (`A-Z a-z 0-9 _ . / : = @
//! % + , -`) and single-quoted parts (`'any text'`; a quote itself is written `'\''`).
//! Anything else — `;`, `|`, `$`, backquotes, double quotes, other backslashes,
//! control characters — is refused, so nothing a shell would treat specially gets
//! through, and a command that a shell would split differently cannot be written.

/// Splits a command into words by the grammar in the module doc.
pub fn split(command: &str) -> Result<Vec<String>, String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c);
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = command.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) if c.is_control() => {
                            return Err("a control character in the command".into());
                        }
                        Some(c) => w.push(c),
                        None => return Err("an unterminated quote in the command".into()),
                    }
                }
            }
            '\\' if chars.peek() == Some(&'\'') => {
                chars.next();
                word.get_or_insert_with(String::new).push('\'');
            }
            c if plain(c) => word.get_or_insert_with(String::new).push(c),
            c => {
                return Err(format!(
                    "the character {c:?} is not allowed in the command (no shell syntax is)"
                ))
            }
        }
    }
    if let Some(w) = word {
        words.push(w);
    }
    Ok(words)
}

/// Quotes `words` so that [`split`] gives them back: what the pbs sends as the SSH
/// command.
pub fn join(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_./:=@%+,-".contains(c))
            {
                w.to_string()
            } else {
                format!("'{}'", w.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_words_and_quotes_and_refuses_shell_syntax() {
        assert_eq!(split("a  b 'c d' e'f'g").unwrap(), ["a", "b", "c d", "efg"]);
        assert_eq!(split("'it'\\''s'").unwrap(), ["it's"]);
        assert_eq!(split("''").unwrap(), [""]);
        for bad in [
            "a;b", "a|b", "$(x)", "`x`", "a\"b\"", "a\\b", "a\nb", "'open", "a&", "x>y", "*",
        ] {
            assert!(split(bad).is_err(), "{bad:?} accepted");
        }
    }

    /// Pieces of the grammar and of what it refuses, for the mutations to insert.
    const TOKENS: &[&[u8]] = &[
        b" ",
        b"'",
        b"\\'",
        b"\\",
        b";",
        b"$(",
        b"`",
        b"\"",
        b"\n",
        b"\t",
        b"\x7f",
        b"\xc3\xa9",
        b"--path",
        b"haul-agent",
    ];

    fn arb_command() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec("[^\\x00-\\x1f\\x7f-\\u{9f}]{0,8}", 1..5).prop_map(|words| {
            let refs: Vec<&str> = words.iter().map(String::as_str).collect();
            join(&refs).into_bytes()
        })
    }

    proptest! {
        /// The stable counterpart of the `command_split` fuzz target (docs/fuzzing.md):
        /// whatever `split` accepts, `join` quotes back to the same words.
        #[test]
        fn accepted_commands_quote_back_to_their_words(
            bytes in haul_mutate::inputs_with(arb_command(), 60, TOKENS),
        ) {
            let text = String::from_utf8_lossy(&bytes);
            if let Ok(words) = split(&text) {
                let refs: Vec<&str> = words.iter().map(String::as_str).collect();
                prop_assert_eq!(split(&join(&refs)), Ok(words));
            }
        }

        #[test]
        fn join_then_split_gives_the_words_back(words in proptest::collection::vec("[^\\x00-\\x1f\\x7f-\\u{9f}]{0,12}", 1..6)) {
            let refs: Vec<&str> = words.iter().map(String::as_str).collect();
            prop_assert_eq!(split(&join(&refs)).unwrap(), words);
        }
    }
}
