//! X.509 client certificates (Hono's `x509-cert` credentials).
//!
//! A device presents a certificate in the TLS handshake of an adapter. The adapter only
//! checks that the certificate is well formed, currently valid and that the client owns
//! its key; everything else happens here, after the handshake:
//!
//! 1. the certificate must be fit for a TLS client ([`ClientCertificate::parse`]): not a
//!    CA (BasicConstraints `cA` false or absent), KeyUsage (if present) with
//!    `digitalSignature`, ExtendedKeyUsage (if present) with `clientAuth` (or
//!    `anyExtendedKeyUsage`, as Java's PKIX checker accepts it);
//! 2. the certificate's issuer DN selects the one tenant whose `trusted-ca` has that
//!    subject DN (DNs compared by their [`dn_key`]). The management API keeps trusted-CA
//!    subject DNs unique across tenants (409 Conflict); if stored data still has a subject
//!    in several enabled tenants (written before that rule), the certificate is refused
//!    rather than given to one of them;
//! 3. the certificate's signature must verify with that tenant's CA public key (the
//!    issuer DER compared exactly when the CA was registered with `cert` or
//!    `subject-dn-bytes`), and the CA entry must be valid now (`not-before`/`not-after`);
//! 4. the certificate's subject DN in RFC 2253 form (what Java's
//!    `X500Principal.getName()` prints, as Hono uses) is the auth-id of the device's
//!    `x509-cert` credentials in that tenant.
//!
//! Only certificates issued directly by a tenant's trusted CA are accepted (no
//! intermediate CAs between the trust anchor and the device); no OCSP or CRL checks
//! (`ocsp-revocation-enabled: true` is refused by the management API).

use base64::Engine;
use chrono::{DateTime, Utc};
use x509_parser::oid_registry::{
    Oid, OID_X509_EXT_BASIC_CONSTRAINTS, OID_X509_EXT_EXTENDED_KEY_USAGE, OID_X509_EXT_KEY_USAGE,
};
use x509_parser::prelude::{
    FromDer, ParsedExtension, SubjectPublicKeyInfo, X509Certificate, X509Name,
};

use crate::model::{TenantId, TrustedCa};

/// A parsed client certificate: the parts authentication needs.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    /// The subject DN, RFC 2253 (the auth-id).
    pub subject_dn: String,
    /// The issuer DN, RFC 2253.
    pub issuer_dn: String,
    /// The issuer DN as DER, compared with anchors known by their DER subject.
    issuer_der: Vec<u8>,
    der: Vec<u8>,
}

/// Why a client certificate was not accepted (all map to "bad credentials" for the
/// device; the reason is for logs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("not a DER X.509 certificate")]
    Malformed,
    #[error("certificate not valid at this time")]
    OutsideValidity,
    #[error("no tenant trusts the issuer {0}")]
    UnknownIssuer(String),
    #[error("signature does not verify with the trusted CA's key")]
    BadSignature,
    #[error("no usable x509-cert credential for the subject in the issuer's tenant")]
    UnknownSubject,
    /// The certificate may not authenticate a TLS client (a CA certificate, or KeyUsage /
    /// ExtendedKeyUsage without the client purposes).
    #[error("not a TLS client certificate: {0}")]
    NotForClientAuth(&'static str),
    /// Several tenants trust a CA with the issuer's subject DN (data stored before
    /// uniqueness was enforced): the device's tenant is ambiguous.
    #[error("several tenants trust the issuer {0}")]
    AmbiguousIssuer(String),
}

