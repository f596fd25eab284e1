//! Search parameters of `GET /v1/tenants` and `GET /v1/devices/TENANT`: `pageSize`,
//! `pageOffset`, `filterJson` (repeatable, all must match), `sortJson` (repeatable, applied
//! in order), `isGateway` (devices only). Pure functions over JSON values, so both stores
//! share them. Results are computed over the full list of a tenant's devices; fine for the
//! sizes an embedded registry holds, a known limit for very large tenants.

use std::cmp::Ordering;

use serde::Deserialize;
use serde_json::Value;

/// A bad search parameter (400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct SearchError(pub String);

/// Hono's maximum `pageSize`.
pub const MAX_PAGE_SIZE: usize = 200;
/// Hono's default `pageSize`.
pub const DEFAULT_PAGE_SIZE: usize = 30;
/// Most filter or sort options per request.
const MAX_OPTIONS: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Filter {
    field: String,
    #[serde(default = "eq")]
    op: String,
    value: Value,
}

fn eq() -> String {
    "eq".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sort {
    field: String,
    #[serde(default)]
    direction: Option<String>,
}

/// Parsed search parameters.
#[derive(Debug, Default)]
pub struct Search {
    page_size: Option<usize>,
    page_offset: usize,
    filters: Vec<Filter>,
    sorts: Vec<(String, bool)>,
    /// `isGateway`, if given.
    pub is_gateway: Option<bool>,
}

fn pointer_ok(p: &str) -> bool {
    p.is_empty() || p.starts_with('/')
}

impl Search {
    /// Parses decoded query pairs.
    ///
    /// # Errors
    /// [`SearchError`] naming the bad parameter.
    pub fn from_query(pairs: &[(String, String)]) -> Result<Self, SearchError> {
        let mut s = Search::default();
        for (k, v) in pairs {
            match k.as_str() {
                "pageSize" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| SearchError("pageSize must be an integer 0..=200".into()))?;
                    if n > MAX_PAGE_SIZE {
                        return Err(SearchError("pageSize must be an integer 0..=200".into()));
                    }
                    s.page_size = Some(n);
                }
                "pageOffset" => {
                    s.page_offset = v.parse().map_err(|_| {
                        SearchError("pageOffset must be a non-negative integer".into())
                    })?;
                }
                "filterJson" => {
                    let f: Filter = serde_json::from_str(v)
                        .map_err(|e| SearchError(format!("invalid filterJson: {e}")))?;
                    if f.op != "eq" {
                        return Err(SearchError("filterJson: op must be \"eq\"".into()));
                    }
                    if !pointer_ok(&f.field) {
                        return Err(SearchError("filterJson: field must be a JSON pointer".into()));
                    }
                    if !matches!(f.value, Value::Bool(_) | Value::Number(_) | Value::String(_)) {
                        return Err(SearchError(
                            "filterJson: value must be a boolean, number or string".into(),
                        ));
                    }
                    s.filters.push(f);
                }
                "sortJson" => {
                    let o: Sort = serde_json::from_str(v)
                        .map_err(|e| SearchError(format!("invalid sortJson: {e}")))?;
                    let desc = match o.direction.as_deref() {
                        None | Some("asc") => false,
                        Some("desc") => true,
                        Some(_) => {
                            return Err(SearchError(
                                "sortJson: direction must be asc or desc".into(),
                            ))
                        }
                    };
                    if !pointer_ok(&o.field) {
                        return Err(SearchError("sortJson: field must be a JSON pointer".into()));
                    }
                    s.sorts.push((o.field, desc));
                }
                "isGateway" => {
                    s.is_gateway = Some(match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(SearchError("isGateway must be true or false".into())),
                    });
                }
                // Unknown parameters are ignored, as most HTTP APIs do.
                _ => {}
            }
            if s.filters.len() > MAX_OPTIONS || s.sorts.len() > MAX_OPTIONS {
                return Err(SearchError(format!(
                    "at most {MAX_OPTIONS} filterJson/sortJson options"
                )));
            }
        }
        Ok(s)
    }

    /// Filters, sorts and pages `items` (each a JSON object including its `id`);
    /// returns (total matches, page).
    pub fn apply(&self, mut items: Vec<Value>) -> (usize, Vec<Value>) {
        items.retain(|item| self.filters.iter().all(|f| matches(item.pointer(&f.field), &f.value)));
        if !self.sorts.is_empty() {
            items.sort_by(|a, b| {
                for (field, desc) in &self.sorts {
                    let o = compare(a.pointer(field), b.pointer(field));
                    let o = if *desc { o.reverse() } else { o };
                    if o != Ordering::Equal {
                        return o;
                    }
                }
                Ordering::Equal
            });
        }
        let total = items.len();
        let size = self.page_size.unwrap_or(DEFAULT_PAGE_SIZE);
        let page = items.into_iter().skip(self.page_offset).take(size).collect();
        (total, page)
    }
}

