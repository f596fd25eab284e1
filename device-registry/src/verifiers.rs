//! Password verifiers that survive a restart, so that a restart storm (every device
//! reconnecting at once) does not cost one argon2 run per device.
//!
//! After a device's password has passed argon2 once, Ferrule remembers a *verifier*:
//! HMAC-SHA256 under an operator-provided key `K` of (tenant, auth-id, the stored hash
//! record — function, PHC string, salt — and the password). A later login with the same
//! password against the same stored record is accepted when its verifier matches, without
//! running argon2; every other check (tenant and device enabled, the secret's validity
//! window, failure limits) still runs against the registry as before.
//!
//! Security argument (SECURITY.md, "Password verifiers"):
//! - Without `K` the file is useless: HMAC-SHA256 is a PRF, so its entries reveal nothing
//!   about passwords and cannot be forged for any password. It does show which auth-ids
//!   logged in, and auth-ids are not confidential.
//! - With `K` *and* the file, an attacker could test guesses at HMAC speed instead of
//!   argon2 speed. That is why the key must live apart from the data: a file the operator
//!   provides from a secret store (a Kubernetes Secret, systemd credentials, a tmpfs),
//!   never in the data directory or its backups. Ferrule refuses a key inside the data
//!   directory, and a key shorter than 32 bytes.
//! - A changed password (a new hash record) or a new key makes old verifiers inert.
//! - Off unless `[registry] verifier_key_file` is set: then nothing is written and a
//!   fresh process verifies every device with argon2 once, as before.
//!
//! File: `MAGIC`, a 16-byte key id (so that entries written under another key are
//! dropped), then records `u16 tenant length, tenant, u16 auth-id length, auth-id,
//! 32-byte verifier`. Written atomically (temporary file, rename) with mode 0600; read
//! with bounds (at most `max` records, lengths checked), a malformed file is ignored.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::model::TenantId;

const MAGIC: &[u8; 20] = b"FERRULE-VERIFIERS-1\n";
const KEY_ID_LEN: usize = 16;
/// Shortest accepted key file.
pub const MIN_KEY_BYTES: usize = 32;
/// Longest tenant id or auth-id kept (longer ones are not remembered).
const MAX_ID_BYTES: usize = u16::MAX as usize;

type Mac32 = [u8; 32];

/// A stored hashed-password secret a verifier is bound to.
#[derive(Clone, Copy, Debug)]
pub struct HashRecord<'a> {
    /// `hash-function` (e.g. `argon2id`, `bcrypt`).
    pub function: &'a str,
    /// `pwd-hash` as stored.
    pub hash: &'a str,
    /// `salt` as stored, if any.
    pub salt: Option<&'a str>,
}

/// Why the verifiers could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VerifierError {
    /// The key file cannot be read.
    #[error("verifier_key_file {path}: {source}")]
    Read {
        /// The configured path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The key file is too short.
    #[error("verifier_key_file {0}: needs at least {MIN_KEY_BYTES} bytes (e.g. head -c 32 /dev/urandom)")]
    Short(PathBuf),
    /// The key file lies inside the data directory.
    #[error("verifier_key_file {0}: must not be inside the data directory (keep the key apart from the data it protects)")]
    InsideDataDir(PathBuf),
}

/// The verifiers of one process, persisted to one file.
pub struct Verifiers {
    key: Hmac<Sha256>,
    key_id: [u8; KEY_ID_LEN],
    path: PathBuf,
    max: usize,
    map: Mutex<HashMap<(TenantId, String), Mac32>>,
    dirty: AtomicBool,
}

impl std::fmt::Debug for Verifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifiers").field("path", &self.path).finish_non_exhaustive()
    }
}