impl ClientCertificate {
    /// Parses `der`, checks its validity period against `now` and that it is fit for TLS
    /// client authentication ([`check_client_usage`]).
    ///
    /// # Errors
    /// [`CertError::Malformed`], [`CertError::OutsideValidity`],
    /// [`CertError::NotForClientAuth`].
    pub fn parse(der: &[u8], now: DateTime<Utc>) -> Result<Self, CertError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|_| CertError::Malformed)?;
        if !rest.is_empty() {
            return Err(CertError::Malformed);
        }
        let validity = cert.validity();
        let t = now.timestamp();
        if t < validity.not_before.timestamp() || t > validity.not_after.timestamp() {
            return Err(CertError::OutsideValidity);
        }
        check_client_usage(&cert)?;
        Ok(Self {
            subject_dn: rfc2253(cert.subject()),
            issuer_dn: rfc2253(cert.issuer()),
            issuer_der: cert.issuer().as_raw().to_vec(),
            der: der.to_vec(),
        })
    }

    /// The DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// Whether `anchor`'s subject DN names this certificate's issuer, compared by
    /// [`dn_key`] (the test that selects the issuer's tenant; [`Self::verify_issued_by`]
    /// then compares exactly and checks the signature).
    pub fn issuer_named_by(&self, anchor: &TrustAnchor) -> bool {
        anchor.subject_key == dn_key(&self.issuer_dn)
    }

    /// Whether `anchor` issued this certificate: issuer matches and the signature
    /// verifies with the anchor's key.
    ///
    /// # Errors
    /// [`CertError::UnknownIssuer`] if the issuer does not match, [`CertError::BadSignature`]
    /// if it matches but the signature does not verify.
    pub fn verify_issued_by(&self, anchor: &TrustAnchor) -> Result<(), CertError> {
        // Names first, without parsing: most anchors are some other tenant's CA.
        let issuer_matches = match &anchor.subject_der {
            Some(raw) => *raw == self.issuer_der,
            None => normalize_dn(&anchor.subject_dn) == normalize_dn(&self.issuer_dn),
        };
        if !issuer_matches {
            return Err(CertError::UnknownIssuer(self.issuer_dn.clone()));
        }
        // Parsed successfully in `parse`.
        let (_, cert) = X509Certificate::from_der(&self.der).map_err(|_| CertError::Malformed)?;
        let (_, spki) = SubjectPublicKeyInfo::from_der(&anchor.public_key)
            .map_err(|_| CertError::BadSignature)?;
        cert.verify_signature(Some(&spki)).map_err(|_| CertError::BadSignature)
    }
}

/// Refuses certificates that must not authenticate a device: CA certificates
/// (BasicConstraints `cA` true), a KeyUsage without `digitalSignature` (needed to sign
/// the TLS handshake), an ExtendedKeyUsage without `clientAuth` or `anyExtendedKeyUsage`.
/// Absent extensions restrict nothing (RFC 5280). One of these extensions present twice
/// or not decodable makes the certificate [`CertError::Malformed`].
///
/// # Errors
/// [`CertError::NotForClientAuth`], [`CertError::Malformed`].
pub fn check_client_usage(cert: &X509Certificate<'_>) -> Result<(), CertError> {
    let extension = |oid: &Oid<'_>| {
        cert.get_extension_unique(oid)
            .map(|e| e.map(|e| e.parsed_extension()))
            .map_err(|_| CertError::Malformed)
    };
    match extension(&OID_X509_EXT_BASIC_CONSTRAINTS)? {
        None => {}
        Some(ParsedExtension::BasicConstraints(bc)) if bc.ca => {
            return Err(CertError::NotForClientAuth("CA certificate (BasicConstraints cA)"));
        }
        Some(ParsedExtension::BasicConstraints(_)) => {}
        Some(_) => return Err(CertError::Malformed),
    }
    match extension(&OID_X509_EXT_KEY_USAGE)? {
        None => {}
        Some(ParsedExtension::KeyUsage(ku)) if !ku.digital_signature() => {
            return Err(CertError::NotForClientAuth("KeyUsage lacks digitalSignature"));
        }
        Some(ParsedExtension::KeyUsage(_)) => {}
        Some(_) => return Err(CertError::Malformed),
    }
    match extension(&OID_X509_EXT_EXTENDED_KEY_USAGE)? {
        None => {}
        Some(ParsedExtension::ExtendedKeyUsage(eku)) if !eku.client_auth && !eku.any => {
            return Err(CertError::NotForClientAuth("ExtendedKeyUsage lacks clientAuth"));
        }
        Some(ParsedExtension::ExtendedKeyUsage(_)) => {}
        Some(_) => return Err(CertError::Malformed),
    }
    Ok(())
}

