//! OpenAI Chat Completions and Embeddings, also spoken by Azure OpenAI (at
//! deployment URLs with an `api-key` header and an `api-version`) and by
//! every "OpenAI-compatible" server (vLLM, Ollama, LM Studio, proxies).
//! Streams always ask for usage (`stream_options.include_usage`) so that
//! every streamed call can be billed, whatever the caller asked.

use serde_json::{Value, json};

use super::{Endpoint, EventStream, Provider, ProviderError, ProviderKind, Translator, sse::SseEvent};
use crate::model::{
    ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, FinishReason, Message, Part, ResponseFormat, Role,
    StreamEvent, ToolCall, ToolChoice, Usage,
};

/// The OpenAI-format adapter.
#[derive(Debug)]
pub struct OpenAi {
    endpoint: Endpoint,
    azure: bool,
}

impl OpenAi {
    /// An adapter for `endpoint`; `azure` switches URLs and the key header.
    pub fn new(endpoint: Endpoint, azure: bool) -> Self {
        Self { endpoint, azure }
    }

    fn post(&self, model: &str, operation: &str, body: &Value) -> Result<reqwest::RequestBuilder, ProviderError> {
        let e = &self.endpoint;
        let builder = if self.azure {
            let version = e.api_version.as_deref().unwrap_or("2024-10-21");
            let b = e
                .client
                .post(e.url(&format!("/openai/deployments/{model}/{operation}")))
                .query(&[("api-version", version)]);
            e.with_key(|key| b.header("api-key", key.unwrap_or("")))?
        } else {
            let b = e.client.post(e.url(&format!("/{operation}")));
            e.with_key(|key| match key {
                Some(k) => b.bearer_auth(k),
                None => b,
            })?
        };
        Ok(builder.json(body))
    }
}

#[async_trait::async_trait]
impl Provider for OpenAi {
    fn kind(&self) -> ProviderKind {
        if self.azure {
            ProviderKind::Azure
        } else {
            ProviderKind::OpenAi
        }
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = chat_body(request, false, self.azure);
        let answer: Value = self
            .endpoint
            .send_json(self.post(&request.model, "chat/completions", &body)?, parse_error)
            .await?;
        parse_chat(&answer)
    }

    async fn chat_stream(&self, request: &ChatRequest) -> Result<EventStream, ProviderError> {
        let body = chat_body(request, true, self.azure);
        let response = self
            .endpoint
            .send(self.post(&request.model, "chat/completions", &body)?, parse_error)
            .await?;
        Ok(super::sse_stream(
            response,
            ChunkTranslator::default(),
            self.endpoint.timeout,
        ))
    }

    async fn embed(&self, request: &EmbedRequest) -> Result<EmbedResponse, ProviderError> {
        let mut body = json!({"input": request.inputs, "encoding_format": "float"});
        if !self.azure {
            body["model"] = json!(request.model);
        }
        if let Some(d) = request.dimensions {
            body["dimensions"] = json!(d);
        }
        if let Some(u) = &request.user {
            body["user"] = json!(u);
        }
        let answer: Value = self
            .endpoint
            .send_json(self.post(&request.model, "embeddings", &body)?, parse_error)
            .await?;
        parse_embeddings(&answer, request.inputs.len())
    }
}

/// `{"error":{"type","code","message"}}` → (kind, message).
pub fn parse_error(body: &[u8]) -> (String, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let kind = e["type"]
        .as_str()
        .or_else(|| e["code"].as_str())
        .unwrap_or("error")
        .to_owned();
    let message = e["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect());
    (kind, message)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::Developer => "developer",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

fn message_json(m: &Message) -> Value {
    let mut out = json!({"role": role_name(m.role)});
    // Reasoning blocks and cache points mean nothing to OpenAI's format.
    let parts: Vec<&Part> = m
        .content
        .iter()
        .filter(|p| matches!(p, Part::Text(_) | Part::Image(_)))
        .collect();
    let only_text = parts.iter().all(|p| matches!(p, Part::Text(_)));
    out["content"] = if parts.is_empty() {
        if m.tool_calls.is_empty() {
            json!("")
        } else {
            Value::Null
        }
    } else if only_text {
        json!(m.joined_text())
    } else {
        Value::Array(
            parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text(t) => Some(json!({"type": "text", "text": t})),
                    Part::Image(i) => Some(json!({"type": "image_url", "image_url": {"url": i.to_url()}})),
                    Part::Reasoning(_) | Part::CachePoint => None,
                })
                .collect(),
        )
    };
    if !m.tool_calls.is_empty() {
        out["tool_calls"] = Value::Array(
            m.tool_calls
                .iter()
                .map(
                    |c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}),
                )
                .collect(),
        );
    }
    if let Some(id) = &m.tool_call_id {
        out["tool_call_id"] = json!(id);
    }
    if let Some(name) = &m.name
        && m.role != Role::Tool
    {
        out["name"] = json!(name);
    }
    out
}

