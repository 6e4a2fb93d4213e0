//! The Anthropic Messages adapter against a scripted stand-in for
//! `api.anthropic.com`, over real HTTP: what Anthropic receives for an
//! OpenAI-shaped request (auth, hoisted system prompt, merged tool results,
//! tool arguments as objects, required `max_tokens`, clamped temperature),
//! and what callers get back from whole and streamed answers (text, tool
//! calls numbered from 0, cache-aware usage that is never erased, stop
//! reasons, overload errors before and after HTTP 200).

use std::time::Duration;

use futures::StreamExt;
use plinth_ai::model::{
    Accumulator, ChatRequest, ChatResponse, EmbedRequest, FinishReason, Image, Message, Part, Reasoning,
    ReasoningEffort, Role, StreamEvent, Tool, ToolCall, ToolChoice, Usage,
};
use plinth_ai::providers::anthropic::{Anthropic, DEFAULT_MAX_TOKENS};
use plinth_ai::providers::{ApiKey, Endpoint, Provider, ProviderError};
use plinth_tests::fake_upstream::{FakeUpstream, Reply, sse_frames};
use secrecy::SecretString;
use serde_json::{Value, json};

const PATH: &str = "/v1/messages";

/// Anthropic's documented stream for a text answer followed by two tool
/// calls, as the wire carries it (pings and the `{}` input placeholder
/// included); argument JSON arrives in fragments that split keys and values.
const TEXT_THEN_TWO_TOOLS: &str = r#"event: message_start
data: {"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5-20250929","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":472,"cache_creation_input_tokens":1024,"cache_read_input_tokens":2048,"output_tokens":2}}}

event: content_block_start
data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"I'll check "}}

event: content_block_delta
data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"both cities."}}

event: content_block_stop
data: {"type":"content_block_stop","index":0}

event: content_block_start
data: {"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"ci"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"ty\": \"Par"}}

event: content_block_delta
data: {"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"is\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":1}

event: content_block_start
data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_02Ab3cDeFgHiJkLmNoPqRsTu","name":"get_weather","input":{}}}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"city\": "}}

event: ping
data: {"type": "ping"}

event: content_block_delta
data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"\"Oslo\", \"unit\": \"c\"}"}}

event: content_block_stop
data: {"type":"content_block_stop","index":2}

event: message_delta
data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}

event: message_stop
data: {"type":"message_stop"}

"#;

fn adapter(fake: &FakeUpstream) -> Anthropic {
    Anthropic::new(Endpoint {
        base_url: fake.url(),
        api_key: ApiKey::Fixed(SecretString::from("sk-ant-test")),
        api_version: None,
        timeout: Duration::from_secs(5),
        client: reqwest::Client::new(),
    })
}

fn ask(text: &str) -> ChatRequest {
    ChatRequest {
        model: "claude-sonnet-4-5".into(),
        messages: vec![Message::text(Role::User, text)],
        ..ChatRequest::default()
    }
}

fn weather_tool() -> Tool {
    Tool {
        name: "get_weather".into(),
        description: "Current weather for a city".into(),
        parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    }
}

fn call(id: &str, arguments: &str) -> ToolCall {
    ToolCall {
        id: id.into(),
        name: "get_weather".into(),
        arguments: arguments.into(),
        thought_signature: None,
    }
}

fn tool_reply(id: &str, text: &str) -> Message {
    Message {
        tool_call_id: Some(id.into()),
        name: Some("get_weather".into()),
        ..Message::text(Role::Tool, text)
    }
}

/// A whole Messages answer.
fn answer(content: Value, stop_reason: &str, usage: Value) -> Value {
    json!({
        "id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5-20250929",
        "content": content, "stop_reason": stop_reason, "stop_sequence": null, "usage": usage,
    })
}

fn short_answer(stop_reason: &str) -> Value {
    answer(
        json!([{"type": "text", "text": "Done."}]),
        stop_reason,
        json!({"input_tokens": 5, "output_tokens": 2}),
    )
}

/// `text` cut into `size`-byte HTTP chunks, so events straddle chunk boundaries.
fn chunked(text: &str, size: usize) -> Vec<String> {
    text.as_bytes()
        .chunks(size)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect()
}

