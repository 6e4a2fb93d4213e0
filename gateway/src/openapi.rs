//! OpenAPI 3.1 generated from the same route table the gateway serves, so the
//! document cannot drift from behaviour. Conventions follow
//! protoc-gen-openapiv2/v3: operationId `Service_Method`, schemas named by
//! full proto name with the proto comments as descriptions, dotted query
//! parameters, `google.rpc.Status` as the default response, and streams
//! documented as their `{"result": …}` envelope.

use std::collections::{BTreeMap, HashMap, HashSet};

use prost_reflect::{ExtensionDescriptor, FieldDescriptor, FileDescriptor, Kind, MessageDescriptor};
use serde_json::{Map, Value, json};

use crate::routes::{Binding, BodyTarget, HTTP_BODY, RouteTable};

/// The schema every error response uses.
const STATUS: &str = "google.rpc.Status";

/// The document could not be generated.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenApiError(String);

/// Builds the OpenAPI 3.1 document of `table`.
pub fn document(table: &RouteTable) -> Result<Value, OpenApiError> {
    let mut generator = Generator {
        schemas: BTreeMap::new(),
        field_behavior: table.pool().get_extension_by_name("google.api.field_behavior"),
    };
    let mut paths: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let bound: HashSet<String> = table
        .bindings()
        .iter()
        .filter(|b| !b.implicit)
        .map(|b| b.rpc.method.full_name().to_owned())
        .collect();
    let mut operation_ids: HashMap<String, usize> = HashMap::new();
    let mut documented: HashSet<String> = HashSet::new();
    for binding in table.bindings() {
        // Like `generate_unbound_methods`: the implicit POST binding is
        // documented only for RPCs without an HTTP rule of their own.
        if binding.implicit && bound.contains(binding.rpc.method.full_name()) {
            continue;
        }
        let method = binding.method.as_str().to_ascii_lowercase();
        if method == "*" || binding.template.openapi_path().contains('*') {
            continue;
        }
        documented.insert(binding.rpc.service.clone());
        let base = binding.rpc.operation_id();
        let n = operation_ids.entry(base.clone()).or_insert(0);
        *n += 1;
        let id = if *n == 1 { base } else { format!("{base}{n}") };
        let op = generator.operation(binding, id);
        paths
            .entry(binding.template.openapi_path())
            .or_default()
            .insert(method, Value::Object(op));
    }
    generator.message_schema(
        &table
            .pool()
            .get_message_by_name(STATUS)
            .ok_or_else(|| OpenApiError("the descriptor set lacks google.rpc.Status (build.rs includes it)".into()))?,
    );
    let mut tags: Vec<Value> = table
        .pool()
        .services()
        .filter(|s| documented.contains(s.full_name()))
        .map(|s| {
            let mut t = json!({"name": s.name()});
            if let Some(d) = comment(&s.parent_file(), s.path()) {
                t["description"] = d.into();
            }
            t
        })
        .collect();
    tags.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    tags.dedup_by(|a, b| a["name"] == b["name"]);
    let schemas = prune_unused(generator.schemas, &paths);
    Ok(json!({
        "openapi": "3.1.0",
        "servers": [{"url": "/", "description": "This gateway"}],
        "info": {
            "title": "Plinth API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "HTTP/JSON transcoding of Plinth's gRPC services. Errors are google.rpc.Status; \
                            64-bit integers are strings; server streams are newline-delimited JSON \
                            (`{\"result\": …}` per message, `{\"error\": …}` on failure), or SSE with \
                            `Accept: text/event-stream`.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": tags,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An access token from POST /v1/auth/login.",
                },
                "apiKeyAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "plk_ API key",
                    "description": "An API key from POST /v1/auth/apiKeys (`plk_…`), sent as a bearer token; \
                                    limited to its scopes and its owner's roles.",
                },
            },
        },
        "security": [{"bearerAuth": []}, {"apiKeyAuth": []}],
    }))
}

