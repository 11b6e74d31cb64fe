//! Secrets at rest and keyed digests.
//!
//! Envelope encryption: each record gets a fresh 256-bit data key; the data is
//! sealed with AES-256-GCM under the data key, and the data key is sealed
//! under the master key. Both seals take the same associated data — the
//! table, the tenant id and the record id — so a ciphertext copied into
//! another tenant's or another record's row fails to decrypt.
//!
//! Client secrets are stored as HMAC-SHA-256 digests under a key derived from
//! the master key; verification is constant-time. (Secrets are 256-bit
//! random values, so a slow password hash would add ~40 ms for nothing.)

use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{hmac, rand};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::error::{Error, Result};

const ENVELOPE_VERSION: u8 = 1;
const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;

/// Where a sealed value lives, bound into its ciphertext.
#[derive(Debug, Clone, Copy)]
pub struct SealContext<'a> {
    pub table: &'a str,
    pub tenant_id: &'a str,
    pub record_id: &'a str,
}

impl SealContext<'_> {
    fn aad(&self) -> Vec<u8> {
        format!(
            "vaultguard/v1|{}|{}|{}",
            self.table, self.tenant_id, self.record_id
        )
        .into_bytes()
    }
}

/// The master key and the keys derived from it. Never logged: `Debug` prints
/// nothing of it.
pub struct MasterKey {
    kek: LessSafeKey,
    digest_key: hmac::Key,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// Fills a new buffer with `len` random bytes.
pub fn random_bytes(len: usize) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; len];
    rand::fill(&mut bytes).map_err(|_| Error::internal("random generator failed"))?;
    Ok(bytes)
}

/// A random token of `bytes` bytes of entropy in base64url without padding
/// (alphabet `[A-Za-z0-9_-]`).
pub fn random_token(bytes: usize) -> Result<String> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes(bytes)?))
}

/// The PKCE `code_challenge` of `verifier` (RFC 7636 S256: base64url of
/// its SHA-256, unpadded).
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        verifier.as_bytes(),
    ))
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}

impl MasterKey {
    /// Builds the key from its 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(bytes.len() == KEY_LEN, "master key must be {KEY_LEN} bytes");
        let kek = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, bytes)
                .map_err(|_| anyhow::anyhow!("invalid master key"))?,
        );
        let derivation = hmac::Key::new(hmac::HMAC_SHA256, bytes);
        let digest_key_bytes = hmac::sign(&derivation, b"vaultguard/v1 client-secret digest key");
        let digest_key = hmac::Key::new(hmac::HMAC_SHA256, digest_key_bytes.as_ref());
        Ok(Self { kek, digest_key })
    }

    /// Reads the base64 key, or the key file, generating the file (mode 0600)
    /// when it does not exist yet.
    pub fn load_or_generate(inline_base64: &str, file: &Path) -> anyhow::Result<Self> {
        if !inline_base64.is_empty() {
            let bytes = STANDARD
                .decode(inline_base64.trim())
                .map_err(|_| anyhow::anyhow!("master key is not valid base64"))?;
            return Self::from_bytes(&bytes);
        }
        if file.exists() {
            let text = std::fs::read_to_string(file).map_err(|e| {
                anyhow::anyhow!("cannot read master key file {}: {e}", file.display())
            })?;
            let bytes = STANDARD.decode(text.trim()).map_err(|_| {
                anyhow::anyhow!("master key file {} is not valid base64", file.display())
            })?;
            return Self::from_bytes(&bytes);
        }
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let bytes =
            random_bytes(KEY_LEN).map_err(|_| anyhow::anyhow!("random generator failed"))?;
        write_private_file(file, STANDARD.encode(&bytes).as_bytes())?;
        tracing::warn!(path = %file.display(), "generated a new master key; back it up, every replica needs the same one");
        Self::from_bytes(&bytes)
    }

    /// Seals `plaintext` for the record named by `context`.
    pub fn seal(&self, context: SealContext<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        let aad = context.aad();
        let data_key_bytes = random_bytes(KEY_LEN)?;
        let data_key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &data_key_bytes)
                .map_err(|_| Error::internal("data key rejected"))?,
        );
        let wrapped_key = seal_with(&self.kek, &aad, &data_key_bytes)?;
        let sealed_data = seal_with(&data_key, &aad, plaintext)?;
        let mut out = Vec::with_capacity(1 + wrapped_key.len() + sealed_data.len());
        out.push(ENVELOPE_VERSION);
        out.extend_from_slice(&wrapped_key);
        out.extend_from_slice(&sealed_data);
        Ok(out)
    }

    /// Opens a value sealed by [`MasterKey::seal`] for the same record; any
    /// other record, tenant or table fails.
    pub fn open(&self, context: SealContext<'_>, envelope: &[u8]) -> Result<Vec<u8>> {
        let wrapped_len = NONCE_LEN + KEY_LEN + TAG_LEN;
        let Some((&version, rest)) = envelope.split_first() else {
            return Err(Error::internal("empty envelope"));
        };
        if version != ENVELOPE_VERSION || rest.len() < wrapped_len + NONCE_LEN + TAG_LEN {
            return Err(Error::internal("malformed envelope"));
        }
        let aad = context.aad();
        let (wrapped_key, sealed_data) = rest.split_at(wrapped_len);
        let data_key_bytes = open_with(&self.kek, &aad, wrapped_key)?;
        let data_key = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &data_key_bytes)
                .map_err(|_| Error::internal("data key rejected"))?,
        );
        open_with(&data_key, &aad, sealed_data)
    }

    /// The keyed digest of a client secret.
    pub fn secret_digest(&self, secret: &str) -> Vec<u8> {
        hmac::sign(&self.digest_key, secret.as_bytes())
            .as_ref()
            .to_vec()
    }

    /// A public handle derived from a record id under the master key
    /// (base64url of HMAC-SHA256 over `purpose`, a zero byte and `id`): 256
    /// bits that only this server can compute, so the handle itself never
    /// needs storing — only its hash, for lookups.
    pub fn derive_handle(&self, purpose: &str, id: &str) -> String {
        let mut input = Vec::with_capacity(purpose.len() + 1 + id.len());
        input.extend_from_slice(purpose.as_bytes());
        input.push(0);
        input.extend_from_slice(id.as_bytes());
        URL_SAFE_NO_PAD.encode(hmac::sign(&self.digest_key, &input).as_ref())
    }

    /// Compares a presented secret with a stored digest in constant time.
    pub fn verify_secret(&self, secret: &str, digest: &[u8]) -> bool {
        hmac::verify(&self.digest_key, secret.as_bytes(), digest).is_ok()
    }
}

