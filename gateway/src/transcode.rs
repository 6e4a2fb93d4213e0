//! HTTP request → protobuf message, in grpc-gateway's order: the body first,
//! then path variables (the path wins), then query parameters for fields
//! neither bound. Every failure names the field or parameter at fault.

use std::collections::HashSet;

use base64::Engine;
use prost_reflect::{
    DeserializeOptions, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, ReflectMessage,
    SerializeOptions, Value,
};

use crate::routes::{Binding, BodyTarget, HTTP_BODY};
use crate::template::Capture;

/// A request could not be turned into a message; becomes INVALID_ARGUMENT.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct TranscodeError {
    /// The field, parameter or `body` at fault.
    pub field: String,
    /// Why, in words a caller can act on.
    pub reason: String,
}

impl TranscodeError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

fn deserialize_options() -> DeserializeOptions {
    DeserializeOptions::new().deny_unknown_fields(false)
}

/// The JSON output options: lowerCamelCase names, 64-bit integers as
/// strings, enums by name, unpopulated fields emitted.
pub fn serialize_options() -> SerializeOptions {
    SerializeOptions::new()
        .skip_default_fields(false)
        .stringify_64_bit_integers(true)
        .use_enum_numbers(false)
        .use_proto_field_name(false)
}

/// Builds the request message of `binding`.
pub fn build_request(
    binding: &Binding,
    captures: &[Capture],
    query: Option<&str>,
    body: &[u8],
    content_type: Option<&str>,
) -> Result<DynamicMessage, TranscodeError> {
    let input = binding.rpc.input();
    let mut bound: Vec<Vec<String>> = Vec::new();
    let mut message = match &binding.body {
        BodyTarget::None => DynamicMessage::new(input.clone()),
        BodyTarget::Whole if input.full_name() == HTTP_BODY => http_body(&input, body, content_type),
        BodyTarget::Whole => decode_json(&input, body)?,
        BodyTarget::Field(field) => {
            bound.push(vec![field.name().to_owned()]);
            let mut message = DynamicMessage::new(input.clone());
            match field.kind() {
                Kind::Message(m) if m.full_name() == HTTP_BODY && !field.is_list() => {
                    message.set_field(field, Value::Message(http_body(&m, body, content_type)));
                }
                _ if body.iter().all(u8::is_ascii_whitespace) => {}
                _ => {
                    let mut wrapped = Vec::with_capacity(body.len() + field.json_name().len() + 6);
                    wrapped.extend_from_slice(b"{\"");
                    wrapped.extend_from_slice(field.json_name().as_bytes());
                    wrapped.extend_from_slice(b"\":");
                    wrapped.extend_from_slice(body);
                    wrapped.push(b'}');
                    message = decode_json(&input, &wrapped).map_err(|mut e| {
                        e.field = e.field.replacen(field.json_name(), field.name(), 1);
                        e
                    })?;
                    if let Some(mask) = &binding.patch_mask {
                        fill_patch_mask(&mut message, field, mask, body)?;
                    }
                }
            }
            message
        }
    };
    for capture in captures {
        set_path(&mut message, &capture.field_path, &capture.value)
            .map_err(|reason| TranscodeError::new(capture.field_path.join("."), reason))?;
        bound.push(capture.field_path.clone());
    }
    if !matches!(binding.body, BodyTarget::Whole)
        && let Some(query) = query
    {
        apply_query(&mut message, query, &bound)?;
    }
    Ok(message)
}

fn http_body(desc: &MessageDescriptor, body: &[u8], content_type: Option<&str>) -> DynamicMessage {
    let mut m = DynamicMessage::new(desc.clone());
    // Field names of google.api.HttpBody.
    m.set_field_by_name(
        "content_type",
        Value::String(content_type.unwrap_or_default().to_owned()),
    );
    m.set_field_by_name("data", Value::Bytes(bytes::Bytes::copy_from_slice(body)));
    m
}

/// Decodes canonical proto3 JSON; on failure, finds the field at fault.
pub fn decode_json(desc: &MessageDescriptor, body: &[u8]) -> Result<DynamicMessage, TranscodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(DynamicMessage::new(desc.clone()));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let result = DynamicMessage::deserialize_with_options(desc.clone(), &mut de, &deserialize_options())
        .and_then(|m| de.end().map(|()| m));
    result.map_err(|e| {
        let field = match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(value) => culprit(desc, &value).unwrap_or_else(|| "body".to_owned()),
            Err(_) => "body".to_owned(),
        };
        TranscodeError::new(field, format!("invalid JSON: {e}"))
    })
}

