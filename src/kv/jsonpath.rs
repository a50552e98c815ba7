//! Paths into JSON values for `?path=`: dot and bracket notation such as `a.b[0].c` and
//! `a["odd.key"]`.

use serde_json::Value;

use super::KvError;
use super::validate::MAX_DEPTH;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Field(String),
    Index(usize),
}

/// A parsed path: at least one segment, at most [`MAX_DEPTH`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPath(pub Vec<Segment>);

fn bad(path: &str, why: &str) -> KvError {
    KvError::InvalidPath(format!("path `{path}`: {why}"))
}

impl JsonPath {
    pub fn parse(path: &str) -> Result<Self, KvError> {
        let bytes = path.as_bytes();
        let mut segs = Vec::new();
        let mut i = 0;
        let mut expect_field = true; // at the start or after a '.'
        while i < bytes.len() {
            match bytes[i] {
                b'[' => {
                    let rest = &path[i + 1..];
                    if rest.starts_with('"') {
                        // A JSON string literal: find its closing quote, honouring escapes.
                        let mut j = 1;
                        let rb = rest.as_bytes();
                        let mut escaped = false;
                        while j < rb.len() {
                            match (escaped, rb[j]) {
                                (true, _) => escaped = false,
                                (false, b'\\') => escaped = true,
                                (false, b'"') => break,
                                _ => {}
                            }
                            j += 1;
                        }
                        if j >= rb.len() || rb.get(j + 1) != Some(&b']') {
                            return Err(bad(path, "unterminated [\"...\"]"));
                        }
                        let name: String = serde_json::from_str(&rest[..=j])
                            .map_err(|_| bad(path, "invalid string in [\"...\"]"))?;
                        segs.push(Segment::Field(name));
                        i += 1 + j + 2;
                    } else {
                        let end = rest.find(']').ok_or_else(|| bad(path, "unterminated ["))?;
                        let digits = &rest[..end];
                        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                            return Err(bad(path, "an index must be a non-negative integer"));
                        }
                        let n = digits
                            .parse()
                            .map_err(|_| bad(path, "index out of range"))?;
                        segs.push(Segment::Index(n));
                        i += 1 + end + 1;
                    }
                    expect_field = false;
                }
                b'.' => {
                    if expect_field {
                        return Err(bad(path, "empty segment"));
                    }
                    expect_field = true;
                    i += 1;
                }
                _ => {
                    if !expect_field {
                        return Err(bad(path, "expected `.` or `[` between segments"));
                    }
                    let end = path[i..]
                        .find(['.', '['])
                        .map(|e| i + e)
                        .unwrap_or(path.len());
                    let name = &path[i..end];
                    if name.contains(']') {
                        return Err(bad(path, "unmatched `]`"));
                    }
                    segs.push(Segment::Field(name.to_string()));
                    i = end;
                    expect_field = false;
                }
            }
        }
        if segs.is_empty() || expect_field {
            return Err(bad(path, "empty segment"));
        }
        if segs.len() > MAX_DEPTH {
            return Err(bad(path, "deeper than 32 segments"));
        }
        Ok(Self(segs))
    }

    /// The value at this path, if every segment exists.
    pub fn get<'v>(&self, mut v: &'v Value) -> Option<&'v Value> {
        for seg in &self.0 {
            v = match (seg, v) {
                (Segment::Field(f), Value::Object(o)) => o.get(f)?,
                (Segment::Index(i), Value::Array(a)) => a.get(*i)?,
                _ => return None,
            };
        }
        Some(v)
    }

    /// Sets the value at this path. Missing intermediate fields become objects; an index
    /// may name an existing element or the position just past the end (append).
    pub fn set(&self, root: &mut Value, new: Value, display: &str) -> Result<(), KvError> {
        let not_found = || KvError::PathNotFound(display.to_string());
        let wrong = |what: &str| KvError::WrongType(format!("path `{display}`: {what}"));
        let (last, init) = self.0.split_last().ok_or_else(not_found)?;
        let mut cur = root;
        for (k, seg) in init.iter().enumerate() {
            cur = match seg {
                // A missing field is created as an object, unless the path indexes it:
                // arrays are not made up.
                Segment::Field(f) => match cur {
                    Value::Object(o)
                        if !o.contains_key(f) && matches!(self.0[k + 1], Segment::Index(_)) =>
                    {
                        return Err(not_found());
                    }
                    Value::Object(o) => o
                        .entry(f.clone())
                        .or_insert_with(|| Value::Object(Default::default())),
                    _ => {
                        return Err(wrong(&format!(
                            "`{f}` is set on a value that is not an object"
                        )));
                    }
                },
                Segment::Index(i) => match cur {
                    Value::Array(a) => a.get_mut(*i).ok_or_else(not_found)?,
                    _ => {
                        return Err(wrong(&format!(
                            "[{i}] indexes a value that is not an array"
                        )));
                    }
                },
            };
        }
        match last {
            Segment::Field(f) => match cur {
                Value::Object(o) => {
                    o.insert(f.clone(), new);
                }
                _ => {
                    return Err(wrong(&format!(
                        "`{f}` is set on a value that is not an object"
                    )));
                }
            },
            Segment::Index(i) => match cur {
                Value::Array(a) if *i < a.len() => a[*i] = new,
                Value::Array(a) if *i == a.len() => a.push(new),
                Value::Array(_) => return Err(not_found()),
                _ => {
                    return Err(wrong(&format!(
                        "[{i}] indexes a value that is not an array"
                    )));
                }
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(s: &str) -> Vec<Segment> {
        JsonPath::parse(s).unwrap().0
    }

    #[test]
    fn parses_dot_and_bracket_notation() {
        use Segment::*;
        assert_eq!(p("a"), vec![Field("a".into())]);
        assert_eq!(
            p("a.b[0].c"),
            vec![
                Field("a".into()),
                Field("b".into()),
                Index(0),
                Field("c".into())
            ]
        );
        assert_eq!(
            p(r#"a["odd.key"]"#),
            vec![Field("a".into()), Field("odd.key".into())]
        );
        assert_eq!(p(r#"["q\"x"][2]"#), vec![Field("q\"x".into()), Index(2)]);
        for bad in [
            "", ".", "a.", "a..b", "a[", "a[x]", "a[-1]", "a[0]b", r#"a["x"#, "a]",
        ] {
            assert!(JsonPath::parse(bad).is_err(), "{bad:?} should not parse");
        }
        let deep = vec!["a"; 33].join(".");
        assert!(JsonPath::parse(&deep).is_err());
    }

    #[test]
    fn get_and_set() {
        let mut v = json!({"a": {"b": [1, {"c": 2}]}});
        assert_eq!(
            JsonPath::parse("a.b[1].c").unwrap().get(&v),
            Some(&json!(2))
        );
        assert_eq!(JsonPath::parse("a.x").unwrap().get(&v), None);
        JsonPath::parse("a.b[1].c")
            .unwrap()
            .set(&mut v, json!(3), "")
            .unwrap();
        JsonPath::parse("x.y.z")
            .unwrap()
            .set(&mut v, json!(true), "")
            .unwrap();
        JsonPath::parse("a.b[2]")
            .unwrap()
            .set(&mut v, json!("end"), "")
            .unwrap();
        assert_eq!(
            v,
            json!({"a": {"b": [1, {"c": 3}, "end"]}, "x": {"y": {"z": true}}})
        );
        assert!(matches!(
            JsonPath::parse("a.b[9]").unwrap().set(&mut v, json!(1), ""),
            Err(KvError::PathNotFound(_))
        ));
        assert!(matches!(
            JsonPath::parse("a.b.c").unwrap().set(&mut v, json!(1), ""),
            Err(KvError::WrongType(_))
        ));
        // A missing field that the path indexes is not made up (as an object or
        // an array), and the value is left as it was.
        let before = v.clone();
        for p in ["a.new[0]", "x.y.new[0].z"] {
            assert!(
                matches!(
                    JsonPath::parse(p).unwrap().set(&mut v, json!(1), ""),
                    Err(KvError::PathNotFound(_))
                ),
                "{p}"
            );
        }
        assert_eq!(v, before);
    }
}
