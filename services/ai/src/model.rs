//! The one request and response shape every provider adapter translates to
//! and from. It follows OpenAI Chat Completions (the shape most callers
//! already speak) and keeps what the other providers need to round-trip:
//! tool-call ids, Gemini thought signatures, cache and reasoning token counts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Instructions from the application.
    System,
    /// OpenAI's newer name for system instructions.
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
}

/// One piece of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Part {
    /// Text.
    Text(String),
    /// An image, by URL (`https://…` or a `data:` URL).
    Image(Image),
    /// The model's reasoning from an earlier answer (assistant messages),
    /// sent back unchanged: Anthropic refuses tool-use turns whose thinking
    /// blocks were altered or dropped.
    Reasoning(Reasoning),
    /// A prompt-cache breakpoint: the provider may cache everything before
    /// it (Anthropic `cache_control` on the preceding block; ignored by
    /// providers that cache on their own).
    CachePoint,
}

/// A block of the model's reasoning, as the provider returned it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Reasoning {
    /// The reasoning text (empty when redacted).
    pub text: String,
    /// The provider's signature over it (Anthropic `signature`).
    pub signature: Option<String>,
    /// Encrypted reasoning the provider redacted (Anthropic `redacted_thinking`).
    pub redacted: Option<String>,
}

/// How much the model should reason before answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReasoningEffort {
    /// A little.
    Low,
    /// Some.
    Medium,
    /// A lot.
    High,
}

impl ReasoningEffort {
    /// Thinking tokens to allow for providers that take a budget
    /// (Anthropic `budget_tokens`, Gemini `thinkingBudget`).
    pub fn budget_tokens(self) -> u32 {
        match self {
            ReasoningEffort::Low => 1024,
            ReasoningEffort::Medium => 4096,
            ReasoningEffort::High => 16384,
        }
    }

    /// OpenAI's `reasoning_effort`.
    pub fn name(self) -> &'static str {
        match self {
            ReasoningEffort::Low => "low",
            ReasoningEffort::Medium => "medium",
            ReasoningEffort::High => "high",
        }
    }
}

/// An image input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Image {
    /// Fetched by the provider.
    Url(String),
    /// Inline bytes with their media type (`image/png`).
    Inline {
        /// The media type.
        media_type: String,
        /// The image, base64-encoded.
        base64: String,
    },
}

impl Image {
    /// Splits a `data:<media>;base64,<data>` URL into its inline form; other
    /// URLs stay URLs.
    pub fn from_url(url: &str) -> Image {
        if let Some(rest) = url.strip_prefix("data:")
            && let Some((meta, data)) = rest.split_once(',')
            && let Some(media_type) = meta.strip_suffix(";base64")
        {
            return Image::Inline {
                media_type: media_type.to_owned(),
                base64: data.to_owned(),
            };
        }
        Image::Url(url.to_owned())
    }

    /// The image as a URL (a `data:` URL for inline bytes).
    pub fn to_url(&self) -> String {
        match self {
            Image::Url(u) => u.clone(),
            Image::Inline { media_type, base64 } => format!("data:{media_type};base64,{base64}"),
        }
    }
}

/// A call the model asked for.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id; tool results name it.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// The arguments as JSON text (exactly as the model produced them).
    pub arguments: String,
    /// Gemini's opaque thought signature for this call; must be sent back
    /// unchanged with the call in later turns.
    pub thought_signature: Option<String>,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Its author.
    pub role: Role,
    /// Its content, in order.
    pub content: Vec<Part>,
    /// Tool calls (assistant messages only).
    pub tool_calls: Vec<ToolCall>,
    /// The call this message answers (tool messages only).
    pub tool_call_id: Option<String>,
    /// The function that produced a tool result (Gemini needs it).
    pub name: Option<String>,
}

