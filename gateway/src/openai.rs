//! The OpenAI-compatible HTTP surface: `POST /v1/chat/completions`
//! (streaming as SSE ending in `[DONE]`), `POST /v1/embeddings` and
//! `GET /v1/models`, translated to the ai service's own gRPC calls so the
//! official `openai` SDKs work unchanged with `base_url` pointed here.
//! Unlike the rest of the gateway this is a hand-written translation (the
//! OpenAI wire format is not described by our protos), so it links the
//! ai contract's generated types. Errors leave in OpenAI's shape
//! (`{"error":{"message","type","param","code"}}`) with the HTTP status of
//! the gRPC code. Parameters with no counterpart are refused when they
//! would change the answer (`n` > 1, `logprobs`) and dropped when they only
//! tune sampling (`presence_penalty`, `frequency_penalty`, `seed`,
//! `logit_bias`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use plinth::ai::v1 as pb;
use plinth::ai::v1::ai_service_client::AiServiceClient;
use serde_json::{Map, Value, json};
use tonic::transport::server::TcpConnectInfo;
use tonic_types::StatusExt;

use crate::error::http_status;
use crate::handler::Inner;
use crate::metadata;
use crate::upstream::GrpcService;

const AI_SERVICE: &str = "plinth.ai.v1.AiService";
/// Asks for (`use`) or refuses (`bypass`) Plinth's response cache; answered
/// with `hit` or `miss` on unstreamed completions.
const CACHE_HEADER: &str = "x-plinth-cache";

/// An error in OpenAI's shape.
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<String>,
    code: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let param = param.into();
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: format!("{param}: {}", message.into()),
            param: Some(param),
            code: None,
            retry_after: None,
        }
    }

    fn from_status(s: &tonic::Status) -> Self {
        let status = http_status(s.code());
        let details = s.get_error_details();
        let param = details
            .bad_request()
            .and_then(|b| b.field_violations.first())
            .map(|v| v.field.clone());
        let code = details.error_info().map(|i| i.reason.to_lowercase());
        let retry_after = details
            .retry_info()
            .and_then(|r| r.retry_delay)
            .map(|d| d.as_secs().max(1));
        let kind = match status.as_u16() {
            400 | 404 | 413 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        };
        Self {
            status,
            kind,
            message: s.message().to_owned(),
            param,
            code,
            retry_after,
        }
    }

    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// The routes, for the edge's router.
pub(crate) fn routes() -> axum::Router<Arc<Inner>> {
    axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(chat_completions))
        .route("/v1/embeddings", axum::routing::post(embeddings))
        .route("/v1/models", axum::routing::get(list_models))
        .route("/v1/models/{model}", axum::routing::get(get_model))
}

fn client(gw: &Inner) -> Result<AiServiceClient<GrpcService>, ApiError> {
    gw.upstreams
        .for_service(AI_SERVICE)
        .map(AiServiceClient::new)
        .ok_or_else(|| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "api_error",
            message: "no upstream serves the ai service: enable the ai component or set PLINTH_GATEWAY__UPSTREAMS__AI"
                .into(),
            param: None,
            code: None,
            retry_after: None,
        })
}

fn grpc_request<T>(headers: &HeaderMap, peer: Option<SocketAddr>, message: T) -> Result<tonic::Request<T>, ApiError> {
    let request_id = plinth_runtime::server::request_id(headers);
    let md = metadata::outgoing(headers, peer, &request_id).map_err(|e| ApiError::invalid(e.field, e.reason))?;
    let mut extensions = tonic::Extensions::new();
    extensions.insert(TcpConnectInfo {
        local_addr: None,
        remote_addr: peer,
    });
    Ok(tonic::Request::from_parts(md, extensions, message))
}