/// Drops schemas nothing refers to (e.g. `Any` once `Status.details` is inlined).
fn prune_unused(
    mut schemas: BTreeMap<String, Value>,
    paths: &BTreeMap<String, Map<String, Value>>,
) -> BTreeMap<String, Value> {
    let paths_text = serde_json::to_string(paths).unwrap_or_default();
    loop {
        let texts: Vec<(String, String)> = schemas
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::to_string(v).unwrap_or_default()))
            .collect();
        let unused: Vec<String> = texts
            .iter()
            .filter(|(name, _)| {
                let needle = format!("\"#/components/schemas/{name}\"");
                name != STATUS
                    && !paths_text.contains(&needle)
                    && !texts
                        .iter()
                        .any(|(other, text)| other != name && text.contains(&needle))
            })
            .map(|(name, _)| name.clone())
            .collect();
        if unused.is_empty() {
            return schemas;
        }
        for name in unused {
            schemas.remove(&name);
        }
    }
}

struct Generator {
    schemas: BTreeMap<String, Value>,
    /// `google.api.field_behavior`: REQUIRED fields are listed as required,
    /// OUTPUT_ONLY ones are read-only.
    field_behavior: Option<ExtensionDescriptor>,
}

/// `google.api.FieldBehavior` numbers.
const REQUIRED: i32 = 2;
const OUTPUT_ONLY: i32 = 3;