impl Message {
    /// A message with only text.
    pub fn text(role: Role, text: impl Into<String>) -> Self {
        Self {
            role,
            content: vec![Part::Text(text.into())],
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// Its text parts joined.
    pub fn joined_text(&self) -> String {
        let mut out = String::new();
        for part in &self.content {
            if let Part::Text(t) = part {
                out.push_str(t);
            }
        }
        out
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Its name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// Its parameters as JSON Schema.
    pub parameters: Value,
}

/// Whether and which tools the model may call.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ToolChoice {
    /// The provider's default.
    #[default]
    Unset,
    /// The model decides.
    Auto,
    /// No tool calls.
    None,
    /// At least one tool call.
    Required,
    /// This function.
    Function(String),
}

/// The shape of the answer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching a schema.
    JsonSchema {
        /// The schema's name.
        name: String,
        /// The schema.
        schema: Value,
        /// Whether the provider must follow it exactly.
        strict: bool,
    },
}

/// A chat request after routing: `model` is the provider's model name.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The provider's model (or Azure deployment).
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Callable functions.
    pub tools: Vec<Tool>,
    /// Tool choice.
    pub tool_choice: ToolChoice,
    /// `Some(false)` asks for at most one tool call per turn.
    pub parallel_tool_calls: Option<bool>,
    /// The answer's shape.
    pub response_format: ResponseFormat,
    /// Sampling temperature (OpenAI range 0–2).
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Most output tokens.
    pub max_tokens: Option<u32>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// The end user, for provider abuse monitoring.
    pub user: Option<String>,
    /// Reasoning ("thinking") before the answer, for models that do it.
    pub reasoning_effort: Option<ReasoningEffort>,
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum FinishReason {
    /// Not reported (a stream that ended early).
    #[default]
    Unspecified,
    /// A natural end or a stop sequence.
    Stop,
    /// The token limit.
    Length,
    /// It wants tool results.
    ToolCalls,
    /// A safety filter stopped or blocked it.
    ContentFilter,
    /// Anthropic `pause_turn`: a server-side tool loop hit its limit; resend
    /// the conversation to continue.
    Paused,
    /// The provider reported an error reason (Gemini `MALFORMED_FUNCTION_CALL`, `OTHER`…).
    Error,
}

impl FinishReason {
    /// The OpenAI `finish_reason` string.
    pub fn openai(self) -> Option<&'static str> {
        match self {
            FinishReason::Unspecified => None,
            FinishReason::Stop | FinishReason::Paused => Some("stop"),
            FinishReason::Length => Some("length"),
            FinishReason::ToolCalls => Some("tool_calls"),
            FinishReason::ContentFilter => Some("content_filter"),
            FinishReason::Error => Some("stop"),
        }
    }
}

/// Tokens used by one call, in OpenAI's accounting: `input_tokens` counts
/// every prompt token including cached ones and cache writes;
/// `output_tokens` includes reasoning tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// All prompt tokens.
    pub input_tokens: u64,
    /// All completion tokens (reasoning included).
    pub output_tokens: u64,
    /// Prompt tokens read from the provider's cache (a subset of input).
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's cache (a subset of input; Anthropic).
    pub cache_write_tokens: u64,
    /// Reasoning tokens (a subset of output).
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Input plus output.
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }

    /// Whether nothing was counted.
    pub fn is_zero(&self) -> bool {
        *self == Usage::default()
    }
}

/// A finished (non-streamed) answer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The provider's response id.
    pub id: String,
    /// The model that answered, as the provider names it.
    pub model: String,
    /// The answer's text.
    pub text: String,
    /// Reasoning text, when the provider returns it.
    pub reasoning: String,
    /// The reasoning as the provider's blocks, with their signatures: send
    /// them back as [`Part::Reasoning`] in the next turn's assistant message.
    pub reasoning_blocks: Vec<Reasoning>,
    /// Tool calls, in order.
    pub tool_calls: Vec<ToolCall>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Tokens used.
    pub usage: Usage,
}

/// One step of a streamed answer. Tool-call `index`es count tool calls of
/// this answer from 0, whatever the provider's own block numbering.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// More answer text.
    Text(String),
    /// More reasoning text.
    Reasoning(String),
    /// The signature that closes the current reasoning block.
    ReasoningSignature(String),
    /// A reasoning block the provider redacted (its encrypted data).
    RedactedReasoning(String),
    /// A new tool call: always sent before any of its argument fragments.
    ToolCallStart {
        /// Its index among this answer's tool calls.
        index: u32,
        /// Its id.
        id: String,
        /// The function.
        name: String,
        /// Gemini's thought signature, when given.
        thought_signature: Option<String>,
    },
    /// A fragment of a tool call's JSON arguments.
    ToolCallArguments {
        /// The call's index.
        index: u32,
        /// Text to append.
        fragment: String,
    },
    /// Why the model stopped.
    Finish(FinishReason),
    /// Usage so far; a later `Usage` replaces an earlier one field by field
    /// where the later one is non-zero (see [`Usage::merge`]).
    Usage(Usage),
}

