//! Anthropic Messages (`POST /v1/messages`). It differs from the canonical
//! OpenAI shape exactly where gateways keep getting it wrong, so each
//! difference is translated here on purpose: the system prompt is a
//! top-level field, tool results are blocks of a user turn, tool arguments
//! are objects, `max_tokens` is required, `input_tokens` excludes cache
//! reads and writes, and streams are named events whose block numbering is
//! not the tool-call numbering.

use std::collections::HashMap;

use serde_json::{Value, json};

use super::{Endpoint, EventStream, Provider, ProviderError, ProviderKind, Translator, sse::SseEvent};
use crate::model::{
    ChatRequest, ChatResponse, EmbedRequest, EmbedResponse, FinishReason, Image, Message, Part, Reasoning,
    ResponseFormat, Role, StreamEvent, ToolCall, ToolChoice, Usage,
};

/// `max_tokens` when the request sets none: Anthropic requires one, and
/// every current model accepts this many.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// The `anthropic-version` header.
pub const API_VERSION: &str = "2023-06-01";

/// The Anthropic Messages adapter.
#[derive(Debug)]
pub struct Anthropic {
    endpoint: Endpoint,
}

impl Anthropic {
    /// An adapter for `endpoint` (`https://api.anthropic.com` or a compatible server).
    pub fn new(endpoint: Endpoint) -> Self {
        Self { endpoint }
    }

    fn post(&self, body: &Value) -> Result<reqwest::RequestBuilder, ProviderError> {
        let e = &self.endpoint;
        let builder = e
            .client
            .post(e.url("/v1/messages"))
            .header("anthropic-version", API_VERSION);
        let builder = e.with_key(|key| match key {
            Some(k) => builder.header("x-api-key", k),
            None => builder,
        })?;
        Ok(builder.json(body))
    }
}

#[async_trait::async_trait]
impl Provider for Anthropic {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Anthropic
    }

    async fn chat(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let body = chat_body(request, false)?;
        let answer: Value = self.endpoint.send_json(self.post(&body)?, parse_error).await?;
        parse_chat(&answer)
    }

    async fn chat_stream(&self, request: &ChatRequest) -> Result<EventStream, ProviderError> {
        let body = chat_body(request, true)?;
        let response = self.endpoint.send(self.post(&body)?, parse_error).await?;
        Ok(super::sse_stream(
            response,
            EventTranslator::default(),
            self.endpoint.timeout,
        ))
    }

    async fn embed(&self, _request: &EmbedRequest) -> Result<EmbedResponse, ProviderError> {
        Err(ProviderError::Unsupported("anthropic has no embeddings API".into()))
    }
}

/// `{"type":"error","error":{"type","message"}}` → (kind, message).
pub fn parse_error(body: &[u8]) -> (String, String) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let e = &v["error"];
    let kind = e["type"].as_str().unwrap_or("error").to_owned();
    let message = e["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(500).collect());
    (kind, message)
}

/// Parts as content blocks; empty text is dropped (the API rejects empty
/// text blocks). Reasoning goes back as the `thinking` (or
/// `redacted_thinking`) block it came from, signature unchanged; a cache
/// point puts `cache_control` on the block before it.
fn content_blocks(parts: &[Part]) -> Vec<Value> {
    let mut blocks: Vec<Value> = Vec::with_capacity(parts.len());
    for p in parts {
        let block = match p {
            Part::Text(t) if t.is_empty() => continue,
            Part::Text(t) => json!({"type": "text", "text": t}),
            Part::Image(Image::Inline { media_type, base64 }) => json!({
                "type": "image",
                "source": {"type": "base64", "media_type": media_type, "data": base64},
            }),
            Part::Image(Image::Url(url)) => json!({"type": "image", "source": {"type": "url", "url": url}}),
            Part::Reasoning(r) => match &r.redacted {
                Some(data) => json!({"type": "redacted_thinking", "data": data}),
                None => {
                    json!({"type": "thinking", "thinking": r.text, "signature": r.signature.clone().unwrap_or_default()})
                }
            },
            Part::CachePoint => {
                if let Some(last) = blocks.last_mut() {
                    last["cache_control"] = json!({"type": "ephemeral"});
                }
                continue;
            }
        };
        blocks.push(block);
    }
    blocks
}

