//! `init` and `key add|list|remove`.

use super::Context;
use crate::cli::InitArgs;
use crate::error::CliError;
use crate::output::json_line;
use crate::password;
use haul_repo::crypto::KdfParams;
use haul_repo::format::config::RepoConfig;
use haul_repo::Repository;
use std::path::PathBuf;

pub fn init(ctx: &Context, args: InitArgs) -> Result<(), CliError> {
    let location = ctx.repo_location()?;
    let config = RepoConfig::new(args.compression);
    config.validate().map_err(CliError::usage)?;
    let pass = password::new(ctx.global.password_file.as_deref(), "HAUL_PASSWORD")?;
    let credentials = ctx.site()?.config.server.s3_credentials_file.clone();
    let backend = location.create(credentials.as_deref())?;
    let repo = Repository::init(backend, &pass, KdfParams::default(), config)?;
    if ctx.global.json {
        json_line(
            &serde_json::json!({"type": "init", "repository": location.to_string(), "id": repo.config().id}),
        );
    } else {
        crate::outln!(
            "created haul repository {} at {}",
            &repo.config().id[..8],
            location
        );
        crate::outln!("Keep the passphrase safe: without it nothing in this repository can be read or restored.");
    }
    Ok(())
}

pub fn key_add(ctx: &Context, new_password_file: Option<PathBuf>) -> Result<(), CliError> {
    let repo = ctx.open()?;
    let pass = password::new(new_password_file.as_deref(), "HAUL_NEW_PASSWORD")?;
    let id = repo.add_key(&pass, KdfParams::default())?;
    if ctx.global.json {
        json_line(&serde_json::json!({"type": "key-added", "id": id}));
    } else {
        crate::outln!("added key {}", &id[..8]);
    }
    Ok(())
}

pub fn key_list(ctx: &Context) -> Result<(), CliError> {
    let repo = ctx.open()?;
    let keys = repo.list_keys()?;
    if ctx.global.json {
        for k in &keys {
            crate::output::typed_line("key", k);
        }
        return Ok(());
    }
    let rows = keys
        .iter()
        .filter_map(|k| {
            let created = k.created.filter(|_| k.damaged.is_none())?;
            Some(vec![
                format!("{}{}", if k.current { "*" } else { " " }, &k.id[..8]),
                created.format("%Y-%m-%d %H:%M:%S").to_string(),
                k.username.clone(),
                k.hostname.clone(),
            ])
        })
        .collect();
    crate::output::table(&[" ID", "CREATED", "USER", "HOST"], &[], rows);
    // Damaged key files after the table, each on a line of its own.
    for k in keys
        .iter()
        .filter(|k| k.created.is_none() || k.damaged.is_some())
    {
        crate::outln!(
            " {:<10} DAMAGED: {} (keys/{}): put back a copy, or remove it with `haul-pbs key remove {}`",
            &k.id[..8],
            k.damaged.as_deref().unwrap_or("unreadable"),
            k.id,
            &k.id[..8]
        );
    }
    Ok(())
}

pub fn key_remove(ctx: &Context, id: &str) -> Result<(), CliError> {
    let repo = ctx.open()?;
    let _lock = repo.lock(haul_repo::lock::LockKind::Exclusive, "key remove")?;
    let removed = repo.remove_key(id)?;
    if ctx.global.json {
        json_line(&serde_json::json!({"type": "key-removed", "id": removed}));
    } else {
        crate::outln!("removed key {}", &removed[..8]);
    }
    Ok(())
}

pub fn unlock(ctx: &Context, all: bool) -> Result<(), CliError> {
    let repo = ctx.open()?;
    let removed = repo.unlock(all)?;
    if ctx.global.json {
        json_line(&serde_json::json!({"type": "unlock", "removed": removed}));
    } else {
        crate::outln!(
            "removed {removed} {}lock(s)",
            if all { "" } else { "stale " }
        );
    }
    Ok(())
}