impl Usage {
    /// Takes every non-zero field of `later`, keeping ours where `later`
    /// says 0: providers split usage over several events and some repeat
    /// fields as 0, which must never erase a count already seen.
    pub fn merge(&mut self, later: Usage) {
        fn take(mine: &mut u64, theirs: u64) {
            if theirs != 0 {
                *mine = theirs;
            }
        }
        take(&mut self.input_tokens, later.input_tokens);
        take(&mut self.output_tokens, later.output_tokens);
        take(&mut self.cached_input_tokens, later.cached_input_tokens);
        take(&mut self.cache_write_tokens, later.cache_write_tokens);
        take(&mut self.reasoning_tokens, later.reasoning_tokens);
    }
}

/// An embeddings request after routing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EmbedRequest {
    /// The provider's model.
    pub model: String,
    /// Texts to embed.
    pub inputs: Vec<String>,
    /// Requested vector size, when the model supports several.
    pub dimensions: Option<u32>,
    /// The end user.
    pub user: Option<String>,
}

/// Embeddings, one per input, in input order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EmbedResponse {
    /// The model that answered.
    pub model: String,
    /// The vectors.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens used (input only).
    pub usage: Usage,
}

/// Assembles a streamed answer into a whole one (for billing what a
/// stream produced, and for tests).
#[derive(Debug, Default)]
pub struct Accumulator {
    response: ChatResponse,
}

impl Accumulator {
    /// Applies one event.
    pub fn push(&mut self, event: &StreamEvent) {
        let r = &mut self.response;
        match event {
            StreamEvent::Text(t) => r.text.push_str(t),
            StreamEvent::Reasoning(t) => {
                r.reasoning.push_str(t);
                match r.reasoning_blocks.last_mut() {
                    Some(open) if open.signature.is_none() && open.redacted.is_none() => open.text.push_str(t),
                    _ => r.reasoning_blocks.push(Reasoning {
                        text: t.clone(),
                        ..Reasoning::default()
                    }),
                }
            }
            StreamEvent::ReasoningSignature(sig) => match r.reasoning_blocks.last_mut() {
                Some(open) if open.signature.is_none() && open.redacted.is_none() => {
                    open.signature = Some(sig.clone());
                }
                _ => r.reasoning_blocks.push(Reasoning {
                    signature: Some(sig.clone()),
                    ..Reasoning::default()
                }),
            },
            StreamEvent::RedactedReasoning(data) => r.reasoning_blocks.push(Reasoning {
                redacted: Some(data.clone()),
                ..Reasoning::default()
            }),
            StreamEvent::ToolCallStart {
                index,
                id,
                name,
                thought_signature,
            } => {
                let i = *index as usize;
                if r.tool_calls.len() <= i {
                    r.tool_calls.resize(i + 1, ToolCall::default());
                }
                r.tool_calls[i].id.clone_from(id);
                r.tool_calls[i].name.clone_from(name);
                r.tool_calls[i].thought_signature.clone_from(thought_signature);
            }
            StreamEvent::ToolCallArguments { index, fragment } => {
                let i = *index as usize;
                if r.tool_calls.len() <= i {
                    r.tool_calls.resize(i + 1, ToolCall::default());
                }
                r.tool_calls[i].arguments.push_str(fragment);
            }
            StreamEvent::Finish(f) => r.finish_reason = *f,
            StreamEvent::Usage(u) => r.usage.merge(*u),
        }
    }

    /// Usage so far.
    pub fn usage(&self) -> Usage {
        self.response.usage
    }

    /// The answer so far.
    pub fn finish(self) -> ChatResponse {
        self.response
    }
}