impl Generator {
    fn operation(&mut self, binding: &Binding, id: String) -> Map<String, Value> {
        let rpc = &binding.rpc;
        let mut op = Map::new();
        op.insert("operationId".into(), id.into());
        op.insert("tags".into(), json!([rpc.method.parent_service().name()]));
        let mut description = comment(&rpc.method.parent_file(), rpc.method.path()).unwrap_or_default();
        if let Some(first) = description.lines().next().map(str::to_owned) {
            op.insert("summary".into(), first.trim_end_matches('.').into());
        }
        match rpc.permission.as_deref() {
            Some("public") => {
                description.push_str("\n\nPublic: no credentials needed.");
                op.insert("security".into(), json!([]));
            }
            Some("authenticated") => description.push_str("\n\nRequires any valid access token."),
            Some(p) => description.push_str(&format!("\n\nRequires permission `{p}`.")),
            None => description.push_str("\n\nNo permission is declared: denied to everyone but administrators."),
        }
        op.insert("description".into(), description.trim().into());

        let input = rpc.input();
        let mut params = Vec::new();
        let mut bound: Vec<Vec<String>> = Vec::new();
        for v in binding.template.variables() {
            let field = crate::routes::resolve_path(&input, &v.field_path).ok();
            let mut schema = field
                .as_ref()
                .map_or(json!({"type": "string"}), |f| self.field_schema(f));
            if let Some(pattern) = variable_pattern(binding, v) {
                schema["pattern"] = pattern.into();
            }
            let mut param = json!({
                "name": v.openapi_name(),
                "in": "path",
                "required": true,
                "schema": schema,
            });
            if v.field_path.len() > 1 {
                param["description"] = format!("Sets `{}` of the request.", v.field_path.join(".")).into();
            }
            params.push(param);
            bound.push(v.field_path.clone());
        }
        match &binding.body {
            BodyTarget::Whole => {
                let schema = if input.full_name() == HTTP_BODY {
                    json!({"content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}})
                } else {
                    json!({"content": {"application/json": {"schema": self.message_ref(&input)}}})
                };
                let mut body = schema;
                body["required"] = true.into();
                op.insert("requestBody".into(), body);
            }
            BodyTarget::Field(f) => {
                bound.push(vec![f.name().to_owned()]);
                let schema = self.field_schema(f);
                op.insert(
                    "requestBody".into(),
                    json!({"required": true, "content": {"application/json": {"schema": schema}}}),
                );
            }
            BodyTarget::None => {}
        }
        if !matches!(binding.body, BodyTarget::Whole) {
            let mut seen = HashSet::new();
            self.query_params(&input, "", &bound, &mut params, &mut seen, 0);
        }
        if !params.is_empty() {
            op.insert("parameters".into(), params.into());
        }

        let output = rpc.output();
        let ok = if output.full_name() == HTTP_BODY {
            json!({"description": "The raw body.", "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}}})
        } else {
            let schema = match &binding.response_body {
                Some(f) => self.field_schema(f),
                None => self.message_ref(&output),
            };
            if rpc.method.is_server_streaming() {
                json!({
                    "description": format!("A stream of {}.", output.name()),
                    "content": {
                        "application/x-ndjson": {"schema": {
                            "title": format!("Stream result of {}", output.full_name()),
                            "type": "object",
                            "properties": {
                                "result": schema,
                                "error": {"$ref": format!("#/components/schemas/{STATUS}")},
                            },
                        }},
                        "text/event-stream": {"schema": {"type": "string"}},
                    },
                })
            } else {
                json!({"description": "A successful response.", "content": {"application/json": {"schema": schema}}})
            }
        };
        op.insert(
            "responses".into(),
            json!({
                "200": ok,
                "4XX": {
                    "description": "A client error: google.rpc.Status (400 invalid argument or failed precondition, 401, 403, 404, 409, 413, 429).",
                    "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{STATUS}")}}},
                },
                "default": {
                    "description": "An error: google.rpc.Status with the gRPC code; the HTTP status follows the canonical mapping.",
                    "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{STATUS}")}}},
                },
            }),
        );
        op
    }

    fn query_params(
        &mut self,
        message: &MessageDescriptor,
        prefix: &str,
        bound: &[Vec<String>],
        out: &mut Vec<Value>,
        seen: &mut HashSet<String>,
        depth: usize,
    ) {
        if depth > 4 || !seen.insert(message.full_name().to_owned()) {
            return;
        }
        for f in message.fields() {
            let name = if prefix.is_empty() {
                f.name().to_owned()
            } else {
                format!("{prefix}.{}", f.name())
            };
            let path: Vec<String> = name.split('.').map(str::to_owned).collect();
            if bound.iter().any(|b| path.starts_with(b)) {
                continue;
            }
            match f.kind() {
                Kind::Message(_) if f.is_map() => continue,
                Kind::Message(m) if !is_wkt(&m) => {
                    if !f.is_list() {
                        self.query_params(&m, &name, bound, out, seen, depth + 1);
                    }
                    continue;
                }
                _ => {}
            }
            let mut schema = self.field_schema(&f);
            if let Some(any) = schema.get("anyOf").and_then(|a| a.get(0)).cloned() {
                schema = any;
            }
            let mut param = json!({"name": name, "in": "query", "schema": schema});
            if let Some(d) = comment(&f.parent_file(), f.path()) {
                param["description"] = d.into();
            }
            if f.is_list() {
                param["style"] = "form".into();
                param["explode"] = true.into();
            }
            out.push(param);
        }
        seen.remove(message.full_name());
    }

    fn message_ref(&mut self, m: &MessageDescriptor) -> Value {
        self.message_schema(m);
        json!({"$ref": format!("#/components/schemas/{}", m.full_name())})
    }

    fn message_schema(&mut self, m: &MessageDescriptor) {
        if self.schemas.contains_key(m.full_name()) {
            return;
        }
        if let Some(wkt) = wkt_schema(m) {
            self.schemas.insert(m.full_name().to_owned(), wkt);
            return;
        }
        // Insert a placeholder first: recursive messages refer to themselves.
        self.schemas.insert(m.full_name().to_owned(), json!({}));
        let mut properties = Map::new();
        let mut required = Vec::new();
        for f in m.fields() {
            let mut schema = self.field_schema(&f);
            if let Some(d) = comment(&f.parent_file(), f.path()) {
                schema = with_description(schema, d);
            }
            let behaviors = self.behaviors(&f);
            if behaviors.contains(&REQUIRED) {
                required.push(Value::from(f.json_name()));
            }
            if behaviors.contains(&OUTPUT_ONLY) {
                schema["readOnly"] = true.into();
            }
            properties.insert(f.json_name().to_owned(), schema);
        }
        let mut schema = json!({"type": "object", "properties": properties});
        if !required.is_empty() {
            schema["required"] = required.into();
        }
        if let Some(d) = comment(&m.parent_file(), m.path()) {
            schema["description"] = d.into();
        }
        if m.full_name() == STATUS {
            schema["description"] = "The error model of every Plinth API (google.rpc.Status): `code` is the gRPC code, \
                                     `details` carry google.rpc error details such as ErrorInfo, BadRequest and RetryInfo."
                .into();
            schema["properties"]["details"] = json!({"type": "array", "items": {"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": true}});
        }
        self.schemas.insert(m.full_name().to_owned(), schema);
    }

    fn behaviors(&self, f: &FieldDescriptor) -> Vec<i32> {
        let Some(ext) = &self.field_behavior else {
            return Vec::new();
        };
        let options = f.options();
        if !options.has_extension(ext) {
            return Vec::new();
        }
        match options.get_extension(ext).as_ref() {
            prost_reflect::Value::List(values) => values.iter().filter_map(|v| v.as_enum_number()).collect(),
            _ => Vec::new(),
        }
    }

    fn field_schema(&mut self, f: &FieldDescriptor) -> Value {
        if f.is_map()
            && let Kind::Message(entry) = f.kind()
        {
            let value = self.kind_schema(&entry.map_entry_value_field().kind(), false);
            return json!({"type": "object", "additionalProperties": value});
        }
        let single = self.kind_schema(&f.kind(), !f.is_list());
        if f.is_list() {
            json!({"type": "array", "items": single})
        } else {
            single
        }
    }

    fn kind_schema(&mut self, kind: &Kind, nullable_message: bool) -> Value {
        match kind {
            Kind::Double | Kind::Float => json!({"type": "number"}),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => json!({"type": "integer", "format": "int32"}),
            Kind::Uint32 | Kind::Fixed32 => {
                json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
            }
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
                json!({"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"})
            }
            Kind::Uint64 | Kind::Fixed64 => json!({"type": "string", "format": "uint64", "pattern": "^[0-9]+$"}),
            Kind::Bool => json!({"type": "boolean"}),
            Kind::String => json!({"type": "string"}),
            Kind::Bytes => json!({"type": "string", "format": "byte", "contentEncoding": "base64"}),
            Kind::Enum(e) => json!({
                "type": "string",
                "enum": e.values().map(|v| v.name().to_owned()).collect::<Vec<_>>(),
            }),
            Kind::Message(m) => {
                let r = self.message_ref(m);
                // Unset message fields are emitted as null.
                if nullable_message {
                    json!({"anyOf": [r, {"type": "null"}]})
                } else {
                    r
                }
            }
        }
    }
}

