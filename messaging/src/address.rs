//! Addresses: their types, the patterns that declare them, and the tenant they belong to.
//!
//! Every Ferrule address has the shape `PREFIX/TENANT[/REST]` (`telemetry/t1`,
//! `command_response/t1/app-7`). The tenant is always the second segment, which is what
//! per-tenant authorisation checks.

use serde::{Deserialize, Serialize};

/// How an address routes messages (EnMasse's standard address types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressType {
    /// Direct: each message goes to one consumer with credit; never stored.
    Anycast,
    /// Direct: each message goes to every consumer with credit; never stored.
    Multicast,
    /// Store-and-forward: durable, competing consumers, TTL, dead-lettering, bounded depth.
    Queue,
    /// Store-and-forward publish/subscribe: every subscription (durable when named) gets a copy.
    Topic,
}

/// One `[[messaging.addresses]]` entry: a pattern and the type of the addresses it matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddressRule {
    /// Segments separated by `/`; `+` matches exactly one segment; `*` matches exactly
    /// one segment, except as the last segment where it matches one or more; `#` matches
    /// zero or more segments.
    pub pattern: String,
    /// The type given to matching addresses.
    #[serde(rename = "type")]
    pub kind: AddressType,
    /// Addresses used by the platform itself (deferred commands): applications may neither
    /// attach to nor send to them, and their queues have no dead-letter queue (their
    /// messages' expiry is the point). Default `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal: bool,
}

impl AddressRule {
    pub fn new(pattern: &str, kind: AddressType) -> Self {
        Self { pattern: pattern.to_owned(), kind, internal: false }
    }

    /// A rule for addresses of the platform's own (see [`AddressRule::internal`]),
    /// registered by the component that uses them.
    pub fn internal(pattern: &str, kind: AddressType) -> Self {
        Self { pattern: pattern.to_owned(), kind, internal: true }
    }
}

/// The built-in rules, consulted after the configured ones: Hono's addresses and only
/// those (nothing after the tenant but an event queue's dead letters and a reply id), so
/// that an application cannot make the platform create nodes under names of its choosing.
pub fn default_rules() -> Vec<AddressRule> {
    vec![
        AddressRule::new("telemetry/+", AddressType::Anycast),
        AddressRule::new("event/+", AddressType::Queue),
        AddressRule::new("event/+/dlq", AddressType::Queue),
        AddressRule::new("command/+", AddressType::Anycast),
        AddressRule::new("command_response/+/*", AddressType::Anycast),
    ]
}

/// Prefix of the addresses the server creates for dynamic receiver links.
pub const DYNAMIC_PREFIX: &str = "dynamic";

/// Resolves addresses to types: configured rules first, in order, then the defaults.
#[derive(Debug, Clone)]
pub struct AddressTable {
    rules: Vec<AddressRule>,
}

impl AddressTable {
    pub fn new(configured: &[AddressRule]) -> Self {
        let mut rules = configured.to_vec();
        rules.extend(default_rules());
        rules.push(AddressRule::new(&format!("{DYNAMIC_PREFIX}/*"), AddressType::Anycast));
        Self { rules }
    }

    /// The type of `address`, or `None` if no rule matches it (the address does not exist).
    pub fn resolve(&self, address: &str) -> Option<AddressType> {
        self.rule(address).map(|rule| rule.kind)
    }

    /// The rule that declares `address`, if any.
    pub fn rule(&self, address: &str) -> Option<&AddressRule> {
        if address.is_empty() || address.split('/').any(str::is_empty) {
            return None;
        }
        self.rules.iter().find(|rule| pattern_matches(&rule.pattern, address))
    }
}

/// Matches `address` against `pattern` segment by segment (see [`AddressRule::pattern`]).
pub fn pattern_matches(pattern: &str, address: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').collect();
    let address: Vec<&str> = address.split('/').collect();
    matches_from(&pattern, &address)
}

