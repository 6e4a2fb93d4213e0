//! Google Gemini `generateContent` (AI Studio `v1beta`, `x-goog-api-key`).
//!
//! Gemini differs from the canonical (OpenAI) shape where a naive
//! translation silently breaks, so each difference is handled here:
//!
//! - System and developer messages become the top-level
//!   `systemInstruction`, joined in order with a blank line (mid-conversation
//!   ones too): Gemini has no system role. Assistant is `model`.
//! - Tool parameters and response schemas are JSON Schema on our side but an
//!   OpenAPI-3 subset on Gemini's, which rejects unknown keywords with a 400:
//!   [`gemini_schema`] inlines `$ref`s (a recursive one becomes a free-form
//!   object), flattens `allOf`, turns `null` alternatives into `nullable` and
//!   keeps only the keywords Gemini knows.
//! - Function-call arguments and function responses are JSON objects, not
//!   text: a tool result that is not a JSON object is wrapped as
//!   `{"result": text}`. A function response names its function, found
//!   through the call's id; consecutive tool results become one `user` turn,
//!   in the order of the calls they answer (that order is how Gemini pairs
//!   them when it gave no ids).
//! - Ids: Gemini 3 returns call ids and wants them back; older models return
//!   none, so the adapter makes unique ones (prefixed [`SYNTHETIC_ID_PREFIX`],
//!   so that parallel calls of one function stay apart) and never sends those
//!   back to Gemini.
//! - Thought signatures are returned on the calls and must come back
//!   unchanged. A model turn whose calls carry none (a conversation begun on
//!   another provider) gets Google's documented [`SKIP_THOUGHT_SIGNATURE`]
//!   on its first call, for models that validate signatures (all but the
//!   `gemini-1`/`gemini-2`/`gemma` families).
//! - Gemini reports `STOP` when it calls functions: any call makes the finish
//!   reason [`FinishReason::ToolCalls`]. A blocked prompt has no candidates,
//!   only `promptFeedback.blockReason`: an empty answer that finished with
//!   [`FinishReason::ContentFilter`].
//! - `thoughtsTokenCount` is not part of `candidatesTokenCount`: output is
//!   their sum, input is `promptTokenCount + toolUsePromptTokenCount`.
//! - Streams (`alt=sse`) carry whole response fragments with no event names
//!   and no `[DONE]`; function calls arrive whole, parallel ones in separate
//!   chunks without an index, so the adapter numbers them.
//!
//! Not sent (Gemini has no field for them): `user` and
//! `parallel_tool_calls`. Text parts' own thought signatures (Gemini 3 puts
//! one on the last part of a call-free answer) are not kept: the canonical
//! shape has no place for them and Gemini only enforces the ones on calls.

use std::collections::HashMap;

use serde_json::{Map, Value, json};

use super::{Endpoint, EventStream, Provider, ProviderError, ProviderKind, Translator, sse::SseEvent};
use crate::model::{
    ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, FinishReason, Image, Message, Part, ResponseFormat, Role,
    StreamEvent, ToolCall, ToolChoice, Usage,
};

/// The prefix of tool-call ids the adapter made up because Gemini gave
/// none; such ids are never sent back to Gemini.
pub const SYNTHETIC_ID_PREFIX: &str = "gemini-call-";

/// Google's documented stand-in thought signature for function calls that
/// Gemini did not produce (history from another provider).
pub const SKIP_THOUGHT_SIGNATURE: &str = "skip_thought_signature_validator";

/// The most stop sequences Gemini accepts.
const MAX_STOP_SEQUENCES: usize = 5;

/// The most texts one `batchEmbedContents` call accepts.
const EMBED_BATCH: usize = 100;

/// How deep a tool schema may nest (after `$ref`s are inlined).
const MAX_SCHEMA_DEPTH: usize = 64;

/// The Gemini adapter.
#[derive(Debug)]
pub struct Gemini {
    endpoint: Endpoint,
}

impl Gemini {
    /// An adapter for `endpoint`.
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    fn post(
        &self,
        model: &str,
        method: &str,
        stream: bool,
        body: &Value,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let e = &self.endpoint;
        let mut builder = e
            .client
            .post(e.url(&format!("/v1beta/models/{}:{method}", model_id(model))));
        if stream {
            builder = builder.query(&[("alt", "sse")]);
        }
        let builder = e.with_key(|key| match key {
            Some(k) => builder.header("x-goog-api-key", k),
            None => builder,
        })?;
        Ok(builder.json(body))
    }
}

#[async_trait::async_trait]
impl Provider for Gemini {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Gemini
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = chat_body(request)?;
        let answer: Value = self
            .endpoint
            .send_json(self.post(&request.model, "generateContent", false, &body)?, parse_error)
            .await?;
        let mut response = parse_chat(&answer)?;
        if response.model.is_empty() {
            response.model.clone_from(&request.model);
        }
        Ok(response)
    }

    async fn chat_stream(&self, request: &ChatRequest) -> Result<EventStream, ProviderError> {
        let body = chat_body(request)?;
        let response = self
            .endpoint
            .send(
                self.post(&request.model, "streamGenerateContent", true, &body)?,
                parse_error,
            )
            .await?;
        Ok(super::sse_stream(
            response,
            StreamTranslator::default(),
            self.endpoint.timeout,
        ))
    }

    /// `batchEmbedContents`, at most 100 texts per call. Gemini reports
    /// tokens here only in the newer `usageMetadata.promptTokenCount`;
    /// without it the usage stays 0.
    async fn embed(&self, request: &EmbedRequest) -> Result<EmbedResponse, ProviderError> {
        if request.inputs.is_empty() {
            return Err(ProviderError::invalid(
                "input",
                "at least one text to embed is required",
            ));
        }
        let mut out = EmbedResponse {
            model: request.model.clone(),
            vectors: Vec::with_capacity(request.inputs.len()),
            usage: Usage::default(),
        };
        for chunk in request.inputs.chunks(EMBED_BATCH) {
            let body = embed_body(&request.model, chunk, request.dimensions);
            let answer: Value = self
                .endpoint
                .send_json(
                    self.post(&request.model, "batchEmbedContents", false, &body)?,
                    parse_error,
                )
                .await?;
            let (vectors, tokens) = parse_embeddings(&answer, chunk.len())?;
            out.vectors.extend(vectors);
            out.usage.input_tokens += tokens;
        }
        Ok(out)
    }
}

/// The model's id without a `models/` prefix.
fn model_id(model: &str) -> &str {
    model.strip_prefix("models/").unwrap_or(model)
}

/// Whether the model rejects function calls without a thought signature.
fn validates_signatures(model: &str) -> bool {
    let m = model_id(model);
    !["gemini-1", "gemini-2", "gemma"].iter().any(|p| m.starts_with(p))
}