/// A tool message as a `tool_result` block: its text as a string, or its
/// blocks when it carries images.
fn tool_result(index: usize, m: &Message) -> Result<Value, ProviderError> {
    let id = m.tool_call_id.as_deref().filter(|id| !id.is_empty()).ok_or_else(|| {
        ProviderError::invalid(
            format!("messages[{index}].tool_call_id"),
            "a tool message must name the call it answers",
        )
    })?;
    let mut block = json!({"type": "tool_result", "tool_use_id": id});
    if m.content.iter().all(|p| matches!(p, Part::Text(_))) {
        let text = m.joined_text();
        if !text.is_empty() {
            block["content"] = json!(text);
        }
    } else {
        block["content"] = Value::Array(content_blocks(&m.content));
    }
    Ok(block)
}

/// The Messages request body.
///
/// System and developer messages are hoisted into the top-level `system`
/// prompt in order, joined by a blank line, wherever they stand: Messages has
/// no system turn, and turning a mid-conversation instruction into user text
/// would change both its authority and the turn structure. Only `user` and
/// `assistant` turns remain; consecutive turns of one role (tool results
/// count as user) are merged, with `tool_result` blocks first as the API
/// requires.
///
/// `response_format`: Messages has no such parameter. Strict JSON schemas
/// are refused (another target can honour them); JSON object and non-strict
/// schemas are best-effort hints and are dropped.
pub fn chat_body(r: &ChatRequest, stream: bool) -> Result<Value, ProviderError> {
    if let ResponseFormat::JsonSchema { strict: true, .. } = r.response_format {
        return Err(ProviderError::Unsupported(
            "response_format json_schema is not supported by anthropic targets".into(),
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in r.messages.iter().enumerate() {
        let (role, blocks) = match m.role {
            Role::System | Role::Developer => {
                let text = m.joined_text();
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            Role::User => ("user", content_blocks(&m.content)),
            Role::Tool => ("user", vec![tool_result(i, m)?]),
            Role::Assistant => {
                let mut blocks = content_blocks(&m.content);
                for (j, call) in m.tool_calls.iter().enumerate() {
                    let field = format!("messages[{i}].tool_calls[{j}].arguments");
                    blocks.push(json!({
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": super::arguments_object(&call.arguments, &field)?,
                    }));
                }
                ("assistant", blocks)
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((last, content)) if *last == role => content.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let messages: Vec<Value> = turns
        .into_iter()
        .map(|(role, mut content)| {
            // Stable: tool results keep their order, and so does the rest.
            content.sort_by_key(|b| b["type"] != "tool_result");
            json!({"role": role, "content": content})
        })
        .collect();

    let mut max_tokens = r.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let thinking = r.reasoning_effort.map(|e| e.budget_tokens());
    if let Some(budget) = thinking {
        // The thinking budget must stay below max_tokens; leave room for the answer.
        max_tokens = max_tokens.max(budget + 1024);
    }
    let mut body = json!({
        "model": r.model,
        "max_tokens": max_tokens,
        "messages": messages,
    });
    if let Some(budget) = thinking {
        body["thinking"] = json!({"type": "enabled", "budget_tokens": budget});
    }
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if !r.tools.is_empty() {
        body["tools"] = Value::Array(
            r.tools
                .iter()
                .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}))
                .collect(),
        );
    }
    if let Some(choice) = tool_choice(r)? {
        body["tool_choice"] = choice;
    }
    // OpenAI's range is 0–2, Anthropic's 0–1 (it answers 400 above 1).
    // Clamping keeps 0–1 meaning the same and makes "hotter than 1" the
    // hottest Anthropic allows, rather than failing callers who send
    // OpenAI-range values.
    // With thinking on, Anthropic refuses any temperature but 1 and a top_p
    // below 0.95, so sampling settings are left to it.
    if thinking.is_none() {
        if let Some(t) = r.temperature.filter(|t| t.is_finite()) {
            body["temperature"] = json!(t.clamp(0.0, 1.0));
        }
        if let Some(p) = r.top_p {
            body["top_p"] = json!(p);
        }
    }
    if !r.stop.is_empty() {
        body["stop_sequences"] = json!(r.stop);
    }
    if let Some(u) = &r.user {
        body["metadata"] = json!({"user_id": u});
    }
    if stream {
        body["stream"] = json!(true);
    }
    Ok(body)
}

/// `tool_choice`, with `disable_parallel_tool_use` for
/// `parallel_tool_calls: false`. Without tools there is nothing to choose:
/// a choice that allows no call is dropped, one that demands a call is the
/// caller's error.
fn tool_choice(r: &ChatRequest) -> Result<Option<Value>, ProviderError> {
    let one_at_a_time = r.parallel_tool_calls == Some(false);
    if r.tools.is_empty() {
        return match r.tool_choice {
            ToolChoice::Required | ToolChoice::Function(_) => Err(ProviderError::invalid(
                "tool_choice",
                "requires a tool call but the request has no tools",
            )),
            ToolChoice::Unset | ToolChoice::Auto | ToolChoice::None => Ok(None),
        };
    }
    let mut choice = match &r.tool_choice {
        ToolChoice::Unset if one_at_a_time => json!({"type": "auto"}),
        ToolChoice::Unset => return Ok(None),
        ToolChoice::Auto => json!({"type": "auto"}),
        // `none` takes no `disable_parallel_tool_use`: no calls at all.
        ToolChoice::None => return Ok(Some(json!({"type": "none"}))),
        ToolChoice::Required => json!({"type": "any"}),
        ToolChoice::Function(name) => json!({"type": "tool", "name": name}),
    };
    if one_at_a_time {
        choice["disable_parallel_tool_use"] = json!(true);
    }
    Ok(Some(choice))
}

fn finish_reason(s: Option<&str>) -> FinishReason {
    match s {
        None => FinishReason::Unspecified,
        Some("end_turn" | "stop_sequence") => FinishReason::Stop,
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        Some("pause_turn") => FinishReason::Paused,
        Some(_) => FinishReason::Error,
    }
}

/// Anthropic's usage fields as reported: `input` excludes both cache counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct RawUsage {
    input: u64,
    cache_write: u64,
    cache_read: u64,
    output: u64,
}

impl RawUsage {
    fn read(v: &Value) -> Self {
        let u = |k: &str| v[k].as_u64().unwrap_or(0);
        Self {
            input: u("input_tokens"),
            cache_write: u("cache_creation_input_tokens"),
            cache_read: u("cache_read_input_tokens"),
            output: u("output_tokens"),
        }
    }

    /// Field by field, a later non-zero count wins and a 0 never erases one
    /// (merged before summing, so a later event with `input_tokens` alone
    /// cannot drop the cache counts from the total).
    fn merge(&mut self, later: Self) {
        for (mine, theirs) in [
            (&mut self.input, later.input),
            (&mut self.cache_write, later.cache_write),
            (&mut self.cache_read, later.cache_read),
            (&mut self.output, later.output),
        ] {
            if theirs != 0 {
                *mine = theirs;
            }
        }
    }

    fn usage(self) -> Usage {
        Usage {
            input_tokens: self.input + self.cache_write + self.cache_read,
            output_tokens: self.output,
            cached_input_tokens: self.cache_read,
            cache_write_tokens: self.cache_write,
            reasoning_tokens: 0,
        }
    }
}

/// Anthropic `usage` → [`Usage`] (OpenAI accounting: input includes cache reads and writes).
pub fn parse_usage(v: &Value) -> Usage {
    RawUsage::read(v).usage()
}

/// A `tool_use` block's `input` as arguments text.
fn input_text(input: &Value) -> String {
    if input.is_null() {
        "{}".to_owned()
    } else {
        input.to_string()
    }
}

fn parse_chat(v: &Value) -> Result<ChatResponse, ProviderError> {
    let content = v["content"]
        .as_array()
        .ok_or_else(|| ProviderError::Malformed("no content in the answer".into()))?;
    let mut response = ChatResponse {
        id: v["id"].as_str().unwrap_or_default().to_owned(),
        model: v["model"].as_str().unwrap_or_default().to_owned(),
        finish_reason: finish_reason(v["stop_reason"].as_str()),
        usage: parse_usage(&v["usage"]),
        ..ChatResponse::default()
    };
    for block in content {
        match block["type"].as_str() {
            Some("text") => response.text.push_str(block["text"].as_str().unwrap_or_default()),
            Some("thinking") => {
                let text = block["thinking"].as_str().unwrap_or_default();
                response.reasoning.push_str(text);
                response.reasoning_blocks.push(Reasoning {
                    text: text.to_owned(),
                    signature: block["signature"].as_str().map(str::to_owned),
                    redacted: None,
                });
            }
            Some("redacted_thinking") => response.reasoning_blocks.push(Reasoning {
                redacted: Some(block["data"].as_str().unwrap_or_default().to_owned()),
                ..Reasoning::default()
            }),
            Some("tool_use") => response.tool_calls.push(ToolCall {
                id: block["id"].as_str().unwrap_or_default().to_owned(),
                name: block["name"].as_str().unwrap_or_default().to_owned(),
                arguments: input_text(&block["input"]),
                thought_signature: None,
            }),
            // Server tool blocks (run by Anthropic, not the caller), and
            // whatever is added later.
            _ => {}
        }
    }
    Ok(response)
}

/// One streamed `tool_use` block.
#[derive(Debug)]
struct ToolBlock {
    /// Its index among this answer's tool calls.
    index: u32,
    /// The `input` of `content_block_start` (`{}` from Anthropic; whole
    /// arguments from some compatible servers), sent at the block's end if
    /// no argument fragment came.
    start_input: String,
    /// Whether a non-empty fragment was sent.
    sent_arguments: bool,
}

/// Messages stream events → [`StreamEvent`]s.
#[derive(Debug, Default)]
pub struct EventTranslator {
    /// Anthropic block index → its tool call.
    tools: HashMap<u64, ToolBlock>,
    next_tool: u32,
    usage: RawUsage,
    done: bool,
}

impl EventTranslator {
    fn merge_usage(&mut self, v: &Value, out: &mut Vec<StreamEvent>) {
        let later = RawUsage::read(v);
        if later != RawUsage::default() {
            self.usage.merge(later);
            out.push(StreamEvent::Usage(self.usage.usage()));
        }
    }
}

impl Translator for EventTranslator {
    fn on_event(&mut self, event: &SseEvent) -> Result<Vec<StreamEvent>, ProviderError> {
        let v: Value =
            serde_json::from_str(&event.data).map_err(|e| ProviderError::Malformed(format!("stream event: {e}")))?;
        let kind = event
            .event
            .as_deref()
            .or_else(|| v["type"].as_str())
            .unwrap_or_default();
        let mut out = Vec::new();
        match kind {
            "message_start" => self.merge_usage(&v["message"]["usage"], &mut out),
            "content_block_start" => {
                let block = &v["content_block"];
                match block["type"].as_str() {
                    Some("text") => {
                        if let Some(t) = block["text"].as_str().filter(|t| !t.is_empty()) {
                            out.push(StreamEvent::Text(t.to_owned()));
                        }
                    }
                    Some("thinking") => {
                        if let Some(t) = block["thinking"].as_str().filter(|t| !t.is_empty()) {
                            out.push(StreamEvent::Reasoning(t.to_owned()));
                        }
                    }
                    Some("redacted_thinking") => {
                        out.push(StreamEvent::RedactedReasoning(
                            block["data"].as_str().unwrap_or_default().to_owned(),
                        ));
                    }
                    Some("tool_use") => {
                        let index = self.next_tool;
                        self.next_tool += 1;
                        self.tools.insert(
                            v["index"].as_u64().unwrap_or_default(),
                            ToolBlock {
                                index,
                                start_input: input_text(&block["input"]),
                                sent_arguments: false,
                            },
                        );
                        out.push(StreamEvent::ToolCallStart {
                            index,
                            id: block["id"].as_str().unwrap_or_default().to_owned(),
                            name: block["name"].as_str().unwrap_or_default().to_owned(),
                            thought_signature: None,
                        });
                    }
                    _ => {}
                }
            }
            "content_block_delta" => {
                let delta = &v["delta"];
                match delta["type"].as_str() {
                    Some("text_delta") => {
                        if let Some(t) = delta["text"].as_str().filter(|t| !t.is_empty()) {
                            out.push(StreamEvent::Text(t.to_owned()));
                        }
                    }
                    Some("thinking_delta") => {
                        if let Some(t) = delta["thinking"].as_str().filter(|t| !t.is_empty()) {
                            out.push(StreamEvent::Reasoning(t.to_owned()));
                        }
                    }
                    Some("input_json_delta") => {
                        // Deltas of blocks that are not the caller's tool
                        // calls (server tools) have no mapping and are skipped.
                        let block = v["index"].as_u64().unwrap_or_default();
                        if let Some(tool) = self.tools.get_mut(&block)
                            && let Some(f) = delta["partial_json"].as_str().filter(|f| !f.is_empty())
                        {
                            tool.sent_arguments = true;
                            out.push(StreamEvent::ToolCallArguments {
                                index: tool.index,
                                fragment: f.to_owned(),
                            });
                        }
                    }
                    Some("signature_delta") => {
                        if let Some(sig) = delta["signature"].as_str().filter(|s| !s.is_empty()) {
                            out.push(StreamEvent::ReasoningSignature(sig.to_owned()));
                        }
                    }
                    // citations_delta, and later additions.
                    _ => {}
                }
            }
            "content_block_stop" => {
                let block = v["index"].as_u64().unwrap_or_default();
                if let Some(tool) = self.tools.get_mut(&block)
                    && !tool.sent_arguments
                {
                    tool.sent_arguments = true;
                    out.push(StreamEvent::ToolCallArguments {
                        index: tool.index,
                        fragment: tool.start_input.clone(),
                    });
                }
            }
            "message_delta" => {
                if let Some(reason) = v["delta"]["stop_reason"].as_str() {
                    out.push(StreamEvent::Finish(finish_reason(Some(reason))));
                }
                self.merge_usage(&v["usage"], &mut out);
            }
            "message_stop" => self.done = true,
            "error" => {
                let (kind, message) = parse_error(event.data.as_bytes());
                return Err(ProviderError::Stream { kind, message });
            }
            // `ping`, and event types Anthropic may add.
            _ => {}
        }
        Ok(out)
    }

    fn on_end(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        if self.done {
            Ok(Vec::new())
        } else {
            Err(ProviderError::Connect("stream ended before message_stop".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Tool;

    fn user(text: &str) -> Message {
        Message::text(Role::User, text)
    }

    fn tool_message(id: &str, text: &str) -> Message {
        Message {
            tool_call_id: Some(id.into()),
            ..Message::text(Role::Tool, text)
        }
    }

    fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: arguments.into(),
            thought_signature: None,
        }
    }

    fn weather_tool() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: "Current weather".into(),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}}),
        }
    }

    fn event(name: &str, data: Value) -> SseEvent {
        SseEvent {
            event: Some(name.into()),
            data: data.to_string(),
        }
    }

    fn feed(t: &mut EventTranslator, events: &[SseEvent]) -> Vec<StreamEvent> {
        events.iter().flat_map(|e| t.on_event(e).unwrap()).collect()
    }

    #[test]
    fn system_and_developer_messages_are_hoisted_in_order() {
        let r = ChatRequest {
            model: "claude-sonnet-4-5".into(),
            messages: vec![
                Message::text(Role::System, "Be brief."),
                user("Hi"),
                Message::text(Role::Assistant, "Hello."),
                Message::text(Role::Developer, "Answer in French."),
                user("Weather?"),
            ],
            ..ChatRequest::default()
        };
        let body = chat_body(&r, false).unwrap();
        assert_eq!(body["system"], json!("Be brief.\n\nAnswer in French."));
        assert_eq!(body["model"], json!("claude-sonnet-4-5"));
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
            ])
        );
        assert_eq!(body["max_tokens"], json!(DEFAULT_MAX_TOKENS));
        assert!(body.get("stream").is_none());
        assert!(body.get("tool_choice").is_none());
        assert!(body.get("temperature").is_none());
    }

    #[test]
    fn tool_turns_become_tool_use_and_merged_tool_results_first() {
        let r = ChatRequest {
            messages: vec![
                user("Weather in Paris and Oslo?"),
                Message {
                    tool_calls: vec![
                        call("toolu_1", "get_weather", r#"{"city":"Paris"}"#),
                        call("toolu_2", "get_weather", ""),
                    ],
                    ..Message::text(Role::Assistant, "Checking.")
                },
                tool_message("toolu_1", "18C"),
                tool_message("toolu_2", "4C"),
                user("And tomorrow?"),
            ],
            max_tokens: Some(100),
            ..ChatRequest::default()
        };
        let body = chat_body(&r, true).unwrap();
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Oslo?"}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "4C"},
                    {"type": "text", "text": "And tomorrow?"},
                ]},
            ])
        );
        assert_eq!(body["max_tokens"], json!(100));
        assert_eq!(body["stream"], json!(true));
    }

    #[test]
    fn tool_results_precede_user_text_even_when_it_comes_first() {
        let r = ChatRequest {
            messages: vec![
                user("Go on."),
                tool_message("toolu_1", "done"),
                Message::text(Role::Assistant, ""),
            ],
            ..ChatRequest::default()
        };
        let body = chat_body(&r, false).unwrap();
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"},
                {"type": "text", "text": "Go on."},
            ]}])
        );
    }

    #[test]
    fn a_tool_message_without_its_call_id_is_invalid() {
        let r = ChatRequest {
            messages: vec![Message::text(Role::Tool, "x")],
            ..ChatRequest::default()
        };
        let err = chat_body(&r, false).unwrap_err();
        assert!(matches!(&err, ProviderError::Invalid { field, .. } if field == "messages[0].tool_call_id"));
    }

    #[test]
    fn invalid_tool_arguments_are_the_callers_error_naming_the_field() {
        let r = ChatRequest {
            messages: vec![
                user("x"),
                Message {
                    tool_calls: vec![call("a", "f", "{}"), call("b", "f", "{not json")],
                    ..Message::text(Role::Assistant, "")
                },
            ],
            ..ChatRequest::default()
        };
        let err = chat_body(&r, false).unwrap_err();
        assert!(
            matches!(&err, ProviderError::Invalid { field, .. } if field == "messages[1].tool_calls[1].arguments"),
            "{err:?}"
        );
        assert!(!err.retryable());
        let array = ChatRequest {
            messages: vec![Message {
                tool_calls: vec![call("a", "f", "[1]")],
                ..Message::text(Role::Assistant, "")
            }],
            ..ChatRequest::default()
        };
        assert!(matches!(chat_body(&array, false), Err(ProviderError::Invalid { .. })));
    }

    #[test]
    fn tools_and_tool_choice_map_to_anthropic_shapes() {
        let base = ChatRequest {
            messages: vec![user("x")],
            tools: vec![weather_tool()],
            ..ChatRequest::default()
        };
        let body = chat_body(&base, false).unwrap();
        assert_eq!(
            body["tools"],
            json!([{
                "name": "get_weather",
                "description": "Current weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            }])
        );
        assert!(body.get("tool_choice").is_none());
        let cases = [
            (ToolChoice::Auto, None, json!({"type": "auto"})),
            (ToolChoice::Required, None, json!({"type": "any"})),
            (
                ToolChoice::Function("get_weather".into()),
                None,
                json!({"type": "tool", "name": "get_weather"}),
            ),
            (ToolChoice::None, None, json!({"type": "none"})),
            (
                ToolChoice::Unset,
                Some(false),
                json!({"type": "auto", "disable_parallel_tool_use": true}),
            ),
            (
                ToolChoice::Required,
                Some(false),
                json!({"type": "any", "disable_parallel_tool_use": true}),
            ),
            (
                ToolChoice::Function("get_weather".into()),
                Some(false),
                json!({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true}),
            ),
            (ToolChoice::None, Some(false), json!({"type": "none"})),
            (ToolChoice::Auto, Some(true), json!({"type": "auto"})),
        ];
        for (choice, parallel, want) in cases {
            let r = ChatRequest {
                tool_choice: choice.clone(),
                parallel_tool_calls: parallel,
                ..base.clone()
            };
            assert_eq!(
                chat_body(&r, false).unwrap()["tool_choice"],
                want,
                "{choice:?} {parallel:?}"
            );
        }
    }

    #[test]
    fn tool_choice_without_tools_is_dropped_or_refused() {
        let r = ChatRequest {
            messages: vec![user("x")],
            tool_choice: ToolChoice::Auto,
            parallel_tool_calls: Some(false),
            ..ChatRequest::default()
        };
        assert!(chat_body(&r, false).unwrap().get("tool_choice").is_none());
        let r = ChatRequest {
            tool_choice: ToolChoice::Required,
            ..r
        };
        assert!(matches!(
            chat_body(&r, false),
            Err(ProviderError::Invalid { field, .. }) if field == "tool_choice"
        ));
    }

    #[test]
    fn sampling_stop_user_and_images_translate() {
        let r = ChatRequest {
            messages: vec![Message {
                content: vec![
                    Part::Text("What is this?".into()),
                    Part::Image(Image::Inline {
                        media_type: "image/png".into(),
                        base64: "iVBORw0KGgo=".into(),
                    }),
                    Part::Image(Image::Url("https://example.com/cat.jpg".into())),
                ],
                ..user("")
            }],
            temperature: Some(1.7),
            top_p: Some(0.9),
            stop: vec!["END".into(), "\n\nHuman:".into()],
            user: Some("user-42".into()),
            ..ChatRequest::default()
        };
        let body = chat_body(&r, false).unwrap();
        assert_eq!(body["temperature"], json!(1.0));
        assert_eq!(body["top_p"], json!(0.9));
        assert_eq!(body["stop_sequences"], json!(["END", "\n\nHuman:"]));
        assert_eq!(body["metadata"], json!({"user_id": "user-42"}));
        assert!(body.get("stop").is_none() && body.get("user").is_none());
        assert_eq!(
            body["messages"][0]["content"],
            json!([
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ])
        );
        for (given, sent) in [(0.0, 0.0), (0.4, 0.4), (-0.5, 0.0)] {
            let r = ChatRequest {
                temperature: Some(given),
                ..ChatRequest::default()
            };
            assert_eq!(chat_body(&r, false).unwrap()["temperature"], json!(sent));
        }
    }

    #[test]
    fn strict_json_schema_is_unsupported_and_the_rest_ignored() {
        let schema = |strict| ChatRequest {
            messages: vec![user("x")],
            response_format: ResponseFormat::JsonSchema {
                name: "answer".into(),
                schema: json!({"type": "object"}),
                strict,
            },
            ..ChatRequest::default()
        };
        match chat_body(&schema(true), false) {
            Err(ProviderError::Unsupported(m)) => {
                assert_eq!(m, "response_format json_schema is not supported by anthropic targets");
            }
            other => panic!("{other:?}"),
        }
        let body = chat_body(&schema(false), false).unwrap();
        assert!(body.get("response_format").is_none());
        let object = ChatRequest {
            response_format: ResponseFormat::JsonObject,
            ..schema(false)
        };
        assert!(chat_body(&object, false).unwrap().get("response_format").is_none());
    }

    #[test]
    fn a_whole_answer_maps_blocks_stop_reason_and_usage() {
        let answer = json!({
            "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [
                {"type": "thinking", "thinking": "Need weather.", "signature": "sig"},
                {"type": "text", "text": "Let me "},
                {"type": "text", "text": "check."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 12, "cache_creation_input_tokens": 100,
                      "cache_read_input_tokens": 2000, "output_tokens": 40},
        });
        let r = parse_chat(&answer).unwrap();
        assert_eq!(r.id, "msg_01");
        assert_eq!(r.model, "claude-sonnet-4-5");
        assert_eq!(r.text, "Let me check.");
        assert_eq!(r.reasoning, "Need weather.");
        assert_eq!(
            r.tool_calls,
            vec![call("toolu_1", "get_weather", r#"{"city":"Paris"}"#)]
        );
        assert_eq!(r.finish_reason, FinishReason::ToolCalls);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 2112,
                output_tokens: 40,
                cached_input_tokens: 2000,
                cache_write_tokens: 100,
                reasoning_tokens: 0,
            }
        );
        assert!(matches!(parse_chat(&json!({})), Err(ProviderError::Malformed(_))));
    }

    #[test]
    fn stop_reasons_map() {
        for (given, want) in [
            (Some("end_turn"), FinishReason::Stop),
            (Some("stop_sequence"), FinishReason::Stop),
            (Some("max_tokens"), FinishReason::Length),
            (Some("model_context_window_exceeded"), FinishReason::Length),
            (Some("tool_use"), FinishReason::ToolCalls),
            (Some("refusal"), FinishReason::ContentFilter),
            (Some("pause_turn"), FinishReason::Paused),
            (Some("something_new"), FinishReason::Error),
            (None, FinishReason::Unspecified),
        ] {
            assert_eq!(finish_reason(given), want, "{given:?}");
        }
    }

    #[test]
    fn error_bodies_parse() {
        let body = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert_eq!(parse_error(body), ("overloaded_error".into(), "Overloaded".into()));
        assert_eq!(parse_error(b"bad gateway"), ("error".into(), "bad gateway".into()));
        let overloaded = ProviderError::Status {
            status: 529,
            kind: "overloaded_error".into(),
            message: "Overloaded".into(),
            retry_after: None,
        };
        assert!(overloaded.retryable());
    }

    #[test]
    fn stream_maps_blocks_with_own_tool_indexes_and_merges_usage() {
        let mut t = EventTranslator::default();
        let got = feed(
            &mut t,
            &[
                event(
                    "message_start",
                    json!({"type": "message_start", "message": {"id": "msg_1", "content": [],
                    "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5,
                              "cache_read_input_tokens": 300, "output_tokens": 1}}}),
                ),
                event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "thinking", "thinking": ""}}),
                ),
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "thinking_delta", "thinking": "Hmm."}}),
                ),
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "signature_delta", "signature": "EqQB"}}),
                ),
                event("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
                event("ping", json!({"type": "ping"})),
                event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 1,
                    "content_block": {"type": "text", "text": ""}}),
                ),
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 1,
                    "delta": {"type": "text_delta", "text": "Sure."}}),
                ),
                event("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
                event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 2,
                    "content_block": {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {}}}),
                ),
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 2,
                    "delta": {"type": "input_json_delta", "partial_json": ""}}),
                ),
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 2,
                    "delta": {"type": "input_json_delta", "partial_json": "{\"city\":"}}),
                ),
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 2,
                    "delta": {"type": "input_json_delta", "partial_json": "\"Oslo\"}"}}),
                ),
                event("content_block_stop", json!({"type": "content_block_stop", "index": 2})),
                event(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": 3,
                    "content_block": {"type": "tool_use", "id": "toolu_b", "name": "now", "input": {}}}),
                ),
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 3,
                    "delta": {"type": "input_json_delta", "partial_json": ""}}),
                ),
                event("content_block_stop", json!({"type": "content_block_stop", "index": 3})),
                event(
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
                    "usage": {"output_tokens": 57}}),
                ),
                event("message_stop", json!({"type": "message_stop"})),
            ],
        );
        let input = Usage {
            input_tokens: 315,
            output_tokens: 1,
            cached_input_tokens: 300,
            cache_write_tokens: 5,
            reasoning_tokens: 0,
        };
        assert_eq!(
            got,
            vec![
                StreamEvent::Usage(input),
                StreamEvent::Reasoning("Hmm.".into()),
                StreamEvent::ReasoningSignature("EqQB".into()),
                StreamEvent::Text("Sure.".into()),
                StreamEvent::ToolCallStart {
                    index: 0,
                    id: "toolu_a".into(),
                    name: "get_weather".into(),
                    thought_signature: None
                },
                StreamEvent::ToolCallArguments {
                    index: 0,
                    fragment: "{\"city\":".into()
                },
                StreamEvent::ToolCallArguments {
                    index: 0,
                    fragment: "\"Oslo\"}".into()
                },
                StreamEvent::ToolCallStart {
                    index: 1,
                    id: "toolu_b".into(),
                    name: "now".into(),
                    thought_signature: None
                },
                // No argument fragments: the start's `{}`, as a whole answer would say.
                StreamEvent::ToolCallArguments {
                    index: 1,
                    fragment: "{}".into()
                },
                StreamEvent::Finish(FinishReason::ToolCalls),
                StreamEvent::Usage(Usage {
                    output_tokens: 57,
                    ..input
                }),
            ]
        );
        assert!(t.on_end().unwrap().is_empty());
    }

    #[test]
    fn usage_on_message_delta_alone_or_partial_never_erases_counts() {
        let mut t = EventTranslator::default();
        let got = feed(
            &mut t,
            &[
                event(
                    "message_start",
                    json!({"type": "message_start", "message": {"usage": {"input_tokens": 0, "output_tokens": 0}}}),
                ),
                event(
                    "message_delta",
                    json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                    "usage": {"input_tokens": 20, "cache_read_input_tokens": 80, "output_tokens": 9}}),
                ),
                // A repeat with the cache field missing and output at 0.
                event(
                    "message_delta",
                    json!({"type": "message_delta", "delta": {}, "usage": {"input_tokens": 20, "output_tokens": 0}}),
                ),
            ],
        );
        let want = Usage {
            input_tokens: 100,
            output_tokens: 9,
            cached_input_tokens: 80,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
        };
        assert_eq!(
            got,
            vec![
                StreamEvent::Finish(FinishReason::Stop),
                StreamEvent::Usage(want),
                StreamEvent::Usage(want),
            ]
        );
    }

    #[test]
    fn error_event_and_early_end_fail_the_stream() {
        let mut t = EventTranslator::default();
        let err = t
            .on_event(&event(
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ))
            .unwrap_err();
        assert!(matches!(
            &err,
            ProviderError::Stream { kind, message } if kind == "overloaded_error" && message == "Overloaded"
        ));
        let mut t = EventTranslator::default();
        assert!(matches!(t.on_end(), Err(ProviderError::Connect(m)) if m.contains("message_stop")));
    }

    #[test]
    fn unnamed_events_use_their_type_and_unknown_ones_are_skipped() {
        let mut t = EventTranslator::default();
        let got = feed(
            &mut t,
            &[
                SseEvent {
                    event: None,
                    data: json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "text_delta", "text": "hi"}})
                    .to_string(),
                },
                event("brand_new_event", json!({"type": "brand_new_event"})),
                event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 5,
                    "delta": {"type": "input_json_delta", "partial_json": "{\"q\":1}"}}),
                ),
            ],
        );
        assert_eq!(got, vec![StreamEvent::Text("hi".into())]);
        assert!(matches!(
            t.on_event(&SseEvent {
                event: Some("message_delta".into()),
                data: "{oops".into()
            }),
            Err(ProviderError::Malformed(_))
        ));
    }
}