async fn stream_all(
    provider: &Anthropic,
    request: &ChatRequest,
) -> Result<Vec<Result<StreamEvent, ProviderError>>, ProviderError> {
    Ok(provider.chat_stream(request).await?.collect().await)
}

fn accumulate(events: &[Result<StreamEvent, ProviderError>]) -> ChatResponse {
    let mut acc = Accumulator::default();
    for e in events.iter().flatten() {
        acc.push(e);
    }
    acc.finish()
}

#[tokio::test]
async fn the_request_reaches_anthropic_in_its_own_shape() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(PATH, Reply::ok(short_answer("end_turn")));
    let request = ChatRequest {
        model: "claude-sonnet-4-5".into(),
        messages: vec![
            Message::text(Role::System, "You are a weather bot."),
            Message {
                content: vec![
                    Part::Text("Weather in Paris and Oslo? Here is the sky:".into()),
                    Part::Image(Image::from_url("data:image/png;base64,iVBORw0KGgo=")),
                ],
                ..Message::text(Role::User, "")
            },
            Message {
                tool_calls: vec![
                    call("toolu_1", r#"{"city": "Paris"}"#),
                    call("toolu_2", r#"{"city":"Oslo"}"#),
                ],
                ..Message::text(Role::Assistant, "")
            },
            tool_reply("toolu_1", "18C, sunny"),
            tool_reply("toolu_2", "4C, snow"),
            Message::text(Role::Developer, "Temperatures in Celsius."),
            Message::text(Role::User, "Which is warmer?"),
        ],
        tools: vec![weather_tool()],
        tool_choice: ToolChoice::Required,
        parallel_tool_calls: Some(false),
        temperature: Some(1.5),
        top_p: Some(0.95),
        stop: vec!["###".into()],
        user: Some("user-7".into()),
        ..ChatRequest::default()
    };
    let response = adapter(&fake).chat(&request).await.unwrap();
    assert_eq!(response.text, "Done.");

    let got = fake.last().unwrap();
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, "/v1/messages");
    assert_eq!(got.header("x-api-key"), "sk-ant-test");
    assert_eq!(got.header("anthropic-version"), "2023-06-01");
    assert_eq!(got.header("content-type"), "application/json");
    assert_eq!(
        got.header("authorization"),
        "",
        "the key must not travel as a bearer token"
    );

    let body = &got.body;
    assert_eq!(body["model"], json!("claude-sonnet-4-5"));
    assert_eq!(body["max_tokens"], json!(DEFAULT_MAX_TOKENS));
    assert_eq!(body["max_tokens"], json!(4096));
    assert_eq!(
        body["system"],
        json!("You are a weather bot.\n\nTemperatures in Celsius.")
    );
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and Oslo? Here is the sky:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            ]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Oslo"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C, sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "4C, snow"},
                {"type": "text", "text": "Which is warmer?"},
            ]},
        ])
    );
    assert_eq!(
        body["tools"],
        json!([{
            "name": "get_weather",
            "description": "Current weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }])
    );
    assert_eq!(
        body["tool_choice"],
        json!({"type": "any", "disable_parallel_tool_use": true})
    );
    assert_eq!(
        body["temperature"],
        json!(1.0),
        "OpenAI's 0–2 range is clamped to Anthropic's 0–1"
    );
    assert_eq!(body["top_p"], json!(0.95));
    assert_eq!(body["stop_sequences"], json!(["###"]));
    assert_eq!(body["metadata"], json!({"user_id": "user-7"}));
    for openai_only in ["stop", "user", "parallel_tool_calls", "response_format", "stream"] {
        assert!(body.get(openai_only).is_none(), "{openai_only} must not be sent");
    }
    assert!(
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["role"] == "user" || m["role"] == "assistant")
    );
}

#[tokio::test]
async fn a_given_max_tokens_and_a_named_tool_are_sent_as_asked() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(PATH, Reply::ok(short_answer("end_turn")));
    let request = ChatRequest {
        max_tokens: Some(300),
        tools: vec![weather_tool()],
        tool_choice: ToolChoice::Function("get_weather".into()),
        temperature: Some(0.2),
        ..ask("Paris?")
    };
    adapter(&fake).chat(&request).await.unwrap();
    let body = fake.last().unwrap().body;
    assert_eq!(body["max_tokens"], json!(300));
    assert_eq!(body["tool_choice"], json!({"type": "tool", "name": "get_weather"}));
    assert_eq!(body["temperature"], json!(0.2));
    assert!(body.get("system").is_none());
}