/// The dotted path of the first field in `value` that does not decode.
fn culprit(desc: &MessageDescriptor, value: &serde_json::Value) -> Option<String> {
    let serde_json::Value::Object(map) = value else {
        return None;
    };
    for (key, v) in map {
        let single = serde_json::Value::Object([(key.clone(), v.clone())].into_iter().collect());
        if DynamicMessage::deserialize_with_options(desc.clone(), single, &deserialize_options()).is_ok() {
            continue;
        }
        let field = desc.get_field_by_json_name(key).or_else(|| desc.get_field_by_name(key));
        let name = field.as_ref().map_or_else(|| key.clone(), |f| f.name().to_owned());
        if let Some(f) = field
            && let Kind::Message(m) = f.kind()
            && !f.is_list()
            && !f.is_map()
            && !m.full_name().starts_with("google.protobuf.")
            && let Some(inner) = culprit(&m, v)
        {
            return Some(format!("{name}.{inner}"));
        }
        return Some(name);
    }
    None
}

/// PATCH without `update_mask`: the mask is the JSON keys sent in the body
/// (recursing into nested messages, not into maps or well-known types).
fn fill_patch_mask(
    message: &mut DynamicMessage,
    body_field: &FieldDescriptor,
    mask: &FieldDescriptor,
    body: &[u8],
) -> Result<(), TranscodeError> {
    let Kind::Message(resource) = body_field.kind() else {
        return Ok(());
    };
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| TranscodeError::new("body", format!("invalid JSON: {e}")))?;
    let mut paths = Vec::new();
    collect_paths(&resource, &value, "", &mut paths);
    let Kind::Message(mask_desc) = mask.kind() else {
        return Ok(());
    };
    let mut m = DynamicMessage::new(mask_desc);
    m.set_field_by_name("paths", Value::List(paths.into_iter().map(Value::String).collect()));
    message.set_field(mask, Value::Message(m));
    Ok(())
}

fn collect_paths(desc: &MessageDescriptor, value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    let serde_json::Value::Object(map) = value else {
        return;
    };
    for (key, v) in map {
        let Some(f) = desc.get_field_by_json_name(key).or_else(|| desc.get_field_by_name(key)) else {
            continue;
        };
        let path = if prefix.is_empty() {
            f.name().to_owned()
        } else {
            format!("{prefix}.{}", f.name())
        };
        match f.kind() {
            Kind::Message(m)
                if !f.is_list() && !f.is_map() && !m.full_name().starts_with("google.protobuf.") && v.is_object() =>
            {
                let before = out.len();
                collect_paths(&m, v, &path, out);
                if out.len() == before {
                    out.push(path);
                }
            }
            _ => out.push(path),
        }
    }
}

fn set_path(message: &mut DynamicMessage, path: &[String], text: &str) -> Result<(), String> {
    let (last, parents) = path.split_last().ok_or("empty field path")?;
    let mut current = message;
    for part in parents {
        let f = current
            .descriptor()
            .get_field_by_name(part)
            .ok_or_else(|| format!("no field {part:?}"))?;
        current = current
            .get_field_mut(&f)
            .as_message_mut()
            .ok_or_else(|| format!("{part:?} is not a message"))?;
    }
    let f = current
        .descriptor()
        .get_field_by_name(last)
        .ok_or_else(|| format!("no field {last:?}"))?;
    let value = parse_value(&f.kind(), text)?;
    current.set_field(&f, value);
    Ok(())
}