/// The key a key file's bytes hold: without trailing whitespace (a text key, e.g. hex with
/// a newline, is the same key with or without it) unless that leaves fewer than
/// [`MIN_KEY_BYTES`]: a raw random key whose last bytes happen to be whitespace (1 in about
/// 50 from `head -c 32 /dev/urandom`) is taken whole. A function of the file's bytes only,
/// so the same file gives the same key on every start and every instance.
fn key_bytes(raw: &[u8]) -> &[u8] {
    let trimmed = raw.trim_ascii_end();
    if trimmed.len() >= MIN_KEY_BYTES {
        trimmed
    } else {
        raw
    }
}

impl Verifiers {
    /// Reads the key from `key_file` and the verifiers kept at `path` (if any, and if they
    /// were written under the same key); keeps at most `max`.
    ///
    /// # Errors
    /// An unreadable or short key file, or one inside `data_dir`.
    pub fn open(
        key_file: &Path,
        data_dir: &Path,
        path: PathBuf,
        max: usize,
    ) -> Result<Self, VerifierError> {
        let read = |source| VerifierError::Read { path: key_file.to_owned(), source };
        let canonical = std::fs::canonicalize(key_file).map_err(read)?;
        if std::fs::canonicalize(data_dir).is_ok_and(|d| canonical.starts_with(d)) {
            return Err(VerifierError::InsideDataDir(key_file.to_owned()));
        }
        let raw = std::fs::read(&canonical).map_err(read)?;
        let key = key_bytes(&raw);
        if key.len() < MIN_KEY_BYTES {
            return Err(VerifierError::Short(key_file.to_owned()));
        }
        let key =
            <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
        let mut id = key.clone();
        id.update(b"ferrule verifier key id");
        let mut key_id = [0u8; KEY_ID_LEN];
        key_id.copy_from_slice(&id.finalize().into_bytes()[..KEY_ID_LEN]);
        let v = Self {
            key,
            key_id,
            path,
            max,
            map: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
        };
        match std::fs::read(&v.path) {
            Ok(bytes) => match v.decode(&bytes) {
                Some(map) => {
                    tracing::info!(count = map.len(), path = %v.path.display(), "password verifiers loaded");
                    *v.lock() = map;
                }
                None => {
                    tracing::warn!(path = %v.path.display(), "password verifiers ignored: malformed or written under another key")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %v.path.display(), error = %e, "password verifiers not loaded")
            }
        }
        Ok(v)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(TenantId, String), Mac32>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn verifier(
        &self,
        tenant: &TenantId,
        auth_id: &str,
        r: HashRecord<'_>,
        secret: &[u8],
    ) -> Mac32 {
        let parts: [&[u8]; 7] = [
            b"ferrule password verifier v1",
            tenant.as_str().as_bytes(),
            auth_id.as_bytes(),
            r.function.as_bytes(),
            r.hash.as_bytes(),
            r.salt.unwrap_or("").as_bytes(),
            secret,
        ];
        crate::auth::keyed_mac(&self.key, &parts)
    }

    /// Whether `secret` matches the verifier remembered for (tenant, auth-id) bound to the
    /// stored record `r`.
    pub fn matches(
        &self,
        tenant: &TenantId,
        auth_id: &str,
        r: HashRecord<'_>,
        secret: &[u8],
    ) -> bool {
        let Some(known) = self.lock().get(&(tenant.clone(), auth_id.to_owned())).copied() else {
            return false;
        };
        bool::from(known.ct_eq(&self.verifier(tenant, auth_id, r, secret)))
    }

    /// Remembers that `secret` passed the full check against the stored record `r`.
    pub fn remember(&self, tenant: &TenantId, auth_id: &str, r: HashRecord<'_>, secret: &[u8]) {
        if tenant.as_str().len() > MAX_ID_BYTES || auth_id.len() > MAX_ID_BYTES {
            return;
        }
        let v = self.verifier(tenant, auth_id, r, secret);
        let mut map = self.lock();
        if map.len() >= self.max && !map.contains_key(&(tenant.clone(), auth_id.to_owned())) {
            // Full: an arbitrary older one goes (it costs that device one argon2 run).
            if let Some(k) = map.keys().next().cloned() {
                map.remove(&k);
            }
        }
        if map.insert((tenant.clone(), auth_id.to_owned()), v) != Some(v) {
            self.dirty.store(true, Ordering::Release);
        }
    }

    /// The value a store shared by a cluster's instances keeps for (tenant, auth-id)
    /// ([`crate::RegistryStore::put_verifier`]): this key's id, then the verifier. Without
    /// the key it is as useless as the file's entries.
    pub fn shared_value(
        &self,
        tenant: &TenantId,
        auth_id: &str,
        r: HashRecord<'_>,
        secret: &[u8],
    ) -> Vec<u8> {
        let mut value = self.key_id.to_vec();
        value.extend_from_slice(&self.verifier(tenant, auth_id, r, secret));
        value
    }

    /// Whether `value`, read from a shared store, was written under this key for `secret`
    /// and the stored record `r`.
    pub fn matches_shared(
        &self,
        value: &[u8],
        tenant: &TenantId,
        auth_id: &str,
        r: HashRecord<'_>,
        secret: &[u8],
    ) -> bool {
        let Some((id, mac)) = value.split_at_checked(KEY_ID_LEN) else { return false };
        id == self.key_id
            && mac.len() == 32
            && bool::from(mac.ct_eq(&self.verifier(tenant, auth_id, r, secret)))
    }

    /// How many verifiers are kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the file if anything changed since the last write (blocking I/O).
    ///
    /// # Errors
    /// The OS error of writing or renaming.
    pub fn persist(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let bytes = self.encode();
        let result = write_atomically(&self.path, &bytes);
        if result.is_err() {
            self.dirty.store(true, Ordering::Release);
        }
        result
    }

    fn encode(&self) -> Vec<u8> {
        let map = self.lock();
        let mut out = Vec::with_capacity(MAGIC.len() + KEY_ID_LEN + map.len() * 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.key_id);
        for ((tenant, auth_id), v) in map.iter() {
            for id in [tenant.as_str().as_bytes(), auth_id.as_bytes()] {
                out.extend_from_slice(&(id.len() as u16).to_be_bytes());
                out.extend_from_slice(id);
            }
            out.extend_from_slice(v);
        }
        out
    }

    fn decode(&self, bytes: &[u8]) -> Option<HashMap<(TenantId, String), Mac32>> {
        let rest = bytes.strip_prefix(MAGIC.as_slice())?;
        let (key_id, mut rest) = rest.split_at_checked(KEY_ID_LEN)?;
        if !bool::from(key_id.ct_eq(&self.key_id)) {
            return None;
        }
        let mut map = HashMap::new();
        let take_id = |rest: &mut &[u8]| -> Option<String> {
            let (len, tail) = rest.split_at_checked(2)?;
            let len = u16::from_be_bytes([len[0], len[1]]) as usize;
            let (id, tail) = tail.split_at_checked(len)?;
            *rest = tail;
            String::from_utf8(id.to_vec()).ok()
        };
        while !rest.is_empty() && map.len() < self.max {
            let tenant = TenantId::new(take_id(&mut rest)?).ok()?;
            let auth_id = take_id(&mut rest)?;
            let (v, tail) = rest.split_at_checked(32)?;
            rest = tail;
            map.insert((tenant, auth_id), v.try_into().ok()?);
        }
        Some(map)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_keys_ending_in_whitespace_are_whole_and_text_keys_trimmed() {
        let mut raw = [7u8; 32];
        raw[31] = b'\n';
        assert_eq!(key_bytes(&raw), raw, "a raw 32-byte key is taken whole");
        raw[30] = b' ';
        assert_eq!(key_bytes(&raw), raw);
        let hex = b"00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let mut with_newline = hex.to_vec();
        with_newline.extend_from_slice(b"\r\n");
        assert_eq!(key_bytes(&with_newline), hex, "a text key's line end is not part of it");
        assert_eq!(key_bytes(b"short\n"), b"short\n", "too short either way (refused by open)");
        let dir = tempfile::tempdir().unwrap();
        let v = setup(dir.path(), &raw);
        let w = setup(dir.path(), &raw);
        assert_eq!(v.key_id, w.key_id, "the same file gives the same key");
    }

    fn setup(dir: &Path, key: &[u8]) -> Verifiers {
        let keys = dir.join("keys");
        std::fs::create_dir_all(&keys).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(keys.join("k"), key).unwrap();
        Verifiers::open(&keys.join("k"), &dir.join("data"), dir.join("data/v"), 3).unwrap()
    }

    const REC: HashRecord<'static> =
        HashRecord { function: "argon2id", hash: "$argon2id$x", salt: None };

    #[test]
    fn survives_a_restart_only_under_the_same_key_and_record() {
        let dir = tempfile::tempdir().unwrap();
        let t = TenantId::new("t").unwrap();
        let v = setup(dir.path(), &[7; 32]);
        assert!(!v.matches(&t, "a", REC, b"pw"));
        v.remember(&t, "a", REC, b"pw");
        assert!(v.matches(&t, "a", REC, b"pw"));
        assert!(!v.matches(&t, "a", REC, b"pW"));
        v.persist().unwrap();
        let again = setup(dir.path(), &[7; 32]);
        assert!(again.matches(&t, "a", REC, b"pw"));
        assert!(!again.matches(&t, "b", REC, b"pw"));
        let changed = HashRecord { hash: "$argon2id$y", ..REC };
        assert!(!again.matches(&t, "a", changed, b"pw"), "a new hash record makes it inert");
        let other_key = setup(dir.path(), &[8; 32]);
        assert!(other_key.is_empty(), "written under another key: dropped");
    }

    #[test]
    fn refuses_short_keys_and_keys_inside_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), [1; 31]).unwrap();
        let e = Verifiers::open(
            &dir.path().join("k"),
            Path::new("/nonexistent"),
            dir.path().join("v"),
            3,
        );
        assert!(matches!(e, Err(VerifierError::Short(_))));
        std::fs::write(dir.path().join("k"), [1; 32]).unwrap();
        let e = Verifiers::open(&dir.path().join("k"), dir.path(), dir.path().join("v"), 3);
        assert!(matches!(e, Err(VerifierError::InsideDataDir(_))));
    }

    #[test]
    fn shared_values_match_only_under_the_same_key_record_and_password() {
        let dir = tempfile::tempdir().unwrap();
        let a = setup(dir.path(), &[7u8; 32]);
        let b = setup(dir.path(), &[8u8; 32]);
        let t = TenantId::new("t1").unwrap();
        let value = a.shared_value(&t, "d1", REC, b"pw");
        assert!(a.matches_shared(&value, &t, "d1", REC, b"pw"));
        assert!(!a.matches_shared(&value, &t, "d1", REC, b"other"));
        assert!(!a.matches_shared(&value, &t, "d2", REC, b"pw"));
        let changed = HashRecord { hash: "another-hash", ..REC };
        assert!(!a.matches_shared(&value, &t, "d1", changed, b"pw"), "a new hash record");
        assert!(!b.matches_shared(&value, &t, "d1", REC, b"pw"), "another key");
        assert!(!a.matches_shared(&value[..20], &t, "d1", REC, b"pw"), "truncated");
        assert!(!a.matches_shared(b"", &t, "d1", REC, b"pw"));
    }

    #[test]
    fn bounded_and_tolerant_of_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let t = TenantId::new("t").unwrap();
        let v = setup(dir.path(), &[7; 32]);
        for i in 0..10 {
            v.remember(&t, &format!("d{i}"), REC, b"pw");
        }
        assert_eq!(v.len(), 3);
        v.persist().unwrap();
        let mut bytes = std::fs::read(dir.path().join("data/v")).unwrap();
        bytes.truncate(bytes.len() - 5);
        std::fs::write(dir.path().join("data/v"), &bytes).unwrap();
        assert!(setup(dir.path(), &[7; 32]).is_empty(), "a truncated file is ignored");
    }
}
