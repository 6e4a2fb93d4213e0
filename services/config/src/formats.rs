//! Environments as documents: JSON and YAML mappings of key → value, and
//! dotenv lines. Import reads a document into typed values; export writes
//! one. Nothing here touches storage.

use crate::model::Plain;

/// A document format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A JSON object.
    Json,
    /// A YAML mapping.
    Yaml,
    /// `KEY=value` lines.
    Dotenv,
}

/// Parses a document into (key, value) pairs in document order. JSON and
/// YAML keep types (string, number, bool; anything else is a JSON value);
/// dotenv values are strings.
pub fn parse(format: Format, content: &str) -> Result<Vec<(String, Plain)>, String> {
    match format {
        Format::Json => {
            let v: serde_json::Value = serde_json::from_str(content).map_err(|e| format!("not JSON: {e}"))?;
            from_object(v)
        }
        Format::Yaml => {
            let v: serde_json::Value = serde_yaml_ng::from_str(content)
                .map_err(|e| format!("not YAML (or not representable as JSON): {e}"))?;
            from_object(v)
        }
        Format::Dotenv => parse_dotenv(content),
    }
}

fn from_object(v: serde_json::Value) -> Result<Vec<(String, Plain)>, String> {
    let serde_json::Value::Object(map) = v else {
        return Err("the document must be a mapping of key to value".into());
    };
    Ok(map
        .into_iter()
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::String(s) => Plain::String(s),
                serde_json::Value::Bool(b) => Plain::Bool(b),
                serde_json::Value::Number(n) if n.as_f64().is_some_and(f64::is_finite) => {
                    Plain::Number(n.as_f64().unwrap_or_default())
                }
                other => Plain::Json(other),
            };
            (k, value)
        })
        .collect())
}

fn parse_dotenv(content: &str) -> Result<Vec<(String, Plain)>, String> {
    let mut out = Vec::new();
    for (n, raw) in content.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (name, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected NAME=value", n + 1))?;
        let name = name.trim();
        let value = value.trim();
        let value = if let Some(inner) = value.strip_prefix('"') {
            let inner = inner
                .strip_suffix('"')
                .ok_or_else(|| format!("line {}: unterminated double quote", n + 1))?;
            unescape(inner)
        } else if let Some(inner) = value.strip_prefix('\'') {
            inner
                .strip_suffix('\'')
                .ok_or_else(|| format!("line {}: unterminated single quote", n + 1))?
                .to_owned()
        } else {
            // An unquoted value ends at a comment.
            value.split(" #").next().unwrap_or_default().trim_end().to_owned()
        };
        // A later line wins, as shells and dotenv loaders have it.
        out.retain(|(k, _): &(String, Plain)| k != name);
        out.push((name.to_owned(), Plain::String(value)));
    }
    Ok(out)
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// The environment variable name of a key: upper case, other characters `_`.
pub fn env_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes (key, value) pairs as a document.
pub fn render(format: Format, values: &[(String, Plain)]) -> Result<String, String> {
    match format {
        Format::Json | Format::Yaml => {
            let map: serde_json::Map<String, serde_json::Value> =
                values.iter().map(|(k, v)| (k.clone(), v.to_json())).collect();
            let doc = serde_json::Value::Object(map);
            if format == Format::Json {
                serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())
            } else {
                serde_yaml_ng::to_string(&doc).map_err(|e| e.to_string())
            }
        }
        Format::Dotenv => {
            let mut out = String::new();
            for (k, v) in values {
                let text = match v {
                    Plain::String(s) => s.clone(),
                    other => other.to_json().to_string(),
                };
                let escaped = text
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
                    .replace('\r', "\\r");
                out.push_str(&format!("{}=\"{escaped}\"\n", env_name(k)));
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_keep_types_and_round_trip() {
        let values = vec![
            ("db/url".to_owned(), Plain::String("postgres://x".into())),
            ("limits/max".to_owned(), Plain::Number(5.0)),
            ("flags/new".to_owned(), Plain::Bool(true)),
            ("list".to_owned(), Plain::Json(serde_json::json!([1, 2]))),
        ];
        for f in [Format::Json, Format::Yaml] {
            let doc = render(f, &values).unwrap();
            let mut back = parse(f, &doc).unwrap();
            back.sort_by(|a, b| a.0.cmp(&b.0));
            let mut want = values.clone();
            want.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(back, want, "{f:?}: {doc}");
        }
    }

    #[test]
    fn dotenv_reads_quotes_comments_and_export() {
        let doc = "# c\nexport A=1\nB=\"two\\nlines\" \nC='lit\\n'\nD=plain # comment\n\n";
        let got = parse(Format::Dotenv, doc).unwrap();
        let s = |v: &str| Plain::String(v.into());
        assert_eq!(
            got,
            vec![
                ("A".into(), s("1")),
                ("B".into(), s("two\nlines")),
                ("C".into(), s("lit\\n")),
                ("D".into(), s("plain"))
            ]
        );
        assert!(parse(Format::Dotenv, "NOEQUALS").is_err());
        assert_eq!(parse(Format::Dotenv, "A=1\nA=2\n").unwrap(), vec![("A".into(), s("2"))]);
        let out = render(Format::Dotenv, &[("db/url".into(), s("a\"b"))]).unwrap();
        assert_eq!(out, "DB_URL=\"a\\\"b\"\n");
    }

    #[test]
    fn a_document_that_is_not_a_mapping_is_refused() {
        assert!(parse(Format::Json, "[1]").is_err());
        assert!(parse(Format::Yaml, "- a").is_err());
        assert!(parse(Format::Json, "{").is_err());
    }
}
