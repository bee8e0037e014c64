//! `ssh-setup NAME`: a shell script that sets a host (or a clone) up for the backup
//! server, printed to be read and run there as root (template `ssh-setup.sh`):
//!
//! - a dedicated system user (password `*`: no password login, not locked, a shell
//!   so sshd can run the forced command);
//! - the agent `root:<user's group> 0750` before `setcap`, so that no other local user
//!   can run an agent that reads every file;
//! - the wrapper's policy, checked by the wrapper itself;
//! - a tmpfiles.d entry for the socket directory (it lives on tmpfs);
//! - the `authorized_keys` line with `from="<pbs address>"`, the forced command and
//!   `restrict,port-forwarding`;
//! - the sshd `Match` block as a drop-in in `sshd_config.d`.
//!
//! A host with `transport = "local"` needs none of it, and is told so.

use super::Context;
use crate::error::CliError;
use askama::Template;
use haul_config::Transport;
use std::path::Path;

/// What a source host's agent may do: read every file.
const HOST_CAPS: &str = "cap_dac_read_search+ep";
/// What a clone's agent may do: write files as any owner, with any mode.
const CLONE_CAPS: &str =
    "cap_chown,cap_dac_override,cap_dac_read_search,cap_fowner,cap_fsetid,cap_mknod+ep";

/// Refuses a value that would not stay one word, one line or one quoted string in the
/// script, the policy, the key's options or sshd's settings.
fn plain<'a>(what: &str, value: &'a str) -> Result<&'a str, CliError> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        return Err(CliError::usage(format!(
            "{what} {value:?} cannot go into the setup: it is empty or holds a quote, a backslash or a control character"
        )));
    }
    Ok(value)
}

/// A user name as useradd and sshd's `Match User` take it, whatever the system.
fn user_name(user: &str) -> Result<&str, CliError> {
    let ok = (1..=32).contains(&user.len())
        && user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(user)
    } else {
        Err(CliError::usage(format!(
            "user {user:?}: a user name for the setup is 1 to 32 lower-case letters, digits, `_` and `-`, beginning with a letter or `_`"
        )))
    }
}

#[derive(Template)]
#[template(path = "ssh-setup.sh", escape = "none")]
struct Script {
    name: String,
    address: String,
    port: u16,
    purpose: &'static str,
    from: String,
    agent: String,
    wrapper: String,
    dedicated: bool,
    clone: bool,
    agent_power: &'static str,
    caps: &'static str,
    clone_caps: &'static str,
    user: String,
    group: String,
    socket_dir: String,
    known_hosts: String,
    policy: String,
    agent_toml: String,
    socket_dir_toml: String,
    key_line: String,
    q_user: String,
    q_group: String,
    q_home: String,
    q_agent: String,
    q_wrapper: String,
    q_policy: String,
    q_policy_dir: String,
    q_tmpfiles: String,
    q_tmpfiles_dir: String,
    q_sshd: String,
    q_sshd_dir: String,
    q_socket_dir: String,
    q_key_material: String,
}

/// `s` as one word for `sh`: in single quotes, each `'` written `'\''`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn q(p: &Path) -> String {
    sh_quote(&p.display().to_string())
}

/// A TOML string (basic, escaped by serde's TOML writer).
fn toml_str(s: &str) -> String {
    toml::Value::String(s.into()).to_string()
}

/// The address this machine's traffic to `address:port` leaves from: what the host
/// sees as the backup server's address (no packet is sent: a UDP socket's connect only
/// picks the route).
fn source_address(address: &str, port: u16) -> Option<String> {
    use std::net::ToSocketAddrs;
    let target = (address, port).to_socket_addrs().ok()?.next()?;
    let bind = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(target).ok()?;
    Some(s.local_addr().ok()?.ip().to_string())
}

