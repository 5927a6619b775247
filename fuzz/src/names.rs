//! The `names` target: validation of every kind of name, identifier quoting and lock-channel
//! payloads never panic and agree with their documented rules.

use pgiplock_core::{
    quote_ident, AppName, ChannelName, Marker, Protocol, SchemaName, LOCK_CHANNEL_PREFIX, MAX_CHANNEL_BYTES,
    MAX_IDENTIFIER_BYTES,
};

/// Runs the checks on `data` taken as text (lossily, when it is not UTF-8).
///
/// ```
/// pgiplock_fuzz::names(b"orders \"EU\"");
/// pgiplock_fuzz::names(&[0xff, 0x00, b'a']);
/// ```
pub fn names(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_all(&text);
    // Also every prefix cut at a character boundary: limits are about bytes, not characters.
    if let Some((cut, _)) = text.char_indices().nth(MAX_CHANNEL_BYTES / 2) {
        check_all(&text[..cut]);
    }
}

fn check_all(name: &str) {
    check_channel(name);
    check_app(name);
    check_schema(name);
    check_quote(name);
    check_marker(name);
    let _ = name.parse::<Protocol>();
}

fn check_channel(name: &str) {
    let valid = !name.is_empty()
        && !name.contains('\0')
        && name.len() <= MAX_CHANNEL_BYTES
        && !name.starts_with(LOCK_CHANNEL_PREFIX);
    match ChannelName::new(name) {
        Ok(channel) => {
            assert!(valid, "accepted channel {name:?}");
            assert_eq!(channel.as_str(), name);
            assert_eq!(channel.lock_channel(), format!("{LOCK_CHANNEL_PREFIX}{name}"));
            assert!(channel.lock_channel().len() <= MAX_IDENTIFIER_BYTES);
            let _ = channel.to_string();
            let _ = format!("{channel:?}");
        }
        Err(e) => {
            assert!(!valid, "refused channel {name:?}: {e}");
            let _ = e.to_string();
        }
    }
}

fn check_app(name: &str) {
    let valid =
        !name.is_empty() && name.len() <= MAX_IDENTIFIER_BYTES && name.bytes().all(|b| (0x20..=0x7e).contains(&b));
    match AppName::new(name) {
        Ok(app) => {
            assert!(valid, "accepted application name {name:?}");
            assert_eq!(app.as_str(), name);
        }
        Err(e) => {
            assert!(!valid, "refused application name {name:?}: {e}");
            let _ = e.to_string();
        }
    }
}

fn check_schema(name: &str) {
    let valid = !name.is_empty() && !name.contains('\0') && name.len() <= MAX_IDENTIFIER_BYTES;
    match SchemaName::new(name) {
        Ok(schema) => {
            assert!(valid, "accepted schema {name:?}");
            assert_eq!(schema.as_str(), name);
        }
        Err(e) => {
            assert!(!valid, "refused schema {name:?}: {e}");
            let _ = e.to_string();
        }
    }
}

/// Reads a quoted identifier back the way PostgreSQL does: strip the outer quotes, `""` is `"`.
fn unquote(quoted: &str) -> Option<String> {
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '"' {
            // A lone quote would end the identifier early: quoting must have doubled it.
            if chars.next() != Some('"') {
                return None;
            }
        }
        out.push(c);
    }
    Some(out)
}

fn check_quote(name: &str) {
    let quoted = quote_ident(name);
    assert_eq!(
        unquote(&quoted).as_deref(),
        Some(name),
        "quote_ident({name:?}) = {quoted}"
    );
    assert_eq!(quoted.len(), name.len() + 2 + name.matches('"').count());
}

fn check_marker(payload: &str) {
    // Parsing never panics; anything that is not one of our prefixes is a release (as in
    // pg-pubsub); a marker parses back from the payload we would send for it.
    let marker = Marker::parse(payload);
    let ours = ["draining", "released:", "acquired:"]
        .iter()
        .any(|p| payload.starts_with(p));
    if !ours {
        assert!(
            matches!(marker, Some(Marker::Released(None))),
            "{payload:?} -> {marker:?}"
        );
    }
    if let Some(marker) = marker {
        assert_eq!(Marker::parse(&marker.payload()), Some(marker), "{payload:?}");
    }
}