fn matches(actual: Option<&Value>, wanted: &Value) -> bool {
    match (actual, wanted) {
        (Some(Value::String(a)), Value::String(w)) => glob(w.as_bytes(), a.as_bytes()),
        (Some(Value::Number(a)), Value::Number(w)) => a.as_f64() == w.as_f64(),
        (Some(a), w) => a == w,
        (None, _) => false,
    }
}

/// `*` matches any run of characters, `?` exactly one (byte-wise; ASCII ids and most
/// values are fine). Iterative with backtracking to the last `*`: linear-ish, no recursion.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

fn rank(v: Option<&Value>) -> u8 {
    match v {
        None | Some(Value::Null) => 0,
        Some(Value::Bool(_)) => 1,
        Some(Value::Number(_)) => 2,
        Some(Value::String(_)) => 3,
        Some(_) => 4,
    }
}

fn compare(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    match (a, b) {
        (Some(Value::Bool(x)), Some(Value::Bool(y))) => x.cmp(y),
        (Some(Value::Number(x)), Some(Value::Number(y))) => {
            x.as_f64().partial_cmp(&y.as_f64()).unwrap_or(Ordering::Equal)
        }
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn glob_wildcards() {
        assert!(glob(b"eclipse*", b"eclipse-hono"));
        assert!(glob(b"e?lipse", b"eclipse"));
        assert!(!glob(b"e?lipse", b"elipse"));
        assert!(glob(b"*", b""));
        assert!(glob(b"a*b*c", b"axxbyyc"));
    }

    #[test]
    fn filter_sort_page() {
        let items = vec![
            json!({"id": "a", "ext": {"brand": "eclipse-1", "n": 3}}),
            json!({"id": "b", "ext": {"brand": "other", "n": 1}}),
            json!({"id": "c", "ext": {"brand": "eclipse-2", "n": 2}}),
        ];
        let s = Search::from_query(&q(&[
            ("filterJson", r#"{"field":"/ext/brand","value":"eclipse*"}"#),
            ("sortJson", r#"{"field":"/ext/n","direction":"asc"}"#),
            ("pageSize", "1"),
            ("pageOffset", "1"),
        ]))
        .unwrap();
        let (total, page) = s.apply(items);
        assert_eq!(total, 2);
        assert_eq!(page, vec![json!({"id": "a", "ext": {"brand": "eclipse-1", "n": 3}})]);
    }

    #[test]
    fn bad_parameters() {
        assert!(Search::from_query(&q(&[("pageSize", "201")])).is_err());
        assert!(Search::from_query(&q(&[("pageSize", "-1")])).is_err());
        assert!(Search::from_query(&q(&[("filterJson", "{")])).is_err());
        assert!(Search::from_query(&q(&[("filterJson", r#"{"field":"/a","value":1,"op":"lt"}"#)]))
            .is_err());
        assert!(
            Search::from_query(&q(&[("sortJson", r#"{"field":"/a","direction":"up"}"#)])).is_err()
        );
    }
}
