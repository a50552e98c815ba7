//! Input rules for the KV store: key and namespace names, value depth and size.
//!
//! Depth is measured on the raw JSON text before it is parsed, so a hostile body of
//! 100,000 nested brackets is refused without recursing into it.

use serde_json::Value;

use super::KvError;

/// Deepest nesting a stored value may have (`[]` has depth 1, a scalar 0).
pub const MAX_DEPTH: usize = 32;
/// Longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 255;
/// Longest namespace name, in characters (all ASCII).
pub const MAX_NAMESPACE_LEN: usize = 128;

/// A key is 1-255 bytes of UTF-8 without control characters and must not start with `$`.
pub fn key(key: &str) -> Result<(), KvError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(KvError::InvalidKey(format!(
            "key must be 1-{MAX_KEY_BYTES} bytes, got {}",
            key.len()
        )));
    }
    if key
        .chars()
        .any(|c| c.is_control() && (c <= '\u{1f}' || c == '\u{7f}'))
    {
        return Err(KvError::InvalidKey(
            "key must not contain control characters".into(),
        ));
    }
    if key.starts_with('$') {
        return Err(KvError::ReservedKey(key.to_string()));
    }
    Ok(())
}

/// A namespace is 1-128 characters of `[A-Za-z0-9._:@-]`.
pub fn namespace(ns: &str) -> Result<(), KvError> {
    let ok = (1..=MAX_NAMESPACE_LEN).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KvError::InvalidParam(format!(
            "namespace `{ns}` must be 1-{MAX_NAMESPACE_LEN} characters of [A-Za-z0-9._:@-]"
        )))
    }
}

/// Nesting depth of a parsed value.
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Parses a request body as a JSON value to be stored (or merged): depth is checked on
/// the raw text first, then the JSON is parsed.
pub fn parse_json(body: &[u8]) -> Result<Value, KvError> {
    serde_json::from_slice(body).map_err(json_error)
}

/// Maps a serde_json error: a number that does not fit a finite float, or nesting past
/// the parser's recursion limit (128, far beyond the 32 levels a value may have), is a
/// value that may not be stored (422); anything else is malformed JSON (400).
pub fn json_error(e: serde_json::Error) -> KvError {
    let msg = e.to_string();
    if msg.contains("number out of range") {
        KvError::InvalidValue(format!("numbers must be finite: {msg}"))
    } else if past_parser_depth(&e) {
        too_deep()
    } else {
        KvError::InvalidJson(msg)
    }
}

/// Whether serde_json stopped at its recursion limit (128 levels, well-formed or not):
/// its errors carry no code for it but the message.
pub fn past_parser_depth(e: &serde_json::Error) -> bool {
    e.to_string().contains("recursion limit exceeded")
}

pub fn too_deep() -> KvError {
    KvError::InvalidValue(format!("value nests deeper than {MAX_DEPTH} levels"))
}

/// Checks a value about to be stored: not top-level null, depth ≤ 32, and returns its
/// serialized form (whose length the size limits are checked against).
pub fn storable(v: &Value, max_bytes: u64) -> Result<Vec<u8>, KvError> {
    let bytes = serde_json::to_vec(v).map_err(|e| KvError::Internal(e.to_string()))?;
    check_storable(v, bytes.len(), max_bytes)?;
    Ok(bytes)
}

/// [`storable`]'s checks of a value serialized in `len` bytes.
pub fn check_storable(v: &Value, len: usize, max_bytes: u64) -> Result<(), KvError> {
    if v.is_null() {
        return Err(KvError::InvalidValue(
            "a top-level null cannot be stored (use DELETE)".into(),
        ));
    }
    if depth(v) > MAX_DEPTH {
        return Err(too_deep());
    }
    if len as u64 > max_bytes {
        return Err(KvError::TooLarge {
            what: "value",
            limit_bytes: max_bytes,
            current_size_bytes: len as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys() {
        assert!(key("a").is_ok());
        assert!(key("user:1/profile é").is_ok());
        assert!(key(&"k".repeat(255)).is_ok());
        assert!(matches!(key(""), Err(KvError::InvalidKey(_))));
        assert!(matches!(key(&"k".repeat(256)), Err(KvError::InvalidKey(_))));
        assert!(matches!(key("a\nb"), Err(KvError::InvalidKey(_))));
        assert!(matches!(key("a\u{7f}"), Err(KvError::InvalidKey(_))));
        assert!(matches!(key("$meta"), Err(KvError::ReservedKey(_))));
        assert!(key("a$").is_ok());
    }

    #[test]
    fn namespaces() {
        for ok in ["default", "automation:42", "actor:u1", "a@b.c-d_e"] {
            assert!(namespace(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "é", &"n".repeat(129)] {
            assert!(namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn depth_counts_containers_and_skips_strings() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!([])), 1);
        assert_eq!(depth(&json!({"a": [{"b": 1}]})), 3);
    }

    #[test]
    fn parse_limits() {
        let deep = format!("{}{}", "[".repeat(33), "]".repeat(33));
        assert!(
            parse_json(deep.as_bytes()).is_ok(),
            "33 parses; storable() refuses"
        );
        let v = parse_json(deep.as_bytes()).unwrap();
        assert!(matches!(
            storable(&v, 1 << 20),
            Err(KvError::InvalidValue(_))
        ));
        let ok = format!("{}{}", "[".repeat(32), "]".repeat(32));
        assert!(storable(&parse_json(ok.as_bytes()).unwrap(), 1 << 20).is_ok());
        let hostile = "[".repeat(100_000);
        assert!(matches!(
            parse_json(hostile.as_bytes()),
            Err(KvError::InvalidValue(_))
        ));
        assert!(matches!(parse_json(b"{"), Err(KvError::InvalidJson(_))));
        // Unterminated, and no deeper than a value may be: malformed, not too deep.
        let cut = "[".repeat(40);
        assert!(matches!(
            parse_json(cut.as_bytes()),
            Err(KvError::InvalidJson(_))
        ));
        assert!(matches!(parse_json(b"NaN"), Err(KvError::InvalidJson(_))));
        assert!(matches!(
            parse_json(b"1e400"),
            Err(KvError::InvalidValue(_))
        ));
        assert!(matches!(
            storable(&json!(null), 10),
            Err(KvError::InvalidValue(_))
        ));
        assert!(matches!(
            storable(&json!("0123456789"), 10),
            Err(KvError::TooLarge {
                current_size_bytes: 12,
                ..
            })
        ));
    }
}
