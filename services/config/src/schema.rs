//! JSON Schema checks of written values. Schemas live in the database (so
//! every replica applies the same ones); compiled validators are cached by
//! schema text, so a write pays one small query, not a compilation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jsonschema::Validator;

/// Compiled validators by schema text.
#[derive(Default)]
pub struct Schemas {
    compiled: Mutex<HashMap<String, Arc<Validator>>>,
}

impl Schemas {
    /// Compiles `text`; the error says why it is not a usable schema.
    pub fn compile(&self, text: &str) -> Result<Arc<Validator>, String> {
        if let Some(v) = self.cached(text) {
            return Ok(v);
        }
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if !json.is_object() && !json.is_boolean() {
            return Err("a JSON Schema is an object".into());
        }
        let validator = Arc::new(jsonschema::validator_for(&json).map_err(|e| e.to_string())?);
        match self.compiled.lock() {
            Ok(mut c) => {
                if c.len() > 1024 {
                    c.clear();
                }
                c.insert(text.to_owned(), validator.clone());
            }
            Err(p) => {
                p.into_inner().insert(text.to_owned(), validator.clone());
            }
        }
        Ok(validator)
    }

    fn cached(&self, text: &str) -> Option<Arc<Validator>> {
        match self.compiled.lock() {
            Ok(c) => c.get(text).cloned(),
            Err(p) => p.into_inner().get(text).cloned(),
        }
    }

    /// Checks `value` of `key` against the schema of the longest prefix of
    /// `schemas` ((prefix, text) pairs) that `key` starts with. The error
    /// names the failed rule and where in the value it failed.
    /// For a `secret`, the message leaves the value out.
    pub fn check(
        &self,
        schemas: &[(String, String)],
        key: &str,
        value: &serde_json::Value,
        secret: bool,
    ) -> Result<(), String> {
        let Some((prefix, text)) = schemas
            .iter()
            .filter(|(p, _)| key.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
        else {
            return Ok(());
        };
        let validator = self.compile(text)?;
        let errors: Vec<String> = validator
            .iter_errors(value)
            .take(3)
            .map(|e| {
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { "the value".to_owned() } else { at };
                let what = if secret {
                    "the secret value is not valid".to_owned()
                } else {
                    e.to_string()
                };
                format!(
                    "{at}: {what} (rule `{}` at {}, schema of prefix {prefix:?})",
                    e.kind().keyword(),
                    e.schema_path()
                )
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_longest_matching_prefix_decides_and_errors_name_the_rule() {
        let s = Schemas::default();
        let schemas = vec![
            (String::new(), json!({"type": "string"}).to_string()),
            (
                "limits/".to_owned(),
                json!({"type": "integer", "maximum": 10}).to_string(),
            ),
        ];
        assert!(s.check(&schemas, "name", &json!("x"), false).is_ok());
        assert!(s.check(&schemas, "name", &json!(1), false).is_err());
        assert!(s.check(&schemas, "limits/a", &json!(5), false).is_ok());
        let err = s.check(&schemas, "limits/a", &json!(11), false).unwrap_err();
        assert!(err.contains("maximum"), "{err}");
        let masked = s.check(&schemas, "limits/a", &json!(123456), true).unwrap_err();
        assert!(masked.contains("maximum") && !masked.contains("123456"), "{masked}");
    }

    #[test]
    fn unusable_schemas_are_refused() {
        let s = Schemas::default();
        assert!(s.compile("{").is_err());
        assert!(s.compile(r#"{"type": 12}"#).is_err());
        assert!(s.compile(r#"{"$ref": "https://example.com/x.json"}"#).is_err());
    }
}
