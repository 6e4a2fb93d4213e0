//! The Gemini `generateContent` adapter against a scripted stand-in for
//! `generativelanguage.googleapis.com`, over real HTTP: what Gemini receives
//! for an OpenAI-shaped request (URL and `alt=sse`, `x-goog-api-key`, the
//! hoisted `systemInstruction`, the `model` role, converted tool schemas,
//! `toolConfig`, function responses as objects with echoed ids, thought
//! signatures sent back and made-up ids not), and what callers get back
//! (`STOP` with calls as `tool_calls`, thoughts counted as output, parallel
//! calls numbered from 0, blocked prompts, errors before and after HTTP 200,
//! batched embeddings in input order).

#![expect(clippy::expect_used, reason = "tests fail loudly")]

use std::time::Duration;

use futures::StreamExt;
use plinth_ai::model::{
    Accumulator, ChatRequest, ChatResponse, EmbedRequest, FinishReason, Message, Part, Role, StreamEvent, Tool,
    ToolCall, ToolChoice, Usage,
};
use plinth_ai::providers::gemini::{Gemini, SYNTHETIC_ID_PREFIX};
use plinth_ai::providers::{ApiKey, Endpoint, Provider, ProviderError};
use plinth_tests::fake_upstream::{FakeUpstream, Reply, sse_frames};
use secrecy::SecretString;
use serde_json::{Value, json};

const MODEL: &str = "gemini-3-flash-preview";
const GENERATE: &str = "/v1beta/models/gemini-3-flash-preview:generateContent";
const STREAM: &str = "/v1beta/models/gemini-3-flash-preview:streamGenerateContent";
const EMBED: &str = "/v1beta/models/gemini-embedding-001:batchEmbedContents";

fn gemini(fake: &FakeUpstream) -> Gemini {
    Gemini::new(Endpoint {
        base_url: fake.url(),
        api_key: ApiKey::Fixed(SecretString::from("g-test")),
        api_version: None,
        timeout: Duration::from_secs(5),
        client: reqwest::Client::new(),
    })
}

fn request(messages: Vec<Message>) -> ChatRequest {
    ChatRequest {
        model: MODEL.into(),
        messages,
        ..ChatRequest::default()
    }
}

fn weather_tool() -> Tool {
    Tool {
        name: "get_weather".into(),
        description: "Current weather for a city".into(),
        parameters: json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"anyOf": [{"$ref": "#/$defs/Unit"}, {"type": "null"}]},
                "days": {"type": ["integer", "null"]},
            },
            "required": ["city"],
            "additionalProperties": false,
            "$defs": {"Unit": {"type": "string", "enum": ["c", "f"]}},
        }),
    }
}

fn tool_message(id: &str, text: &str) -> Message {
    Message {
        role: Role::Tool,
        content: vec![Part::Text(text.into())],
        tool_calls: Vec::new(),
        tool_call_id: Some(id.into()),
        name: None,
    }
}

/// Every event, and the error that ended the stream, if any.
async fn drain(provider: &Gemini, r: &ChatRequest) -> (Vec<StreamEvent>, Option<ProviderError>) {
    let mut stream = provider.chat_stream(r).await.expect("the stream starts");
    let mut events = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(e) => events.push(e),
            Err(e) => return (events, Some(e)),
        }
    }
    (events, None)
}

fn assemble(events: &[StreamEvent]) -> ChatResponse {
    let mut acc = Accumulator::default();
    for e in events {
        acc.push(e);
    }
    acc.finish()
}

/// A whole answer as the API reference shows one: a thought summary, text,
/// and two calls of one function (the first with Gemini's id and thought
/// signature, the second with neither, as older models send), reported as `STOP`.
fn two_calls_answer() -> Value {
    json!({
        "candidates": [{
            "content": {
                "role": "model",
                "parts": [
                    {"text": "The user wants two cities.", "thought": true},
                    {"text": "Checking both."},
                    {
                        "functionCall": {"id": "9ac3k1x0", "name": "get_weather", "args": {"city": "Paris", "unit": "c"}},
                        "thoughtSignature": "CqQBAdHtim9Qe1Yz"
                    },
                    {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}
                ]
            },
            "finishReason": "STOP",
            "index": 0
        }],
        "usageMetadata": {
            "promptTokenCount": 120,
            "candidatesTokenCount": 31,
            "totalTokenCount": 247,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 120}],
            "thoughtsTokenCount": 88,
            "toolUsePromptTokenCount": 8,
            "cachedContentTokenCount": 64
        },
        "modelVersion": "gemini-3-flash-preview",
        "responseId": "mS1qaMfXB8qHz7IPr9WQ2Ag"
    })
}