/// Whether `id` was made up by this adapter.
pub fn is_synthetic_id(id: &str) -> bool {
    id.starts_with(SYNTHETIC_ID_PREFIX)
}

/// A new unique tool-call id.
pub fn synthetic_id() -> String {
    format!("{SYNTHETIC_ID_PREFIX}{}", uuid::Uuid::now_v7().simple())
}

/// Gemini's error body (`{"error":{"code","message","status"}}`, or a
/// one-element array of it) → (status, message).
pub fn parse_error(body: &[u8]) -> (String, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let v = match &v {
        Value::Array(items) => items.first().unwrap_or(&Value::Null),
        other => other,
    };
    error_fields(&v["error"], body)
}

fn error_fields(e: &Value, raw: &[u8]) -> (String, String) {
    let kind = e["status"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| e["code"].as_u64().map(|c| c.to_string()))
        .unwrap_or_else(|| "error".to_owned());
    let message = e["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(raw).chars().take(500).collect());
    (kind, message)
}

/// The `generateContent` request body.
pub fn chat_body(r: &ChatRequest) -> Result<Value, ProviderError> {
    let (system, contents) = contents(r)?;
    let mut body = json!({ "contents": contents });
    if !system.is_empty() {
        body["systemInstruction"] = json!({"parts": [{"text": system.join("\n\n")}]});
    }
    if !r.tools.is_empty() {
        let mut declarations = Vec::with_capacity(r.tools.len());
        for (i, t) in r.tools.iter().enumerate() {
            let mut d = json!({"name": t.name});
            if !t.description.is_empty() {
                d["description"] = json!(t.description);
            }
            let parameters = gemini_schema(&t.parameters)
                .map_err(|reason| ProviderError::invalid(format!("tools[{i}].parameters"), reason))?;
            // Gemini rejects an object without properties ("should be
            // non-empty for OBJECT type"); a function without parameters
            // simply has none.
            let empty = parameters.as_object().is_none_or(|p| {
                p.get("properties").and_then(Value::as_object).is_none_or(Map::is_empty) && p.get("anyOf").is_none()
            });
            if !empty {
                d["parameters"] = parameters;
            }
            declarations.push(d);
        }
        body["tools"] = json!([{ "functionDeclarations": declarations }]);
        let mode = match &r.tool_choice {
            ToolChoice::Unset => None,
            ToolChoice::Auto => Some(json!({"mode": "AUTO"})),
            ToolChoice::None => Some(json!({"mode": "NONE"})),
            ToolChoice::Required => Some(json!({"mode": "ANY"})),
            ToolChoice::Function(name) => Some(json!({"mode": "ANY", "allowedFunctionNames": [name]})),
        };
        if let Some(config) = mode {
            body["toolConfig"] = json!({ "functionCallingConfig": config });
        }
    }
    let mut config = Map::new();
    if let Some(m) = r.max_tokens {
        config.insert("maxOutputTokens".into(), json!(m));
    }
    if let Some(t) = r.temperature {
        config.insert("temperature".into(), json!(t));
    }
    if let Some(p) = r.top_p {
        config.insert("topP".into(), json!(p));
    }
    if !r.stop.is_empty() {
        if r.stop.len() > MAX_STOP_SEQUENCES {
            return Err(ProviderError::invalid(
                "stop",
                format!("Gemini accepts at most {MAX_STOP_SEQUENCES} stop sequences"),
            ));
        }
        config.insert("stopSequences".into(), json!(r.stop));
    }
    match &r.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => {
            config.insert("responseMimeType".into(), json!("application/json"));
        }
        ResponseFormat::JsonSchema { schema, .. } => {
            // `responseSchema` (the OpenAPI subset, converted like tool
            // parameters) works on every model; `strict` is implied.
            let schema = gemini_schema(schema)
                .map_err(|reason| ProviderError::invalid("response_format.json_schema.schema", reason))?;
            config.insert("responseMimeType".into(), json!("application/json"));
            config.insert("responseSchema".into(), schema);
        }
    }
    if let Some(effort) = r.reasoning_effort {
        config.insert(
            "thinkingConfig".into(),
            json!({"thinkingBudget": effort.budget_tokens(), "includeThoughts": true}),
        );
    }
    if !config.is_empty() {
        body["generationConfig"] = Value::Object(config);
    }
    Ok(body)
}

/// The system texts and the `contents` turns.
fn contents(r: &ChatRequest) -> Result<(Vec<String>, Vec<Value>), ProviderError> {
    let sentinel = validates_signatures(&r.model);
    let mut system = Vec::new();
    let mut contents = Vec::new();
    // Call id → (function name, position in its assistant message).
    let mut calls: HashMap<&str, (&str, usize)> = HashMap::new();
    let messages = &r.messages;
    let mut i = 0;
    while i < messages.len() {
        let m = &messages[i];
        match m.role {
            Role::System | Role::Developer => {
                if m.content.iter().any(|p| matches!(p, Part::Image(_))) {
                    return Err(ProviderError::invalid(
                        format!("messages[{i}].content"),
                        "Gemini's system instruction takes text only",
                    ));
                }
                let text = m.joined_text();
                if !text.is_empty() {
                    system.push(text);
                }
            }
            Role::User => {
                let parts = content_parts(m);
                if !parts.is_empty() {
                    contents.push(json!({"role": "user", "parts": parts}));
                }
            }
            Role::Assistant => {
                let mut parts = content_parts(m);
                let signed = m.tool_calls.iter().any(|c| c.thought_signature.is_some());
                for (j, c) in m.tool_calls.iter().enumerate() {
                    let args =
                        super::arguments_object(&c.arguments, &format!("messages[{i}].tool_calls[{j}].arguments"))?;
                    let mut call = json!({"name": c.name, "args": args});
                    if !c.id.is_empty() && !is_synthetic_id(&c.id) {
                        call["id"] = json!(c.id);
                    }
                    let mut part = json!({ "functionCall": call });
                    if let Some(s) = &c.thought_signature {
                        part["thoughtSignature"] = json!(s);
                    } else if j == 0 && !signed && sentinel {
                        part["thoughtSignature"] = json!(SKIP_THOUGHT_SIGNATURE);
                    }
                    parts.push(part);
                    if !c.id.is_empty() {
                        calls.insert(&c.id, (&c.name, j));
                    }
                }
                if !parts.is_empty() {
                    contents.push(json!({"role": "model", "parts": parts}));
                }
            }
            Role::Tool => {
                let mut answers = Vec::new();
                while let Some(t) = messages.get(i).filter(|t| t.role == Role::Tool) {
                    answers.push(function_response(t, i, &calls)?);
                    i += 1;
                }
                // In the order of the calls answered: how Gemini pairs
                // calls and responses that carry no ids.
                answers.sort_by_key(|(position, _)| *position);
                let parts: Vec<Value> = answers.into_iter().map(|(_, p)| p).collect();
                contents.push(json!({"role": "user", "parts": parts}));
                continue;
            }
        }
        i += 1;
    }
    Ok((system, contents))
}