pub fn ssh_setup(ctx: &Context, args: crate::cli::SshSetupArgs) -> Result<(), CliError> {
    let site = ctx.site()?;
    let config = site.require_config()?;
    // A host by that name, else a clone: its destination as a host, and its policy.
    let (h, policy, clone) = match (config.host(&args.host), config.clone_target(&args.host)) {
        (Some(h), _) => {
            if h.transport == Transport::Local {
                crate::outln!(
                    "# {} uses transport = \"local\": its agent runs on this machine, started by the pbs itself. No SSH setup is needed.",
                    h.name
                );
                return Ok(());
            }
            let roots: Vec<String> = h
                .paths
                .iter()
                .map(|p| toml_str(&p.display().to_string()))
                .collect();
            let policy = format!(
                "backup_roots = [{}]\nrestore_targets = []",
                roots.join(", ")
            );
            (h.clone(), policy, false)
        }
        (None, Some(c)) => (c.ssh_host(), clone_policy(config, c), true),
        (None, None) => {
            let names = |n: Vec<&str>| {
                if n.is_empty() {
                    "none".into()
                } else {
                    n.join(", ")
                }
            };
            return Err(CliError::usage(format!(
                "no host or clone {:?} in {} (hosts there: {}; clones: {})",
                args.host,
                site.config_name(),
                names(config.hosts.iter().map(|h| h.name.as_str()).collect()),
                names(config.clones.iter().map(|c| c.name.as_str()).collect()),
            )));
        }
    };
    let key = russh::keys::load_secret_key(&h.identity, None).map_err(|e| {
        CliError::usage(format!(
            "identity {}: {e} (create one with `ssh-keygen -t ed25519 -N '' -f {}`)",
            h.identity.display(),
            h.identity.display()
        ))
    })?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| CliError::Failed(format!("public key of {}: {e}", h.identity.display())))?;
    let public = public.trim().to_string();
    let from = match args
        .from
        .clone()
        .or_else(|| source_address(&h.address, h.port))
    {
        Some(a) => a,
        None => {
            return Err(CliError::usage(format!(
            "cannot tell which address {} sees this server connect from: give it with --from ADDR",
            h.address
        )))
        }
    };
    if from.contains(['"', ',', ' ']) {
        return Err(CliError::usage(format!(
            "--from {from:?}: an address or pattern (as sshd's from= takes it), without quotes, commas or spaces"
        )));
    }
    user_name(&h.user)?;
    plain("address", &h.address)?;
    if h.address.contains(char::is_whitespace) {
        return Err(CliError::usage(format!(
            "address {:?} holds white space",
            h.address
        )));
    }
    plain("--from", &from)?;
    for (what, p) in [
        ("--agent", &args.agent),
        ("--wrapper", &args.wrapper),
        ("--etc", &args.etc),
        ("known_hosts", &h.known_hosts),
        ("socket_dir", &h.socket_dir),
    ] {
        plain(what, &p.display().to_string())?;
        if !p.is_absolute() {
            return Err(CliError::usage(format!(
                "{what} {} is not an absolute path",
                p.display()
            )));
        }
    }
    let socket_dir = h.socket_dir.display().to_string();
    if socket_dir.contains(char::is_whitespace) {
        return Err(CliError::usage(format!(
            "socket_dir {socket_dir:?} of {} holds white space, which tmpfiles.d cannot take: choose a path without",
            h.name
        )));
    }
    let etc = &args.etc;
    let policy_file = etc.join("haul").join("wrapper.toml");
    let tmpfiles = etc.join("tmpfiles.d").join(format!("haul-{}.conf", h.user));
    let sshd = etc
        .join("ssh")
        .join("sshd_config.d")
        .join(format!("haul-{}.conf", h.user));
    let dedicated = h.user != "root";
    let group = if dedicated {
        h.user.clone()
    } else {
        "root".into()
    };
    let key_line = format!(
        "from=\"{from}\",command=\"{} --policy {}\",restrict,port-forwarding {public}",
        args.wrapper.display(),
        policy_file.display()
    );
    let key_material = public
        .split_whitespace()
        .nth(1)
        .unwrap_or(&public)
        .to_string();
    let parent = |p: &Path| q(p.parent().expect("a file in a directory"));
    let script = Script {
        name: h.name.clone(),
        address: h.address.clone(),
        port: h.port,
        purpose: if clone {
            "standby copies pushed to it"
        } else {
            "backups pulled from it"
        },
        from,
        agent: args.agent.display().to_string(),
        wrapper: args.wrapper.display().to_string(),
        dedicated,
        agent_power: if clone {
            "writes files as any owner (restoring standby copies needs cap_chown, cap_fowner, cap_dac_override, cap_fsetid, cap_mknod)"
        } else {
            "reads every file (cap_dac_read_search)"
        },
        caps: if clone { CLONE_CAPS } else { HOST_CAPS },
        clone_caps: CLONE_CAPS,
        clone,
        user: h.user.clone(),
        q_user: sh_quote(&h.user),
        q_group: sh_quote(&group),
        group,
        q_home: sh_quote(&format!("/var/lib/{}", h.user)),
        q_socket_dir: sh_quote(&socket_dir),
        socket_dir_toml: toml_str(&socket_dir),
        socket_dir,
        known_hosts: h.known_hosts.display().to_string(),
        policy,
        agent_toml: toml_str(&args.agent.display().to_string()),
        q_agent: q(&args.agent),
        q_wrapper: q(&args.wrapper),
        q_policy: q(&policy_file),
        q_policy_dir: parent(&policy_file),
        q_tmpfiles: q(&tmpfiles),
        q_tmpfiles_dir: parent(&tmpfiles),
        q_sshd: q(&sshd),
        q_sshd_dir: parent(&sshd),
        q_key_material: sh_quote(&key_material),
        key_line,
    };
    crate::outln!("{}", script.render().expect("the setup template renders"));
    Ok(())
}

/// A clone's wrapper policy: no backups; restores (standby copies) into the directories
/// holding its copies; the import command left for the clone's operator to choose.
fn clone_policy(config: &haul_config::Config, c: &haul_config::CloneTarget) -> String {
    let mut targets: Vec<String> = config
        .hosts
        .iter()
        .filter(|h| c.receives(&h.name))
        .filter_map(|h| c.standby_dir_of(&h.name))
        .filter_map(|d| d.parent().map(|p| toml_str(&p.display().to_string())))
        .collect();
    targets.sort();
    targets.dedup();
    let import = if c.import {
        "import_command = [\"/usr/local/sbin/import-standby\"]   # yours: run after each complete push"
    } else {
        "# import_command = [\"/usr/local/sbin/import-standby\"]   # run after each push (with import = true in [[clone]])"
    };
    format!(
        "backup_roots = []\nrestore_targets = [{}]   # standby copies go in directories inside these\n{import}",
        targets.join(", ")
    )
}