/// The RFC 2253 subject DN of a DER certificate (`None` if it does not parse).
pub fn subject_dn(der: &[u8]) -> Option<String> {
    X509Certificate::from_der(der).ok().map(|(_, c)| rfc2253(c.subject()))
}

/// The form in which subject DNs of trusted CAs are compared for uniqueness across
/// tenants and against a client certificate's issuer: RFC 2253 with attribute types
/// upper-cased and the optional spaces around separators dropped (values stay
/// case-sensitive). Two DER names with the same RFC 2253 string (e.g. differing only
/// in string types) have the same key.
pub fn dn_key(rfc2253_dn: &str) -> String {
    normalize_dn(rfc2253_dn)
}

/// The subject DN (RFC 2253) a `trusted-ca` entry names, by the same precedence
/// [`TrustAnchor::from_trusted_ca`] uses: from `cert`, else `subject-dn-bytes`, else
/// `subject-dn`.
///
/// # Errors
/// A message naming the field if `cert` or `subject-dn-bytes` is not valid base64 DER
/// (a certificate, a Name).
pub fn trusted_ca_subject(ca: &TrustedCa) -> Result<Option<String>, &'static str> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.decode(s).ok();
    if let Some(cert) = &ca.cert {
        let der = b64(cert).ok_or("trusted-ca cert is not valid base64")?;
        return match X509Certificate::from_der(&der) {
            Ok((_, c)) => Ok(Some(rfc2253(c.subject()))),
            Err(_) => Err("trusted-ca cert is not a DER X.509 certificate"),
        };
    }
    if let Some(raw) = &ca.subject_dn_bytes {
        let der = b64(raw).ok_or("trusted-ca subject-dn-bytes is not valid base64")?;
        return match X509Name::from_der(&der) {
            Ok((_, name)) => Ok(Some(rfc2253(&name))),
            Err(_) => Err("trusted-ca subject-dn-bytes is not a DER X.501 Name"),
        };
    }
    Ok(ca.subject_dn.clone())
}

/// One tenant's trusted CA, decoded from its `trusted-ca` entry.
#[derive(Debug, Clone)]
pub struct TrustAnchor {
    pub tenant: TenantId,
    /// RFC 2253 subject DN of the CA.
    pub subject_dn: String,
    /// [`dn_key`] of `subject_dn`.
    subject_key: String,
    /// DER subject DN, when known exactly (from `cert` or `subject-dn-bytes`).
    subject_der: Option<Vec<u8>>,
    /// DER SubjectPublicKeyInfo.
    public_key: Vec<u8>,
    not_before: Option<DateTime<Utc>>,
    not_after: Option<DateTime<Utc>>,
}

impl TrustAnchor {
    /// Decodes a tenant's `trusted-ca` entry: from `cert` (base64 DER certificate), or
    /// from `subject-dn`/`subject-dn-bytes` with `public-key`. `None` if the entry is
    /// unusable (it then trusts nothing).
    pub fn from_trusted_ca(tenant: &TenantId, ca: &TrustedCa) -> Option<Self> {
        let b64 = |s: &Option<String>| {
            s.as_deref().and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        };
        let (mut not_before, mut not_after) = (ca.not_before, ca.not_after);
        let (subject_dn, subject_der, public_key) = if let Some(der) = b64(&ca.cert) {
            let (_, cert) = X509Certificate::from_der(&der).ok()?;
            let validity = cert.validity();
            let at = |t: i64| DateTime::<Utc>::from_timestamp(t, 0);
            not_before = not_before.or_else(|| at(validity.not_before.timestamp()));
            not_after = not_after.or_else(|| at(validity.not_after.timestamp()));
            (
                rfc2253(cert.subject()),
                Some(cert.subject().as_raw().to_vec()),
                cert.public_key().raw.to_vec(),
            )
        } else {
            let public_key = b64(&ca.public_key)?;
            match (b64(&ca.subject_dn_bytes), &ca.subject_dn) {
                (Some(raw), _) => {
                    let (_, name) = X509Name::from_der(&raw).ok()?;
                    (rfc2253(&name), Some(raw.clone()), public_key)
                }
                (None, Some(dn)) => (dn.clone(), None, public_key),
                (None, None) => return None,
            }
        };
        Some(Self {
            tenant: tenant.clone(),
            subject_key: dn_key(&subject_dn),
            subject_dn,
            subject_der,
            public_key,
            not_before,
            not_after,
        })
    }