/// A tool message as a `functionResponse` part, with the position of the
/// call it answers (`usize::MAX` when unknown).
fn function_response(
    m: &Message,
    i: usize,
    calls: &HashMap<&str, (&str, usize)>,
) -> Result<(usize, Value), ProviderError> {
    if m.content.iter().any(|p| matches!(p, Part::Image(_))) {
        return Err(ProviderError::invalid(
            format!("messages[{i}].content"),
            "a tool result must be text",
        ));
    }
    let id = m.tool_call_id.as_deref().filter(|id| !id.is_empty());
    let known = id.and_then(|id| calls.get(id)).copied();
    let name = match (known, m.name.as_deref().filter(|n| !n.is_empty())) {
        (Some((name, _)), _) | (None, Some(name)) => name,
        (None, None) => {
            return Err(ProviderError::invalid(
                format!("messages[{i}].tool_call_id"),
                "names no earlier assistant tool call and the message has no name: Gemini needs the function's name",
            ));
        }
    };
    let text = m.joined_text();
    let response = match serde_json::from_str::<Value>(&text) {
        Ok(v @ Value::Object(_)) => v,
        _ => json!({ "result": text }),
    };
    let mut answer = json!({"name": name, "response": response});
    if let Some(id) = id.filter(|id| !is_synthetic_id(id)) {
        answer["id"] = json!(id);
    }
    Ok((
        known.map_or(usize::MAX, |(_, p)| p),
        json!({ "functionResponse": answer }),
    ))
}

/// Text and image parts (empty texts left out: Gemini rejects them).
/// Reasoning is not sent back (Gemini wants only the thought signatures on
/// function calls, which travel with the calls) and cache points mean
/// nothing here (Gemini caches prefixes on its own).
fn content_parts(m: &Message) -> Vec<Value> {
    let mut parts = Vec::new();
    for p in &m.content {
        match p {
            Part::Text(t) if t.is_empty() => {}
            Part::Text(t) => parts.push(json!({ "text": t })),
            Part::Image(image) => parts.push(image_part(image)),
            Part::Reasoning(_) | Part::CachePoint => {}
        }
    }
    parts
}

/// Inline bytes → `inlineData`; a URL → `fileData` with the media type
/// guessed from the extension, left out when unknown (it is optional).
fn image_part(image: &Image) -> Value {
    let image = match image {
        Image::Url(u) => Image::from_url(u),
        other => other.clone(),
    };
    match image {
        Image::Inline { media_type, base64 } => json!({"inlineData": {"mimeType": media_type, "data": base64}}),
        Image::Url(url) => {
            let mut data = json!({ "fileUri": url });
            if let Some(m) = image_media_type(&url) {
                data["mimeType"] = json!(m);
            }
            json!({ "fileData": data })
        }
    }
}

/// An image URL's media type, from its path's extension.
fn image_media_type(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or(url);
    let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "heif" => "image/heif",
        _ => return None,
    })
}

/// Keywords Gemini's `Schema` knows, kept as they are.
const SCHEMA_KEYWORDS: &[&str] = &[
    "type",
    "title",
    "description",
    "nullable",
    "enum",
    "required",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "default",
    "minimum",
    "maximum",
    "propertyOrdering",
];

/// The `format`s Gemini accepts (others are a 400).
const SCHEMA_FORMATS: &[&str] = &["enum", "date-time", "float", "double", "int32", "int64"];

/// A JSON Schema as Gemini's OpenAPI-3 subset: `$ref`s inlined (to
/// `$defs`, `definitions` or any `#/` pointer; a recursive one becomes a
/// free-form object), a single `allOf` flattened (several merged),
/// `anyOf`/`oneOf` with a `null` alternative and `type: [X, "null"]` as
/// `nullable`, `const` as a one-value `enum`, and every keyword Gemini does
/// not know (`$schema`, `$defs`, `additionalProperties`, …) left out.
pub fn gemini_schema(schema: &Value) -> Result<Value, String> {
    let mut refs = Vec::new();
    convert(schema, schema, &mut refs, 0)
}

fn convert(node: &Value, root: &Value, refs: &mut Vec<String>, depth: usize) -> Result<Value, String> {
    if depth > MAX_SCHEMA_DEPTH {
        return Err(format!("the schema nests deeper than {MAX_SCHEMA_DEPTH} levels"));
    }
    let Some(obj) = node.as_object() else {
        // `true` (anything) and other non-object schemas: no constraint.
        return Ok(json!({}));
    };
    if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
        let mut out = if refs.iter().any(|seen| seen == r) {
            json!({"type": "object"})
        } else {
            let target = r
                .strip_prefix('#')
                .and_then(|pointer| root.pointer(pointer))
                .ok_or_else(|| format!("cannot resolve $ref {r:?} (only local #/ references are supported)"))?;
            refs.push(r.to_owned());
            let converted = convert(target, root, refs, depth + 1);
            refs.pop();
            converted?
        };
        // Sibling keywords (a description) win over the referenced ones.
        let mut rest = obj.clone();
        rest.remove("$ref");
        let siblings = convert(&Value::Object(rest), root, refs, depth + 1)?;
        overlay(&mut out, siblings);
        return Ok(out);
    }

    let mut out = Map::new();
    let mut nullable = obj.get("nullable").and_then(Value::as_bool).unwrap_or(false);
    for key in SCHEMA_KEYWORDS {
        if let Some(v) = obj.get(*key) {
            out.insert((*key).to_owned(), v.clone());
        }
    }
    if let Some(f) = obj
        .get("format")
        .and_then(Value::as_str)
        .filter(|f| SCHEMA_FORMATS.contains(f))
    {
        out.insert("format".into(), json!(f));
    }
    if !out.contains_key("enum")
        && let Some(c) = obj.get("const")
    {
        out.insert("enum".into(), json!([c]));
    }
    if !out.contains_key("example")
        && let Some(e) = obj.get("examples").and_then(Value::as_array).and_then(|e| e.first())
    {
        out.insert("example".into(), e.clone());
    }
    if let Some(values) = out.get_mut("enum").and_then(Value::as_array_mut)
        && values.iter().any(Value::is_null)
    {
        values.retain(|v| !v.is_null());
        nullable = true;
    }
    match out.remove("type") {
        Some(Value::String(t)) if t == "null" => nullable = true,
        Some(Value::Array(types)) => {
            let mut kept: Vec<Value> = Vec::new();
            for t in types {
                if t == "null" {
                    nullable = true;
                } else {
                    kept.push(t);
                }
            }
            match kept.len() {
                0 => {}
                1 => {
                    out.insert("type".into(), kept.remove(0));
                }
                _ => {
                    let alternatives = kept.into_iter().map(|t| json!({ "type": t })).collect();
                    out.insert("anyOf".into(), Value::Array(alternatives));
                }
            }
        }
        Some(t) => {
            out.insert("type".into(), t);
        }
        None => {}
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        let mut converted = Map::new();
        for (name, schema) in props {
            converted.insert(name.clone(), convert(schema, root, refs, depth + 1)?);
        }
        out.insert("properties".into(), Value::Object(converted));
    }
    match obj.get("items") {
        Some(items @ Value::Object(_)) => {
            out.insert("items".into(), convert(items, root, refs, depth + 1)?);
        }
        // Draft-4 tuples: the first item's schema is the best Gemini can say.
        Some(Value::Array(items)) => {
            if let Some(first) = items.first() {
                out.insert("items".into(), convert(first, root, refs, depth + 1)?);
            }
        }
        _ => {}
    }
    let mut out = Value::Object(out);

    for key in ["anyOf", "oneOf"] {
        let Some(alternatives) = obj.get(key).and_then(Value::as_array) else {
            continue;
        };
        let mut kept = Vec::new();
        for a in alternatives {
            if is_null_schema(a) {
                nullable = true;
            } else {
                kept.push(convert(a, root, refs, depth + 1)?);
            }
        }
        if kept.len() == 1 {
            let mut only = kept.remove(0);
            overlay(&mut only, out);
            out = only;
        } else if !kept.is_empty() {
            out["anyOf"] = Value::Array(kept);
        }
    }
    if let Some(parts) = obj.get("allOf").and_then(Value::as_array) {
        for p in parts {
            let part = convert(p, root, refs, depth + 1)?;
            merge_all_of(&mut out, part);
        }
    }
    if nullable {
        out["nullable"] = json!(true);
    }
    Ok(out)
}

