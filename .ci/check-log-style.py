#!/usr/bin/env python3
"""Log messages are lowercase, with no final period, and values go in fields
(STYLE.md rule 11). Checks the message literal of every tracing macro call."""
import pathlib
import re
import sys

CALL = re.compile(r'\b(?:tracing::)?(trace|debug|info|warn|error)!\(')
failures = []
for path in pathlib.Path(".").glob("**/src/**/*.rs"):
    if "target" in path.parts or "vendor" in path.parts:
        continue
    text = path.read_text()
    for m in CALL.finditer(text):
        # The message is the last string literal before the closing parenthesis.
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        args = text[m.end():i - 1]
        literals = re.findall(r'"((?:[^"\\]|\\.)*)"', args)
        if not literals:
            continue
        msg = literals[-1]
        line = text.count("\n", 0, m.start()) + 1
        if msg[:1].isupper() and not msg[:2].isupper():
            failures.append(f"{path}:{line}: message starts with a capital: {msg!r}")
        if msg.endswith("."):
            failures.append(f"{path}:{line}: message ends with a period: {msg!r}")
        if "{" in msg and "}" in msg:
            failures.append(f"{path}:{line}: interpolated message, put values in fields: {msg!r}")
if failures:
    print("\n".join(failures))
    sys.exit(1)
print("log messages ok")