fn seal_with(key: &LessSafeKey, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    let nonce_bytes = random_bytes(NONCE_LEN)?;
    let nonce =
        Nonce::try_assume_unique_for_key(&nonce_bytes).map_err(|_| Error::internal("bad nonce"))?;
    let mut in_out = plaintext.to_vec();
    key.seal_in_place_append_tag(nonce, Aad::from(aad), &mut in_out)
        .map_err(|_| Error::internal("seal failed"))?;
    let mut out = nonce_bytes;
    out.extend_from_slice(&in_out);
    Ok(out)
}

fn open_with(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>> {
    let (nonce_bytes, ciphertext) = sealed.split_at(NONCE_LEN);
    let nonce =
        Nonce::try_assume_unique_for_key(nonce_bytes).map_err(|_| Error::internal("bad nonce"))?;
    let mut in_out = ciphertext.to_vec();
    let plaintext = key
        .open_in_place(nonce, Aad::from(aad), &mut in_out)
        .map_err(|_| Error::internal("ciphertext does not open for this record"))?;
    Ok(plaintext.to_vec())
}

/// Writes a file readable by its owner only.
pub fn write_private_file(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_bytes(&[7u8; 32]).unwrap()
    }

    #[test]
    fn envelope_round_trips_only_for_its_record() {
        let master = key();
        let here = SealContext {
            table: "t",
            tenant_id: "tnt_a",
            record_id: "r1",
        };
        let sealed = master.seal(here, b"refresh-token").unwrap();
        assert_eq!(master.open(here, &sealed).unwrap(), b"refresh-token");
        let other_tenant = SealContext {
            tenant_id: "tnt_b",
            ..here
        };
        assert!(master.open(other_tenant, &sealed).is_err());
        let other_record = SealContext {
            record_id: "r2",
            ..here
        };
        assert!(master.open(other_record, &sealed).is_err());
        let other_master = MasterKey::from_bytes(&[8u8; 32]).unwrap();
        assert!(other_master.open(here, &sealed).is_err());
    }

    #[test]
    fn secret_digest_verifies() {
        let master = key();
        let digest = master.secret_digest("s3cret");
        assert!(master.verify_secret("s3cret", &digest));
        assert!(!master.verify_secret("s3cret!", &digest));
    }
}