fn matches_from(pattern: &[&str], address: &[&str]) -> bool {
    match (pattern.first(), address.first()) {
        (None, None) => true,
        (Some(&"#"), _) => {
            // Zero segments, or consume one and stay on `#`.
            matches_from(&pattern[1..], address)
                || (!address.is_empty() && matches_from(pattern, &address[1..]))
        }
        (Some(&"+"), Some(_)) => matches_from(&pattern[1..], &address[1..]),
        (Some(&"*"), Some(_)) if pattern.len() == 1 => true,
        (Some(&"*"), Some(_)) => matches_from(&pattern[1..], &address[1..]),
        (Some(p), Some(a)) if p == a => matches_from(&pattern[1..], &address[1..]),
        _ => false,
    }
}

/// The tenant an address belongs to: its second segment.
pub fn tenant_of(address: &str) -> Option<&str> {
    let mut segments = address.split('/');
    segments.next()?;
    segments.next().filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert!(pattern_matches("telemetry/*", "telemetry/t1"));
        assert!(pattern_matches("command_response/*", "command_response/t1/reply-1"));
        assert!(!pattern_matches("telemetry/*", "telemetry"));
        assert!(!pattern_matches("telemetry/*", "event/t1"));
        assert!(pattern_matches("a/*/c", "a/b/c"));
        assert!(!pattern_matches("a/*/c", "a/b/x/c"));
        assert!(pattern_matches("a/#", "a"));
        assert!(pattern_matches("a/#/z", "a/b/c/z"));
        assert!(pattern_matches("exact/name", "exact/name"));
        assert!(pattern_matches("telemetry/+", "telemetry/t1"));
        assert!(!pattern_matches("telemetry/+", "telemetry/t1/x"));
        assert!(!pattern_matches("telemetry/+", "telemetry"));
        assert!(pattern_matches("event/+/dlq", "event/t1/dlq"));
    }

    #[test]
    fn only_hono_shapes_by_default() {
        let table = AddressTable::new(&[]);
        for (address, kind) in [
            ("telemetry/t1", Some(AddressType::Anycast)),
            ("event/t1", Some(AddressType::Queue)),
            ("event/t1/dlq", Some(AddressType::Queue)),
            ("command/t1", Some(AddressType::Anycast)),
            ("command_response/t1/app-1", Some(AddressType::Anycast)),
            ("command_response/t1/app-1/d1", Some(AddressType::Anycast)),
            ("telemetry/t1/0b5f", None),
            ("event/t1/anything", None),
            ("event/t1/dlq/x", None),
            ("command/t1/d1", None),
            ("command_response/t1", None),
        ] {
            assert_eq!(table.resolve(address), kind, "{address}");
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let table = AddressTable::new(&[AddressRule::new("news/*", AddressType::Topic)]);
        assert_eq!(table.resolve("telemetry/t1"), Some(AddressType::Anycast));
        assert_eq!(table.resolve("event/t1"), Some(AddressType::Queue));
        assert_eq!(table.resolve("news/t1"), Some(AddressType::Topic));
        assert_eq!(table.resolve("news/t1/sports"), Some(AddressType::Topic));
        assert_eq!(table.resolve("nowhere/t1"), None);
        assert_eq!(table.resolve("telemetry//x"), None);
        let table = AddressTable::new(&[AddressRule::new("telemetry/*", AddressType::Multicast)]);
        assert_eq!(table.resolve("telemetry/t1"), Some(AddressType::Multicast));
        assert_eq!(table.resolve("telemetry/t1/x"), Some(AddressType::Multicast), "as configured");
    }

    #[test]
    fn tenants() {
        assert_eq!(tenant_of("telemetry/t1"), Some("t1"));
        assert_eq!(tenant_of("command_response/t1/abc"), Some("t1"));
        assert_eq!(tenant_of("telemetry"), None);
        assert_eq!(tenant_of("telemetry/"), None);
    }
}
