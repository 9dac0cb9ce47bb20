//! TLS session tickets that every replica of a hub can open.
//!
//! When a replica dies, all its agents reconnect to the others at once. A full TLS 1.3
//! handshake with certificates costs the server a signature and a certificate-chain
//! verification per agent; a resumed one costs a key exchange and one AEAD open. rustls'
//! own ticketer uses a random key per process, so a ticket could only be resumed on the
//! replica that issued it, the one that just died. [`SharedTickets`] derives its keys from
//! a secret every replica shares (the hub identity's ticket key):
//!
//! - keys roll every [`EPOCH`]: a ticket opens during the epoch it was sealed in and the
//!   next one, never later, and every replica derives the same key for an epoch without
//!   talking to the others;
//! - the key also depends on a context, the set of CAs the server trusts for clients: when
//!   a CA rotation ends (the old CA no longer trusted) the tickets of sessions
//!   authenticated under the old trust set stop opening, so a resumption never stands in
//!   for a certificate the server would now refuse;
//! - a resumed session carries the client certificate of the session it resumes, so the
//!   application's checks on the peer certificate (fingerprint, subject) still apply.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long one ticket key is used to seal tickets. A ticket opens until the end of the
/// epoch after the one it was sealed in: at least one epoch, at most two.
pub const EPOCH: Duration = Duration::from_secs(6 * 3600);

const EPOCH_LEN: usize = 8;

/// A [`rustls::server::ProducesTickets`] whose keys every holder of the same secret and
/// context derives alike. Ticket layout: epoch (8 bytes, big-endian), nonce (12), then
/// the AES-256-GCM ciphertext and tag; the epoch is authenticated as associated data.
pub struct SharedTickets {
    master: hmac::Key,
    resumed: AtomicU64,
}

impl std::fmt::Debug for SharedTickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTickets")
            .field("resumed", &self.resumed())
            .finish_non_exhaustive()
    }
}

impl SharedTickets {
    /// Tickets from `secret` (at least 32 bytes of key material) bound to `context`.
    pub fn new(secret: &[u8], context: &[&[u8]]) -> Self {
        // HKDF-Extract style, with the label as the salt: nothing else signed with `secret`
        // (the hub signs web tickets with it) can ever equal this key.
        let label = hmac::Key::new(hmac::HMAC_SHA256, b"wsh tls session tickets v1");
        let mut mac = hmac::Context::with_key(&label);
        for part in std::iter::once(&secret).chain(context) {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        let master = hmac::Key::new(hmac::HMAC_SHA256, mac.sign().as_ref());
        Self {
            master,
            resumed: AtomicU64::new(0),
        }
    }

    /// How many tickets this ticketer has opened: sessions resumed without a certificate
    /// exchange.
    pub fn resumed(&self) -> u64 {
        self.resumed.load(Ordering::Relaxed)
    }

    fn key(&self, epoch: u64) -> LessSafeKey {
        let bytes = hmac::sign(&self.master, &epoch.to_be_bytes());
        let key = UnboundKey::new(&AES_256_GCM, bytes.as_ref()).expect("a 32-byte AES key");
        LessSafeKey::new(key)
    }

    fn seal_at(&self, epoch: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).ok()?;
        let header: Vec<u8> = epoch.to_be_bytes().iter().chain(&nonce).copied().collect();
        let mut sealed = plain.to_vec();
        self.key(epoch)
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&header[..EPOCH_LEN]),
                &mut sealed,
            )
            .ok()?;
        Some([header, sealed].concat())
    }

    fn open_at(&self, now_epoch: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < EPOCH_LEN + NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (epoch_bytes, rest) = ticket.split_at(EPOCH_LEN);
        let epoch = u64::from_be_bytes(epoch_bytes.try_into().ok()?);
        if epoch != now_epoch && epoch.checked_add(1) != Some(now_epoch) {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = self
            .key(epoch)
            .open_in_place(nonce, Aad::from(epoch_bytes), &mut buf)
            .ok()?;
        Some(plain.to_vec())
    }
}

fn current_epoch() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs() / EPOCH.as_secs()
}

impl rustls::server::ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        EPOCH.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(current_epoch(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.open_at(current_epoch(), cipher)?;
        self.resumed.fetch_add(1, Ordering::Relaxed);
        Some(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_with_the_same_secret_and_context_only() {
        let a = SharedTickets::new(&[7; 32], &[b"ca one"]);
        let b = SharedTickets::new(&[7; 32], &[b"ca one"]);
        let ticket = a.seal_at(100, b"session state").unwrap();
        assert_eq!(b.open_at(100, &ticket).unwrap(), b"session state");
        assert!(
            SharedTickets::new(&[8; 32], &[b"ca one"])
                .open_at(100, &ticket)
                .is_none()
        );
        // The trust set changed (a rotation ended): the session's certificate was checked
        // against CAs this server no longer trusts.
        assert!(
            SharedTickets::new(&[7; 32], &[b"ca two"])
                .open_at(100, &ticket)
                .is_none()
        );
        // Context parts are length-prefixed: no two lists run together alike.
        assert!(
            SharedTickets::new(&[7; 32], &[b"ca ", b"one"])
                .open_at(100, &ticket)
                .is_none()
        );
    }

    #[test]
    fn a_ticket_opens_in_its_epoch_and_the_next_only() {
        let t = SharedTickets::new(&[1; 32], &[]);
        let ticket = t.seal_at(100, b"x").unwrap();
        assert!(t.open_at(99, &ticket).is_none());
        assert!(t.open_at(100, &ticket).is_some());
        assert!(t.open_at(101, &ticket).is_some());
        assert!(t.open_at(102, &ticket).is_none());
        // Claiming a newer epoch does not help: the epoch picks the key and is
        // authenticated.
        let mut forged = ticket.clone();
        forged[..EPOCH_LEN].copy_from_slice(&102u64.to_be_bytes());
        assert!(t.open_at(102, &forged).is_none());
    }

    #[test]
    fn damaged_or_short_tickets_are_refused() {
        let t = SharedTickets::new(&[1; 32], &[]);
        let ticket = t.seal_at(5, b"session").unwrap();
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert!(t.open_at(5, &bad).is_none(), "byte {i} flipped");
        }
        for len in 0..ticket.len() {
            assert!(t.open_at(5, &ticket[..len]).is_none());
        }
        assert!(t.open_at(u64::MAX, &[0xff; 64]).is_none());
        assert_eq!(t.resumed(), 0);
    }
}