#[tokio::test]
async fn a_whole_answer_with_calls_finishes_as_tool_calls_and_counts_thoughts_as_output() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(GENERATE, Reply::ok(two_calls_answer()));
    let provider = gemini(&fake);
    let mut r = request(vec![Message::text(Role::User, "Weather in Paris and Oslo?")]);
    r.tools = vec![weather_tool()];

    let answer = provider.chat(&r).await.unwrap();

    let got = fake.last().unwrap();
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, GENERATE);
    assert_eq!(got.query, None);
    assert_eq!(got.header("x-goog-api-key"), "g-test");
    assert_eq!(got.header("authorization"), "");

    assert_eq!(answer.id, "mS1qaMfXB8qHz7IPr9WQ2Ag");
    assert_eq!(answer.model, "gemini-3-flash-preview");
    assert_eq!(
        answer.finish_reason,
        FinishReason::ToolCalls,
        "Gemini says STOP for calls"
    );
    assert_eq!(answer.text, "Checking both.");
    assert_eq!(answer.reasoning, "The user wants two cities.");
    assert_eq!(answer.tool_calls.len(), 2);
    assert_eq!(answer.tool_calls[0].id, "9ac3k1x0");
    assert_eq!(answer.tool_calls[0].name, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&answer.tool_calls[0].arguments).unwrap(),
        json!({"city": "Paris", "unit": "c"})
    );
    assert_eq!(
        answer.tool_calls[0].thought_signature.as_deref(),
        Some("CqQBAdHtim9Qe1Yz")
    );
    assert!(answer.tool_calls[1].id.starts_with(SYNTHETIC_ID_PREFIX));
    assert_eq!(answer.tool_calls[1].thought_signature, None);
    assert_eq!(
        answer.usage,
        Usage {
            input_tokens: 128,
            output_tokens: 119,
            cached_input_tokens: 64,
            cache_write_tokens: 0,
            reasoning_tokens: 88,
        }
    );
    assert_eq!(answer.usage.total(), 247, "prompt + completion == totalTokenCount");
}

#[tokio::test]
async fn the_next_turn_sends_signatures_and_gemini_ids_back_but_not_made_up_ids() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(GENERATE, Reply::ok(two_calls_answer()));
    fake.push(
        GENERATE,
        Reply::ok(json!({
            "candidates": [{"content": {"role": "model", "parts": [{"text": "Paris 18°C, Oslo 4°C."}]}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 300, "candidatesTokenCount": 9, "totalTokenCount": 309}
        })),
    );
    let provider = gemini(&fake);
    let mut r = request(vec![
        Message::text(Role::System, "You are a weather bot."),
        Message::text(Role::User, "Weather in Paris and Oslo?"),
    ]);
    r.tools = vec![weather_tool()];
    let first = provider.chat(&r).await.unwrap();

    // The caller runs the tools and answers each call by its id, in any order.
    let (paris, oslo) = (&first.tool_calls[0], &first.tool_calls[1]);
    r.messages.push(Message {
        role: Role::Assistant,
        content: vec![Part::Text(first.text.clone())],
        tool_calls: first.tool_calls.clone(),
        tool_call_id: None,
        name: None,
    });
    r.messages.push(tool_message(&oslo.id, "4°C and raining"));
    r.messages.push(tool_message(&paris.id, r#"{"temp": 18, "unit": "c"}"#));
    let second = provider.chat(&r).await.unwrap();
    assert_eq!(second.text, "Paris 18°C, Oslo 4°C.");
    assert_eq!(second.finish_reason, FinishReason::Stop);

    let body = fake.last().unwrap().body;
    assert_eq!(
        body["systemInstruction"],
        json!({"parts": [{"text": "You are a weather bot."}]})
    );
    assert_eq!(
        body["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Weather in Paris and Oslo?"}]},
            {"role": "model", "parts": [
                {"text": "Checking both."},
                {
                    "functionCall": {"id": "9ac3k1x0", "name": "get_weather", "args": {"city": "Paris", "unit": "c"}},
                    "thoughtSignature": "CqQBAdHtim9Qe1Yz"
                },
                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}
            ]},
            {"role": "user", "parts": [
                {"functionResponse": {"id": "9ac3k1x0", "name": "get_weather", "response": {"temp": 18, "unit": "c"}}},
                {"functionResponse": {"name": "get_weather", "response": {"result": "4°C and raining"}}}
            ]}
        ])
    );
    assert!(
        !body.to_string().contains(SYNTHETIC_ID_PREFIX),
        "made-up ids never reach Gemini"
    );
}