async fn read_json(gw: &Inner, req: Request) -> Result<(HeaderMap, Option<SocketAddr>, Map<String, Value>), ApiError> {
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    let (parts, body) = req.into_parts();
    let limit = gw.options.body_limit;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| ApiError {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        kind: "invalid_request_error",
        message: format!("request body is larger than the limit of {limit} bytes"),
        param: None,
        code: None,
        retry_after: None,
    })?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(o)) => Ok((parts.headers, peer, o)),
        Ok(_) => Err(ApiError::invalid("body", "must be a JSON object")),
        Err(e) => Err(ApiError::invalid("body", format!("is not valid JSON: {e}"))),
    }
}

fn string(v: &Value, param: &str) -> Result<String, ApiError> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| ApiError::invalid(param, "must be a string"))
}

fn json_struct(v: &Value, param: &str) -> Result<prost_types::Struct, ApiError> {
    match v {
        Value::Object(o) => Ok(plinth_runtime::wire::struct_of_json(o)),
        _ => Err(ApiError::invalid(param, "must be a JSON object")),
    }
}

fn role(name: &str, param: &str) -> Result<pb::Role, ApiError> {
    Ok(match name {
        "system" => pb::Role::System,
        "developer" => pb::Role::Developer,
        "user" => pb::Role::User,
        "assistant" => pb::Role::Assistant,
        "tool" | "function" => pb::Role::Tool,
        _ => {
            return Err(ApiError::invalid(
                param,
                "must be system, developer, user, assistant or tool",
            ));
        }
    })
}