    /// Whether the entry's validity window contains `now`.
    pub fn valid_at(&self, now: DateTime<Utc>) -> bool {
        self.not_before.is_none_or(|t| t <= now) && self.not_after.is_none_or(|t| now <= t)
    }
}

/// Compares DNs written by people: attribute types case-insensitively, without the
/// optional spaces after separators.
fn normalize_dn(dn: &str) -> String {
    let mut out = String::with_capacity(dn.len());
    let mut chars = dn.chars().peekable();
    let mut in_type = true;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                out.push(c);
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            ',' | '+' | ';' => {
                while out.ends_with(' ') && !out.ends_with("\\ ") {
                    out.pop();
                }
                out.push(if c == ';' { ',' } else { c });
                while chars.peek() == Some(&' ') {
                    chars.next();
                }
                in_type = true;
            }
            '=' if in_type => {
                while out.ends_with(' ') {
                    out.pop();
                }
                out.push('=');
                while chars.peek() == Some(&' ') {
                    chars.next();
                }
                in_type = false;
            }
            c if in_type => out.extend(c.to_uppercase()),
            c => out.push(c),
        }
    }
    out.trim_end().to_owned()
}

/// Formats a name as RFC 2253 does: last RDN first, `,` between RDNs, `+` inside one,
/// the usual keywords, other types as dotted OIDs with the hex DER value.
pub fn rfc2253(name: &X509Name<'_>) -> String {
    let rdns: Vec<_> = name.iter().collect();
    let mut out = String::new();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = attr.attr_type().to_id_string();
            let keyword = match oid.as_str() {
                "2.5.4.3" => Some("CN"),
                "2.5.4.6" => Some("C"),
                "2.5.4.7" => Some("L"),
                "2.5.4.8" => Some("ST"),
                "2.5.4.9" => Some("STREET"),
                "2.5.4.10" => Some("O"),
                "2.5.4.11" => Some("OU"),
                "0.9.2342.19200300.100.1.25" => Some("DC"),
                "0.9.2342.19200300.100.1.1" => Some("UID"),
                _ => None,
            };
            // BMPString/UniversalString/TeletexString are printed as hex, like other types.
            let text = attr.as_str().ok();
            match (keyword, text) {
                (Some(k), Some(v)) => {
                    out.push_str(k);
                    out.push('=');
                    escape_value(v, &mut out);
                }
                (k, _) => {
                    out.push_str(k.map_or(oid.as_str(), |k| k));
                    out.push_str("=#");
                    let der =
                        x509_parser::der_parser::asn1_rs::ToDer::to_der_vec(attr.attr_value())
                            .unwrap_or_default();
                    for b in der {
                        out.push_str(&format!("{b:02x}"));
                    }
                }
            }
        }
    }
    out
}