#[tokio::test]
async fn a_streamed_request_arrives_as_gemini_documents_it() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(
        STREAM,
        Reply::sse(sse_frames([(
            "",
            json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP", "index": 0}],
                   "usageMetadata": {"promptTokenCount": 50, "candidatesTokenCount": 1, "totalTokenCount": 51}}),
        )])),
    );
    let provider = gemini(&fake);
    let mut r = request(vec![
        Message::text(Role::Developer, "Use metric units."),
        Message::text(Role::User, "Weather?"),
        Message::text(Role::Assistant, "Which city?"),
        Message::text(Role::User, "Rome"),
    ]);
    r.tools = vec![weather_tool()];
    r.tool_choice = ToolChoice::Function("get_weather".into());
    r.max_tokens = Some(512);
    r.temperature = Some(0.2);
    r.top_p = Some(0.95);
    r.stop = vec!["###".into()];

    let (events, error) = drain(&provider, &r).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(assemble(&events).text, "ok");

    let got = fake.last().unwrap();
    assert_eq!(got.path, STREAM);
    assert_eq!(got.query.as_deref(), Some("alt=sse"));
    assert_eq!(got.header("x-goog-api-key"), "g-test");
    let body = got.body;
    assert_eq!(
        body["systemInstruction"],
        json!({"parts": [{"text": "Use metric units."}]})
    );
    assert_eq!(
        body["contents"],
        json!([
            {"role": "user", "parts": [{"text": "Weather?"}]},
            {"role": "model", "parts": [{"text": "Which city?"}]},
            {"role": "user", "parts": [{"text": "Rome"}]}
        ])
    );
    assert!(
        body["contents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["role"] != "system"),
        "no system role"
    );
    assert_eq!(
        body["tools"],
        json!([{"functionDeclarations": [{
            "name": "get_weather",
            "description": "Current weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["c", "f"], "nullable": true},
                    "days": {"type": "integer", "nullable": true}
                },
                "required": ["city"]
            }
        }]}])
    );
    assert_eq!(
        body["toolConfig"],
        json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
    );
    assert_eq!(
        body["generationConfig"],
        json!({"maxOutputTokens": 512, "temperature": 0.2, "topP": 0.95, "stopSequences": ["###"]})
    );
}