/// Applies query parameters to fields not bound by the path or body.
fn apply_query(message: &mut DynamicMessage, query: &str, bound: &[Vec<String>]) -> Result<(), TranscodeError> {
    let mut seen: HashSet<String> = HashSet::new();
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        let (path_text, map_key) = match key.strip_suffix(']').and_then(|k| k.split_once('[')) {
            Some((p, k)) => (p, Some(k)),
            None => (key.as_ref(), None),
        };
        let Some(resolved) = resolve_query_path(&message.descriptor(), path_text) else {
            tracing::debug!(parameter = %key, "unknown query parameter ignored");
            continue;
        };
        let names: Vec<String> = resolved.iter().map(|f| f.name().to_owned()).collect();
        if bound.iter().any(|b| names.starts_with(b)) {
            continue;
        }
        let dotted = names.join(".");
        let field = resolved
            .last()
            .cloned()
            .ok_or_else(|| TranscodeError::new(&dotted, "empty parameter"))?;
        let err = |reason: String| TranscodeError::new(&dotted, reason);
        let target =
            walk_mut(message, &resolved[..resolved.len() - 1]).ok_or_else(|| err("not a message path".into()))?;
        if field.is_map() {
            let map_key = map_key.ok_or_else(|| err("a map is set as name[key]=value".into()))?;
            let Kind::Message(entry) = field.kind() else {
                return Err(err("not a map".into()));
            };
            let key = parse_map_key(&entry.map_entry_key_field().kind(), map_key).map_err(&err)?;
            let v = parse_value(&entry.map_entry_value_field().kind(), &value).map_err(&err)?;
            if !seen.insert(format!("{dotted}[{map_key}]")) {
                return Err(err(format!("map key {map_key:?} given more than once")));
            }
            if let Some(m) = target.get_field_mut(&field).as_map_mut() {
                m.insert(key, v);
            }
        } else if field.is_list() {
            if matches!(field.kind(), Kind::Message(ref m) if !is_query_wkt(m)) {
                return Err(err("a repeated message field cannot be set from the query".into()));
            }
            let v = parse_value(&field.kind(), &value).map_err(&err)?;
            if let Some(list) = target.get_field_mut(&field).as_list_mut() {
                list.push(v);
            }
        } else {
            if map_key.is_some() {
                return Err(err("not a map field".into()));
            }
            if !seen.insert(dotted.clone()) {
                return Err(err("given more than once for a field that is not repeated".into()));
            }
            if let Some(oneof) = field.containing_oneof()
                && let Some(other) = oneof.fields().find(|o| *o != field && target.has_field(o))
            {
                return Err(err(format!("{} of the same oneof is already set", other.name())));
            }
            let v = parse_value(&field.kind(), &value).map_err(&err)?;
            target.set_field(&field, v);
        }
    }
    Ok(())
}

fn walk_mut<'a>(message: &'a mut DynamicMessage, parents: &[FieldDescriptor]) -> Option<&'a mut DynamicMessage> {
    let mut current = message;
    for f in parents {
        current = current.get_field_mut(f).as_message_mut()?;
    }
    Some(current)
}

/// Resolves `a.b.c` by proto or JSON name; `None` for an unknown key.
fn resolve_query_path(desc: &MessageDescriptor, path: &str) -> Option<Vec<FieldDescriptor>> {
    let mut out = Vec::new();
    let mut current = desc.clone();
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let f = current
            .get_field_by_name(part)
            .or_else(|| current.get_field_by_json_name(part))?;
        if i + 1 < parts.len() {
            match f.kind() {
                Kind::Message(m) if !f.is_list() && !f.is_map() && !is_query_wkt(&m) => current = m,
                _ => return None,
            }
        }
        out.push(f);
    }
    Some(out)
}

/// Well-known types that have a text form in a query parameter.
fn is_query_wkt(m: &MessageDescriptor) -> bool {
    matches!(
        m.full_name(),
        "google.protobuf.Timestamp"
            | "google.protobuf.Duration"
            | "google.protobuf.FieldMask"
            | "google.protobuf.Struct"
            | "google.protobuf.Value"
            | "google.protobuf.ListValue"
            | "google.protobuf.DoubleValue"
            | "google.protobuf.FloatValue"
            | "google.protobuf.Int64Value"
            | "google.protobuf.UInt64Value"
            | "google.protobuf.Int32Value"
            | "google.protobuf.UInt32Value"
            | "google.protobuf.BoolValue"
            | "google.protobuf.StringValue"
            | "google.protobuf.BytesValue"
    )
}

fn parse_map_key(kind: &Kind, text: &str) -> Result<MapKey, String> {
    Ok(match parse_value(kind, text)? {
        Value::Bool(b) => MapKey::Bool(b),
        Value::I32(v) => MapKey::I32(v),
        Value::I64(v) => MapKey::I64(v),
        Value::U32(v) => MapKey::U32(v),
        Value::U64(v) => MapKey::U64(v),
        Value::String(s) => MapKey::String(s),
        _ => return Err("unsupported map key type".into()),
    })
}

/// Parses one path or query value into a field's type.
pub fn parse_value(kind: &Kind, text: &str) -> Result<Value, String> {
    let bad = |what: &str| format!("{text:?} is not {what}");
    Ok(match kind {
        Kind::Double => Value::F64(parse_float(text).ok_or_else(|| bad("a number"))?),
        Kind::Float => Value::F32(parse_float(text).ok_or_else(|| bad("a number"))? as f32),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(text.parse().map_err(|_| bad("a 32-bit integer"))?),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(text.parse().map_err(|_| bad("a 64-bit integer"))?),
        Kind::Uint32 | Kind::Fixed32 => Value::U32(text.parse().map_err(|_| bad("an unsigned 32-bit integer"))?),
        Kind::Uint64 | Kind::Fixed64 => Value::U64(text.parse().map_err(|_| bad("an unsigned 64-bit integer"))?),
        Kind::Bool => Value::Bool(match text {
            "true" | "True" | "TRUE" | "t" | "T" | "1" => true,
            "false" | "False" | "FALSE" | "f" | "F" | "0" => false,
            _ => return Err(bad("a boolean")),
        }),
        Kind::String => Value::String(text.to_owned()),
        Kind::Bytes => Value::Bytes(decode_base64(text).ok_or_else(|| bad("base64"))?.into()),
        Kind::Enum(e) => match e.get_value_by_name(text) {
            Some(v) => Value::EnumNumber(v.number()),
            None => match text.parse::<i32>() {
                Ok(n) => Value::EnumNumber(n),
                Err(_) => {
                    let names: Vec<String> = e.values().map(|v| v.name().to_owned()).collect();
                    return Err(format!("{text:?} is not one of {}", names.join(", ")));
                }
            },
        },
        Kind::Message(m) => Value::Message(parse_wkt(m, text)?),
    })
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" | "+Inf" => Some(f64::INFINITY),
        "-Infinity" | "-Inf" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok().filter(|v: &f64| v.is_finite()),
    }
}

fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    [STANDARD, URL_SAFE, STANDARD_NO_PAD, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|e| e.decode(text).ok())
}

fn parse_wkt(m: &MessageDescriptor, text: &str) -> Result<DynamicMessage, String> {
    let json = match m.full_name() {
        "google.protobuf.Timestamp" | "google.protobuf.FieldMask" => serde_json::Value::String(text.to_owned()),
        "google.protobuf.Duration" => serde_json::Value::String(go_duration(text)?),
        "google.protobuf.Struct" | "google.protobuf.Value" | "google.protobuf.ListValue" => {
            serde_json::from_str(text).map_err(|e| format!("{text:?} is not JSON: {e}"))?
        }
        name if name.starts_with("google.protobuf.") && name.ends_with("Value") => {
            let inner = m.get_field_by_name("value").ok_or("wrapper without value")?;
            let mut w = DynamicMessage::new(m.clone());
            w.set_field(&inner, parse_value(&inner.kind(), text)?);
            return Ok(w);
        }
        other => return Err(format!("a {other} cannot be set from a query parameter")),
    };
    DynamicMessage::deserialize(m.clone(), json).map_err(|e| format!("{text:?}: {e}"))
}

/// Go `time.ParseDuration` syntax (`1h2m3.5s`, `300ms`, `-1.5h`) → proto JSON (`3723.5s`).
fn go_duration(text: &str) -> Result<String, String> {
    let bad = || format!("{text:?} is not a duration (like 1.5s, 300ms or 1h2m)");
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    if rest == "0" {
        return Ok("0s".into());
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut nanos: i128 = 0;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let number = &rest[..num_end];
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        rest = &rest[unit_end..];
        let scale: i128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let whole: i128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| bad())?
        };
        nanos += whole * scale;
        let mut digit_scale = scale;
        for d in frac.bytes() {
            digit_scale /= 10;
            nanos += i128::from(d - b'0') * digit_scale;
        }
    }
    if negative {
        nanos = -nanos;
    }
    let secs = nanos / 1_000_000_000;
    let frac = (nanos % 1_000_000_000).abs();
    let sign = if nanos < 0 && secs == 0 { "-" } else { "" };
    Ok(if frac == 0 {
        format!("{sign}{secs}s")
    } else {
        format!("{sign}{secs}.{frac:09}s")
    })
}

/// Serialises `message` (or only `field` of it) as canonical JSON.
pub fn encode_json(message: &DynamicMessage, field: Option<&FieldDescriptor>) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(256);
    let mut ser = serde_json::Serializer::new(&mut out);
    match field {
        None => message.serialize_with_options(&mut ser, &serialize_options())?,
        Some(f) => {
            let value = message.serialize_with_options(serde_json::value::Serializer, &serialize_options())?;
            let part = value.get(f.json_name()).cloned().unwrap_or(serde_json::Value::Null);
            return serde_json::to_vec(&part);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_become_proto_json() {
        assert_eq!(go_duration("1.5s").unwrap(), "1.500000000s");
        assert_eq!(go_duration("1h2m").unwrap(), "3720s");
        assert_eq!(go_duration("300ms").unwrap(), "0.300000000s");
        assert_eq!(go_duration("-1.5h").unwrap(), "-5400s");
        assert_eq!(go_duration("-500ms").unwrap(), "-0.500000000s");
        assert!(go_duration("5 minutes").is_err());
        assert!(go_duration("").is_err());
    }

    #[test]
    fn booleans_take_go_spellings() {
        for t in ["true", "1", "t", "T", "TRUE"] {
            assert!(matches!(parse_value(&Kind::Bool, t).unwrap(), Value::Bool(true)));
        }
        assert!(parse_value(&Kind::Bool, "yes").is_err());
    }
}