#[tokio::test]
async fn a_whole_answer_gives_text_tool_calls_and_cache_aware_usage() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(
        PATH,
        Reply::ok(answer(
            json!([
                {"type": "text", "text": "Checking Paris. "},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                 "input": {"city": "Paris", "unit": "celsius"}},
                {"type": "text", "text": "One moment."},
            ]),
            "tool_use",
            json!({"input_tokens": 21, "cache_creation_input_tokens": 1500,
                   "cache_read_input_tokens": 3000, "output_tokens": 64,
                   "cache_creation": {"ephemeral_5m_input_tokens": 1500, "ephemeral_1h_input_tokens": 0},
                   "service_tier": "standard"}),
        )),
    );
    let r = adapter(&fake)
        .chat(&ChatRequest {
            tools: vec![weather_tool()],
            ..ask("Weather in Paris?")
        })
        .await
        .unwrap();
    assert_eq!(r.id, "msg_01");
    assert_eq!(r.model, "claude-sonnet-4-5-20250929");
    assert_eq!(r.text, "Checking Paris. One moment.");
    assert_eq!(r.tool_calls.len(), 1);
    assert_eq!(r.tool_calls[0].id, "toolu_01A09q90qw90lq917835lq9");
    assert_eq!(r.tool_calls[0].name, "get_weather");
    let arguments: Value = serde_json::from_str(&r.tool_calls[0].arguments).unwrap();
    assert_eq!(arguments, json!({"city": "Paris", "unit": "celsius"}));
    assert_eq!(r.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 21 + 1500 + 3000,
            output_tokens: 64,
            cached_input_tokens: 3000,
            cache_write_tokens: 1500,
            reasoning_tokens: 0,
        }
    );
}

#[tokio::test]
async fn stop_reasons_reach_the_caller_distinctly() {
    let fake = FakeUpstream::start().await.unwrap();
    let provider = adapter(&fake);
    for (stop_reason, want) in [
        ("pause_turn", FinishReason::Paused),
        ("refusal", FinishReason::ContentFilter),
        ("max_tokens", FinishReason::Length),
        ("model_context_window_exceeded", FinishReason::Length),
        ("stop_sequence", FinishReason::Stop),
        ("end_turn", FinishReason::Stop),
    ] {
        fake.push(PATH, Reply::ok(short_answer(stop_reason)));
        let r = provider.chat(&ask("Go")).await.unwrap();
        assert_eq!(r.finish_reason, want, "{stop_reason}");
    }
    // Streamed too: a paused server-tool loop is not a plain stop.
    fake.push(
        PATH,
        Reply::sse(sse_frames([
            (
                "message_start",
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}}),
            ),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "pause_turn"}, "usage": {"output_tokens": 3}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ])),
    );
    let events = stream_all(&provider, &ask("Go")).await.unwrap();
    assert_eq!(accumulate(&events).finish_reason, FinishReason::Paused);
}