/// OpenAPI 3.1 allows `description` beside `$ref`.
fn with_description(mut schema: Value, description: String) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.insert("description".into(), description.into());
    }
    schema
}

fn is_wkt(m: &MessageDescriptor) -> bool {
    m.full_name().starts_with("google.protobuf.")
}

fn wkt_schema(m: &MessageDescriptor) -> Option<Value> {
    Some(match m.full_name() {
        "google.protobuf.Timestamp" => json!({"type": "string", "format": "date-time"}),
        "google.protobuf.Duration" => json!({"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$"}),
        "google.protobuf.FieldMask" => json!({"type": "string", "description": "Comma-separated field paths."}),
        "google.protobuf.Struct" => json!({"type": "object", "additionalProperties": true}),
        "google.protobuf.Value" => json!({}),
        "google.protobuf.ListValue" => json!({"type": "array", "items": {}}),
        "google.protobuf.Empty" => json!({"type": "object"}),
        "google.protobuf.Any" => {
            json!({"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": true})
        }
        "google.protobuf.DoubleValue" | "google.protobuf.FloatValue" => json!({"type": "number"}),
        "google.protobuf.Int32Value" | "google.protobuf.UInt32Value" => json!({"type": "integer"}),
        "google.protobuf.Int64Value" | "google.protobuf.UInt64Value" => json!({"type": "string", "format": "int64"}),
        "google.protobuf.BoolValue" => json!({"type": "boolean"}),
        "google.protobuf.StringValue" => json!({"type": "string"}),
        "google.protobuf.BytesValue" => json!({"type": "string", "format": "byte"}),
        _ => return None,
    })
}

/// A regular expression for a multi-segment variable (`shelves/[^/]+`).
fn variable_pattern(binding: &Binding, v: &crate::template::Variable) -> Option<String> {
    let source = binding.template.as_str();
    let start = source.find(&format!("{{{}=", v.field_path.join(".")))?;
    let rest = &source[start..];
    let pattern = &rest[rest.find('=')? + 1..rest.find('}')?];
    let parts: Vec<String> = pattern
        .split('/')
        .map(|p| match p {
            "*" => "[^/]+".to_owned(),
            "**" => ".*".to_owned(),
            lit => regex_escape(lit),
        })
        .collect();
    Some(format!("^{}$", parts.join("/")))
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escape = "\\.+*?()|[]{}^$".contains(c);
            escape.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}

/// The leading comment at `path` in `file`, trimmed; `None` when absent.
fn comment(file: &FileDescriptor, path: &[i32]) -> Option<String> {
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let location = info.location.iter().find(|l| l.path == path)?;
    let text = location.leading_comments.as_deref()?;
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let joined = lines.join("\n").trim().to_owned();
    (!joined.is_empty()).then_some(joined)
}
