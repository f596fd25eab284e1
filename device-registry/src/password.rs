//! Password hashing and verification (blocking: call from a blocking pool).
//!
//! New passwords (`pwd-plain`) become argon2id PHC strings with the crate's default
//! parameters (19 MiB, t=2, p=1). Hashes imported from Hono are verified with their own
//! function: `bcrypt` (the bcrypt string) and `sha-256`/`sha-512`, where `pwd-hash` is
//! base64(H(salt || utf8(password))) and `salt` is optional base64 (Hono's semantics).

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

/// `hash-function` value Ferrule records for hashes it made itself.
pub const ARGON2ID: &str = "argon2id";

/// Highest bcrypt cost accepted on import: each step doubles verification time, and an
/// imported cost of 31 would pin a blocking thread for hours.
pub const MAX_BCRYPT_COST: u32 = 14;

/// Why a password or an imported hash was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    /// `hash-function` is not one Ferrule can verify.
    #[error("unsupported hash-function {0:?} (supported: bcrypt, sha-256, sha-512)")]
    UnsupportedHashFunction(String),
    /// `pwd-hash` does not have the form the hash function produces.
    #[error("pwd-hash is not a valid {0} hash")]
    BadHash(&'static str),
    /// `salt` is not valid base64.
    #[error("salt is not valid base64")]
    BadSalt,
    /// The secret has neither `pwd-plain` nor `pwd-hash` + `hash-function`.
    #[error("a hashed-password secret needs pwd-plain, or pwd-hash with hash-function")]
    Missing,
    /// The password hasher failed (should not happen with default parameters).
    #[error("password hashing failed")]
    Hashing,
}

/// Hashes `plain` with argon2id and a fresh random salt; returns the PHC string.
///
/// # Errors
/// [`PasswordError::Hashing`] if the hasher fails.
pub fn hash_plain(plain: &str) -> Result<String, PasswordError> {
    Argon2::default()
        .hash_password(plain.as_bytes())
        .map(|h| h.to_string())
        .map_err(|_| PasswordError::Hashing)
}

/// Checks an imported hash is one [`verify`] can use, before it is stored.
///
/// # Errors
/// The [`PasswordError`] naming what is wrong.
pub fn validate_imported(
    hash_function: &str,
    pwd_hash: &str,
    salt: Option<&str>,
) -> Result<(), PasswordError> {
    match hash_function {
        "bcrypt" => {
            // `$2a$10$` + 53 chars: check the prefix and cost without running bcrypt.
            let parts: Vec<&str> = pwd_hash.split('$').collect();
            let ok = parts.len() == 4
                && parts[0].is_empty()
                && matches!(parts[1], "2a" | "2b" | "2y" | "2x")
                && parts[2].parse::<u32>().is_ok_and(|c| (4..=MAX_BCRYPT_COST).contains(&c))
                && parts[3].len() == 53;
            if ok {
                Ok(())
            } else {
                Err(PasswordError::BadHash("bcrypt"))
            }
        }
        "sha-256" | "sha-512" => {
            let want = if hash_function == "sha-256" { 32 } else { 64 };
            match B64.decode(pwd_hash) {
                Ok(d) if d.len() == want => {}
                _ => {
                    return Err(PasswordError::BadHash(if want == 32 {
                        "sha-256"
                    } else {
                        "sha-512"
                    }))
                }
            }
            if let Some(s) = salt {
                B64.decode(s).map_err(|_| PasswordError::BadSalt)?;
            }
            Ok(())
        }
        other => Err(PasswordError::UnsupportedHashFunction(other.chars().take(32).collect())),
    }
}

/// Verifies `presented` against a stored hash. CPU-heavy for argon2id and bcrypt: run
/// it on a blocking pool. Any malformed stored value verifies as false.
pub fn verify(hash_function: &str, pwd_hash: &str, salt: Option<&str>, presented: &[u8]) -> bool {
    match hash_function {
        ARGON2ID => Argon2::default().verify_password(presented, pwd_hash).is_ok(),
        "bcrypt" => bcrypt::verify(presented, pwd_hash).unwrap_or(false),
        "sha-256" | "sha-512" => {
            let Ok(expected) = B64.decode(pwd_hash) else {
                return false;
            };
            let salt = match salt.map(|s| B64.decode(s)) {
                None => Vec::new(),
                Some(Ok(s)) => s,
                Some(Err(_)) => return false,
            };
            let actual: Vec<u8> = if hash_function == "sha-256" {
                let mut h = Sha256::new();
                h.update(&salt);
                h.update(presented);
                h.finalize().to_vec()
            } else {
                let mut h = Sha512::new();
                h.update(&salt);
                h.update(presented);
                h.finalize().to_vec()
            };
            actual.len() == expected.len() && bool::from(actual.ct_eq(&expected))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2id_round_trip() {
        let phc = hash_plain("s3cret").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify(ARGON2ID, &phc, None, b"s3cret"));
        assert!(!verify(ARGON2ID, &phc, None, b"wrong"));
    }

    #[test]
    fn sha_with_and_without_salt_like_hono() {
        let salt = [1u8, 2, 3, 4];
        let mut h = Sha512::new();
        h.update(salt);
        h.update(b"pw");
        let hash = B64.encode(h.finalize());
        let salt_b64 = B64.encode(salt);
        assert!(validate_imported("sha-512", &hash, Some(&salt_b64)).is_ok());
        assert!(verify("sha-512", &hash, Some(&salt_b64), b"pw"));
        assert!(!verify("sha-512", &hash, None, b"pw"));
        let plain256 = B64.encode(Sha256::digest(b"pw"));
        assert!(verify("sha-256", &plain256, None, b"pw"));
        assert!(validate_imported("sha-256", &hash, None).is_err());
    }

    #[test]
    fn bcrypt_import() {
        let h = bcrypt::hash("pw", 4).unwrap();
        assert!(validate_imported("bcrypt", &h, None).is_ok());
        assert!(verify("bcrypt", &h, None, b"pw"));
        assert!(!verify("bcrypt", &h, None, b"px"));
        let slow = h.replacen("$04$", "$31$", 1);
        assert_eq!(validate_imported("bcrypt", &slow, None), Err(PasswordError::BadHash("bcrypt")));
        assert!(validate_imported("md5", "x", None).is_err());
    }
}