#[tokio::test]
async fn parallel_calls_of_one_function_in_separate_chunks_are_numbered_0_and_1() {
    let fake = FakeUpstream::start().await.unwrap();
    // As Gemini writes SSE: CRLF line ends; a frame may be split between
    // chunks; calls arrive whole, each in its own chunk, without index or id.
    let frames = [
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Let me look both up."}]}, "index": 0}],
               "usageMetadata": {"promptTokenCount": 40, "totalTokenCount": 40}}),
        json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "EpQFCpEFAdHtim8"}]}, "index": 0}]}),
        json!({"candidates": [{"content": {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo", "unit": "c"}}}]}, "finishReason": "STOP", "index": 0}],
               "usageMetadata": {"promptTokenCount": 40, "candidatesTokenCount": 22, "thoughtsTokenCount": 15, "totalTokenCount": 77}}),
    ];
    let text: String = frames.iter().map(|f| format!("data: {f}\r\n\r\n")).collect();
    let (a, b) = text.split_at(text.len() / 2);
    fake.push(STREAM, Reply::sse([a.to_owned(), b.to_owned()]));
    let provider = gemini(&fake);
    let mut r = request(vec![Message::text(Role::User, "Paris and Oslo?")]);
    r.tools = vec![weather_tool()];

    let (events, error) = drain(&provider, &r).await;
    assert!(error.is_none(), "{error:?}");

    let starts: Vec<(u32, String)> = events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::ToolCallStart { index, id, .. } => Some((*index, id.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(starts.len(), 2);
    assert_eq!((starts[0].0, starts[1].0), (0, 1));
    assert_ne!(starts[0].1, starts[1].1, "same function, distinct ids");

    let answer = assemble(&events);
    assert_eq!(answer.text, "Let me look both up.");
    assert_eq!(answer.finish_reason, FinishReason::ToolCalls);
    assert_eq!(
        answer.tool_calls[0].thought_signature.as_deref(),
        Some("EpQFCpEFAdHtim8")
    );
    assert_eq!(
        serde_json::from_str::<Value>(&answer.tool_calls[0].arguments).unwrap(),
        json!({"city": "Paris"})
    );
    assert_eq!(
        serde_json::from_str::<Value>(&answer.tool_calls[1].arguments).unwrap(),
        json!({"city": "Oslo", "unit": "c"})
    );
    assert_eq!(answer.usage.input_tokens, 40);
    assert_eq!(answer.usage.output_tokens, 37);
    assert_eq!(answer.usage.reasoning_tokens, 15);
    assert_eq!(answer.usage.total(), 77);
}

#[tokio::test]
async fn a_blocked_prompt_is_an_empty_content_filtered_answer_whole_and_streamed() {
    let blocked = json!({
        "promptFeedback": {
            "blockReason": "PROHIBITED_CONTENT",
            "safetyRatings": [{"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH"}]
        },
        "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
        "modelVersion": "gemini-3-flash-preview"
    });
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(GENERATE, Reply::ok(blocked.clone()));
    fake.push(STREAM, Reply::sse(sse_frames([("", blocked)])));
    let provider = gemini(&fake);
    let r = request(vec![Message::text(Role::User, "something forbidden")]);

    let answer = provider.chat(&r).await.unwrap();
    assert_eq!(answer.finish_reason, FinishReason::ContentFilter);
    assert!(answer.text.is_empty() && answer.tool_calls.is_empty());
    assert_eq!(answer.usage.input_tokens, 9);

    let (events, error) = drain(&provider, &r).await;
    assert!(error.is_none(), "{error:?}");
    let streamed = assemble(&events);
    assert_eq!(streamed.finish_reason, FinishReason::ContentFilter);
    assert!(streamed.text.is_empty());
    assert_eq!(streamed.usage.input_tokens, 9);
}

#[tokio::test]
async fn an_error_inside_a_stream_after_http_200_comes_after_the_events_before_it() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(
        STREAM,
        Reply::sse(sse_frames([
            (
                "",
                json!({"candidates": [{"content": {"role": "model", "parts": [{"text": "Once upon"}]}, "index": 0}]}),
            ),
            (
                "",
                json!({"error": {"code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}}),
            ),
            (
                "",
                json!({"candidates": [{"content": {"role": "model", "parts": [{"text": " never seen"}]}, "index": 0}]}),
            ),
        ])),
    );
    let provider = gemini(&fake);
    let (events, error) = drain(&provider, &request(vec![Message::text(Role::User, "A story")])).await;
    assert_eq!(events, vec![StreamEvent::Text("Once upon".into())]);
    match error {
        Some(ProviderError::Stream { kind, message }) => {
            assert_eq!(kind, "UNAVAILABLE");
            assert_eq!(message, "The model is overloaded. Please try again later.");
        }
        other => panic!("expected a stream error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_empty_stream_is_malformed() {
    let fake = FakeUpstream::start().await.unwrap();
    fake.push(STREAM, Reply::sse(Vec::<String>::new()));
    let provider = gemini(&fake);
    let (events, error) = drain(&provider, &request(vec![Message::text(Role::User, "Hi")])).await;
    assert!(events.is_empty());
    assert!(matches!(error, Some(ProviderError::Malformed(_))), "{error:?}");
}

#[tokio::test]
async fn resource_exhausted_is_a_retryable_429_with_its_retry_after() {
    let body = json!({"error": {
        "code": 429,
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "status": "RESOURCE_EXHAUSTED",
        "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}]
    }});
    let fake = FakeUpstream::start().await.unwrap();
    // With the header, and with only the RetryInfo in the body (what
    // Gemini usually sends): both say 17 s.
    fake.push(
        GENERATE,
        Reply::status(429, body.clone()).with_header("retry-after", "17"),
    );
    fake.push(STREAM, Reply::status(429, body));
    let provider = gemini(&fake);
    let r = request(vec![Message::text(Role::User, "Hi")]);

    let whole = provider.chat(&r).await.unwrap_err();
    let streamed = match provider.chat_stream(&r).await {
        Err(e) => e,
        Ok(_) => panic!("a 429 must fail before the stream starts"),
    };
    for e in [whole, streamed] {
        match &e {
            ProviderError::Status {
                status, kind, message, ..
            } => {
                assert_eq!(*status, 429);
                assert_eq!(kind, "RESOURCE_EXHAUSTED");
                assert!(message.starts_with("You exceeded your current quota"), "{message}");
            }
            other => panic!("expected a status error, got {other:?}"),
        }
        assert!(e.retryable());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(17)));
    }
}

#[tokio::test]
async fn embeddings_come_back_in_input_order_batched_by_100() {
    let fake = FakeUpstream::start().await.unwrap();
    let reply = |n: usize, offset: usize| {
        Reply::ok(json!({
            "embeddings": (0..n).map(|i| json!({"values": [(offset + i) as f64, 0.5, -0.25]})).collect::<Vec<_>>()
        }))
    };
    fake.push(EMBED, reply(100, 0));
    fake.push(EMBED, reply(30, 100));
    let provider = gemini(&fake);
    let inputs: Vec<String> = (0..130).map(|i| format!("text {i}")).collect();

    let answer = provider
        .embed(&EmbedRequest {
            model: "gemini-embedding-001".into(),
            inputs: inputs.clone(),
            dimensions: Some(3),
            user: None,
        })
        .await
        .unwrap();

    let requests = fake.requests();
    assert_eq!(requests.len(), 2);
    assert!(
        requests
            .iter()
            .all(|r| r.path == EMBED && r.header("x-goog-api-key") == "g-test")
    );
    assert_eq!(
        requests[0].body["requests"][0],
        json!({"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "text 0"}]}, "outputDimensionality": 3})
    );
    assert_eq!(requests[0].body["requests"].as_array().unwrap().len(), 100);
    assert_eq!(
        requests[1].body["requests"][0]["content"]["parts"][0]["text"],
        "text 100"
    );
    assert_eq!(requests[1].body["requests"].as_array().unwrap().len(), 30);

    assert_eq!(answer.model, "gemini-embedding-001");
    assert_eq!(answer.vectors.len(), 130);
    for (i, v) in answer.vectors.iter().enumerate() {
        assert_eq!(v, &vec![i as f32, 0.5, -0.25], "vector {i}");
    }
    // batchEmbedContents reports no tokens unless it sends usageMetadata.
    assert_eq!(answer.usage, Usage::default());
}

#[tokio::test]
async fn a_tool_call_with_invalid_arguments_is_refused_before_any_request() {
    let fake = FakeUpstream::start().await.unwrap();
    let provider = gemini(&fake);
    let r = request(vec![
        Message::text(Role::User, "x"),
        Message {
            role: Role::Assistant,
            content: Vec::new(),
            tool_calls: vec![ToolCall {
                id: "c1".into(),
                name: "get_weather".into(),
                arguments: "{\"city\": ".into(),
                thought_signature: None,
            }],
            tool_call_id: None,
            name: None,
        },
    ]);
    match provider.chat(&r).await {
        Err(ProviderError::Invalid { field, .. }) => assert_eq!(field, "messages[1].tool_calls[0].arguments"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert!(fake.requests().is_empty());
}