fn content(v: &Value, param: &str) -> Result<Vec<pb::ContentPart>, ApiError> {
    let text = |t: String| pb::ContentPart {
        part: Some(pb::content_part::Part::Text(t)),
    };
    match v {
        Value::Null => Ok(Vec::new()),
        Value::String(s) => Ok(if s.is_empty() {
            Vec::new()
        } else {
            vec![text(s.clone())]
        }),
        Value::Array(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for (i, p) in parts.iter().enumerate() {
                let at = format!("{param}[{i}]");
                out.push(match p["type"].as_str() {
                    Some("text") => text(string(&p["text"], &format!("{at}.text"))?),
                    Some("image_url") => {
                        let url = match &p["image_url"] {
                            Value::String(s) => s.clone(),
                            other => string(&other["url"], &format!("{at}.image_url.url"))?,
                        };
                        pb::ContentPart {
                            part: Some(pb::content_part::Part::Image(pb::ImageInput {
                                source: Some(pb::image_input::Source::Url(url)),
                                media_type: String::new(),
                            })),
                        }
                    }
                    _ => return Err(ApiError::invalid(format!("{at}.type"), "must be text or image_url")),
                });
                // Anthropic-style `cache_control` on a part: cache up to here.
                if p.get("cache_control").is_some_and(|c| !c.is_null()) {
                    out.push(pb::ContentPart {
                        part: Some(pb::content_part::Part::CachePoint(pb::CachePoint {})),
                    });
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::invalid(
            param,
            "must be a string or an array of content parts",
        )),
    }
}

fn messages(v: &Value) -> Result<Vec<pb::Message>, ApiError> {
    let list = v
        .as_array()
        .ok_or_else(|| ApiError::invalid("messages", "must be an array"))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = format!("messages[{i}]");
            let role = role(m["role"].as_str().unwrap_or_default(), &format!("{at}.role"))?;
            let mut tool_calls = Vec::new();
            for (j, c) in m["tool_calls"].as_array().into_iter().flatten().enumerate() {
                let cf = format!("{at}.tool_calls[{j}]");
                tool_calls.push(pb::ToolCall {
                    id: string(&c["id"], &format!("{cf}.id"))?,
                    name: string(&c["function"]["name"], &format!("{cf}.function.name"))?,
                    arguments: c["function"]["arguments"].as_str().unwrap_or_default().to_owned(),
                    thought_signature: c["extra_content"]["google"]["thought_signature"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                });
            }
            // Reasoning from an earlier answer, as LiteLLM and our own
            // responses carry it (`thinking_blocks`), goes first.
            let mut parts = Vec::new();
            for (j, b) in m["thinking_blocks"].as_array().into_iter().flatten().enumerate() {
                let block = match b["type"].as_str() {
                    Some("thinking") => pb::ReasoningBlock {
                        text: b["thinking"].as_str().unwrap_or_default().to_owned(),
                        signature: b["signature"].as_str().unwrap_or_default().to_owned(),
                        redacted: String::new(),
                    },
                    Some("redacted_thinking") => pb::ReasoningBlock {
                        redacted: string(&b["data"], &format!("{at}.thinking_blocks[{j}].data"))?,
                        ..Default::default()
                    },
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{at}.thinking_blocks[{j}].type"),
                            "must be thinking or redacted_thinking",
                        ));
                    }
                };
                parts.push(pb::ContentPart {
                    part: Some(pb::content_part::Part::Reasoning(block)),
                });
            }
            parts.extend(content(&m["content"], &format!("{at}.content"))?);
            Ok(pb::Message {
                role: role as i32,
                content: parts,
                tool_calls,
                tool_call_id: m["tool_call_id"].as_str().unwrap_or_default().to_owned(),
                name: m["name"].as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

fn generate_request(body: &Map<String, Value>) -> Result<(pb::GenerateRequest, bool, bool), ApiError> {
    let get = |k: &str| body.get(k).unwrap_or(&Value::Null);
    if let Some(n) = get("n").as_u64()
        && n != 1
    {
        return Err(ApiError::invalid("n", "only 1 choice per request is supported"));
    }
    if get("logprobs").as_bool() == Some(true) {
        return Err(ApiError::invalid("logprobs", "log probabilities are not supported"));
    }
    let mut r = pb::GenerateRequest {
        model: string(get("model"), "model")?,
        messages: messages(get("messages"))?,
        ..Default::default()
    };
    for (i, t) in get("tools").as_array().into_iter().flatten().enumerate() {
        let f = &t["function"];
        r.tools.push(pb::Tool {
            name: string(&f["name"], &format!("tools[{i}].function.name"))?,
            description: f["description"].as_str().unwrap_or_default().to_owned(),
            parameters: match &f["parameters"] {
                Value::Null => None,
                p => Some(json_struct(p, &format!("tools[{i}].function.parameters"))?),
            },
        });
    }
    r.tool_choice = match get("tool_choice") {
        Value::Null => None,
        Value::String(s) => Some(pb::ToolChoice {
            choice: Some(pb::tool_choice::Choice::Mode(
                (match s.as_str() {
                    "auto" => pb::ToolChoiceMode::Auto,
                    "none" => pb::ToolChoiceMode::None,
                    "required" => pb::ToolChoiceMode::Required,
                    _ => {
                        return Err(ApiError::invalid(
                            "tool_choice",
                            "must be auto, none, required or a function",
                        ));
                    }
                }) as i32,
            )),
        }),
        v => Some(pb::ToolChoice {
            choice: Some(pb::tool_choice::Choice::Function(string(
                &v["function"]["name"],
                "tool_choice.function.name",
            )?)),
        }),
    };
    r.parallel_tool_calls = get("parallel_tool_calls").as_bool();
    let format = get("response_format");
    r.response_format = match format["type"].as_str() {
        None | Some("text") => None,
        Some("json_object") => Some(pb::ResponseFormat {
            r#type: pb::ResponseFormatType::JsonObject as i32,
            ..Default::default()
        }),
        Some("json_schema") => {
            let s = &format["json_schema"];
            Some(pb::ResponseFormat {
                r#type: pb::ResponseFormatType::JsonSchema as i32,
                schema_name: s["name"].as_str().unwrap_or_default().to_owned(),
                schema: Some(json_struct(&s["schema"], "response_format.json_schema.schema")?),
                strict: s["strict"].as_bool().unwrap_or(false),
            })
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "response_format.type",
                "must be text, json_object or json_schema",
            ));
        }
    };
    let number = |k: &str| -> Result<Option<f64>, ApiError> {
        match get(k) {
            Value::Null => Ok(None),
            v => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::invalid(k, "must be a number")),
        }
    };
    r.temperature = number("temperature")?;
    r.top_p = number("top_p")?;
    let max = match get("max_completion_tokens") {
        Value::Null => get("max_tokens"),
        v => v,
    };
    r.max_tokens = match max {
        Value::Null => None,
        v => Some(
            v.as_u64()
                .and_then(|m| i32::try_from(m).ok())
                .ok_or_else(|| ApiError::invalid("max_tokens", "must be a positive integer"))?,
        ),
    };
    r.stop = match get("stop") {
        Value::Null => Vec::new(),
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|s| string(s, "stop")).collect::<Result<_, _>>()?,
        _ => return Err(ApiError::invalid("stop", "must be a string or an array of strings")),
    };
    r.user = get("user").as_str().unwrap_or_default().to_owned();
    r.reasoning_effort = (match get("reasoning_effort") {
        Value::Null => pb::ReasoningEffort::Unspecified,
        Value::String(e) => match e.as_str() {
            "minimal" | "low" => pb::ReasoningEffort::Low,
            "medium" => pb::ReasoningEffort::Medium,
            "high" => pb::ReasoningEffort::High,
            _ => return Err(ApiError::invalid("reasoning_effort", "must be low, medium or high")),
        },
        _ => return Err(ApiError::invalid("reasoning_effort", "must be low, medium or high")),
    }) as i32;
    let stream = get("stream").as_bool().unwrap_or(false);
    let include_usage = get("stream_options")["include_usage"].as_bool().unwrap_or(false);
    Ok((r, stream, include_usage))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn finish(reason: i32) -> Value {
    match pb::FinishReason::try_from(reason) {
        Ok(pb::FinishReason::Stop | pb::FinishReason::Paused | pb::FinishReason::Error) => json!("stop"),
        Ok(pb::FinishReason::Length) => json!("length"),
        Ok(pb::FinishReason::ToolCalls) => json!("tool_calls"),
        Ok(pb::FinishReason::ContentFilter) => json!("content_filter"),
        _ => Value::Null,
    }
}

