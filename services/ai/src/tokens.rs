//! Token estimates without a provider's tokenizer: about four characters a
//! token (OpenAI's rule of thumb for English), plus a few tokens of framing
//! per message, and a flat 85 for an image (OpenAI's low-detail cost). Used
//! by `CountTokens` and to bill a cancelled stream that never received the
//! provider's own count.

use crate::model::{ChatRequest, Message, Part, Tool};

/// Characters per token.
const CHARS_PER_TOKEN: usize = 4;
/// Framing tokens per message (role and separators).
const PER_MESSAGE: u64 = 4;
/// Tokens per image.
const PER_IMAGE: u64 = 85;

/// Tokens of `text`.
pub fn of_text(text: &str) -> u64 {
    text.chars().count().div_ceil(CHARS_PER_TOKEN) as u64
}

/// Prompt tokens of `messages` and `tools`.
pub fn of_prompt(messages: &[Message], tools: &[Tool]) -> u64 {
    let mut total = 3;
    for m in messages {
        total += PER_MESSAGE;
        for part in &m.content {
            total += match part {
                Part::Text(t) => of_text(t),
                Part::Image(_) => PER_IMAGE,
                Part::Reasoning(r) => of_text(&r.text),
                Part::CachePoint => 0,
            };
        }
        for call in &m.tool_calls {
            total += of_text(&call.name) + of_text(&call.arguments);
        }
    }
    for t in tools {
        total += of_text(&t.name) + of_text(&t.description) + of_text(&t.parameters.to_string());
    }
    total
}

/// Prompt tokens of a request.
pub fn of_request(request: &ChatRequest) -> u64 {
    of_prompt(&request.messages, &request.tools)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    #[test]
    fn longer_prompts_count_more_and_images_count() {
        let short = vec![Message::text(Role::User, "hi")];
        let long = vec![Message::text(Role::User, "hello there ".repeat(100))];
        assert!(of_prompt(&long, &[]) > of_prompt(&short, &[]) + 250);
        assert_eq!(of_text("12345678"), 2);
        let mut with_image = short.clone();
        with_image[0]
            .content
            .push(Part::Image(crate::model::Image::Url("https://x/y.png".into())));
        assert_eq!(of_prompt(&with_image, &[]), of_prompt(&short, &[]) + PER_IMAGE);
    }
}