fn escape_value(v: &str, out: &mut String) {
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

    fn ca(cn: &str) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "Acme, Inc");
        params.distinguished_name.push(DnType::CommonName, cn);
        (params.self_signed(&key).expect("ca"), key)
    }

    fn device(issuer: &(rcgen::Certificate, KeyPair), cn: &str) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::new()).expect("params");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CountryName, "DE");
        params.distinguished_name.push(DnType::OrganizationName, "Acme");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.signed_by(&key, &issuer.0, &issuer.1).expect("leaf").der().to_vec()
    }

    fn anchor_of(ca: &(rcgen::Certificate, KeyPair)) -> TrustAnchor {
        let trusted = TrustedCa {
            cert: Some(base64::engine::general_purpose::STANDARD.encode(ca.0.der())),
            ..serde_json::from_str("{}").expect("empty trusted-ca")
        };
        TrustAnchor::from_trusted_ca(&TenantId::new("t1").expect("id"), &trusted).expect("anchor")
    }

    #[test]
    fn subject_dn_is_rfc2253_most_specific_first() {
        let ca = ca("Root");
        let cert =
            ClientCertificate::parse(&device(&ca, "Device 4711"), Utc::now()).expect("parses");
        assert_eq!(cert.subject_dn, "CN=Device 4711,O=Acme,C=DE");
        assert_eq!(cert.issuer_dn, "CN=Root,O=Acme\\, Inc");
        assert_eq!(subject_dn(cert.der()).as_deref(), Some("CN=Device 4711,O=Acme,C=DE"));
    }

    #[test]
    fn only_the_issuing_ca_verifies() {
        let (root, other) = (ca("Root"), ca("Other"));
        let cert = ClientCertificate::parse(&device(&root, "d"), Utc::now()).expect("parses");
        cert.verify_issued_by(&anchor_of(&root)).expect("issued by root");
        assert!(matches!(
            cert.verify_issued_by(&anchor_of(&other)),
            Err(CertError::UnknownIssuer(_))
        ));
        // Same subject DN, different key: the signature check catches the impostor.
        let impostor = ca("Root");
        assert_eq!(cert.verify_issued_by(&anchor_of(&impostor)), Err(CertError::BadSignature));
        // A CA given as subject DN + public key (no certificate) works as well.
        let by_key = TrustedCa {
            subject_dn: Some("cn=Root, o=Acme\\, Inc".into()),
            public_key: Some(
                base64::engine::general_purpose::STANDARD.encode(root.1.public_key_der()),
            ),
            ..serde_json::from_str("{}").expect("empty trusted-ca")
        };
        let anchor = TrustAnchor::from_trusted_ca(&TenantId::new("t1").expect("id"), &by_key)
            .expect("anchor");
        cert.verify_issued_by(&anchor).expect("issued by root (key form)");
    }

    #[test]
    fn expired_and_garbage_are_refused() {
        let ca = ca("Root");
        let der = device(&ca, "d");
        let later = Utc::now() + chrono::Duration::days(365 * 5000);
        assert_eq!(ClientCertificate::parse(&der, later).err(), Some(CertError::OutsideValidity));
        assert_eq!(ClientCertificate::parse(b"nope", Utc::now()).err(), Some(CertError::Malformed));
    }

    /// A leaf issued by `issuer` with the given usages and CA flag (and a SAN: rcgen
    /// writes no extensions, not even KeyUsage, without one of SAN/EKU/BasicConstraints).
    fn leaf(
        issuer: &(rcgen::Certificate, KeyPair),
        is_ca: rcgen::IsCa,
        key_usages: Vec<rcgen::KeyUsagePurpose>,
        extended: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["d.example".into()]).expect("params");
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "d");
        params.is_ca = is_ca;
        params.key_usages = key_usages;
        params.extended_key_usages = extended;
        params.signed_by(&key, &issuer.0, &issuer.1).expect("leaf").der().to_vec()
    }

    #[test]
    fn only_client_certificates_authenticate_devices() {
        use rcgen::KeyUsagePurpose as Ku;
        use rcgen::{BasicConstraints as Bc, ExtendedKeyUsagePurpose as Eku, IsCa};
        let root = ca("Root");
        let parse = |der: Vec<u8>| ClientCertificate::parse(&der, Utc::now()).map(|_| ());
        // Accepted: no usage extensions, the usual client profile, explicit cA false,
        // anyExtendedKeyUsage (Java's PKIX checker accepts it for TLS clients).
        parse(leaf(&root, IsCa::NoCa, vec![], vec![])).expect("no usage extensions");
        parse(device(&root, "no extensions at all")).expect("no extensions");
        parse(leaf(&root, IsCa::ExplicitNoCa, vec![Ku::DigitalSignature], vec![Eku::ClientAuth]))
            .expect("client profile");
        parse(leaf(
            &root,
            IsCa::NoCa,
            vec![Ku::DigitalSignature, Ku::KeyEncipherment],
            vec![Eku::ServerAuth, Eku::ClientAuth],
        ))
        .expect("client and server");
        parse(leaf(&root, IsCa::NoCa, vec![], vec![Eku::Any])).expect("any purpose");
        // Refused.
        let refused = |what| Err(CertError::NotForClientAuth(what));
        let ca_flag = "CA certificate (BasicConstraints cA)";
        assert_eq!(
            parse(leaf(&root, IsCa::Ca(Bc::Unconstrained), vec![], vec![])),
            refused(ca_flag)
        );
        assert_eq!(
            parse(leaf(
                &root,
                IsCa::Ca(Bc::Constrained(0)),
                vec![Ku::DigitalSignature],
                vec![Eku::ClientAuth]
            )),
            refused(ca_flag)
        );
        assert_eq!(parse(root.0.der().to_vec()), refused(ca_flag), "a self-signed root");
        let no_ds = "KeyUsage lacks digitalSignature";
        assert_eq!(
            parse(leaf(&root, IsCa::NoCa, vec![Ku::KeyEncipherment], vec![])),
            refused(no_ds)
        );
        assert_eq!(
            parse(leaf(&root, IsCa::NoCa, vec![Ku::KeyAgreement], vec![Eku::ClientAuth])),
            refused(no_ds)
        );
        let no_client = "ExtendedKeyUsage lacks clientAuth";
        assert_eq!(
            parse(leaf(&root, IsCa::NoCa, vec![], vec![Eku::ServerAuth])),
            refused(no_client)
        );
        assert_eq!(
            parse(leaf(&root, IsCa::NoCa, vec![Ku::DigitalSignature], vec![Eku::CodeSigning])),
            refused(no_client)
        );
    }

    #[test]
    fn trusted_ca_subjects_and_keys() {
        let root = ca("Root");
        let by_cert = TrustedCa {
            cert: Some(base64::engine::general_purpose::STANDARD.encode(root.0.der())),
            ..serde_json::from_str("{}").expect("empty trusted-ca")
        };
        let by_name = TrustedCa {
            subject_dn: Some("cn = Root , o=Acme\\, Inc".into()),
            ..serde_json::from_str("{}").expect("empty trusted-ca")
        };
        let cert_dn = trusted_ca_subject(&by_cert).expect("ok").expect("subject");
        assert_eq!(cert_dn, "CN=Root,O=Acme\\, Inc");
        let name_dn = trusted_ca_subject(&by_name).expect("ok").expect("subject");
        assert_eq!(dn_key(&cert_dn), dn_key(&name_dn));
        let garbage = TrustedCa {
            cert: Some(base64::engine::general_purpose::STANDARD.encode(b"not DER")),
            ..serde_json::from_str("{}").expect("empty trusted-ca")
        };
        assert!(trusted_ca_subject(&garbage).is_err());
        let none: TrustedCa = serde_json::from_str("{}").expect("empty trusted-ca");
        assert_eq!(trusted_ca_subject(&none), Ok(None));
    }

    #[test]
    fn normalizes_people_written_dns() {
        assert_eq!(
            normalize_dn("cn = Device 1, O=Acme\\, Inc ; c=DE"),
            normalize_dn("CN=Device 1,O=Acme\\, Inc,C=DE")
        );
        assert_ne!(normalize_dn("CN=device 1"), normalize_dn("CN=Device 1"));
    }

    #[test]
    fn escapes_rfc2253_specials() {
        let mut out = String::new();
        escape_value(" a,b+c ", &mut out);
        assert_eq!(out, "\\ a\\,b\\+c\\ ");
        let mut out = String::new();
        escape_value("#x", &mut out);
        assert_eq!(out, "\\#x");
    }
}
