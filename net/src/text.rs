//! Decoding text that arrives in URLs and topics (HTTP paths and queries, MQTT property
//! bags, the management API): strict percent-decoding over the `percent-encoding` crate.

/// Percent-decodes `s` into UTF-8 (`+` as a space when `plus_is_space`, as in query
/// strings and MQTT property bags). Strict: every `%` must be followed by exactly two hex
/// digits (`percent-encoding` alone would keep a malformed escape as it is), and the
/// result must be UTF-8. `None` otherwise.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let escapes_ok = bytes.iter().enumerate().filter(|(_, b)| **b == b'%').all(|(i, _)| {
        bytes.get(i + 1..i + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_ok {
        return None;
    }
    let decode =
        |s: &str| percent_encoding::percent_decode_str(s).decode_utf8().ok().map(Into::into);
    if plus_is_space && s.contains('+') {
        decode(&s.replace('+', " "))
    } else {
        decode(s)
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn strict_percent_decoding() {
        assert_eq!(percent_decode("a%20b+c", true).as_deref(), Some("a b c"));
        assert_eq!(percent_decode("a%20b+c", false).as_deref(), Some("a b+c"));
        assert_eq!(percent_decode("%2B", true).as_deref(), Some("+"));
        assert_eq!(percent_decode("caf%C3%A9", false).as_deref(), Some("café"));
        for bad in ["%", "%4", "%+4", "%zz", "a%2", "%FF"] {
            assert_eq!(percent_decode(bad, true), None, "{bad}");
        }
    }
}
