"""One chat completion through Plinth with the official `openai` package,
unchanged but for `base_url` and `api_key`. Exits non-zero unless the
answer is the expected text. Usage: openai_chat.py BASE_URL API_KEY MODEL EXPECTED"""

import sys

import openai

base_url, api_key, model, expected = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say something"}])
assert answer.choices[0].message.content == expected, answer
assert answer.usage.prompt_tokens > 0, answer.usage
print(answer.choices[0].message.content)
