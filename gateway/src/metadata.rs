//! HTTP headers ↔ gRPC metadata, as grpc-gateway forwards them: the
//! `Authorization` header and IANA permanent headers (`grpcgateway-` prefix),
//! `Grpc-Metadata-*` with the prefix stripped (`-Bin` values base64-decoded),
//! `X-Forwarded-*`, W3C trace context, the request id, and `Grpc-Timeout`.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue};
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, BinaryMetadataKey, BinaryMetadataValue, MetadataMap};

use crate::transcode::TranscodeError;

/// The header carrying the request id.
pub const REQUEST_ID: &str = plinth_runtime::server::REQUEST_ID_HEADER;

/// Headers grpc-gateway forwards as `grpcgateway-<name>` (`isPermanentHTTPHeader`).
const PERMANENT: &[&str] = &[
    "accept",
    "accept-charset",
    "accept-language",
    "accept-ranges",
    "cache-control",
    "content-type",
    "cookie",
    "date",
    "expect",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-schedule-tag-match",
    "if-unmodified-since",
    "max-forwards",
    "origin",
    "pragma",
    "referer",
    "user-agent",
    "via",
    "warning",
];

const METADATA_PREFIX: &str = "grpc-metadata-";

/// The metadata an upstream call carries for these request headers.
pub fn outgoing(
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
    request_id: &str,
) -> Result<MetadataMap, TranscodeError> {
    let mut md = MetadataMap::with_capacity(headers.len() + 4);
    for (name, value) in headers {
        let n = name.as_str();
        if n == "authorization" || n == "traceparent" || n == "tracestate" {
            if let Ok(key) = AsciiMetadataKey::from_bytes(n.as_bytes()) {
                md.insert(key, ascii(value));
            }
        } else if let Some(key) = n.strip_prefix(METADATA_PREFIX) {
            forward_metadata(&mut md, key, value)?;
        } else if PERMANENT.contains(&n)
            && let Ok(key) = AsciiMetadataKey::from_bytes(format!("grpcgateway-{n}").as_bytes())
        {
            md.append(key, ascii(value));
        }
    }
    let host = headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(http::header::HOST))
        .cloned();
    if let Some(host) = host {
        md.insert("x-forwarded-host", ascii(&host));
    }
    let mut forwarded_for = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_default();
    if let Some(peer) = peer {
        if !forwarded_for.is_empty() {
            forwarded_for.push_str(", ");
        }
        forwarded_for.push_str(&peer.ip().to_string());
    }
    if let Ok(v) = AsciiMetadataValue::try_from(forwarded_for.as_str())
        && !forwarded_for.is_empty()
    {
        md.insert("x-forwarded-for", v);
    }
    if let Ok(v) = AsciiMetadataValue::try_from(request_id) {
        md.insert(REQUEST_ID, v);
    }
    Ok(md)
}

fn ascii(value: &HeaderValue) -> AsciiMetadataValue {
    AsciiMetadataValue::try_from(value.as_bytes()).unwrap_or_else(|_| AsciiMetadataValue::from_static(""))
}

fn forward_metadata(md: &mut MetadataMap, key: &str, value: &HeaderValue) -> Result<(), TranscodeError> {
    let bad = |reason: &str| TranscodeError {
        field: format!("Grpc-Metadata-{key}"),
        reason: reason.to_owned(),
    };
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(bad("metadata keys are [0-9a-zA-Z._-]"));
    }
    if key.ends_with("-bin") {
        let text = value.to_str().map_err(|_| bad("not base64"))?;
        let bytes = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::STANDARD_NO_PAD,
            base64::engine::general_purpose::URL_SAFE,
            base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ]
        .iter()
        .find_map(|e| e.decode(text).ok())
        .ok_or_else(|| bad("not base64"))?;
        let k = BinaryMetadataKey::from_bytes(key.as_bytes()).map_err(|_| bad("invalid key"))?;
        md.append_bin(k, BinaryMetadataValue::from_bytes(&bytes));
    } else {
        let k = AsciiMetadataKey::from_bytes(key.as_bytes()).map_err(|_| bad("invalid key"))?;
        match AsciiMetadataValue::try_from(value.as_bytes()) {
            Ok(v) => {
                md.append(k, v);
            }
            Err(_) => tracing::info!(key, "non-ASCII metadata value skipped"),
        }
    }
    Ok(())
}

/// Parses `Grpc-Timeout` (`500m`, `2S`, `1H`): at most 8 digits and a unit.
pub fn grpc_timeout(headers: &HeaderMap) -> Result<Option<Duration>, TranscodeError> {
    let Some(value) = headers.get("grpc-timeout") else {
        return Ok(None);
    };
    let bad = || TranscodeError {
        field: "Grpc-Timeout".into(),
        reason: "expected up to 8 digits and a unit H, M, S, m, u or n (like 500m)".into(),
    };
    let text = value.to_str().map_err(|_| bad())?;
    if text.len() < 2 || text.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    let n: u64 = digits.parse().map_err(|_| bad())?;
    Ok(Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return Err(bad()),
    }))
}

/// Response metadata as `Grpc-Metadata-<key>` headers (binary values base64).
pub fn incoming(md: &MetadataMap, headers: &mut HeaderMap) {
    for entry in md.iter() {
        match entry {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                let k = k.as_str();
                if k.starts_with("grpc-") || k == "content-type" || k == REQUEST_ID || k == "date" {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(format!("{METADATA_PREFIX}{k}").as_bytes())
                    && let Ok(v) = HeaderValue::from_bytes(v.as_encoded_bytes())
                {
                    headers.append(name, v);
                }
            }
            tonic::metadata::KeyAndValueRef::Binary(k, v) => {
                let k = k.as_str();
                if k.starts_with("grpc-") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(format!("{METADATA_PREFIX}{k}").as_bytes())
                    && let Ok(v) = HeaderValue::from_bytes(v.as_encoded_bytes())
                {
                    headers.append(name, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", HeaderValue::from_static("500m"));
        assert_eq!(grpc_timeout(&h).unwrap(), Some(Duration::from_millis(500)));
        h.insert("grpc-timeout", HeaderValue::from_static("2S"));
        assert_eq!(grpc_timeout(&h).unwrap(), Some(Duration::from_secs(2)));
        h.insert("grpc-timeout", HeaderValue::from_static("5x"));
        assert!(grpc_timeout(&h).is_err());
        h.insert("grpc-timeout", HeaderValue::from_static("123456789S"));
        assert!(grpc_timeout(&h).is_err());
    }
}