#[tokio::test]
async fn a_streamed_answer_numbers_tool_calls_from_zero_and_joins_their_arguments() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(PATH, Reply::sse(chunked(TEXT_THEN_TWO_TOOLS, 37)));
    let provider = adapter(&fake);
    let events = stream_all(
        &provider,
        &ChatRequest {
            tools: vec![weather_tool()],
            ..ask("Weather in Paris and Oslo?")
        },
    )
    .await
    .unwrap();
    assert_eq!(fake.last().unwrap().body["stream"], json!(true));
    assert!(events.iter().all(Result::is_ok), "{events:?}");
    let events: Vec<StreamEvent> = events.into_iter().flatten().collect();

    // Each call starts with its id and name before any of its arguments,
    // at index 0 and 1 although Anthropic numbers the blocks 1 and 2.
    let starts: Vec<(u32, &str, &str)> = events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::ToolCallStart { index, id, name, .. } => Some((*index, id.as_str(), name.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(
        starts,
        vec![
            (0, "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather"),
            (1, "toolu_02Ab3cDeFgHiJkLmNoPqRsTu", "get_weather"),
        ]
    );
    for index in [0, 1] {
        let start = events
            .iter()
            .position(|e| matches!(e, StreamEvent::ToolCallStart { index: i, .. } if *i == index));
        let first_fragment = events
            .iter()
            .position(|e| matches!(e, StreamEvent::ToolCallArguments { index: i, .. } if *i == index));
        assert!(start < first_fragment, "call {index} starts before its arguments");
    }
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, StreamEvent::ToolCallArguments { fragment, .. } if fragment.is_empty())),
        "no empty fragments"
    );

    let mut acc = Accumulator::default();
    let mut usages = Vec::new();
    for e in &events {
        acc.push(e);
        if let StreamEvent::Usage(u) = e {
            usages.push(*u);
        }
    }
    let r = acc.finish();
    assert_eq!(r.text, "I'll check both cities.");
    assert_eq!(r.tool_calls.len(), 2);
    assert_eq!(r.tool_calls[0].arguments, r#"{"city": "Paris"}"#);
    assert_eq!(r.tool_calls[1].arguments, r#"{"city": "Oslo", "unit": "c"}"#);
    assert_eq!(r.finish_reason, FinishReason::ToolCalls);
    // Input (with both cache counts) from message_start, output from the
    // last message_delta, and no usage event ever says 0 input.
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 472 + 1024 + 2048,
            output_tokens: 89,
            cached_input_tokens: 2048,
            cache_write_tokens: 1024,
            reasoning_tokens: 0,
        }
    );
    assert!(usages.len() >= 2);
    assert!(usages.iter().all(|u| u.input_tokens == 3544 && u.output_tokens > 0));
    assert_eq!(usages.first().map(|u| u.output_tokens), Some(2));
}

#[tokio::test]
async fn usage_from_compatible_backends_is_merged_never_zeroed() {
    let fake = FakeUpstream::start().await.unwrap();
    let provider = adapter(&fake);
    let text = |t: &str| {
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
        )
    };
    // Input and cache counts only on message_delta; message_start says 0.
    fake.push(
        PATH,
        Reply::sse(sse_frames([
            (
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_x", "content": [],
                    "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            text("Hello"),
            ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                    "usage": {"input_tokens": 30, "cache_read_input_tokens": 70, "output_tokens": 12}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ])),
    );
    let events = stream_all(&provider, &ask("Hi")).await.unwrap();
    let r = accumulate(&events);
    assert_eq!(r.text, "Hello");
    assert_eq!(
        r.usage,
        Usage {
            input_tokens: 100,
            output_tokens: 12,
            cached_input_tokens: 70,
            cache_write_tokens: 0,
            reasoning_tokens: 0,
        }
    );

    // Input on message_start; message_delta repeats the input fields as 0
    // (and without the cache field): the counts already seen stay.
    fake.push(
        PATH,
        Reply::sse(sse_frames([
            (
                "message_start",
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 40,
                    "cache_read_input_tokens": 60, "output_tokens": 1}}}),
            ),
            text("Hi"),
            (
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                    "usage": {"input_tokens": 0, "output_tokens": 7}}),
            ),
            ("message_stop", json!({"type": "message_stop"})),
        ])),
    );
    let events = stream_all(&provider, &ask("Hi")).await.unwrap();
    let usages: Vec<Usage> = events
        .iter()
        .filter_map(|e| match e {
            Ok(StreamEvent::Usage(u)) => Some(*u),
            _ => None,
        })
        .collect();
    assert!(
        usages
            .iter()
            .all(|u| u.input_tokens == 100 && u.cached_input_tokens == 60)
    );
    assert_eq!(accumulate(&events).usage.output_tokens, 7);
    assert_eq!(accumulate(&events).usage.input_tokens, 100);
}

