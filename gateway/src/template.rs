//! Path templates of `google/api/http.proto`, parsed once at start-up and
//! matched against the raw (still percent-encoded) request path, so that a
//! multi-segment variable can keep `%2F` while a single-segment one decodes
//! everything, as the spec says and grpc-gateway's `AllExceptReserved` does.

use std::fmt;

/// A template could not be parsed; the message names the template.
#[derive(Debug, thiserror::Error)]
#[error("path template {template:?}: {reason}")]
pub struct TemplateError {
    template: String,
    reason: &'static str,
}

/// One segment matcher.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `*`: exactly one segment.
    One,
    /// `**`: zero or more segments; only last.
    Rest,
}

/// A variable binding: the field path and the segment range it captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    /// Dotted field path (`book.name`).
    pub field_path: Vec<String>,
    start: usize,
    /// Exclusive end; for a variable ending in `**` this is the segment count.
    end: usize,
}

impl Variable {
    /// The parameter name in OpenAPI documents (`book_name` for `book.name`).
    pub fn openapi_name(&self) -> String {
        self.field_path.join("_")
    }
}

/// A compiled path template.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    source: String,
    segments: Vec<Segment>,
    variables: Vec<Variable>,
    verb: Option<String>,
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// A variable's value, decoded as the spec says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// The variable's field path.
    pub field_path: Vec<String>,
    /// The decoded value.
    pub value: String,
}

impl PathTemplate {
    /// Parses `Template = "/" Segments [ Verb ]`.
    pub fn parse(template: &str) -> Result<Self, TemplateError> {
        let err = |reason| TemplateError {
            template: template.to_owned(),
            reason,
        };
        let rest = template.strip_prefix('/').ok_or_else(|| err("must start with '/'"))?;
        // The verb is a ':' after the last '/' that is outside braces.
        let (body, verb) = split_verb(rest);
        let mut segments = Vec::new();
        let mut variables = Vec::new();
        let mut chars = body;
        while !chars.is_empty() {
            if let Some(inner) = chars.strip_prefix('{') {
                let close = inner.find('}').ok_or_else(|| err("unclosed '{'"))?;
                let spec = &inner[..close];
                if spec.contains('{') {
                    return Err(err("a variable may not contain another variable"));
                }
                let (path, pattern) = match spec.split_once('=') {
                    Some((p, pat)) => (p, pat),
                    None => (spec, "*"),
                };
                let field_path: Vec<String> = path.split('.').map(str::to_owned).collect();
                if field_path.iter().any(|s| !is_ident(s)) {
                    return Err(err("a variable must name a field path"));
                }
                let start = segments.len();
                for part in pattern.split('/') {
                    segments.push(parse_segment(part).ok_or_else(|| err("empty segment"))?);
                }
                variables.push(Variable {
                    field_path,
                    start,
                    end: segments.len(),
                });
                chars = &inner[close + 1..];
            } else {
                let end = chars.find('/').unwrap_or(chars.len());
                let part = &chars[..end];
                if part.contains('{') || part.contains('}') {
                    return Err(err("a variable must be a whole segment"));
                }
                segments.push(parse_segment(part).ok_or_else(|| err("empty segment"))?);
                chars = &chars[end..];
            }
            if let Some(next) = chars.strip_prefix('/') {
                if next.is_empty() {
                    return Err(err("trailing '/'"));
                }
                chars = next;
            } else if !chars.is_empty() {
                return Err(err("a variable must be a whole segment"));
            }
        }
        if let Some(pos) = segments.iter().position(|s| *s == Segment::Rest)
            && pos + 1 != segments.len()
        {
            return Err(err("'**' must be the last segment"));
        }
        if segments.is_empty() {
            return Err(err("no segments"));
        }
        Ok(Self {
            source: template.to_owned(),
            segments,
            variables,
            verb: verb.map(str::to_owned),
        })
    }

