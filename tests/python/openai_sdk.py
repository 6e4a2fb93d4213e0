"""The official `openai` package against Plinth's OpenAI-compatible surface,
unchanged but for `base_url` and `api_key`. Exits non-zero on the first
mismatch. Usage: openai_sdk.py BASE_URL API_KEY"""

import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=20)

models = [m.id for m in client.models.list()]
assert "chat" in models and "embed" in models, models
assert client.models.retrieve("chat").id == "chat"

answer = client.chat.completions.create(
    model="chat", messages=[{"role": "user", "content": "Say hello"}]
)
assert answer.choices[0].message.content == "Hello from Plinth", answer
assert answer.choices[0].finish_reason == "stop", answer
assert answer.usage.prompt_tokens == 9 and answer.usage.completion_tokens == 4, answer.usage

text, usage, finish = "", None, None
for chunk in client.chat.completions.create(
    model="chat",
    messages=[{"role": "system", "content": "Count."}, {"role": "user", "content": "1, 2"}],
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        assert chunk.choices == [], chunk
        usage = chunk.usage
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
assert text == "one two", text
assert finish == "stop", finish
assert usage is not None and usage.prompt_tokens == 11 and usage.completion_tokens == 2, usage

calls = {}
finish = None
for chunk in client.chat.completions.create(
    model="chat",
    messages=[{"role": "user", "content": "look up rust and go"}],
    tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}],
    stream=True,
):
    assert chunk.usage is None, "usage must only come when asked for"
    for choice in chunk.choices:
        for call in choice.delta.tool_calls or []:
            slot = calls.setdefault(call.index, {"id": None, "name": None, "arguments": ""})
            if call.id:
                slot["id"] = call.id
            if call.function and call.function.name:
                slot["name"] = call.function.name
            if call.function and call.function.arguments:
                slot["arguments"] += call.function.arguments
        finish = choice.finish_reason or finish
assert calls == {
    0: {"id": "call_a", "name": "lookup", "arguments": '{"q":"rust"}'},
    1: {"id": "call_b", "name": "lookup", "arguments": '{"q":"go"}'},
}, calls
assert finish == "tool_calls", finish

# The SDK asks for base64 by default and decodes it.
vectors = client.embeddings.create(model="embed", input=["first", "second"])
assert [d.embedding for d in vectors.data] == [[1.0, 2.0, 3.0], [0.5, -1.0, 0.25]], vectors
floats = client.embeddings.create(model="embed", input="third", encoding_format="float")
assert floats.data[0].embedding == [1.0, 2.0, 3.0], floats

try:
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], temperature=9)
    raise AssertionError("temperature 9 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "temperature" in str(e), e

try:
    client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError:
    pass

print("openai SDK: models, chat, streaming with usage, streamed tool calls, embeddings, errors: ok")