/// `{"type": "null"}` (or `type: ["null"]`).
fn is_null_schema(v: &Value) -> bool {
    match &v["type"] {
        Value::String(t) => t == "null",
        Value::Array(types) => !types.is_empty() && types.iter().all(|t| t == "null"),
        _ => false,
    }
}

/// Puts every key of `top` over `base`.
fn overlay(base: &mut Value, top: Value) {
    if let (Some(base), Value::Object(top)) = (base.as_object_mut(), top) {
        for (k, v) in top {
            base.insert(k, v);
        }
    }
}

/// Merges an `allOf` member into `base`: properties and `required` united,
/// other keywords taken where `base` has none.
fn merge_all_of(base: &mut Value, part: Value) {
    let (Some(base), Value::Object(part)) = (base.as_object_mut(), part) else {
        return;
    };
    for (k, v) in part {
        match (k.as_str(), base.get_mut(&k)) {
            ("properties", Some(Value::Object(mine))) => {
                if let Value::Object(theirs) = v {
                    for (name, schema) in theirs {
                        mine.entry(name).or_insert(schema);
                    }
                }
            }
            ("required", Some(Value::Array(mine))) => {
                if let Value::Array(theirs) = v {
                    for name in theirs {
                        if !mine.contains(&name) {
                            mine.push(name);
                        }
                    }
                }
            }
            (_, Some(_)) => {}
            (_, None) => {
                base.insert(k, v);
            }
        }
    }
}

/// The `batchEmbedContents` request body.
pub fn embed_body(model: &str, inputs: &[String], dimensions: Option<u32>) -> Value {
    let name = format!("models/{}", model_id(model));
    let requests: Vec<Value> = inputs
        .iter()
        .map(|text| {
            let mut r = json!({"model": name, "content": {"parts": [{ "text": text }]}});
            if let Some(d) = dimensions {
                r["outputDimensionality"] = json!(d);
            }
            r
        })
        .collect();
    json!({ "requests": requests })
}

