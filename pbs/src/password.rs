//! Where passphrases come from: a file, an environment variable, or a prompt on the
//! terminal, never the command line (argv is visible to every user of the machine).

use crate::error::CliError;
use std::path::Path;

/// The repository passphrase.
pub fn current(file: Option<&Path>) -> Result<Vec<u8>, CliError> {
    from_sources(file, "HAUL_PASSWORD", "Repository passphrase: ")
}

/// The passphrase of the repository a `copy` writes to.
pub fn target(file: Option<&Path>) -> Result<Vec<u8>, CliError> {
    from_sources(file, "HAUL_TO_PASSWORD", "Target repository passphrase: ")
}

/// A new passphrase for `init` or `key add`; prompted twice.
pub fn new(file: Option<&Path>, env: &str) -> Result<Vec<u8>, CliError> {
    if file.is_some() || std::env::var_os(env).is_some() {
        return from_sources(file, env, "");
    }
    let first = prompt("New passphrase: ")?;
    let second = prompt("Repeat the new passphrase: ")?;
    if first != second {
        return Err(CliError::usage(
            "the passphrases do not match; nothing was changed",
        ));
    }
    Ok(first)
}

fn from_sources(file: Option<&Path>, env: &str, question: &str) -> Result<Vec<u8>, CliError> {
    if let Some(path) = file {
        let mut bytes = std::fs::read(path).map_err(|e| {
            CliError::usage(format!(
                "cannot read passphrase file {}: {e}",
                path.display()
            ))
        })?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(CliError::usage(format!(
                "passphrase file {} is empty",
                path.display()
            )));
        }
        return Ok(bytes);
    }
    if let Some(v) = std::env::var_os(env) {
        use std::os::unix::ffi::OsStringExt;
        return Ok(v.into_vec());
    }
    prompt(question)
}

fn prompt(question: &str) -> Result<Vec<u8>, CliError> {
    rpassword::prompt_password(question).map(String::into_bytes).map_err(|e| {
        CliError::usage(format!(
            "no passphrase given and no terminal to ask on ({e}): use --password-file, $HAUL_PASSWORD_FILE or $HAUL_PASSWORD"
        ))
    })
}