/// The Chat Completions request body.
pub fn chat_body(r: &ChatRequest, stream: bool, azure: bool) -> Value {
    let mut body = json!({"messages": r.messages.iter().map(message_json).collect::<Vec<_>>()});
    if !azure {
        body["model"] = json!(r.model);
    }
    if !r.tools.is_empty() {
        body["tools"] = Value::Array(
            r.tools
                .iter()
                .map(|t| {
                    json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}})
                })
                .collect(),
        );
    }
    match &r.tool_choice {
        ToolChoice::Unset => {}
        ToolChoice::Auto => body["tool_choice"] = json!("auto"),
        ToolChoice::None => body["tool_choice"] = json!("none"),
        ToolChoice::Required => body["tool_choice"] = json!("required"),
        ToolChoice::Function(name) => body["tool_choice"] = json!({"type": "function", "function": {"name": name}}),
    }
    if let Some(p) = r.parallel_tool_calls {
        body["parallel_tool_calls"] = json!(p);
    }
    match &r.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => body["response_format"] = json!({"type": "json_object"}),
        ResponseFormat::JsonSchema { name, schema, strict } => {
            body["response_format"] =
                json!({"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}});
        }
    }
    if let Some(t) = r.temperature {
        body["temperature"] = json!(t);
    }
    if let Some(p) = r.top_p {
        body["top_p"] = json!(p);
    }
    if let Some(m) = r.max_tokens {
        body["max_tokens"] = json!(m);
    }
    if !r.stop.is_empty() {
        body["stop"] = json!(r.stop);
    }
    if let Some(u) = &r.user {
        body["user"] = json!(u);
    }
    if let Some(e) = r.reasoning_effort {
        body["reasoning_effort"] = json!(e.name());
    }
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn finish_reason(s: Option<&str>) -> FinishReason {
    match s {
        None => FinishReason::Unspecified,
        Some("stop") => FinishReason::Stop,
        Some("length") => FinishReason::Length,
        Some("tool_calls" | "function_call") => FinishReason::ToolCalls,
        Some("content_filter") => FinishReason::ContentFilter,
        Some(_) => FinishReason::Error,
    }
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// OpenAI `usage` → [`Usage`].
pub fn parse_usage(v: &Value) -> Usage {
    Usage {
        input_tokens: u(&v["prompt_tokens"]),
        output_tokens: u(&v["completion_tokens"]),
        cached_input_tokens: u(&v["prompt_tokens_details"]["cached_tokens"]),
        cache_write_tokens: 0,
        reasoning_tokens: u(&v["completion_tokens_details"]["reasoning_tokens"]),
    }
}

fn parse_chat(v: &Value) -> Result<ChatResponse, ProviderError> {
    let choice = v["choices"]
        .get(0)
        .ok_or_else(|| ProviderError::Malformed("no choices in the answer".into()))?;
    let message = &choice["message"];
    let tool_calls = message["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .map(|c| ToolCall {
                    id: c["id"].as_str().unwrap_or_default().to_owned(),
                    name: c["function"]["name"].as_str().unwrap_or_default().to_owned(),
                    arguments: c["function"]["arguments"].as_str().unwrap_or_default().to_owned(),
                    thought_signature: None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(ChatResponse {
        id: v["id"].as_str().unwrap_or_default().to_owned(),
        model: v["model"].as_str().unwrap_or_default().to_owned(),
        text: message["content"].as_str().unwrap_or_default().to_owned(),
        reasoning: message["reasoning_content"].as_str().unwrap_or_default().to_owned(),
        reasoning_blocks: Vec::new(),
        tool_calls,
        finish_reason: finish_reason(choice["finish_reason"].as_str()),
        usage: parse_usage(&v["usage"]),
    })
}

fn parse_embeddings(v: &Value, expected: usize) -> Result<EmbedResponse, ProviderError> {
    let data = v["data"]
        .as_array()
        .ok_or_else(|| ProviderError::Malformed("no data in the embeddings answer".into()))?;
    let mut vectors: Vec<Option<Vec<f32>>> = vec![None; expected];
    for (position, item) in data.iter().enumerate() {
        let index = item["index"].as_u64().map_or(position, |i| i as usize);
        let vector = item["embedding"]
            .as_array()
            .ok_or_else(|| ProviderError::Malformed("an embedding is not an array of numbers".into()))?
            .iter()
            .map(|x| x.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| ProviderError::Malformed("an embedding is not an array of numbers".into()))?;
        let slot = vectors
            .get_mut(index)
            .ok_or_else(|| ProviderError::Malformed(format!("embedding index {index} out of range")))?;
        *slot = Some(vector);
    }
    let vectors = vectors
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ProviderError::Malformed("fewer embeddings than inputs".into()))?;
    Ok(EmbedResponse {
        model: v["model"].as_str().unwrap_or_default().to_owned(),
        vectors,
        usage: parse_usage(&v["usage"]),
    })
}

/// `chat.completion.chunk` events → [`StreamEvent`]s.
#[derive(Debug, Default)]
pub struct ChunkTranslator {
    started: Vec<bool>,
    done: bool,
}

impl Translator for ChunkTranslator {
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<StreamEvent>, ProviderError> {
        let data = event.data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(Vec::new());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| ProviderError::Malformed(format!("chunk: {e}")))?;
        if v.get("error").is_some_and(|e| !e.is_null()) {
            let (kind, message) = parse_error(data.as_bytes());
            return Err(ProviderError::Stream { kind, message });
        }
        let mut out = Vec::new();
        // `choices` may be absent or null on the usage chunk (vLLM).
        if let Some(choices) = v["choices"].as_array() {
            for choice in choices.iter().filter(|c| c["index"].as_u64().unwrap_or(0) == 0) {
                let delta = &choice["delta"];
                if let Some(t) = delta["reasoning_content"].as_str().filter(|t| !t.is_empty()) {
                    out.push(StreamEvent::Reasoning(t.to_owned()));
                }
                if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
                    out.push(StreamEvent::Text(t.to_owned()));
                }
                for (position, call) in delta["tool_calls"].as_array().into_iter().flatten().enumerate() {
                    let index = call["index"].as_u64().unwrap_or(position as u64) as u32;
                    let i = index as usize;
                    if self.started.len() <= i {
                        self.started.resize(i + 1, false);
                    }
                    if !self.started[i] {
                        self.started[i] = true;
                        out.push(StreamEvent::ToolCallStart {
                            index,
                            id: call["id"].as_str().unwrap_or_default().to_owned(),
                            name: call["function"]["name"].as_str().unwrap_or_default().to_owned(),
                            thought_signature: None,
                        });
                    }
                    if let Some(a) = call["function"]["arguments"].as_str().filter(|a| !a.is_empty()) {
                        out.push(StreamEvent::ToolCallArguments {
                            index,
                            fragment: a.to_owned(),
                        });
                    }
                }
                if let Some(f) = choice["finish_reason"].as_str() {
                    out.push(StreamEvent::Finish(finish_reason(Some(f))));
                }
            }
        }
        if v["usage"].is_object() {
            out.push(StreamEvent::Usage(parse_usage(&v["usage"])));
        }
        Ok(out)
    }

    fn on_end(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        if self.done {
            Ok(Vec::new())
        } else {
            Err(ProviderError::Connect("the stream ended before [DONE]".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Reasoning, ReasoningEffort};

    #[test]
    fn reasoning_effort_passes_through_and_reasoning_parts_and_cache_points_are_left_out() {
        let mut assistant = Message::text(Role::Assistant, "Earlier.");
        assistant.content.insert(0, Part::Reasoning(Reasoning::default()));
        let mut user = Message::text(Role::User, "Doc.");
        user.content.push(Part::CachePoint);
        let r = ChatRequest {
            model: "o4-mini".into(),
            messages: vec![user, assistant],
            reasoning_effort: Some(ReasoningEffort::Medium),
            ..ChatRequest::default()
        };
        let body = chat_body(&r, false, false);
        assert_eq!(body["reasoning_effort"], "medium");
        assert_eq!(body["messages"][0], json!({"role": "user", "content": "Doc."}));
        assert_eq!(body["messages"][1], json!({"role": "assistant", "content": "Earlier."}));
    }
}