/// `embeddings[].values` in request order, and the prompt tokens when reported.
fn parse_embeddings(v: &Value, expected: usize) -> Result<(Vec<Vec<f32>>, u64), ProviderError> {
    let malformed = || ProviderError::Malformed("an embedding is not an array of numbers".into());
    let embeddings = v["embeddings"]
        .as_array()
        .ok_or_else(|| ProviderError::Malformed("no embeddings in the answer".into()))?;
    if embeddings.len() != expected {
        return Err(ProviderError::Malformed(format!(
            "{} embeddings for {expected} inputs",
            embeddings.len()
        )));
    }
    let vectors = embeddings
        .iter()
        .map(|e| {
            e["values"]
                .as_array()
                .ok_or_else(malformed)?
                .iter()
                .map(|x| x.as_f64().map(|f| f as f32).ok_or_else(malformed))
                .collect::<Result<Vec<f32>, _>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((vectors, u(&v["usageMetadata"]["promptTokenCount"])))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Gemini `usageMetadata` → [`Usage`].
pub fn parse_usage(v: &Value) -> Usage {
    let thoughts = u(&v["thoughtsTokenCount"]);
    Usage {
        input_tokens: u(&v["promptTokenCount"]) + u(&v["toolUsePromptTokenCount"]),
        output_tokens: u(&v["candidatesTokenCount"]) + thoughts,
        cached_input_tokens: u(&v["cachedContentTokenCount"]),
        cache_write_tokens: 0,
        reasoning_tokens: thoughts,
    }
}

/// Gemini `finishReason` → [`FinishReason`] (before function calls turn
/// `STOP` into [`FinishReason::ToolCalls`]).
pub fn finish_reason(s: Option<&str>) -> FinishReason {
    match s {
        None => FinishReason::Unspecified,
        Some("STOP") => FinishReason::Stop,
        Some("MAX_TOKENS") => FinishReason::Length,
        Some(
            "SAFETY"
            | "RECITATION"
            | "BLOCKLIST"
            | "PROHIBITED_CONTENT"
            | "SPII"
            | "IMAGE_SAFETY"
            | "IMAGE_PROHIBITED_CONTENT"
            | "IMAGE_RECITATION",
        ) => FinishReason::ContentFilter,
        // MALFORMED_FUNCTION_CALL, LANGUAGE, OTHER, FINISH_REASON_UNSPECIFIED, …
        Some(_) => FinishReason::Error,
    }
}

fn with_calls(reason: FinishReason, has_calls: bool) -> FinishReason {
    if has_calls && reason == FinishReason::Stop {
        FinishReason::ToolCalls
    } else {
        reason
    }
}

/// A `functionCall` part as a [`ToolCall`] (an id made up when Gemini gave none).
fn tool_call(part: &Value) -> ToolCall {
    let call = &part["functionCall"];
    let args = &call["args"];
    ToolCall {
        id: call["id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map_or_else(synthetic_id, str::to_owned),
        name: call["name"].as_str().unwrap_or_default().to_owned(),
        arguments: if args.is_null() {
            "{}".to_owned()
        } else {
            args.to_string()
        },
        thought_signature: part["thoughtSignature"].as_str().map(str::to_owned),
    }
}

fn blocked(v: &Value) -> bool {
    v["promptFeedback"]["blockReason"].as_str().is_some()
}

/// A `GenerateContentResponse` → [`ChatResponse`].
pub fn parse_chat(v: &Value) -> Result<ChatResponse, ProviderError> {
    let mut out = ChatResponse {
        id: v["responseId"].as_str().unwrap_or_default().to_owned(),
        model: v["modelVersion"].as_str().unwrap_or_default().to_owned(),
        usage: parse_usage(&v["usageMetadata"]),
        ..ChatResponse::default()
    };
    let Some(candidate) = v["candidates"].get(0) else {
        if blocked(v) {
            out.finish_reason = FinishReason::ContentFilter;
            return Ok(out);
        }
        return Err(ProviderError::Malformed(
            "no candidates and no promptFeedback.blockReason in the answer".into(),
        ));
    };
    for part in candidate["content"]["parts"].as_array().into_iter().flatten() {
        if part["functionCall"].is_object() {
            out.tool_calls.push(tool_call(part));
        } else if let Some(t) = part["text"].as_str() {
            if part["thought"].as_bool() == Some(true) {
                out.reasoning.push_str(t);
            } else {
                out.text.push_str(t);
            }
        }
    }
    out.finish_reason = with_calls(
        finish_reason(candidate["finishReason"].as_str()),
        !out.tool_calls.is_empty(),
    );
    Ok(out)
}

/// `streamGenerateContent?alt=sse` frames → [`StreamEvent`]s.
#[derive(Debug, Default)]
pub struct StreamTranslator {
    frames: usize,
    calls: u32,
}

impl StreamTranslator {
    fn frame(&mut self, v: &Value, raw: &str, out: &mut Vec<StreamEvent>) -> Result<(), ProviderError> {
        if v.get("error").is_some_and(|e| !e.is_null()) {
            let (kind, message) = error_fields(&v["error"], raw.as_bytes());
            return Err(ProviderError::Stream { kind, message });
        }
        self.frames += 1;
        if let Some(candidate) = v["candidates"].get(0) {
            for part in candidate["content"]["parts"].as_array().into_iter().flatten() {
                if part["functionCall"].is_object() {
                    let call = tool_call(part);
                    let index = self.calls;
                    self.calls += 1;
                    out.push(StreamEvent::ToolCallStart {
                        index,
                        id: call.id,
                        name: call.name,
                        thought_signature: call.thought_signature,
                    });
                    out.push(StreamEvent::ToolCallArguments {
                        index,
                        fragment: call.arguments,
                    });
                } else if let Some(t) = part["text"].as_str().filter(|t| !t.is_empty()) {
                    out.push(if part["thought"].as_bool() == Some(true) {
                        StreamEvent::Reasoning(t.to_owned())
                    } else {
                        StreamEvent::Text(t.to_owned())
                    });
                }
            }
            if let Some(f) = candidate["finishReason"].as_str() {
                out.push(StreamEvent::Finish(with_calls(finish_reason(Some(f)), self.calls > 0)));
            }
        } else if blocked(v) {
            out.push(StreamEvent::Finish(FinishReason::ContentFilter));
        }
        if v["usageMetadata"].is_object() {
            out.push(StreamEvent::Usage(parse_usage(&v["usageMetadata"])));
        }
        Ok(())
    }
}

impl Translator for StreamTranslator {
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<StreamEvent>, ProviderError> {
        let data = event.data.trim();
        if data.is_empty() {
            return Ok(Vec::new());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| ProviderError::Malformed(format!("chunk: {e}")))?;
        let mut out = Vec::new();
        match &v {
            // Not what `alt=sse` sends, but harmless to accept.
            Value::Array(frames) => {
                for f in frames {
                    self.frame(f, data, &mut out)?;
                }
            }
            other => self.frame(other, data, &mut out)?,
        }
        Ok(out)
    }

    /// The end of the body is the normal end of a Gemini stream; one
    /// without a single chunk is not an answer.
    fn on_end(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        if self.frames == 0 {
            Err(ProviderError::Malformed(
                "the stream ended before its first chunk".into(),
            ))
        } else {
            Ok(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Accumulator, Tool};

    fn user(text: &str) -> Message {
        Message::text(Role::User, text)
    }

    fn assistant_calls(calls: Vec<ToolCall>) -> Message {
        Message {
            role: Role::Assistant,
            content: Vec::new(),
            tool_calls: calls,
            tool_call_id: None,
            name: None,
        }
    }

    fn call(id: &str, name: &str, arguments: &str, signature: Option<&str>) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
            thought_signature: signature.map(str::to_owned),
        }
    }

    fn tool_result(id: &str, text: &str) -> Message {
        Message {
            role: Role::Tool,
            content: vec![Part::Text(text.into())],
            tool_calls: Vec::new(),
            tool_call_id: Some(id.into()),
            name: None,
        }
    }

    fn request(messages: Vec<Message>) -> ChatRequest {
        ChatRequest {
            model: "gemini-3-flash-preview".into(),
            messages,
            ..ChatRequest::default()
        }
    }

    fn sse(v: Value) -> SseEvent {
        SseEvent {
            event: None,
            data: v.to_string(),
        }
    }

    fn invalid_field(e: ProviderError) -> String {
        match e {
            ProviderError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn system_and_developer_messages_become_one_system_instruction_and_assistant_is_model() {
        let r = request(vec![
            Message::text(Role::System, "Be brief."),
            user("Hi"),
            Message::text(Role::Assistant, "Hello!"),
            Message::text(Role::Developer, "Answer in French."),
            user("How are you?"),
        ]);
        let body = chat_body(&r).unwrap();
        assert_eq!(
            body["systemInstruction"],
            json!({"parts": [{"text": "Be brief.\n\nAnswer in French."}]})
        );
        assert_eq!(
            body["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Hi"}]},
                {"role": "model", "parts": [{"text": "Hello!"}]},
                {"role": "user", "parts": [{"text": "How are you?"}]},
            ])
        );
        assert!(body.get("generationConfig").is_none());
        assert!(body.get("tools").is_none());
        assert!(body.get("toolConfig").is_none());
    }

    #[test]
    fn images_become_inline_data_or_file_data() {
        let mut m = user("What is this?");
        m.content.push(Part::Image(Image::Inline {
            media_type: "image/png".into(),
            base64: "iVBORw0KGgo=".into(),
        }));
        m.content
            .push(Part::Image(Image::Url("https://example.com/cat.JPG?size=2".into())));
        m.content
            .push(Part::Image(Image::Url("https://example.com/pic".into())));
        m.content
            .push(Part::Image(Image::Url("data:image/webp;base64,UklGRg==".into())));
        let body = chat_body(&request(vec![m])).unwrap();
        assert_eq!(
            body["contents"][0]["parts"],
            json!([
                {"text": "What is this?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"fileData": {"fileUri": "https://example.com/cat.JPG?size=2", "mimeType": "image/jpeg"}},
                {"fileData": {"fileUri": "https://example.com/pic"}},
                {"inlineData": {"mimeType": "image/webp", "data": "UklGRg=="}},
            ])
        );
    }

    #[test]
    fn reasoning_effort_becomes_a_thinking_budget_and_reasoning_parts_stay_home() {
        let mut assistant = Message::text(Role::Assistant, "Earlier answer.");
        assistant.content.insert(
            0,
            Part::Reasoning(crate::model::Reasoning {
                text: "private".into(),
                signature: Some("sig".into()),
                redacted: None,
            }),
        );
        assistant.content.push(Part::CachePoint);
        let mut r = request(vec![user("x"), assistant, user("y")]);
        r.reasoning_effort = Some(crate::model::ReasoningEffort::High);
        let body = chat_body(&r).unwrap();
        assert_eq!(
            body["generationConfig"]["thinkingConfig"],
            json!({"thinkingBudget": 16384, "includeThoughts": true})
        );
        assert_eq!(body["contents"][1]["parts"], json!([{"text": "Earlier answer."}]));
    }

    #[test]
    fn generation_config_carries_sampling_limits_and_json_modes() {
        let mut r = request(vec![user("x")]);
        r.max_tokens = Some(256);
        r.temperature = Some(1.5);
        r.top_p = Some(0.9);
        r.stop = vec!["END".into(), "STOP".into()];
        r.user = Some("u-1".into());
        r.parallel_tool_calls = Some(false);
        r.response_format = ResponseFormat::JsonObject;
        let body = chat_body(&r).unwrap();
        assert_eq!(
            body["generationConfig"],
            json!({
                "maxOutputTokens": 256,
                "temperature": 1.5,
                "topP": 0.9,
                "stopSequences": ["END", "STOP"],
                "responseMimeType": "application/json",
            })
        );
        // No Gemini field for these.
        assert!(body.get("user").is_none());
        assert!(body.get("parallel_tool_calls").is_none());

        r.response_format = ResponseFormat::JsonSchema {
            name: "answer".into(),
            schema: json!({
                "$schema": "https://json-schema.org/draft/2020-12/schema",
                "type": "object",
                "properties": {"n": {"type": ["integer", "null"]}},
                "required": ["n"],
                "additionalProperties": false,
            }),
            strict: true,
        };
        let body = chat_body(&r).unwrap();
        assert_eq!(body["generationConfig"]["responseMimeType"], "application/json");
        assert_eq!(
            body["generationConfig"]["responseSchema"],
            json!({
                "type": "object",
                "properties": {"n": {"type": "integer", "nullable": true}},
                "required": ["n"],
            })
        );

        r.stop = (0..6).map(|i| i.to_string()).collect();
        assert_eq!(invalid_field(chat_body(&r).unwrap_err()), "stop");
    }

    #[test]
    fn tools_become_function_declarations_and_tool_choice_maps_to_modes() {
        let mut r = request(vec![user("weather?")]);
        r.tools = vec![
            Tool {
                name: "get_weather".into(),
                description: "Weather for a city".into(),
                parameters: json!({
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                    "additionalProperties": false,
                }),
            },
            Tool {
                name: "now".into(),
                description: String::new(),
                parameters: json!({"type": "object", "properties": {}}),
            },
        ];
        let body = chat_body(&r).unwrap();
        assert_eq!(
            body["tools"],
            json!([{"functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
                {"name": "now"},
            ]}])
        );
        assert!(body.get("toolConfig").is_none(), "unset: Gemini's default");

        let cases = [
            (ToolChoice::Auto, json!({"mode": "AUTO"})),
            (ToolChoice::Required, json!({"mode": "ANY"})),
            (
                ToolChoice::Function("get_weather".into()),
                json!({"mode": "ANY", "allowedFunctionNames": ["get_weather"]}),
            ),
            (ToolChoice::None, json!({"mode": "NONE"})),
        ];
        for (choice, expected) in cases {
            r.tool_choice = choice.clone();
            let body = chat_body(&r).unwrap();
            assert_eq!(
                body["toolConfig"],
                json!({"functionCallingConfig": expected}),
                "{choice:?}"
            );
        }
    }

    #[test]
    fn schema_refs_are_inlined_and_unknown_keywords_dropped() {
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "$defs": {
                "Address": {
                    "type": "object",
                    "properties": {"street": {"type": "string", "format": "email"}},
                    "additionalProperties": false,
                },
            },
            "definitions": {"Tag": {"type": "string", "enum": ["a", "b"]}},
            "type": "object",
            "properties": {
                "home": {"$ref": "#/$defs/Address", "description": "Where they live"},
                "tag": {"$ref": "#/definitions/Tag"},
                "when": {"type": "string", "format": "date-time"},
                "additionalProperties": {"type": "boolean"},
            },
            "required": ["home"],
            "additionalProperties": false,
        });
        assert_eq!(
            gemini_schema(&schema).unwrap(),
            json!({
                "type": "object",
                "properties": {
                    "home": {
                        "type": "object",
                        "description": "Where they live",
                        "properties": {"street": {"type": "string"}},
                    },
                    "tag": {"type": "string", "enum": ["a", "b"]},
                    "when": {"type": "string", "format": "date-time"},
                    // A property that happens to be named like a keyword stays.
                    "additionalProperties": {"type": "boolean"},
                },
                "required": ["home"],
            })
        );
    }

    #[test]
    fn schema_all_of_any_of_and_null_types_are_flattened() {
        let schema = json!({
            "type": "object",
            "properties": {
                "a": {"allOf": [{"type": "string", "description": "inner"}], "description": "outer"},
                "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
                "c": {"type": ["number", "null"]},
                "d": {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
                "e": {"type": ["string", "integer"]},
                "f": {"const": "fixed"},
                "g": {"enum": ["x", null]},
                "h": {"allOf": [
                    {"type": "object", "properties": {"p": {"type": "string"}}, "required": ["p"]},
                    {"properties": {"q": {"type": "string"}}, "required": ["q"]},
                ]},
            },
        });
        assert_eq!(
            gemini_schema(&schema).unwrap()["properties"],
            json!({
                "a": {"type": "string", "description": "outer"},
                "b": {"type": "integer", "nullable": true},
                "c": {"type": "number", "nullable": true},
                "d": {"anyOf": [{"type": "string"}, {"type": "integer"}], "nullable": true},
                "e": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                "f": {"enum": ["fixed"]},
                "g": {"enum": ["x"], "nullable": true},
                "h": {
                    "type": "object",
                    "properties": {"p": {"type": "string"}, "q": {"type": "string"}},
                    "required": ["p", "q"],
                },
            })
        );
    }

    #[test]
    fn schema_recursion_stops_and_bad_refs_are_the_callers_error() {
        let schema = json!({
            "$defs": {"Node": {
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
            }},
            "$ref": "#/$defs/Node",
        });
        assert_eq!(
            gemini_schema(&schema).unwrap(),
            json!({
                "type": "object",
                "properties": {"children": {"type": "array", "items": {"type": "object"}}},
            })
        );
        let mut r = request(vec![user("x")]);
        r.tools = vec![Tool {
            name: "f".into(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {"x": {"$ref": "other.json#/X"}}}),
        }];
        assert_eq!(invalid_field(chat_body(&r).unwrap_err()), "tools[0].parameters");
    }

    #[test]
    fn assistant_calls_carry_object_args_ids_and_thought_signatures() {
        let synthetic = synthetic_id();
        let r = request(vec![
            user("weather in Paris and Rome?"),
            assistant_calls(vec![
                call("fc-1", "get_weather", r#"{"city":"Paris"}"#, Some("sig-A")),
                call(&synthetic, "get_weather", r#"{"city":"Rome"}"#, None),
            ]),
        ]);
        let body = chat_body(&r).unwrap();
        assert_eq!(
            body["contents"][1],
            json!({"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "fc-1"}, "thoughtSignature": "sig-A"},
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
            ]})
        );
    }

    #[test]
    fn invalid_call_arguments_name_the_field() {
        let r = request(vec![
            user("x"),
            assistant_calls(vec![call("a", "f", "{}", None), call("b", "f", "{not json", None)]),
        ]);
        assert_eq!(
            invalid_field(chat_body(&r).unwrap_err()),
            "messages[1].tool_calls[1].arguments"
        );
    }

    #[test]
    fn unsigned_calls_get_the_documented_stand_in_on_gemini_3_only() {
        let mut r = request(vec![
            user("x"),
            assistant_calls(vec![call("call_1", "f", "{}", None), call("call_2", "f", "{}", None)]),
        ]);
        let body = chat_body(&r).unwrap();
        let parts = &body["contents"][1]["parts"];
        assert_eq!(parts[0]["thoughtSignature"], SKIP_THOUGHT_SIGNATURE);
        assert!(parts[1].get("thoughtSignature").is_none());

        r.model = "models/gemini-2.5-flash".into();
        let body = chat_body(&r).unwrap();
        assert!(body["contents"][1]["parts"][0].get("thoughtSignature").is_none());
    }

    #[test]
    fn tool_results_become_one_user_turn_of_function_responses_in_call_order() {
        let s1 = synthetic_id();
        let s2 = synthetic_id();
        assert_ne!(s1, s2);
        let mut named = tool_result("call_from_elsewhere", "plain text");
        named.name = Some("lookup".into());
        let r = request(vec![
            user("x"),
            assistant_calls(vec![
                call("fc-1", "get_weather", "{}", Some("sig")),
                call(&s1, "search", "{}", None),
                call(&s2, "search", "{}", None),
            ]),
            // Answered out of order.
            tool_result(&s2, "[1, 2]"),
            tool_result("fc-1", r#"{"temp": 21}"#),
            tool_result(&s1, "found it"),
            named,
            user("thanks"),
        ]);
        let body = chat_body(&r).unwrap();
        assert_eq!(
            body["contents"][2],
            json!({"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "id": "fc-1", "response": {"temp": 21}}},
                {"functionResponse": {"name": "search", "response": {"result": "found it"}}},
                {"functionResponse": {"name": "search", "response": {"result": "[1, 2]"}}},
                {"functionResponse": {"name": "lookup", "id": "call_from_elsewhere", "response": {"result": "plain text"}}},
            ]})
        );
        assert_eq!(
            body["contents"][3],
            json!({"role": "user", "parts": [{"text": "thanks"}]})
        );
        assert_eq!(body["contents"].as_array().unwrap().len(), 4);
    }

    #[test]
    fn a_tool_result_without_a_known_call_or_name_is_refused() {
        let r = request(vec![user("x"), tool_result("nowhere", "1")]);
        assert_eq!(invalid_field(chat_body(&r).unwrap_err()), "messages[1].tool_call_id");
    }

    #[test]
    fn answer_text_thoughts_calls_finish_and_usage() {
        let v = json!({
            "candidates": [{
                "content": {"role": "model", "parts": [
                    {"text": "Let me think.", "thought": true},
                    {"text": "Checking."},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "fc-9"}, "thoughtSignature": "sig-9"},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                ]},
                "finishReason": "STOP",
                "index": 0,
            }],
            "usageMetadata": {
                "promptTokenCount": 100,
                "toolUsePromptTokenCount": 10,
                "candidatesTokenCount": 20,
                "thoughtsTokenCount": 66,
                "cachedContentTokenCount": 40,
                "totalTokenCount": 196,
            },
            "modelVersion": "gemini-3-flash-preview",
            "responseId": "resp-1",
        });
        let r = parse_chat(&v).unwrap();
        assert_eq!(r.id, "resp-1");
        assert_eq!(r.model, "gemini-3-flash-preview");
        assert_eq!(r.reasoning, "Let me think.");
        assert_eq!(r.text, "Checking.");
        assert_eq!(r.finish_reason, FinishReason::ToolCalls);
        assert_eq!(r.tool_calls[0].id, "fc-9");
        assert_eq!(r.tool_calls[0].thought_signature.as_deref(), Some("sig-9"));
        assert_eq!(r.tool_calls[0].arguments, r#"{"city":"Paris"}"#);
        assert!(is_synthetic_id(&r.tool_calls[1].id));
        assert_eq!(r.tool_calls[1].thought_signature, None);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 110,
                output_tokens: 86,
                cached_input_tokens: 40,
                cache_write_tokens: 0,
                reasoning_tokens: 66,
            }
        );
        assert_eq!(r.usage.total(), 196);
    }

    #[test]
    fn finish_reasons_map() {
        let cases = [
            ("STOP", FinishReason::Stop),
            ("MAX_TOKENS", FinishReason::Length),
            ("SAFETY", FinishReason::ContentFilter),
            ("RECITATION", FinishReason::ContentFilter),
            ("BLOCKLIST", FinishReason::ContentFilter),
            ("PROHIBITED_CONTENT", FinishReason::ContentFilter),
            ("SPII", FinishReason::ContentFilter),
            ("IMAGE_SAFETY", FinishReason::ContentFilter),
            ("MALFORMED_FUNCTION_CALL", FinishReason::Error),
            ("LANGUAGE", FinishReason::Error),
            ("OTHER", FinishReason::Error),
            ("FINISH_REASON_UNSPECIFIED", FinishReason::Error),
        ];
        for (gemini, ours) in cases {
            let v = json!({"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": gemini}]});
            assert_eq!(parse_chat(&v).unwrap().finish_reason, ours, "{gemini}");
        }
        // A call with MAX_TOKENS stays Length.
        let v = json!({"candidates": [{"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]}, "finishReason": "MAX_TOKENS"}]});
        assert_eq!(parse_chat(&v).unwrap().finish_reason, FinishReason::Length);
        // Filtered output: no content at all.
        let v = json!({"candidates": [{"finishReason": "SAFETY"}]});
        let r = parse_chat(&v).unwrap();
        assert_eq!((r.text.as_str(), r.finish_reason), ("", FinishReason::ContentFilter));
    }

    #[test]
    fn a_blocked_prompt_is_an_empty_filtered_answer() {
        let v = json!({
            "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
            "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7},
        });
        let r = parse_chat(&v).unwrap();
        assert_eq!(r.finish_reason, FinishReason::ContentFilter);
        assert!(r.text.is_empty() && r.tool_calls.is_empty());
        assert_eq!(r.usage.input_tokens, 7);
        assert!(matches!(parse_chat(&json!({})), Err(ProviderError::Malformed(_))));
    }

    #[test]
    fn error_bodies_give_status_and_message() {
        let body = br#"{"error":{"code":429,"message":"Quota exceeded","status":"RESOURCE_EXHAUSTED"}}"#;
        assert_eq!(
            parse_error(body),
            ("RESOURCE_EXHAUSTED".to_owned(), "Quota exceeded".to_owned())
        );
        let body = br#"[{"error":{"code":400,"message":"bad","status":"INVALID_ARGUMENT"}}]"#;
        assert_eq!(parse_error(body), ("INVALID_ARGUMENT".to_owned(), "bad".to_owned()));
        assert_eq!(
            parse_error(b"<html>oops</html>"),
            ("error".to_owned(), "<html>oops</html>".to_owned())
        );
    }

    #[test]
    fn stream_frames_translate_and_parallel_calls_are_numbered() {
        let mut t = StreamTranslator::default();
        let mut events = Vec::new();
        let frames = [
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "hmm", "thought": true}]}}],
                   "usageMetadata": {"promptTokenCount": 12, "totalTokenCount": 12}}),
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Sure. "}]}}]}),
            json!({"candidates": [{"content": {"role": "model", "parts": [
                {"functionCall": {"name": "search", "args": {"q": "a"}}, "thoughtSignature": "sig-1"}]}}]}),
            json!({"candidates": [{"content": {"role": "model", "parts": [
                {"functionCall": {"name": "search", "args": {"q": "b"}}}]}, "finishReason": "STOP"}],
                   "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 9, "thoughtsTokenCount": 3, "totalTokenCount": 24}}),
        ];
        for f in frames {
            events.extend(t.on_event(&sse(f)).unwrap());
        }
        assert!(t.on_end().unwrap().is_empty());
        assert_eq!(events[0], StreamEvent::Reasoning("hmm".into()));
        assert_eq!(events[2], StreamEvent::Text("Sure. ".into()));
        let starts: Vec<(u32, String, Option<String>)> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::ToolCallStart {
                    index,
                    id,
                    thought_signature,
                    ..
                } => Some((*index, id.clone(), thought_signature.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(starts.len(), 2);
        assert_eq!((starts[0].0, starts[1].0), (0, 1));
        assert_ne!(starts[0].1, starts[1].1);
        assert!(is_synthetic_id(&starts[0].1) && is_synthetic_id(&starts[1].1));
        assert_eq!(starts[0].2.as_deref(), Some("sig-1"));
        let mut acc = Accumulator::default();
        for e in &events {
            acc.push(e);
        }
        let r = acc.finish();
        assert_eq!(r.finish_reason, FinishReason::ToolCalls);
        assert_eq!(r.tool_calls[0].arguments, r#"{"q":"a"}"#);
        assert_eq!(r.tool_calls[1].arguments, r#"{"q":"b"}"#);
        assert_eq!(r.tool_calls[1].name, "search");
        assert_eq!(r.usage.input_tokens, 12);
        assert_eq!(r.usage.output_tokens, 12);
        assert_eq!(r.usage.reasoning_tokens, 3);
        assert_eq!(r.usage.total(), 24);
    }

    #[test]
    fn stream_blocked_prompt_errors_and_empty_bodies() {
        let mut t = StreamTranslator::default();
        let events = t
            .on_event(&sse(json!({"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
                                   "usageMetadata": {"promptTokenCount": 5}})))
            .unwrap();
        assert_eq!(events[0], StreamEvent::Finish(FinishReason::ContentFilter));

        let mut t = StreamTranslator::default();
        t.on_event(&sse(json!({"candidates": [{"content": {"parts": [{"text": "Hi"}]}}]})))
            .unwrap();
        let err = t
            .on_event(&sse(
                json!({"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}),
            ))
            .unwrap_err();
        match err {
            ProviderError::Stream { kind, message } => {
                assert_eq!(kind, "UNAVAILABLE");
                assert_eq!(message, "The model is overloaded.");
            }
            other => panic!("expected Stream, got {other:?}"),
        }

        let mut t = StreamTranslator::default();
        assert!(matches!(t.on_end(), Err(ProviderError::Malformed(_))));
        assert!(matches!(
            t.on_event(&SseEvent {
                event: None,
                data: "{not json".into()
            }),
            Err(ProviderError::Malformed(_))
        ));
    }

    #[test]
    fn embed_body_names_the_model_per_request() {
        let body = embed_body("gemini-embedding-001", &["a".into(), "b".into()], Some(768));
        assert_eq!(
            body,
            json!({"requests": [
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "a"}]}, "outputDimensionality": 768},
                {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "b"}]}, "outputDimensionality": 768},
            ]})
        );
        let (vectors, tokens) = parse_embeddings(&json!({"embeddings": [{"values": [0.5, 1]}]}), 1).unwrap();
        assert_eq!((vectors, tokens), (vec![vec![0.5, 1.0]], 0));
        assert!(parse_embeddings(&json!({"embeddings": [{"values": [0.5]}]}), 2).is_err());
    }
}