fn usage(u: &pb::Usage) -> Value {
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    })
}

/// A reasoning block as LiteLLM's `thinking_blocks` entries (what clients
/// send back on the next turn).
fn thinking_block(b: &pb::ReasoningBlock) -> Value {
    if b.redacted.is_empty() {
        json!({"type": "thinking", "thinking": b.text, "signature": b.signature})
    } else {
        json!({"type": "redacted_thinking", "data": b.redacted})
    }
}

fn tool_call(c: &pb::ToolCall) -> Value {
    let mut v = json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}});
    if !c.thought_signature.is_empty() {
        v["extra_content"] = json!({"google": {"thought_signature": c.thought_signature}});
    }
    v
}

async fn chat_completions(State(gw): State<Arc<Inner>>, req: Request) -> Response {
    match chat(&gw, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(gw: &Inner, req: Request) -> Result<Response, ApiError> {
    let (headers, peer, body) = read_json(gw, req).await?;
    let (mut message, stream, include_usage) = generate_request(&body)?;
    // The response cache is Plinth's, not OpenAI's, so it is asked for in a
    // header the SDKs pass through (`extra_headers`).
    message.cache = (match headers.get(CACHE_HEADER).map(|v| v.to_str().unwrap_or_default()) {
        None => pb::CachePolicy::Unspecified,
        Some("use") => pb::CachePolicy::Use,
        Some("bypass") => pb::CachePolicy::Bypass,
        Some(_) => return Err(ApiError::invalid(CACHE_HEADER, "must be use or bypass")),
    }) as i32;
    let model = message.model.clone();
    let mut ai = client(gw)?;
    let request = grpc_request(&headers, peer, message)?;
    if stream {
        let response = ai
            .generate_stream(request)
            .await
            .map_err(|s| ApiError::from_status(&s))?;
        return Ok(sse(response.into_inner(), model, include_usage));
    }
    let answer = ai
        .generate(request)
        .await
        .map_err(|s| ApiError::from_status(&s))?
        .into_inner();
    let msg = answer.message.unwrap_or_default();
    let text: String = msg
        .content
        .iter()
        .filter_map(|p| match &p.part {
            Some(pb::content_part::Part::Text(t)) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !msg.tool_calls.is_empty() { Value::Null } else { json!(text) }, "refusal": null});
    if !msg.tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(msg.tool_calls.iter().map(tool_call).collect());
    }
    if !answer.reasoning.is_empty() {
        message["reasoning_content"] = json!(answer.reasoning);
    }
    let thinking: Vec<Value> = msg
        .content
        .iter()
        .filter_map(|p| match &p.part {
            Some(pb::content_part::Part::Reasoning(b)) => Some(thinking_block(b)),
            _ => None,
        })
        .collect();
    if !thinking.is_empty() {
        message["thinking_blocks"] = Value::Array(thinking);
    }
    let body = json!({
        "id": answer.id,
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "system_fingerprint": null,
        "choices": [{"index": 0, "message": message, "finish_reason": finish(answer.finish_reason), "logprobs": null}],
        "usage": usage(&answer.usage.unwrap_or_default()),
    });
    let mut response = Json(body).into_response();
    response.headers_mut().insert(
        CACHE_HEADER,
        HeaderValue::from_static(if answer.cached { "hit" } else { "miss" }),
    );
    Ok(response)
}

/// Streams chunks as OpenAI does: a first chunk with the role, one per
/// delta, a chunk with the finish reason, the usage chunk (`choices: []`,
/// only with `stream_options.include_usage`), then `[DONE]`. A failure after
/// the first chunk is sent as an `error` object and ends the stream without
/// `[DONE]`.
fn sse(stream: tonic::Streaming<pb::GenerateStreamResponse>, model: String, include_usage: bool) -> Response {
    let framer = Arc::new(ChunkFramer {
        model,
        created: now(),
        include_usage,
    });
    let body = futures::stream::unfold((stream, true, false), move |(mut stream, first, done)| {
        let framer = framer.clone();
        async move {
            if done {
                return None;
            }
            match stream.next().await {
                None => Some((Bytes::from_static(b"data: [DONE]\n\n"), (stream, false, true))),
                Some(Err(s)) => {
                    let e = ApiError::from_status(&s);
                    Some((Bytes::from(format!("data: {}\n\n", e.body())), (stream, false, true)))
                }
                Some(Ok(m)) => Some((framer.frames(&m, first), (stream, false, false))),
            }
        }
    })
    .filter(|b| futures::future::ready(!b.is_empty()))
    .map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Writes `chat.completion.chunk` frames.
struct ChunkFramer {
    model: String,
    created: u64,
    include_usage: bool,
}

impl ChunkFramer {
    fn frame(&self, out: &mut Vec<u8>, id: &str, delta: Value, finish_reason: Value) {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null}],
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        out.extend_from_slice(format!("data: {c}\n\n").as_bytes());
    }

    /// The frames of one service message; the last one (with usage) gives
    /// the usage chunk when asked for.
    fn frames(&self, m: &pb::GenerateStreamResponse, first: bool) -> Bytes {
        let mut out = Vec::new();
        if first {
            self.frame(
                &mut out,
                &m.id,
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            );
        }
        if !m.text.is_empty() {
            self.frame(&mut out, &m.id, json!({"content": m.text}), Value::Null);
        }
        if !m.reasoning.is_empty() {
            self.frame(&mut out, &m.id, json!({"reasoning_content": m.reasoning}), Value::Null);
        }
        if !m.reasoning_signature.is_empty() {
            let block = json!({"type": "thinking", "thinking": "", "signature": m.reasoning_signature});
            self.frame(&mut out, &m.id, json!({"thinking_blocks": [block]}), Value::Null);
        }
        if !m.redacted_reasoning.is_empty() {
            let block = json!({"type": "redacted_thinking", "data": m.redacted_reasoning});
            self.frame(&mut out, &m.id, json!({"thinking_blocks": [block]}), Value::Null);
        }
        for t in &m.tool_calls {
            let call = if t.name.is_empty() && t.id.is_empty() {
                json!({"index": t.index, "function": {"arguments": t.arguments}})
            } else {
                let mut c = json!({"index": t.index, "id": t.id, "type": "function", "function": {"name": t.name, "arguments": t.arguments}});
                if !t.thought_signature.is_empty() {
                    c["extra_content"] = json!({"google": {"thought_signature": t.thought_signature}});
                }
                c
            };
            self.frame(&mut out, &m.id, json!({"tool_calls": [call]}), Value::Null);
        }
        if m.finish_reason != 0 {
            self.frame(&mut out, &m.id, json!({}), finish(m.finish_reason));
        }
        if self.include_usage
            && let Some(u) = &m.usage
        {
            let c = json!({
                "id": m.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "system_fingerprint": null, "choices": [], "usage": usage(u),
            });
            out.extend_from_slice(format!("data: {c}\n\n").as_bytes());
        }
        Bytes::from(out)
    }
}

