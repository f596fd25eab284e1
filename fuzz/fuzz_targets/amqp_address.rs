//! AMQP addresses from applications (link source/target, a message's `to`) and the SASL
//! PLAIN identity before them: `address::AddressTable::resolve`, `pattern_matches`,
//! `tenant_of`, `Identity::may_use`, and `Authenticator::verify` on the authcid and
//! password split out of a PLAIN initial response as `sasl.rs` splits it.
//!
//! Input: the address (lossy UTF-8); the same bytes as a PLAIN initial response
//! (`authzid NUL authcid NUL password`). Checked: no panic, bounded time and memory.
#![no_main]

use ferrule_messaging::address::{self, AddressRule, AddressTable, AddressType};
use ferrule_messaging::{Authenticator, Identity, SaslConfig, UserConfig};
use libfuzzer_sys::fuzz_target;
use std::net::IpAddr;
use std::sync::OnceLock;

/// Configured rules of each pattern kind, before the defaults.
fn table() -> &'static AddressTable {
    static TABLE: OnceLock<AddressTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        AddressTable::new(&[
            AddressRule::new("news/*", AddressType::Topic),
            AddressRule::new("fleet/#", AddressType::Queue),
            AddressRule::new("audit/*/#/log", AddressType::Topic),
            AddressRule::new("a/*/c", AddressType::Multicast),
        ])
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = table().resolve(&text);
    let _ = address::tenant_of(&text);
    for pattern in ["telemetry/*", "fleet/#", "audit/*/#/log", "#"] {
        let _ = address::pattern_matches(pattern, &text);
    }
    for tenant in [None, Some("t1".to_owned())] {
        let _ = Identity { user: "u".into(), tenant }.may_use(&text);
    }
    // SASL PLAIN (RFC 4616), split as ConnectionSasl::on_init does.
    let mut parts = data.split(|b| *b == 0);
    let (Some(_authzid), Some(authcid), Some(password)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Ok(authcid) = std::str::from_utf8(authcid) else { return };
    // A new authenticator each time (it remembers failures): plain-text passwords, since
    // argon2 would make every run take milliseconds.
    let user = |username: &str, password: &str| UserConfig {
        username: username.into(),
        password: password.into(),
    };
    let sasl = SaslConfig {
        allow_anonymous: false,
        users: vec![user("app@t1", "secret"), user("ops@*", "root")],
    };
    let authenticator = Authenticator::new(&sasl);
    let source = IpAddr::from([192, 0, 2, 1]);
    let _ = authenticator.verify(authcid, password, source);
    // Again: a repeated wrong password is refused without verifying, a right one is cached.
    let _ = authenticator.verify(authcid, password, source);
});