#[tokio::test]
async fn an_overload_mid_stream_ends_it_with_a_stream_error_after_what_came_before() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(
        PATH,
        Reply::sse(sse_frames([
            (
                "message_start",
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 15, "output_tokens": 1}}}),
            ),
            (
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Partial"}}),
            ),
            (
                "error",
                json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "never"}}),
            ),
        ])),
    );
    let events = stream_all(&adapter(&fake), &ask("Hi")).await.unwrap();
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(matches!(&events[0], Ok(StreamEvent::Usage(u)) if u.input_tokens == 15));
    assert!(matches!(&events[1], Ok(StreamEvent::Text(t)) if t == "Partial"));
    match &events[2] {
        Err(e @ ProviderError::Stream { kind, message }) => {
            assert_eq!(kind, "overloaded_error");
            assert_eq!(message, "Overloaded");
            assert!(e.retryable());
        }
        other => panic!("expected a stream error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_stream_cut_before_message_stop_is_an_error() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(
        PATH,
        Reply::sse(sse_frames([
            (
                "message_start",
                json!({"type": "message_start", "message": {"usage": {"input_tokens": 15, "output_tokens": 1}}}),
            ),
            (
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Half"}}),
            ),
        ])),
    );
    let events = stream_all(&adapter(&fake), &ask("Hi")).await.unwrap();
    assert!(matches!(events.last(), Some(Err(ProviderError::Connect(m))) if m.contains("message_stop")));
    assert_eq!(
        accumulate(&events).usage.input_tokens,
        15,
        "what was used stays billable"
    );
}

#[tokio::test]
async fn http_529_overloaded_is_retryable_and_honours_retry_after() {
    let fake = FakeUpstream::start().await.unwrap();
    let overloaded = || {
        Reply::status(
            529,
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        )
        .with_header("retry-after", "7")
    };
    let provider = adapter(&fake);
    fake.push(PATH, overloaded());
    let whole = provider.chat(&ask("Hi")).await.unwrap_err();
    fake.push(PATH, overloaded());
    let streamed = match provider.chat_stream(&ask("Hi")).await {
        Err(e) => e,
        Ok(_) => panic!("a 529 must fail before any event"),
    };
    for err in [whole, streamed] {
        match &err {
            ProviderError::Status {
                status,
                kind,
                message,
                retry_after,
            } => {
                assert_eq!(*status, 529);
                assert_eq!(kind, "overloaded_error");
                assert_eq!(message, "Overloaded");
                assert_eq!(*retry_after, Some(Duration::from_secs(7)));
            }
            other => panic!("expected a status error, got {other:?}"),
        }
        assert!(err.retryable());
        assert!(err.counts_against_target());
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
    }
}