async fn embeddings(State(gw): State<Arc<Inner>>, req: Request) -> Response {
    match embed(&gw, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn embed(gw: &Inner, req: Request) -> Result<Response, ApiError> {
    let (headers, peer, body) = read_json(gw, req).await?;
    let get = |k: &str| body.get(k).unwrap_or(&Value::Null);
    let model = string(get("model"), "model")?;
    let inputs: Vec<String> = match get("input") {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str().map(str::to_owned).ok_or_else(|| {
                    ApiError::invalid(
                        format!("input[{i}]"),
                        "must be a string (token arrays are not supported)",
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(ApiError::invalid("input", "must be a string or an array of strings")),
    };
    let base64 = match get("encoding_format").as_str() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => return Err(ApiError::invalid("encoding_format", "must be float or base64")),
    };
    let dimensions = match get("dimensions") {
        Value::Null => None,
        v => Some(
            v.as_u64()
                .and_then(|d| i32::try_from(d).ok())
                .ok_or_else(|| ApiError::invalid("dimensions", "must be a positive integer"))?,
        ),
    };
    let message = pb::EmbedRequest {
        model: model.clone(),
        inputs,
        dimensions,
        user: get("user").as_str().unwrap_or_default().to_owned(),
    };
    let mut ai = client(gw)?;
    let answer = ai
        .embed(grpc_request(&headers, peer, message)?)
        .await
        .map_err(|s| ApiError::from_status(&s))?
        .into_inner();
    let data: Vec<Value> = answer
        .embeddings
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = e.values.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(e.values)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let u = answer.usage.unwrap_or_default();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": u.input_tokens, "total_tokens": u.input_tokens},
    }))
    .into_response())
}

async fn models(gw: &Inner, headers: &HeaderMap) -> Result<Vec<pb::Model>, ApiError> {
    let mut ai = client(gw)?;
    let answer = ai
        .list_models(grpc_request(headers, None, pb::ListModelsRequest {})?)
        .await
        .map_err(|s| ApiError::from_status(&s))?;
    Ok(answer.into_inner().models)
}

fn model_json(m: &pb::Model) -> Value {
    json!({"id": m.name, "object": "model", "created": 0, "owned_by": "plinth"})
}

async fn list_models(State(gw): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    match models(&gw, &headers).await {
        Ok(list) => {
            Json(json!({"object": "list", "data": list.iter().map(model_json).collect::<Vec<_>>()})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn get_model(State(gw): State<Arc<Inner>>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    match models(&gw, &headers).await {
        Ok(list) => match list.iter().find(|m| m.name == name) {
            Some(m) => Json(model_json(m)).into_response(),
            None => ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: format!("The model `{name}` does not exist"),
                param: Some("model".into()),
                code: Some("model_not_found".into()),
                retry_after: None,
            }
            .into_response(),
        },
        Err(e) => e.into_response(),
    }
}
