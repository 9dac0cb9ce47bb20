//! A user's profile: SSH public keys and a dotfiles repository for all their workspaces.
//! Every change is a compare-and-set on the stored profile (retried when another write
//! came first), so concurrent changes never lose one another.

use crate::base::workspace::is_git_url;
use crate::domain::error::{Error, Kind};
use crate::store::{DotfilesSetting, Profile, SshKey};
use base64::Engine;
use protocol::control::KEY_TYPES;
use sha2::{Digest, Sha256};

/// At most this many keys per user (the agent takes no more).
pub const MAX_KEYS: usize = 50;
const _: () = assert!(MAX_KEYS <= protocol::control::MAX_AUTHORIZED_KEYS);
/// A key's blob (the base64 part, decoded) may not be larger than this.
const MAX_BLOB: usize = 8 * 1024;
/// Compare-and-set rounds before giving up.
const ATTEMPTS: usize = 8;

fn bad_key(message: impl Into<String>) -> Error {
    Error::new(Kind::Invalid, "bad_key", message)
}

/// Checks an OpenSSH public key line (`type base64 [comment]`, as in a `.pub` file) and
/// returns it in canonical form with its fingerprint (`SHA256:...`, as `ssh-keygen -l`
/// prints it). Options (`command=...`), other types, blobs that do not decode or that name
/// another type are refused.
pub fn parse_key(text: &str, now: i64) -> Result<SshKey, Error> {
    let text = text.trim();
    if text.len() > 16 * 1024 || text.contains(['\n', '\r', '\0']) {
        return Err(bad_key("one public key line, at most 16 KiB"));
    }
    let mut parts = text.split_whitespace();
    let kind = parts.next().unwrap_or_default();
    if !KEY_TYPES.contains(&kind) {
        return Err(bad_key(format!(
            "the line must start with the key type, one of {} (no options)",
            KEY_TYPES.join(", ")
        )));
    }
    let blob = parts
        .next()
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .filter(|b| b.len() <= MAX_BLOB)
        .ok_or_else(|| bad_key("the key is not valid base64"))?;
    // The blob starts with its own type, as an SSH string (u32 length, then bytes).
    let named = blob
        .get(..4)
        .map(|n| u32::from_be_bytes([n[0], n[1], n[2], n[3]]) as usize)
        .and_then(|n| blob.get(4..4 + n));
    if named != Some(kind.as_bytes()) {
        return Err(bad_key("the key's data does not match its type"));
    }
    let comment: String = parts
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control())
        .take(256)
        .collect();
    let encoded = base64::engine::general_purpose::STANDARD.encode(&blob);
    let key = if comment.is_empty() {
        format!("{kind} {encoded}")
    } else {
        format!("{kind} {encoded} {comment}")
    };
    if !key.is_ascii() {
        return Err(bad_key("the comment must be ASCII"));
    }
    let id = format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(&blob))
    );
    Ok(SshKey {
        id,
        key,
        added_at: now,
    })
}

/// Checks a dotfiles setting.
pub fn check_dotfiles(d: &DotfilesSetting) -> Result<(), Error> {
    if !is_git_url(&d.repo) {
        return Err(Error::invalid(
            "repo must be an https, http, ssh, git or file URL (or user@host:path)",
        ));
    }
    if let Some(command) = &d.install_command
        && (command.trim().is_empty() || command.chars().count() > 4096 || command.contains('\0'))
    {
        return Err(Error::invalid(
            "install_command must be 1 to 4096 characters with no NUL",
        ));
    }
    Ok(())
}

/// Applies `change` to the owner's profile and saves it; retried on a lost race. Returns
/// the profile as saved and what `change` returned.
async fn update<T>(
    hub: &crate::Hub,
    owner: &str,
    change: impl Fn(&mut Profile) -> Result<T, Error>,
) -> Result<(Profile, T), Error> {
    for _ in 0..ATTEMPTS {
        let mut profile = hub.store.get_profile(owner).await?;
        let out = change(&mut profile)?;
        profile.version += 1;
        if hub.store.put_profile(owner, &profile).await? {
            return Ok((profile, out));
        }
    }
    Err(Error::new(
        Kind::Unavailable,
        "busy",
        "the profile changed under this request too often; try again",
    ))
}

/// Adds a key (the same key twice is refused: `key_exists`).
pub async fn add_key(
    hub: &crate::Hub,
    owner: &str,
    text: &str,
    now: i64,
) -> Result<(Profile, SshKey), Error> {
    let key = parse_key(text, now)?;
    update(hub, owner, |p| {
        if p.ssh_keys.iter().any(|k| k.id == key.id) {
            return Err(Error::new(
                Kind::Conflict,
                "key_exists",
                format!("key {} is there already", key.id),
            ));
        }
        if p.ssh_keys.len() >= MAX_KEYS {
            return Err(Error::new(
                Kind::Conflict,
                "too_many_keys",
                format!("at most {MAX_KEYS} keys; remove one first"),
            ));
        }
        p.ssh_keys.push(key.clone());
        Ok(key.clone())
    })
    .await
}

/// Removes a key by its fingerprint.
pub async fn remove_key(hub: &crate::Hub, owner: &str, id: &str) -> Result<Profile, Error> {
    update(hub, owner, |p| {
        let before = p.ssh_keys.len();
        p.ssh_keys.retain(|k| k.id != id);
        if p.ssh_keys.len() == before {
            return Err(Error::not_found("key"));
        }
        Ok(())
    })
    .await
    .map(|(p, ())| p)
}

/// Sets (or with `None` clears) the dotfiles repository. Workspaces that installed
/// dotfiles keep theirs; the others install these (running ones at once).
pub async fn set_dotfiles(
    hub: &crate::Hub,
    owner: &str,
    dotfiles: Option<DotfilesSetting>,
) -> Result<Profile, Error> {
    if let Some(d) = &dotfiles {
        check_dotfiles(d)?;
    }
    update(hub, owner, |p| {
        p.dotfiles = dotfiles.clone();
        Ok(())
    })
    .await
    .map(|(p, ())| p)
}

/// The profile as the agent gets it.
pub fn for_agent(p: &Profile) -> protocol::control::Profile {
    protocol::control::Profile {
        authorized_keys: p.ssh_keys.iter().map(|k| k.key.clone()).collect(),
        dotfiles: p.dotfiles.as_ref().map(|d| protocol::control::Dotfiles {
            repo: d.repo.clone(),
            install_command: d.install_command.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl  me@laptop ";

    #[test]
    fn a_public_key_line_is_checked_and_fingerprinted() {
        let key = parse_key(ED25519, 7).unwrap();
        assert_eq!(
            key.key,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop"
        );
        assert!(key.id.starts_with("SHA256:") && !key.id.ends_with('='));
        assert_eq!(key.added_at, 7);
        for bad in [
            "",
            "ssh-ed25519",
            "ssh-ed25519 !!!",
            "command=\"sh\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
            // An RSA type over an ed25519 blob.
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a\nssh-rsa x",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl é",
        ] {
            assert_eq!(parse_key(bad, 0).unwrap_err().code(), "bad_key", "{bad}");
        }
    }
}
