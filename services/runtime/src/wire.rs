//! Conversions between wire values and what the services work with:
//! protobuf well-known types and plain numbers (milliseconds since the
//! epoch, milliseconds of duration), page sizes and opaque page tokens,
//! refusing values out of range with the field named. Nothing here knows a
//! particular service's messages.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::InvalidRequest;

/// Largest page any list call returns.
pub const MAX_PAGE: i32 = 1000;

/// A page size: `default` when 0, refused when negative or above [`MAX_PAGE`].
pub fn page_size(field: &str, size: i32, default: i32) -> Result<usize, InvalidRequest> {
    let size = if size == 0 { default } else { size };
    match usize::try_from(size) {
        Ok(n) if (1..=MAX_PAGE).contains(&size) => Ok(n),
        _ => Err(InvalidRequest::field(
            field,
            format!("must be between 0 and {MAX_PAGE}"),
        )),
    }
}

/// An opaque page token carrying `text` (base64url).
pub fn page_token(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

/// The text inside a page token from [`page_token`], or the field named as bad.
pub fn page_token_text(field: &str, token: &str) -> Result<String, InvalidRequest> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| InvalidRequest::field(field, "is not a token from a previous page"))
}

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// Milliseconds as a protobuf duration.
pub fn duration(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A timestamp as milliseconds since the epoch; `field` names it when it is
/// malformed or outside years 1970–9999.
pub fn timestamp_ms(field: &str, t: &prost_types::Timestamp) -> Result<i64, InvalidRequest> {
    const MAX_SECONDS: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    if !(0..=MAX_SECONDS).contains(&t.seconds) || !(0..1_000_000_000).contains(&t.nanos) {
        return Err(InvalidRequest::field(
            field,
            "must be a valid time between 1970 and 9999",
        ));
    }
    Ok(t.seconds * 1000 + i64::from(t.nanos / 1_000_000))
}

/// A duration as milliseconds, which must lie within `min_ms..=max_ms`;
/// `field` names it otherwise.
pub fn duration_ms(field: &str, d: &prost_types::Duration, min_ms: i64, max_ms: i64) -> Result<i64, InvalidRequest> {
    let valid_nanos = (-999_999_999..=999_999_999).contains(&d.nanos)
        && (d.seconds == 0 || d.nanos == 0 || (d.seconds > 0) == (d.nanos > 0));
    let ms = d
        .seconds
        .checked_mul(1000)
        .and_then(|s| s.checked_add(i64::from(d.nanos / 1_000_000)))
        .filter(|_| valid_nanos);
    match ms {
        Some(ms) if (min_ms..=max_ms).contains(&ms) => Ok(ms),
        _ => Err(InvalidRequest::field(
            field,
            format!("must be between {} and {}", human(min_ms), human(max_ms)),
        )),
    }
}

fn human(ms: i64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// A protobuf `Value` as JSON; `field` is named when a number is not finite.
pub fn json_of_value(field: &str, v: &prost_types::Value) -> Result<serde_json::Value, InvalidRequest> {
    use prost_types::value::Kind;
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => serde_json::Value::Null,
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n)
            .map(serde_json::Value::Number)
            .ok_or_else(|| InvalidRequest::field(field, "numbers must be finite"))?,
        Some(Kind::StringValue(s)) => serde_json::Value::String(s.clone()),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(*b),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(json_of_struct(field, s)?),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(
            l.values
                .iter()
                .map(|v| json_of_value(field, v))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// A protobuf `Struct` as a JSON object.
pub fn json_of_struct(
    field: &str,
    s: &prost_types::Struct,
) -> Result<serde_json::Map<String, serde_json::Value>, InvalidRequest> {
    s.fields
        .iter()
        .map(|(k, v)| Ok((k.clone(), json_of_value(field, v)?)))
        .collect()
}

/// JSON as a protobuf `Value`.
pub fn value_of_json(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(value_of_json).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(struct_of_json(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object as a protobuf `Struct`.
pub fn struct_of_json(o: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: o.iter().map(|(k, v)| (k.clone(), value_of_json(v))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_outside_their_range_name_the_field() {
        let d = prost_types::Duration { seconds: 5, nanos: 0 };
        assert_eq!(duration_ms("lease", &d, 1000, 10_000).unwrap(), 5000);
        let err = duration_ms("lease", &d, 10_000, 20_000).unwrap_err();
        assert_eq!(err.0[0].field, "lease");
        assert!(err.0[0].description.contains("10s"));
        let negative = prost_types::Duration { seconds: -1, nanos: 0 };
        assert!(duration_ms("lease", &negative, 0, 20_000).is_err());
    }

    #[test]
    fn page_sizes_default_and_tokens_round_trip() {
        assert_eq!(page_size("page_size", 0, 50).unwrap(), 50);
        assert_eq!(page_size("page_size", 7, 50).unwrap(), 7);
        assert_eq!(page_size("page_size", -1, 50).unwrap_err().0[0].field, "page_size");
        assert!(page_size("page_size", 1001, 50).is_err());
        assert_eq!(page_token_text("page_token", &page_token("emails")).unwrap(), "emails");
        assert!(page_token_text("page_token", "%%%").is_err());
    }

    #[test]
    fn timestamps_round_trip_through_milliseconds() {
        let t = timestamp(1_700_000_000_123);
        assert_eq!(timestamp_ms("at", &t).unwrap(), 1_700_000_000_123);
        let bad = prost_types::Timestamp { seconds: -5, nanos: 0 };
        assert_eq!(timestamp_ms("at", &bad).unwrap_err().0[0].field, "at");
    }
}