#[tokio::test]
async fn invalid_tool_call_arguments_are_refused_before_anything_is_sent() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.always(PATH, Reply::ok(short_answer("end_turn")));
    let request = ChatRequest {
        messages: vec![
            Message::text(Role::User, "Weather?"),
            Message {
                tool_calls: vec![
                    call("toolu_1", r#"{"city": "Paris"}"#),
                    call("toolu_2", r#"{"city": "Os"#),
                ],
                ..Message::text(Role::Assistant, "")
            },
            tool_reply("toolu_1", "18C"),
            tool_reply("toolu_2", "4C"),
        ],
        tools: vec![weather_tool()],
        ..ask("")
    };
    let provider = adapter(&fake);
    for err in [
        provider.chat(&request).await.unwrap_err(),
        match provider.chat_stream(&request).await {
            Err(e) => e,
            Ok(_) => panic!("invalid arguments must fail before streaming"),
        },
    ] {
        match &err {
            ProviderError::Invalid { field, reason } => {
                assert_eq!(field, "messages[1].tool_calls[1].arguments");
                assert!(reason.contains("JSON"), "{reason}");
            }
            other => panic!("expected the caller's error, got {other:?}"),
        }
        assert!(!err.retryable(), "another target would refuse it too");
    }
    assert!(fake.requests().is_empty(), "nothing reached Anthropic");
}

#[tokio::test]
async fn embeddings_are_unsupported_without_a_request() {
    let fake = FakeUpstream::start().await.unwrap();
    let err = adapter(&fake)
        .embed(&EmbedRequest {
            model: "claude".into(),
            inputs: vec!["x".into()],
            ..EmbedRequest::default()
        })
        .await
        .unwrap_err();
    assert!(matches!(&err, ProviderError::Unsupported(m) if m.contains("embeddings")));
    assert!(fake.requests().is_empty());
}

/// A thinking turn with tools: the answer's signed thinking block comes back
/// to the caller, and the next request carries it unchanged (and a redacted
/// block as `redacted_thinking`) before the tool call; reasoning effort asks
/// for a thinking budget, raises `max_tokens` above it and leaves sampling
/// to Anthropic; a cache point marks the block before it with `cache_control`.
#[tokio::test]
async fn thinking_blocks_round_trip_signed_and_cache_points_become_cache_control() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(
        PATH,
        Reply::ok(answer(
            json!([
                {"type": "thinking", "thinking": "The user wants Paris weather.", "signature": "EqQBCkgIARAB...sig"},
                {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3p...enc"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ]),
            "tool_use",
            json!({"input_tokens": 50, "output_tokens": 40}),
        )),
    );
    fake.push(PATH, Reply::ok(short_answer("end_turn")));
    let provider = adapter(&fake);
    let mut request = ChatRequest {
        model: "claude-sonnet-4-5".into(),
        messages: vec![Message {
            content: vec![
                Part::Text("A long reference document.".into()),
                Part::CachePoint,
                Part::Text("What is the weather in Paris?".into()),
            ],
            ..Message::text(Role::User, "")
        }],
        tools: vec![weather_tool()],
        temperature: Some(0.2),
        max_tokens: Some(1000),
        reasoning_effort: Some(ReasoningEffort::Medium),
        ..ChatRequest::default()
    };
    let first = provider.chat(&request).await.unwrap();
    assert_eq!(
        first.reasoning_blocks,
        vec![
            Reasoning {
                text: "The user wants Paris weather.".into(),
                signature: Some("EqQBCkgIARAB...sig".into()),
                redacted: None,
            },
            Reasoning {
                redacted: Some("EmwKAhgBEgy3va3p...enc".into()),
                ..Reasoning::default()
            },
        ]
    );
    let sent = fake.last().unwrap().body;
    assert_eq!(sent["thinking"], json!({"type": "enabled", "budget_tokens": 4096}));
    assert_eq!(
        sent["max_tokens"],
        4096 + 1024,
        "max_tokens must exceed the thinking budget"
    );
    assert!(sent.get("temperature").is_none(), "{sent}");
    let blocks = &sent["messages"][0]["content"];
    assert_eq!(blocks[0]["cache_control"], json!({"type": "ephemeral"}));
    assert!(blocks[1].get("cache_control").is_none());

    // The next turn: the assistant message as answered, then the tool result.
    let mut assistant = Message::text(Role::Assistant, "");
    assistant.content = first.reasoning_blocks.iter().cloned().map(Part::Reasoning).collect();
    assistant.tool_calls = first.tool_calls.clone();
    request.messages.push(assistant);
    request.messages.push(tool_reply("toolu_1", "18°C, clear"));
    provider.chat(&request).await.unwrap();
    let sent = fake.last().unwrap().body;
    let turn = &sent["messages"][1];
    assert_eq!(turn["role"], "assistant");
    assert_eq!(
        turn["content"][0],
        json!({"type": "thinking", "thinking": "The user wants Paris weather.", "signature": "EqQBCkgIARAB...sig"})
    );
    assert_eq!(
        turn["content"][1],
        json!({"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3p...enc"})
    );
    assert_eq!(turn["content"][2]["type"], "tool_use");
}

#[tokio::test]
async fn a_streamed_thinking_block_keeps_its_signature() {
    let fake = FakeUpstream::start().await.unwrap();
    let frames = sse_frames([
        (
            "message_start",
            json!({"type": "message_start", "message": {"id": "m", "type": "message", "role": "assistant", "content": [], "model": "c", "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Let me "}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "think."}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "EqQBsig"}}),
        ),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 0})),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Answer."}}),
        ),
        ("content_block_stop", json!({"type": "content_block_stop", "index": 1})),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 30}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ]);
    fake.push(PATH, Reply::sse(frames));
    let provider = adapter(&fake);
    let events = stream_all(&provider, &ask("Think, then answer.")).await.unwrap();
    let whole = accumulate(&events);
    assert_eq!(whole.text, "Answer.");
    assert_eq!(
        whole.reasoning_blocks,
        vec![Reasoning {
            text: "Let me think.".into(),
            signature: Some("EqQBsig".into()),
            redacted: None,
        }]
    );
}