    /// The variables in order.
    pub fn variables(&self) -> &[Variable] {
        &self.variables
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The template in OpenAPI form: `/v1/{name}` with multi-segment
    /// variables kept as one parameter, the verb appended. Dotted field paths
    /// become `a_b`, so `/users/{user.id}` and `/users/{user_id}` are one
    /// OpenAPI path (matching is positional; the names only document).
    pub fn openapi_path(&self) -> String {
        let mut out = String::new();
        let mut i = 0;
        while i < self.segments.len() {
            out.push('/');
            if let Some(v) = self.variables.iter().find(|v| v.start == i) {
                out.push('{');
                out.push_str(&v.openapi_name());
                out.push('}');
                i = v.end.max(i + 1);
                continue;
            }
            match &self.segments[i] {
                Segment::Literal(l) => out.push_str(l),
                Segment::One => out.push('*'),
                Segment::Rest => out.push_str("**"),
            }
            i += 1;
        }
        if let Some(verb) = &self.verb {
            out.push(':');
            out.push_str(verb);
        }
        out
    }

    /// Matches `raw_path` (percent-encoded, query removed); on success the
    /// variables' decoded values.
    pub fn matches(&self, raw_path: &str) -> Option<Vec<Capture>> {
        let rest = raw_path.strip_prefix('/')?;
        let rest = match &self.verb {
            Some(verb) => {
                let stem = rest.strip_suffix(verb.as_str())?.strip_suffix(':')?;
                // The verb belongs to the last segment, never a segment of its own.
                if stem.ends_with('/') {
                    return None;
                }
                stem
            }
            None => rest,
        };
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        let has_rest = self.segments.last() == Some(&Segment::Rest);
        let fixed = if has_rest {
            self.segments.len() - 1
        } else {
            self.segments.len()
        };
        if parts.len() < fixed || (!has_rest && parts.len() != fixed) {
            return None;
        }
        for (segment, part) in self.segments.iter().zip(&parts) {
            match segment {
                Segment::Literal(l) => {
                    if percent_decode(part, false)? != *l {
                        return None;
                    }
                }
                Segment::One => {
                    if part.is_empty() {
                        return None;
                    }
                }
                Segment::Rest => {}
            }
        }
        let mut captures = Vec::with_capacity(self.variables.len());
        for v in &self.variables {
            let end = if has_rest && v.end == self.segments.len() {
                parts.len()
            } else {
                v.end
            };
            let slice = &parts[v.start..end];
            let single = end - v.start == 1 && self.segments[v.start] != Segment::Rest;
            let raw = slice.join("/");
            captures.push(Capture {
                field_path: v.field_path.clone(),
                value: percent_decode(&raw, !single)?,
            });
        }
        Some(captures)
    }
}

fn split_verb(rest: &str) -> (&str, Option<&str>) {
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let last_close = rest.rfind('}').map_or(0, |i| i + 1);
    let from = last_slash.max(last_close);
    match rest[from..].find(':') {
        Some(i) => (&rest[..from + i], Some(&rest[from + i + 1..])),
        None => (rest, None),
    }
}

fn parse_segment(part: &str) -> Option<Segment> {
    match part {
        "" => None,
        "*" => Some(Segment::One),
        "**" => Some(Segment::Rest),
        literal => Some(Segment::Literal(literal.to_owned())),
    }
}

fn is_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Percent-decodes `s`; with `keep_slash`, `%2F`/`%2f` stay encoded.
/// `None` when the result is not UTF-8 or an escape is malformed.
pub fn percent_decode(s: &str, keep_slash: bool) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let value = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            if keep_slash && value == b'/' {
                out.extend_from_slice(&bytes[i..i + 3]);
            } else {
                out.push(value);
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capture(t: &str, path: &str) -> Option<Vec<(String, String)>> {
        PathTemplate::parse(t)
            .unwrap()
            .matches(path)
            .map(|c| c.into_iter().map(|c| (c.field_path.join("."), c.value)).collect())
    }

    fn pairs(p: &[(&str, &str)]) -> Option<Vec<(String, String)>> {
        Some(p.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect())
    }

    #[test]
    fn literal_and_simple_variable() {
        assert_eq!(capture("/v1/books/{name}", "/v1/books/b1"), pairs(&[("name", "b1")]));
        assert_eq!(capture("/v1/books/{name}", "/v1/books"), None);
        assert_eq!(capture("/v1/books/{name}", "/v1/books/b1/x"), None);
        assert_eq!(capture("/v1/books/{name}", "/v1/books/"), None);
    }

    #[test]
    fn nested_field_path_and_multi_segment_variable() {
        assert_eq!(
            capture("/v1/{book.name=shelves/*/books/*}", "/v1/shelves/s1/books/b2"),
            pairs(&[("book.name", "shelves/s1/books/b2")])
        );
        assert_eq!(
            capture("/v1/{book.name=shelves/*/books/*}", "/v1/shelves/s1/b/b2"),
            None
        );
    }

    #[test]
    fn double_wildcard_matches_zero_or_more() {
        assert_eq!(
            capture("/v1/files/{path=**}", "/v1/files/a/b/c"),
            pairs(&[("path", "a/b/c")])
        );
        assert_eq!(capture("/v1/files/{path=**}", "/v1/files"), pairs(&[("path", "")]));
        assert_eq!(capture("/v1/x/**", "/v1/x/1/2"), pairs(&[]));
        assert!(PathTemplate::parse("/v1/**/x").is_err());
    }

    #[test]
    fn verbs_are_a_suffix_of_the_last_segment() {
        assert_eq!(
            capture("/v1/{name=ops/*}:cancel", "/v1/ops/o1:cancel"),
            pairs(&[("name", "ops/o1")])
        );
        assert_eq!(capture("/v1/{name=ops/*}:cancel", "/v1/ops/o1"), None);
        assert_eq!(capture("/v1/{name=ops/*}:cancel", "/v1/ops/o1:undo"), None);
        assert_eq!(capture("/v1/ops:batchGet", "/v1/ops:batchGet"), pairs(&[]));
        // A verb may itself contain a colon.
        assert_eq!(capture("/v1/{name}:a:b", "/v1/x:a:b"), pairs(&[("name", "x")]));
        // Without a verb in the template a colon is part of the value.
        assert_eq!(capture("/v1/{name}", "/v1/x:y"), pairs(&[("name", "x:y")]));
    }

    #[test]
    fn single_segment_decodes_everything_multi_segment_keeps_slash() {
        assert_eq!(
            capture("/v1/books/{name}", "/v1/books/a%2Fb%20c"),
            pairs(&[("name", "a/b c")])
        );
        assert_eq!(
            capture("/v1/{name=shelves/*}", "/v1/shelves/a%2Fb%20c"),
            pairs(&[("name", "shelves/a%2Fb c")])
        );
        assert_eq!(
            capture("/v1/files/{path=**}", "/v1/files/a%2fb/c"),
            pairs(&[("path", "a%2fb/c")])
        );
        assert_eq!(capture("/v1/books/{name}", "/v1/books/%ZZ"), None);
    }

    #[test]
    fn bad_templates_are_refused() {
        for t in ["v1/x", "/v1/{a", "/v1/{a={b}}", "/v1/x{a}", "/v1/x/", "/v1/{1a}"] {
            assert!(PathTemplate::parse(t).is_err(), "{t}");
        }
    }

    #[test]
    fn openapi_path_collapses_variables() {
        let t = PathTemplate::parse("/v1/{name=shelves/*/books/*}:cancel").unwrap();
        assert_eq!(t.openapi_path(), "/v1/{name}:cancel");
    }
}
